//! `weft`: the node agent and its command line.
use std::{future::Future, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft::{admin, app, cli, config::Config, datapath, logging};

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
    /// Istio's security policy (PeerAuthentication, AuthorizationPolicy) of meshed pods: the
    /// policies, the local workloads they select, and each workload's mTLS mode.
    Authz(AuthzArgs),
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
    /// The mesh's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The mesh identities of this node's pods, their certificates (serial, expiry), and the
    /// roots trusted.
    Certs(ClientArgs),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Make a new root CA (ECDSA P-256, 10 years) as DIR/ca.crt and DIR/ca.key (mode 0600);
    /// never replaces either file.
    Init {
        /// The directory to write to (it must exist).
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// cgroup v2 directory the agent would attach to [default: the host's cgroup2 mount].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The mesh CA the agent would use: checked to load and sign.
    #[arg(long, value_name = "DIR")]
    mesh_ca: Option<PathBuf>,
    /// The host's procfs, as the agent's --host-proc.
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    host_proc: PathBuf,
    /// The running agent whose mesh is checked too, when one answers.
    #[command(flatten)]
    client: ClientArgs,
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
    #[command(flatten)]
    filter: weft::telemetry::flows::Filter,
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
struct CompileArgs {
    /// `dir:PATH`, a directory of Kubernetes YAML.
    #[arg(long, value_parser = parse_source_dir)]
    source: PathBuf,
    /// The node's addresses (ingress from them is always allowed).
    #[arg(long = "node-ip")]
    node_ips: Vec<std::net::IpAddr>,
}

#[derive(Debug, clap::Args)]
struct AuthzArgs {
    #[command(subcommand)]
    command: Option<AuthzCommand>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// Would the destination's security policy allow a new TCP connection from one pod to
    /// another? Exits 0 if allowed, 1 if denied; names the policy and rule that decide.
    Check(CheckArgs),
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

impl CheckArgs {
    /// The admin API's query, and where to send it.
    fn query(self) -> (admin::policy::CheckQuery, ClientArgs) {
        let query = admin::policy::CheckQuery {
            from: self.from,
            to: self.to,
            port: self.port.0,
            protocol: Some(self.port.1),
        };
        (query, self.client)
    }
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
    instance: datapath::Instance,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The agent's instance (the DaemonSet sets WEFT_INSTANCE in the agent's container).
    #[arg(long, env = "WEFT_INSTANCE", default_value = "default")]
    instance: String,
    /// The agent's admin socket [default: <run-dir>/<instance>.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: cli::Output,
}

impl ClientArgs {
    fn socket(&self) -> PathBuf {
        self.admin_socket.clone().unwrap_or_else(|| {
            admin::socket_path(std::path::Path::new(admin::RUN_DIR), &self.instance)
        })
    }
}

/// `--source` of `weft compile`: only a directory.
fn parse_source_dir(s: &str) -> Result<PathBuf, String> {
    match weft::source::parse_source(s)? {
        weft::source::Kind::Dir(dir) => Ok(dir),
        weft::source::Kind::Kubernetes => Err("compile reads a directory: use dir:PATH".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("weft: {e}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
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

/// Prints a command's text (ending in one newline) and exits 0 when it succeeded, else 1.
fn finish(text: &str, ok: bool) -> ExitCode {
    let text = text.trim_end();
    if !text.is_empty() {
        println!("{text}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A client command against the agent's admin socket: what it prints, and whether it
/// succeeded.
fn client<F, T>(work: F) -> anyhow::Result<ExitCode>
where
    F: Future<Output = Result<T, cli::Error>>,
    T: Into<(String, bool)>,
{
    let (text, ok) = runtime()?.block_on(work)?.into();
    Ok(finish(&text, ok))
}

/// A text that always means success.
struct Done(String);

impl From<Done> for (String, bool) {
    fn from(d: Done) -> Self {
        (d.0, true)
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Agent(args) => {
            let config = args.config;
            // What clap cannot check field by field, before anything is loaded.
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("invalid flags: {e}"))?;
            runtime()?
                .block_on(app::run(config))
                .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup(args) => cleanup(&args.instance),
        Command::Compile(args) => compile(&args),
        Command::Doctor(args) => doctor(&args),
        Command::Ca(CaCommand::Init { dir }) => ca_init(&dir),
        Command::Status(a) => client(cli::status(&a.client.socket(), a.client.output, a.brief)),
        Command::Policy(PolicyCommand::Check(a)) => {
            let (query, c) = a.query();
            client(cli::policy_check(&c.socket(), &query, c.output))
        }
        Command::Authz(AuthzArgs {
            command: Some(AuthzCommand::Check(a)),
            ..
        }) => {
            let (query, c) = a.query();
            client(cli::authz_check(&c.socket(), &query, c.output))
        }
        Command::Authz(AuthzArgs {
            command: None,
            client: c,
        }) => listing(&c, cli::authz),
        Command::Flows(a) => {
            let query = admin::telemetry::StreamQuery {
                last: Some(a.last.unwrap_or(if a.follow { 0 } else { 20 })),
                follow: a.follow,
            };
            let socket = a.client.socket();
            runtime()?.block_on(cli::flows(&socket, &a.filter, &query, a.client.output))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::LogLevel(a) => {
            let socket = a.client.socket();
            client(async { cli::log_level(&socket, a.filter.as_deref()).await.map(Done) })
        }
        Command::Services(a) => listing(&a, cli::services),
        Command::Policies(a) => listing(&a, cli::policies),
        Command::Maps(a) => listing(&a, cli::maps),
        Command::Certs(a) => listing(&a, cli::certs),
        Command::Connections(a) => listing(&a, cli::connections),
        Command::Config(ConfigCommand::Dump(a)) => listing(&a, cli::config_dump),
        Command::Version(a) => listing(&a, cli::version),
    }
}

/// A listing: text (or JSON/YAML) from the agent, always success when it answers.
fn listing(
    args: &ClientArgs,
    command: impl AsyncFnOnce(&std::path::Path, cli::Output) -> Result<String, cli::Error>,
) -> anyhow::Result<ExitCode> {
    let socket = args.socket();
    client(async { command(&socket, args.output).await.map(Done) })
}

fn cleanup(instance: &datapath::Instance) -> anyhow::Result<ExitCode> {
    let report = datapath::cleanup(&instance.bpffs, &instance.name)
        .with_context(|| format!("cleanup of instance {:?}", instance.name))?;
    if report.links_detached.is_empty() && report.maps_unpinned.is_empty() {
        tracing::info!(instance = instance.name, "nothing to clean up");
    }
    for path in &report.links_detached {
        tracing::info!(path = %path.display(), "link detached and unpinned");
    }
    for path in &report.maps_unpinned {
        tracing::info!(path = %path.display(), "map unpinned");
    }
    Ok(ExitCode::SUCCESS)
}

fn compile(args: &CompileArgs) -> anyhow::Result<ExitCode> {
    let report = weft::pipeline::offline::compile_dir(&args.source, &args.node_ips)
        .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
    Ok(finish(
        &serde_json::to_string_pretty(&report)?,
        report.rejections.is_empty(),
    ))
}

fn ca_init(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let [crt, key] = weft::identity::ca::Ca::init(dir, std::time::SystemTime::now())
        .map_err(|e| anyhow::anyhow!(weft::chain(&e)))?;
    println!(
        "wrote {} (the root peers trust) and {} (mode 0600: whoever holds it can issue any \
         identity of the mesh)",
        crt.display(),
        key.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn doctor(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut checks = weft::doctor::all(&args.bpffs, args.cgroup_root.as_deref());
    checks.extend(weft::doctor::mesh(args.mesh_ca.as_deref(), &args.host_proc));
    let socket = args.client.socket();
    let answer = runtime()?.block_on(weft::doctor::ask_running(&socket));
    let now = std::time::SystemTime::now();
    checks.extend(weft::doctor::running_mesh(&socket, answer, now));
    let text = match cli::structured(&checks, args.client.output)? {
        Some(text) => text,
        None => weft::doctor::table(&checks),
    };
    Ok(finish(&text, checks.iter().all(|c| c.ok)))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_zero_stats_interval_is_refused_before_the_agent_starts() {
        let e =
            Cli::try_parse_from(["weft", "agent", "--stats-interval", "0s"]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("--stats-interval"), "{e}");
    }
}
