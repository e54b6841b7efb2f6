//! Socket-level service load balancing on a simulated node, fed by the standalone YAML source.
//!
//! Service ranges are unreachable in the node namespace: a connection to a ClusterIP works
//! only if weft translates it.
use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use weft_testkit::{Agent, AgentOptions, Node, k8s, prom};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];

fn node(test: &str) -> Node {
    Node::builder(test)
        .pod("client")
        .pod("b1")
        .pod("b2")
        .pod("b3")
        .build()
}

fn agent(node: &Node) -> Agent {
    Agent::start_with(
        node,
        AgentOptions {
            source: true,
            ..AgentOptions::default()
        },
    )
}

/// Pods of the node as YAML: the client, and the backends labelled app=web with named ports,
/// `not_ready` ones marked Ready=False.
fn pods(node: &Node, not_ready: &[&str]) -> String {
    let mut docs = vec![k8s::pod(
        node.pod("client"),
        "default",
        &[("app", "client")],
        &[],
        true,
    )];
    for b in BACKENDS {
        let ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
        docs.push(k8s::pod(
            node.pod(b),
            "default",
            &[("app", "web")],
            &ports,
            !not_ready.contains(&b),
        ));
    }
    k8s::file(&docs)
}

fn web_service(affinity: Option<u32>) -> String {
    let ports: [k8s::Port<'_>; 2] = [("http", 80, "http", "TCP"), ("dns", 53, "dns", "UDP")];
    k8s::service(
        "web",
        "default",
        &[VIP, VIP6],
        &[("app", "web")],
        &ports,
        affinity,
    )
}

/// Starts a TCP server (replying with its pod name) and a UDP echo server in every backend.
fn start_backends(node: &Node) -> Vec<weft_testkit::proc::Process> {
    let mut servers = Vec::new();
    for b in BACKENDS {
        servers.push(node.start_server(
            b,
            &["tcp-server", "--listen", "[::]:8080", "--reply-name", b],
        ));
        servers.push(node.start_server(b, &["udp-echo", "--listen", "[::]:5353"]));
    }
    servers
}

fn frontend<'a>(services: &'a [Value], frontend: &str) -> Option<&'a Value> {
    services.iter().find(|s| s["frontend"] == frontend)
}

fn wait_backends(agent: &Agent, fe: &str, n: usize) {
    agent.wait_backends(fe, n, Duration::from_secs(10));
}

/// Opens `count` connections from the client pod; returns connections per backend name.
fn spray(node: &Node, target: &str, count: u64) -> BTreeMap<String, u64> {
    node.spray("client", target, count)
}

fn setup(test: &str, affinity: Option<u32>) -> (Node, Agent, Vec<weft_testkit::proc::Process>) {
    let node = node(test);
    node.write_source("pods.yaml", &pods(&node, &[]));
    node.write_source("services.yaml", &web_service(affinity));
    let servers = start_backends(&node);
    let agent = agent(&node);
    wait_backends(&agent, "10.96.0.10:80/TCP", 3);
    (node, agent, servers)
}

#[test]
fn a_clusterip_balances_tcp_over_three_backends_and_getpeername_shows_it() {
    let (node, agent, _servers) = setup("clusterip_balances", None);
    let counts = spray(&node, "10.96.0.10:80", 3000);
    assert_eq!(counts.values().sum::<u64>(), 3000);
    for b in BACKENDS {
        let share = counts.get(b).copied().unwrap_or(0) as f64 / 3000.0;
        assert!(
            (0.25..=0.42).contains(&share),
            "{b} got {share:.3} of the connections: {counts:?}"
        );
    }
    // What `weft services` shows is what the kernel holds.
    let (_, list) = agent.client("services");
    let web = frontend(list.as_array().expect("list"), "10.96.0.10:80/TCP").expect("frontend");
    assert_eq!(web["service"], "default/web");
    let mut backends: Vec<String> =
        serde_json::from_value(web["backends"].clone()).expect("backends");
    backends.sort();
    assert_eq!(
        backends,
        ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
    );
    // `weft maps` counts what the kernel holds: one SERVICES entry per frontend.
    let (_, maps) = agent.client("maps");
    let map = |name: &str| {
        maps.as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no map {name}: {maps:#}"))
    };
    let services = map("SERVICES");
    assert_eq!(
        services["entries"].as_u64(),
        list.as_array().map(|l| l.len() as u64),
        "{services}"
    );
    assert_eq!(services["max_entries"], 65_536, "{services}");
    assert!(
        map("STATS")["entries"].is_null(),
        "arrays have no entries to count"
    );
    // `weft version` names both ends; `weft status --brief` is one line.
    let (_, version) = agent.client("version");
    assert_eq!(
        version["client"]["version"], version["agent"]["version"],
        "{version}"
    );
    assert_eq!(version["agent"]["instance"], agent.instance(), "{version}");
    let brief = std::process::Command::new(weft_testkit::agent::weft_binary())
        .args(["status", "--brief", "--admin-socket"])
        .arg(agent.admin_socket())
        .output()
        .expect("weft status --brief");
    let text = String::from_utf8_lossy(&brief.stdout);
    assert!(brief.status.success(), "{text}");
    assert!(
        text.lines().count() == 1 && text.starts_with("healthy ready=true frontends="),
        "{text}"
    );
    // Any listing also comes as YAML.
    let yaml = std::process::Command::new(weft_testkit::agent::weft_binary())
        .args(["services", "-o", "yaml", "--admin-socket"])
        .arg(agent.admin_socket())
        .output()
        .expect("weft services -o yaml");
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        yaml.lines()
            .any(|l| l.trim_start_matches("- ") == "service: default/web"),
        "{yaml}"
    );
    // The log filter changes at run time; a bad one is refused and changes nothing.
    let log_level = |args: &[&str]| {
        let out = std::process::Command::new(weft_testkit::agent::weft_binary())
            .arg("log-level")
            .args(args)
            .arg("--admin-socket")
            .arg(agent.admin_socket())
            .output()
            .expect("weft log-level");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // The harness's agents log connection records (debug) for tests to read.
    assert_eq!(log_level(&[]), (true, "info,weft::conn=debug\n".to_owned()));
    let (ok, text) = log_level(&["info,weft::sync=debug"]);
    assert!(
        ok && text.contains("info,weft::conn=debug -> info,weft::sync=debug"),
        "{text}"
    );
    let (ok, text) = log_level(&["info,weft=notalevel"]);
    assert!(!ok && text.contains("invalid"), "{text}");
    assert_eq!(log_level(&[]), (true, "info,weft::sync=debug\n".to_owned()));
}

#[test]
fn udp_through_a_clusterip_connected_and_unconnected() {
    let (node, _agent, _servers) = setup("udp_clusterip", None);
    for args in [
        vec!["udp-client", "--connect", "10.96.0.10:53", "--count", "20"],
        // Unconnected: sendmsg translates, recvmsg shows the reply as coming from the ClusterIP.
        vec![
            "udp-client",
            "--connect",
            "10.96.0.10:53",
            "--count",
            "20",
            "--unconnected",
        ],
        vec![
            "udp-client",
            "--connect",
            "[fd00:96::10]:53",
            "--count",
            "5",
            "--unconnected",
        ],
    ] {
        let mut c = node.spawn("client", &args);
        c.wait_success(WAIT);
    }
}

#[test]
fn an_ipv6_clusterip_works() {
    let (node, _agent, _servers) = setup("ipv6_clusterip", None);
    let counts = spray(&node, "[fd00:96::10]:80", 300);
    assert_eq!(counts.values().sum::<u64>(), 300);
    assert_eq!(
        counts.len(),
        3,
        "every backend serves over IPv6: {counts:?}"
    );
}

#[test]
fn a_backend_marked_not_ready_gets_no_new_connection() {
    let (node, agent, _servers) = setup("not_ready", None);
    node.write_source("pods.yaml", &pods(&node, &["b3"]));
    // Wait out the 1 s the issue allows, then check nothing reaches b3.
    std::thread::sleep(Duration::from_secs(1));
    wait_backends(&agent, "10.96.0.10:80/TCP", 2);
    let counts = spray(&node, "10.96.0.10:80", 300);
    assert_eq!(counts.get("b3"), None, "{counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 300);
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let node = node("no_endpoints");
    node.write_source("pods.yaml", &pods(&node, &[]));
    let ports: [k8s::Port<'_>; 2] = [("http", 80, "8080", "TCP"), ("dns", 53, "5353", "UDP")];
    node.write_source(
        "empty.yaml",
        &k8s::service(
            "empty",
            "default",
            &["10.96.0.20"],
            &[("app", "nobody")],
            &ports,
            None,
        ),
    );
    let agent = agent(&node);
    wait_backends(&agent, "10.96.0.20:80/TCP", 0);
    // A non-blocking connect fails inside the call: no SYN was sent, nothing to wait for.
    let mut p = node.spawn("client", &["connect-probe", "--connect", "10.96.0.20:80"]);
    p.wait_success(WAIT);
    let v: Value = p.stdout().wait_for("probe", WAIT, |l| {
        l.iter().find_map(|l| serde_json::from_str::<Value>(l).ok())
    });
    assert_eq!(v["immediate"], "ECONNREFUSED", "{v}");
    // A datagram to it fails the same way.
    let mut u = node.spawn(
        "client",
        &["udp-client", "--connect", "10.96.0.20:53", "--unconnected"],
    );
    assert!(!u.wait(WAIT).success());
    let out = u.stdout().snapshot().join("\n");
    assert!(out.contains("ECONNREFUSED"), "{out}");
}

#[test]
fn client_ip_affinity_keeps_one_backend() {
    let (node, _agent, _servers) = setup("affinity", Some(600));
    let counts = spray(&node, "10.96.0.10:80", 200);
    assert_eq!(
        counts.len(),
        1,
        "all connections reach one backend: {counts:?}"
    );
}

#[test]
fn processes_outside_pod_cgroups_are_not_translated() {
    let (node, _agent, _servers) = setup("outside_untranslated", None);
    let mut p = node.spawn_outside(&["connect-probe", "--connect", "10.96.0.10:80"]);
    p.wait_success(WAIT);
    let v: Value = p.stdout().wait_for("probe", WAIT, |l| {
        l.iter().find_map(|l| serde_json::from_str::<Value>(l).ok())
    });
    // The service range is an unreachable route on the node: untranslated, it cannot route.
    assert_eq!(v["immediate"], "EHOSTUNREACH", "{v}");
}

fn rejections(agent: &Agent) -> Vec<Value> {
    let (_, status) = agent.client("status");
    status["services"]["rejections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn invalid_documents_are_rejected_by_file_and_field_and_the_previous_state_keeps_serving() {
    let (node, agent, _servers) = setup("invalid_docs", None);
    let good = web_service(None);
    let cases: [(&str, String, &str); 4] = [
        (
            "invalid YAML",
            format!("{good}  ports: [unclosed\n"),
            "invalid YAML",
        ),
        (
            "unknown field",
            good.replace("  selector:", "  selectr: {app: web}\n  selector:"),
            "spec.selectr",
        ),
        (
            "invalid ClusterIP",
            good.replace("\"10.96.0.10\"", "\"10.96.0.300\""),
            "spec.clusterIP",
        ),
        (
            "invalid port",
            good.replace("port: 80,", "port: 70000,"),
            "spec.ports[0].port",
        ),
    ];
    for (what, text, needle) in cases {
        node.write_source("services.yaml", &text);
        let status = agent.wait_status(&format!("the {what} rejection"), |s| {
            s["services"]["rejections"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        });
        let r = &status["services"]["rejections"][0];
        assert!(
            r["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("services.yaml")),
            "{what}: {r}"
        );
        let text = r.to_string();
        assert!(text.contains(needle), "{what}: {needle:?} not in {text}");
        // The previous version of the Service keeps serving.
        let counts = spray(&node, "10.96.0.10:80", 30);
        assert_eq!(counts.values().sum::<u64>(), 30, "{what}");
        node.write_source("services.yaml", &good);
        agent.wait_status("no rejection", |s| {
            s["services"]["rejections"]
                .as_array()
                .is_some_and(Vec::is_empty)
        });
    }
    // Each bad version is counted once, when it is first read.
    let total = prom::sum(&agent.metrics(), "weft_config_rejections_total", &[]);
    assert_eq!(total, 4.0, "every rejection counted once");
    assert!(rejections(&agent).is_empty());
}

#[test]
fn a_file_replaced_by_atomic_rename_is_picked_up() {
    let (node, agent, _servers) = setup("atomic_rename", None);
    let ports: [k8s::Port<'_>; 1] = [("http", 8081, "http", "TCP")];
    let api = k8s::service(
        "api",
        "default",
        &["10.96.0.11"],
        &[("app", "web")],
        &ports,
        None,
    );
    // write_source writes a temporary file and renames it into place.
    node.write_source("api.yaml", &api);
    wait_backends(&agent, "10.96.0.11:8081/TCP", 3);
    let counts = spray(&node, "10.96.0.11:8081", 30);
    assert_eq!(counts.values().sum::<u64>(), 30);
    node.remove_source("api.yaml");
    agent.wait_services("api removed", |list| {
        frontend(list, "10.96.0.11:8081/TCP").is_none()
    });
}

/// Passive health checking for every Service's TCP ports, as `--outlier-detection-default`
/// takes it: `max_percent` of the backends ejected at most, for `base` after 3 failures in
/// a row. A base longer than a test keeps its counts exact however slow the machine.
fn checking(max_percent: u32, min_health: u32, base: &str) -> String {
    format!(
        "consecutive5xxErrors=3,baseEjectionTime={base},maxEjectionPercent={max_percent},minHealthPercent={min_health}"
    )
}

/// [`setup`] with the agent checking backends' health as `outlier` says.
fn setup_checking(
    test: &str,
    affinity: Option<u32>,
    outlier: &str,
) -> (Node, Agent, Vec<weft_testkit::proc::Process>) {
    setup_with(
        test,
        affinity,
        &["--outlier-detection-default", outlier],
        None,
    )
}

/// [`setup`] with `flags` for the agent and `rule` as a source file.
fn setup_with(
    test: &str,
    affinity: Option<u32>,
    flags: &[&str],
    rule: Option<&str>,
) -> (Node, Agent, Vec<weft_testkit::proc::Process>) {
    let node = node(test);
    node.write_source("pods.yaml", &pods(&node, &[]));
    node.write_source("services.yaml", &web_service(affinity));
    if let Some(rule) = rule {
        node.write_source("rule.yaml", rule);
    }
    let servers = start_backends(&node);
    let agent = Agent::start_with(
        &node,
        AgentOptions {
            source: true,
            extra_args: flags.iter().map(|f| (*f).to_owned()).collect(),
            ..AgentOptions::default()
        },
    );
    wait_backends(&agent, "10.96.0.10:80/TCP", 3);
    (node, agent, servers)
}

/// Stops backend `b`'s TCP server (started by [`start_backends`], in place there): its
/// connects are refused.
fn stop_tcp_server(servers: &mut [weft_testkit::proc::Process], b: &str) {
    let i = BACKENDS.iter().position(|x| *x == b).expect("backend");
    let server = &mut servers[2 * i];
    server.signal(libc::SIGKILL);
    server.wait(WAIT);
}

/// The backends `weft services` shows ejected from the web Service's TCP port.
fn ejected(agent: &Agent) -> Vec<Value> {
    let (ok, services) = agent.client("services");
    assert!(ok, "{services}");
    let list = services.as_array().expect("list");
    let fe = frontend(list, "10.96.0.10:80/TCP").expect("frontend");
    assert_eq!(fe["outlier_consecutive"], 3, "{fe}");
    fe["ejected"].as_array().expect("ejected").clone()
}

#[test]
fn a_refusing_backend_is_ejected_at_its_third_failure_and_used_again_after_its_ejection() {
    let (node, agent, mut servers) = setup_checking("outlier_eject", None, &checking(50, 0, "5s"));
    let started = std::time::Instant::now();
    stop_tcp_server(&mut servers, "b2");
    let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 600);
    let ejected = ejected(&agent);
    if started.elapsed() < Duration::from_secs(5) {
        assert_eq!(errors, 3, "only the failures that ejected b2: {counts:?}");
        assert_eq!(ejected.len(), 1, "{ejected:?}");
        let b2 = format!("{}:8080", node.pod("b2").ipv4);
        assert_eq!(ejected[0]["backend"], b2.as_str(), "{ejected:?}");
        assert_eq!(ejected[0]["ejections"], 1, "{ejected:?}");
        let left = ejected[0]["remaining_ms"].as_u64();
        assert!(left.is_some_and(|ms| ms <= 5000), "{ejected:?}");
        let web = [("service", "web"), ("namespace", "default"), ("port", "80")];
        agent.wait_metrics("the ejection counted", |m| {
            prom::sum(m, "weft_backend_ejections_total", &web) == 1.0
        });
        // Read before the ejection could have ended (the gauge follows it).
        let out = prom::sum(&agent.metrics(), "weft_ejected_backends", &web);
        if started.elapsed() < Duration::from_secs(4) {
            assert_eq!(out, 1.0);
        }
    } else {
        // So slow that b2's ejection ended while it was still down: each further ejection
        // took three failures more.
        assert_eq!(errors % 3, 0, "{counts:?}");
    }
    assert_eq!(counts.get("b2"), None, "{counts:?}");
    assert_eq!(counts.values().sum::<u64>() + errors, 600);
    // Back, and taken again once its 5 s are over.
    servers.push(node.start_server(
        "b2",
        &["tcp-server", "--listen", "[::]:8080", "--reply-name", "b2"],
    ));
    let left = ejected.first().and_then(|e| e["remaining_ms"].as_u64());
    std::thread::sleep(Duration::from_millis(left.unwrap_or(0) + 500));
    let counts = spray(&node, "10.96.0.10:80", 300);
    assert!(counts.get("b2").is_some_and(|n| *n > 30), "{counts:?}");
}

#[test]
fn an_affine_client_of_an_ejected_backend_moves_to_one_other() {
    let (node, _agent, mut servers) =
        setup_checking("outlier_affinity", Some(600), &checking(50, 0, "60s"));
    let counts = spray(&node, "10.96.0.10:80", 50);
    let first = counts.keys().next().expect("a backend").clone();
    assert_eq!(counts.len(), 1, "{counts:?}");
    stop_tcp_server(&mut servers, &first);
    let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 200);
    assert_eq!(errors, 3, "{counts:?}");
    assert_eq!(counts.len(), 1, "one other backend, kept: {counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 197);
    assert_eq!(counts.get(&first), None, "{counts:?}");
}

#[test]
fn no_more_than_max_ejection_percent_of_the_backends_is_ejected() {
    // One backend in three may go (34%): the second refusing backend stays in.
    {
        let (node, agent, mut servers) =
            setup_checking("outlier_max", None, &checking(34, 0, "60s"));
        stop_tcp_server(&mut servers, "b1");
        stop_tcp_server(&mut servers, "b2");
        let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 300);
        assert!(
            errors > 30,
            "the one not ejected keeps failing: {errors} {counts:?}"
        );
        assert_eq!(counts.keys().collect::<Vec<_>>(), ["b3"], "{counts:?}");
        assert_eq!(ejected(&agent).len(), 1);
    }
    // Two in three (67%): both go.
    let (node, agent, mut servers) = setup_checking("outlier_max2", None, &checking(67, 0, "60s"));
    stop_tcp_server(&mut servers, "b1");
    stop_tcp_server(&mut servers, "b2");
    let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 300);
    assert_eq!(errors, 6, "{counts:?}");
    assert_eq!(counts.get("b3"), Some(&294), "{counts:?}");
    assert_eq!(ejected(&agent).len(), 2);
}

/// Health checking configured by a DestinationRule (the agent has no default), here with a
/// panic threshold.
const PANICKING_RULE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 10s
      baseEjectionTime: 1m
      maxEjectionPercent: 100
      minHealthPercent: 50
";

#[test]
fn below_min_health_percent_ejections_are_ignored() {
    // Ejecting two of three leaves 33% healthy, under 50%: every backend takes connections
    // again (Envoy's panic mode).
    let (node, agent, mut servers) = setup_with("outlier_panic", None, &[], Some(PANICKING_RULE));
    stop_tcp_server(&mut servers, "b1");
    stop_tcp_server(&mut servers, "b2");
    let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 300);
    assert!(
        errors > 30,
        "b1 and b2 are tried again: {errors} {counts:?}"
    );
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b3"], "{counts:?}");
    assert_eq!(ejected(&agent).len(), 2, "both ejected, and both ignored");
}

/// Health checking and a 200 ms connect timeout, by a DestinationRule.
const TIMEOUT_RULE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 200ms, maxConnections: 100}
    outlierDetection:
      consecutiveGatewayErrors: 3
      baseEjectionTime: 1m
      maxEjectionPercent: 50
";

#[test]
fn a_black_holed_backend_times_out_at_the_connect_timeout_and_is_ejected() {
    let (node, agent, _servers) = setup_with("outlier_timeout", None, &[], Some(TIMEOUT_RULE));
    // Every backend answered once (the client knows their link addresses).
    assert_eq!(spray(&node, "10.96.0.10:80", 60).len(), 3);
    // b2's link goes down: its SYNs are lost without an answer.
    let b2 = node.pod("b2");
    weft_testkit::proc::run("ip", ["-n", b2.netns_name(), "link", "set", "eth0", "down"]);
    let spray = node.spray_listing_failures("client", "10.96.0.10:80", 100);
    assert_eq!(spray.errors, 3, "{spray:?}");
    for f in &spray.failures {
        assert_eq!(
            (f.call.as_str(), f.error.as_str()),
            ("connect", "ETIMEDOUT"),
            "{f:?}"
        );
        assert!((200..=400).contains(&f.ms), "{f:?}");
    }
    assert_eq!(spray.counts.get("b2"), None, "{spray:?}");
    assert_eq!(spray.counts.values().sum::<u64>(), 97);
    let ejected = ejected(&agent);
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert_eq!(ejected[0]["backend"], format!("{}:8080", b2.ipv4).as_str());
    // The client's flow records name the backend and why each failed.
    let timeouts = || -> Vec<Value> {
        let all = agent.flows(&["--last", "1000"]);
        all.into_iter()
            .filter(|r| r["outcome"] == "timeout")
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while timeouts().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let timeouts = timeouts();
    assert_eq!(timeouts.len(), 3, "{timeouts:?}");
    for r in &timeouts {
        assert_eq!(r["destination"]["pod"], "b2", "{r}");
        assert_eq!(r["service"], "default/web", "{r}");
    }
}

/// The TCP_USER_TIMEOUT a connect through `target` leaves on its established socket, the
/// client's own being `own`.
fn user_timeout_after_connect(node: &Node, target: &str, own: Option<u32>) -> u64 {
    user_timeout_after(node, None, target, own)
}

/// [`user_timeout_after_connect`], the socket having failed to connect to `first` before.
fn user_timeout_after(node: &Node, first: Option<&str>, target: &str, own: Option<u32>) -> u64 {
    let own = own.map(|ms| ms.to_string());
    let mut args = vec!["user-timeout", "--connect", target];
    if let Some(ms) = &own {
        args.extend(["--user-timeout-ms", ms.as_str()]);
    }
    if let Some(first) = first {
        args.extend(["--first", first]);
    }
    let mut p = node.spawn("client", &args);
    p.wait_success(WAIT);
    let v: Value = p.stdout().wait_for("user timeout", WAIT, |lines| {
        lines
            .iter()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    });
    v["ms"].as_u64().expect("ms")
}

#[test]
fn an_established_connection_keeps_its_own_user_timeout() {
    let (node, agent, _servers) = setup_with("connect_timeout_own", None, &[], Some(TIMEOUT_RULE));
    let (ok, services) = agent.client("services");
    assert!(ok, "{services}");
    let list = services.as_array().expect("list");
    let fe = frontend(list, "10.96.0.10:80/TCP").expect("frontend");
    assert_eq!(fe["connect_timeout_ms"], 200, "{fe}");
    // The connect timeout stands in for the socket's own only until establishment.
    assert_eq!(user_timeout_after_connect(&node, "10.96.0.10:80", None), 0);
    assert_eq!(
        user_timeout_after_connect(&node, "10.96.0.10:80", Some(5000)),
        5000
    );
    assert_eq!(
        user_timeout_after_connect(&node, "10.96.0.10:80", Some(100)),
        100
    );
    // A socket whose connect through a Service with a connect timeout was refused connects
    // again, elsewhere: its own timeout is back.
    node.write_source("closed.yaml", CLOSED);
    wait_backends(&agent, "10.96.0.11:81/TCP", 3);
    assert_eq!(
        user_timeout_after(&node, Some("10.96.0.11:81"), "10.96.0.10:80", None),
        0
    );
}

/// A Service on a port nothing serves, with a connect timeout.
const CLOSED: &str = "apiVersion: v1
kind: Service
metadata: {name: closed, namespace: default}
spec:
  clusterIP: 10.96.0.11
  clusterIPs: [10.96.0.11]
  selector: {app: web}
  ports: [{name: closed, port: 81, targetPort: 9, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: closed, namespace: default}
spec:
  host: closed
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 300ms}
";

#[test]
fn readiness_changes_during_an_ejection_keep_both_in_force() {
    let (node, agent, mut servers) =
        setup_checking("outlier_readiness", None, &checking(50, 0, "4s"));
    let started = std::time::Instant::now();
    stop_tcp_server(&mut servers, "b2");
    let (_, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 60);
    assert_eq!(errors, 3);
    // The ejection began after `started` and before `sprayed`.
    let sprayed = std::time::Instant::now();
    // b3 turns not ready while b2 is out: the new backend set keeps b2's ejection.
    node.write_source("pods.yaml", &pods(&node, &["b3"]));
    wait_backends(&agent, "10.96.0.10:80/TCP", 2);
    let (counts, errors) = node.spray_counting_errors("client", "10.96.0.10:80", 100);
    if started.elapsed() < Duration::from_secs(4) {
        assert_eq!(errors, 0, "{counts:?}");
        assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1"], "{counts:?}");
    }
    // b2 serves again and its ejection ends: it is used; b3 stays out (not ready).
    servers.push(node.start_server(
        "b2",
        &["tcp-server", "--listen", "[::]:8080", "--reply-name", "b2"],
    ));
    std::thread::sleep(
        Duration::from_secs(4).saturating_sub(sprayed.elapsed()) + Duration::from_millis(500),
    );
    let counts = spray(&node, "10.96.0.10:80", 200);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );
}
