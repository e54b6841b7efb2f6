//! `bind`: how soon a new pod's cgroup is bound after it appears, in Kubernetes mode. Until
//! then the kernel isolates the pod both ways, so this is the delay a new pod's first
//! connections see. Target: p99 within 100 ms.
//!
//! The API server holds a cluster (pods of other nodes, Services, NetworkPolicies) and pods of
//! this node whose cgroups do not exist yet, as between the scheduler binding a pod and the
//! kubelet creating its cgroup. Each sample creates one of those cgroups where the kubelet
//! (systemd driver) does and times it to the agent's `pod cgroup bound` log line.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::{Value, json};
use weft_testkit::{Agent, AgentOptions, fakeapi::FakeApi, k8s};

use super::{kube, source_agent_options, time_to_log};

/// (pods of other nodes, Services) of the cluster around the new pods.
const SCALES: [(usize, usize); 2] = [(1_000, 200), (10_000, 2_000)];
const SAMPLES: usize = 100;

#[derive(Debug, Serialize)]
struct Scale {
    remote_pods: usize,
    services: usize,
    bind_ms: Vec<f64>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct BindResult {
    scenario: &'static str,
    target_p99_ms: f64,
    scales: Vec<Scale>,
}

impl BindResult {
    pub fn print(&self) {
        println!(
            "\nbind: a new pod's cgroup created to the pod bound in the kernel ({SAMPLES} pods; target p99 <= {} ms)",
            self.target_p99_ms
        );
        println!(
            "{:>7} {:>6} | {:>8} {:>8} {:>8} | verdict",
            "pods", "svcs", "p50 ms", "p99 ms", "max ms"
        );
        for s in &self.scales {
            let verdict = if s.p99_ms <= self.target_p99_ms {
                "within target"
            } else {
                "OVER target"
            };
            println!(
                "{:>7} {:>6} | {:>8.1} {:>8.1} {:>8.1} | {verdict}",
                s.remote_pods, s.services, s.p50_ms, s.p99_ms, s.max_ms
            );
        }
    }
}

pub fn run(bins: &std::path::Path) -> Result<BindResult> {
    let mut result = BindResult {
        scenario: "bind",
        target_p99_ms: 100.0,
        scales: Vec::new(),
    };
    for (pods, services) in SCALES {
        result.scales.push(measure(bins, pods, services)?);
    }
    Ok(result)
}

fn measure(bins: &std::path::Path, pods: usize, services: usize) -> Result<Scale> {
    let node = kube::node(bins, "bench_bind");
    let api = FakeApi::start();
    let objects = kube::cluster(&node, pods, services);
    for o in &objects {
        api.apply(o.clone());
    }
    for i in 0..SAMPLES {
        api.apply(new_pod(i));
    }
    let options = AgentOptions {
        source: false,
        extra_args: AgentOptions::with_api(&api, &node, &[]).extra_args,
        ..source_agent_options(bins)
    };
    let agent = Agent::start_with(&node, options);
    kube::synced(&agent, objects.len() + SAMPLES)?;
    let mut created = Created(Vec::new());
    let mut bind_ms = Vec::new();
    for i in 0..SAMPLES {
        let dir = node.cgroup().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid(i).replace('-', "_")
        ));
        bind_ms.push(time_to_log(&agent, "pod cgroup bound", || {
            if let Err(e) = std::fs::create_dir(&dir) {
                eprintln!("bench: cannot create {}: {e}", dir.display());
            }
        })?);
        created.0.push(dir);
        // Each sample alone: past the pass the previous one caused.
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sorted = bind_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at =
        |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    Ok(Scale {
        remote_pods: pods,
        services,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: *sorted.last().context("no samples")?,
        bind_ms,
    })
}

fn uid(i: usize) -> String {
    format!("00000000-0000-4000-a000-{i:012}")
}

/// A pod of this node, scheduled, whose cgroup the kubelet has not created yet.
fn new_pod(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("new-{i}"), "namespace": "bench", "uid": uid(i),
            "labels": {"app": "new"}},
        "spec": {"nodeName": k8s::NODE_NAME, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Pending", "podIP": format!("10.250.{}.{}", i / 250, i % 250 + 1)}})
}

/// The cgroups a run created, removed when it ends (before the node's own).
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
