//! `churn`: short TCP connections per second between two pods (connect, server closes,
//! client closes), with no program attached and with the weft agent attached (services,
//! policy and telemetry on), client and server pinned ([`Pinning`]). Every round runs each
//! variant in rotating order, so drift on the machine affects all alike; the median of the
//! per-round ratios is reported with their spread.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Node, proc::Process};

use super::{
    BpfStats, Other, Pinning, ProgramProfile, Ratio, agent_options, cpu_seconds, profile,
    program_stats,
};

#[derive(Debug, Serialize)]
pub struct ChurnResult {
    scenario: &'static str,
    pinning: Pinning,
    unit: &'static str,
    seconds_per_round: f64,
    baseline: Vec<f64>,
    weft: Vec<f64>,
    /// weft / baseline per round.
    ratio: Ratio,
    /// CPU time the agent process spent per connection (user + system), microseconds.
    agent_cpu_us_per_connection: Vec<f64>,
    /// Kernel time of weft's programs per connection, from BPF run-time statistics in an
    /// extra round (statistics add their own cost, so that round is not in the ratios).
    kernel: Vec<ProgramProfile>,
    kernel_ns_per_connection: f64,
    /// With `--compare`: the other build, measured in the same rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<Compare>,
}

/// Another agent (build or arguments) in the same rounds (each round runs no agent, this
/// build and that one in rotating order).
#[derive(Debug, Serialize)]
struct Compare {
    /// Its `weft` and extra arguments.
    binary: String,
    rates: Vec<f64>,
    /// compare / no agent per round.
    ratio: Ratio,
    /// this build / that build per round.
    this_over_that: Ratio,
    /// That build's agent CPU per connection, µs, per round.
    agent_cpu_us_per_connection: Vec<f64>,
    /// This build's agent CPU per connection over that build's, per round.
    agent_cpu_this_over_that: Ratio,
}

impl ChurnResult {
    pub fn print(&self) {
        println!(
            "\nchurn: short TCP connections per second between two pods (higher is better; client on CPU {}, server on CPU {})",
            self.pinning.client_cpu, self.pinning.server_cpu
        );
        println!(
            "{:>5} {:>14} {:>14} {:>8} {:>18}",
            "round", "no agent", "weft", "ratio", "agent CPU µs/conn"
        );
        for i in 0..self.ratio.rounds.len() {
            println!(
                "{:>5} {:>14.0} {:>14.0} {:>8.3} {:>18.2}",
                i + 1,
                self.baseline[i],
                self.weft[i],
                self.ratio.rounds[i],
                self.agent_cpu_us_per_connection[i]
            );
        }
        println!("weft / no agent: {}", self.ratio.verdict);
        if let Some(c) = &self.compare {
            println!("compared with {}:", c.binary);
            for (i, (rate, ratio)) in c.rates.iter().zip(&c.ratio.rounds).enumerate() {
                println!(
                    "  round {:>2}: {rate:>8.0} conn/s, ratio {ratio:.3}, this/that {:.3}",
                    i + 1,
                    c.this_over_that.rounds[i]
                );
            }
            println!("  that / no agent: {}", c.ratio.verdict);
            println!("  this build / that build: {}", c.this_over_that.verdict);
            println!(
                "  agent CPU per connection, this build / that build: {}",
                c.agent_cpu_this_over_that.verdict
            );
        }
        println!("kernel programs per connection (both ends, from BPF run-time statistics):");
        for p in &self.kernel {
            p.print();
        }
        println!(
            "  {:<18} {:>34.0} ns",
            "total", self.kernel_ns_per_connection
        );
    }
}

/// One churn run from `client` to the `server` pod's port 8080: (connections per second,
/// connections).
pub(crate) fn churn_once(node: &Node, pin: &Pinning, seconds: f64) -> Result<(f64, u64)> {
    let server = format!("{}:8080", node.pod("server").ipv4);
    let seconds_s = seconds.to_string();
    let mut c = node.spawn(
        "client",
        &pin.client(&["churn", "--connect", &server, "--seconds", &seconds_s]),
    );
    c.wait_success(Duration::from_secs_f64(seconds + 30.0));
    let v: Value = c
        .stdout()
        .wait_for("churn result", Duration::from_secs(5), |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "churn")
            })
        });
    Ok((
        v["per_second"].as_f64().context("per_second")?,
        v["connections"].as_u64().context("connections")?,
    ))
}

fn profile_round(
    node: &Node,
    pin: &Pinning,
    bins: &Path,
    seconds: f64,
) -> Result<Vec<ProgramProfile>> {
    let _stats = BpfStats::enable()?;
    let agent = pin.start_agent(node, agent_options(bins))?;
    let before = program_stats(node, &agent)?;
    let (_, conns) = churn_once(node, pin, seconds)?;
    let out = profile(&before, &program_stats(node, &agent)?, conns);
    drop(agent);
    Ok(out)
}

/// A node with a `client` and a `server` pod whose server closes every connection at once,
/// warmed up (caches, ARP, the tools' first page faults). Keep the process: it is the server.
pub(crate) fn churn_node(bins: &Path, pin: &Pinning, name: &str) -> Result<(Node, Process)> {
    let node = Node::builder(name)
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("server")
        .build();
    let server = format!("{}:8080", node.pod("server").ipv4);
    let srv = node.spawn(
        "server",
        &pin.server(&["tcp-server", "--listen", &server, "--close-at-once"]),
    );
    srv.wait_listening();
    churn_once(&node, pin, 1.0)?;
    Ok((node, srv))
}

/// One measured round of a variant (None: no agent): (connections per second, agent CPU µs
/// per connection).
fn measure(
    node: &Node,
    pin: &Pinning,
    agent: Option<(&Path, &Other)>,
    seconds: f64,
) -> Result<(f64, f64)> {
    let Some((this, other)) = agent else {
        return Ok((churn_once(node, pin, seconds)?.0, 0.0));
    };
    let options = other.options(agent_options(other.bins(this)));
    let mut agent = pin.start_agent(node, options)?;
    let cpu_before = cpu_seconds(agent.pid())?;
    let (rate, conns) = churn_once(node, pin, seconds)?;
    // Let the agent drain the ring buffer before reading its CPU time.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_after = cpu_seconds(agent.pid())?;
    agent.stop();
    Ok((rate, (cpu_after - cpu_before) * 1e6 / conns.max(1) as f64))
}

pub fn churn(
    bins: &Path,
    pin: &Pinning,
    compare: Option<&Other>,
    seconds: f64,
    rounds: usize,
) -> Result<ChurnResult> {
    let pin = &pin.with_agent_on_client_cpu();
    let (node, _server) = churn_node(bins, pin, "xtask-bench-churn")?;
    let this = Other {
        bins: None,
        args: Vec::new(),
    };
    // Variants: no agent, this build, and the compared agent; rotated every round so none
    // always runs first (on a cooler or warmer machine).
    let variants: Vec<Option<(&Path, &Other)>> = std::iter::once(None)
        .chain(std::iter::once(Some((bins, &this))))
        .chain(compare.map(|c| Some((bins, c))))
        .collect();
    let mut rates = vec![Vec::new(); variants.len()];
    let (mut cpu, mut that_cpu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("bench churn: round {}/{rounds}", round + 1);
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let (rate, cpu_us) = measure(&node, pin, variants[v], seconds)?;
            rates[v].push(rate);
            if v == 2 {
                that_cpu.push(cpu_us);
            }
            if v == 1 {
                cpu.push(cpu_us);
            }
        }
    }
    eprintln!("bench churn: profiling round (BPF run-time statistics on)");
    let kernel = profile_round(&node, pin, bins, seconds)?;
    let compare = compare.map(|other| Compare {
        binary: other.label(bins),
        rates: rates[2].clone(),
        ratio: Ratio::per_round(&rates[2], &rates[0]),
        this_over_that: Ratio::per_round(&rates[1], &rates[2]),
        agent_cpu_this_over_that: Ratio::per_round(&cpu, &that_cpu),
        agent_cpu_us_per_connection: that_cpu,
    });
    Ok(ChurnResult {
        kernel_ns_per_connection: kernel.iter().map(|p| p.ns_per_unit).sum(),
        kernel,
        scenario: "churn",
        pinning: pin.clone(),
        unit: "connections per second",
        seconds_per_round: seconds,
        ratio: Ratio::per_round(&rates[1], &rates[0]),
        baseline: rates[0].clone(),
        weft: rates[1].clone(),
        agent_cpu_us_per_connection: cpu,
        compare,
    })
}
