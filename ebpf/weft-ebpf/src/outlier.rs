//! Passive health checking (`weft_abi::svc::Outlier`), all in the kernel: sock_ops counts
//! the outcome of each connection a frontend with health checking translated, per
//! (frontend, backend) in `HEALTH`, and ejects the backend at its N-th failure in a row;
//! connect then skips it until its ejection ends. No agent pass is waited for.
//!
//! A failure is a connect that was refused or timed out, or a connection that ended by reset
//! or timeout before the backend sent a byte or a FIN. A success (data or a FIN from the
//! backend) resets the count; a connection the client closed first without an answer counts
//! neither way.
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop},
    programs::SockOpsContext,
};
use weft_abi::{
    conn::{ConnState, flags, tcp_state},
    stats::Counter,
    svc::{
        BackendHealth, Endpoint, MemberKey, Outlier, ServiceValue, SlotKey, WalkCounts,
        XLATE_CAPTURED, XLATE_DIRECT, Xlate,
    },
};

use crate::{
    events,
    maps::{BACKEND_SLOTS, HEALTH, OUTLIER, WALK_COUNTS},
    service, stats,
    storage::Socket as _,
    xlate,
};

/// Backends looked at when counting a frontend's ejected ones: a larger set is judged by its
/// first ones (a bound on the time a connect or a close spends here).
const SCAN: u32 = 1024;

fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

fn member(svc: &ServiceValue, backend: &Endpoint) -> MemberKey {
    MemberKey {
        service_id: svc.service_id,
        backend: *backend,
    }
}

/// Whether `backend` of service `service_id` gets no new connection at `now`.
fn ejected(service_id: u32, backend: &Endpoint, now: u64) -> bool {
    let key = MemberKey {
        service_id,
        backend: *backend,
    };
    // SAFETY: a copy of the value is read; a concurrent writer can only make it stale.
    unsafe { HEALTH.get(key) }.is_some_and(|h| h.ejected_until_ns > now)
}

/// A walk over a frontend's backends: `bpf_loop`'s context, on the stack, read only (the
/// verifier then checks the step once); the counts are this CPU's `WALK_COUNTS`.
#[repr(C)]
struct Walk {
    service_id: u32,
    revision: u32,
    now: u64,
    /// Which walk the counts belong to.
    tag: u64,
    /// Non-zero: stop at the backend not ejected after `WalkCounts::skip` others.
    pick: u32,
    _pad: u32,
}

/// Walks `svc`'s backends; with `pick`, stops at the one not ejected after `skip` others.
/// Writes what it found, (backends not ejected, the index picked), to `found`; false when
/// a program that interrupted it took the counts over. Not inlined: connect's stack is deep
/// already, and two walks' contexts would add up in their caller's. Five arguments at most,
/// none an aggregate by value, as a BPF call passes.
#[inline(never)]
fn walk(svc: &ServiceValue, now: u64, pick: u32, skip: u32, found: &mut (u32, u32)) -> bool {
    let Some(counts) = WALK_COUNTS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no arguments.
    let tag = now ^ u64::from(unsafe { bpf_get_prandom_u32() }) << 32;
    // SAFETY: this CPU's entry; a program interrupting this one rewrites it whole, and its
    // tag then tells this walk.
    unsafe {
        *counts = WalkCounts {
            tag,
            healthy: 0,
            skip,
            found: u32::MAX,
            _pad: 0,
        };
    }
    let mut w = Walk {
        service_id: svc.service_id,
        revision: svc.revision,
        now,
        tag,
        pick,
        _pad: 0,
    };
    // SAFETY: `step` has bpf_loop's callback signature and reads its context as the `Walk`
    // passed, which outlives the call.
    unsafe {
        bpf_loop(
            svc.count.min(SCAN),
            step as *mut c_void,
            core::ptr::from_mut(&mut w).cast::<c_void>(),
            0,
        )
    };
    // SAFETY: as above.
    let c = unsafe { core::ptr::read_volatile(counts) };
    *found = (c.healthy, c.found);
    c.tag == tag
}

/// One backend of a [`Walk`]: 0 goes on, 1 stops.
unsafe extern "C" fn step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` on the stack of `walk`, which bpf_loop passes.
    let w = unsafe { &*ctx.cast::<Walk>() };
    let Some(c) = WALK_COUNTS.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's entry (see `walk`).
    let c = unsafe { &mut *c };
    if c.tag != w.tag {
        return 1;
    }
    let slot = SlotKey {
        revision: w.revision,
        index: index as u32,
    };
    // SAFETY: slots of a revision are never updated in place (see `service::slot`).
    let usable =
        (unsafe { BACKEND_SLOTS.get(slot) }).is_some_and(|b| !ejected(w.service_id, b, w.now));
    if !usable {
        return 0;
    }
    if w.pick != 0 {
        if c.skip == 0 {
            c.found = index as u32;
            return 1;
        }
        c.skip -= 1;
    }
    c.healthy += 1;
    0
}

/// connect's choice: `picked`, unless it is ejected; then a random backend that is not,
/// or `picked` when too few are left (fewer than `min_health_percent`, or none: panic, as
/// Envoy's load balancer then ignores health).
/// A frontend without health checking has no `HEALTH` entries: one lookup finds its pick
/// is not ejected.
#[inline(always)]
pub fn choose(svc: &ServiceValue, picked: Endpoint) -> Endpoint {
    let now = now();
    if !ejected(svc.service_id, &picked, now) {
        return picked;
    }
    let mut out = picked;
    if let Some(o) = config(svc.service_id) {
        other(svc, &o, now, &mut out);
    }
    out
}

/// The health checking of frontend `service_id` (None: no ejection, or torn past retrying:
/// the pick stands, nothing is counted).
fn config(service_id: u32) -> Option<Outlier> {
    settings(service_id).filter(|o| o.consecutive != 0)
}

/// Frontend `service_id`'s `OUTLIER` entry (None: none, or torn past retrying).
fn settings(service_id: u32) -> Option<Outlier> {
    for _ in 0..service::SEAL_TRIES {
        let ptr = OUTLIER.get_ptr(service_id)?;
        // SAFETY: a map value pointer stays valid memory for this program's run, though its
        // element may be reused: one volatile copy, then the seal says whether it is whole.
        let o = unsafe { core::ptr::read_volatile(ptr) };
        if o.is_sealed_for(service_id) {
            return Some(o);
        }
        stats::bump(Counter::TornRead);
    }
    None
}

/// The connect timeout (ms) of the frontend the socket's connect chose a backend for; 0:
/// none. Captured connections are the mesh proxy's to connect.
#[inline(never)]
pub fn connect_timeout(ctx: &SockOpsContext) -> u32 {
    let Some(t) = ctx.socket().and_then(xlate::connect_slot) else {
        return 0;
    };
    if t.flags & (XLATE_CAPTURED | XLATE_DIRECT) != 0 {
        return 0;
    }
    let Ok(Some(svc)) = service::service(&t.frontend) else {
        return 0;
    };
    settings(svc.service_id).map_or(0, |o| o.connect_timeout_ms)
}

/// Replaces `out` (ejected) with a random backend that is not, if enough are left. Not
/// inlined; by reference, as a BPF call passes no aggregate by value.
#[inline(never)]
fn other(svc: &ServiceValue, o: &Outlier, now: u64, out: &mut Endpoint) {
    let n = svc.count.min(SCAN);
    let mut found = (0, 0);
    if !walk(svc, now, 0, 0, &mut found) {
        return;
    }
    let left = found.0;
    if left == 0 || left * 100 < u32::from(o.min_health_percent) * n {
        return;
    }
    // SAFETY: no arguments.
    let skip = unsafe { bpf_get_prandom_u32() } % left;
    // Checked again: on a preemptible kernel another task's walk may have mixed its counts
    // in (the pick is a member either way).
    if walk(svc, now, 1, skip, &mut found)
        && let Some(b) = service::slot(svc, found.1)
        && !ejected(svc.service_id, &b, now)
    {
        *out = b;
    }
}

/// What a closed connection says about its backend.
#[derive(PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Neither,
}

fn outcome(ctx: &SockOpsContext, state: &ConnState) -> Outcome {
    if state.states_seen & (1 << tcp_state::ESTABLISHED) == 0 {
        return Outcome::Failure;
    }
    let received = ctx_read!(ctx.ops, bytes_received).saturating_sub(state.bytes_received_base);
    // A paired socket's bytes go socket to socket (`--sockmap`), past `bytes_received`: it
    // was established with a pod of the node, which is all this can tell.
    let answered = received > 0
        || state.flags & (flags::FIN_RECEIVED | flags::PEER_FIN_SEEN | flags::PAIRED) != 0;
    if answered {
        Outcome::Success
    } else if state.flags & flags::FIN_SENT != 0 {
        Outcome::Neither
    } else {
        Outcome::Failure
    }
}

/// sock_ops, at CLOSE of a socket that called connect(): counts the outcome for the backend
/// its connect chose, when its frontend checks health. Captured connections are the mesh
/// proxy's to judge: the socket only reached the node's listener.
#[inline(never)]
pub fn observe(ctx: &SockOpsContext, state: &ConnState) {
    let Some(t) = ctx.socket().and_then(xlate::connect_slot) else {
        return;
    };
    if t.flags & (XLATE_CAPTURED | XLATE_DIRECT) != 0 {
        return;
    }
    let Ok(Some(svc)) = service::service(&t.frontend) else {
        return;
    };
    let Some(o) = config(svc.service_id) else {
        return;
    };
    match outcome(ctx, state) {
        Outcome::Success => succeeded(&svc, &t.backend),
        Outcome::Failure => failed(&svc, &o, &t),
        Outcome::Neither => {}
    }
}

fn succeeded(svc: &ServiceValue, backend: &Endpoint) {
    if let Some(h) = HEALTH.get_ptr_mut(member(svc, backend)) {
        // SAFETY: a map value, valid for this program's run; a racing failure's count may
        // be lost, which only delays an ejection by one failure.
        unsafe {
            if (*h).failures != 0 {
                (*h).failures = 0;
            }
        }
    }
}

/// A failure of `t.backend`, reached through `t.frontend`.
fn failed(svc: &ServiceValue, o: &Outlier, t: &Xlate) {
    let key = member(svc, &t.backend);
    let h = match HEALTH.get_ptr_mut(key) {
        Some(h) => h,
        None => {
            // A racing first failure's entry is kept (this one then is lost).
            let _ = HEALTH.insert(key, BackendHealth::default(), u64::from(BPF_NOEXIST));
            let Some(h) = HEALTH.get_ptr_mut(key) else {
                return;
            };
            h
        }
    };
    // SAFETY: a map value, valid for this program's run; failures are added atomically, as
    // connections of other CPUs close at the same time.
    let failures = unsafe {
        atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(&raw mut (*h).failures, 1);
        core::ptr::read_volatile(&raw const (*h).failures)
    };
    let now = now();
    // SAFETY: as above.
    let until = unsafe { (*h).ejected_until_ns };
    if failures < o.consecutive || until > now {
        return;
    }
    let ms = eject(svc, o, h, now);
    if ms != 0 {
        // SAFETY: as above.
        let times = unsafe { (*h).ejections };
        events::ejection(t, ms * 1_000_000, times);
    }
}

/// Ejects the backend whose record is `h`, unless that would eject more than
/// `max_ejection_percent` of the frontend's backends; either way its count starts again,
/// as Envoy's does, unless the walk's counts could not be trusted (the next failure tries
/// again). Returns how long it is ejected, in ms (0: it is not).
#[inline(never)]
fn eject(svc: &ServiceValue, o: &Outlier, h: *mut BackendHealth, now: u64) -> u64 {
    let n = svc.count.min(SCAN);
    let mut found = (0, 0);
    if !walk(svc, now, 0, 0, &mut found) {
        return 0;
    }
    // SAFETY: a map value, valid for this program's run.
    let h = unsafe { &mut *h };
    h.failures = 0;
    let ejected = n.saturating_sub(found.0);
    // Another CPU's failure may have ejected it meanwhile: once is enough.
    if (ejected + 1) * 100 > u32::from(o.max_ejection_percent) * n || h.ejected_until_ns > now {
        return 0;
    }
    // The count of ejections falls by one per interval since the last one ended.
    let interval_ns = u64::from(o.interval_ms).max(1) * 1_000_000;
    let decay = now.saturating_sub(h.ejected_until_ns) / interval_ns;
    let times = h
        .ejections
        .saturating_sub(u32::try_from(decay).unwrap_or(u32::MAX))
        .saturating_add(1);
    let ms = (u64::from(o.base_ejection_ms) * u64::from(times)).min(u64::from(o.max_ejection_ms));
    h.ejections = times;
    h.ejected_until_ns = now + ms * 1_000_000;
    ms.max(1)
}
