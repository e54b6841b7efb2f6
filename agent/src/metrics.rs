//! The agent's Prometheus registry and exposition: every subsystem registers its own metrics
//! (its `metrics.rs`, typed label sets) under one sub-registry with the `weft` prefix;
//! process metrics keep their standard names. Served by the admin API at /metrics.
pub mod process;

/// Makes enums with an `as_str` Prometheus label values, in that one spelling.
macro_rules! label_value {
    ($($t:ty),* $(,)?) => {$(
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
pub(crate) use label_value;

use prometheus_client::{metrics::histogram::Histogram, metrics::info::Info, registry::Registry};

/// The agent's registry, with the process metrics at its root (their standard names).
pub fn registry() -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(process::ProcessCollector));
    root
}

/// The `weft` sub-registry of `root`, with build info: call once, and register every
/// subsystem's metrics into it (names there carry no prefix).
pub fn weft(root: &mut Registry) -> &mut Registry {
    let weft = root.sub_registry_with_prefix("weft");
    weft.register(
        "build",
        "The agent's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    weft
}

/// Buckets of the histograms of work the agent does (compile, sync): 0.5 ms to 1 s.
pub fn duration_histogram() -> Histogram {
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
