//! The agent's Prometheus metrics (prometheus-client, typed label sets), served by the admin
//! API at /metrics.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The object kind, or "unknown" when the document could not be read that far.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map_name: String,
}

/// Every metric of the agent.
#[derive(Debug)]
pub struct Metrics {
    /// Documents rejected by a source, each time a version of a file is read.
    pub config_rejections: Family<KindLabels, Counter>,
    /// Documents currently rejected (their objects keep their last good version).
    pub config_rejected_documents: Gauge,
    /// Service changes that could not be applied (map full, map write failed).
    pub sync_errors: Family<ReasonLabels, Counter>,
    /// Seconds from a source change being read to the maps being written.
    pub sync_duration: Histogram,
    /// Service frontends programmed in the kernel.
    pub service_frontends: Gauge,
    /// Entries in use and capacity per BPF map that sync manages.
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            config_rejections: Family::default(),
            config_rejected_documents: Gauge::default(),
            sync_errors: Family::default(),
            sync_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            service_frontends: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
        };
        registry.register(
            "weft_config_rejections",
            "Documents rejected by a source (file, document, kind and field are in the logs and `weft status`)",
            m.config_rejections.clone(),
        );
        registry.register(
            "weft_config_rejected_documents",
            "Documents currently rejected; their objects keep their last good version",
            m.config_rejected_documents.clone(),
        );
        registry.register(
            "weft_sync_errors",
            "Service changes that could not be written to the kernel maps",
            m.sync_errors.clone(),
        );
        registry.register(
            "weft_sync_duration_seconds",
            "Time to compile the store and write the difference to the kernel maps",
            m.sync_duration.clone(),
        );
        registry.register(
            "weft_service_frontends",
            "Service frontends (ClusterIP, port, protocol) in the kernel",
            m.service_frontends.clone(),
        );
        registry.register(
            "weft_bpf_map_entries",
            "Entries in use in a BPF map managed by the agent",
            m.map_entries.clone(),
        );
        registry.register(
            "weft_bpf_map_capacity",
            "Capacity (max entries) of a BPF map managed by the agent",
            m.map_capacity.clone(),
        );
        m
    }
}

/// Encodes the registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
