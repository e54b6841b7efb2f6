//! A simulated node: a network namespace with a bridge, and pods as namespaces with their
//! own cgroups.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    names,
    proc::{self, Process},
};

/// The service range pods cannot reach unless weft translates it (unreachable on the node).
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/12";
/// The IPv6 service range (unreachable on the node).
pub const SERVICE_CIDR_V6: &str = "fd00:96::/108";

/// The node's bridge addresses (its pods' gateway) in pod subnet `subnet`: 10.0.<subnet>.1
/// and fd00:0:0:<subnet>::1.
fn bridge(subnet: u8) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(10, 0, subnet, 1),
        Ipv6Addr::new(0xfd00, 0, 0, u16::from(subnet), 0, 0, 0, 1),
    )
}

/// A node's pod prefixes: (10.0.<subnet>.0/24, fd00:0:0:<subnet>::/64).
pub fn pod_prefixes(subnet: u8) -> (String, String) {
    (
        format!("10.0.{subnet}.0/24"),
        format!("fd00:0:0:{subnet}::/64"),
    )
}

/// Builds a [`Node`].
#[derive(Debug)]
pub struct NodeBuilder {
    test: String,
    pods: Vec<String>,
    pod_tool: Option<PathBuf>,
    kubelet_cgroups: bool,
    nesting: usize,
    subnet: u8,
    /// The node's name in the cluster (pods' `spec.nodeName`), for a [`crate::Cluster`].
    name: Option<String>,
}

impl NodeBuilder {
    /// Names the node (its pods' `spec.nodeName`; the agent's `--node-name`).
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Gives the node pod subnet `subnet` (default 0: 10.0.0.0/24 and fd00::/64), so that the
    /// nodes of a [`crate::cluster::Cluster`] do not share addresses.
    #[must_use]
    pub fn subnet(mut self, subnet: u8) -> Self {
        self.subnet = subnet;
        self
    }

    /// Adds a pod (names: 1 to 10 characters of [a-z0-9-]).
    #[must_use]
    pub fn pod(mut self, name: &str) -> Self {
        assert!(
            !name.is_empty()
                && name.len() <= 10
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "pod name {name:?}: use 1 to 10 characters of [a-z0-9-]"
        );
        assert!(
            !self.pods.iter().any(|p| p == name),
            "pod {name} added twice"
        );
        self.pods.push(name.to_owned());
        self
    }

    /// Puts pods' cgroups `levels` directories below the node's cgroup (`n1/n2/.../<pod>`), as
    /// nested or rootless nodes do.
    #[must_use]
    pub fn nested(mut self, levels: usize) -> Self {
        self.nesting = levels;
        self
    }

    /// Puts pods' cgroups where the kubelet (systemd driver) does, from their UID:
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice` below the
    /// node's cgroup, for `--source kubernetes`.
    #[must_use]
    pub fn kubelet_cgroups(mut self) -> Self {
        self.kubelet_cgroups = true;
        self
    }

    /// Runs this `weft-pod` binary in pods instead of the one found near the executable.
    #[must_use]
    pub fn pod_tool(mut self, path: &Path) -> Self {
        self.pod_tool = Some(path.to_owned());
        self
    }

    /// Creates the namespaces, links, addresses, routes and cgroups.
    pub fn build(self) -> Node {
        let tag = names::tag(&self.test);
        let cgroup_root = cgroup2_root();
        let workdir = std::env::temp_dir().join(format!("weft-test-{tag}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(workdir.join("source"))
            .unwrap_or_else(|e| panic!("create {}: {e}", workdir.display()));
        let cgroup = Cgroup::create(&cgroup_root.join(format!("weft-test-{tag}")));
        let mut node = Node {
            host_cgroup: cgroup.child("_host"),
            workdir,
            pod_tool: self.pod_tool.unwrap_or_else(pod_tool),
            tag: tag.clone(),
            netns: Netns::create(&format!("weft-{tag}")),
            kubelet: Vec::new(),
            cgroup,
            pods: Vec::new(),
            subnet: self.subnet,
            name: self.name.clone(),
            nest: String::new(),
            kubelet_cgroups: false,
            created: 0,
        };
        const KUBEPODS: &str = "kubepods.slice/kubepods-besteffort.slice";
        if self.kubelet_cgroups {
            let top = node.cgroup.child("kubepods.slice");
            let besteffort = node.cgroup.child(KUBEPODS);
            // Removed deepest first.
            node.kubelet = vec![besteffort, top];
        }
        let mut nest = String::new();
        for level in 1..=self.nesting {
            nest = format!("{nest}n{level}/");
            let dir = node.cgroup.child(nest.trim_end_matches('/'));
            node.kubelet.insert(0, dir);
        }
        let n = node.netns.name.clone();
        let ip_n = |args: &[&str]| proc::run("ip", [&["-n", n.as_str()], args].concat());
        let (bridge_v4, bridge_v6) = bridge(self.subnet);
        ip_n(&["link", "set", "lo", "up"]);
        ip_n(&["link", "add", "br0", "type", "bridge"]);
        ip_n(&["addr", "add", &format!("{bridge_v4}/24"), "dev", "br0"]);
        ip_n(&[
            "-6",
            "addr",
            "add",
            &format!("{bridge_v6}/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        ip_n(&["link", "set", "br0", "up"]);
        // Nothing leaves the node: service ranges are unreachable unless weft translates them.
        ip_n(&["route", "add", "unreachable", SERVICE_CIDR_V4]);
        ip_n(&["-6", "route", "add", "unreachable", SERVICE_CIDR_V6]);
        node.nest = nest;
        node.kubelet_cgroups = self.kubelet_cgroups;
        for name in &self.pods {
            let host = u8::try_from(10 + node.created).unwrap_or_else(|_| panic!("too many pods"));
            let (v4, v6) = bridge(self.subnet);
            let ipv4 = Ipv4Addr::from(u32::from(v4) - 1 + u32::from(host));
            let ipv6 = Ipv6Addr::from(u128::from(v6) - 1 + u128::from(host));
            node.create_pod(name, ipv4, ipv6);
        }
        node
    }
}

/// A simulated node. Dropping it kills every process in its cgroup and removes its
/// namespaces and cgroups.
#[derive(Debug)]
pub struct Node {
    pod_tool: PathBuf,
    /// Files of the test (the agent's source directory, its admin socket), removed on drop.
    workdir: PathBuf,
    /// `_host` below the node's cgroup, for host-network workloads weft observes.
    host_cgroup: Cgroup,
    /// The kubelet's QoS cgroups of [`NodeBuilder::kubelet_cgroups`], deepest first: removed
    /// after the pods' and before the node's.
    kubelet: Vec<Cgroup>,
    tag: String,
    netns: Netns,
    cgroup: Cgroup,
    pods: Vec<Pod>,
    /// Its pod subnet (see [`NodeBuilder::subnet`]).
    subnet: u8,
    /// Its name (see [`NodeBuilder::named`]).
    name: Option<String>,
    /// The pods' cgroup directories below the node's ([`NodeBuilder::nested`]).
    nest: String,
    kubelet_cgroups: bool,
    /// Pods created so far (numbers their UIDs).
    created: usize,
}

/// A pod on a [`Node`].
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    /// The pod's cgroup below the node's (the `weft.io/cgroup` annotation).
    pub relative_cgroup: String,
    /// metadata.uid for the fake API server (it names the pod's cgroup with
    /// [`NodeBuilder::kubelet_cgroups`]).
    pub uid: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The name of the node it runs on, when its node has one ([`NodeBuilder::named`]).
    pub node: Option<String>,
    netns: Netns,
    cgroup: Cgroup,
}

impl Pod {
    /// The pod namespace's name (for `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.netns.name
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The pod's cgroup v2 directory.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup.path
    }
}

impl Node {
    /// Starts building a node for the test named `test` (use the test function's path).
    pub fn builder(test: &str) -> NodeBuilder {
        NodeBuilder {
            test: test.to_owned(),
            pods: Vec::new(),
            pod_tool: None,
            kubelet_cgroups: false,
            nesting: 0,
            subnet: 0,
            name: None,
        }
    }

    /// Its pod subnet (see [`NodeBuilder::subnet`]).
    pub fn subnet(&self) -> u8 {
        self.subnet
    }

    /// Its name in a cluster (see [`NodeBuilder::named`]).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Short unique tag derived from the test's name.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The node's cgroup: the parent of every pod's cgroup (what the agent attaches to).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup.path
    }

    /// The test's own directory (removed with the node).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The directory the agent reads with `--source dir:` (see [`crate::AgentOptions`]).
    pub fn source_dir(&self) -> PathBuf {
        self.workdir.join("source")
    }

    /// Writes a file of the source directory atomically (a temporary file renamed into place),
    /// as configuration management tools do.
    pub fn write_source(&self, file: &str, text: &str) {
        let tmp = self.workdir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        let path = self.source_dir().join(file);
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
    }

    /// Removes a file of the source directory.
    pub fn remove_source(&self, file: &str) {
        let path = self.source_dir().join(file);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    /// The node namespace's name (for `ip -n`).
    pub fn netns_name(&self) -> &str {
        &self.netns.name
    }

    /// `/run/netns/<name>` of the node namespace.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {}", self.tag))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Creates a pod with these addresses: its namespace, its veth on the bridge, its cgroup.
    /// Addresses outside the node's subnet (a pod that took over another node's pod's
    /// address) are host routes on both sides of the veth.
    pub(crate) fn create_pod(&mut self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) {
        const KUBEPODS: &str = "kubepods.slice/kubepods-besteffort.slice";
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            tag_number(&self.tag),
            self.created
        );
        self.created += 1;
        let cgroup = if self.kubelet_cgroups {
            let slice = format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"));
            self.cgroup.child(&format!("{KUBEPODS}/{slice}"))
        } else {
            self.cgroup.child(&format!("{}{name}", self.nest))
        };
        let pod = Pod {
            relative_cgroup: format!("{}{name}", self.nest),
            name: name.to_owned(),
            ipv4,
            ipv6,
            uid,
            node: self.name.clone(),
            netns: Netns::create(&format!("weft-{}-{name}", self.tag)),
            cgroup,
        };
        let (n, p) = (self.netns.name.as_str(), pod.netns.name.as_str());
        let ip_n = |args: &[&str]| proc::run("ip", [&["-n", n], args].concat());
        let ip_p = |args: &[&str]| proc::run("ip", [&["-n", p], args].concat());
        let veth = format!("v-{name}");
        ip_n(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", p,
        ]);
        ip_n(&["link", "set", &veth, "master", "br0", "up"]);
        ip_p(&["link", "set", "lo", "up"]);
        let (gw4, gw6) = bridge(self.subnet);
        let home = ipv4.octets()[..3] == gw4.octets()[..3];
        let (len4, len6) = if home { (24, 64) } else { (32, 128) };
        ip_p(&["addr", "add", &format!("{ipv4}/{len4}"), "dev", "eth0"]);
        let v6 = format!("{ipv6}/{len6}");
        ip_p(&["-6", "addr", "add", &v6, "dev", "eth0", "nodad"]);
        ip_p(&["link", "set", "eth0", "up"]);
        if !home {
            ip_p(&["route", "add", &gw4.to_string(), "dev", "eth0"]);
            ip_p(&["-6", "route", "add", &gw6.to_string(), "dev", "eth0"]);
            ip_n(&["route", "add", &format!("{ipv4}/32"), "dev", "br0"]);
            ip_n(&["-6", "route", "add", &format!("{ipv6}/128"), "dev", "br0"]);
        }
        ip_p(&["route", "add", "default", "via", &gw4.to_string()]);
        ip_p(&["-6", "route", "add", "default", "via", &gw6.to_string()]);
        self.pods.push(pod);
    }

    /// Deletes a pod: its processes, namespace (and veth) and cgroup. Returns its addresses.
    pub(crate) fn delete_pod(&mut self, name: &str) -> (Ipv4Addr, Ipv6Addr) {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} on node {}", self.tag));
        let pod = self.pods.remove(i);
        let addresses = (pod.ipv4, pod.ipv6);
        // Processes first: they hold the namespace (and the veth) alive.
        pod.cgroup.kill_all();
        drop(pod);
        addresses
    }

    /// Runs the pod tool (see `weft-pod --help`) inside a pod: its namespace and its cgroup.
    pub fn spawn(&self, pod: &str, args: &[&str]) -> Process {
        let (name, command) = self.pod_command(pod, true, args);
        Process::spawn(&name, command)
    }

    /// Runs the pod tool in a pod's network namespace but outside every cgroup weft attaches
    /// to (in the test process's own cgroup): the pod's network path with no weft program on
    /// the process's sockets (a benchmark's baseline).
    pub fn spawn_unobserved(&self, pod: &str, args: &[&str]) -> Process {
        let (name, command) = self.pod_command(pod, false, args);
        Process::spawn(&name, command)
    }

    /// The pod tool's command in a pod's namespace, in its cgroup if `observed` (as
    /// [`Node::spawn`]) or outside weft's cgroups (as [`Node::spawn_unobserved`]), and a name
    /// for it: for callers that start it themselves, e.g. with
    /// [`Process::spawn_interactive`].
    pub fn pod_command(&self, pod: &str, observed: bool, args: &[&str]) -> (String, Command) {
        let pod = self.pod(pod);
        let cgroup = observed.then(|| pod.cgroup());
        let mut command = proc::command_in(&pod.netns_path(), cgroup, &self.pod_tool);
        command.args(args);
        let place = if observed { "" } else { "(unobserved)" };
        (
            format!("{}/{}{place}:{}", self.tag, pod.name, args.join(" ")),
            command,
        )
    }

    /// Runs the pod tool in the node's namespace and in the node-level cgroup `_host` (below
    /// the node's cgroup): a host-network workload that weft observes.
    pub fn spawn_host(&self, args: &[&str]) -> Process {
        let mut command = proc::command_in(
            &self.netns_path(),
            Some(&self.host_cgroup.path),
            &self.pod_tool,
        );
        command.args(args);
        Process::spawn(&format!("{}/host:{}", self.tag, args.join(" ")), command)
    }

    /// Runs the pod tool in the node's namespace but outside every pod's cgroup (in the test
    /// process's own cgroup), like a host process that weft must not observe.
    pub fn spawn_outside(&self, args: &[&str]) -> Process {
        let (name, command) = self.outside_command(args);
        Process::spawn(&name, command)
    }

    /// The command [`Node::spawn_outside`] runs, and a name for it: for callers that start
    /// it themselves.
    pub fn outside_command(&self, args: &[&str]) -> (String, Command) {
        let mut command = proc::command_in(&self.netns_path(), None, &self.pod_tool);
        command.args(args);
        (format!("{}/outside:{}", self.tag, args.join(" ")), command)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first (their veths go with them), then the node; the cgroups once empty.
        self.cgroup.kill_all();
        for pod in self.pods.drain(..) {
            drop(pod);
        }
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn create(name: &str) -> Self {
        proc::run("ip", ["netns", "add", name]);
        Self {
            name: name.to_owned(),
        }
    }

    pub(crate) fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("warning: cannot delete netns {}: {out:?}", self.name);
        }
    }
}

/// A cgroup v2 directory we created, removed on drop after its processes are killed.
#[derive(Debug)]
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create(path: &Path) -> Self {
        fs::create_dir(path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self {
            path: path.to_owned(),
        }
    }

    fn child(&self, name: &str) -> Self {
        Self::create(&self.path.join(name))
    }

    /// Kills every process in this cgroup and its descendants and waits until the cgroup is
    /// unpopulated. Only our own test processes can be in it. `cgroup.kill` (Linux 5.14) does
    /// it at once; without it, the pids listed in `cgroup.procs` are killed one by one.
    fn kill_all(&self) {
        if !self.path.exists() {
            return;
        }
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            self.kill_listed();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let events = fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l == "populated 0") {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "warning: processes of {} did not exit within 5 s",
            self.path.display()
        );
    }

    fn kill_listed(&self) {
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs
                .lines()
                .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill(2) on a pid listed in our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path()),
                );
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        // rmdir fails while a dying process still counts; retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("warning: cannot remove cgroup {}: {e}", self.path.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// A number from a test's tag, for pod UIDs that differ between tests.
fn tag_number(tag: &str) -> u32 {
    tag.bytes().fold(2_166_136_261_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

/// The cgroup v2 mount (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> PathBuf {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    for candidate in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if fs_magic(Path::new(candidate)) == Some(CGROUP2_SUPER_MAGIC) {
            return PathBuf::from(candidate);
        }
    }
    panic!("the harness needs cgroup v2 at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// The filesystem type (statfs f_type) of `path`.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into a zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type)
    }
}

/// Finds a binary of this workspace next to the running executable (target/<profile>/ or
/// target/<profile>/deps/), unless `env` names it.
pub fn workspace_binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return candidate;
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    panic!(
        "cannot find the {name} binary near {}; build it with `cargo xtask build` or set {env}",
        exe.display()
    )
}

/// The `weft-pod` tool that tests run inside pods.
pub fn pod_tool() -> PathBuf {
    workspace_binary("WEFT_POD_TOOL", "weft-pod")
}
