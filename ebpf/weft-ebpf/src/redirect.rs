//! Same-node acceleration (`--sockmap`): data between two local pods' TCP sockets goes from
//! one socket to the other, skipping the TCP/IP stack on both ends.
//!
//! At establishment every pod's TCP socket enters `SOCK_PAIRS` under its (local, remote)
//! addresses, with a `REDIRECTED` entry beside it. `weft_sk_msg` runs on every send of such a
//! socket: when the peer's key is there too, the data goes straight into the peer's receive
//! queue. Nothing is judged here: NetworkPolicy judges TCP at connect and at the SYN, and a
//! connection reaches establishment (and this map) only when both were allowed; established
//! TCP packets pass cgroup_skb unjudged with or without this path.
//!
//! Telemetry: redirected bytes never reach `bytes_acked` or `bytes_received`, so the program
//! counts them in `REDIRECTED` (the sender's `sent`, the receiver's `received`) and the close
//! event adds them; no packet crosses cgroup_skb either, so this program writes the periodic
//! `Update` events of both ends.
//!
//! Keys are addresses, which need not be unique on the node: another network namespace (a
//! pod's nested one) can hold a socket with the same addresses. So an entry also holds its
//! end's initial sequence numbers, and a send goes to a peer only when they match its own
//! (random 32-bit numbers each way that only the two ends of one handshake share); no entry
//! ever replaces another's. Loopback connections stay out altogether (every pod has them).
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_NOEXIST, sk_action},
    helpers::bpf_ktime_get_coarse_ns,
    programs::{SkMsgContext, SockOpsContext},
};
use weft_abi::{
    IPPROTO_TCP,
    conn::{ConnEvent, ConnEventKind, PairKey, Redirected, Side, flags, tcp_state},
    net::Family,
    stats::Counter,
};

use crate::{
    events::{self, family_words},
    maps::{CONN_STATE, CONN_UPDATE_INTERVAL_NS, REDIRECTED, SOCK_PAIRS, SOCKMAP_ENABLED},
    stats,
};

/// Whether the agent asked for the socket-to-socket path.
#[inline(always)]
pub fn enabled() -> bool {
    SOCKMAP_ENABLED.load() != 0
}

/// The key of a sock_ops socket: its addresses (family words) and host-order ports.
#[inline(always)]
pub fn sockops_key(ctx: &SockOpsContext, local: [u32; 4], remote: [u32; 4]) -> PairKey {
    PairKey {
        local_addr: local,
        remote_addr: remote,
        local_port: ctx_read!(ctx.ops, local_port),
        // Network order in a u32 whose upper half holds the port (see ConnEvent).
        remote_port: u32::from_be(ctx_read!(ctx.ops, remote_port)),
    }
}

/// Puts an established socket into `SOCK_PAIRS` (and its counters into `REDIRECTED`); true
/// when it is in both. A socket left out simply keeps the TCP/IP path: a loopback one, one
/// that moved payload before establishment (TCP Fast Open: its peer may still have it to
/// read), or one whose key another live socket holds (BPF_NOEXIST: no socket ever takes a
/// key from another; the kernel removes a socket from `SOCK_PAIRS` when it is closed, and
/// its `REDIRECTED` entry goes at CLOSE).
#[inline(always)]
pub fn register(ctx: &SockOpsContext, cookie: u64, key: &PairKey, side: Side) -> bool {
    if loopback(&key.local_addr) || loopback(&key.remote_addr) {
        return false;
    }
    let (snd_nxt, rcv_nxt) = (ctx_read!(ctx.ops, snd_nxt), ctx_read!(ctx.ops, rcv_nxt));
    let moved = match side {
        // bytes_acked counts the SYN.
        Side::Active => {
            snd_nxt != ctx_read!(ctx.ops, snd_una) || ctx_read!(ctx.ops, bytes_acked) > 1
        }
        Side::Passive => ctx_read!(ctx.ops, bytes_received) > 0,
    };
    if moved {
        return false;
    }
    let value = Redirected {
        cookie,
        send_seq: snd_nxt,
        recv_seq: rcv_nxt,
        ..Redirected::default()
    };
    let no_exist = u64::from(BPF_NOEXIST);
    if REDIRECTED.insert(key, value, no_exist).is_err() {
        stats::bump(Counter::SockmapFull);
        return false;
    }
    let mut k = *key;
    // SAFETY: the program's own context pointer, valid while it runs; the helper only reads
    // the context's socket from it.
    let ops = unsafe { &mut *ctx.ops };
    if SOCK_PAIRS.update(&mut k, ops, no_exist).is_err() {
        // The entry is ours: the insert above made it.
        let _ = REDIRECTED.remove(key);
        stats::bump(Counter::SockmapFull);
        return false;
    }
    true
}

/// At close: the bytes redirected (sent, received) of the socket `cookie`, whose entry goes.
/// (The kernel removes the socket from `SOCK_PAIRS` itself when it closes.)
#[inline(always)]
pub fn take(key: &PairKey, cookie: u64) -> (u64, u64) {
    let Some(r) = REDIRECTED.get_ptr(key) else {
        return (0, 0);
    };
    // SAFETY: a live map value; each field is read whole (the peer may still add to
    // `received` until its next send finds this socket gone).
    let (owner, sent, received) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*r).cookie),
            core::ptr::read_volatile(&raw const (*r).sent),
            core::ptr::read_volatile(&raw const (*r).received),
        )
    };
    if owner != cookie {
        // A newer socket with the same addresses took the key: its counters are not ours.
        return (0, 0);
    }
    let _ = REDIRECTED.remove(key);
    (sent, received)
}

#[inline(always)]
fn loopback(addr: &[u32; 4]) -> bool {
    // Network order: an IPv4 address's first byte is the low byte of word 0 here.
    let v4 = addr[1] == 0 && addr[2] == 0 && addr[3] == 0 && addr[0] & 0xff == 127;
    let v6 = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be();
    v4 || v6
}

/// One send of a socket in `SOCK_PAIRS`: to the peer's receive queue when the peer is there
/// and every earlier send of this socket went there too, else the usual path (for good).
/// Never a drop: any failure here leaves the data to the TCP/IP stack.
#[inline(always)]
pub fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
    let (family, key) = msg_key(ctx);
    let Some(own) = REDIRECTED.get_ptr_mut(key) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: a live map value, read whole; written only by this socket's sends (under its
    // lock).
    if unsafe { core::ptr::read_volatile(&raw const (*own).stack) } != 0 {
        return sk_action::SK_PASS;
    }
    let mut peer_key = key.peer();
    // The peer only when it is this connection's other end (see `Redirected::send_seq`); its
    // socket in SOCK_PAIRS is the one its entry describes (both are made together, and
    // neither is ever replaced while the socket lives).
    let redirected = REDIRECTED.get_ptr_mut(peer_key).filter(|&peer| {
        // SAFETY: live map values; the sequence numbers are written only at creation.
        let paired = unsafe { (*own).pairs_with(&*peer) };
        paired
            && SOCK_PAIRS.redirect_msg(ctx, &mut peer_key, u64::from(BPF_F_INGRESS))
                == i64::from(sk_action::SK_PASS)
    });
    let Some(peer) = redirected else {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*own).stack, 1) };
        return sk_action::SK_PASS;
    };
    let size = u64::from(ctx.size());
    // SAFETY: live map values; the counters are 8-byte aligned and written only atomically.
    unsafe {
        stats::add(&raw mut (*own).sent, size);
        stats::add(&raw mut (*peer).received, size);
    }
    let interval = CONN_UPDATE_INTERVAL_NS.load();
    if interval != 0 && events::enabled() {
        // SAFETY: no arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        maybe_update(own, &key, family, now, interval);
        maybe_update(peer, &peer_key, family, now, interval);
    }
    sk_action::SK_PASS
}

/// The key of the sending socket: (family 4 or 6, key).
#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> (u8, PairKey) {
    let md = ctx.msg;
    let af = ctx_read!(md, family);
    let (family, local) = family_words(
        af,
        ctx_read!(md, local_ip4),
        [
            ctx_read!(md, local_ip6[0]),
            ctx_read!(md, local_ip6[1]),
            ctx_read!(md, local_ip6[2]),
            ctx_read!(md, local_ip6[3]),
        ],
    );
    let (_, remote) = family_words(
        af,
        ctx_read!(md, remote_ip4),
        [
            ctx_read!(md, remote_ip6[0]),
            ctx_read!(md, remote_ip6[1]),
            ctx_read!(md, remote_ip6[2]),
            ctx_read!(md, remote_ip6[3]),
        ],
    );
    let key = PairKey {
        local_addr: local,
        remote_addr: remote,
        local_port: ctx_read!(md, local_port),
        // As in sock_ops: network order in the upper half of a u32.
        remote_port: u32::from_be(ctx_read!(md, remote_port)),
    };
    (family, key)
}

/// An `Update` of one end (`r`, keyed `key`) once per interval: its bytes so far. Only the
/// redirected bytes: those that crossed the stack before the pair formed show at close (the
/// agent keeps the largest count it has seen, so an update never takes any back).
#[inline(always)]
fn maybe_update(r: *mut Redirected, key: &PairKey, family: u8, now: u64, interval: u64) {
    // SAFETY: a live map value; fields read and written whole (racing senders only cause a
    // duplicate update).
    let (cookie, last, sent, received) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*r).cookie),
            core::ptr::read_volatile(&raw const (*r).last_update_ns),
            core::ptr::read_volatile(&raw const (*r).sent),
            core::ptr::read_volatile(&raw const (*r).received),
        )
    };
    let Some(state) = CONN_STATE.get_ptr(cookie) else {
        return;
    };
    // SAFETY: a live map value, read field by field.
    let (start, side) = unsafe { ((*state).start_ns, (*state).side) };
    let since = if last == 0 { start } else { last };
    if now.saturating_sub(since) < interval {
        return;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*r).last_update_ns, now) };
    let ev = ConnEvent {
        kind: ConnEventKind::Update as u32,
        family: Family::of(family).af(),
        cookie,
        timestamp_ns: now,
        duration_ns: now.saturating_sub(start),
        local_addr: key.local_addr,
        remote_addr: key.remote_addr,
        local_port: key.local_port,
        remote_port: key.remote_port,
        side,
        last_state: tcp_state::ESTABLISHED,
        bytes_sent: sent,
        bytes_received: received,
        flags: flags::REDIRECTED,
        protocol: u32::from(IPPROTO_TCP),
        ..ConnEvent::default()
    };
    events::submit(&ev);
}
