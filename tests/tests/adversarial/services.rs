//! Item 7, service translation corners.
use std::time::Duration;

use weft_testkit::{Agent, Node, k8s, proc::Process};

const DNS_VIP: &str = "10.96.0.53";

/// A node with pods `client`, `b1` and `b2`; each backend answers its name on UDP 5353.
fn udp_backends(test: &str) -> (Node, Vec<Process>) {
    let node = Node::builder(test)
        .pod("client")
        .pod("b1")
        .pod("b2")
        .build();
    let servers = ["b1", "b2"]
        .iter()
        .map(|b| node.start_server(b, &["serve", "--name", b, "--udp", "5353"]))
        .collect();
    (node, servers)
}

/// The node's three pods, unlabelled, in `default`.
fn pods(node: &Node) -> String {
    k8s::http_pods(
        node,
        "default",
        &[("client", &[]), ("b1", &[]), ("b2", &[])],
    )
}

/// A resolver keeps one connected UDP socket to a ClusterIP (glibc does): when its backend
/// leaves the Service, its next send fails, the resolver opens a new socket, and from then
/// on the current backend answers. (It used to stay on the removed backend for good.)
#[test]
fn a_connected_udp_client_moves_off_a_removed_backend() {
    let (node, _servers) = udp_backends("adv_svc_udp_stale");
    let pods = pods(&node);
    let svc = k8s::service(
        "dns",
        "default",
        &[DNS_VIP],
        &[],
        &[("dns", 53, "5353", "UDP")],
        None,
    );
    node.write_source("pods.yaml", &k8s::file(&[pods, svc]));
    let slice = |b: &str| {
        k8s::endpoint_slice(
            "dns",
            "default",
            &[(node.pod(b), true)],
            &[("dns", 5353, "UDP")],
        )
        .to_string()
    };
    node.write_source("slice.yaml", &slice("b1"));
    let agent = Agent::with_source(&node, &[]);
    agent.wait_backends(&format!("{DNS_VIP}:53/UDP"), 1, Duration::from_secs(10));

    let target = format!("{DNS_VIP}:53");
    let resolver = node.spawn(
        "client",
        &["udp-resolver", "--connect", &target, "--seconds", "8"],
    );
    let answered =
        |name: &'static str| move |l: &String| l.contains(&format!("\"from\":\"{name}\""));
    resolver
        .stdout()
        .wait_for("an answer from b1", Duration::from_secs(5), |lines| {
            lines.iter().any(answered("b1")).then_some(())
        });
    node.write_source("slice.yaml", &slice("b2"));
    let after = resolver.stdout().wait_for(
        "answers from b2 once b1 has left",
        Duration::from_secs(5),
        |lines| {
            let first = lines.iter().position(answered("b2"))?;
            // A few answers more: none of them from b1.
            (lines.len() > first + 5).then(|| lines[first..].to_vec())
        },
    );
    assert!(!after.iter().any(answered("b1")), "{after:#?}");
    let failed = resolver.stdout().snapshot();
    assert!(
        failed
            .iter()
            .any(|l| l.contains("\"failed\"") && l.contains("EPERM")),
        "the send to b1 failed with EPERM: {failed:#?}"
    );
    agent.wait_metrics("the stale datagram counted", |m| {
        weft_testkit::prom::sum(
            m,
            "weft_dropped_flows_total",
            &[("reason", "stale_backend")],
        ) >= 1.0
    });
}

/// One unconnected UDP socket asks two ClusterIPs at once (as resolvers do with several
/// nameservers); a backend serves both. Each reply must show the ClusterIP it answers: the
/// kernel gives the socket a backend it does not already reach through the other frontend.
/// (It used to pick the shared backend half the time, and both replies then showed one
/// ClusterIP.)
#[test]
fn two_clusterips_sharing_a_backend_each_answer_from_their_own_address() {
    let (node, _servers) = udp_backends("adv_svc_udp_shared");
    let pods = pods(&node);
    let port = [("dns", 53, "5353", "UDP")];
    let only_b1 = k8s::service("one", "default", &["10.96.0.61"], &[], &port, None);
    let both = k8s::service("two", "default", &["10.96.0.62"], &[], &port, None);
    let slice = |svc: &str, pods: &[&str]| {
        let endpoints: Vec<_> = pods.iter().map(|p| (node.pod(p), true)).collect();
        format!(
            "{}\n",
            k8s::endpoint_slice(svc, "default", &endpoints, &[("dns", 5353, "UDP")])
        )
    };
    node.write_source(
        "services.yaml",
        &k8s::file(&[
            pods,
            only_b1,
            both,
            slice("one", &["b1"]),
            slice("two", &["b1", "b2"]),
        ]),
    );
    let agent = Agent::with_source(&node, &[]);
    agent.wait_backends("10.96.0.61:53/UDP", 1, Duration::from_secs(10));
    agent.wait_backends("10.96.0.62:53/UDP", 2, Duration::from_secs(10));
    // "one" is asked first: its only backend is taken when "two" is translated.
    let mut pair = node.spawn(
        "client",
        &[
            "udp-pair",
            "--to",
            "10.96.0.61:53",
            "--to",
            "10.96.0.62:53",
            "--rounds",
            "10",
        ],
    );
    let status = pair.wait(Duration::from_secs(30));
    let out = pair.stdout().snapshot();
    assert!(status.success(), "{out:#?}");
}
