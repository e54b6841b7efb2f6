//! The decisions for plaintext callers of a workload as longest-prefix entries: what the
//! kernel will look up for a SYN that no proxy delivered, so that a refused connection never
//! reaches the application's accept queue.
//!
//! A plaintext caller has no principal, so a decision depends only on its address and the
//! port (the destination address is the workload's own). Ports: each port a policy or
//! `portLevelMtls` names gets entries of its own, every other port shares the `port: None`
//! entries. Addresses: every CIDR the policies name, and the whole family; the entry of a
//! CIDR decides for the addresses in it that no longer CIDR of the list covers, which is how
//! a longest-prefix lookup reads it.
use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use weft_abi::policy::{PLAINTEXT_OTHER_PORTS, PLAINTEXT_PORT};

use super::{
    Connection, Decision, Workload, decide,
    rules::{Set, When},
};
use crate::compile::policy::PlaintextTable;

/// One entry: plaintext from `source` to `port` (`None`: a port no policy names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub port: Option<u16>,
    pub source: IpNet,
    pub decision: Decision,
}

/// The entries of workload `w` reached at `destination` (one of its addresses; the entries
/// are of that address's family).
pub fn plaintext(w: &Workload, destination: IpAddr) -> Vec<Entry> {
    let (ports, nets) = keys(w, destination);
    let other = (1..=u16::MAX).find(|p| !ports.contains(p));
    let ports = ports.iter().map(|p| (Some(*p), *p));
    let sources: Vec<(IpNet, IpAddr)> = nets
        .iter()
        .filter_map(|n| Some((*n, representative(*n, &nets)?)))
        .collect();
    let mut out = Vec::new();
    for (port, as_port) in ports.chain(other.map(|p| (None, p))) {
        for &(net, source) in &sources {
            let c = Connection {
                source,
                identity: None,
                destination,
                port: as_port,
            };
            out.push(Entry {
                port,
                source: net,
                decision: decide(w, &c),
            });
        }
    }
    out
}

/// The kernel's table for workload `w` at its addresses `ips`: each address's entries, a
/// source allowed only when it is allowed at every address of its family (the kernel looks
/// up by source and port, not by which of the pod's addresses was dialled; `destination.ip`
/// conditions can tell them apart). A family without an address has no entries: plaintext
/// over it is refused.
pub fn kernel_table(w: &Workload, ips: &[IpAddr]) -> PlaintextTable {
    let mut out = PlaintextTable::new();
    for ip in ips {
        for e in plaintext(w, *ip) {
            let port = e
                .port
                .map_or(PLAINTEXT_OTHER_PORTS, |p| PLAINTEXT_PORT | u32::from(p));
            *out.entry((port, e.source)).or_insert(true) &= e.decision.allowed;
        }
    }
    out
}

/// The ports and the source CIDRs (of `destination`'s family, with the whole family) that
/// the workload's policies tell apart.
fn keys(w: &Workload, destination: IpAddr) -> (BTreeSet<u16>, Vec<IpNet>) {
    let mut ports: BTreeSet<u16> = w.mtls.ports.keys().copied().collect();
    let mut nets = BTreeSet::new();
    let mut add_nets = |s: &Set<IpNet>| nets.extend(s.any.iter().chain(&s.none).map(IpNet::trunc));
    let add_ports = |s: &Set<u16>, ports: &mut BTreeSet<u16>| {
        ports.extend(s.any.iter().chain(&s.none));
    };
    for rule in w.policies.iter().flat_map(|p| &p.rules) {
        for from in rule.from.iter().flatten() {
            add_nets(&from.ips);
            add_nets(&from.remote_ips);
        }
        for to in rule.to.iter().flatten() {
            add_ports(&to.ports, &mut ports);
        }
        for when in &rule.when {
            match when {
                When::SourceIp(s) | When::RemoteIp(s) => add_nets(s),
                When::DestinationPort(s) => add_ports(s, &mut ports),
                _ => {}
            }
        }
    }
    let whole = match destination {
        IpAddr::V4(_) => IpNet::V4(ipnet::Ipv4Net::default()),
        IpAddr::V6(_) => IpNet::V6(ipnet::Ipv6Net::default()),
    };
    nets.insert(whole);
    if destination.is_ipv6() {
        // `decide` reads an IPv4-mapped caller as the IPv4 address it carries: the mapped
        // block, and each IPv4 block mapped, are classes of their own.
        let v4_whole = IpNet::V4(ipnet::Ipv4Net::default());
        let mapped: Vec<IpNet> = nets.iter().chain([&v4_whole]).filter_map(mapped).collect();
        nets.extend(mapped);
    }
    let family = |n: &IpNet| n.addr().is_ipv4() == destination.is_ipv4();
    (ports, nets.into_iter().filter(family).collect())
}

/// An IPv4 block as the IPv4-mapped IPv6 block of the same addresses.
fn mapped(net: &IpNet) -> Option<IpNet> {
    let IpNet::V4(v4) = net else {
        return None;
    };
    ipnet::Ipv6Net::new(v4.network().to_ipv6_mapped(), 96 + v4.prefix_len())
        .ok()
        .map(IpNet::V6)
}

/// An address of `net` that no longer CIDR of `all` covers: `None` when they cover it all.
/// The uncovered addresses form intervals whose ends are `net`'s own or next to a longer
/// CIDR's, so one of those is uncovered if any address is.
fn representative(net: IpNet, all: &[IpNet]) -> Option<IpAddr> {
    let inner: Vec<&IpNet> = all
        .iter()
        .filter(|c| c.prefix_len() > net.prefix_len() && net.contains(*c))
        .collect();
    let mut candidates = vec![net.network(), net.broadcast()];
    for c in &inner {
        candidates.extend(step(c.network(), -1));
        candidates.extend(step(c.broadcast(), 1));
    }
    candidates
        .into_iter()
        .find(|a| net.contains(a) && !inner.iter().any(|c| c.contains(a)))
}

/// The address next to `a` (`by` is 1 or -1), if there is one.
fn step(a: IpAddr, by: i8) -> Option<IpAddr> {
    match a {
        IpAddr::V4(v) => u32::from(v)
            .checked_add_signed(by.into())
            .map(|n| std::net::Ipv4Addr::from(n).into()),
        IpAddr::V6(v) => u128::from(v)
            .checked_add_signed(by.into())
            .map(|n| std::net::Ipv6Addr::from(n).into()),
    }
}

/// The entry a longest-prefix lookup finds for plaintext from `source` to `port`, as the
/// kernel will look it up (the port's own entries first, else the other ports').
pub fn lookup(entries: &[Entry], source: IpAddr, port: u16) -> Option<&Entry> {
    let named = entries.iter().any(|e| e.port == Some(port));
    let key = named.then_some(port);
    entries
        .iter()
        .filter(|e| e.port == key && e.source.contains(&source))
        .max_by_key(|e| e.source.prefix_len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn a_representative_avoids_the_longer_prefixes() {
        let all = [net("0.0.0.0/0"), net("10.0.0.0/8"), net("0.0.0.0/1")];
        assert_eq!(
            representative(all[0], &all),
            Some("255.255.255.255".parse().expect("ip"))
        );
        let all = [net("10.0.0.0/8"), net("10.0.0.0/9"), net("10.128.0.0/9")];
        assert_eq!(representative(all[0], &all), None, "covered by its halves");
        let all = [net("10.0.0.0/30"), net("10.0.0.0/31"), net("10.0.0.3/32")];
        assert_eq!(
            representative(all[0], &all),
            Some("10.0.0.2".parse().expect("ip"))
        );
    }
}
