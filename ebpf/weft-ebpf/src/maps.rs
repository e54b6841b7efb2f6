//! Every map of the object. Sizes here are defaults: the agent overrides capacities at load
//! time (`--max-connections`, ...) and pins every map under its instance directory.
use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use weft_abi::{
    conn::{ConnState, DropBudget},
    policy::{
        EndpointInfo, IpcacheData, IpcacheValue, PolicyData, PolicyFlowKey, PolicyValue,
        VERDICTS as VERDICT_SLOTS,
    },
    stats::COUNTERS,
    svc::{
        AffinityKey, AffinityValue, Endpoint, MemberKey, RevNatKey, ServiceKey, ServiceValue,
        SlotKey, UdpFlowKey, UdpSock,
    },
    traffic::{TrafficKey, TrafficValue, UdpFlowStatsKey, UdpFlowStatsValue},
};

/// Connection events for the agent.
#[map]
pub static CONN_EVENTS: RingBuf = RingBuf::with_byte_size(512 * 1024, 0);

/// Open connections by socket cookie.
#[map]
pub static CONN_STATE: HashMap<u64, ConnState> = HashMap::with_max_entries(65_536, 0);

/// Datapath health counters, indexed by `weft_abi::stats::Counter`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// Packets and bytes per cgroup, direction and protocol.
#[map]
pub static TRAFFIC: PerCpuHashMap<TrafficKey, TrafficValue> =
    PerCpuHashMap::with_max_entries(16_384, 0);

/// See `weft_abi::globals::CONN_EVENTS_WAKEUP_BYTES`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_EVENTS_WAKEUP_BYTES: Global<u64> = Global::new(0);

/// See `weft_abi::globals::CONN_UPDATE_INTERVAL_NS`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_UPDATE_INTERVAL_NS: Global<u64> = Global::new(0);

/// See `weft_abi::globals::CONN_EVENTS_ENABLED`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_EVENTS_ENABLED: Global<u32> = Global::new(1);

/// Service frontends. Not preallocated: elements are freed after an RCU grace period, so a
/// program never reads an entry that was replaced under it.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Endpoint sets by revision.
#[map]
pub static BACKEND_SLOTS: HashMap<SlotKey, Endpoint> =
    HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// Which backends currently serve which service.
#[map]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(262_144, BPF_F_NO_PREALLOC);

/// ClientIP session affinity: (client netns, service) to backend.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(65_536, 0);

/// (socket, backend) to the frontend the application asked for.
#[map]
pub static REVNAT: LruHashMap<RevNatKey, Endpoint> = LruHashMap::with_max_entries(65_536, 0);

/// UDP socket cookie to its last translation (for cleanup at release).
#[map]
pub static UDP_SOCKS: LruHashMap<u64, UdpSock> = LruHashMap::with_max_entries(65_536, 0);

/// (unconnected UDP socket, frontend) to the backend chosen for it.
#[map]
pub static UDP_FLOWS: LruHashMap<UdpFlowKey, Endpoint> = LruHashMap::with_max_entries(65_536, 0);

/// Local pods by cgroup id. Not preallocated: a replaced value stays valid for readers.
#[map]
pub static ENDPOINTS: HashMap<u64, EndpointInfo> =
    HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// Address (prefix) to identity.
#[map]
pub static IPCACHE: LpmTrie<IpcacheData, IpcacheValue> = LpmTrie::with_max_entries(65_536, 0);

/// What each policy set allows: (set, identity, direction, protocol, port prefix).
#[map]
pub static POLICY: LpmTrie<PolicyData, PolicyValue> = LpmTrie::with_max_entries(262_144, 0);

/// Allowed UDP/SCTP exchanges by (socket, peer): their packets pass without a new verdict.
#[map]
pub static POLICY_FLOWS: LruHashMap<PolicyFlowKey, u64> = LruHashMap::with_max_entries(65_536, 0);

/// Policy verdicts by (direction, match), see `weft_abi::policy::verdict_index`.
#[map]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);

/// cgroup level of the agent's cgroup root (0 = the cgroup2 mount); set at load time. Pods'
/// cgroups are looked for below it.
#[unsafe(no_mangle)]
pub static POLICY_ROOT_LEVEL: Global<u32> = Global::new(0);

/// Packets and bytes per UDP flow of a local socket.
#[map]
pub static UDP_FLOW_STATS: LruHashMap<UdpFlowStatsKey, UdpFlowStatsValue> =
    LruHashMap::with_max_entries(65_536, 0);

/// Each CPU's budget of drop events for the current second.
#[map]
pub static DROP_BUDGET: PerCpuArray<DropBudget> = PerCpuArray::with_max_entries(1, 0);
