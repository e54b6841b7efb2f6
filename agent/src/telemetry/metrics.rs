//! Connection metrics with Istio's names and labels (istio/ztunnel src/proxy/metrics.rs), so
//! Istio's and Kiali's dashboards work on weft's series.
//!
//! Istio's byte counters are seen from the destination: `received` is the request (client to
//! server) and `sent` the response (server to client), whichever end reports.
use std::{fmt::Write as _, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::names::{Directory, Peer, ServiceName, UNKNOWN};
use crate::conntrack::{Direction, DropReason, Outcome};

/// How finely connection series are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Per pair of workloads (and service): Istio's default.
    #[default]
    Workload,
    /// Adds `source_pod` and `destination_pod`.
    Pod,
    /// Adds the addresses and ports of each connection too: one series per connection,
    /// removed a while after it closes. For debugging only.
    Connection,
}

/// Which end reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// What finer granularities add to the labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Detail {
    None,
    Pod {
        source: Arc<str>,
        destination: Arc<str>,
    },
    Connection {
        source: Arc<str>,
        destination: Arc<str>,
        source_address: Arc<str>,
        destination_address: Arc<str>,
    },
}

/// The labels of one connection series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnLabels {
    pub reporter: Reporter,
    /// `tcp` or `udp` (Istio's `request_protocol`).
    pub protocol: &'static str,
    pub source: Option<Arc<Peer>>,
    pub destination: Option<Arc<Peer>>,
    pub service: Option<Arc<ServiceName>>,
    pub cluster: Arc<str>,
    pub detail: Detail,
}

impl ConnLabels {
    /// Whether every workload (and pod, at pod granularity) the labels name still exists
    /// with these names.
    pub fn is_current(&self, dir: &Directory) -> bool {
        let peers_current = [&self.source, &self.destination]
            .into_iter()
            .flatten()
            .all(|p| dir.is_current(p));
        let pods_current = match &self.detail {
            Detail::Pod {
                source,
                destination,
            }
            | Detail::Connection {
                source,
                destination,
                ..
            } => {
                let exists = |peer: &Option<Arc<Peer>>, pod: &str| {
                    peer.as_ref().is_none_or(|p| dir.has_pod(&p.namespace, pod))
                };
                exists(&self.source, source) && exists(&self.destination, destination)
            }
            Detail::None => true,
        };
        let service_current = self.service.as_ref().is_none_or(|s| dir.has_service(s));
        peers_current && pods_current && service_current
    }
}

fn put(encoder: &mut LabelSetEncoder, key: &str, value: &str) -> Result<(), std::fmt::Error> {
    (key, value).encode(encoder.encode_label())
}

fn peer_labels(
    encoder: &mut LabelSetEncoder,
    side: &str,
    peer: Option<&Peer>,
    cluster: &str,
) -> Result<(), std::fmt::Error> {
    let v = |f: fn(&Peer) -> &str| peer.map_or(UNKNOWN, f);
    let mut key = String::with_capacity(40);
    let mut field = |name: &str, value: &str, enc: &mut LabelSetEncoder| {
        key.clear();
        let _ = write!(key, "{side}_{name}");
        put(enc, &key, value)
    };
    field("workload", v(|p| &p.workload), encoder)?;
    field("workload_namespace", v(|p| &p.namespace), encoder)?;
    // No mutual TLS: there is no authenticated principal.
    field("principal", UNKNOWN, encoder)?;
    field("app", v(|p| &p.app), encoder)?;
    field("version", v(|p| &p.version), encoder)?;
    field("canonical_service", v(|p| &p.canonical_service), encoder)?;
    field("canonical_revision", v(|p| &p.canonical_revision), encoder)?;
    field(
        "cluster",
        if peer.is_some() { cluster } else { UNKNOWN },
        encoder,
    )
}

impl EncodeLabelSet for ConnLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        put(e, "reporter", self.reporter.as_str())?;
        peer_labels(e, "source", self.source.as_deref(), &self.cluster)?;
        peer_labels(e, "destination", self.destination.as_deref(), &self.cluster)?;
        let svc = self.service.as_deref();
        put(e, "destination_service", svc.map_or(UNKNOWN, |s| &s.host))?;
        put(
            e,
            "destination_service_name",
            svc.map_or(UNKNOWN, |s| &s.name),
        )?;
        put(
            e,
            "destination_service_namespace",
            svc.map_or(UNKNOWN, |s| &s.namespace),
        )?;
        put(e, "request_protocol", self.protocol)?;
        put(e, "response_flags", "-")?;
        put(e, "connection_security_policy", UNKNOWN)?;
        match &self.detail {
            Detail::None => {}
            Detail::Pod {
                source,
                destination,
            } => {
                put(e, "source_pod", source)?;
                put(e, "destination_pod", destination)?;
            }
            Detail::Connection {
                source,
                destination,
                source_address,
                destination_address,
            } => {
                put(e, "source_pod", source)?;
                put(e, "destination_pod", destination)?;
                put(e, "source_address", source_address)?;
                put(e, "destination_address", destination_address)?;
            }
        }
        Ok(())
    }
}

/// Connection labels plus how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClosedLabels {
    pub conn: ConnLabels,
    pub outcome: Outcome,
}

impl EncodeLabelSet for ClosedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.conn.encode(encoder)?;
        put(encoder, "outcome", self.outcome.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DropLabels {
    pub reason: &'static str,
    pub direction: &'static str,
    pub protocol: &'static str,
}

impl DropLabels {
    pub fn new(reason: DropReason, direction: Direction, protocol: &'static str) -> Self {
        Self {
            reason: reason.as_str(),
            direction: direction.as_str(),
            protocol,
        }
    }
}

/// The handles of one connection series, looked up once per connection.
#[derive(Debug)]
pub struct Series {
    pub opened: Counter,
    /// Indexed like `Outcome::ALL`.
    pub closed: [Counter; 4],
    /// Server to client.
    pub response_bytes: Counter,
    /// Client to server.
    pub request_bytes: Counter,
    pub retransmits: Counter,
    pub rtt: Histogram,
}

/// Every telemetry metric.
#[derive(Debug, Clone)]
pub struct TelemetryMetrics {
    opened: Family<ConnLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    retransmits: Family<ConnLabels, Counter>,
    rtt: Family<ConnLabels, Histogram, fn() -> Histogram>,
    /// Drop events by reason (per event; `weft_drops_total` counts in the kernel).
    pub denied: Family<DropLabels, Counter>,
    pub open_connections: Gauge,
    pub flow_records_lost: Counter,
    pub events: Family<EventLabels, Counter>,
    pub udp: super::udp::UdpMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

/// RTT buckets in seconds: 50 µs (same node) to 1 s.
const RTT_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
];

fn rtt_histogram() -> Histogram {
    Histogram::new(RTT_BUCKETS)
}

impl TelemetryMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            retransmits: Family::default(),
            rtt: Family::new_with_constructor(rtt_histogram as fn() -> Histogram),
            denied: Family::default(),
            open_connections: Gauge::default(),
            flow_records_lost: Counter::default(),
            events: Family::default(),
            udp: super::udp::UdpMetrics::default(),
        };
        registry.register(
            "weft_tcp_connections_opened",
            "TCP connections opened (reached ESTABLISHED), by workload pair",
            m.opened.clone(),
        );
        registry.register(
            "weft_tcp_connections_closed",
            "TCP connections closed, by workload pair and outcome (normal, reset, refused, timeout)",
            m.closed.clone(),
        );
        registry.register(
            "weft_tcp_sent_bytes",
            "Payload bytes the destination sent (the response), acknowledged by the peer",
            m.sent.clone(),
        );
        registry.register(
            "weft_tcp_received_bytes",
            "Payload bytes the destination received (the request)",
            m.received.clone(),
        );
        registry.register(
            "weft_tcp_retransmits",
            "TCP segments retransmitted by the reporting end",
            m.retransmits.clone(),
        );
        registry.register_with_unit(
            "weft_tcp_rtt",
            "Smoothed RTT of the reporting end, sampled at every update and at close",
            prometheus_client::registry::Unit::Seconds,
            m.rtt.clone(),
        );
        registry.register(
            "weft_dropped_flows",
            "Connections and packets the datapath dropped, as reported by events (by reason)",
            m.denied.clone(),
        );
        registry.register(
            "weft_tcp_open_connections",
            "TCP connections open now, as far as events tell",
            m.open_connections.clone(),
        );
        registry.register(
            "weft_flow_records_lost",
            "Flow records a slow reader of the flow stream did not get",
            m.flow_records_lost.clone(),
        );
        registry.register(
            "weft_conn_events",
            "Connection events read from the kernel, by kind",
            m.events.clone(),
        );
        m.udp.register(registry);
        m
    }

    pub fn series(&self, labels: &ConnLabels) -> Series {
        Series {
            opened: self.opened.get_or_create(labels).clone(),
            closed: Outcome::ALL.map(|outcome| {
                self.closed
                    .get_or_create(&ClosedLabels {
                        conn: labels.clone(),
                        outcome,
                    })
                    .clone()
            }),
            response_bytes: self.sent.get_or_create(labels).clone(),
            request_bytes: self.received.get_or_create(labels).clone(),
            retransmits: self.retransmits.get_or_create(labels).clone(),
            rtt: self.rtt.get_or_create(labels).clone(),
        }
    }

    /// Removes every series of `labels`.
    pub fn remove(&self, labels: &ConnLabels) {
        self.opened.remove(labels);
        for outcome in Outcome::ALL {
            self.closed.remove(&ClosedLabels {
                conn: labels.clone(),
                outcome,
            });
        }
        self.sent.remove(labels);
        self.received.remove(labels);
        self.retransmits.remove(labels);
        self.rtt.remove(labels);
    }
}
