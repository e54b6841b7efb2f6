//! weft's kernel programs. Built for bpfel-unknown-none by `cargo xtask build-ebpf`; the agent
//! embeds the object. Entry points are thin: each calls a `try_` function and maps its
//! result, a [`verdict::Verdict`] or a [`verdict::Fault`], to the program's return value.
#![no_std]
#![no_main]
// Atomic add without compare-and-swap (see stats::add).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics: the BPF target has no CAS-based atomics"
)]

#[macro_use]
mod ctx;
mod events;
mod flows;
mod headers;
mod maps;
mod mesh;
mod outlier;
mod packet;
mod policy;
mod redirect;
mod service;
mod sockops;
mod stats;
mod storage;
mod traffic;
mod verdict;
mod xlate;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use service::{Hook, V4, V6};
use verdict::{Fault, Verdict};
use weft_abi::{IPPROTO_UDP, conn::DropReason, net::Direction, stats::Counter};

/// TCP connection lifecycle of every socket under the attached cgroup.
#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    // The return value of sock_ops is not a verdict for the callbacks we use; 1 is "ok". A
    // helper that failed leaves the connection untracked, which its counters tell.
    match sockops::try_sockops(&ctx) {
        Ok(()) | Err(_) => 1,
    }
}

/// With `--sockmap`, attached to `SOCK_PAIRS`: sends between two local pods' sockets go
/// socket to socket.
#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    redirect::try_sk_msg(&ctx)
}

/// Packets delivered to sockets under the attached cgroup: accounting, ingress policy.
#[cgroup_skb(ingress)]
pub fn weft_skb_ingress(ctx: SkBuffContext) -> i32 {
    match try_skb(&ctx, Direction::Ingress) {
        Ok(verdict) => verdict.code(),
        Err(fault) => fault.code(),
    }
}

/// Packets sent by sockets under the attached cgroup: accounting, egress policy.
#[cgroup_skb(egress)]
pub fn weft_skb_egress(ctx: SkBuffContext) -> i32 {
    match try_skb(&ctx, Direction::Egress) {
        Ok(verdict) => verdict.code(),
        Err(fault) => fault.code(),
    }
}

/// Never attached: the agent runs it with BPF_PROG_TEST_RUN, whose packet belongs to a socket
/// of the calling thread, to learn the absolute level of a cgroup it may only see through a
/// cgroup namespace. In: `cb[0]`, a level. Out: `cb[1]`, `cb[2]`, the low and high words of
/// the caller's ancestor cgroup id at that level (0 past its own level).
#[cgroup_skb]
pub fn weft_level_probe(ctx: SkBuffContext) -> i32 {
    let level = ctx_read!(ctx.skb.skb, cb[0]);
    // SAFETY: the program's context; the helper reads the socket's cgroup only.
    let id = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level as i32)
    };
    ctx_write!(ctx.skb.skb, id as u32, cb[1]);
    ctx_write!(ctx.skb.skb, (id >> 32) as u32, cb[2]);
    1
}

#[inline(always)]
fn try_skb(ctx: &SkBuffContext, direction: Direction) -> Result<Verdict, Fault> {
    // Most packets: TCP of a TCP socket, nothing to judge or count here (an established
    // connection may be due for a telemetry update, checked on the egress side: a receiver
    // sends ACKs, so every connection that moves data sends something).
    if let Some(sk) = policy::tcp_passes(ctx, direction) {
        if direction == Direction::Egress {
            events::maybe_update(ctx, sk);
        }
        return Ok(Verdict::Pass);
    }
    // Not IP, truncated, or IPv6 with more extension headers than we walk: counted, and
    // dropped when policy isolates the pod in this direction (never a way around it).
    let Some(h) = headers::parse(ctx) else {
        stats::bump(Counter::PacketsUnparsed);
        return Ok(pass_if(policy::unparsed(ctx, direction)));
    };
    // Before policy: a datagram dropped here leaves no reply path behind.
    if direction == Direction::Egress
        && h.protocol == IPPROTO_UDP
        && !service::backend_current(ctx, h.version, &h.dst, h.dport)
    {
        policy::skb_dropped(ctx, &h, direction, DropReason::StaleBackend);
        return Ok(Verdict::Deny);
    }
    if !policy::packet(ctx, &h, direction) {
        return Ok(Verdict::Deny);
    }
    traffic::account(ctx, &h, direction);
    Ok(Verdict::Pass)
}

#[inline(always)]
fn pass_if(allowed: bool) -> Verdict {
    if allowed {
        Verdict::Pass
    } else {
        Verdict::Deny
    }
}

/// A cgroup sock_addr program: `match try_x(&ctx, ..)`, its verdict or fault as the return
/// value.
macro_rules! sock_addr_program {
    ($(#[doc = $doc:literal])* $hook:ident: $name:ident => $try:path $(, $arg:expr)?) => {
        $(#[doc = $doc])*
        #[cgroup_sock_addr($hook)]
        pub fn $name(ctx: SockAddrContext) -> i32 {
            match $try(&ctx $(, $arg)?) {
                Ok(verdict) => verdict.code(),
                Err(fault) => fault.code(),
            }
        }
    };
}

sock_addr_program!(
    /// ClusterIP to backend for TCP and connected UDP (IPv4 sockets).
    connect4: weft_connect4 => service::try_translate::<V4>, Hook::Connect
);
sock_addr_program!(
    /// ClusterIP to backend for TCP and connected UDP (IPv6 sockets, IPv4-mapped included).
    connect6: weft_connect6 => service::try_translate::<V6>, Hook::Connect
);
sock_addr_program!(
    /// ClusterIP to backend for each datagram of an unconnected UDP socket.
    sendmsg4: weft_sendmsg4 => service::try_translate::<V4>, Hook::Sendmsg
);
sock_addr_program!(sendmsg6: weft_sendmsg6 => service::try_translate::<V6>, Hook::Sendmsg);
sock_addr_program!(
    /// UDP replies from a backend appear to come from the ClusterIP.
    recvmsg4: weft_recvmsg4 => service::try_reverse::<V4>
);
sock_addr_program!(recvmsg6: weft_recvmsg6 => service::try_reverse::<V6>);
sock_addr_program!(
    /// getpeername() returns the ClusterIP a socket connected to.
    getpeername4: weft_getpeername4 => service::try_reverse::<V4>
);
sock_addr_program!(getpeername6: weft_getpeername6 => service::try_reverse::<V6>);

/// A closing socket's storage values leave its pod's budget.
#[cgroup_sock(sock_release)]
pub fn weft_sock_release(ctx: SockContext) -> i32 {
    match service::try_release(&ctx) {
        Ok(verdict) => verdict.code(),
        Err(fault) => fault.code(),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this; it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
