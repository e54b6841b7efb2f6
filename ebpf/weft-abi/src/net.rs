//! The network vocabulary both sides share: address families, directions, and addresses as
//! the maps and events hold them.
//!
//! Map keys and values store these as plain integers (a `#[repr(C)]` type read from a map
//! must accept every bit pattern, which an enum does not); the enums give each number one
//! meaning and one place where it is decoded.
use core::net::IpAddr;

use crate::{AF_INET, AF_INET6};

/// An IP version, as map keys and values number it (`family` fields: 4 or 6). Events carry
/// the kernel's numbering instead (`AF_INET`, `AF_INET6`): see [`Family::af`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

impl Family {
    /// A map's `family` field or an IP header's version as the programs read it: 4 is IPv4,
    /// anything else IPv6 (the parsers and `sync` write only 4 and 6).
    pub const fn of(v: u8) -> Self {
        if v == Self::V4 as u8 {
            Self::V4
        } else {
            Self::V6
        }
    }

    /// A map's `family` field, strictly.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            4 => Some(Self::V4),
            6 => Some(Self::V6),
            _ => None,
        }
    }

    /// The kernel's `AF_INET` / `AF_INET6`.
    pub const fn af(self) -> u32 {
        match self {
            Self::V4 => AF_INET,
            Self::V6 => AF_INET6,
        }
    }

    /// From the kernel's `AF_INET` / `AF_INET6`.
    pub const fn from_af(af: u32) -> Option<Self> {
        match af {
            AF_INET => Some(Self::V4),
            AF_INET6 => Some(Self::V6),
            _ => None,
        }
    }

    /// Bits of an address.
    pub const fn bits(self) -> u32 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// Which way traffic goes, seen from the local pod. One numbering everywhere: `POLICY` keys,
/// `TRAFFIC` keys, `VERDICTS` slots, drop events and UDP flow initiators.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the pod: packets it receives, connections it accepts.
    Ingress = 0,
    /// From the pod: packets it sends, connections it makes.
    Egress = 1,
}

impl Direction {
    /// Both, in numbering order.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }

    /// For fields stored as u32 (events, UDP flow counters).
    pub const fn from_u32(v: u32) -> Option<Self> {
        if v > u8::MAX as u32 {
            return None;
        }
        Self::from_u8(v as u8)
    }

    /// The other way: replies of an egress flow are ingress packets.
    pub const fn opposite(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// An IP address as the maps hold it: its family and the 4 words of the address in network
/// byte order (an IPv4 address in word 0, the rest 0).
pub fn ip_words(ip: IpAddr) -> (Family, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (Family::V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (Family::V6, [w(0), w(4), w(8), w(12)])
        }
    }
}

/// The inverse of [`ip_words`], from a map's `family` field (anything but 4 is IPv6, as the
/// programs treat it).
pub fn words_ip(family: u8, words: [u32; 4]) -> IpAddr {
    if family == Family::V4 as u8 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = words[i].to_ne_bytes();
            o[4 * i] = b[0];
            o[4 * i + 1] = b[1];
            o[4 * i + 2] = b[2];
            o[4 * i + 3] = b[3];
            i += 1;
        }
        IpAddr::from(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_for_both_families() {
        for text in ["10.1.2.3", "fd00::1:2"] {
            let ip: IpAddr = text.parse().expect("address");
            let (family, words) = ip_words(ip);
            assert_eq!(words_ip(family as u8, words), ip);
        }
        assert_eq!(ip_words("10.1.2.3".parse().expect("v4")).0, Family::V4);
        assert_eq!(ip_words("::1".parse().expect("v6")).0, Family::V6);
    }

    #[test]
    fn numberings_decode_to_one_meaning() {
        assert_eq!(Family::from_af(AF_INET6), Some(Family::V6));
        assert_eq!(Family::V4.af(), AF_INET);
        assert_eq!(Family::from_u8(5), None);
        assert_eq!(Direction::from_u32(1), Some(Direction::Egress));
        assert_eq!(Direction::from_u32(256), None);
        assert_eq!(Direction::Egress.opposite(), Direction::Ingress);
    }
}
