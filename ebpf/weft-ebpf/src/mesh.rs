//! Capture for the mesh (see `weft_abi::mesh`): a meshed pod's TCP connect to a meshed pod of
//! another node goes to the node's outbound listener in the pod's own network namespace; the
//! agent carries it through a mutually authenticated tunnel. So does one to a meshed pod of
//! this node whose security policy depends on its callers' identities; the agent decides on
//! the caller's and delivers it on the node. Decided here, at connect time, from the pod's
//! `EP_MESHED` and the destination's `IP_MESHED_REMOTE` or `IP_MESHED_LOCAL`: connections to
//! anything else never reach user space.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_STATE_CB_FLAG, helpers::generated::bpf_get_netns_cookie,
    programs::SockOpsContext,
};
use weft_abi::{
    conn::{ConnEvent, flags},
    mesh::{MeshOrig, MeshOrigKey, OUTBOUND_PORT},
    net::Family,
    policy::{EP_MESHED, EndpointInfo, IP_MESHED_LOCAL, IP_MESHED_REMOTE},
    stats::Counter,
    svc::{Endpoint, XLATE_CAPTURED, XLATE_DIRECT, Xlate},
};

use crate::{ctx::SocketCookie as _, maps::MESH_ORIG, policy, stats, storage::Socket as _, xlate};

/// `127.0.0.1` in network byte order, as the address words hold it.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1`.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Whether pod `ep`'s TCP connect to `target` is carried by the mesh.
#[inline(always)]
pub fn captures(ep: Option<&EndpointInfo>, target: &Endpoint) -> bool {
    let Some(ep) = ep else {
        return false;
    };
    if ep.flags & EP_MESHED == 0 {
        return false;
    }
    let to = policy::ip_flags(target.family, &target.addr);
    // A pod reaching itself is not a caller to decide on.
    to & IP_MESHED_REMOTE != 0
        || (to & IP_MESHED_LOCAL != 0 && !ep.owns(target.family, &target.addr))
}

/// The outbound listener for a target of `family`: loopback, [`OUTBOUND_PORT`].
#[inline(always)]
pub fn listener(family: u8) -> Endpoint {
    let addr = match Family::of(family) {
        Family::V4 => [LOOPBACK4, 0, 0, 0],
        Family::V6 => LOOPBACK6,
    };
    Endpoint {
        addr,
        port: OUTBOUND_PORT.to_be(),
        family,
        _pad: 0,
    }
}

/// Whether `peer` is the outbound listener (what a captured socket is connected to).
#[inline(always)]
pub fn is_listener(peer: &Endpoint) -> bool {
    is_listener_at(peer.family, &peer.addr, peer.port)
}

/// [`is_listener`] of an address and a port (network byte order) held apart.
#[inline(always)]
pub fn is_listener_at(family: u8, addr: &[u32; 4], port_be: u16) -> bool {
    if port_be != OUTBOUND_PORT.to_be() {
        return false;
    }
    match Family::of(family) {
        Family::V4 => addr[0] == LOOPBACK4,
        Family::V6 => *addr == LOOPBACK6,
    }
}

/// The translation flags of a captured connect: through a Service or to the pod directly.
#[inline(always)]
pub const fn flags(direct: bool) -> u32 {
    if direct {
        XLATE_CAPTURED | XLATE_DIRECT
    } else {
        XLATE_CAPTURED
    }
}

/// sock_ops, an active connection established: if it was captured, tells the agent where it
/// was going, under the (netns, port) its accepted socket sees as the peer. Not inlined: its
/// values would add to on_established's stack, which emit's is stacked on.
#[inline(never)]
pub fn established(ctx: &SockOpsContext, local_port: u32, remote: &Endpoint) {
    let Some(t) = ctx.socket().and_then(captured) else {
        return;
    };
    if !is_listener(remote) {
        return;
    }
    let key = orig_key(ctx, local_port, remote.family);
    let orig = MeshOrig {
        target: t.backend,
        dialled: Endpoint {
            addr: t.frontend.addr,
            port: t.frontend.port,
            family: t.frontend.family,
            _pad: 0,
        },
        cookie: ctx.cookie(),
    };
    // Its close must take the entry out even when the connection is not tracked (the state
    // callbacks are otherwise asked for by tracking only).
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        stats::bump(Counter::CallbackFlagsFailed);
    }
    if MESH_ORIG.insert(key, orig, 0).is_err() {
        // The agent finds no origin and closes the connection: refused, never plaintext.
        stats::bump(Counter::MeshCaptureFailed);
    }
}

/// The `MESH_ORIG` key of a captured socket: its namespace and port.
#[inline(always)]
fn orig_key(ctx: &SockOpsContext, local_port: u32, family: u8) -> MeshOrigKey {
    MeshOrigKey {
        // SAFETY: the program's context; the helper reads the socket's namespace only.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast::<c_void>()) },
        port: local_port as u16,
        family,
        _pad: [0; 5],
    }
}

/// sock_ops, a socket closing: an origin the agent never took goes (a client that gave up
/// before the agent accepted), so that no later connection of the port finds it.
/// Runs for every captured socket, tracked or not (`established` asks for its state
/// callbacks). Reads the socket's ends itself: its values stay off the caller's stack.
#[inline(never)]
pub fn closed(ctx: &SockOpsContext) {
    let remote = crate::sockops::remote_endpoint(ctx);
    if !is_listener(&remote) || ctx.socket().and_then(captured).is_none() {
        return;
    }
    let local_port = ctx_read!(ctx.ops, local_port);
    let _ = MESH_ORIG.remove(orig_key(ctx, local_port, remote.family));
}

/// The translation of a captured socket, whatever its state.
#[inline(always)]
pub fn captured(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<Xlate> {
    xlate::connect_slot(sk).filter(|t| t.flags & XLATE_CAPTURED != 0)
}

/// A captured connection's event describes where it goes, not the listener: the target as
/// the remote end, the Service (if any) it was dialled through, [`flags::MESHED`], and the
/// namespace whose pod the loopback address stands for.
#[inline(always)]
pub fn describe(ctx: &SockOpsContext, ev: &mut ConnEvent, t: &Xlate) {
    // SAFETY: the program's context; the helper reads the socket's namespace only.
    ev.netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast::<c_void>()) };
    ev.remote_addr = t.backend.addr;
    ev.remote_port = u32::from(u16::from_be(t.backend.port));
    ev.flags |= flags::MESHED;
    if t.flags & XLATE_DIRECT == 0 {
        ev.service_addr = t.frontend.addr;
        ev.service_port = u32::from(u16::from_be(t.frontend.port));
        ev.flags |= flags::VIA_SERVICE;
    }
}
