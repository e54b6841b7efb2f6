//! The flow stream: a bounded buffer of recent flow records and live followers, in the manner
//! of `hubble observe`. Publishing never waits for a reader: a follower that falls behind
//! loses records and is told how many.
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use weft_abi::{conn::DropReason, net::Direction};

use crate::events::Outcome;

/// Which end's socket reported (Istio's `reporter`): the client's (`source`) or the
/// server's (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// What a record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowEvent {
    TcpOpen,
    TcpClose,
    /// A UDP flow that stayed idle past the timeout (its totals).
    UdpFlow,
    /// A connection or packet the datapath dropped.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    Denied,
}

/// A wall-clock time, written as RFC 3339 (UTC, milliseconds) only when serialized: records
/// are made far more often than read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub std::time::SystemTime);

impl Timestamp {
    pub fn now() -> Self {
        Self(std::time::SystemTime::now())
    }
}

/// One reading of both clocks, shared by the events handled together: reading them costs more
/// than anything else done per event.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: std::time::Instant,
    pub wall: Timestamp,
}

impl Now {
    pub fn read() -> Self {
        Self {
            instant: std::time::Instant::now(),
            wall: Timestamp::now(),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// One end of a flow (names shared with the directory, not copied per record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub address: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Arc<str>>,
}

impl FlowEnd {
    /// `namespace/pod`, or the address.
    pub fn display(&self) -> String {
        match (&self.namespace, &self.pod) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => self.address.to_string(),
        }
    }

    /// Matches `ns/pod` or a bare pod name.
    fn is_pod(&self, want: &str) -> bool {
        let Some(pod) = self.pod.as_deref() else {
            return false;
        };
        match want.split_once('/') {
            Some((ns, name)) => self.namespace.as_deref() == Some(ns) && pod == name,
            None => pod == want,
        }
    }
}

/// One flow record (a JSON line on the stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in the agent's stream (increasing, starts at 1).
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: Timestamp,
    pub event: FlowEvent,
    pub verdict: Verdict,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or the protocol number.
    pub protocol: String,
    /// Which end's socket reported it.
    pub reporter: Reporter,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    /// `namespace/name` of the Service the client addressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Arc<str>>,
    /// Payload (TCP) or IP (UDP) bytes from source to destination.
    #[serde(default)]
    pub bytes_to_destination: u64,
    /// ... and back.
    #[serde(default)]
    pub bytes_to_source: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_to_destination: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets_to_source: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmits: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<DropReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The reporting socket's cookie (0 for UDP flows).
    #[serde(default)]
    pub cookie: u64,
    /// Carried by the mesh (mutual TLS): both ends' verified identities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::events::Security>,
    /// Reported by a meshed pod's end: what its security policy decided, the deciding
    /// policy and rule, and an AUDIT rule that matched (it changes nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<crate::compile::authz::Decision>,
}

impl FlowRecord {
    /// A record of `event` between two ends, with nothing measured yet (callers fill what
    /// their event has); `seq` is set when it is published.
    pub fn new(
        event: FlowEvent,
        verdict: Verdict,
        protocol: String,
        reporter: Reporter,
        source: FlowEnd,
        destination: FlowEnd,
    ) -> Self {
        Self::at(
            Timestamp::now(),
            event,
            verdict,
            protocol,
            reporter,
            (source, destination),
        )
    }

    /// A record made at `time`.
    pub fn at(
        time: Timestamp,
        event: FlowEvent,
        verdict: Verdict,
        protocol: String,
        reporter: Reporter,
        (source, destination): (FlowEnd, FlowEnd),
    ) -> Self {
        Self {
            seq: 0,
            time,
            event,
            verdict,
            protocol,
            reporter,
            source,
            destination,
            service: None,
            bytes_to_destination: 0,
            bytes_to_source: 0,
            packets_to_destination: None,
            packets_to_source: None,
            rtt_us: None,
            retransmits: None,
            duration_us: None,
            outcome: None,
            drop_reason: None,
            direction: None,
            cookie: 0,
            mesh: None,
            authorization: None,
        }
    }
}

/// What a reader asks for (`GET /flows?...`, `weft flows`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Filter {
    /// Either end is in this namespace.
    #[arg(short = 'n', long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Either end is this pod (`ns/pod` or `pod`).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The source (client) is this pod.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<String>,
    /// The destination (server) is this pod.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    #[arg(long, value_enum)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// TCP, UDP, SCTP, ICMP, ... (case-insensitive).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let ns = |e: &FlowEnd, want: &str| e.namespace.as_deref() == Some(want);
        self.namespace
            .as_deref()
            .is_none_or(|n| ns(&r.source, n) || ns(&r.destination, n))
            && self
                .pod
                .as_deref()
                .is_none_or(|p| r.source.is_pod(p) || r.destination.is_pod(p))
            && self.from_pod.as_deref().is_none_or(|p| r.source.is_pod(p))
            && self
                .to_pod
                .as_deref()
                .is_none_or(|p| r.destination.is_pod(p))
            && self.verdict.is_none_or(|v| r.verdict == v)
            && self
                .protocol
                .as_deref()
                .is_none_or(|p| r.protocol.eq_ignore_ascii_case(p))
    }
}

/// A line of the stream that is not a record: how many records this reader lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    pub lost: u64,
}

/// The buffer and the live feed.
#[derive(Debug)]
pub struct Flows {
    recent: Mutex<VecDeque<Arc<FlowRecord>>>,
    capacity: usize,
    live: broadcast::Sender<Arc<FlowRecord>>,
    next_seq: std::sync::atomic::AtomicU64,
    /// Records followers lost, over all of them.
    lost: prometheus_client::metrics::counter::Counter,
}

impl Flows {
    /// `capacity` recent records are kept; a follower may fall `lag` records behind before
    /// it loses some.
    pub fn new(
        capacity: usize,
        lag: usize,
        lost: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let (live, _) = broadcast::channel(lag.max(1));
        Self {
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
            capacity: capacity.max(1),
            live,
            next_seq: std::sync::atomic::AtomicU64::new(1),
            lost,
        }
    }

    /// A follower fell `n` records behind.
    pub fn count_lost(&self, n: u64) {
        self.lost.inc_by(n);
    }

    /// Numbers, stores and broadcasts a record. Never waits.
    pub fn publish(&self, mut record: FlowRecord) {
        record.seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let record = Arc::new(record);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&record));
        }
        // No follower is not an error.
        let _ = self.live.send(record);
    }

    /// The last `last` buffered records matching `filter` (all of them for None), oldest first.
    pub fn recent(&self, filter: &Filter, last: Option<usize>) -> Vec<Arc<FlowRecord>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = recent
            .iter()
            .rev()
            .filter(|r| filter.matches(r))
            .take(last.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// A live feed of what is published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.live.subscribe()
    }

    /// How many records are buffered.
    pub fn len(&self) -> usize {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The protocol's name: TCP, UDP, SCTP, ICMP, ICMPv6, or None for others.
pub const fn known_protocol(protocol: u8) -> Option<&'static str> {
    match protocol {
        6 => Some("TCP"),
        17 => Some("UDP"),
        132 => Some("SCTP"),
        1 => Some("ICMP"),
        58 => Some("ICMPv6"),
        _ => None,
    }
}

/// The protocol's name in records (its number when it has no name here).
pub fn protocol_name(protocol: u8) -> String {
    known_protocol(protocol).map_or_else(|| protocol.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(ns: &str, pod: &str, addr: &str) -> FlowEnd {
        FlowEnd {
            address: addr.parse().expect("addr"),
            namespace: Some(Arc::from(ns)),
            pod: Some(Arc::from(pod)),
            workload: Some(Arc::from(pod)),
        }
    }

    fn record(
        src: (&str, &str),
        dst: (&str, &str),
        verdict: Verdict,
        protocol: &str,
    ) -> FlowRecord {
        FlowRecord::new(
            FlowEvent::TcpClose,
            verdict,
            protocol.to_owned(),
            Reporter::Source,
            end(src.0, src.1, "10.0.0.1:1"),
            end(dst.0, dst.1, "10.0.0.2:80"),
        )
    }

    #[test]
    fn filters_select_exactly_the_matching_records() {
        let flows = Flows::new(100, 10, Default::default());
        flows.publish(record(("x", "a"), ("y", "b"), Verdict::Allowed, "TCP"));
        flows.publish(record(("y", "b"), ("z", "c"), Verdict::Denied, "TCP"));
        flows.publish(record(("x", "a"), ("z", "c"), Verdict::Allowed, "UDP"));
        let seqs =
            |f: Filter| -> Vec<u64> { flows.recent(&f, None).iter().map(|r| r.seq).collect() };
        assert_eq!(seqs(Filter::default()), [1, 2, 3]);
        let ns = |n: &str| Filter {
            namespace: Some(n.into()),
            ..Filter::default()
        };
        assert_eq!(seqs(ns("x")), [1, 3]);
        assert_eq!(seqs(ns("z")), [2, 3]);
        let pod = Filter {
            pod: Some("y/b".into()),
            ..Filter::default()
        };
        assert_eq!(seqs(pod), [1, 2]);
        let from = Filter {
            from_pod: Some("b".into()),
            ..Filter::default()
        };
        assert_eq!(seqs(from), [2]);
        let to = Filter {
            to_pod: Some("z/c".into()),
            verdict: Some(Verdict::Allowed),
            ..Filter::default()
        };
        assert_eq!(seqs(to), [3]);
        let proto = Filter {
            protocol: Some("udp".into()),
            ..Filter::default()
        };
        assert_eq!(seqs(proto), [3]);
        let wrong_ns = Filter {
            pod: Some("x/b".into()),
            ..Filter::default()
        };
        assert!(seqs(wrong_ns).is_empty());
        assert_eq!(
            flows
                .recent(&Filter::default(), Some(2))
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn the_buffer_is_bounded_and_a_slow_follower_loses_records_without_blocking() {
        let flows = Flows::new(3, 2, Default::default());
        let mut slow = flows.subscribe();
        for _ in 0..10 {
            flows.publish(record(("x", "a"), ("y", "b"), Verdict::Allowed, "TCP"));
        }
        assert_eq!(flows.len(), 3);
        let kept: Vec<u64> = flows
            .recent(&Filter::default(), None)
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(kept, [8, 9, 10]);
        match slow.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 8),
            other => panic!("expected a lag of 8, got {other:?}"),
        }
        assert_eq!(slow.try_recv().expect("record").seq, 9);
    }
}
