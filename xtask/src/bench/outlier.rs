//! `outlier`: a backend of a Service crashes (its server is killed: connects are refused)
//! under a steady load of new connections through the Service, and readiness from the API
//! takes it out [`READINESS_DELAY`] later, as a kubelet's probes would. Two variants in the
//! same rounds, in rotating order, each on a fresh node and agent with the same three
//! backends, the same load and the same readiness change:
//!
//! - weft with passive health checking (a DestinationRule: [`CONSECUTIVE`] failures in a
//!   row eject, as Envoy's default `consecutive5xxErrors`);
//! - weft without (today's behaviour): the backend gets connections until readiness.
//!
//! Measured from the client: the connections that failed after the kill, and how long
//! failures went on. With health checking, also how long after the failure that ejected
//! the backend a connect could still start and fail (the reaction: connects in flight on
//! the other loop when it came count, none may start after it). The ejecting failure is
//! the [`CONSECUTIVE`]-th the kernel counts: a failed connect. The client shuts down its
//! side at once, so a connection that connected and then failed (reset by the crash) is no
//! failure to health checking (the client had closed first), and is left out of that count.
//! The reaction is bounded by how often the other loop reaches the backend (about every
//! 20 ms): it shows a slow ejection, not one under a few ms.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Node, k8s, proc::monotonic_ns};

use super::{Pinning, median, source_agent_options};

const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
const VIP: &str = "10.96.0.10";
/// Failures in a row that eject.
const CONSECUTIVE: usize = 5;
/// From the crash to readiness taking the backend out.
const READINESS_DELAY: Duration = Duration::from_secs(10);
/// Load before the crash, and after readiness.
const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(2);
/// New connections per second, over [`LOOPS`] client loops.
const RATE: f64 = 300.0;
const LOOPS: &str = "2";

#[derive(Debug, Default, Serialize)]
struct Variant {
    /// Per round: connections that failed.
    failed: Vec<u64>,
    /// Per round: from the crash to the end of the last failure, ms.
    failing_ms: Vec<f64>,
    /// Per round: connections that succeeded.
    succeeded: Vec<u64>,
    /// Per round: failures after connect() had succeeded (reset by the crash), among
    /// `failed`.
    after_connect: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct OutlierResult {
    scenario: &'static str,
    pinning: Pinning,
    rounds: usize,
    rate_per_second: f64,
    readiness_delay_s: f64,
    consecutive: usize,
    checking: Variant,
    without: Variant,
    /// Per round, with health checking: how long after the end of the failure that
    /// ejected the backend a failing connect started (0: none started after it), ms.
    reaction_ms: Vec<f64>,
    /// Per round, with health checking: failures beyond the ejecting one (connects already
    /// in flight on the other loop).
    in_flight_failures: Vec<u64>,
}

impl OutlierResult {
    pub fn print(&self) {
        println!(
            "\noutlier: a backend of three crashes under {} new connections/s through its Service; readiness takes it out {} s later ({} rounds, rotating order, client on CPU {}, servers on CPU {})",
            self.rate_per_second,
            self.readiness_delay_s,
            self.rounds,
            self.pinning.client_cpu,
            self.pinning.server_cpu
        );
        let row = |name: &str, v: &Variant| {
            let failed: Vec<f64> = v.failed.iter().map(|n| *n as f64).collect();
            println!(
                "{name:>24} | failed median {:>7.0} (rounds {}) | failing for median {:>8.1} ms (rounds {})",
                median(&failed),
                list(&failed, 0),
                median(&v.failing_ms),
                list(&v.failing_ms, 1),
            );
        };
        row("with health checking", &self.checking);
        row("without (readiness only)", &self.without);
        println!(
            "of which after connect() succeeded (no failure to health checking): with {}; without {}",
            self.checking
                .after_connect
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.without
                .after_connect
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        );
        let worst = self.reaction_ms.iter().copied().fold(0.0, f64::max);
        println!(
            "reaction after the ejecting failure: worst {worst:.2} ms of {} rounds (rounds {}); failures in flight beyond it: {}",
            self.rounds,
            list(&self.reaction_ms, 2),
            self.in_flight_failures
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run(bins: &Path, pin: &Pinning, rounds: usize) -> Result<OutlierResult> {
    let mut result = OutlierResult {
        scenario: "outlier",
        pinning: pin.clone(),
        rounds,
        rate_per_second: RATE,
        readiness_delay_s: READINESS_DELAY.as_secs_f64(),
        consecutive: CONSECUTIVE,
        checking: Variant::default(),
        without: Variant::default(),
        reaction_ms: Vec::new(),
        in_flight_failures: Vec::new(),
    };
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for checking in order {
            eprintln!(
                "bench outlier: round {} of {rounds}, {}",
                round + 1,
                if checking { "with" } else { "without" }
            );
            let run = crash(bins, pin, checking, round)?;
            let v = if checking {
                let (reaction, extra) = reaction(&run.failures, run.crash_ns);
                result.reaction_ms.push(reaction);
                result.in_flight_failures.push(extra);
                &mut result.checking
            } else {
                &mut result.without
            };
            v.failed.push(run.failures.len() as u64);
            v.after_connect
                .push(run.failures.iter().filter(|f| f.2).count() as u64);
            v.succeeded.push(run.succeeded);
            let last = run
                .failures
                .iter()
                .map(|f| f.1)
                .max()
                .unwrap_or(run.crash_ns);
            v.failing_ms
                .push(last.saturating_sub(run.crash_ns) as f64 / 1e6);
        }
    }
    Ok(result)
}

/// What the client saw in one run: failures (start, end ns, whether connect() had
/// succeeded), successes, and the crash.
struct Run {
    failures: Vec<(u64, u64, bool)>,
    succeeded: u64,
    crash_ns: u64,
}

/// The reaction to the ejecting failure (the [`CONSECUTIVE`]-th failed connect after the
/// crash): how long after its end a failing connect started (0: none), ms (NaN: there were
/// not that many); and how many failed connects came after it.
fn reaction(failures: &[(u64, u64, bool)], crash_ns: u64) -> (f64, u64) {
    let mut after: Vec<(u64, u64)> = failures
        .iter()
        .filter(|f| f.1 >= crash_ns && !f.2)
        .map(|f| (f.0, f.1))
        .collect();
    after.sort_by_key(|f| f.1);
    let Some(&(_, ejecting)) = after.get(CONSECUTIVE - 1) else {
        return (f64::NAN, 0);
    };
    let late = after
        .iter()
        .map(|f| f.0.saturating_sub(ejecting))
        .max()
        .unwrap_or(0);
    let extra = after.len().saturating_sub(CONSECUTIVE) as u64;
    (late as f64 / 1e6, extra)
}

/// One run: a fresh node and agent (with or without health checking), the load, the crash
/// of b2 after [`BEFORE`], readiness [`READINESS_DELAY`] later.
fn crash(bins: &Path, pin: &Pinning, checking: bool, round: usize) -> Result<Run> {
    let tag = format!("bo{}{round}", if checking { "c" } else { "n" });
    let node = Node::builder(&tag)
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("b1")
        .pod("b2")
        .pod("b3")
        .build();
    node.write_source("pods.yaml", &pods(&node, false));
    node.write_source("services.yaml", &service());
    if checking {
        node.write_source("rule.yaml", &rule());
    }
    let mut servers = Vec::new();
    for b in BACKENDS {
        let p = node.spawn(
            b,
            &pin.server(&["tcp-server", "--listen", "[::]:8080", "--reply-name", b]),
        );
        p.wait_listening();
        servers.push(p);
    }
    let agent = pin.start_agent(&node, source_agent_options(bins))?;
    agent.wait_backends(&format!("{VIP}:80/TCP"), 3, Duration::from_secs(20));
    let total = BEFORE + READINESS_DELAY + AFTER;
    let (rate, seconds) = (RATE.to_string(), total.as_secs_f64().to_string());
    let target = format!("{VIP}:80");
    let mut load = node.spawn(
        "client",
        &pin.client(&[
            "tcp-load",
            "--connect",
            &target,
            "--rate",
            &rate,
            "--seconds",
            &seconds,
            "--threads",
            LOOPS,
        ]),
    );
    std::thread::sleep(BEFORE);
    let crash_ns = monotonic_ns();
    servers[1].signal(libc::SIGKILL);
    std::thread::sleep(READINESS_DELAY);
    node.write_source("pods.yaml", &pods(&node, true));
    load.wait_success(total + Duration::from_secs(30));
    let v: Value = load
        .stdout()
        .wait_for("load result", Duration::from_secs(5), |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "load")
            })
        });
    let failures = v["failures"]
        .as_array()
        .context("failures")?
        .iter()
        .map(|f| {
            Ok((
                f["start_ns"].as_u64().context("start_ns")?,
                f["end_ns"].as_u64().context("end_ns")?,
                f["connected"].as_bool().context("connected")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let succeeded = v["counts"]
        .as_object()
        .context("counts")?
        .values()
        .filter_map(Value::as_u64)
        .sum();
    drop(agent);
    Ok(Run {
        failures,
        succeeded,
        crash_ns,
    })
}

/// The client and the backends (b2 not ready with `b2_out`).
fn pods(node: &Node, b2_out: bool) -> String {
    let mut docs = vec![k8s::pod(
        node.pod("client"),
        "default",
        &[("app", "client")],
        &[],
        true,
    )];
    for b in BACKENDS {
        docs.push(k8s::pod(
            node.pod(b),
            "default",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            !(b2_out && b == "b2"),
        ));
    }
    k8s::file(&docs)
}

fn service() -> String {
    k8s::service(
        "web",
        "default",
        &[VIP],
        &[("app", "web")],
        &[("http", 80, "http", "TCP")],
        None,
    )
}

/// Health checking as Envoy's defaults have it, one backend of three ejected at most.
fn rule() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: default}}\nspec:\n  host: web\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: {CONSECUTIVE}, baseEjectionTime: 30s, maxEjectionPercent: 34}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reaction is measured from the end of the ejecting failure, only failures after
    /// the crash counting.
    #[test]
    fn the_reaction_starts_at_the_ejecting_failure() {
        let ms = 1_000_000;
        let before = (0, 5 * ms, false);
        let mut failures = vec![before];
        failures.extend((1..=5).map(|i| (i * 10 * ms, i * 10 * ms + ms, false)));
        // In flight on the other loop: started before the 5th ended.
        failures.push((50 * ms, 52 * ms, false));
        assert_eq!(reaction(&failures, 10 * ms), (0.0, 1));
        // One started 3 ms after it.
        failures.push((54 * ms, 55 * ms, false));
        assert_eq!(reaction(&failures, 10 * ms), (3.0, 2));
        assert!(reaction(&failures[..3], 10 * ms).0.is_nan());
        // A connection reset after it connected is no failure to the kernel: the ejecting
        // failure is the fifth failed connect (counting it, the last would look 9 ms late).
        let mut reset = vec![(9 * ms, 12 * ms, true)];
        reset.extend((1..=5).map(|i| (i * 10 * ms, i * 10 * ms + ms, false)));
        assert_eq!(reaction(&reset, 10 * ms), (0.0, 0));
    }
}
