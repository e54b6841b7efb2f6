//! Per-cgroup traffic accounting (cgroup_skb). Counts and never drops.
use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_skb_cgroup_id, programs::SkBuffContext,
};
use weft_abi::{
    stats::Counter,
    traffic::{Direction, TrafficKey, TrafficValue},
};

use crate::{maps::TRAFFIC, packet, stats};

/// -EEXIST, as map helpers return it.
const ERR_EXISTS: i32 = -17;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// IPv6 extension headers walked before the transport header, at most.
const MAX_IPV6_EXT_HEADERS: usize = 6;

pub fn account(ctx: &SkBuffContext, direction: Direction) {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let Some((ip_version, l4)) = classify(ctx, ethertype) else {
        stats::bump(Counter::PacketsUnparsed);
        return;
    };
    let key = TrafficKey {
        // SAFETY: the context pointer is valid for the helper for the program's duration.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        direction: direction as u8,
        ip_version,
        protocol: l4,
        _pad: [0; 5],
    };
    add(&key, u64::from(ctx.len()));
}

fn add(key: &TrafficKey, bytes: u64) {
    if let Some(v) = TRAFFIC.get_ptr_mut(key) {
        // SAFETY: per-CPU value: no other writer on this CPU while the program runs.
        unsafe {
            (*v).packets += 1;
            (*v).bytes += bytes;
        }
        return;
    }
    let value = TrafficValue { packets: 1, bytes };
    match TRAFFIC.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Another CPU created the key between our lookup and insert: count into ours.
        Err(ERR_EXISTS) => {
            if let Some(v) = TRAFFIC.get_ptr_mut(key) {
                // SAFETY: as above.
                unsafe {
                    (*v).packets += 1;
                    (*v).bytes += bytes;
                }
            }
        }
        Err(_) => stats::bump(Counter::TrafficFull),
    }
}

/// Returns (IP version, transport protocol) of the packet that starts at `data`.
#[inline(always)]
fn classify(ctx: &SkBuffContext, ethertype: u16) -> Option<(u8, u8)> {
    match ethertype {
        ETH_P_IP => {
            let vihl: u8 = packet::load(ctx, 0)?;
            if vihl >> 4 != 4 {
                return None;
            }
            Some((4, packet::load(ctx, 9)?))
        }
        ETH_P_IPV6 => {
            let v: u8 = packet::load(ctx, 0)?;
            if v >> 4 != 6 {
                return None;
            }
            let mut next: u8 = packet::load(ctx, 6)?;
            let mut off: usize = 40;
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                let len = match next {
                    // Hop-by-hop, routing, destination options: (hdr_ext_len + 1) * 8.
                    0 | 43 | 60 => (usize::from(packet::load::<u8>(ctx, off + 1)?) + 1) * 8,
                    // Fragment: fixed 8 bytes.
                    44 => 8,
                    // Authentication header: (payload_len + 2) * 4.
                    51 => (usize::from(packet::load::<u8>(ctx, off + 1)?) + 2) * 4,
                    _ => return Some((6, next)),
                };
                next = packet::load(ctx, off)?;
                off += len;
                // Keeps the offset bounded for the verifier; no real header chain is longer.
                if off > 512 {
                    return None;
                }
            }
            // More extension headers than any real stack sends: reported as unparsed.
            None
        }
        _ => None,
    }
}
