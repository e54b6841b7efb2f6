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

use crate::cgroup;

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
    /// that existed before the listing: one missing from it is really gone.
    pub fn prune(&mut self) -> Result<HashMap<u64, PathBuf>, Error> {
        let keys: Vec<TrafficKey> =
            self.traffic
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| Error::Read {
                    map: weft_abi::maps::TRAFFIC,
                    source,
                })?;
        let live: HashMap<u64, PathBuf> = cgroup::walk(&self.cgroup_root).into_iter().collect();
        for key in keys.iter().filter(|k| !live.contains_key(&k.cgroup_id)) {
            // Already gone is fine: another pass may have removed it.
            let _ = self.traffic.remove(key);
        }
        Ok(live)
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
