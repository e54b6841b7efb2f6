//! `kube`: the Kubernetes source at cluster scale, side by side with the standalone source
//! reading the same objects from a directory, in one run.
//!
//! The cluster has pods of other nodes (their addresses feed identities and backends),
//! Services with one EndpointSlice each, NetworkPolicies, and the node's own four pods. For
//! each scale and each source, a fresh agent is started and measured:
//!
//! - start: from the programs being loaded to the first pass that programmed the services
//!   (for the API server: the lists over HTTP and JSON decoding; for the directory: YAML
//!   parsing);
//! - the agent's CPU seconds and resident memory once it has synced;
//! - change: 30 times, one EndpointSlice changed (applied to the fake API server, or
//!   written to a file), to the `services synced` log line that follows its map writes.
//!
//! Each scale runs `rounds` rounds of both sources in rotating order; the kube/dir ratios of
//! the start and of the change p50 are medians of per-round ratios, with their spread. The
//! fake API server runs in this process (plain HTTP on loopback), its threads pinned to the
//! server CPU ([`Pinning`]); the agent is not pinned.
use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use weft_testkit::{Agent, AgentOptions, Node, fakeapi::FakeApi, k8s, prom};

use super::{Pinning, Ratio, cpu_seconds, median, source_agent_options, time_to_log};

/// (pods of other nodes, Services).
const SCALES: [(usize, usize); 2] = [(1_000, 200), (10_000, 2_000)];
const NAMESPACES: usize = 20;
const CHANGES: usize = 30;

#[derive(Debug, Default, Serialize)]
pub(super) struct Run {
    start_to_synced_ms: f64,
    cpu_s_at_synced: f64,
    rss_kib: u64,
    change_ms: Vec<f64>,
    change_p50_ms: f64,
    change_max_ms: f64,
    /// Mean milliseconds per pass over the run: the whole pass from reading the source to
    /// the last map write (`sync`), and each compile stage.
    pass_ms: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Scale {
    remote_pods: usize,
    services: usize,
    network_policies: usize,
    objects: usize,
    /// One run per round.
    dir: Vec<Run>,
    kube: Vec<Run>,
    /// kube / dir per round: start to synced, and the change p50.
    start_kube_over_dir: Ratio,
    change_kube_over_dir: Ratio,
}

impl Scale {
    /// The median over rounds of one figure of a source's runs.
    fn median(runs: &[Run], f: impl Fn(&Run) -> f64) -> f64 {
        median(&runs.iter().map(f).collect::<Vec<_>>())
    }
}

#[derive(Debug, Serialize)]
pub struct KubeResult {
    scenario: &'static str,
    pinning: Pinning,
    rounds: usize,
    scales: Vec<Scale>,
}

impl KubeResult {
    pub fn print(&self) {
        println!(
            "\nkube: the same cluster from a directory (dir) and from the API server (kube); change = one EndpointSlice to the maps"
        );
        println!(
            "{:>7} {:>6} | {:>9} {:>9} | {:>7} {:>7} | {:>8} {:>8} | {:>9} {:>9} {:>9} {:>9}",
            "pods",
            "svcs",
            "dir ms",
            "kube ms",
            "dir cpu",
            "k cpu",
            "dir MiB",
            "k MiB",
            "dir p50",
            "dir max",
            "kube p50",
            "kube max"
        );
        for s in &self.scales {
            let (d, k) = (&s.dir, &s.kube);
            println!(
                "{:>7} {:>6} | {:>9.0} {:>9.0} | {:>7.2} {:>7.2} | {:>8.1} {:>8.1} | {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                s.remote_pods,
                s.services,
                Scale::median(d, |r| r.start_to_synced_ms),
                Scale::median(k, |r| r.start_to_synced_ms),
                Scale::median(d, |r| r.cpu_s_at_synced),
                Scale::median(k, |r| r.cpu_s_at_synced),
                Scale::median(d, |r| r.rss_kib as f64) / 1024.0,
                Scale::median(k, |r| r.rss_kib as f64) / 1024.0,
                Scale::median(d, |r| r.change_p50_ms),
                Scale::median(d, |r| r.change_max_ms),
                Scale::median(k, |r| r.change_p50_ms),
                Scale::median(k, |r| r.change_max_ms),
            );
        }
        println!(
            "(medians of {} rounds; kube/dir with the spread of the per-round ratios:)",
            self.rounds
        );
        for s in &self.scales {
            println!(
                "{:>7} pods: start {}; change p50 {}",
                s.remote_pods, s.start_kube_over_dir.verdict, s.change_kube_over_dir.verdict
            );
        }
        println!(
            "mean ms per pass in the last round (sync: read to last map write; compile stages):"
        );
        for s in &self.scales {
            if let (Some(d), Some(k)) = (s.dir.last(), s.kube.last()) {
                println!(
                    "{:>7} {:>6} | dir {:?} | kube {:?}",
                    s.remote_pods, s.services, d.pass_ms, k.pass_ms
                );
            }
        }
    }
}

pub fn run(bins: &Path, pin: &Pinning, rounds: usize) -> Result<KubeResult> {
    let mut result = KubeResult {
        scenario: "kube",
        pinning: pin.clone(),
        rounds,
        scales: Vec::new(),
    };
    for (pods, services) in SCALES {
        let node = node(bins, "bench_kube");
        let objects = cluster(&node, pods, services);
        let policies = services / 10;
        let (mut dir, mut kube) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("bench kube: {pods} pods: round {}/{rounds}", r + 1);
            for k in 0..2 {
                if (r + k) % 2 == 0 {
                    dir.push(measure_dir(bins, &node, &objects)?);
                } else {
                    kube.push(measure_kube(bins, pin, &node, &objects)?);
                }
            }
        }
        let per_round = |f: fn(&Run) -> f64| {
            Ratio::per_round(
                &kube.iter().map(f).collect::<Vec<_>>(),
                &dir.iter().map(f).collect::<Vec<_>>(),
            )
        };
        result.scales.push(Scale {
            remote_pods: pods,
            services,
            network_policies: policies,
            objects: objects.len(),
            start_kube_over_dir: per_round(|r| r.start_to_synced_ms),
            change_kube_over_dir: per_round(|r| r.change_p50_ms),
            dir,
            kube,
        });
    }
    Ok(result)
}
/// The node `cluster` puts its own pods on (kubelet cgroups).
pub(super) fn node(bins: &Path, tag: &str) -> Node {
    Node::builder(tag)
        .kubelet_cgroups()
        .pod("client")
        .pod("b1")
        .pod("b2")
        .pod("b3")
        .pod_tool(&bins.join("weft-pod"))
        .build()
}

/// Every object of the cluster, the node's pods as the API server has them (UID, nodeName).
pub(super) fn cluster(node: &Node, pods: usize, services: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{n}"), "labels": {"team": format!("t{}", n % 5)}}}));
    }
    out.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}));
    let ns_of = |svc: usize| format!("ns-{}", svc % NAMESPACES);
    let pod_ip = |i: usize| format!("10.1.{}.{}", i / 250, i % 250 + 1);
    for i in 0..pods {
        let svc = i % services;
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p-{i}"), "namespace": ns_of(svc),
                "uid": format!("00000000-0000-4000-9000-{i:012}"),
                "labels": {"app": format!("app-{svc}"), "pod-template-hash": "5d8f7c9b4"}},
            "spec": {"nodeName": "node-b", "containers": [{"name": "main", "image": "x",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}],
                "conditions": [{"type": "Ready", "status": "True"}]}}));
    }
    for s in 0..services {
        let name = format!("svc-{s}");
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns_of(s)},
            "spec": {"clusterIP": format!("10.100.{}.{}", s / 250, s % 250 + 1),
                "selector": {"app": format!("app-{s}")},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}));
        let endpoints: Vec<Value> = (s..pods)
            .step_by(services)
            .map(|i| {
                json!({"addresses": [pod_ip(i)], "conditions": {"ready": true},
                "nodeName": "node-b"})
            })
            .collect();
        out.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-abcde"), "namespace": ns_of(s),
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        );
    }
    for p in 0..services / 10 {
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("pol-{p}"), "namespace": ns_of(p)},
            "spec": {"podSelector": {"matchLabels": {"app": format!("app-{p}")}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", p % 5)}}}],
                    "ports": [{"port": 8080}]}]}}));
    }
    for p in ["client", "b1", "b2", "b3"] {
        let doc = k8s::pod(
            node.pod(p),
            "bench",
            &[("app", p)],
            &[("http", 8080, "TCP")],
            true,
        );
        out.push(k8s::api_object(node, &doc));
    }
    // Last: the directory source keeps these two in a file of their own.
    out.push(probe_service());
    out.push(probe_slice(node, 0));
    out
}

fn probe_service() -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "probe", "namespace": "bench"},
        "spec": {"clusterIP": "10.111.255.1", "ports": [{"name": "http", "port": 80}]}})
}

/// The probe Service's EndpointSlice, pointing at b1, b2 or b3 by `i`.
fn probe_slice(node: &Node, i: usize) -> Value {
    let ip = node.pod(["b1", "b2", "b3"][i % 3]).ipv4.to_string();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "probe-1", "namespace": "bench",
            "labels": {"kubernetes.io/service-name": "probe"}},
        "addressType": "IPv4", "endpoints": [{"addresses": [ip]}],
        "ports": [{"name": "http", "port": 8080}]})
}

/// The same objects as the standalone source reads them: JSON documents (YAML's subset);
/// the node's pods name their cgroups.
fn as_yaml(node: &Node, objects: &[Value]) -> String {
    let docs: Vec<String> = objects
        .iter()
        .map(|o| {
            let mut o = o.clone();
            if o["spec"]["nodeName"] == k8s::NODE_NAME
                && let Some(uid) = o["metadata"]["uid"].as_str()
                && let Some(p) = node.pods().iter().find(|p| p.uid == uid)
            {
                o["metadata"]["annotations"] = json!({"weft.io/cgroup": cgroup_of(node, p)});
            }
            format!("{o}\n")
        })
        .collect();
    k8s::file(&docs)
}

/// A node pod's cgroup, relative to the node's cgroup.
fn cgroup_of(node: &Node, pod: &weft_testkit::Pod) -> String {
    pod.cgroup()
        .strip_prefix(node.cgroup())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn measure_dir(bins: &Path, node: &Node, objects: &[Value]) -> Result<Run> {
    // The probe Service and its slice (the last two objects) live in their own file, which
    // the changes rewrite.
    let (cluster, probe) = objects.split_at(objects.len() - 2);
    node.write_source("cluster.yaml", &as_yaml(node, cluster));
    node.write_source("probe.yaml", &as_yaml(node, probe));
    let agent = Agent::start_with(node, source_agent_options(bins));
    let mut run = synced(&agent, objects.len())?;
    for i in 0..CHANGES {
        let text = k8s::file(&[
            format!("{}\n", probe_service()),
            format!("{}\n", probe_slice(node, i + 1)),
        ]);
        run.change_ms
            .push(time_to_log(&agent, "services synced", || {
                node.write_source("probe.yaml", &text);
            })?);
        std::thread::sleep(Duration::from_millis(300));
    }
    finish(&mut run, &agent);
    drop(agent);
    node.remove_source("cluster.yaml");
    node.remove_source("probe.yaml");
    Ok(run)
}

fn measure_kube(bins: &Path, pin: &Pinning, node: &Node, objects: &[Value]) -> Result<Run> {
    let api = pin.on_server_cpu(FakeApi::start)?;
    for o in objects {
        api.apply(o.clone());
    }
    let options = AgentOptions {
        source: false,
        extra_args: AgentOptions::with_api(&api, node, &[]).extra_args,
        ..source_agent_options(bins)
    };
    let agent = Agent::start_with(node, options);
    let mut run = synced(&agent, objects.len())?;
    for i in 0..CHANGES {
        run.change_ms
            .push(time_to_log(&agent, "services synced", || {
                api.apply(probe_slice(node, i + 1));
            })?);
        // Past the source's pass spacing (250 ms), so each change is timed alone.
        std::thread::sleep(Duration::from_millis(300));
    }
    finish(&mut run, &agent);
    Ok(run)
}

/// Waits for the first pass with every object, and reads the agent's cost so far.
pub(super) fn synced(agent: &Agent, objects: usize) -> Result<Run> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (_, status) = agent.client("status");
        let s = &status["services"];
        let have: u64 = s["objects"]
            .as_object()
            .map_or(0, |o| o.values().filter_map(Value::as_u64).sum());
        if s["ready"] == true && have as usize == objects {
            let rejected = s["rejections"].as_array().map_or(0, Vec::len);
            if rejected > 0 {
                bail!("{rejected} objects rejected: {}", s["rejections"]);
            }
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not sync {objects} objects: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = agent.logs().snapshot();
    // The programs loaded: the source starts reading right after (a fresh instance attaches
    // them after its first full sync).
    let at = |marker: &str, last: bool| -> Result<std::time::SystemTime> {
        let mut matching = logs.iter().filter(|l| l.contains(marker));
        let line = if last {
            matching.next_back()
        } else {
            matching.next()
        }
        .with_context(|| format!("no `{marker}` log line"))?;
        let v: Value = serde_json::from_str(line)?;
        Ok(humantime::parse_rfc3339(
            v["timestamp"].as_str().unwrap_or_default(),
        )?)
    };
    let start = at("programs loaded", true)?;
    let synced = at("services synced", false)?;
    Ok(Run {
        start_to_synced_ms: synced
            .duration_since(start)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0,
        cpu_s_at_synced: cpu_seconds(agent.pid())?,
        rss_kib: super::rss_kib(agent.pid())?,
        ..Run::default()
    })
}

fn finish(run: &mut Run, agent: &Agent) {
    let m = agent.metrics();
    let mean = |name: &str, labels: &[(&str, &str)]| {
        let sum = prom::sum(&m, &format!("{name}_sum"), labels);
        let count = prom::sum(&m, &format!("{name}_count"), labels);
        sum / count * 1000.0
    };
    run.pass_ms
        .insert("sync".into(), mean("weft_sync_duration_seconds", &[]));
    for stage in ["services", "policy", "names"] {
        run.pass_ms.insert(
            stage.into(),
            mean("weft_compile_duration_seconds", &[("stage", stage)]),
        );
    }
    let mut sorted = run.change_ms.clone();
    sorted.sort_by(f64::total_cmp);
    run.change_p50_ms = median(&sorted);
    run.change_max_ms = sorted.last().copied().unwrap_or(f64::NAN);
}
