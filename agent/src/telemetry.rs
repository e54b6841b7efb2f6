//! Per-connection telemetry: connection events and UDP flow counters become Istio-labelled
//! metrics, the open-connection table (`weft connections`) and flow records (`weft flows`).
//!
//! Pure: kernel events, UDP flow samples and the name directory in; metrics and flow records
//! out. It reads no kernel map itself (the agent reads them and hands over what they say), so
//! it is unit-tested without a kernel.
//!
//! Every event is handled on the agent's event loop without blocking: metrics are counters
//! behind atomics, the flow stream never waits for its readers. Counters in events are
//! cumulative per socket; the table keeps the last values seen, so metrics get exact
//! increases however many updates (or duplicates) arrive.
pub mod ejections;
pub mod flows;
pub mod metrics;
pub mod udp;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};
use weft_abi::{conn::DropReason, net::Direction};

use crate::{
    compile::names::{Directory, DirectoryHandle, NameConfig, PodName, ServiceName, UNKNOWN},
    datapath::Globals,
    events::{ConnEventKindName, Connection, Outcome, Role, udp::UdpBatch},
};
pub use flows::Now;
use flows::{FlowEnd, FlowEvent, FlowRecord, Flows, Reporter, Verdict, protocol_name};
use metrics::{
    ConnLabels, ConnectionLabels, Detail, DropLabels, Ends, EventKind, EventLabels, Families,
    Granularity, PodLabels, Protocol, SeriesCache, TcpSeries, UdpSeries,
};

/// The telemetry flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// Connection and drop events and UDP flow counting in the kernel (`--telemetry=false`
    /// turns them off; services and policy are unaffected).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub telemetry: bool,
    /// An open TCP connection reports its counters this often, so metrics move while it is
    /// open (`0s`: only at open and close).
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    pub conn_update_interval: Duration,
    /// A UDP flow without packets for this long ends (its flow record is written).
    #[arg(long, default_value = "60s", value_parser = crate::parse_positive_duration)]
    pub udp_idle_timeout: Duration,
    /// How finely connection series are split: per workload pair (Istio's default), per pod
    /// pair, or per connection (debugging only).
    #[arg(long, value_enum, default_value = "workload")]
    pub metrics_granularity: Granularity,
    /// `source_cluster` / `destination_cluster` of this cluster's workloads (Istio's default).
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Flow records kept for `weft flows --last`.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub flow_buffer: u64,
}

impl Settings {
    /// How often the open-connection table and UDP flows are looked at: the update interval,
    /// or 5 s when connections report only at open and close.
    pub fn tick(&self) -> Duration {
        if self.conn_update_interval.is_zero() {
            Duration::from_secs(5)
        } else {
            self.conn_update_interval
        }
    }

    /// A connection quiet for this long and gone from the kernel lost its close event.
    pub fn stale_after(&self) -> Duration {
        (self.tick() * 3).max(Duration::from_secs(60))
    }

    /// For `weft config dump`.
    pub fn summary(&self, names: &NameConfig) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.telemetry,
            "granularity": self.metrics_granularity,
            "conn_update_interval": humantime::format_duration(self.conn_update_interval).to_string(),
            "udp_idle_timeout": humantime::format_duration(self.udp_idle_timeout).to_string(),
            "flow_buffer": self.flow_buffer,
            "cluster": self.cluster_id,
            "cluster_domain": names.cluster_domain,
        })
    }

    /// Sets the datapath globals that telemetry decides: no events at all when telemetry is
    /// off (and then no per-packet update check either).
    pub fn apply_to(&self, globals: &mut Globals) {
        let interval = u64::try_from(self.conn_update_interval.as_nanos()).unwrap_or(u64::MAX);
        globals.conn_events_enabled = u32::from(self.telemetry);
        globals.conn_update_interval_ns = if self.telemetry { interval } else { 0 };
    }
}

/// What telemetry is asked to do.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub granularity: Granularity,
    /// `source_cluster` / `destination_cluster` of local workloads.
    pub cluster: String,
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
            flow_buffer: 8192,
            flow_lag: 4096,
            connection_series_ttl: Duration::from_secs(300),
        }
    }
}

impl From<&Settings> for TelemetryConfig {
    fn from(s: &Settings) -> Self {
        Self {
            granularity: s.metrics_granularity,
            cluster: s.cluster_id.clone(),
            flow_buffer: usize::try_from(s.flow_buffer).unwrap_or(usize::MAX),
            ..Self::default()
        }
    }
}

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
    /// Carried by the mesh (mutual TLS), with both ends' verified identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::events::Security>,
    /// The server is a meshed pod: what its security policy decided (the deciding policy
    /// and rule, an AUDIT one that matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<crate::compile::authz::Decision>,
}

/// An entry of the open table (boxed there: the table's spare capacity then costs a pointer
/// per slot, not a whole entry).
struct Open {
    view: OpenConnection,
    series: Arc<TcpSeries>,
    /// Only per-connection series need their labels again (to expire them).
    connection_labels: Option<Box<ConnLabels>>,
    seen: Instant,
}

/// Keyed by socket cookie (kernel-made, not chosen by a workload): the fast hash suffices.
type OpenTable = Arc<Mutex<HashMap<u64, Box<Open>, foldhash::fast::RandomState>>>;

/// What the admin API reads.
#[derive(Clone)]
pub struct TelemetryView {
    open: OpenTable,
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

/// Names series: the labels of a series between two ends, at the configured granularity.
#[derive(Debug)]
pub struct Namer {
    granularity: Granularity,
    /// `source_cluster` / `destination_cluster` of local workloads.
    cluster: Arc<str>,
}

/// One end of a series: its address, and the pod holding it.
pub type End<'a> = (SocketAddr, Option<&'a Arc<PodName>>);

impl Namer {
    pub fn labels(
        &self,
        ends: (Reporter, Protocol),
        source: End<'_>,
        destination: End<'_>,
        service: Option<&ServiceName>,
        security: Option<&crate::events::Security>,
    ) -> ConnLabels {
        let pods = || PodLabels {
            source_pod: pod_name(source.1),
            destination_pod: pod_name(destination.1),
        };
        let detail = match self.granularity {
            Granularity::Workload => Detail::None,
            Granularity::Pod => Detail::Pod(pods()),
            Granularity::Connection => Detail::Connection(ConnectionLabels {
                pods: pods(),
                source_address: Arc::from(source.0.to_string()),
                destination_address: Arc::from(destination.0.to_string()),
            }),
        };
        let ends = Ends {
            reporter: ends.0,
            protocol: ends.1,
            source: source.1.map(|p| &*p.peer),
            destination: destination.1.map(|p| &*p.peer),
            service,
            cluster: &self.cluster,
            security,
        };
        ConnLabels::new(&ends, detail)
    }
}

/// Per-event counters of the reader, looked up once.
struct EventCounters {
    open: Counter,
    close: Counter,
    update: Counter,
    drop: Counter,
    ejection: Counter,
}

/// The telemetry state, owned by the agent's event loop.
pub struct Telemetry {
    namer: Namer,
    families: Families,
    directory: DirectoryHandle,
    current: Arc<Directory>,
    tcp: SeriesCache<TcpSeries>,
    udp_series: SeriesCache<UdpSeries>,
    open: OpenTable,
    flows: Arc<Flows>,
    udp: udp::UdpFlows,
    events: EventCounters,
    ejections: ejections::Ejections,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("series", &self.tcp.len())
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
        let families = Families::new(registry);
        let event = |event| {
            families
                .events
                .get_or_create(&EventLabels { event })
                .clone()
        };
        let events = EventCounters {
            open: event(EventKind::TcpOpen),
            close: event(EventKind::TcpClose),
            update: event(EventKind::TcpUpdate),
            drop: event(EventKind::Drop),
            ejection: event(EventKind::Ejection),
        };
        let ejections = ejections::Ejections::new(registry);
        let current = Arc::clone(&directory.read().unwrap_or_else(|e| e.into_inner()));
        let ttl = config.connection_series_ttl;
        Self {
            namer: Namer {
                granularity: config.granularity,
                cluster: Arc::from(config.cluster.as_str()),
            },
            flows: Arc::new(Flows::new(
                config.flow_buffer,
                config.flow_lag,
                families.flow_records_lost.clone(),
            )),
            families,
            directory,
            current,
            tcp: SeriesCache::new(ttl),
            udp_series: SeriesCache::new(ttl),
            open: Arc::default(),
            udp: udp::UdpFlows::default(),
            events,
            ejections,
        }
    }

    pub fn view(&self) -> TelemetryView {
        TelemetryView {
            open: Arc::clone(&self.open),
            flows: Arc::clone(&self.flows),
        }
    }

    /// Handles one kernel event.
    pub fn on_event(&mut self, c: &Connection) {
        self.on_event_at(c, Now::read());
    }

    /// Handles one kernel event at `now` (one reading serves a batch of events).
    pub fn on_event_at(&mut self, c: &Connection, now: Now) {
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
            ConnEventKindName::Ejection => {
                self.events.ejection.inc();
                self.on_ejection(c, now);
                return;
            }
        };
        let table = Arc::clone(&self.open);
        let mut open = table.lock().unwrap_or_else(|e| e.into_inner());
        let mut entry = match open.remove(&c.cookie) {
            Some(e) => e,
            // An update or close of a connection opened before this agent started, or whose
            // open event was lost; or a close of one that never opened (refused, timed out).
            None => self.new_open(c, now),
        };
        if c.event == ConnEventKindName::TcpOpen {
            entry.series.opened.inc();
        }
        account(&mut entry, c, now);
        let record = match c.event {
            ConnEventKindName::TcpClose => {
                let outcome = c.outcome.unwrap_or(Outcome::Reset);
                entry.series.closed(outcome).inc();
                if let Some(labels) = entry.connection_labels.take() {
                    self.tcp.expire_later(*labels, now.instant);
                }
                Some(tcp_record(FlowEvent::TcpClose, c, &entry.view, now))
            }
            ConnEventKindName::TcpOpen => {
                let record = tcp_record(FlowEvent::TcpOpen, c, &entry.view, now);
                open.insert(c.cookie, entry);
                Some(record)
            }
            _ => {
                open.insert(c.cookie, entry);
                None
            }
        };
        self.families.open_connections.set(open.len() as i64);
        drop(open);
        if let Some(record) = record {
            self.flows.publish(record);
        }
    }

    /// Health checking ejected `c.remote` from frontend `c.service` for `c.duration`.
    fn on_ejection(&mut self, c: &Connection, now: Now) {
        let frontend = c.service.unwrap_or(c.remote);
        let service = self
            .current
            .service(Some(frontend), c.remote, weft_abi::IPPROTO_TCP);
        let labels = ejections::ServicePortLabels {
            service: service.map_or(UNKNOWN, |s| &s.name).to_string(),
            namespace: service.map_or(UNKNOWN, |s| &s.namespace).to_string(),
            port: frontend.port(),
        };
        self.ejections
            .ejected(labels, c.remote, now.instant + c.duration);
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
        self.tcp.prune(&self.families, |l| l.is_current(dir));
        self.udp_series.prune(&self.families, |l| l.is_current(dir));
        // Ejections of frontends the agent could not name stay until they end.
        self.ejections
            .prune(|l| l.service == UNKNOWN || dir.has_service_named(&l.namespace, &l.service));
    }

    fn new_open(&mut self, c: &Connection, now: Now) -> Box<Open> {
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
        let service = dir.service(c.service, destination.0, weft_abi::IPPROTO_TCP);
        let labels = self.namer.labels(
            (reporter, Protocol::Tcp),
            source,
            destination,
            service.map(|s| &**s),
            c.security.as_ref(),
        );
        let series = self.tcp.get(&self.families, &labels);
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
                updated: now.wall,
                mesh: c.security.clone(),
                authorization: c.authorization.clone(),
            },
            series,
            connection_labels: labels.detail.is_per_connection().then(|| Box::new(labels)),
            seen: now.instant,
        })
    }

    fn on_drop(&mut self, c: &Connection) {
        let Some(d) = c.dropped else { return };
        self.families
            .dropped
            .get_or_create(&DropLabels {
                reason: d.reason,
                direction: d.direction,
                protocol: protocol_label(d.protocol),
            })
            .inc();
        self.publish_drop(c, d);
    }

    /// A stream the mesh's proxy refused (no socket saw it; counted by the proxy, in
    /// `weft_mesh_streams_refused_total`): its flow record only.
    pub fn on_refused_stream(&mut self, c: &Connection) {
        self.follow_directory();
        if let Some(d) = c.dropped {
            self.publish_drop(c, d);
        }
    }

    /// The flow record of a drop.
    fn publish_drop(&mut self, c: &Connection, d: crate::events::DropInfo) {
        let dir = Arc::clone(&self.current);
        let local = flow_end(c.local, dir.pod(c.local.ip()));
        let remote = flow_end(c.remote, dir.pod(c.remote.ip()));
        let (reporter, source, destination) = match d.direction {
            Direction::Egress => (Reporter::Source, local, remote),
            Direction::Ingress => (Reporter::Destination, remote, local),
        };
        // A connect refused for want of backends was addressed to the ClusterIP itself.
        let frontend = match d.reason {
            DropReason::NoBackends => Some(c.remote),
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
            mesh: c.security.clone(),
            authorization: c.authorization.clone(),
            ..FlowRecord::new(
                FlowEvent::Drop,
                Verdict::Denied,
                protocol_name(d.protocol),
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
        self.tcp.expire(&self.families, now);
        self.udp_series.expire(&self.families, now);
        self.ejections.expire(now);
    }

    /// Connections the kernel may have stopped tracking without their close reaching us (the
    /// ring buffer was full): quiet for `stale_after` and, says `tracked`, gone from the
    /// kernel. The caller drains the ring buffer next (a close submitted just before the
    /// lookup is then read) and passes them to [`Telemetry::forget`].
    pub fn lost_candidates(
        &self,
        stale_after: Duration,
        tracked: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Instant)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter()
            .filter(|(cookie, o)| o.seen.elapsed() >= stale_after && !tracked(**cookie))
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
                self.tcp.expire_later(*labels, Instant::now());
            }
        }
        self.families.open_connections.set(open.len() as i64);
    }

    /// Adds the increases a read of the UDP flow counters found to the metrics; ends flows
    /// that went idle or that the LRU evicted.
    pub fn apply_udp(&mut self, batch: UdpBatch) {
        self.follow_directory();
        let mut ctx = udp::Context {
            families: &self.families,
            series: &mut self.udp_series,
            directory: &self.current,
            namer: &self.namer,
        };
        let ended = self.udp.apply(batch, &mut ctx);
        for record in ended {
            self.flows.publish(record);
        }
    }
}

fn pod_name(p: Option<&Arc<PodName>>) -> Arc<str> {
    p.map_or_else(|| Arc::from(UNKNOWN), |p| Arc::clone(&p.pod))
}

/// Adds a TCP event's increases over what the table last saw to the connection's series.
fn account(entry: &mut Open, c: &Connection, now: Now) {
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
    // Zero is no sample (an update of bytes that went socket to socket): keep the last one.
    if !c.srtt.is_zero() {
        v.srtt_us = c.srtt.as_micros() as u64;
    }
    v.duration_ms = c.duration.as_millis() as u64;
    v.updated = now.wall;
    entry.seen = now.instant;
}

fn tcp_record(event: FlowEvent, c: &Connection, v: &OpenConnection, now: Now) -> FlowRecord {
    let client = c.role == Role::Client;
    let (reporter, source, destination) = if client {
        (Reporter::Source, v.local.clone(), v.remote.clone())
    } else {
        (Reporter::Destination, v.remote.clone(), v.local.clone())
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
        mesh: v.mesh.clone(),
        authorization: v.authorization.clone(),
        ..FlowRecord::at(
            now.wall,
            event,
            Verdict::Allowed,
            "TCP".to_owned(),
            reporter,
            (source, destination),
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
mod tests;
