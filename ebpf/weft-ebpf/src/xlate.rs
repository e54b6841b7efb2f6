//! A socket's ClusterIP translations (`SOCK_XLATE`), as the programs that only read them see
//! them: the sock_addr hooks write them (`service`).
use aya_ebpf::bindings::bpf_sock;
use weft_abi::svc::{Endpoint, XLATE_CAPTURED, XLATE_CONNECTED, XLATE_USED, Xlate};

use crate::{maps::SOCK_XLATE, storage};

/// The slot of connect's translation; the others hold unconnected UDP's.
pub const CONNECTED_SLOT: usize = 0;

/// `TCP_ESTABLISHED`: also the state of a connected UDP socket.
const ESTABLISHED: u32 = 1;

/// The translation connect made for socket `sk`, if it still stands (the socket is still
/// connected: a connect to AF_UNSPEC runs no hook, but leaves the socket unconnected).
#[inline(always)]
pub fn connected(sk: *mut bpf_sock) -> Option<Xlate> {
    // SAFETY: `sk` is a full socket; its `state` is readable.
    if unsafe { core::ptr::read_volatile(&raw const (*sk).state) } != ESTABLISHED {
        return None;
    }
    let x = storage::get(&SOCK_XLATE, sk, false)?;
    // SAFETY: the socket's storage, copied out; a connect racing on another thread can only
    // make what this copy says stale.
    let t = unsafe { (*x).slots.get(CONNECTED_SLOT) }.copied()?;
    (t.flags & XLATE_CONNECTED != 0).then_some(t)
}

/// Connect's translation of socket `sk`, whatever its state (a closing socket's included).
#[inline(always)]
pub fn connect_slot(sk: *mut bpf_sock) -> Option<Xlate> {
    let x = storage::get(&SOCK_XLATE, sk, false)?;
    // SAFETY: the socket's storage, copied out.
    let t = unsafe { (*x).slots.get(CONNECTED_SLOT) }.copied()?;
    (t.flags & XLATE_CONNECTED != 0).then_some(t)
}

/// The frontend socket `sk` asked for when it reaches `backend` through a ClusterIP (connect's
/// translation first), or when it was captured for the mesh and `backend` is the outbound
/// listener.
#[inline(always)]
pub fn frontend_of(sk: *mut bpf_sock, backend: &Endpoint) -> Option<Endpoint> {
    let x = storage::get(&SOCK_XLATE, sk, false)?;
    // SAFETY: the socket's storage; slots are compared in place and the match copied out.
    let slots = unsafe { &(*x).slots };
    // Connect's slot answers for the listener a captured socket is connected to; the search
    // over the slots stays as it was (its shape is one the verifier follows).
    if let Some(t) = slots.get(CONNECTED_SLOT)
        && t.flags & XLATE_CAPTURED != 0
        && crate::mesh::is_listener(backend)
    {
        return Some(Endpoint {
            addr: t.frontend.addr,
            port: t.frontend.port,
            family: t.frontend.family,
            _pad: 0,
        });
    }
    let t = slots
        .iter()
        .find(|t| t.flags & XLATE_USED != 0 && t.backend == *backend)?;
    Some(Endpoint {
        addr: t.frontend.addr,
        port: t.frontend.port,
        family: t.frontend.family,
        _pad: 0,
    })
}
