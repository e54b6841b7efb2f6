//! Socket storage (`SOCK_XLATE`, `SOCK_FLOWS`): state that belongs to one socket lives in the
//! socket, created by the programs and freed by the kernel with the socket. No socket's state
//! can push out another's, as entries of a shared LRU map can.
use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_fullsock, bpf_sk_storage_get},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
};
use core::ptr::read_volatile;

use weft_abi::{
    stats::Counter,
    svc::{SockCounts, SockOwner},
};

use crate::{
    maps::{SOCK_COUNTS, SOCK_STATES, SOCK_STATES_FLOOR, SOCK_STATES_PER_POD},
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
    let value = lookup(map, sk, create);
    if value.is_none() && create {
        stats::bump(Counter::SockStateFailed);
    }
    value
}

/// `bpf_sk_storage_get`, nothing counted.
#[inline(always)]
fn lookup<T>(map: &SkStorage<T>, sk: *mut bpf_sock, create: bool) -> Option<*mut T> {
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
    (!value.is_null()).then(|| value.cast())
}

/// A new zeroed value of `map` for `sk` counted as `kind` (`COUNT_*`) against `owner`'s budget
/// (see `SockOwner`): (value, whether it is counted for this call). When another CPU made the
/// socket's value meanwhile, that one, uncounted. None when the budget is spent or the kernel
/// has no memory (both counted). Two CPUs racing to create one socket's value may both count
/// it: the caller keeps one count (see `flows::store`).
#[inline(always)]
pub fn create<T>(
    map: &SkStorage<T>,
    sk: *mut bpf_sock,
    kind: usize,
    owner: u32,
) -> Option<(*mut T, bool)> {
    if !reserve(kind, owner) {
        return None;
    }
    if let Some(value) = lookup(map, sk, true) {
        return Some((value, true));
    }
    unreserve(kind, owner);
    // A create racing another for the same socket fails (EEXIST, EAGAIN): take theirs. Only
    // when there is none did the kernel lack memory.
    let theirs = lookup(map, sk, false);
    if theirs.is_none() {
        stats::bump(Counter::SockStateFailed);
    }
    theirs.map(|value| (value, false))
}

/// The counts of `key` in `SOCK_COUNTS`, made if missing.
#[inline(always)]
fn counts(key: &SockOwner) -> Option<*mut SockCounts> {
    if let Some(c) = SOCK_COUNTS.get_ptr_mut(key) {
        return Some(c);
    }
    // Another CPU may make it first: then this insert fails and the lookup finds theirs.
    let _ = SOCK_COUNTS.insert(
        key,
        SockCounts::default(),
        u64::from(aya_ebpf::bindings::BPF_NOEXIST),
    );
    SOCK_COUNTS.get_ptr_mut(key)
}

/// The count of `kind` in a `SOCK_COUNTS` value.
#[inline(always)]
fn held(counts: *mut SockCounts, kind: usize) -> *mut u64 {
    // SAFETY: `counts` is a live map value; `kind & 1` indexes its two counts.
    unsafe { (&raw mut (*counts).held).cast::<u64>().add(kind & 1) }
}

/// Counts one more value of `kind` for `owner` and the node, unless that passes the owner's
/// budget, or its floor while the node's is spent.
#[inline(always)]
fn reserve(kind: usize, owner: u32) -> bool {
    let pod = SockOwner {
        id: u64::from(owner),
    };
    let (Some(total), Some(mine)) = (counts(&SockOwner::TOTAL), counts(&pod)) else {
        stats::bump(Counter::SockStateFailed);
        return false;
    };
    let (total, mine) = (held(total, kind), held(mine, kind));
    stats::add(total, 1);
    stats::add(mine, 1);
    // SAFETY: live map values, 8-byte aligned; read after the atomic adds, so CPUs adding at
    // once may each see the others' adds (and refuse at the edge), never miss their own.
    let (n_total, n_mine) = unsafe { (read_volatile(total), read_volatile(mine)) };
    let over = n_mine > SOCK_STATES_PER_POD.load()
        || (n_mine > SOCK_STATES_FLOOR.load() && n_total > SOCK_STATES.load());
    if over {
        stats::add(total, u64::MAX);
        stats::add(mine, u64::MAX);
        stats::bump(Counter::SockStateOverBudget);
    }
    !over
}

/// Gives back one value of `kind` of `owner` (its socket closed, or it was never made). A
/// count never goes below zero; an owner back at zero is deleted (pods come and go).
#[inline(always)]
pub fn unreserve(kind: usize, owner: u32) {
    let pod = SockOwner {
        id: u64::from(owner),
    };
    if let Some(total) = SOCK_COUNTS.get_ptr_mut(SockOwner::TOTAL) {
        give_back(held(total, kind));
    }
    let Some(mine) = SOCK_COUNTS.get_ptr_mut(pod) else {
        return;
    };
    give_back(held(mine, kind));
    // SAFETY: a live map value, read whole.
    let rest = unsafe { read_volatile(&raw const (*mine).held) };
    if rest == [0, 0] {
        // A reserve racing this delete loses its count (one value more for the pod, once).
        let _ = SOCK_COUNTS.remove(pod);
    }
}

#[inline(always)]
fn give_back(count: *mut u64) {
    // SAFETY: a live map value's count, 8-byte aligned.
    if unsafe { read_volatile(count) } > 0 {
        stats::add(count, u64::MAX);
    }
}
