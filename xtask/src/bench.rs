//! `cargo xtask bench`: scenarios that measure weft and its baselines in the same run, write
//! JSON under target/bench/ and print ratios.
//!
//! Scenarios: `churn` (bench/churn.rs), `services` (bench/services.rs), `policy`
//! (bench/policy.rs), `telemetry` (bench/telemetry.rs), `kube` (bench/kube.rs), `bind`
//! (bench/bind.rs).
mod bind;
mod churn;
mod kube;
mod policy;
mod services;
mod telemetry;

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::AgentOptions;

use crate::{build, setup::Tools};

const SCENARIOS: &[&str] = &["churn", "services", "policy", "telemetry", "kube", "bind"];

pub fn run(
    ws: &Path,
    tools: &Tools,
    scenarios: &[String],
    seconds: f64,
    rounds: usize,
    compare: Option<&Path>,
) -> Result<()> {
    let selected: Vec<&str> = if scenarios.is_empty() {
        SCENARIOS.to_vec()
    } else {
        scenarios.iter().map(String::as_str).collect()
    };
    for s in &selected {
        if !SCENARIOS.contains(s) {
            bail!("unknown scenario {s:?}; known: {SCENARIOS:?}");
        }
    }
    let bins = build::all(ws, tools, true)?;
    let out_dir = build::target_dir(ws).join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    for s in selected {
        let path = out_dir.join(format!("{s}.json"));
        match s {
            "churn" => {
                let r = churn::churn(&bins, compare, seconds, rounds)?;
                write(&path, &r)?;
                r.print();
            }
            "services" => {
                // Each round: this many connections per mode.
                let r = services::run(&bins, compare, rounds.clamp(1, 9), 2_000)?;
                write(&path, &r)?;
                r.print();
            }
            "policy" => {
                let r = policy::run(&bins, rounds.clamp(1, 9), 2_000)?;
                write(&path, &r)?;
                r.print();
            }
            "telemetry" => {
                let r = telemetry::run(&bins, seconds, rounds)?;
                write(&path, &r)?;
                r.print();
            }
            "kube" => {
                let r = kube::run(&bins)?;
                write(&path, &r)?;
                r.print();
            }
            "bind" => {
                let r = bind::run(&bins)?;
                write(&path, &r)?;
                r.print();
            }
            _ => unreachable!("checked above"),
        }
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

fn write(path: &Path, value: &impl Serialize) -> Result<()> {
    fs::write(path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// user + system CPU seconds of a process, from /proc/<pid>/stat.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// The spread of per-round ratios: (median, min, max).
pub(crate) fn spread(ratios: &[f64]) -> (f64, f64, f64) {
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(ratios), min, max)
}

/// A ratio and its spread, or "no measurable difference" when the spread of the per-round
/// ratios straddles 1.
pub(crate) fn verdict(ratios: &[f64]) -> String {
    let (m, min, max) = spread(ratios);
    if min <= 1.0 && max >= 1.0 {
        format!("no measurable difference (median {m:.3}, rounds {min:.3}-{max:.3})")
    } else {
        format!("{m:.3} (rounds {min:.3}-{max:.3})")
    }
}

pub(crate) fn agent_options(bins: &Path) -> AgentOptions {
    // Logs at warn: the bench measures the datapath and event handling, not log output.
    AgentOptions {
        log_level: "warn,weft::app=info".into(),
        stats_interval: "60s".into(),
        binary: Some(bins.join("weft")),
        ..AgentOptions::default()
    }
}

/// An agent reading the node's source directory; its `weft::sync` log lines time changes.
pub(crate) fn source_agent_options(bins: &Path) -> AgentOptions {
    AgentOptions {
        log_level: "warn,weft::app=info,weft::sync=info".into(),
        stats_interval: "600s".into(),
        binary: Some(bins.join("weft")),
        source: true,
        ..AgentOptions::default()
    }
}

/// Restores kernel.bpf_stats_enabled when dropped.
pub(crate) struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(crate) fn enable() -> Result<Self> {
        let previous =
            fs::read_to_string(BPF_STATS).with_context(|| format!("read {BPF_STATS}"))?;
        fs::write(BPF_STATS, "1").with_context(|| format!("write {BPF_STATS}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.previous.trim());
    }
}

pub(crate) fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = std::process::Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .context("run bpftool (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `iptables-restore` in the network namespace at `netns` (`noflush`: keep the tables' other
/// rules).
pub(crate) fn iptables_restore(netns: &Path, rules: &str, noflush: bool) -> Result<()> {
    use std::io::Write as _;
    let mut command = std::process::Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.display()))
        .args(["iptables-restore", "-w"]);
    if noflush {
        command.arg("--noflush");
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("run iptables-restore (`cargo xtask setup` installs iptables)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("iptables-restore failed ({status})");
    }
    Ok(())
}

/// Waits for a `weft-pod rr` client and returns its result line.
pub(crate) fn run_rr(p: &mut weft_testkit::proc::Process, what: &str) -> Result<Value> {
    p.wait_success(std::time::Duration::from_secs(300));
    Ok(p.stdout()
        .wait_for(what, std::time::Duration::from_secs(5), |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "rr")
            })
        }))
}

/// Milliseconds from `write` (a change on disk) to the agent logging a new `marker` line (its
/// timestamp: logged once the kernel maps are written).
pub(crate) fn time_to_log(
    agent: &weft_testkit::Agent,
    marker: &str,
    write: impl FnOnce(),
) -> Result<f64> {
    let count = |lines: &[String]| lines.iter().filter(|l| l.contains(marker)).count();
    let before = count(&agent.logs().snapshot());
    let written = std::time::SystemTime::now();
    write();
    let line = agent.logs().wait_for(
        &format!("a new `{marker}` log line"),
        std::time::Duration::from_secs(10),
        |lines| {
            (count(lines) > before)
                .then(|| lines.iter().rfind(|l| l.contains(marker)).cloned())
                .flatten()
        },
    );
    let v: Value = serde_json::from_str(&line)?;
    let at = humantime::parse_rfc3339(v["timestamp"].as_str().unwrap_or_default())?;
    Ok(at.duration_since(written).unwrap_or_default().as_secs_f64() * 1000.0)
}
