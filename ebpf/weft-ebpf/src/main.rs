//! weft's kernel programs. Built for bpfel-unknown-none by `cargo xtask build-ebpf`; the agent
//! embeds the object. Entry points are thin: each calls a `try_` function and maps its result.
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
mod headers;
mod maps;
mod packet;
mod policy;
mod service;
mod sockops;
mod stats;
mod traffic;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use service::{Hook, V4, V6};
use weft_abi::{
    policy::{DIR_EGRESS, DIR_INGRESS},
    stats::Counter,
    traffic::Direction,
};

/// TCP connection lifecycle of every socket under the attached cgroup.
#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    // The return value of sock_ops is not a verdict for the callbacks we use; 1 is "ok".
    match sockops::try_sockops(&ctx) {
        Ok(()) | Err(_) => 1,
    }
}

/// Packets delivered to sockets under the attached cgroup: accounting, ingress policy.
#[cgroup_skb(ingress)]
pub fn weft_skb_ingress(ctx: SkBuffContext) -> i32 {
    skb(&ctx, Direction::Ingress, DIR_INGRESS)
}

/// Packets sent by sockets under the attached cgroup: accounting, egress policy.
#[cgroup_skb(egress)]
pub fn weft_skb_egress(ctx: SkBuffContext) -> i32 {
    skb(&ctx, Direction::Egress, DIR_EGRESS)
}

#[inline(always)]
fn skb(ctx: &SkBuffContext, direction: Direction, policy_direction: u8) -> i32 {
    // Most packets: TCP of a TCP socket, nothing to judge or count here (an established
    // connection may be due for a telemetry update, checked on the egress side: a receiver
    // sends ACKs, so every connection that moves data sends something).
    if let Some(sk) = policy::tcp_passes(ctx, policy_direction) {
        if direction == Direction::Egress {
            events::maybe_update(ctx, sk);
        }
        return 1;
    }
    // Not IP, truncated, or IPv6 with more extension headers than we walk: counted, and
    // dropped when policy isolates the pod in this direction (never a way around it).
    let Some(h) = headers::parse(ctx) else {
        stats::bump(Counter::PacketsUnparsed);
        return i32::from(policy::unparsed(ctx, policy_direction));
    };
    if !policy::packet(ctx, &h, policy_direction) {
        return 0;
    }
    traffic::account(ctx, &h, direction);
    1
}

/// ClusterIP to backend for TCP and connected UDP (IPv4 sockets).
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    service::translate::<V4>(&ctx, Hook::Connect)
}

/// ClusterIP to backend for TCP and connected UDP (IPv6 sockets, IPv4-mapped included).
#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    service::translate::<V6>(&ctx, Hook::Connect)
}

/// ClusterIP to backend for each datagram of an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn weft_sendmsg4(ctx: SockAddrContext) -> i32 {
    service::translate::<V4>(&ctx, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn weft_sendmsg6(ctx: SockAddrContext) -> i32 {
    service::translate::<V6>(&ctx, Hook::Sendmsg)
}

/// UDP replies from a backend appear to come from the ClusterIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn weft_recvmsg4(ctx: SockAddrContext) -> i32 {
    service::reverse::<V4>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn weft_recvmsg6(ctx: SockAddrContext) -> i32 {
    service::reverse::<V6>(&ctx)
}

/// getpeername() returns the ClusterIP a socket connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    service::reverse::<V4>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeername6(ctx: SockAddrContext) -> i32 {
    service::reverse::<V6>(&ctx)
}

/// Removes a released UDP socket's translation entries.
#[cgroup_sock(sock_release)]
pub fn weft_sock_release(ctx: SockContext) -> i32 {
    service::release(&ctx)
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
