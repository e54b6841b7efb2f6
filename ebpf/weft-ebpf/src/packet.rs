//! The only two ways programs read packet bytes.
//!
//! - [`load`] for skbs: `bpf_skb_load_bytes` checks bounds in the kernel and also reads
//!   non-linear data. cgroup_skb programs use it.
//! - [`read`] for direct packet pointers where no load helper exists (the TCP header that
//!   sock_ops exposes as `skb_data..skb_data_end`).
use aya_ebpf::programs::SkBuffContext;

/// Reads a `T` at `offset` bytes from the start of the skb's data (the network header in
/// cgroup_skb programs).
#[inline(always)]
pub fn load<T>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    ctx.load::<T>(offset).ok()
}

/// Reads a `T` at `offset` bytes after `start`, if `start + offset + size_of::<T>() <= end`.
///
/// The verifier only learns a packet range from a comparison of `pkt + n` (n > 0) with the
/// end pointer, and LLVM folds a `+ 1` away at offset 0: call this with offsets of at least 1
/// (the verifier rejects the program otherwise, it never reads out of bounds).
#[inline(always)]
pub fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    // Plain arithmetic on purpose: the verifier follows `ptr + const > end` comparisons but not
    // the overflow checks of checked_add. Offsets are small constants.
    let at = start + offset;
    if at + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: [at, at + size_of::<T>()) lies inside [start, end), the packet's linear data;
    // the read is unaligned because headers are not aligned for T.
    Some(unsafe { core::ptr::read_unaligned(at as *const T) })
}
