//! Socket-level service load balancing (cgroup sock_addr hooks).
//!
//! connect4/6 and sendmsg4/6 replace a ClusterIP destination with a backend before the kernel
//! routes anything: no DNAT, no conntrack entry. recvmsg4/6 and getpeername4/6 put the ClusterIP
//! back where the application looks, from `REVNAT`. Destinations that are not services are not
//! touched. A service without ready backends fails the call with ECONNREFUSED at once.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::{SockAddrContext, SockContext},
};
use weft_abi::{
    IPPROTO_TCP, IPPROTO_UDP,
    conn::DropReason,
    net::{Direction, Family},
    stats::Counter,
    svc::{
        AffinityKey, AffinityValue, Endpoint, MemberKey, RevNatKey, ServiceKey, ServiceValue,
        SlotKey, UdpFlowKey, UdpSock, V4_MAPPED_WORD, normalize_v6,
    },
};

use crate::{
    ctx::SocketCookie,
    events::DropEvent,
    maps::{AFFINITY, BACKEND_SLOTS, MEMBERS, REVNAT, SERVICES, UDP_FLOWS, UDP_SOCKS},
    policy, stats,
    verdict::{Fault, Verdict},
};

/// Which forward hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

/// The address family of the hook (the socket's): a const generic parameter (`V6`), so each
/// program is compiled for one family. As a runtime value LLVM merges the two paths into a
/// computed context offset, which the verifier rejects.
pub const V4: bool = false;
pub const V6: bool = true;

/// The destination (or, in recvmsg/getpeername, the peer) the context holds, normalized: an
/// IPv4-mapped address of an IPv6 socket reads as IPv4. Port in network byte order.
#[inline(always)]
fn read_addr<const IS_V6: bool>(ctx: &SockAddrContext) -> (u8, [u32; 4], u16) {
    let port = ctx_read!(ctx.sock_addr, user_port) as u16;
    match IS_V6 {
        false => (
            Family::V4 as u8,
            [ctx_read!(ctx.sock_addr, user_ip4), 0, 0, 0],
            port,
        ),
        true => {
            let words = [
                ctx_read!(ctx.sock_addr, user_ip6[0]),
                ctx_read!(ctx.sock_addr, user_ip6[1]),
                ctx_read!(ctx.sock_addr, user_ip6[2]),
                ctx_read!(ctx.sock_addr, user_ip6[3]),
            ];
            let (fam, addr) = normalize_v6(words);
            (fam, addr, port)
        }
    }
}

/// Writes an address of family `fam` into the context of a `family` socket (IPv4 into an
/// IPv6 socket as IPv4-mapped).
#[inline(always)]
fn write_addr<const IS_V6: bool>(ctx: &SockAddrContext, fam: u8, addr: &[u32; 4], port: u16) {
    match IS_V6 {
        false => ctx_write!(ctx.sock_addr, addr[0], user_ip4),
        true => {
            let words = if Family::of(fam) == Family::V4 {
                [0, 0, V4_MAPPED_WORD, addr[0]]
            } else {
                *addr
            };
            ctx_write!(ctx.sock_addr, words[0], user_ip6[0]);
            ctx_write!(ctx.sock_addr, words[1], user_ip6[1]);
            ctx_write!(ctx.sock_addr, words[2], user_ip6[2]);
            ctx_write!(ctx.sock_addr, words[3], user_ip6[3]);
        }
    }
    ctx_write!(ctx.sock_addr, u32::from(port), user_port);
}

/// connect4/6 and sendmsg4/6: ClusterIP to backend, and egress policy.
#[inline(always)]
pub fn try_translate<const IS_V6: bool>(
    ctx: &SockAddrContext,
    hook: Hook,
) -> Result<Verdict, Fault> {
    let protocol = ctx_read!(ctx.sock_addr, protocol);
    let protocol = match (protocol, hook) {
        (p, Hook::Connect) if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        (p, _) if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return Ok(Verdict::Pass),
    };
    let (fam, addr, port) = read_addr::<IS_V6>(ctx);
    let key = ServiceKey {
        addr,
        port,
        protocol,
        family: fam,
    };
    let Some(svc) = service(&key)? else {
        // Not a service: only egress policy applies.
        if hook == Hook::Connect && !policy::connect(ctx, protocol, fam, &addr, port) {
            return Ok(Verdict::Deny);
        }
        if hook == Hook::Connect && protocol == IPPROTO_UDP {
            // Connected elsewhere now: an earlier ClusterIP translation no longer describes
            // where this socket sends.
            forget_connected(ctx.cookie());
        }
        return Ok(Verdict::Pass);
    };
    if svc.count == 0 {
        stats::bump(Counter::ServiceNoBackends);
        DropEvent {
            cookie: ctx.cookie(),
            family: fam,
            local: policy::current_pod_addr(ctx, fam),
            local_port: 0,
            remote: addr,
            remote_port: port,
            protocol,
            reason: DropReason::NoBackends,
            direction: Direction::Egress,
        }
        .report();
        return Ok(Verdict::Refuse);
    }
    let cookie = ctx.cookie();
    let backend = select(ctx, cookie, &key, &svc, hook).ok_or(Fault::SlotMissing)?;
    // Egress policy judges the backend the connection really reaches. (Unconnected UDP is
    // judged per peer by cgroup_skb, which sees the backend too.)
    if hook == Hook::Connect
        && !policy::connect(ctx, protocol, backend.family, &backend.addr, backend.port)
    {
        return Ok(Verdict::Deny);
    }
    remember(cookie, &key, &backend, hook);
    write_addr::<IS_V6>(ctx, backend.family, &backend.addr, backend.port);
    Ok(Verdict::Pass)
}

/// Records a translation: what recvmsg and getpeername must show instead of the backend, and
/// (UDP) the socket's last translation, for its cleanup and its backend's membership.
#[inline(always)]
fn remember(cookie: u64, key: &ServiceKey, backend: &Endpoint, hook: Hook) {
    let frontend = Endpoint {
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: 0,
    };
    let rev = RevNatKey {
        cookie,
        backend: *backend,
        _pad: 0,
    };
    if REVNAT.insert(rev, frontend, 0).is_err() {
        stats::bump(Counter::RevNatFailed);
    }
    if key.protocol == IPPROTO_UDP {
        // Lost stickiness at worst: REVNAT and UDP_FLOWS then age out by LRU.
        let _ = UDP_SOCKS.insert(
            cookie,
            UdpSock {
                frontend: *key,
                backend: *backend,
                connected: u32::from(hook == Hook::Connect),
            },
            0,
        );
    }
}

/// Tries to copy a whole `SERVICES` value (see `weft_abi::seal`) before giving up.
const SEAL_TRIES: usize = 3;

/// The service of a frontend: a whole value written under `key` (its seal checked), or none.
#[inline(always)]
fn service(key: &ServiceKey) -> Result<Option<ServiceValue>, Fault> {
    for _ in 0..SEAL_TRIES {
        let Some(ptr) = SERVICES.get_ptr(key) else {
            return Ok(None);
        };
        // SAFETY: a map value pointer stays valid memory for this program's RCU section,
        // though its element may be reused meanwhile: one volatile copy, then the seal says
        // whether that copy is one whole write under this key.
        let svc = unsafe { core::ptr::read_volatile(ptr) };
        if svc.is_sealed_for(key) {
            return Ok(Some(svc));
        }
        stats::bump(Counter::TornRead);
    }
    Err(Fault::Torn)
}

fn is_member(service_id: u32, backend: &Endpoint) -> bool {
    MEMBERS
        .get_ptr(MemberKey {
            service_id,
            backend: *backend,
        })
        .is_some()
}

fn random_backend(svc: &ServiceValue) -> Option<Endpoint> {
    // SAFETY: no arguments.
    slot(svc, unsafe { bpf_get_prandom_u32() } % svc.count)
}

fn slot(svc: &ServiceValue, index: u32) -> Option<Endpoint> {
    let slot = SlotKey {
        revision: svc.revision,
        index,
    };
    // SAFETY: slots of a revision are written before the revision is published and freed
    // only after a grace period, never updated in place.
    unsafe { BACKEND_SLOTS.get(slot) }.copied()
}

/// Backends looked at for an unconnected UDP translation that no other frontend of the socket
/// already uses.
const UNSHARED_TRIES: u32 = 4;

/// A backend for an unconnected UDP socket's first datagram to `key`: one that the socket does
/// not already reach through another ClusterIP. Replies are told apart by their source only,
/// so a backend reached through two frontends would show one of them for both; when every
/// backend looked at is taken, the socket shares one (counted).
#[inline(always)]
fn unshared_backend(cookie: u64, key: &ServiceKey, svc: &ServiceValue) -> Option<Endpoint> {
    let frontend = Endpoint {
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: 0,
    };
    // SAFETY: no arguments.
    let start = unsafe { bpf_get_prandom_u32() } % svc.count;
    let mut first = None;
    for i in 0..UNSHARED_TRIES {
        if i >= svc.count {
            break;
        }
        let b = slot(svc, (start + i) % svc.count)?;
        first = first.or(Some(b));
        let rev = RevNatKey {
            cookie,
            backend: b,
            _pad: 0,
        };
        // SAFETY: LRU entries are only read and copied here.
        match unsafe { REVNAT.get(rev) }.copied() {
            Some(f) if f != frontend => {}
            _ => return Some(b),
        }
    }
    stats::bump(Counter::RevNatShared);
    first
}

// Inlined: with its return slot it would take more than the 5 arguments a BPF call can pass.
#[inline(always)]
fn select(
    ctx: &SockAddrContext,
    cookie: u64,
    key: &ServiceKey,
    svc: &ServiceValue,
    hook: Hook,
) -> Option<Endpoint> {
    if svc.affinity_timeout_s > 0 {
        return with_affinity(ctx, svc);
    }
    if hook == Hook::Sendmsg {
        // Keep an unconnected UDP socket on one backend per frontend while it stays a
        // member, as a conntrack entry would.
        let flow = UdpFlowKey {
            cookie,
            frontend: *key,
            _pad: 0,
        };
        // SAFETY: LRU entries are only read and copied here.
        if let Some(b) = unsafe { UDP_FLOWS.get(flow) }.copied()
            && is_member(svc.service_id, &b)
        {
            return Some(b);
        }
        let b = unshared_backend(cookie, key, svc)?;
        // A failed insert only loses stickiness, never correctness.
        let _ = UDP_FLOWS.insert(flow, b, 0);
        return Some(b);
    }
    random_backend(svc)
}

fn with_affinity(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<Endpoint> {
    let key = AffinityKey {
        // SAFETY: the program's context; the helper reads the socket's namespace only.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast::<c_void>()) },
        service_id: svc.service_id,
        _pad: 0,
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    // SAFETY: LRU entries are only read and copied here.
    let backend = match unsafe { AFFINITY.get(key) }.copied() {
        Some(a)
            if now.saturating_sub(a.last_used_ns) <= timeout_ns
                && is_member(svc.service_id, &a.backend) =>
        {
            a.backend
        }
        _ => random_backend(svc)?,
    };
    let value = AffinityValue {
        backend,
        _pad: 0,
        last_used_ns: now,
    };
    // A failed insert only loses affinity for the next connection.
    let _ = AFFINITY.insert(key, value, 0);
    Some(backend)
}

/// A UDP socket connected to an address that is no Service: its last translation, if made
/// by connect, no longer says where it sends (kept, unmarked, for the release cleanup).
#[inline(always)]
fn forget_connected(cookie: u64) {
    // SAFETY: LRU entries are only read and copied here.
    if let Some(mut sock) = unsafe { UDP_SOCKS.get(cookie) }.copied()
        && sock.connected != 0
    {
        sock.connected = 0;
        let _ = UDP_SOCKS.insert(cookie, sock, 0);
    }
}

/// cgroup_skb egress, UDP: whether a datagram of a socket connected through a ClusterIP goes
/// to a backend that still serves it. A connected socket keeps the backend connect chose, and
/// nothing moves it when that backend leaves the Service (kube-proxy flushes conntrack for
/// this; Cilium destroys the socket): its datagrams are dropped instead, the send fails with
/// EPERM, and the application's reconnect (or new socket) reaches a current backend. Best
/// effort: it knows the socket's last translation only, while `UDP_SOCKS` keeps it.
#[inline(always)]
pub fn backend_current(cookie: u64, family: u8, dst: &[u32; 4], dport: u16) -> bool {
    // SAFETY: LRU entries are only read and copied here.
    let Some(sock) = (unsafe { UDP_SOCKS.get(cookie) }).copied() else {
        return true;
    };
    let b = &sock.backend;
    if sock.connected == 0 || b.family != family || b.addr != *dst || b.port != dport {
        // Unconnected (sendmsg chooses a member per datagram), or another peer.
        return true;
    }
    match service(&sock.frontend) {
        Ok(Some(svc)) => is_member(svc.service_id, b),
        // The Service is gone: its backends serve nothing here.
        Ok(None) => false,
        // Unreadable now (being rewritten): not a reason to drop.
        Err(_) => true,
    }
}

/// recvmsg4/6 and getpeername4/6: if the peer is a backend this socket reached through a
/// ClusterIP, show the ClusterIP instead. Always passes (these hooks cannot fail a call).
#[inline(always)]
pub fn try_reverse<const IS_V6: bool>(ctx: &SockAddrContext) -> Result<Verdict, Fault> {
    let (fam, addr, port) = read_addr::<IS_V6>(ctx);
    let key = RevNatKey {
        cookie: ctx.cookie(),
        backend: Endpoint {
            addr,
            port,
            family: fam,
            _pad: 0,
        },
        _pad: 0,
    };
    // SAFETY: LRU entries are only read and copied here.
    if let Some(frontend) = unsafe { REVNAT.get(key) }.copied() {
        write_addr::<IS_V6>(ctx, frontend.family, &frontend.addr, frontend.port);
    }
    Ok(Verdict::Pass)
}

/// sock_release: a UDP socket that went through a ClusterIP takes its translation entries
/// with it. (A socket that talked to several frontends leaves the older ones to LRU eviction.)
#[inline(always)]
pub fn try_release(ctx: &SockContext) -> Result<Verdict, Fault> {
    if ctx_read!(ctx.sock, protocol) != u32::from(IPPROTO_UDP) {
        return Ok(Verdict::Pass);
    }
    let cookie = ctx.cookie();
    // SAFETY: LRU entries are only read and copied here.
    let Some(last) = (unsafe { UDP_SOCKS.get(cookie) }).copied() else {
        return Ok(Verdict::Pass);
    };
    // Absent entries (evicted, or a connect-only socket) are fine.
    let _ = REVNAT.remove(RevNatKey {
        cookie,
        backend: last.backend,
        _pad: 0,
    });
    let _ = UDP_FLOWS.remove(UdpFlowKey {
        cookie,
        frontend: last.frontend,
        _pad: 0,
    });
    let _ = UDP_SOCKS.remove(cookie);
    Ok(Verdict::Pass)
}
