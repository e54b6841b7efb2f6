//! `cargo xtask test`: formatting, lints, unit tests, BPF_PROG_TEST_RUN tests and the
//! privileged netns/cgroup tests. Fails, never skips, when the privileged tests cannot run,
//! and fails when the suite leaves anything behind on the machine.
use std::{collections::BTreeSet, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};
use weft_testkit::node::{cgroup2_root, is_bpffs};

use crate::{
    build::{self, stable_cargo},
    setup::{Tools, status},
};

/// The user-space packages (the kernel crate is linted and built separately).
const USER_SPACE: [&str; 8] = [
    "-p",
    "weft",
    "-p",
    "weft-abi",
    "-p",
    "weft-testkit",
    "-p",
    "xtask",
];

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {name}");
    let start = Instant::now();
    status(cmd).with_context(|| format!("step `{name}` failed"))?;
    eprintln!("    {name}: ok ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

pub fn run(ws: &Path, tools: &Tools, filter: Option<&str>) -> Result<()> {
    step(
        "rustfmt",
        Command::new("cargo")
            .current_dir(ws)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    eprintln!("==> lint (layers, function length)");
    crate::lint::run(ws).context("step `lint` failed")?;
    eprintln!("    lint: ok");
    eprintln!("==> build kernel programs");
    build::ebpf(ws, tools)?;
    step(
        "clippy (user space)",
        stable_cargo(ws, "clippy")
            .args(USER_SPACE)
            .args(["--all-targets", "--", "-D", "warnings"]),
    )?;
    step(
        "clippy (kernel programs)",
        build::nightly_cargo(ws, tools, "clippy").args(["--", "-D", "warnings"]),
    )?;
    eprintln!(
        "==> manifests (kustomize, yamllint, kubernetes-validate, prometheus-operator, promtool)"
    );
    let started = Instant::now();
    crate::manifests::check(ws, tools.manifests.as_ref()).context("step `manifests` failed")?;
    eprintln!(
        "    manifests: ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let bins = build::all(ws, tools, false)?;
    step(
        "unit tests",
        stable_cargo(ws, "test")
            .args(USER_SPACE)
            .args(["--lib", "--bins"]),
    )?;

    preflight()?;
    let before = Leftovers::snapshot();
    let mut cmd = stable_cargo(ws, "test");
    cmd.args(["-p", "weft-testkit", "--tests"])
        .env("WEFT_BIN", bins.join("weft"))
        .env("WEFT_POD_TOOL", bins.join("weft-pod"));
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    let result = step(
        "privileged tests (BPF_PROG_TEST_RUN, netns/cgroup topologies)",
        &mut cmd,
    );
    let left = Leftovers::snapshot().minus(&before);
    if !left.is_empty() {
        bail!("the test suite left these behind on the machine: {left:?}");
    }
    result?;
    eprintln!("all tests passed");
    Ok(())
}

/// What the privileged tests need. Missing any of it is an error naming it: these tests are
/// part of the suite and are never skipped.
fn preflight() -> Result<()> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "root (the tests load BPF programs and create namespaces and cgroups)".to_owned(),
        );
    }
    if !is_bpffs(Path::new("/sys/fs/bpf")) {
        missing.push("bpffs mounted at /sys/fs/bpf (`cargo xtask setup` mounts it)".to_owned());
    }
    let cgroup_ok = std::panic::catch_unwind(cgroup2_root).is_ok();
    if !cgroup_ok {
        missing.push("cgroup v2 (at /sys/fs/cgroup or /sys/fs/cgroup/unified)".to_owned());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        missing.push("iproute2's `ip` (`cargo xtask setup` installs it)".to_owned());
    }
    if !missing.is_empty() {
        bail!(
            "the privileged tests cannot run here; missing: {}. They are never skipped.",
            missing.join("; ")
        );
    }
    Ok(())
}

/// Resources the suite creates, to check that it removed them all.
#[derive(Debug, Default, PartialEq, Eq)]
struct Leftovers {
    netns: BTreeSet<String>,
    cgroups: BTreeSet<String>,
    pins: BTreeSet<String>,
    processes: BTreeSet<String>,
}

impl Leftovers {
    fn snapshot() -> Self {
        let names = |dir: &Path, prefix: &str| -> BTreeSet<String> {
            fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.starts_with(prefix))
                        .collect()
                })
                .unwrap_or_default()
        };
        let cgroups = std::panic::catch_unwind(cgroup2_root)
            .map(|root| names(&root, "weft-test-"))
            .unwrap_or_default();
        let mut processes = BTreeSet::new();
        for pid in names(Path::new("/proc"), "") {
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm == "weft" || comm == "weft-pod" {
                processes.insert(format!("{comm}[{pid}]"));
            }
        }
        Self {
            netns: names(Path::new("/run/netns"), "weft-"),
            cgroups,
            pins: names(Path::new("/sys/fs/bpf/weft"), ""),
            processes,
        }
    }

    fn minus(self, before: &Self) -> Self {
        let diff = |a: BTreeSet<String>, b: &BTreeSet<String>| {
            a.into_iter().filter(|x| !b.contains(x)).collect()
        };
        Self {
            netns: diff(self.netns, &before.netns),
            cgroups: diff(self.cgroups, &before.cgroups),
            pins: diff(self.pins, &before.pins),
            processes: diff(self.processes, &before.processes),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}
