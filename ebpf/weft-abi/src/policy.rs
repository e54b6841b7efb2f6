//! NetworkPolicy state shared by the agent (writer) and the kernel programs (readers).
//!
//! A pod's traffic is judged by three lookups, none of which grows with the number of rules
//! or pods:
//! 1. `ENDPOINTS` (hash): the cgroup of the socket (or its nearest ancestor that is a pod's
//!    cgroup) → [`EndpointInfo`]: the pod's policy set and whether it is isolated.
//! 2. `IPCACHE` (LPM trie): the peer address → [`IpcacheValue`], its numeric identity. Pod IPs
//!    are /32 (/128); ipBlock prefixes are shorter; an address matching nothing is
//!    [`IDENTITY_WORLD`].
//! 3. `POLICY` (LPM trie): (policy set, identity, direction, protocol, port prefix) → allowed.
//!    Looked up with the peer's identity and again with [`IDENTITY_ANY`] (rules without peers).
//!    A missing protocol or port is a shorter prefix; a port range is split into prefixes.
//!
//! Replies are never judged: a TCP packet reaching a socket that is not listening belongs to a
//! connection judged when it began, and other protocols are recognised by the socket's `SOCK_FLOWS` storage.

/// Identity in a `POLICY` key that matches every peer (a rule without `from`/`to`).
pub const IDENTITY_ANY: u32 = 0;
/// The identity of an address `IPCACHE` does not know: outside every pod and ipBlock.
pub const IDENTITY_WORLD: u32 = 2;
/// Allocated identities start here.
pub const IDENTITY_FIRST: u32 = 256;

/// [`EndpointInfo::flags`]: ingress is restricted (some policy selects the pod for Ingress).
pub const EP_INGRESS_ISOLATED: u32 = 1;
/// [`EndpointInfo::flags`]: egress is restricted.
pub const EP_EGRESS_ISOLATED: u32 = 2;
/// [`EndpointInfo::flags`]: another pod claims one of the pod's addresses too (the agent's
/// `compile::addresses`). They stay its own source addresses (the spoofed-source check), but
/// it is not taken to be reaching itself through them: the other claimant may hold them.
pub const EP_SHARED_ADDRESS: u32 = 4;
/// [`EndpointInfo::flags`]: the pod is in the mesh: its TCP connects to meshed pods of other
/// nodes go through the node's tunnel (see [`crate::mesh`]).
pub const EP_MESHED: u32 = 8;
/// [`EndpointInfo::flags`]: Istio's security policy refuses some plaintext caller of this
/// meshed pod (a STRICT port, an AuthorizationPolicy): a TCP connection to it that the node's
/// proxy did not deliver (`mesh::DELIVERY_MARK`) is judged at its SYN by the pod's plaintext
/// table ([`EndpointInfo::authz_table`] in `AUTHZ`), and refused when the table does not allow
/// it. The proxy decides for callers with a certificate.
pub const EP_AUTHZ: u32 = 16;

/// The policy set of a pod not bound yet (see `globals::UNBOUND_ISOLATED`): never allocated,
/// so no `POLICY` entry has it and everything it is judged on is denied.
pub const POLICY_SET_UNBOUND: u32 = u32::MAX;

/// Pod cgroups are looked for this many levels below the agent's cgroup root at most (a
/// Kubernetes pod's is 3 below the root, kubepods / QoS class / pod; nested and rootless
/// nodes add a few). The agent refuses, loudly, a pod deeper than this.
pub const MAX_POD_DEPTH: u32 = 12;

/// [`IpcacheValue::flags`]: the address is the node's own: traffic from it is always allowed,
/// as Kubernetes requires (kubelet probes, host-network peers); traffic to it is judged.
pub const IP_HOST: u32 = 1;
/// [`IpcacheValue::flags`]: the address of a meshed pod of another node: a meshed pod's TCP
/// connect to it is captured (see [`crate::mesh`]).
pub const IP_MESHED_REMOTE: u32 = 2;
/// [`IpcacheValue::flags`]: the address of a meshed pod of this node whose callers'
/// identities matter (an AuthorizationPolicy applies to it, or it refuses plaintext): a
/// meshed pod's TCP connect to it is captured, and the node's proxy decides on the caller's
/// identity and delivers it without leaving the node (see [`crate::mesh`]).
pub const IP_MESHED_LOCAL: u32 = 4;

/// Bits of a `POLICY` key before the protocol: policy set, identity, direction.
pub const POLICY_PREFIX_FIXED: u32 = 72;
/// Bits of a full `POLICY` key (protocol and port included).
pub const POLICY_PREFIX_FULL: u32 = POLICY_PREFIX_FIXED + 8 + 16;
/// Bits of an `IPCACHE` key before the address (the family word).
pub const IPCACHE_PREFIX_FAMILY: u32 = 32;

/// Value of `ENDPOINTS` (hash, key: cgroup v2 id of a local pod's cgroup).
/// Writer: agent `sync`. Readers: connect4/6, cgroup_skb.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointInfo {
    /// Local endpoint number (never 0).
    pub endpoint_id: u32,
    /// First part of this pod's `POLICY` keys.
    pub policy_set: u32,
    /// The pod's own identity.
    pub identity: u32,
    /// `EP_*`.
    pub flags: u32,
    /// The pod's addresses (network byte order; 0 when it has none of a family): a pod
    /// reaching itself is always allowed. Here rather than in `IPCACHE` so that the check
    /// changes in the same update as the endpoint.
    pub ip4: u32,
    /// [`crate::seal`] of the cgroup id and the other fields, set by the agent's map writer.
    pub seal: u32,
    pub ip6: [u32; 4],
    /// With `EP_AUTHZ`: the pod's table of decisions for plaintext callers in `AUTHZ` (0, which
    /// no table has, refuses every plaintext caller).
    pub authz_table: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 44);

impl EndpointInfo {
    /// What the kernel judges a pod by before the agent has bound its cgroup: isolated both
    /// ways with no rule, no address (so no source is taken for spoofed).
    pub const UNBOUND: Self = Self {
        endpoint_id: 0,
        policy_set: POLICY_SET_UNBOUND,
        identity: IDENTITY_WORLD,
        flags: EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED,
        ip4: 0,
        seal: 0,
        ip6: [0; 4],
        authz_table: 0,
    };

    /// The seal of this value under the cgroup id `key`.
    #[inline(always)]
    pub const fn seal_for(&self, key: u64) -> u32 {
        use crate::seal::{SEED_ENDPOINTS, finish, mix};
        let mut h = SEED_ENDPOINTS;
        h = mix(h, key as u32);
        h = mix(h, (key >> 32) as u32);
        h = mix(h, self.endpoint_id);
        h = mix(h, self.policy_set);
        h = mix(h, self.identity);
        h = mix(h, self.flags);
        h = mix(h, self.ip4);
        h = mix(h, self.ip6[0]);
        h = mix(h, self.ip6[1]);
        h = mix(h, self.ip6[2]);
        h = mix(h, self.ip6[3]);
        h = mix(h, self.authz_table);
        finish(h, 12)
    }

    /// This value as written under the cgroup id `key`.
    pub const fn sealed(mut self, key: u64) -> Self {
        self.seal = self.seal_for(key);
        self
    }

    /// Whether this copy is a whole value written under `key`.
    #[inline(always)]
    pub const fn is_sealed_for(&self, key: u64) -> bool {
        self.seal == self.seal_for(key)
    }

    /// Whether this is [`Self::UNBOUND`]'s stand-in rather than a bound pod.
    pub const fn is_unbound(&self) -> bool {
        self.policy_set == POLICY_SET_UNBOUND
    }

    /// Whether `addr` (family 4 or 6) is one of the pod's own addresses.
    pub fn owns(&self, family: u8, addr: &[u32; 4]) -> bool {
        if family == 4 {
            self.ip4 != 0 && addr[0] == self.ip4
        } else {
            self.ip6 != [0; 4] && *addr == self.ip6
        }
    }
}

/// Data of an `IPCACHE` key (after the LPM prefix length). Prefix length = 32 + address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheData {
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u32,
    /// Network byte order; IPv4 in the first word, the rest 0.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<IpcacheData>() == 20);

/// Value of `IPCACHE` (LPM trie). Writer: agent `sync`. Readers: connect4/6, cgroup_skb.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpcacheValue {
    pub identity: u32,
    /// `IP_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 8);

/// Data of a `POLICY` key (after the LPM prefix length). The port is in network byte order so
/// that a prefix of its bits is a block of consecutive ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyData {
    pub policy_set: u32,
    pub identity: u32,
    /// A [`crate::net::Direction`].
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// Network byte order.
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyData>() == 12);

/// [`PlaintextData::port`] of the entries for the ports a table does not name.
pub const PLAINTEXT_OTHER_PORTS: u32 = 0;
/// [`PlaintextData::port`]: `PLAINTEXT_PORT | port` (host byte order) is a port the table
/// names; its entries decide for it rather than [`PLAINTEXT_OTHER_PORTS`]'.
pub const PLAINTEXT_PORT: u32 = 1 << 16;
/// Bits of an `AUTHZ` key before the source address: table, port word, family.
pub const PLAINTEXT_PREFIX_FIXED: u32 = 96;
/// [`PlaintextValue::flags`]: plaintext from these sources to these ports is allowed.
pub const PLAINTEXT_ALLOW: u32 = 1;

/// Data of an `AUTHZ` key (after the LPM prefix length): one entry of a plaintext table, the
/// decision of a meshed pod's security policy for TCP callers without a certificate. A
/// table is immutable: the agent writes a new one (its own number) before an endpoint points
/// to it, and deletes it once none does. Looked up with the destination port's word, then,
/// when the table does not name the port (no entry at all), with [`PLAINTEXT_OTHER_PORTS`].
/// Prefix length = [`PLAINTEXT_PREFIX_FIXED`] + source address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlaintextData {
    /// [`EndpointInfo::authz_table`] (never 0).
    pub table: u32,
    /// `PLAINTEXT_PORT | port` or [`PLAINTEXT_OTHER_PORTS`].
    pub port: u32,
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u32,
    /// The caller's address prefix: network byte order, IPv4 in the first word.
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<PlaintextData>() == 28);

/// Value of `AUTHZ` (LPM trie). Writer: agent `sync`. Reader: cgroup_skb ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlaintextValue {
    /// `PLAINTEXT_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PlaintextValue>() == 4);

/// [`PolicyValue::flags`]: the entry covers every port (its rule lists no port).
pub const POL_ANY_PORT: u32 = 1;

/// Value of `POLICY` (LPM trie): present means allowed. Writer: agent `sync`. Readers:
/// connect4/6, cgroup_skb.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// A stable hash of the rule that allowed this (namespace/name, direction, index), for
    /// reports; the agent maps it back to the rule.
    pub rule: u32,
    /// `POL_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// A socket's allowed exchange with one peer, for protocols without connection state in the
/// socket (UDP, SCTP, ICMP echo with its identifier as the port): what a slot of
/// [`SockFlows`] is looked up by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowPeer {
    /// Network byte order; IPv4 in the first word.
    pub peer: [u32; 4],
    /// Network byte order.
    pub peer_port: u16,
    pub protocol: u8,
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<FlowPeer>() == 20);

impl FlowPeer {
    /// A hash of the peer: where in [`SockFlows`] its slot is looked for.
    #[inline(always)]
    pub const fn hash(&self) -> u32 {
        let mut h = crate::seal::SEED_FLOWS;
        h = crate::seal::mix(h, self.peer[0]);
        h = crate::seal::mix(h, self.peer[1]);
        h = crate::seal::mix(h, self.peer[2]);
        h = crate::seal::mix(h, self.peer[3]);
        h = crate::seal::mix(
            h,
            self.peer_port as u32 | (self.protocol as u32) << 16 | (self.family as u32) << 24,
        );
        crate::seal::finish(h, 5)
    }
}

/// One remembered exchange of a socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    pub peer: FlowPeer,
    pub _pad: u32,
    /// When the exchange was last seen (ktime ns); 0: the slot is free.
    pub seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FlowSlot>() == 32);

/// The kernel's `struct bpf_spin_lock`, found by its BTF name in a map value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// Slots of [`SockFlows`]; a power of two.
pub const FLOW_SLOTS: u32 = 16;
/// Consecutive slots a peer may occupy, from the one its hash names.
pub const FLOW_WAYS: u32 = 4;

/// [`SockFlows::flags`]: some exchange of the socket did not fit its slots and went to the
/// node-wide `POLICY_FLOWS` (look there too).
pub const FLOWS_OVERFLOWED: u32 = 1;
/// [`SockFlows::flags`]: the value counts against `owner`'s budget (cleared when sock_release
/// gives it back).
pub const FLOWS_COUNTED: u32 = 2;

/// Value of `SOCK_FLOWS` (socket storage): the allowed exchanges of one socket, so the packets
/// of each pass both ways without being judged again. The storage lives and dies with its
/// socket: no socket's exchanges push out another's. A socket with more than [`FLOW_WAYS`]
/// live peers in one run of slots (a server answering many clients) puts the next ones in the
/// node-wide `POLICY_FLOWS` LRU instead. Writers and readers: connect4/6 and cgroup_skb, from
/// several CPUs at once: every access holds `lock`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFlows {
    pub lock: bpf_spin_lock,
    /// The pod whose socket-state budget this value counts against (see
    /// `crate::svc::SockOwner`).
    pub owner: u32,
    /// `FLOWS_*`.
    pub flags: u32,
    pub _pad: u32,
    pub slots: [FlowSlot; FLOW_SLOTS as usize],
}
const _: () = assert!(core::mem::size_of::<SockFlows>() == 528);

/// Key of `POLICY_FLOWS` (LRU hash): an allowed exchange of a socket whose own slots were full
/// (see [`SockFlows`]). Value: the last time (ktime ns) it was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyFlowKey {
    pub cookie: u64,
    pub peer: FlowPeer,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyFlowKey>() == 32);

/// An allowed flow not seen for this long is judged again (like conntrack's UDP timeout).
pub const FLOW_IDLE_NS: u64 = 120 * 1_000_000_000;
/// A flow's timestamp is rewritten at most this often (one write per packet would make every
/// CPU fight over the entry).
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// How a verdict was reached: index into `VERDICTS` (per-CPU array of u64).
/// Writer: connect4/6 and cgroup_skb. Reader: agent `stats`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// Allowed by an entry for the peer's identity and port.
    L3L4 = 0,
    /// Allowed by an entry for the peer's identity, every port.
    L3Only = 1,
    /// Allowed by an entry for every peer, one port.
    L4Only = 2,
    /// Allowed by an entry for every peer and port.
    All = 3,
    /// Allowed: the node's own address (kubelet probes), or a pod reaching itself.
    Host = 4,
    /// Denied: the pod is isolated and nothing allows the peer and port.
    None = 5,
}

impl Match {
    pub const ALL: [Self; 6] = [
        Self::L3L4,
        Self::L3Only,
        Self::L4Only,
        Self::All,
        Self::Host,
        Self::None,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::L3L4 => "l3-l4",
            Self::L3Only => "l3-only",
            Self::L4Only => "l4-only",
            Self::All => "all",
            Self::Host => "host-or-self",
            Self::None => "none",
        }
    }
}

/// Slot of a (direction, match) pair in `VERDICTS`.
pub const fn verdict_index(direction: crate::net::Direction, m: Match) -> u32 {
    direction as u32 * Match::ALL.len() as u32 + m as u32
}

/// Slots in `VERDICTS`.
pub const VERDICTS: u32 = 2 * Match::ALL.len() as u32;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: these types are repr(C), integers only, with explicit padding (sizes asserted).
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpcacheData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PlaintextData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PlaintextValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockFlows {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyFlowKey {}
}
