//! Allowed exchanges of sockets without connection state (UDP, SCTP, ICMP echo with its
//! identifier as the port), so their packets pass both ways without being judged again. They
//! live in the socket's own `SOCK_FLOWS` storage; a socket with more live peers than a run of
//! its slots holds (a server answering many clients) puts the rest in the node-wide
//! `POLICY_FLOWS` LRU. The slots are read and written from several CPUs at once (both
//! directions), always under the value's spin lock: a half-written slot is never seen. Nothing
//! but plain loads and stores happens under the lock (the verifier allows no calls there).
use aya_ebpf::helpers::generated::{bpf_ktime_get_ns, bpf_spin_lock, bpf_spin_unlock};
use weft_abi::{
    policy::{
        FLOW_IDLE_NS, FLOW_REFRESH_NS, FLOW_SLOTS, FLOW_WAYS, FLOWS_COUNTED, FLOWS_OVERFLOWED,
        FlowPeer, FlowSlot, PolicyFlowKey, SockFlows,
    },
    stats::Counter,
    svc::COUNT_FLOWS,
};

use crate::{
    ctx::SocketCookie,
    maps::{POLICY_FLOWS, SOCK_FLOWS},
    stats,
    storage::{self, Socket},
};

pub fn peer(family: u8, peer: &[u32; 4], port: u16, protocol: u8) -> FlowPeer {
    FlowPeer {
        peer: *peer,
        peer_port: port,
        protocol,
        family,
    }
}

/// Holds the value's spin lock while it lives.
struct Locked(*mut SockFlows);

impl Locked {
    #[inline(always)]
    fn new(flows: *mut SockFlows) -> Self {
        // SAFETY: `flows` is a live socket storage value whose type has the lock the
        // verifier found in its BTF; it is released in `drop`.
        unsafe { bpf_spin_lock((&raw mut (*flows).lock).cast()) };
        Self(flows)
    }
}

impl Drop for Locked {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: the lock `new` took.
        unsafe { bpf_spin_unlock((&raw mut (*self.0).lock).cast()) };
    }
}

/// The `way`-th slot a peer with hash `hash` may occupy.
#[inline(always)]
fn slot(flows: *mut SockFlows, hash: u32, way: u32) -> *mut FlowSlot {
    let index = (hash.wrapping_add(way) & (FLOW_SLOTS - 1)) as usize;
    // SAFETY: `flows` is a live socket storage value and `index` is below FLOW_SLOTS (masked).
    unsafe { (&raw mut (*flows).slots).cast::<FlowSlot>().add(index) }
}

/// Whether a slot holds `peer` (field by field: a struct compare may become a call).
///
/// # Safety
/// `s` must point at a slot of a live value whose lock is held.
#[inline(always)]
unsafe fn holds(s: *const FlowSlot, peer: &FlowPeer) -> bool {
    // SAFETY: the caller's promise.
    unsafe {
        (*s).seen_ns != 0
            && (*s).peer.peer[0] == peer.peer[0]
            && (*s).peer.peer[1] == peer.peer[1]
            && (*s).peer.peer[2] == peer.peer[2]
            && (*s).peer.peer[3] == peer.peer[3]
            && (*s).peer.peer_port == peer.peer_port
            && (*s).peer.protocol == peer.protocol
            && (*s).peer.family == peer.family
    }
}

/// Where the socket remembers `peer`: 1 = in its slots (refreshed), 2 = it has overflowed
/// (look in `POLICY_FLOWS`), 0 = nowhere.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// In the socket's slots (and refreshed).
    Here,
    /// Not in its slots, but the socket has overflowed: look in `POLICY_FLOWS`.
    Overflowed,
    Nowhere,
}

/// What an exchange last seen at `last` is at `now`: None when idle too long, else whether
/// its timestamp is due a rewrite (at most once per `FLOW_REFRESH_NS`, or every CPU would
/// fight over it).
#[inline(always)]
fn freshness(last: u64, now: u64) -> Option<bool> {
    let idle = now.saturating_sub(last);
    (idle <= FLOW_IDLE_NS).then_some(idle > FLOW_REFRESH_NS)
}

#[inline(always)]
fn look_up(flows: *mut SockFlows, peer: &FlowPeer, now: u64) -> Found {
    let hash = peer.hash();
    let guard = Locked::new(flows);
    let mut found = Found::Nowhere;
    for way in 0..FLOW_WAYS {
        let s = slot(flows, hash, way);
        // SAFETY: a slot of the value; the lock is held.
        if unsafe { holds(s, peer) } {
            // SAFETY: as above.
            if let Some(due) = freshness(unsafe { (*s).seen_ns }, now) {
                if due {
                    // SAFETY: as above.
                    unsafe { (*s).seen_ns = now };
                }
                found = Found::Here;
            }
            break;
        }
    }
    // SAFETY: the value's flags; the lock is held.
    if found == Found::Nowhere && unsafe { (*flows).flags } & FLOWS_OVERFLOWED != 0 {
        found = Found::Overflowed;
    }
    drop(guard);
    found
}

/// Whether the socket exchanged with this peer recently (then the packet is part of an
/// allowed flow, whichever side started it).
#[inline(always)]
pub fn known(ctx: &(impl Socket + SocketCookie), peer: &FlowPeer) -> bool {
    let Some(flows) = ctx
        .socket()
        .and_then(|sk| storage::get(&SOCK_FLOWS, sk, false))
    else {
        return false;
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match look_up(flows, peer, now) {
        Found::Here => true,
        Found::Overflowed => known_overflow(&overflow_key(ctx.cookie(), peer), now),
        Found::Nowhere => false,
    }
}

fn overflow_key(cookie: u64, peer: &FlowPeer) -> PolicyFlowKey {
    PolicyFlowKey {
        cookie,
        peer: *peer,
        _pad: 0,
    }
}

#[inline(always)]
fn known_overflow(key: &PolicyFlowKey, now: u64) -> bool {
    let Some(seen) = POLICY_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `seen` points at a live 8-byte aligned LRU value, read and written whole.
    let last = unsafe { core::ptr::read_volatile(seen) };
    let Some(due) = freshness(last, now) else {
        return false;
    };
    if due {
        // SAFETY: as above; a racing writer stores a timestamp just as good.
        unsafe { core::ptr::write_volatile(seen, now) };
    }
    true
}

/// Writes `peer` into a slot: its own, else a free or idle one of its run. False when the run
/// holds other live peers only. Also settles who counts a value this call made (`counted`:
/// the owner it was counted for, see `storage::create`): true in `.1` when this call's count
/// is one too many (another CPU counted the value first).
#[inline(always)]
fn store(flows: *mut SockFlows, peer: &FlowPeer, now: u64, counted: Option<u32>) -> (bool, bool) {
    let hash = peer.hash();
    let guard = Locked::new(flows);
    let mut extra = false;
    if let Some(owner) = counted {
        // SAFETY: the value's header; the lock is held.
        unsafe {
            if (*flows).flags & FLOWS_COUNTED == 0 {
                (*flows).flags |= FLOWS_COUNTED;
                (*flows).owner = owner;
            } else {
                extra = true;
            }
        }
    }
    let mut target = None;
    for way in 0..FLOW_WAYS {
        let s = slot(flows, hash, way);
        // SAFETY: a slot of the value; the lock is held.
        let (mine, seen) = unsafe { (holds(s, peer), (*s).seen_ns) };
        if mine {
            target = Some(s);
            break;
        }
        let free = seen == 0 || freshness(seen, now).is_none();
        if free && target.is_none() {
            target = Some(s);
        }
    }
    let stored = match target {
        Some(s) => {
            // SAFETY: as above; scalar stores only.
            unsafe {
                (*s).peer.peer[0] = peer.peer[0];
                (*s).peer.peer[1] = peer.peer[1];
                (*s).peer.peer[2] = peer.peer[2];
                (*s).peer.peer[3] = peer.peer[3];
                (*s).peer.peer_port = peer.peer_port;
                (*s).peer.protocol = peer.protocol;
                (*s).peer.family = peer.family;
                (*s).seen_ns = now;
            }
            true
        }
        None => {
            // SAFETY: the value's flags; the lock is held.
            unsafe { (*flows).flags |= FLOWS_OVERFLOWED };
            false
        }
    };
    drop(guard);
    (stored, extra)
}

/// Records an allowed exchange of the socket (of pod `owner`, whose budget a new value counts
/// against) with `peer`. A lost exchange only means its next packets are judged again.
#[inline(always)]
pub fn remember(ctx: &(impl Socket + SocketCookie), owner: u32, peer: &FlowPeer) {
    let Some(sk) = ctx.socket() else {
        return;
    };
    let (flows, counted) = match storage::get(&SOCK_FLOWS, sk, false) {
        Some(flows) => (flows, false),
        None => match storage::create(&SOCK_FLOWS, sk, COUNT_FLOWS, owner) {
            Some(made) => made,
            None => return,
        },
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let (stored, extra) = store(flows, peer, now, counted.then_some(owner));
    if extra {
        storage::unreserve(COUNT_FLOWS, owner);
    }
    if !stored {
        stats::bump(Counter::FlowOverflow);
        let _ = POLICY_FLOWS.insert(overflow_key(ctx.cookie(), peer), now, 0);
    }
}

/// sock_release: the socket's value leaves its pod's budget.
#[inline(always)]
pub fn release(ctx: &impl Socket) {
    let Some(flows) = ctx
        .socket()
        .and_then(|sk| storage::get(&SOCK_FLOWS, sk, false))
    else {
        return;
    };
    let guard = Locked::new(flows);
    // SAFETY: the value's header; the lock is held.
    let owner = unsafe {
        let counted = (*flows).flags & FLOWS_COUNTED != 0;
        (*flows).flags &= !FLOWS_COUNTED;
        counted.then_some((*flows).owner)
    };
    drop(guard);
    if let Some(owner) = owner {
        storage::unreserve(COUNT_FLOWS, owner);
    }
}
