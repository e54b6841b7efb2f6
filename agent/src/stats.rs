//! Datapath health and traffic counters, read from the kernel's per-CPU maps and reported
//! periodically as structured logs (target `weft::stats`).
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use prometheus_client::registry::Registry;
use weft_abi::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    net::Direction,
    stats::Counter,
    traffic::{TrafficKey, TrafficValue},
};

use crate::{
    cgroup,
    datapath::{Datapath, Pins, metrics::MapMetrics},
    events::reader::ReaderStats,
};

pub mod verdicts;

/// The stats flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// How often datapath counters are reported, e.g. `30s` or `500ms`.
    #[arg(long, default_value = "30s", value_parser = crate::parse_positive_duration)]
    pub stats_interval: Duration,
}

/// The datapath's counters, reported every interval: health and traffic in the logs, every
/// map's fill as metrics; verdicts and drops read at each scrape.
#[derive(Debug)]
pub struct Stats {
    reader: StatsReader,
    report: Reporter,
    pins: Pins,
    maps: MapMetrics,
    /// A count of every map's entries is running off the event loop.
    counting: Arc<AtomicBool>,
}

impl Stats {
    /// Takes the counter maps and registers the scrape-time collector.
    pub fn new(
        datapath: &mut Datapath,
        cgroup_root: &Path,
        maps: MapMetrics,
        registry: &mut Registry,
    ) -> Result<Self, crate::datapath::Error> {
        registry.register_collector(Box::new(verdicts::VerdictCollector::new(
            datapath.take(weft_abi::maps::VERDICTS)?,
            datapath.open_pinned(weft_abi::maps::STATS)?,
        )));
        let stats = Self {
            reader: StatsReader::new(
                datapath.take(weft_abi::maps::STATS)?,
                datapath.take(weft_abi::maps::TRAFFIC)?,
                cgroup_root,
            ),
            report: Reporter::default(),
            pins: datapath.pins().clone(),
            maps,
            counting: Arc::default(),
        };
        stats.count_maps();
        Ok(stats)
    }

    /// Logs what changed since the last report and counts every map's entries.
    pub fn tick(&mut self, events: ReaderStats) -> Result<(), Error> {
        self.report.tick(&mut self.reader, events)?;
        self.count_maps();
        Ok(())
    }

    /// Counts every map's entries off the event loop (walking a big map takes a syscall per
    /// key) and publishes fill ratios; skipped while the previous count still runs.
    fn count_maps(&self) {
        if self.counting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (busy, pins, maps) = (
            Arc::clone(&self.counting),
            self.pins.clone(),
            self.maps.clone(),
        );
        tokio::task::spawn_blocking(move || {
            match crate::datapath::map_usage(&pins) {
                Ok(usage) => maps.set_usage(&usage),
                Err(e) => {
                    tracing::warn!(target: "weft::stats", error = %crate::chain(&e), "cannot count map entries")
                }
            }
            busy.store(false, Ordering::Release);
        });
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Health counters summed over CPUs, in `Counter` order.
pub type Health = [(Counter, u64); Counter::ALL.len()];

/// Traffic totals for one (cgroup, direction, ip version, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the counters and prunes traffic of cgroups that no longer exist.
pub struct StatsReader {
    health: PerCpuArray<MapData, u64>,
    traffic: PerCpuHashMap<MapData, TrafficKey, TrafficValue>,
    cgroup_root: PathBuf,
}

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsReader")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

impl StatsReader {
    pub fn new(
        health: PerCpuArray<MapData, u64>,
        traffic: PerCpuHashMap<MapData, TrafficKey, TrafficValue>,
        cgroup_root: &Path,
    ) -> Self {
        Self {
            health,
            traffic,
            cgroup_root: cgroup_root.to_owned(),
        }
    }

    pub fn health(&self) -> Result<Health, Error> {
        let mut out = Counter::ALL.map(|c| (c, 0));
        for (c, total) in &mut out {
            let values = self
                .health
                .get(&(*c as u32), 0)
                .map_err(|source| Error::Read {
                    map: weft_abi::maps::STATS,
                    source,
                })?;
            *total = values.iter().sum();
        }
        Ok(out)
    }

    /// Totals per key, summed over CPUs.
    pub fn traffic(&self) -> Result<BTreeMap<TrafficKey, Totals>, Error> {
        let mut out = BTreeMap::new();
        for entry in self.traffic.iter() {
            let (key, values) = entry.map_err(|source| Error::Read {
                map: weft_abi::maps::TRAFFIC,
                source,
            })?;
            let t = values.iter().fold(Totals::default(), |acc, v| Totals {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            });
            out.insert(key, t);
        }
        Ok(out)
    }

    /// Deletes traffic keys of cgroups that are gone; returns the live cgroups by id.
    ///
    /// The keys are read before the cgroups are listed, so a key always belongs to a cgroup
    /// that existed before the listing: one missing from it is really gone. Nothing is deleted
    /// when the listing is incomplete.
    pub fn prune(&mut self) -> Result<HashMap<u64, PathBuf>, Error> {
        let keys: Vec<TrafficKey> =
            self.traffic
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| Error::Read {
                    map: weft_abi::maps::TRAFFIC,
                    source,
                })?;
        let walk = cgroup::walk(&self.cgroup_root);
        let live: HashMap<u64, PathBuf> = walk.cgroups.into_iter().collect();
        if !walk.complete {
            tracing::warn!(
                target: "weft::stats",
                root = %self.cgroup_root.display(),
                "cgroup listing incomplete; traffic counters of removed cgroups are kept for now"
            );
            return Ok(live);
        }
        for key in keys.iter().filter(|k| !live.contains_key(&k.cgroup_id)) {
            match self.traffic.remove(key) {
                Ok(()) => {}
                // Already gone: nothing to do.
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => tracing::warn!(
                    target: "weft::stats",
                    cgroup_id = key.cgroup_id,
                    error = %e,
                    "cannot delete the traffic counter of a removed cgroup"
                ),
            }
        }
        Ok(live)
    }
}

/// Reports health and traffic periodically: what changed since the last report.
#[derive(Debug, Default)]
pub struct Reporter {
    health: BTreeMap<&'static str, u64>,
    /// Last totals per key: deltas are per key, so pruned keys never hide new traffic.
    traffic: BTreeMap<TrafficKey, Totals>,
    events: u64,
}

impl Reporter {
    /// Logs every health counter that increased, traffic per direction, IP version and
    /// protocol (debug: per cgroup), and the reader's counts.
    pub fn tick(&mut self, stats: &mut StatsReader, reader: ReaderStats) -> Result<(), Error> {
        for (counter, increase, total) in self.health_increases(stats.health()?) {
            let (is_problem, hint) = meaning(counter);
            let counter = counter.as_str();
            if is_problem {
                tracing::warn!(target: "weft::stats", counter, increase, total, hint, "datapath counter increased");
            } else {
                tracing::info!(target: "weft::stats", counter, increase, total, hint, "datapath counter increased");
            }
        }
        let live = stats.prune()?;
        let traffic = stats.traffic()?;
        if tracing::enabled!(target: "weft::stats", tracing::Level::DEBUG) {
            log_traffic_by_cgroup(&traffic, &live);
        }
        for (&(direction, ip_version, protocol), d) in &self.traffic_increases(traffic) {
            tracing::info!(
                target: "weft::stats",
                direction = direction_name(direction),
                ip_version,
                protocol = protocol_name(protocol),
                packets = d.packets,
                bytes = d.bytes,
                "traffic since the last report"
            );
        }
        if reader.events != self.events {
            tracing::debug!(
                target: "weft::stats",
                events = reader.events,
                malformed = reader.malformed,
                "connection events"
            );
            self.events = reader.events;
        }
        Ok(())
    }

    /// (counter, increase, total) of every health counter that grew since the last report.
    fn health_increases(&mut self, health: Health) -> Vec<(Counter, u64, u64)> {
        health
            .into_iter()
            .filter_map(|(counter, total)| {
                let last = self.health.insert(counter.as_str(), total).unwrap_or(0);
                (total > last).then_some((counter, total - last, total))
            })
            .collect()
    }

    /// Traffic since the last report per (direction, IP version, protocol), only where some
    /// moved. Increases are taken per key, so a key pruned meanwhile never hides new traffic.
    fn traffic_increases(
        &mut self,
        traffic: BTreeMap<TrafficKey, Totals>,
    ) -> BTreeMap<(u8, u8, u8), Totals> {
        let mut deltas: BTreeMap<(u8, u8, u8), Totals> = BTreeMap::new();
        for (key, t) in &traffic {
            let last = self.traffic.get(key).copied().unwrap_or_default();
            let d = deltas
                .entry((key.direction, key.ip_version, key.protocol))
                .or_default();
            d.packets += t.packets.saturating_sub(last.packets);
            d.bytes += t.bytes.saturating_sub(last.bytes);
        }
        self.traffic = traffic;
        deltas.retain(|_, d| d.packets > 0);
        deltas
    }
}

fn log_traffic_by_cgroup(traffic: &BTreeMap<TrafficKey, Totals>, live: &HashMap<u64, PathBuf>) {
    for (key, t) in traffic {
        let cgroup = live
            .get(&key.cgroup_id)
            .map_or_else(|| key.cgroup_id.to_string(), |p| p.display().to_string());
        tracing::debug!(
            target: "weft::stats",
            cgroup,
            direction = direction_name(key.direction),
            ip_version = key.ip_version,
            protocol = protocol_name(key.protocol),
            packets = t.packets,
            bytes = t.bytes,
            "traffic by cgroup (totals)"
        );
    }
}

/// Whether an increase is a problem, and what it means or what to do about it.
fn meaning(counter: Counter) -> (bool, &'static str) {
    match counter {
        Counter::ConnEventsLost => (true, "raise --ring-buffer-size"),
        Counter::ConnStateFull => (
            true,
            "raise --max-connections (or the agent's memory limit: CONN_STATE is allocated as connections open)",
        ),
        Counter::TrafficFull => (true, "raise --traffic-entries"),
        Counter::PacketsUnparsed => (true, "packets weft could not classify"),
        Counter::ConnectTimeoutFailed => (
            true,
            "the kernel refused a Service's connect timeout on a socket (it kept the kernel's \
             bound of about two minutes), or refused to give a socket back its own user timeout",
        ),
        Counter::CallbackFlagsFailed => (
            true,
            "the kernel refused sock_ops callbacks; some connections went untracked",
        ),
        Counter::ServiceNoBackends => (
            false,
            "connections to services without ready endpoints were refused",
        ),
        Counter::RevNatShared => (
            false,
            "an unconnected UDP socket reached one backend through two ClusterIPs: its replies \
             show the one dialled last",
        ),
        Counter::TornRead => (
            false,
            "a map value was read while being replaced and read again (one still torn after \
             that failed safe: a connect denied, a pod judged as not bound)",
        ),
        Counter::ServiceSlotMissing => (
            true,
            "a service's backend set was incomplete in the kernel (a weft bug): connections \
             were refused",
        ),
        Counter::SockStateFailed => (
            true,
            "the kernel had no memory for a socket's storage: a translation or an allowed \
             exchange was not remembered (getpeername/recvmsg may show a backend; replies may \
             be judged again)",
        ),
        Counter::FlowOverflow => (
            false,
            "a socket with more live UDP/SCTP/echo peers than its own storage holds (a server) \
             put one in the node-wide POLICY_FLOWS; raise --max-policy-flows if it fills",
        ),
        Counter::SockmapFull => (
            true,
            "with --sockmap, a TCP socket could not be paired (raise --max-sockmap-connections): \
             its data takes the TCP/IP stack, fully counted",
        ),
        Counter::MeshCaptureFailed => (
            true,
            "a meshed pod's connection could not be captured (no socket state, or MESH_ORIG \
             refused the entry): it was refused, never sent in plaintext",
        ),
        Counter::SockStateOverBudget => (
            true,
            "a pod (or the node) holds as many socket states as --max-socket-states-per-pod \
             (--max-socket-states) allow: its new sockets' translations and exchanges are not \
             remembered (replies judged again, recvmsg shows backends)",
        ),
        Counter::DropEventsSuppressed => (
            false,
            "more drops than a CPU reports per second: the rest are counted, not reported one by one",
        ),
    }
}

/// `tcp`, `udp`, ... for a protocol number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => "icmp".into(),
        IPPROTO_SCTP => "sctp".into(),
        other => format!("ip-proto-{other}"),
    }
}

pub fn direction_name(direction: u8) -> &'static str {
    Direction::from_u8(direction).map_or("unknown", Direction::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(values: [u64; 2]) -> Health {
        let mut h = Counter::ALL.map(|c| (c, 0));
        h[0].1 = values[0];
        h[1].1 = values[1];
        h
    }

    #[test]
    fn only_counters_that_grew_are_reported_with_their_increase() {
        let mut r = Reporter::default();
        assert_eq!(
            r.health_increases(health([3, 0])),
            [(Counter::ConnEventsLost, 3, 3)]
        );
        assert_eq!(r.health_increases(health([3, 0])), []);
        assert_eq!(
            r.health_increases(health([5, 1])),
            [
                (Counter::ConnEventsLost, 2, 5),
                (Counter::ConnStateFull, 1, 1)
            ]
        );
    }

    fn key(cgroup_id: u64, direction: Direction) -> TrafficKey {
        TrafficKey {
            cgroup_id,
            direction: direction as u8,
            ip_version: 4,
            protocol: IPPROTO_UDP,
            ..TrafficKey::default()
        }
    }

    fn totals(packets: u64, bytes: u64) -> Totals {
        Totals { packets, bytes }
    }

    #[test]
    fn traffic_is_summed_per_direction_and_protocol_since_the_last_report() {
        let mut r = Reporter::default();
        let first = BTreeMap::from([
            (key(1, Direction::Egress), totals(2, 200)),
            (key(2, Direction::Egress), totals(1, 100)),
            (key(1, Direction::Ingress), totals(1, 50)),
        ]);
        let d = r.traffic_increases(first);
        let egress = (Direction::Egress as u8, 4, IPPROTO_UDP);
        let ingress = (Direction::Ingress as u8, 4, IPPROTO_UDP);
        assert_eq!(d[&egress], totals(3, 300));
        assert_eq!(d[&ingress], totals(1, 50));
        // Cgroup 2 was pruned; cgroup 1 sent one more packet; nothing came in.
        let second = BTreeMap::from([
            (key(1, Direction::Egress), totals(3, 260)),
            (key(1, Direction::Ingress), totals(1, 50)),
        ]);
        assert_eq!(
            r.traffic_increases(second),
            BTreeMap::from([(egress, totals(1, 60))])
        );
    }

    #[test]
    fn names_of_protocols_and_directions() {
        assert_eq!(protocol_name(IPPROTO_ICMPV6), "icmp");
        assert_eq!(protocol_name(99), "ip-proto-99");
        assert_eq!(direction_name(1), "egress");
        assert_eq!(direction_name(7), "unknown");
    }
}
