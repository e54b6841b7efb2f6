//! `cargo xtask bench`: scenarios that measure weft and its baselines in the same run, write
//! JSON under target/bench/ and print ratios.
//!
//! Scenarios: `churn` (bench/churn.rs), `services` (bench/services.rs), `established`
//! (bench/established.rs), `policy` (bench/policy.rs), `telemetry` (bench/telemetry.rs),
//! `kube` (bench/kube.rs), `bind` (bench/bind.rs), `mesh` (bench/mesh.rs), `outlier`
//! (bench/outlier.rs).
mod bind;
mod churn;
mod established;
mod kube;
mod mesh;
mod outlier;
mod policy;
mod services;
mod telemetry;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::AgentOptions;

use crate::{build, setup::Tools};

const SCENARIOS: &[&str] = &[
    "churn",
    "services",
    "established",
    "policy",
    "telemetry",
    "kube",
    "bind",
    "mesh",
    "outlier",
];

/// What `cargo xtask bench` was asked for.
pub struct Options<'a> {
    pub scenarios: &'a [String],
    pub seconds: f64,
    pub rounds: usize,
    pub compare: Option<Other>,
    pub pinning: Pinning,
    /// `mesh`: the agents where the scheduler puts them, not on the client's CPU.
    pub agents_unpinned: bool,
}

/// The agent `churn` and `services` measure beside this build (`--compare`,
/// `--compare-args`): another build, this one with other arguments, or both.
#[derive(Debug, Clone)]
pub struct Other {
    /// A directory holding its `weft`; None: this build's.
    pub bins: Option<PathBuf>,
    pub args: Vec<String>,
}

impl Other {
    pub fn from_flags(bins: Option<PathBuf>, args: Option<&str>) -> Option<Self> {
        let args: Vec<String> = args
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (bins.is_some() || !args.is_empty()).then_some(Self { bins, args })
    }

    /// Its binaries: its own, or this build's.
    pub(crate) fn bins<'a>(&'a self, this: &'a Path) -> &'a Path {
        self.bins.as_deref().unwrap_or(this)
    }

    /// How results name it: its `weft` and arguments.
    pub(crate) fn label(&self, this: &Path) -> String {
        let mut label = self.bins(this).join("weft").display().to_string();
        for a in &self.args {
            label.push(' ');
            label.push_str(a);
        }
        label
    }

    /// `options` with its arguments added.
    pub(crate) fn options(&self, mut options: AgentOptions) -> AgentOptions {
        options.extra_args.extend(self.args.iter().cloned());
        options
    }
}

pub fn run(ws: &Path, tools: &Tools, options: &Options<'_>) -> Result<()> {
    let Options {
        scenarios,
        seconds,
        rounds,
        ref compare,
        pinning: ref pin,
        agents_unpinned,
    } = *options;
    let compare = compare.as_ref();
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
                let r = churn::churn(&bins, pin, compare, seconds, rounds)?;
                write(&path, &r)?;
                r.print();
            }
            "services" => {
                // Each round: this many connections per mode.
                let r = services::run(&bins, pin, compare, rounds.clamp(1, 9), 2_000)?;
                write(&path, &r)?;
                r.print();
            }
            "established" => {
                let r = established::run(&bins, pin, rounds)?;
                write(&path, &r)?;
                r.print();
            }
            "policy" => {
                let r = policy::run(&bins, pin, rounds.clamp(1, 9), 2_000)?;
                write(&path, &r)?;
                r.print();
            }
            "telemetry" => {
                let r = telemetry::run(&bins, pin, seconds, rounds)?;
                write(&path, &r)?;
                r.print();
            }
            "kube" => {
                // Each round is two fresh agents at each scale: at most 5 rounds.
                let r = kube::run(&bins, pin, rounds.clamp(1, 5))?;
                write(&path, &r)?;
                r.print();
            }
            "bind" => {
                let r = bind::run(&bins)?;
                write(&path, &r)?;
                r.print();
            }
            "mesh" => {
                // Both agents on the workloads' CPU by default, as churn places its agent:
                // one CPU does all the work of an exchange, so the figures are its cost, not
                // the cost of waking the other vCPU (an IPI, a halted vCPU's exit).
                let placed = if agents_unpinned {
                    pin.clone()
                } else {
                    pin.with_agent_on_client_cpu()
                };
                let r = mesh::run(&bins, &placed, rounds.clamp(1, 9))?;
                write(&path, &r)?;
                r.print();
            }
            "outlier" => {
                // Each round is two runs of 14 s, each on a fresh node.
                let r = outlier::run(&bins, pin, rounds.clamp(1, 9))?;
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

/// Context switches of a process so far, every thread's, voluntary and not (from
/// /proc/<pid>/task/*/status): how often it was woken and put to sleep.
pub(crate) fn context_switches(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task")).context("list tasks")? {
        // A thread that ended since the listing has no status left: it counts no more.
        let Ok(status) = fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// Resident memory (KiB) of a process, from /proc/<pid>/status.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The spread of per-round ratios: (median, min, max).
pub(crate) fn spread(ratios: &[f64]) -> (f64, f64, f64) {
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(ratios), min, max)
}

/// A ratio and its spread (min-max of the per-round ratios), or "no measurable difference"
/// when the spread reaches from the median back to 1: the rounds do not agree there is an
/// effect at all.
pub(crate) fn verdict(ratios: &[f64]) -> String {
    let (m, min, max) = spread(ratios);
    if ratios.len() < MIN_ROUNDS {
        format!(
            "too few rounds to tell (median {m:.3}, {} rounds {min:.3}-{max:.3})",
            ratios.len()
        )
    } else if measurable(ratios) {
        format!("{m:.3} (rounds {min:.3}-{max:.3})")
    } else {
        format!("no measurable difference (median {m:.3}, rounds {min:.3}-{max:.3})")
    }
}

/// Fewer rounds than this say nothing about their spread.
pub(crate) const MIN_ROUNDS: usize = 3;

/// Whether every round shows the effect on the same side of 1 (the spread toward 1 is
/// narrower than the effect the median claims), over enough rounds, none of them broken.
pub(crate) fn measurable(ratios: &[f64]) -> bool {
    let (_, min, max) = spread(ratios);
    ratios.len() >= MIN_ROUNDS && ratios.iter().all(|r| r.is_finite()) && (min > 1.0 || max < 1.0)
}

/// A ratio as the JSON records it: per-round values, median, spread and the printed verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub rounds: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub measurable: bool,
    pub verdict: String,
}

impl Ratio {
    pub(crate) fn of(rounds: Vec<f64>) -> Self {
        let (median, min, max) = spread(&rounds);
        Self {
            measurable: measurable(&rounds),
            verdict: verdict(&rounds),
            rounds,
            median,
            min,
            max,
        }
    }

    /// `num / den` per round.
    pub(crate) fn per_round(num: &[f64], den: &[f64]) -> Self {
        Self::of(num.iter().zip(den).map(|(n, d)| n / d).collect())
    }
}

/// Where a scenario's processes run, the same for every variant: clients on one CPU, servers
/// on one CPU (by default the same one: a request/response then costs no cross-CPU wake-up,
/// whose latency in a VM varies more than anything weft does). Recorded in every result's
/// JSON. Where each variant has its own agent run (`churn`, `telemetry`) the agent is pinned
/// with the client, so every microsecond of its work per connection is charged to that
/// variant; where variants take turns in short bursts under one running agent, it is left
/// unpinned, or its work for one variant's burst would fall on the next one's.
#[derive(Debug, Clone, Serialize)]
pub struct Pinning {
    client_cpu: usize,
    server_cpu: usize,
    agent: String,
    #[serde(skip)]
    agent_cpu: Option<usize>,
    #[serde(skip)]
    client: String,
    #[serde(skip)]
    server: String,
}

impl Pinning {
    pub fn new(client_cpu: usize, server_cpu: usize) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if client_cpu >= cpus || server_cpu >= cpus {
            bail!(
                "--cpus {client_cpu},{server_cpu}: this machine has CPUs 0-{}",
                cpus - 1
            );
        }
        Ok(Self {
            client_cpu,
            server_cpu,
            agent: "unpinned".into(),
            agent_cpu: None,
            client: client_cpu.to_string(),
            server: server_cpu.to_string(),
        })
    }

    /// `weft-pod` arguments for a client: `--cpu N` and then `args`.
    pub(crate) fn client<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        on(&self.client, args)
    }

    /// The same placement with the agent on the client's CPU.
    pub(crate) fn with_agent_on_client_cpu(&self) -> Self {
        Self {
            agent: format!("CPU {} (with the client)", self.client_cpu),
            agent_cpu: Some(self.client_cpu),
            ..self.clone()
        }
    }

    /// Starts an agent where this placement puts it, and lets it settle (the work that
    /// follows its first full sync is not part of any measurement).
    pub(crate) fn start_agent(
        &self,
        node: &weft_testkit::Node,
        options: AgentOptions,
    ) -> Result<weft_testkit::Agent> {
        let agent = self.as_agent(|| weft_testkit::Agent::start_with(node, options))?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(agent)
    }

    /// Runs `f` where this placement puts the agent, so that an agent it starts runs there.
    pub(crate) fn as_agent<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        match self.agent_cpu {
            Some(cpu) => on_cpu(cpu, f),
            None => Ok(f()),
        }
    }

    /// Runs `f` with this thread pinned to the server CPU, so the threads it starts (an
    /// in-process server) stay there.
    pub(crate) fn on_server_cpu<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        on_cpu(self.server_cpu, f)
    }

    /// `weft-pod` arguments for a server.
    pub(crate) fn server<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        on(&self.server, args)
    }
}

/// `--cpu <cpu>` and then `args`.
fn on<'a>(cpu: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    ["--cpu", cpu]
        .into_iter()
        .chain(args.iter().copied())
        .collect()
}

/// Runs `f` with this thread pinned to `cpu`, so the threads and processes it starts stay
/// there; this thread's own placement is restored after.
fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> Result<T> {
    let size = size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let (mut before, mut only): (libc::cpu_set_t, libc::cpu_set_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: a set of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, size, &raw mut before) } != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    // SAFETY: callers pass a CPU `Pinning::new` checked exists, far below the set's 1024 bits.
    unsafe { libc::CPU_SET(cpu, &mut only) };
    // SAFETY: as above.
    if unsafe { libc::sched_setaffinity(0, size, &raw const only) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: as above; the mask read before.
    if unsafe { libc::sched_setaffinity(0, size, &raw const before) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(out)
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

/// One of weft's programs, from BPF run-time statistics: how often it ran and how long, per
/// unit of work (a connection, an exchange).
#[derive(Debug, Serialize)]
pub(crate) struct ProgramProfile {
    program: String,
    runs_per_unit: f64,
    ns_per_run: f64,
    pub(crate) ns_per_unit: f64,
}

impl ProgramProfile {
    pub(crate) fn print(&self) {
        println!(
            "  {:<18} {:>6.1} runs x {:>6.0} ns = {:>7.0} ns",
            self.program, self.runs_per_unit, self.ns_per_run, self.ns_per_unit
        );
    }
}

/// Run counts and run times (ns) of the programs attached to `node`'s cgroup, by name, as
/// counted while [`BpfStats`] is on.
pub(crate) fn program_stats(
    node: &weft_testkit::Node,
    agent: &weft_testkit::Agent,
) -> Result<Vec<(String, f64, f64)>> {
    let cgroup = node.cgroup().to_string_lossy().into_owned();
    let attached = bpftool_json(&["cgroup", "show", &cgroup])?;
    let mut out = Vec::new();
    for prog in attached
        .as_array()
        .context("bpftool cgroup show: not a list")?
    {
        let id = prog["id"].as_u64().context("program id")?.to_string();
        out.push(run_stats(&bpftool_json(&["prog", "show", "id", &id])?));
    }
    // The sk_msg program belongs to the agent's SOCK_PAIRS map, not to the cgroup: it is the
    // one that uses that map (it runs only with --sockmap).
    let pairs = agent.maps_dir().join(SOCK_PAIRS);
    let map = bpftool_json(&["map", "show", "pinned", &pairs.to_string_lossy()])?;
    let map_id = map["id"].as_u64().context("SOCK_PAIRS map id")?;
    let all = bpftool_json(&["prog", "show"])?;
    for info in all.as_array().context("bpftool prog show: not a list")? {
        let uses = info["map_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(map_id)));
        if uses && info["type"] == "sk_msg" {
            out.push(run_stats(info));
        }
    }
    Ok(out)
}

/// (name, runs, run time in ns) of a `bpftool prog show` entry.
fn run_stats(info: &Value) -> (String, f64, f64) {
    (
        info["name"].as_str().unwrap_or("?").to_owned(),
        info["run_cnt"].as_f64().unwrap_or(0.0),
        info["run_time_ns"].as_f64().unwrap_or(0.0),
    )
}

/// The pinned name of the agent's socket map (`weft_abi::maps::SOCK_PAIRS`; xtask does not
/// depend on the ABI crate).
const SOCK_PAIRS: &str = "SOCK_PAIRS";

/// What each program did between two [`program_stats`] readings, per unit of work.
pub(crate) fn profile(
    before: &[(String, f64, f64)],
    after: &[(String, f64, f64)],
    units: u64,
) -> Vec<ProgramProfile> {
    let units = units.max(1) as f64;
    after
        .iter()
        .map(|(name, runs, ns)| {
            let (r0, n0) = before
                .iter()
                .find(|b| &b.0 == name)
                .map_or((0.0, 0.0), |b| (b.1, b.2));
            let (runs, ns) = (runs - r0, ns - n0);
            ProgramProfile {
                program: name.clone(),
                runs_per_unit: runs / units,
                ns_per_run: if runs > 0.0 { ns / runs } else { 0.0 },
                ns_per_unit: ns / units,
            }
        })
        .collect()
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

/// A `weft-pod rr --bursts` client that lives for a whole scenario, so that variants can take
/// turns in short bursts: the machine's drift then falls on every variant alike, and no
/// variant pays for a fresh process (page faults, cold caches) that another does not.
pub(crate) struct RrClient {
    process: weft_testkit::proc::Process,
    what: String,
    bursts: usize,
    reports: usize,
}

/// `weft-pod` arguments of a bursts client pinned to the client CPU.
fn rr_args<'a>(pin: &'a Pinning, targets: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = pin.client(&["rr", "--bursts", "--connect", targets]);
    args.extend_from_slice(extra);
    args
}

impl RrClient {
    /// Starts the client in `pod` (in its cgroup when `observed`, else outside weft's
    /// cgroups), pinned to the client CPU, making connections to `targets` in turn; `extra`:
    /// more `weft-pod rr` arguments.
    pub(crate) fn start(
        node: &weft_testkit::Node,
        (pod, observed): (&str, bool),
        pin: &Pinning,
        targets: &str,
        extra: &[&str],
        what: &str,
    ) -> Self {
        let (name, command) = node.pod_command(pod, observed, &rr_args(pin, targets, extra));
        Self::spawn(&name, command, what)
    }

    /// The same client in the node's namespace, outside weft's cgroups.
    pub(crate) fn on_node(
        node: &weft_testkit::Node,
        pin: &Pinning,
        targets: &str,
        extra: &[&str],
        what: &str,
    ) -> Self {
        let (name, command) = node.outside_command(&rr_args(pin, targets, extra));
        Self::spawn(&name, command, what)
    }

    fn spawn(name: &str, command: std::process::Command, what: &str) -> Self {
        Self {
            process: weft_testkit::proc::Process::spawn_interactive(name, command),
            what: what.to_owned(),
            bursts: 0,
            reports: 0,
        }
    }

    /// The `n`-th line of `event` (0-based), or the client's error.
    fn wait_event(&self, event: &str, n: usize) -> Result<Value> {
        self.process.stdout().wait_for(
            &format!("{}: {event} {}", self.what, n + 1),
            std::time::Duration::from_secs(120),
            |lines| {
                let mut seen = 0;
                for v in lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                {
                    if v["event"] == "error" {
                        return Some(Err(anyhow::anyhow!("{}: {}", self.what, v["error"])));
                    }
                    if v["event"] == event {
                        if seen == n {
                            return Some(Ok(v));
                        }
                        seen += 1;
                    }
                }
                None
            },
        )
    }

    /// Sends an order; a client that exited (its error is on its stdout) cannot take it.
    fn order(&mut self, line: &str) -> Result<()> {
        self.process.try_send_line(line).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot send {line:?} ({e}); its output:\n{}",
                self.what,
                self.process.stdout().snapshot().join("\n")
            )
        })
    }

    /// `n` more connections, waited for.
    pub(crate) fn burst(&mut self, n: u64) -> Result<()> {
        self.order(&n.to_string())?;
        self.wait_event("burst", self.bursts)?;
        self.bursts += 1;
        Ok(())
    }

    /// The results since the last report (as `weft-pod rr` prints them), each figure a number.
    pub(crate) fn report(&mut self) -> Result<Value> {
        self.order("report")?;
        let v = self.wait_event("rr", self.reports)?;
        self.reports += 1;
        for field in ["p50_us", "p99_us", "per_second"] {
            if !v[field].as_f64().is_some_and(f64::is_finite) {
                bail!("{}: no {field} in its report {v}", self.what);
            }
        }
        Ok(v)
    }
}

/// A keep-alive `rr-server` reading requests of `size` bytes and answering `reply` bytes on
/// `port` in `pod` (in its cgroup when `observed`), on the server CPU, listening.
pub(crate) fn rr_server(
    node: &weft_testkit::Node,
    (pod, observed): (&str, bool),
    pin: &Pinning,
    (size, reply): (usize, usize),
    (port, chunk): (u16, Option<usize>),
) -> weft_testkit::proc::Process {
    let (size, reply) = (size.to_string(), reply.to_string());
    let listen = format!("[::]:{port}");
    let chunk = chunk.map(|c| c.to_string());
    let mut args = pin.server(&[
        "rr-server",
        "--keepalive",
        "--size",
        &size,
        "--reply",
        &reply,
        "--listen",
        &listen,
    ]);
    if let Some(chunk) = &chunk {
        args.extend(["--chunk", chunk.as_str()]);
    }
    let (name, command) = node.pod_command(pod, observed, &args);
    let p = weft_testkit::proc::Process::spawn(&name, command);
    p.wait_listening();
    p
}

/// Connections per burst when clients take turns: short enough that drift within a round is
/// shared, long enough that switching costs nothing measurable (~10 ms).
pub(crate) const BURST: u64 = 100;

/// One round over `clients`: `count` connections (or requests) each, in bursts of at most
/// `burst`, the clients taking turns in a new order every burst ([`burst_order`]); then one
/// report per client, in the order of `clients`.
pub(crate) fn interleaved_round(
    clients: &mut [&mut RrClient],
    round: usize,
    count: u64,
    burst: u64,
) -> Result<Vec<Value>> {
    let bursts = count.div_ceil(burst);
    for b in 0..bursts {
        let n = burst.min(count - b * burst);
        for i in burst_order(clients.len(), round, b) {
            clients[i].burst(n)?;
        }
    }
    clients.iter_mut().map(|c| c.report()).collect()
}

/// The order `n` clients take turns in for burst `b` of round `round`: a permutation drawn
/// from a fixed pseudo-random sequence (the same in every run), so that no client always
/// follows the same other one (whatever a client leaves behind in caches falls on all alike).
pub(crate) fn burst_order(n: usize, round: usize, b: u64) -> Vec<usize> {
    let mut state = (round as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        | 1;
    let mut next = || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
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

/// Clients and servers on CPU 0 (see [`Pinning`]).
pub fn default_cpus() -> Vec<usize> {
    vec![0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_that_reaches_one_is_no_measurable_difference() {
        assert!(!measurable(&[0.98, 1.01, 0.97]));
        assert!(verdict(&[0.98, 1.01, 0.97]).starts_with("no measurable difference"));
        assert!(measurable(&[0.80, 0.86, 0.83]));
        assert_eq!(verdict(&[0.80, 0.86, 0.83]), "0.830 (rounds 0.800-0.860)");
        assert!(measurable(&[1.02, 1.04, 1.03]));
    }

    #[test]
    fn too_few_rounds_or_a_broken_one_is_not_a_result() {
        assert!(!measurable(&[0.5, 0.5]));
        assert!(verdict(&[0.5, 0.5]).starts_with("too few rounds"));
        assert!(!measurable(&[0.8, f64::NAN, 0.8]));
    }

    #[test]
    fn every_burst_order_is_a_permutation_and_they_vary() {
        let mut firsts = std::collections::BTreeSet::new();
        let mut followers_of_0 = std::collections::BTreeSet::new();
        for round in 0..9 {
            for b in 0..20 {
                let order = burst_order(4, round, b);
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, [0, 1, 2, 3]);
                firsts.insert(order[0]);
                if let Some(i) = order.iter().position(|&c| c == 0).filter(|&i| i < 3) {
                    followers_of_0.insert(order[i + 1]);
                }
            }
        }
        assert_eq!(firsts.len(), 4);
        assert_eq!(followers_of_0.len(), 3);
        assert_eq!(burst_order(4, 2, 5), burst_order(4, 2, 5));
    }

    #[test]
    fn ratios_are_per_round() {
        let r = Ratio::per_round(&[2.0, 3.0, 4.0], &[1.0, 2.0, 4.0]);
        assert_eq!(r.rounds, [2.0, 1.5, 1.0]);
        assert_eq!((r.median, r.min, r.max), (1.5, 1.0, 2.0));
        assert!(!r.measurable);
    }
}
