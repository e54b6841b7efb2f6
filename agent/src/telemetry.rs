//! Per-connection telemetry: connection events and UDP flow counters become Istio-labelled
//! metrics, the open-connection table (`weft connections`) and flow records (`weft flows`).
//!
//! Every event is handled on the agent's event loop without blocking: metrics are counters
//! behind atomics, the flow stream never waits for its readers. Counters in events are
//! cumulative per socket; the table keeps the last values seen, so metrics get exact
//! increases however many updates (or duplicates) arrive.
pub mod flows;
pub mod metrics;
pub mod names;
pub mod udp;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};
use weft_abi::{
    conn::ConnState,
    traffic::{UdpFlowStatsKey, UdpFlowStatsValue},
};

use crate::conntrack::{ConnEventKindName, Connection, Outcome, Role};
use flows::{FlowEnd, FlowEvent, FlowRecord, Flows, Verdict, protocol_name};
use metrics::{ConnLabels, Detail, DropLabels, Granularity, Reporter, Series, TelemetryMetrics};
use names::{Directory, PodName};
use udp::UdpSeries;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kernel map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// What telemetry is asked to do.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub granularity: Granularity,
    /// `source_cluster` / `destination_cluster` of local workloads.
    pub cluster: String,
    pub names: names::NameConfig,
    /// A UDP flow without packets for this long ends.
    pub udp_idle: Duration,
    /// Flow records kept for `weft flows --last`.
    pub flow_buffer: usize,
    /// Records a follower may fall behind before it loses some.
    pub flow_lag: usize,
    /// How long per-connection series stay after their connection closed.
    pub connection_series_ttl: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            granularity: Granularity::Workload,
            cluster: "Kubernetes".to_owned(),
            names: names::NameConfig::default(),
            udp_idle: Duration::from_secs(60),
            flow_buffer: 8192,
            flow_lag: 4096,
            connection_series_ttl: Duration::from_secs(300),
        }
    }
}

/// The names in use, replaced whole by the pipeline after every pass.
pub type DirectoryHandle = Arc<RwLock<Arc<Directory>>>;

/// One open TCP connection as the last event told (`GET /connections`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenConnection {
    pub cookie: u64,
    pub role: Role,
    pub local: FlowEnd,
    pub remote: FlowEnd,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Arc<str>>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub srtt_us: u64,
    pub retransmits: u32,
    /// Open this long when the last event was produced.
    pub duration_ms: u64,
    /// Time of the last event (open or update).
    pub updated: flows::Timestamp,
}

/// An entry of the open table (boxed there: the table's spare capacity then costs a pointer
/// per slot, not a whole entry).
struct Open {
    view: OpenConnection,
    series: Arc<Series>,
    /// Only per-connection series need their labels again (to expire them).
    connection_labels: Option<Box<ConnLabels>>,
    seen: Instant,
}

/// What the admin API reads.
#[derive(Clone)]
pub struct TelemetryView {
    open: Arc<Mutex<HashMap<u64, Box<Open>>>>,
    pub flows: Arc<Flows>,
}

impl std::fmt::Debug for TelemetryView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryView").finish_non_exhaustive()
    }
}

impl TelemetryView {
    pub fn open_count(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Open connections, oldest first.
    pub fn connections(&self) -> Vec<OpenConnection> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<OpenConnection> = open.values().map(|o| o.view.clone()).collect();
        out.sort_by(|a, b| {
            b.duration_ms
                .cmp(&a.duration_ms)
                .then(a.cookie.cmp(&b.cookie))
        });
        out
    }
}

struct UdpFlow {
    last: UdpFlowStatsValue,
    series: Arc<UdpSeries>,
    /// Only per-connection series need their labels again (to expire them).
    connection_labels: Option<Box<ConnLabels>>,
}

/// Which cache a series is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
}

/// Per-event counters of the reader, looked up once.
struct EventCounters {
    open: Counter,
    close: Counter,
    update: Counter,
    drop: Counter,
}

/// The telemetry state, owned by the agent's event loop.
pub struct Telemetry {
    config: TelemetryConfig,
    cluster: Arc<str>,
    metrics: TelemetryMetrics,
    directory: DirectoryHandle,
    current: Arc<Directory>,
    series: HashMap<ConnLabels, Arc<Series>>,
    udp_series: HashMap<ConnLabels, Arc<UdpSeries>>,
    open: Arc<Mutex<HashMap<u64, Box<Open>>>>,
    flows: Arc<Flows>,
    /// Per-connection series to remove once their time is up.
    expiring: VecDeque<(Instant, Kind, ConnLabels)>,
    udp: HashMap<UdpFlowStatsKey, UdpFlow>,
    udp_map: Option<udp::UdpMap>,
    /// A read of `udp_map` is running off the event loop.
    udp_reading: bool,
    conn_state: Option<BpfHashMap<MapData, u64, ConnState>>,
    events: EventCounters,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("series", &self.series.len())
            .field("udp_flows", &self.udp.len())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    pub fn new(
        config: TelemetryConfig,
        registry: &mut Registry,
        directory: DirectoryHandle,
    ) -> Self {
        let metrics = TelemetryMetrics::new(registry);
        let event = |name| {
            metrics
                .events
                .get_or_create(&metrics::EventLabels { event: name })
                .clone()
        };
        let events = EventCounters {
            open: event("tcp_open"),
            close: event("tcp_close"),
            update: event("tcp_update"),
            drop: event("drop"),
        };
        let current = Arc::clone(&directory.read().unwrap_or_else(|e| e.into_inner()));
        Self {
            cluster: Arc::from(config.cluster.as_str()),
            flows: Arc::new(Flows::new(
                config.flow_buffer,
                config.flow_lag,
                metrics.flow_records_lost.clone(),
            )),
            config,
            metrics,
            directory,
            current,
            series: HashMap::new(),
            udp_series: HashMap::new(),
            open: Arc::default(),
            expiring: VecDeque::new(),
            udp: HashMap::new(),
            udp_map: None,
            udp_reading: false,
            conn_state: None,
            events,
        }
    }

    /// The kernel maps telemetry reads: UDP flow counters, and the open-connection map that
    /// tells a connection whose close event was lost from one that is idle.
    pub fn with_maps(
        mut self,
        udp_map: BpfHashMap<MapData, UdpFlowStatsKey, UdpFlowStatsValue>,
        conn_state: BpfHashMap<MapData, u64, ConnState>,
    ) -> Self {
        self.udp_map = Some(Arc::new(Mutex::new(udp_map)));
        self.conn_state = Some(conn_state);
        self
    }

    pub fn view(&self) -> TelemetryView {
        TelemetryView {
            open: Arc::clone(&self.open),
            flows: Arc::clone(&self.flows),
        }
    }

    /// Handles one kernel event.
    pub fn on_event(&mut self, c: &Connection) {
        self.follow_directory();
        match c.event {
            ConnEventKindName::TcpOpen => self.events.open.inc(),
            ConnEventKindName::TcpUpdate => self.events.update.inc(),
            ConnEventKindName::TcpClose => self.events.close.inc(),
            ConnEventKindName::Drop => {
                self.events.drop.inc();
                self.on_drop(c);
                return;
            }
        };
        let table = Arc::clone(&self.open);
        let mut open = table.lock().unwrap_or_else(|e| e.into_inner());
        let mut entry = match open.remove(&c.cookie) {
            Some(e) => e,
            // An update or close of a connection opened before this agent started, or whose
            // open event was lost; or a close of one that never opened (refused, timed out).
            None => self.new_open(c),
        };
        if c.event == ConnEventKindName::TcpOpen {
            entry.series.opened.inc();
        }
        account(&mut entry, c);
        match c.event {
            ConnEventKindName::TcpClose => {
                let outcome = c.outcome.unwrap_or(Outcome::Reset);
                let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(1);
                entry.series.closed[index].inc();
                if let Some(labels) = entry.connection_labels.take() {
                    self.expiring.push_back((
                        Instant::now() + self.config.connection_series_ttl,
                        Kind::Tcp,
                        *labels,
                    ));
                }
                self.metrics.open_connections.set(open.len() as i64);
                drop(open);
                self.flows
                    .publish(tcp_record(FlowEvent::TcpClose, c, &entry.view));
            }
            ConnEventKindName::TcpOpen => {
                let record = tcp_record(FlowEvent::TcpOpen, c, &entry.view);
                open.insert(c.cookie, entry);
                self.metrics.open_connections.set(open.len() as i64);
                drop(open);
                self.flows.publish(record);
            }
            _ => {
                open.insert(c.cookie, entry);
                self.metrics.open_connections.set(open.len() as i64);
            }
        }
    }

    /// Swaps in the pipeline's latest names and removes the series they make stale.
    fn follow_directory(&mut self) {
        let latest = Arc::clone(&self.directory.read().unwrap_or_else(|e| e.into_inner()));
        if Arc::ptr_eq(&latest, &self.current) {
            return;
        }
        self.current = latest;
        self.prune();
    }

    /// Removes series naming a workload, pod or Service that is gone (or renamed,
    /// relabelled), unless an open connection or UDP flow still counts into them: those go
    /// at a later pass, once it has ended.
    fn prune(&mut self) {
        let dir = &self.current;
        let metrics = &self.metrics;
        self.series.retain(|labels, series| {
            let keep = Arc::strong_count(series) > 1 || labels.is_current(dir);
            if !keep {
                metrics.remove(labels);
            }
            keep
        });
        self.udp_series.retain(|labels, series| {
            let keep = Arc::strong_count(series) > 1 || labels.is_current(dir);
            if !keep {
                metrics.udp.remove(labels);
            }
            keep
        });
    }

    fn labels(
        &self,
        reporter: Reporter,
        protocol: &'static str,
        source: (SocketAddr, Option<&Arc<PodName>>),
        destination: (SocketAddr, Option<&Arc<PodName>>),
        service: Option<Arc<names::ServiceName>>,
    ) -> ConnLabels {
        let pod_name = |p: Option<&Arc<PodName>>| -> Arc<str> {
            p.map_or_else(|| Arc::from(names::UNKNOWN), |p| Arc::clone(&p.pod))
        };
        let detail = match self.config.granularity {
            Granularity::Workload => Detail::None,
            Granularity::Pod => Detail::Pod {
                source: pod_name(source.1),
                destination: pod_name(destination.1),
            },
            Granularity::Connection => Detail::Connection {
                source: pod_name(source.1),
                destination: pod_name(destination.1),
                source_address: Arc::from(source.0.to_string()),
                destination_address: Arc::from(destination.0.to_string()),
            },
        };
        ConnLabels {
            reporter,
            protocol,
            source: source.1.map(|p| Arc::clone(&p.peer)),
            destination: destination.1.map(|p| Arc::clone(&p.peer)),
            service,
            cluster: Arc::clone(&self.cluster),
            detail,
        }
    }

    fn new_open(&mut self, c: &Connection) -> Box<Open> {
        let dir = Arc::clone(&self.current);
        let local_pod = dir.pod(c.local.ip());
        let remote_pod = dir.pod(c.remote.ip());
        let (reporter, source, destination) = match c.role {
            Role::Client => (
                Reporter::Source,
                (c.local, local_pod),
                (c.remote, remote_pod),
            ),
            Role::Server => (
                Reporter::Destination,
                (c.remote, remote_pod),
                (c.local, local_pod),
            ),
        };
        let service = dir
            .service(c.service, destination.0, weft_abi::IPPROTO_TCP)
            .cloned();
        let labels = self.labels(reporter, "tcp", source, destination, service.clone());
        let metrics = &self.metrics;
        let series = Arc::clone(
            self.series
                .entry(labels.clone())
                .or_insert_with(|| Arc::new(metrics.series(&labels))),
        );
        Box::new(Open {
            view: OpenConnection {
                cookie: c.cookie,
                role: c.role,
                local: flow_end(c.local, local_pod),
                remote: flow_end(c.remote, remote_pod),
                service: service.map(|s| Arc::clone(&s.key)),
                bytes_sent: 0,
                bytes_received: 0,
                srtt_us: 0,
                retransmits: 0,
                duration_ms: 0,
                updated: flows::Timestamp::now(),
            },
            series,
            connection_labels: matches!(labels.detail, Detail::Connection { .. })
                .then(|| Box::new(labels)),
            seen: Instant::now(),
        })
    }

    fn on_drop(&mut self, c: &Connection) {
        let Some(d) = c.dropped else { return };
        let protocol = protocol_name(d.protocol);
        self.metrics
            .denied
            .get_or_create(&DropLabels::new(
                d.reason,
                d.direction,
                protocol_label(d.protocol),
            ))
            .inc();
        let dir = Arc::clone(&self.current);
        let local = flow_end(c.local, dir.pod(c.local.ip()));
        let remote = flow_end(c.remote, dir.pod(c.remote.ip()));
        let egress = d.direction == crate::conntrack::Direction::Egress;
        let (reporter, source, destination) = if egress {
            ("source", local, remote)
        } else {
            ("destination", remote, local)
        };
        // A connect refused for want of backends was addressed to the ClusterIP itself.
        let frontend = match d.reason {
            crate::conntrack::DropReason::NoBackends => Some(c.remote),
            _ => c.service,
        };
        let service = dir
            .service(frontend, destination.address, d.protocol)
            .map(|s| Arc::clone(&s.key));
        self.flows.publish(FlowRecord {
            service,
            drop_reason: Some(d.reason),
            direction: Some(d.direction),
            cookie: c.cookie,
            ..FlowRecord::new(
                FlowEvent::Drop,
                Verdict::Denied,
                protocol,
                reporter,
                source,
                destination,
            )
        });
    }

    /// Periodic work: series of workloads that are gone (once no open connection uses
    /// them), expired per-connection series.
    pub fn tick(&mut self) {
        self.follow_directory();
        self.prune();
        let now = Instant::now();
        while self.expiring.front().is_some_and(|(at, ..)| *at <= now) {
            let Some((_, kind, labels)) = self.expiring.pop_front() else {
                break;
            };
            let in_use = match kind {
                Kind::Tcp => self.series.get(&labels).map(Arc::strong_count),
                Kind::Udp => self.udp_series.get(&labels).map(Arc::strong_count),
            };
            match in_use {
                // Another connection with the same labels (a reused port) still counts.
                Some(n) if n > 1 => {
                    self.expiring
                        .push_back((now + self.config.connection_series_ttl, kind, labels))
                }
                _ => match kind {
                    Kind::Tcp => {
                        self.metrics.remove(&labels);
                        self.series.remove(&labels);
                    }
                    Kind::Udp => {
                        self.metrics.udp.remove(&labels);
                        self.udp_series.remove(&labels);
                    }
                },
            }
        }
    }

    /// Connections the kernel may have stopped tracking without their close reaching us (the
    /// ring buffer was full): quiet for `stale_after` and absent from `CONN_STATE`. The caller
    /// drains the ring buffer next (a close submitted just before the lookup is then read)
    /// and passes them to [`Telemetry::forget`].
    pub fn lost_candidates(&self, stale_after: Duration) -> Vec<(u64, Instant)> {
        let Some(conn_state) = &self.conn_state else {
            return Vec::new();
        };
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter()
            .filter(|(cookie, o)| {
                o.seen.elapsed() >= stale_after
                    && matches!(conn_state.get(cookie, 0), Err(MapError::KeyNotFound))
            })
            .map(|(cookie, o)| (*cookie, o.seen))
            .collect()
    }

    /// Drops the candidates that no event touched since [`Telemetry::lost_candidates`].
    pub fn forget(&mut self, candidates: &[(u64, Instant)]) {
        let table = Arc::clone(&self.open);
        let mut open = table.lock().unwrap_or_else(|e| e.into_inner());
        for (cookie, seen) in candidates {
            if open.get(cookie).is_some_and(|o| o.seen == *seen)
                && let Some(mut o) = open.remove(cookie)
                && let Some(labels) = o.connection_labels.take()
            {
                self.expiring.push_back((
                    Instant::now() + self.config.connection_series_ttl,
                    Kind::Tcp,
                    *labels,
                ));
            }
        }
        self.metrics.open_connections.set(open.len() as i64);
    }
}

/// Adds a TCP event's increases over what the table last saw to the connection's series.
fn account(entry: &mut Open, c: &Connection) {
    let v = &mut entry.view;
    let sent = c.bytes_sent.saturating_sub(v.bytes_sent);
    let received = c.bytes_received.saturating_sub(v.bytes_received);
    let (request, response) = match c.role {
        Role::Client => (sent, received),
        Role::Server => (received, sent),
    };
    let s = &entry.series;
    s.request_bytes.inc_by(request);
    s.response_bytes.inc_by(response);
    s.retransmits
        .inc_by(u64::from(c.retransmits.saturating_sub(v.retransmits)));
    if c.event != ConnEventKindName::TcpOpen && !c.srtt.is_zero() {
        s.rtt.observe(c.srtt.as_secs_f64());
    }
    v.bytes_sent = v.bytes_sent.max(c.bytes_sent);
    v.bytes_received = v.bytes_received.max(c.bytes_received);
    v.retransmits = v.retransmits.max(c.retransmits);
    v.srtt_us = c.srtt.as_micros() as u64;
    v.duration_ms = c.duration.as_millis() as u64;
    v.updated = flows::Timestamp::now();
    entry.seen = Instant::now();
}

fn tcp_record(event: FlowEvent, c: &Connection, v: &OpenConnection) -> FlowRecord {
    let client = c.role == Role::Client;
    let (reporter, source, destination) = if client {
        ("source", v.local.clone(), v.remote.clone())
    } else {
        ("destination", v.remote.clone(), v.local.clone())
    };
    let (to_dst, to_src) = if client {
        (c.bytes_sent, c.bytes_received)
    } else {
        (c.bytes_received, c.bytes_sent)
    };
    FlowRecord {
        service: v.service.clone(),
        bytes_to_destination: to_dst,
        bytes_to_source: to_src,
        rtt_us: Some(c.srtt.as_micros() as u64),
        retransmits: Some(c.retransmits),
        duration_us: Some(c.duration.as_micros() as u64),
        outcome: c.outcome,
        cookie: c.cookie,
        ..FlowRecord::new(
            event,
            Verdict::Allowed,
            "TCP".to_owned(),
            reporter,
            source,
            destination,
        )
    }
}

fn flow_end(address: SocketAddr, pod: Option<&Arc<PodName>>) -> FlowEnd {
    FlowEnd {
        address,
        namespace: pod.map(|p| Arc::clone(&p.peer.namespace)),
        pod: pod.map(|p| Arc::clone(&p.pod)),
        workload: pod.map(|p| Arc::clone(&p.peer.workload)),
    }
}

/// A bounded label value: named protocols, or "other".
fn protocol_label(protocol: u8) -> &'static str {
    flows::known_protocol(protocol).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

    use super::*;
    use crate::{source::yaml, store};

    fn directory() -> Arc<Directory> {
        let docs = [
            "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns, labels: {app: c}}\nstatus: {podIP: 10.0.0.1}",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: ns, labels: {app: s}}\nstatus: {podIP: 10.0.0.2}",
        ];
        let objects: BTreeMap<_, _> = docs
            .iter()
            .map(|d| store::decode(yaml::parse(d).expect("yaml")).expect("valid"))
            .collect();
        let st = store::Store::from_objects(&objects);
        Arc::new(Directory::build(
            &st,
            &BTreeMap::new(),
            &names::NameConfig::default(),
        ))
    }

    fn event(kind: ConnEventKindName, sent: u64, received: u64) -> Connection {
        let client: SocketAddr = "10.0.0.1:40000".parse().expect("addr");
        let server: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        Connection {
            event: kind,
            cookie: 7,
            role: Role::Client,
            local: client,
            remote: server,
            bytes_sent: sent,
            bytes_received: received,
            srtt: Duration::from_micros(100),
            rtt_min: Duration::from_micros(50),
            retransmits: 0,
            segments_in: 0,
            segments_out: 0,
            duration: Duration::from_millis(1),
            outcome: (kind == ConnEventKindName::TcpClose).then_some(Outcome::Normal),
            service: None,
            dropped: None,
        }
    }

    fn sample(registry: &Registry, name: &str) -> f64 {
        let text = crate::metrics::render(registry, crate::metrics::Format::Text);
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("reporter=\"source\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    #[test]
    fn cumulative_counters_become_exact_increases_despite_duplicates_and_reordering() {
        let mut registry = Registry::default();
        let handle: DirectoryHandle = Arc::new(RwLock::new(directory()));
        let mut t = Telemetry::new(TelemetryConfig::default(), &mut registry, handle);
        t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
        t.on_event(&event(ConnEventKindName::TcpUpdate, 1000, 10));
        // A duplicate and a late, older update add nothing.
        t.on_event(&event(ConnEventKindName::TcpUpdate, 1000, 10));
        t.on_event(&event(ConnEventKindName::TcpUpdate, 500, 5));
        assert_eq!(t.view().connections().len(), 1);
        t.on_event(&event(ConnEventKindName::TcpClose, 5000, 20));
        assert!(t.view().connections().is_empty());
        // The client's sent bytes are the request: Istio's received.
        assert_eq!(sample(&registry, "weft_tcp_received_bytes_total"), 5000.0);
        assert_eq!(sample(&registry, "weft_tcp_sent_bytes_total"), 20.0);
        assert_eq!(sample(&registry, "weft_tcp_connections_opened_total"), 1.0);
        assert_eq!(sample(&registry, "weft_tcp_connections_closed_total"), 1.0);
        let text = crate::metrics::render(&registry, crate::metrics::Format::Text);
        assert!(
            text.contains("source_workload=\"client\"")
                && text.contains("destination_workload=\"server\"")
                && text.contains("source_app=\"c\""),
            "{text}"
        );
        let records = t.view().flows.recent(&flows::Filter::default(), None);
        assert_eq!(records.len(), 2, "open and close");
        assert_eq!(records[1].bytes_to_destination, 5000);
    }

    #[test]
    fn series_of_a_deleted_workload_go_once_no_connection_uses_them() {
        let mut registry = Registry::default();
        let handle: DirectoryHandle = Arc::new(RwLock::new(directory()));
        let mut t = Telemetry::new(
            TelemetryConfig::default(),
            &mut registry,
            Arc::clone(&handle),
        );
        t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
        // The client pod is deleted while its connection is open: its series stay...
        *handle.write().expect("lock") = Arc::new(Directory::default());
        t.tick();
        assert_eq!(sample(&registry, "weft_tcp_connections_opened_total"), 1.0);
        // ...until it closes and a later pass finds them unused.
        t.on_event(&event(ConnEventKindName::TcpClose, 10, 10));
        t.tick();
        let text = crate::metrics::render(&registry, crate::metrics::Format::Text);
        assert!(!text.contains("source_workload=\"client\""), "{text}");
    }
}
