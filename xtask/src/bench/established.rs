//! `established`: what weft costs a connection once it is open. Between a client and a server
//! pod, with the agent running (services, policy and telemetry on; an ingress policy on the
//! server allows the client), two workloads over connections opened once:
//!
//! - request/response: 64 bytes each way over 8 keep-alive connections, in turn;
//! - bulk: 64 KiB each way per exchange over one connection.
//!
//! Each is measured two ways, in the same rounds, interleaved in bursts: *with* weft (client
//! and server processes in their pods' cgroups, where every weft program sees their sockets)
//! and *without* (the same pods' namespaces and path, both processes outside weft's cgroups,
//! servers on other ports). The ratios with / without are medians of per-round ratios with
//! their spread.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, Node, k8s, proc::Process};

use super::{
    BpfStats, Pinning, ProgramProfile, Ratio, RrClient, interleaved_round, median, profile,
    program_stats, source_agent_options,
};

/// (name, bytes each way per exchange, keep-alive connections, exchanges per round, per burst,
/// port with weft, port without).
const WORKLOADS: [(&str, usize, usize, u64, u64, u16, u16); 2] = [
    ("request/response 64 B", 64, 8, 20_000, 500, 8080, 8081),
    ("bulk 64 KiB", 65_536, 1, 4_000, 100, 8090, 8091),
];

#[derive(Debug, Default, Serialize)]
struct Side {
    per_second: Vec<f64>,
    p50_us: Vec<f64>,
}

impl Side {
    fn add(&mut self, v: &Value) {
        self.per_second
            .push(v["per_second"].as_f64().unwrap_or(f64::NAN));
        self.p50_us.push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
    }
}

#[derive(Debug, Serialize)]
struct Workload {
    name: &'static str,
    bytes_each_way: usize,
    connections: usize,
    exchanges_per_round: u64,
    with_weft: Side,
    without: Side,
    /// Exchanges per second, with / without, per round (below 1: weft's cost).
    throughput_with_over_without: Ratio,
    /// p50 latency of an exchange, with / without (above 1: weft's cost).
    p50_with_over_without: Ratio,
    /// weft's programs per exchange (both ends), from BPF run-time statistics in an extra
    /// burst of the client with weft (statistics cost time themselves: not in the ratios).
    kernel: Vec<ProgramProfile>,
}

#[derive(Debug, Serialize)]
pub struct EstablishedResult {
    scenario: &'static str,
    pinning: Pinning,
    rounds: usize,
    workloads: Vec<Workload>,
}

impl EstablishedResult {
    pub fn print(&self) {
        println!(
            "\nestablished: exchanges over open connections between two pods, with weft on their sockets and without (median of {} rounds; client on CPU {}, server on CPU {})",
            self.rounds, self.pinning.client_cpu, self.pinning.server_cpu
        );
        for w in &self.workloads {
            let mib = |side: &Side| {
                median(&side.per_second) * 2.0 * w.bytes_each_way as f64 / (1024.0 * 1024.0)
            };
            println!(
                "{:<22} without: {:>8.0}/s {:>8.1} MiB/s p50 {:>6.1} µs | with: {:>8.0}/s {:>8.1} MiB/s p50 {:>6.1} µs",
                w.name,
                median(&w.without.per_second),
                mib(&w.without),
                median(&w.without.p50_us),
                median(&w.with_weft.per_second),
                mib(&w.with_weft),
                median(&w.with_weft.p50_us),
            );
            println!(
                "{:<22} throughput with/without {}; p50 with/without {}",
                "", w.throughput_with_over_without.verdict, w.p50_with_over_without.verdict
            );
            println!("{:<22} weft's programs per exchange (both ends):", "");
            for p in w.kernel.iter().filter(|p| p.ns_per_unit > 0.0) {
                p.print();
            }
        }
    }
}

/// The client and server pods, the policy allowing the client on the ports with weft, and
/// the servers: each workload's port with weft in the server pod's cgroup, its port without
/// outside it.
fn bed(bins: &Path, pin: &Pinning) -> (Node, Vec<Process>) {
    let node = Node::builder("xtask-bench-established")
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("server")
        .build();
    let mut servers = Vec::new();
    for (_, size, _, _, _, with, without) in WORKLOADS {
        let size = size.to_string();
        for (port, observed) in [(with, true), (without, false)] {
            let listen = format!("[::]:{port}");
            let args = pin.server(&[
                "rr-server",
                "--keepalive",
                "--size",
                &size,
                "--listen",
                &listen,
            ]);
            let (name, command) = node.pod_command("server", observed, &args);
            let p = Process::spawn(&name, command);
            p.wait_listening();
            servers.push(p);
        }
    }
    let ports = WORKLOADS
        .iter()
        .map(|w| format!("{{port: {}}}", w.5))
        .collect::<Vec<_>>()
        .join(", ");
    node.write_source(
        "pods.yaml",
        &k8s::file(&[
            k8s::pod(node.pod("client"), "bench", &[("app", "client")], &[], true),
            k8s::pod(node.pod("server"), "bench", &[("app", "server")], &[], true),
        ]),
    );
    node.write_source(
        "policy.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: bench}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    \
             ports: [{ports}]\n"
        ),
    );
    (node, servers)
}

pub fn run(bins: &Path, pin: &Pinning, rounds: usize) -> Result<EstablishedResult> {
    let (node, _servers) = bed(bins, pin);
    let _agent = Agent::start_with(&node, source_agent_options(bins));
    let server = node.pod("server").ipv4;
    let mut workloads = Vec::new();
    for (name, size, conns, count, burst, with, without) in WORKLOADS {
        let extra_s = [size.to_string(), conns.to_string()];
        let extra = ["--size", &extra_s[0], "--keepalive", &extra_s[1]];
        let client = |observed, port: u16, what| {
            let to = format!("{server}:{port}");
            RrClient::start(&node, ("client", observed), pin, &to, &extra, what)
        };
        let mut pair = [
            client(true, with, "with weft"),
            client(false, without, "without"),
        ];
        for c in &mut pair {
            c.burst(burst)?;
            c.report()?;
        }
        let (mut w, mut wo) = (Side::default(), Side::default());
        for r in 0..rounds {
            eprintln!("bench established: {name}: round {}/{rounds}", r + 1);
            let [a, b] = &mut pair;
            let reports = interleaved_round(&mut [a, b], r, count, burst)?;
            w.add(&reports[0]);
            wo.add(&reports[1]);
        }
        let kernel = {
            let _stats = BpfStats::enable()?;
            let before = program_stats(&node)?;
            pair[0].burst(count)?;
            pair[0].report()?;
            profile(&before, &program_stats(&node)?, count)
        };
        workloads.push(Workload {
            kernel,
            name,
            bytes_each_way: size,
            connections: conns,
            exchanges_per_round: count,
            throughput_with_over_without: Ratio::per_round(&w.per_second, &wo.per_second),
            p50_with_over_without: Ratio::per_round(&w.p50_us, &wo.p50_us),
            with_weft: w,
            without: wo,
        });
    }
    Ok(EstablishedResult {
        scenario: "established",
        pinning: pin.clone(),
        rounds,
        workloads,
    })
}
