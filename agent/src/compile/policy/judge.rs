//! The kernel's policy decision (`weft-ebpf` `policy::judge`), in user space: `weft policy
//! check` runs it on the kernel maps, tests run it on compiled state.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;
use weft_abi::net::Direction;
use weft_abi::policy::{
    EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EP_SHARED_ADDRESS, EndpointInfo, IDENTITY_ANY,
    IDENTITY_WORLD, IP_HOST, IpcacheValue, Match, POL_ANY_PORT, POLICY_PREFIX_FIXED,
    POLICY_PREFIX_FULL, PolicyData, PolicyValue,
};

use super::EntryKey;

/// Longest-prefix lookups, as the kernel's LPM tries answer them.
pub trait Tables {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue>;
    /// The entry with the longest prefix of `data` (a full key).
    fn policy(&self, data: &PolicyData) -> Option<PolicyValue>;
}

/// Compiled state, looked up as the kernel looks its maps up.
#[derive(Debug)]
pub struct Compiled<'a>(pub &'a super::Policies);

impl Tables for Compiled<'_> {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue> {
        lpm_ipcache(&self.0.ipcache, ip)
    }

    fn policy(&self, data: &PolicyData) -> Option<PolicyValue> {
        lpm_policy(&self.0.entries, data)
    }
}

/// A decision and how it was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// `Match::name()`, or `not-isolated`.
    pub matched: &'static str,
    /// The identity the peer address has.
    pub peer_identity: u32,
    /// `PolicyValue::rule` of the entry that allowed it.
    #[serde(skip)]
    pub rule: Option<u32>,
}

/// Judges traffic of the pod `ep` with `peer` in `direction`, as the kernel does.
pub fn judge(
    t: &impl Tables,
    ep: &EndpointInfo,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let remote = t.ipcache(peer).unwrap_or(IpcacheValue {
        identity: IDENTITY_WORLD,
        ..IpcacheValue::default()
    });
    let verdict = |m: Match, rule: Option<u32>| Verdict {
        allowed: m != Match::None,
        matched: m.as_str(),
        peer_identity: remote.identity,
        rule,
    };
    let isolated = if direction == Direction::Ingress {
        EP_INGRESS_ISOLATED
    } else {
        EP_EGRESS_ISOLATED
    };
    if ep.flags & isolated == 0 {
        return Verdict {
            allowed: true,
            matched: "not-isolated",
            peer_identity: remote.identity,
            rule: None,
        };
    }
    let (family, words) = weft_abi::net::ip_words(peer);
    let from_node = direction == Direction::Ingress && remote.flags & IP_HOST != 0;
    let itself = ep.flags & EP_SHARED_ADDRESS == 0 && ep.owns(family as u8, &words);
    if peer.is_loopback() || itself || from_node {
        return verdict(Match::Host, None);
    }
    let data = |identity| PolicyData {
        policy_set: ep.policy_set,
        identity,
        direction: direction as u8,
        protocol,
        port: port.to_be(),
    };
    if let Some(v) = t.policy(&data(remote.identity)) {
        let m = if v.flags & POL_ANY_PORT != 0 {
            Match::L3Only
        } else {
            Match::L3L4
        };
        return verdict(m, Some(v.rule));
    }
    match t.policy(&data(IDENTITY_ANY)) {
        Some(v) if v.flags & POL_ANY_PORT != 0 => verdict(Match::All, Some(v.rule)),
        Some(v) => verdict(Match::L4Only, Some(v.rule)),
        None => verdict(Match::None, None),
    }
}

/// LPM over a prefix table.
pub fn lpm_ipcache(map: &BTreeMap<IpNet, IpcacheValue>, ip: IpAddr) -> Option<IpcacheValue> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (0..=max).rev().find_map(|len| {
        let net = IpNet::new(ip, len).ok()?.trunc();
        map.get(&net).copied()
    })
}

/// LPM over policy entries (their keys hold zeros past the prefix, as written).
pub fn lpm_policy(map: &BTreeMap<EntryKey, PolicyValue>, data: &PolicyData) -> Option<PolicyValue> {
    let port = u16::from_be(data.port);
    let key = |prefix_len: u32, protocol: u8, port: u16| EntryKey {
        prefix_len,
        data: PolicyData {
            protocol,
            port: port.to_be(),
            ..*data
        },
    };
    (0..=16u32)
        .rev()
        .find_map(|bits| {
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            let k = key(POLICY_PREFIX_FULL - 16 + bits, data.protocol, port & mask);
            map.get(&k).copied()
        })
        .or_else(|| map.get(&key(POLICY_PREFIX_FIXED, 0, 0)).copied())
}
