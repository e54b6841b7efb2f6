//! `churn`: short TCP connections per second between two pods (connect, server closes,
//! client closes), with no program attached and with the weft agent attached. Rounds
//! alternate so drift on the machine affects both sides alike; the median ratio is reported.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, Node, proc::Process};

use super::{BpfStats, agent_options, bpftool_json, cpu_seconds, median, spread, verdict};

#[derive(Debug, Serialize)]
pub struct ChurnResult {
    scenario: &'static str,
    unit: &'static str,
    seconds_per_round: f64,
    baseline: Vec<f64>,
    weft: Vec<f64>,
    /// weft / baseline per round.
    ratios: Vec<f64>,
    median_ratio: f64,
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

/// Another build of the agent in the same rounds (each round runs no agent, this build and
/// that one in rotating order).
#[derive(Debug, Serialize)]
struct Compare {
    binary: String,
    rates: Vec<f64>,
    /// compare / no agent per round.
    ratios: Vec<f64>,
    median_ratio: f64,
    /// this build / that build per round.
    this_over_that: Vec<f64>,
    this_over_that_median: f64,
    this_over_that_min: f64,
    this_over_that_max: f64,
}

#[derive(Debug, Serialize)]
struct ProgramProfile {
    program: String,
    runs_per_connection: f64,
    ns_per_run: f64,
    ns_per_connection: f64,
}

impl ChurnResult {
    pub fn print(&self) {
        println!("\nchurn: short TCP connections per second between two pods (higher is better)");
        println!(
            "{:>5} {:>14} {:>14} {:>8} {:>18}",
            "round", "no agent", "weft", "ratio", "agent CPU µs/conn"
        );
        for i in 0..self.ratios.len() {
            println!(
                "{:>5} {:>14.0} {:>14.0} {:>8.3} {:>18.2}",
                i + 1,
                self.baseline[i],
                self.weft[i],
                self.ratios[i],
                self.agent_cpu_us_per_connection[i]
            );
        }
        println!("median ratio weft / no agent: {:.3}", self.median_ratio);
        if let Some(c) = &self.compare {
            println!("compared with {}:", c.binary);
            for (i, (rate, ratio)) in c.rates.iter().zip(&c.ratios).enumerate() {
                println!(
                    "  round {:>2}: {rate:>8.0} conn/s, ratio {ratio:.3}, this/that {:.3}",
                    i + 1,
                    c.this_over_that[i]
                );
            }
            println!("  median ratio that / no agent: {:.3}", c.median_ratio);
            println!("  this build / that build: {}", verdict(&c.this_over_that));
        }
        println!("kernel programs per connection (both ends, from BPF run-time statistics):");
        for p in &self.kernel {
            println!(
                "  {:<18} {:>6.1} runs x {:>6.0} ns = {:>7.0} ns",
                p.program, p.runs_per_connection, p.ns_per_run, p.ns_per_connection
            );
        }
        println!(
            "  {:<18} {:>34.0} ns",
            "total", self.kernel_ns_per_connection
        );
    }
}

/// One churn run from `client` to the `server` pod's port 8080: (connections per second,
/// connections).
pub(crate) fn churn_once(node: &Node, seconds: f64) -> Result<(f64, u64)> {
    let server = node.pod("server").ipv4;
    let mut c = node.spawn(
        "client",
        &[
            "churn",
            "--connect",
            &format!("{server}:8080"),
            "--seconds",
            &seconds.to_string(),
        ],
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

fn profile_round(node: &Node, bins: &Path, seconds: f64) -> Result<Vec<ProgramProfile>> {
    let _stats = BpfStats::enable()?;
    let agent = Agent::start_with(node, agent_options(bins));
    let (_, conns) = churn_once(node, seconds)?;
    let cgroup = node.cgroup().to_string_lossy().into_owned();
    let attached = bpftool_json(&["cgroup", "show", &cgroup])?;
    let mut out = Vec::new();
    for prog in attached
        .as_array()
        .context("bpftool cgroup show: not a list")?
    {
        let id = prog["id"].as_u64().context("program id")?.to_string();
        let info = bpftool_json(&["prog", "show", "id", &id])?;
        let runs = info["run_cnt"].as_f64().unwrap_or(0.0);
        let ns = info["run_time_ns"].as_f64().unwrap_or(0.0);
        let conns = conns.max(1) as f64;
        out.push(ProgramProfile {
            program: info["name"].as_str().unwrap_or("?").to_owned(),
            runs_per_connection: runs / conns,
            ns_per_run: if runs > 0.0 { ns / runs } else { 0.0 },
            ns_per_connection: ns / conns,
        });
    }
    drop(agent);
    Ok(out)
}

/// A node with a `client` and a `server` pod whose server closes every connection at once,
/// warmed up (caches, ARP, the tools' first page faults). Keep the process: it is the server.
pub(crate) fn churn_node(bins: &Path, name: &str) -> Result<(Node, Process)> {
    let node = Node::builder(name)
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("server")
        .build();
    let server = node.pod("server").ipv4;
    let srv = node.spawn(
        "server",
        &[
            "tcp-server",
            "--listen",
            &format!("{server}:8080"),
            "--close-at-once",
        ],
    );
    srv.wait_listening();
    churn_once(&node, 1.0)?;
    Ok((node, srv))
}

/// One measured round of a variant: (connections per second, agent CPU µs per connection).
fn measure(node: &Node, agent_bins: Option<&Path>, seconds: f64) -> Result<(f64, f64)> {
    let Some(bins) = agent_bins else {
        return Ok((churn_once(node, seconds)?.0, 0.0));
    };
    let mut agent = Agent::start_with(node, agent_options(bins));
    let cpu_before = cpu_seconds(agent.pid())?;
    let (rate, conns) = churn_once(node, seconds)?;
    // Let the agent drain the ring buffer before reading its CPU time.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_after = cpu_seconds(agent.pid())?;
    agent.stop();
    Ok((rate, (cpu_after - cpu_before) * 1e6 / conns.max(1) as f64))
}

pub fn churn(
    bins: &Path,
    compare: Option<&Path>,
    seconds: f64,
    rounds: usize,
) -> Result<ChurnResult> {
    let (node, _server) = churn_node(bins, "xtask-bench-churn")?;
    // Variants: no agent, this build, and the compared build; rotated every round so none
    // always runs first (on a cooler or warmer machine).
    let variants: Vec<Option<&Path>> = std::iter::once(None)
        .chain(std::iter::once(Some(bins)))
        .chain(compare.map(Some))
        .collect();
    let mut rates = vec![Vec::new(); variants.len()];
    let mut cpu = Vec::new();
    for round in 0..rounds {
        eprintln!("bench churn: round {}/{rounds}", round + 1);
        for k in 0..variants.len() {
            let v = (round + k) % variants.len();
            let (rate, cpu_us) = measure(&node, variants[v], seconds)?;
            rates[v].push(rate);
            if v == 1 {
                cpu.push(cpu_us);
            }
        }
    }
    eprintln!("bench churn: profiling round (BPF run-time statistics on)");
    let kernel = profile_round(&node, bins, seconds)?;
    let per_round =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(a, b)| a / b).collect() };
    let ratios = per_round(&rates[1], &rates[0]);
    let compare = compare.map(|dir| {
        let that = per_round(&rates[2], &rates[0]);
        let this_over_that = per_round(&rates[1], &rates[2]);
        let (m, min, max) = spread(&this_over_that);
        Compare {
            binary: dir.join("weft").display().to_string(),
            rates: rates[2].clone(),
            median_ratio: median(&that),
            ratios: that,
            this_over_that,
            this_over_that_median: m,
            this_over_that_min: min,
            this_over_that_max: max,
        }
    });
    Ok(ChurnResult {
        kernel_ns_per_connection: kernel.iter().map(|p| p.ns_per_connection).sum(),
        kernel,
        scenario: "churn",
        unit: "connections per second",
        seconds_per_round: seconds,
        median_ratio: median(&ratios),
        baseline: rates[0].clone(),
        weft: rates[1].clone(),
        ratios,
        agent_cpu_us_per_connection: cpu,
        compare,
    })
}
