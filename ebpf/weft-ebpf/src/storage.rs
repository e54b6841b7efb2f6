//! Socket storage (`SOCK_XLATE`, `SOCK_FLOWS`): state that belongs to one socket lives in the
//! socket, created by the programs and freed by the kernel with the socket. No socket's state
//! can push out another's, as entries of a shared LRU map can.
use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_fullsock, bpf_sk_storage_get},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use weft_abi::{stats::Counter, svc::SockOwner};

use crate::{
    maps::{SOCK_COUNTS, SOCK_STATES, SOCK_STATES_PER_POD},
    stats,
};

/// The full socket a program's context is about, if any.
pub trait Socket {
    fn socket(&self) -> Option<*mut bpf_sock>;
}

impl Socket for SockAddrContext {
    #[inline(always)]
    fn socket(&self) -> Option<*mut bpf_sock> {
        let sk = ctx_read!(self.sock_addr, __bindgen_anon_1.sk);
        (!sk.is_null()).then_some(sk)
    }
}

impl Socket for SockContext {
    /// The context is the socket (sock_release).
    #[inline(always)]
    fn socket(&self) -> Option<*mut bpf_sock> {
        Some(self.sock)
    }
}

impl Socket for SockOpsContext {
    #[inline(always)]
    fn socket(&self) -> Option<*mut bpf_sock> {
        let sk = ctx_read!(self.ops, __bindgen_anon_2.sk);
        (!sk.is_null()).then_some(sk)
    }
}

impl Socket for SkBuffContext {
    /// The packet's socket when it is a full one (not a request or time-wait socket).
    #[inline(always)]
    fn socket(&self) -> Option<*mut bpf_sock> {
        let sk = ctx_read!(self.skb.skb, __bindgen_anon_2.sk);
        if sk.is_null() {
            return None;
        }
        // SAFETY: the helper only checks whether `sk` is a full socket.
        let full = unsafe { bpf_sk_fullsock(sk) };
        (!full.is_null()).then_some(full)
    }
}

/// The value of `map` for socket `sk`: the existing one, or with `create` a zeroed new one
/// (None and counted when the kernel has no memory for it).
#[inline(always)]
pub fn get<T>(map: &SkStorage<T>, sk: *mut bpf_sock, create: bool) -> Option<*mut T> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `map` is a socket storage map of this object (its address is what the loader
    // relocates), `sk` a socket pointer the verifier typed from the context, and no initial
    // value is passed (a new value is zeroed).
    let value = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(map).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            flags,
        )
    };
    if value.is_null() {
        if create {
            stats::bump(Counter::SockStateFailed);
        }
        return None;
    }
    Some(value.cast())
}

/// An owner that is no pod's nor the node's: "counted for nobody".
pub const NOT_COUNTED: u32 = u32::MAX;

/// A new zeroed value of `map` for `sk` (or the one another CPU made meanwhile), counted
/// against `owner`'s budget (see `SockOwner`). None when the budget is spent or the kernel has
/// no memory (both counted). Two CPUs racing to create one socket's value both count it: the
/// caller keeps one count (see `flows::store`).
#[inline(always)]
pub fn create<T>(map: &SkStorage<T>, sk: *mut bpf_sock, owner: u32) -> Option<*mut T> {
    if !reserve(owner) {
        return None;
    }
    let value = get(map, sk, true);
    if value.is_none() {
        unreserve(owner);
    }
    value
}

/// The counter of `key` in `SOCK_COUNTS`, made if missing.
#[inline(always)]
fn counter(key: &SockOwner) -> Option<*mut u64> {
    if let Some(c) = SOCK_COUNTS.get_ptr_mut(key) {
        return Some(c);
    }
    // Another CPU may make it first: then this insert fails and the lookup finds theirs.
    let _ = SOCK_COUNTS.insert(key, 0, u64::from(aya_ebpf::bindings::BPF_NOEXIST));
    SOCK_COUNTS.get_ptr_mut(key)
}

/// Counts one more value for `owner` and the node, unless that passes either budget.
#[inline(always)]
fn reserve(owner: u32) -> bool {
    let pod = SockOwner {
        id: u64::from(owner),
    };
    let (Some(total), Some(mine)) = (counter(&SockOwner::TOTAL), counter(&pod)) else {
        stats::bump(Counter::SockStateFailed);
        return false;
    };
    stats::add(total, 1);
    stats::add(mine, 1);
    // SAFETY: live LRU values, 8-byte aligned; read after the atomic adds (racing adds may
    // push a value over by the number of CPUs, no more).
    let (n_total, n_mine) = unsafe {
        (
            core::ptr::read_volatile(total),
            core::ptr::read_volatile(mine),
        )
    };
    let over = n_total > SOCK_STATES.load()
        || (owner != SockOwner::NODE && n_mine > SOCK_STATES_PER_POD.load());
    if over {
        stats::add(total, u64::MAX);
        stats::add(mine, u64::MAX);
        stats::bump(Counter::SockStateOverBudget);
    }
    !over
}

/// Gives back one value of `owner` (its socket closed, or it was never made).
#[inline(always)]
pub fn unreserve(owner: u32) {
    let pod = SockOwner {
        id: u64::from(owner),
    };
    // Absent counters (evicted, which takes more live pods than the map holds) stay absent.
    if let Some(total) = SOCK_COUNTS.get_ptr_mut(SockOwner::TOTAL) {
        stats::add(total, u64::MAX);
    }
    if let Some(mine) = SOCK_COUNTS.get_ptr_mut(pod) {
        stats::add(mine, u64::MAX);
    }
}
