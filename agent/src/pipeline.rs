//! The pipeline: source → store → compile → sync, run by the agent on every change, for
//! services (this file) and NetworkPolicy ([`policy`]).
pub mod offline;
pub mod policy;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use serde::Serialize;
use weft_abi::{maps, svc::ServiceKey};

use self::policy::PolicyStage;
use crate::{
    compile::{self, Problem},
    metrics::{KindLabels, MapLabels, Metrics, ReasonLabels, StageLabels},
    source::{Rejection, Source},
    store::Store,
    sync::{self, Capacity, SyncError, Syncer, kernel::KernelMaps},
    telemetry::{
        DirectoryHandle,
        names::{Directory, NameConfig},
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

/// The Service a frontend belongs to, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendName {
    pub service: String,
    pub port_name: String,
}

/// What `weft status` shows about services and their source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The first full sync is done.
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

/// Owns the source and the syncers.
#[derive(Debug)]
pub struct Pipeline {
    source: Option<Source>,
    syncer: Syncer<KernelMaps>,
    policy: PolicyStage,
    capacity: Capacity,
    metrics: Arc<Metrics>,
    status: Arc<RwLock<Status>>,
    /// The store of the last pass, for policy passes that need no new read; shared with the
    /// admin API (`GET /config/dump`).
    last_store: Arc<Store>,
    store_handle: StoreHandle,
    /// Where telemetry reads the names of addresses, rebuilt after every pass.
    names: Option<(DirectoryHandle, NameConfig)>,
}

impl Pipeline {
    pub fn new(
        source: Option<Source>,
        maps: KernelMaps,
        capacity: Capacity,
        policy: PolicyStage,
        metrics: Arc<Metrics>,
        status: Arc<RwLock<Status>>,
    ) -> Result<Self, Error> {
        let syncer = Syncer::new(maps, capacity, Instant::now())?;
        for (map, cap) in [
            (maps::SERVICES, capacity.services),
            (maps::BACKEND_SLOTS, capacity.slots),
            (maps::MEMBERS, capacity.members),
        ] {
            metrics
                .map_capacity
                .get_or_create(&map_label(map))
                .set(i64::from(cap));
        }
        // Known before the first pass: an agent waiting for its first list says what for.
        status.write().unwrap_or_else(|e| e.into_inner()).source =
            source.as_ref().map(Source::describe);
        Ok(Self {
            source,
            syncer,
            policy,
            capacity,
            metrics,
            status,
            last_store: Arc::default(),
            store_handle: Arc::default(),
            names: None,
        })
    }

    /// Publishes the names of addresses (pods, services) to telemetry after every pass.
    pub fn with_names(mut self, handle: DirectoryHandle, config: NameConfig) -> Self {
        self.names = Some((handle, config));
        self
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

    /// Reads the source when it changed (or `force`): the store and the rejections, and
    /// whether a file was still changing. No store: nothing to apply (unchanged, or the
    /// Kubernetes source has not listed every kind yet: a partial store must not replace the
    /// kernel's state).
    #[expect(clippy::type_complexity, reason = "private; named by its doc")]
    fn read(&mut self, force: bool) -> Result<(Option<(Store, Vec<Rejection>)>, bool), Error> {
        match &mut self.source {
            None => Ok((force.then(|| (Store::default(), Vec::new())), false)),
            Some(Source::Dir(dir)) => {
                let rescan = dir.rescan(force)?;
                if !(force || rescan.changed) {
                    return Ok((None, rescan.unsettled));
                }
                let (objects, rejections) = dir.objects();
                Ok((
                    Some((Store::from_objects(objects), rejections)),
                    rescan.unsettled,
                ))
            }
            Some(Source::Kubernetes(kube)) => {
                if !(kube.changed() || force) {
                    return Ok((None, false));
                }
                Ok((kube.snapshot(), false))
            }
        }
    }

    /// Re-reads the source and applies what changed. `force` re-reads every file and
    /// recompiles and syncs even when nothing changed (the first pass, and periodic safety
    /// passes). Returns true when a file was still changing: call again shortly.
    pub fn refresh(&mut self, force: bool) -> Result<bool, Error> {
        let started = Instant::now();
        let (read, unsettled) = self.read(force)?;
        let Some((store, rejections)) = read else {
            self.syncer.collect_garbage(started);
            return Ok(unsettled);
        };
        let compile_started = Instant::now();
        let desired = compile::services(&store);
        self.metrics
            .compile_duration
            .get_or_create(&StageLabels { stage: "services" })
            .observe(compile_started.elapsed().as_secs_f64());
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

        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        for r in rejections.iter().filter(|r| !status.rejections.contains(r)) {
            let kind = r.object.as_ref().map_or("unknown", |o| o.kind.as_str());
            self.metrics
                .config_rejections
                .get_or_create(&KindLabels { kind: kind.into() })
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
            self.metrics
                .sync_errors
                .get_or_create(&ReasonLabels {
                    reason: reason(&e.message).into(),
                })
                .inc();
            tracing::error!(target: "weft::sync", service = e.service, frontend = e.frontend, error = e.message, "service change not applied");
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
        self.metrics
            .config_rejected_documents
            .set(rejections.len() as i64);
        let (svc, slots, members) = self.syncer.usage();
        self.metrics.service_frontends.set(svc as i64);
        for (map, used) in [
            (maps::SERVICES, svc),
            (maps::BACKEND_SLOTS, slots),
            (maps::MEMBERS, members),
        ] {
            self.metrics
                .map_entries
                .get_or_create(&map_label(map))
                .set(used as i64);
        }
        status.ready = true;
        status.objects = store.counts();
        status.rejections = rejections;
        status.problems = desired.problems;
        status.sync_errors = report.errors;
        status.frontends = svc as usize;
        status.names = desired
            .frontends
            .iter()
            .map(|(k, f)| {
                (
                    *k,
                    FrontendName {
                        service: f.service.clone(),
                        port_name: f.port_name.clone(),
                    },
                )
            })
            .collect();
        status.last_sync_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_millis());
        drop(status);
        if let Some((handle, config)) = &self.names {
            let names_started = Instant::now();
            let dir = Arc::new(Directory::build(&store, &desired.frontends, config));
            *handle.write().unwrap_or_else(|e| e.into_inner()) = dir;
            self.metrics
                .compile_duration
                .get_or_create(&StageLabels { stage: "names" })
                .observe(names_started.elapsed().as_secs_f64());
        }
        self.last_store = Arc::new(store);
        *self.store_handle.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::clone(&self.last_store);
        Ok(unsettled)
    }

    /// `dir:PATH` or `kubernetes:SERVER (node NAME)`, for logs.
    pub fn source_name(&self) -> Option<String> {
        self.source.as_ref().map(Source::describe)
    }

    /// The store of the last pass, as the admin API reads it.
    pub fn store_handle(&self) -> StoreHandle {
        Arc::clone(&self.store_handle)
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Frees backend slots whose grace period is over, and enforces policy for pods whose
    /// cgroup has appeared since the last pass.
    pub fn collect_garbage(&mut self) {
        if let Some(Source::Kubernetes(kube)) = &mut self.source
            && kube.cgroups_appeared()
        {
            // The pods get their real cgroup paths: a pass like any other change (it
            // collects the syncer's garbage too).
            if let Err(e) = self.refresh(false) {
                tracing::error!(target: "weft::sync", error = %crate::chain(&e), "cannot apply the source; the previous state stays in force");
            }
            return;
        }
        self.syncer.collect_garbage(Instant::now());
        if self.policy.cgroups_appeared() {
            let (written, deleted) = self.policy.run(&self.last_store, &self.metrics);
            tracing::info!(target: "weft::sync", written, deleted, "policies synced for cgroups that appeared");
        }
    }
}

fn map_label(map: &str) -> MapLabels {
    MapLabels {
        map_name: map.to_owned(),
    }
}

/// A metric label for a sync error message.
fn reason(message: &str) -> &'static str {
    if message.contains("is full") {
        "map_full"
    } else {
        "map_write"
    }
}
