//! The flow stream: `weft flows` filters return exactly the matching records, and a follower
//! that never reads loses records (and is told) without slowing the agent.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testkit::{Agent, Close, Node, k8s, prom};

const WAIT: Duration = Duration::from_secs(20);

/// Pods a, b, c serving http; c may not connect anywhere (egress isolated).
fn three_pods(test: &str) -> (Node, Agent) {
    let node = Node::builder(test).pod("a").pod("b").pod("c").build();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: c-no-egress\n  namespace: default\nspec:\n  podSelector:\n    matchLabels:\n      app: c\n  policyTypes: [Egress]\n";
    node.write_source(
        "pods.yaml",
        &k8s::http_pods(
            &node,
            "default",
            &[
                ("a", &[("app", "a")]),
                ("b", &[("app", "b")]),
                ("c", &[("app", "c")]),
            ],
        ),
    );
    node.write_source("policy.yaml", policy);
    let agent = Agent::with_source(&node, &[]);
    agent.wait_policies("c isolated", |p| {
        p["endpoints"].as_array().is_some_and(|e| !e.is_empty())
    });
    (node, agent)
}

#[test]
fn flow_filters_return_exactly_the_matching_records() {
    let (node, agent) = three_pods("telemetry_flows");
    let b = SocketAddr::new(node.pod("b").ipv4.into(), 8080);
    node.tcp_exchange("a", "b", b, 10, 10, Close::Shutdown);
    let mut denied = node.spawn("c", &["connect-probe", "--connect", &b.to_string()]);
    denied.wait(WAIT);
    agent.wait_metrics("the denied connect's event", |m| {
        prom::sum(m, "weft_conn_events_total", &[("event", "drop")]) >= 1.0
            && prom::sum(m, "weft_conn_events_total", &[("event", "tcp_close")]) >= 2.0
    });

    let all = agent.flows(&["--last", "1000"]);
    let seqs = |records: &[Value]| -> Vec<u64> {
        records.iter().filter_map(|r| r["seq"].as_u64()).collect()
    };
    let expect = |args: &[&str], pred: &dyn Fn(&Value) -> bool| {
        let got = agent.flows(args);
        let want: Vec<Value> = all.iter().filter(|r| pred(r)).cloned().collect();
        assert!(
            !want.is_empty() || args.contains(&"--protocol"),
            "{args:?} matches something"
        );
        assert_eq!(seqs(&got), seqs(&want), "weft flows {args:?}");
    };
    let pod = |r: &Value, end: &str, name: &str| r[end]["pod"] == name;
    expect(&["--last", "1000", "--verdict", "denied"], &|r| {
        r["verdict"] == "denied"
    });
    expect(&["--last", "1000", "--from-pod", "c"], &|r| {
        pod(r, "source", "c")
    });
    expect(
        &[
            "--last",
            "1000",
            "--to-pod",
            "default/b",
            "--verdict",
            "allowed",
        ],
        &|r| pod(r, "destination", "b") && r["verdict"] == "allowed",
    );
    expect(&["--last", "1000", "--pod", "a"], &|r| {
        pod(r, "source", "a") || pod(r, "destination", "a")
    });
    expect(
        &[
            "--last",
            "1000",
            "--namespace",
            "default",
            "--protocol",
            "tcp",
        ],
        &|r| r["protocol"] == "TCP",
    );
    expect(&["--last", "1000", "--protocol", "sctp"], &|_| false);
    expect(&["--last", "2"], &|r| {
        let n = all.len();
        all[n.saturating_sub(2)..].contains(r)
    });
    let drop = all
        .iter()
        .find(|r| r["verdict"] == "denied")
        .expect("a denied record");
    assert_eq!(drop["drop_reason"], "policy_denied", "{drop}");
    assert_eq!(drop["direction"], "egress", "{drop}");
    assert_eq!(drop["destination"]["pod"], "b", "{drop}");
}

#[test]
fn a_stalled_follower_loses_records_and_is_told_without_slowing_the_agent() {
    let (node, agent) = three_pods("telemetry_stalled");
    // A follower that never reads: the agent goes on, and the follower is told what it lost.
    let mut stalled = UnixStream::connect(agent.admin_socket()).expect("admin socket");
    stalled
        .write_all(b"GET /flows?follow=true&last=0 HTTP/1.1\r\nHost: weft\r\n\r\n")
        .expect("request");
    let before = prom::sum(
        &agent.metrics(),
        "weft_conn_events_total",
        &[("event", "tcp_close")],
    );
    let _sink = node.start_server(
        "b",
        &["tcp-server", "--listen", "0.0.0.0:8081", "--close-at-once"],
    );
    let mut churn = node.spawn(
        "a",
        &[
            "churn",
            "--connect",
            &format!("{}:8081", node.pod("b").ipv4),
            "--seconds",
            "20",
            "--count",
            "2000",
            "--rate",
            "1000",
        ],
    );
    churn.wait_success(WAIT);
    let done: Value = churn.stdout().wait_for("the churn result", WAIT, |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == "churn")
    });
    // 8000 flow records: more than the follower's 4096 plus what socket buffers hold.
    let connections = done["connections"].as_f64().expect("connections");
    assert_eq!(connections, 2000.0, "{done}");
    // Both ends are local: two closes per connection, every one of them handled.
    let m = agent.wait_metrics("every close handled despite the stalled reader", |m| {
        prom::sum(m, "weft_conn_events_total", &[("event", "tcp_close")]) - before
            >= 2.0 * connections
    });
    assert_eq!(prom::sum(&m, "weft_events_lost_total", &[]), 0.0);
    // The agent answers promptly while the reader is stalled.
    let t = Instant::now();
    let (ok, _) = agent.client("status");
    assert!(
        ok && t.elapsed() < Duration::from_secs(2),
        "status took {:?}",
        t.elapsed()
    );
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let lost = first_lost_line(&mut stalled);
    // Nothing is published once the churn is over: the follower lagged once, and the line it
    // got says exactly what the agent counted.
    assert!(lost > 0, "records were lost");
    agent.wait_metrics(&format!("{lost} lost records counted"), |m| {
        prom::sum(m, "weft_flow_records_lost_total", &[]) == lost as f64
    });
}

/// Reads a flow stream until its first `{"lost": N}` line; returns N.
fn first_lost_line(stream: &mut UnixStream) -> u64 {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&seen);
        if let Some(n) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find_map(|v| v["lost"].as_u64())
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no lost-records line reached the stalled reader"
        );
        let n = stream.read(&mut buf).expect("read the stream");
        assert_ne!(n, 0, "the stream ended before a lost-records line");
        seen.extend_from_slice(&buf[..n]);
    }
}
