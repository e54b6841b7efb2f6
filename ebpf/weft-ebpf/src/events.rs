//! Connection and drop events for the agent, through the `CONN_EVENTS` ring buffer.
//!
//! Every writer goes through [`submit`]: the buffer being full is counted
//! (`Counter::ConnEventsLost`), never silent, and the reader is woken only once enough is
//! pending.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_sock},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, generated::bpf_tcp_sock},
    programs::SkBuffContext,
};
use weft_abi::{
    AF_INET, IPPROTO_TCP,
    conn::{
        ConnEvent, ConnEventKind, ConnState, DROP_EVENTS_PER_SECOND, DropReason, Side, flags,
        tcp_state,
    },
    net::{Direction, Family},
    stats::Counter,
    svc::{Endpoint, Xlate, normalize_v6},
};

use crate::{
    ctx::SocketCookie,
    maps::{
        CONN_EVENTS, CONN_EVENTS_ENABLED, CONN_EVENTS_WAKEUP_BYTES, CONN_STATE,
        CONN_UPDATE_INTERVAL_NS, DROP_BUDGET,
    },
    stats, xlate,
};

/// Whether the agent wants events at all (telemetry can be switched off).
#[inline(always)]
pub fn enabled() -> bool {
    CONN_EVENTS_ENABLED.load() != 0
}

/// Writes one event into the ring buffer, or counts it lost.
#[inline(always)]
pub fn submit(event: &ConnEvent) {
    let Some(mut entry) = CONN_EVENTS.reserve::<ConnEvent>(0) else {
        stats::bump(Counter::ConnEventsLost);
        return;
    };
    entry.write(*event);
    // Wake the reader only once enough is pending: one wakeup per event costs the agent more
    // than the event itself under connection churn. The agent also drains on a timer.
    let pending = CONN_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let wakeup = if pending >= CONN_EVENTS_WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(wakeup));
}

/// Health checking ejected `t.backend` from `t.frontend` for `ejected_ns`, its `times`-th
/// ejection (`ConnEventKind::Ejection`). Not inlined: the event is built in its own frame.
#[inline(never)]
pub fn ejection(t: &Xlate, ejected_ns: u64, times: u32) {
    if !enabled() {
        return;
    }
    let b = &t.backend;
    let ev = ConnEvent {
        kind: ConnEventKind::Ejection as u32,
        family: Family::of(b.family).af(),
        timestamp_ns: now(),
        duration_ns: ejected_ns,
        remote_addr: b.addr,
        remote_port: u32::from(u16::from_be(b.port)),
        side: Side::Active as u32,
        flags: flags::VIA_SERVICE,
        service_addr: t.frontend.addr,
        service_port: u32::from(u16::from_be(t.frontend.port)),
        protocol: u32::from(IPPROTO_TCP),
        reason: times,
        ..ConnEvent::default()
    };
    submit(&ev);
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no arguments; always safe to call.
    unsafe { bpf_ktime_get_ns() }
}

/// Fills `ev.service_*` when the socket reaches its peer (`ev.remote_addr`, `port_be` in
/// network order) through a ClusterIP.
#[inline(always)]
pub fn add_service(ev: &mut ConnEvent, sk: *mut bpf_sock, family: u8, port_be: u16) {
    let backend = Endpoint {
        addr: ev.remote_addr,
        port: port_be,
        family,
        _pad: 0,
    };
    if let Some(frontend) = xlate::frontend_of(sk, &backend) {
        ev.service_addr = frontend.addr;
        ev.service_port = u32::from(u16::from_be(frontend.port));
        ev.flags |= flags::VIA_SERVICE;
    }
}

/// Addresses of a kernel socket as event words: (family, normalized address words).
#[inline(always)]
pub fn family_words(af: u32, v4: u32, v6: [u32; 4]) -> (u8, [u32; 4]) {
    if af == AF_INET {
        (Family::V4 as u8, [v4, 0, 0, 0])
    } else {
        normalize_v6(v6)
    }
}

/// cgroup_skb egress of an established TCP socket: at most once per interval per connection,
/// reports its counters so far (long-lived connections' metrics move while they are open).
/// One hash lookup per packet when due-ness must be checked; nothing else.
#[inline(always)]
pub fn maybe_update(ctx: &SkBuffContext, sk: *mut bpf_sock) {
    let interval = CONN_UPDATE_INTERVAL_NS.load();
    if interval == 0 || !enabled() {
        return;
    }
    // Only in ESTABLISHED are the socket's counters payload only: once a FIN is sent or
    // received it is counted too, and only the close event knows whether to subtract it.
    // SAFETY: a full socket's `state` is readable.
    if unsafe { core::ptr::read_volatile(&raw const (*sk).state) } != tcp_state::ESTABLISHED {
        return;
    }
    let cookie = ctx.cookie();
    let Some(state) = CONN_STATE.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `state` is a live map value; the fields are read and written whole.
    let s = unsafe { &mut *state };
    let since = if s.last_update_ns == 0 {
        s.start_ns
    } else {
        s.last_update_ns
    };
    if now.saturating_sub(since) < interval || s.states_seen & (1 << tcp_state::ESTABLISHED) == 0 {
        return;
    }
    s.last_update_ns = now;
    // SAFETY: `sk` is a full socket (checked by the caller); the helper returns null for
    // anything but TCP.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return;
    }
    // SAFETY: `sk` is a full socket and `tp` its non-null bpf_tcp_sock.
    let (mut ev, family, remote_port_be) = unsafe { update_event(sk, tp, s, cookie, now) };
    add_service(&mut ev, sk, family, remote_port_be);
    submit(&ev);
}

/// The local and remote addresses of a full socket: (family, local words, remote words).
///
/// # Safety
/// `sk` must be a full socket (its address fields are then readable one by one).
#[inline(always)]
unsafe fn sock_ends(sk: *mut bpf_sock) -> (u8, [u32; 4], [u32; 4]) {
    // SAFETY: the caller's promise; each field is read once.
    unsafe {
        let af = core::ptr::read_volatile(&raw const (*sk).family);
        let (family, local) = family_words(
            af,
            core::ptr::read_volatile(&raw const (*sk).src_ip4),
            [
                core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        );
        let (_, remote) = family_words(
            af,
            core::ptr::read_volatile(&raw const (*sk).dst_ip4),
            [
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ],
        );
        (family, local, remote)
    }
}

/// An `Update` event of an established connection: its counters so far, from the socket;
/// with the socket's family and remote port (network order) for its translation.
///
/// # Safety
/// `sk` must be a full TCP socket and `tp` its non-null `bpf_tcp_sock`.
#[inline(always)]
unsafe fn update_event(
    sk: *mut bpf_sock,
    tp: *mut aya_ebpf::bindings::bpf_tcp_sock,
    s: &ConnState,
    cookie: u64,
    now: u64,
) -> (ConnEvent, u8, u16) {
    // SAFETY: the caller's promise: both are readable field by field.
    unsafe {
        let (family, local, remote) = sock_ends(sk);
        let remote_port_be = core::ptr::read_volatile(&raw const (*sk).dst_port);
        let ev = ConnEvent {
            kind: ConnEventKind::Update as u32,
            family: Family::of(family).af(),
            cookie,
            timestamp_ns: now,
            duration_ns: now.saturating_sub(s.start_ns),
            local_addr: local,
            remote_addr: remote,
            local_port: core::ptr::read_volatile(&raw const (*sk).src_port),
            remote_port: u32::from(u16::from_be(remote_port_be)),
            side: s.side,
            last_state: tcp_state::ESTABLISHED,
            bytes_sent: core::ptr::read_volatile(&raw const (*tp).bytes_acked)
                .saturating_sub(s.bytes_acked_base),
            bytes_received: core::ptr::read_volatile(&raw const (*tp).bytes_received)
                .saturating_sub(s.bytes_received_base),
            srtt_us: core::ptr::read_volatile(&raw const (*tp).srtt_us) >> 3,
            rtt_min_us: core::ptr::read_volatile(&raw const (*tp).rtt_min),
            total_retrans: core::ptr::read_volatile(&raw const (*tp).total_retrans),
            segs_in: core::ptr::read_volatile(&raw const (*tp).segs_in),
            segs_out: core::ptr::read_volatile(&raw const (*tp).segs_out),
            // Telemetry labels a connection from the first event it sees of it.
            flags: s.flags & flags::DELIVERED,
            protocol: u32::from(IPPROTO_TCP),
            ..ConnEvent::default()
        };
        (ev, family, remote_port_be)
    }
}

/// Whether this CPU may write another drop event this second.
#[inline(always)]
fn drop_budget() -> bool {
    let Some(b) = DROP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: `b` is this CPU's slot, valid while the program runs.
    let b = unsafe { &mut *b };
    if now.saturating_sub(b.window_start_ns) >= 1_000_000_000 {
        b.window_start_ns = now;
        b.sent = 0;
    }
    if b.sent >= DROP_EVENTS_PER_SECOND {
        stats::bump(Counter::DropEventsSuppressed);
        return false;
    }
    b.sent += 1;
    true
}

/// A dropped connection or packet, seen from the pod: `local` is the pod's side, `remote`
/// the peer. Ports in network byte order.
#[derive(Clone, Copy)]
pub struct DropEvent {
    pub cookie: u64,
    /// A map's `family` (4 or 6).
    pub family: u8,
    pub local: [u32; 4],
    pub local_port: u16,
    pub remote: [u32; 4],
    pub remote_port: u16,
    pub protocol: u8,
    pub reason: DropReason,
    pub direction: Direction,
}

impl DropEvent {
    /// A drop of something whose addresses are unknown (a packet that could not be parsed).
    #[inline(always)]
    pub fn unaddressed(cookie: u64, reason: DropReason, direction: Direction) -> Self {
        Self {
            cookie,
            family: Family::V4 as u8,
            local: [0; 4],
            local_port: 0,
            remote: [0; 4],
            remote_port: 0,
            protocol: 0,
            reason,
            direction,
        }
    }

    /// Writes it for the agent, within this CPU's budget of drop events.
    #[inline(always)]
    pub fn report(&self) {
        if !enabled() || !drop_budget() {
            return;
        }
        let ev = ConnEvent {
            kind: ConnEventKind::Drop as u32,
            family: Family::of(self.family).af(),
            cookie: self.cookie,
            timestamp_ns: now(),
            local_addr: self.local,
            remote_addr: self.remote,
            local_port: u32::from(u16::from_be(self.local_port)),
            remote_port: u32::from(u16::from_be(self.remote_port)),
            protocol: u32::from(self.protocol),
            reason: self.reason as u32,
            direction: self.direction as u32,
            ..ConnEvent::default()
        };
        submit(&ev);
    }
}
