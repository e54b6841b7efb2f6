//! `established`: what weft costs a connection once it is open. Between a client and a server
//! pod, with the agent running (services, policy and telemetry on; an ingress policy on the
//! server allows the client), two workloads over connections opened once:
//!
//! - request/response: 64 bytes each way over 8 keep-alive connections, in turn;
//! - bulk: 64 KiB each way per exchange over one connection.
//!
//! Each is measured three ways, in the same rounds, interleaved in bursts: *with* weft (client
//! and server processes in their pods' cgroups, where every weft program sees their sockets),
//! *without* (the same pods' namespaces and path, both processes outside weft's cgroups,
//! servers on other ports), and *with weft and `--sockmap`* (a second node like the first,
//! whose agent sends data between its pods socket to socket). The ratios are medians of
//! per-round ratios with their spread.
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, Node, k8s, proc::Process};

use super::{
    BpfStats, Pinning, ProgramProfile, Ratio, RrClient, interleaved_round, median, profile,
    program_stats, rr_server, source_agent_options,
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
    with_sockmap: Side,
    /// Exchanges per second, with / without, per round (below 1: weft's cost).
    throughput_with_over_without: Ratio,
    /// p50 latency of an exchange, with / without (above 1: weft's cost).
    p50_with_over_without: Ratio,
    /// `--sockmap` against weft without it (above 1: the socket-to-socket path wins).
    throughput_sockmap_over_with: Ratio,
    /// (below 1: the socket-to-socket path wins).
    p50_sockmap_over_with: Ratio,
    throughput_sockmap_over_without: Ratio,
    /// weft's programs per exchange (both ends), from BPF run-time statistics in an extra
    /// burst of the client with weft (statistics cost time themselves: not in the ratios).
    kernel: Vec<ProgramProfile>,
    /// The same with `--sockmap`.
    kernel_sockmap: Vec<ProgramProfile>,
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
            println!(
                "{:<22} with --sockmap: {:>8.0}/s {:>8.1} MiB/s p50 {:>6.1} µs; throughput sockmap/with {}; p50 sockmap/with {}; throughput sockmap/without {}",
                "",
                median(&w.with_sockmap.per_second),
                mib(&w.with_sockmap),
                median(&w.with_sockmap.p50_us),
                w.throughput_sockmap_over_with.verdict,
                w.p50_sockmap_over_with.verdict,
                w.throughput_sockmap_over_without.verdict,
            );
            for (label, kernel) in [("", &w.kernel), (" with --sockmap", &w.kernel_sockmap)] {
                println!(
                    "{:<22} weft's programs per exchange (both ends){label}:",
                    ""
                );
                for p in kernel.iter().filter(|p| p.ns_per_unit > 0.0) {
                    p.print();
                }
            }
        }
    }
}

/// The client and server pods, the policy allowing the client on the ports with weft, and
/// the servers: each workload's port with weft in the server pod's cgroup, its port without
/// outside it.
fn bed(bins: &Path, pin: &Pinning, name: &str) -> (Node, Vec<Process>) {
    let node = Node::builder(name)
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("server")
        .build();
    let mut servers = Vec::new();
    for (_, size, _, _, _, with, without) in WORKLOADS {
        for (port, observed) in [(with, true), (without, false)] {
            servers.push(rr_server(
                &node,
                ("server", observed),
                pin,
                (size, size),
                (port, None),
            ));
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
    let (node, _servers) = bed(bins, pin, "xtask-bench-established");
    let agent = Agent::start_with(&node, source_agent_options(bins));
    let (sm_node, _sm_servers) = bed(bins, pin, "xtask-bench-sockmap");
    let mut options = source_agent_options(bins);
    options.extra_args.push("--sockmap".into());
    let sm_agent = Agent::start_with(&sm_node, options);
    let mut workloads = Vec::new();
    for w in WORKLOADS {
        workloads.push(workload(
            w,
            pin,
            rounds,
            (&node, &agent),
            (&sm_node, &sm_agent),
        )?);
    }
    Ok(EstablishedResult {
        scenario: "established",
        pinning: pin.clone(),
        rounds,
        workloads,
    })
}

type Spec = (&'static str, usize, usize, u64, u64, u16, u16);

/// One workload on both nodes: with and without weft on the first, with `--sockmap` on the
/// second, in the same rounds.
fn workload(
    (name, size, conns, count, burst, with, without): Spec,
    pin: &Pinning,
    rounds: usize,
    (node, agent): (&Node, &Agent),
    (sm_node, sm_agent): (&Node, &Agent),
) -> Result<Workload> {
    let extra_s = [size.to_string(), conns.to_string()];
    let extra = ["--size", &extra_s[0], "--keepalive", &extra_s[1]];
    let client = |node: &Node, observed, port: u16, what| {
        let to = format!("{}:{port}", node.pod("server").ipv4);
        RrClient::start(node, ("client", observed), pin, &to, &extra, what)
    };
    let mut clients = [
        client(node, true, with, "with weft"),
        client(node, false, without, "without"),
        client(sm_node, true, with, "with weft and --sockmap"),
    ];
    for c in &mut clients {
        c.burst(burst)?;
        c.report()?;
    }
    let mut sides: [Side; 3] = Default::default();
    for r in 0..rounds {
        eprintln!("bench established: {name}: round {}/{rounds}", r + 1);
        let [a, b, c] = &mut clients;
        let reports = interleaved_round(&mut [a, b, c], r, count, burst)?;
        for (side, report) in sides.iter_mut().zip(&reports) {
            side.add(report);
        }
    }
    let [with_c, _, sm_c] = &mut clients;
    let kernel = kernel_profile(node, agent, with_c, count)?;
    let kernel_sockmap = kernel_profile(sm_node, sm_agent, sm_c, count)?;
    let [w, wo, sm] = sides;
    Ok(Workload {
        kernel,
        kernel_sockmap,
        name,
        bytes_each_way: size,
        connections: conns,
        exchanges_per_round: count,
        throughput_with_over_without: Ratio::per_round(&w.per_second, &wo.per_second),
        p50_with_over_without: Ratio::per_round(&w.p50_us, &wo.p50_us),
        throughput_sockmap_over_with: Ratio::per_round(&sm.per_second, &w.per_second),
        p50_sockmap_over_with: Ratio::per_round(&sm.p50_us, &w.p50_us),
        throughput_sockmap_over_without: Ratio::per_round(&sm.per_second, &wo.per_second),
        with_weft: w,
        without: wo,
        with_sockmap: sm,
    })
}

/// weft's programs per exchange over an extra burst of `client`, statistics on.
fn kernel_profile(
    node: &Node,
    agent: &Agent,
    client: &mut RrClient,
    count: u64,
) -> Result<Vec<ProgramProfile>> {
    let _stats = BpfStats::enable()?;
    let before = program_stats(node, agent)?;
    client.burst(count)?;
    client.report()?;
    Ok(profile(&before, &program_stats(node, agent)?, count))
}
