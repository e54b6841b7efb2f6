//! Two simulated nodes in one cluster (see `weft_testkit::cluster`): each with its own pod
//! subnet and agent, both agents reading one standalone source. A pod's peers on the other
//! node are known to its agent from the source alone.
use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use weft_testkit::{
    Agent, AgentOptions, Cluster,
    fakeapi::FakeApi,
    k8s,
    netpol::{Model, Table, Via, np, object_name},
    proc::Process,
    prom,
    prometheus::{Prometheus, dashboard_exprs, deploy_rules, substitute},
};

const WAIT: Duration = Duration::from_secs(20);
/// All three backends (b1 on node a; b2, b3 on node b).
const WEB: &str = "10.96.0.10";
/// The backends of node b only.
const FAR: &str = "10.96.0.11";
/// No backends.
const EMPTY: &str = "10.96.0.12";
/// All three backends, with ClientIP affinity.
const STICKY: &str = "10.96.0.13";

/// An agent on every node, reading the cluster's source.
fn agents(c: &Cluster, nodes: &[&str]) -> Vec<Agent> {
    nodes
        .iter()
        .map(|n| {
            Agent::start_with(
                c.node(n),
                AgentOptions {
                    source: true,
                    source_dir: Some(c.source_dir()),
                    extra_args: vec!["--node-name".into(), (*n).to_owned()],
                    ..AgentOptions::default()
                },
            )
        })
        .collect()
}

/// Clients on both nodes and three backends over them, the `web`, `far`, `empty` and
/// `sticky` Services, and a TCP server naming its pod in every backend.
fn services_cluster(test: &str) -> (Cluster, Vec<Process>) {
    let c = Cluster::builder(test)
        .node("a", &["client", "b1"])
        .node("b", &["client2", "b2", "b3"])
        .build();
    c.write_source("cluster.yaml", &services_docs(&c, &[]));
    let servers = ["b1", "b2", "b3"]
        .iter()
        .map(|b| {
            c.pod(b).0.start_server(
                b,
                &["tcp-server", "--listen", "[::]:8080", "--reply-name", b],
            )
        })
        .collect();
    (c, servers)
}

/// The objects of [`services_cluster`], the backends in `not_ready` marked Ready=False.
fn services_docs(c: &Cluster, not_ready: &[&str]) -> String {
    let mut docs = app_pods(c, &[("client", "client"), ("client2", "client")]);
    for (b, tier) in [("b1", "near"), ("b2", "far"), ("b3", "far")] {
        docs.push(k8s::pod(
            c.pod(b).1,
            "default",
            &[("app", "web"), ("tier", tier)],
            &[("http", 8080, "TCP")],
            !not_ready.contains(&b),
        ));
    }
    let http: [k8s::Port<'_>; 1] = [("http", 80, "http", "TCP")];
    for (name, vip, selector, affinity) in [
        ("web", WEB, ("app", "web"), None),
        ("far", FAR, ("tier", "far"), None),
        ("empty", EMPTY, ("app", "nobody"), None),
        ("sticky", STICKY, ("app", "web"), Some(600)),
    ] {
        docs.push(k8s::service(
            name,
            "default",
            &[vip],
            &[selector],
            &http,
            affinity,
        ));
    }
    k8s::file(&docs)
}

/// Connections per backend name from `count` connections of `client` to `target`.
fn spray(c: &Cluster, client: &str, target: &str, count: u64) -> BTreeMap<String, u64> {
    c.pod(client).0.spray(client, target, count)
}

#[test]
fn a_clusterip_reaches_backends_on_the_other_node_and_on_both() {
    let (c, _servers) = services_cluster("cl_svc");
    let agents = agents(&c, &["a", "b"]);
    for agent in &agents {
        agent.wait_backends(&format!("{WEB}:80/TCP"), 3, WAIT);
        agent.wait_backends(&format!("{FAR}:80/TCP"), 2, WAIT);
    }
    for client in ["client", "client2"] {
        let all = spray(&c, client, &format!("{WEB}:80"), 600);
        assert_eq!(all.values().sum::<u64>(), 600, "{client}: {all:?}");
        for b in ["b1", "b2", "b3"] {
            assert!(all.get(b).copied().unwrap_or(0) > 100, "{client}: {all:?}");
        }
        let far = spray(&c, client, &format!("{FAR}:80"), 200);
        assert_eq!(
            far.keys().map(String::as_str).collect::<Vec<_>>(),
            ["b2", "b3"],
            "{client}: {far:?}"
        );
        assert_eq!(far.values().sum::<u64>(), 200, "{client}: {far:?}");
        // No endpoints anywhere: refused inside connect() on either node.
        let (node, _) = c.pod(client);
        let mut p = node.spawn(
            client,
            &["connect-probe", "--connect", &format!("{EMPTY}:80")],
        );
        p.wait_success(WAIT);
        let v: Value = p.stdout().wait_for("probe", WAIT, |l| {
            l.iter().find_map(|l| serde_json::from_str::<Value>(l).ok())
        });
        assert_eq!(v["immediate"], "ECONNREFUSED", "{client}: {v}");
    }
}

/// ClientIP affinity holds for clients on both nodes over backends on both; a backend that
/// turns not ready leaves the Service on both nodes.
#[test]
fn affinity_and_readiness_changes_apply_on_both_nodes() {
    let (c, _servers) = services_cluster("cl_aff");
    let agents = agents(&c, &["a", "b"]);
    for agent in &agents {
        agent.wait_backends(&format!("{STICKY}:80/TCP"), 3, WAIT);
    }
    for client in ["client", "client2"] {
        let sticky = spray(&c, client, &format!("{STICKY}:80"), 60);
        assert_eq!(sticky.len(), 1, "{client} keeps one backend: {sticky:?}");
        assert_eq!(sticky.values().sum::<u64>(), 60, "{client}: {sticky:?}");
    }
    // b2 (node b) turns not ready: both nodes stop choosing it.
    c.write_source("cluster.yaml", &services_docs(&c, &["b2"]));
    for agent in &agents {
        agent.wait_backends(&format!("{WEB}:80/TCP"), 2, WAIT);
    }
    for client in ["client", "client2"] {
        let all = spray(&c, client, &format!("{WEB}:80"), 300);
        assert_eq!(
            all.keys().map(String::as_str).collect::<Vec<_>>(),
            ["b1", "b3"],
            "{client}: {all:?}"
        );
    }
}

/// A connection from node a's client to node b's server through a ClusterIP: node a's agent
/// reports it as the source, node b's as the destination; both name both workloads and the
/// Service, with exact bytes.
#[test]
fn both_agents_report_a_cross_node_connection_with_both_names_and_exact_bytes() {
    let c = Cluster::builder("cl_tel")
        .node("a", &["client"])
        .node("b", &["server"])
        .build();
    let docs = [
        k8s::pod(c.pod("client").1, "default", &[("app", "shop")], &[], true),
        k8s::pod(
            c.pod("server").1,
            "default",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            true,
        ),
        web_service("8080"),
    ];
    c.write_source("cluster.yaml", &k8s::file(&docs));
    let agents = agents(&c, &["a", "b"]);
    for agent in &agents {
        agent.wait_backends(&format!("{WEB}:80/TCP"), 1, WAIT);
    }
    let (n, m) = (123_457_u64, 65_432_u64);
    let _server = c.node("b").start_server(
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
    let mut client = c.node("a").spawn(
        "client",
        &[
            "tcp-client",
            "--connect",
            &format!("{WEB}:80"),
            "--send",
            &n.to_string(),
            "--expect",
            &m.to_string(),
        ],
    );
    client.wait_success(WAIT);
    let labels = |reporter: &'static str| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_app", "shop"),
            ("destination_workload", "server"),
            ("destination_app", "web"),
            ("destination_service_name", "web"),
        ]
    };
    for (agent, reporter) in agents.iter().zip(["source", "destination"]) {
        let l = labels(reporter);
        let m_ = agent.wait_metrics(&format!("the {reporter} reporter's close"), |s| {
            prom::sum(s, "weft_tcp_connections_closed_total", &l) == 1.0
        });
        // Istio's view: the destination received the request and sent the response.
        assert_eq!(
            prom::sum(&m_, "weft_tcp_received_bytes_total", &l),
            n as f64,
            "{reporter}"
        );
        assert_eq!(
            prom::sum(&m_, "weft_tcp_sent_bytes_total", &l),
            m as f64,
            "{reporter}"
        );
        // Each agent reports only its own end.
        let other = labels(if reporter == "source" {
            "destination"
        } else {
            "source"
        });
        assert_eq!(
            prom::sum(&m_, "weft_tcp_connections_opened_total", &other),
            0.0,
            "{reporter}"
        );
        // `weft flows` on each node: its own end's close, both pods named, exact bytes.
        let closes: Vec<Value> = agent
            .flows(&["--last", "100"])
            .into_iter()
            .filter(|r| r["event"] == "tcp_close")
            .collect();
        assert_eq!(closes.len(), 1, "{reporter}: {closes:#?}");
        let r = &closes[0];
        assert_eq!(
            (
                r["reporter"].as_str(),
                r["source"]["pod"].as_str(),
                r["destination"]["pod"].as_str(),
                r["service"].as_str(),
                r["bytes_to_destination"].as_u64(),
                r["bytes_to_source"].as_u64(),
            ),
            (
                Some(reporter),
                Some("client"),
                Some("server"),
                Some("default/web"),
                Some(n),
                Some(m)
            ),
            "{r}"
        );
    }
}

/// The upstream policy model over both nodes, an agent on each (its `--node-ip` its bridge
/// address), each holding its own pods' policy in its kernel.
fn policy_model(test: &str) -> (Model, Vec<Agent>) {
    policy_model_with(test, &[])
}

/// [`policy_model`] with more agent arguments.
fn policy_model_with(test: &str, extra: &[String]) -> (Model, Vec<Agent>) {
    let model = Model::over_two_nodes(test);
    let agents: Vec<Agent> = ["a", "b"]
        .iter()
        .map(|n| {
            let node = model.cluster().node(n);
            let mut extra_args = vec![
                "--node-ip".into(),
                format!("10.0.{}.1", node.subnet()),
                "--node-name".into(),
                (*n).to_owned(),
            ];
            extra_args.extend_from_slice(extra);
            Agent::start_with(
                node,
                AgentOptions {
                    source: true,
                    source_dir: Some(model.cluster().source_dir()),
                    extra_args,
                    ..AgentOptions::default()
                },
            )
        })
        .collect();
    for (agent, local) in agents.iter().zip([5, 4]) {
        agent.wait_policies("the node's own pods", |v| {
            v["endpoints"].as_array().is_some_and(|e| e.len() == local)
        });
    }
    (model, agents)
}

/// Replaces the policies and waits until both agents enforce exactly these (by name) with
/// their pods' sets in the kernel.
fn apply(model: &Model, agents: &[Agent], docs: &[String]) {
    model.write_source("policies.yaml", &docs.join("---\n"));
    let want: Vec<String> = docs.iter().map(|d| object_name(d)).collect();
    for agent in agents {
        agent.wait_policies_in_force(&want, Duration::from_secs(10));
    }
}

/// Each node judges its own pods' ingress and egress; the identities of the other node's
/// pods come from the source alone. Truth tables through pod IPs and ClusterIPs, TCP and
/// UDP, as on one node.
#[test]
fn policy_truth_tables_hold_across_nodes() {
    let (model, agents) = policy_model("cl_pol");
    truth_tables(&model, &agents);
    policy_check_on_both_nodes(&model, &agents);
}

/// The same truth tables with every namespace in the mesh: TCP between the nodes goes through
/// the agents' tunnels (and is seen to), and NetworkPolicy means exactly what it means
/// without them, judged on the real peers at both ends.
#[test]
fn policy_truth_tables_hold_with_every_namespace_meshed() {
    let ca = weft_testkit::agent::init_mesh_ca(
        &std::env::temp_dir().join(format!("weft-cl-mesh-ca-{}", std::process::id())),
    );
    let extra = ["--mesh-ca".to_owned(), ca.path().display().to_string()];
    let (mut model, agents) = policy_model_with("cl_meshpol", &extra);
    for ns in ["x", "y", "z"] {
        model.set_namespace_labels(ns, &[("ns", ns), ("weft.io/mesh", "enabled")]);
    }
    for (agent, local) in agents.iter().zip([5, 4]) {
        agent.wait_output("certs", "every local pod meshed", WAIT, |v| {
            v["pods"].as_array().is_some_and(|p| {
                p.len() == local
                    && p.iter()
                        .all(|p| p["listeners"].as_array().is_some_and(|l| !l.is_empty()))
            })
        });
    }
    truth_tables(&model, &agents);
    for agent in &agents {
        let streams = agent
            .metrics()
            .iter()
            .filter(|s| s.name == "weft_mesh_streams_total")
            .map(|s| s.value)
            .sum::<f64>();
        assert!(streams > 0.0, "TCP between the nodes went through tunnels");
    }
}

/// The policies of the two-node truth tables, and the tables they must produce.
fn truth_tables(model: &Model, agents: &[Agent]) {
    model.expect_both("no policies", 80, "tcp", &Table::all(true));
    apply(
        model,
        agents,
        &[
            // x/a (node a) admits only x/b (node b).
            np(
                "x",
                "allow-b",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
            ),
            // y/c (node b) reaches only namespace z (both nodes).
            np(
                "y",
                "egress-to-z",
                "podSelector:\n  matchLabels: {pod: c}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: \"z\"}",
            ),
            // Nothing reaches z/b (node b) on port 81, from anywhere.
            np(
                "z",
                "b-80-only",
                "podSelector:\n  matchLabels: {pod: b}\ningress:\n- ports:\n  - {port: 80, protocol: TCP}\n  - {port: 80, protocol: UDP}",
            ),
        ],
    );
    let mut t = Table::all(true);
    t.deny_to("x/a").set("x/b", "x/a", true);
    t.deny_from("y/c");
    for to in ["z/a", "z/b", "z/c"] {
        t.set("y/c", to, true);
    }
    model.expect_both("policies over two nodes", 80, "tcp", &t);
    model.expect_both("policies over two nodes (UDP)", 80, "udp", &t);
    let mut t81 = t.clone();
    t81.deny_to("z/b");
    model.expect_both("z/b admits only port 80", 81, "tcp", &t81);
}

/// `weft policy check` answers both sides on either node, each side naming the node that
/// judges it: its own pod's side from its kernel, the other node's pod's side computed from
/// the same objects. The policies are those of [`policy_truth_tables_hold_across_nodes`].
fn policy_check_on_both_nodes(model: &Model, agents: &[Agent]) {
    // (from, to, port, egress allowed, ingress allowed, the ingress rule that allowed it)
    let cases = [
        (
            "x/b",
            "x/a",
            "80/TCP",
            true,
            true,
            Some("x/allow-b ingress[0]"),
        ),
        ("y/c", "x/a", "80/TCP", false, false, None),
        ("x/c", "z/b", "81/TCP", true, false, None),
        (
            "y/c",
            "z/b",
            "80/TCP",
            true,
            true,
            Some("z/b-80-only ingress[0]"),
        ),
    ];
    for (agent, here) in agents.iter().zip(["a", "b"]) {
        for (from, to, port, egress, ingress, rule) in cases {
            let (exit_ok, v) = agent.client_args(&[
                "policy", "check", "--from", from, "--to", to, "--port", port,
            ]);
            let what = format!("on node {here}, {from} -> {to} {port}: {v:#}");
            assert_eq!(exit_ok, egress && ingress, "{what}");
            assert_eq!(v["allowed"], egress && ingress, "{what}");
            assert_eq!(v["egress"]["allowed"], egress, "{what}");
            assert_eq!(v["ingress"]["allowed"], ingress, "{what}");
            assert_eq!(v["ingress"]["rule"].as_str(), rule, "{what}");
            for (side, pod) in [("egress", from), ("ingress", to)] {
                let node = model.host(pod).name().expect("a cluster node");
                assert_eq!(v[side]["node"], node, "{what}");
                let by = if node == here { "kernel" } else { "computed" };
                assert_eq!(v[side]["judged_by"], by, "{what}");
            }
            if !egress {
                assert!(
                    v["egress"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("y/egress-to-z")),
                    "names the isolating policy: {what}"
                );
            }
        }
    }
}

/// A label change of a pod on node b changes node a's egress verdicts for new connections.
#[test]
fn a_label_change_on_one_node_changes_verdicts_on_the_other() {
    let (mut model, agents) = policy_model("cl_lbl");
    apply(
        &model,
        &agents,
        &[np(
            "x",
            "egress-to-db",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector: {}\n    podSelector:\n      matchLabels: {role: db}",
        )],
    );
    let mut t = Table::all(true);
    t.deny_from("x/a");
    model.expect("x/a reaches no db yet", 80, "tcp", Via::PodIp, &t);
    // y/a runs on node b; x/a on node a.
    assert_ne!(
        model.host("y/a").subnet(),
        model.host("x/a").subnet(),
        "the model puts them on two nodes"
    );
    model.set_pod_labels("y/a", &[("pod", "a"), ("role", "db")]);
    t.set("x/a", "y/a", true);
    model.expect("x/a reaches y/a once it is a db", 80, "tcp", Via::PodIp, &t);
}

/// The cluster's objects of [`an_address_moving_to_the_other_node_never_keeps_its_old_identity`]
/// at one stage: `db`'s document if the API still has it, `api` if it exists, and a policy
/// selecting nobody named after the stage, to know when an agent has read it.
fn moving_docs(c: &Cluster, db: Option<&str>, api: bool, stage: &str) -> String {
    let mut docs = app_pods(
        c,
        &[
            ("client", "client"),
            ("client-b", "web-client"),
            ("peer", "peer"),
            ("open", "open"),
        ],
    );
    docs.extend(db.map(str::to_owned));
    if api {
        docs.extend(app_pods(c, &[("api", "web")]));
    }
    for (name, spec) in [
        (
            "client-to-db",
            "podSelector:\n  matchLabels: {app: client}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector:\n      matchLabels: {app: db}",
        ),
        (
            "webclient-to-web",
            "podSelector:\n  matchLabels: {app: web-client}\npolicyTypes: [Egress]\negress:\n- to:\n  - podSelector:\n      matchLabels: {app: web}",
        ),
        (
            "peer-from-db",
            "podSelector:\n  matchLabels: {app: peer}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: db}",
        ),
        (
            "web-from-webclients",
            "podSelector:\n  matchLabels: {app: web}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: web-client}",
        ),
        (stage, "podSelector:\n  matchLabels: {app: nobody}"),
    ] {
        docs.push(np("default", name, spec));
    }
    k8s::file(&docs)
}

/// Writes a stage of [`moving_docs`] and waits until both agents enforce it.
fn moving_stage(c: &Cluster, agents: &[Agent], db: Option<&str>, api: bool, stage: &str) {
    c.write_source("cluster.yaml", &moving_docs(c, db, api, stage));
    let want = [
        "default/client-to-db".to_owned(),
        "default/webclient-to-web".to_owned(),
        "default/peer-from-db".to_owned(),
        "default/web-from-webclients".to_owned(),
        format!("default/{stage}"),
    ];
    for agent in agents {
        // `db`'s cgroup is gone with it while its object lingers.
        agent.wait_policies_matching(&want, WAIT, |e| {
            e["in_kernel"] == true || e["cgroup_id"].is_null()
        });
    }
}

/// `db` (node b) is deleted and its address handed to the new pod `api` (`app: web`, named
/// to sort before `db`) on node a. Neither
/// node ever judges that address as `db` again once it has read the change, whether the
/// new pod arrives before the old one's deletion (both claim it: it matches no selector),
/// while the old one terminates, or after it is gone: not node a's egress (`client` may
/// reach only `db`), not node b's egress (`client-b` may reach only `web`) nor node b's
/// ingress (`peer` admits only `db`). While contested, the address is not even `api`'s way
/// to reach itself (`api` admits only `web-client`s).
#[test]
fn an_address_moving_to_the_other_node_never_keeps_its_old_identity() {
    let mut c = Cluster::builder("cl_mv")
        .node("a", &["client"])
        .node("b", &["db", "client-b", "peer", "open"])
        .build();
    let db = k8s::pod(c.pod("db").1, "default", &[("app", "db")], &[], true);
    moving_stage(&c, &[], Some(&db), false, "stage-start");
    let serve = |c: &Cluster, pod: &str| {
        c.pod(pod)
            .0
            .start_server(pod, &["serve", "--name", pod, "--tcp", "8080"])
    };
    let mut servers: Vec<Process> = ["db", "peer", "open"]
        .iter()
        .map(|p| serve(&c, p))
        .collect();
    let agents = agents(&c, &["a", "b"]);
    moving_stage(&c, &agents, Some(&db), false, "stage-start");
    assert_eq!(probe(&c, "client", "db"), "db");
    assert!(probe(&c, "client-b", "db").starts_with("error"));
    assert_eq!(probe(&c, "db", "peer"), "peer");

    drop(servers.remove(0));
    c.move_pod("db", "a", "api");
    servers.push(serve(&c, "api"));
    // The new pod before the old one's deletion: both claim the address.
    moving_stage(&c, &agents, Some(&db), true, "stage-both");
    for agent in &agents {
        let v = agent.wait_policies("the contested address reported", |v| {
            v["problems"].as_array().is_some_and(|p| {
                p.iter()
                    .filter(|p| p.as_str().is_some_and(|p| p.contains("also claimed by")))
                    .count()
                    == 4
            })
        });
        assert_eq!(
            prom::sum(&agent.metrics(), "weft_policy_contested_addresses", &[]),
            2.0,
            "IPv4 and IPv6: {v}"
        );
        let (_, status) = agent.client("status");
        let claim = format!("{} (default/api, default/db)", c.pod("api").1.ipv4);
        assert!(
            status["degraded"].as_array().is_some_and(|d| d
                .iter()
                .any(|d| d.as_str().is_some_and(|d| d.contains(&claim)))),
            "{status:#}"
        );
    }
    let judged_as_nobody = |c: &Cluster| {
        assert!(probe(c, "client", "api").starts_with("error"), "as db by a");
        assert!(
            probe(c, "client-b", "api").starts_with("error"),
            "as web by b"
        );
        assert!(probe(c, "api", "peer").starts_with("error"), "as db by b");
        assert_eq!(probe(c, "api", "open"), "open", "the address is routed");
        assert!(
            probe(c, "api", "api").starts_with("error"),
            "api's ingress: an address db claims too is not api reaching itself"
        );
    };
    judged_as_nobody(&c);
    let judged_as_web = |c: &Cluster| {
        assert!(probe(c, "client", "api").starts_with("error"), "as db by a");
        assert_eq!(probe(c, "client-b", "api"), "api", "as web by b");
        assert!(probe(c, "api", "peer").starts_with("error"), "as db by b");
        assert_eq!(probe(c, "api", "api"), "api", "api reaching itself");
    };
    // The old pod being deleted, then gone.
    let deleting = db.replacen(
        "metadata:\n",
        "metadata:\n  deletionTimestamp: \"2026-12-03T10:00:00Z\"\n",
        1,
    );
    moving_stage(&c, &agents, Some(&deleting), true, "stage-deleting");
    judged_as_web(&c);
    moving_stage(&c, &agents, None, true, "stage-deleted");
    judged_as_web(&c);
    for agent in &agents {
        assert_eq!(
            prom::sum(&agent.metrics(), "weft_policy_contested_addresses", &[]),
            0.0
        );
        let (_, status) = agent.client("status");
        assert_eq!(status["degraded"], serde_json::json!([]), "{status:#}");
    }
}

/// The `web` Service on [`WEB`] port 80 to `target` of the pods labelled `app: web`.
fn web_service(target: &str) -> String {
    k8s::service(
        "web",
        "default",
        &[WEB],
        &[("app", "web")],
        &[("http", 80, target, "TCP")],
        None,
    )
}

/// Ready pods of `default`, each labelled `app` = its given value.
fn app_pods(c: &Cluster, pods: &[(&str, &str)]) -> Vec<String> {
    pods.iter()
        .map(|(p, app)| k8s::pod(c.pod(p).1, "default", &[("app", app)], &[], true))
        .collect()
}

/// What `pod` gets probing TCP port 8080 of `target` (its name, or an error).
fn probe(c: &Cluster, pod: &str, target: &str) -> String {
    let to = format!("tcp:{}:8080", c.pod(target).1.ipv4);
    let mut p = c
        .pod(pod)
        .0
        .spawn(pod, &["probe", "--timeout-ms", "1000", &to]);
    p.probe_results()[&to]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Node b's agent is killed (SIGKILL), restarted, stopped (SIGTERM) and restarted while
/// allowed connections cross both ways: none fails, and node b keeps refusing a pod of node
/// a that its policy does not admit, with no agent running and while one starts.
#[test]
fn restarting_one_nodes_agent_fails_no_crossing_connection_and_opens_no_gap() {
    let c = Cluster::builder("cl_rst")
        .node("a", &["client", "srv-a", "intruder"])
        .node("b", &["client-b", "srv-b"])
        .build();
    let mut docs = app_pods(
        &c,
        &[
            ("client", "client"),
            ("client-b", "client"),
            ("intruder", "other"),
            ("srv-a", "srv"),
            ("srv-b", "srv"),
        ],
    );
    docs.push(np(
        "default",
        "srv-from-clients",
        "podSelector:\n  matchLabels: {app: srv}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: client}",
    ));
    c.write_source("cluster.yaml", &k8s::file(&docs));
    let _servers: Vec<Process> = ["srv-a", "srv-b"]
        .iter()
        .map(|s| {
            c.pod(s)
                .0
                .start_server(s, &["serve", "--name", s, "--tcp", "8080"])
        })
        .collect();
    let mut agents = agents(&c, &["a", "b"]);
    for agent in &agents {
        agent.wait_policies("the policy in force", |v| {
            v["endpoints"].as_array().is_some_and(|e| {
                e.iter()
                    .any(|e| e["ingress_isolated"] == true && e["in_kernel"] == true)
            })
        });
    }
    assert_eq!(probe(&c, "client", "srv-b"), "srv-b");
    assert!(probe(&c, "intruder", "srv-b").starts_with("error"));
    let churn = |from: &str, to: &str| {
        let target = format!("{}:8080", c.pod(to).1.ipv4);
        c.pod(from).0.spawn(
            from,
            &[
                "churn",
                "--connect",
                &target,
                "--rate",
                "100",
                "--seconds",
                "16",
            ],
        )
    };
    let mut crossing = [churn("client", "srv-b"), churn("client-b", "srv-a")];
    let b = &mut agents[1];
    for sigkill in [true, false] {
        if sigkill {
            b.kill();
        } else {
            b.stop();
        }
        assert!(
            probe(&c, "intruder", "srv-b").starts_with("error"),
            "no agent on node b"
        );
        b.restart();
        assert!(
            probe(&c, "intruder", "srv-b").starts_with("error"),
            "node b's agent starting"
        );
        b.wait_status("ready", |s| s["services"]["ready"] == true);
    }
    for p in &mut crossing {
        p.wait_success(Duration::from_secs(40));
    }
    assert!(probe(&c, "intruder", "srv-b").starts_with("error"));
    assert_eq!(probe(&c, "client", "srv-b"), "srv-b");
}

/// Every query of every panel of deploy/'s Grafana dashboard, run by a real Prometheus that
/// scrapes both agents (labelled `node` as the deploy/ monitors label them), with the
/// dashboard's variables set to node b: each returns a series once traffic crossed the
/// nodes (TCP connections and bytes, UDP, and a connection node b's policy drops).
#[test]
fn the_dashboards_queries_return_data_from_a_real_prometheus_scraping_both_agents() {
    let c = Cluster::builder("cl_dash")
        .node("a", &["client", "intruder"])
        .node("b", &["server"])
        .build();
    let mut docs = app_pods(
        &c,
        &[
            ("client", "client"),
            ("intruder", "other"),
            ("server", "web"),
        ],
    );
    docs.extend([np(
            "default",
            "web-from-clients",
            "podSelector:\n  matchLabels: {app: web}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: client}",
        )]);
    // A health-checked Service on a port nothing serves: one refused connect through it
    // ejects its backend (the ejection panel's series).
    docs.push(k8s::service(
        "closed",
        "default",
        &["10.96.0.30"],
        &[("app", "web")],
        &[("closed", 81, "9", "TCP")],
        None,
    ));
    docs.push(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: closed, namespace: default}\nspec:\n  host: closed\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100, baseEjectionTime: 10m}\n".to_owned(),
    );
    c.write_source("cluster.yaml", &k8s::file(&docs));
    let _server = c.node("b").start_server(
        "server",
        &[
            "serve", "--name", "server", "--tcp", "8080", "--udp", "5353",
        ],
    );
    let mut agents = agents(&c, &["a", "b"]);
    for agent in &agents {
        agent.wait_policies("the policy in force", |v| {
            v["policies"].as_array().is_some_and(|p| p.len() == 1)
        });
    }
    let server = &c.pod("server").1.ipv4;
    let targets = [
        ("a", agents[0].metrics_addr()),
        ("b", agents[1].metrics_addr()),
    ];
    // The job the ServiceMonitor gives them, and the alerts deploy/ ships.
    let prometheus = Prometheus::start("weft-metrics", &targets, Some(&deploy_rules()));
    let mut churn = c.node("a").spawn(
        "client",
        &[
            "churn",
            "--connect",
            &format!("{server}:8080"),
            "--rate",
            "20",
            "--seconds",
            "12",
        ],
    );
    let udp = format!("udp:{server}:5353");
    for _ in 0..3 {
        let mut p = c
            .node("a")
            .spawn("client", &["probe", "--timeout-ms", "1000", &udp]);
        assert_eq!(p.probe_results()[&udp], "server");
    }
    assert!(probe(&c, "intruder", "server").starts_with("error"));
    agents[1].wait_backends("10.96.0.30:81/TCP", 1, WAIT);
    let mut refused = c
        .node("b")
        .spawn("server", &["connect-probe", "--connect", "10.96.0.30:81"]);
    refused.wait(WAIT);
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/weft-dashboard.json"),
    )
    .expect("the dashboard");
    let exprs = dashboard_exprs(&serde_json::from_str(&text).expect("dashboard JSON"));
    assert!(exprs.len() >= 10, "{exprs:?}");
    let empty: Vec<String> = exprs
        .iter()
        .map(|e| substitute(e, "weft-metrics", "b", "30s"))
        .filter(|e| prometheus.wait_series(e, Duration::from_secs(30)).is_none())
        .collect();
    assert!(empty.is_empty(), "queries without data: {empty:#?}");
    churn.wait_success(WAIT);
    alerts_evaluate_and_one_fires_for_a_stopped_agent(&prometheus, &mut agents);
}

/// Every alert of deploy/ evaluates without error on both agents' metrics and none is
/// active on this healthy cluster; stopping node b's agent makes `WeftAgentDown` pending for
/// node b alone.
fn alerts_evaluate_and_one_fires_for_a_stopped_agent(
    prometheus: &Prometheus,
    agents: &mut [Agent],
) {
    let rules = || -> Vec<Value> {
        prometheus.api("rules")["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    // Health is "unknown" until a rule's first evaluation, "err" if it failed.
    let deadline = std::time::Instant::now() + WAIT;
    let evaluated = loop {
        let now = rules();
        if now.iter().all(|r| r["health"] != "unknown") || std::time::Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(evaluated.len(), 10, "{evaluated:#?}");
    for rule in &evaluated {
        assert_eq!(rule["health"], "ok", "{rule:#}");
        assert_eq!(rule["state"], "inactive", "a healthy cluster: {rule:#}");
    }
    agents[1].stop();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let alerts = prometheus.api("alerts")["alerts"].clone();
        let active: Vec<(&str, &str)> = alerts
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                Some((
                    a["labels"]["alertname"].as_str()?,
                    a["labels"]["node"].as_str()?,
                ))
            })
            .collect();
        if !active.is_empty() {
            assert_eq!(active, [("WeftAgentDown", "b")], "{alerts:#}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alert for the stopped agent"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Kubernetes mode: one fake API server feeds both agents (`--node-name a` and `b`). Each
/// binds only its own node's pods (by UID, where the kubelet puts their cgroups), learns the
/// other node's from the API, balances a Service over backends on both nodes and judges its
/// pods' ingress against pods of the other node.
#[test]
fn kubernetes_mode_two_agents_one_api_server() {
    let c = Cluster::builder("cl_kube")
        .kubelet_cgroups()
        .node("a", &["client", "intruder", "b1"])
        .node("b", &["b2"])
        .build();
    let api = FakeApi::start();
    api.apply(serde_json::json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    let mut docs = app_pods(&c, &[("client", "client"), ("intruder", "other")]);
    for b in ["b1", "b2"] {
        docs.push(k8s::pod(
            c.pod(b).1,
            "default",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            true,
        ));
    }
    docs.push(web_service("http"));
    docs.push(np(
        "default",
        "web-from-clients",
        "podSelector:\n  matchLabels: {app: web}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {app: client}",
    ));
    c.apply_to_api(&api, &k8s::file(&docs));
    let endpoints = [(c.pod("b1").1, true), (c.pod("b2").1, true)];
    api.apply(k8s::endpoint_slice(
        "web",
        "default",
        &endpoints,
        &[("http", 8080, "TCP")],
    ));
    let _servers: Vec<Process> = ["b1", "b2"]
        .iter()
        .map(|b| {
            c.pod(b).0.start_server(
                b,
                &["tcp-server", "--listen", "[::]:8080", "--reply-name", b],
            )
        })
        .collect();
    let agents: Vec<Agent> = ["a", "b"]
        .iter()
        .map(|n| Agent::start_with(c.node(n), AgentOptions::with_api(&api, c.node(n), &[])))
        .collect();
    for (agent, local) in agents.iter().zip([3, 1]) {
        agent.wait_backends(&format!("{WEB}:80/TCP"), 2, WAIT);
        agent.wait_policies("the node's own pods bound", |v| {
            v["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == local && e.iter().all(|e| e["in_kernel"] == true))
        });
    }
    let all = spray(&c, "client", &format!("{WEB}:80"), 400);
    assert_eq!(all.values().sum::<u64>(), 400, "{all:?}");
    for b in ["b1", "b2"] {
        assert!(all.get(b).copied().unwrap_or(0) > 100, "{all:?}");
    }
    let to_b2 = format!("tcp:{}:8080", c.pod("b2").1.ipv4);
    let mut p = c
        .node("a")
        .spawn("intruder", &["probe", "--timeout-ms", "1000", &to_b2]);
    assert!(
        p.probe_results()[&to_b2]
            .as_str()
            .is_some_and(|r| r.starts_with("error")),
        "node b admits only clients"
    );
}
