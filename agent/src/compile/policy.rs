//! NetworkPolicy: from the store to what `ENDPOINTS`, `IPCACHE` and `POLICY` must hold.
//!
//! Deterministic given the store and the numbering carried between passes ([`Ids`]): no I/O,
//! no clock. Policies are compiled only for the sets of policies that select a local pod, so
//! the kernel holds nothing for pods this node does not run. See `weft_abi::policy` for how
//! the kernel uses the result.
pub mod blocks;
pub mod ids;
pub mod judge;
pub mod ports;
mod rules;
pub mod selector;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use serde::Serialize;
use weft_abi::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    policy::{
        EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EP_MESHED, EndpointInfo, IDENTITY_WORLD, IP_HOST,
        IP_MESHED_REMOTE, IpcacheValue, PolicyData, PolicyValue,
    },
};

pub use self::ids::{IdentityKey, Ids};
use self::{
    blocks::{Block, Blocks},
    selector::Labels,
};
use super::addresses::{Owners, own_addresses};
pub(crate) use crate::store::stand_in::is_rejected;
use crate::store::{Store, validate::CGROUP_ANNOTATION};

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A `POLICY` key: LPM prefix length and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub prefix_len: u32,
    pub data: PolicyData,
}

/// A rule, as `PolicyValue::rule` refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// `namespace/name` of the NetworkPolicy.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Index of the rule in `spec.ingress` / `spec.egress`.
    pub index: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// A pod of this node and what the kernel must know of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalEndpoint {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's cgroup, relative to the agent's cgroup root.
    pub cgroup: String,
    #[serde(skip)]
    pub info: EndpointInfo,
    /// Policies that select the pod, by direction.
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// Why the pod is isolated both ways whatever the policies say, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// With `EP_AUTHZ`: what the pod's security policy decides for plaintext callers, as the
    /// kernel looks it up (empty: every plaintext caller refused). Set by the pipeline from
    /// `compile::authz`; the policy sync numbers it ([`EndpointInfo::authz_table`]).
    #[serde(skip)]
    pub plaintext: PlaintextTable,
}

/// A plaintext table: (port word, caller prefix) → allowed, the rows of `AUTHZ` (see
/// `weft_abi::policy::PlaintextData`; a port word is `PLAINTEXT_PORT | port` or
/// `PLAINTEXT_OTHER_PORTS`).
pub type PlaintextTable = BTreeMap<(u32, IpNet), bool>;

/// Why weft isolates a local pod both ways, whatever the policies say: it cannot tell what
/// they mean for it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Quarantine {
    /// The Pod failed validation and no earlier version was good (`store::stand_in`).
    Unreadable,
    /// Another pod claims the same cgroup: which policies apply is ambiguous.
    SharedCgroup,
}

impl Quarantine {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::SharedCgroup => "shared_cgroup",
        }
    }
}

crate::metrics::label_value!(Quarantine);

/// What a policy selects and produces, for `weft policies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySummary {
    /// `namespace/name`.
    pub policy: String,
    /// `Ingress` and/or `Egress`, defaulted as the API server does.
    pub policy_types: Vec<&'static str>,
    /// Local pods it selects.
    pub selects: Vec<String>,
    /// `POLICY` entries its rules produced (counted once per entry, for the first rule).
    pub entries: usize,
}

/// Something that compiles but may not do what its author meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// `namespace/name` of the NetworkPolicy or Pod.
    pub object: String,
    pub message: String,
}

/// Desired policy state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policies {
    /// Local endpoints by cgroup (relative to the agent's cgroup root).
    pub endpoints: BTreeMap<String, LocalEndpoint>,
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub entries: BTreeMap<EntryKey, PolicyValue>,
    /// Entries per policy set.
    pub set_sizes: BTreeMap<u32, usize>,
    /// What each policy set stands for (its numbering key).
    pub set_keys: BTreeMap<u32, String>,
    pub rules: BTreeMap<u32, RuleRef>,
    pub identities: BTreeMap<u32, IdentityKey>,
    pub policies: Vec<PolicySummary>,
    pub problems: Vec<Problem>,
    /// Policies (`namespace/name`) whose ipBlocks do not fit `IPCACHE`: they isolate what
    /// they select and allow nothing.
    pub over_capacity: Vec<String>,
    /// Stand-ins of policies weft could not read (`store::stand_in`): they isolate what the
    /// rejected version selects and allow nothing.
    pub unreadable: Vec<String>,
    /// Local pods whose cgroup is deeper below the root than the kernel looks
    /// (`MAX_POD_DEPTH`): not enforced.
    pub unreachable: Vec<String>,
    /// Addresses several pods claim, and the claimants (see `compile::addresses`).
    pub contested: BTreeMap<IpAddr, Vec<String>>,
}

/// An IP protocol name as the API has it.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        "SCTP" => Some(IPPROTO_SCTP),
        _ => None,
    }
}

/// `policyTypes` as the API server defaults it: Ingress always, Egress when there are egress
/// rules.
pub fn policy_types(np: &NetworkPolicy) -> (bool, bool) {
    let spec = np.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    }
}

/// A pod's named container ports: (name, protocol) → port. When two containers name a port
/// alike (the API server allows it), the first container's wins, as Kubernetes resolves a
/// Service's named targetPort (`podutil.FindPort`).
pub fn named_ports(pod: &Pod) -> BTreeMap<(String, u8), u16> {
    let mut ports = BTreeMap::new();
    let named = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone()?;
            let proto = protocol_number(p.protocol.as_deref().unwrap_or("TCP"))?;
            Some(((name, proto), u16::try_from(p.container_port).ok()?))
        });
    for (key, port) in named {
        ports.entry(key).or_insert(port);
    }
    ports
}

/// One pod as policies see it.
#[derive(Debug)]
pub(crate) struct PodView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub pod: &'a Pod,
    pub labels: Labels,
    /// The addresses it owns: its identity's (see [`Owners`]).
    pub ips: Vec<IpAddr>,
    /// Every address it claims, owned or not: a local pod's own addresses (a bound pod
    /// holds them on this node; the kernel checks its packets' sources against them).
    pub claimed: Vec<IpAddr>,
    /// In the mesh (`compile::mesh`).
    pub meshed: bool,
}

/// What compile needs of the store, indexed once.
pub(crate) struct Model<'a> {
    pub namespace_labels: BTreeMap<String, Labels>,
    /// Every pod, with the addresses it owns (see [`Owners`]).
    pub pods: Vec<PodView<'a>>,
    /// Addresses several pods claim: the claimants.
    pub contested: BTreeMap<IpAddr, Vec<String>>,
    pub policies: Vec<(&'a str, &'a str, &'a NetworkPolicy)>,
    /// The ipBlocks of every policy this node enforces.
    pub blocks: Blocks,
    /// Each policy's ipBlocks (empty for policies selecting no local pod).
    blocks_of: Vec<Vec<Block>>,
    /// Policies whose rules do not fit `IPCACHE` (see [`Model::fit`]): they isolate and
    /// allow nothing.
    pub dropped: BTreeSet<usize>,
}

impl<'a> Model<'a> {
    pub fn new(store: &'a Store) -> Self {
        let mut namespace_labels: BTreeMap<String, Labels> = BTreeMap::new();
        for (name, ns) in &store.namespaces {
            namespace_labels.insert(name.clone(), ns.metadata.labels.clone().unwrap_or_default());
        }
        for (ns, _) in store.pods.keys().chain(store.network_policies.keys()) {
            namespace_labels.entry(ns.clone()).or_default();
        }
        for (name, labels) in &mut namespace_labels {
            labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.clone());
        }
        let owners = Owners::of(store);
        let meshed = super::mesh::enrollment(store, "").meshed;
        let pods: Vec<PodView<'a>> = store
            .pods
            .iter()
            .map(|(key, pod)| PodView {
                namespace: &key.0,
                name: &key.1,
                pod,
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                ips: owners.owned_by(key, pod).collect(),
                claimed: own_addresses(pod),
                meshed: meshed.contains_key(key),
            })
            .collect();
        let policies: Vec<_> = store
            .network_policies
            .iter()
            .map(|((ns, name), np)| (ns.as_str(), name.as_str(), np.as_ref()))
            .collect();
        // Only policies this node enforces put prefixes in `IPCACHE`: a policy elsewhere in
        // the cluster must not fill this node's map.
        let local: Vec<&PodView<'_>> = pods
            .iter()
            .filter(|p| local_cgroup(p.pod).is_some())
            .collect();
        let blocks_of: Vec<Vec<Block>> = policies
            .iter()
            .map(|(ns, _, np)| {
                if selects_a_local_pod(&local, ns, np) {
                    policy_blocks(np)
                } else {
                    Vec::new()
                }
            })
            .collect();
        let blocks = Blocks::new(blocks_of.iter().flatten().cloned().collect());
        Self {
            namespace_labels,
            pods,
            contested: owners.contested,
            policies,
            blocks,
            blocks_of,
            dropped: BTreeSet::new(),
        }
    }

    /// Keeps the `IPCACHE` prefixes of the policies' ipBlocks within `room` entries: when
    /// they do not fit, the policies needing the most are dropped (largest first) until the
    /// rest do. A dropped policy still isolates what it selects but allows nothing, so only
    /// its pods lose anything, and only allowed traffic.
    pub fn fit(&mut self, room: usize) -> Vec<(usize, usize)> {
        // Each policy's prefixes, once.
        let mut needs: Vec<(usize, BTreeSet<IpNet>)> = self
            .blocks_of
            .iter()
            .enumerate()
            .filter(|(_, blocks)| !blocks.is_empty())
            .map(|(i, blocks)| {
                let prefixes = blocks
                    .iter()
                    .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
                    .collect();
                (i, prefixes)
            })
            .collect();
        let total: BTreeSet<&IpNet> = needs.iter().flat_map(|(_, n)| n).collect();
        if total.len() <= room {
            return Vec::new();
        }
        needs.sort_by_key(|(i, n)| (n.len(), *i));
        let mut kept: BTreeSet<IpNet> = BTreeSet::new();
        let mut dropped = Vec::new();
        for (i, mine) in needs {
            let more = mine.difference(&kept).count();
            if kept.len() + more <= room {
                kept.extend(mine);
            } else {
                dropped.push((i, mine.len()));
                self.dropped.insert(i);
            }
        }
        let blocks = (0..self.policies.len())
            .filter(|i| !self.dropped.contains(i))
            .flat_map(|i| self.blocks_of[i].iter().cloned())
            .collect();
        self.blocks = Blocks::new(blocks);
        dropped
    }

    fn block_names(&self, indexes: &[usize]) -> BTreeSet<String> {
        indexes
            .iter()
            .map(|&i| {
                let b = &self.blocks.all()[i];
                if b.except.is_empty() {
                    b.cidr.to_string()
                } else {
                    let ex: Vec<String> = b.except.iter().map(ToString::to_string).collect();
                    format!("{} except {}", b.cidr, ex.join(","))
                }
            })
            .collect()
    }
}

/// A policy's ipBlock peers, as blocks.
fn policy_blocks(np: &NetworkPolicy) -> Vec<Block> {
    let spec = np.spec.as_ref();
    let ingress = spec
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.from.iter().flatten());
    let egress = spec
        .and_then(|s| s.egress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.to.iter().flatten());
    ingress
        .chain(egress)
        .filter_map(|peer| {
            let b = peer.ip_block.as_ref()?;
            Block::parse(&b.cidr, b.except.as_deref().unwrap_or_default())
        })
        .collect()
}

/// Whether a policy applies to a pod of this node (whatever its rules say).
fn selects_a_local_pod(local: &[&PodView<'_>], namespace: &str, np: &NetworkPolicy) -> bool {
    let selector = np.spec.as_ref().and_then(|s| s.pod_selector.as_ref());
    local.iter().any(|p| {
        p.namespace == namespace && selector.is_none_or(|sel| selector::matches(sel, &p.labels))
    })
}

/// An identity and what policies match it against.
#[derive(Debug)]
pub(crate) struct IdentityView {
    pub id: u32,
    /// For pods: namespace, pod labels, namespace labels.
    pub pod: Option<(String, Labels, Labels)>,
    /// Indexes into the model's blocks.
    pub blocks: Vec<usize>,
    /// Named ports of the pods with this identity: (name, protocol) → ports.
    pub named_ports: BTreeMap<(String, u8), BTreeSet<u16>>,
}

/// Compiles every NetworkPolicy for the pods of this node. `host_ips`: the node's own
/// addresses (ingress from them is always allowed).
pub fn compile(
    store: &Store,
    host_ips: &[IpAddr],
    ids: &mut Ids,
    ipcache_capacity: u32,
) -> Policies {
    let mut model = Model::new(store);
    let addresses = model.pods.iter().map(|p| p.ips.len()).sum::<usize>()
        + model.contested.len()
        + host_ips.len();
    let room = (ipcache_capacity as usize).saturating_sub(addresses);
    let dropped = model.fit(room);
    let mut pass = IdentityPass {
        ids,
        out: Policies::default(),
        views: BTreeMap::new(),
    };
    let local_ids = pass.pods(&model);
    pass.contested(&model);
    // ipBlock prefixes, then the node's addresses; a pod's own entry wins over both.
    pass.prefixes(&model);
    pass.hosts(&model, host_ips);
    let IdentityPass {
        ids,
        mut out,
        views,
    } = pass;
    let identities: Vec<IdentityView> = views.into_values().collect();
    rules::compile_endpoints(&model, &identities, &local_ids, ids, &mut out);
    mark_meshed(&model, &mut out);
    out.unreadable = model
        .policies
        .iter()
        .filter(|(_, _, np)| crate::store::stand_in::is_stand_in_policy(np))
        .map(|(ns, name, _)| format!("{ns}/{name}"))
        .collect();
    for (i, prefixes) in dropped {
        let (ns, name, _) = model.policies[i];
        out.over_capacity.push(format!("{ns}/{name}"));
        out.problems.push(Problem {
            object: format!("{ns}/{name}"),
            message: format!(
                "its ipBlocks need {prefixes} IPCACHE entries and do not fit (--max-ipcache \
                 {ipcache_capacity}, with every pod address first): the pods it selects are \
                 isolated and it allows nothing"
            ),
        });
    }
    ids.finish_pass();
    out
}

/// Local meshed pods' TCP to meshed pods of other nodes is captured (`EP_MESHED`).
fn mark_meshed(model: &Model<'_>, out: &mut Policies) {
    let meshed: BTreeSet<String> = model
        .pods
        .iter()
        .filter(|p| p.meshed)
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    for ep in out.endpoints.values_mut() {
        if meshed.contains(&ep.pod) {
            ep.info.flags |= EP_MESHED;
        }
    }
}

/// Identities and the ipcache, built address by address.
struct IdentityPass<'a> {
    ids: &'a mut Ids,
    out: Policies,
    views: BTreeMap<u32, IdentityView>,
}

impl IdentityPass<'_> {
    /// Every pod address gets a /32 (/128) entry; returns the endpoint number of each local
    /// pod by (namespace, name).
    fn pods(&mut self, model: &Model<'_>) -> BTreeMap<(String, String), u32> {
        let mut local_ids = BTreeMap::new();
        for p in &model.pods {
            // Numbered by cgroup, the key of `ENDPOINTS`: the number must change together
            // with the kernel's view of the pod, not with its name. A local pod is enforced
            // before it has an address (its containers may already run).
            if let Some(cgroup) = local_cgroup(p.pod) {
                let id = self.ids.endpoint(cgroup);
                local_ids.insert((p.namespace.to_owned(), p.name.to_owned()), id);
            }
            if !p.ips.is_empty() {
                self.pod(model, p);
            }
        }
        local_ids
    }

    fn pod(&mut self, model: &Model<'_>, p: &PodView<'_>) {
        if is_rejected(p.pod) {
            self.rejected_pod(p);
            return;
        }
        let pod_ports = named_ports(p.pod);
        let ns_labels = model
            .namespace_labels
            .get(p.namespace)
            .cloned()
            .unwrap_or_default();
        for ip in &p.ips {
            let covering = model.blocks.covering_ip(*ip);
            let ikey = IdentityKey::Pod {
                namespace: p.namespace.to_owned(),
                labels: p.labels.clone(),
                namespace_labels: ns_labels.clone(),
                blocks: model.block_names(&covering),
                named_ports: pod_ports.clone(),
            };
            let id = self.ids.identity(&ikey);
            let view = self.views.entry(id).or_insert_with(|| IdentityView {
                id,
                pod: Some((p.namespace.to_owned(), p.labels.clone(), ns_labels.clone())),
                blocks: covering,
                named_ports: BTreeMap::new(),
            });
            for (k, port) in &pod_ports {
                view.named_ports.entry(k.clone()).or_default().insert(*port);
            }
            self.out.identities.insert(id, ikey);
            // A meshed pod of another node is reached through the tunnel (a local one is
            // not: same-node traffic never leaves the node).
            let remote_mesh = p.meshed && local_cgroup(p.pod).is_none();
            let value = IpcacheValue {
                identity: id,
                flags: if remote_mesh { IP_MESHED_REMOTE } else { 0 },
            };
            self.out.ipcache.insert(IpNet::from(*ip), value);
        }
    }

    fn rejected_pod(&mut self, p: &PodView<'_>) {
        self.matching_nothing(IdentityKey::RejectedPod, &p.ips);
        // Whether it is meshed is read from its stand-in (its namespace's label at least):
        // a meshed pod's TCP to it is captured rather than sent in plaintext.
        if p.meshed && local_cgroup(p.pod).is_none() {
            for ip in &p.ips {
                if let Some(v) = self.out.ipcache.get_mut(&IpNet::from(*ip)) {
                    v.flags |= IP_MESHED_REMOTE;
                }
            }
        }
    }

    /// Gives `ips` identity `key`, which no selector and no ipBlock matches (only rules that
    /// allow every peer).
    fn matching_nothing<'i>(
        &mut self,
        key: IdentityKey,
        ips: impl IntoIterator<Item = &'i IpAddr>,
    ) {
        let id = self.ids.identity(&key);
        self.views.entry(id).or_insert_with(|| IdentityView {
            id,
            pod: None,
            blocks: Vec::new(),
            named_ports: BTreeMap::new(),
        });
        self.out.identities.insert(id, key);
        for ip in ips {
            // Never captured for the mesh: whose address it is cannot be told.
            let value = IpcacheValue {
                identity: id,
                flags: 0,
            };
            self.out.ipcache.insert(IpNet::from(*ip), value);
        }
    }

    /// Addresses several pods claim match no selector and no ipBlock: policy cannot tell
    /// whose traffic it is, so it gets only what rules allowing every peer give.
    fn contested(&mut self, model: &Model<'_>) {
        if model.contested.is_empty() {
            return;
        }
        self.matching_nothing(IdentityKey::ContestedAddress, model.contested.keys());
        // A meshed pod of another node among the claimants: a meshed pod's TCP to the
        // address is captured (and refused by the proxy: the address is nobody's), never
        // sent in plaintext to a pod that expects the mesh.
        for (ip, claimants) in &model.contested {
            let meshed_remote = model.pods.iter().any(|p| {
                p.meshed
                    && local_cgroup(p.pod).is_none()
                    && claimants.contains(&format!("{}/{}", p.namespace, p.name))
            });
            if meshed_remote && let Some(v) = self.out.ipcache.get_mut(&IpNet::from(*ip)) {
                v.flags |= IP_MESHED_REMOTE;
            }
        }
        self.out.contested = model.contested.clone();
        for (ip, claimants) in &model.contested {
            for pod in claimants {
                let others: Vec<&str> = claimants
                    .iter()
                    .filter(|c| *c != pod)
                    .map(String::as_str)
                    .collect();
                self.out.problems.push(Problem {
                    object: pod.clone(),
                    message: format!(
                        "address {ip} is also claimed by {}: until all claimants but one are \
                         deleted or being deleted, traffic from and to {ip} matches no \
                         podSelector, namespaceSelector or ipBlock",
                        others.join(", ")
                    ),
                });
            }
        }
    }

    /// The identity of an address outside every pod: by the ipBlocks covering it, or the
    /// world when none does.
    fn external(&mut self, model: &Model<'_>, net: &IpNet) -> u32 {
        let covering = model.blocks.covering(net);
        if covering.is_empty() {
            return IDENTITY_WORLD;
        }
        let ikey = IdentityKey::External {
            blocks: model.block_names(&covering),
        };
        let id = self.ids.identity(&ikey);
        self.views.entry(id).or_insert_with(|| IdentityView {
            id,
            pod: None,
            blocks: covering,
            named_ports: BTreeMap::new(),
        });
        self.out.identities.insert(id, ikey);
        id
    }

    fn prefixes(&mut self, model: &Model<'_>) {
        for net in model.blocks.prefixes() {
            if self.out.ipcache.contains_key(&net) {
                continue;
            }
            let identity = self.external(model, &net);
            let value = IpcacheValue {
                identity,
                ..IpcacheValue::default()
            };
            self.out.ipcache.insert(net, value);
        }
    }

    fn hosts(&mut self, model: &Model<'_>, host_ips: &[IpAddr]) {
        for ip in host_ips {
            let net = IpNet::from(*ip);
            if let Some(v) = self.out.ipcache.get_mut(&net) {
                v.flags |= IP_HOST;
                continue;
            }
            let identity = self.external(model, &net);
            let value = IpcacheValue {
                identity,
                flags: IP_HOST,
            };
            self.out.ipcache.insert(net, value);
        }
    }
}

/// The cgroup a local pod's processes run in (standalone mode), relative to the cgroup root.
pub fn local_cgroup(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CGROUP_ANNOTATION))
        .map(String::as_str)
}

/// Isolation flags of an endpoint selected by these policies.
pub(crate) fn isolation(ingress: bool, egress: bool) -> u32 {
    (if ingress { EP_INGRESS_ISOLATED } else { 0 }) | (if egress { EP_EGRESS_ISOLATED } else { 0 })
}

#[cfg(test)]
pub(crate) mod tests;
