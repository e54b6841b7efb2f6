//! `telemetry`: what per-connection telemetry costs. Short-connection churn at the highest
//! rate the machine sustains with the agent's telemetry on and off (`--telemetry=false`),
//! in alternating rounds (client and server pinned: [`Pinning`]); events lost at that rate; the agent's CPU per 100 000 connections;
//! and the agent's resident memory with 10 000 connections open.
use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use serde::Serialize;
use weft_testkit::{AgentOptions, Node, prom};

use super::{
    Pinning, Ratio, agent_options,
    churn::{churn_node, churn_once},
    cpu_seconds, median, rss_kib,
};

#[derive(Debug, Serialize)]
pub struct TelemetryResult {
    scenario: &'static str,
    pinning: Pinning,
    seconds_per_round: f64,
    /// Connections per second with telemetry off / on, per round.
    off: Vec<f64>,
    on: Vec<f64>,
    /// on / off per round.
    ratio: Ratio,
    /// Kernel events the agent could not take (ring buffer full), per telemetry-on round.
    events_lost: Vec<f64>,
    /// Events the agent handled, per connection (4 when both ends are local: open + close).
    events_per_connection: Vec<f64>,
    /// Agent CPU seconds (user + system) per 100 000 connections.
    cpu_s_per_100k_off: Vec<f64>,
    cpu_s_per_100k_on: Vec<f64>,
    /// Open connections held for the memory figure (both ends are local: twice as many
    /// sockets are tracked).
    held_connections: u64,
    rss_idle_kib: u64,
    rss_held_kib: u64,
    /// What each tracked socket adds to the agent's resident memory.
    bytes_per_tracked_socket: f64,
}

impl TelemetryResult {
    pub fn print(&self) {
        println!(
            "\ntelemetry: short TCP connections per second, telemetry on vs off (higher is better)"
        );
        println!(
            "{:>5} {:>12} {:>12} {:>7} {:>12} {:>10} {:>14} {:>14}",
            "round",
            "off",
            "on",
            "ratio",
            "events lost",
            "events/conn",
            "CPU s/100k off",
            "CPU s/100k on"
        );
        for i in 0..self.ratio.rounds.len() {
            println!(
                "{:>5} {:>12.0} {:>12.0} {:>7.3} {:>12.0} {:>10.2} {:>14.2} {:>14.2}",
                i + 1,
                self.off[i],
                self.on[i],
                self.ratio.rounds[i],
                self.events_lost[i],
                self.events_per_connection[i],
                self.cpu_s_per_100k_off[i],
                self.cpu_s_per_100k_on[i],
            );
        }
        println!("on / off: {}", self.ratio.verdict);
        println!(
            "agent CPU per 100 000 connections: {:.3} s with telemetry on, {:.3} s off (medians)",
            median(&self.cpu_s_per_100k_on),
            median(&self.cpu_s_per_100k_off)
        );
        println!(
            "agent RSS: {} KiB idle, {} KiB with {} connections open ({} tracked sockets): {:.0} B per socket",
            self.rss_idle_kib,
            self.rss_held_kib,
            self.held_connections,
            2 * self.held_connections,
            self.bytes_per_tracked_socket
        );
    }
}

fn options(bins: &Path, telemetry: bool) -> AgentOptions {
    let mut o = agent_options(bins);
    if !telemetry {
        o.extra_args.push("--telemetry=false".into());
    }
    o
}

/// One round of one mode: (connections per second, CPU s per 100k, events lost, events per
/// connection).
fn round(
    node: &Node,
    pin: &Pinning,
    bins: &Path,
    seconds: f64,
    telemetry: bool,
) -> Result<(f64, f64, f64, f64)> {
    let mut agent = pin.start_agent(node, options(bins, telemetry))?;
    let cpu_before = cpu_seconds(agent.pid())?;
    let (rate, conns) = churn_once(node, pin, seconds)?;
    // Let the agent drain the ring buffer before reading its CPU time and counters.
    std::thread::sleep(Duration::from_millis(500));
    let cpu = cpu_seconds(agent.pid())? - cpu_before;
    let m = agent.metrics();
    let lost = prom::sum(&m, "weft_events_lost_total", &[]);
    let events = prom::sum(&m, "weft_conn_events_total", &[]);
    agent.stop();
    let conns = conns.max(1) as f64;
    Ok((rate, cpu * 100_000.0 / conns, lost, events / conns))
}

fn memory(node: &Node, pin: &Pinning, bins: &Path, held: u64) -> Result<(u64, u64)> {
    let agent = pin.start_agent(node, options(bins, true))?;
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(agent.pid())?;
    let server = format!("{}:9000", node.pod("server").ipv4);
    let srv = node.spawn("server", &pin.server(&["hold-server", "--listen", &server]));
    srv.wait_listening();
    let held_s = held.to_string();
    let client = node.spawn(
        "client",
        &pin.client(&["hold-client", "--connect", &server, "--count", &held_s]),
    );
    client.stdout().wait_for(
        "the connections to be open",
        Duration::from_secs(120),
        |lines| lines.iter().any(|l| l.contains("\"held\"")).then_some(()),
    );
    let want = 2.0 * held as f64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open = prom::sum(&agent.metrics(), "weft_tcp_open_connections", &[]);
        if open >= want {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent tracks {open} open sockets, expected {want}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss = rss_kib(agent.pid())?;
    drop(client);
    drop(srv);
    Ok((idle, rss))
}

pub fn run(bins: &Path, pin: &Pinning, seconds: f64, rounds: usize) -> Result<TelemetryResult> {
    let pin = &pin.with_agent_on_client_cpu();
    let (node, _server) = churn_node(bins, pin, "xtask-bench-telemetry")?;
    let mut r = TelemetryResult {
        scenario: "telemetry",
        pinning: pin.clone(),
        seconds_per_round: seconds,
        off: Vec::new(),
        on: Vec::new(),
        ratio: Ratio::of(Vec::new()),
        events_lost: Vec::new(),
        events_per_connection: Vec::new(),
        cpu_s_per_100k_off: Vec::new(),
        cpu_s_per_100k_on: Vec::new(),
        held_connections: 10_000,
        rss_idle_kib: 0,
        rss_held_kib: 0,
        bytes_per_tracked_socket: 0.0,
    };
    for i in 0..rounds {
        eprintln!("bench telemetry: round {}/{rounds}", i + 1);
        // Alternate which mode goes first so drift affects both alike.
        let (off, on) = if i % 2 == 0 {
            let off = round(&node, pin, bins, seconds, false)?;
            (off, round(&node, pin, bins, seconds, true)?)
        } else {
            let on = round(&node, pin, bins, seconds, true)?;
            (round(&node, pin, bins, seconds, false)?, on)
        };
        r.off.push(off.0);
        r.on.push(on.0);
        r.cpu_s_per_100k_off.push(off.1);
        r.cpu_s_per_100k_on.push(on.1);
        r.events_lost.push(on.2);
        r.events_per_connection.push(on.3);
    }
    r.ratio = Ratio::per_round(&r.on, &r.off);
    eprintln!(
        "bench telemetry: agent memory with {} open connections",
        r.held_connections
    );
    let (idle, held) = memory(&node, pin, bins, r.held_connections)?;
    r.rss_idle_kib = idle;
    r.rss_held_kib = held;
    r.bytes_per_tracked_socket =
        held.saturating_sub(idle) as f64 * 1024.0 / (2 * r.held_connections) as f64;
    Ok(r)
}
