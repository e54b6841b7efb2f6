//! The pipeline: source → store → compile → sync, run by the agent on every change, for
//! services (this file) and NetworkPolicy ([`policy`]); [`schedule`] decides when.
//!
//! Generic over the maps it writes, like the syncers: the agent runs it on the kernel's maps,
//! the unit tests on in-memory ones.
pub mod metrics;
pub mod offline;
pub mod policy;
pub mod schedule;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use serde::Serialize;
use weft_abi::{maps, svc::ServiceKey};

use self::{
    metrics::{KindLabels, PipelineMetrics, Stage},
    policy::{NodeIps, PolicyStage, PolicyStatus},
};
use crate::{
    compile::{
        self, Problem, ServiceSettings, Services,
        names::{Directory, DirectoryHandle, NameConfig},
        outlier::OutlierDefault,
    },
    datapath::Capacities,
    source::{Rejection, Source},
    store::Store,
    sync::{
        self, Capacity, ServiceMaps, SyncError, Syncer,
        kernel::KernelMaps,
        policy::{PolicyCapacity, PolicyMaps, kernel::KernelPolicyMaps},
    },
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] crate::source::dir::Error),
    #[error(transparent)]
    Sync(#[from] sync::Error),
}

/// The pipeline's flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// The node's own addresses (ingress from them is always allowed, for kubelet probes);
    /// repeat for several [default: the addresses of the agent's network namespace].
    #[arg(long = "node-ip")]
    pub node_ips: Vec<IpAddr>,
    /// The namespace of mesh-wide PeerAuthentications and AuthorizationPolicies (Istio's root
    /// namespace).
    #[arg(long, default_value = "istio-system")]
    pub mesh_root_namespace: String,
    /// Passive health checking of Services' TCP backends that no DestinationRule's
    /// outlierDetection configures: off, on (Envoy's defaults), or outlierDetection's
    /// fields, e.g. consecutive5xxErrors=3,baseEjectionTime=10s,maxEjectionPercent=50.
    #[arg(long, default_value = "off")]
    pub outlier_detection_default: OutlierDefault,
    #[command(flatten)]
    pub names: NameConfig,
}

impl Settings {
    /// What services compile with.
    pub fn service_settings(&self) -> ServiceSettings {
        ServiceSettings {
            outlier_default: self.outlier_detection_default.clone(),
            mesh_root: self.mesh_root_namespace.clone(),
            cluster_domain: self.names.cluster_domain.clone(),
        }
    }
}

/// The Service a frontend belongs to, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendName {
    pub service: String,
    pub port_name: String,
}

/// What `weft status` shows about services and their source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The first full sync is done (and the programs are attached).
    pub ready: bool,
    /// `dir:PATH`, `kubernetes:SERVER (node NAME)`, or none.
    pub source: Option<String>,
    pub objects: BTreeMap<&'static str, usize>,
    pub rejections: Vec<Rejection>,
    pub problems: Vec<Problem>,
    pub sync_errors: Vec<SyncError>,
    pub frontends: usize,
    #[serde(skip)]
    pub names: BTreeMap<ServiceKey, FrontendName>,
    /// Unix time in milliseconds of the last compile and sync (after a change, or a forced
    /// resync).
    pub last_sync_unix_ms: Option<u128>,
}

/// The store of the pipeline's last pass.
pub type StoreHandle = Arc<RwLock<Arc<Store>>>;

/// What the pipeline publishes after every pass, for the admin API and telemetry.
#[derive(Debug, Clone, Default)]
pub struct Views {
    pub status: Arc<RwLock<Status>>,
    pub policy: Arc<RwLock<PolicyStatus>>,
    /// The store of the last pass (`GET /config/dump`).
    pub store: StoreHandle,
    /// The names telemetry gives addresses.
    pub directory: DirectoryHandle,
}

/// Owns the source and the syncers.
#[derive(Debug)]
pub struct Pipeline<S = KernelMaps, P = KernelPolicyMaps> {
    source: Option<Source>,
    syncer: Syncer<S>,
    policy: PolicyStage<P>,
    metrics: PipelineMetrics,
    names: NameConfig,
    service_settings: ServiceSettings,
    views: Views,
    /// The store of the last pass, for policy passes that need no new read.
    last_store: Arc<Store>,
    /// A pass has published its state.
    synced: bool,
    /// Readiness waits for the caller (the programs are attached after the first pass).
    held: bool,
}

/// What one read of the source gave: the store and its rejections (None: nothing to apply),
/// and whether a file was still changing.
struct Read {
    store: Option<(Store, Vec<Rejection>)>,
    unsettled: bool,
}

impl<S: ServiceMaps, P: PolicyMaps> Pipeline<S, P> {
    pub fn new(
        source: Option<Source>,
        maps: (S, P),
        capacities: &Capacities,
        settings: &Settings,
        cgroup_root: &Path,
        host_netns: Option<&Path>,
        metrics: PipelineMetrics,
    ) -> Result<Self, Error> {
        let capacity = Capacity::from(capacities);
        let syncer = Syncer::new(maps.0, capacity, Instant::now())?;
        for (map, cap) in [
            (maps::SERVICES, capacity.services),
            (maps::BACKEND_SLOTS, capacity.slots),
            (maps::MEMBERS, capacity.members),
        ] {
            metrics.maps.set_capacity(map, cap);
        }
        let views = Views::default();
        // Known before the first pass: an agent waiting for its first list says what for.
        write(&views.status).source = source.as_ref().map(Source::describe);
        // Without --node-ip, the node's interfaces' addresses, followed as they change.
        let node_ips = if settings.node_ips.is_empty() {
            NodeIps::interfaces(host_netns)
        } else {
            NodeIps::Fixed(settings.node_ips.clone())
        };
        let policy = PolicyStage::new(
            maps.1,
            PolicyCapacity::from(capacities),
            cgroup_root,
            node_ips,
            &metrics,
            Arc::clone(&views.policy),
        )?
        .with_mesh_root(&settings.mesh_root_namespace);
        Ok(Self {
            source,
            syncer,
            policy,
            metrics,
            names: settings.names.clone(),
            service_settings: settings.service_settings(),
            views,
            last_store: Arc::default(),
            synced: false,
            held: false,
        })
    }

    /// Readiness waits for [`Pipeline::release_ready`] even after the first full sync.
    pub fn hold_ready(&mut self) {
        self.held = true;
    }

    /// Whether a full sync has been applied (in Kubernetes mode, with some pod on this node:
    /// a mistyped node name must not bind nothing and isolate every pod as not bound yet).
    pub fn synced(&self) -> bool {
        self.synced
            && match &self.source {
                Some(Source::Kubernetes(kube)) => kube.node_seen(),
                _ => true,
            }
    }

    /// Whether the last pass wrote everything it wanted (no service or policy write failed,
    /// nothing left out for lack of room).
    pub fn clean(&self) -> bool {
        read(&self.views.status).sync_errors.is_empty() && !self.policy.failed()
    }

    /// Ready from now on, once a full sync has been applied.
    pub fn release_ready(&mut self) {
        self.held = false;
        write(&self.views.status).ready = self.synced;
    }

    /// What the pipeline publishes (status, store, names).
    pub fn views(&self) -> Views {
        self.views.clone()
    }

    /// `dir:PATH` or `kubernetes:SERVER (node NAME)`, for logs.
    pub fn source_name(&self) -> Option<String> {
        self.source.as_ref().map(Source::describe)
    }

    /// Files the watcher saw completed (closed after writing, renamed into place): the next
    /// rescan reads them without waiting for them to settle.
    pub fn mark_complete(&mut self, paths: &[PathBuf]) {
        if let Some(Source::Dir(source)) = &mut self.source {
            for p in paths {
                source.mark_complete(p);
            }
        }
    }

    /// Reads the source when it changed (or `force`). No store: nothing to apply (unchanged,
    /// or the Kubernetes source has not listed every kind yet: a partial store must not
    /// replace the kernel's state).
    fn read(&mut self, force: bool) -> Result<Read, Error> {
        match &mut self.source {
            None => Ok(Read {
                store: force.then(|| (Store::default(), Vec::new())),
                unsettled: false,
            }),
            Some(Source::Dir(dir)) => {
                let rescan = dir.rescan(force)?;
                let store = (force || rescan.changed).then(|| {
                    let (objects, rejections) = dir.objects();
                    let mut store = Store::from_objects(objects);
                    if let Some(node) = dir.node() {
                        store.unbind_other_nodes(node);
                    }
                    (store, rejections)
                });
                Ok(Read {
                    store,
                    unsettled: rescan.unsettled,
                })
            }
            Some(Source::Kubernetes(kube)) => Ok(Read {
                store: (kube.changed() || force).then(|| kube.snapshot()).flatten(),
                unsettled: false,
            }),
        }
    }

    /// Re-reads the source and applies what changed. `force` re-reads every file and
    /// recompiles and syncs even when nothing changed (the first pass, and periodic safety
    /// passes). Returns true when a file was still changing: call again shortly.
    pub fn refresh(&mut self, force: bool) -> Result<bool, Error> {
        let started = Instant::now();
        let read = self.read(force)?;
        let Some((store, rejections)) = read.store else {
            self.syncer.collect_garbage(started);
            return Ok(read.unsettled);
        };
        let desired = self.metrics.time(Stage::Services, || {
            compile::services(&store, &self.service_settings)
        });
        let report = self.syncer.apply(&desired, started);
        let policy_started = Instant::now();
        let (written, deleted) = self.policy.run(&store, &self.metrics);
        if written + deleted > 0 {
            tracing::info!(
                target: "weft::sync",
                written,
                deleted,
                micros = policy_started.elapsed().as_micros() as u64,
                since_read_micros = started.elapsed().as_micros() as u64,
                "policies synced"
            );
        }
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.report(&desired, &report, &rejections, started);
        self.publish(store, desired, report.errors, rejections);
        Ok(read.unsettled)
    }

    /// Logs and counts what is new in this pass: rejections, compile problems, sync errors,
    /// and what changed in the kernel.
    fn report(
        &self,
        desired: &Services,
        report: &sync::Report,
        rejections: &[Rejection],
        started: Instant,
    ) {
        let status = read(&self.views.status);
        for r in rejections.iter().filter(|r| !status.rejections.contains(r)) {
            self.metrics
                .config_rejections
                .get_or_create(&KindLabels::of(r.object.as_ref()))
                .inc();
            tracing::warn!(target: "weft::source", rejection = %r, "document rejected; its object keeps its last good version");
        }
        for p in desired
            .problems
            .iter()
            .filter(|p| !status.problems.contains(p))
        {
            tracing::warn!(target: "weft::compile", service = p.service, problem = p.message, "service not fully programmed");
        }
        for e in &report.errors {
            self.metrics.sync_error(e.failure.reason);
            tracing::error!(target: "weft::sync", service = e.service, frontend = e.frontend, error = e.failure.message, "service change not applied");
        }
        if report.created + report.updated + report.deleted > 0 {
            tracing::info!(
                target: "weft::sync",
                created = report.created,
                updated = report.updated,
                deleted = report.deleted,
                frontends = desired.frontends.len(),
                micros = started.elapsed().as_micros() as u64,
                "services synced"
            );
        }
    }

    /// Publishes the pass: status, map usage, the names telemetry reads, and the store.
    fn publish(
        &mut self,
        store: Store,
        desired: Services,
        sync_errors: Vec<SyncError>,
        rejections: Vec<Rejection>,
    ) {
        self.metrics
            .config_rejected_documents
            .set(rejections.len() as i64);
        let (svc, slots, members) = self.syncer.usage();
        self.metrics.service_frontends.set(svc as i64);
        let usage = [
            (maps::SERVICES, svc),
            (maps::BACKEND_SLOTS, slots),
            (maps::MEMBERS, members),
        ];
        for (map, used) in usage {
            self.metrics.maps.set_entries(map, used);
        }
        let directory = self.metrics.time(Stage::Names, || {
            Directory::build(&store, &desired.frontends, &self.names)
        });
        *write(&self.views.directory) = Arc::new(directory);
        let mut status = write(&self.views.status);
        self.synced = true;
        *status = Status {
            ready: !self.held,
            source: status.source.take(),
            objects: store.counts(),
            rejections,
            sync_errors,
            frontends: svc as usize,
            names: frontend_names(&desired),
            problems: desired.problems,
            last_sync_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis()),
        };
        drop(status);
        self.last_store = Arc::new(store);
        *write(&self.views.store) = Arc::clone(&self.last_store);
    }

    /// Frees backend slots whose grace period is over, and enforces policy for pods whose
    /// cgroup has appeared since the last pass.
    pub fn collect_garbage(&mut self) {
        if let Some(Source::Kubernetes(kube)) = &mut self.source
            && kube.cgroups_appeared()
        {
            // A cgroup found elsewhere than the kubelet's rule said: the pod's path changes,
            // a pass like any other change (it collects the syncer's garbage too).
            if let Err(e) = self.refresh(false) {
                tracing::error!(target: "weft::sync", error = %crate::chain(&e), "cannot apply the source; the previous state stays in force");
            }
            return;
        }
        self.syncer.collect_garbage(Instant::now());
        let node_changed = self.policy.refresh_node_ips();
        let (written, deleted) = if node_changed || self.policy.failed() {
            self.policy.run(&self.last_store, &self.metrics)
        } else if self.policy.cgroups_appeared() {
            self.policy.bind_appeared(&self.last_store, &self.metrics)
        } else {
            return;
        };
        if written + deleted > 0 {
            tracing::info!(target: "weft::sync", written, deleted, node_changed, "policies synced again (node addresses changed, cgroups appeared, or the last pass left something out)");
        }
    }

    /// Where the local pods whose cgroup does not exist yet will have it (watched, so that
    /// [`Pipeline::collect_garbage`] binds them as soon as they appear).
    pub fn missing_cgroups(&self) -> Vec<PathBuf> {
        self.policy.missing_cgroups()
    }

    /// Resolves cgroup ids with `f` instead of the cgroup2 filesystem (tests use plain
    /// directories).
    #[cfg(test)]
    pub fn with_cgroup_ids(mut self, f: fn(&Path) -> Option<u64>) -> Self {
        self.policy.cgroup_id = f;
        self
    }

    /// The maps the syncers write (for tests).
    #[cfg(test)]
    pub fn maps(&self) -> (&S, &P) {
        (self.syncer.maps(), self.policy.maps())
    }
}

fn frontend_names(desired: &Services) -> BTreeMap<ServiceKey, FrontendName> {
    desired
        .frontends
        .iter()
        .map(|(k, f)| {
            let name = FrontendName {
                service: f.service.clone(),
                port_name: f.port_name.clone(),
            };
            (*k, name)
        })
        .collect()
}

/// A lock poisoned by a panicking reader still holds a consistent value (every writer
/// replaces it whole).
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
