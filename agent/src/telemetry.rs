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
    pub role: String,
    pub local: FlowEnd,
    pub remote: FlowEnd,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub srtt_us: u64,
    pub retransmits: u32,
    /// Open this long when the last event was produced.
    pub duration_ms: u64,
    /// Time of the last event (open or update).
    pub updated: flows::Timestamp,
}

struct Open {
    view: OpenConnection,
    series: Arc<Series>,
    labels: ConnLabels,
    seen: Instant,
}

/// What the admin API reads.
#[derive(Clone)]
pub struct TelemetryView {
    open: Arc<Mutex<HashMap<u64, Open>>>,
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
    open: Arc<Mutex<HashMap<u64, Open>>>,
    flows: Arc<Flows>,
    /// Per-connection series to remove once their time is up.
    expiring: VecDeque<(Instant, ConnLabels)>,
    udp: HashMap<UdpFlowStatsKey, UdpFlow>,
    udp_map: Option<BpfHashMap<MapData, UdpFlowStatsKey, UdpFlowStatsValue>>,
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
        self.udp_map = Some(udp_map);
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
                if matches!(entry.labels.detail, Detail::Connection { .. }) {
                    self.expiring.push_back((
                        Instant::now() + self.config.connection_series_ttl,
                        entry.labels.clone(),
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

    /// Swaps in the pipeline's latest names; series of workloads that are gone (or renamed,
    /// relabelled) are removed.
    fn follow_directory(&mut self) {
        let latest = Arc::clone(&self.directory.read().unwrap_or_else(|e| e.into_inner()));
        if Arc::ptr_eq(&latest, &self.current) {
            return;
        }
        self.current = latest;
        let dir = &self.current;
        let metrics = &self.metrics;
        self.series.retain(|labels, _| {
            let keep = labels.is_current(dir);
            if !keep {
                metrics.remove(labels);
            }
            keep
        });
        self.udp_series.retain(|labels, _| {
            let keep = labels.is_current(dir);
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

    fn new_open(&mut self, c: &Connection) -> Open {
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
        Open {
            view: OpenConnection {
                cookie: c.cookie,
                role: c.role.as_str().to_owned(),
                local: flow_end(c.local, local_pod),
                remote: flow_end(c.remote, remote_pod),
                service: service.map(|s| format!("{}/{}", s.namespace, s.name)),
                bytes_sent: 0,
                bytes_received: 0,
                srtt_us: 0,
                retransmits: 0,
                duration_ms: 0,
                updated: flows::Timestamp::now(),
            },
            series,
            labels,
            seen: Instant::now(),
        }
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
        let service = dir
            .service(c.service, destination.address, d.protocol)
            .map(|s| format!("{}/{}", s.namespace, s.name));
        self.flows.publish(FlowRecord {
            seq: 0,
            time: flows::Timestamp::now(),
            event: FlowEvent::Drop,
            verdict: Verdict::Denied,
            protocol,
            reporter: reporter.to_owned(),
            source,
            destination,
            service,
            bytes_to_destination: 0,
            bytes_to_source: 0,
            packets_to_destination: None,
            packets_to_source: None,
            rtt_us: None,
            retransmits: None,
            duration_us: None,
            outcome: None,
            drop_reason: Some(d.reason),
            direction: Some(d.direction),
            cookie: c.cookie,
        });
    }

    /// Periodic work: UDP flow counters, connections whose close was lost, expired
    /// per-connection series.
    pub fn tick(&mut self, stale_after: Duration) -> Result<(), Error> {
        self.follow_directory();
        let now = Instant::now();
        while self.expiring.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, labels)) = self.expiring.pop_front() {
                self.metrics.remove(&labels);
                self.series.remove(&labels);
            }
        }
        self.forget_lost(stale_after);
        self.sweep_udp()
    }

    /// Drops table entries of connections the kernel no longer tracks (their close event was
    /// lost): quiet for `stale_after` and absent from `CONN_STATE`.
    fn forget_lost(&mut self, stale_after: Duration) {
        let Some(conn_state) = &self.conn_state else {
            return;
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|cookie, o| {
            o.seen.elapsed() < stale_after
                || !matches!(conn_state.get(cookie, 0), Err(MapError::KeyNotFound))
        });
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
        seq: 0,
        time: flows::Timestamp::now(),
        event,
        verdict: Verdict::Allowed,
        protocol: "TCP".to_owned(),
        reporter: reporter.to_owned(),
        source,
        destination,
        service: v.service.clone(),
        bytes_to_destination: to_dst,
        bytes_to_source: to_src,
        packets_to_destination: None,
        packets_to_source: None,
        rtt_us: Some(c.srtt.as_micros() as u64),
        retransmits: Some(c.retransmits),
        duration_us: Some(c.duration.as_micros() as u64),
        outcome: c.outcome,
        drop_reason: None,
        direction: None,
        cookie: c.cookie,
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
