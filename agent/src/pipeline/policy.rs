//! The NetworkPolicy stage of the pipeline: compile the store for this node's pods, resolve
//! their cgroups, sync the policy maps, and publish what `weft status` / `weft policies` show.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};
use weft_abi::maps;

use super::metrics::{PipelineMetrics, Stage};
use crate::{
    cgroup,
    compile::policy::{self as cp, Ids, PolicySummary, Problem, RuleRef},
    store::Store,
    sync::{
        Error, Failure,
        policy::{PolicyCapacity, PolicyMaps, PolicyReport, PolicySyncer},
    },
};

/// A local pod as `weft policies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub cgroup: String,
    /// None: the cgroup does not exist (yet), so no process can run in it.
    pub cgroup_id: Option<u64>,
    pub endpoint_id: u32,
    pub identity: u32,
    pub policy_set: u32,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// `POLICY` entries its set should have.
    pub entries: usize,
    /// Why it is isolated both ways whatever the policies say, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<cp::Quarantine>,
}

/// A pod (local or not) as `weft policy check` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    pub ips: Vec<IpAddr>,
    /// The cgroup id, for a pod of this node whose cgroup exists.
    pub cgroup_id: Option<u64>,
}

/// What the agent shows about policy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyStatus {
    pub policies: Vec<PolicySummary>,
    pub endpoints: Vec<EndpointStatus>,
    pub problems: Vec<Problem>,
    pub sync_errors: Vec<Failure>,
    /// Policies whose ipBlocks do not fit `IPCACHE` (`--max-ipcache`).
    pub over_capacity: Vec<String>,
    /// Stand-ins of policies weft could not read.
    pub unreadable: Vec<String>,
    /// Addresses several pods claim, one of them a pod of this node (`address (pod, pod)`):
    /// they match no selector.
    pub contested: Vec<String>,
    /// Local pods too deep below the cgroup root for the kernel to find: not enforced.
    pub unreachable: Vec<String>,
    pub identities: usize,
    pub ipcache_entries: usize,
    pub policy_entries: usize,
    #[serde(skip)]
    pub rules: BTreeMap<u32, RuleRef>,
    /// Every pod with an address, by `namespace/name`.
    #[serde(skip)]
    pub pods: BTreeMap<String, PodAddress>,
    /// The node's own addresses (what the kernel exempts as the node's).
    #[serde(skip)]
    pub node_ips: Vec<IpAddr>,
}

/// Where the node's own addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIps {
    /// `--node-ip`, as given.
    Fixed(Vec<IpAddr>),
    /// The interfaces of the node's network namespace (`--host-netns`, else the agent's own:
    /// the node's with hostNetwork), as last read.
    Interfaces {
        netns: Option<PathBuf>,
        addresses: Vec<IpAddr>,
    },
}

impl NodeIps {
    /// The addresses of the interfaces of `netns` (the agent's own when None).
    pub fn interfaces(netns: Option<&Path>) -> Self {
        Self::Interfaces {
            netns: netns.map(Path::to_owned),
            addresses: host_ips(netns),
        }
    }

    pub fn addresses(&self) -> &[IpAddr] {
        match self {
            Self::Fixed(a) | Self::Interfaces { addresses: a, .. } => a,
        }
    }

    /// Reads the interfaces again (fixed addresses stay).
    fn refresh(&mut self) {
        if let Self::Interfaces { netns, addresses } = self {
            *addresses = host_ips(netns.as_deref());
        }
    }
}

/// Owns the policy syncer and the numbering it relies on.
#[derive(Debug)]
pub struct PolicyStage<M> {
    syncer: PolicySyncer<M>,
    ids: Ids,
    seeded: bool,
    cgroup_root: PathBuf,
    node_ips: NodeIps,
    host_ips: Vec<IpAddr>,
    /// `--max-ipcache`: compile keeps the ipBlocks within it.
    ipcache_capacity: u32,
    status: Arc<RwLock<PolicyStatus>>,
    /// Some local pod's cgroup was missing at the last pass.
    missing_cgroups: bool,
    /// The last pass left something out (a map full, a write failed): try again.
    failed: bool,
    /// The id of a cgroup directory; None when it does not exist (yet).
    pub(super) cgroup_id: fn(&Path) -> Option<u64>,
    /// What the last pass compiled (bound again when a cgroup appears).
    last: Option<cp::Policies>,
    /// `--mesh-root-namespace`.
    mesh_root: String,
}

impl<M: PolicyMaps> PolicyStage<M> {
    pub fn new(
        maps: M,
        capacity: PolicyCapacity,
        cgroup_root: &Path,
        node_ips: NodeIps,
        metrics: &PipelineMetrics,
        status: Arc<RwLock<PolicyStatus>>,
    ) -> Result<Self, Error> {
        for (map, cap) in [
            (maps::ENDPOINTS, capacity.endpoints),
            (maps::IPCACHE, capacity.ipcache),
            (maps::POLICY, capacity.entries),
        ] {
            metrics.maps.set_capacity(map, cap);
        }
        Ok(Self {
            syncer: PolicySyncer::new(maps, capacity)?,
            ids: Ids::default(),
            seeded: false,
            cgroup_root: cgroup_root.to_owned(),
            host_ips: node_ips.addresses().to_vec(),
            node_ips,
            ipcache_capacity: capacity.ipcache,
            status,
            missing_cgroups: false,
            failed: false,
            cgroup_id: |path| cgroup::cgroup_id(path).ok(),
            last: None,
            mesh_root: "istio-system".to_owned(),
        })
    }

    /// Istio's root namespace, for the security policies of meshed pods.
    pub fn with_mesh_root(mut self, root: &str) -> Self {
        root.clone_into(&mut self.mesh_root);
        self
    }

    #[cfg(test)]
    pub fn maps(&self) -> &M {
        self.syncer.maps()
    }

    /// Re-reads the node's addresses (unless fixed by --node-ip): whether they changed since
    /// the last pass, which must then run again (a new address is the node's from now on; an
    /// old one may be a pod's or a stranger's).
    pub fn refresh_node_ips(&mut self) -> bool {
        self.node_ips.refresh();
        if self.node_ips.addresses() == self.host_ips.as_slice() {
            return false;
        }
        tracing::info!(target: "weft::sync", from = ?self.host_ips, to = ?self.node_ips.addresses(), "node addresses changed");
        self.host_ips = self.node_ips.addresses().to_vec();
        true
    }

    /// Whether the last pass left something out and should be retried (room may have been
    /// made since, or a transient write error passed).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether a pass is worth running again because a missing cgroup now exists.
    pub fn cgroups_appeared(&self) -> bool {
        self.missing_cgroups
            && self
                .status
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .endpoints
                .iter()
                .any(|e| e.cgroup_id.is_none() && self.cgroup_root.join(&e.cgroup).is_dir())
    }

    /// Where the local pods whose cgroup does not exist yet will have it.
    pub fn missing_cgroups(&self) -> Vec<PathBuf> {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .endpoints
            .iter()
            .filter(|e| e.cgroup_id.is_none())
            .map(|e| self.cgroup_root.join(&e.cgroup))
            .collect()
    }

    fn resolve(&self, policies: &cp::Policies) -> BTreeMap<String, u64> {
        policies
            .endpoints
            .keys()
            .filter_map(|cg| Some((cg.clone(), (self.cgroup_id)(&self.cgroup_root.join(cg))?)))
            .collect()
    }

    /// Compiles and syncs. Returns how many map writes and deletes it made.
    pub fn run(&mut self, store: &Store, metrics: &PipelineMetrics) -> (usize, usize) {
        if !self.seeded {
            // A restarted agent first learns the numbers the kernel holds.
            let first = cp::compile(store, &self.host_ips, &mut self.ids, self.ipcache_capacity);
            let ids = self.resolve(&first);
            self.syncer.seed(&mut self.ids, &first, &ids);
            self.seeded = true;
        }
        let policies = metrics.time(Stage::Policy, || {
            let mut p = cp::compile(store, &self.host_ips, &mut self.ids, self.ipcache_capacity);
            mark_authz(&mut p, store, &self.mesh_root);
            p
        });
        self.sync(store, policies, metrics)
    }

    /// Binds the pods whose cgroup appeared since the last pass, from that pass's compiled
    /// state: nothing else changed, so nothing is compiled (a new pod is isolated as not
    /// bound until this is done). `store` is the last pass's.
    pub fn bind_appeared(&mut self, store: &Store, metrics: &PipelineMetrics) -> (usize, usize) {
        match self.last.take() {
            Some(policies) => self.sync(store, policies, metrics),
            None => self.run(store, metrics),
        }
    }

    /// Writes compiled policies to the maps and publishes the status.
    fn sync(
        &mut self,
        store: &Store,
        policies: cp::Policies,
        metrics: &PipelineMetrics,
    ) -> (usize, usize) {
        let cgroup_ids = self.resolve(&policies);
        let report = self.syncer.apply(&policies, &cgroup_ids);
        self.failed = !report.errors.is_empty();
        let quarantined: Vec<cp::Quarantine> = policies
            .endpoints
            .values()
            .filter_map(|e| e.quarantine)
            .collect();
        let mut over: Vec<(&'static str, u64)> = report
            .errors
            .iter()
            .filter(|e| e.reason == crate::sync::Reason::MapFull)
            .map(|e| (e.map, 1))
            .collect();
        over.push((maps::IPCACHE, policies.over_capacity.len() as u64));
        metrics.policy_state(&quarantined, &over, policies.contested.len());
        let previous = self
            .status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .sync_errors
            .clone();
        for e in &report.errors {
            metrics.sync_error(e.reason);
            // A retry meeting the same problem is counted, not logged again.
            if !previous.contains(e) {
                tracing::error!(target: "weft::sync", error = e.message, "policy change not fully applied");
            }
        }
        let (endpoints, ipcache, entries) = self.syncer.usage();
        for (map, used) in [
            (maps::ENDPOINTS, endpoints),
            (maps::IPCACHE, ipcache),
            (maps::POLICY, entries),
            (maps::AUTHZ, self.syncer.plaintext_usage()),
        ] {
            metrics.maps.set_entries(map, used as u64);
        }
        for p in &policies.problems {
            tracing::debug!(target: "weft::compile", object = p.object, problem = p.message, "policy note");
        }
        let status = self.status_of(store, &policies, &cgroup_ids, &report);
        self.missing_cgroups = status.endpoints.iter().any(|e| e.cgroup_id.is_none());
        let mut published = self.status.write().unwrap_or_else(|e| e.into_inner());
        log_bound(&published.endpoints, &status.endpoints);
        *published = status;
        drop(published);
        self.last = Some(policies);
        (report.written, report.deleted)
    }

    /// What `weft status`, `weft policies` and `weft policy check` show after a pass.
    fn status_of(
        &self,
        store: &Store,
        policies: &cp::Policies,
        cgroup_ids: &BTreeMap<String, u64>,
        report: &PolicyReport,
    ) -> PolicyStatus {
        let mut problems = policies.problems.clone();
        let endpoints: Vec<EndpointStatus> = policies
            .endpoints
            .iter()
            .map(|(cg, e)| {
                let status = endpoint_status(cg, e, cgroup_ids.get(cg).copied(), policies);
                if status.cgroup_id.is_none() {
                    problems.push(Problem {
                        object: e.pod.clone(),
                        message: format!(
                            "cgroup {} does not exist: nothing runs in it yet; enforced once it does",
                            self.cgroup_root.join(cg).display()
                        ),
                    });
                }
                status
            })
            .collect();
        let (_, ipcache, entries) = self.syncer.usage();
        PolicyStatus {
            policies: policies.policies.clone(),
            pods: pod_addresses(store, &endpoints),
            endpoints,
            problems,
            sync_errors: report.errors.clone(),
            over_capacity: policies.over_capacity.clone(),
            unreadable: policies.unreadable.clone(),
            contested: contested_here(policies),
            unreachable: policies.unreachable.clone(),
            identities: policies.identities.len(),
            ipcache_entries: ipcache,
            policy_entries: entries,
            rules: policies.rules.clone(),
            node_ips: self.host_ips.clone(),
        }
    }
}

/// Flags the local meshed pods whose security policy refuses some plaintext caller
/// (`EP_AUTHZ`) and gives them their plaintext tables: the kernel judges plaintext
/// connections to them that the proxy did not deliver. What of the security policies weft
/// cannot do as written joins the problems (`weft status`).
fn mark_authz(policies: &mut cp::Policies, store: &Store, root: &str) {
    let meshed: Vec<crate::store::Key> = policies
        .endpoints
        .values()
        .filter(|e| e.info.flags & weft_abi::policy::EP_MESHED != 0)
        .filter_map(|e| e.pod.split_once('/'))
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .collect();
    let guarded = crate::compile::authz::guarded(store, root, &meshed);
    policies
        .problems
        .extend(guarded.problems.into_iter().map(|p| cp::Problem {
            object: p.object,
            message: p.message,
        }));
    // Same-node meshed callers go through the proxy, which knows who they are, at the
    // addresses the pod holds. One it claims without holding (contested, or another pod's)
    // is nobody's to deliver to: its callers would arrive without an identity, so the pod
    // refuses plaintext altogether (an empty table).
    let owners = crate::compile::addresses::Owners::of(store);
    let mut refusing = guarded.plaintext_refused;
    for key in &guarded.proxied {
        let Some(pod) = store.pods.get(key) else {
            continue;
        };
        let owned: Vec<IpAddr> = owners.owned_by(key, pod).collect();
        if owned.len() != crate::compile::addresses::own_addresses(pod).len() {
            refusing.insert(key.clone(), cp::PlaintextTable::new());
        }
        for ip in owned {
            if let Some(v) = policies.ipcache.get_mut(&ipnet::IpNet::from(ip)) {
                v.flags |= weft_abi::policy::IP_MESHED_LOCAL;
            }
        }
    }
    for e in policies.endpoints.values_mut() {
        let key = e
            .pod
            .split_once('/')
            .map(|(ns, n)| (ns.to_owned(), n.to_owned()));
        if let Some(table) = key.and_then(|k| refusing.get(&k)) {
            e.info.flags |= weft_abi::policy::EP_AUTHZ;
            e.plaintext = table.clone();
        }
    }
}

/// Logs the pods whose cgroup was missing at the last pass and is bound now.
fn log_bound(before: &[EndpointStatus], now: &[EndpointStatus]) {
    let missing: BTreeSet<(&str, &str)> = before
        .iter()
        .filter(|e| e.cgroup_id.is_none())
        .map(|e| (e.pod.as_str(), e.cgroup.as_str()))
        .collect();
    for e in now {
        if let Some(id) = e.cgroup_id
            && missing.contains(&(e.pod.as_str(), e.cgroup.as_str()))
        {
            tracing::info!(target: "weft::sync", pod = e.pod, cgroup = e.cgroup, cgroup_id = id, "pod cgroup bound");
        }
    }
}

fn endpoint_status(
    cgroup: &str,
    e: &cp::LocalEndpoint,
    cgroup_id: Option<u64>,
    policies: &cp::Policies,
) -> EndpointStatus {
    EndpointStatus {
        pod: e.pod.clone(),
        cgroup: cgroup.to_owned(),
        cgroup_id,
        endpoint_id: e.info.endpoint_id,
        identity: e.info.identity,
        policy_set: e.info.policy_set,
        ingress_isolated: e.info.flags & weft_abi::policy::EP_INGRESS_ISOLATED != 0,
        egress_isolated: e.info.flags & weft_abi::policy::EP_EGRESS_ISOLATED != 0,
        ingress_policies: e.ingress_policies.clone(),
        egress_policies: e.egress_policies.clone(),
        ips: e.ips.clone(),
        entries: policies
            .set_sizes
            .get(&e.info.policy_set)
            .copied()
            .unwrap_or(0),
        quarantine: e.quarantine,
    }
}

/// The contested addresses (see `compile::addresses`) one of this node's pods claims, as
/// `address (pod, pod)`: those make this node's own pods lose traffic. The others are
/// counted (`weft_policy_contested_addresses`) and listed as problems only, since every
/// agent of the cluster sees them.
fn contested_here(policies: &cp::Policies) -> Vec<String> {
    let local: std::collections::BTreeSet<&str> = policies
        .endpoints
        .values()
        .map(|e| e.pod.as_str())
        .collect();
    policies
        .contested
        .iter()
        .filter(|(_, pods)| pods.iter().any(|p| local.contains(p.as_str())))
        .map(|(ip, pods)| format!("{ip} ({})", pods.join(", ")))
        .collect()
}

/// Every pod with an address, by `namespace/name`, with the cgroup id of local ones.
fn pod_addresses(store: &Store, endpoints: &[EndpointStatus]) -> BTreeMap<String, PodAddress> {
    let local: BTreeMap<&str, Option<u64>> = endpoints
        .iter()
        .map(|e| (e.pod.as_str(), e.cgroup_id))
        .collect();
    let owners = crate::compile::addresses::Owners::of(store);
    store
        .pods
        .iter()
        .filter_map(|(k, pod)| {
            let ips: Vec<IpAddr> = owners.owned_by(k, pod).collect();
            let key = format!("{}/{}", k.0, k.1);
            let cgroup_id = local.get(key.as_str()).copied().flatten();
            (!ips.is_empty()).then_some((key, PodAddress { ips, cgroup_id }))
        })
        .collect()
}

/// The node's own addresses (ingress from them is always allowed: kubelet probes), from the
/// interfaces of network namespace `netns` (the agent's own when None), loopback excluded.
/// None when the namespace cannot be entered: no address is the node's then (its traffic is
/// judged as any other's).
pub fn host_ips(netns: Option<&Path>) -> Vec<IpAddr> {
    let Some(path) = netns else {
        return interface_ips();
    };
    // setns changes one thread's namespace: a thread of its own reads there.
    let read = std::thread::scope(|s| {
        s.spawn(|| enter_netns(path).map(|()| interface_ips()))
            .join()
            .map_err(|_| std::io::Error::other("the reading thread panicked"))?
    });
    read.unwrap_or_else(|e| {
        tracing::warn!(target: "weft::sync", netns = %path.display(), error = %e, "cannot read the node's addresses");
        Vec::new()
    })
}

/// Moves the calling thread into network namespace `path`.
fn enter_netns(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns on a descriptor we own, for this thread only; no memory is passed.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The addresses of the calling thread's namespace's interfaces, loopback excluded.
fn interface_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `addrs` with a list we free below.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return out;
    }
    let mut at = addrs;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*at };
        at = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its real type.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip.filter(|ip| !ip.is_loopback()) {
            out.push(ip);
        }
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    out.sort();
    out.dedup();
    out
}
