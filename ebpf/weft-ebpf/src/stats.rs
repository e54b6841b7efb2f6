//! Health counters: the only way the datapath reports a failure it cannot act on.
use weft_abi::stats::Counter;

use crate::maps::STATS;

#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
