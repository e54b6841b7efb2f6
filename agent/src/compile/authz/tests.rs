//! Conformance: a table of Istio's documented semantics, each row checked on weft's decision
//! and on the reference reading ([`reference`]); random worlds compare the two.
mod reference;
mod worlds;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde_json::{Value, json};

use self::reference::{Call, Dest, TRUST_DOMAIN};
use super::{Connection, Reason, compile, decide};
use crate::{
    compile::policy::tests::model::store_of,
    identity::SpiffeId,
    source::yaml,
    store::{Key, Store, security},
};

pub const ROOT: &str = "istio-system";

/// The destinations: `x/web` (app=web) and `x/db` (app=db).
pub const PODS: [&str; 2] = [
    "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: x, labels: {app: web}}\nspec: {serviceAccountName: web, containers: []}\nstatus: {podIP: 10.0.1.10}\n",
    "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: x, labels: {app: db}}\nspec: {serviceAccountName: db, containers: []}\nstatus: {podIP: 10.0.1.11}\n",
];

/// A caller: its address, verified identity (namespace, service account) and the mesh's
/// trust domain.
#[derive(Debug, Clone, Copy)]
pub struct Caller(
    pub &'static str,
    pub Option<(&'static str, &'static str)>,
    pub &'static str,
);

pub const CLIENT: Caller = Caller("10.0.2.20", Some(("y", "client")), TRUST_DOMAIN);
pub const ADMIN: Caller = Caller("10.0.2.21", Some(("x", "admin")), TRUST_DOMAIN);
pub const PLAIN: Caller = Caller("10.0.2.30", None, TRUST_DOMAIN);

pub fn authz(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

pub fn peer(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
}

/// The store with the pods and the given documents, decoded and validated as a source would.
pub fn world(authz: &[Value], peer: &[Value]) -> Store {
    let mut store = store_of(&PODS);
    for v in authz {
        let ap = crate::store::authorization_policy(v).expect("a valid AuthorizationPolicy");
        let key = (
            ap.metadata.namespace.clone().expect("ns"),
            ap.metadata.name.clone().expect("name"),
        );
        store.authorization_policies.insert(key, Arc::new(ap));
    }
    for v in peer {
        let pa = crate::store::peer_authentication(v).expect("a valid PeerAuthentication");
        let key = (
            pa.metadata.namespace.clone().expect("ns"),
            pa.metadata.name.clone().expect("name"),
        );
        store.peer_authentications.insert(key, Arc::new(pa));
    }
    store
}

/// weft's decision: (allowed, reason, deciding policy and rule).
pub fn weft(
    store: &Store,
    to: &str,
    from: Caller,
    port: u16,
) -> (bool, Reason, Option<(String, usize)>) {
    let key: Key = ("x".to_owned(), to.to_owned());
    let authz = compile(store, ROOT, [&key]);
    let identity = from.1.map(|(ns, sa)| SpiffeId::new(from.2, ns, Some(sa)));
    let d = decide(
        &authz.workloads[&key],
        &Connection {
            source: ip(from.0),
            identity: identity.as_ref(),
            destination: destination(to),
            port,
        },
    );
    (d.allowed, d.reason, d.by.map(|b| (b.policy, b.rule)))
}

/// The reference's decision: (allowed, reason).
pub fn referee(
    authz: &[Value],
    peer: &[Value],
    to: &str,
    from: Caller,
    port: u16,
) -> (bool, &'static str) {
    let labels = BTreeMap::from([("app".to_owned(), to.to_owned())]);
    let call = Call {
        source: ip(from.0),
        identity: from
            .1
            .map(|(ns, sa)| (from.2.to_owned(), ns.to_owned(), sa.to_owned())),
        destination: destination(to),
        port,
    };
    reference::decide(
        ROOT,
        &Dest {
            namespace: "x",
            labels: &labels,
        },
        authz,
        peer,
        &call,
    )
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn destination(pod: &str) -> IpAddr {
    ip(if pod == "web" {
        "10.0.1.10"
    } else {
        "10.0.1.11"
    })
}

/// One row: documents, a connection, and what Istio's semantics say.
struct Row {
    what: &'static str,
    authz: Vec<Value>,
    peer: Vec<Value>,
    to: &'static str,
    from: Caller,
    port: u16,
    allowed: bool,
    reason: Reason,
    /// `name` (in `x` or the root namespace) and rule index of the deciding rule.
    by: Option<(&'static str, usize)>,
}

fn check(rows: Vec<Row>) {
    for r in rows {
        let store = world(&r.authz, &r.peer);
        let (allowed, reason, by) = weft(&store, r.to, r.from, r.port);
        let by = by.map(|(p, i)| (p.rsplit('/').next().unwrap_or_default().to_owned(), i));
        let want_by = r.by.map(|(p, i)| (p.to_owned(), i));
        assert_eq!(
            (allowed, reason, by),
            (r.allowed, r.reason, want_by),
            "weft: {}",
            r.what
        );
        assert_eq!(
            referee(&r.authz, &r.peer, r.to, r.from, r.port),
            (r.allowed, r.reason.as_str()),
            "reference: {}",
            r.what
        );
    }
}

fn row(
    what: &'static str,
    authz: Vec<Value>,
    from: Caller,
    port: u16,
    allowed: bool,
    reason: Reason,
    by: Option<(&'static str, usize)>,
) -> Row {
    Row {
        what,
        authz,
        peer: Vec::new(),
        to: "web",
        from,
        port,
        allowed,
        reason,
        by,
    }
}

fn allow(rules: Value) -> Value {
    authz("x", "allow", json!({"rules": rules}))
}

fn deny(rules: Value) -> Value {
    authz("x", "deny", json!({"action": "DENY", "rules": rules}))
}

fn source(source: Value) -> Value {
    json!([{"from": [{"source": source}]}])
}

#[test]
fn sources_match_by_identity_and_address() {
    use Reason::{Allowed, NotAllowed};
    let p = |s: Value| vec![allow(source(s))];
    let ok = Some(("allow", 0));
    check(vec![
        row(
            "exact principal",
            p(json!({"principals": ["cluster.local/ns/y/sa/client"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "exact principal, another caller",
            p(json!({"principals": ["cluster.local/ns/y/sa/client"]})),
            ADMIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "suffix wildcard",
            p(json!({"principals": ["*/sa/client"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "prefix wildcard",
            p(json!({"principals": ["cluster.local/ns/y/*"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "prefix wildcard, another namespace",
            p(json!({"principals": ["cluster.local/ns/y/*"]})),
            ADMIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "presence: any verified caller",
            p(json!({"principals": ["*"]})),
            ADMIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "presence: plaintext has no principal",
            p(json!({"principals": ["*"]})),
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notPrincipals excludes",
            p(json!({"notPrincipals": ["*admin"]})),
            ADMIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notPrincipals admits plaintext",
            p(json!({"notPrincipals": ["*admin"]})),
            PLAIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "namespaces",
            p(json!({"namespaces": ["y"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "namespaces need a certificate",
            p(json!({"namespaces": ["*"]})),
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "namespace prefix",
            p(json!({"namespaces": ["y*"]})),
            ADMIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notNamespaces",
            p(json!({"notNamespaces": ["y"]})),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notNamespaces admits another",
            p(json!({"notNamespaces": ["y"]})),
            ADMIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "serviceAccounts default to the policy's namespace",
            p(json!({"serviceAccounts": ["client"]})),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "serviceAccounts with a namespace",
            p(json!({"serviceAccounts": ["y/client"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "serviceAccounts of the policy's namespace",
            p(json!({"serviceAccounts": ["admin"]})),
            ADMIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "notServiceAccounts",
            p(json!({"notServiceAccounts": ["y/client"]})),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "ipBlocks CIDR",
            p(json!({"ipBlocks": ["10.0.2.0/24"]})),
            PLAIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "ipBlocks address",
            p(json!({"ipBlocks": ["10.0.2.20"]})),
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notIpBlocks",
            p(json!({"ipBlocks": ["10.0.0.0/16"], "notIpBlocks": ["10.0.2.30"]})),
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "remoteIpBlocks are the source at L4",
            p(json!({"remoteIpBlocks": ["10.0.2.16/28"]})),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "notRemoteIpBlocks",
            p(json!({"notRemoteIpBlocks": ["10.0.2.20"]})),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "every field of a source must hold",
            p(json!({"namespaces": ["y"], "ipBlocks": ["10.0.3.0/24"]})),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "any source of a rule",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["z"]}}, {"source": {"ipBlocks": ["10.0.2.20/32"]}}]}]),
            )],
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
    ]);
}

#[test]
fn operations_and_conditions() {
    use Reason::{Allowed, NotAllowed};
    let ok = Some(("allow", 0));
    let to = |op: Value| vec![allow(json!([{"to": [{"operation": op}]}]))];
    let when =
        |key: &str, values: Value| vec![allow(json!([{"when": [{"key": key, "values": values}]}]))];
    let unless = |key: &str, values: Value| {
        vec![allow(
            json!([{"when": [{"key": key, "notValues": values}]}]),
        )]
    };
    check(vec![
        row(
            "ports",
            to(json!({"ports": ["80"]})),
            PLAIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "ports, another port",
            to(json!({"ports": ["80"]})),
            PLAIN,
            8080,
            false,
            NotAllowed,
            None,
        ),
        row(
            "notPorts",
            to(json!({"notPorts": ["80"]})),
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "when source.ip",
            when("source.ip", json!(["10.0.2.0/24"])),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "when remote.ip",
            when("remote.ip", json!(["10.0.9.0/24"])),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "when source.namespace",
            when("source.namespace", json!(["x"])),
            ADMIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "when source.namespace, plaintext",
            unless("source.namespace", json!(["x"])),
            PLAIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "when source.principal",
            when("source.principal", json!(["*/ns/x/sa/admin"])),
            ADMIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "when source.serviceAccount",
            when("source.serviceAccount", json!(["y/client"])),
            CLIENT,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "when destination.ip",
            when("destination.ip", json!(["10.0.1.11"])),
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "when destination.port notValues",
            unless("destination.port", json!(["8080"])),
            CLIENT,
            8080,
            false,
            NotAllowed,
            None,
        ),
        row(
            "values and notValues together",
            vec![allow(
                json!([{"when": [{"key": "source.ip", "values": ["10.0.2.0/24"], "notValues": ["10.0.2.20"]}]}]),
            )],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "every condition must hold",
            vec![allow(
                json!([{"when": [{"key": "source.namespace", "values": ["y"]}, {"key": "destination.port", "values": ["9000"]}]}]),
            )],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "from and to must both hold",
            vec![allow(
                json!([{"from": [{"source": {"namespaces": ["y"]}}], "to": [{"operation": {"ports": ["9000"]}}]}]),
            )],
            CLIENT,
            9000,
            true,
            Allowed,
            ok,
        ),
        row(
            "an empty rule matches everything",
            vec![allow(json!([{}]))],
            PLAIN,
            80,
            true,
            Allowed,
            ok,
        ),
        row(
            "a later rule of the policy",
            vec![allow(
                json!([{"to": [{"operation": {"ports": ["1"]}}]}, {"to": [{"operation": {"ports": ["80"]}}]}]),
            )],
            PLAIN,
            80,
            true,
            Allowed,
            Some(("allow", 1)),
        ),
    ]);
}

#[test]
fn actions_in_istio_order() {
    use Reason::{Allowed, Custom, Denied, NoPolicy, NotAllowed};
    let allow_all = allow(json!([{}]));
    let deny_y = deny(source(json!({"namespaces": ["y"]})));
    let audit = authz("x", "audit", json!({"action": "AUDIT", "rules": [{}]}));
    let custom = authz(
        "x",
        "ext",
        json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}),
    );
    check(vec![
        row("no policy allows", vec![], PLAIN, 80, true, NoPolicy, None),
        row(
            "an ALLOW policy without rules allows nothing",
            vec![authz("x", "nothing", json!({}))],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "DENY wins over ALLOW",
            vec![allow_all.clone(), deny_y.clone()],
            CLIENT,
            80,
            false,
            Denied,
            Some(("deny", 0)),
        ),
        row(
            "a DENY that does not match",
            vec![allow_all.clone(), deny_y.clone()],
            ADMIN,
            80,
            true,
            Allowed,
            Some(("allow", 0)),
        ),
        row(
            "DENY alone leaves the rest allowed",
            vec![deny_y],
            ADMIN,
            80,
            true,
            NoPolicy,
            None,
        ),
        row(
            "AUDIT does not change the verdict",
            vec![audit.clone()],
            PLAIN,
            80,
            true,
            NoPolicy,
            None,
        ),
        row(
            "AUDIT beside ALLOW",
            vec![audit, authz("x", "nothing", json!({}))],
            PLAIN,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "a matching CUSTOM rule denies",
            vec![custom.clone(), allow_all.clone()],
            CLIENT,
            9000,
            false,
            Custom,
            Some(("ext", 0)),
        ),
        row(
            "a CUSTOM rule that does not match",
            vec![custom, allow_all],
            CLIENT,
            80,
            true,
            Allowed,
            Some(("allow", 0)),
        ),
    ]);
}

#[test]
fn audit_is_named_beside_the_verdict() {
    let audit = authz(
        "x",
        "audit",
        json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"notPorts": ["1"]}}]}]}),
    );
    let store = world(&[audit], &[]);
    let key: Key = ("x".to_owned(), "web".to_owned());
    let authz = compile(&store, ROOT, [&key]);
    let d = decide(
        &authz.workloads[&key],
        &Connection {
            source: ip("10.0.2.30"),
            identity: None,
            destination: ip("10.0.1.10"),
            port: 80,
        },
    );
    assert!(d.allowed);
    assert_eq!(
        d.audit.map(|a| (a.policy, a.rule)),
        Some(("x/audit".to_owned(), 0))
    );
}

#[test]
fn http_attributes_at_l4() {
    use Reason::{Allowed, Denied, NoPolicy, NotAllowed};
    let methods = json!({"operation": {"methods": ["GET"]}});
    let with_port = json!({"operation": {"methods": ["GET"], "ports": ["80"]}});
    check(vec![
        row(
            "an ALLOW rule with methods matches nothing",
            vec![allow(json!([{"to": [methods.clone()]}]))],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "the policy's other rules still match",
            vec![allow(
                json!([{"to": [methods.clone()]}, {"from": [{"source": {"namespaces": ["y"]}}]}]),
            )],
            CLIENT,
            80,
            true,
            Allowed,
            Some(("allow", 1)),
        ),
        row(
            "an ALLOW rule with a header condition",
            vec![allow(
                json!([{"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}]),
            )],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "an ALLOW rule with requestPrincipals",
            vec![allow(source(
                json!({"namespaces": ["y"], "requestPrincipals": ["*"]}),
            ))],
            CLIENT,
            80,
            false,
            NotAllowed,
            None,
        ),
        row(
            "a DENY rule with only methods denies every connection",
            vec![deny(json!([{"to": [methods]}]))],
            ADMIN,
            8080,
            false,
            Denied,
            Some(("deny", 0)),
        ),
        row(
            "a DENY rule keeps its ports",
            vec![deny(json!([{"to": [with_port.clone()]}]))],
            ADMIN,
            8080,
            true,
            NoPolicy,
            None,
        ),
        row(
            "a DENY rule keeps its ports, matching",
            vec![deny(json!([{"to": [with_port]}]))],
            ADMIN,
            80,
            false,
            Denied,
            Some(("deny", 0)),
        ),
        row(
            "a DENY rule with requestPrincipals",
            vec![deny(source(json!({"requestPrincipals": ["*"]})))],
            PLAIN,
            80,
            false,
            Denied,
            Some(("deny", 0)),
        ),
        row(
            "a DENY rule with sni",
            vec![deny(
                json!([{"when": [{"key": "connection.sni", "values": ["a.example"]}]}]),
            )],
            CLIENT,
            80,
            false,
            Denied,
            Some(("deny", 0)),
        ),
    ]);
}

#[test]
fn scopes_of_authorization_policies() {
    use Reason::{NoPolicy, NotAllowed};
    let nothing = |ns: &str, selector: Value| authz(ns, "nothing", json!({"selector": selector}));
    let on =
        |to: &'static str, authz: Vec<Value>, allowed: bool, reason: Reason, what: &'static str| {
            Row {
                what,
                authz,
                peer: Vec::new(),
                to,
                from: CLIENT,
                port: 80,
                allowed,
                reason,
                by: None,
            }
        };
    check(vec![
        on(
            "web",
            vec![authz("y", "nothing", json!({}))],
            true,
            NoPolicy,
            "another namespace's policy",
        ),
        on(
            "db",
            vec![authz(ROOT, "nothing", json!({}))],
            false,
            NotAllowed,
            "the root namespace's applies everywhere",
        ),
        on(
            "web",
            vec![nothing(ROOT, json!({"matchLabels": {"app": "web"}}))],
            false,
            NotAllowed,
            "a root selector selects in every namespace",
        ),
        on(
            "db",
            vec![nothing(ROOT, json!({"matchLabels": {"app": "web"}}))],
            true,
            NoPolicy,
            "a root selector that does not match",
        ),
        on(
            "db",
            vec![authz("x", "nothing", json!({}))],
            false,
            NotAllowed,
            "namespace wide",
        ),
        on(
            "web",
            vec![nothing("x", json!({"matchLabels": {"app": "db"}}))],
            true,
            NoPolicy,
            "a selector for another workload",
        ),
        on(
            "web",
            vec![nothing("x", json!({}))],
            false,
            NotAllowed,
            "an empty selector selects all",
        ),
        on(
            "web",
            vec![authz(
                "x",
                "waypoint",
                json!({"targetRefs": [{"kind": "Service", "name": "web"}]}),
            )],
            true,
            NoPolicy,
            "targetRefs are for waypoints",
        ),
    ]);
}

#[test]
fn peer_authentication_scopes_and_ports() {
    use Reason::{MtlsRequired, NoPolicy};
    let mode = |m: &str| json!({"mtls": {"mode": m}});
    let web = |spec: Value| {
        let mut s = spec;
        s["selector"] = json!({"matchLabels": {"app": "web"}});
        peer("x", "web", s)
    };
    let on = |what: &'static str,
              peer: Vec<Value>,
              to: &'static str,
              from: Caller,
              port: u16,
              allowed: bool| Row {
        what,
        authz: Vec::new(),
        peer,
        to,
        from,
        port,
        allowed,
        reason: if allowed { NoPolicy } else { MtlsRequired },
        by: None,
    };
    let ns_strict = peer("x", "ns", mode("STRICT"));
    let web_ports = web(json!({"portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}));
    check(vec![
        on("no policy: PERMISSIVE", vec![], "web", PLAIN, 80, true),
        on(
            "mesh STRICT refuses plaintext",
            vec![peer(ROOT, "mesh", mode("STRICT"))],
            "db",
            PLAIN,
            80,
            false,
        ),
        on(
            "mesh STRICT admits a certificate",
            vec![peer(ROOT, "mesh", mode("STRICT"))],
            "db",
            CLIENT,
            80,
            true,
        ),
        on(
            "namespace PERMISSIVE over mesh STRICT",
            vec![
                peer(ROOT, "mesh", mode("STRICT")),
                peer("x", "ns", mode("PERMISSIVE")),
            ],
            "web",
            PLAIN,
            80,
            true,
        ),
        on(
            "namespace UNSET inherits",
            vec![
                peer(ROOT, "mesh", mode("STRICT")),
                peer("x", "ns", mode("UNSET")),
            ],
            "web",
            PLAIN,
            80,
            false,
        ),
        on(
            "another namespace's policy",
            vec![peer("y", "ns", mode("STRICT"))],
            "web",
            PLAIN,
            80,
            true,
        ),
        on(
            "a port-level exception",
            vec![ns_strict.clone(), web_ports.clone()],
            "web",
            PLAIN,
            8080,
            true,
        ),
        on(
            "other ports inherit",
            vec![ns_strict.clone(), web_ports.clone()],
            "web",
            PLAIN,
            80,
            false,
        ),
        on(
            "another workload",
            vec![ns_strict.clone(), web_ports],
            "db",
            PLAIN,
            8080,
            false,
        ),
        on(
            "workload STRICT, port DISABLE",
            vec![web(
                json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
            )],
            "web",
            PLAIN,
            9000,
            true,
        ),
        on(
            "workload PERMISSIVE, port STRICT",
            vec![web(
                json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"80": {"mode": "STRICT"}}}),
            )],
            "web",
            PLAIN,
            80,
            false,
        ),
        on(
            "a port UNSET inherits the workload",
            vec![
                ns_strict.clone(),
                web(json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"80": {}}})),
            ],
            "web",
            PLAIN,
            80,
            true,
        ),
        on(
            "of one scope the first wins",
            vec![
                peer("x", "a-strict", mode("STRICT")),
                peer("x", "b-permissive", mode("PERMISSIVE")),
            ],
            "web",
            PLAIN,
            80,
            false,
        ),
        on(
            "a root selector has no effect",
            vec![peer(
                ROOT,
                "web",
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
            )],
            "web",
            PLAIN,
            80,
            true,
        ),
    ]);
}

#[test]
fn strict_is_judged_before_authorization() {
    let allow_plain = allow(source(json!({"ipBlocks": ["10.0.2.0/24"]})));
    let mut r = row(
        "STRICT first",
        vec![allow_plain],
        PLAIN,
        80,
        false,
        Reason::MtlsRequired,
        None,
    );
    r.peer = vec![peer("x", "ns", json!({"mtls": {"mode": "STRICT"}}))];
    check(vec![r]);
}

#[test]
fn what_weft_cannot_do_is_reported() {
    let store = world(
        &[
            allow(json!([{"to": [{"operation": {"methods": ["GET"]}}]}])),
            authz(
                "x",
                "waypoint",
                json!({"targetRef": {"kind": "Service", "name": "web"}}),
            ),
            authz(
                "x",
                "ext",
                json!({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
            ),
        ],
        &[
            peer("x", "a", json!({"mtls": {"mode": "STRICT"}})),
            peer("x", "b", json!({"mtls": {"mode": "PERMISSIVE"}})),
            peer(
                ROOT,
                "sel",
                json!({"selector": {"matchLabels": {"app": "web"}}}),
            ),
        ],
    );
    let keys: Vec<Key> = ["web", "db"].map(|p| ("x".to_owned(), p.to_owned())).into();
    let out = compile(&store, ROOT, &keys);
    let problems: Vec<(String, String)> = out
        .problems
        .into_iter()
        .map(|p| (p.object, p.message))
        .collect();
    let want = [
        (
            "AuthorizationPolicy x/allow",
            "rules[0] needs HTTP attributes (methods), which weft cannot see at L4: this ALLOW rule matches no connection",
        ),
        (
            "AuthorizationPolicy x/ext",
            "CUSTOM: weft cannot ask the external authorizer, so connections its rules match are denied",
        ),
        (
            "AuthorizationPolicy x/waypoint",
            "targets a Service or Gateway (targetRef): enforced by a waypoint or gateway, not by weft",
        ),
        (
            "PeerAuthentication istio-system/sel",
            "a selector in the root namespace has no effect (as in Istio): use the workload's namespace",
        ),
        (
            "PeerAuthentication x/b",
            "ignored: x/a is older and has the same scope (the oldest wins)",
        ),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(o, m)| ((*o).to_owned(), (*m).to_owned()))
        .collect();
    assert_eq!(problems, want);
    assert_eq!(out.policies["x/allow"], keys);
    assert_eq!(out.policies["x/waypoint"], Vec::<Key>::new());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
    /// weft's decisions agree with the reference for random policies, every destination,
    /// caller and port.
    #[test]
    fn decisions_agree_with_the_reference(seed in proptest::prelude::any::<u64>()) {
        worlds::check(seed)?;
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// The plaintext entries the kernel will hold decide as `decide` does.
    #[test]
    fn plaintext_entries_decide_as_the_evaluator(seed in proptest::prelude::any::<u64>()) {
        worlds::check_table(seed)?;
    }

    /// Every decision, its deciding rule and its AUDIT rule included, is the same with the
    /// policy index as with every policy tried.
    #[test]
    fn the_index_decides_as_trying_every_policy(seed in proptest::prelude::any::<u64>()) {
        worlds::check_index(seed)?;
    }

    /// The kernel's table of a pod with several addresses, looked up as the kernel does,
    /// allows a plaintext caller exactly when every address of its family does.
    #[test]
    fn kernel_tables_decide_as_the_evaluator_at_every_address(
        seed in proptest::prelude::any::<u64>(),
    ) {
        worlds::check_kernel_table(seed)?;
    }
}

#[test]
fn yaml_documents_decode_as_json_ones() {
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: x}\nspec:\n  rules:\n  - from: [{source: {namespaces: ['y']}}]\n";
    let from_yaml =
        crate::store::authorization_policy(&yaml::parse(text).expect("yaml")).expect("valid");
    let from_json =
        crate::store::authorization_policy(&allow(source(json!({"namespaces": ["y"]}))))
            .expect("valid");
    assert_eq!(from_yaml, from_json);
}

/// A rejected document's stand-in in the store, as a source would put it.
fn with_stand_ins(mut store: Store, authz: &[Value], peer: &[Value]) -> Store {
    use crate::store::stand_in;
    for v in authz {
        assert!(
            crate::store::authorization_policy(v).is_err(),
            "rejected: {v}"
        );
        if let Some(ap) =
            stand_in::authorization_policy(v, v["metadata"]["namespace"].as_str().expect("ns"))
        {
            let key = (
                ap.metadata.namespace.clone().expect("ns"),
                ap.metadata.name.clone().expect("name"),
            );
            store.authorization_policies.insert(key, Arc::new(ap));
        }
    }
    for v in peer {
        assert!(
            crate::store::peer_authentication(v).is_err(),
            "rejected: {v}"
        );
        let pa = stand_in::peer_authentication(v, v["metadata"]["namespace"].as_str().expect("ns"))
            .expect("a stand-in");
        let key = (
            pa.metadata.namespace.clone().expect("ns"),
            pa.metadata.name.clone().expect("name"),
        );
        store.peer_authentications.insert(key, Arc::new(pa));
    }
    store
}

#[test]
fn a_rejected_allow_policy_allows_nothing_for_what_it_selects() {
    let bad = authz(
        "x",
        "bad",
        json!({"selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"source": {"ipBlocks": ["10.0.2.0/33"]}}]}]}),
    );
    let store = with_stand_ins(world(&[], &[]), &[bad], &[]);
    assert_eq!(
        weft(&store, "web", PLAIN, 80),
        (false, Reason::NotAllowed, None)
    );
    assert_eq!(
        weft(&store, "db", PLAIN, 80),
        (true, Reason::NoPolicy, None)
    );
}

#[test]
fn a_rejected_deny_policy_with_an_unusable_selector_denies_its_whole_namespace() {
    let bad = authz(
        "x",
        "bad",
        json!({"action": "DENY", "selector": {"matchLabels": {"app": "web*"}}, "rules": [{"from": [{"source": {"namespaces": ["y"]}}]}]}),
    );
    let allow_all = allow(json!([{}]));
    let store = with_stand_ins(world(&[allow_all], &[]), &[bad], &[]);
    let by = Some(("x/bad".to_owned(), 0));
    assert_eq!(
        weft(&store, "db", ADMIN, 80),
        (false, Reason::Denied, by.clone())
    );
    assert_eq!(
        weft(&store, "web", CLIENT, 9000),
        (false, Reason::Denied, by)
    );
}

#[test]
fn a_rejected_audit_policy_changes_nothing() {
    let bad = authz(
        "x",
        "bad",
        json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
    );
    let store = with_stand_ins(world(&[], &[]), &[bad], &[]);
    let stand_in = &store.authorization_policies[&("x".to_owned(), "bad".to_owned())];
    assert_eq!(
        (stand_in.spec.action, stand_in.spec.rules.clone()),
        (Some(security::Action::Audit), None),
        "decides nothing"
    );
    assert_eq!(
        weft(&store, "web", PLAIN, 80),
        (true, Reason::NoPolicy, None)
    );
}

#[test]
fn a_rejected_peer_authentication_is_strict_over_any_other() {
    let older = peer("x", "a-permissive", json!({"mtls": {"mode": "PERMISSIVE"}}));
    let bad = peer("x", "b-bad", json!({"mtls": {"mode": "STRICTLY"}}));
    let store = with_stand_ins(world(&[], &[older]), &[], &[bad]);
    assert_eq!(
        weft(&store, "db", PLAIN, 80),
        (false, Reason::MtlsRequired, None)
    );
    assert_eq!(
        weft(&store, "db", CLIENT, 80),
        (true, Reason::NoPolicy, None)
    );
}

#[test]
fn empty_lists_are_absent_ones() {
    let empty_from = deny(json!([{"from": [], "to": [{"operation": {"ports": ["22"]}}]}]));
    let store = world(&[empty_from], &[]);
    assert_eq!(
        weft(&store, "web", CLIENT, 22),
        (false, Reason::Denied, Some(("x/deny".to_owned(), 0)))
    );
}

#[test]
fn cluster_local_names_the_mesh_trust_domain() {
    let p = vec![allow(source(
        json!({"principals": ["cluster.local/ns/y/sa/client"]}),
    ))];
    let store = world(&p, &[]);
    let elsewhere = Caller("10.0.2.20", Some(("y", "client")), "example.org");
    assert_eq!(
        weft(&store, "web", elsewhere, 80),
        (true, Reason::Allowed, Some(("x/allow".to_owned(), 0)))
    );
}

#[test]
fn a_mapped_address_is_its_ipv4_address() {
    let store = world(&[deny(source(json!({"ipBlocks": ["10.0.2.0/24"]})))], &[]);
    assert_eq!(
        weft(
            &store,
            "web",
            Caller("::ffff:10.0.2.30", None, TRUST_DOMAIN),
            80
        ),
        (false, Reason::Denied, Some(("x/deny".to_owned(), 0)))
    );
}

/// A value no parser reads (it can only come from a stored object that skipped
/// validation): an ALLOW rule does not match on it, a DENY rule does.
#[test]
fn a_value_that_does_not_parse_never_opens() {
    let mut store = world(&[], &[]);
    let unparsable = |action: &str, name: &str| {
        let mut v = authz(
            "x",
            name,
            json!({"action": action, "rules": [{"from": [{"source": {"ipBlocks": ["not-an-address"]}}]}]}),
        );
        v["metadata"]["namespace"] = json!("x");
        let ap: security::AuthorizationPolicy = serde_json::from_value(v).expect("decodes");
        (("x".to_owned(), name.to_owned()), Arc::new(ap))
    };
    let (key, ap) = unparsable("ALLOW", "allow");
    store.authorization_policies.insert(key, ap);
    assert_eq!(
        weft(&store, "web", PLAIN, 80),
        (false, Reason::NotAllowed, None)
    );
    let (key, ap) = unparsable("DENY", "deny");
    store.authorization_policies.insert(key, ap);
    assert_eq!(
        weft(&store, "web", CLIENT, 80),
        (false, Reason::Denied, Some(("x/deny".to_owned(), 0)))
    );
}

#[test]
fn a_dry_run_policy_is_not_enforced() {
    let mut nothing = authz("x", "nothing", json!({}));
    nothing["metadata"]["annotations"] = json!({"istio.io/dry-run": "true"});
    let store = world(&[nothing], &[]);
    assert_eq!(
        weft(&store, "web", CLIENT, 80),
        (true, Reason::NoPolicy, None)
    );
}

/// Of two PeerAuthentications of one scope the older wins; one from a file (no creation
/// time) counts as older than any from the API.
#[test]
fn the_oldest_peer_authentication_of_a_scope_wins() {
    let at = |name: &str, mode: &str, created: Option<&str>| {
        let mut v = peer("x", name, json!({"mtls": {"mode": mode}}));
        if let Some(t) = created {
            v["metadata"]["creationTimestamp"] = json!(t);
        }
        v
    };
    let newer_strict = at("a", "STRICT", Some("2026-12-02T10:00:00Z"));
    let older_permissive = at("b", "PERMISSIVE", Some("2026-12-01T10:00:00Z"));
    let store = world(&[], &[newer_strict.clone(), older_permissive]);
    assert_eq!(
        weft(&store, "web", PLAIN, 80),
        (true, Reason::NoPolicy, None)
    );
    let from_file = at("c", "PERMISSIVE", None);
    let store = world(&[], &[newer_strict, from_file]);
    assert_eq!(
        weft(&store, "web", PLAIN, 80),
        (true, Reason::NoPolicy, None)
    );
}

/// `weft authz check` names what decided, with the caller's identity when it is meshed.
#[test]
fn check_names_the_deciding_policy() {
    let client = "apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: 'y', labels: {weft.io/mesh: enabled}}\nspec: {serviceAccountName: client, containers: []}\nstatus: {podIP: 10.0.2.20}\n";
    let mut store = world(&[deny(source(json!({"namespaces": ["y"]})))], &[]);
    let extra = store_of(&[
        client,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {weft.io/mesh: enabled}}\n",
    ]);
    store.pods.extend(extra.pods);
    store.namespaces.extend(extra.namespaces);
    let key = |ns: &str, n: &str| (ns.to_owned(), n.to_owned());
    let doc = super::check(
        &store,
        ROOT,
        TRUST_DOMAIN,
        (&key("y", "c"), &key("x", "web")),
        80,
    )
    .expect("answered");
    assert_eq!(
        (
            doc.allowed,
            doc.reason.as_str(),
            doc.policy.as_deref(),
            doc.rule
        ),
        (false, "denied", Some("x/deny"), Some(0))
    );
    assert_eq!(
        doc.identity.as_deref(),
        Some("spiffe://cluster.local/ns/y/sa/client")
    );
    assert_eq!(doc.mtls, "PERMISSIVE");
    let err = super::check(
        &store,
        ROOT,
        TRUST_DOMAIN,
        (&key("y", "nope"), &key("x", "web")),
        80,
    )
    .expect_err("unknown");
    assert_eq!(err, "pod y/nope is unknown");
}

/// `weft authz` lists the policies with what they select, and each workload's modes.
#[test]
fn the_listing_shows_policies_selections_and_modes() {
    let store = world(
        &[allow(json!([{}])), authz("y", "elsewhere", json!({}))],
        &[peer(
            "x",
            "ns",
            json!({"mtls": {"mode": "STRICT"}, "selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
        )],
    );
    let keys: Vec<Key> = vec![("x".to_owned(), "web".to_owned())];
    let l = super::listing(&store, ROOT, &keys);
    let policies: Vec<(String, String, String, Vec<String>)> = l
        .policies
        .iter()
        .map(|p| {
            (
                p.kind.clone(),
                p.name.clone(),
                p.action.clone(),
                p.selects.clone(),
            )
        })
        .collect();
    let row = |k: &str, n: &str, a: &str, s: &[&str]| {
        (
            k.to_owned(),
            n.to_owned(),
            a.to_owned(),
            s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        policies,
        [
            row("AuthorizationPolicy", "x/allow", "ALLOW", &["x/web"]),
            row("AuthorizationPolicy", "y/elsewhere", "ALLOW", &[]),
            row("PeerAuthentication", "x/ns", "STRICT", &[]),
        ]
    );
    let w = &l.workloads[0];
    assert_eq!(
        (
            w.pod.as_str(),
            w.mtls.as_str(),
            w.ports.get(&8080).map(String::as_str),
            w.policies.clone()
        ),
        (
            "x/web",
            "STRICT",
            Some("PERMISSIVE"),
            vec!["x/allow".to_owned()]
        )
    );
}

/// What the datapath must do: a pod whose policy refuses a plaintext caller is guarded in the
/// kernel and reached through the proxy; one whose policies let every plaintext caller in
/// still depends on its callers' identities (reached through the proxy only); one without
/// any policy is neither.
#[test]
fn guarded_pods_are_those_whose_policy_refuses_plaintext_or_reads_identities() {
    let web: Key = ("x".to_owned(), "web".to_owned());
    let db: Key = ("x".to_owned(), "db".to_owned());
    let keys = [&web, &db];
    let set = |keys: &[&Key]| keys.iter().map(|k| (*k).clone()).collect();
    let refused = |g: &super::Guarded| {
        g.plaintext_refused
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<Key>>()
    };
    let deny_ns = authz(
        "x",
        "deny-y",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"namespaces": ["y"]}}]}]}),
    );
    let g = super::guarded(&world(&[deny_ns], &[]), ROOT, keys);
    assert_eq!(refused(&g), set(&[]));
    assert_eq!(g.proxied, set(&[&web]));
    let strict_db = peer(
        "x",
        "db",
        json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}),
    );
    let g = super::guarded(&world(&[], &[strict_db]), ROOT, keys);
    assert_eq!(refused(&g), set(&[&db]));
    assert_eq!(g.proxied, set(&[&db]));
    let g = super::guarded(&world(&[], &[]), ROOT, keys);
    assert_eq!((refused(&g), g.proxied), (set(&[]), set(&[])));
}

/// The kernel's table of a pod with a STRICT port and an ALLOW from a CIDR: the named ports
/// get entries of their own, every other port shares one set; each prefix decides what no
/// longer one of the list covers.
#[test]
fn a_guarded_pod_gets_the_kernel_table_of_its_plaintext_decisions() {
    use weft_abi::policy::{PLAINTEXT_OTHER_PORTS as OTHER, PLAINTEXT_PORT as PORT};
    let web: Key = ("x".to_owned(), "web".to_owned());
    let strict_9090 = peer(
        "x",
        "web-9090",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "portLevelMtls": {"9090": {"mode": "STRICT"}}}),
    );
    let allow = authz(
        "x",
        "from-10",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}),
    );
    let g = super::guarded(&world(&[allow], &[strict_9090]), ROOT, [&web]);
    let all: ipnet::IpNet = "0.0.0.0/0".parse().expect("net");
    let ten: ipnet::IpNet = "10.0.0.0/8".parse().expect("net");
    let want: crate::compile::policy::PlaintextTable = [
        ((PORT | 9090, all), false),
        ((PORT | 9090, ten), false),
        ((OTHER, all), false),
        ((OTHER, ten), true),
    ]
    .into();
    assert_eq!(g.plaintext_refused.get(&web), Some(&want));
}

/// Security kinds the source has not listed yet: every meshed pod is STRICT and denies every
/// connection, naming why, until they are.
#[test]
fn unlisted_kinds_make_meshed_pods_strict_and_deny_all() {
    let mut store = world(&[], &[]);
    store.unlisted = [
        crate::store::Kind::PeerAuthentication,
        crate::store::Kind::AuthorizationPolicy,
    ]
    .into();
    assert_eq!(
        weft(&store, "web", CLIENT, 8080),
        (false, Reason::Denied, Some((super::UNLISTED.to_owned(), 0)))
    );
    assert_eq!(weft(&store, "web", PLAIN, 8080).1, Reason::MtlsRequired);
    let key: Key = ("x".to_owned(), "web".to_owned());
    let authz = compile(&store, ROOT, [&key]);
    assert_eq!(authz.problems.len(), 2, "{:?}", authz.problems);
}
