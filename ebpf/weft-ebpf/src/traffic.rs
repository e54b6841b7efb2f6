//! Per-cgroup traffic accounting (cgroup_skb) of everything but TCP: TCP is accounted per
//! connection, exactly, by sock_ops, and a map update per TCP packet would cost every
//! connection for nothing. Counts and never drops.
use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_skb_cgroup_id, programs::SkBuffContext,
};
use weft_abi::{
    IPPROTO_TCP,
    stats::Counter,
    traffic::{Direction, TrafficKey, TrafficValue},
};

use crate::{headers::Headers, maps::TRAFFIC, stats};

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
