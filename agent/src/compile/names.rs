//! Who an address is: the workload and service names connection metrics and flow records
//! carry, rebuilt from the store after every pass of the pipeline.
//!
//! The kernel reports connections by address (sock_ops cannot see a socket's cgroup), so an
//! end is named by the pod that holds the address: pod addresses are unique in a cluster.
//! Names follow Istio's rules so its dashboards and Kiali group the same way: the workload is
//! the pod's controller (a Deployment for a ReplicaSet with `pod-template-hash`, a CronJob for
//! a Job named `<cronjob>-<digits>`), app and version come from the recommended labels.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
use weft_abi::{net::words_ip, svc::ServiceKey};

use crate::{
    compile::{self, Frontend},
    store::Store,
};

/// Istio's value for anything unknown.
pub const UNKNOWN: &str = "unknown";

/// The workload-level names of a pod: identical for every pod of one workload, so series keyed
/// by it are per workload pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub namespace: Arc<str>,
    pub workload: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

/// One pod: its workload's names and its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodName {
    pub peer: Arc<Peer>,
    pub pod: Arc<str>,
}

/// A Service as the metrics name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// `namespace/name`, as flow records and the CLI show it.
    pub key: Arc<str>,
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub host: Arc<str>,
}

/// Settings of the names.
#[derive(Debug, Clone, clap::Args)]
pub struct NameConfig {
    /// DNS domain of the cluster, for `destination_service` (`name.ns.svc.<domain>`).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

impl Default for NameConfig {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
        }
    }
}

/// The names in use, replaced whole by the pipeline after every pass; telemetry reads it.
pub type DirectoryHandle = std::sync::Arc<std::sync::RwLock<Arc<Directory>>>;

/// Protocol number and address of a service frontend or backend.
type PortKey = (IpAddr, u16, u8);

/// Addresses to names at one moment.
#[derive(Debug, Default)]
pub struct Directory {
    pods: HashMap<IpAddr, Arc<PodName>>,
    frontends: HashMap<PortKey, Arc<ServiceName>>,
    /// A backend address and port served by exactly one Service (None: by several).
    backends: HashMap<PortKey, Option<Arc<ServiceName>>>,
    /// The names of every pod's workload, interned: pods of one workload with the same
    /// labels share one (pods of two versions during a rolling update are two).
    peers: HashSet<Arc<Peer>>,
    /// Every pod by (namespace, name).
    pod_names: HashSet<(String, String)>,
    /// Every Service with a frontend: names by namespace.
    services: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

impl Directory {
    pub fn build(
        store: &Store,
        frontends: &BTreeMap<ServiceKey, Frontend>,
        config: &NameConfig,
    ) -> Self {
        let mut dir = Self::default();
        let owners = compile::addresses::Owners::of(store);
        let mut service_names: BTreeMap<&str, Arc<ServiceName>> = BTreeMap::new();
        for (key, pod) in &store.pods {
            let (ns, name) = key;
            dir.pod_names.insert((ns.clone(), name.clone()));
            // A host-network pod's address is the node's; a finished pod's may be reused; an
            // address two pods claim is named after neither.
            let ips: Vec<IpAddr> = owners.owned_by(key, pod).collect();
            if ips.is_empty() {
                continue;
            }
            let peer = peer(ns, name, pod);
            let peer = match dir.peers.get(&peer) {
                Some(p) => Arc::clone(p),
                None => {
                    let p = Arc::new(peer);
                    dir.peers.insert(Arc::clone(&p));
                    p
                }
            };
            let named = Arc::new(PodName {
                peer,
                pod: Arc::from(name.as_str()),
            });
            for ip in ips {
                dir.pods.insert(ip, Arc::clone(&named));
            }
        }
        for (key, frontend) in frontends {
            let svc = service_names
                .entry(frontend.service.as_str())
                .or_insert_with(|| service_name(&frontend.service, config))
                .clone();
            let ip = words_ip(key.family, key.addr);
            dir.frontends
                .insert((ip, u16::from_be(key.port), key.protocol), Arc::clone(&svc));
            for b in &frontend.backends {
                let k = (
                    words_ip(b.family, b.addr),
                    u16::from_be(b.port),
                    key.protocol,
                );
                dir.backends
                    .entry(k)
                    .and_modify(|seen| {
                        if seen.as_ref().is_some_and(|s| *s != svc) {
                            *seen = None;
                        }
                    })
                    .or_insert_with(|| Some(Arc::clone(&svc)));
            }
        }
        for svc in service_names.into_values() {
            dir.services
                .entry(Arc::clone(&svc.namespace))
                .or_default()
                .insert(Arc::clone(&svc.name));
        }
        dir
    }

    /// The pod holding `ip`.
    pub fn pod(&self, ip: IpAddr) -> Option<&Arc<PodName>> {
        self.pods.get(&ip)
    }

    /// The Service of a connection: the ClusterIP frontend the client asked for when the
    /// datapath translated it, else the one Service whose backend the address is.
    pub fn service(
        &self,
        frontend: Option<SocketAddr>,
        server: SocketAddr,
        protocol: u8,
    ) -> Option<&Arc<ServiceName>> {
        if let Some(f) = frontend
            && let Some(s) = self.frontends.get(&(f.ip(), f.port(), protocol))
        {
            return Some(s);
        }
        self.backends
            .get(&(server.ip(), server.port(), protocol))
            .and_then(Option::as_ref)
    }

    pub fn has_pod(&self, namespace: &str, pod: &str) -> bool {
        self.pod_names
            .contains(&(namespace.to_owned(), pod.to_owned()))
    }

    /// Whether some pod still has exactly these workload names (series of anything else
    /// are stale).
    pub fn is_current(&self, peer: &Peer) -> bool {
        self.peers.contains(peer)
    }

    /// Whether the Service still exists with a frontend.
    pub fn has_service_named(&self, namespace: &str, name: &str) -> bool {
        self.services
            .get(namespace)
            .is_some_and(|names| names.contains(name))
    }
}

fn service_name(ns_name: &str, config: &NameConfig) -> Arc<ServiceName> {
    let (ns, name) = ns_name.split_once('/').unwrap_or(("", ns_name));
    Arc::new(ServiceName {
        name: Arc::from(name),
        namespace: Arc::from(ns),
        key: Arc::from(ns_name),
        host: Arc::from(format!("{name}.{ns}.svc.{}", config.cluster_domain)),
    })
}

fn label<'a>(pod: &'a Pod, keys: &[&str]) -> Option<&'a str> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter().find_map(|k| labels.get(*k).map(String::as_str))
}

/// The workload a pod belongs to, as Istio derives it (pkg/kube: GetDeployMetaFromPod).
pub fn workload_name(name: &str, pod: &Pod) -> String {
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let Some(owner) = controller else {
        return name.to_owned();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => match label(pod, &["pod-template-hash"]) {
            Some(hash) => owner
                .name
                .strip_suffix(hash)
                .and_then(|s| s.strip_suffix('-'))
                .unwrap_or(&owner.name)
                .to_owned(),
            None => owner.name.clone(),
        },
        "Job" => match owner.name.rsplit_once('-') {
            // A CronJob's Jobs are `<cronjob>-<scheduled time in minutes>`.
            Some((cron, digits))
                if !cron.is_empty()
                    && !digits.is_empty()
                    && digits.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

fn peer(ns: &str, name: &str, pod: &Pod) -> Peer {
    let workload = workload_name(name, pod);
    let app = label(pod, &["app.kubernetes.io/name", "app"]);
    let version = label(pod, &["app.kubernetes.io/version", "version"]);
    let canonical_service = label(
        pod,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(&workload);
    let canonical_revision = label(
        pod,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest");
    Peer {
        namespace: Arc::from(ns),
        app: Arc::from(app.unwrap_or(UNKNOWN)),
        version: Arc::from(version.unwrap_or(UNKNOWN)),
        canonical_service: Arc::from(canonical_service),
        canonical_revision: Arc::from(canonical_revision),
        workload: Arc::from(workload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).expect("pod yaml")
    }

    #[test]
    fn workload_names_follow_istio() {
        let rs = pod(
            "metadata: {name: web-7d4b9c-x2x, labels: {pod-template-hash: 7d4b9c}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: u, controller: true}]}",
        );
        assert_eq!(workload_name("web-7d4b9c-x2x", &rs), "web");
        let sts = pod(
            "metadata: {name: db-0, ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: u, controller: true}]}",
        );
        assert_eq!(workload_name("db-0", &sts), "db");
        let cron = pod(
            "metadata: {name: backup-28800-abc, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: backup-28800, uid: u, controller: true}]}",
        );
        assert_eq!(workload_name("backup-28800-abc", &cron), "backup");
        let job = pod(
            "metadata: {name: migrate-x, ownerReferences: [{apiVersion: batch/v1, kind: Job, name: migrate, uid: u, controller: true}]}",
        );
        assert_eq!(workload_name("migrate-x", &job), "migrate");
        let bare = pod("metadata: {name: lonely}");
        assert_eq!(workload_name("lonely", &bare), "lonely");
    }

    #[test]
    fn app_version_and_canonical_names_use_the_recommended_labels() {
        let p = pod(
            "metadata: {name: a, labels: {app: shop, version: v2}}\nspec: {serviceAccountName: sa1, containers: []}",
        );
        let peer = peer("ns1", "a", &p);
        assert_eq!(&*peer.app, "shop");
        assert_eq!(&*peer.version, "v2");
        assert_eq!(&*peer.canonical_service, "shop");
        assert_eq!(&*peer.canonical_revision, "v2");
        let bare = peer_of("b");
        assert_eq!(&*bare.app, UNKNOWN);
        assert_eq!(&*bare.canonical_service, "b");
        assert_eq!(&*bare.canonical_revision, "latest");
    }

    #[test]
    fn every_version_of_a_workload_is_current_and_host_network_pods_name_no_address() {
        let objects: BTreeMap<_, _> = [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-a, namespace: shop, labels: {app: web, version: v1}}\nstatus: {podIP: 10.0.0.1}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-b, namespace: shop, labels: {app: web, version: v2}}\nstatus: {podIP: 10.0.0.2}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: kube-system}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 192.168.1.5}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: shop}\nstatus: {phase: Succeeded, podIP: 10.0.0.3}",
            ]
            .iter()
            .map(|y| {
                crate::store::decode(crate::source::yaml::parse(y).expect("yaml"))
                    .expect("valid pod")
            })
            .collect();
        let store = Store::from_objects(&objects);
        let dir = Directory::build(&store, &BTreeMap::new(), &NameConfig::default());
        let a = dir.pod("10.0.0.1".parse().expect("ip")).expect("web-a");
        let b = dir.pod("10.0.0.2".parse().expect("ip")).expect("web-b");
        assert_eq!(&*a.peer.version, "v1");
        assert_eq!(&*b.peer.version, "v2");
        assert!(dir.is_current(&a.peer) && dir.is_current(&b.peer));
        assert!(
            dir.pod("192.168.1.5".parse().expect("ip")).is_none(),
            "host network"
        );
        assert!(
            dir.pod("10.0.0.3".parse().expect("ip")).is_none(),
            "finished"
        );
        assert!(dir.has_pod("kube-system", "agent"));
    }

    /// Flows name an address after the pod that holds it: the new pod once the old one is
    /// being deleted, neither while both are live.
    #[test]
    fn an_address_handed_on_names_its_new_pod_and_a_contested_one_nobody() {
        let pods = |db_meta: &str| -> Store {
            let objects: BTreeMap<_, _> = [
                format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: db, namespace: shop{db_meta}}}\nstatus: {{podIP: 10.0.0.1}}"),
                "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: shop}\nstatus: {podIP: 10.0.0.1}".to_owned(),
            ]
            .iter()
            .map(|y| {
                crate::store::decode(crate::source::yaml::parse(y).expect("yaml"))
                    .expect("valid pod")
            })
            .collect();
            Store::from_objects(&objects)
        };
        let ip = "10.0.0.1".parse().expect("ip");
        let deleting = pods(", deletionTimestamp: '2026-12-03T10:00:00Z'");
        let dir = Directory::build(&deleting, &BTreeMap::new(), &NameConfig::default());
        assert_eq!(dir.pod(ip).map(|p| &*p.pod), Some("api"));
        let both = pods("");
        let dir = Directory::build(&both, &BTreeMap::new(), &NameConfig::default());
        assert!(dir.pod(ip).is_none());
    }

    fn peer_of(name: &str) -> Peer {
        peer("ns", name, &pod(&format!("metadata: {{name: {name}}}")))
    }
}
