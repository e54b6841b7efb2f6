//! IP and transport headers of a packet in a cgroup_skb program, parsed once per packet for
//! both accounting and policy.
use aya_ebpf::programs::SkBuffContext;
use weft_abi::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::packet;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// IPv6 extension headers walked before the transport header, at most.
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// What the programs need of a packet. Addresses and ports in network byte order.
#[derive(Clone, Copy)]
pub struct Headers {
    /// 4 or 6.
    pub version: u8,
    /// Transport protocol (after IPv6 extension headers).
    pub protocol: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// 0 for protocols without ports, and for fragments after the first.
    pub sport: u16,
    pub dport: u16,
    /// ICMP / ICMPv6 type, else 0.
    pub icmp_type: u8,
    /// A fragment after the first: nothing past the IP header is known.
    pub later_fragment: bool,
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

/// Parses the packet that starts at the skb's data (the network header in cgroup_skb).
/// `None`: not IP, or truncated.
#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Option<Headers> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let (version, protocol, src, dst, l4, first_fragment) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = packet::load(ctx, 0)?;
            if vihl >> 4 != 4 {
                return None;
            }
            let frag: u16 = u16::from_be(packet::load(ctx, 6)?);
            let src: u32 = packet::load(ctx, 12)?;
            let dst: u32 = packet::load(ctx, 16)?;
            (
                4,
                packet::load::<u8>(ctx, 9)?,
                [src, 0, 0, 0],
                [dst, 0, 0, 0],
                usize::from(vihl & 0x0f) * 4,
                frag & 0x1fff == 0,
            )
        }
        ETH_P_IPV6 => {
            let v: u8 = packet::load(ctx, 0)?;
            if v >> 4 != 6 {
                return None;
            }
            let src: [u32; 4] = packet::load(ctx, 8)?;
            let dst: [u32; 4] = packet::load(ctx, 24)?;
            let (next, off, first) = ipv6_transport(ctx)?;
            (6, next, src, dst, off, first)
        }
        _ => return None,
    };
    let mut h = Headers {
        version,
        protocol,
        src,
        dst,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        later_fragment: !first_fragment,
    };
    if !first_fragment {
        return Some(h);
    }
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports: [u16; 2] = packet::load(ctx, l4)?;
            h.sport = ports[0];
            h.dport = ports[1];
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            h.icmp_type = packet::load(ctx, l4)?;
            if is_echo(protocol, h.icmp_type) {
                // The echo identifier stands for a port: a reply is matched to its request.
                let id: u16 = packet::load(ctx, l4 + 4)?;
                h.sport = id;
                h.dport = id;
            }
        }
        _ => {}
    }
    Some(h)
}

/// ICMP or ICMPv6 echo request or reply.
#[inline(always)]
pub fn is_echo(protocol: u8, icmp_type: u8) -> bool {
    matches!(
        (protocol, icmp_type),
        (IPPROTO_ICMP, 0 | 8) | (IPPROTO_ICMPV6, 128 | 129)
    )
}

/// The transport protocol of an IPv6 packet and its offset, after extension headers, and
/// whether it is a first fragment (or no fragment).
#[inline(always)]
fn ipv6_transport(ctx: &SkBuffContext) -> Option<(u8, usize, bool)> {
    let mut next: u8 = packet::load(ctx, 6)?;
    let mut off: usize = 40;
    let mut first = true;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let Some(len) = ext_header_len(ctx, next, off) else {
            return Some((next, off, first));
        };
        // Unwrapped before use: LLVM would otherwise compute `off + len` from a register the
        // failure path never set, and the verifier rejects reading it.
        let len = len?;
        if next == 44 {
            // Fragment offset: the upper 13 bits of bytes 2-3.
            let offset: u16 = u16::from_be(packet::load(ctx, off + 2)?);
            first &= offset & 0xfff8 == 0;
        }
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
        .then_some((next, off, first))
}
