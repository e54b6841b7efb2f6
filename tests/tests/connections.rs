//! The agent reports every TCP connection of the workloads under its cgroup, with exact payload
//! byte counts, RTT and duration, and nothing about processes outside that cgroup.
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use weft_testkit::{Agent, AgentOptions, Close, Node};

const WAIT: Duration = Duration::from_secs(20);

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

/// One exchange between the pods; both ends must be reported open and closed with exact counts.
fn check_exchange(node: &Node, agent: &Agent, server: SocketAddr, n: u64, m: u64, close: Close) {
    let x = node.tcp_exchange("client", "server", server, n, m, close);
    let is = |role: &'static str, event: &'static str, local: &str, remote: &str| {
        let (local, remote) = (local.to_owned(), remote.to_owned());
        move |f: &Value| {
            f["role"] == role && f["event"] == event && f["local"] == local && f["remote"] == remote
        }
    };
    agent.wait_conn(
        "client open",
        is("client", "tcp_open", &x.client, &x.server),
    );
    agent.wait_conn(
        "server open",
        is("server", "tcp_open", &x.server, &x.client),
    );
    let c = agent.wait_conn(
        "client close",
        is("client", "tcp_close", &x.client, &x.server),
    );
    let s = agent.wait_conn(
        "server close",
        is("server", "tcp_close", &x.server, &x.client),
    );
    assert_close(&c, n, m);
    assert_close(&s, m, n);
    let closes = agent
        .conns()
        .into_iter()
        .filter(|f| f["cookie"] == c["cookie"] && f["event"] == "tcp_close");
    assert_eq!(closes.count(), 1, "one close per socket");
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
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8080),
        n,
        m,
        Close::Shutdown,
    );
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8081),
        n,
        m,
        Close::Close,
    );
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv6.into(), 8082),
        m,
        n,
        Close::Shutdown,
    );
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv6.into(), 8083),
        m,
        n,
        Close::Close,
    );
    // A connection that carries no payload at all.
    check_exchange(
        &node,
        &agent,
        SocketAddr::new(server.ipv4.into(), 8084),
        0,
        0,
        Close::Shutdown,
    );
}

/// Bytes the node's end of a pod's veth has carried, both ways.
fn veth_bytes(node: &Node, pod: &str) -> u64 {
    let out = weft_testkit::proc::run(
        "ip",
        [
            "-n",
            node.netns_name(),
            "-j",
            "-s",
            "link",
            "show",
            &format!("v-{pod}"),
        ],
    );
    let v: Value = serde_json::from_str(&out).expect("ip -j output");
    let stats = &v[0]["stats64"];
    let bytes = |dir: &str| stats[dir]["bytes"].as_u64().expect("link bytes");
    bytes("rx") + bytes("tx")
}

/// With `--sockmap` the payload between two pods of the node goes socket to socket: almost
/// nothing crosses the pods' interfaces, and both ends still report it to the byte, for both
/// families and both close orders.
#[test]
fn with_sockmap_payload_skips_the_stack_and_is_counted_to_the_byte() {
    let node = Node::builder("sockmap_exact")
        .pod("client")
        .pod("server")
        .build();
    let agent = Agent::start_with(
        &node,
        AgentOptions {
            extra_args: vec!["--sockmap".into()],
            ..AgentOptions::default()
        },
    );
    let server = node.pod("server");
    let (n, m) = (3_456_789, 1_234_567);
    let before = veth_bytes(&node, "server");
    let cases = [
        (SocketAddr::new(server.ipv4.into(), 8080), Close::Shutdown),
        (SocketAddr::new(server.ipv4.into(), 8081), Close::Close),
        (SocketAddr::new(server.ipv6.into(), 8082), Close::Shutdown),
        (SocketAddr::new(server.ipv6.into(), 8083), Close::Close),
    ];
    for (to, close) in cases {
        check_exchange(&node, &agent, to, n, m, close);
    }
    let carried = veth_bytes(&node, "server") - before;
    let payload = 4 * (n + m);
    assert!(
        carried < payload / 20,
        "the server's interface carried {carried} bytes for {payload} bytes of payload"
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
    outside.wait_listening();
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
    let x = node.tcp_exchange("client", "server", server, 10, 20, Close::Shutdown);
    agent.wait_conn("marker server close", |f| {
        f["event"] == "tcp_close" && f["role"] == "server" && f["remote"] == x.client.as_str()
    });

    let conns = agent.conns();
    let about_outside: Vec<_> = conns
        .iter()
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
    let outside_peer: Vec<_> = conns
        .iter()
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
fn refused_connect_is_reported_as_refused() {
    let node = Node::builder("refused_outcome")
        .pod("client")
        .pod("server")
        .build();
    let agent = Agent::start(&node);
    let target = SocketAddr::new(node.pod("server").ipv4.into(), 9).to_string();
    let mut c = node.spawn(
        "client",
        &["tcp-client", "--connect", &target, "--send", "1"],
    );
    assert!(!c.wait(WAIT).success(), "nothing listens on port 9");
    let rec = agent.wait_conn("refused close", |f| {
        f["event"] == "tcp_close" && f["remote"] == target.as_str()
    });
    assert_eq!(rec["outcome"], "refused", "{rec}");
    assert_eq!(rec["bytes_sent"], 0);
    assert!(
        !agent
            .conns()
            .iter()
            .any(|f| f["event"] == "tcp_open" && f["remote"] == target.as_str()),
        "a refused connection never opened"
    );
}

#[test]
fn kernel_log_records_reach_the_agent_logs() {
    let node = Node::builder("kernel_logs")
        .pod("client")
        .pod("server")
        .build();
    let options = AgentOptions {
        log_level: "info,weft::conn=debug,weft::kernel=debug".into(),
        ..AgentOptions::default()
    };
    let agent = Agent::start_with(&node, options);
    let server = SocketAddr::new(node.pod("server").ipv4.into(), 8080);
    node.tcp_exchange("client", "server", server, 1, 1, Close::Shutdown);
    let record = agent.logs().wait_for("a kernel log record", WAIT, |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["target"] == "weft::kernel")
    });
    assert_eq!(record["level"], "DEBUG", "{record}");
    let message = record["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("tcp established cookie="), "{record}");
}
