//! Health counters: the only way the datapath reports a failure it cannot act on.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use weft_abi::stats::Counter;

use crate::maps::STATS;

/// Adds `n` to a u64 that other programs may update concurrently. Per-CPU slots are not
/// enough on their own: a softirq program (ingress) can interrupt a process-context one
/// (egress, sock_ops) on the same CPU, so the add must be atomic. The BPF target has atomic
/// add but no compare-and-swap, so `AtomicU64::fetch_add` is not offered: the intrinsic is
/// (its result unused, LLVM emits a plain BPF atomic add).
#[inline(always)]
pub fn add(slot: *mut u64, n: u64) {
    // SAFETY: `slot` points into a map value, valid and 8-byte aligned while the program runs;
    // every writer goes through this atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n) };
}

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        add(slot, 1);
    }
}
