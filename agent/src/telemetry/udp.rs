//! UDP flow metrics: the kernel counts packets and bytes per flow of a local socket
//! (`UDP_FLOW_STATS`); every interval the agent turns increases into metrics and ends flows
//! idle past the timeout.
use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use aya::maps::{HashMap as BpfHashMap, MapData};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use weft_abi::traffic::{Direction as KernelDirection, UdpFlowStatsKey, UdpFlowStatsValue};

use super::{
    Error, Kind, Telemetry, UdpFlow, flow_end,
    flows::{FlowEvent, FlowRecord, Verdict},
    metrics::{ConnLabels, Detail, Reporter},
};
use crate::compile::words_ip;

/// UDP metrics, labelled like TCP's (`request_protocol="udp"`). `sent` is the destination's
/// side (responses), `received` the requests, as in Istio.
#[derive(Debug, Clone, Default)]
pub struct UdpMetrics {
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    sent_bytes: Family<ConnLabels, Counter>,
    received_bytes: Family<ConnLabels, Counter>,
    sent_packets: Family<ConnLabels, Counter>,
    received_packets: Family<ConnLabels, Counter>,
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

impl UdpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_udp_flows_opened",
            "UDP flows seen for the first time (a local socket and a peer)",
            self.opened.clone(),
        );
        registry.register(
            "weft_udp_flows_closed",
            "UDP flows ended by the idle timeout",
            self.closed.clone(),
        );
        registry.register(
            "weft_udp_sent_bytes",
            "IP bytes the destination sent (responses)",
            self.sent_bytes.clone(),
        );
        registry.register(
            "weft_udp_received_bytes",
            "IP bytes the destination received (requests)",
            self.received_bytes.clone(),
        );
        registry.register(
            "weft_udp_sent_packets",
            "Packets the destination sent (responses)",
            self.sent_packets.clone(),
        );
        registry.register(
            "weft_udp_received_packets",
            "Packets the destination received (requests)",
            self.received_packets.clone(),
        );
    }

    pub fn series(&self, labels: &ConnLabels) -> UdpSeries {
        UdpSeries {
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            response_bytes: self.sent_bytes.get_or_create(labels).clone(),
            request_bytes: self.received_bytes.get_or_create(labels).clone(),
            response_packets: self.sent_packets.get_or_create(labels).clone(),
            request_packets: self.received_packets.get_or_create(labels).clone(),
        }
    }

    pub fn remove(&self, labels: &ConnLabels) {
        for f in [
            &self.opened,
            &self.closed,
            &self.sent_bytes,
            &self.received_bytes,
            &self.sent_packets,
            &self.received_packets,
        ] {
            f.remove(labels);
        }
    }
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The UDP flow counters as one read saw them.
#[derive(Debug)]
pub struct UdpBatch {
    /// Every flow in the map, and whether it was idle past the timeout (then it was deleted
    /// from the map right after the read).
    pub flows: Vec<(UdpFlowStatsKey, UdpFlowStatsValue, bool)>,
}

/// The kernel map, shared with the blocking reads.
pub type UdpMap = Arc<std::sync::Mutex<BpfHashMap<MapData, UdpFlowStatsKey, UdpFlowStatsValue>>>;

/// Reads every flow (two syscalls each: off the event loop) and deletes those idle longer
/// than `idle`. A packet counted between the read and the delete is lost; the next one starts
/// a new flow.
pub fn read(map: &UdpMap, idle: Duration) -> Result<UdpBatch, Error> {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    let entries: Vec<(UdpFlowStatsKey, UdpFlowStatsValue)> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|source| Error::Map {
        map: weft_abi::maps::UDP_FLOW_STATS,
        source,
    })?;
    let now = coarse_now_ns();
    let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
    let flows = entries
        .into_iter()
        .map(|(key, value)| {
            let ended = now.saturating_sub(value.last_ns) > idle;
            if ended {
                // Gone already (evicted) is as good.
                let _ = map.remove(&key);
            }
            (key, value, ended)
        })
        .collect();
    Ok(UdpBatch { flows })
}

impl Telemetry {
    /// A read of the UDP flow counters to run off the event loop, unless one is running.
    pub fn udp_read_job(
        &mut self,
    ) -> Option<impl FnOnce() -> Result<UdpBatch, Error> + Send + 'static> {
        let map = Arc::clone(self.udp_map.as_ref()?);
        if self.udp_reading {
            return None;
        }
        self.udp_reading = true;
        let idle = self.config.udp_idle;
        Some(move || read(&map, idle))
    }

    /// Adds the increases a read found to the metrics; ends flows that went idle or that the
    /// LRU evicted (a flow recreated since the last read starts from zero).
    pub fn apply_udp(&mut self, batch: Result<UdpBatch, Error>) -> Result<(), Error> {
        self.udp_reading = false;
        self.follow_directory();
        let batch = batch?;
        let mut present = HashSet::with_capacity(batch.flows.len());
        for (key, value, ended) in batch.flows {
            present.insert(key);
            let recreated = self
                .udp
                .get(&key)
                .is_some_and(|f| f.last.first_ns != 0 && f.last.first_ns != value.first_ns);
            if recreated {
                self.end_udp(&key);
            }
            if !self.udp.contains_key(&key) {
                let (series, labels) = self.udp_series_for(&key, &value);
                series.opened.inc();
                self.udp.insert(
                    key,
                    UdpFlow {
                        last: UdpFlowStatsValue::default(),
                        series,
                        connection_labels: matches!(labels.detail, Detail::Connection { .. })
                            .then(|| Box::new(labels)),
                    },
                );
            }
            if let Some(flow) = self.udp.get_mut(&key) {
                udp_account(flow, &value);
            }
            if ended {
                self.end_udp(&key);
            }
        }
        // Flows the LRU evicted end too, with what was last read of them.
        let evicted: Vec<UdpFlowStatsKey> = self
            .udp
            .keys()
            .filter(|k| !present.contains(*k))
            .copied()
            .collect();
        for key in evicted {
            self.end_udp(&key);
        }
        Ok(())
    }

    fn end_udp(&mut self, key: &UdpFlowStatsKey) {
        if let Some(flow) = self.udp.remove(key) {
            flow.series.closed.inc();
            self.flows.publish(self.udp_record(key, &flow.last));
            if let Some(labels) = flow.connection_labels {
                self.expiring.push_back((
                    std::time::Instant::now() + self.config.connection_series_ttl,
                    Kind::Udp,
                    *labels,
                ));
            }
        }
    }

    /// (reporter, source, destination) of a UDP flow: the side that sent first is the source.
    fn udp_ends(
        &self,
        key: &UdpFlowStatsKey,
        value: &UdpFlowStatsValue,
    ) -> (Reporter, SocketAddr, SocketAddr) {
        let local = SocketAddr::new(
            words_ip(key.family, key.local),
            u16::from_be(key.local_port),
        );
        let remote = SocketAddr::new(
            words_ip(key.family, key.remote),
            u16::from_be(key.remote_port),
        );
        if value.initiator == KernelDirection::Egress as u32 {
            (Reporter::Source, local, remote)
        } else {
            (Reporter::Destination, remote, local)
        }
    }

    fn udp_series_for(
        &mut self,
        key: &UdpFlowStatsKey,
        value: &UdpFlowStatsValue,
    ) -> (Arc<UdpSeries>, ConnLabels) {
        let (reporter, src, dst) = self.udp_ends(key, value);
        let dir = Arc::clone(&self.current);
        let service = dir.service(None, dst, weft_abi::IPPROTO_UDP).cloned();
        let labels = self.labels(
            reporter,
            "udp",
            (src, dir.pod(src.ip())),
            (dst, dir.pod(dst.ip())),
            service,
        );
        let metrics = &self.metrics;
        let series = Arc::clone(
            self.udp_series
                .entry(labels.clone())
                .or_insert_with(|| Arc::new(metrics.udp.series(&labels))),
        );
        (series, labels)
    }

    fn udp_record(&self, key: &UdpFlowStatsKey, v: &UdpFlowStatsValue) -> FlowRecord {
        let (reporter, src, dst) = self.udp_ends(key, v);
        let dir = &self.current;
        let out = reporter == Reporter::Source;
        let (to_dst, to_src) = if out {
            ((v.tx_packets, v.tx_bytes), (v.rx_packets, v.rx_bytes))
        } else {
            ((v.rx_packets, v.rx_bytes), (v.tx_packets, v.tx_bytes))
        };
        FlowRecord {
            service: dir
                .service(None, dst, weft_abi::IPPROTO_UDP)
                .map(|s| Arc::clone(&s.key)),
            bytes_to_destination: to_dst.1,
            bytes_to_source: to_src.1,
            packets_to_destination: Some(to_dst.0),
            packets_to_source: Some(to_src.0),
            duration_us: Some(v.last_ns.saturating_sub(v.first_ns) / 1000),
            ..FlowRecord::new(
                FlowEvent::UdpFlow,
                Verdict::Allowed,
                "UDP".to_owned(),
                reporter.as_str(),
                flow_end(src, dir.pod(src.ip())),
                flow_end(dst, dir.pod(dst.ip())),
            )
        }
    }
}

/// Adds a UDP flow's increases since the last read to its series.
fn udp_account(flow: &mut UdpFlow, v: &UdpFlowStatsValue) {
    let d = |new: u64, old: u64| new.saturating_sub(old);
    let (tx, rx) = (
        (
            d(v.tx_packets, flow.last.tx_packets),
            d(v.tx_bytes, flow.last.tx_bytes),
        ),
        (
            d(v.rx_packets, flow.last.rx_packets),
            d(v.rx_bytes, flow.last.rx_bytes),
        ),
    );
    // The initiator's packets are the requests.
    let (request, response) = if v.initiator == KernelDirection::Egress as u32 {
        (tx, rx)
    } else {
        (rx, tx)
    };
    let s = &flow.series;
    s.request_packets.inc_by(request.0);
    s.request_bytes.inc_by(request.1);
    s.response_packets.inc_by(response.0);
    s.response_bytes.inc_by(response.1);
    flow.last = *v;
}
