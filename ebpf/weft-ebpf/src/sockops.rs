//! TCP connection lifecycle from sock_ops callbacks.
//!
//! A connection is tracked from connect() (active) or establishment (passive) until its socket
//! reaches CLOSE. Byte counts are payload only: `bytes_acked` and `bytes_received` also count
//! the SYN and FIN sequence numbers, so the program takes a baseline at establishment (which
//! removes the SYN) and subtracts a FIN it knows was acknowledged or consumed.
//!
//! Knowing whether the peer's FIN was consumed needs care in one case: a socket that closed
//! first leaves FIN_WAIT2 for CLOSE both when the peer's FIN arrives and when the application
//! has closed it (it becomes a timewait socket that sock_ops no longer sees). So while the
//! socket is closing, the program asks for every incoming header (PARSE_ALL_HDR_OPT), notes
//! the sequence number of a FIN, and at CLOSE checks that `rcv_nxt` moved past it.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TIMEOUT_INIT,
    },
    helpers::generated::{bpf_getsockopt, bpf_setsockopt},
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, warn};
use weft_abi::{
    IPPROTO_TCP,
    conn::{ConnEvent, ConnEventKind, ConnState, Side, flags, tcp_state},
    mesh::DELIVERY_MARK,
    net::Family,
    stats::Counter,
    svc::Endpoint,
};

use crate::{
    ctx::SocketCookie,
    events::{self, add_service, family_words, now},
    maps::{CONN_STATE, KERNEL_HZ},
    mesh, outlier, packet, redirect, stats,
    storage::Socket as _,
};

const TCP_FLAG_FIN: u32 = 0x01;
const SOL_TCP: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;

pub fn try_sockops(ctx: &SockOpsContext) -> Result<(), i64> {
    // Most callbacks (RWND_INIT, ...) are not ours: return before any helper call.
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TIMEOUT_INIT {
        on_timeout_init(ctx);
        return Ok(());
    }
    let handler = match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB
        | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        | BPF_SOCK_OPS_STATE_CB
        | BPF_SOCK_OPS_RTO_CB
        | BPF_SOCK_OPS_PARSE_HDR_OPT_CB => op,
        _ => return Ok(()),
    };
    let cookie = ctx.cookie();
    match handler {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx, cookie),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx, cookie, Side::Active),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx, cookie, Side::Passive),
        BPF_SOCK_OPS_STATE_CB => on_state(ctx, cookie, ctx.arg(1)),
        BPF_SOCK_OPS_RTO_CB => on_rto(ctx, cookie),
        _ => on_header(ctx, cookie),
    }
}

#[inline(always)]
fn add_cb_flags(ctx: &SockOpsContext, add: u32) -> Result<(), i64> {
    ctx.set_cb_flags((ctx.cb_flags() | add) as i32)
        .map_err(i64::from)
}

/// Not inlined: its state would add to the entry's stack, which close's calls are stacked on.
#[inline(never)]
fn on_connect(ctx: &SockOpsContext, cookie: u64) -> Result<(), i64> {
    let state = ConnState {
        start_ns: now(),
        states_seen: 1 << tcp_state::SYN_SENT,
        side: Side::Active as u32,
        ..ConnState::default()
    };
    track(ctx, cookie, &state)
}

/// A SYN is about to be sent (or a SYN-ACK, for a request socket; the retransmission timer
/// asks again): a connect through a Service port with a connect timeout gives up after it,
/// with ETIMEDOUT, as Envoy's `connect_timeout` does. The kernel's `TCP_USER_TIMEOUT`
/// bounds the SYN's retransmissions (checked at each retransmission timeout, each clamped
/// to what is left), and the first timeout is made half the connect timeout, so one SYN is
/// resent before giving up. The socket's own user timeout (kept when already as short)
/// comes back at establishment or close ([`end_connect_timeout`]).
#[inline(never)]
fn on_timeout_init(ctx: &SockOpsContext) {
    // Request sockets (a SYN-ACK's timeout) are not connects.
    if ctx_read!(ctx.ops, is_fullsock) == 0 {
        return;
    }
    // As the option holds it (an int), so a restore finds exactly what was set.
    let ms = outlier::connect_timeout(ctx).min(i32::MAX as u32);
    if ms == 0 {
        return;
    }
    // Without its state (CONN_STATE full) the socket's own timeout could not be given
    // back: it keeps the kernel's bound, counted.
    let Some(s) = CONN_STATE.get_ptr_mut(ctx.cookie()) else {
        stats::bump(Counter::ConnectTimeoutFailed);
        return;
    };
    // SAFETY: see on_established.
    let s = unsafe { &mut *s };
    let Some(own) = user_timeout(ctx) else {
        stats::bump(Counter::ConnectTimeoutFailed);
        return;
    };
    if s.flags & flags::CONNECT_TIMEOUT != 0 {
        // Asked again: the retransmission timer asks only while no user timeout is in
        // force, so the application cleared ours; its choice stands.
        return;
    }
    if own == 0 || own > ms {
        if !set_user_timeout(ctx, ms) {
            stats::bump(Counter::ConnectTimeoutFailed);
            return;
        }
        s.saved_user_timeout_ms = own;
        s.connect_timeout_ms = ms;
        s.flags |= flags::CONNECT_TIMEOUT;
    }
    // A bound is in force (this one, or the socket's own shorter one): the first timeout
    // may be shortened, never past the kernel's own (one second, `hz` jiffies).
    let hz = u64::from(KERNEL_HZ.load());
    let first = (u64::from(ms) * hz / 2000).max(1);
    if hz != 0 && first < hz {
        ctx.set_reply(first as u32);
    }
}

/// The socket's `TCP_USER_TIMEOUT` (None: it cannot be read).
#[inline(always)]
fn user_timeout(ctx: &SockOpsContext) -> Option<u32> {
    let mut v: i32 = 0;
    // SAFETY: a full socket, locked in connect, establishment and state changes (sock_ops
    // may read options there); `v` is 4 writable bytes.
    let read = unsafe {
        bpf_getsockopt(
            ctx.ops.cast(),
            SOL_TCP,
            TCP_USER_TIMEOUT,
            core::ptr::from_mut(&mut v).cast(),
            4,
        )
    };
    (read == 0).then_some(v.max(0) as u32)
}

/// Sets the socket's `TCP_USER_TIMEOUT`; whether the kernel took it.
#[inline(always)]
fn set_user_timeout(ctx: &SockOpsContext, ms: u32) -> bool {
    let mut v = ms.min(i32::MAX as u32) as i32;
    // SAFETY: as in user_timeout; `v` is 4 readable bytes.
    let set = unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_TCP,
            TCP_USER_TIMEOUT,
            core::ptr::from_mut(&mut v).cast(),
            4,
        )
    };
    set == 0
}

/// The socket's own `TCP_USER_TIMEOUT`, back after its Service's connect timeout (see
/// [`on_timeout_init`]): at establishment (either side: a simultaneous open ends passive),
/// or at close (a socket may connect again). Not if the application set another since.
#[inline(never)]
fn end_connect_timeout(ctx: &SockOpsContext, state: *mut ConnState, count_failure: bool) {
    // SAFETY: see on_established.
    let s = unsafe { &mut *state };
    if s.flags & flags::CONNECT_TIMEOUT == 0 {
        return;
    }
    s.flags &= !flags::CONNECT_TIMEOUT;
    match user_timeout(ctx) {
        // The application set another meanwhile: its choice stands.
        Some(now) if now != s.connect_timeout_ms => return,
        Some(_) => {}
        None => {
            if count_failure {
                stats::bump(Counter::ConnectTimeoutFailed);
            }
            return;
        }
    }
    if !set_user_timeout(ctx, s.saved_user_timeout_ms) && count_failure {
        stats::bump(Counter::ConnectTimeoutFailed);
    }
}

fn on_established(ctx: &SockOpsContext, cookie: u64, side: Side) -> Result<(), i64> {
    // First: a captured connection needs its origin even when it cannot be tracked.
    if side == Side::Active {
        mesh::established(ctx, ctx_read!(ctx.ops, local_port), &remote_endpoint(ctx));
    }
    let (acked, received) = (
        ctx_read!(ctx.ops, bytes_acked),
        ctx_read!(ctx.ops, bytes_received),
    );
    match CONN_STATE.get_ptr_mut(cookie) {
        Some(ptr) => {
            // SAFETY: the entry is this socket's and sock_ops callbacks of one socket run under
            // its lock, so nobody else writes it now.
            let s = unsafe { &mut *ptr };
            s.bytes_acked_base = acked;
            s.bytes_received_base = received;
            s.states_seen |= 1 << tcp_state::ESTABLISHED;
            end_connect_timeout(ctx, ptr, true);
        }
        // Passive sockets, and active ones whose connect() ran before we were attached.
        None => match start_tracking(ctx, cookie, side as u32) {
            0 => {}
            e => return Err(e),
        },
    }
    if redirect::enabled() {
        pair(ctx, cookie, side);
    }
    debug!(
        ctx,
        "tcp established cookie={} side={}", cookie, side as u32
    );
    // Read in place, not copied: emit's stack is stacked on this function's.
    if let Some(s) = CONN_STATE.get_ptr(cookie) {
        // SAFETY: see above; the entry stays until this socket's CLOSE callback.
        emit(ctx, cookie, unsafe { &*s }, None);
    }
    Ok(())
}

/// A connection tracked from its establishment (0, or the error of its tracking). Not
/// inlined: its state would add to on_established's stack; a plain return value, as a BPF
/// call passes no more than five arguments.
#[inline(never)]
fn start_tracking(ctx: &SockOpsContext, cookie: u64, side: u32) -> i64 {
    let s = ConnState {
        start_ns: now(),
        bytes_acked_base: ctx_read!(ctx.ops, bytes_acked),
        bytes_received_base: ctx_read!(ctx.ops, bytes_received),
        states_seen: 1 << tcp_state::ESTABLISHED,
        side,
        flags: delivered(ctx, side),
        ..ConnState::default()
    };
    match track(ctx, cookie, &s) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// [`flags::DELIVERED`] for a passive socket accepted from the mesh proxy's delivery socket:
/// `tcp_fwmark_accept` gave it the mark of the SYN.
#[inline(always)]
fn delivered(ctx: &SockOpsContext, side: u32) -> u32 {
    if side != Side::Passive as u32 {
        return 0;
    }
    match ctx.socket() {
        // SAFETY: `socket` returns the context's non-null `bpf_sock`, whose fields the
        // verifier lets a sock_ops program read.
        Some(sk) if unsafe { (*sk).mark } == DELIVERY_MARK => flags::DELIVERED,
        _ => 0,
    }
}

/// With `--sockmap`: the socket enters `SOCK_PAIRS`, marked so that its close takes its
/// redirected bytes. Not inlined: its key would add to on_established's stack, which emit's
/// is stacked on.
#[inline(never)]
fn pair(ctx: &SockOpsContext, cookie: u64, side: Side) {
    let (_, local, remote) = addresses(ctx);
    let key = redirect::sockops_key(ctx, local, remote);
    if !redirect::register(ctx, cookie, &key, side) {
        return;
    }
    if let Some(s) = CONN_STATE.get_ptr_mut(cookie) {
        // SAFETY: see on_established.
        unsafe { (*s).flags |= flags::PAIRED };
    }
}

fn track(ctx: &SockOpsContext, cookie: u64, state: &ConnState) -> Result<(), i64> {
    if let Err(e) = CONN_STATE.insert(cookie, state, 0) {
        stats::bump(Counter::ConnStateFull);
        warn!(
            ctx,
            "CONN_STATE full: connection cookie={} is not tracked", cookie
        );
        return Err(i64::from(e));
    }
    // RTO callbacks tell a timeout from a refusal or reset; they run only when a
    // retransmission timer fires.
    if let Err(e) = add_cb_flags(ctx, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG) {
        // Without state callbacks the entry would never be removed.
        let _ = CONN_STATE.remove(cookie);
        stats::bump(Counter::CallbackFlagsFailed);
        return Err(e);
    }
    Ok(())
}

fn on_state(ctx: &SockOpsContext, cookie: u64, new_state: u32) -> Result<(), i64> {
    if new_state == tcp_state::CLOSE {
        mesh::closed(ctx);
    }
    let Some(s) = CONN_STATE.get_ptr_mut(cookie) else {
        return Ok(());
    };
    // SAFETY: see on_established.
    let s = unsafe { &mut *s };
    if new_state < 32 {
        s.states_seen |= 1 << new_state;
    }
    match new_state {
        tcp_state::FIN_WAIT1 => {
            s.flags |= flags::FIN_SENT;
            // We closed first: watch incoming headers for the peer's FIN (see module doc).
            if add_cb_flags(ctx, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG).is_err() {
                stats::bump(Counter::CallbackFlagsFailed);
            }
        }
        tcp_state::LAST_ACK => s.flags |= flags::FIN_SENT,
        // Both are entered only when the peer's FIN is consumed.
        tcp_state::CLOSE_WAIT | tcp_state::CLOSING => s.flags |= flags::FIN_RECEIVED,
        // In place: a copy would add to the stack emit's is stacked on.
        tcp_state::CLOSE => {
            // Beside on_close, not in it: their stacks would add up.
            if s.side == Side::Active as u32 {
                end_connect_timeout(ctx, s, false);
                outlier::observe(ctx, s);
            }
            on_close(ctx, cookie, s);
        }
        _ => {}
    }
    Ok(())
}

/// The socket reached CLOSE: its final counters, and its entry goes.
#[inline(never)]
fn on_close(ctx: &SockOpsContext, cookie: u64, state: &ConnState) {
    let close = Closing {
        last_state: ctx.arg(0),
        redirected: if state.flags & flags::PAIRED != 0 {
            redirected(ctx, cookie)
        } else {
            (0, 0)
        },
    };
    emit(ctx, cookie, state, Some(&close));
    // Cannot fail: the entry was just found, and callbacks of one socket run under its lock.
    let _ = CONN_STATE.remove(cookie);
}

/// The bytes (sent, received) a paired socket's peer and it exchanged socket to socket.
#[inline(never)]
fn redirected(ctx: &SockOpsContext, cookie: u64) -> (u64, u64) {
    let (_, local, remote) = addresses(ctx);
    redirect::take(&redirect::sockops_key(ctx, local, remote), cookie)
}

/// A retransmission timer fired; `arg(2)` is non-zero when the kernel gives up on the
/// connection (it closes next, with ETIMEDOUT).
fn on_rto(ctx: &SockOpsContext, cookie: u64) -> Result<(), i64> {
    if ctx.arg(2) == 0 {
        return Ok(());
    }
    if let Some(s) = CONN_STATE.get_ptr_mut(cookie) {
        // SAFETY: see on_established.
        unsafe { (*s).flags |= flags::TIMED_OUT };
    }
    Ok(())
}

/// The socket's addresses: (family 4 or 6, local words, remote words).
#[inline(always)]
fn addresses(ctx: &SockOpsContext) -> (u8, [u32; 4], [u32; 4]) {
    let family = ctx_read!(ctx.ops, family);
    let (fam, local) = family_words(
        family,
        ctx_read!(ctx.ops, local_ip4),
        [
            ctx_read!(ctx.ops, local_ip6[0]),
            ctx_read!(ctx.ops, local_ip6[1]),
            ctx_read!(ctx.ops, local_ip6[2]),
            ctx_read!(ctx.ops, local_ip6[3]),
        ],
    );
    let (_, remote) = family_words(
        family,
        ctx_read!(ctx.ops, remote_ip4),
        [
            ctx_read!(ctx.ops, remote_ip6[0]),
            ctx_read!(ctx.ops, remote_ip6[1]),
            ctx_read!(ctx.ops, remote_ip6[2]),
            ctx_read!(ctx.ops, remote_ip6[3]),
        ],
    );
    (fam, local, remote)
}

/// The socket's remote end (family normalized, port in network byte order).
#[inline(always)]
pub fn remote_endpoint(ctx: &SockOpsContext) -> Endpoint {
    let (family, _, remote) = addresses(ctx);
    Endpoint {
        addr: remote,
        port: remote_port_be(ctx),
        family,
        _pad: 0,
    }
}

/// The remote port of the socket, in network byte order.
#[inline(always)]
fn remote_port_be(ctx: &SockOpsContext) -> u16 {
    // remote_port holds the port in network byte order in its upper 16 bits.
    (u32::from_be(ctx_read!(ctx.ops, remote_port)) as u16).to_be()
}

fn on_header(ctx: &SockOpsContext, cookie: u64) -> Result<(), i64> {
    let tcp_flags = ctx_read!(ctx.ops, skb_tcp_flags);
    let skb_len = ctx_read!(ctx.ops, skb_len);
    let data = ctx_read!(ctx.ops, __bindgen_anon_3.skb_data) as usize;
    let data_end = ctx_read!(ctx.ops, __bindgen_anon_4.skb_data_end) as usize;
    if tcp_flags & TCP_FLAG_FIN == 0 {
        return Ok(());
    }
    // skb_data is the TCP header; skb_len covers header and payload.
    let seq = u32::from_be(packet::read::<u32>(data, data_end, 4).ok_or(-1i64)?);
    let doff = u32::from(packet::read::<u8>(data, data_end, 12).ok_or(-1i64)? >> 4) * 4;
    let Some(s) = CONN_STATE.get_ptr_mut(cookie) else {
        return Ok(());
    };
    // SAFETY: see on_established.
    let s = unsafe { &mut *s };
    s.peer_fin_seq = seq.wrapping_add(skb_len.wrapping_sub(doff));
    s.flags |= flags::PEER_FIN_SEEN;
    Ok(())
}

/// How a socket closed.
struct Closing {
    /// The state it left for CLOSE.
    last_state: u32,
    /// Bytes (sent, received) that went socket to socket.
    redirected: (u64, u64),
}

/// The state's flags an event carries as they are.
const EVENT_FLAGS: u32 =
    flags::FIN_SENT | flags::FIN_RECEIVED | flags::TIMED_OUT | flags::DELIVERED;

/// The open event (`closing` None) or the close event of a socket.
fn emit(ctx: &SockOpsContext, cookie: u64, state: &ConnState, closing: Option<&Closing>) {
    if !events::enabled() {
        return;
    }
    let (kind, last_state, redirected) = match closing {
        None => (ConnEventKind::Open, tcp_state::ESTABLISHED, (0, 0)),
        Some(c) => (ConnEventKind::Close, c.last_state, c.redirected),
    };
    let now = now();
    let (family, local_addr, remote_addr) = addresses(ctx);
    let mut ev_flags = state.flags & EVENT_FLAGS;
    let mut fin_acked = 0;
    let mut fin_received = 0;
    if kind == ConnEventKind::Close {
        // Our FIN was acknowledged: FIN_WAIT2 is entered only then; CLOSING and LAST_ACK
        // leave for CLOSE on its ACK (snd_una reaches snd_nxt) or on a reset (it does not).
        // Known limit: a FIN still queued behind a zero window when a reset comes also has
        // snd_una == snd_nxt; telling it apart needs write_seq, which sock_ops does not expose.
        let fin_wait2 = state.states_seen & (1 << tcp_state::FIN_WAIT2) != 0;
        let acked_on_close = (last_state == tcp_state::CLOSING
            || last_state == tcp_state::LAST_ACK)
            && ctx_read!(ctx.ops, snd_una) == ctx_read!(ctx.ops, snd_nxt);
        if state.flags & flags::FIN_SENT != 0 && (fin_wait2 || acked_on_close) {
            ev_flags |= flags::FIN_ACKED;
            fin_acked = 1;
        }
        if state.flags & flags::PEER_FIN_SEEN != 0
            && ctx_read!(ctx.ops, rcv_nxt) == state.peer_fin_seq.wrapping_add(1)
        {
            ev_flags |= flags::FIN_RECEIVED;
        }
        if ev_flags & flags::FIN_RECEIVED != 0 {
            fin_received = 1;
        }
        if redirected != (0, 0) {
            ev_flags |= flags::REDIRECTED;
        }
    }
    // A connection that never reached ESTABLISHED has no baseline and moved no payload.
    let established = state.states_seen & (1 << tcp_state::ESTABLISHED) != 0;
    let sent = ctx_read!(ctx.ops, bytes_acked)
        .saturating_sub(state.bytes_acked_base)
        .saturating_sub(fin_acked);
    let received = ctx_read!(ctx.ops, bytes_received)
        .saturating_sub(state.bytes_received_base)
        .saturating_sub(fin_received);
    let mut ev = ConnEvent {
        kind: kind as u32,
        family: Family::of(family).af(),
        cookie,
        timestamp_ns: now,
        duration_ns: now.saturating_sub(state.start_ns),
        local_addr,
        remote_addr,
        local_port: ctx_read!(ctx.ops, local_port),
        remote_port: u32::from_be(ctx_read!(ctx.ops, remote_port)),
        side: state.side,
        last_state,
        bytes_sent: if established { sent } else { 0 } + redirected.0,
        bytes_received: if established { received } else { 0 } + redirected.1,
        srtt_us: ctx_read!(ctx.ops, srtt_us) >> 3,
        rtt_min_us: ctx_read!(ctx.ops, rtt_min),
        total_retrans: ctx_read!(ctx.ops, total_retrans),
        segs_in: ctx_read!(ctx.ops, segs_in),
        segs_out: ctx_read!(ctx.ops, segs_out),
        flags: ev_flags,
        protocol: u32::from(IPPROTO_TCP),
        ..ConnEvent::default()
    };
    if state.side == Side::Active as u32
        && let Some(sk) = ctx.socket()
    {
        let port = remote_port_be(ctx);
        match mesh::captured(sk).filter(|_| mesh::is_listener_at(family, &remote_addr, port)) {
            Some(t) => mesh::describe(ctx, &mut ev, &t),
            None => add_service(&mut ev, sk, family, port),
        }
    }
    events::submit(&ev);
}
