//! Service load balancing at the socket layer.
//!
//! Writers and readers:
//! - `SERVICES`, `BACKEND_SLOTS`, `MEMBERS`: written by the agent's `sync`, read by the
//!   sock_addr programs (connect, sendmsg) of the kernel, and by cgroup_skb egress for UDP
//!   sockets connected through a ClusterIP (is their backend still a member?).
//! - `AFFINITY` (LRU map) and `SOCK_XLATE` (socket storage): written and read by the kernel
//!   programs.
//!
//! Consistency: a service's backends live in `BACKEND_SLOTS` under a revision. `sync` writes a
//! new revision's slots (and new `MEMBERS`) first, then switches the `SERVICES` entry to it in
//! one map update, and frees the old revision's slots only after a grace period. A program
//! therefore always sees a complete backend set: the old one or the new one.
//!
//! Addresses are the 4 words of the address in network byte order (an IPv4 address in word 0,
//! the rest 0), ports are u16 in network byte order: both as `bpf_sock_addr` holds them.

/// A frontend: the ClusterIP, port and protocol a client connects to. Key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable for the life of the frontend: keys `MEMBERS` and `AFFINITY`.
    pub service_id: u32,
    /// The current backend set: `BACKEND_SLOTS[(revision, 0..count)]`.
    pub revision: u32,
    /// Number of ready backends; 0 makes connect/sendmsg fail with ECONNREFUSED.
    pub count: u32,
    /// ClientIP session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// [`crate::seal`] of the key and the fields above, set by the agent's map writer.
    pub seal: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);

/// Value of `OUTLIER` (key: the frontend's `ServiceValue::service_id`; no entry: no health
/// checking): a frontend's passive health checking (Istio's `outlierDetection`), applied by
/// the kernel. A backend whose connections through the frontend fail `consecutive` times in
/// a row (from any pod of the node) gets no new connection for `base_ejection_ms` times the
/// number of times it was ejected, at most `max_ejection_ms`. A connect through the
/// frontend that no backend answers in `connect_timeout_ms` fails with ETIMEDOUT (Istio's
/// `connectionPool.tcp.connectTimeout`). Its own map, not a field of `ServiceValue`: every
/// reader of that value (cgroup_skb's included) would pay for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Outlier {
    /// Failures in a row that eject a backend; 0: none is ejected.
    pub consecutive: u32,
    pub base_ejection_ms: u32,
    pub max_ejection_ms: u32,
    /// A backend's count of ejections falls by one per interval it is not ejected.
    pub interval_ms: u32,
    /// At most this share of the backends is ejected at once (one more is not).
    pub max_ejection_percent: u8,
    /// Below this share of backends not ejected, ejections are ignored (panic).
    pub min_health_percent: u8,
    pub _pad: u16,
    /// A connect that has no answer after this long times out; 0: the kernel's own bound
    /// (about two minutes).
    pub connect_timeout_ms: u32,
    /// [`crate::seal`] of the key and the fields above, set by the agent's map writer.
    pub seal: u32,
}
const _: () = assert!(core::mem::size_of::<Outlier>() == 28);

impl Outlier {
    /// The seal of this value under service id `key`.
    #[inline(always)]
    pub const fn seal_for(&self, key: u32) -> u32 {
        use crate::seal::{SEED_OUTLIER, finish, mix};
        let mut h = SEED_OUTLIER;
        h = mix(h, key);
        h = mix(h, self.consecutive);
        h = mix(h, self.base_ejection_ms);
        h = mix(h, self.max_ejection_ms);
        h = mix(h, self.interval_ms);
        h = mix(
            h,
            self.max_ejection_percent as u32
                | (self.min_health_percent as u32) << 8
                | (self._pad as u32) << 16,
        );
        h = mix(h, self.connect_timeout_ms);
        finish(h, 7)
    }

    /// Whether the frontend has nothing to apply (no entry is written for it).
    pub const fn is_off(&self) -> bool {
        self.consecutive == 0 && self.connect_timeout_ms == 0
    }

    /// This value as written under `key`.
    pub const fn sealed(mut self, key: u32) -> Self {
        self.seal = self.seal_for(key);
        self
    }

    /// Whether this copy is a whole value written under `key`.
    #[inline(always)]
    pub const fn is_sealed_for(&self, key: u32) -> bool {
        self.seal == self.seal_for(key)
    }
}

/// Value of `HEALTH` (LRU, key [`MemberKey`]): a backend's record under one frontend.
/// Writers: sock_ops at a connection's close (and nothing else); readers: connect and the
/// agent (`weft services`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHealth {
    /// Connection failures since the last success or ejection.
    pub failures: u32,
    /// Times ejected, less one per `Outlier::interval_ms` since the last ejection ended.
    pub ejections: u32,
    /// `bpf_ktime_get_ns()` until which the backend gets no new connection.
    pub ejected_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<BackendHealth>() == 16);

/// Value of `WALK_COUNTS` (per CPU, one entry): the counts of the kernel's walk over a
/// frontend's backends. Kept out of the walk's stack context, whose values the verifier
/// follows (it would check the walk's step once per count). A program that interrupts
/// another on the CPU (softirq) takes it over: `tag` tells the interrupted walk its counts
/// are no longer its own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkCounts {
    pub tag: u64,
    /// Backends not ejected.
    pub healthy: u32,
    /// Backends not ejected still to pass before the one to pick.
    pub skip: u32,
    /// The index of the backend picked (`u32::MAX`: none).
    pub found: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<WalkCounts>() == 24);

impl ServiceValue {
    /// The seal of this value under `key`.
    #[inline(always)]
    pub const fn seal_for(&self, key: &ServiceKey) -> u32 {
        use crate::seal::{SEED_SERVICES, finish, mix};
        let tail = key.port as u32 | (key.protocol as u32) << 16 | (key.family as u32) << 24;
        let mut h = SEED_SERVICES;
        h = mix(h, key.addr[0]);
        h = mix(h, key.addr[1]);
        h = mix(h, key.addr[2]);
        h = mix(h, key.addr[3]);
        h = mix(h, tail);
        h = mix(h, self.service_id);
        h = mix(h, self.revision);
        h = mix(h, self.count);
        h = mix(h, self.affinity_timeout_s);
        finish(h, 9)
    }

    /// This value as written under `key`.
    pub const fn sealed(mut self, key: &ServiceKey) -> Self {
        self.seal = self.seal_for(key);
        self
    }

    /// Whether this copy is a whole value written under `key`.
    #[inline(always)]
    pub const fn is_sealed_for(&self, key: &ServiceKey) -> bool {
        self.seal == self.seal_for(key)
    }
}

/// An address and port: a backend, or a ClusterIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

/// Key of `BACKEND_SLOTS`; the value is the backend [`Endpoint`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub revision: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// Key of `MEMBERS` (value: u32, unused): `backend` currently serves `service_id`. Lets the
/// programs check that a remembered backend (affinity, UDP flow) is still valid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend: Endpoint,
}
const _: () = assert!(core::mem::size_of::<MemberKey>() == 24);

/// Key of `AFFINITY` (LRU): a client and a service. The client is its network namespace
/// (`bpf_get_netns_cookie`): one pod, like kube-proxy's client IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Endpoint,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used it.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 32);

/// `u32::from_ne_bytes([0, 0, 0xff, 0xff])`: the third word of an IPv4-mapped IPv6 address.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv6 address as the kernel holds it: (4, [v4, 0, 0, 0]) when it is IPv4-mapped
/// (`::ffff:a.b.c.d`, what a dual-stack socket uses for IPv4), else (6, words).
pub const fn normalize_v6(words: [u32; 4]) -> (u8, [u32; 4]) {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD {
        (crate::net::Family::V4 as u8, [words[3], 0, 0, 0])
    } else {
        (crate::net::Family::V6 as u8, words)
    }
}

/// [`Xlate::flags`]: the slot holds a translation.
pub const XLATE_USED: u32 = 1;
/// [`Xlate::flags`]: made by connect (a TCP socket, or a UDP socket that sends only there);
/// without it, by sendmsg (unconnected UDP, a backend chosen per frontend).
pub const XLATE_CONNECTED: u32 = 2;
/// [`Xlate::flags`] (connect's slot): the connection was captured for the mesh: the socket
/// is connected to the node's outbound listener (`crate::mesh`), and `backend` is where the
/// tunnel takes it. getpeername still shows `frontend`.
pub const XLATE_CAPTURED: u32 = 4;
/// [`Xlate::flags`]: `frontend` is what the application dialled, not a Service (a captured
/// connection to a pod address).
pub const XLATE_DIRECT: u32 = 8;

/// One translation of a socket: it asked for `frontend` and reaches `backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Xlate {
    pub frontend: ServiceKey,
    pub backend: Endpoint,
    /// `XLATE_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Xlate>() == 44);

/// Translations of unconnected UDP one socket keeps, one per ClusterIP it sends to (past
/// that, the oldest is replaced); a power of two.
pub const XLATE_UNCONNECTED: u32 = 4;
/// Translations one socket keeps: connect's, and those of unconnected UDP.
pub const XLATE_SLOTS: u32 = 1 + XLATE_UNCONNECTED;

/// Value of `SOCK_XLATE` (socket storage): what a socket asked for and reaches, so recvmsg and
/// getpeername show the ClusterIP, an unconnected UDP socket stays on its backend per frontend
/// (like a conntrack entry) and cgroup_skb can tell a connected socket whose backend left the
/// Service. The storage lives and dies with its socket: no socket's translations push out
/// another's, and nothing is left to clean up. Writers: connect4/6, sendmsg4/6 (under the
/// socket's lock). Readers: those, recvmsg4/6, getpeername4/6, sock_ops and cgroup_skb.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockXlate {
    pub slots: [Xlate; XLATE_SLOTS as usize],
    /// The slot a new unconnected translation replaces when none is free.
    pub next: u32,
    /// The pod whose socket-state budget this value counts against (see [`SockOwner`]).
    pub owner: u32,
}
const _: () = assert!(core::mem::size_of::<SockXlate>() == 228);

/// Who a socket-storage value (`SOCK_XLATE`, `SOCK_FLOWS`) is counted against: the pod's
/// `EndpointInfo::endpoint_id`, [`SockOwner::NODE`] for sockets of no pod, or
/// [`SockOwner::UNBOUND`] for pods not bound yet. Key of `SOCK_COUNTS` (value:
/// [`SockCounts`]), with [`SockOwner::TOTAL`] for the node's sums. An owner holding
/// `globals::SOCK_STATES_PER_POD` values of a kind gets no new one of that kind; past
/// `globals::SOCK_STATES_FLOOR` it also gets none while the node holds
/// `globals::SOCK_STATES`. So memory the kernel charges to the agent stays bounded, and no pod
/// can take another's floor. Without a value, a socket's translations and exchanges are not
/// remembered: replies are judged again, recvmsg shows the backend. Writers: the programs that
/// create values (add) and sock_release (subtract; an owner back at zero is deleted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockOwner {
    pub id: u64,
}
const _: () = assert!(core::mem::size_of::<SockOwner>() == 8);

impl SockOwner {
    /// Sockets of no pod (node processes).
    pub const NODE: u32 = 0;
    /// Sockets of pods not bound yet.
    pub const UNBOUND: u32 = u32::MAX - 1;
    /// The key of the node-wide sums.
    pub const TOTAL: Self = Self { id: u64::MAX };
}

/// Value of `SOCK_COUNTS`: values held, by kind (the index is the kind).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCounts {
    pub held: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<SockCounts>() == 16);

/// [`SockCounts::held`] index of `SOCK_XLATE` values.
pub const COUNT_XLATE: usize = 0;
/// [`SockCounts::held`] index of `SOCK_FLOWS` values.
pub const COUNT_FLOWS: usize = 1;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: these types are repr(C), integers only, with explicit padding (sizes asserted).
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Xlate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockXlate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockOwner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendHealth {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Outlier {}
    // SAFETY: as above.
    unsafe impl aya::Pod for WalkCounts {}
}
