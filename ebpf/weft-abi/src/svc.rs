//! Service load balancing at the socket layer.
//!
//! Writers and readers:
//! - `SERVICES`, `BACKEND_SLOTS`, `MEMBERS`: written by the agent's `sync`, read by the
//!   sock_addr programs (connect, sendmsg) of the kernel, and by cgroup_skb egress for UDP
//!   sockets connected through a ClusterIP (is their backend still a member?).
//! - `AFFINITY`, `REVNAT`, `UDP_FLOWS`, `UDP_SOCKS`: written and read by the kernel programs
//!   (LRU maps; TCP entries of `REVNAT` are removed when the socket closes, UDP ones when it is
//!   released).
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

/// An address and port: a backend, or (in `REVNAT` values) the ClusterIP and port a socket
/// asked for.
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

/// Key of `REVNAT` (LRU): a socket and the backend it was sent to. The value is the ClusterIP
/// and port ([`Endpoint`]) the application asked for, so getpeername() and UDP recvmsg() show
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend: Endpoint,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);

/// Key of `UDP_FLOWS` (LRU): an unconnected UDP socket and the frontend it sends to; the value
/// is the backend [`Endpoint`] chosen for it, kept while it stays a member (like a conntrack
/// entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    pub cookie: u64,
    pub frontend: ServiceKey,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 32);

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

/// Value of `UDP_SOCKS` (LRU, key: socket cookie): the last translation of a UDP socket, so the
/// sock_release program can remove its `REVNAT` and `UDP_FLOWS` entries when it closes (a
/// resolver opens a socket per query; left to LRU eviction they would push out live entries),
/// and cgroup_skb can tell a connected socket whose backend has left the Service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSock {
    pub frontend: ServiceKey,
    pub backend: Endpoint,
    /// 1: made by connect (the socket sends only there); 0: by sendmsg (chosen per datagram).
    pub connected: u32,
}
const _: () = assert!(core::mem::size_of::<UdpSock>() == 44);

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
    unsafe impl aya::Pod for RevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UdpFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UdpSock {}
}
