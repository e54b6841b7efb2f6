//! Per-cgroup traffic accounting of non-TCP packets (UDP, ICMP, ...); TCP is accounted per
//! connection by sock_ops.
//!
//! Writer: `weft_skb_ingress` / `weft_skb_egress` (kernel), into the per-CPU hash `TRAFFIC`.
//! Reader: the agent, which sums the CPUs, reports totals and deletes keys of removed cgroups.

/// Key of `TRAFFIC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    /// cgroup v2 id (inode number of the cgroup directory) of the socket.
    pub cgroup_id: u64,
    /// A [`crate::net::Direction`].
    pub direction: u8,
    /// A [`crate::net::Family`]: 4 or 6.
    pub ip_version: u8,
    /// IP protocol number of the transport header (after IPv6 extension headers).
    pub protocol: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<TrafficKey>() == 16);

/// Value of `TRAFFIC` (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficValue {
    pub packets: u64,
    /// Bytes of the IP packet, headers included.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficValue>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, explicit padding, size asserted.
unsafe impl aya::Pod for TrafficKey {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, no padding, size asserted.
unsafe impl aya::Pod for TrafficValue {}

/// Key of `UDP_FLOW_STATS`: one UDP flow of a local socket, by addresses. Seen from the
/// local socket: `local` is the pod's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpFlowStatsKey {
    /// Network byte order words (IPv4 in word 0).
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Network byte order.
    pub local_port: u16,
    /// Network byte order.
    pub remote_port: u16,
    /// A [`crate::net::Family`]: 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<UdpFlowStatsKey>() == 40);

/// Value of `UDP_FLOW_STATS` (LRU, shared by CPUs: counters are added atomically).
///
/// Writer: `weft_skb_ingress` / `weft_skb_egress`. Reader: the agent's telemetry, which turns
/// increases into metrics every interval and deletes flows idle longer than the timeout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpFlowStatsValue {
    pub tx_packets: u64,
    /// Bytes of the IP packets, headers included.
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// `bpf_ktime_get_coarse_ns()` of the first and the latest packet.
    pub first_ns: u64,
    pub last_ns: u64,
    /// [`crate::net::Direction`] of the first packet: egress means the local socket started the flow.
    pub initiator: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlowStatsValue>() == 56);

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, explicit padding, size asserted.
unsafe impl aya::Pod for UdpFlowStatsKey {}
#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, explicit padding, size asserted.
unsafe impl aya::Pod for UdpFlowStatsValue {}
