//! Item 7, service translation corners.
use std::time::Duration;

use weft_testkit::{Agent, Node, k8s};

const DNS_VIP: &str = "10.96.0.53";

/// A resolver keeps one connected UDP socket to a ClusterIP (glibc does): when its backend
/// leaves the Service, its next send fails, the resolver opens a new socket, and from then
/// on the current backend answers. (It used to stay on the removed backend for good.)
#[test]
fn a_connected_udp_client_moves_off_a_removed_backend() {
    let node = Node::builder("adv_svc_udp_stale")
        .pod("client")
        .pod("b1")
        .pod("b2")
        .build();
    let _servers: Vec<_> = ["b1", "b2"]
        .iter()
        .map(|b| node.start_server(b, &["serve", "--name", b, "--udp", "5353"]))
        .collect();
    let pods = k8s::http_pods(
        &node,
        "default",
        &[("client", &[]), ("b1", &[]), ("b2", &[])],
    );
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
}
