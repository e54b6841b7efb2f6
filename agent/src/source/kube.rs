//! Kubernetes mode: kube-rs reflectors for the kinds weft reads feed the same store as the
//! standalone directory source: five always, and Istio's PeerAuthentication,
//! AuthorizationPolicy and DestinationRule once API discovery finds them served ([`istio`]).
//!
//! - Every kind is listed, then watched (`watcher(..).default_backoff().reflect(writer)`):
//!   an expired resourceVersion (410 Gone) relists, errors back off. A relist replaces a
//!   reflector's contents at once when it is complete, so a pass never sees half a list.
//! - Nothing is compiled before every kind has been listed once: a partial store would
//!   delete what the previous agent left in the kernel.
//! - When the API server cannot be reached the reflectors keep what they have, so the
//!   datapath keeps its last state (fail-static), and [`Health`] reports degraded.
//! - Pods of this node (`spec.nodeName` = `--node-name`) get their cgroup from their UID and
//!   QoS class ([`cgroups`]); the `weft.io/cgroup` annotation of standalone mode is never
//!   taken from the API (whoever can annotate a pod must not choose what weft enforces on).
pub mod cgroups;
pub mod istio;
pub mod metrics;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{Resource, client::ClientBuilder, runtime::reflector::Store as Reader};

pub use self::watch::Health;
use self::{
    cgroups::Cgroups,
    metrics::KubeMetrics,
    watch::{Observe, spawn},
};
use crate::{
    source::Rejection,
    store::{
        self, FieldError, Kind, Object, ObjectRef, Store,
        stand_in::REJECTED_ANNOTATION,
        validate::{CGROUP_ANNOTATION, NETNS_ANNOTATION},
    },
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the kubeconfig {path} (--kubeconfig)", path = path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot find how to reach the API server: no in-cluster service account, no \
         KUBECONFIG and no ~/.kube/config"
    )]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("cannot build a client for the API server {server}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
}

/// How `--source kubernetes` was asked to run.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// None: in-cluster config, else `KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The cgroup2 root the agent attaches to; pod cgroups are found below it.
    pub cgroup_root: PathBuf,
    /// How often the API server is asked again whether it serves Istio's APIs, until it
    /// serves every kind weft reads.
    pub crd_discovery_interval: std::time::Duration,
}

/// The reflectors' read sides.
#[derive(Debug, Clone)]
struct Readers {
    namespaces: Reader<Namespace>,
    pods: Reader<Pod>,
    services: Reader<Service>,
    endpoint_slices: Reader<EndpointSlice>,
    network_policies: Reader<NetworkPolicy>,
    /// Istio's kinds, as discovery finds them.
    istio: istio::Readers,
}

/// A validated object and the version it came from.
#[derive(Debug)]
struct Validated {
    /// metadata.uid: an object deleted and created again under the same name is another
    /// object, and must not inherit the last good version of the old one.
    uid: Option<String>,
    resource_version: Option<String>,
    /// The cgroup given to a local pod (relative to the cgroup root) with this version.
    cgroup: Option<PathBuf>,
    /// The last good version: kept when a newer one is rejected (or the stand-in of the
    /// rejected version, when there was none).
    good: Option<Object>,
    /// With a kept policy, the stand-in of its rejected version: what that version selects
    /// is isolated too.
    rejected_version: Option<(ObjectRef, Object)>,
    rejection: Option<Rejection>,
}

/// The Kubernetes source: reflectors running as tasks, and what the last pass validated.
#[derive(Debug)]
pub struct KubeSource {
    server: String,
    node_name: String,
    readers: Readers,
    health: Arc<Health>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: u64,
    /// A pending pod's cgroup appeared since the last pass.
    cgroups_changed: bool,
    /// Some pod names `node_name`; warned once that none does.
    node_seen: bool,
    node_warned: bool,
    validated: BTreeMap<ObjectRef, Validated>,
    cgroups: Cgroups,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Connects (lazily: nothing is sent before the watches start) and starts one watch per
    /// kind. Must be called inside a tokio runtime.
    pub async fn start(config: &KubeConfig, metrics: KubeMetrics) -> Result<Self, Error> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let err = |source| Error::Kubeconfig {
                    path: path.clone(),
                    source,
                };
                let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
                kube::Config::from_custom_kubeconfig(
                    file,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(err)?
            }
            None => kube::Config::infer()
                .await
                .map_err(|source| Error::Infer { source })?,
        };
        // The watcher's backoff is the one retry policy: kube-client's own (15 retries of
        // 429/503/504, growing to minutes) would hide an unavailable API server from health.
        let mut kube_config = kube_config;
        kube_config.default_retry = false;
        let server = kube_config.cluster_url.to_string();
        let health = Arc::new(Health::new(metrics));
        let client = ClientBuilder::try_from(kube_config)
            .map_err(|source| Error::Client {
                server: server.clone(),
                source,
            })?
            .with_layer(&Observe::layer(Arc::clone(&health)))
            .build();
        let mut tasks = Vec::new();
        let readers = Readers {
            namespaces: spawn(&client, Kind::Namespace, &health, &mut tasks),
            pods: spawn(&client, Kind::Pod, &health, &mut tasks),
            services: spawn(&client, Kind::Service, &health, &mut tasks),
            endpoint_slices: spawn(&client, Kind::EndpointSlice, &health, &mut tasks),
            network_policies: spawn(&client, Kind::NetworkPolicy, &health, &mut tasks),
            istio: istio::Readers::default(),
        };
        tasks.push(tokio::spawn(istio::discovery(
            client.clone(),
            Arc::clone(&health),
            Arc::clone(&readers.istio),
            config.crd_discovery_interval,
        )));
        Ok(Self {
            server,
            node_name: config.node_name.clone(),
            readers,
            health,
            tasks,
            seen: 0,
            cgroups_changed: false,
            node_seen: false,
            node_warned: false,
            validated: BTreeMap::new(),
            cgroups: Cgroups::new(&config.cgroup_root),
        })
    }

    /// `kubernetes:<server>`, for status.
    pub fn describe(&self) -> String {
        format!("kubernetes:{} (node {})", self.server, self.node_name)
    }

    /// Whether some pod of the cluster is on this node (`--node-name`); our own DaemonSet pod
    /// always is, so until then the node name may be wrong.
    pub fn node_seen(&self) -> bool {
        self.node_seen
    }

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Whether a pass would see something new: a reflector changed, or a local pod's
    /// cgroup appeared.
    pub fn changed(&mut self) -> bool {
        let generation = self.health.generation();
        let changed = generation != self.seen || self.cgroups_changed;
        self.seen = generation;
        self.cgroups_changed = false;
        changed
    }

    /// Whether a local pod whose cgroup was missing has one now (checked on the garbage
    /// collection tick; the next pass gives it its real path).
    pub fn cgroups_appeared(&mut self) -> bool {
        let appeared = self.cgroups.appeared();
        self.cgroups_changed |= appeared;
        appeared
    }

    /// The store every kind's reflector holds now, validated, with local pods bound to their
    /// cgroups; and every object rejected. None until every kind has been listed once.
    pub fn snapshot(&mut self) -> Option<(Store, Vec<Rejection>)> {
        if !self.health.listed() {
            return None;
        }
        let mut live = BTreeSet::new();
        let (r, v) = (&self.readers, &mut self.validated);
        let namespaces = r.namespaces.state();
        add(
            v,
            &mut live,
            Kind::Namespace,
            namespaces,
            no_cgroup,
            |o, _| typed(Object::Namespace(o)),
        );
        let pods = r.pods.state();
        // A mirror annotation naming another API pod's UID is forged: static pods' hashes
        // are no API object's UID.
        let uids: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        self.cgroups
            .retain(pods.iter().filter_map(|p| cgroup_uid(p, &uids)));
        if !self.node_seen {
            // A mistyped --node-name finds no local pod and enforces nothing: say so. Our
            // own DaemonSet pod names the node, so a real node always has one.
            self.node_seen = pods.iter().any(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node_name)
            });
            if !self.node_seen && !self.node_warned {
                self.node_warned = true;
                tracing::warn!(target: "weft::source", node = self.node_name, "no pod of the cluster is on this node: check --node-name (NODE_NAME); the programs are not attached (a restarted agent's stay as they were) until one is");
            }
        }
        let (node, cgroups) = (self.node_name.as_str(), &mut self.cgroups);
        let local = |p: &Pod| local_cgroup(node, cgroups, p, &uids);
        add(v, &mut live, Kind::Pod, pods, local, |p, cgroup| {
            typed(Object::Pod(bind_cgroup(p, cgroup)))
        });
        let services = r.services.state();
        add(v, &mut live, Kind::Service, services, no_cgroup, |o, _| {
            typed(Object::Service(o))
        });
        let slices = r.endpoint_slices.state();
        add(
            v,
            &mut live,
            Kind::EndpointSlice,
            slices,
            no_cgroup,
            |o, _| typed(Object::EndpointSlice(o)),
        );
        let policies = r.network_policies.state();
        add(
            v,
            &mut live,
            Kind::NetworkPolicy,
            policies,
            no_cgroup,
            |o, _| typed(Object::NetworkPolicy(o)),
        );
        let watched = r.istio.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for w in &watched {
            add(v, &mut live, w.kind, w.reader.state(), no_cgroup, |o, _| {
                istio::decode(w, &o)
            });
        }
        // Objects the API no longer has are gone, rejected versions included.
        v.retain(|k, _| live.contains(k));
        let objects = v.iter().flat_map(|(r, v)| {
            let extra = v.rejected_version.as_ref().map(|(r, o)| (r, o));
            v.good.as_ref().map(|g| (r, g)).into_iter().chain(extra)
        });
        let mut store = Store::from_objects(objects);
        store.unlisted = self.health.unlisted();
        let rejections = v.values().filter_map(|v| v.rejection.clone()).collect();
        Some((store, rejections))
    }
}

/// The object without weft's mark of a stand-in: whoever can annotate an object must not
/// make weft take it for one (a stand-in PeerAuthentication is STRICT over every other).
fn without_rejected_mark<K: Resource + Clone>(obj: Arc<K>) -> Arc<K> {
    let marked = obj
        .meta()
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REJECTED_ANNOTATION));
    if !marked {
        return obj;
    }
    let mut obj = Arc::unwrap_or_clone(obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_default()
        .remove(REJECTED_ANNOTATION);
    Arc::new(obj)
}

/// Objects other than pods have no cgroup.
fn no_cgroup<K>(_: &K) -> Option<PathBuf> {
    None
}

/// An object as the store holds it, or what is wrong with it and what stands in for it.
type Decoded = Result<Object, (Vec<FieldError>, Option<Object>)>;

/// A typed object, validated.
fn typed(object: Object) -> Decoded {
    match store::validate::object(&object) {
        Ok(()) => Ok(object),
        Err(errors) => {
            let fresh = stand_in_of(&object);
            Err((errors, fresh))
        }
    }
}

/// Validates what changed among `objects` (by resourceVersion, and for local pods by
/// cgroup) into `validated`, and records every name seen in `live`. `decode` gives the
/// store's object of one with its cgroup.
fn add<K: Resource + Clone>(
    validated: &mut BTreeMap<ObjectRef, Validated>,
    live: &mut BTreeSet<ObjectRef>,
    kind: Kind,
    objects: Vec<Arc<K>>,
    mut cgroup_of: impl FnMut(&K) -> Option<PathBuf>,
    mut decode: impl FnMut(Arc<K>, Option<&Path>) -> Decoded,
) {
    for obj in objects {
        let obj = without_rejected_mark(obj);
        let meta = obj.meta();
        let object_ref = ObjectRef::new(
            kind,
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let rv = meta.resource_version.clone();
        let uid = meta.uid.clone();
        live.insert(object_ref.clone());
        let cgroup = cgroup_of(&obj);
        if let Some(v) = validated.get(&object_ref)
            && rv.is_some()
            && v.resource_version == rv
            && v.uid == uid
            && v.cgroup == cgroup
        {
            continue;
        }
        let decoded = decode(obj, cgroup.as_deref());
        let entry = validated
            .entry(object_ref.clone())
            .or_insert_with(|| Validated {
                uid: uid.clone(),
                resource_version: None,
                cgroup: None,
                good: None,
                rejected_version: None,
                rejection: None,
            });
        if entry.uid != uid {
            entry.uid = uid;
            entry.good = None;
            entry.rejected_version = None;
        }
        entry.resource_version = rv;
        entry.cgroup = cgroup;
        match decoded {
            Ok(object) => {
                entry.good = Some(object);
                entry.rejected_version = None;
                entry.rejection = None;
            }
            Err((errors, fresh)) => {
                keep_or_stand_in(entry, &object_ref, fresh);
                entry.rejection = Some(Rejection {
                    location: None,
                    object: Some(object_ref),
                    errors,
                });
            }
        }
    }
}

/// What the store holds for a rejected version (`store::stand_in`): for a pod, the stand-in of
/// this version (`fresh`: its labels may have changed to revoke what peers allowed it); for a
/// policy, its last version without rules beside the stand-in of this one, so that what either
/// selects is isolated and nothing either allowed stays allowed; other kinds keep their last
/// good version.
fn keep_or_stand_in(entry: &mut Validated, object_ref: &ObjectRef, fresh: Option<Object>) {
    let prev = entry.good.take();
    let kept = prev.as_ref().and_then(store::stand_in::kept_beside);
    entry.good = match (prev, fresh) {
        (Some(_), Some(fresh)) if kept.is_some() => {
            entry.rejected_version = Some(store::stand_in::beside(object_ref, fresh));
            kept
        }
        // Kinds without a stand-in (Services, EndpointSlices, Namespaces) keep their last
        // good version.
        (prev, None) => prev,
        (_, fresh) => fresh,
    };
}

/// The store's stand-in for a rejected object ([`store::stand_in`]).
fn stand_in_of(object: &Object) -> Option<Object> {
    let value = match object {
        Object::Pod(p) => serde_json::to_value(p.as_ref()),
        Object::NetworkPolicy(p) => serde_json::to_value(p.as_ref()),
        Object::PeerAuthentication(p) => serde_json::to_value(p.as_ref()),
        Object::AuthorizationPolicy(p) => serde_json::to_value(p.as_ref()),
        Object::Namespace(_)
        | Object::Service(_)
        | Object::EndpointSlice(_)
        | Object::DestinationRule(_) => return None,
    };
    let value = value.ok()?;
    let namespace = value["metadata"]["namespace"].as_str().unwrap_or_default();
    store::stand_in::stand_in(object.kind(), &value, namespace)
}

/// The cgroup of a pod of this node (relative to the cgroup root): found, or where the
/// kubelet will create it. None for pods of other nodes and host-network pods (they share
/// the node's network; NetworkPolicy does not apply to them).
fn local_cgroup(
    node_name: &str,
    cgroups: &mut Cgroups,
    pod: &Pod,
    uids: &BTreeSet<String>,
) -> Option<PathBuf> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node_name)
        || spec.host_network == Some(true)
        || crate::store::object::is_finished(pod)
    {
        // A finished pod's cgroup is gone; nothing of it runs to enforce on.
        return None;
    }
    Some(cgroups.resolve(
        cgroup_uid(pod, uids)?,
        crate::cgroup::pods::QosClass::of(pod),
    ))
}

/// The UID the kubelet names a pod's cgroup after: for the mirror of a static pod, the
/// static pod's (its config hash, in the `kubernetes.io/config.mirror` annotation), not the
/// mirror object's own.
///
/// Anyone who can create a pod can write that annotation, so it is followed only on a pod
/// the kubelet made: one owned by its Node. Even a forged owner gains nothing: two pods
/// resolving to one cgroup are both isolated (compile's shared-cgroup quarantine).
fn cgroup_uid<'p>(pod: &'p Pod, api_uids: &BTreeSet<String>) -> Option<&'p str> {
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .filter(|hash| owned_by_its_node(pod) && !api_uids.contains(*hash));
    mirror.or(pod.metadata.uid.as_ref()).map(String::as_str)
}

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Whether the pod's controller is the Node it runs on, as the kubelet sets on mirror pods.
fn owned_by_its_node(pod: &Pod) -> bool {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    pod.metadata.owner_references.iter().flatten().any(|o| {
        o.api_version == "v1"
            && o.kind == "Node"
            && Some(o.name.as_str()) == node
            && o.controller == Some(true)
    })
}

/// The pod as the store holds it: without weft's annotations from the API (they would choose
/// what weft enforces on; the stand-in mark is gone already: `without_rejected_mark`), with
/// the cgroup this node found for it.
fn bind_cgroup(pod: Arc<Pod>, cgroup: Option<&Path>) -> Arc<Pod> {
    let has = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(CGROUP_ANNOTATION) || a.contains_key(NETNS_ANNOTATION));
    if !has && cgroup.is_none() {
        return pod;
    }
    let mut pod = Arc::unwrap_or_clone(pod);
    let annotations = pod.metadata.annotations.get_or_insert_default();
    annotations.remove(CGROUP_ANNOTATION);
    annotations.remove(NETNS_ANNOTATION);
    if let Some(path) = cgroup {
        annotations.insert(
            CGROUP_ANNOTATION.to_owned(),
            path.to_string_lossy().into_owned(),
        );
    }
    Arc::new(pod)
}

#[cfg(test)]
mod tests;
