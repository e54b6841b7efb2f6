//! Local endpoints, the policy sets that select them, and the `POLICY` entries of each set.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};
use weft_abi::net::{Direction, ip_words};
use weft_abi::policy::{
    EP_SHARED_ADDRESS, EndpointInfo, IDENTITY_ANY, POL_ANY_PORT, POLICY_PREFIX_FIXED,
    POLICY_PREFIX_FULL, PolicyData, PolicyValue,
};

use super::{
    EntryKey, IdentityView, LocalEndpoint, Model, PlaintextTable, PodView, PolicySummary,
    Quarantine, RuleRef, is_rejected, isolation, local_cgroup, named_ports, policy_types,
    ports::range_prefixes, protocol_number, selector,
};

/// The peers of a rule: everyone, or these identities.
#[derive(Debug, Clone)]
enum Peers {
    Any,
    Some(BTreeSet<u32>),
}

/// A port clause, resolved as far as it can be without knowing the peer.
#[derive(Debug, Clone)]
enum PortMatch {
    /// The rule lists no ports: every protocol and port.
    Any,
    /// One protocol, every port.
    Protocol(u8),
    /// One protocol, `first..=last`.
    Range(u8, u16, u16),
    /// A named port, resolved against the destination pod.
    Named(u8, String),
}

/// 64-bit FNV-1a, for fingerprints that stay the same across agents and restarts.
fn fnv64(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV64_START: u64 = 0xcbf2_9ce4_8422_2325;

/// What a set's entries say, independent of the numbers they use: identities count by what
/// they stand for, so an agent that renumbered them computes the same fingerprint.
fn content_fingerprint(
    entries: &BTreeMap<EntryKey, PolicyValue>,
    identity_prints: &BTreeMap<u32, u64>,
) -> u64 {
    let mut rows: Vec<[u64; 3]> = entries
        .iter()
        .map(|(k, v)| {
            let id = identity_prints
                .get(&k.data.identity)
                .copied()
                .unwrap_or(u64::from(k.data.identity));
            let shape = (u64::from(k.prefix_len) << 32)
                | (u64::from(k.data.direction) << 24)
                | (u64::from(k.data.protocol) << 16)
                | u64::from(k.data.port);
            [id, shape, (u64::from(v.rule) << 32) | u64::from(v.flags)]
        })
        .collect();
    rows.sort_unstable();
    rows.iter().fold(FNV64_START, |h, row| {
        row.iter().fold(h, |h, w| fnv64(h, &w.to_le_bytes()))
    })
}

/// FNV-1a, for rule references that stay the same across agents and restarts.
fn rule_hash(rule: &RuleRef) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in rule.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn port_matches(ports: Option<&Vec<NetworkPolicyPort>>) -> Vec<PortMatch> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortMatch::Any];
    };
    ports
        .iter()
        .filter_map(|p| {
            let proto = protocol_number(p.protocol.as_deref().unwrap_or("TCP"))?;
            Some(match &p.port {
                None => PortMatch::Protocol(proto),
                Some(IntOrString::Int(n)) => {
                    let first = u16::try_from(*n).ok()?;
                    let last = p
                        .end_port
                        .and_then(|e| u16::try_from(e).ok())
                        .unwrap_or(first);
                    PortMatch::Range(proto, first, last.max(first))
                }
                Some(IntOrString::String(name)) => PortMatch::Named(proto, name.clone()),
            })
        })
        .collect()
}

/// Which identities a list of peers names, with results cached per (namespace, peer).
struct PeerResolver<'m> {
    model: &'m Model<'m>,
    identities: &'m [IdentityView],
    cache: BTreeMap<(String, String), BTreeSet<u32>>,
}

impl PeerResolver<'_> {
    fn resolve(&mut self, namespace: &str, peers: Option<&Vec<NetworkPolicyPeer>>) -> Peers {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Peers::Any;
        };
        let mut out = BTreeSet::new();
        for peer in peers {
            let key = (
                namespace.to_owned(),
                serde_json::to_string(peer).unwrap_or_default(),
            );
            if let Some(ids) = self.cache.get(&key) {
                out.extend(ids);
                continue;
            }
            let ids = self.peer(namespace, peer);
            out.extend(&ids);
            self.cache.insert(key, ids);
        }
        Peers::Some(out)
    }

    fn peer(&self, namespace: &str, peer: &NetworkPolicyPeer) -> BTreeSet<u32> {
        if let Some(b) = &peer.ip_block {
            let Some(block) = super::Block::parse(&b.cidr, b.except.as_deref().unwrap_or_default())
            else {
                return BTreeSet::new();
            };
            let Ok(index) = self.model.blocks.all().binary_search(&block) else {
                return BTreeSet::new();
            };
            return self
                .identities
                .iter()
                .filter(|i| i.blocks.binary_search(&index).is_ok())
                .map(|i| i.id)
                .collect();
        }
        self.identities
            .iter()
            .filter(|i| {
                let Some((ns, labels, ns_labels)) = &i.pod else {
                    return false;
                };
                let ns_ok = match &peer.namespace_selector {
                    Some(sel) => selector::matches(sel, ns_labels),
                    None => ns == namespace,
                };
                ns_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|sel| selector::matches(sel, labels))
            })
            .map(|i| i.id)
            .collect()
    }
}

/// Entries of one policy set under construction.
/// The set number entries carry while their set is being built: the number depends on the
/// content (a number's entries never change while endpoints use it, so an endpoint moving
/// between sets never sees a mix of two sets' rules).
const PENDING_SET: u32 = u32::MAX;

struct SetBuilder<'a> {
    set: u32,
    identities: &'a [IdentityView],
    /// The local pod's named ports: (name, protocol) → port (ingress named ports).
    own_ports: &'a BTreeMap<(String, u8), u16>,
    entries: BTreeMap<EntryKey, PolicyValue>,
}

impl SetBuilder<'_> {
    fn put(&mut self, identity: u32, direction: Direction, port: &PortMatch, rule: u32) {
        let data = |protocol: u8, port: u16| PolicyData {
            policy_set: self.set,
            identity,
            direction: direction as u8,
            protocol,
            port: port.to_be(),
        };
        let mut keys = Vec::new();
        let mut flags = 0;
        match port {
            PortMatch::Any => {
                flags = POL_ANY_PORT;
                keys.push(EntryKey {
                    prefix_len: POLICY_PREFIX_FIXED,
                    data: data(0, 0),
                });
            }
            PortMatch::Protocol(p) => keys.push(EntryKey {
                prefix_len: POLICY_PREFIX_FIXED + 8,
                data: data(*p, 0),
            }),
            PortMatch::Range(p, first, last) => {
                for (start, bits) in range_prefixes(*first, *last) {
                    keys.push(EntryKey {
                        prefix_len: POLICY_PREFIX_FIXED + 8 + bits,
                        data: data(*p, start),
                    });
                }
            }
            PortMatch::Named(p, name) => {
                let numbers: BTreeSet<u16> = if direction == Direction::Ingress {
                    self.own_ports
                        .get(&(name.clone(), *p))
                        .copied()
                        .into_iter()
                        .collect()
                } else {
                    self.identities
                        .iter()
                        .find(|i| i.id == identity)
                        .and_then(|i| i.named_ports.get(&(name.clone(), *p)))
                        .cloned()
                        .unwrap_or_default()
                };
                for n in numbers {
                    keys.push(EntryKey {
                        prefix_len: POLICY_PREFIX_FULL,
                        data: data(*p, n),
                    });
                }
            }
        }
        for key in keys {
            // The first rule that allows a key is the one reported.
            self.entries
                .entry(key)
                .or_insert(PolicyValue { rule, flags });
        }
    }

    fn rule(&mut self, peers: &Peers, ports: &[PortMatch], direction: Direction, rule: u32) {
        for port in ports {
            match (peers, port) {
                // A named egress port depends on the destination: every pod identity that
                // has the name stands for "any peer".
                (Peers::Any, PortMatch::Named(p, name)) if direction == Direction::Egress => {
                    let ids: Vec<u32> = self
                        .identities
                        .iter()
                        .filter(|i| i.named_ports.contains_key(&(name.clone(), *p)))
                        .map(|i| i.id)
                        .collect();
                    for id in ids {
                        self.put(id, direction, port, rule);
                    }
                }
                (Peers::Any, _) => self.put(IDENTITY_ANY, direction, port, rule),
                (Peers::Some(ids), _) => {
                    for &id in ids {
                        self.put(id, direction, port, rule);
                    }
                }
            }
        }
    }
}

/// The content of a policy set: which policies, by direction, and the pod's named ports
/// (ingress named ports resolve against them).
fn set_key(ingress: &[String], egress: &[String], ports: &BTreeMap<(String, u8), u16>) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|((name, proto), n)| format!("{name}/{proto}={n}"))
        .collect();
    format!(
        "in:{}|eg:{}|ports:{}",
        ingress.join(","),
        egress.join(","),
        ports.join(",")
    )
}

/// Compiles the endpoints of local pods and the entries of their policy sets.
pub(super) fn compile_endpoints(
    model: &Model<'_>,
    identities: &[IdentityView],
    local_ids: &BTreeMap<(String, String), u32>,
    ids: &mut super::Ids,
    out: &mut super::Policies,
) {
    let identity_prints: BTreeMap<u32, u64> = out
        .identities
        .iter()
        .map(|(n, key)| (*n, fnv64(FNV64_START, format!("{key:?}").as_bytes())))
        .collect();
    let mut c = EndpointCompiler {
        model,
        identities,
        resolver: PeerResolver {
            model,
            identities,
            cache: BTreeMap::new(),
        },
        summaries: summaries(model),
        built: BTreeMap::new(),
        identity_prints,
        ids,
        out,
    };
    let claims = cgroup_claims(model);
    for p in &model.pods {
        let Some(cgroup) = local_cgroup(p.pod) else {
            continue;
        };
        let endpoint_id = local_ids
            .get(&(p.namespace.to_owned(), p.name.to_owned()))
            .copied()
            .unwrap_or_else(|| c.ids.endpoint(cgroup));
        let depth = cgroup.split('/').count();
        if depth > weft_abi::policy::MAX_POD_DEPTH as usize {
            let pod = format!("{}/{}", p.namespace, p.name);
            c.out.unreachable.push(pod.clone());
            c.out.problems.push(super::Problem {
                object: pod,
                message: format!(
                    "cgroup {cgroup} is {depth} levels below --cgroup-root; the kernel looks {} \
                     deep: this pod is NOT enforced by its policies (isolated both ways with \
                     --unbound-pods=isolate, unjudged otherwise; put --cgroup-root nearer its pods)",
                    weft_abi::policy::MAX_POD_DEPTH
                ),
            });
        }
        let quarantine = if claims[cgroup].len() > 1 {
            c.out.problems.push(super::Problem {
                object: format!("{}/{}", p.namespace, p.name),
                message: format!(
                    "cgroup {cgroup} is claimed by {}: isolated both ways until one pod is left",
                    claims[cgroup].join(", ")
                ),
            });
            Some(Quarantine::SharedCgroup)
        } else {
            is_rejected(p.pod).then_some(Quarantine::Unreadable)
        };
        c.endpoint(p, cgroup, endpoint_id, quarantine);
    }
    c.out.policies = c.summaries.into_values().collect();
}

/// The pods (`namespace/name`) of each local cgroup. Two pods claiming one cgroup (a forged
/// mirror annotation, a copied standalone annotation) must not let either pod's policies
/// decide for the other's processes.
fn cgroup_claims<'m>(model: &'m Model<'_>) -> BTreeMap<&'m str, Vec<String>> {
    let mut claims: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for p in &model.pods {
        if let Some(cgroup) = local_cgroup(p.pod) {
            claims
                .entry(cgroup)
                .or_default()
                .push(format!("{}/{}", p.namespace, p.name));
        }
    }
    claims
}

/// Every policy as `weft policies` lists it, by `namespace/name`, before it selects anything.
fn summaries(model: &Model<'_>) -> BTreeMap<String, PolicySummary> {
    model
        .policies
        .iter()
        .map(|(ns, name, np)| {
            let (i, e) = policy_types(np);
            let types = [(i, "Ingress"), (e, "Egress")]
                .into_iter()
                .filter_map(|(on, t)| on.then_some(t))
                .collect();
            let key = format!("{ns}/{name}");
            let summary = PolicySummary {
                policy: key.clone(),
                policy_types: types,
                selects: Vec::new(),
                entries: 0,
            };
            (key, summary)
        })
        .collect()
}

/// The local endpoints of one compile, and the policy sets they use.
struct EndpointCompiler<'a, 'm> {
    model: &'a Model<'m>,
    identities: &'a [IdentityView],
    resolver: PeerResolver<'a>,
    summaries: BTreeMap<String, PolicySummary>,
    /// A set number stands for fixed content (see `set_number`); built once per content key.
    built: BTreeMap<String, u32>,
    identity_prints: BTreeMap<u32, u64>,
    ids: &'a mut super::Ids,
    out: &'a mut super::Policies,
}

impl EndpointCompiler<'_, '_> {
    fn policy_name(&self, i: usize) -> String {
        format!("{}/{}", self.model.policies[i].0, self.model.policies[i].1)
    }

    /// A local pod: the policies that select it, its set, its `ENDPOINTS` value.
    fn endpoint(
        &mut self,
        p: &PodView<'_>,
        cgroup: &str,
        endpoint_id: u32,
        quarantine: Option<Quarantine>,
    ) {
        let pod_key = format!("{}/{}", p.namespace, p.name);
        let rejected = quarantine.is_some();
        // A quarantined pod is isolated both ways with an empty set: nothing but itself,
        // loopback and its node reach it.
        let selecting = if rejected {
            Vec::new()
        } else {
            selecting_policies(self.model, p)
        };
        let names = |pick: fn(&(usize, bool, bool)) -> bool| -> Vec<String> {
            selecting
                .iter()
                .filter(|s| pick(s))
                .map(|s| self.policy_name(s.0))
                .collect()
        };
        let ingress = names(|s| s.1);
        let egress = names(|s| s.2);
        for (i, ..) in &selecting {
            let name = self.policy_name(*i);
            if let Some(s) = self.summaries.get_mut(&name) {
                s.selects.push(pod_key.clone());
            }
        }
        let own_ports = named_ports(p.pod);
        let key = set_key(&ingress, &egress, &own_ports);
        let set = if ingress.is_empty() && egress.is_empty() {
            0
        } else if let Some(&set) = self.built.get(&key) {
            set
        } else {
            let set = self.build_set(&key, &selecting, &own_ports);
            self.built.insert(key, set);
            set
        };
        let identity = p
            .ips
            .first()
            .and_then(|ip| self.out.ipcache.get(&ipnet::IpNet::from(*ip)))
            .map_or(0, |v| v.identity);
        let flags = isolation(
            rejected || !ingress.is_empty(),
            rejected || !egress.is_empty(),
        );
        let info = endpoint_info(p, endpoint_id, set, identity, flags, quarantine);
        let endpoint = LocalEndpoint {
            pod: pod_key,
            cgroup: cgroup.to_owned(),
            info,
            ingress_policies: ingress,
            egress_policies: egress,
            ips: p.claimed.clone(),
            quarantine,
            plaintext: PlaintextTable::new(),
        };
        self.out.endpoints.insert(cgroup.to_owned(), endpoint);
    }

    /// The entries of a new set, numbered by what they say.
    fn build_set(
        &mut self,
        key: &str,
        selecting: &[(usize, bool, bool)],
        own_ports: &BTreeMap<(String, u8), u16>,
    ) -> u32 {
        let mut b = SetBuilder {
            set: PENDING_SET,
            identities: self.identities,
            own_ports,
            entries: BTreeMap::new(),
        };
        for &(i, in_sel, eg_sel) in selecting {
            if self.model.dropped.contains(&i) {
                continue;
            }
            let (ns, _, np) = self.model.policies[i];
            let name = self.policy_name(i);
            let rules = Rules {
                ns,
                name: &name,
                np,
                ingress: in_sel,
                egress: eg_sel,
            };
            add_rules(&mut b, &mut self.resolver, &rules, &mut self.out.rules);
        }
        for v in b.entries.values() {
            if let Some(r) = self.out.rules.get(&v.rule)
                && let Some(s) = self.summaries.get_mut(&r.policy)
            {
                s.entries += 1;
            }
        }
        let print = content_fingerprint(&b.entries, &self.identity_prints);
        let numbered = format!("{key}#{print:016x}");
        let set = self.ids.set(&numbered);
        self.out.set_sizes.insert(set, b.entries.len());
        self.out.set_keys.insert(set, numbered);
        self.out
            .entries
            .extend(b.entries.into_iter().map(|(mut k, v)| {
                k.data.policy_set = set;
                (k, v)
            }));
        set
    }
}

/// The `ENDPOINTS` value of a local pod.
fn endpoint_info(
    p: &PodView<'_>,
    endpoint_id: u32,
    policy_set: u32,
    identity: u32,
    flags: u32,
    quarantine: Option<Quarantine>,
) -> EndpointInfo {
    // Which pod's addresses are "itself" is ambiguous in a shared cgroup: none are. Otherwise
    // every address it claims, even one another pod claims too: the kernel drops its packets
    // from any other source. Such an address is not a way to reach itself.
    let own_ips: &[std::net::IpAddr] = if quarantine == Some(Quarantine::SharedCgroup) {
        &[]
    } else {
        &p.claimed
    };
    let shared = own_ips.iter().any(|ip| !p.ips.contains(ip));
    EndpointInfo {
        endpoint_id,
        policy_set,
        identity,
        flags: flags | if shared { EP_SHARED_ADDRESS } else { 0 },
        ip4: own_ips
            .iter()
            .find(|ip| ip.is_ipv4())
            .map_or(0, |ip| ip_words(*ip).1[0]),
        seal: 0,
        ip6: own_ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .map_or([0; 4], |ip| ip_words(*ip).1),
        authz_table: 0,
    }
}

/// Policies selecting a pod: (index in the model, selects for ingress, for egress).
fn selecting_policies(model: &Model<'_>, p: &PodView<'_>) -> Vec<(usize, bool, bool)> {
    model
        .policies
        .iter()
        .enumerate()
        .filter(|(_, (ns, _, np))| {
            *ns == p.namespace
                && np
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_selector.as_ref())
                    .is_none_or(|sel| selector::matches(sel, &p.labels))
        })
        .filter_map(|(index, (_, _, np))| {
            let (i, e) = policy_types(np);
            (i || e).then_some((index, i, e))
        })
        .collect()
}

/// One policy's rules for a set: the directions in which it selects the pod.
struct Rules<'a> {
    ns: &'a str,
    /// `namespace/name`.
    name: &'a str,
    np: &'a NetworkPolicy,
    ingress: bool,
    egress: bool,
}

fn add_rules(
    b: &mut SetBuilder<'_>,
    resolver: &mut PeerResolver<'_>,
    policy: &Rules<'_>,
    rules: &mut BTreeMap<u32, RuleRef>,
) {
    let Rules {
        ns,
        name,
        np,
        ingress,
        egress,
    } = *policy;
    let Some(spec) = &np.spec else { return };
    let mut reference = |direction: &'static str, index: usize| {
        let r = RuleRef {
            policy: name.to_owned(),
            direction,
            index,
        };
        let h = rule_hash(&r);
        rules.entry(h).or_insert(r);
        h
    };
    if ingress {
        for (i, rule) in spec.ingress.iter().flatten().enumerate() {
            let h = reference("ingress", i);
            let peers = resolver.resolve(ns, rule.from.as_ref());
            b.rule(
                &peers,
                &port_matches(rule.ports.as_ref()),
                Direction::Ingress,
                h,
            );
        }
    }
    if egress {
        for (i, rule) in spec.egress.iter().flatten().enumerate() {
            let h = reference("egress", i);
            let peers = resolver.resolve(ns, rule.to.as_ref());
            b.rule(
                &peers,
                &port_matches(rule.ports.as_ref()),
                Direction::Egress,
                h,
            );
        }
    }
}
