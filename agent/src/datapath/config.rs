//! How the datapath is sized, and what every map must look like, pinned or new.
use std::path::PathBuf;

use aya::maps::MapType;
use aya::maps::lpm_trie::Key;
use weft_abi::{
    conn::{ConnState, DropBudget},
    maps,
    policy::{
        EndpointInfo, IpcacheData, IpcacheValue, PolicyData, PolicyFlowKey, PolicyValue, VERDICTS,
    },
    stats::COUNTERS,
    svc::{
        AffinityKey, AffinityValue, Endpoint, MemberKey, RevNatKey, ServiceKey, ServiceValue,
        SlotKey, UdpFlowKey, UdpSock,
    },
    traffic::{TrafficKey, TrafficValue, UdpFlowStatsKey, UdpFlowStatsValue},
};

use super::Error;

/// aya-log-ebpf's ring buffer size (fixed by that crate).
const AYA_LOGS_BYTES: u32 = 1 << 17;

/// How the agent's datapath is sized and where it lives.
#[derive(Debug, Clone)]
pub struct Config {
    /// cgroup v2 directory whose processes (and descendants) weft observes.
    pub cgroup: PathBuf,
    /// bpffs mount point.
    pub bpffs: PathBuf,
    /// Names the pin directory; one agent per instance.
    pub instance: String,
    /// Capacity of `CONN_STATE` (open connections tracked at once).
    pub max_connections: u32,
    /// Capacity of `TRAFFIC` (cgroup x direction x protocol keys).
    pub traffic_entries: u32,
    /// Size of the connection event ring buffer in bytes (power of two, >= page size).
    pub ring_buffer_bytes: u32,
    /// aya-log level compiled into the kernel programs' view: 0 = off .. 5 = trace.
    pub kernel_log_level: u8,
    /// Pending bytes in `CONN_EVENTS` that wake the reader (0: every event).
    pub events_wakeup_bytes: u64,
    /// Capacity of `SERVICES` (frontends: ClusterIP x port x protocol).
    pub max_services: u32,
    /// Capacity of `BACKEND_SLOTS` and `MEMBERS`. A backend set being replaced holds its old
    /// and new slots for a moment, so leave headroom over the total number of backends.
    pub max_backends: u32,
    /// Capacity of `AFFINITY` (LRU: client pods x services with ClientIP affinity).
    pub max_affinity: u32,
    /// Capacity of `REVNAT` and `UDP_FLOWS` (LRU: sockets talking to services).
    pub max_socket_translations: u32,
    /// Capacity of `ENDPOINTS` (local pods).
    pub max_endpoints: u32,
    /// Capacity of `IPCACHE` (pod addresses and ipBlock prefixes).
    pub max_ipcache: u32,
    /// Capacity of `POLICY` (entries of every policy set).
    pub max_policy_entries: u32,
    /// Capacity of `POLICY_FLOWS` (LRU: UDP/SCTP exchanges of pods).
    pub max_policy_flows: u32,
    /// cgroup level of `cgroup` (0 = the cgroup2 mount), for the kernel's pod lookups.
    pub cgroup_level: u32,
    /// An open connection reports its counters at most this often (0: only at open/close).
    pub conn_update_interval_ns: u64,
    /// 1: connection and drop events are written; 0: telemetry off.
    pub conn_events_enabled: u32,
    /// Capacity of `UDP_FLOW_STATS` (LRU: UDP flows of local sockets).
    pub max_udp_flows: u32,
}

impl Config {
    pub(super) fn validate(&self) -> Result<(), Error> {
        let page = page_size();
        if self.events_wakeup_bytes >= u64::from(self.ring_buffer_bytes) / 2 {
            return Err(Error::InvalidCapacity {
                flag: "--events-wakeup-bytes",
                value: u32::try_from(self.events_wakeup_bytes).unwrap_or(u32::MAX),
                reason: "must be less than half of --ring-buffer-size, or events would be lost \
                         before the reader wakes",
            });
        }
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < page {
            return Err(Error::InvalidCapacity {
                flag: "--ring-buffer-size",
                value: self.ring_buffer_bytes,
                reason: "must be a power of two of at least one page",
            });
        }
        for (flag, value) in [
            ("--max-connections", self.max_connections),
            ("--traffic-entries", self.traffic_entries),
            ("--max-services", self.max_services),
            ("--max-backends", self.max_backends),
            ("--max-affinity", self.max_affinity),
            ("--max-socket-translations", self.max_socket_translations),
            ("--max-endpoints", self.max_endpoints),
            ("--max-ipcache", self.max_ipcache),
            ("--max-policy-entries", self.max_policy_entries),
            ("--max-policy-flows", self.max_policy_flows),
            ("--max-udp-flows", self.max_udp_flows),
        ] {
            if value == 0 {
                return Err(Error::InvalidCapacity {
                    flag,
                    value,
                    reason: "must be at least 1",
                });
            }
        }
        Ok(())
    }

    /// What every map must look like, pinned or new. The loader sizes maps from it.
    pub(super) fn map_specs(&self) -> [MapSpec; 19] {
        [
            MapSpec::ring(maps::CONN_EVENTS, self.ring_buffer_bytes),
            MapSpec::of::<u64, ConnState>(maps::CONN_STATE, MapType::Hash, self.max_connections),
            MapSpec::of::<u32, u64>(maps::STATS, MapType::PerCpuArray, COUNTERS),
            MapSpec::of::<TrafficKey, TrafficValue>(
                maps::TRAFFIC,
                MapType::PerCpuHash,
                self.traffic_entries,
            ),
            // aya rounds ring buffer sizes up to whole pages.
            MapSpec::ring(maps::AYA_LOGS, AYA_LOGS_BYTES.max(page_size())),
            MapSpec::of::<ServiceKey, ServiceValue>(
                maps::SERVICES,
                MapType::Hash,
                self.max_services,
            ),
            MapSpec::of::<SlotKey, Endpoint>(maps::BACKEND_SLOTS, MapType::Hash, self.max_backends),
            MapSpec::of::<MemberKey, u32>(maps::MEMBERS, MapType::Hash, self.max_backends),
            MapSpec::of::<AffinityKey, AffinityValue>(
                maps::AFFINITY,
                MapType::LruHash,
                self.max_affinity,
            ),
            MapSpec::of::<RevNatKey, Endpoint>(
                maps::REVNAT,
                MapType::LruHash,
                self.max_socket_translations,
            ),
            MapSpec::of::<UdpFlowKey, Endpoint>(
                maps::UDP_FLOWS,
                MapType::LruHash,
                self.max_socket_translations,
            ),
            MapSpec::of::<u64, UdpSock>(
                maps::UDP_SOCKS,
                MapType::LruHash,
                self.max_socket_translations,
            ),
            MapSpec::of::<u64, EndpointInfo>(maps::ENDPOINTS, MapType::Hash, self.max_endpoints),
            MapSpec::of::<Key<IpcacheData>, IpcacheValue>(
                maps::IPCACHE,
                MapType::LpmTrie,
                self.max_ipcache,
            ),
            MapSpec::of::<Key<PolicyData>, PolicyValue>(
                maps::POLICY,
                MapType::LpmTrie,
                self.max_policy_entries,
            ),
            MapSpec::of::<PolicyFlowKey, u64>(
                maps::POLICY_FLOWS,
                MapType::LruHash,
                self.max_policy_flows,
            ),
            MapSpec::of::<u32, u64>(maps::VERDICTS, MapType::PerCpuArray, VERDICTS),
            MapSpec::of::<UdpFlowStatsKey, UdpFlowStatsValue>(
                maps::UDP_FLOW_STATS,
                MapType::LruHash,
                self.max_udp_flows,
            ),
            MapSpec::of::<u32, DropBudget>(maps::DROP_BUDGET, MapType::PerCpuArray, 1),
        ]
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct MapSpec {
    pub(super) name: &'static str,
    pub(super) map_type: MapType,
    pub(super) key_size: u32,
    pub(super) value_size: u32,
    pub(super) max_entries: u32,
}

impl MapSpec {
    fn of<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> Self {
        Self {
            name,
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
        }
    }

    const fn ring(name: &'static str, bytes: u32) -> Self {
        Self {
            name,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: bytes,
        }
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "type {:?}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}
