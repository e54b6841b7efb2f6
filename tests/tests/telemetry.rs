//! Per-connection telemetry on a simulated node: Istio-labelled metrics served on
//! `--metrics-addr`, outcomes, counters of long-lived and very large connections, UDP flows.
//! (The flow stream is tested in flows.rs, the exposition format in exposition.rs.)
use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use weft_testkit::{
    Agent, Close, Node, k8s,
    prom::{self, Sample},
};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";
const SVC_HOST: &str = "web.default.svc.cluster.local";

/// A client (app shop, version v1) and a server (app web) behind the ClusterIP of `web`.
fn labels_node(test: &str) -> (Node, Agent) {
    let node = Node::builder(test).pod("client").pod("server").build();
    node.write_source(
        "pods.yaml",
        &k8s::http_pods(
            &node,
            "default",
            &[
                ("client", &[("app", "shop"), ("version", "v1")]),
                ("server", &[("app", "web")]),
            ],
        ),
    );
    node.write_source(
        "svc.yaml",
        &k8s::service(
            "web",
            "default",
            &[VIP],
            &[("app", "web")],
            &[("http", 80, "8080", "TCP")],
            None,
        ),
    );
    let agent = Agent::with_source(&node, &[]);
    agent.wait_services("the web service", |l| !l.is_empty());
    (node, agent)
}

/// One exchange of `request` bytes and a `response` from the client to the ClusterIP.
fn exchange_through_the_clusterip(node: &Node, request: u64, response: u64) {
    let (n, m) = (request, response);
    let _server = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "0.0.0.0:8080",
            "--reply",
            &m.to_string(),
            "--connections",
            "1",
        ],
    );
    let mut client = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &format!("{VIP}:80"),
            "--send",
            &n.to_string(),
            "--expect",
            &m.to_string(),
        ],
    );
    client.wait_success(WAIT);
}

#[test]
fn both_ends_name_the_workloads_and_the_service_with_exact_bytes() {
    let (node, agent) = labels_node("telemetry_labels");
    let (n, m) = (123_457_u64, 65_432_u64);
    exchange_through_the_clusterip(&node, n, m);
    let pair = |reporter: &'static str| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            ("source_app", "shop"),
            ("source_version", "v1"),
            ("source_canonical_service", "shop"),
            ("destination_workload", "server"),
            ("destination_app", "web"),
            ("destination_service", SVC_HOST),
            ("destination_service_name", "web"),
            ("destination_service_namespace", "default"),
            ("request_protocol", "tcp"),
        ]
    };
    let metrics = agent.wait_metrics("both ends' close in the metrics", |m| {
        ["source", "destination"]
            .iter()
            .all(|r| prom::sum(m, "weft_tcp_connections_closed_total", &pair(r)) == 1.0)
    });
    for reporter in ["source", "destination"] {
        let labels = pair(reporter);
        let closed: Vec<(&str, &str)> = labels
            .iter()
            .copied()
            .chain([("outcome", "normal")])
            .collect();
        assert_eq!(
            prom::sum(&metrics, "weft_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}"
        );
        assert_eq!(
            prom::sum(&metrics, "weft_tcp_connections_closed_total", &closed),
            1.0,
            "{reporter}"
        );
        // Istio's view from the destination: it received the request, sent the response.
        assert_eq!(
            prom::sum(&metrics, "weft_tcp_received_bytes_total", &labels),
            n as f64,
            "{reporter}"
        );
        assert_eq!(
            prom::sum(&metrics, "weft_tcp_sent_bytes_total", &labels),
            m as f64,
            "{reporter}"
        );
        assert_eq!(
            prom::sum(&metrics, "weft_tcp_rtt_seconds_count", &labels),
            1.0,
            "one RTT sample at close ({reporter})"
        );
    }
    // No IPs or ports as labels by default, and no series without a reporter.
    for s in metrics.iter().filter(|s| s.name.starts_with("weft_tcp_")) {
        assert!(
            s.labels
                .iter()
                .all(|(k, v)| !k.contains("address") && !v.starts_with("10.0.0.")),
            "{s:?}"
        );
    }
    assert!(
        metrics.iter().any(|s| s.name == "weft_events_lost_total"),
        "the lost-events counter is readable"
    );
    assert_eq!(prom::sum(&metrics, "weft_events_lost_total", &[]), 0.0);
    assert_eq!(prom::sum(&metrics, "weft_build_info", &[]), 1.0);
    assert!(
        metrics
            .iter()
            .any(|s| s.name == "weft_bpf_map_fill_ratio"
                && s.label("map_name") == Some("CONN_STATE")),
        "map fill ratios are exported"
    );
}

#[test]
fn metrics_are_openmetrics_when_asked_for_and_text_otherwise() {
    let (node, agent) = labels_node("telemetry_formats");
    exchange_through_the_clusterip(&node, 10, 10);
    agent.wait_metrics("the connection counted", |m| {
        prom::sum(m, "weft_tcp_connections_opened_total", &[]) == 2.0
    });
    let addr = agent.metrics_addr();
    let (ct, body) = prom::scrape(addr, Some("application/openmetrics-text;version=1.0.0"));
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    assert!(body.contains("# TYPE weft_tcp_connections_opened counter"));
    let (ct, body) = prom::scrape(addr, None);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    assert!(!body.contains("# EOF"));
    assert!(body.contains("# TYPE weft_tcp_connections_opened_total counter"));
    assert!(body.contains("# TYPE weft_build_info gauge"));
}

#[test]
fn series_of_a_deleted_pod_go() {
    let (node, agent) = labels_node("telemetry_deleted_pod");
    exchange_through_the_clusterip(&node, 10, 10);
    agent.wait_metrics("the client's series", |m| {
        prom::sum(
            m,
            "weft_tcp_connections_closed_total",
            &[("source_workload", "client")],
        ) == 2.0
    });
    // The client pod is deleted: every series naming its workload goes.
    node.write_source(
        "pods.yaml",
        &k8s::http_pods(&node, "default", &[("server", &[("app", "web")])]),
    );
    // A new connection lets telemetry see the new names (it also checks at every tick).
    node.tcp_exchange(
        "server",
        "server",
        SocketAddr::new(node.pod("server").ipv4.into(), 8081),
        1,
        1,
        Close::Shutdown,
    );
    agent.wait_metrics("the deleted client's series to go", |m| {
        !m.iter()
            .any(|s| s.label("source_workload") == Some("client"))
            && prom::sum(
                m,
                "weft_tcp_connections_opened_total",
                &[("source_workload", "server")],
            ) > 0.0
    });
}

/// Whether the metrics hold exactly one close of `outcome` from client to server.
fn closed(outcome: &'static str) -> impl Fn(&[Sample]) -> bool {
    move |m: &[Sample]| {
        prom::sum(
            m,
            "weft_tcp_connections_closed_total",
            &[
                ("reporter", "source"),
                ("source_workload", "client"),
                ("destination_workload", "server"),
                ("outcome", outcome),
            ],
        ) == 1.0
    }
}

/// The outcomes in the client's close records.
fn close_outcomes(agent: &Agent) -> Vec<String> {
    let records = agent.flows(&["--from-pod", "client", "--last", "100"]);
    records
        .iter()
        .filter(|r| r["event"] == "tcp_close" && r["reporter"] == "source")
        .filter_map(|r| r["outcome"].as_str().map(str::to_owned))
        .collect()
}

/// Refused: nothing listens.
#[test]
fn a_connect_to_a_closed_port_is_refused() {
    let node = k8s::client_server_node("telemetry_refused");
    let agent = Agent::with_source(&node, &[]);
    let server = node.pod("server").ipv4;
    let mut refused = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &format!("{server}:9"),
            "--send",
            "1",
        ],
    );
    assert!(!refused.wait(WAIT).success(), "nothing listens on port 9");
    agent.wait_metrics("a refused connect", closed("refused"));
    assert_eq!(close_outcomes(&agent), ["refused"]);
}

/// Reset: the server closes with the client's data unread, which sends a reset.
#[test]
fn a_connection_closed_with_data_unread_is_reset() {
    let node = k8s::client_server_node("telemetry_reset");
    let agent = Agent::with_source(&node, &[]);
    let server = node.pod("server").ipv4;
    let _srv = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            &format!("{server}:8080"),
            "--close-at-once",
            "--connections",
            "1",
        ],
    );
    let mut client = node.spawn(
        "client",
        &[
            "tcp-trickle",
            "--connect",
            &format!("{server}:8080"),
            "--seconds",
            "1",
            "--every-ms",
            "20",
        ],
    );
    client.wait(WAIT);
    agent.wait_metrics("a reset connection", closed("reset"));
    assert_eq!(close_outcomes(&agent), ["reset"]);
}

/// Timeout: the server's namespace drops SYNs to port 7; the client gives up after one
/// retransmission (about 3 s).
#[test]
fn a_connect_whose_syns_are_dropped_times_out() {
    let node = k8s::client_server_node("telemetry_timeout");
    let agent = Agent::with_source(&node, &[]);
    let server = node.pod("server").ipv4;
    let netns = |pod: &str| format!("--net={}", node.pod(pod).netns_path().display());
    let drop_rule = ["-A", "INPUT", "-p", "tcp", "--dport", "7", "-j", "DROP"];
    weft_testkit::proc::run(
        "nsenter",
        [netns("server").as_str(), "iptables"]
            .into_iter()
            .chain(drop_rule),
    );
    weft_testkit::proc::run(
        "nsenter",
        [
            netns("client").as_str(),
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_syn_retries=1",
        ],
    );
    let mut timed_out = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &format!("{server}:7"),
            "--send",
            "1",
        ],
    );
    assert!(
        !timed_out.wait(WAIT).success(),
        "SYNs to port 7 are dropped"
    );
    let m = agent.wait_metrics("a timed-out connect", closed("timeout"));
    assert_eq!(
        prom::sum(
            &m,
            "weft_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "server")]
        ),
        0.0,
        "a connection that timed out never opened"
    );
    assert_eq!(close_outcomes(&agent), ["timeout"]);
}

#[test]
fn a_long_lived_connection_reports_while_open() {
    long_lived_connection_reports_while_open("telemetry_long", &[]);
}

/// The same with `--sockmap`: the payload goes socket to socket, so no packet crosses
/// cgroup_skb, and the updates of both ends come from the sending socket's sk_msg program.
#[test]
fn a_long_lived_connection_going_socket_to_socket_reports_while_open() {
    long_lived_connection_reports_while_open("telemetry_long_sockmap", &["--sockmap"]);
}

fn long_lived_connection_reports_while_open(test: &str, extra: &[&str]) {
    let node = k8s::client_server_node(test);
    let args = [&["--conn-update-interval", "1s"], extra].concat();
    let agent = Agent::with_source(&node, &args);
    let server = node.pod("server").ipv4;
    let _srv = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            &format!("{server}:8080"),
            "--connections",
            "1",
        ],
    );
    let mut client = node.spawn(
        "client",
        &[
            "tcp-trickle",
            "--connect",
            &format!("{server}:8080"),
            "--seconds",
            "6",
            "--chunk",
            "10000",
        ],
    );
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    // Counters rise twice before the connection closes.
    let first = agent.wait_metrics("bytes of the open connection", |m| {
        prom::sum(m, "weft_tcp_received_bytes_total", &labels) > 0.0
    });
    let first = prom::sum(&first, "weft_tcp_received_bytes_total", &labels);
    let second = agent.wait_metrics("the counter to rise again", |m| {
        prom::sum(m, "weft_tcp_received_bytes_total", &labels) > first
    });
    assert_eq!(
        prom::sum(&second, "weft_tcp_connections_closed_total", &labels),
        0.0,
        "still open"
    );
    let (_, open) = agent.client("connections");
    let open = open.as_array().cloned().unwrap_or_default();
    let server_side = open
        .iter()
        .find(|c| c["role"] == "server" && c["remote"]["pod"] == "client")
        .unwrap_or_else(|| panic!("the open connection in `weft connections`: {open:#?}"));
    assert!(
        server_side["bytes_received"].as_u64() > Some(0),
        "{server_side}"
    );
    assert!(server_side["srtt_us"].as_u64() > Some(0), "{server_side}");
    client.wait_success(WAIT);
    let done: Value = client
        .stdout()
        .wait_for("the client's result", WAIT, |lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == "done")
        });
    let sent = done["sent"].as_u64().expect("sent");
    agent.wait_metrics("exact totals at close", |m| {
        prom::sum(m, "weft_tcp_connections_closed_total", &labels) == 1.0
            && prom::sum(m, "weft_tcp_received_bytes_total", &labels) == sent as f64
    });
}

/// Half-closed for seconds: the client sent its FIN first and the server replies slowly.
/// Updates while a FIN is in the socket's counters would add a byte; totals stay exact.
#[test]
fn a_half_closed_connection_keeps_exact_totals() {
    let node = k8s::client_server_node("telemetry_half_closed");
    let agent = Agent::with_source(&node, &["--conn-update-interval", "1s"]);
    let server = node.pod("server").ipv4;
    let (request, reply) = (100_u64, 4096 * 25);
    let _slow = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            &format!("{server}:8081"),
            "--reply",
            &reply.to_string(),
            "--reply-every-ms",
            "100",
            "--connections",
            "1",
        ],
    );
    let mut half = node.spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &format!("{server}:8081"),
            "--send",
            &request.to_string(),
            "--expect",
            &reply.to_string(),
        ],
    );
    half.wait_success(WAIT);
    let m = agent.wait_metrics("both closes of the half-closed connection", |m| {
        prom::sum(
            m,
            "weft_tcp_connections_closed_total",
            &[("source_workload", "client")],
        ) == 2.0
    });
    for reporter in ["source", "destination"] {
        let l = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ];
        assert_eq!(
            prom::sum(&m, "weft_tcp_received_bytes_total", &l),
            request as f64,
            "{reporter}: exact request bytes"
        );
        assert_eq!(
            prom::sum(&m, "weft_tcp_sent_bytes_total", &l),
            reply as f64,
            "{reporter}: exact response bytes"
        );
    }
}

/// More than 4 GiB through one connection, inside one pod (its own address: the loopback
/// device, no wire): the count is exact, so no 32-bit counter is on the way.
#[test]
fn more_than_4_gib_is_counted_to_the_byte() {
    let node = k8s::client_server_node("telemetry_4gib");
    let agent = Agent::with_source(&node, &[]);
    let server = node.pod("server").ipv4;
    let big: u64 = (4 << 30) + 12_345;
    let own = SocketAddr::new(server.into(), 9090);
    node.tcp_exchange("server", "server", own, big, 0, Close::Shutdown);
    let close = agent.wait_conn("the 4 GiB connection's close", |f| {
        f["event"] == "tcp_close" && f["role"] == "server" && f["local"] == own.to_string()
    });
    assert_eq!(close["bytes_received"].as_u64(), Some(big), "{close}");
    let self_labels = [
        ("reporter", "destination"),
        ("source_workload", "server"),
        ("destination_workload", "server"),
    ];
    agent.wait_metrics("the 4 GiB count in the metrics", |m| {
        prom::sum(m, "weft_tcp_received_bytes_total", &self_labels) == big as f64
    });
}

#[test]
fn udp_flows_are_counted_and_end_after_the_idle_timeout() {
    let node = k8s::client_server_node("telemetry_udp");
    let agent = Agent::with_source(
        &node,
        &["--conn-update-interval", "1s", "--udp-idle-timeout", "2s"],
    );
    let server = format!("{}:5353", node.pod("server").ipv4);
    let _echo = node.start_server("server", &["udp-echo", "--listen", &server]);
    let mut client = node.spawn(
        "client",
        &[
            "udp-client",
            "--connect",
            &server,
            "--count",
            "10",
            "--size",
            "100",
        ],
    );
    client.wait_success(WAIT);
    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("request_protocol", "udp"),
    ];
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    let m = agent.wait_metrics("both ends' UDP flow to end", |m| {
        prom::sum(m, "weft_udp_flows_closed_total", &source) == 1.0
            && prom::sum(m, "weft_udp_flows_closed_total", &destination) == 1.0
    });
    for labels in [&source[..], &destination[..]] {
        assert_eq!(
            prom::sum(&m, "weft_udp_received_packets_total", labels),
            10.0,
            "{labels:?}"
        );
        assert_eq!(
            prom::sum(&m, "weft_udp_sent_packets_total", labels),
            10.0,
            "{labels:?}"
        );
        // 100 bytes of payload + 8 UDP + 20 IPv4 header bytes per packet.
        assert_eq!(
            prom::sum(&m, "weft_udp_received_bytes_total", labels),
            1280.0,
            "{labels:?}"
        );
    }
    let records = agent.flows(&["--protocol", "udp"]);
    assert_eq!(records.len(), 2, "one record per end: {records:#?}");
    for r in &records {
        assert_eq!(r["event"], "udp_flow");
        assert_eq!(r["source"]["pod"], "client", "{r}");
        assert_eq!(r["packets_to_destination"], 10, "{r}");
        assert_eq!(r["packets_to_source"], 10, "{r}");
    }
}
