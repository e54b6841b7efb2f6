use std::{net::SocketAddr, time::Duration};

use super::*;
use crate::events::Outcome;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", Some(sa))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn conn(event: ConnEventKindName, role: Role, local: &str, remote: &str) -> Connection {
    Connection {
        event,
        cookie: 9,
        role,
        local: addr(local),
        remote: addr(remote),
        bytes_sent: 0,
        bytes_received: 0,
        srtt: Duration::ZERO,
        rtt_min: Duration::ZERO,
        retransmits: 0,
        segments_in: 0,
        segments_out: 0,
        duration: Duration::ZERO,
        outcome: (event == ConnEventKindName::TcpClose).then_some(Outcome::Normal),
        service: None,
        dropped: None,
        meshed: false,
        mesh_netns: 0,
        delivered: false,
        security: None,
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
