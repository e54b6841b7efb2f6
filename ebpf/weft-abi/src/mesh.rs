//! Capture for the mesh: what the kernel tells the agent about a captured connection.
//!
//! connect4/6 send a meshed pod's TCP connect to a meshed pod of another node to the node's
//! outbound listener instead: `127.0.0.1` (or `::1`) port [`OUTBOUND_PORT`] in the pod's own
//! network namespace, where the agent listens. The socket's translation (`SOCK_XLATE`) keeps
//! what the application dialled and where it goes; at establishment sock_ops copies that into
//! `MESH_ORIG` under the client socket's (netns, port), which the agent reads when it accepts.
use crate::svc::Endpoint;

/// The outbound listener's port (ztunnel's).
pub const OUTBOUND_PORT: u16 = 15001;
/// The tunnel port on the destination pod's address (HBONE).
pub const INBOUND_PORT: u16 = 15008;
/// The mark of the proxy's delivery sockets in a pod's namespace. `tcp_fwmark_accept` gives
/// the server's accepted socket the mark of the SYN, so sock_ops knows a delivered connection
/// ([`crate::conn::flags::DELIVERED`]); policy routing sends the replies back to the proxy.
/// A mark does not survive crossing into the namespace, so only a socket made inside it
/// carries one.
pub const DELIVERY_MARK: u32 = 0x0000_7eef;

/// Key of `MESH_ORIG`: the client socket as the agent's accepted socket sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshOrigKey {
    /// The network namespace of the client (and of the listener).
    pub netns_cookie: u64,
    /// The client socket's port, host byte order.
    pub port: u16,
    /// A [`crate::net::Family`] of the loopback address: 4 or 6.
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<MeshOrigKey>() == 16);

/// Value of `MESH_ORIG`. Writer: sock_ops. Reader: the agent (which deletes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshOrig {
    /// Where the connection goes: the destination pod's address and port.
    pub target: Endpoint,
    /// What the application dialled (a ClusterIP, or the pod address itself).
    pub dialled: Endpoint,
    /// The client socket's cookie (its connection events carry it).
    pub cookie: u64,
}
const _: () = assert!(core::mem::size_of::<MeshOrig>() == 48);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers only, explicit padding (sizes asserted).
    unsafe impl aya::Pod for MeshOrigKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MeshOrig {}
}
