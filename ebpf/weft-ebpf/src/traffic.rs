//! Per-cgroup traffic accounting (cgroup_skb) of everything but TCP: TCP is accounted per
//! connection, exactly, by sock_ops, and a map update per TCP packet would cost every
//! connection for nothing. Counts and never drops.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use weft_abi::{
    IPPROTO_TCP, IPPROTO_UDP,
    net::Direction,
    stats::Counter,
    traffic::{TrafficKey, TrafficValue, UdpFlowStatsKey, UdpFlowStatsValue},
};

use crate::{
    events,
    headers::Headers,
    maps::{TRAFFIC, UDP_FLOW_STATS},
    stats,
};

/// -EEXIST, as map helpers return it.
const ERR_EXISTS: i32 = -17;

/// Counts a parsed packet (not TCP) for its socket's cgroup.
#[inline(always)]
pub fn account(ctx: &SkBuffContext, h: &Headers, direction: Direction) {
    if h.protocol == IPPROTO_TCP {
        return;
    }
    let key = TrafficKey {
        // SAFETY: the context pointer is valid for the helper for the program's duration.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        direction: direction as u8,
        ip_version: h.version,
        protocol: h.protocol,
        _pad: [0; 5],
    };
    // A GSO/GRO skb stands for several packets on the wire; its headers are counted once.
    // SAFETY: context field read, checked by the verifier.
    let segs = unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).gso_segs) }.max(1);
    add(&key, u64::from(segs), u64::from(ctx.len()));
    if h.protocol == IPPROTO_UDP && events::enabled() {
        udp_flow(h, direction, u64::from(segs), u64::from(ctx.len()));
    }
}

/// Counts a UDP packet into its flow (seen from the local socket).
#[inline(always)]
fn udp_flow(h: &Headers, direction: Direction, packets: u64, bytes: u64) {
    let egress = direction == Direction::Egress;
    let key = if egress {
        UdpFlowStatsKey {
            local: h.src,
            remote: h.dst,
            local_port: h.sport,
            remote_port: h.dport,
            family: h.version,
            _pad: [0; 3],
        }
    } else {
        UdpFlowStatsKey {
            local: h.dst,
            remote: h.src,
            local_port: h.dport,
            remote_port: h.sport,
            family: h.version,
            _pad: [0; 3],
        }
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let count = |v: *mut UdpFlowStatsValue| {
        // SAFETY: `v` is a live map value; the fields are u64 and aligned.
        unsafe {
            if egress {
                stats::add(&raw mut (*v).tx_packets, packets);
                stats::add(&raw mut (*v).tx_bytes, bytes);
            } else {
                stats::add(&raw mut (*v).rx_packets, packets);
                stats::add(&raw mut (*v).rx_bytes, bytes);
            }
            // A racing writer stores a time just as good.
            core::ptr::write_volatile(&raw mut (*v).last_ns, now);
        }
    };
    if let Some(v) = UDP_FLOW_STATS.get_ptr_mut(key) {
        count(v);
        return;
    }
    let (tx, rx) = if egress {
        ((packets, bytes), (0, 0))
    } else {
        ((0, 0), (packets, bytes))
    };
    let value = UdpFlowStatsValue {
        tx_packets: tx.0,
        tx_bytes: tx.1,
        rx_packets: rx.0,
        rx_bytes: rx.1,
        first_ns: now,
        last_ns: now,
        initiator: direction as u32,
        _pad: 0,
    };
    match UDP_FLOW_STATS.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Another CPU created the flow between our lookup and insert: count into it.
        Err(ERR_EXISTS) => {
            if let Some(v) = UDP_FLOW_STATS.get_ptr_mut(key) {
                count(v);
            }
        }
        // An LRU insert evicts rather than fails; anything else is counted with TRAFFIC's.
        Err(_) => stats::bump(Counter::TrafficFull),
    }
}

fn add(key: &TrafficKey, packets: u64, bytes: u64) {
    let count = |v: *mut TrafficValue| {
        // SAFETY: `v` is a live map value; the fields are u64 and aligned.
        let (p, b) = unsafe { (&raw mut (*v).packets, &raw mut (*v).bytes) };
        stats::add(p, packets);
        stats::add(b, bytes);
    };
    if let Some(v) = TRAFFIC.get_ptr_mut(key) {
        count(v);
        return;
    }
    let value = TrafficValue { packets, bytes };
    match TRAFFIC.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Another program created the key between our lookup and insert: count into it.
        Err(ERR_EXISTS) => {
            if let Some(v) = TRAFFIC.get_ptr_mut(key) {
                count(v);
            }
        }
        Err(_) => stats::bump(Counter::TrafficFull),
    }
}
