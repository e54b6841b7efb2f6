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
    Agent(Box<AgentArgs>),
    /// Detach every program of an instance and remove its pins.
    Cleanup(CleanupArgs),
    /// Show the state of a running agent (exit status 1 when it is unhealthy).
    Status(StatusArgs),
    /// List service frontends and their backends as the kernel maps hold them.
    Services(ClientArgs),
    /// List NetworkPolicies, the pods of this node they select, and their kernel entries.
    Policies(ClientArgs),
    /// Every BPF map of the instance: type, entries, capacity and fill.
    Maps(ClientArgs),
    /// Compile a source directory as the agent would, without a kernel: what it would program,
    /// what it rejects, and what compiling cost (JSON). A dry run for configuration changes.
    Compile(CompileArgs),
    /// Ask the kernel's policy maps about a connection between two pods.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print this binary's version and the running agent's (if one answers).
    Version(ClientArgs),
    /// Show the running agent's log filter, or change it without a restart
    /// (e.g. `info,weft::sync=debug`).
    LogLevel(LogLevelArgs),
    /// Open TCP connections of local pods with bytes, RTT and retransmits as last reported.
    Connections(ClientArgs),
    /// Flow records: connections opened and closed, UDP flows, drops (like `hubble observe`).
    Flows(FlowsArgs),
    /// The agent's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check what the agent needs from this node (capabilities, cgroup v2, bpffs, BTF) and
    /// load every program once, printing the verifier's log of any that fails (exit 1).
    Doctor(DoctorArgs),
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// cgroup v2 directory the agent would attach to [default: the host's cgroup2 mount].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: cli::Output,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The desired state computed from the source: services and backends, policies and the
    /// pods they select, workload names, telemetry settings (JSON, or `-o yaml`).
    Dump(ClientArgs),
}

#[derive(Debug, clap::Args)]
struct FlowsArgs {
    /// Keep printing new records as they come.
    #[arg(short = 'f', long)]
    follow: bool,
    /// The last N buffered records first [default: 20; 0 with --follow].
    #[arg(long)]
    last: Option<usize>,
    /// Either end is in this namespace.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Either end is this pod (`ns/pod` or `pod`).
    #[arg(long)]
    pod: Option<String>,
    /// The source (client) is this pod.
    #[arg(long)]
    from_pod: Option<String>,
    /// The destination (server) is this pod.
    #[arg(long)]
    to_pod: Option<String>,
    #[arg(long, value_enum)]
    verdict: Option<weft::telemetry::flows::Verdict>,
    /// TCP, UDP, SCTP, ICMP, ...
    #[arg(long)]
    protocol: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, clap::Args)]
struct LogLevelArgs {
    /// The new filter (tracing's EnvFilter syntax); without it, the current one is shown.
    filter: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// One line: health, readiness and counts.
    #[arg(long)]
    brief: bool,
    #[command(flatten)]
    client: ClientArgs,
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
    /// Where desired state comes from: `dir:PATH`, a directory of Kubernetes YAML, or
    /// `kubernetes`, the API server (in-cluster config, --kubeconfig, KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, value_parser = parse_source)]
    source: Option<SourceArg>,
    /// This node's name, as pods' spec.nodeName has it (--source kubernetes). The DaemonSet
    /// takes it from the downward API.
    #[arg(long, env = "NODE_NAME", required_if_eq("source", "kubernetes"))]
    node_name: Option<String>,
    /// A kubeconfig file for --source kubernetes (default: in-cluster config, else
    /// KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
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
    /// Local pods whose policy the kernel can enforce (size of ENDPOINTS).
    #[arg(long, default_value_t = 16_384)]
    max_endpoints: u32,
    /// Pod addresses and ipBlock prefixes the kernel can know (size of IPCACHE).
    #[arg(long, default_value_t = 65_536)]
    max_ipcache: u32,
    /// Policy entries over all local pods' policy sets (size of POLICY).
    #[arg(long, default_value_t = 262_144)]
    max_policy_entries: u32,
    /// UDP/SCTP exchanges of pods remembered so replies pass (size of POLICY_FLOWS, LRU).
    #[arg(long, default_value_t = 65_536)]
    max_policy_flows: u32,
    /// The node's own addresses (ingress from them is always allowed, for kubelet probes);
    /// repeat for several [default: the addresses of the agent's network namespace].
    #[arg(long = "node-ip")]
    node_ips: Vec<std::net::IpAddr>,
    /// Admin API socket [default: <run-dir>/<instance>.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// How often datapath counters are reported, e.g. `30s` or `500ms`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stats_interval: Duration,
    /// Connection and drop events and UDP flow counting in the kernel (`--telemetry=false`
    /// turns them off; services and policy are unaffected).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    telemetry: bool,
    /// An open TCP connection reports its counters this often, so metrics move while it is
    /// open (`0s`: only at open and close).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    conn_update_interval: Duration,
    /// UDP flows counted at once (size of UDP_FLOW_STATS, LRU).
    #[arg(long, default_value_t = 65_536)]
    max_udp_flows: u32,
    /// A UDP flow without packets for this long ends (its flow record is written).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    udp_idle_timeout: Duration,
    /// Where Prometheus scrapes /metrics (`off`: only on the admin socket). 9967 clashes with
    /// neither Cilium (9962-9965), Istio (15000-15021) nor node-exporter (9100).
    #[arg(long, default_value = "0.0.0.0:9967", value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// How finely connection series are split: per workload pair (Istio's default), per pod
    /// pair, or per connection (debugging only).
    #[arg(long, value_enum, default_value = "workload")]
    metrics_granularity: weft::telemetry::metrics::Granularity,
    /// `source_cluster` / `destination_cluster` of this cluster's workloads (Istio's default).
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// DNS domain of the cluster, for `destination_service` (`name.ns.svc.<domain>`).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Flow records kept for `weft flows --last`.
    #[arg(long, default_value_t = 8192)]
    flow_buffer: usize,
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<std::net::SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (use IP:PORT, e.g. 0.0.0.0:9967, or off)"))
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
struct CompileArgs {
    /// `dir:PATH`, a directory of Kubernetes YAML.
    #[arg(long, value_parser = parse_source_dir)]
    source: PathBuf,
    /// The node's addresses (ingress from them is always allowed).
    #[arg(long = "node-ip")]
    node_ips: Vec<std::net::IpAddr>,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Would a new connection from one pod to another be allowed? Exits 0 if allowed, 1 if
    /// denied; names the rule or policies that decide.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The client pod, `namespace/name`.
    #[arg(long)]
    from: String,
    /// The server pod, `namespace/name`.
    #[arg(long)]
    to: String,
    /// `PORT` or `PORT/PROTOCOL` (TCP, UDP, SCTP; TCP when omitted), e.g. `80/TCP`.
    #[arg(long, value_parser = parse_port)]
    port: (u16, String),
    #[command(flatten)]
    client: ClientArgs,
}

fn parse_port(s: &str) -> Result<(u16, String), String> {
    let (port, protocol) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: the port must be a number 1-65535, e.g. 80/TCP"))?;
    let protocol = protocol.to_ascii_uppercase();
    if port == 0 || !["TCP", "UDP", "SCTP"].contains(&protocol.as_str()) {
        return Err(format!(
            "{s:?}: use PORT/PROTOCOL with a port 1-65535 and TCP, UDP or SCTP"
        ));
    }
    Ok((port, protocol))
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

/// `--source`.
#[derive(Debug, Clone)]
enum SourceArg {
    Dir(PathBuf),
    Kubernetes,
}

fn parse_source(s: &str) -> Result<SourceArg, String> {
    if s == "kubernetes" {
        return Ok(SourceArg::Kubernetes);
    }
    match s.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => {
            let p = PathBuf::from(path);
            if p.is_dir() {
                Ok(SourceArg::Dir(p))
            } else {
                Err(format!("{path} is not a directory"))
            }
        }
        _ => Err(format!(
            "{s:?}: use dir:PATH (a directory of Kubernetes YAML) or kubernetes (the API server)"
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

/// `--source` of `weft compile`: only a directory.
fn parse_source_dir(s: &str) -> Result<PathBuf, String> {
    match parse_source(s)? {
        SourceArg::Dir(dir) => Ok(dir),
        SourceArg::Kubernetes => Err("compile reads a directory: use dir:PATH".into()),
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
                max_endpoints: args.max_endpoints,
                max_ipcache: args.max_ipcache,
                max_policy_entries: args.max_policy_entries,
                max_policy_flows: args.max_policy_flows,
                node_ips: (!args.node_ips.is_empty()).then_some(args.node_ips),
                events_poll_interval: args.events_poll_interval,
                stats_interval: args.stats_interval,
                source: match args.source {
                    None => None,
                    Some(SourceArg::Dir(dir)) => Some(app::SourceConfig::Dir(dir)),
                    Some(SourceArg::Kubernetes) => Some(app::SourceConfig::Kubernetes {
                        kubeconfig: args.kubeconfig,
                        node_name: args
                            .node_name
                            .context("--node-name is required with --source kubernetes")?,
                    }),
                },
                telemetry: args.telemetry,
                conn_update_interval: args.conn_update_interval,
                max_udp_flows: args.max_udp_flows,
                metrics_addr: args.metrics_addr.0,
                telemetry_config: weft::telemetry::TelemetryConfig {
                    granularity: args.metrics_granularity,
                    cluster: args.cluster_id,
                    names: weft::telemetry::names::NameConfig {
                        cluster_domain: args.cluster_domain,
                    },
                    udp_idle: args.udp_idle_timeout,
                    flow_buffer: args.flow_buffer,
                    ..weft::telemetry::TelemetryConfig::default()
                },
            };
            runtime()?
                .block_on(app::run(config))
                .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
        }
        Command::Status(args) => {
            let path = socket(args.client.admin_socket, &args.client.instance);
            let (text, healthy) =
                runtime()?.block_on(cli::status(&path, args.client.output, args.brief))?;
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
        Command::Compile(args) => {
            let report = weft::pipeline::offline::compile_dir(&args.source, &args.node_ips)
                .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(if report.rejections.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::LogLevel(args) => {
            let path = socket(args.client.admin_socket, &args.client.instance);
            let text = runtime()?.block_on(cli::log_level(&path, args.filter.as_deref()))?;
            print!("{text}");
        }
        Command::Maps(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::maps(&path, args.output))?;
            print!("{text}");
        }
        Command::Policies(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::policies(&path, args.output))?;
            print!("{text}");
        }
        Command::Policy(PolicyCommand::Check(args)) => {
            let path = socket(args.client.admin_socket, &args.client.instance);
            let query = admin::policy::CheckQuery {
                from: args.from,
                to: args.to,
                port: args.port.0,
                protocol: Some(args.port.1),
            };
            let (text, allowed) =
                runtime()?.block_on(cli::policy_check(&path, &query, args.client.output))?;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            return Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
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
        Command::Doctor(args) => {
            let checks = weft::doctor::all(&args.bpffs, args.cgroup_root.as_deref());
            match args.output {
                cli::Output::Table => print!("{}", weft::doctor::table(&checks)),
                _ => println!("{}", serde_json::to_string_pretty(&checks)?),
            }
            return Ok(if checks.iter().all(|c| c.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Connections(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::connections(&path, args.output))?;
            print!("{text}");
        }
        Command::Flows(args) => {
            let path = socket(args.client.admin_socket, &args.client.instance);
            let filter = weft::telemetry::flows::Filter {
                namespace: args.namespace,
                pod: args.pod,
                from_pod: args.from_pod,
                to_pod: args.to_pod,
                verdict: args.verdict,
                protocol: args.protocol,
            };
            let query = admin::telemetry::StreamQuery {
                last: Some(args.last.unwrap_or(if args.follow { 0 } else { 20 })),
                follow: args.follow,
            };
            runtime()?.block_on(cli::flows(&path, &filter, &query, args.client.output))?;
        }
        Command::Config(ConfigCommand::Dump(args)) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::config_dump(&path, args.output))?;
            println!("{}", text.trim_end());
        }
        Command::Version(args) => {
            let path = socket(args.admin_socket, &args.instance);
            let text = runtime()?.block_on(cli::version(&path, args.output))?;
            print!("{text}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
