//! `GET /policies` and `GET /policy/check`: what policy the kernel enforces, read from the
//! pinned maps (not from the syncer's memory), and the kernel's decision for a pod pair.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use weft_abi::net::Direction;
use weft_abi::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, maps};

use super::{AdminState, Error};
use crate::{
    compile::policy::judge::{Compiled, Verdict, judge},
    pipeline::policy::{EndpointStatus, PolicyStatus},
    store::Store,
    sync::policy::kernel::KernelTables,
};

/// One policy (`GET /policies`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRow {
    pub policy: String,
    pub policy_types: Vec<String>,
    /// Pods of this node it selects.
    pub selects: Vec<String>,
    /// `POLICY` entries compiled from its rules.
    pub entries: usize,
    /// `POLICY` entries the kernel holds for its rules.
    pub kernel_entries: usize,
}

/// One pod of this node (`GET /policies`): what compile wants, and what the kernel holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRow {
    #[serde(flatten)]
    pub status: EndpointStatus,
    /// The kernel's `ENDPOINTS` entry for the cgroup has this pod's set (false: the kernel
    /// enforces something else, e.g. set 0 after a capacity problem, or nothing).
    pub in_kernel: bool,
    /// `POLICY` entries the kernel holds for the set the kernel gives the pod.
    pub kernel_entries: usize,
}

/// `GET /policies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoliciesDoc {
    pub policies: Vec<PolicyRow>,
    pub endpoints: Vec<EndpointRow>,
    /// `object: message` notes of compile (unresolved named ports, pods without cgroups).
    pub problems: Vec<String>,
    pub sync_errors: Vec<String>,
    pub identities: usize,
    pub ipcache_entries: usize,
    pub policy_entries: usize,
}

/// The query of `GET /policy/check`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CheckQuery {
    /// `namespace/pod`.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// TCP (default), UDP or SCTP.
    pub protocol: Option<String>,
}

/// One side's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideVerdict {
    /// `egress` of the client or `ingress` of the server.
    pub direction: String,
    /// The pod whose policies decide.
    pub pod: String,
    /// The node that judges it (the pod's `spec.nodeName`), when known.
    pub node: Option<String>,
    /// Whether this node's kernel judges it (the pod is bound here and its cgroup exists).
    pub enforced_here: bool,
    /// `kernel`: read from this node's maps. `computed`: the pod runs on another node (or is
    /// not bound here yet); its agent compiles the same objects, and this is computed the way
    /// it does, with only that pod bound (without that node's own addresses, which are
    /// always allowed in, and its capacity limits). Its kernel decides.
    pub judged_by: String,
    pub allowed: bool,
    /// How: l3-l4, l3-only, l4-only, all, host-or-self, none, not-isolated.
    pub matched: String,
    /// The identity the peer's address has in this node's kernel (0 when computed).
    pub peer_identity: u32,
    /// The rule that allowed it (`namespace/name direction[index]`).
    pub rule: Option<String>,
    /// What decided, in words.
    pub reason: String,
}

/// `GET /policy/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDoc {
    pub from: String,
    pub to: String,
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Neither side denies.
    pub allowed: bool,
    /// Both sides were judged from this node's kernel (both pods are bound here and their
    /// cgroups exist). Otherwise a side is computed, or its pod was gone (`judged_by`).
    pub complete: bool,
    pub egress: SideVerdict,
    pub ingress: SideVerdict,
}

/// Entries by set or by rule.
type Counts = BTreeMap<u32, usize>;

/// The pinned policy maps of the agent's instance.
fn kernel_tables(state: &AdminState) -> Result<KernelTables, Error> {
    KernelTables::open(&state.pins).map_err(|e| Error::Map {
        map: e.map,
        source: e.source,
    })
}

/// Kernel `POLICY` entries: per set, and per rule.
fn entry_counts(tables: &KernelTables) -> Result<(Counts, Counts), Error> {
    let (mut sets, mut rules) = (BTreeMap::new(), BTreeMap::new());
    for item in tables.policy.iter() {
        let (k, v) = item.map_err(|source| Error::Map {
            map: maps::POLICY,
            source,
        })?;
        *sets.entry(k.data().policy_set).or_default() += 1;
        *rules.entry(v.rule).or_default() += 1;
    }
    Ok((sets, rules))
}

fn status_of(state: &AdminState) -> PolicyStatus {
    state
        .policy
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

pub(super) async fn policies_handler(State(state): State<AdminState>) -> Response {
    match policies(&state) {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)).into_response(),
    }
}

fn policies(state: &AdminState) -> Result<PoliciesDoc, Error> {
    let status = status_of(state);
    let tables = kernel_tables(state)?;
    let (per_set, per_rule) = entry_counts(&tables)?;
    let mut per_policy: BTreeMap<&str, usize> = BTreeMap::new();
    for (rule, n) in &per_rule {
        if let Some(r) = status.rules.get(rule) {
            *per_policy.entry(r.policy.as_str()).or_default() += n;
        }
    }
    let policies = status
        .policies
        .iter()
        .map(|p| PolicyRow {
            policy: p.policy.clone(),
            policy_types: p.policy_types.iter().map(|t| (*t).to_owned()).collect(),
            selects: p.selects.clone(),
            entries: p.entries,
            kernel_entries: per_policy.get(p.policy.as_str()).copied().unwrap_or(0),
        })
        .collect();
    let endpoints = status
        .endpoints
        .iter()
        .map(|e| {
            let kernel = e.cgroup_id.and_then(|id| tables.endpoint(id));
            EndpointRow {
                status: e.clone(),
                in_kernel: kernel.is_some_and(|k| k.policy_set == e.policy_set),
                kernel_entries: kernel
                    .and_then(|k| per_set.get(&k.policy_set).copied())
                    .unwrap_or(0),
            }
        })
        .collect();
    Ok(PoliciesDoc {
        policies,
        endpoints,
        problems: status
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.message))
            .collect(),
        sync_errors: status
            .sync_errors
            .iter()
            .map(|f| f.message.clone())
            .collect(),
        identities: status.identities,
        ipcache_entries: status.ipcache_entries,
        policy_entries: status.policy_entries,
    })
}

pub(super) async fn check_handler(
    State(state): State<AdminState>,
    Query(q): Query<CheckQuery>,
) -> Response {
    // A side on another node compiles the whole store: off the async workers.
    let answer = tokio::task::spawn_blocking(move || check(&state, &q)).await;
    match answer {
        Ok(Ok(Ok(doc))) => Json(doc).into_response(),
        Ok(Ok(Err(bad))) => (StatusCode::BAD_REQUEST, bad).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        "SCTP" => Some(IPPROTO_SCTP),
        _ => None,
    }
}

/// What judging one side of a connection needs.
struct Judging<'a> {
    tables: KernelTables,
    status: &'a PolicyStatus,
    store: &'a Store,
    /// This agent's `--node-name`.
    here: Option<String>,
    protocol: u8,
    protocol_name: &'a str,
    port: u16,
}

/// One side of a connection: the pod whose policies judge it, and its peer.
struct Side<'a> {
    direction: Direction,
    pod: &'a str,
    /// The pod's cgroup, when it runs on this node.
    cgroup_id: Option<u64>,
    peer: IpAddr,
}

/// A verdict and what explains it.
struct Decided {
    verdict: Verdict,
    /// The rule that allowed it.
    rule: Option<String>,
    /// The policies isolating the pod in the side's direction.
    isolating: Vec<String>,
}

/// The cgroup a pod of another node is bound to in the store compiled for it.
const AS_IF_CGROUP: &str = "(as if local)";

impl Judging<'_> {
    /// The verdict for one side: from the kernel when the pod runs here (its cgroup exists),
    /// computed as its node's agent computes it otherwise.
    fn side(&self, s: &Side<'_>) -> SideVerdict {
        let local = self.status.endpoints.iter().find(|e| e.pod == s.pod);
        let node = self.node_of(s.pod);
        let (Some(local), Some(cgroup_id)) = (local, s.cgroup_id) else {
            return match self.computed(s) {
                Some(d) => self.verdict(s, node, "computed", &d),
                None => self.unknown(s, node),
            };
        };
        let verdict = self
            .tables
            .judge(cgroup_id, s.direction, s.peer, self.protocol, self.port);
        let d = Decided {
            verdict,
            rule: verdict
                .rule
                .and_then(|r| self.status.rules.get(&r))
                .map(ToString::to_string),
            isolating: match s.direction {
                Direction::Egress => local.egress_policies.clone(),
                Direction::Ingress => local.ingress_policies.clone(),
            },
        };
        self.verdict(s, node, "kernel", &d)
    }

    /// The pod's side as the agent of its node decides it: the same objects compiled with
    /// only this pod bound.
    fn computed(&self, s: &Side<'_>) -> Option<Decided> {
        let key = s
            .pod
            .split_once('/')
            .map(|(n, p)| (n.to_owned(), p.to_owned()))?;
        let store = self.store.as_if_only_bound(&key, AS_IF_CGROUP);
        let mut ids = crate::compile::policy::Ids::default();
        let policies = crate::compile::policy::compile(&store, &[], &mut ids, u32::MAX);
        let ep = policies.endpoints.get(AS_IF_CGROUP)?;
        let verdict = judge(
            &Compiled(&policies),
            &ep.info,
            s.direction,
            s.peer,
            self.protocol,
            self.port,
        );
        Some(Decided {
            verdict,
            rule: verdict
                .rule
                .and_then(|r| policies.rules.get(&r))
                .map(ToString::to_string),
            isolating: match s.direction {
                Direction::Egress => ep.egress_policies.clone(),
                Direction::Ingress => ep.ingress_policies.clone(),
            },
        })
    }

    fn verdict(
        &self,
        s: &Side<'_>,
        node: Option<String>,
        judged_by: &str,
        d: &Decided,
    ) -> SideVerdict {
        let (name, pod) = (s.direction.as_str(), s.pod);
        let v = d.verdict;
        let kernel = judged_by == "kernel";
        let mut reason = match (v.allowed, v.matched, &d.rule) {
            (true, "not-isolated", _) => format!("no policy selects {pod} for {name}"),
            (true, "host-or-self", _) => {
                "always allowed: the node itself, loopback, or the pod reaching itself".into()
            }
            (true, _, Some(r)) => format!("allowed by {r}"),
            (true, m, None) => format!("allowed ({m})"),
            (false, ..) => format!(
                "{pod} is isolated for {name} by {} and no rule allows {} on {}/{}",
                d.isolating.join(", "),
                if kernel {
                    format!("peer identity {}", v.peer_identity)
                } else {
                    "the peer".to_owned()
                },
                self.port,
                self.protocol_name
            ),
        };
        let here = self.here.as_deref();
        if !kernel && (node.is_none() || node.as_deref() == here) {
            reason.push_str(&format!(
                " (computed: {pod} has no cgroup bound on this node yet, so this kernel does \
                 not judge it)"
            ));
        }
        SideVerdict {
            direction: name.into(),
            pod: pod.to_owned(),
            node,
            enforced_here: kernel,
            judged_by: judged_by.into(),
            allowed: v.allowed,
            matched: v.matched.into(),
            peer_identity: if kernel { v.peer_identity } else { 0 },
            rule: d.rule.clone(),
            reason,
        }
    }

    /// A pod of another node the store no longer holds (deleted since the query began).
    fn unknown(&self, s: &Side<'_>, node: Option<String>) -> SideVerdict {
        SideVerdict {
            direction: s.direction.as_str().into(),
            pod: s.pod.to_owned(),
            node,
            enforced_here: false,
            judged_by: "unknown".into(),
            allowed: false,
            matched: "unknown".into(),
            peer_identity: 0,
            rule: None,
            reason: format!("{} is not in this agent's store any more", s.pod),
        }
    }

    /// The node a pod is scheduled on.
    fn node_of(&self, pod: &str) -> Option<String> {
        let (ns, name) = pod.split_once('/')?;
        let p = self.store.pods.get(&(ns.to_owned(), name.to_owned()))?;
        p.spec.as_ref()?.node_name.clone()
    }
}

/// The kernel's decision for a new connection `from` → `to`; the inner error is a bad query.
fn check(state: &AdminState, q: &CheckQuery) -> Result<Result<CheckDoc, String>, Error> {
    let status = status_of(state);
    let protocol_name = q.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase();
    let Some(protocol) = protocol_number(&protocol_name) else {
        return Ok(Err(format!(
            "protocol {protocol_name:?}: use TCP, UDP or SCTP"
        )));
    };
    let pod = |name: &str| {
        status.pods.get(name).ok_or_else(|| {
            format!(
                "pod {name:?} is unknown or has no address of its own (use namespace/name; \
                 `weft policies` lists addresses several pods claim)"
            )
        })
    };
    let (from, to) = match (pod(&q.from), pod(&q.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    // The first address of a family both have (IPv4 first).
    let Some((from_ip, to_ip)) = from.ips.iter().find_map(|f| {
        to.ips
            .iter()
            .find(|t| t.is_ipv4() == f.is_ipv4())
            .map(|t| (*f, *t))
    }) else {
        return Ok(Err(format!(
            "{} and {} have no address of the same family",
            q.from, q.to
        )));
    };
    let store = Arc::clone(&*state.store.read().unwrap_or_else(|e| e.into_inner()));
    let judging = Judging {
        tables: kernel_tables(state)?,
        status: &status,
        store: &store,
        here: state
            .info
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .node_name
            .clone(),
        protocol,
        protocol_name: &protocol_name,
        port: q.port,
    };
    let side = |direction, pod: &str, cgroup_id, peer| {
        judging.side(&Side {
            direction,
            pod,
            cgroup_id,
            peer,
        })
    };
    let egress = side(Direction::Egress, &q.from, from.cgroup_id, to_ip);
    let ingress = side(Direction::Ingress, &q.to, to.cgroup_id, from_ip);
    Ok(Ok(CheckDoc {
        from: q.from.clone(),
        to: q.to.clone(),
        from_ip,
        to_ip,
        port: q.port,
        protocol: protocol_name.clone(),
        allowed: egress.allowed && ingress.allowed,
        complete: egress.judged_by == "kernel" && ingress.judged_by == "kernel",
        egress,
        ingress,
    }))
}

/// `GET /authz/check?from=NS/POD&to=NS/POD&port=N`: the decision of the destination's
/// security policy (PeerAuthentication, AuthorizationPolicy) for a new TCP connection, on the
/// last pass's store.
pub(super) async fn authz_check_handler(
    State(state): State<AdminState>,
    Query(q): Query<CheckQuery>,
) -> Response {
    let protocol = q.protocol.as_deref().unwrap_or("TCP");
    if !protocol.eq_ignore_ascii_case("TCP") {
        let bad = format!("protocol {protocol:?}: authorization applies to TCP");
        return (StatusCode::BAD_REQUEST, bad).into_response();
    }
    let key = |s: &str| {
        s.split_once('/')
            .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
            .ok_or_else(|| format!("{s:?}: use namespace/name"))
    };
    let (from, to) = match (key(&q.from), key(&q.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(e), _) | (_, Err(e)) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let store = Arc::clone(&*state.store.read().unwrap_or_else(|e| e.into_inner()));
    let (root, trust_domain) = {
        let mesh = state.mesh.read().unwrap_or_else(|e| e.into_inner());
        (mesh.root_namespace.clone(), mesh.trust_domain.clone())
    };
    let answer = tokio::task::spawn_blocking(move || {
        crate::compile::authz::check(&store, &root, &trust_domain, (&from, &to), q.port)
    })
    .await;
    match answer {
        Ok(Ok(doc)) => Json(doc).into_response(),
        Ok(Err(bad)) => (StatusCode::BAD_REQUEST, bad).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /authz`: the security policies, the local meshed workloads they select, and each
/// workload's mTLS modes (`weft authz`).
pub(super) async fn authz_handler(State(state): State<AdminState>) -> Response {
    let store = Arc::clone(&*state.store.read().unwrap_or_else(|e| e.into_inner()));
    let (root, trust_domain) = {
        let mesh = state.mesh.read().unwrap_or_else(|e| e.into_inner());
        (mesh.root_namespace.clone(), mesh.trust_domain.clone())
    };
    let local: Vec<String> = status_of(&state)
        .endpoints
        .iter()
        .map(|e| e.pod.clone())
        .collect();
    let answer = tokio::task::spawn_blocking(move || {
        let meshed = crate::compile::mesh::enrollment(&store, &trust_domain).meshed;
        let keys: Vec<crate::store::Key> = local
            .iter()
            .filter_map(|p| p.split_once('/'))
            .map(|(ns, n)| (ns.to_owned(), n.to_owned()))
            .filter(|k| meshed.contains_key(k))
            .collect();
        crate::compile::authz::listing(&store, &root, &keys)
    })
    .await;
    match answer {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
