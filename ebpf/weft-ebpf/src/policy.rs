//! NetworkPolicy enforcement (see `weft_abi::policy` for the maps).
//!
//! - TCP egress is judged at connect (after service translation, so against the backend that
//!   was chosen); a denied connect fails at once with EPERM.
//! - TCP ingress is judged on the packets that reach a listening socket (the SYN and the
//!   handshake's last ACK); packets of an established connection pass.
//! - UDP and SCTP are judged on a socket's first packet to or from a peer (connect judges
//!   connected UDP early); an allowed exchange is remembered in the socket's own storage
//!   (`SOCK_FLOWS`), so its packets in both directions pass without being judged again.
//! - ICMP replies and errors pass; other protocols are judged per packet with port 0 (only
//!   rules without ports match them).
use aya_ebpf::{
    bindings::bpf_sock,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id,
    },
    maps::lpm_trie::Key,
    programs::{SkBuffContext, SockAddrContext},
};
use weft_abi::{
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    conn::DropReason,
    mesh::DELIVERY_MARK,
    net::{Direction, Family},
    policy::{
        EP_AUTHZ, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EP_SHARED_ADDRESS, EndpointInfo,
        FlowPeer, IDENTITY_ANY, IDENTITY_WORLD, IP_HOST, IPCACHE_PREFIX_FAMILY, IpcacheData,
        IpcacheValue, MAX_POD_DEPTH, Match, PLAINTEXT_ALLOW, PLAINTEXT_OTHER_PORTS, PLAINTEXT_PORT,
        PLAINTEXT_PREFIX_FIXED, POL_ANY_PORT, POLICY_PREFIX_FULL, PlaintextData, PolicyData,
        verdict_index,
    },
    stats::Counter,
    svc::SockOwner,
};

use crate::{
    ctx::{NetnsCookie as _, SocketCookie},
    events::DropEvent,
    flows,
    headers::{Headers, is_echo},
    maps::{
        AGENT_CGROUP_ID, AGENT_CGROUP_LEVEL, AGENT_CGROUPS, AUTHZ, ENDPOINTS, HOST_NETNS_COOKIE,
        IPCACHE, POLICY, POLICY_ROOT_LEVEL, UNBOUND_ISOLATED, UNBOUND_SCOPE_ID,
        UNBOUND_SCOPE_LEVEL, VERDICTS,
    },
    stats,
};

/// `TCP_LISTEN` in the kernel's socket states.
const TCP_LISTEN: u32 = 10;
/// `SOCK_STREAM` socket type.
const SOCK_STREAM: u32 = 1;

/// The pod an ancestor cgroup lookup leads to: the first ancestor (from the top) below the
/// root that `ENDPOINTS` knows. `ancestor(level)` returns 0 past the cgroup's own level. A
/// cgroup below the root that no entry covers is a pod not bound yet when the agent says so
/// (`UNBOUND_ISOLATED`), the cgroup is below the kubelet's pods cgroup (`UNBOUND_SCOPE_*`) and
/// the socket is not in the node's network namespace: it gets
/// [`EndpointInfo::UNBOUND`], isolated both ways.
#[inline(always)]
fn endpoint_by(ancestor: impl Fn(i32) -> u64, netns: impl Fn() -> u64) -> Option<EndpointInfo> {
    let root = POLICY_ROOT_LEVEL.load() as i32;
    let mut below_root = false;
    for depth in 1..=MAX_POD_DEPTH as i32 {
        let id = ancestor(root + depth);
        if id == 0 {
            break;
        }
        below_root = true;
        match endpoint(id) {
            Bound::Pod(ep) => return Some(ep),
            // Unreadable: the pod is judged as not bound, isolated both ways.
            Bound::Torn => return Some(EndpointInfo::UNBOUND),
            Bound::No => {}
        }
    }
    // Deeper than MAX_POD_DEPTH counts as unbound too: the agent refuses such pods. An
    // agent's socket (the mesh's, in a pod's namespace; its cgroup exactly, never one below
    // it) is no pod's: this agent's, or another of the instance's (a successor, or the agent
    // it replaces, draining). Looked at only here, where it would be isolated: an early
    // return after the helper calls had the verifier refuse the program (a register the
    // merged path stored was not initialized on it).
    let agent_level = AGENT_CGROUP_LEVEL.load() as i32;
    (below_root
        && UNBOUND_ISOLATED.load() != 0
        && ancestor(UNBOUND_SCOPE_LEVEL.load() as i32) == UNBOUND_SCOPE_ID.load()
        && netns() != HOST_NETNS_COOKIE.load()
        && !(agent_level != 0
            && ancestor(agent_level + 1) == 0
            && agent_cgroup(ancestor(agent_level))))
    .then_some(EndpointInfo::UNBOUND)
}

/// Whether `id` is the cgroup of an agent of the instance: this one's, or one in
/// `AGENT_CGROUPS`.
#[inline(always)]
fn agent_cgroup(id: u64) -> bool {
    id != 0 && (id == AGENT_CGROUP_ID.load() || AGENT_CGROUPS.get_ptr(id).is_some())
}

/// What `ENDPOINTS` says of a cgroup.
enum Bound {
    Pod(EndpointInfo),
    No,
    /// The value stayed torn over every try (see `weft_abi::seal`).
    Torn,
}

/// Tries to copy a whole `ENDPOINTS` value before giving up.
const SEAL_TRIES: usize = 3;

#[inline(always)]
fn endpoint(id: u64) -> Bound {
    for _ in 0..SEAL_TRIES {
        let Some(ptr) = ENDPOINTS.get_ptr(id) else {
            return Bound::No;
        };
        // SAFETY: a map value pointer stays valid memory for this program's RCU section,
        // though its element may be reused meanwhile: one volatile copy, then the seal says
        // whether that copy is one whole write for this cgroup.
        let ep = unsafe { core::ptr::read_volatile(ptr) };
        if ep.is_sealed_for(id) {
            return Bound::Pod(ep);
        }
        stats::bump(Counter::TornRead);
    }
    Bound::Torn
}

/// The pod of the calling process (sock_addr hooks).
#[inline(always)]
pub fn current_endpoint(ctx: &SockAddrContext) -> Option<EndpointInfo> {
    endpoint_by(
        // SAFETY: no memory is passed.
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
        || ctx.netns_cookie(),
    )
}

/// Whose socket-state budget a socket of pod `ep` counts against (see `SockOwner`).
#[inline(always)]
pub fn owner_of(ep: Option<EndpointInfo>) -> u32 {
    match ep {
        None => SockOwner::NODE,
        Some(ep) if ep.is_unbound() => SockOwner::UNBOUND,
        Some(ep) => ep.endpoint_id,
    }
}

/// The calling process's pod address of `family` (zeros when it has none or is no pod), for
/// drop events of a connect that has no local address yet.
#[inline(always)]
pub fn current_pod_addr(ctx: &SockAddrContext, family: u8) -> [u32; 4] {
    current_endpoint(ctx).map_or([0; 4], |ep| pod_addr(&ep, family))
}

#[inline(always)]
fn pod_addr(ep: &EndpointInfo, family: u8) -> [u32; 4] {
    match Family::of(family) {
        Family::V4 => [ep.ip4, 0, 0, 0],
        Family::V6 => ep.ip6,
    }
}

/// The pod of the packet's socket (cgroup_skb).
#[inline(always)]
fn skb_endpoint(ctx: &SkBuffContext) -> Option<EndpointInfo> {
    endpoint_by(
        // SAFETY: the program's context; the helper reads the socket's cgroup only.
        |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level) },
        || ctx.netns_cookie(),
    )
}

/// Why `ep` denies what its policy does not allow.
#[inline(always)]
fn denial(ep: &EndpointInfo) -> DropReason {
    if ep.is_unbound() {
        DropReason::Unbound
    } else {
        DropReason::PolicyDenied
    }
}

/// The `IP_*` flags of an address (none for an address the ipcache does not hold).
#[inline(always)]
pub fn ip_flags(family: u8, addr: &[u32; 4]) -> u32 {
    ipcache(family, addr).flags
}

#[inline(always)]
fn ipcache(family: u8, addr: &[u32; 4]) -> IpcacheValue {
    let key = Key::new(
        IPCACHE_PREFIX_FAMILY + Family::of(family).bits(),
        IpcacheData {
            family: u32::from(family),
            addr: *addr,
        },
    );
    match IPCACHE.get(&key) {
        Some(v) => *v,
        None => IpcacheValue {
            identity: IDENTITY_WORLD,
            ..IpcacheValue::default()
        },
    }
}

#[inline(always)]
fn lookup(
    ep: &EndpointInfo,
    identity: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<u32> {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyData {
            policy_set: ep.policy_set,
            identity,
            direction: direction as u8,
            protocol,
            port,
        },
    );
    POLICY.get(&key).map(|v| v.flags)
}

fn is_loopback(family: u8, addr: &[u32; 4]) -> bool {
    match Family::of(family) {
        // 127.0.0.0/8: the first byte in network order is the low byte of the word.
        Family::V4 => addr[0] & 0xff == 127,
        Family::V6 => {
            addr[0] == 0
                && addr[1] == 0
                && addr[2] == 0
                && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
        }
    }
}

/// Judges traffic of pod `ep` with peer `peer` in `direction` (the pod is isolated in it).
#[inline(always)]
fn judge(
    ep: &EndpointInfo,
    direction: Direction,
    family: u8,
    peer: &[u32; 4],
    protocol: u8,
    port: u16,
) -> Match {
    if is_loopback(family, peer) {
        return Match::Host;
    }
    // A pod reaching itself always passes (not through an address another pod claims too).
    if ep.flags & EP_SHARED_ADDRESS == 0 && ep.owns(family, peer) {
        return Match::Host;
    }
    // Traffic from the pod's node is always allowed, as Kubernetes requires (kubelet probes,
    // host-network peers). Traffic to it is judged like any address: otherwise a NodePort or
    // hostPort on the node would lead an egress-isolated pod anywhere.
    let remote = ipcache(family, peer);
    if direction == Direction::Ingress && remote.flags & IP_HOST != 0 {
        return Match::Host;
    }
    if let Some(flags) = lookup(ep, remote.identity, direction, protocol, port) {
        return if flags & POL_ANY_PORT != 0 {
            Match::L3Only
        } else {
            Match::L3L4
        };
    }
    match lookup(ep, IDENTITY_ANY, direction, protocol, port) {
        Some(flags) if flags & POL_ANY_PORT != 0 => Match::All,
        Some(_) => Match::L4Only,
        None => Match::None,
    }
}

/// The `EndpointInfo::flags` bit of isolation in `direction`.
#[inline(always)]
fn isolation(direction: Direction) -> u32 {
    match direction {
        Direction::Ingress => EP_INGRESS_ISOLATED,
        Direction::Egress => EP_EGRESS_ISOLATED,
    }
}

#[inline(always)]
fn count(direction: Direction, m: Match) {
    if let Some(slot) = VERDICTS.get_ptr_mut(verdict_index(direction, m)) {
        stats::add(slot, 1);
    }
}

/// connect4/6, after service translation: judges TCP and UDP egress of pod `ep` (the caller's,
/// None: no pod) to `dst:port` (the backend, when translated). Returns false to fail the
/// connect with EPERM.
#[inline(always)]
pub fn connect_as(
    ctx: &SockAddrContext,
    ep: Option<EndpointInfo>,
    protocol: u8,
    family: u8,
    dst: &[u32; 4],
    port: u16,
) -> bool {
    let Some(ep) = ep else {
        return true;
    };
    if ep.flags & EP_EGRESS_ISOLATED != 0 {
        let m = judge(&ep, Direction::Egress, family, dst, protocol, port);
        count(Direction::Egress, m);
        if m == Match::None {
            DropEvent {
                cookie: ctx.cookie(),
                family,
                local: pod_addr(&ep, family),
                local_port: 0,
                remote: *dst,
                remote_port: port,
                protocol,
                reason: denial(&ep),
                direction: Direction::Egress,
            }
            .report();
            return false;
        }
    }
    // Replies pass the pod's ingress by this entry; only an ingress-isolated pod needs it.
    if protocol == IPPROTO_UDP && ep.flags & EP_INGRESS_ISOLATED != 0 {
        flows::remember(
            ctx,
            ep.endpoint_id,
            &flows::peer(family, dst, port, protocol),
        );
    }
    true
}

/// ICMP in a pod's cgroup: only raw and ping sockets send or receive it here (the kernel
/// answers pings and handles errors for its own sockets without running the hook), so
/// nothing passes unjudged. An echo reply passes as part of an allowed echo exchange (its
/// identifier stands for the port); everything else is judged like any portless protocol.
#[inline(always)]
fn icmp(ctx: &SkBuffContext, h: &Headers, direction: Direction, peer: &[u32; 4]) -> bool {
    let key = flows::peer(h.version, peer, h.sport, h.protocol);
    let echo = is_echo(h.protocol, h.icmp_type);
    let request = echo && matches!(h.icmp_type, 8 | 128);
    if echo && !request && direction == Direction::Ingress && flows::known(ctx, &key) {
        return true;
    }
    let remember = (request && direction == Direction::Egress).then_some(&key);
    decide(ctx, h, direction, peer, 0, remember)
}

/// cgroup_skb: the verdict for a packet (true = pass). `ingress`: received by the pod.
#[inline(always)]
pub fn packet(ctx: &SkBuffContext, h: &Headers, direction: Direction) -> bool {
    if h.later_fragment {
        return unjudgeable(ctx, direction, DropReason::Fragment);
    }
    let ingress = direction == Direction::Ingress;
    let (peer, peer_port, port) = if ingress {
        (&h.src, h.sport, h.dport)
    } else {
        (&h.dst, h.dport, h.dport)
    };
    match h.protocol {
        IPPROTO_TCP => {
            // Raw sockets (CAP_NET_RAW) craft TCP without connect() or a listener: every
            // packet is judged.
            if !tcp_stack_socket(ctx) {
                return decide(ctx, h, direction, peer, port, None);
            }
            // Egress was judged at connect; ingress only at a listener.
            if !ingress || !to_listener(ctx) {
                return true;
            }
            decide(ctx, h, direction, peer, port, None)
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let key = flows::peer(h.version, peer, peer_port, h.protocol);
            if flows::known(ctx, &key) {
                return true;
            }
            decide(ctx, h, direction, peer, port, Some(&key))
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => icmp(ctx, h, direction, peer),
        _ => decide(ctx, h, direction, peer, 0, None),
    }
}

/// Judges a packet that starts something (or is not part of anything known); `flow`: remember
/// it when allowed.
#[inline(always)]
fn decide(
    ctx: &SkBuffContext,
    h: &Headers,
    direction: Direction,
    peer: &[u32; 4],
    port: u16,
    flow: Option<&FlowPeer>,
) -> bool {
    let Some(ep) = skb_endpoint(ctx) else {
        return true;
    };
    // Checked here, where the endpoint is at hand: a packet of a known flow goes to a peer
    // the pod may reach anyway, and plants nothing.
    if direction == Direction::Egress && ep.flags & EP_EGRESS_ISOLATED != 0 && spoofed(&ep, h) {
        count(direction, Match::None);
        DropEvent::unaddressed(ctx.cookie(), DropReason::SpoofedSource, direction).report();
        return false;
    }
    // Not a NetworkPolicy verdict: reported by its own reason, not counted in `VERDICTS`.
    if refused_plaintext(ctx, h, direction, &ep) {
        skb_dropped(ctx, h, direction, DropReason::Authorization);
        return false;
    }
    if ep.flags & isolation(direction) != 0 {
        let m = judge(&ep, direction, h.version, peer, h.protocol, port);
        count(direction, m);
        if m == Match::None {
            skb_dropped(ctx, h, direction, denial(&ep));
            return false;
        }
    }
    // Replies of the exchange pass the other direction by this entry; only a pod isolated in
    // that direction needs it (no storage for the rest).
    if let Some(key) = flow
        && ep.flags & isolation(direction.opposite()) != 0
    {
        flows::remember(ctx, owner_of(Some(ep)), key);
    }
    true
}

/// Whether a TCP packet to the pod's listener is a plaintext connection its security policy
/// refuses (`EP_AUTHZ`): not delivered by the node's proxy (whose delivery socket, in the
/// pod's own namespace, marks it; a mark never crosses namespaces), not the pod reaching
/// itself, not from the node (kubelet probes: Istio's ambient mode exempts what the node's
/// own sockets send to its pods, as NetworkPolicy does; a packet from elsewhere claiming a
/// node address gets its SYN-ACK sent to the node, so no handshake completes), and not
/// allowed by the pod's plaintext table.
#[inline(always)]
fn refused_plaintext(
    ctx: &SkBuffContext,
    h: &Headers,
    direction: Direction,
    ep: &EndpointInfo,
) -> bool {
    direction == Direction::Ingress
        && h.protocol == IPPROTO_TCP
        && ep.flags & EP_AUTHZ != 0
        && ctx_read!(ctx.skb.skb, mark) != DELIVERY_MARK
        && !(ep.flags & EP_SHARED_ADDRESS == 0 && ep.owns(h.version, &h.src))
        && !is_loopback(h.version, &h.src)
        && ip_flags(h.version, &h.src) & IP_HOST == 0
        && !plaintext_allowed(ep, h)
}

/// Whether the pod's plaintext table allows plaintext from the packet's source to its
/// destination port: the port's own entries when the table names it, else the other ports'.
/// No entry (table 0, a family the table lacks) refuses.
#[inline(always)]
fn plaintext_allowed(ep: &EndpointInfo, h: &Headers) -> bool {
    let key = |port: u32| {
        Key::new(
            PLAINTEXT_PREFIX_FIXED + Family::of(h.version).bits(),
            PlaintextData {
                table: ep.authz_table,
                port,
                family: u32::from(h.version),
                addr: h.src,
            },
        )
    };
    let named = AUTHZ.get(key(PLAINTEXT_PORT | u32::from(u16::from_be(h.dport))));
    let found = match named {
        Some(v) => Some(v),
        None => AUTHZ.get(key(PLAINTEXT_OTHER_PORTS)),
    };
    found.is_some_and(|v| v.flags & PLAINTEXT_ALLOW != 0)
}

/// A packet weft could not parse (IPv6 with too many or too long extension headers, or
/// truncated): passes only when the pod is not isolated in that direction (fail closed).
#[inline(always)]
pub fn unparsed(ctx: &SkBuffContext, direction: Direction) -> bool {
    unjudgeable(ctx, direction, DropReason::Unparsed)
}

/// Whether an egress-isolated pod sends from an address not its own (loopback aside). Raw
/// sockets and IP_FREEBIND can; a packet looped back to the pod with a forged source would
/// otherwise leave a reply path (`SOCK_FLOWS`) to a peer its policy does not allow. Unknown
/// while the pod has no address of the family yet.
#[inline(always)]
fn spoofed(ep: &EndpointInfo, h: &Headers) -> bool {
    let known = match Family::of(h.version) {
        Family::V4 => ep.ip4 != 0,
        Family::V6 => ep.ip6 != [0; 4],
    };
    known && !ep.owns(h.version, &h.src) && !is_loopback(h.version, &h.src)
}

/// What cannot be judged passes only a pod not isolated in that direction. Non-first
/// fragments: the kernel fragments its sockets' datagrams after the egress hook and
/// reassembles before the ingress one, so only a raw socket shows one here.
#[inline(always)]
fn unjudgeable(ctx: &SkBuffContext, direction: Direction, reason: DropReason) -> bool {
    let Some(ep) = skb_endpoint(ctx) else {
        return true;
    };
    if ep.flags & isolation(direction) != 0 {
        count(direction, Match::None);
        DropEvent::unaddressed(ctx.cookie(), reason, direction).report();
        return false;
    }
    // It may be a plaintext SYN (IPv6 extension headers past what is parsed): a pod whose
    // security policy refuses plaintext takes only what the proxy delivered.
    if direction == Direction::Ingress
        && ep.flags & EP_AUTHZ != 0
        && ctx_read!(ctx.skb.skb, mark) != DELIVERY_MARK
    {
        DropEvent::unaddressed(ctx.cookie(), reason, direction).report();
        return false;
    }
    true
}

/// Reports a dropped packet, seen from the pod: its side is the destination for ingress.
#[inline(always)]
pub fn skb_dropped(ctx: &SkBuffContext, h: &Headers, direction: Direction, reason: DropReason) {
    let ((local, local_port), (remote, remote_port)) = match direction {
        Direction::Ingress => ((h.dst, h.dport), (h.src, h.sport)),
        Direction::Egress => ((h.src, h.sport), (h.dst, h.dport)),
    };
    DropEvent {
        cookie: ctx.cookie(),
        family: h.version,
        local,
        local_port,
        remote,
        remote_port,
        protocol: h.protocol,
        reason,
        direction,
    }
    .report();
}

/// The common case, decided from the socket before any parsing: TCP of a TCP socket passes
/// (egress was judged at connect, ingress is judged only at a listener, and sock_ops counts
/// it). Some(full socket): it passes; None: parse and decide normally.
#[inline(always)]
pub fn tcp_passes(ctx: &SkBuffContext, direction: Direction) -> Option<*mut bpf_sock> {
    let sk = ctx_read!(ctx.skb.skb, __bindgen_anon_2.sk);
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper only checks whether `sk` is a full socket.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    // SAFETY: a full socket's `type`, `protocol` and `state` are readable.
    let (kind, protocol, state) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*full).type_),
            core::ptr::read_volatile(&raw const (*full).protocol),
            core::ptr::read_volatile(&raw const (*full).state),
        )
    };
    (kind == SOCK_STREAM
        && protocol == u32::from(IPPROTO_TCP)
        && (direction == Direction::Egress || state != TCP_LISTEN))
        .then_some(full)
}

/// Whether the packet belongs to the kernel's TCP stack (a TCP socket, or its request or
/// time-wait mini socket) rather than a raw socket.
#[inline(always)]
fn tcp_stack_socket(ctx: &SkBuffContext) -> bool {
    let sk = ctx_read!(ctx.skb.skb, __bindgen_anon_2.sk);
    if sk.is_null() {
        return true;
    }
    // SAFETY: the helper only checks whether `sk` is a full socket.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // Request and time-wait sockets exist only in the TCP stack.
        return true;
    }
    // SAFETY: a full socket's `type` is readable.
    unsafe { core::ptr::read_volatile(&raw const (*full).type_) == SOCK_STREAM }
}

/// Whether the packet is delivered to a listening TCP socket (a SYN, or the last ACK of a
/// handshake): the start of an incoming connection.
#[inline(always)]
fn to_listener(ctx: &SkBuffContext) -> bool {
    let sk = ctx_read!(ctx.skb.skb, __bindgen_anon_2.sk);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null skb->sk is a socket the verifier lets us read `state` of.
    unsafe { core::ptr::read_volatile(&raw const (*sk).state) == TCP_LISTEN }
}
