//! How the datapath is sized and where it lives: the flags that declare it (the only place
//! they are declared), and the shape every map must have, pinned or new, derived from the
//! table of maps in `weft_abi::for_each_map!`.
use std::path::PathBuf;

use aya::maps::{MapType, lpm_trie::Key};

/// `--instance` and `--bpffs`: which pinned datapath (shared by `weft agent` and `weft
/// cleanup`).
#[derive(Debug, Clone, clap::Args)]
pub struct Instance {
    /// Instance name: one agent per instance; pins live in <bpffs>/weft/<instance>.
    #[arg(long = "instance", env = "WEFT_INSTANCE", default_value = "default")]
    pub name: String,
    /// bpffs mount point.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// The capacity of every map the agent sizes. Each field names its flag, and the rows of the
/// map table that use it name the field: a map's size and its flag cannot drift apart. The
/// maps that hold per-socket or per-pod state of this node are sized from `--max-pods` unless
/// their own flag is given; [`Capacities::sizes`] resolves that.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Capacities {
    /// Pods this node runs at most (the kubelet's maxPods): sizes the maps of per-pod and
    /// per-socket state whose own flag is not given (see `weft maps` for what each holds).
    #[arg(long, default_value_t = 110, value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub max_pods: u32,
    /// Connection event ring buffer size in bytes (a power of two of at least one page).
    #[arg(long, default_value_t = 512 * 1024, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Open TCP connections tracked at once (size of CONN_STATE; allocated as connections
    /// open).
    #[arg(long, default_value_t = 65_536, value_parser = at_least_one())]
    pub max_connections: u32,
    /// (cgroup, direction, protocol) traffic counters (size of TRAFFIC, one per CPU each)
    /// [default: 32 per pod of --max-pods, a power of two]
    #[arg(long, value_parser = at_least_one())]
    pub traffic_entries: Option<u32>,
    /// Service frontends (ClusterIP x port x protocol) the kernel can hold.
    #[arg(long, default_value_t = 65_536, value_parser = at_least_one())]
    pub max_services: u32,
    /// Backends the kernel can hold over all services (a backend set being replaced briefly
    /// holds its old and new slots: leave headroom).
    #[arg(long, default_value_t = 262_144, value_parser = at_least_one())]
    pub max_backends: u32,
    /// ClientIP affinity entries (client pods x services with affinity; LRU)
    /// [default: 128 per pod of --max-pods, a power of two]
    #[arg(long, value_parser = at_least_one())]
    pub max_affinity: Option<u32>,
    /// Local pods whose policy the kernel can enforce (size of ENDPOINTS).
    #[arg(long, default_value_t = 16_384, value_parser = at_least_one())]
    pub max_endpoints: u32,
    /// Pod addresses and ipBlock prefixes the kernel can know (size of IPCACHE).
    #[arg(long, default_value_t = 65_536, value_parser = at_least_one())]
    pub max_ipcache: u32,
    /// Policy entries over all local pods' policy sets (size of POLICY).
    #[arg(long, default_value_t = 262_144, value_parser = at_least_one())]
    pub max_policy_entries: u32,
    /// Entries of the plaintext tables of meshed pods' security policies (size of AUTHZ;
    /// pods with the same policies share a table).
    #[arg(long, default_value_t = 65_536, value_parser = at_least_one())]
    pub max_authz_entries: u32,
    /// UDP/SCTP exchanges remembered for sockets with more live peers than their own storage
    /// holds (servers answering many clients; size of POLICY_FLOWS, LRU: an exchange pushed
    /// out has its next reply judged again) [default: 512 per pod of --max-pods, a power of
    /// two]
    #[arg(long, value_parser = at_least_one())]
    pub max_policy_flows: Option<u32>,
    /// UDP flows counted at once (size of UDP_FLOW_STATS, LRU)
    /// [default: 128 per pod of --max-pods, a power of two]
    #[arg(long, value_parser = at_least_one())]
    pub max_udp_flows: Option<u32>,
    /// With --sockmap: TCP sockets of pods paired at once (sizes SOCK_PAIRS and REDIRECTED;
    /// a socket past it keeps the TCP/IP path) [default: 128 per pod of --max-pods, a power
    /// of two]
    #[arg(long, value_parser = at_least_one())]
    pub max_sockmap_connections: Option<u32>,
}

/// Every capacity resolved: what the maps are created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub ring_buffer_size: u32,
    pub max_connections: u32,
    pub traffic_entries: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub max_affinity: u32,
    pub max_endpoints: u32,
    pub max_ipcache: u32,
    pub max_policy_entries: u32,
    pub max_authz_entries: u32,
    pub max_policy_flows: u32,
    pub max_udp_flows: u32,
    pub max_sockmap_connections: u32,
}

impl Capacities {
    /// The flags resolved: a per-pod map's own flag, or its share of `--max-pods`. LRU maps
    /// are allocated whole when created, so sizing them for the node's pods rather than for
    /// the largest node saves their memory on every node (at 110 pods, 16 384 entries for 128
    /// per pod). `--max-pods` is at most 8 192, so no share passes 2^22 entries.
    pub fn sizes(&self) -> Sizes {
        let per_pod = |flag: Option<u32>, per: u64| {
            flag.unwrap_or_else(|| {
                let n = (u64::from(self.max_pods) * per).next_power_of_two();
                u32::try_from(n.max(1024)).unwrap_or(u32::MAX)
            })
        };
        Sizes {
            ring_buffer_size: self.ring_buffer_size,
            max_connections: self.max_connections,
            traffic_entries: per_pod(self.traffic_entries, 32),
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_affinity: per_pod(self.max_affinity, 128),
            max_endpoints: self.max_endpoints,
            max_ipcache: self.max_ipcache,
            max_policy_entries: self.max_policy_entries,
            max_authz_entries: self.max_authz_entries,
            max_policy_flows: per_pod(self.max_policy_flows, 512),
            max_udp_flows: per_pod(self.max_udp_flows, 128),
            max_sockmap_connections: per_pod(self.max_sockmap_connections, 128),
        }
    }
}

fn at_least_one() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..)
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let page = page_size();
    if !n.is_power_of_two() || n < page {
        return Err(format!(
            "{n} must be a power of two of at least one page ({page} bytes)"
        ));
    }
    Ok(n)
}

/// The datapath's own flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// cgroup v2 directory to observe, with all its descendants [default: the host's cgroup2
    /// mount, found in /proc/self/mountinfo]
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    #[command(flatten)]
    pub instance: Instance,
    /// When another agent runs the instance: wait for it to hand over (it does at once,
    /// keeping its mesh listeners until this agent's listen, then drains) instead of
    /// failing. A rolling update with surge starts the new agent this way.
    #[arg(long)]
    pub take_over: bool,
    #[command(flatten)]
    pub capacities: Capacities,
    /// Pending connection-event bytes that wake the agent (0: every event; less than half of
    /// --ring-buffer-size). Batching saves CPU under connection churn;
    /// --events-poll-interval bounds the delay.
    #[arg(long, default_value_t = 16 * 1024)]
    pub events_wakeup_bytes: u64,
    /// What the kernel does with a socket below --cgroup-root, outside the node's network
    /// namespace, in a cgroup no pod is bound to yet: `isolate` it both ways until the agent
    /// binds the pod, or `pass` it unjudged [default: isolate with --source kubernetes, pass
    /// with a directory source]
    #[arg(long, value_enum)]
    pub unbound_pods: Option<Unbound>,
    /// Same-node acceleration: data between two pods' TCP sockets on this node goes socket to
    /// socket (sockmap and sk_msg), skipping the TCP/IP stack. Off by default: see README
    /// ("Same-node acceleration") for what it measured here and what it changes.
    #[arg(long)]
    pub sockmap: bool,
    /// The cgroup that holds the kubelet's pods, below --cgroup-root: only below it can a
    /// cgroup be a pod not bound yet [default: kubepods.slice or kubepods under --cgroup-root,
    /// the first that exists; neither: unbound pods are not isolated, with a warning]
    #[arg(long)]
    pub pods_cgroup: Option<PathBuf>,
    /// The node's network namespace (host-network pods and node processes live there; they
    /// are never taken for unbound pods) [default: the agent's own]
    #[arg(long)]
    pub host_netns: Option<PathBuf>,
    /// Retired: socket translations live in socket storage, which has no capacity. Accepted
    /// and ignored (with a warning) so a command line of an older agent still starts.
    #[arg(long, hide = true)]
    pub max_socket_translations: Option<u32>,
    /// Socket-storage values (a socket's ClusterIP translations, its allowed exchanges) the
    /// node holds at most, beyond each pod's --min-socket-states-per-pod; about 1 KiB each,
    /// charged to the agent's memory cgroup (past its limit: size the limit with this).
    #[arg(long, default_value_t = 131_072, value_parser = at_least_one())]
    pub max_socket_states: u32,
    /// Socket-storage values of each kind one pod holds at most: past it, that pod's new
    /// sockets are not remembered (their replies are judged again); no other pod is affected.
    #[arg(long, default_value_t = 16_384, value_parser = at_least_one())]
    pub max_socket_states_per_pod: u32,
    /// Socket-storage values of each kind every pod may hold whatever the node holds: what
    /// other pods do cannot take these from it.
    #[arg(long, default_value_t = 512)]
    pub min_socket_states_per_pod: u32,
}

/// `--unbound-pods`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unbound {
    Isolate,
    Pass,
}

impl Settings {
    /// Retired flags given on the command line (they change nothing).
    pub fn retired_flags(&self) -> Vec<&'static str> {
        [("--max-socket-translations", self.max_socket_translations)]
            .into_iter()
            .filter_map(|(flag, v)| v.map(|_| flag))
            .collect()
    }

    /// What clap cannot check field by field.
    pub fn validate(&self) -> Result<(), String> {
        let ring = u64::from(self.capacities.ring_buffer_size);
        if self.events_wakeup_bytes >= ring / 2 {
            return Err(format!(
                "--events-wakeup-bytes {} must be less than half of --ring-buffer-size {ring}, \
                 or events would be lost before the reader wakes",
                self.events_wakeup_bytes
            ));
        }
        Ok(())
    }
}

/// What the kernel programs are told at load time (their globals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Globals {
    /// aya-log level compiled into the kernel programs' view: 0 = off .. 5 = trace.
    pub kernel_log_level: u8,
    /// Pending bytes in `CONN_EVENTS` that wake the reader (0: every event).
    pub events_wakeup_bytes: u64,
    /// cgroup level of the attach cgroup (0 = the cgroup2 mount), for the kernel's pod lookups.
    pub cgroup_level: u32,
    /// An open connection reports its counters at most this often (0: only at open/close).
    pub conn_update_interval_ns: u64,
    /// 1: connection and drop events are written; 0: telemetry off.
    pub conn_events_enabled: u32,
    /// 1: sockets of pods not bound yet are isolated (see `weft_abi::globals`).
    pub unbound_isolated: u32,
    /// The level and id of the kubelet's pods cgroup.
    pub unbound_scope_level: u32,
    pub unbound_scope_id: u64,
    /// The node's network namespace cookie.
    pub host_netns_cookie: u64,
    /// Socket-storage budgets of the node and of one pod, and a pod's floor.
    pub sock_states: u64,
    pub sock_states_per_pod: u64,
    pub sock_states_floor: u64,
    /// 1: established TCP sockets of pods are paired for the socket-to-socket path.
    pub sockmap_enabled: u32,
    /// The agent's own cgroup (level, id) when below the cgroup root, else 0, 0.
    pub agent_cgroup_level: u32,
    pub agent_cgroup_id: u64,
    /// The kernel's tick rate (0: unknown).
    pub kernel_hz: u32,
}

/// Everything [`super::Datapath::start`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// cgroup v2 directory whose processes (and descendants) weft observes.
    pub cgroup: PathBuf,
    pub instance: Instance,
    pub capacities: Capacities,
    pub globals: Globals,
}

pub(super) fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// What one map must look like, pinned or new.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct MapSpec {
    pub(super) name: &'static str,
    pub(super) map_type: MapType,
    pub(super) key_size: u32,
    pub(super) value_size: u32,
    pub(super) max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub(super) flags: u32,
}

/// `BPF_F_NO_PREALLOC`.
const NO_PREALLOC: u32 = 1;

impl MapSpec {
    fn of<K, V>(name: &'static str, map_type: MapType, max_entries: u32) -> Self {
        Self {
            name,
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            flags: 0,
        }
    }

    const fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "type {:?}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A fingerprint of every map's name and shape (FNV-1a, the same in every build): pinned maps
/// of another shape live in another directory.
pub(super) fn fingerprint(specs: &[MapSpec]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for spec in specs {
        for byte in format!("{}: {};", spec.name, spec.describe()).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// A row's capacity: a field of [`Capacities`], or a size the agent does not choose.
macro_rules! capacity {
    ($c:ident, fixed, $size:expr) => {
        $size
    };
    ($c:ident, $setting:ident, $size:expr) => {
        $c.$setting
    };
}

/// A row's [`MapSpec`], by kind.
macro_rules! map_spec {
    ($name:ident, RingBuf, $cap:expr) => {
        MapSpec::of::<(), ()>(weft_abi::maps::$name, MapType::RingBuf, $cap)
    };
    // aya-log's ring buffer; aya rounds ring buffer sizes up to whole pages.
    ($name:ident, External, $cap:expr) => {
        MapSpec::of::<(), ()>(
            weft_abi::maps::$name,
            MapType::RingBuf,
            ($cap).max(page_size()),
        )
    };
    ($name:ident, Hash<$k:ty, $v:ty>, $cap:expr) => {
        MapSpec::of::<$k, $v>(weft_abi::maps::$name, MapType::Hash, $cap)
    };
    ($name:ident, HashNoPrealloc<$k:ty, $v:ty>, $cap:expr) => {
        MapSpec::of::<$k, $v>(weft_abi::maps::$name, MapType::Hash, $cap).with_flags(NO_PREALLOC)
    };
    ($name:ident, LruHash<$k:ty, $v:ty>, $cap:expr) => {
        MapSpec::of::<$k, $v>(weft_abi::maps::$name, MapType::LruHash, $cap)
    };
    ($name:ident, PerCpuHash<$k:ty, $v:ty>, $cap:expr) => {
        MapSpec::of::<$k, $v>(weft_abi::maps::$name, MapType::PerCpuHash, $cap)
    };
    // The kernel requires BPF_F_NO_PREALLOC of LPM tries.
    ($name:ident, LpmTrie<$k:ty, $v:ty>, $cap:expr) => {
        MapSpec::of::<Key<$k>, $v>(weft_abi::maps::$name, MapType::LpmTrie, $cap)
            .with_flags(NO_PREALLOC)
    };
    ($name:ident, PerCpuArray<$v:ty>, $cap:expr) => {
        MapSpec::of::<u32, $v>(weft_abi::maps::$name, MapType::PerCpuArray, $cap)
    };
    // The value of a socket map is a socket's descriptor (from user space).
    ($name:ident, SockHash<$k:ty>, $cap:expr) => {
        MapSpec::of::<$k, u32>(weft_abi::maps::$name, MapType::SockHash, $cap)
    };
    // The kernel requires BPF_F_NO_PREALLOC and no capacity of socket storage; its key is a
    // socket's descriptor (from user space).
    ($name:ident, SkStorage<$v:ty>, $cap:expr) => {
        MapSpec::of::<i32, $v>(weft_abi::maps::$name, MapType::SkStorage, $cap)
            .with_flags(NO_PREALLOC)
    };
}

/// `map_specs` (every row's spec at the given capacities), `settings` (every row's setting,
/// its default size, for the test that keeps the table and the flags' defaults equal).
macro_rules! from_table {
    ($($(#[doc = $doc:literal])* $name:ident: $kind:ident $(<$($t:ty),+ $(,)?>)? ($setting:ident = $size:expr);)*) => {
        /// What every map must look like at these capacities. The loader sizes maps from it.
        pub(super) fn map_specs(c: &Capacities) -> Vec<MapSpec> {
            let c = c.sizes();
            vec![$(map_spec!($name, $kind $(<$($t),+>)?, capacity!(c, $setting, $size))),*]
        }

        /// The flag that sizes a map, e.g. `--max-connections` (None: the agent does not
        /// choose its size).
        pub fn map_flag(name: &str) -> Option<String> {
            [$((weft_abi::maps::$name, stringify!($setting))),*]
                .into_iter()
                .find(|(n, setting)| *n == name && *setting != "fixed")
                .map(|(_, setting)| format!("--{}", setting.replace('_', "-")))
        }

        #[cfg(test)]
        fn table_defaults(defaults: &Capacities) -> Vec<(&'static str, u64, u64)> {
            let defaults = defaults.sizes();
            vec![$((
                weft_abi::maps::$name,
                u64::from(capacity!(defaults, $setting, $size) as u32),
                ($size) as u64,
            )),*]
        }
    };
}

weft_abi::for_each_map!(from_table);

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        Flags::try_parse_from(std::iter::once("weft").chain(args.iter().copied()))
            .map(|f| f.settings)
    }

    #[test]
    fn the_flags_defaults_are_the_tables_sizes() {
        let defaults = parse(&[]).expect("defaults parse").capacities;
        for (map, flag_default, table_size) in table_defaults(&defaults) {
            assert_eq!(flag_default, table_size, "{map}");
        }
    }

    #[test]
    fn a_zero_capacity_is_refused_naming_its_flag() {
        let e = parse(&["--max-services", "0"]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("--max-services"), "{e}");
        let e = parse(&["--ring-buffer-size", "1000"]).expect_err("refused");
        assert!(e.to_string().contains("--ring-buffer-size"), "{e}");
    }

    #[test]
    fn a_wakeup_threshold_past_half_the_ring_is_refused() {
        let s = parse(&[
            "--ring-buffer-size",
            "65536",
            "--events-wakeup-bytes",
            "32768",
        ])
        .expect("each flag alone is valid");
        let e = s.validate().expect_err("refused");
        assert!(e.starts_with("--events-wakeup-bytes 32768"), "{e}");
    }

    #[test]
    fn retired_capacity_flags_are_accepted_and_named() {
        let s = parse(&["--max-socket-translations", "1000"]).expect("an old command line parses");
        assert_eq!(s.retired_flags(), ["--max-socket-translations"]);
        assert_eq!(
            parse(&[]).expect("defaults").retired_flags(),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn every_sized_map_names_its_flag() {
        assert_eq!(map_flag("CONN_STATE").as_deref(), Some("--max-connections"));
        assert_eq!(map_flag("MEMBERS").as_deref(), Some("--max-backends"));
        assert_eq!(map_flag("STATS"), None);
        let specs = map_specs(&parse(&[]).expect("defaults").capacities);
        assert_eq!(specs.len(), weft_abi::maps::ALL.len());
        let policy = specs.iter().find(|s| s.name == "POLICY").expect("POLICY");
        assert_eq!(policy.map_type, MapType::LpmTrie);
        assert_eq!(policy.max_entries, 262_144);
    }

    #[test]
    fn per_pod_maps_follow_max_pods_unless_their_own_flag_is_given() {
        let sizes = |args: &[&str]| parse(args).expect("parses").capacities.sizes();
        let default = sizes(&[]);
        assert_eq!(
            (
                default.max_udp_flows,
                default.max_affinity,
                default.traffic_entries
            ),
            (16_384, 16_384, 4_096)
        );
        let big = sizes(&["--max-pods", "500"]);
        assert_eq!((big.max_udp_flows, big.traffic_entries), (65_536, 16_384));
        let small = sizes(&["--max-pods", "1"]);
        assert_eq!(small.max_udp_flows, 1024);
        assert_eq!(default.max_policy_flows, 65_536);
        assert!(parse(&["--max-pods", "8193"]).is_err());
        let own = sizes(&["--max-pods", "500", "--max-udp-flows", "3000"]);
        assert_eq!((own.max_udp_flows, own.max_affinity), (3000, 65_536));
        assert_eq!(own.max_services, default.max_services);
    }
}
