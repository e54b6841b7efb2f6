//! 4. ICMP and fragments are no tunnel: a pod with CAP_NET_RAW crafts what it likes.
use std::time::Duration;

use serde_json::Value;
use weft_testkit::{
    Agent, Node,
    k8s::{file, pod},
    netpol::np,
    proc::Process,
    prom,
};

use crate::wait_isolated;

fn node(test: &str) -> Node {
    let node = Node::builder(test).pod("a").pod("b").build();
    node.write_source(
        "pods.yaml",
        &file(&[
            pod(node.pod("a"), "default", &[("app", "a")], &[], true),
            pod(node.pod("b"), "default", &[("app", "b")], &[], true),
        ]),
    );
    node
}

fn last_event(p: &mut Process, event: &str) -> Value {
    p.wait_success(Duration::from_secs(20));
    p.stdout().wait_for(event, Duration::from_secs(5), |lines| {
        lines.iter().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["event"] == event)
        })
    })
}

/// `a` sends an ICMP message of `icmp_type` to `b` (whole, or as two fragments split at
/// `split`) while `b` listens on a raw ICMP socket: how many arrived.
fn raw_to_b(node: &Node, icmp_type: u8, split: Option<usize>, marker: &str) -> u64 {
    let mut rx = node.spawn("b", &["raw-receive", "--marker", marker, "--seconds", "2"]);
    rx.wait_listening();
    let b = node.pod("b").ipv4.to_string();
    let t = icmp_type.to_string();
    let data = format!("{marker}-{}", "x".repeat(40));
    let mut args = vec!["raw-icmp", "--to", &b, "--icmp-type", &t, "--data", &data];
    let split_s = split.map(|s| s.to_string());
    if let Some(s) = &split_s {
        args.extend(["--split", s]);
    }
    let mut tx = node.spawn("a", &args);
    tx.wait_success(Duration::from_secs(10));
    last_event(&mut rx, "received")["marked"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

const DENY_A_EGRESS: &str = "podSelector: {matchLabels: {app: a}}\npolicyTypes: [Egress]";
const DENY_B_INGRESS: &str = "podSelector: {matchLabels: {app: b}}\npolicyTypes: [Ingress]";

/// An echo reply passed unjudged both ways: an isolated pod could send anything as one.
#[test]
fn an_isolated_pod_sends_no_echo_reply_of_its_own() {
    let node = node("adv_icmp_egress");
    let agent = Agent::with_source(&node, &[]);
    assert_eq!(
        raw_to_b(&node, 0, None, "open"),
        1,
        "without policy it arrives"
    );
    node.write_source("policy.yaml", &np("default", "deny", DENY_A_EGRESS));
    wait_isolated(&agent, "default/a", false, true);
    assert_eq!(raw_to_b(&node, 0, None, "tunnel"), 0);
    assert_eq!(raw_to_b(&node, 3, None, "error"), 0, "nor an ICMP error");
}

#[test]
fn an_isolated_pod_receives_no_unsolicited_echo_reply() {
    let node = node("adv_icmp_ingress");
    let agent = Agent::with_source(&node, &[]);
    node.write_source("policy.yaml", &np("default", "deny", DENY_B_INGRESS));
    wait_isolated(&agent, "default/b", true, false);
    assert_eq!(raw_to_b(&node, 0, None, "tunnel"), 0);
}

/// The second fragment of an ICMP message used to pass as an echo reply (its type field
/// read as 0).
#[test]
fn fragments_from_an_isolated_pod_do_not_pass() {
    let node = node("adv_fragments");
    let agent = Agent::with_source(&node, &[]);
    assert_eq!(
        raw_to_b(&node, 0, Some(16), "whole"),
        1,
        "reassembled without policy"
    );
    node.write_source("policy.yaml", &np("default", "deny", DENY_A_EGRESS));
    wait_isolated(&agent, "default/a", false, true);
    assert_eq!(raw_to_b(&node, 0, Some(16), "split"), 0);
    // The second fragment is refused as a fragment, not judged on what follows its header.
    agent.wait_metrics("a fragment dropped", |m| {
        prom::sum(m, "weft_dropped_flows_total", &[("reason", "fragment")]) >= 1.0
    });
}

/// Ping still works for a pod isolated both ways whose egress policy allows the peer: the
/// reply is part of the exchange the pod started.
#[test]
fn an_allowed_ping_gets_its_replies() {
    let node = node("adv_ping");
    let agent = Agent::with_source(&node, &[]);
    let policy = np(
        "default",
        "ping-b",
        "podSelector: {matchLabels: {app: a}}\npolicyTypes: [Ingress, Egress]\negress:\n- to: [{podSelector: {matchLabels: {app: b}}}]",
    );
    node.write_source("policy.yaml", &policy);
    wait_isolated(&agent, "default/a", true, true);
    let b = node.pod("b").ipv4.to_string();
    let mut ping = node.spawn("a", &["raw-ping", "--to", &b, "--data", "weft-ping"]);
    let replies = last_event(&mut ping, "ping")["replies"]
        .as_u64()
        .unwrap_or(0);
    assert!(replies > 0, "the ping got no reply");
}

/// A raw socket forging a datagram "from" a peer to the pod itself used to plant a reply
/// path: the pod's socket could then send to that peer although its policy denies it.
#[test]
fn a_forged_source_plants_no_reply_path() {
    let node = node("adv_forged_src");
    let agent = Agent::with_source(&node, &[]);
    node.write_source("policy.yaml", &np("default", "deny", DENY_A_EGRESS));
    wait_isolated(&agent, "default/a", false, true);
    let mut rx = node.spawn(
        "b",
        &[
            "raw-receive",
            "--protocol",
            "17",
            "--marker",
            "leaked",
            "--seconds",
            "2",
        ],
    );
    rx.wait_listening();
    let (a, b) = (
        node.pod("a").ipv4.to_string(),
        format!("{}:5353", node.pod("b").ipv4),
    );
    let mut forge = node.spawn(
        "a",
        &[
            "forge-reply-path",
            "--own",
            &a,
            "--port",
            "4444",
            "--peer",
            &b,
            "--data",
            "leaked",
        ],
    );
    let forged = last_event(&mut forge, "forged");
    assert_eq!(forged["planted"], false, "{forged}");
    assert_eq!(forged["sent"], false, "{forged}");
    let received = last_event(&mut rx, "received");
    assert_eq!(received["marked"], 0, "{received}");
    agent.wait_metrics("the forged packet dropped", |m| {
        prom::sum(
            m,
            "weft_dropped_flows_total",
            &[("reason", "spoofed_source")],
        ) >= 1.0
    });
}
