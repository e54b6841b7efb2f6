//! 8. The node's addresses: traffic from the node passes (Kubernetes requires it), traffic
//!    to the node is judged like any other, so a NodePort or hostPort is no way around
//!    egress policy.
use weft_testkit::{Agent, Node, netpol::np};

use crate::{Reach, client_server_pods, expect_probe, server_target, wait_isolated};

const NODE_IP: &str = "10.0.0.1";

fn node(test: &str) -> Node {
    let node = Node::builder(test).pod("client").pod("server").build();
    node.write_source("pods.yaml", &client_server_pods(&node));
    node
}

#[test]
fn an_egress_isolated_pod_reaches_the_node_only_as_its_policy_says() {
    let node = node("adv_to_node");
    // A host-network server, as kube-proxy's NodePort or a hostPort would forward.
    let _host = node.spawn_host(&["serve", "--name", "node", "--tcp", "30080"]);
    _host.wait_listening();
    let agent = Agent::with_source(&node, &["--node-ip", NODE_IP]);
    let target = format!("tcp:{NODE_IP}:30080");
    expect_probe(&node, "client", &target, Reach::Answer("node"));
    let deny = np(
        "default",
        "deny",
        "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]",
    );
    node.write_source("policy.yaml", &deny);
    wait_isolated(&agent, "default/client", false, true);
    expect_probe(&node, "client", &target, Reach::Blocked);
    let allow = np(
        "default",
        "deny",
        &format!(
            "podSelector: {{matchLabels: {{app: client}}}}\npolicyTypes: [Egress]\negress:\n- to: [{{ipBlock: {{cidr: {NODE_IP}/32}}}}]"
        ),
    );
    node.write_source("policy.yaml", &allow);
    expect_probe(&node, "client", &target, Reach::Answer("node"));
}

/// Kubelet probes come from the node: an ingress-isolated pod still answers them.
#[test]
fn the_node_reaches_an_ingress_isolated_pod() {
    let node = node("adv_from_node");
    let _server = node.start_server("server", &["serve", "--name", "server", "--tcp", "8080"]);
    let agent = Agent::with_source(&node, &["--node-ip", NODE_IP]);
    let deny = np(
        "default",
        "deny",
        "podSelector: {matchLabels: {app: server}}\npolicyTypes: [Ingress]",
    );
    node.write_source("policy.yaml", &deny);
    wait_isolated(&agent, "default/server", true, false);
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Blocked);
    let mut probe = node.spawn_host(&["probe", "--timeout-ms", "1000", &target]);
    probe.wait_success(std::time::Duration::from_secs(10));
    let answer = probe
        .stdout()
        .wait_for("probe", std::time::Duration::from_secs(5), |l| {
            l.iter().find(|l| l.contains("\"probe\"")).cloned()
        });
    assert!(answer.contains("\"server\""), "{answer}");
}
