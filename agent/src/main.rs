//! `weft`: the node agent and its command line.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft::{admin, app, cli, datapath, logging};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "eBPF service-mesh node agent")]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,weft::kernel=debug`.
    #[arg(long, global = true, env = "WEFT_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the datapath to a cgroup and report the connections it sees.
    Agent(AgentArgs),
    /// Detach every program of an instance and remove its pins.
    Cleanup(CleanupArgs),
    /// Show the state of a running agent (exit status 1 when it is unhealthy).
    Status(ClientArgs),
    /// List service frontends and their backends as the kernel maps hold them.
    Services(ClientArgs),
    /// Print the version.
    Version,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// cgroup v2 directory to observe, with all its descendants [default: the host's cgroup2
    /// mount, found in /proc/self/mountinfo]
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    instance: InstanceArgs,
    /// Open TCP connections tracked at once (size of CONN_STATE).
    #[arg(long, default_value_t = 65_536)]
    max_connections: u32,
    /// (cgroup, direction, protocol) traffic counters (size of TRAFFIC).
    #[arg(long, default_value_t = 16_384)]
    traffic_entries: u32,
    /// Connection event ring buffer size in bytes (a power of two).
    #[arg(long, default_value_t = 512 * 1024)]
    ring_buffer_size: u32,
    /// Pending connection-event bytes that wake the agent (0: every event). Batching saves
    /// CPU under connection churn; --events-poll-interval bounds the delay.
    #[arg(long, default_value_t = 16 * 1024)]
    events_wakeup_bytes: u64,
    /// How often the agent drains connection events without being woken.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    events_poll_interval: Duration,
    /// Where desired state comes from: `dir:PATH`, a directory of Kubernetes YAML.
    #[arg(long, value_parser = parse_source)]
    source: Option<PathBuf>,
    /// Service frontends (ClusterIP x port x protocol) the kernel can hold.
    #[arg(long, default_value_t = 65_536)]
    max_services: u32,
    /// Backends the kernel can hold over all services (a backend set being replaced briefly
    /// holds its old and new slots: leave headroom).
    #[arg(long, default_value_t = 262_144)]
    max_backends: u32,
    /// ClientIP affinity entries (client pods x services with affinity).
    #[arg(long, default_value_t = 65_536)]
    max_affinity: u32,
    /// Sockets whose ClusterIP translation is remembered (getpeername, UDP replies).
    #[arg(long, default_value_t = 65_536)]
    max_socket_translations: u32,
    /// Admin API socket [default: <run-dir>/<instance>.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// How often datapath counters are reported, e.g. `30s` or `500ms`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stats_interval: Duration,
}

#[derive(Debug, clap::Args)]
struct InstanceArgs {
    /// Instance name: one agent per instance; pins live in <bpffs>/weft/<instance>.
    #[arg(long, default_value = "default")]
    instance: String,
    /// bpffs mount point.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

#[derive(Debug, clap::Args)]
struct CleanupArgs {
    #[command(flatten)]
    instance: InstanceArgs,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The agent's instance.
    #[arg(long, default_value = "default")]
    instance: String,
    /// The agent's admin socket [default: <run-dir>/<instance>.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: cli::Output,
}

/// Where admin sockets live.
const RUN_DIR: &str = "/run/weft";

fn parse_source(s: &str) -> Result<PathBuf, String> {
    match s.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => {
            let p = PathBuf::from(path);
            if p.is_dir() {
                Ok(p)
            } else {
                Err(format!("{path} is not a directory"))
            }
        }
        _ => Err(format!(
            "{s:?}: use dir:PATH (a directory of Kubernetes YAML)"
        )),
    }
}

fn socket(explicit: Option<PathBuf>, instance: &str) -> PathBuf {
    explicit.unwrap_or_else(|| admin::socket_path(std::path::Path::new(RUN_DIR), instance))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("weft: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "weft failed");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => {
            let config = app::AgentConfig {
                cgroup_root: args.cgroup_root,
                admin_socket: socket(args.admin_socket, &args.instance.instance),
                bpffs: args.instance.bpffs,
                instance: args.instance.instance,
                max_connections: args.max_connections,
                traffic_entries: args.traffic_entries,
                ring_buffer_bytes: args.ring_buffer_size,
                events_wakeup_bytes: args.events_wakeup_bytes,
                max_services: args.max_services,
                max_backends: args.max_backends,
                max_affinity: args.max_affinity,
                max_socket_translations: args.max_socket_translations,
                events_poll_interval: args.events_poll_interval,
                stats_interval: args.stats_interval,
                source_dir: args.source,
            };
            runtime()?
                .block_on(app::run(config))
                .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
        }
        Command::Status(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let (text, healthy) = runtime()?.block_on(cli::status(&path, args.output))?;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            return Ok(if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Services(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::services(&path, args.output))?;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
        Command::Cleanup(args) => {
            let report = datapath::cleanup(&args.instance.bpffs, &args.instance.instance)
                .with_context(|| format!("cleanup of instance {:?}", args.instance.instance))?;
            if report.links_detached.is_empty() && report.maps_unpinned.is_empty() {
                tracing::info!(instance = args.instance.instance, "nothing to clean up");
            }
            for path in &report.links_detached {
                tracing::info!(path = %path.display(), "link detached and unpinned");
            }
            for path in &report.maps_unpinned {
                tracing::info!(path = %path.display(), "map unpinned");
            }
        }
        Command::Version => println!("weft {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(ExitCode::SUCCESS)
}
