//! TCP connection lifecycle: written by the sock_ops program, read by the agent's `conntrack`.

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
    pub const NEW_SYN_RECV: u32 = 12;
}

/// What a [`ConnEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnEventKind {
    /// The connection reached ESTABLISHED.
    Open = 1,
    /// The socket reached CLOSE; counters are final.
    Close = 2,
    /// A long-lived connection's counters so far (written by cgroup_skb egress at most once per
    /// `CONN_UPDATE_INTERVAL_NS` per connection).
    Update = 3,
    /// A connection or packet was dropped (`reason`, `direction`, `protocol` are set).
    Drop = 4,
    /// Health checking ejected a backend: `remote_*` is the backend, `service_*` the
    /// frontend, `duration_ns` how long it gets no new connection, `reason` the times it was
    /// ejected (less one per interval in service).
    Ejection = 5,
}

impl ConnEventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Open),
            2 => Some(Self::Close),
            3 => Some(Self::Update),
            4 => Some(Self::Drop),
            5 => Some(Self::Ejection),
            _ => None,
        }
    }
}

/// Which end of the connection the socket is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The socket called connect().
    Active = 1,
    /// The socket was accepted from a listener.
    Passive = 2,
}

impl Side {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Active),
            2 => Some(Self::Passive),
            _ => None,
        }
    }
}

/// Bits of [`ConnEvent::flags`] and [`ConnState::flags`].
pub mod flags {
    /// The socket sent a FIN (it went through FIN_WAIT1, CLOSING or LAST_ACK).
    pub const FIN_SENT: u32 = 1 << 0;
    /// The socket's FIN was acknowledged by the peer (subtracted from `bytes_sent`).
    pub const FIN_ACKED: u32 = 1 << 1;
    /// The socket received the peer's FIN (subtracted from `bytes_received`).
    pub const FIN_RECEIVED: u32 = 1 << 2;
    /// Kernel-internal: a segment with FIN was validated while we were closing;
    /// `ConnState::peer_fin_seq` holds its sequence number.
    pub const PEER_FIN_SEEN: u32 = 1 << 3;
    /// A retransmission timer expired and the kernel gave up (BPF_SOCK_OPS_RTO_CB with
    /// `expired`): the connection timed out rather than being refused or reset.
    pub const TIMED_OUT: u32 = 1 << 4;
    /// `ConnEvent::service_*` hold the ClusterIP frontend the client asked for.
    pub const VIA_SERVICE: u32 = 1 << 5;
    /// Kernel-internal (`ConnState`): the socket is in `SOCK_PAIRS` and has a `REDIRECTED`
    /// entry to take at close.
    pub const PAIRED: u32 = 1 << 6;
    /// Some of the connection's payload went socket to socket (`--sockmap`): counted by
    /// `weft_sk_msg`, not by TCP; segment and RTT figures cover only what crossed the stack.
    pub const REDIRECTED: u32 = 1 << 7;
    /// The connection was captured for the mesh: `remote_*` is where the tunnel takes it
    /// (the socket itself is connected to the node's outbound listener).
    pub const MESHED: u32 = 1 << 8;
    /// The server's end of a connection the mesh delivered from a tunnel: accepted from a
    /// SYN carrying [`crate::mesh::DELIVERY_MARK`].
    pub const DELIVERED: u32 = 1 << 9;
    /// Kernel-internal (`ConnState`): the socket's `TCP_USER_TIMEOUT` is its Service's
    /// connect timeout until establishment (`ConnState::saved_user_timeout_ms` is its own).
    pub const CONNECT_TIMEOUT: u32 = 1 << 10;
}

/// Why a [`ConnEventKind::Drop`] happened (`ConnEvent::reason`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// NetworkPolicy denied it.
    PolicyDenied = 1,
    /// A connect or datagram to a Service without ready backends (refused).
    NoBackends = 2,
    /// A packet that could not be parsed, from or to a pod isolated by policy.
    Unparsed = 3,
    /// A non-first IP fragment from or to a pod isolated by policy (it carries no ports to
    /// judge; the kernel's own sockets never send one past the hook).
    Fragment = 4,
    /// A packet from a pod isolated by policy whose source is not the pod's address (a raw
    /// socket or IP_FREEBIND): it could plant a reply path for a peer policy does not allow.
    SpoofedSource = 5,
    /// Traffic of a pod whose cgroup the agent has not bound yet (Kubernetes mode): isolated
    /// both ways until it is.
    Unbound = 6,
    /// A datagram of a UDP socket connected through a ClusterIP to a backend that has left
    /// the Service since: dropped (the send fails) so the application reconnects.
    StaleBackend = 7,
    /// A plaintext TCP connection to a meshed pod whose security policy refuses plaintext
    /// callers (`policy::EP_AUTHZ`).
    Authorization = 8,
}

impl DropReason {
    pub const ALL: [Self; 8] = [
        Self::PolicyDenied,
        Self::NoBackends,
        Self::Unparsed,
        Self::Fragment,
        Self::SpoofedSource,
        Self::Unbound,
        Self::StaleBackend,
        Self::Authorization,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::PolicyDenied),
            2 => Some(Self::NoBackends),
            3 => Some(Self::Unparsed),
            4 => Some(Self::Fragment),
            5 => Some(Self::SpoofedSource),
            6 => Some(Self::Unbound),
            7 => Some(Self::StaleBackend),
            8 => Some(Self::Authorization),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDenied => "policy_denied",
            Self::NoBackends => "no_backends",
            Self::Unparsed => "unparsed",
            Self::Fragment => "fragment",
            Self::SpoofedSource => "spoofed_source",
            Self::Unbound => "unbound_pod",
            Self::StaleBackend => "stale_backend",
            Self::Authorization => "authorization",
        }
    }
}

/// Drop events each CPU may write per second: a flood of denied packets must not fill the
/// ring buffer that open and close events share. Drops past it are still counted (`VERDICTS`,
/// `STATS`), only not reported one by one (`Counter::DropEventsSuppressed`).
pub const DROP_EVENTS_PER_SECOND: u64 = 1000;

/// Value of `DROP_BUDGET` (per-CPU array, one slot): the current one-second window.
///
/// Writer and reader: every program that reports drops (a race between a softirq and a
/// process-context program on one CPU only makes the budget approximate).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropBudget {
    pub window_start_ns: u64,
    pub sent: u64,
}
const _: () = assert!(core::mem::size_of::<DropBudget>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding, size asserted.
unsafe impl aya::Pod for DropBudget {}

/// One connection event.
///
/// Writers: `weft_sockops` (open, close), `weft_skb_egress` (update, drop), the connect and
/// sendmsg programs (drop), all into the `CONN_EVENTS` ring buffer.
/// Reader: the agent's `conntrack` module.
///
/// Addresses are the 4 words of the address in network byte order as the kernel stores them
/// (an IPv4 address is in word 0). Ports are in host byte order. Byte counts are application
/// payload: SYN and FIN sequence numbers are subtracted in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// A [`ConnEventKind`].
    pub kind: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// The socket cookie: unique per socket for the life of the kernel.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` when the event was produced (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// From connect() (active) or establishment (passive) to this event.
    pub duration_ns: u64,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
    /// A [`Side`].
    pub side: u32,
    /// The TCP state the socket left when it closed (for `Close`), else ESTABLISHED.
    pub last_state: u32,
    /// Payload bytes sent and acknowledged by the peer.
    pub bytes_sent: u64,
    /// Payload bytes received in order.
    pub bytes_received: u64,
    /// Smoothed RTT in microseconds (the kernel stores it multiplied by 8; this is divided).
    pub srtt_us: u32,
    /// Minimum RTT seen, in microseconds.
    pub rtt_min_us: u32,
    /// Segments retransmitted over the life of the connection.
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// With `flags::VIA_SERVICE`: the ClusterIP and port the client connected to (the
    /// remote address is then the backend the datapath chose). Port in host byte order.
    pub service_addr: [u32; 4],
    pub service_port: u32,
    /// IP protocol number (6 for every TCP event; drops may be any protocol).
    pub protocol: u32,
    /// Drops only: a [`DropReason`].
    pub reason: u32,
    /// Drops only: a [`crate::net::Direction`], seen from the local pod.
    pub direction: u32,
    /// With `flags::MESHED`: the client's network namespace (its pod's; the socket itself
    /// is bound to loopback).
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 160);

/// Per-connection state kept between sock_ops callbacks.
///
/// Writer: `weft_sockops` (kernel), key = socket cookie (u64), in `CONN_STATE`; the entry is
/// removed when the socket reaches CLOSE.
/// Reader: `weft_sockops`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// `bpf_ktime_get_ns()` at connect() (active) or at establishment (passive).
    pub start_ns: u64,
    /// `bytes_acked` at establishment: it counts the SYN on the active side only.
    pub bytes_acked_base: u64,
    /// `bytes_received` at establishment.
    pub bytes_received_base: u64,
    /// Bit `1 << state` for every TCP state the socket entered.
    pub states_seen: u32,
    /// A [`Side`].
    pub side: u32,
    /// Bits of [`flags`].
    pub flags: u32,
    /// Sequence number of the peer's FIN, valid with `flags::PEER_FIN_SEEN`: the FIN was
    /// consumed iff `rcv_nxt == peer_fin_seq + 1` when the socket closes.
    pub peer_fin_seq: u32,
    /// `bpf_ktime_get_coarse_ns()` of the last `Update` event (0: none yet); written by
    /// cgroup_skb egress, racing writers only cause a duplicate update.
    pub last_update_ns: u64,
    /// The socket's own `TCP_USER_TIMEOUT` while a Service's connect timeout stands in for
    /// it (with `flags::CONNECT_TIMEOUT`), given back at establishment or close.
    pub saved_user_timeout_ms: u32,
    /// The connect timeout set in its place (given back only if still in force).
    pub connect_timeout_ms: u32,
}
const _: () = assert!(core::mem::size_of::<ConnState>() == 56);

#[cfg(feature = "user")]
// SAFETY: ConnEvent is repr(C), made of integers only, with no implicit padding (size asserted).
unsafe impl aya::Pod for ConnEvent {}
#[cfg(feature = "user")]
// SAFETY: ConnState is repr(C), made of integers only, with no implicit padding (size asserted).
unsafe impl aya::Pod for ConnState {}

/// Key of `SOCK_PAIRS` and `REDIRECTED`: one end of a TCP connection, as its socket sees it.
/// The peer's key is the same with local and remote swapped. Addresses as in [`ConnEvent`]
/// (an IPv4 or IPv4-mapped address in word 0); ports in host byte order.
///
/// Writers: `weft_sockops` (at establishment, with `--sockmap`). Readers: `weft_sk_msg`,
/// `weft_sockops` (at close).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(core::mem::size_of::<PairKey>() == 40);

impl PairKey {
    /// The key of the other end of this connection.
    pub const fn peer(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Value of `REDIRECTED`: payload that went socket to socket, outside the TCP counters the
/// close event reads (`bytes_acked`, `bytes_received` never see it).
///
/// Writers: `weft_sockops` (creates it at establishment, removes it at close), `weft_sk_msg`
/// (adds what it redirects: `sent` of the sending end, `received` of the receiving end, with
/// atomic adds, since both ends' programs write them). Reader: `weft_sockops` at close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirected {
    /// The socket's cookie (its `CONN_STATE` key).
    pub cookie: u64,
    pub sent: u64,
    pub received: u64,
    /// `bpf_ktime_get_coarse_ns()` of this end's last `Update` event written by
    /// `weft_sk_msg` (0: none yet).
    pub last_update_ns: u64,
    /// `snd_nxt` and `rcv_nxt` at establishment: the first sequence number of this end's
    /// payload and of its peer's. Two entries are the two ends of one connection only when
    /// each one's `send_seq` is the other's `recv_seq` (random initial sequence numbers): a
    /// socket elsewhere with the same addresses (another network namespace) is no peer.
    pub send_seq: u32,
    pub recv_seq: u32,
    /// Non-zero once a send of this end took the TCP/IP stack (its peer was not paired yet):
    /// its later sends do too, or the peer could read them before the ones still in the
    /// stack (a receiver reads redirected data first).
    pub stack: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Redirected>() == 48);

impl Redirected {
    /// Whether `peer` is the other end of this entry's connection.
    pub const fn pairs_with(&self, peer: &Self) -> bool {
        self.send_seq == peer.recv_seq && self.recv_seq == peer.send_seq
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding, size asserted.
unsafe impl aya::Pod for PairKey {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding, size asserted.
unsafe impl aya::Pod for Redirected {}
