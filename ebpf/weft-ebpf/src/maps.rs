//! Every map of the object. Sizes here are defaults: the agent overrides capacities at load
//! time (`--max-connections`, ...) and pins every map under its instance directory.
use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use weft_abi::{
    conn::ConnState,
    stats::COUNTERS,
    traffic::{TrafficKey, TrafficValue},
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
