//! What the kernel reports, decoded: connection and drop events from the `CONN_EVENTS` ring
//! buffer ([`reader`]), UDP flow counters ([`udp`]) and whether a connection is still tracked
//! ([`tracked`]).
//!
//! The sock_ops program writes one `ConnEvent` when a TCP connection reaches ESTABLISHED, one
//! per update interval while it moves data, and one when its socket closes; the policy and
//! service programs write drops. This module turns them into [`Connection`] records (and logs
//! each at debug level, target `weft::conn`). weft creates no conntrack entries: these are
//! events about sockets.
pub mod reader;
pub mod tracked;
pub mod udp;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use serde::Serialize;
use weft_abi::{
    AF_INET, AF_INET6,
    conn::{ConnEvent, ConnEventKind, DropReason, Side, flags, tcp_state},
    net::Direction,
};

/// The event reader's flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// How often the agent drains connection events without being woken.
    #[arg(long, default_value = "100ms", value_parser = crate::parse_positive_duration)]
    pub events_poll_interval: Duration,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection event of {len} bytes is shorter than the {expected} bytes of ConnEvent")]
    Truncated { len: usize, expected: usize },
    #[error("connection event has unknown {field} {value}")]
    Unknown { field: &'static str, value: u32 },
    #[error("cannot read the connection ring buffer")]
    Io(#[source] std::io::Error),
    #[error("cannot read kernel map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both FINs exchanged (or ours acknowledged before the application let go).
    Normal,
    /// Closed without the FIN handshake completing: a reset or an abort.
    Reset,
    /// Never established, and not for lack of an answer: a reset (or an ICMP error) answered
    /// the handshake.
    Refused,
    /// The kernel gave up retransmitting (the handshake or data went unanswered).
    Timeout,
}

impl Outcome {
    pub const ALL: [Self; 4] = [Self::Normal, Self::Reset, Self::Refused, Self::Timeout];

    /// Classifies a close from the state the socket left and the FIN and timeout bits.
    pub fn classify(last_state: u32, event_flags: u32) -> Self {
        if event_flags & flags::TIMED_OUT != 0 {
            return Self::Timeout;
        }
        match last_state {
            tcp_state::SYN_SENT | tcp_state::SYN_RECV => Self::Refused,
            // FIN_WAIT2 is entered only once our FIN is acknowledged.
            tcp_state::FIN_WAIT2 => Self::Normal,
            tcp_state::CLOSING | tcp_state::LAST_ACK if event_flags & flags::FIN_ACKED != 0 => {
                Self::Normal
            }
            _ => Self::Reset,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Reset => "reset",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
        }
    }
}

/// Which end of the connection the observed socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It called connect().
    Client,
    /// It was accepted from a listener.
    Server,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// What a drop event adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DropInfo {
    pub reason: DropReason,
    pub direction: Direction,
    /// IP protocol number.
    pub protocol: u8,
}

/// What the kernel reported about one connection at one moment. For a drop, `local` is the
/// pod's side (its port is 0 for a refused connect) and the counters are 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub event: ConnEventKindName,
    /// The kernel's socket cookie: unique per socket while the kernel runs.
    pub cookie: u64,
    pub role: Role,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Payload bytes sent and acknowledged.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    pub srtt: Duration,
    pub rtt_min: Duration,
    pub retransmits: u32,
    pub segments_in: u32,
    pub segments_out: u32,
    pub duration: Duration,
    /// For closes only.
    pub outcome: Option<Outcome>,
    /// The ClusterIP frontend a client connected to (the remote is then the backend).
    pub service: Option<SocketAddr>,
    /// For drops only.
    pub dropped: Option<DropInfo>,
    /// The kernel captured it for the mesh (a client's socket): `mesh_netns` is its pod's
    /// network namespace (the socket itself is on loopback).
    pub meshed: bool,
    pub mesh_netns: u64,
    /// The server's end of a connection the mesh delivered from a tunnel (the kernel saw the
    /// proxy's mark on its SYN).
    pub delivered: bool,
    /// Carried by a mutually authenticated tunnel, with the ends' verified identities (the
    /// agent's mesh fills it in).
    pub security: Option<Security>,
    /// At a meshed pod's end: what its security policy decided (the agent's mesh fills it
    /// in for server opens and for refusals).
    pub authorization: Option<crate::compile::authz::Decision>,
}

/// The identities of a connection carried through the mesh (Istio's principals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Security {
    pub source_principal: std::sync::Arc<str>,
    pub destination_principal: std::sync::Arc<str>,
    #[serde(default)]
    pub transport: Transport,
}

/// How the mesh carried a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Through a mutual TLS tunnel between two nodes.
    #[default]
    Tunnel,
    /// Between two meshed pods of one node, which it never leaves: no tunnel and no TLS; the
    /// agent names both ends.
    Local,
}

/// `ConnEventKind` as it appears in records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnEventKindName {
    TcpOpen,
    TcpClose,
    /// Counters so far of a connection still open.
    TcpUpdate,
    Drop,
    /// Health checking ejected a backend (`remote`) from a Service port (`service`) for
    /// `duration`; not a connection.
    Ejection,
}

/// A drop event's direction. Programs of weft 0.1.0 numbered it egress 1, ingress 2; a
/// pinned ring buffer may still hold their events when a new agent starts, so 2 is read as
/// ingress too (programs since write `weft_abi::net::Direction`).
fn drop_direction(code: u32) -> Option<Direction> {
    match code {
        2 => Some(Direction::Ingress),
        other => Direction::from_u32(other),
    }
}

impl Connection {
    /// A drop the agent itself decided (no socket of the kernel's saw it): the pod's end
    /// `local`, the other `remote`.
    pub fn refused(local: SocketAddr, remote: SocketAddr, dropped: DropInfo) -> Self {
        let role = match dropped.direction {
            Direction::Egress => Role::Client,
            Direction::Ingress => Role::Server,
        };
        Self {
            event: ConnEventKindName::Drop,
            cookie: 0,
            role,
            local,
            remote,
            bytes_sent: 0,
            bytes_received: 0,
            srtt: Duration::ZERO,
            rtt_min: Duration::ZERO,
            retransmits: 0,
            segments_in: 0,
            segments_out: 0,
            duration: Duration::ZERO,
            outcome: None,
            service: None,
            dropped: Some(dropped),
            meshed: false,
            mesh_netns: 0,
            delivered: false,
            security: None,
            authorization: None,
        }
    }

    /// Decodes one ring buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let expected = size_of::<ConnEvent>();
        if bytes.len() < expected {
            return Err(Error::Truncated {
                len: bytes.len(),
                expected,
            });
        }
        // SAFETY: the buffer holds at least size_of::<ConnEvent>() bytes and ConnEvent is
        // plain integers (any bit pattern is valid); the read is unaligned.
        let ev: ConnEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Self::from_event(&ev)
    }

    pub fn from_event(ev: &ConnEvent) -> Result<Self, Error> {
        let unknown = |field, value| Error::Unknown { field, value };
        let kind = ConnEventKind::from_u32(ev.kind).ok_or(unknown("kind", ev.kind))?;
        let dropped = if kind == ConnEventKind::Drop {
            Some(DropInfo {
                reason: DropReason::from_u32(ev.reason).ok_or(unknown("drop reason", ev.reason))?,
                direction: drop_direction(ev.direction)
                    .ok_or(unknown("drop direction", ev.direction))?,
                protocol: ev.protocol as u8,
            })
        } else {
            None
        };
        let role = match dropped {
            Some(d) if d.direction == Direction::Egress => Role::Client,
            Some(_) => Role::Server,
            None => match Side::from_u32(ev.side).ok_or(unknown("side", ev.side))? {
                Side::Active => Role::Client,
                Side::Passive => Role::Server,
            },
        };
        let ip = |words: &[u32; 4]| -> Result<IpAddr, Error> {
            match ev.family {
                AF_INET => Ok(IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))),
                AF_INET6 => {
                    let mut b = [0u8; 16];
                    for (chunk, w) in b.chunks_exact_mut(4).zip(words) {
                        chunk.copy_from_slice(&w.to_ne_bytes());
                    }
                    // A dual-stack socket talking IPv4 holds ::ffff:a.b.c.d: report a.b.c.d.
                    let v6 = Ipv6Addr::from(b);
                    Ok(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
                }
                other => Err(unknown("family", other)),
            }
        };
        let port = |p: u32| p as u16;
        let (event, outcome) = match kind {
            ConnEventKind::Open => (ConnEventKindName::TcpOpen, None),
            ConnEventKind::Update => (ConnEventKindName::TcpUpdate, None),
            ConnEventKind::Drop => (ConnEventKindName::Drop, None),
            ConnEventKind::Ejection => (ConnEventKindName::Ejection, None),
            ConnEventKind::Close => (
                ConnEventKindName::TcpClose,
                Some(Outcome::classify(ev.last_state, ev.flags)),
            ),
        };
        let service = if ev.flags & flags::VIA_SERVICE != 0 {
            Some(SocketAddr::new(
                ip(&ev.service_addr)?,
                port(ev.service_port),
            ))
        } else {
            None
        };
        Ok(Self {
            event,
            cookie: ev.cookie,
            role,
            local: SocketAddr::new(ip(&ev.local_addr)?, port(ev.local_port)),
            remote: SocketAddr::new(ip(&ev.remote_addr)?, port(ev.remote_port)),
            bytes_sent: ev.bytes_sent,
            bytes_received: ev.bytes_received,
            srtt: Duration::from_micros(u64::from(ev.srtt_us)),
            rtt_min: Duration::from_micros(u64::from(ev.rtt_min_us)),
            retransmits: ev.total_retrans,
            segments_in: ev.segs_in,
            segments_out: ev.segs_out,
            duration: Duration::from_nanos(ev.duration_ns),
            outcome,
            service,
            dropped,
            meshed: ev.flags & flags::MESHED != 0,
            mesh_netns: ev.netns_cookie,
            delivered: ev.flags & flags::DELIVERED != 0,
            security: None,
            authorization: None,
        })
    }

    /// Reports the record as one structured log event, at debug level: flows and metrics
    /// carry every connection, and a log line per connection costs more than the rest of its
    /// handling (`--log-level info,weft::conn=debug` shows them).
    pub fn log(&self) {
        if !tracing::enabled!(target: "weft::conn", tracing::Level::DEBUG) {
            return;
        }
        let local = self.local.to_string();
        let remote = self.remote.to_string();
        let srtt_us = self.srtt.as_micros() as u64;
        let duration_us = self.duration.as_micros() as u64;
        match self.event {
            ConnEventKindName::TcpOpen => tracing::debug!(
                target: "weft::conn",
                event = "tcp_open",
                cookie = self.cookie,
                role = self.role.as_str(),
                local = local.as_str(),
                remote = remote.as_str(),
                srtt_us,
                "tcp connection opened"
            ),
            ConnEventKindName::TcpClose => tracing::debug!(
                target: "weft::conn",
                event = "tcp_close",
                cookie = self.cookie,
                role = self.role.as_str(),
                local = local.as_str(),
                remote = remote.as_str(),
                bytes_sent = self.bytes_sent,
                bytes_received = self.bytes_received,
                srtt_us,
                rtt_min_us = self.rtt_min.as_micros() as u64,
                retransmits = self.retransmits,
                segments_in = self.segments_in,
                segments_out = self.segments_out,
                duration_us,
                outcome = self.outcome.map_or("unknown", Outcome::as_str),
                service = self.service.map(|s| s.to_string()),
                "tcp connection closed"
            ),
            ConnEventKindName::TcpUpdate => tracing::debug!(
                target: "weft::conn",
                event = "tcp_update",
                cookie = self.cookie,
                role = self.role.as_str(),
                local = local.as_str(),
                remote = remote.as_str(),
                bytes_sent = self.bytes_sent,
                bytes_received = self.bytes_received,
                srtt_us,
                retransmits = self.retransmits,
                duration_us,
                "tcp connection counters"
            ),
            ConnEventKindName::Drop => {
                let d = self.dropped.as_ref();
                tracing::debug!(
                    target: "weft::conn",
                    event = "drop",
                    cookie = self.cookie,
                    local = local.as_str(),
                    remote = remote.as_str(),
                    reason = d.map_or("unknown", |d| d.reason.as_str()),
                    direction = d.map_or("unknown", |d| d.direction.as_str()),
                    protocol = d.map_or(0, |d| d.protocol),
                    "dropped"
                );
            }
            ConnEventKindName::Ejection => tracing::debug!(
                target: "weft::conn",
                event = "ejection",
                backend = remote.as_str(),
                service = self.service.map(|s| s.to_string()),
                ejected_ms = self.duration.as_millis() as u64,
                "backend ejected by health checking"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ConnEvent {
        ConnEvent {
            kind: ConnEventKind::Close as u32,
            family: AF_INET,
            cookie: 42,
            timestamp_ns: 10,
            duration_ns: 1_500_000,
            local_addr: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            remote_addr: [u32::from_ne_bytes([10, 0, 0, 3]), 0, 0, 0],
            local_port: 40_000,
            remote_port: 80,
            side: Side::Active as u32,
            last_state: tcp_state::FIN_WAIT2,
            bytes_sent: 5_000_000_000,
            bytes_received: 7,
            srtt_us: 120,
            rtt_min_us: 80,
            total_retrans: 1,
            segs_in: 3,
            segs_out: 4,
            flags: flags::FIN_SENT | flags::FIN_ACKED | flags::FIN_RECEIVED,
            ..ConnEvent::default()
        }
    }

    fn bytes(ev: &ConnEvent) -> Vec<u8> {
        // SAFETY: ConnEvent is plain integers without padding; we read exactly its bytes.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), size_of::<ConnEvent>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_close_with_u64_counters() {
        let c = Connection::decode(&bytes(&event())).expect("decodes");
        assert_eq!(c.local, "10.0.0.2:40000".parse().expect("addr"));
        assert_eq!(c.remote, "10.0.0.3:80".parse().expect("addr"));
        assert_eq!(c.bytes_sent, 5_000_000_000, "counters are 64-bit");
        assert_eq!(c.role, Role::Client);
        assert_eq!(c.outcome, Some(Outcome::Normal));
        assert_eq!(c.srtt, Duration::from_micros(120));
        assert_eq!(c.duration, Duration::from_micros(1500));
    }

    #[test]
    fn decodes_ipv6() {
        let mut ev = event();
        ev.family = AF_INET6;
        let addr: Ipv6Addr = "fd00::1:2".parse().expect("addr");
        let o = addr.octets();
        for (i, w) in ev.local_addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        let c = Connection::decode(&bytes(&ev)).expect("decodes");
        assert_eq!(c.local.ip(), IpAddr::V6(addr));
    }

    #[test]
    fn ipv4_mapped_addresses_are_reported_as_ipv4() {
        let mut ev = event();
        ev.family = AF_INET6;
        let o = "::ffff:10.0.0.11"
            .parse::<Ipv6Addr>()
            .expect("addr")
            .octets();
        for (i, w) in ev.local_addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
        }
        let c = Connection::decode(&bytes(&ev)).expect("decodes");
        assert_eq!(c.local, "10.0.0.11:40000".parse().expect("addr"));
    }

    #[test]
    fn drop_directions_of_this_and_the_previous_numbering_decode() {
        let drop = |direction: u32| {
            let mut ev = event();
            ev.kind = ConnEventKind::Drop as u32;
            ev.reason = DropReason::PolicyDenied as u32;
            ev.direction = direction;
            Connection::decode(&bytes(&ev)).map(|c| c.dropped.map(|d| d.direction))
        };
        assert_eq!(
            drop(Direction::Ingress as u32).ok(),
            Some(Some(Direction::Ingress))
        );
        assert_eq!(
            drop(Direction::Egress as u32).ok(),
            Some(Some(Direction::Egress))
        );
        assert_eq!(
            drop(2).ok(),
            Some(Some(Direction::Ingress)),
            "weft 0.1.0's ingress"
        );
        assert!(matches!(
            drop(3),
            Err(Error::Unknown {
                field: "drop direction",
                value: 3
            })
        ));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let b = bytes(&event());
        assert!(matches!(
            Connection::decode(&b[..b.len() - 1]),
            Err(Error::Truncated { .. })
        ));
        let mut ev = event();
        ev.kind = 9;
        assert!(matches!(
            Connection::decode(&bytes(&ev)),
            Err(Error::Unknown { field: "kind", .. })
        ));
        let mut ev = event();
        ev.family = 1;
        assert!(matches!(
            Connection::decode(&bytes(&ev)),
            Err(Error::Unknown {
                field: "family",
                ..
            })
        ));
    }

    #[test]
    fn outcomes() {
        use tcp_state::*;
        assert_eq!(Outcome::classify(SYN_SENT, 0), Outcome::Refused);
        assert_eq!(
            Outcome::classify(SYN_SENT, flags::TIMED_OUT),
            Outcome::Timeout
        );
        assert_eq!(
            Outcome::classify(ESTABLISHED, flags::TIMED_OUT),
            Outcome::Timeout
        );
        assert_eq!(
            Outcome::classify(FIN_WAIT2, flags::FIN_SENT),
            Outcome::Normal
        );
        assert_eq!(
            Outcome::classify(LAST_ACK, flags::FIN_SENT | flags::FIN_ACKED),
            Outcome::Normal
        );
        assert_eq!(Outcome::classify(LAST_ACK, flags::FIN_SENT), Outcome::Reset);
        assert_eq!(Outcome::classify(ESTABLISHED, 0), Outcome::Reset);
        assert_eq!(
            Outcome::classify(CLOSE_WAIT, flags::FIN_RECEIVED),
            Outcome::Reset
        );
    }
}
