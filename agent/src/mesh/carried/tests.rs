use std::net::SocketAddr;

use super::*;
use crate::events::Outcome;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", Some(sa))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn conn(event: ConnEventKindName, role: Role, local: &str, remote: &str) -> Connection {
    let any = DropInfo {
        reason: DropReason::Authorization,
        direction: Direction::Ingress,
        protocol: IPPROTO_TCP,
    };
    Connection {
        event,
        cookie: 9,
        role,
        outcome: (event == ConnEventKindName::TcpClose).then_some(Outcome::Normal),
        dropped: None,
        ..Connection::refused(addr(local), addr(remote), any)
    }
}

fn carried() -> Carried {
    let c = Carried::default();
    c.set_directory(
        [
            ("10.0.1.10".parse().expect("ip"), id("web")),
            ("10.0.2.10".parse().expect("ip"), id("db")),
        ]
        .into(),
    );
    c.serving("shop/web", 77, vec!["10.0.1.10".parse().expect("ip")]);
    c
}

/// The open event of shop/web's (namespace 77) connection to 10.0.2.10:8080, captured.
fn captured() -> Connection {
    let mut c = conn(
        ConnEventKindName::TcpOpen,
        Role::Client,
        "127.0.0.1:40000",
        "10.0.2.10:8080",
    );
    c.meshed = true;
    c.mesh_netns = 77;
    c
}

fn principals(c: &Connection) -> Option<(String, String)> {
    c.security.as_ref().map(|s| {
        (
            s.source_principal.to_string(),
            s.destination_principal.to_string(),
        )
    })
}

/// A captured client's event: its loopback address becomes its pod's, and both identities
/// are named.
#[test]
fn a_captured_client_is_its_pod_with_both_principals() {
    let m = carried();
    let mut c = captured();
    m.annotate(&mut c);
    assert_eq!(c.local, addr("10.0.1.10:40000"));
    assert_eq!(
        principals(&c),
        Some((id("web").to_string(), id("db").to_string()))
    );
}

/// A captured client's connection to a pod this node serves was delivered on the node: local,
/// not tunnelled; to a pod of another node, tunnelled.
#[test]
fn a_captured_client_to_a_served_pod_is_local() {
    let m = carried();
    let transport = |m: &Carried| {
        let mut c = captured();
        m.annotate(&mut c);
        c.security.map(|s| s.transport)
    };
    assert_eq!(transport(&m), Some(Transport::Tunnel));
    m.serving("shop/db", 78, vec!["10.0.2.10".parse().expect("ip")]);
    assert_eq!(transport(&m), Some(Transport::Local));
}

/// A server's connection is marked, open and close, only when the kernel saw it delivered
/// from a tunnel; one that did not come through the mesh is not.
#[test]
fn a_delivered_server_connection_is_marked() {
    let m = carried();
    m.retain_pods(|_| false);
    m.serving("shop/db", 78, vec!["10.0.2.10".parse().expect("ip")]);
    let (client, server) = ("10.0.1.10:51000", "10.0.2.10:8080");
    for event in [ConnEventKindName::TcpOpen, ConnEventKindName::TcpClose] {
        let mut c = conn(event, Role::Server, server, client);
        c.delivered = true;
        m.annotate(&mut c);
        assert_eq!(
            principals(&c),
            Some((id("web").to_string(), id("db").to_string())),
            "{event:?}"
        );
        let mut plain = conn(event, Role::Server, server, client);
        m.annotate(&mut plain);
        assert_eq!(principals(&plain), None, "{event:?}");
    }
}

/// A connection between two meshed pods this node serves is named at both ends, carried
/// locally; one with an address the node does not serve is not.
#[test]
fn a_connection_between_two_served_pods_is_local_with_both_principals() {
    let m = carried();
    m.serving("shop/db", 78, vec!["10.0.2.10".parse().expect("ip")]);
    let (client, server) = ("10.0.1.10:51000", "10.0.2.10:8080");
    for (role, local, remote) in [
        (Role::Client, client, server),
        (Role::Server, server, client),
    ] {
        let mut c = conn(ConnEventKindName::TcpClose, role, local, remote);
        m.annotate(&mut c);
        assert_eq!(
            c.security,
            Some(Security {
                source_principal: Arc::from(id("web").to_string()),
                destination_principal: Arc::from(id("db").to_string()),
                transport: Transport::Local,
            }),
            "{role:?}"
        );
    }
    m.retain_pods(|pod| pod != "shop/db");
    let mut c = conn(ConnEventKindName::TcpOpen, Role::Client, client, server);
    m.annotate(&mut c);
    assert_eq!(c.security, None);
}

/// The kernel's mark alone does not make a connection delivered (a pod can mark its own
/// listener): its client must be a meshed pod this node does not serve, its server a pod it
/// serves.
#[test]
fn a_marked_connection_with_other_ends_than_a_delivery_is_not_labelled() {
    let m = carried();
    m.serving("shop/db", 78, vec!["10.0.2.10".parse().expect("ip")]);
    for (local, remote, why) in [
        (
            "10.0.2.10:8080",
            "10.0.9.9:51000",
            "a client outside the mesh",
        ),
        (
            "10.0.9.8:8080",
            "10.0.1.10:51000",
            "a server this node does not serve",
        ),
    ] {
        let mut c = conn(ConnEventKindName::TcpOpen, Role::Server, local, remote);
        c.delivered = true;
        m.annotate(&mut c);
        assert_eq!(principals(&c), None, "{why}");
    }
    let mut local = conn(
        ConnEventKindName::TcpOpen,
        Role::Server,
        "10.0.2.10:8080",
        "10.0.1.10:51000",
    );
    local.delivered = true;
    m.annotate(&mut local);
    assert_eq!(
        local.security.map(|s| s.transport),
        Some(Transport::Local),
        "a client this node serves is a local connection, whatever the mark"
    );
}

/// A node serving `x/web` (10.0.1.10) whose policy ALLOWs plaintext from 10.0.2.0/24 only
/// and AUDITs every caller, counting decisions in the returned registry's metrics.
fn guarding() -> (Carried, prometheus_client::registry::Registry) {
    use crate::compile::authz::tests::{ROOT, authz, world};
    let mut registry = prometheus_client::registry::Registry::default();
    let c = Carried::new(super::super::metrics::ProxyMetrics::new(&mut registry));
    let allow = authz(
        "x",
        "from-b",
        serde_json::json!({"selector": {"matchLabels": {"app": "web"}},
               "rules": [{"from": [{"source": {"ipBlocks": ["10.0.2.0/24"]}}]}]}),
    );
    let audit = authz(
        "x",
        "audit-all",
        serde_json::json!({"action": "AUDIT", "rules": [{}]}),
    );
    let store = world(&[allow, audit], &[]);
    let web = ("x".to_owned(), "web".to_owned());
    let compiled = crate::compile::authz::compile(&store, ROOT, [&web]);
    c.set_policy(
        compiled,
        [("10.0.1.10".parse().expect("ip"), "x/web".to_owned())].into(),
        ["10.0.2.1".parse().expect("ip")].into(),
    );
    (c, registry)
}

/// The decision counter's samples in `registry`, as sorted text lines.
fn decisions(registry: &prometheus_client::registry::Registry) -> Vec<String> {
    let mut out: Vec<String> = crate::metrics::encode(registry)
        .lines()
        .filter(|l| l.starts_with("authorization_decisions_total{"))
        .map(str::to_owned)
        .collect();
    out.sort();
    out
}

/// A plaintext connection a served pod accepts carries the decision of its policy (the
/// deciding rule and the AUDIT one beside it), and the decision is counted.
#[test]
fn an_accepted_plaintext_connection_carries_and_counts_its_decision() {
    let (c, registry) = guarding();
    let mut open = conn(
        ConnEventKindName::TcpOpen,
        Role::Server,
        "10.0.1.10:8080",
        "10.0.2.7:41000",
    );
    c.annotate(&mut open);
    let d = open.authorization.expect("a decision");
    assert_eq!((d.allowed, d.reason), (true, authz::Reason::Allowed));
    assert_eq!(d.by.map(|b| b.policy), Some("x/from-b".to_owned()));
    assert_eq!(d.audit.map(|a| a.policy), Some("x/audit-all".to_owned()));
    assert_eq!(
        decisions(&registry),
        [
            "authorization_decisions_total{action=\"allow\",policy=\"x/from-b\",reporter=\"destination\"} 1",
            "authorization_decisions_total{action=\"audit\",policy=\"x/audit-all\",reporter=\"destination\"} 1",
        ]
    );
}

/// Each SYN the kernel refuses is reported with the decision, but a caller's connection is
/// one decision however often its SYN is retransmitted.
#[test]
fn a_refused_plaintext_connection_is_one_decision() {
    let (c, registry) = guarding();
    for _ in 0..3 {
        let mut drop = conn(
            ConnEventKindName::Drop,
            Role::Server,
            "10.0.1.10:8080",
            "10.0.3.7:41000",
        );
        drop.dropped = Some(DropInfo {
            reason: DropReason::Authorization,
            direction: Direction::Ingress,
            protocol: IPPROTO_TCP,
        });
        c.annotate(&mut drop);
        let d = drop.authorization.expect("a decision");
        assert_eq!((d.allowed, d.reason), (false, authz::Reason::NotAllowed));
    }
    assert_eq!(
        decisions(&registry),
        [
            "authorization_decisions_total{action=\"audit\",policy=\"x/audit-all\",reporter=\"destination\"} 1",
            "authorization_decisions_total{action=\"deny\",policy=\"\",reporter=\"destination\"} 1",
        ]
    );
}

/// A stream the proxy refused becomes a drop record with both principals and the decision.
#[test]
fn a_refused_stream_is_handed_to_telemetry_once() {
    let (c, _registry) = guarding();
    c.set_directory([("10.0.3.7".parse().expect("ip"), id("api"))].into());
    let decision = c.decide(
        "x/web",
        &authz::Connection {
            source: "10.0.3.7".parse().expect("ip"),
            identity: Some(&id("api")),
            destination: "10.0.1.10".parse().expect("ip"),
            port: 8080,
        },
    );
    c.refused(
        addr("10.0.3.7:0"),
        addr("10.0.1.10:8080"),
        Transport::Tunnel,
        decision.clone(),
    );
    let refused = c.take_refused();
    assert_eq!(refused.len(), 1);
    let r = &refused[0];
    assert_eq!(r.event, ConnEventKindName::Drop);
    assert_eq!(
        (r.local, r.remote),
        (addr("10.0.1.10:8080"), addr("10.0.3.7:0"))
    );
    assert_eq!(r.dropped.map(|d| d.reason), Some(DropReason::Authorization));
    assert_eq!(
        r.security.as_ref().map(|s| &*s.source_principal),
        Some("spiffe://cluster.local/ns/shop/sa/api")
    );
    assert_eq!(r.authorization, decision);
    assert_eq!(c.take_refused(), []);
}

/// The pod's policy does not apply to connections from the node's own address (kubelet
/// probes: the kernel exempts them), even one its rules would match: no decision is named
/// or counted.
#[test]
fn a_connection_from_the_node_is_not_a_decision() {
    let (c, registry) = guarding();
    let mut open = conn(
        ConnEventKindName::TcpOpen,
        Role::Server,
        "10.0.1.10:8080",
        "10.0.2.1:41000",
    );
    c.annotate(&mut open);
    assert_eq!(open.authorization, None);
    assert_eq!(decisions(&registry), Vec::<String>::new());
}

/// A connection the proxy delivered carries the decision the proxy took (and counted), not
/// one taken again; telemetry counts nothing for it.
#[test]
fn a_delivered_connection_carries_the_proxys_decision() {
    let (c, registry) = guarding();
    c.set_directory([("10.0.3.7".parse().expect("ip"), id("api"))].into());
    c.serving("x/web", 77, vec!["10.0.1.10".parse().expect("ip")]);
    let proxys = authz::Decision {
        allowed: true,
        reason: authz::Reason::NoPolicy,
        by: None,
        audit: None,
    };
    c.delivered(
        "10.0.3.7".parse().expect("ip"),
        addr("10.0.1.10:8080"),
        proxys.clone(),
    );
    let mut open = conn(
        ConnEventKindName::TcpOpen,
        Role::Server,
        "10.0.1.10:8080",
        "10.0.3.7:41000",
    );
    open.delivered = true;
    c.annotate(&mut open);
    assert!(open.security.is_some(), "delivered from a tunnel");
    assert_eq!(open.authorization, Some(proxys), "the proxy's own");
    assert_eq!(decisions(&registry), Vec::<String>::new());
}

/// Decisions are taken on the policy in force: a new one decides afresh.
#[test]
fn decisions_follow_the_policy_in_force() {
    use crate::compile::authz::tests::{ROOT, authz, world};
    let (c, _registry) = guarding();
    let asked = authz::Connection {
        source: "10.0.2.7".parse().expect("ip"),
        identity: None,
        destination: "10.0.1.10".parse().expect("ip"),
        port: 8080,
    };
    let first = c.decide("x/web", &asked).expect("served");
    assert_eq!(
        c.decide("x/web", &asked),
        Some(first.clone()),
        "the same again"
    );
    assert!(first.allowed);
    let deny = authz(
        "x",
        "deny-b",
        serde_json::json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"ipBlocks": ["10.0.2.0/24"]}}]}]}),
    );
    let web = ("x".to_owned(), "web".to_owned());
    let compiled = crate::compile::authz::compile(&world(&[deny], &[]), ROOT, [&web]);
    c.set_policy(
        compiled,
        [("10.0.1.10".parse().expect("ip"), "x/web".to_owned())].into(),
        BTreeSet::new(),
    );
    let after = c.decide("x/web", &asked).expect("served");
    assert_eq!(
        (after.allowed, after.reason),
        (false, authz::Reason::Denied)
    );
}
