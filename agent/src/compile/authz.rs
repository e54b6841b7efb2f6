//! Istio's security API for meshed pods: the mutual TLS mode of each port
//! (PeerAuthentication, [`mtls`]), the AuthorizationPolicies that apply, and the decision
//! for a connection ([`decide`]).
//!
//! Scope: a policy without a selector applies to its namespace, or to the whole mesh in the
//! root namespace; a selector selects in its namespace, and from the root namespace in every
//! namespace. A policy with `targetRef(s)` is for waypoints and gateways, not for weft.
//!
//! Evaluation, in Istio's order: a STRICT port refuses a caller without a verified identity;
//! any matching CUSTOM or DENY rule denies; with no ALLOW policy the connection is allowed;
//! otherwise some ALLOW rule must match (an ALLOW policy without rules matches nothing).
//! AUDIT policies never change the verdict; the first that matches is named. weft cannot ask
//! a CUSTOM policy's external authorizer, so a CUSTOM rule that matches denies.
mod index;
pub mod mtls;
pub mod rules;
pub mod table;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::Serialize;

use self::{
    index::CallerIndex,
    mtls::{Modes, Tls},
    rules::{Need, Peer, Reading, Rule, View},
};
use crate::{
    compile::policy::{PlaintextTable, selector::Labels},
    identity::SpiffeId,
    store::{
        Key, Store,
        security::{Action, AuthorizationPolicy},
        stand_in::REJECTED_ANNOTATION,
    },
};

/// The name of the policy that stands in for AuthorizationPolicies not listed yet.
pub const UNLISTED: &str = "(AuthorizationPolicies not listed yet)";
/// What decided the mode while PeerAuthentications are not listed yet.
pub const UNLISTED_PEER: &str = "(PeerAuthentications not listed yet)";

/// The annotation that makes a policy a dry run.
pub const DRY_RUN: &str = "istio.io/dry-run";

/// Something that compiles but does not do all its author wrote.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub struct Problem {
    /// `AuthorizationPolicy namespace/name`, `PeerAuthentication namespace/name`.
    pub object: String,
    pub message: String,
}

/// An AuthorizationPolicy as weft applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Stands in for a version weft could not read.
    pub stand_in: bool,
}

impl Policy {
    /// What a rule cannot know: an ALLOW rule reads it as matching less, the others as
    /// matching more.
    fn reading(&self) -> Reading {
        if self.action == Action::Allow {
            Reading::Narrow
        } else {
            Reading::Broad
        }
    }

    /// The index of the first rule that matches the peer `view` shows.
    fn first_match(&self, view: &View<'_>) -> Option<usize> {
        let reading = self.reading();
        self.rules.iter().position(|r| r.matches(view, reading))
    }

    /// What a peer must show, one of, for some rule to match (None: a peer showing none
    /// may match).
    fn needs(&self) -> Option<Vec<Need>> {
        let reading = self.reading();
        let mut out = Vec::new();
        for r in &self.rules {
            out.extend(r.needs(reading)?);
        }
        Some(out)
    }
}

/// What applies to one workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub mtls: Modes,
    /// By name. Private: the index is built from it, and must be rebuilt with it.
    policies: Vec<Arc<Policy>>,
    /// Which policies a peer may match, by what it shows (None: all are tried). Built
    /// last, from the final `policies`.
    #[serde(skip)]
    index: Option<CallerIndex>,
}

/// The compiled security state of the pods compiled for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Authz {
    pub workloads: BTreeMap<Key, Workload>,
    /// Every policy, by `namespace/name`, with the workloads it selects.
    pub policies: BTreeMap<String, Vec<Key>>,
    pub problems: Vec<Problem>,
}

/// Compiles the store's security policies for `pods` (the meshed pods this node serves).
pub fn compile<'a>(store: &Store, root: &str, pods: impl IntoIterator<Item = &'a Key>) -> Authz {
    let mut out = Authz::default();
    let mut policies = Vec::new();
    for ((ns, name), ap) in &store.authorization_policies {
        let full = format!("{ns}/{name}");
        out.policies.insert(full.clone(), Vec::new());
        if let Some(p) = compile_policy(&full, ns, ap, &mut out.problems) {
            policies.push((ns.as_str(), ap, Arc::new(p)));
        }
    }
    // Kinds not listed yet: every meshed pod is STRICT and denies everything until they are
    // (what they hold may refuse anything).
    let unknown_pa = store
        .unlisted
        .contains(&crate::store::Kind::PeerAuthentication);
    let unknown_ap = store
        .unlisted
        .contains(&crate::store::Kind::AuthorizationPolicy);
    let deny_all = unknown_ap.then(|| {
        Arc::new(Policy {
            name: UNLISTED.to_owned(),
            action: Action::Deny,
            rules: vec![Rule::default()],
            stand_in: true,
        })
    });
    for (kind, unknown) in [
        ("PeerAuthentications", unknown_pa),
        ("AuthorizationPolicies", unknown_ap),
    ] {
        if unknown {
            out.problems.push(Problem {
                object: format!("{kind} (not listed yet)"),
                message: format!(
                    "the API server serves {kind} but they are not listed yet: every meshed \
                     pod of this node is STRICT and denies every connection until they are"
                ),
            });
        }
    }
    let no_labels = Labels::new();
    for key in pods {
        let Some(pod) = store.pods.get(key) else {
            continue;
        };
        let labels = pod.metadata.labels.as_ref().unwrap_or(&no_labels);
        let namespace = key.0.as_str();
        let w = mtls::Workload { namespace, labels };
        let mut workload = Workload {
            mtls: mtls::modes(&store.peer_authentications, root, w, &mut out.problems),
            policies: Vec::new(),
            index: None,
        };
        for (ns, ap, p) in &policies {
            if applies(ap, ns, root, w) {
                workload.policies.push(Arc::clone(p));
                out.policies
                    .entry(p.name.clone())
                    .or_default()
                    .push(key.clone());
            }
        }
        if unknown_pa {
            workload.mtls = Modes {
                default: Tls::Strict,
                ports: BTreeMap::new(),
                from: vec![UNLISTED_PEER.to_owned()],
            };
        }
        workload.policies.extend(deny_all.clone());
        workload.index = Some(CallerIndex::of(&workload.policies));
        out.workloads.insert(key.clone(), workload);
    }
    root_selectors(store, root, &mut out.problems);
    out.problems.sort();
    out.problems.dedup();
    out
}

/// What the datapath must do for the meshed pods of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guarded {
    /// Pods that refuse some plaintext caller, with their plaintext tables: the kernel judges
    /// plaintext connections to them that no proxy delivered by the table (`EP_AUTHZ`).
    pub plaintext_refused: BTreeMap<Key, PlaintextTable>,
    /// Pods whose callers' identities matter (some AuthorizationPolicy applies, or plaintext
    /// is refused): a meshed pod of this node reaches them through the proxy, which decides
    /// on the caller's identity (`IP_MESHED_LOCAL`).
    pub proxied: std::collections::BTreeSet<Key>,
    pub problems: Vec<Problem>,
}

/// What the datapath must do for `pods` (meshed pods of this node). Plaintext is judged at
/// each of the pod's addresses; a pod without one yet refuses every plaintext caller when
/// anything applies to it.
pub fn guarded<'a>(store: &Store, root: &str, pods: impl IntoIterator<Item = &'a Key>) -> Guarded {
    let authz = compile(store, root, pods);
    let mut out = Guarded::default();
    for (key, w) in &authz.workloads {
        let ips = store
            .pods
            .get(key)
            .map(|p| crate::compile::addresses::own_addresses(p))
            .unwrap_or_default();
        let applies =
            !w.policies.is_empty() || w.mtls.default == Tls::Strict || !w.mtls.ports.is_empty();
        let table = table::kernel_table(w, &ips);
        let denies = if ips.is_empty() {
            applies
        } else {
            table.values().any(|allowed| !allowed)
        };
        if denies {
            out.plaintext_refused.insert(key.clone(), table);
        }
        if denies || !w.policies.is_empty() {
            out.proxied.insert(key.clone());
        }
    }
    out.problems = authz.problems;
    out
}

/// A policy's rules, or `None` when it is not weft's to apply (reported).
fn compile_policy(
    full: &str,
    ns: &str,
    ap: &AuthorizationPolicy,
    problems: &mut Vec<Problem>,
) -> Option<Policy> {
    let spec = &ap.spec;
    let object = format!("AuthorizationPolicy {full}");
    let mut problem = |message: String| {
        problems.push(Problem {
            object: object.clone(),
            message,
        });
    };
    if spec.target_ref.is_some() || spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()) {
        problem("targets a Service or Gateway (targetRef): enforced by a waypoint or gateway, not by weft".into());
        return None;
    }
    let dry_run = ap
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN));
    if dry_run.is_some_and(|v| v == "true") {
        problem(format!(
            "{DRY_RUN}: Istio logs what it would decide and enforces nothing; weft does not enforce it either"
        ));
        return None;
    }
    let action = spec.action.unwrap_or(Action::Allow);
    let rules: Vec<Rule> = spec
        .rules
        .iter()
        .flatten()
        .map(|r| Rule::compile(r, ns))
        .collect();
    if action == Action::Custom {
        problem("CUSTOM: weft cannot ask the external authorizer, so connections its rules match are denied".into());
    }
    for (i, r) in rules.iter().enumerate().filter(|(_, r)| !r.http.is_empty()) {
        let effect = if action == Action::Allow {
            "this ALLOW rule matches no connection"
        } else {
            "this rule is applied without them, so it matches more connections than written"
        };
        problem(format!(
            "rules[{i}] needs HTTP attributes ({}), which weft cannot see at L4: {effect}",
            r.http.join(", ")
        ));
    }
    Some(Policy {
        name: full.to_owned(),
        action,
        rules,
        stand_in: ap
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(REJECTED_ANNOTATION)),
    })
}

/// Whether the policy `ap` of namespace `ns` applies to the workload.
fn applies(ap: &AuthorizationPolicy, ns: &str, root: &str, w: mtls::Workload) -> bool {
    (ns == w.namespace || ns == root)
        && ap
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(w.labels))
}

fn root_selectors(store: &Store, root: &str, problems: &mut Vec<Problem>) {
    for ((ns, name), pa) in &store.peer_authentications {
        if ns == root && pa.spec.selects_workloads() {
            problems.push(Problem {
                object: format!("PeerAuthentication {ns}/{name}"),
                message: "a selector in the root namespace has no effect (as in Istio): use the \
                          workload's namespace"
                    .into(),
            });
        }
    }
}

/// A connection to a workload, as the destination sees it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's address.
    pub source: IpAddr,
    /// The client's verified identity; `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    /// The workload's address and port.
    pub destination: IpAddr,
    pub port: u16,
}

/// Why a connection was allowed or denied.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No ALLOW policy applies and nothing denied.
    NoPolicy,
    /// An ALLOW rule matched.
    Allowed,
    /// A DENY rule matched.
    Denied,
    /// A CUSTOM rule matched (weft cannot ask its authorizer).
    Custom,
    /// ALLOW policies apply and none matched.
    NotAllowed,
    /// The port is STRICT and the caller has no verified identity.
    MtlsRequired,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoPolicy => "no_policy",
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Custom => "custom",
            Self::NotAllowed => "not_allowed",
            Self::MtlsRequired => "mtls_required",
        }
    }
}

/// A policy's rule: `namespace/name` and the index in `spec.rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RuleAt {
    pub policy: String,
    pub rule: usize,
}

/// The decision for a connection and what reached it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The rule that decided, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<RuleAt>,
    /// The first AUDIT rule that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<RuleAt>,
}

/// Decides a connection to the workload `w`.
pub fn decide(w: &Workload, c: &Connection) -> Decision {
    // `::ffff:10.0.0.5` is 10.0.0.5 to every policy.
    let peer = Peer {
        source: c.source.to_canonical(),
        identity: c.identity,
        destination: c.destination.to_canonical(),
        port: c.port,
    };
    let view = View::of(&peer);
    let candidates: Vec<&Arc<Policy>> = match &w.index {
        Some(index) => index
            .candidates(&view)
            .into_iter()
            .filter_map(|i| w.policies.get(i))
            .collect(),
        None => w.policies.iter().collect(),
    };
    let matching = |action: Action| {
        candidates
            .iter()
            .filter(move |p| p.action == action)
            .find_map(|p| {
                p.first_match(&view).map(|rule| RuleAt {
                    policy: p.name.clone(),
                    rule,
                })
            })
    };
    let audit = matching(Action::Audit);
    let decision = |allowed, reason, by| Decision {
        allowed,
        reason,
        by,
        audit: audit.clone(),
    };
    if c.identity.is_none() && w.mtls.of_port(c.port) == Tls::Strict {
        return decision(false, Reason::MtlsRequired, None);
    }
    if let Some(by) = matching(Action::Custom) {
        return decision(false, Reason::Custom, Some(by));
    }
    if let Some(by) = matching(Action::Deny) {
        return decision(false, Reason::Denied, Some(by));
    }
    if !w.policies.iter().any(|p| p.action == Action::Allow) {
        return decision(true, Reason::NoPolicy, None);
    }
    match matching(Action::Allow) {
        Some(by) => decision(true, Reason::Allowed, Some(by)),
        None => decision(false, Reason::NotAllowed, None),
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// What `weft authz check` answers: the decision for a new TCP connection between two pods,
/// on the store's policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CheckDoc {
    pub from: String,
    pub to: String,
    pub from_ip: IpAddr,
    pub to_ip: IpAddr,
    pub port: u16,
    /// The identity the caller proves (a meshed client's), none for plaintext.
    pub identity: Option<String>,
    /// Whether the destination is meshed (authorization applies to meshed pods only).
    pub meshed: bool,
    /// The port's mutual TLS mode, `STRICT` or `PERMISSIVE`.
    pub mtls: String,
    pub allowed: bool,
    /// `Reason::as_str`, or `not_meshed`.
    pub reason: String,
    /// The deciding policy (`namespace/name`) and rule index.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    /// The first AUDIT policy that matches.
    pub audit: Option<String>,
}

/// The decision for a connection from pod `from` to pod `to` (both `(namespace, name)`) on
/// `port`, as the destination's node would take it. `Err`: why it cannot be asked.
pub fn check(
    store: &Store,
    root: &str,
    trust_domain: &str,
    (from, to): (&Key, &Key),
    port: u16,
) -> Result<CheckDoc, String> {
    let pod = |k: &Key| {
        store
            .pods
            .get(k)
            .ok_or_else(|| format!("pod {}/{} is unknown", k.0, k.1))
    };
    let (from_pod, to_pod) = (pod(from)?, pod(to)?);
    let from_ips = crate::compile::addresses::own_addresses(from_pod);
    let to_ips = crate::compile::addresses::own_addresses(to_pod);
    let (from_ip, to_ip) = from_ips
        .iter()
        .find_map(|f| {
            to_ips
                .iter()
                .find(|t| t.is_ipv4() == f.is_ipv4())
                .map(|t| (*f, *t))
        })
        .ok_or_else(|| {
            format!(
                "{}/{} and {}/{} have no address of one family",
                from.0, from.1, to.0, to.1
            )
        })?;
    let meshed = crate::compile::mesh::enrollment(store, trust_domain).meshed;
    let identity = meshed.get(from);
    let authz = compile(store, root, [to]);
    let mut doc = CheckDoc {
        from: format!("{}/{}", from.0, from.1),
        to: format!("{}/{}", to.0, to.1),
        from_ip,
        to_ip,
        port,
        identity: identity.map(ToString::to_string),
        meshed: meshed.contains_key(to),
        mtls: "PERMISSIVE".to_owned(),
        allowed: true,
        reason: "not_meshed".to_owned(),
        policy: None,
        rule: None,
        audit: None,
    };
    let Some(w) = authz.workloads.get(to).filter(|_| doc.meshed) else {
        return Ok(doc);
    };
    if w.mtls.of_port(port) == Tls::Strict {
        "STRICT".clone_into(&mut doc.mtls);
    }
    let c = Connection {
        source: from_ip,
        identity,
        destination: to_ip,
        port,
    };
    let d = decide(w, &c);
    doc.allowed = d.allowed;
    d.reason.as_str().clone_into(&mut doc.reason);
    doc.policy = d.by.as_ref().map(|b| b.policy.clone());
    doc.rule = d.by.map(|b| b.rule);
    doc.audit = d.audit.map(|a| a.policy);
    Ok(doc)
}

/// What `weft authz` lists: every security policy with the local workloads it selects, and
/// every local meshed workload with its mTLS modes and policies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Listing {
    pub policies: Vec<ListedPolicy>,
    pub workloads: Vec<ListedWorkload>,
    /// What weft cannot do as written.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ListedPolicy {
    /// `AuthorizationPolicy` or `PeerAuthentication`.
    pub kind: String,
    /// `namespace/name`.
    pub name: String,
    /// ALLOW, DENY, AUDIT, CUSTOM; the mode for a PeerAuthentication.
    pub action: String,
    /// Local workloads it applies to (`namespace/name`); AuthorizationPolicies only.
    pub selects: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ListedWorkload {
    pub pod: String,
    /// The mode of every port not in `ports`.
    pub mtls: String,
    pub ports: BTreeMap<u16, String>,
    /// The PeerAuthentications that decided, widest first.
    pub mtls_from: Vec<String>,
    pub policies: Vec<String>,
}

/// The listing for `local` (the meshed pods of this node).
pub fn listing(store: &Store, root: &str, local: &[Key]) -> Listing {
    let authz = compile(store, root, local);
    let name = |k: &Key| format!("{}/{}", k.0, k.1);
    let tls = |t: Tls| match t {
        Tls::Strict => "STRICT".to_owned(),
        Tls::Permissive => "PERMISSIVE".to_owned(),
    };
    let mut policies: Vec<ListedPolicy> = store
        .authorization_policies
        .iter()
        .map(|(k, ap)| ListedPolicy {
            kind: "AuthorizationPolicy".to_owned(),
            name: name(k),
            action: ap.spec.action.unwrap_or(Action::Allow).as_str().to_owned(),
            selects: authz
                .policies
                .get(&name(k))
                .into_iter()
                .flatten()
                .map(name)
                .collect(),
        })
        .collect();
    policies.extend(store.peer_authentications.iter().map(|(k, pa)| {
        let mode = crate::store::security::MutualTls::mode(pa.spec.mtls.as_ref());
        ListedPolicy {
            kind: "PeerAuthentication".to_owned(),
            name: name(k),
            action: format!("{mode:?}").to_uppercase(),
            selects: Vec::new(),
        }
    }));
    let workloads = authz
        .workloads
        .iter()
        .map(|(k, w)| ListedWorkload {
            pod: name(k),
            mtls: tls(w.mtls.default),
            ports: w.mtls.ports.iter().map(|(p, t)| (*p, tls(*t))).collect(),
            mtls_from: w.mtls.from.clone(),
            policies: w.policies.iter().map(|p| p.name.clone()).collect(),
        })
        .collect();
    Listing {
        policies,
        workloads,
        problems: authz.problems,
    }
}
