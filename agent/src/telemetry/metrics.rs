//! Connection metrics with Istio's names and labels (istio/ztunnel src/proxy/metrics.rs), so
//! Istio's and Kiali's dashboards work on weft's series.
//!
//! Istio's byte counters are seen from the destination: `received` is the request (client to
//! server) and `sent` the response (server to client), whichever end reports.
use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use weft_abi::{conn::DropReason, net::Direction};

use super::flows::Reporter;
use crate::{
    compile::names::{Directory, Peer, ServiceName, UNKNOWN},
    events::Outcome,
    metrics::label_value,
};

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

/// Istio's `request_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// Istio's `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityPolicy {
    /// Not carried by the mesh.
    Unknown,
    /// Carried by a mutually authenticated tunnel.
    MutualTls,
}

impl SecurityPolicy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => UNKNOWN,
            Self::MutualTls => "mutual_tls",
        }
    }
}

label_value!(Protocol, SecurityPolicy, Reporter, Outcome);

/// Istio's value for anything unknown, shared by every label that has it.
static UNKNOWN_VALUE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));

fn unknown() -> Arc<str> {
    Arc::clone(&UNKNOWN_VALUE)
}

/// Whether a label value stands for "no pod, no Service" (not a namespace or Service that
/// happens to be named `unknown`): every such value is the one shared `unknown()`.
fn is_unknown(value: &Arc<str>) -> bool {
    Arc::ptr_eq(value, &UNKNOWN_VALUE)
}

/// One connection series' labels, in Istio's names and order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: Arc<str>,
    pub source_workload_namespace: Arc<str>,
    pub source_principal: Arc<str>,
    pub source_app: Arc<str>,
    pub source_version: Arc<str>,
    pub source_canonical_service: Arc<str>,
    pub source_canonical_revision: Arc<str>,
    pub source_cluster: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_workload_namespace: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_app: Arc<str>,
    pub destination_version: Arc<str>,
    pub destination_canonical_service: Arc<str>,
    pub destination_canonical_revision: Arc<str>,
    pub destination_cluster: Arc<str>,
    pub destination_service: Arc<str>,
    pub destination_service_name: Arc<str>,
    pub destination_service_namespace: Arc<str>,
    pub request_protocol: Protocol,
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
    #[prometheus(flatten)]
    pub detail: Detail,
}

/// A workload's label values (all `unknown` for an address no pod holds).
struct PeerValues {
    workload: Arc<str>,
    namespace: Arc<str>,
    app: Arc<str>,
    version: Arc<str>,
    canonical_service: Arc<str>,
    canonical_revision: Arc<str>,
    cluster: Arc<str>,
}

impl PeerValues {
    fn of(peer: Option<&Peer>, cluster: &Arc<str>) -> Self {
        let v = |f: fn(&Peer) -> &Arc<str>| peer.map_or_else(unknown, |p| Arc::clone(f(p)));
        Self {
            workload: v(|p| &p.workload),
            namespace: v(|p| &p.namespace),
            app: v(|p| &p.app),
            version: v(|p| &p.version),
            canonical_service: v(|p| &p.canonical_service),
            canonical_revision: v(|p| &p.canonical_revision),
            cluster: peer.map_or_else(unknown, |_| Arc::clone(cluster)),
        }
    }
}

/// The ends of a series: who reported, and the workloads and service it names.
#[derive(Debug, Clone, Copy)]
pub struct Ends<'a> {
    pub reporter: Reporter,
    pub protocol: Protocol,
    pub source: Option<&'a Peer>,
    pub destination: Option<&'a Peer>,
    pub service: Option<&'a ServiceName>,
    pub cluster: &'a Arc<str>,
    /// The verified identities of a connection the mesh carried.
    pub security: Option<&'a crate::events::Security>,
}

impl ConnLabels {
    pub fn new(ends: &Ends<'_>, detail: Detail) -> Self {
        let src = PeerValues::of(ends.source, ends.cluster);
        let dst = PeerValues::of(ends.destination, ends.cluster);
        let svc = |f: fn(&ServiceName) -> &Arc<str>| {
            ends.service.map_or_else(unknown, |s| Arc::clone(f(s)))
        };
        Self {
            reporter: ends.reporter,
            source_workload: src.workload,
            source_workload_namespace: src.namespace,
            // Principals only where the mesh verified them.
            source_principal: ends
                .security
                .map_or_else(unknown, |s| Arc::clone(&s.source_principal)),
            source_app: src.app,
            source_version: src.version,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_cluster: src.cluster,
            destination_workload: dst.workload,
            destination_workload_namespace: dst.namespace,
            destination_principal: ends
                .security
                .map_or_else(unknown, |s| Arc::clone(&s.destination_principal)),
            destination_app: dst.app,
            destination_version: dst.version,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_cluster: dst.cluster,
            destination_service: svc(|s| &s.host),
            destination_service_name: svc(|s| &s.name),
            destination_service_namespace: svc(|s| &s.namespace),
            request_protocol: ends.protocol,
            response_flags: "-",
            connection_security_policy: if ends.security.is_some() {
                SecurityPolicy::MutualTls
            } else {
                SecurityPolicy::Unknown
            },
            detail,
        }
    }

    /// Whether every workload (and pod, at pod granularity) and the service the labels name
    /// still exist with these names.
    pub fn is_current(&self, dir: &Directory) -> bool {
        let workload_current = |ns: &Arc<str>, values: [&Arc<str>; 5]| {
            is_unknown(ns)
                || dir.is_current(&Peer {
                    namespace: Arc::clone(ns),
                    workload: Arc::clone(values[0]),
                    app: Arc::clone(values[1]),
                    version: Arc::clone(values[2]),
                    canonical_service: Arc::clone(values[3]),
                    canonical_revision: Arc::clone(values[4]),
                })
        };
        let source = workload_current(
            &self.source_workload_namespace,
            [
                &self.source_workload,
                &self.source_app,
                &self.source_version,
                &self.source_canonical_service,
                &self.source_canonical_revision,
            ],
        );
        let destination = workload_current(
            &self.destination_workload_namespace,
            [
                &self.destination_workload,
                &self.destination_app,
                &self.destination_version,
                &self.destination_canonical_service,
                &self.destination_canonical_revision,
            ],
        );
        source && destination && self.pods_current(dir) && self.service_current(dir)
    }

    fn pods_current(&self, dir: &Directory) -> bool {
        let Some(pods) = self.detail.pods() else {
            return true;
        };
        let exists = |ns: &Arc<str>, pod: &str| is_unknown(ns) || dir.has_pod(ns, pod);
        exists(&self.source_workload_namespace, &pods.source_pod)
            && exists(&self.destination_workload_namespace, &pods.destination_pod)
    }

    fn service_current(&self, dir: &Directory) -> bool {
        is_unknown(&self.destination_service_name)
            || dir.has_service_named(
                &self.destination_service_namespace,
                &self.destination_service_name,
            )
    }
}

/// The pods of a series (`--metrics-granularity pod`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PodLabels {
    pub source_pod: Arc<str>,
    pub destination_pod: Arc<str>,
}

/// The pods and addresses of a series (`--metrics-granularity connection`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnectionLabels {
    #[prometheus(flatten)]
    pub pods: PodLabels,
    pub source_address: Arc<str>,
    pub destination_address: Arc<str>,
}

/// What finer granularities add to the labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Detail {
    None,
    Pod(PodLabels),
    Connection(ConnectionLabels),
}

impl Detail {
    fn pods(&self) -> Option<&PodLabels> {
        match self {
            Self::None => None,
            Self::Pod(p) => Some(p),
            Self::Connection(c) => Some(&c.pods),
        }
    }

    /// One series per connection: removed a while after the connection ends.
    pub fn is_per_connection(&self) -> bool {
        matches!(self, Self::Connection(_))
    }
}

impl EncodeLabelSet for Detail {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self {
            Self::None => Ok(()),
            Self::Pod(p) => p.encode(encoder),
            Self::Connection(c) => c.encode(encoder),
        }
    }
}

/// Connection labels plus how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClosedLabels {
    #[prometheus(flatten)]
    pub conn: ConnLabels,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: DropReason,
    pub direction: Direction,
    /// A named protocol, or `other`.
    pub protocol: &'static str,
}

/// What the reader counts per event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    TcpOpen,
    TcpClose,
    TcpUpdate,
    Drop,
    Ejection,
}

impl EventKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TcpOpen => "tcp_open",
            Self::TcpClose => "tcp_close",
            Self::TcpUpdate => "tcp_update",
            Self::Drop => "drop",
            Self::Ejection => "ejection",
        }
    }
}

label_value!(EventKind);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: EventKind,
}

/// RTT buckets in seconds: 50 µs (same node) to 1 s.
const RTT_BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0,
];

fn rtt_histogram() -> Histogram {
    Histogram::new(RTT_BUCKETS)
}

/// A set of series created together for one label set and removed together.
pub trait SeriesSet {
    /// Its handles for `labels` (created in `families` if new).
    fn create(families: &Families, labels: &ConnLabels) -> Self;
    /// Removes every series of `labels` from `families`.
    fn remove(families: &Families, labels: &ConnLabels);
}

/// The handles of one TCP series, looked up once per connection.
#[derive(Debug)]
pub struct TcpSeries {
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

impl TcpSeries {
    pub fn closed(&self, outcome: Outcome) -> &Counter {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(1);
        &self.closed[index]
    }
}

impl SeriesSet for TcpSeries {
    fn create(f: &Families, labels: &ConnLabels) -> Self {
        Self {
            opened: f.tcp_opened.get_or_create(labels).clone(),
            closed: Outcome::ALL.map(|outcome| {
                let closed = ClosedLabels {
                    conn: labels.clone(),
                    outcome,
                };
                f.tcp_closed.get_or_create(&closed).clone()
            }),
            response_bytes: f.tcp_sent.get_or_create(labels).clone(),
            request_bytes: f.tcp_received.get_or_create(labels).clone(),
            retransmits: f.tcp_retransmits.get_or_create(labels).clone(),
            rtt: f.tcp_rtt.get_or_create(labels).clone(),
        }
    }

    fn remove(f: &Families, labels: &ConnLabels) {
        for outcome in Outcome::ALL {
            f.tcp_closed.remove(&ClosedLabels {
                conn: labels.clone(),
                outcome,
            });
        }
        f.tcp_rtt.remove(labels);
        for family in [
            &f.tcp_opened,
            &f.tcp_sent,
            &f.tcp_received,
            &f.tcp_retransmits,
        ] {
            family.remove(labels);
        }
    }
}

/// The handles of one UDP series.
#[derive(Debug)]
pub struct UdpSeries {
    pub opened: Counter,
    pub closed: Counter,
    pub response_bytes: Counter,
    pub request_bytes: Counter,
    pub response_packets: Counter,
    pub request_packets: Counter,
}

impl SeriesSet for UdpSeries {
    fn create(f: &Families, labels: &ConnLabels) -> Self {
        Self {
            opened: f.udp_opened.get_or_create(labels).clone(),
            closed: f.udp_closed.get_or_create(labels).clone(),
            response_bytes: f.udp_sent_bytes.get_or_create(labels).clone(),
            request_bytes: f.udp_received_bytes.get_or_create(labels).clone(),
            response_packets: f.udp_sent_packets.get_or_create(labels).clone(),
            request_packets: f.udp_received_packets.get_or_create(labels).clone(),
        }
    }

    fn remove(f: &Families, labels: &ConnLabels) {
        for family in [
            &f.udp_opened,
            &f.udp_closed,
            &f.udp_sent_bytes,
            &f.udp_received_bytes,
            &f.udp_sent_packets,
            &f.udp_received_packets,
        ] {
            family.remove(labels);
        }
    }
}

/// The series in use, by labels: each looked up once per connection or flow, and removed
/// when what it names is gone (once nothing counts into it) or, per connection, a while
/// after its connection ended.
#[derive(Debug)]
pub struct SeriesCache<S> {
    /// Label values come from the cluster's names: a keyed hash of good quality.
    live: HashMap<ConnLabels, Arc<S>, foldhash::quality::RandomState>,
    /// Per-connection series to remove once their time is up.
    expiring: VecDeque<(Instant, ConnLabels)>,
    ttl: Duration,
}

impl<S: SeriesSet> SeriesCache<S> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            live: HashMap::default(),
            expiring: VecDeque::new(),
            ttl,
        }
    }

    /// The series of `labels`; the caller holds the Arc while something counts into it.
    pub fn get(&mut self, families: &Families, labels: &ConnLabels) -> Arc<S> {
        if let Some(s) = self.live.get(labels) {
            return Arc::clone(s);
        }
        let series = Arc::new(S::create(families, labels));
        self.live.insert(labels.clone(), Arc::clone(&series));
        series
    }

    /// A per-connection series whose connection ended: removed after the TTL.
    pub fn expire_later(&mut self, labels: ConnLabels, now: Instant) {
        self.expiring.push_back((now + self.ttl, labels));
    }

    /// Removes series naming something gone, unless something still counts into them.
    pub fn prune(&mut self, families: &Families, is_current: impl Fn(&ConnLabels) -> bool) {
        self.live.retain(|labels, series| {
            let keep = Arc::strong_count(series) > 1 || is_current(labels);
            if !keep {
                S::remove(families, labels);
            }
            keep
        });
    }

    /// Removes per-connection series whose time is up (another connection with the same
    /// labels, a reused port, keeps them for another TTL).
    pub fn expire(&mut self, families: &Families, now: Instant) {
        while self.expiring.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, labels)) = self.expiring.pop_front() else {
                break;
            };
            match self.live.get(&labels).map(Arc::strong_count) {
                Some(n) if n > 1 => self.expiring.push_back((now + self.ttl, labels)),
                _ => {
                    S::remove(families, &labels);
                    self.live.remove(&labels);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// Every telemetry metric family.
#[derive(Debug, Clone)]
pub struct Families {
    tcp_opened: Family<ConnLabels, Counter>,
    tcp_closed: Family<ClosedLabels, Counter>,
    tcp_sent: Family<ConnLabels, Counter>,
    tcp_received: Family<ConnLabels, Counter>,
    tcp_retransmits: Family<ConnLabels, Counter>,
    tcp_rtt: Family<ConnLabels, Histogram, fn() -> Histogram>,
    udp_opened: Family<ConnLabels, Counter>,
    udp_closed: Family<ConnLabels, Counter>,
    udp_sent_bytes: Family<ConnLabels, Counter>,
    udp_received_bytes: Family<ConnLabels, Counter>,
    udp_sent_packets: Family<ConnLabels, Counter>,
    udp_received_packets: Family<ConnLabels, Counter>,
    /// Drop events by reason (per event; `weft_drops_total` counts in the kernel).
    pub dropped: Family<DropLabels, Counter>,
    pub open_connections: Gauge,
    pub flow_records_lost: Counter,
    pub events: Family<EventLabels, Counter>,
}

impl Families {
    pub fn new(registry: &mut Registry) -> Self {
        let f = Self {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_retransmits: Family::default(),
            tcp_rtt: Family::new_with_constructor(rtt_histogram as fn() -> Histogram),
            udp_opened: Family::default(),
            udp_closed: Family::default(),
            udp_sent_bytes: Family::default(),
            udp_received_bytes: Family::default(),
            udp_sent_packets: Family::default(),
            udp_received_packets: Family::default(),
            dropped: Family::default(),
            open_connections: Gauge::default(),
            flow_records_lost: Counter::default(),
            events: Family::default(),
        };
        f.register_tcp(registry);
        f.register_udp(registry);
        f.register_health(registry);
        f
    }

    fn register_tcp(&self, r: &mut Registry) {
        r.register(
            "tcp_connections_opened",
            "TCP connections opened (reached ESTABLISHED), by workload pair",
            self.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed, by workload pair and outcome (normal, reset, refused, timeout)",
            self.tcp_closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Payload bytes the destination sent (the response), acknowledged by the peer",
            self.tcp_sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Payload bytes the destination received (the request)",
            self.tcp_received.clone(),
        );
        r.register(
            "tcp_retransmits",
            "TCP segments retransmitted by the reporting end",
            self.tcp_retransmits.clone(),
        );
        r.register_with_unit(
            "tcp_rtt",
            "Smoothed RTT of the reporting end, sampled at every update and at close",
            Unit::Seconds,
            self.tcp_rtt.clone(),
        );
    }

    fn register_udp(&self, r: &mut Registry) {
        for (name, help, family) in [
            (
                "udp_flows_opened",
                "UDP flows seen for the first time (a local socket and a peer)",
                &self.udp_opened,
            ),
            (
                "udp_flows_closed",
                "UDP flows ended by the idle timeout",
                &self.udp_closed,
            ),
            (
                "udp_sent_bytes",
                "IP bytes the destination sent (responses)",
                &self.udp_sent_bytes,
            ),
            (
                "udp_received_bytes",
                "IP bytes the destination received (requests)",
                &self.udp_received_bytes,
            ),
            (
                "udp_sent_packets",
                "Packets the destination sent (responses)",
                &self.udp_sent_packets,
            ),
            (
                "udp_received_packets",
                "Packets the destination received (requests)",
                &self.udp_received_packets,
            ),
        ] {
            r.register(name, help, family.clone());
        }
    }

    fn register_health(&self, r: &mut Registry) {
        r.register(
            "dropped_flows",
            "Connections and packets the datapath dropped, as reported by events (by reason)",
            self.dropped.clone(),
        );
        r.register(
            "tcp_open_connections",
            "TCP connections open now, as far as events tell",
            self.open_connections.clone(),
        );
        r.register(
            "flow_records_lost",
            "Flow records a slow reader of the flow stream did not get",
            self.flow_records_lost.clone(),
        );
        r.register(
            "conn_events",
            "Connection events read from the kernel, by kind",
            self.events.clone(),
        );
    }
}

#[cfg(test)]
mod tests;
