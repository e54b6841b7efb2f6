//! The agent's Prometheus metrics (prometheus-client, typed label sets), served by the admin
//! API at /metrics.
pub mod process;
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
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
pub struct StageLabels {
    /// `services`, `policy` or `names`.
    pub stage: &'static str,
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
    /// Seconds to compile the store into desired datapath state, per stage (pure work, no
    /// syscalls).
    pub compile_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    /// Service frontends programmed in the kernel.
    pub service_frontends: Gauge,
    /// Entries in use and capacity per BPF map that sync manages.
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    /// entries / capacity for hash, LRU and LPM maps.
    pub map_fill: Family<MapLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            config_rejections: Family::default(),
            config_rejected_documents: Gauge::default(),
            sync_errors: Family::default(),
            sync_duration: duration_histogram(),
            compile_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            service_frontends: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_fill: Family::default(),
        };
        registry.register(
            "weft_build",
            "The agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
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
            "weft_compile_duration_seconds",
            "Time to compile the store into desired datapath state, by stage",
            m.compile_duration.clone(),
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
        registry.register(
            "weft_bpf_map_fill_ratio",
            "Entries in use over capacity of a BPF map (hash, LRU and LPM maps; counted every stats interval)",
            m.map_fill.clone(),
        );
        m
    }

    /// Publishes a count of every map's entries.
    pub fn set_map_usage(&self, usage: &[crate::datapath::MapUsage]) {
        for u in usage {
            let label = MapLabels {
                map_name: u.name.clone(),
            };
            self.map_capacity
                .get_or_create(&label)
                .set(i64::from(u.max_entries));
            if let Some(n) = u.entries {
                self.map_entries.get_or_create(&label).set(n as i64);
            }
            if let Some(r) = u.fill_ratio {
                self.map_fill.get_or_create(&label).set(r);
            }
        }
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// Encodes the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The exposition format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// OpenMetrics when the Accept header lists it (Prometheus does by default), else text.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The registry in `format`.
pub fn render(registry: &Registry, format: Format) -> String {
    let open = encode(registry);
    match format {
        Format::OpenMetrics => open,
        Format::Text => openmetrics_to_text(&open),
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: counters and info metrics are
/// described under their sample names (`_total`, `_info`), info becomes a gauge, and the
/// `# UNIT` and `# EOF` lines go.
pub fn openmetrics_to_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let open = "# HELP weft_x Things.\n# TYPE weft_x counter\nweft_x_total{a=\"b\"} 1\n\
                    # HELP weft_build The version.\n# TYPE weft_build info\nweft_build_info{version=\"1\"} 1\n\
                    # HELP weft_rtt_seconds RTT.\n# TYPE weft_rtt_seconds histogram\n# UNIT weft_rtt_seconds seconds\n\
                    weft_rtt_seconds_sum 0.5\n# EOF\n";
        let text = openmetrics_to_text(open);
        assert_eq!(
            text,
            "# HELP weft_x_total Things.\n# TYPE weft_x_total counter\nweft_x_total{a=\"b\"} 1\n\
             # HELP weft_build_info The version.\n# TYPE weft_build_info gauge\nweft_build_info{version=\"1\"} 1\n\
             # HELP weft_rtt_seconds RTT.\n# TYPE weft_rtt_seconds histogram\nweft_rtt_seconds_sum 0.5\n"
        );
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
    }
}
