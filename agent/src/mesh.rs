//! The mesh: workload certificates for the meshed pods of this node, and (in `proxy`) the
//! tunnels that carry their connections.
//!
//! Constructed from its [`Settings`]; the run loop hands it each pass's store and local pods
//! ([`Mesh::on_pass`]), wakes it when a certificate is due ([`Mesh::next_due`]), and asks it
//! to re-read the CA at every resync ([`Mesh::reload_ca`]), so that a rotated Secret is taken
//! up without a restart.
pub mod ca_watch;
pub mod carried;
pub mod hbone;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod status;
pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use prometheus_client::registry::Registry;
use weft_abi::mesh::{MeshOrig, MeshOrigKey};

use crate::{
    compile::{addresses::Owners, mesh::enrollment},
    datapath::Pins,
    identity::{
        SpiffeId,
        ca::Ca,
        certs::{Certs, Changes},
    },
    store::Store,
};
use metrics::{MeshMetrics, ProxyMetrics};
use proxy::{Directory, MeshedPod, Proxy, Shared};
pub use status::MeshStatus;

pub use crate::store::validate::NETNS_ANNOTATION;

/// A pod of this node, as the pipeline's last pass has it.
#[derive(Debug, Clone)]
pub struct LocalPod<'a> {
    /// `namespace/name`.
    pub pod: &'a str,
    pub ips: &'a [IpAddr],
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    /// The cgroup's id, once the cgroup exists: the key of the pod's policy in the kernel.
    pub cgroup_id: Option<u64>,
}

/// A certificate that could not be issued is tried again this soon.
const RETRY: Duration = Duration::from_secs(5);
/// A meshed pod without a known network namespace is looked for again this soon.
const NETNS_RETRY: Duration = Duration::from_secs(1);

/// The mesh's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// The mesh CA: a directory with `ca.crt` and `ca.key` (`weft ca init` makes one), or a
    /// cert-manager CA Secret mounted as files (`tls.crt`, `tls.key`, `ca.crt`). Re-read at
    /// every resync. Without it, meshed pods get no certificate.
    #[arg(long, value_name = "DIR")]
    pub mesh_ca: Option<PathBuf>,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: String,
    /// The lifetime of a workload certificate; it is renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_cert_ttl)]
    pub mesh_cert_ttl: Duration,
    /// The host's procfs (a container mounts it elsewhere, e.g. `/host/proc`, with hostPID):
    /// where pods' network namespaces are found (`PID/ns/net`) and their sysctls written.
    #[arg(long, default_value = "/proc", value_name = "DIR")]
    pub host_proc: PathBuf,
    /// After SIGTERM: how long meshed connections this agent carries may go on before it
    /// exits (it exits sooner once they have ended).
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    pub drain_timeout: Duration,
    /// A pooled tunnel (the mutual TLS connection to another node's pod that new connections
    /// take as streams) is closed once no connection has used it for this long; the next
    /// connection opens a new one.
    #[arg(long, default_value = "5m", value_parser = crate::parse_positive_duration)]
    pub mesh_tunnel_idle_timeout: Duration,
}

/// A trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-`, `_`.
fn parse_trust_domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a SPIFFE trust domain has only lowercase letters, digits, '.', '-' and '_'"
        ))
    }
}

/// At least 10 s: renewal at half the lifetime must leave time to use the new certificate.
fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = crate::parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?}: must be at least 10s"));
    }
    Ok(d)
}

/// The CA as last read.
#[derive(Debug, Default)]
struct CaState {
    ca: Option<Ca>,
    /// Why the last read failed (the CA read before it, if any, stays in use).
    error: Option<crate::identity::Error>,
}

/// The node's side of the mesh: the CA, the certificates, and what they are for.
#[derive(Debug)]
pub struct Mesh {
    settings: Settings,
    ca: CaState,
    certs: Certs,
    /// Local meshed pods (`namespace/name`) by identity.
    pods: BTreeMap<SpiffeId, Vec<String>>,
    /// Identities whose certificate could not be issued, and why.
    failed: BTreeMap<SpiffeId, String>,
    unknown_labels: Vec<String>,
    metrics: MeshMetrics,
    status: Arc<RwLock<MeshStatus>>,
    /// None without the kernel's `MESH_ORIG` (unit tests).
    proxy: Option<Proxy>,
    /// Local meshed pods whose network namespace could not be found yet.
    waiting: Vec<String>,
    /// Istio's root namespace (`--mesh-root-namespace`).
    root: String,
    /// The node's own addresses (see [`Mesh::set_node_ips`]).
    node_ips: Vec<IpAddr>,
}

impl Mesh {
    /// Reads the CA (a failure is reported, not fatal: meshed pods then get no certificate).
    /// With `kernel` (the kernel's `MESH_ORIG` and the instance's pins), the proxy serves
    /// the local meshed pods.
    /// `host_netns`: the node's network namespace when the agent runs outside it
    /// (`--host-netns`): tunnels are opened from there.
    pub fn new(
        settings: &Settings,
        registry: &mut Registry,
        kernel: Option<(BpfHashMap<MapData, MeshOrigKey, MeshOrig>, Pins)>,
        host_netns: Option<&Path>,
    ) -> Self {
        let proxy_metrics = ProxyMetrics::new(registry);
        let node = host_netns.map(netns::Netns::enter_node).transpose();
        // The node's namespace, which no pod's may be: unknown, there is no proxy.
        let host = node.and_then(|n| {
            let cookie = match &n {
                Some(n) => n.cookie,
                None => crate::datapath::own_netns_cookie()?,
            };
            Ok((n, cookie))
        });
        let proxy = match host {
            Ok((node, host_cookie)) => kernel.map(|(orig, pins)| {
                let empty = Arc::new(
                    tls::Credentials::new(std::iter::empty(), std::iter::empty())
                        .expect("no roots and no leaves always make credentials"),
                );
                let shared = Shared::new(
                    (orig, pins),
                    empty,
                    proxy_metrics,
                    node.map(Arc::new),
                    (settings.host_proc.clone(), host_cookie),
                    settings.mesh_tunnel_idle_timeout,
                );
                Proxy::new(Arc::new(shared))
            }),
            Err(e) => {
                tracing::error!(target: "weft::mesh", error = %e, "cannot enter or identify the node's network namespace: no mesh proxy (meshed connections are refused)");
                None
            }
        };
        let mut mesh = Self {
            settings: settings.clone(),
            ca: CaState::default(),
            certs: Certs::new(settings.mesh_cert_ttl),
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            unknown_labels: Vec::new(),
            node_ips: Vec::new(),
            metrics: MeshMetrics::new(registry),
            status: Arc::default(),
            proxy,
            waiting: Vec::new(),
            root: "istio-system".to_owned(),
        };
        mesh.reload_ca(SystemTime::now());
        mesh
    }

    /// Istio's root namespace, for the security policies of the pods served.
    pub fn with_mesh_root(mut self, root: &str) -> Self {
        root.clone_into(&mut self.root);
        self.publish(SystemTime::now());
        self
    }

    /// What telemetry asks of the mesh (which connections it carried, with whose
    /// identities); none without the proxy.
    pub fn telemetry(&self) -> Option<Arc<carried::Carried>> {
        self.proxy.as_ref().map(|p| Arc::clone(&p.shared().carried))
    }

    /// What `weft certs` and `weft status` show.
    pub fn status(&self) -> Arc<RwLock<MeshStatus>> {
        Arc::clone(&self.status)
    }

    /// Re-reads the CA directory. A changed CA renews every certificate; a read that fails
    /// keeps the CA read before (its certificates stay valid) and is reported.
    pub fn reload_ca(&mut self, now: SystemTime) {
        let Some(dir) = &self.settings.mesh_ca else {
            return self.publish(now);
        };
        match Ca::load(dir) {
            Ok(ca) => {
                let changed = self.ca.ca.as_ref().is_none_or(|old| !old.same_as(&ca));
                if changed {
                    tracing::info!(target: "weft::mesh", dir = %dir.display(), roots = ca.roots().len(), "mesh CA loaded");
                }
                if self.ca.error.take().is_some() {
                    tracing::info!(target: "weft::mesh", dir = %dir.display(), "mesh CA readable again");
                }
                self.ca.ca = Some(ca);
                if changed {
                    self.refresh(now);
                }
            }
            Err(e) => {
                if self.ca.error.as_ref().map(ToString::to_string) != Some(e.to_string()) {
                    tracing::error!(target: "weft::mesh", error = %crate::chain(&e), "cannot read the mesh CA; certificates already held stay in use until they expire");
                }
                self.metrics.ca_error(&e);
                self.ca.error = Some(e);
            }
        }
        self.publish(now);
    }

    /// After a pass: the identities of the local meshed pods get a certificate, the others
    /// lose theirs; the proxy serves exactly the local meshed pods.
    /// The node's own addresses, which no pod's security policy applies to (kubelet probes):
    /// telemetry names no decision for their connections.
    pub fn set_node_ips(&mut self, ips: &[IpAddr]) {
        ips.clone_into(&mut self.node_ips);
    }

    pub fn on_pass(&mut self, store: &Store, local: &[LocalPod<'_>], now: SystemTime) {
        let enrolled = enrollment(store, &self.settings.trust_domain);
        let mut pods: BTreeMap<SpiffeId, Vec<String>> = BTreeMap::new();
        let mut served = Vec::new();
        self.waiting.clear();
        for lp in local {
            let Some((key, id)) = enrolled.meshed.iter().find(|((ns, name), _)| {
                lp.pod.split_once('/') == Some((ns.as_str(), name.as_str()))
            }) else {
                continue;
            };
            pods.entry(id.clone()).or_default().push(lp.pod.to_owned());
            let netns = netns_of(store, key, &lp.cgroup, &self.settings.host_proc);
            // A pod served already keeps its namespace when no process of it can be read
            // now (the one found exited meanwhile): its tunnels are not torn down.
            let served_before = || {
                self.proxy
                    .as_ref()
                    .and_then(|p| p.served(lp.pod))
                    .filter(|p| p.id == *id && p.ips == lp.ips)
                    .map(|p| (p.netns_inode, p.netns.clone()))
            };
            match netns.or_else(served_before) {
                Some((netns_inode, netns)) => served.push(MeshedPod {
                    pod: lp.pod.to_owned(),
                    id: id.clone(),
                    ips: lp.ips.to_vec(),
                    netns,
                    netns_inode,
                }),
                None => self.waiting.push(lp.pod.to_owned()),
            }
        }
        self.report_unknown(&enrolled.unknown);
        if pods != self.pods {
            self.pods = pods;
            self.refresh(now);
        }
        if let Some(proxy) = &mut self.proxy {
            let local_ips: std::collections::BTreeSet<IpAddr> =
                local.iter().flat_map(|lp| lp.ips.iter().copied()).collect();
            *proxy
                .shared()
                .local
                .write()
                .unwrap_or_else(|e| e.into_inner()) = Arc::new(local_ips);
            let cgroups = local
                .iter()
                .filter_map(|lp| Some((lp.pod.to_owned(), lp.cgroup_id?)))
                .collect();
            *proxy
                .shared()
                .cgroups
                .write()
                .unwrap_or_else(|e| e.into_inner()) = cgroups;
            let owners = Owners::of(store);
            let directory = directory(store, &owners, &enrolled.meshed);
            proxy.shared().carried.set_directory(directory);
            // Before the pods are served: a stream is never decided without their policy.
            let keys: Vec<crate::store::Key> = served
                .iter()
                .filter_map(|p| p.pod.split_once('/'))
                .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                .collect();
            let authz = crate::compile::authz::compile(store, &self.root, &keys);
            proxy.shared().carried.set_policy(
                authz,
                holders(store, &owners, &served),
                self.node_ips.iter().copied().collect(),
            );
            proxy.sync(&served);
        }
        self.publish(now);
    }

    fn report_unknown(&mut self, unknown: &[crate::compile::mesh::UnknownValue]) {
        let unknown: Vec<String> = unknown
            .iter()
            .map(|u| format!("{}: {}={:?}", u.object, compile_label(), u.value))
            .collect();
        for u in unknown.iter().filter(|u| !self.unknown_labels.contains(u)) {
            tracing::warn!(target: "weft::mesh", label = u, "mesh label value not understood (enabled or disabled): read as enabled");
        }
        self.unknown_labels = unknown;
    }

    /// When a certificate is next due for renewal (or a failed one for another try).
    pub fn next_due(&self) -> Option<SystemTime> {
        // Without a CA there is nothing to retry with: a CA that becomes readable refreshes.
        let retry =
            (self.ca.ca.is_some() && !self.failed.is_empty()).then(|| SystemTime::now() + RETRY);
        // A pod whose namespace has no process yet is looked at again soon.
        let waiting = (self.proxy.is_some() && !self.waiting.is_empty())
            .then(|| SystemTime::now() + NETNS_RETRY);
        [self.certs.next_renewal(), retry, waiting]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether every local meshed pod has its listeners up, none waiting for its network
    /// namespace (without a proxy: none waiting): a successor releases its lock then.
    pub fn settled(&self) -> bool {
        self.waiting.is_empty() && self.proxy.as_ref().is_none_or(Proxy::settled)
    }

    /// User connections the proxy carries now.
    pub fn active(&self) -> usize {
        self.proxy.as_ref().map_or(0, Proxy::active)
    }

    /// Closes the listeners; connections in progress go on.
    pub fn stop_accepting(&self) {
        if let Some(p) = &self.proxy {
            p.stop_accepting();
        }
    }

    /// Resolves once, after [`Mesh::stop_accepting`], the proxy carries nothing.
    pub async fn drained(&mut self) {
        if let Some(p) = &mut self.proxy {
            p.drained().await;
        }
    }

    /// `--drain-timeout`.
    pub fn drain_timeout(&self) -> Duration {
        self.settings.drain_timeout
    }

    /// Waits until the proxy's listeners change (never without a proxy).
    pub async fn listeners_changed(&self) {
        match &self.proxy {
            Some(p) => p.changed.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Publishes the status again (the listeners changed).
    pub fn republish(&mut self) {
        self.publish(SystemTime::now());
    }

    /// Renews what is due.
    pub fn renew(&mut self, now: SystemTime) {
        self.refresh(now);
        self.publish(now);
    }

    fn refresh(&mut self, now: SystemTime) {
        let Some(ca) = &self.ca.ca else {
            self.failed = self
                .pods
                .keys()
                .map(|id| (id.clone(), no_ca(&self.settings)))
                .collect();
            return;
        };
        let wanted: BTreeSet<SpiffeId> = self.pods.keys().cloned().collect();
        let changes = self.certs.refresh(ca, &wanted, now);
        self.report(&changes);
        self.failed.retain(|id, _| wanted.contains(id));
        for id in changes.issued.iter().chain(&changes.renewed) {
            self.failed.remove(id);
        }
        for (id, e) in changes.failed {
            self.failed.insert(id, crate::chain(&e));
        }
    }

    fn report(&self, changes: &Changes) {
        for id in &changes.issued {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate issued");
        }
        for id in &changes.renewed {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate renewed");
        }
        for id in &changes.dropped {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate dropped: no pod of this node has the identity");
        }
        for (id, e) in &changes.failed {
            tracing::error!(target: "weft::mesh", identity = %id, error = %crate::chain(e), "cannot issue a certificate; a held one stays in use until it expires");
        }
        self.metrics.changes(changes);
    }

    fn publish(&mut self, now: SystemTime) {
        let status = MeshStatus::of(status::Parts {
            settings: &self.settings,
            root_namespace: &self.root,
            ca: self.ca.ca.as_ref(),
            ca_error: self.ca.error.as_ref(),
            certs: &self.certs,
            pods: &self.pods,
            failed: &self.failed,
            unknown_labels: &self.unknown_labels,
            proxied: self.pod_statuses(),
            now,
        });
        self.metrics.publish(&status);
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;
        self.publish_credentials();
    }

    /// The proxy's listeners per local meshed pod (waiting ones without any).
    fn pod_statuses(&self) -> Vec<status::PodStatus> {
        let Some(proxy) = &self.proxy else {
            return Vec::new();
        };
        let listeners = proxy.listeners.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<status::PodStatus> = self
            .pods
            .values()
            .flatten()
            .map(|pod| {
                let (listeners, error) = match listeners.get(pod) {
                    Some(Ok(addrs)) => (addrs.iter().map(ToString::to_string).collect(), None),
                    Some(Err(e)) => (Vec::new(), Some(e.clone())),
                    None if self.waiting.contains(pod) => (
                        Vec::new(),
                        Some(
                            "no process in its cgroup yet: its network namespace is unknown".into(),
                        ),
                    ),
                    None => (Vec::new(), None),
                };
                status::PodStatus {
                    pod: pod.clone(),
                    listeners,
                    error,
                }
            })
            .collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    /// The proxy's credentials: the bundle and the held certificates.
    fn publish_credentials(&self) {
        let (Some(proxy), Some(ca)) = (&self.proxy, &self.ca.ca) else {
            return;
        };
        let roots = ca.roots().iter().map(|r| r.der.as_slice());
        match tls::Credentials::new(roots, self.certs.held()) {
            Ok(creds) => {
                *proxy
                    .shared()
                    .creds
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(creds);
            }
            Err(e) => {
                tracing::error!(target: "weft::mesh", error = %e, "cannot use the certificates; tunnels keep the previous ones");
            }
        }
    }
}

/// The network namespace of a local pod (its inode and path): its annotation, or that of a
/// process in its cgroup subtree whose namespace can be read.
fn netns_of(
    store: &Store,
    key: &crate::store::Key,
    cgroup: &Path,
    host_proc: &Path,
) -> Option<(u64, PathBuf)> {
    let inode = |p: PathBuf| {
        let meta = std::fs::metadata(&p).ok()?;
        Some((std::os::unix::fs::MetadataExt::ino(&meta), p))
    };
    let annotated = store
        .pods
        .get(key)
        .and_then(|p| p.metadata.annotations.as_ref())
        .and_then(|a| a.get(NETNS_ANNOTATION))
        .map(PathBuf::from);
    if let Some(path) = annotated {
        return inode(path);
    }
    processes(cgroup, 3)
        .into_iter()
        .find_map(|pid| inode(host_proc.join(pid.to_string()).join("ns/net")))
}

/// Processes of the cgroup and of its descendants down to `depth` levels (under the kubelet
/// a pod's own cgroup holds none: its containers' cgroups do, the sandbox's among them).
fn processes(cgroup: &Path, depth: usize) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if depth == 0 {
        return pids;
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(cgroup)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    children.sort();
    for child in children {
        pids.extend(processes(&child, depth - 1));
    }
    pids
}

/// Every meshed pod address of the cluster with its identity (addresses several pods claim
/// belong to none).
fn directory(
    store: &Store,
    owners: &Owners,
    meshed: &BTreeMap<crate::store::Key, SpiffeId>,
) -> Directory {
    let mut out = Directory::new();
    for (key, id) in meshed {
        if let Some(pod) = store.pods.get(key) {
            for ip in owners.owned_by(key, pod) {
                out.insert(ip, id.clone());
            }
        }
    }
    out
}

/// The addresses the served pods hold, each with its pod (`namespace/name`).
fn holders(store: &Store, owners: &Owners, served: &[MeshedPod]) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for p in served {
        let Some((ns, name)) = p.pod.split_once('/') else {
            continue;
        };
        let key = (ns.to_owned(), name.to_owned());
        if let Some(pod) = store.pods.get(&key) {
            out.extend(owners.owned_by(&key, pod).map(|ip| (ip, p.pod.clone())));
        }
    }
    out
}

fn compile_label() -> &'static str {
    crate::compile::mesh::MESH_LABEL
}

fn no_ca(settings: &Settings) -> String {
    match &settings.mesh_ca {
        None => "no mesh CA: the agent runs without --mesh-ca".to_owned(),
        Some(dir) => format!("the mesh CA in {} is not readable", dir.display()),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tunnel_tests;
