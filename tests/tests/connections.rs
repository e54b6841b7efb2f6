//! The agent reports every TCP connection of the workloads under its cgroup, with exact payload
//! byte counts, RTT and duration, and nothing about processes outside that cgroup.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use weft_testkit::{Agent, Node};

const WAIT: Duration = Duration::from_secs(20);

/// Runs one client/server exchange between pods and returns (client addr, server addr).
fn exchange(node: &Node, server: SocketAddr, n: u64, m: u64, close: &str) -> (String, String) {
    let mut args = vec![
        "tcp-server".to_owned(),
        "--listen".into(),
        server.to_string(),
    ];
    args.extend([
        "--reply".into(),
        m.to_string(),
        "--connections".into(),
        "1".into(),
    ]);
    if close == "close" {
        // The client closes without shutting down first: the server reads exactly n.
        args.extend(["--read".into(), n.to_string()]);
    }
    let srv = node.spawn(
        "server",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    srv.stdout().wait_for("server listening", WAIT, |l| {
        l.iter().any(|l| l.contains("listening")).then_some(())
    });
    let mut client = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &server.to_string(),
            "--send",
            &n.to_string(),
            "--expect",
            &m.to_string(),
            "--close",
            close,
        ],
    );
    client.wait_success(WAIT);
    let done: Value = client.stdout().wait_for("client result", WAIT, |lines| {
        lines.iter().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["event"] == "done")
        })
    });
    assert_eq!(done["sent"], n, "the client sent what it was asked to");
    assert_eq!(
        done["received"], m,
        "the client received what the server sent"
    );
    (
        done["local"].as_str().expect("local").to_owned(),
        done["remote"].as_str().expect("remote").to_owned(),
    )
}

fn assert_close(rec: &Value, sent: u64, received: u64) {
    assert_eq!(rec["bytes_sent"], sent, "bytes_sent in {rec}");
    assert_eq!(rec["bytes_received"], received, "bytes_received in {rec}");
    assert!(
        rec["srtt_us"].as_u64().expect("srtt_us") > 0,
        "RTT must be > 0 in {rec}"
    );
    assert!(
        rec["duration_us"].as_u64().expect("duration_us") > 0,
        "duration in {rec}"
    );
    assert_eq!(rec["outcome"], "normal", "outcome in {rec}");
}

fn check_exchange(node: &Node, agent: &Agent, server: SocketAddr, n: u64, m: u64, close: &str) {
    let (client_addr, server_addr) = exchange(node, server, n, m, close);
    let is = |role: &'static str, event: &'static str, local: String, remote: String| {
        move |f: &Value| {
            f["role"] == role && f["event"] == event && f["local"] == local && f["remote"] == remote
        }
    };
    agent.wait_conn(
        "client open",
        is(
            "client",
            "tcp_open",
            client_addr.clone(),
            server_addr.clone(),
        ),
    );
    agent.wait_conn(
        "server open",
        is(
            "server",
            "tcp_open",
            server_addr.clone(),
            client_addr.clone(),
        ),
    );
    let c = agent.wait_conn(
        "client close",
        is(
            "client",
            "tcp_close",
            client_addr.clone(),
            server_addr.clone(),
        ),
    );
    let s = agent.wait_conn(
        "server close",
        is("server", "tcp_close", server_addr, client_addr),
    );
    assert_close(&c, n, m);
    assert_close(&s, m, n);
    assert_eq!(
        agent
            .conns()
            .iter()
            .filter(|f| f["cookie"] == c["cookie"] && f["event"] == "tcp_close")
            .count(),
        1,
        "one close per socket"
    );
}

#[test]
fn byte_counts_are_exact_for_both_ends_and_both_close_orders() {
    let node = Node::builder("byte_counts_are_exact")
        .pod("client")
        .pod("server")
        .build();
    let agent = Agent::start(&node);
    let server = node.pod("server");
    // Sizes well above the socket buffers, not multiples of any segment size.
    let (n, m) = (3_456_789, 1_234_567);
    // shutdown(WR) then read to EOF: the client's socket sees the server's FIN in FIN_WAIT2.
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8080),
        n,
        m,
        "shutdown",
    );
    // close() right after reading: the client's socket is orphaned before the server's FIN.
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8081),
        n,
        m,
        "close",
    );
    // IPv6.
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv6.into(), 8082),
        m,
        n,
        "shutdown",
    );
    // A connection that carries no payload at all.
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8083),
        0,
        0,
        "shutdown",
    );
}

#[test]
fn processes_outside_the_cgroup_are_not_reported() {
    let node = Node::builder("outside_not_reported")
        .pod("client")
        .pod("server")
        .build();
    let agent = Agent::start(&node);

    // Both ends outside every pod cgroup (in the node namespace, on the bridge address).
    let outside = node.spawn_outside(&[
        "tcp-server",
        "--listen",
        "10.0.0.1:9000",
        "--reply",
        "77",
        "--connections",
        "2",
    ]);
    outside.stdout().wait_for("outside server", WAIT, |l| {
        l.iter().any(|l| l.contains("listening")).then_some(())
    });
    let mut c = node.spawn_outside(&[
        "tcp-client",
        "--connect",
        "10.0.0.1:9000",
        "--send",
        "55",
        "--expect",
        "77",
    ]);
    c.wait_success(WAIT);
    // A pod client to the outside server: only the pod's end is observed.
    let mut c = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            "10.0.0.1:9000",
            "--send",
            "66",
            "--expect",
            "77",
        ],
    );
    c.wait_success(WAIT);
    agent.wait_conn("pod client close", |f| {
        f["event"] == "tcp_close" && f["remote"] == "10.0.0.1:9000"
    });

    // A marker connection between pods: once both of its ends are reported, anything about the
    // earlier connections would have been reported too (events arrive in order).
    let server = SocketAddr::new(node.pod("server").ipv4.into(), 8080);
    let (client_addr, _) = exchange(&node, server, 10, 20, "shutdown");
    agent.wait_conn("marker server close", |f| {
        f["event"] == "tcp_close" && f["role"] == "server" && f["remote"] == client_addr
    });

    let about_outside: Vec<_> = agent
        .conns()
        .into_iter()
        .filter(|f| {
            f["local"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.0.0.1:"))
        })
        .collect();
    assert!(
        about_outside.is_empty(),
        "outside sockets were reported: {about_outside:?}"
    );
    let outside_peer: Vec<_> = agent
        .conns()
        .into_iter()
        .filter(|f| f["remote"] == "10.0.0.1:9000")
        .collect();
    assert_eq!(
        outside_peer.len(),
        2,
        "exactly the pod client's open and close: {outside_peer:?}"
    );
    assert!(outside_peer.iter().all(|f| f["role"] == "client"));
    let close = outside_peer
        .iter()
        .find(|f| f["event"] == "tcp_close")
        .expect("close");
    assert_eq!(
        (
            close["bytes_sent"].as_u64(),
            close["bytes_received"].as_u64()
        ),
        (Some(66), Some(77))
    );
}

#[test]
fn refused_connect_is_reported_as_failed() {
    let node = Node::builder("refused_failed")
        .pod("client")
        .pod("server")
        .build();
    let agent = Agent::start(&node);
    let target = SocketAddr::new(node.pod("server").ipv4.into(), 9);
    let mut c = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &target.to_string(),
            "--send",
            "1",
        ],
    );
    let status = c.wait(WAIT);
    assert!(!status.success(), "nothing listens on port 9");
    let rec = agent.wait_conn("failed close", |f| {
        f["event"] == "tcp_close" && f["remote"] == target.to_string()
    });
    assert_eq!(rec["outcome"], "failed", "{rec}");
    assert_eq!(rec["bytes_sent"], 0);
    assert!(
        !agent
            .conns()
            .iter()
            .any(|f| f["event"] == "tcp_open" && f["remote"] == target.to_string()),
        "a refused connection never opened"
    );
}

#[test]
fn kernel_log_records_reach_the_agent_logs() {
    let node = Node::builder("kernel_logs")
        .pod("client")
        .pod("server")
        .build();
    let agent = weft_testkit::Agent::start_with(
        &node,
        weft_testkit::AgentOptions {
            log_level: "info,weft::kernel=debug".into(),
            ..weft_testkit::AgentOptions::default()
        },
    );
    let server = SocketAddr::new(node.pod("server").ipv4.into(), 8080);
    exchange(&node, server, 1, 1, "shutdown");
    let record = agent.logs().wait_for("a kernel log record", WAIT, |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["target"] == "weft::kernel")
    });
    assert_eq!(record["level"], "DEBUG", "{record}");
    assert!(
        record["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("tcp established cookie=")),
        "{record}"
    );
}
