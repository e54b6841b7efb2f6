//! Socket-level service load balancing (cgroup sock_addr hooks).
//!
//! connect4/6 and sendmsg4/6 replace a ClusterIP destination with a backend before the kernel
//! routes anything: no DNAT, no conntrack entry. recvmsg4/6 and getpeername4/6 put the ClusterIP
//! back where the application looks. Destinations that are not services are not
//! touched. A service without ready backends fails the call with ECONNREFUSED at once. What a
//! socket asked for and reaches lives in its own storage (`SOCK_XLATE`): slot 0 holds the
//! translation connect made, the others those of unconnected UDP, one per ClusterIP.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use weft_abi::{
    IPPROTO_TCP, IPPROTO_UDP,
    conn::DropReason,
    net::{Direction, Family},
    policy::EndpointInfo,
    stats::Counter,
    svc::{
        AffinityKey, AffinityValue, COUNT_XLATE, Endpoint, MemberKey, ServiceKey, ServiceValue,
        SlotKey, SockXlate, V4_MAPPED_WORD, XLATE_CONNECTED, XLATE_SLOTS, XLATE_UNCONNECTED,
        XLATE_USED, Xlate, normalize_v6,
    },
};

use crate::{
    ctx::SocketCookie,
    events::DropEvent,
    flows,
    maps::{AFFINITY, BACKEND_SLOTS, MEMBERS, SERVICES, SOCK_XLATE},
    mesh, outlier, policy, stats,
    storage::{self, Socket as _},
    verdict::{Fault, Verdict},
    xlate,
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
        // Not a service: only egress policy applies (and the mesh's capture).
        if hook == Hook::Connect {
            return Ok(connect_direct::<IS_V6>(ctx, &key));
        }
        return Ok(Verdict::Pass);
    };
    if svc.count == 0 {
        return Ok(no_backends(ctx, &key));
    }
    // The pod is looked up once: for connect's policy check, and for the budget a new
    // translation counts against. Unconnected UDP keeps its backends in its translations.
    let ep = (hook == Hook::Connect).then(|| policy::current_endpoint(ctx));
    let kept = if hook == Hook::Sendmsg {
        translations(ctx, None)
    } else {
        None
    };
    let backend = select(ctx, kept, &key, &svc, hook).ok_or(Fault::SlotMissing)?;
    // Egress policy judges the backend the connection really reaches. (Unconnected UDP is
    // judged per peer by cgroup_skb, which sees the backend too.)
    if let Some(ep) = ep
        && !policy::connect_as(
            ctx,
            ep,
            protocol,
            backend.family,
            &backend.addr,
            backend.port,
        )
    {
        return Ok(Verdict::Deny);
    }
    // A denied connect has returned: it holds no state.
    let xlate = if hook == Hook::Connect {
        translations(ctx, ep)
    } else {
        kept
    };
    let captured = hook == Hook::Connect
        && protocol == IPPROTO_TCP
        && mesh::captures(ep.flatten().as_ref(), &backend);
    let Some(x) = xlate else {
        if captured {
            // Where it goes could not be kept for the agent: refused, never plaintext.
            stats::bump(Counter::MeshCaptureFailed);
            return Ok(Verdict::Refuse);
        }
        write_addr::<IS_V6>(ctx, backend.family, &backend.addr, backend.port);
        return Ok(Verdict::Pass);
    };
    let extra = if captured { mesh::flags(false) } else { 0 };
    // SAFETY: the socket's own storage; sock_addr hooks run under the socket's lock, so no
    // other writer runs meanwhile.
    remember(unsafe { &mut *x }, &key, &backend, hook, extra);
    let dst = if captured {
        mesh::listener(backend.family)
    } else {
        backend
    };
    write_addr::<IS_V6>(ctx, dst.family, &dst.addr, dst.port);
    Ok(Verdict::Pass)
}

/// connect to an address that is no Service: egress policy; a meshed pod's TCP to a meshed
/// pod the mesh carries ([`mesh::captures`]) is captured; a UDP socket forgets its earlier
/// translation.
#[inline(always)]
fn connect_direct<const IS_V6: bool>(ctx: &SockAddrContext, key: &ServiceKey) -> Verdict {
    let ep = policy::current_endpoint(ctx);
    if !policy::connect_as(ctx, ep, key.protocol, key.family, &key.addr, key.port) {
        return Verdict::Deny;
    }
    if key.protocol == IPPROTO_UDP {
        // Connected elsewhere now: an earlier ClusterIP translation no longer describes
        // where this socket sends.
        forget_connected(ctx);
        return Verdict::Pass;
    }
    let target = Endpoint {
        addr: key.addr,
        port: key.port,
        family: key.family,
        _pad: 0,
    };
    if !mesh::captures(ep.as_ref(), &target) {
        // A socket connected again (after AF_UNSPEC) must not keep an earlier capture.
        forget_connected(ctx);
        return Verdict::Pass;
    }
    let Some(x) = translations(ctx, Some(ep)) else {
        stats::bump(Counter::MeshCaptureFailed);
        return Verdict::Refuse;
    };
    // SAFETY: as in try_translate.
    remember(
        unsafe { &mut *x },
        key,
        &target,
        Hook::Connect,
        mesh::flags(true),
    );
    let l = mesh::listener(target.family);
    write_addr::<IS_V6>(ctx, l.family, &l.addr, l.port);
    Verdict::Pass
}

/// [`SockXlate::owner`] of a value counted for nobody.
const NOT_COUNTED: u32 = u32::MAX;

/// A Service without ready backends: the call fails with ECONNREFUSED, reported.
#[inline(always)]
fn no_backends(ctx: &SockAddrContext, key: &ServiceKey) -> Verdict {
    stats::bump(Counter::ServiceNoBackends);
    DropEvent {
        cookie: ctx.cookie(),
        family: key.family,
        local: policy::current_pod_addr(ctx, key.family),
        local_port: 0,
        remote: key.addr,
        remote_port: key.port,
        protocol: key.protocol,
        reason: DropReason::NoBackends,
        direction: Direction::Egress,
    }
    .report();
    Verdict::Refuse
}

/// The socket's translations, made (and counted against its pod, `ep` or looked up now) if
/// it has none yet.
#[inline(always)]
fn translations(ctx: &SockAddrContext, ep: Option<Option<EndpointInfo>>) -> Option<*mut SockXlate> {
    let sk = ctx.socket()?;
    if let Some(x) = storage::get(&SOCK_XLATE, sk, false) {
        return Some(x);
    }
    let ep = match ep {
        Some(ep) => ep,
        None => policy::current_endpoint(ctx),
    };
    let owner = policy::owner_of(ep);
    let (x, counted) = storage::create(&SOCK_XLATE, sk, COUNT_XLATE, owner)?;
    // SAFETY: the socket's own storage, new and zeroed; sock_addr hooks run under the
    // socket's lock, so this call is its only writer.
    unsafe { (*x).owner = if counted { owner } else { NOT_COUNTED } };
    Some(x)
}

/// Records a translation: what recvmsg and getpeername must show instead of the backend, and
/// (unconnected UDP) the backend the socket keeps for this frontend.
#[inline(always)]
fn remember(x: &mut SockXlate, key: &ServiceKey, backend: &Endpoint, hook: Hook, extra: u32) {
    let (index, flags) = match hook {
        Hook::Connect => (xlate::CONNECTED_SLOT, XLATE_USED | XLATE_CONNECTED | extra),
        Hook::Sendmsg => (unconnected_slot(x, key), XLATE_USED),
    };
    if let Some(slot) = x.slots.get_mut(index) {
        *slot = Xlate {
            frontend: *key,
            backend: *backend,
            flags,
        };
    }
}

/// Where an unconnected translation for `key` goes: its frontend's slot, a free one, or the
/// next in turn (a socket sending to more ClusterIPs than it has slots forgets its own
/// oldest; no other socket's).
#[inline(always)]
fn unconnected_slot(x: &mut SockXlate, key: &ServiceKey) -> usize {
    let mut free = None;
    for i in 1..XLATE_SLOTS as usize {
        let Some(slot) = x.slots.get(i) else { break };
        if slot.flags & XLATE_USED == 0 {
            free = free.or(Some(i));
        } else if slot.frontend == *key {
            return i;
        }
    }
    if let Some(i) = free {
        return i;
    }
    // A mask, not a remainder: the verifier follows its bound.
    let turn = x.next & (XLATE_UNCONNECTED - 1);
    x.next = turn.wrapping_add(1);
    turn as usize + 1
}

/// Tries to copy a whole `SERVICES` value (see `weft_abi::seal`) before giving up.
pub const SEAL_TRIES: usize = 3;

/// The service of a frontend: a whole value written under `key` (its seal checked), or none.
#[inline(always)]
pub fn service(key: &ServiceKey) -> Result<Option<ServiceValue>, Fault> {
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

pub fn slot(svc: &ServiceValue, index: u32) -> Option<Endpoint> {
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

/// Whether the socket reaches `backend` through a frontend other than `key`.
#[inline(always)]
fn taken(x: &SockXlate, key: &ServiceKey, backend: &Endpoint) -> bool {
    x.slots
        .iter()
        .any(|s| s.flags & XLATE_USED != 0 && s.backend == *backend && s.frontend != *key)
}

/// A backend for an unconnected UDP socket's first datagram to `key`: one that the socket does
/// not already reach through another ClusterIP. Replies are told apart by their source only,
/// so a backend reached through two frontends would show one of them for both; when every
/// backend looked at is taken, the socket shares one (counted).
#[inline(always)]
fn unshared_backend(x: &SockXlate, key: &ServiceKey, svc: &ServiceValue) -> Option<Endpoint> {
    // SAFETY: no arguments.
    let start = unsafe { bpf_get_prandom_u32() } % svc.count;
    let mut first = None;
    for i in 0..UNSHARED_TRIES {
        if i >= svc.count {
            break;
        }
        let b = slot(svc, (start + i) % svc.count)?;
        first = first.or(Some(b));
        if !taken(x, key, &b) {
            return Some(b);
        }
    }
    stats::bump(Counter::RevNatShared);
    first
}

// Inlined: with its return slot it would take more than the 5 arguments a BPF call can pass.
#[inline(always)]
fn select(
    ctx: &SockAddrContext,
    xlate: Option<*mut SockXlate>,
    key: &ServiceKey,
    svc: &ServiceValue,
    hook: Hook,
) -> Option<Endpoint> {
    if svc.affinity_timeout_s > 0 {
        let remembered = with_affinity(ctx, svc)?;
        // An ejected backend's clients are sent elsewhere, and stay there. Here, not in
        // with_affinity: the walk's stack would add to that call's.
        let chosen = outlier::choose(svc, remembered);
        if chosen != remembered {
            re_point(ctx, svc, chosen);
        }
        return Some(chosen);
    }
    if hook == Hook::Sendmsg
        && let Some(x) = xlate
    {
        // SAFETY: the socket's own storage, read under the socket's lock.
        let x = unsafe { &*x };
        // Keep an unconnected UDP socket on one backend per frontend while it stays a
        // member, as a conntrack entry would.
        if let Some(s) = x.slots.iter().find(|s| {
            s.flags & XLATE_USED != 0 && s.frontend == *key && is_member(svc.service_id, &s.backend)
        }) {
            return Some(s.backend);
        }
        return unshared_backend(x, key, svc);
    }
    random_backend(svc).map(|b| outlier::choose(svc, b))
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

/// Points the client's affinity entry for `svc` at `backend`. Not inlined: its key and
/// value would add to connect's stack, which the outlier walk is stacked on.
#[inline(never)]
fn re_point(ctx: &SockAddrContext, svc: &ServiceValue, backend: Endpoint) {
    let key = AffinityKey {
        // SAFETY: the program's context; the helper reads the socket's namespace only.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast::<c_void>()) },
        service_id: svc.service_id,
        _pad: 0,
    };
    let value = AffinityValue {
        backend,
        _pad: 0,
        // SAFETY: no arguments.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A failed insert only loses affinity for the next connection.
    let _ = AFFINITY.insert(key, value, 0);
}

/// A socket connected to an address that is no Service (UDP), or not captured (TCP): its
/// translation by an earlier connect no longer says where it goes.
#[inline(always)]
fn forget_connected(ctx: &SockAddrContext) {
    let Some(x) = ctx
        .socket()
        .and_then(|sk| storage::get(&SOCK_XLATE, sk, false))
    else {
        return;
    };
    // SAFETY: the socket's own storage, written under the socket's lock.
    if let Some(slot) = unsafe { (*x).slots.get_mut(xlate::CONNECTED_SLOT) } {
        slot.flags = 0;
    }
}

/// cgroup_skb egress, UDP: whether a datagram of a socket connected through a ClusterIP goes
/// to a backend that still serves it. A connected socket keeps the backend connect chose, and
/// nothing moves it when that backend leaves the Service (kube-proxy flushes conntrack for
/// this; Cilium destroys the socket): its datagrams are dropped instead, the send fails with
/// EPERM, and the application's reconnect (or new socket) reaches a current backend.
#[inline(always)]
pub fn backend_current(ctx: &SkBuffContext, family: u8, dst: &[u32; 4], dport: u16) -> bool {
    let Some(t) = ctx.socket().and_then(xlate::connected) else {
        return true;
    };
    let b = &t.backend;
    if t.flags & XLATE_CONNECTED == 0 || b.family != family || b.addr != *dst || b.port != dport {
        // Unconnected (sendmsg chooses a member per datagram), or another peer.
        return true;
    }
    match service(&t.frontend) {
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
    let backend = Endpoint {
        addr,
        port,
        family: fam,
        _pad: 0,
    };
    if let Some(frontend) = ctx.socket().and_then(|sk| xlate::frontend_of(sk, &backend)) {
        write_addr::<IS_V6>(ctx, frontend.family, &frontend.addr, frontend.port);
    }
    Ok(Verdict::Pass)
}

/// sock_release: the socket's storage values leave its pod's budget (the kernel frees them
/// with the socket).
#[inline(always)]
pub fn try_release(ctx: &SockContext) -> Result<Verdict, Fault> {
    if let Some(x) = ctx
        .socket()
        .and_then(|sk| storage::get(&SOCK_XLATE, sk, false))
    {
        // SAFETY: the socket's storage; a socket is released once, when no call of it runs.
        let owner = unsafe { core::ptr::replace(&raw mut (*x).owner, NOT_COUNTED) };
        if owner != NOT_COUNTED {
            storage::unreserve(COUNT_XLATE, owner);
        }
    }
    flows::release(ctx);
    Ok(Verdict::Pass)
}
