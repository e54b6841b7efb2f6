//! Every map of the object, declared from `weft_abi::for_each_map!` (the one table both sides
//! read), and the load-time globals. Sizes here are defaults: the agent overrides capacities
//! at load time (`--max-connections`, ...) and pins every map under its instance directory.
use aya_ebpf::{
    Global,
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};

/// One `#[map] static` per row of the table.
macro_rules! declare_maps {
    ($($(#[doc = $doc:literal])* $name:ident: $kind:ident $(<$($t:ty),+ $(,)?>)? ($setting:ident = $size:expr);)*) => {
        $(declare_map!($(#[doc = $doc])* $name, $kind $(<$($t),+>)?, $size);)*
    };
}

macro_rules! declare_map {
    ($(#[doc = $doc:literal])* $name:ident, RingBuf, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: RingBuf = RingBuf::with_byte_size($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, Hash<$k:ty, $v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: HashMap<$k, $v> = HashMap::with_max_entries($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, HashNoPrealloc<$k:ty, $v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: HashMap<$k, $v> = HashMap::with_max_entries($size, BPF_F_NO_PREALLOC);
    };
    ($(#[doc = $doc:literal])* $name:ident, LruHash<$k:ty, $v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: LruHashMap<$k, $v> = LruHashMap::with_max_entries($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, PerCpuHash<$k:ty, $v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: PerCpuHashMap<$k, $v> = PerCpuHashMap::with_max_entries($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, LpmTrie<$k:ty, $v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: LpmTrie<$k, $v> = LpmTrie::with_max_entries($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, PerCpuArray<$v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: PerCpuArray<$v> = PerCpuArray::with_max_entries($size, 0);
    };
    ($(#[doc = $doc:literal])* $name:ident, SockHash<$k:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[map]
        pub static $name: SockHash<$k> = SockHash::with_max_entries($size, 0);
    };
    // BTF-defined (aya's socket storage has no legacy definition); no capacity.
    ($(#[doc = $doc:literal])* $name:ident, SkStorage<$v:ty>, $size:expr) => {
        $(#[doc = $doc])*
        #[btf_map]
        pub static $name: SkStorage<$v> = SkStorage::new();
    };
    // Declared by the library that owns it (aya-log-ebpf's `AYA_LOGS`).
    ($(#[doc = $doc:literal])* $name:ident, External, $size:expr) => {};
}

weft_abi::for_each_map!(declare_maps);

/// See `weft_abi::globals::CONN_EVENTS_WAKEUP_BYTES`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_EVENTS_WAKEUP_BYTES: Global<u64> = Global::new(0);

/// See `weft_abi::globals::CONN_UPDATE_INTERVAL_NS`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_UPDATE_INTERVAL_NS: Global<u64> = Global::new(0);

/// See `weft_abi::globals::CONN_EVENTS_ENABLED`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static CONN_EVENTS_ENABLED: Global<u32> = Global::new(1);

/// See `weft_abi::globals::POLICY_ROOT_LEVEL`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static POLICY_ROOT_LEVEL: Global<u32> = Global::new(0);

/// See `weft_abi::globals::UNBOUND_ISOLATED`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static UNBOUND_ISOLATED: Global<u32> = Global::new(0);

/// See `weft_abi::globals::HOST_NETNS_COOKIE`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static HOST_NETNS_COOKIE: Global<u64> = Global::new(0);

/// See `weft_abi::globals::UNBOUND_SCOPE_LEVEL`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static UNBOUND_SCOPE_LEVEL: Global<u32> = Global::new(0);

/// See `weft_abi::globals::UNBOUND_SCOPE_ID`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static UNBOUND_SCOPE_ID: Global<u64> = Global::new(0);

/// See `weft_abi::globals::SOCK_STATES`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static SOCK_STATES: Global<u64> = Global::new(0);

/// See `weft_abi::globals::SOCK_STATES_PER_POD`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static SOCK_STATES_PER_POD: Global<u64> = Global::new(0);

/// See `weft_abi::globals::SOCK_STATES_FLOOR`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static SOCK_STATES_FLOOR: Global<u64> = Global::new(0);

/// See `weft_abi::globals::AGENT_CGROUP_LEVEL`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static AGENT_CGROUP_LEVEL: Global<u32> = Global::new(0);

/// See `weft_abi::globals::AGENT_CGROUP_ID`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static AGENT_CGROUP_ID: Global<u64> = Global::new(0);

/// See `weft_abi::globals::SOCKMAP_ENABLED`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static SOCKMAP_ENABLED: Global<u32> = Global::new(0);

/// See `weft_abi::globals::KERNEL_HZ`; set by the agent at load time.
#[unsafe(no_mangle)]
pub static KERNEL_HZ: Global<u32> = Global::new(0);
