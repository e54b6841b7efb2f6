//! Datapath health and traffic counters, read from the kernel's per-CPU maps and reported
//! periodically as structured logs (target `weft::stats`).
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap};
use weft_abi::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    stats::Counter,
    traffic::{Direction, TrafficKey, TrafficValue},
};

use crate::{cgroup, conntrack::reader::ReaderStats};

pub mod verdicts;

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
        for (counter, total) in stats.health()? {
            let last = self.health.insert(counter.name(), total).unwrap_or(0);
            if total <= last {
                continue;
            }
            let (is_problem, hint) = meaning(counter);
            if is_problem {
                tracing::warn!(
                    target: "weft::stats",
                    counter = counter.name(),
                    increase = total - last,
                    total,
                    hint,
                    "datapath counter increased"
                );
            } else {
                tracing::info!(
                    target: "weft::stats",
                    counter = counter.name(),
                    increase = total - last,
                    total,
                    hint,
                    "datapath counter increased"
                );
            }
        }
        let live = stats.prune()?;
        let traffic = stats.traffic()?;
        let mut deltas: BTreeMap<(u8, u8, u8), Totals> = BTreeMap::new();
        for (key, t) in &traffic {
            let last = self.traffic.get(key).copied().unwrap_or_default();
            let d = deltas
                .entry((key.direction, key.ip_version, key.protocol))
                .or_default();
            d.packets += t.packets.saturating_sub(last.packets);
            d.bytes += t.bytes.saturating_sub(last.bytes);
            if tracing::enabled!(target: "weft::stats", tracing::Level::DEBUG) {
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
        for (&(direction, ip_version, protocol), d) in deltas.iter().filter(|(_, d)| d.packets > 0)
        {
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
        self.traffic = traffic;
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
}

/// Whether an increase is a problem, and what it means or what to do about it.
fn meaning(counter: Counter) -> (bool, &'static str) {
    match counter {
        Counter::ConnEventsLost => (true, "raise --ring-buffer-size"),
        Counter::ConnStateFull => (true, "raise --max-connections"),
        Counter::TrafficFull => (true, "raise --traffic-entries"),
        Counter::PacketsUnparsed => (true, "packets weft could not classify"),
        Counter::CallbackFlagsFailed => (
            true,
            "the kernel refused sock_ops callbacks; some connections went untracked",
        ),
        Counter::ServiceNoBackends => (
            false,
            "connections to services without ready endpoints were refused",
        ),
        Counter::ServiceSlotMissing => (
            true,
            "a service's backend set was incomplete in the kernel (a weft bug): connections \
             were refused",
        ),
        Counter::RevNatFailed => (
            true,
            "the kernel could not store a reverse translation: getpeername/recvmsg may show a \
             backend address",
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
    if direction == Direction::Egress as u8 {
        "egress"
    } else {
        "ingress"
    }
}
