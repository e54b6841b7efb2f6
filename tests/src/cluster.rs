//! Several simulated nodes joined into one cluster network.
//!
//! Each node is a [`Node`] with its own pod subnet (node `i`, from 1: 10.0.i.0/24 and
//! fd00:0:0:i::/64), bridge, cgroup subtree and agent. An underlay namespace holds a bridge
//! that every node joins with a veth (`ul` in the node, 192.168.200.i/24 and fd01::i/64);
//! each node forwards, and routes every other node's pod subnet through that node's underlay
//! address. Nothing leaves the cluster: service ranges stay unreachable on every node, and
//! no route leads anywhere but the nodes' own subnets.
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{
    names,
    node::{Netns, Node, pod_prefixes},
    proc,
};

/// Builds a [`Cluster`]. Each node is named (its pods' `spec.nodeName`): give its agent
/// `--node-name` with that name.
#[derive(Debug)]
pub struct ClusterBuilder {
    test: String,
    nodes: Vec<(String, Vec<String>)>,
    pod_tool: Option<PathBuf>,
    kubelet_cgroups: bool,
}

impl ClusterBuilder {
    /// Puts every node's pod cgroups where the kubelet does (for `--source kubernetes`; see
    /// [`crate::NodeBuilder::kubelet_cgroups`]).
    #[must_use]
    pub fn kubelet_cgroups(mut self) -> Self {
        self.kubelet_cgroups = true;
        self
    }

    /// Adds a node named `name` (one letter or a short word) with these pods. Pod names are
    /// unique across the cluster (a standalone source names a pod's cgroup by it).
    #[must_use]
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        for p in pods {
            assert!(
                !self.nodes.iter().any(|(_, ps)| ps.iter().any(|q| q == p)),
                "pod {p} on two nodes"
            );
        }
        self.nodes.push((
            name.to_owned(),
            pods.iter().map(|p| (*p).to_owned()).collect(),
        ));
        self
    }

    /// Runs this `weft-pod` binary in pods instead of the one found near the executable.
    #[must_use]
    pub fn pod_tool(mut self, path: &Path) -> Self {
        self.pod_tool = Some(path.to_owned());
        self
    }

    /// Creates the nodes, the underlay and the routes between the nodes' pod subnets.
    pub fn build(self) -> Cluster {
        let tag = names::tag(&self.test);
        let workdir = std::env::temp_dir().join(format!("weft-cluster-{tag}"));
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(workdir.join("source"))
            .unwrap_or_else(|e| panic!("create {}: {e}", workdir.display()));
        let underlay = Netns::create(&format!("weft-{tag}-ul"));
        let ul = underlay.name.clone();
        proc::run("ip", ["-n", &ul, "link", "add", "ul0", "type", "bridge"]);
        proc::run("ip", ["-n", &ul, "link", "set", "ul0", "up"]);
        let mut nodes = Vec::new();
        for (i, (name, pods)) in self.nodes.iter().enumerate() {
            let subnet = u8::try_from(i + 1).expect("at most 254 nodes");
            let mut b = Node::builder(&format!("{}{name}", self.test))
                .subnet(subnet)
                .named(name);
            if let Some(tool) = &self.pod_tool {
                b = b.pod_tool(tool);
            }
            if self.kubelet_cgroups {
                b = b.kubelet_cgroups();
            }
            for p in pods {
                b = b.pod(p);
            }
            let node = b.build();
            join(&node, &ul, subnet);
            nodes.push((name.clone(), node));
        }
        for (_, node) in &nodes {
            for (_, other) in nodes.iter().filter(|(_, o)| o.subnet() != node.subnet()) {
                route(node, other.subnet());
            }
        }
        Cluster {
            nodes,
            workdir,
            _underlay: underlay,
        }
    }
}

/// The node's end of the underlay: `ul`, its addresses, forwarding on.
fn join(node: &Node, underlay: &str, subnet: u8) {
    let n = node.netns_name();
    let peer = format!("n{subnet}");
    proc::run(
        "ip",
        [
            "-n", underlay, "link", "add", &peer, "type", "veth", "peer", "name", "ul", "netns", n,
        ],
    );
    proc::run(
        "ip",
        ["-n", underlay, "link", "set", &peer, "master", "ul0", "up"],
    );
    let (v4, v6) = underlay_addrs(subnet);
    proc::run(
        "ip",
        ["-n", n, "addr", "add", &format!("{v4}/24"), "dev", "ul"],
    );
    proc::run(
        "ip",
        [
            "-n",
            n,
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "ul",
            "nodad",
        ],
    );
    proc::run("ip", ["-n", n, "link", "set", "ul", "up"]);
    // New namespaces start with forwarding off.
    sysctl(
        node,
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    );
}

/// Sets sysctls in a node's namespace (`nsenter`, not `ip netns exec`: the latter remounts
/// /sys).
fn sysctl(node: &Node, settings: &[&str]) {
    let netns = format!("--net={}", node.netns_path().display());
    proc::run(
        "nsenter",
        [&[netns.as_str(), "sysctl", "-q", "-w"], settings].concat(),
    );
}

/// Routes `node`'s traffic for pod subnet `to` through that node's underlay address.
fn route(node: &Node, to: u8) {
    let n = node.netns_name();
    let (v4, v6) = pod_prefixes(to);
    let (via4, via6) = underlay_addrs(to);
    proc::run("ip", ["-n", n, "route", "add", &v4, "via", &via4]);
    proc::run("ip", ["-n", n, "-6", "route", "add", &v6, "via", &via6]);
}

/// Node `subnet`'s underlay addresses.
fn underlay_addrs(subnet: u8) -> (String, String) {
    (format!("192.168.200.{subnet}"), format!("fd01::{subnet}"))
}

/// Simulated nodes on one underlay. Dropping it drops every node (processes, namespaces,
/// cgroups), then the underlay and the shared directory.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<(String, Node)>,
    workdir: PathBuf,
    _underlay: Netns,
}

impl Cluster {
    /// Starts building a cluster for the test named `test` (keep it short and distinct: each
    /// node's tag derives from it and the node's name).
    pub fn builder(test: &str) -> ClusterBuilder {
        ClusterBuilder {
            test: test.to_owned(),
            nodes: Vec::new(),
            pod_tool: None,
            kubelet_cgroups: false,
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, node)| node)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The node a pod runs on, and the pod.
    pub fn pod(&self, pod: &str) -> (&Node, &crate::Pod) {
        self.nodes
            .iter()
            .find_map(|(_, node)| {
                node.pods()
                    .iter()
                    .find(|p| p.name == pod)
                    .map(|p| (node, p))
            })
            .unwrap_or_else(|| panic!("no pod {pod} in the cluster"))
    }

    /// Deletes pod `pod` and creates pod `new` on node `to` with the old pod's addresses, as
    /// a network plugin that hands a freed address to a pod on another node does. Every other
    /// node routes the addresses to `to`; the old node answers ARP and neighbour discovery
    /// for them on its bridge, since its pods take them for neighbours.
    pub fn move_pod(&mut self, pod: &str, to: &str, new: &str) {
        let from = self.pod(pod).0.name().unwrap_or_default().to_owned();
        assert_ne!(from, to, "{pod} already runs on {to}");
        let (v4, v6) = self.node_mut(&from).delete_pod(pod);
        let to_node = self.node(to);
        assert!(
            to_node.pods().iter().all(|p| p.ipv4 != v4),
            "{v4} is in use on {to}"
        );
        let (via4, via6) = underlay_addrs(to_node.subnet());
        self.node_mut(to).create_pod(new, v4, v6);
        for (_, node) in self.nodes.iter().filter(|(n, _)| n != to) {
            let n = node.netns_name();
            let (h4, h6) = (format!("{v4}/32"), format!("{v6}/128"));
            proc::run("ip", ["-n", n, "route", "add", &h4, "via", &via4]);
            proc::run("ip", ["-n", n, "-6", "route", "add", &h6, "via", &via6]);
        }
        let old = self.node(&from);
        let n = old.netns_name();
        sysctl(old, &["net.ipv6.conf.br0.proxy_ndp=1"]);
        let (a4, a6) = (v4.to_string(), v6.to_string());
        proc::run("ip", ["-n", n, "neigh", "add", "proxy", &a4, "dev", "br0"]);
        proc::run(
            "ip",
            ["-n", n, "-6", "neigh", "add", "proxy", &a6, "dev", "br0"],
        );
        // The old pod's link-layer address is gone: forget it everywhere on that node.
        let _ = std::process::Command::new("ip")
            .args(["-n", n, "neigh", "flush", "to", &a4])
            .status();
        for p in old.pods() {
            let pn = p.netns_name();
            for a in [&a4, &a6] {
                let _ = std::process::Command::new("ip")
                    .args(["-n", pn, "neigh", "flush", "to", a])
                    .status();
            }
        }
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, node)| node)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The directory every node's agent reads with `--source dir:` (the cluster's desired
    /// state: one standalone source for all nodes, each agent's pods those whose cgroups are
    /// below its root).
    pub fn source_dir(&self) -> PathBuf {
        self.workdir.join("source")
    }

    /// Applies every document of a multi-document text to a fake API server, each Pod on its
    /// own node (see [`crate::k8s::api_object_with`]).
    pub fn apply_to_api(&self, api: &crate::fakeapi::FakeApi, text: &str) {
        for doc in text.split("---\n").filter(|d| !d.trim().is_empty()) {
            api.apply(crate::k8s::api_object_with(|sim| self.pod(sim).1, doc));
        }
    }

    /// Writes a file of the shared source directory atomically.
    pub fn write_source(&self, file: &str, text: &str) {
        let tmp = self.workdir.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        let path = self.source_dir().join(file);
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first: their veths into the underlay go with their namespaces.
        self.nodes.clear();
        let _ = fs::remove_dir_all(&self.workdir);
    }
}
