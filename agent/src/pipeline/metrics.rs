//! The pipeline's metrics: rejected documents, sync errors by reason, compile and sync
//! durations, frontends in the kernel. Map pressure is the datapath's
//! ([`crate::datapath::metrics::MapMetrics`]), which the syncers keep current.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    compile::policy::Quarantine,
    datapath::metrics::MapMetrics,
    metrics::{duration_histogram, label_value},
    store::ObjectRef,
    sync::Reason,
};

/// A stage of a pass, by what it compiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Services,
    Policy,
    /// The names telemetry gives addresses.
    Names,
}

impl Stage {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Policy => "policy",
            Self::Names => "names",
        }
    }
}

label_value!(Stage);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The object kind, or "unknown" when the document could not be read that far.
    pub kind: &'static str,
}

impl KindLabels {
    pub fn of(object: Option<&ObjectRef>) -> Self {
        Self {
            kind: object.map_or("unknown", |o| o.kind.as_str()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: Reason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: Stage,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuarantineLabels {
    pub reason: Quarantine,
}

/// A map and the flag that sizes it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapFlagLabels {
    pub map: &'static str,
    pub flag: String,
}

/// Every metric of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    /// Documents rejected by a source, each time a version of a file is read.
    pub config_rejections: Family<KindLabels, Counter>,
    /// Documents currently rejected (their objects keep their last good version).
    pub config_rejected_documents: Gauge,
    /// Changes that could not be applied (map full, map write failed).
    pub sync_errors: Family<ReasonLabels, Counter>,
    /// Seconds from a source change being read to the maps being written.
    pub sync_duration: Histogram,
    /// Seconds to compile the store into desired datapath state, per stage (pure work, no
    /// syscalls).
    pub compile_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// Service frontends programmed in the kernel.
    pub service_frontends: Gauge,
    /// Entries and capacity of the maps the syncers write.
    pub maps: MapMetrics,
    /// Local pods isolated both ways by weft, by why.
    pub quarantined_pods: Family<QuarantineLabels, Gauge>,
    /// What the last pass could not hold, by map (and the flag that raises it): policies
    /// dropped for `IPCACHE`, sets and endpoints left out.
    pub over_capacity: Family<MapFlagLabels, Gauge>,
    /// Pod addresses several live pods claim (`compile::addresses`).
    pub contested_addresses: Gauge,
}

impl PipelineMetrics {
    pub fn new(registry: &mut Registry, maps: MapMetrics) -> Self {
        let m = Self {
            config_rejections: Family::default(),
            config_rejected_documents: Gauge::default(),
            sync_errors: Family::default(),
            sync_duration: duration_histogram(),
            compile_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            service_frontends: Gauge::default(),
            maps,
            quarantined_pods: Family::default(),
            over_capacity: Family::default(),
            contested_addresses: Gauge::default(),
        };
        registry.register(
            "policy_quarantined_pods",
            "Local pods isolated both ways because weft cannot read them or tell which policies apply (`weft policies`)",
            m.quarantined_pods.clone(),
        );
        registry.register(
            "policy_over_capacity",
            "Objects the last pass could not hold, by map and the flag that raises it: policies whose ipBlocks do not fit (isolating what they select), policy sets and endpoints left out",
            m.over_capacity.clone(),
        );
        registry.register(
            "policy_contested_addresses",
            "Pod addresses several pods claim, with no single one of them not being deleted: traffic from and to them matches no podSelector, namespaceSelector or ipBlock until one claimant is left (`weft policies`)",
            m.contested_addresses.clone(),
        );
        registry.register(
            "config_rejections",
            "Documents rejected by a source (file, document, kind and field are in the logs and `weft status`)",
            m.config_rejections.clone(),
        );
        registry.register(
            "config_rejected_documents",
            "Documents currently rejected; their objects keep their last good version",
            m.config_rejected_documents.clone(),
        );
        // Every reason from 0: an alert on `increase()` sees the first error (a series born
        // at 1 has no increase).
        for reason in Reason::ALL {
            let _ = m.sync_errors.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "sync_errors",
            "Changes that could not be written to the kernel maps, by reason",
            m.sync_errors.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time to compile the store and write the difference to the kernel maps",
            m.sync_duration.clone(),
        );
        registry.register(
            "compile_duration_seconds",
            "Time to compile the store into desired datapath state, by stage",
            m.compile_duration.clone(),
        );
        registry.register(
            "service_frontends",
            "Service frontends (ClusterIP, port, protocol) in the kernel",
            m.service_frontends.clone(),
        );
        m
    }

    /// Times one compile stage.
    pub fn time<T>(&self, stage: Stage, work: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let out = work();
        self.compile_duration
            .get_or_create(&StageLabels { stage })
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// Publishes the quarantined pods and what did not fit after a policy pass.
    pub fn policy_state(
        &self,
        quarantined: &[Quarantine],
        over: &[(&'static str, u64)],
        contested: usize,
    ) {
        self.contested_addresses.set(contested as i64);
        for reason in [Quarantine::Unreadable, Quarantine::SharedCgroup] {
            let n = quarantined.iter().filter(|q| **q == reason).count();
            self.quarantined_pods
                .get_or_create(&QuarantineLabels { reason })
                .set(n as i64);
        }
        for map in [
            weft_abi::maps::ENDPOINTS,
            weft_abi::maps::IPCACHE,
            weft_abi::maps::POLICY,
            weft_abi::maps::AUTHZ,
        ] {
            let n: u64 = over.iter().filter(|(m, _)| *m == map).map(|(_, n)| n).sum();
            let labels = MapFlagLabels {
                map,
                flag: crate::datapath::map_flag(map).unwrap_or_default(),
            };
            self.over_capacity.get_or_create(&labels).set(n as i64);
        }
    }

    pub fn sync_error(&self, reason: Reason) {
        self.sync_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}
