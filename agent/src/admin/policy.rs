//! `GET /policies` and `GET /policy/check`: what policy the kernel enforces, read from the
//! pinned maps (not from the syncer's memory), and the kernel's decision for a pod pair.
use std::{collections::BTreeMap, net::IpAddr};

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use aya::maps::{
    HashMap, Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use serde::{Deserialize, Serialize};
use weft_abi::net::{Direction, ip_words};
use weft_abi::{
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, maps,
    policy::{
        EndpointInfo, IPCACHE_PREFIX_FAMILY, IpcacheData, IpcacheValue, POLICY_PREFIX_FULL,
        PolicyData, PolicyValue,
    },
};

use super::{AdminState, Error};
use crate::{
    compile::policy::judge::{Tables, judge},
    pipeline::policy::{EndpointStatus, PolicyStatus},
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
    /// Whether this node enforces it (the pod runs here and its cgroup exists).
    pub enforced_here: bool,
    pub allowed: bool,
    /// How: l3-l4, l3-only, l4-only, all, host-or-self, none, not-isolated, not-on-this-node.
    pub matched: String,
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
    /// Neither side denies (what this node can tell: see `complete`).
    pub allowed: bool,
    /// Both pods run on this node, so both sides were judged here. Otherwise the other node
    /// judges its pod's side and `allowed` covers only this node's.
    pub complete: bool,
    pub egress: SideVerdict,
    pub ingress: SideVerdict,
}

/// Entries by set or by rule.
type Counts = BTreeMap<u32, usize>;

/// The pinned policy maps, looked up the way the kernel does.
struct KernelTables {
    endpoints: HashMap<MapData, u64, EndpointInfo>,
    ipcache: LpmTrie<MapData, IpcacheData, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyData, PolicyValue>,
}

impl KernelTables {
    /// A pod's endpoint as the kernel takes it: one whose seal does not match is no endpoint
    /// (the kernel judges the pod as not bound).
    fn endpoint(&self, id: u64) -> Option<EndpointInfo> {
        self.endpoints
            .get(&id, 0)
            .ok()
            .filter(|e| e.is_sealed_for(id))
    }

    fn open(state: &AdminState) -> Result<Self, Error> {
        let open = |map: &'static str| {
            MapData::from_pin(state.pins.map(map)).map_err(|source| Error::Map { map, source })
        };
        let err = |map: &'static str| move |source| Error::Map { map, source };
        Ok(Self {
            endpoints: HashMap::try_from(Map::HashMap(open(maps::ENDPOINTS)?))
                .map_err(err(maps::ENDPOINTS))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(open(maps::IPCACHE)?))
                .map_err(err(maps::IPCACHE))?,
            policy: LpmTrie::try_from(Map::LpmTrie(open(maps::POLICY)?))
                .map_err(err(maps::POLICY))?,
        })
    }

    /// Kernel `POLICY` entries: per set, and per rule.
    fn entry_counts(&self) -> Result<(Counts, Counts), Error> {
        let (mut sets, mut rules) = (BTreeMap::new(), BTreeMap::new());
        for item in self.policy.iter() {
            let (k, v) = item.map_err(|source| Error::Map {
                map: maps::POLICY,
                source,
            })?;
            *sets.entry(k.data().policy_set).or_default() += 1;
            *rules.entry(v.rule).or_default() += 1;
        }
        Ok((sets, rules))
    }
}

impl Tables for KernelTables {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue> {
        let (family, addr) = ip_words(ip);
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let key = Key::new(
            IPCACHE_PREFIX_FAMILY + bits,
            IpcacheData {
                family: family as u32,
                addr,
            },
        );
        self.ipcache.get(&key, 0).ok()
    }

    fn policy(&self, data: &PolicyData) -> Option<PolicyValue> {
        self.policy
            .get(&Key::new(POLICY_PREFIX_FULL, *data), 0)
            .ok()
    }
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
    let tables = KernelTables::open(state)?;
    let (per_set, per_rule) = tables.entry_counts()?;
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
    match check(&state, &q) {
        Ok(Ok(doc)) => Json(doc).into_response(),
        Ok(Err(bad)) => (StatusCode::BAD_REQUEST, bad).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)).into_response(),
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
    protocol: u8,
    protocol_name: &'a str,
    port: u16,
}

/// One side of a connection: the pod whose policy judges it, and its peer.
struct Side<'a> {
    direction: Direction,
    pod: &'a str,
    /// The pod's cgroup, when it runs on this node.
    cgroup_id: Option<u64>,
    peer: IpAddr,
}

impl Judging<'_> {
    /// The kernel's verdict for one side, with the rule or policies that decide it.
    fn side(&self, s: &Side<'_>) -> SideVerdict {
        let (name, pod) = (s.direction.as_str(), s.pod);
        let ep = s.cgroup_id.and_then(|id| self.tables.endpoint(id));
        let Some(ep) = ep else {
            return self.unenforced(s);
        };
        let v = judge(
            &self.tables,
            &ep,
            s.direction,
            s.peer,
            self.protocol,
            self.port,
        );
        let rule = v
            .rule
            .and_then(|r| self.status.rules.get(&r))
            .map(ToString::to_string);
        let reason = match (v.allowed, v.matched, &rule) {
            (true, "not-isolated", _) => format!("no policy selects {pod} for {name}"),
            (true, "host-or-self", _) => {
                "always allowed: the node itself, loopback, or the pod reaching itself".into()
            }
            (true, _, Some(r)) => format!("allowed by {r}"),
            (true, m, None) => format!("allowed ({m})"),
            (false, ..) => format!(
                "{pod} is isolated for {name} by {} and no rule allows peer identity {} on \
                 {}/{}",
                self.isolating(s),
                v.peer_identity,
                self.port,
                self.protocol_name
            ),
        };
        SideVerdict {
            direction: name.into(),
            pod: pod.to_owned(),
            enforced_here: true,
            allowed: v.allowed,
            matched: v.matched.into(),
            peer_identity: v.peer_identity,
            rule,
            reason,
        }
    }

    /// A side this node does not judge: the pod is not isolated, or runs elsewhere.
    fn unenforced(&self, s: &Side<'_>) -> SideVerdict {
        let (name, pod) = (s.direction.as_str(), s.pod);
        let here = s.cgroup_id.is_some();
        SideVerdict {
            direction: name.into(),
            pod: pod.to_owned(),
            enforced_here: here,
            allowed: true,
            matched: if here {
                "not-isolated"
            } else {
                "not-on-this-node"
            }
            .into(),
            peer_identity: self.tables.ipcache(s.peer).map_or(0, |v| v.identity),
            rule: None,
            reason: if here {
                format!("no policy selects {pod} for {name}")
            } else {
                format!("{pod} does not run on this node: its node judges its {name}")
            },
        }
    }

    /// The policies that isolate the pod in this direction.
    fn isolating(&self, s: &Side<'_>) -> String {
        self.status
            .endpoints
            .iter()
            .find(|e| e.pod == s.pod)
            .map(|e| match s.direction {
                Direction::Egress => e.egress_policies.join(", "),
                Direction::Ingress => e.ingress_policies.join(", "),
            })
            .unwrap_or_default()
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
            format!("pod {name:?} is unknown or has no address (use namespace/name)")
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
    let judging = Judging {
        tables: KernelTables::open(state)?,
        status: &status,
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
        complete: egress.matched != "not-on-this-node" && ingress.matched != "not-on-this-node",
        egress,
        ingress,
    }))
}
