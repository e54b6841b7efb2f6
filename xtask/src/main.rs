//! `cargo xtask`: set-up, builds, tests, the demo and benchmarks for weft.
//!
//! Every command first runs `setup`, which is a fast no-op when everything is present.
mod bench;
mod build;
mod demo;
mod lint;
mod manifests;
mod setup;
mod test;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "weft's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what is missing (nightly rust-src, bpf-linker, Debian packages, bpffs mount).
    Setup,
    /// Build the kernel programs (nightly, bpfel-unknown-none) into target/ebpf.
    BuildEbpf,
    /// Build the kernel programs and the user-space binaries.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// rustfmt check, clippy (user space and kernel), unit, TEST_RUN and privileged tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Check the agent's layers (no module uses a later one) and function lengths (also part
    /// of `test`).
    Lint,
    /// Validate deploy/: kustomize renders, yamllint, kubernetes-validate, the
    /// prometheus-operator schema and the dashboard's PromQL (also part of `test`).
    Manifests,
    /// Run weft on a simulated node with a few pods and show the connections it sees.
    Demo {
        /// Stop after this long (default: run until Ctrl-C), e.g. `20s`.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Run benchmark scenarios; each measures weft against its baselines in the same run.
    Bench {
        /// Scenarios to run (default: all). Known: churn, services, established, policy,
        /// telemetry, kube, bind, mesh, outlier.
        scenarios: Vec<String>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Alternating baseline/weft rounds per scenario (the median ratio is reported).
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Another build's binaries (a directory holding its `weft`, e.g. a worktree's
        /// target/release): churn and services measure it too, in the same rounds, so a change
        /// is compared with what it replaces side by side.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// More `weft agent` arguments for the compared agent (this build's when --compare is
        /// not given), e.g. `--compare-args=--sockmap`.
        #[arg(long, allow_hyphen_values = true)]
        compare_args: Option<String>,
        /// The CPUs clients and servers are pinned to (`CLIENT,SERVER`), the same for every
        /// variant; default 0,0.
        #[arg(long, value_delimiter = ',')]
        cpus: Option<Vec<usize>>,
        /// mesh: leave the agents where the scheduler puts them (default: on the client's CPU).
        #[arg(long)]
        agents_unpinned: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let ws = workspace_root();
    if let Cmd::Lint = cli.command {
        // Reads sources only: nothing to set up.
        return lint::run(&ws);
    }
    let tools = match cli.command {
        Cmd::BuildEbpf | Cmd::Build { .. } => setup::for_build(&ws)?,
        _ => setup::run(&ws)?,
    };
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::BuildEbpf => build::ebpf(&ws, &tools).map(drop),
        Cmd::Build { release } => build::all(&ws, &tools, release).map(drop),
        Cmd::Test { filter } => test::run(&ws, &tools, filter.as_deref()),
        Cmd::Demo { duration } => demo::run(&ws, &tools, duration),
        Cmd::Lint => unreachable!("handled above"),
        Cmd::Manifests => manifests::check(&ws, tools.manifests.as_ref()),
        Cmd::Bench {
            scenarios,
            seconds,
            rounds,
            compare,
            compare_args,
            cpus,
            agents_unpinned,
        } => {
            let cpus = cpus.unwrap_or_else(bench::default_cpus);
            let [client, server] = cpus[..] else {
                anyhow::bail!("--cpus takes two CPUs, CLIENT,SERVER: got {cpus:?}");
            };
            let options = bench::Options {
                scenarios: &scenarios,
                seconds,
                rounds,
                compare: bench::Other::from_flags(compare, compare_args.as_deref()),
                pinning: bench::Pinning::new(client, server)?,
                agents_unpinned,
            };
            bench::run(&ws, &tools, &options)
        }
    }
}

/// The workspace root (this crate lives in `<root>/xtask`).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from)
}
