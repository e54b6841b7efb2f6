//! 1. Objects the API server accepts are never dropped, and what weft still cannot read
//!    isolates the pods it concerns.
use weft_testkit::{
    Agent, Node,
    k8s::{file, http_pods},
    netpol::np,
    proc::Process,
};

use crate::{
    DENY_SERVER_INGRESS, Reach, client_server, client_server_pods, expect_probe, server_target,
};

fn node(test: &str) -> (Node, Process) {
    client_server(Node::builder(test), &["8080"])
}

fn client_doc(node: &Node) -> String {
    http_pods(node, "default", &[("client", &[("app", "client")])])
}

fn server_doc(node: &Node) -> String {
    http_pods(node, "default", &[("server", &[("app", "server")])])
}

/// With the agent running on `node` (its pods declared), the client reaches the server until
/// `policy` arrives, then never.
fn isolates(node: &Node, policy: &str) {
    let _agent = Agent::with_source(node, &[]);
    let target = server_target(node, 8080);
    expect_probe(node, "client", &target, Reach::Answer("server"));
    node.write_source("policy.yaml", policy);
    expect_probe(node, "client", &target, Reach::Blocked);
}

/// Two containers naming a port alike: the API server accepts it (with a warning).
#[test]
fn a_pod_naming_a_port_alike_in_two_containers_is_enforced() {
    let (node, _server) = node("adv_dup_port");
    let server = server_doc(&node).replacen(
        "status:\n",
        "  - name: sidecar\n    image: weft-pod\n    ports:\n    - {name: http, containerPort: 9090, protocol: TCP}\nstatus:\n",
        1,
    );
    node.write_source("pods.yaml", &file(&[client_doc(&node), server]));
    isolates(&node, &np("default", "deny", DENY_SERVER_INGRESS));
}

/// `192.0.2.7/24` is what an older API server stored; Kubernetes reads it as 192.0.2.0/24.
#[test]
fn a_policy_whose_cidr_has_host_bits_isolates_its_pods() {
    let (node, _server) = node("adv_host_bits");
    let policy = np(
        "default",
        "from-test-net",
        "podSelector: {matchLabels: {app: server}}\ningress:\n- from: [{ipBlock: {cidr: 192.0.2.7/24}}]",
    );
    isolates(&node, &policy);
}

/// The standalone source is stricter (unknown fields); a pod it rejects is isolated both
/// ways, not free, until a version it can read arrives.
#[test]
fn a_pod_the_standalone_source_rejects_is_isolated_both_ways() {
    let (node, _server) = node("adv_rejected_pod");
    let _other = node.start_server("client", &["serve", "--name", "client", "--tcp", "8080"]);
    let unreadable = server_doc(&node).replace("spec:\n", "spec:\n  notAField: 1\n");
    node.write_source("pods.yaml", &file(&[client_doc(&node), unreadable]));
    let agent = Agent::with_source(&node, &[]);
    agent.wait_status("the server rejected", |v| {
        v.to_string().contains("notAField")
    });
    let (to_server, to_client) = (
        server_target(&node, 8080),
        format!("tcp:{}:8080", node.pod("client").ipv4),
    );
    expect_probe(&node, "client", &to_server, Reach::Blocked);
    expect_probe(&node, "server", &to_client, Reach::Blocked);
    node.write_source("pods.yaml", &client_server_pods(&node));
    expect_probe(&node, "client", &to_server, Reach::Answer("server"));
    expect_probe(&node, "server", &to_client, Reach::Answer("client"));
}

/// A policy that cannot be read isolates what it selects, both ways.
#[test]
fn a_policy_that_cannot_be_read_isolates_what_it_selects() {
    let (node, _server) = node("adv_rejected_policy");
    let policy = np(
        "default",
        "broken",
        "podSelector: {matchLabels: {app: server}}\ningress:\n- from: [{ipBlock: {cidr: not-a-cidr}}]",
    );
    isolates(&node, &policy);
}
