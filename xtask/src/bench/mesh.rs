//! `mesh`: what the secure overlay costs, on two simulated nodes. A meshed client pod on node
//! a talks to a meshed server pod on node b through the agents' mutual TLS tunnels; the
//! plaintext baseline is a non-meshed pod beside the client (same node, same weft programs)
//! talking to the same server, which accepts plaintext (PERMISSIVE). In the same rounds,
//! interleaved in bursts:
//!
//! - connect + 64 B each way + close (a new connection per exchange);
//! - 64 B request/response over 8 open connections;
//!   for these two a [`Floor`]: the least three connections and AES-GCM alone would add;
//! - bulk: 64 KiB each way per exchange over one connection;
//! - a single stream: 16 MiB one way per exchange (one byte back) over one connection, the
//!   issue's "single-stream bulk throughput" (ztunnel's anchor was iperf3's one stream);
//!   for these two a [`Ceiling`]: what three connections and AES-GCM alone allow;
//! - a meshed pod's connections to a non-meshed pod against the non-meshed pod's own (what
//!   the mesh costs traffic it does not carry: nothing, the kernel decides at connect; the
//!   client is never delivered to, so its namespace has no routing rule of the mesh);
//! - authorization: the meshed client's new connections to `guarded`, which 1 000
//!   AuthorizationPolicies select (999 DENY of other callers by exact principal, principal
//!   prefix or suffix, and address block, and the ALLOW that admits the client: a decision
//!   taken afresh tries those its caller index offers; the pod's policy remembers it
//!   for the same caller and port until the next pass), against its connections to
//!   `server`, which no policy selects: two pods of the same node with the same server on
//!   the same CPU.
//!
//! Then how soon a change of one policy among the 1 000 takes effect for new connections
//! (a DENY of the client's principal on `guarded` put in and taken out), the agents' CPU per
//! 1 000 requests/s of 1 KiB (both agents, meshed and plaintext) and their context switches
//! per meshed request,
//! their resident memory with the mesh and without (at idle, fresh agents), and the time a
//! killed client-side agent's successor takes to carry meshed connections again.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, AgentOptions, Cluster, Node, k8s, proc::Process};

use super::{
    MIN_ROUNDS, Pinning, Ratio, RrClient, context_switches, cpu_seconds, interleaved_round, median,
    rr_server, rss_kib, spread,
};

/// Server ports, by exchange size.
const PORT_64: u16 = 8064;
const PORT_1K: u16 = 8102;
const PORT_64K: u16 = 8165;
/// One way: a request of [`STREAM`] bytes, answered with one byte.
const PORT_STREAM: u16 = 8166;
/// The same, read in [`PIECE`]s into one buffer (the ceiling's connections: a proxy's
/// buffers, not a 16 MiB one on each side).
const PORT_STREAM_PIECES: u16 = 8167;
const PIECE: usize = 256 << 10;
/// A single stream's unit: 16 MiB sent, one byte back (the pause between two is one round
/// trip per 16 MiB).
const STREAM: usize = 16 << 20;

/// The client's target before and after the mesh: p50 within plaintext + this.
const CONNECT_BUDGET_US: f64 = 80.0;
const ESTABLISHED_BUDGET_US: f64 = 40.0;
/// Bulk throughput: at least this share of plaintext's.
const BULK_TARGET: f64 = 0.5;
/// AuthorizationPolicies selecting `guarded`.
const POLICIES: usize = 1000;
/// Their cost to a new meshed connection: p50 within this ratio of none.
const AUTHZ_BUDGET_RATIO: f64 = 1.05;
/// A policy change takes effect for new connections within this (p99).
const CHANGE_BUDGET_MS: f64 = 100.0;
/// Policy changes measured (half refusing the client, half admitting it again).
const CHANGES: usize = 40;

#[derive(Debug, Default, Serialize)]
struct Side {
    per_second: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

impl Side {
    fn add(&mut self, v: &Value) {
        for (field, into) in [
            ("per_second", &mut self.per_second),
            ("p50_us", &mut self.p50_us),
            ("p99_us", &mut self.p99_us),
        ] {
            into.push(v[field].as_f64().unwrap_or(f64::NAN));
        }
    }
}

/// One workload, two variants.
#[derive(Debug, Serialize)]
struct Compared {
    name: &'static str,
    /// What each side is.
    variants: [&'static str; 2],
    first: Side,
    second: Side,
    /// p50 of the first minus the second, per round (µs), and its median and range.
    p50_added_us: Vec<f64>,
    p50_added_median_us: f64,
    p50_added_range_us: (f64, f64),
    /// Exchanges per second, first / second, per round.
    throughput_ratio: Ratio,
    /// p50, first / second.
    p50_ratio: Ratio,
    /// For a stream of bytes: the most the first / second throughput can be here.
    ceiling: Option<Ceiling>,
    /// For a request's latency: the least the first can add to the second here.
    floor: Option<Floor>,
}

/// What bounds a stream of bytes through the mesh on one CPU, measured in the same run in
/// rounds of its own (beside each of the meshed client's). A meshed exchange crosses three TCP connections where plaintext crosses one: the
/// client to its agent and the agent to the server (each at least the work of a loopback
/// connection in the server's pod carrying the same bytes), and the tunnel (at least that
/// of a connection from node a's namespace to the server: its path); and every byte is
/// sealed and opened once with AES-128-GCM. With nothing else (no HTTP/2, no wake-up of its
/// own, the agents' copies as cheap as those test clients'), plaintext's time per exchange
/// over that sum is the most the meshed/plaintext ratio can be: an estimate, not a proof.
#[derive(Debug, Serialize)]
struct Ceiling {
    /// Plaintext in the ceiling's rounds (taken apart from the meshed client's).
    plaintext: Side,
    /// The same exchanges from node a's namespace to the server.
    node_path: Side,
    /// The same exchanges over one loopback connection in the server's pod.
    leg: Side,
    /// µs to seal and open an exchange's bytes, per round.
    crypto_us: Vec<f64>,
    /// Plaintext's time per exchange / (the node path's + two legs' + the crypto's), per
    /// round.
    rounds: Vec<f64>,
    /// Rounds in which the meshed ratio exceeded that: the estimate does not bound them.
    exceeded: usize,
}

impl Ceiling {
    /// From the main rounds' meshed and plaintext sides and the ceiling's own rounds.
    fn of(
        meshed: &Side,
        plaintext: &Side,
        (plain, node_path, leg): (Side, Side, Side),
        crypto_us: Vec<f64>,
    ) -> Self {
        let us = |per_second: &f64| 1e6 / per_second;
        let rounds: Vec<f64> = plain
            .per_second
            .iter()
            .zip(&node_path.per_second)
            .zip(&leg.per_second)
            .zip(&crypto_us)
            .map(|(((plain, path), leg), crypto)| us(plain) / (us(path) + 2.0 * us(leg) + crypto))
            .collect();
        let exceeded = meshed
            .per_second
            .iter()
            .zip(&plaintext.per_second)
            .zip(&rounds)
            .filter(|((m, p), ceiling)| *m / *p > **ceiling)
            .count();
        Self {
            plaintext: plain,
            node_path,
            leg,
            crypto_us,
            rounds,
            exceeded,
        }
    }

    fn print(&self, reached: f64) {
        let (median, min, max) = spread(&self.rounds);
        let verdict = if let Some(not) = unbounded(&self.rounds, self.exceeded, "reaches more") {
            not
        } else if max < BULK_TARGET {
            format!(
                ": below {BULK_TARGET} in every round; by this estimate a proxy that copies every \
                 byte through user space cannot reach the target here; meshed reaches {:.2} of it",
                reached / median
            )
        } else {
            format!("; meshed reaches {:.2} of it", reached / median)
        };
        let per_exchange = |side: &Side| median_of(side.per_second.iter().map(|p| 1e6 / p));
        println!(
            "{:<30} ceiling: plaintext / (node path {:.1} µs + 2 loopback connections at {:.1} µs \
             + AES-128-GCM {:.1} µs per exchange) = {median:.3} (rounds {min:.3}-{max:.3}){verdict}",
            "",
            per_exchange(&self.node_path),
            per_exchange(&self.leg),
            median_of(self.crypto_us.iter().copied()),
        );
    }
}

/// What bounds the latency the mesh adds to an exchange on one CPU, measured in the same run
/// in rounds of their own. A meshed exchange is the client's connection to its agent, a
/// request on the tunnel, and the agent's connection to the server: each of the first and
/// last at least a loopback exchange of the same kind in the server's pod (a new connection
/// for a new connection), the tunnel at least a request/response on an open connection from
/// node a's namespace to the server (it is pooled: a new connection makes no handshake
/// between the nodes; its close is one more message one way, half a request), and its bytes
/// sealed and opened once with AES-128-GCM. Their p50s' sum less plaintext's p50 estimates
/// the least the mesh could add with nothing else (no HTTP/2, no wake-up of its own, the
/// agents' work as cheap as those test clients'). An estimate, not a proof, biased both
/// ways: a sum of p50s understates a sum of skewed latencies, and a new connection's leg
/// counts a thread the test server spawns for it, where the agent's end would spawn none.
#[derive(Debug, Serialize)]
struct Floor {
    /// Plaintext in the floor's rounds (taken apart from the meshed client's).
    plaintext: Side,
    /// Requests on an open connection from node a's namespace to the server.
    tunnel: Side,
    /// How many of those one meshed exchange costs the tunnel.
    tunnel_requests: f64,
    /// The workload's exchanges over loopback in the server's pod.
    leg: Side,
    /// µs to seal and open an exchange's bytes, per round.
    crypto_us: Vec<f64>,
    /// Two legs' p50 + the tunnel's requests' + the crypto's - plaintext's, per round (µs).
    rounds: Vec<f64>,
    /// Rounds in which the mesh added less than that: the estimate does not bound them.
    exceeded: usize,
}

impl Floor {
    /// From the main rounds' meshed and plaintext sides and the floor's own rounds.
    fn of(
        meshed: &Side,
        plaintext: &Side,
        (plain, tunnel, leg): (Side, Side, Side),
        crypto_us: Vec<f64>,
        tunnel_requests: f64,
    ) -> Self {
        let rounds: Vec<f64> = plain
            .p50_us
            .iter()
            .zip(&tunnel.p50_us)
            .zip(&leg.p50_us)
            .zip(&crypto_us)
            .map(|(((plain, tunnel), leg), crypto)| {
                2.0 * leg + tunnel_requests * tunnel + crypto - plain
            })
            .collect();
        let exceeded = meshed
            .p50_us
            .iter()
            .zip(&plaintext.p50_us)
            .zip(&rounds)
            .filter(|((m, p), floor)| *m - *p < **floor)
            .count();
        Self {
            plaintext: plain,
            tunnel,
            tunnel_requests,
            leg,
            crypto_us,
            rounds,
            exceeded,
        }
    }

    fn print(&self, budget_us: f64, added_us: f64) {
        let (median, min, max) = spread(&self.rounds);
        let rounds = self.rounds.len();
        let below = self.rounds.iter().filter(|r| **r < budget_us).count();
        let over = added_us - median;
        let verdict = if let Some(not) = unbounded(&self.rounds, self.exceeded, "adds less") {
            not
        } else if below == 0 {
            format!(
                ": above +{budget_us:.0} µs in every round; by this estimate a proxy with these \
                 three connections cannot meet the target here; the mesh adds {over:+.1} µs over it"
            )
        } else {
            format!(
                ": below +{budget_us:.0} µs in {below} of {rounds} rounds; the mesh adds \
                 {over:+.1} µs over it"
            )
        };
        let p50 = |side: &Side| median_of(side.p50_us.iter().copied());
        println!(
            "{:<30} floor: 2 loopback legs at {:.1} µs + {} × the tunnel's request {:.1} µs + \
             AES-128-GCM {:.1} µs - plaintext {:.1} µs (medians of the rounds' p50s); per round \
             {median:+.1} µs (median, rounds {min:+.1} to {max:+.1}){verdict}",
            "",
            p50(&self.leg),
            self.tunnel_requests,
            p50(&self.tunnel),
            median_of(self.crypto_us.iter().copied()),
            p50(&self.plaintext),
        );
    }
}

/// Why a bound's estimate, per round, does not bound the run: too few rounds, a broken one,
/// or the mesh on the wrong side of it (`beyond`: what it did) in `exceeded` of them; none
/// when it does.
fn unbounded(rounds: &[f64], exceeded: usize, beyond: &str) -> Option<String> {
    let bounds =
        rounds.len() >= MIN_ROUNDS && rounds.iter().all(|r| r.is_finite()) && exceeded == 0;
    (!bounds).then(|| {
        format!(
            "; the mesh {beyond} than the estimate in {exceeded} of {} rounds (or too few \
             rounds): it does not bound this run",
            rounds.len()
        )
    })
}

fn median_of(values: impl Iterator<Item = f64>) -> f64 {
    median(&values.collect::<Vec<_>>())
}

impl Compared {
    fn of(
        name: &'static str,
        variants: [&'static str; 2],
        first: Side,
        second: Side,
        (ceiling, floor): (Option<Ceiling>, Option<Floor>),
    ) -> Self {
        let added: Vec<f64> = first
            .p50_us
            .iter()
            .zip(&second.p50_us)
            .map(|(a, b)| a - b)
            .collect();
        let range = added
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |r, x| {
                (r.0.min(*x), r.1.max(*x))
            });
        Self {
            name,
            variants,
            throughput_ratio: Ratio::per_round(&first.per_second, &second.per_second),
            p50_ratio: Ratio::per_round(&first.p50_us, &second.p50_us),
            p50_added_median_us: median(&added),
            p50_added_range_us: range,
            p50_added_us: added,
            first,
            second,
            ceiling,
            floor,
        }
    }

    fn print(&self, budget_us: Option<f64>) {
        println!(
            "{:<30} {}: {:>7.0}/s p50 {:>7.1} µs p99 {:>7.1} µs | {}: {:>7.0}/s p50 {:>7.1} µs p99 {:>7.1} µs",
            self.name,
            self.variants[0],
            median(&self.first.per_second),
            median(&self.first.p50_us),
            median(&self.first.p99_us),
            self.variants[1],
            median(&self.second.per_second),
            median(&self.second.p50_us),
            median(&self.second.p99_us),
        );
        let budget = budget_us.map_or(String::new(), |b| {
            let verdict = if self.p50_added_range_us.1 <= b {
                "within"
            } else if self.p50_added_median_us <= b {
                "median within, not every round"
            } else {
                "MISSED"
            };
            format!(" (target +{b:.0} µs: {verdict})")
        });
        println!(
            "{:<30} p50 added {:+.1} µs (rounds {:+.1} to {:+.1}){budget}; throughput ratio {}; p50 ratio {}",
            "",
            self.p50_added_median_us,
            self.p50_added_range_us.0,
            self.p50_added_range_us.1,
            self.throughput_ratio.verdict,
            self.p50_ratio.verdict,
        );
    }
}

#[derive(Debug, Serialize)]
struct Cpu {
    requests_per_burst: u64,
    /// Both agents' CPU seconds per request × 1 000 (= vCPU per 1 000 requests/s), per round.
    meshed_vcpu_per_1k_rps: Vec<f64>,
    plaintext_vcpu_per_1k_rps: Vec<f64>,
    /// The busier agent's share (a node's figure, as ztunnel's is per node).
    meshed_busier_node_vcpu_per_1k_rps: Vec<f64>,
    /// Both agents' context switches per meshed request: on one CPU, what a request costs
    /// is mostly the wake-ups of the processes it passes through.
    meshed_switches_per_request: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Memory {
    /// Resident memory (KiB) of each node's agent, fresh and idle, meshed pods served.
    with_mesh_kib: [u64; 2],
    /// The same after every workload (pooled tunnels open, idle).
    with_mesh_after_load_kib: [u64; 2],
    /// Fresh agents of the same nodes, no CA, no pod meshed.
    without_mesh_kib: [u64; 2],
}

#[derive(Debug, Serialize)]
pub struct MeshResult {
    scenario: &'static str,
    pinning: Pinning,
    rounds: usize,
    workloads: Vec<Compared>,
    cpu: Cpu,
    memory: Memory,
    /// From writing a changed policy to the client's new connections taking it, per change
    /// (ms): the flip client tries every millisecond.
    authz_change_ms: Vec<f64>,
    /// A killed client-side agent's successor: ms from its spawn to the first meshed
    /// connection carried, per try (tried while it starts; it reports ready later, after
    /// the kernel verified its programs). A meshed connect while no agent listens is
    /// refused (the pinned programs capture it), so a success is one the new agent carried.
    restart_to_first_meshed_ms: Vec<f64>,
}

impl MeshResult {
    pub fn print(&self) {
        println!(
            "\nmesh: two nodes, a meshed client to a meshed server through mutual TLS against a non-meshed client beside it in plaintext (median of {} rounds; clients on CPU {}, servers on CPU {}, agents: {})",
            self.rounds, self.pinning.client_cpu, self.pinning.server_cpu, self.pinning.agent
        );
        let budgets = [
            Some(CONNECT_BUDGET_US),
            Some(ESTABLISHED_BUDGET_US),
            None,
            None,
            None,
            None,
        ];
        for (w, budget) in self.workloads.iter().zip(budgets) {
            w.print(budget);
            if let (Some(f), Some(b)) = (&w.floor, budget) {
                f.print(b, w.p50_added_median_us);
            }
        }
        for (i, what) in [
            (2, "bulk throughput (64 KiB each way)"),
            (3, "single-stream throughput"),
        ] {
            let r = &self.workloads[i].throughput_ratio;
            let verdict = if r.min >= BULK_TARGET {
                "met"
            } else if r.median >= BULK_TARGET {
                "median met, not every round"
            } else {
                "MISSED"
            };
            println!(
                "{:<30} {what} meshed/plaintext {} (target ≥ {BULK_TARGET}: {verdict})",
                "", r.verdict,
            );
            if let Some(c) = &self.workloads[i].ceiling {
                c.print(r.median);
            }
        }
        let stream = &self.workloads[3];
        let mib_s = |side: &Side| median(&side.per_second) * (STREAM >> 20) as f64;
        println!(
            "{:<30} single stream: meshed {:.0} MiB/s, plaintext {:.0} MiB/s",
            "",
            mib_s(&stream.first),
            mib_s(&stream.second),
        );
        let authz = &self.workloads[5].p50_ratio;
        println!(
            "{:<30} p50 with {POLICIES} policies / none {} (target ≤ {AUTHZ_BUDGET_RATIO}: {})",
            "",
            authz.verdict,
            if !authz.measurable {
                "no measurable difference"
            } else if authz.max <= AUTHZ_BUDGET_RATIO {
                "met"
            } else if authz.median <= AUTHZ_BUDGET_RATIO {
                "median met, not every round"
            } else {
                "MISSED"
            }
        );
        let mut change = self.authz_change_ms.clone();
        change.sort_by(f64::total_cmp);
        let max = change.last().copied().unwrap_or(f64::NAN);
        println!(
            "{:<30} {} changes: p50 {:.1} ms, max {:.1} ms (≥ p99) from just before the file's write to new connections taking it (target p99 ≤ {CHANGE_BUDGET_MS} ms: {})",
            "authorization change",
            change.len(),
            median(&change),
            max,
            if max <= CHANGE_BUDGET_MS {
                "met"
            } else {
                "MISSED"
            }
        );
        let c = &self.cpu;
        println!(
            "{:<30} meshed {:.4} vCPU (busier node {:.4}), plaintext {:.4} vCPU per 1 000 requests/s of 1 KiB, both agents (target ≤ 0.03 per node)",
            "agent CPU",
            median(&c.meshed_vcpu_per_1k_rps),
            median(&c.meshed_busier_node_vcpu_per_1k_rps),
            median(&c.plaintext_vcpu_per_1k_rps),
        );
        println!(
            "{:<30} {:.2} context switches of the two agents per meshed request (median of rounds)",
            "agent wake-ups",
            median(&c.meshed_switches_per_request),
        );
        let m = &self.memory;
        for (i, node) in ["a (client)", "b (server)"].iter().enumerate() {
            println!(
                "{:<30} node {node}: {} KiB with the mesh at idle, {} KiB after the load, {} KiB without the mesh: added {} KiB at idle (target ≤ 8192)",
                "agent memory",
                m.with_mesh_kib[i],
                m.with_mesh_after_load_kib[i],
                m.without_mesh_kib[i],
                m.with_mesh_kib[i].saturating_sub(m.without_mesh_kib[i]),
            );
        }
        println!(
            "{:<30} {:?} ms from a killed agent's successor's spawn to its first meshed connection (median {:.0} ms)",
            "restart",
            self.restart_to_first_meshed_ms
                .iter()
                .map(|v| v.round())
                .collect::<Vec<_>>(),
            median(&self.restart_to_first_meshed_ms)
        );
    }
}

/// `client` and `plain` on node a, `server`, `guarded` and `plainsrv` on node b; `client`,
/// `server` and `guarded` meshed when `meshed`, with [`POLICIES`] AuthorizationPolicies
/// selecting `guarded` when `policies`.
fn source(c: &Cluster, meshed: bool, policies: bool) -> String {
    let mut docs = Vec::new();
    for (pod, in_mesh) in [
        ("client", true),
        ("plain", false),
        ("server", true),
        ("guarded", true),
        ("plainsrv", false),
    ] {
        let mut labels = vec![("app", pod)];
        if in_mesh && meshed {
            labels.push(("weft.io/mesh", "enabled"));
        }
        let doc = k8s::pod(c.pod(pod).1, "bench", &labels, &[], true);
        docs.push(if pod == "server" || pod == "guarded" {
            doc.replace("spec:\n", &format!("spec:\n  serviceAccountName: {pod}\n"))
        } else {
            doc
        });
    }
    if policies {
        docs.extend(guarding_policies());
    }
    k8s::file(&docs)
}

/// [`POLICIES`] AuthorizationPolicies selecting `guarded`: DENY of callers no pod is, named
/// in turn by exact principal, principal prefix, principal suffix, and address block; then
/// the ALLOW of the client's principal (service account `default`). A decision taken afresh
/// without an index checks every one.
fn guarding_policies() -> Vec<String> {
    let policy = |name: String, action: &str, source: String| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: guarded}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {source}}}]\n"
        )
    };
    let mut out: Vec<String> = (1..POLICIES)
        .map(|i| {
            let source = match i % 4 {
                0 => format!("{{principals: [cluster.local/ns/bench/sa/nobody-{i}]}}"),
                1 => format!("{{principals: [\"cluster.local/ns/team-{i}/*\"]}}"),
                2 => format!("{{principals: [\"*/sa/nobody-{i}\"]}}"),
                // 198.18.0.0/15 is for benchmarks: no pod has it.
                _ => format!("{{ipBlocks: [198.18.{}.{}/32]}}", i / 256, i % 256),
            };
            policy(format!("deny-{i}"), "DENY", source)
        })
        .collect();
    out.push(policy(
        "allow-client".to_owned(),
        "ALLOW",
        "{principals: [cluster.local/ns/bench/sa/default]}".to_owned(),
    ));
    out
}

fn agent(bins: &Path, c: &Cluster, pin: &Pinning, node: &str, ca: Option<&Path>) -> Result<Agent> {
    let mut extra = vec!["--node-name".to_owned(), node.to_owned()];
    if let Some(ca) = ca {
        extra.extend(["--mesh-ca".to_owned(), ca.display().to_string()]);
    }
    let options = AgentOptions {
        source: true,
        source_dir: Some(c.source_dir()),
        extra_args: extra,
        log_level: "warn,weft::app=info".into(),
        stats_interval: "60s".into(),
        binary: Some(bins.join("weft")),
        ..AgentOptions::default()
    };
    pin.as_agent(|| Agent::start_with(c.node(node), options))
}

/// Waits until `agent` listens for `pod` with a certificate.
fn wait_meshed(agent: &Agent, pod: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = agent.client("certs");
        let listening = v["pods"].as_array().is_some_and(|pods| {
            pods.iter().any(|p| {
                p["pod"] == pod && p["listeners"].as_array().is_some_and(|l| !l.is_empty())
            })
        });
        let held = v["identities"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i["certificate"]["serial"].is_string()));
        if listening && held {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{pod} not meshed after 30 s: {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `agent` lists the [`POLICIES`] policies.
fn wait_policies(agent: &Agent) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = agent.client("authz");
        let listed = v["policies"].as_array().map_or(0, Vec::len);
        if listed >= POLICIES {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{listed} policies in force after 60 s, not {POLICIES}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The keep-alive servers of `pod`, one per size, on the server CPU.
/// Keep-alive servers in `pod`: (request bytes, answer bytes, port).
fn servers(node: &Node, pod: &str, pin: &Pinning, sizes: &[(usize, usize, u16)]) -> Vec<Process> {
    sizes
        .iter()
        .map(|&(size, reply, port)| rr_server(node, (pod, true), pin, (size, reply), (port, None)))
        .collect()
}

pub fn run(bins: &Path, pin: &Pinning, rounds: usize) -> Result<MeshResult> {
    let c = Cluster::builder("xtask-bench-mesh")
        .pod_tool(&bins.join("weft-pod"))
        .node("a", &["client", "plain"])
        .node("b", &["server", "guarded", "plainsrv"])
        .build();
    let ca = c.source_dir().with_file_name("ca");
    let _ = std::fs::remove_dir_all(&ca);
    let made = Command::new(bins.join("weft"))
        .args(["ca", "init"])
        .arg(&ca)
        .output()?;
    if !made.status.success() {
        bail!("weft ca init: {}", String::from_utf8_lossy(&made.stderr));
    }
    // Fresh agents without the mesh first: their memory is the baseline.
    c.write_source("pods.yaml", &source(&c, false, false));
    let without_mesh_kib = idle_memory(bins, &c, pin, None)?;
    c.write_source("pods.yaml", &source(&c, true, false));
    let mut agents = [
        agent(bins, &c, pin, "a", Some(&ca))?,
        agent(bins, &c, pin, "b", Some(&ca))?,
    ];
    wait_meshed(&agents[0], "bench/client")?;
    wait_meshed(&agents[1], "bench/server")?;
    wait_meshed(&agents[1], "bench/guarded")?;
    std::thread::sleep(Duration::from_secs(2));
    let with_mesh_kib = [rss_kib(agents[0].pid())?, rss_kib(agents[1].pid())?];
    // The policies after the idle figure: it is the mesh's alone.
    c.write_source("pods.yaml", &source(&c, true, true));
    wait_policies(&agents[1])?;
    let server_node = c.pod("server").0;
    let sizes = [
        (64, 64, PORT_64),
        (1024, 1024, PORT_1K),
        (65_536, 65_536, PORT_64K),
        (STREAM, 1, PORT_STREAM),
    ];
    let _servers = servers(server_node, "server", pin, &sizes);
    let _pieces = rr_server(
        server_node,
        ("server", true),
        pin,
        (STREAM, 1),
        (PORT_STREAM_PIECES, Some(PIECE)),
    );
    let _plain = servers(server_node, "plainsrv", pin, &sizes[..1]);
    let _guarded = servers(server_node, "guarded", pin, &sizes[..1]);
    let workloads = workloads(bins, &c, pin, rounds)?;
    let authz_change_ms = authz_change(&c, pin)?;
    let cpu = cpu(&c, pin, rounds, &agents)?;
    std::thread::sleep(Duration::from_secs(2));
    let with_mesh_after_load_kib = [rss_kib(agents[0].pid())?, rss_kib(agents[1].pid())?];
    let restart_to_first_meshed_ms = restarts(&c, pin, &mut agents[0])?;
    Ok(MeshResult {
        scenario: "mesh",
        pinning: pin.clone(),
        rounds,
        workloads,
        cpu,
        memory: Memory {
            with_mesh_kib,
            with_mesh_after_load_kib,
            without_mesh_kib,
        },
        authz_change_ms,
        restart_to_first_meshed_ms,
    })
}

/// The toggled policy: a DENY on `guarded` of the principal `sa`.
fn toggled(sa: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: toggled, namespace: bench}}\nspec:\n  selector: {{matchLabels: {{app: guarded}}}}\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/bench/sa/{sa}]}}}}]\n"
    )
}

/// [`CHANGES`] times: the toggled policy denies the client, then someone else; a `flip`
/// client in the client pod, told as each file is written, reports when its connections to
/// `guarded` changed outcome.
fn authz_change(c: &Cluster, pin: &Pinning) -> Result<Vec<f64>> {
    c.write_source("toggled.yaml", &toggled("nobody"));
    std::thread::sleep(Duration::from_secs(1));
    let target = format!("{}:{}", c.pod("guarded").1.ipv4, PORT_64);
    let args = pin.client(&["flip", "--connect", &target]);
    let (name, command) = c.pod("client").0.pod_command("client", true, &args);
    let mut flip = Process::spawn_interactive(&name, command);
    let mut out = Vec::new();
    for i in 0..CHANGES {
        let refuse = i % 2 == 0;
        let (sa, want) = if refuse {
            ("default", "refused")
        } else {
            ("nobody", "served")
        };
        // Told first: the time counts from before the write.
        flip.try_send_line(want)?;
        c.write_source("toggled.yaml", &toggled(sa));
        let v = flip.stdout().wait_for(
            &format!("policy change {}", i + 1),
            Duration::from_secs(10),
            |lines| {
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|v| v["event"] == "flipped" || v["event"] == "timeout")
                    .nth(i)
            },
        );
        match v["ms"].as_f64() {
            Some(ms) => out.push(ms),
            None => bail!("policy change {}: not in force after 5 s ({v})", i + 1),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(out)
}

/// Resident memory of fresh, idle agents of both nodes (stopped after).
fn idle_memory(bins: &Path, c: &Cluster, pin: &Pinning, ca: Option<&Path>) -> Result<[u64; 2]> {
    let mut agents = [agent(bins, c, pin, "a", ca)?, agent(bins, c, pin, "b", ca)?];
    std::thread::sleep(Duration::from_secs(3));
    let kib = [rss_kib(agents[0].pid())?, rss_kib(agents[1].pid())?];
    for a in &mut agents {
        a.stop();
    }
    Ok(kib)
}

/// A client of `pod` to `target_pod:port` with `extra` `rr` arguments.
fn client(c: &Cluster, pin: &Pinning, pod: &str, to: (&str, u16), extra: &[&str]) -> RrClient {
    let target = format!("{}:{}", c.pod(to.0).1.ipv4, to.1);
    let what = format!("{pod} -> {}:{}", to.0, to.1);
    RrClient::start(c.pod(pod).0, (pod, true), pin, &target, extra, &what)
}

/// (name, variants, clients as (pod, target pod, port), extra arguments, per round, burst,
/// and how its bound is measured).
type Spec = (
    &'static str,
    [&'static str; 2],
    [(&'static str, &'static str, u16); 2],
    &'static [&'static str],
    u64,
    u64,
    Option<BoundSpec>,
);

/// What bounds a workload: a [`Ceiling`] (a stream of bytes' throughput) or a [`Floor`] (a
/// request's latency).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    Ceiling,
    /// With the tunnel's requests one meshed exchange costs.
    Floor(f64),
}

/// How a workload's bound is measured: the bytes an exchange carries both ways (each sealed
/// and opened once), the meshed client's server's port for the bound's connections, and
/// the extra `rr` arguments of the node path's client and of the loopback leg's.
#[derive(Debug, Clone, Copy)]
struct BoundSpec {
    bound: Bound,
    sealed: usize,
    port: u16,
    node_path: &'static [&'static str],
    leg: &'static [&'static str],
}

/// The bulk workload's `rr` arguments.
const BULK: &[&str] = &["--size", "65536", "--keepalive", "1"];
/// The single stream's, read in [`PIECE`]s (its bound's connections).
const STREAM_PIECES: &[&str] = &[
    "--size",
    "16777216",
    "--reply",
    "1",
    "--keepalive",
    "1",
    "--chunk",
    "262144",
];

const WORKLOADS: [Spec; 6] = [
    (
        "connect + 64 B + close",
        ["meshed", "plaintext"],
        [("client", "server", PORT_64), ("plain", "server", PORT_64)],
        &["--size", "64"],
        2_000,
        100,
        Some(BoundSpec {
            // The tunnel is open: its part of a new connection is a request on it, and
            // half of one for the close (a message one way).
            bound: Bound::Floor(1.5),
            sealed: 2 * 64,
            port: PORT_64,
            node_path: &["--size", "64", "--keepalive", "1"],
            leg: &["--size", "64"],
        }),
    ),
    (
        "64 B over 8 open connections",
        ["meshed", "plaintext"],
        [("client", "server", PORT_64), ("plain", "server", PORT_64)],
        &["--size", "64", "--keepalive", "8"],
        20_000,
        500,
        Some(BoundSpec {
            bound: Bound::Floor(1.0),
            sealed: 2 * 64,
            port: PORT_64,
            node_path: &["--size", "64", "--keepalive", "8"],
            leg: &["--size", "64", "--keepalive", "8"],
        }),
    ),
    (
        "bulk 64 KiB, one connection",
        ["meshed", "plaintext"],
        [
            ("client", "server", PORT_64K),
            ("plain", "server", PORT_64K),
        ],
        BULK,
        2_000,
        100,
        Some(BoundSpec {
            bound: Bound::Ceiling,
            sealed: 2 * 65_536,
            port: PORT_64K,
            node_path: BULK,
            leg: BULK,
        }),
    ),
    (
        "stream 16 MiB one way",
        ["meshed", "plaintext"],
        [
            ("client", "server", PORT_STREAM),
            ("plain", "server", PORT_STREAM),
        ],
        &["--size", "16777216", "--reply", "1", "--keepalive", "1"],
        48,
        4,
        Some(BoundSpec {
            bound: Bound::Ceiling,
            sealed: STREAM + 1,
            port: PORT_STREAM_PIECES,
            node_path: STREAM_PIECES,
            leg: STREAM_PIECES,
        }),
    ),
    (
        "to a non-meshed pod, connect",
        ["meshed pod", "mesh off"],
        [
            ("client", "plainsrv", PORT_64),
            ("plain", "plainsrv", PORT_64),
        ],
        &["--size", "64"],
        2_000,
        100,
        None,
    ),
    (
        "connect, 1 000 AuthzPolicies",
        ["1 000 policies", "none"],
        [
            ("client", "guarded", PORT_64),
            ("client", "server", PORT_64),
        ],
        &["--size", "64"],
        2_000,
        100,
        None,
    ),
];

fn workloads(bins: &Path, c: &Cluster, pin: &Pinning, rounds: usize) -> Result<Vec<Compared>> {
    let mut out = Vec::new();
    // The bounds' model holds when one CPU does all of an exchange's work.
    let one_cpu = pin.client_cpu == pin.server_cpu && pin.agent_cpu == Some(pin.client_cpu);
    for (name, variants, ends, extra, count, burst, bound) in WORKLOADS {
        let bound = bound.filter(|_| one_cpu);
        let mut clients = ends.map(|(pod, to, port)| client(c, pin, pod, (to, port), extra));
        let mut bounds: Vec<RrClient> = bound
            .map(|spec| bound_clients(c, pin, ends[0].1, &spec))
            .into_iter()
            .flatten()
            .collect();
        for cl in clients.iter_mut().chain(&mut bounds) {
            cl.burst(burst)?;
            cl.report()?;
        }
        let mut sides: [Side; 2] = Default::default();
        // Plaintext again, the node path, the leg: the bound's rounds.
        let mut bound_sides: [Side; 3] = Default::default();
        let mut crypto_us = Vec::new();
        for r in 0..rounds {
            eprintln!("bench mesh: {name}: round {}/{rounds}", r + 1);
            let [a, b] = &mut clients;
            let reports = interleaved_round(&mut [a, b], r, count, burst)?;
            for (side, report) in sides.iter_mut().zip(&reports) {
                side.add(report);
            }
            // Apart from the meshed client's turns, so that its figure is the same with or
            // without a bound (more clients between its bursts would empty the agents'
            // caches).
            if let Some(spec) = bound {
                let [_, plain] = &mut clients;
                let mut turns: Vec<&mut RrClient> =
                    std::iter::once(plain).chain(bounds.iter_mut()).collect();
                let reports = interleaved_round(&mut turns, r, count, burst)?;
                for (side, report) in bound_sides.iter_mut().zip(&reports) {
                    side.add(report);
                }
                crypto_us.push(aead_us(bins, pin, spec.sealed)?);
            }
        }
        let [first, second] = sides;
        let [plain, node_path, leg] = std::mem::take(&mut bound_sides);
        let m = (plain, node_path, leg);
        let bounds = match bound.map(|b| b.bound) {
            Some(Bound::Ceiling) => (Some(Ceiling::of(&first, &second, m, crypto_us)), None),
            Some(Bound::Floor(k)) => (None, Some(Floor::of(&first, &second, m, crypto_us, k))),
            None => (None, None),
        };
        out.push(Compared::of(name, variants, first, second, bounds));
    }
    Ok(out)
}

/// A bound's two connections to `pod`'s server: from node a's namespace (the tunnel's path,
/// from where the agent opens it) and one inside the pod to its own address (where the
/// agent delivers); both clients outside weft's cgroups, as the agent's sockets are.
fn bound_clients(c: &Cluster, pin: &Pinning, pod: &str, spec: &BoundSpec) -> [RrClient; 2] {
    let (node, addresses) = c.pod(pod);
    let port = spec.port;
    let target = format!("{}:{port}", addresses.ipv4);
    let node_path = RrClient::on_node(
        c.node("a"),
        pin,
        &target,
        spec.node_path,
        &format!("node a -> {pod}:{port} (the tunnel's path)"),
    );
    let leg = RrClient::start(
        node,
        (pod, false),
        pin,
        &target,
        spec.leg,
        &format!("{pod} -> itself:{port} (loopback)"),
    );
    [node_path, leg]
}

/// µs to seal and open `bytes` with AES-128-GCM in 16 KiB records (`weft-pod aead`, the
/// mesh's cipher on the same library), on the client CPU: the least of 20 runs (a bound
/// wants the cheapest credible crypto).
fn aead_us(bins: &Path, pin: &Pinning, bytes: usize) -> Result<f64> {
    let bytes = bytes.to_string();
    let args = pin.client(&["aead", "--bytes", &bytes, "--repeat", "20"]);
    let out = Command::new(bins.join("weft-pod")).args(&args).output()?;
    if !out.status.success() {
        bail!(
            "weft-pod aead: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("weft-pod aead's output")?;
    v["min_us"].as_f64().context("weft-pod aead: no min_us")
}

/// Both agents' CPU over bursts of 1 KiB requests on 8 open connections, meshed and
/// plaintext in turn (the order alternating by round).
fn cpu(c: &Cluster, pin: &Pinning, rounds: usize, agents: &[Agent; 2]) -> Result<Cpu> {
    const REQUESTS: u64 = 20_000;
    let extra = ["--size", "1024", "--keepalive", "8"];
    let mut clients = [
        client(c, pin, "client", ("server", PORT_1K), &extra),
        client(c, pin, "plain", ("server", PORT_1K), &extra),
    ];
    let mut out = Cpu {
        requests_per_burst: REQUESTS,
        meshed_vcpu_per_1k_rps: Vec::new(),
        plaintext_vcpu_per_1k_rps: Vec::new(),
        meshed_busier_node_vcpu_per_1k_rps: Vec::new(),
        meshed_switches_per_request: Vec::new(),
    };
    for cl in &mut clients {
        cl.burst(1_000)?;
        cl.report()?;
    }
    let pids = [agents[0].pid(), agents[1].pid()];
    for r in 0..rounds {
        eprintln!("bench mesh: agent CPU: round {}/{rounds}", r + 1);
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let switches =
                || -> Result<u64> { Ok(context_switches(pids[0])? + context_switches(pids[1])?) };
            let (before, switched) = ([cpu_seconds(pids[0])?, cpu_seconds(pids[1])?], switches()?);
            clients[i].burst(REQUESTS)?;
            clients[i].report()?;
            let used = [
                cpu_seconds(pids[0])? - before[0],
                cpu_seconds(pids[1])? - before[1],
            ];
            let switched = switches()?.saturating_sub(switched);
            let per_1k = |s: f64| s * 1000.0 / REQUESTS as f64;
            if i == 0 {
                out.meshed_vcpu_per_1k_rps.push(per_1k(used[0] + used[1]));
                out.meshed_busier_node_vcpu_per_1k_rps
                    .push(per_1k(used[0].max(used[1])));
                out.meshed_switches_per_request
                    .push(switched as f64 / REQUESTS as f64);
            } else {
                out.plaintext_vcpu_per_1k_rps
                    .push(per_1k(used[0] + used[1]));
            }
        }
    }
    Ok(out)
}

/// Kills the client node's agent and starts another, three times: ms from the spawn to the
/// first meshed connection carried (tried every 10 ms from the spawn on, while the agent
/// starts).
fn restarts(c: &Cluster, pin: &Pinning, agent: &mut Agent) -> Result<Vec<f64>> {
    let target = format!("{}:{PORT_64}", c.pod("server").1.ipv4);
    let node: &Node = c.pod("client").0;
    let mut out = Vec::new();
    for _ in 0..3 {
        agent.kill();
        let started = Instant::now();
        let first = std::thread::scope(|s| {
            let prober = s.spawn(|| first_carried(node, &target, started));
            pin.as_agent(|| agent.restart())?;
            prober
                .join()
                .map_err(|_| anyhow::anyhow!("the prober panicked"))?
        })?;
        out.push(first.as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// Time from `started` to the first `rr` exchange with `target` from the client pod that
/// succeeds.
fn first_carried(node: &Node, target: &str, started: Instant) -> Result<Duration> {
    loop {
        let (name, mut command) =
            node.pod_command("client", true, &["rr", "--connect", target, "--count", "1"]);
        let ok = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| name.clone())?
            .success();
        if ok {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no meshed connection 30 s after the agent's restart");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(p50_us: &[f64]) -> Side {
        Side {
            per_second: vec![1.0; p50_us.len()],
            p50_us: p50_us.to_vec(),
            p99_us: p50_us.to_vec(),
        }
    }

    /// A round's floor is two legs, the tunnel's requests and the crypto less plaintext; a
    /// round in which the mesh added less than that is one the estimate does not bound.
    #[test]
    fn a_floor_is_two_legs_the_tunnel_and_the_crypto_less_plaintext() {
        let floor = Floor::of(
            &side(&[100.0, 50.0]),
            &side(&[25.0, 25.0]),
            (
                side(&[25.0, 26.0]),
                side(&[22.0, 22.0]),
                side(&[15.0, 16.0]),
            ),
            vec![1.0, 2.0],
            1.5,
        );
        assert_eq!(floor.rounds, [39.0, 41.0]);
        assert_eq!(floor.exceeded, 1);
    }
}
