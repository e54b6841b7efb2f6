//! Per-cgroup traffic accounting of non-TCP packets (UDP, ICMP, ...); TCP is accounted per
//! connection by sock_ops.
//!
//! Writer: `weft_skb_ingress` / `weft_skb_egress` (kernel), into the per-CPU hash `TRAFFIC`.
//! Reader: the agent, which sums the CPUs, reports totals and deletes keys of removed cgroups.

/// Direction of a packet relative to the workload.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// Key of `TRAFFIC`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    /// cgroup v2 id (inode number of the cgroup directory) of the socket.
    pub cgroup_id: u64,
    /// A [`Direction`].
    pub direction: u8,
    /// 4 or 6.
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
