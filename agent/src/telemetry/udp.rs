//! UDP flows: what each read of the kernel's counters (`events::udp`) adds to the metrics,
//! and a flow record when a flow ends (idle past the timeout, or evicted by the LRU).
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use weft_abi::{
    net::{Direction, words_ip},
    traffic::{UdpFlowStatsKey, UdpFlowStatsValue},
};

use super::{
    Namer, flow_end,
    flows::{FlowEvent, FlowRecord, Reporter, Verdict},
    metrics::{ConnLabels, Families, Protocol, SeriesCache, UdpSeries},
};
use crate::{compile::names::Directory, events::udp::UdpBatch};

/// A flow being counted: what the last read saw of it.
#[derive(Debug)]
struct UdpFlow {
    last: UdpFlowStatsValue,
    series: Arc<UdpSeries>,
    /// Only per-connection series need their labels again (to expire them).
    connection_labels: Option<Box<ConnLabels>>,
}

/// What applying a read needs of the rest of telemetry.
#[derive(Debug)]
pub struct Context<'a> {
    pub families: &'a Families,
    pub series: &'a mut SeriesCache<UdpSeries>,
    pub directory: &'a Directory,
    pub namer: &'a Namer,
}

/// The flows being counted, by the kernel's key.
#[derive(Debug, Default)]
pub struct UdpFlows {
    flows: HashMap<UdpFlowStatsKey, UdpFlow>,
}

impl UdpFlows {
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Adds the increases `batch` found to the metrics; ends flows that went idle or that
    /// the LRU evicted (a flow recreated since the last read starts from zero). Returns the
    /// records of the flows that ended.
    pub fn apply(&mut self, batch: UdpBatch, ctx: &mut Context<'_>) -> Vec<FlowRecord> {
        let mut ended = Vec::new();
        let mut present = HashSet::with_capacity(batch.flows.len());
        for sample in batch.flows {
            let (key, value) = (sample.key, sample.value);
            present.insert(key);
            let recreated = self
                .flows
                .get(&key)
                .is_some_and(|f| f.last.first_ns != 0 && f.last.first_ns != value.first_ns);
            if recreated {
                ended.extend(self.end(&key, ctx));
            }
            let flow = self
                .flows
                .entry(key)
                .or_insert_with(|| start(&key, &value, ctx));
            account(flow, &value);
            if sample.ended {
                ended.extend(self.end(&key, ctx));
            }
        }
        // Flows the LRU evicted end too, with what was last read of them.
        let evicted: Vec<UdpFlowStatsKey> = self
            .flows
            .keys()
            .filter(|k| !present.contains(*k))
            .copied()
            .collect();
        for key in evicted {
            ended.extend(self.end(&key, ctx));
        }
        ended
    }

    fn end(&mut self, key: &UdpFlowStatsKey, ctx: &mut Context<'_>) -> Option<FlowRecord> {
        let flow = self.flows.remove(key)?;
        flow.series.closed.inc();
        if let Some(labels) = flow.connection_labels {
            ctx.series.expire_later(*labels, Instant::now());
        }
        Some(record(key, &flow.last, ctx.directory))
    }
}

/// A flow seen for the first time: its series, counted as opened.
fn start(key: &UdpFlowStatsKey, value: &UdpFlowStatsValue, ctx: &mut Context<'_>) -> UdpFlow {
    let (reporter, src, dst) = ends(key, value);
    let dir = ctx.directory;
    let service = dir.service(None, dst, weft_abi::IPPROTO_UDP);
    let labels = ctx.namer.labels(
        (reporter, Protocol::Udp),
        (src, dir.pod(src.ip())),
        (dst, dir.pod(dst.ip())),
        service.map(|s| &**s),
        None,
    );
    let series = ctx.series.get(ctx.families, &labels);
    series.opened.inc();
    UdpFlow {
        last: UdpFlowStatsValue::default(),
        series,
        connection_labels: labels.detail.is_per_connection().then(|| Box::new(labels)),
    }
}

/// Whether the local socket sent the flow's first packet.
fn local_started(value: &UdpFlowStatsValue) -> bool {
    Direction::from_u32(value.initiator) == Some(Direction::Egress)
}

/// (reporter, source, destination) of a UDP flow: the side that sent first is the source.
fn ends(key: &UdpFlowStatsKey, value: &UdpFlowStatsValue) -> (Reporter, SocketAddr, SocketAddr) {
    let local = SocketAddr::new(
        words_ip(key.family, key.local),
        u16::from_be(key.local_port),
    );
    let remote = SocketAddr::new(
        words_ip(key.family, key.remote),
        u16::from_be(key.remote_port),
    );
    if local_started(value) {
        (Reporter::Source, local, remote)
    } else {
        (Reporter::Destination, remote, local)
    }
}

fn record(key: &UdpFlowStatsKey, v: &UdpFlowStatsValue, dir: &Directory) -> FlowRecord {
    let (reporter, src, dst) = ends(key, v);
    let ((to_dst_packets, to_dst_bytes), (to_src_packets, to_src_bytes)) = if local_started(v) {
        ((v.tx_packets, v.tx_bytes), (v.rx_packets, v.rx_bytes))
    } else {
        ((v.rx_packets, v.rx_bytes), (v.tx_packets, v.tx_bytes))
    };
    FlowRecord {
        service: dir
            .service(None, dst, weft_abi::IPPROTO_UDP)
            .map(|s| Arc::clone(&s.key)),
        bytes_to_destination: to_dst_bytes,
        bytes_to_source: to_src_bytes,
        packets_to_destination: Some(to_dst_packets),
        packets_to_source: Some(to_src_packets),
        duration_us: Some(v.last_ns.saturating_sub(v.first_ns) / 1000),
        ..FlowRecord::new(
            FlowEvent::UdpFlow,
            Verdict::Allowed,
            "UDP".to_owned(),
            reporter,
            flow_end(src, dir.pod(src.ip())),
            flow_end(dst, dir.pod(dst.ip())),
        )
    }
}

/// Adds a UDP flow's increases since the last read to its series.
fn account(flow: &mut UdpFlow, v: &UdpFlowStatsValue) {
    let d = |new: u64, old: u64| new.saturating_sub(old);
    let tx = (
        d(v.tx_packets, flow.last.tx_packets),
        d(v.tx_bytes, flow.last.tx_bytes),
    );
    let rx = (
        d(v.rx_packets, flow.last.rx_packets),
        d(v.rx_bytes, flow.last.rx_bytes),
    );
    // The initiator's packets are the requests.
    let (request, response) = if local_started(v) { (tx, rx) } else { (rx, tx) };
    let s = &flow.series;
    s.request_packets.inc_by(request.0);
    s.request_bytes.inc_by(request.1);
    s.response_packets.inc_by(response.0);
    s.response_bytes.inc_by(response.1);
    flow.last = *v;
}

#[cfg(test)]
mod tests;
