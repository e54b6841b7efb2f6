//! 3. Full maps neither freeze policy nor let one tenant starve the others.
use weft_testkit::{Agent, Node, k8s::http_pods, netpol::np, prom};

use crate::{Reach, client_server, expect_probe, server_target};

fn pods(node: &Node, client_labels: &[(&str, &str)]) -> String {
    http_pods(
        node,
        "default",
        &[("client", client_labels), ("server", &[("app", "server")])],
    )
}

/// `n` ipBlocks in another namespace, selecting none of this node's pods.
fn far_policy(n: usize) -> String {
    let peers: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "  - ipBlock: {{cidr: {}.{}.0.0/16}}",
                100 + i / 256,
                i % 256
            )
        })
        .collect();
    np(
        "elsewhere",
        "many-blocks",
        &format!("podSelector: {{}}\ningress:\n- from:\n{}", peers.join("\n")),
    )
}

/// A policy of another namespace with more ipBlocks than `--max-ipcache` holds: this node
/// keeps applying its own pods' changes.
#[test]
fn a_huge_policy_elsewhere_does_not_freeze_this_node() {
    let (node, _server) = client_server(Node::builder("adv_far_blocks"), &["8080", "9090"]);
    node.write_source("pods.yaml", &pods(&node, &[("app", "client")]));
    let friends = np(
        "default",
        "friends-only",
        "podSelector: {matchLabels: {app: server}}\ningress:\n- from: [{podSelector: {matchLabels: {role: friend}}}]",
    );
    node.write_source("policy.yaml", &friends);
    let agent = Agent::with_source(&node, &["--max-ipcache", "256"]);
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Blocked);
    node.write_source("far.yaml", &far_policy(600));
    agent.wait_policies("the far policy in force", |v| {
        v["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["policy"] == "elsewhere/many-blocks"))
    });
    agent.wait_status("nothing rejected", |v| {
        v["services"]["rejections"] == serde_json::json!([])
    });
    node.write_source(
        "pods.yaml",
        &pods(&node, &[("app", "client"), ("role", "friend")]),
    );
    expect_probe(&node, "client", &target, Reach::Answer("server"));
    let status = agent.wait_status("no sync error", |v| v["healthy"] == true);
    assert_eq!(status["policy"]["sync_errors"], serde_json::json!([]));
}

/// A policy admitting the client on `port` and 30 more ports (31 entries).
fn admitting(port: u16, others_from: u16) -> String {
    admitting_n(port, others_from, 30)
}

fn admitting_n(port: u16, others_from: u16, others: u16) -> String {
    let ports: Vec<String> = std::iter::once(port)
        .chain(others_from..others_from + others)
        .map(|p| format!("{{port: {p}}}"))
        .collect();
    np(
        "default",
        "admit",
        &format!(
            "podSelector: {{matchLabels: {{app: server}}}}\ningress:\n- from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n  ports: [{}]",
            ports.join(", ")
        ),
    )
}

fn readyz(agent: &Agent) -> (u16, String) {
    let r = prom::get(agent.metrics_addr(), "/readyz", None);
    (r.status, r.body)
}

/// Old and new sets together exceed `--max-policy-entries`: the change completes, and a
/// later revocation takes effect; a set that cannot fit at all denies its pod, says so, and
/// recovers once it fits.
#[test]
fn a_change_at_the_capacity_edge_completes_and_revocations_follow() {
    let (node, _server) = client_server(Node::builder("adv_policy_edge"), &["8080", "9090"]);
    node.write_source("pods.yaml", &pods(&node, &[("app", "client")]));
    node.write_source("policy.yaml", &admitting(8080, 20_000));
    let agent = Agent::with_source(&node, &["--max-policy-entries", "40"]);
    let (to_8080, to_9090) = (server_target(&node, 8080), server_target(&node, 9090));
    expect_probe(&node, "client", &to_8080, Reach::Answer("server"));
    node.write_source("policy.yaml", &admitting(9090, 21_000));
    expect_probe(&node, "client", &to_9090, Reach::Answer("server"));
    expect_probe(&node, "client", &to_8080, Reach::Blocked);
    assert_eq!(readyz(&agent), (200, "ready".to_owned()));
    // 46 entries: more than the map holds.
    node.write_source("policy.yaml", &admitting_n(9090, 21_000, 45));
    expect_probe(&node, "client", &to_9090, Reach::Blocked);
    let (code, body) = readyz(&agent);
    assert_eq!(code, 503, "{body}");
    let status = agent.wait_status("the map and flag named", |s| {
        s["degraded"].to_string().contains("--max-policy-entries")
    });
    assert_eq!(status["healthy"], false);
    node.write_source("policy.yaml", &admitting(8080, 20_000));
    expect_probe(&node, "client", &to_8080, Reach::Answer("server"));
    expect_probe(&node, "client", &to_9090, Reach::Blocked);
    assert_eq!(readyz(&agent), (200, "ready".to_owned()));
}
