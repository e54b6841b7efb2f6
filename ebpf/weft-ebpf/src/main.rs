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

mod maps;
mod packet;
mod sockops;
mod stats;
mod traffic;

use aya_ebpf::{
    macros::{cgroup_skb, sock_ops},
    programs::{SkBuffContext, SockOpsContext},
};
use weft_abi::traffic::Direction;

/// TCP connection lifecycle of every socket under the attached cgroup.
#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    // The return value of sock_ops is not a verdict for the callbacks we use; 1 is "ok".
    match sockops::try_sockops(&ctx) {
        Ok(()) | Err(_) => 1,
    }
}

/// Accounts packets delivered to sockets under the attached cgroup. Never drops.
#[cgroup_skb(ingress)]
pub fn weft_skb_ingress(ctx: SkBuffContext) -> i32 {
    traffic::account(&ctx, Direction::Ingress);
    1
}

/// Accounts packets sent by sockets under the attached cgroup. Never drops.
#[cgroup_skb(egress)]
pub fn weft_skb_egress(ctx: SkBuffContext) -> i32 {
    traffic::account(&ctx, Direction::Egress);
    1
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
