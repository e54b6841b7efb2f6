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
    if l4 == IPPROTO_TCP {
        return;
    }
    let key = TrafficKey {
        // SAFETY: the context pointer is valid for the helper for the program's duration.
        cgroup_id: unsafe { bpf_skb_cgroup_id(ctx.skb.skb) },
        direction: direction as u8,
        ip_version,
        protocol: l4,
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

/// `None` when `next` is not an IPv6 extension header; else the header's length (`None`
/// inside when it cannot be read).
#[inline(always)]
fn ext_header_len(ctx: &SkBuffContext, next: u8, off: usize) -> Option<Option<usize>> {
    let hdr_ext_len = || packet::load::<u8>(ctx, off + 1).map(usize::from);
    match next {
        // Hop-by-hop, routing, destination options: (hdr_ext_len + 1) * 8.
        0 | 43 | 60 => Some(hdr_ext_len().map(|l| (l + 1) * 8)),
        // Fragment: fixed 8 bytes.
        44 => Some(Some(8)),
        // Authentication header: (payload_len + 2) * 4.
        51 => Some(hdr_ext_len().map(|l| (l + 2) * 4)),
        _ => None,
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
                let Some(len) = ext_header_len(ctx, next, off) else {
                    return Some((6, next));
                };
                // Unwrapped before use: LLVM would otherwise compute `off + len` from a register
                // the failure path never set, and the verifier rejects reading it.
                let len = len?;
                next = packet::load(ctx, off)?;
                off += len;
                // Keeps the offset bounded for the verifier; no real header chain is longer.
                if off > 512 {
                    return None;
                }
            }
            // More extension headers than any real stack sends: reported as unparsed.
            ext_header_len(ctx, next, off)
                .is_none()
                .then_some((6, next))
        }
        _ => None,
    }
}
