//! `weft agent --source kubernetes` end to end: the agent's kube-rs reflectors read an
//! in-process fake API server (`weft_testkit::fakeapi`) speaking the real list/watch protocol,
//! and program a simulated node whose pod cgroups are where the kubelet puts them.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::{Value, json};
use weft_testkit::{
    Agent, AgentOptions, Node,
    fakeapi::FakeApi,
    k8s,
    netpol::{Model, Table, Via, np},
    prom,
};

const VIP: &str = "10.96.0.10";
/// Recovery after an outage waits for the watcher's backoff (up to 30 s between attempts).
const RECOVERY: Duration = Duration::from_secs(60);

/// Polls `weft status -o json` until `pred` holds, for up to `timeout`.
fn wait_status(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    agent.wait_output("status", what, timeout, pred)
}

fn readyz(agent: &Agent) -> (u16, String) {
    let r = prom::get(agent.metrics_addr(), "/readyz", None);
    (r.status, r.body)
}

fn healthz(agent: &Agent) -> u16 {
    prom::get(agent.metrics_addr(), "/healthz", None).status
}

fn degraded(status: &Value) -> bool {
    status["degraded"].as_array().is_some_and(|d| !d.is_empty())
}

fn healthy_and_ready(status: &Value) -> bool {
    status["services"]["ready"] == true && !degraded(status)
}

fn web_slice(node: &Node, ready: &[(&str, bool)]) -> Value {
    let endpoints: Vec<_> = ready.iter().map(|(p, r)| (node.pod(p), *r)).collect();
    k8s::endpoint_slice("web", "default", &endpoints, &[("http", 8080, "TCP")])
}

fn wait_backends(agent: &Agent, n: usize, timeout: Duration) {
    agent.wait_backends(&format!("{VIP}:80/TCP"), n, timeout);
}

/// `count` connections from the client pod to the ClusterIP: connections per backend.
fn spray(node: &Node, count: u64) -> BTreeMap<String, u64> {
    node.spray("client", &format!("{VIP}:80"), count)
}

/// A node with a client and two backends serving http, and an API server holding them, the
/// Service `web` and its EndpointSlice (b1 and b2 ready). Lists come in pages of two: the
/// three pods take a continue token.
struct Cluster {
    node: Node,
    api: FakeApi,
    _servers: Vec<weft_testkit::proc::Process>,
}

fn cluster(test: &str) -> Cluster {
    let node = Node::builder(test)
        .kubelet_cgroups()
        .pod("client")
        .pod("b1")
        .pod("b2")
        .build();
    let servers: Vec<_> = ["b1", "b2"]
        .iter()
        .map(|b| {
            node.start_server(
                b,
                &["tcp-server", "--listen", "[::]:8080", "--reply-name", b],
            )
        })
        .collect();
    let api = FakeApi::start();
    api.apply(json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    let objects = k8s::file(&[
        k8s::pod(
            node.pod("client"),
            "default",
            &[("app", "client")],
            &[],
            true,
        ),
        k8s::pod(
            node.pod("b1"),
            "default",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            true,
        ),
        k8s::pod(
            node.pod("b2"),
            "default",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            true,
        ),
        k8s::service(
            "web",
            "default",
            &[VIP],
            &[("app", "web")],
            &[("http", 80, "http", "TCP")],
            None,
        ),
    ]);
    k8s::apply_to_api(&api, &node, &objects);
    api.apply(web_slice(&node, &[("b1", true), ("b2", true)]));
    // Lists come in pages of two: the three pods take a continue token.
    api.set_page_cap(Some(2));

    Cluster {
        node,
        api,
        _servers: servers,
    }
}

/// The cluster with a ready agent balancing over both backends.
fn serving(test: &str) -> (Cluster, Agent) {
    let c = cluster(test);
    let agent = Agent::start_with(&c.node, AgentOptions::with_api(&c.api, &c.node, &[]));
    wait_status(&agent, "ready and healthy", RECOVERY, healthy_and_ready);
    wait_backends(&agent, 2, Duration::from_secs(10));
    (c, agent)
}

#[test]
fn not_ready_until_every_kind_is_listed_then_the_service_and_its_changes_apply() {
    let Cluster { node, api, .. } = &cluster("k8s_first_list");
    // NetworkPolicies cannot be listed at first: every other kind is, but the agent is not
    // ready and programs nothing from a store it could not complete.
    api.fail_kind("NetworkPolicy", Some(503));
    let agent = Agent::start_with(node, AgentOptions::with_api(api, node, &[]));
    agent.wait_metrics("failed NetworkPolicy lists counted", |m| {
        prom::sum(
            m,
            "weft_kubernetes_watch_errors_total",
            &[("resource", "NetworkPolicy"), ("reason", "list_failed")],
        ) >= 1.0
    });
    api.wait_requests(
        "every pod page and a retried NetworkPolicy list",
        Duration::from_secs(20),
        |a| a.requests("Pod", "watch") >= 1 && a.requests("NetworkPolicy", "list") >= 2,
    );
    assert!(
        api.requests("Pod", "list") >= 2,
        "the pods came in two pages"
    );
    let status = wait_status(
        &agent,
        "NetworkPolicy degraded",
        Duration::from_secs(10),
        degraded,
    );
    assert_eq!(
        status["services"]["ready"], false,
        "not ready before every kind is listed: {status:#}"
    );
    assert_eq!(
        status["degraded"].as_array().map(Vec::len),
        Some(1),
        "only NetworkPolicy: {status:#}"
    );
    assert!(
        status["services"]["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("kubernetes:http://127.0.0.1:")),
        "{status:#}"
    );
    assert_eq!(readyz(&agent), (503, "first sync not done".to_owned()));
    assert_eq!(healthz(&agent), 200, "alive while the API fails");
    let (_, services) = agent.client("services");
    assert_eq!(
        services.as_array().map(Vec::len),
        Some(0),
        "nothing programmed: {services:#}"
    );

    // The API server serves NetworkPolicies again: every kind is listed, the service is
    // programmed from its EndpointSlice.
    api.fail_kind("NetworkPolicy", None);
    wait_status(&agent, "ready and healthy", RECOVERY, healthy_and_ready);
    wait_backends(&agent, 2, Duration::from_secs(10));
    assert_eq!(readyz(&agent), (200, "ready".to_owned()));
    let counts = spray(node, 200);
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b1", "b2"],
        "{counts:?}"
    );

    // A watched change: b2 stops being ready.
    api.apply(web_slice(node, &[("b1", true), ("b2", false)]));
    wait_backends(&agent, 1, Duration::from_secs(10));
    assert_eq!(spray(node, 50).keys().collect::<Vec<_>>(), ["b1"]);
}

#[test]
fn dropped_streams_resume_without_a_relist() {
    let (c, agent) = serving("k8s_dropped_streams");
    let (node, api) = (&c.node, &c.api);
    // Dropped streams resume from their resourceVersion: no relist, the change arrives.
    let slice_lists = api.requests("EndpointSlice", "list");
    api.drop_streams();
    api.apply(web_slice(node, &[("b1", true), ("b2", true)]));
    wait_backends(&agent, 2, RECOVERY);
    assert_eq!(
        api.requests("EndpointSlice", "list"),
        slice_lists,
        "a dropped watch resumes without a relist"
    );
}

#[test]
fn http_errors_degrade_and_the_change_made_meanwhile_arrives() {
    let (c, agent) = serving("k8s_http_errors");
    let (node, api) = (&c.node, &c.api);
    // HTTP 500 on every request: degraded; the change made meanwhile arrives once the
    // server answers again, and health recovers.
    api.fail_with(Some(500));
    wait_status(
        &agent,
        "degraded by HTTP 500",
        Duration::from_secs(20),
        degraded,
    );
    api.apply(web_slice(node, &[("b1", false), ("b2", true)]));
    assert_eq!(spray(node, 50).len(), 2, "the last state keeps serving");
    api.fail_with(None);
    wait_backends(&agent, 1, RECOVERY);
    wait_status(
        &agent,
        "healthy after the errors",
        RECOVERY,
        healthy_and_ready,
    );
    api.apply(web_slice(node, &[("b1", true), ("b2", true)]));
    wait_backends(&agent, 2, Duration::from_secs(10));
}

#[test]
fn an_outage_keeps_the_last_state_and_a_compaction_relists() {
    let (c, agent) = serving("k8s_outage");
    let (node, api) = (&c.node, &c.api);
    let slice_lists = api.requests("EndpointSlice", "list");
    // Outage: the API server is unreachable. Health says degraded, the service keeps its
    // backends (fail-static).
    api.set_down(true);
    let status = wait_status(&agent, "degraded", Duration::from_secs(20), degraded);
    assert_eq!(status["healthy"], false);
    let (code, body) = readyz(&agent);
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("degraded: "), "{body}");
    assert_eq!(healthz(&agent), 200, "alive during the outage");
    let up = prom::sum(&agent.metrics(), "weft_kubernetes_watch_up", &[]);
    assert!(up < 5.0, "some kind is down: {up}");
    let counts = spray(node, 100);
    assert_eq!(
        counts.len(),
        2,
        "both backends keep serving during the outage: {counts:?}"
    );

    // While it is away, b1 goes and the server compacts past every version the agent has:
    // the resumed watch gets 410 Gone and relists.
    api.apply(web_slice(node, &[("b2", true)]));
    api.compact();
    api.set_down(false);
    wait_backends(&agent, 1, RECOVERY);
    wait_status(&agent, "healthy again", RECOVERY, healthy_and_ready);
    assert!(
        api.requests("EndpointSlice", "list") > slice_lists,
        "410 Gone made it relist"
    );
    assert!(
        prom::sum(
            &agent.metrics(),
            "weft_kubernetes_watch_errors_total",
            &[("resource", "EndpointSlice"), ("reason", "expired")]
        ) >= 1.0,
        "the 410 is counted"
    );
    assert_eq!(spray(node, 50).keys().collect::<Vec<_>>(), ["b2"]);
    assert_eq!(
        prom::sum(&agent.metrics(), "weft_kubernetes_watch_up", &[]),
        5.0
    );
}

#[test]
fn a_watch_refused_with_http_410_starts_over() {
    let (c, agent) = serving("k8s_http_410");
    let (node, api) = (&c.node, &c.api);
    api.apply(web_slice(node, &[("b1", true)]));
    wait_backends(&agent, 1, Duration::from_secs(10));
    // A server (or proxy) that refuses a resumed watch with HTTP 410 rather than an ERROR
    // event: the agent starts its watcher over instead of retrying that version forever.
    api.set_gone_as_http(true);
    let slice_lists = api.requests("EndpointSlice", "list");
    api.set_down(true);
    wait_status(&agent, "degraded again", Duration::from_secs(20), degraded);
    api.apply(web_slice(node, &[("b1", true), ("b2", true)]));
    api.compact();
    api.set_down(false);
    wait_backends(&agent, 2, RECOVERY);
    assert!(
        api.requests("EndpointSlice", "list") > slice_lists,
        "HTTP 410 made it relist"
    );
    wait_status(
        &agent,
        "healthy after HTTP 410",
        RECOVERY,
        healthy_and_ready,
    );
}

#[test]
fn a_deleted_service_loses_its_frontend() {
    let (c, agent) = serving("k8s_deleted_service");
    let api = &c.api;
    // A watched deletion: the Service goes, and with it its frontend.
    assert!(api.delete("Service", "default", "web"));
    agent.wait_services("the deleted Service's frontend gone", |list| {
        !list
            .iter()
            .any(|s| s["frontend"] == format!("{VIP}:80/TCP").as_str())
    });
}

#[test]
fn policy_from_the_api_server_holds_through_an_outage_and_an_agent_restart() {
    let api = Arc::new(FakeApi::start());
    let model = Model::with_api("k8s_policy", Arc::clone(&api));
    let mut agent = Agent::start_with(
        model.node(),
        AgentOptions::with_api(&api, model.node(), &["--node-ip", "10.0.0.1"]),
    );
    // Every pod is local and found where the kubelet puts it, by UID.
    let v = agent.wait_policies("all nine pods with their cgroups", |v| {
        v["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 9 && e.iter().all(|e| e["cgroup_id"].is_u64()))
    });
    let xa = v["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["pod"] == "x/a"))
        .unwrap_or_else(|| panic!("x/a: {v:#}"));
    let uid = model.node().pod("x-a").uid.replace('-', "_");
    assert_eq!(
        xa["cgroup"],
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"),
        "{xa:#}"
    );

    // x is closed to ingress except from namespace y.
    let deny = np(
        "x",
        "deny-ingress",
        "podSelector: {}\npolicyTypes: [Ingress]",
    );
    let allow_y = np(
        "x",
        "allow-y",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: \"y\"}",
    );
    model.publish("policies.yaml", &[deny.clone(), allow_y]);
    agent.wait_policies_in_force(&["x/allow-y", "x/deny-ingress"], Duration::from_secs(20));
    let mut only_y = Table::all(true);
    for to in ["x/a", "x/b", "x/c"] {
        only_y.deny_to(to);
        for from in ["y/a", "y/b", "y/c"] {
            only_y.set(from, to, true);
        }
    }
    model.expect_both("x open to y only", 80, "tcp", &only_y);

    // Outage: enforcement continues, health is degraded.
    api.set_down(true);
    wait_status(&agent, "degraded", Duration::from_secs(20), degraded);
    model.expect("during the outage", 80, "tcp", Via::PodIp, &only_y);

    // The agent restarts while the API server is still away: it cannot list, so it stays
    // unready and leaves the kernel as it is; enforcement continues.
    agent.kill();
    agent.restart();
    model.expect(
        "restarted agent during the outage",
        80,
        "tcp",
        Via::PodIp,
        &only_y,
    );
    let (_, status) = agent.client("status");
    assert_eq!(status["services"]["ready"], false, "{status:#}");
    assert_eq!(readyz(&agent).0, 503);

    // Meanwhile allow-y is deleted; once the API server is back, x is closed to all.
    assert!(api.delete("NetworkPolicy", "x", "allow-y"));
    api.set_down(false);
    wait_status(&agent, "ready and healthy", RECOVERY, healthy_and_ready);
    agent.wait_policies_in_force(&["x/deny-ingress"], Duration::from_secs(20));
    let mut closed = Table::all(true);
    for to in ["x/a", "x/b", "x/c"] {
        closed.deny_to(to);
    }
    model.expect_both("x closed after the outage", 80, "tcp", &closed);
}

#[test]
fn a_destination_rule_from_the_api_server_configures_health_checking_once_served() {
    let c = cluster("k8s_destination_rule");
    let agent = Agent::start_with(
        &c.node,
        AgentOptions::with_api(&c.api, &c.node, &["--crd-discovery-interval", "1s"]),
    );
    wait_status(&agent, "ready and healthy", RECOVERY, healthy_and_ready);
    wait_backends(&agent, 2, Duration::from_secs(10));
    let checking = |list: &[Value]| {
        list.iter()
            .find(|s| s["frontend"] == format!("{VIP}:80/TCP").as_str())
            .map(|s| {
                (
                    s["outlier_consecutive"].clone(),
                    s["connect_timeout_ms"].clone(),
                )
            })
    };
    let (_, services) = agent.client("services");
    assert_eq!(
        checking(services.as_array().expect("list")),
        Some((json!(0), json!(0)))
    );
    // The CRDs are installed, then a rule is created: discovery finds the kind, its
    // reflector lists it, and the kernel applies it.
    c.api.serve_security_api();
    c.api.apply(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"host": "web.default.svc.cluster.local", "trafficPolicy": {
            "connectionPool": {"tcp": {"connectTimeout": "2s"}},
            "outlierDetection": {"consecutive5xxErrors": 4, "baseEjectionTime": "10s"},
        }},
    }));
    agent.wait_services("the rule applied", |list| {
        checking(list) == Some((json!(4), json!(2000)))
    });
}

#[test]
fn destination_rules_the_agent_may_not_list_leave_the_services_served_and_say_so() {
    let c = cluster("k8s_rules_forbidden");
    c.api.serve_security_api();
    c.api.fail_kind("DestinationRule", Some(403));
    let agent = Agent::start_with(&c.node, AgentOptions::with_api(&c.api, &c.node, &[]));
    let status = wait_status(&agent, "ready, degraded", RECOVERY, |s| {
        s["services"]["ready"] == true && degraded(s)
    });
    let reasons = status["degraded"].to_string();
    assert!(reasons.contains("DestinationRule"), "{reasons}");
    // Said on /readyz too, as any kind the API refuses; the Services are served meanwhile.
    assert_eq!(readyz(&agent).0, 503);
    wait_backends(&agent, 2, Duration::from_secs(10));
    assert_eq!(spray(&c.node, 20).values().sum::<u64>(), 20);
}
