//! Running `weft agent` against a simulated node, reading its structured logs, and removing
//! its pins afterwards.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    node::{Node, is_bpffs, workspace_binary},
    proc::{Lines, Process},
};

/// Where tests pin (the machine's bpffs; `cargo xtask setup` mounts it).
pub const BPFFS: &str = "/sys/fs/bpf";

/// The `weft` binary under test.
pub fn weft_binary() -> PathBuf {
    workspace_binary("WEFT_BIN", "weft")
}

/// Options for [`Agent::start_with`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--log-level` filter.
    pub log_level: String,
    /// `--stats-interval`.
    pub stats_interval: String,
    /// More arguments for `weft agent`.
    pub extra_args: Vec<String>,
    /// The `weft` binary (default: [`weft_binary`]).
    pub binary: Option<PathBuf>,
    /// Read the node's source directory (`--source dir:`).
    pub source: bool,
    /// With `source`: read this directory instead of the node's (a cluster's shared one).
    pub source_dir: Option<PathBuf>,
    /// `--metrics-addr`: by default a free port on loopback (agents of parallel tests must
    /// not compete for one); the address taken is in `Agent::metrics_url`.
    pub metrics_addr: String,
    /// Run the agent in the node's cgroup, inside a cgroup namespace rooted there with its
    /// own cgroup2 mount: it sees the node's cgroup as the cgroup2 root, as the agent of a
    /// nested or rootless node does.
    pub cgroup_namespace: bool,
    /// Run the agent in this cgroup (a directory the caller made and removes), as a
    /// DaemonSet pod's container runs in its own: without a cgroup namespace.
    pub cgroup: Option<PathBuf>,
}

impl AgentOptions {
    /// Reading the node's source directory, with more `weft agent` arguments.
    pub fn with_source(extra: &[&str]) -> Self {
        Self {
            source: true,
            extra_args: extra.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::default()
        }
    }
}

impl AgentOptions {
    /// `--source kubernetes` against a fake API server (as the node's name, or
    /// [`crate::k8s::NODE_NAME`]), with more `weft agent` arguments.
    pub fn with_api(api: &crate::fakeapi::FakeApi, node: &Node, extra: &[&str]) -> Self {
        let kubeconfig = api.kubeconfig(node.workdir());
        let name = node.name().unwrap_or(crate::k8s::NODE_NAME);
        let mut extra_args = vec![
            "--source=kubernetes".to_owned(),
            format!("--node-name={name}"),
            format!("--kubeconfig={}", kubeconfig.display()),
        ];
        extra_args.extend(extra.iter().map(|s| (*s).to_owned()));
        Self {
            extra_args,
            ..Self::default()
        }
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            // Connection records are logged at debug; tests read them.
            log_level: "info,weft::conn=debug".into(),
            stats_interval: "1s".into(),
            extra_args: Vec::new(),
            binary: None,
            source: false,
            source_dir: None,
            metrics_addr: "127.0.0.1:0".into(),
            cgroup_namespace: false,
            cgroup: None,
        }
    }
}

/// A running `weft agent` attached to a node's cgroup, with instance = the node's tag.
/// Dropping it kills the process and runs `weft cleanup` for the instance.
#[derive(Debug)]
pub struct Agent {
    binary: PathBuf,
    admin_socket: PathBuf,
    source: Option<PathBuf>,
    process: Option<Process>,
    instance: String,
    cgroup: PathBuf,
    /// The simulated node's network namespace: its host network.
    host_netns: PathBuf,
    /// The node's scratch directory.
    workdir: PathBuf,
    options: AgentOptions,
    /// Logs of earlier processes of this agent (before a restart).
    previous: Vec<String>,
}

impl Agent {
    pub fn start(node: &Node) -> Self {
        Self::start_with(node, AgentOptions::default())
    }

    /// An agent reading the node's source directory, with more `weft agent` arguments.
    pub fn with_source(node: &Node, extra: &[&str]) -> Self {
        Self::start_with(node, AgentOptions::with_source(extra))
    }

    pub fn start_with(node: &Node, options: AgentOptions) -> Self {
        let mut agent = Self {
            admin_socket: node.workdir().join("admin.sock"),
            source: options.source.then(|| {
                options
                    .source_dir
                    .clone()
                    .unwrap_or_else(|| node.source_dir())
            }),
            binary: options.binary.clone().unwrap_or_else(weft_binary),
            process: None,
            instance: node.tag().to_owned(),
            cgroup: node.cgroup().to_owned(),
            host_netns: node.netns_path(),
            workdir: node.workdir().to_owned(),
            options,
            previous: Vec::new(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        assert!(
            is_bpffs(Path::new(BPFFS)),
            "{BPFFS} is not a bpffs mount: run `cargo xtask setup`"
        );
        let (mut command, cgroup_root) = self.command();
        command
            .args([
                "--log-format",
                "json",
                "--log-level",
                &self.options.log_level,
                "agent",
            ])
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            .args(["--instance", &self.instance, "--bpffs", BPFFS])
            .arg("--host-netns")
            .arg(&self.host_netns)
            .args(["--stats-interval", &self.options.stats_interval])
            .args(["--metrics-addr", &self.options.metrics_addr])
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(&self.options.extra_args);
        if let Some(dir) = &self.source {
            command.arg(format!("--source=dir:{}", dir.display()));
        }
        let process = Process::spawn(&format!("weft agent {}", self.instance), command);
        process.stdout().wait_for(
            "the agent to report `datapath ready`",
            Duration::from_secs(20),
            |lines| {
                if let Some(err) = lines.iter().find(|l| l.contains("\"level\":\"ERROR\"")) {
                    panic!("the agent failed to start: {err}");
                }
                lines
                    .iter()
                    .any(|l| l.contains("datapath ready"))
                    .then_some(())
            },
        );
        self.process = Some(process);
    }

    /// The command that starts the agent (the binary, or a shell putting it in a cgroup
    /// namespace first), and the cgroup root as the agent will see it.
    fn command(&self) -> (Command, PathBuf) {
        if let (false, Some(dir)) = (self.options.cgroup_namespace, &self.options.cgroup) {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(dir)
                .arg(&self.binary);
            return (command, self.cgroup.clone());
        }
        if !self.options.cgroup_namespace {
            return (Command::new(&self.binary), self.cgroup.clone());
        }
        // Into the node's cgroup, then a cgroup namespace rooted there with its own cgroup2
        // mount (in a private mount namespace; the kernel refuses a second mount of cgroup2
        // where the host's is).
        let mount = self.workdir.join("cgroup2");
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("{}: {e}", mount.display()));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(
                r#"echo $$ > "$0/cgroup.procs" && exec unshare --cgroup --mount --propagation private -- sh -c 'mount -t cgroup2 cgroup2 "$0" && exec "$@"' "$@""#,
            )
            .arg(&self.cgroup)
            .arg(&mount)
            .arg(&self.binary);
        (command, mount)
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `weft flows ARGS -o json` against this agent: the records printed (JSON lines).
    pub fn flows(&self, args: &[&str]) -> Vec<Value> {
        let out = Command::new(&self.binary)
            .arg("flows")
            .args(args)
            .args(["-o", "json", "--admin-socket"])
            .arg(&self.admin_socket)
            .output()
            .unwrap_or_else(|e| panic!("weft flows {args:?}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "weft flows {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Where the agent serves `/metrics` (from its `datapath ready` record).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let url = self
            .records()
            .into_iter()
            .find(|r| r["fields"]["message"] == "datapath ready")
            .and_then(|r| r["fields"]["metrics"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("the agent reported no metrics address"));
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .parse()
            .unwrap_or_else(|e| panic!("metrics address {url}: {e}"))
    }

    /// The agent's metrics in the Prometheus text format, parsed.
    pub fn metrics(&self) -> Vec<crate::prom::Sample> {
        crate::prom::samples(&crate::prom::scrape(self.metrics_addr(), None).1)
    }

    /// Polls the metrics until `pred` holds; returns them.
    pub fn wait_metrics(
        &self,
        what: &str,
        pred: impl Fn(&[crate::prom::Sample]) -> bool,
    ) -> Vec<crate::prom::Sample> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.metrics();
            if pred(&m) {
                return m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{}",
                crate::prom::scrape(self.metrics_addr(), None).1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The current process's log lines.
    pub fn logs(&self) -> &Lines {
        self.process().stdout()
    }

    fn process(&self) -> &Process {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("agent {} is not running", self.instance))
    }

    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// Every log record of the current process, parsed.
    pub fn records(&self) -> Vec<Value> {
        parse(&self.logs().snapshot())
    }

    /// Waits for a connection record (target `weft::conn`) whose fields satisfy `pred`.
    pub fn wait_conn(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.logs()
            .wait_for(what, Duration::from_secs(10), |lines| {
                parse(lines)
                    .into_iter()
                    .filter(|r| r["target"] == "weft::conn")
                    .map(|r| r["fields"].clone())
                    .find(|f| pred(f))
            })
    }

    /// Connection records (their fields) of the current process so far.
    pub fn conns(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["target"] == "weft::conn")
            .map(|r| r["fields"].clone())
            .collect()
    }

    /// SIGKILL: the agent gets no chance to clean anything.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGKILL);
            p.wait(Duration::from_secs(5));
            self.previous.extend(p.stdout().snapshot());
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(libc::SIGTERM);
            p.wait_success(Duration::from_secs(10));
            self.previous.extend(p.stdout().snapshot());
        }
    }

    /// Sends `signal` to the running agent (it keeps running as far as this knows: see
    /// [`Agent::wait_exit`]).
    pub fn signal(&self, signal: i32) {
        self.process().signal(signal);
    }

    /// Waits for the agent to exit by itself: its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut p = self
            .process
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", self.instance));
        let status = p.wait(timeout);
        self.previous.extend(p.stdout().snapshot());
        status
    }

    /// Starts a successor (`--take-over`) while the agent runs; returns the old process,
    /// still running (it hands over at once and drains; SIGTERM ends it). This agent is the
    /// successor from then on.
    pub fn start_successor(&mut self) -> Process {
        let cgroup = self.options.cgroup.clone();
        self.start_successor_in(cgroup)
    }

    /// [`Agent::start_successor`], the successor in `cgroup` (see [`AgentOptions::cgroup`]).
    pub fn start_successor_in(&mut self, cgroup: Option<PathBuf>) -> Process {
        self.options.cgroup = cgroup;
        let old = self
            .process
            .take()
            .unwrap_or_else(|| panic!("agent {} is not running", self.instance));
        if !self.options.extra_args.iter().any(|a| a == "--take-over") {
            self.options.extra_args.push("--take-over".to_owned());
        }
        self.spawn();
        old
    }

    /// Starts a new agent process for the same instance with other `weft agent` arguments
    /// (those the agent was started with are replaced).
    pub fn restart_with(&mut self, extra_args: &[&str]) {
        self.options.extra_args = extra_args.iter().map(|s| (*s).to_owned()).collect();
        self.restart();
    }

    /// Starts a new agent process for the same instance.
    pub fn restart(&mut self) {
        assert!(
            self.process.is_none(),
            "stop or kill the agent before restarting it"
        );
        self.spawn();
    }

    /// Runs `weft cleanup` for the instance and returns its log records.
    pub fn cleanup(&self) -> Vec<Value> {
        let (ok, text) = self.try_cleanup();
        assert!(ok, "weft cleanup failed: {text}");
        parse(&text.lines().map(str::to_owned).collect::<Vec<_>>())
    }

    /// Runs `weft cleanup` for the instance: (success, output).
    pub fn try_cleanup(&self) -> (bool, String) {
        run_cleanup(&self.binary, &self.instance)
    }

    /// Runs a client command (`status`, `services`) with `-o json` against this agent; returns
    /// (exit success, parsed output).
    pub fn client(&self, command: &str) -> (bool, Value) {
        self.client_args(&[command])
    }

    /// Runs `weft ARGS... -o json` against this agent: (exit success, parsed output).
    pub fn client_args(&self, args: &[&str]) -> (bool, Value) {
        let out = Command::new(&self.binary)
            .args(args)
            .args(["-o", "json", "--admin-socket"])
            .arg(&self.admin_socket)
            .output()
            .unwrap_or_else(|e| panic!("weft {args:?}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "weft {args:?}: {e}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), value)
    }

    /// Polls `weft policies -o json` until `pred` holds.
    pub fn wait_policies(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_output("policies", what, Duration::from_secs(10), pred)
    }

    /// Polls `weft policies -o json` until exactly the policies `want` (`namespace/name`) are
    /// in force and every local pod's set is in the kernel.
    pub fn wait_policies_in_force<S: AsRef<str>>(&self, want: &[S], timeout: Duration) -> Value {
        self.wait_policies_matching(want, timeout, |e| e["in_kernel"] == true)
    }

    /// Polls `weft policies -o json` until exactly the policies `want` are in force and every
    /// local pod's row (`endpoints[]`) satisfies `endpoint`.
    pub fn wait_policies_matching<S: AsRef<str>>(
        &self,
        want: &[S],
        timeout: Duration,
        endpoint: impl Fn(&Value) -> bool,
    ) -> Value {
        let want: std::collections::BTreeSet<&str> = want.iter().map(AsRef::as_ref).collect();
        self.wait_output(
            "policies",
            &format!("policies {want:?} in force"),
            timeout,
            |v| {
                let have: std::collections::BTreeSet<&str> = v["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["policy"].as_str())
                    .collect();
                have == want
                    && v["endpoints"]
                        .as_array()
                        .is_some_and(|e| e.iter().all(&endpoint))
            },
        )
    }

    /// Polls `weft services -o json` until `pred` holds.
    pub fn wait_services(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let v = self.wait_output("services", what, Duration::from_secs(10), |v| {
            pred(v.as_array().map_or(&[][..], Vec::as_slice))
        });
        v.as_array().cloned().unwrap_or_default()
    }

    /// Polls `weft status -o json` until `pred` holds.
    pub fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_output("status", what, Duration::from_secs(10), pred)
    }

    /// Polls `weft services -o json` until frontend `fe` (`10.96.0.10:80/TCP`) has `n`
    /// backends, for up to `timeout`.
    pub fn wait_backends(&self, fe: &str, n: usize, timeout: Duration) {
        self.wait_output(
            "services",
            &format!("{fe} with {n} backends"),
            timeout,
            |v| {
                v.as_array().is_some_and(|list| {
                    list.iter().any(|s| {
                        s["frontend"] == fe
                            && s["backends"].as_array().is_some_and(|b| b.len() == n)
                    })
                })
            },
        );
    }

    /// Polls `weft COMMAND -o json` until `pred` holds on its output, for up to `timeout`.
    pub fn wait_output(
        &self,
        command: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (_, v) = self.client(command);
            if pred(&v) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; {command}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The instance's pin directory.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("weft").join(&self.instance)
    }

    /// The directories of pinned maps (`maps-v<ABI>-<shape>`, or `maps` of agents before
    /// versions), sorted: one, except while an agent moves to maps of another version.
    pub fn maps_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.pin_dir())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("maps"))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// The directory of the agent's pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        let dirs = self.maps_dirs();
        assert_eq!(dirs.len(), 1, "one maps directory expected: {dirs:?}");
        dirs[0].clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // No assertion here: a panic while unwinding would abort and skip every other guard.
        // Dropping the process kills (SIGKILL) and reaps it.
        drop(self.process.take());
        let (ok, text) = run_cleanup(&self.binary, &self.instance);
        if !ok {
            eprintln!("warning: cleanup of instance {}: {text}", self.instance);
        }
    }
}

/// `weft cleanup --instance`: (success, output).
fn run_cleanup(binary: &Path, instance: &str) -> (bool, String) {
    match Command::new(binary)
        .args([
            "--log-format",
            "json",
            "cleanup",
            "--instance",
            instance,
            "--bpffs",
            BPFFS,
        ])
        .output()
    {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run weft cleanup: {e}")),
    }
}

/// Runs `weft agent` for `instance` on `cgroup` when it is expected to refuse to start; returns
/// its output. Panics if it is still running after 20 s or exits successfully.
pub fn run_refused(instance: &str, cgroup: &Path, extra: &[&str]) -> String {
    let mut command = Command::new(weft_binary());
    command
        .args([
            "--log-format",
            "json",
            "agent",
            "--instance",
            instance,
            "--bpffs",
            BPFFS,
        ])
        .arg("--cgroup-root")
        .arg(cgroup)
        .args(extra);
    let mut p = Process::spawn(
        &format!("weft agent {instance} (expected to refuse)"),
        command,
    );
    let status = p.wait(Duration::from_secs(20));
    let text = p.stdout().snapshot().join("\n");
    assert!(
        !status.success(),
        "the agent was expected to refuse to start: {text}"
    );
    text
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A mesh CA made by `weft ca init` in a directory of its own, removed on drop.
#[derive(Debug)]
pub struct MeshCa {
    dir: PathBuf,
}

impl MeshCa {
    /// The directory for `--mesh-ca`.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MeshCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `weft ca init` into `dir` (made afresh).
pub fn init_mesh_ca(dir: &Path) -> MeshCa {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let ca = MeshCa {
        dir: dir.to_owned(),
    };
    crate::proc::run(
        weft_binary().to_str().expect("a UTF-8 path"),
        ["ca", "init", dir.to_str().expect("a UTF-8 path")],
    );
    ca
}
