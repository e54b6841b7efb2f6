//! The metrics exposition as Prometheus and operators read it: promtool accepts it, the
//! kubelet's probes answer on the metrics listener, and the Grafana dashboard (deploy/)
//! queries only metrics the agent exports.
use std::{io::Write as _, net::SocketAddr, process::Command, time::Duration};

use serde_json::Value;
use weft_testkit::{Agent, Close, k8s, prom};

const WAIT: Duration = Duration::from_secs(20);

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
    let node = k8s::client_server_node("telemetry_promtool");
    node.write_source(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny\n  namespace: default\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    );
    // A Service whose backend the policy cuts off, health-checked with a short connect
    // timeout: one connect to it ejects the backend (the ejection metrics get series).
    node.write_source(
        "pods.yaml",
        &k8s::http_pods(
            &node,
            "default",
            &[("client", &[]), ("server", &[("app", "server")])],
        ),
    );
    node.write_source(
        "service.yaml",
        &k8s::service(
            "server",
            "default",
            &["10.96.0.20"],
            &[("app", "server")],
            &[("http", 80, "http", "TCP")],
            None,
        ),
    );
    node.write_source(
        "rule.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: server, namespace: default}\nspec:\n  host: server\n  trafficPolicy:\n    connectionPool: {tcp: {connectTimeout: 100ms}}\n    outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}\n",
    );
    let agent = Agent::with_source(&node, &["--conn-update-interval", "1s"]);
    agent.wait_backends("10.96.0.20:80/TCP", 1, WAIT);
    let mut cut_off = node.spawn("client", &["connect-probe", "--connect", "10.96.0.20:80"]);
    cut_off.wait(WAIT);
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
        prom::sum(m, "weft_tcp_connections_closed_total", &[]) > 0.0
            && prom::sum(m, "weft_udp_received_bytes_total", &[]) > 0.0
            && prom::sum(m, "weft_backend_ejections_total", &[]) > 0.0
    });
    // The probes the DaemonSet uses answer on the metrics listener.
    for path in ["/healthz", "/readyz"] {
        let r = prom::get(agent.metrics_addr(), path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
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
    // Exactly what the dashboard's panels use: a panel added to it is added here too.
    let expected: std::collections::BTreeSet<String> = [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "weft_backend_ejections_total",
        "weft_bpf_map_fill_ratio",
        "weft_drop_events_suppressed_total",
        "weft_drops_total",
        "weft_ejected_backends",
        "weft_events_lost_total",
        "weft_flow_records_lost_total",
        "weft_policy_verdicts_total",
        "weft_tcp_connections_closed_total",
        "weft_tcp_connections_opened_total",
        "weft_tcp_received_bytes_total",
        "weft_tcp_retransmits_total",
        "weft_tcp_rtt_seconds_bucket",
        "weft_tcp_sent_bytes_total",
        "weft_udp_received_bytes_total",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(queried, expected, "the dashboard's queries");
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not export: {missing:?}"
    );
    alerts_read_exported_metrics(&exported, &text);
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

/// Every metric deploy/'s alerts read is one the agent exports (`exported`, from the scrape
/// `text` of a standalone agent), and every datapath error reason they name is one it counts.
fn alerts_read_exported_metrics(exported: &std::collections::BTreeSet<String>, text: &str) {
    let rules: Value =
        serde_json::from_str(&weft_testkit::prometheus::deploy_rules()).expect("rules JSON");
    let exprs: Vec<&str> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["expr"].as_str())
        .collect();
    assert_eq!(exprs.len(), 10, "{rules:#}");
    // Only a Kubernetes-mode agent registers it (tests/tests/kubernetes.rs reads it).
    let kubernetes_only = "weft_kubernetes_watch_up";
    let missing: Vec<String> = exprs
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|m| m != kubernetes_only && !exported.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts read metrics the agent does not export: {missing:?}"
    );
    // Every value a regex matcher names (`reason=~"a|b"`, `map_name!~"c|d"`) is one the agent
    // exports; `job` comes from the scrape configuration.
    for expr in &exprs {
        for (label, values) in regex_matchers(expr) {
            if label == "job" {
                continue;
            }
            for value in values.split('|') {
                let pair = format!("{label}=\"{value}\"");
                assert!(text.contains(&pair), "{pair} of {expr} is not exported");
            }
        }
    }
}

/// The `label=~"..."` and `label!~"..."` matchers of a PromQL expression.
fn regex_matchers(expr: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("~\"") {
        let before = rest[..at].trim_end_matches(['=', '!']);
        let label_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |n| n + 1);
        let value = &rest[at + 2..];
        let end = value.find('"').unwrap_or(value.len());
        out.push((&before[label_start..], &value[..end]));
        rest = &value[end..];
    }
    out
}
