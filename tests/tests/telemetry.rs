//! Per-connection telemetry on a simulated node: Istio-labelled metrics served on
//! `--metrics-addr`, outcomes, counters of long-lived and very large connections, UDP flows,
//! the flow stream and its filters, and a stalled reader of it.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testkit::{
    Agent, AgentOptions, Close, Node, k8s,
    prom::{self, Sample},
};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";
const SVC_HOST: &str = "web.default.svc.cluster.local";

fn agent(node: &Node, extra: &[&str]) -> Agent {
    Agent::start_with(
        node,
        AgentOptions {
            source: true,
            extra_args: extra.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentOptions::default()
        },
    )
}

/// `weft flows ARGS -o json`: the records printed (JSON lines).
fn flows(agent: &Agent, args: &[&str]) -> Vec<Value> {
    let out = Command::new(weft_testkit::agent::weft_binary())
        .arg("flows")
        .args(args)
        .args(["-o", "json", "--admin-socket"])
        .arg(agent.admin_socket())
        .output()
        .expect("weft flows");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "weft flows {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn value(m: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    prom::sum(m, name, labels)
}

fn pods_yaml(node: &Node, names: &[(&str, &[(&str, &str)])]) -> String {
    let docs: Vec<String> = names
        .iter()
        .map(|(name, labels)| {
            k8s::pod(
                node.pod(name),
                "default",
                labels,
                &[("http", 8080, "TCP")],
                true,
            )
        })
        .collect();
    k8s::file(&docs)
}

#[test]
fn metrics_name_workloads_and_service_through_a_clusterip_and_deleted_pods_lose_their_series() {
    let node = Node::builder("telemetry_labels")
        .pod("client")
        .pod("server")
        .build();
    node.write_source(
        "pods.yaml",
        &pods_yaml(
            &node,
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
    let agent = agent(&node, &[]);
    agent.wait_services("the web service", |l| !l.is_empty());

    let (n, m) = (123_457_u64, 65_432_u64);
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
            .all(|r| value(m, "weft_tcp_connections_closed_total", &pair(r)) == 1.0)
    });
    for reporter in ["source", "destination"] {
        let labels = pair(reporter);
        let closed: Vec<(&str, &str)> = labels
            .iter()
            .copied()
            .chain([("outcome", "normal")])
            .collect();
        assert_eq!(
            value(&metrics, "weft_tcp_connections_opened_total", &labels),
            1.0,
            "{reporter}"
        );
        assert_eq!(
            value(&metrics, "weft_tcp_connections_closed_total", &closed),
            1.0,
            "{reporter}"
        );
        // Istio's view from the destination: it received the request, sent the response.
        assert_eq!(
            value(&metrics, "weft_tcp_received_bytes_total", &labels),
            n as f64,
            "{reporter}"
        );
        assert_eq!(
            value(&metrics, "weft_tcp_sent_bytes_total", &labels),
            m as f64,
            "{reporter}"
        );
        assert_eq!(
            value(&metrics, "weft_tcp_rtt_seconds_count", &labels),
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
    assert_eq!(value(&metrics, "weft_events_lost_total", &[]), 0.0);
    assert_eq!(value(&metrics, "weft_build_info", &[]), 1.0);
    assert!(
        metrics
            .iter()
            .any(|s| s.name == "weft_bpf_map_fill_ratio"
                && s.label("map_name") == Some("CONN_STATE")),
        "map fill ratios are exported"
    );

    // OpenMetrics when asked for, the text format otherwise.
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

    // The client pod is deleted: every series naming its workload goes.
    node.write_source(
        "pods.yaml",
        &pods_yaml(&node, &[("server", &[("app", "web")])]),
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
            && value(
                m,
                "weft_tcp_connections_opened_total",
                &[("source_workload", "server")],
            ) > 0.0
    });
}

#[test]
fn outcomes_tell_reset_refused_and_timeout_apart() {
    let node = Node::builder("telemetry_outcomes")
        .pod("client")
        .pod("server")
        .build();
    node.write_source(
        "pods.yaml",
        &pods_yaml(&node, &[("client", &[]), ("server", &[])]),
    );
    let agent = agent(&node, &[]);
    let server = node.pod("server").ipv4;
    let closed = |outcome: &'static str| {
        move |m: &[Sample]| {
            value(
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
    };

    // Refused: nothing listens.
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

    // Reset: the server closes with the client's data unread, which sends a reset.
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

    // Timeout: the server's namespace drops SYNs to port 7; the client gives up after one
    // retransmission (about 3 s).
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
        value(
            &m,
            "weft_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "server")]
        ),
        1.0,
        "only the reset connection ever opened"
    );
    let records = flows(&agent, &["--from-pod", "client", "--last", "100"]);
    let outcomes: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "tcp_close" && r["reporter"] == "source")
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["refused", "reset", "timeout"], "{records:#?}");
}

#[test]
fn a_long_lived_connection_reports_while_open_and_counters_are_64_bit() {
    let node = Node::builder("telemetry_long")
        .pod("client")
        .pod("server")
        .build();
    node.write_source(
        "pods.yaml",
        &pods_yaml(&node, &[("client", &[]), ("server", &[])]),
    );
    let agent = agent(&node, &["--conn-update-interval", "1s"]);
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
        value(m, "weft_tcp_received_bytes_total", &labels) > 0.0
    });
    let first = value(&first, "weft_tcp_received_bytes_total", &labels);
    let second = agent.wait_metrics("the counter to rise again", |m| {
        value(m, "weft_tcp_received_bytes_total", &labels) > first
    });
    assert_eq!(
        value(&second, "weft_tcp_connections_closed_total", &labels),
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
        value(m, "weft_tcp_connections_closed_total", &labels) == 1.0
            && value(m, "weft_tcp_received_bytes_total", &labels) == sent as f64
    });

    // Half-closed for seconds: the client sent its FIN first and the server replies slowly.
    // Updates while a FIN is in the socket's counters would add a byte; totals stay exact.
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
        value(
            m,
            "weft_tcp_connections_closed_total",
            &[("source_workload", "client")],
        ) == 4.0
    });
    for reporter in ["source", "destination"] {
        let l = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ];
        assert_eq!(
            value(&m, "weft_tcp_received_bytes_total", &l),
            (sent + request) as f64,
            "{reporter}: exact request bytes over both connections"
        );
        assert_eq!(
            value(&m, "weft_tcp_sent_bytes_total", &l),
            reply as f64,
            "{reporter}: exact response bytes"
        );
    }

    // More than 4 GiB through one connection, inside one pod (its own address: the loopback
    // device, no wire): the count is exact, so no 32-bit counter is on the way.
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
        value(m, "weft_tcp_received_bytes_total", &self_labels) == big as f64
    });
}

#[test]
fn udp_flows_are_counted_and_end_after_the_idle_timeout() {
    let node = Node::builder("telemetry_udp")
        .pod("client")
        .pod("server")
        .build();
    node.write_source(
        "pods.yaml",
        &pods_yaml(&node, &[("client", &[]), ("server", &[])]),
    );
    let agent = agent(
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
        value(m, "weft_udp_flows_closed_total", &source) == 1.0
            && value(m, "weft_udp_flows_closed_total", &destination) == 1.0
    });
    for labels in [&source[..], &destination[..]] {
        assert_eq!(
            value(&m, "weft_udp_received_packets_total", labels),
            10.0,
            "{labels:?}"
        );
        assert_eq!(
            value(&m, "weft_udp_sent_packets_total", labels),
            10.0,
            "{labels:?}"
        );
        // 100 bytes of payload + 8 UDP + 20 IPv4 header bytes per packet.
        assert_eq!(
            value(&m, "weft_udp_received_bytes_total", labels),
            1280.0,
            "{labels:?}"
        );
    }
    let records = flows(&agent, &["--protocol", "udp"]);
    assert_eq!(records.len(), 2, "one record per end: {records:#?}");
    for r in &records {
        assert_eq!(r["event"], "udp_flow");
        assert_eq!(r["source"]["pod"], "client", "{r}");
        assert_eq!(r["packets_to_destination"], 10, "{r}");
        assert_eq!(r["packets_to_source"], 10, "{r}");
    }
}

#[test]
fn flow_filters_return_exactly_the_matching_records_and_a_stalled_reader_stalls_nothing() {
    let node = Node::builder("telemetry_flows")
        .pod("a")
        .pod("b")
        .pod("c")
        .build();
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: c-no-egress\n  namespace: default\nspec:\n  podSelector:\n    matchLabels:\n      app: c\n  policyTypes: [Egress]\n";
    node.write_source(
        "pods.yaml",
        &pods_yaml(
            &node,
            &[
                ("a", &[("app", "a")]),
                ("b", &[("app", "b")]),
                ("c", &[("app", "c")]),
            ],
        ),
    );
    node.write_source("policy.yaml", policy);
    let agent = agent(&node, &[]);
    agent.wait_policies("c isolated", |p| {
        p["endpoints"].as_array().is_some_and(|e| !e.is_empty())
    });
    let b = SocketAddr::new(node.pod("b").ipv4.into(), 8080);
    node.tcp_exchange("a", "b", b, 10, 10, Close::Shutdown);
    let mut denied = node.spawn("c", &["connect-probe", "--connect", &b.to_string()]);
    denied.wait(WAIT);
    agent.wait_metrics("the denied connect's event", |m| {
        value(m, "weft_conn_events_total", &[("event", "drop")]) >= 1.0
            && value(m, "weft_conn_events_total", &[("event", "tcp_close")]) >= 2.0
    });

    let all = flows(&agent, &["--last", "1000"]);
    let seqs = |records: &[Value]| -> Vec<u64> {
        records.iter().filter_map(|r| r["seq"].as_u64()).collect()
    };
    let expect = |args: &[&str], pred: &dyn Fn(&Value) -> bool| {
        let got = flows(&agent, args);
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

    // A follower that never reads: the agent goes on, and the follower is told what it lost.
    let mut stalled = UnixStream::connect(agent.admin_socket()).expect("admin socket");
    stalled
        .write_all(b"GET /flows?follow=true&last=0 HTTP/1.1\r\nHost: weft\r\n\r\n")
        .expect("request");
    let before = value(
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
        value(m, "weft_conn_events_total", &[("event", "tcp_close")]) - before >= 2.0 * connections
    });
    assert_eq!(value(&m, "weft_events_lost_total", &[]), 0.0);
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
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + WAIT;
    while !String::from_utf8_lossy(&seen).contains("\"lost\":") {
        assert!(
            Instant::now() < deadline,
            "no lost-records line reached the stalled reader"
        );
        let n = stalled.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the stream ended");
        seen.extend_from_slice(&buf[..n]);
    }
    agent.wait_metrics("the lost records counted", |m| {
        value(m, "weft_flow_records_lost_total", &[]) > 0.0
    });
}

/// Metric names a PromQL expression reads: identifiers starting with `weft_` or `process_`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = expr[i..].starts_with("weft_") || expr[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            out.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn promtool_accepts_the_agents_metrics() {
    let node = Node::builder("telemetry_promtool")
        .pod("client")
        .pod("server")
        .build();
    node.write_source(
        "pods.yaml",
        &pods_yaml(&node, &[("client", &[]), ("server", &[])]),
    );
    node.write_source(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: default\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    );
    let agent = agent(&node, &["--conn-update-interval", "1s"]);
    let server = SocketAddr::new(node.pod("server").ipv4.into(), 8080);
    node.tcp_exchange("server", "server", server, 100, 100, Close::Shutdown);
    let mut probe = node.spawn(
        "client",
        &["connect-probe", "--connect", &server.to_string()],
    );
    probe.wait(WAIT);
    // UDP inside the server pod (the deny-all ingress policy allows a pod to reach itself).
    let dns = format!("{}:5353", node.pod("server").ipv4);
    let _echo = node.start_server("server", &["udp-echo", "--listen", &dns]);
    let mut udp = node.spawn("server", &["udp-client", "--connect", &dns, "--count", "2"]);
    udp.wait_success(WAIT);
    agent.wait_metrics("TCP and UDP traffic in the metrics", |m| {
        value(m, "weft_tcp_connections_closed_total", &[]) > 0.0
            && value(m, "weft_udp_received_bytes_total", &[]) > 0.0
    });
    // The probes the DaemonSet uses answer on the metrics listener.
    for path in ["/healthz", "/readyz"] {
        let mut stream = std::net::TcpStream::connect(agent.metrics_addr()).expect("connect");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(response.starts_with("HTTP/1.0 200"), "{path}: {response}");
    }
    // Every metric the Grafana dashboard (deploy/) queries is one the agent exports.
    // Families as the exposition declares them (a family with no series yet still counts).
    let (_, text) = prom::scrape(agent.metrics_addr(), None);
    let mut exported = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let dashboard_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/weft-dashboard.json");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(&dashboard_path).expect("read the dashboard"),
    )
    .expect("dashboard JSON");
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(queried.len() >= 10, "the dashboard queries {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not export: {missing:?}"
    );
    // promtool reads the Prometheus text format (OpenMetrics is checked in the labels test).
    for accept in [None, Some("text/plain;version=0.0.4")] {
        let (_, body) = prom::scrape(agent.metrics_addr(), accept);
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus, installed by `cargo xtask setup`)");
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("write to promtool");
        let out = promtool.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics ({accept:?}): {}{}\n{body}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
