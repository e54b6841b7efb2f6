//! A direct reading of Istio's security API (istio.io "Authorization Policy" and "Peer
//! Authentication" references), over the documents as written: no compiled matchers. The
//! table and the random worlds compare weft's decisions against it.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde_json::Value;

pub const TRUST_DOMAIN: &str = "cluster.local";

/// A connection: the caller's address and verified (trust domain, namespace, service
/// account), the destination's address and port.
#[derive(Debug, Clone)]
pub struct Call {
    pub source: IpAddr,
    pub identity: Option<(String, String, String)>,
    pub destination: IpAddr,
    pub port: u16,
}

/// The destination workload.
#[derive(Debug, Clone)]
pub struct Dest<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// (allowed, reason) as `Reason::as_str` names it.
pub fn decide(
    root: &str,
    d: &Dest,
    authz: &[Value],
    peer_auth: &[Value],
    c: &Call,
) -> (bool, &'static str) {
    if c.identity.is_none() && strict(root, d, peer_auth, c.port) {
        return (false, "mtls_required");
    }
    let applying: Vec<&Value> = authz.iter().filter(|p| applies(root, d, p)).collect();
    let action = |p: &Value| p["spec"]["action"].as_str().unwrap_or("ALLOW").to_owned();
    let any_match = |wanted: &str| {
        applying
            .iter()
            .filter(|p| action(p) == wanted)
            .any(|p| policy_matches(p, wanted, c))
    };
    if any_match("CUSTOM") {
        return (false, "custom");
    }
    if any_match("DENY") {
        return (false, "denied");
    }
    if !applying.iter().any(|p| action(p) == "ALLOW") {
        return (true, "no_policy");
    }
    if any_match("ALLOW") {
        (true, "allowed")
    } else {
        (false, "not_allowed")
    }
}

/// "The selector will match with workloads in the same namespace as the policy. If the policy
/// is in the root namespace, the selector will additionally match with workloads in all
/// namespaces." Policies with targetRefs are for waypoints.
fn applies(root: &str, d: &Dest, p: &Value) -> bool {
    let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
    let spec = &p["spec"];
    if !spec["targetRef"].is_null() || !spec["targetRefs"].is_null() {
        return false;
    }
    (ns == d.namespace || ns == root) && labels_match(&spec["selector"], d.labels)
}

fn labels_match(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector["matchLabels"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    })
}

fn policy_matches(p: &Value, action: &str, c: &Call) -> bool {
    let ns = p["metadata"]["namespace"].as_str().unwrap_or("default");
    let rules = p["spec"]["rules"].as_array().cloned().unwrap_or_default();
    rules.iter().any(|r| rule_matches(r, ns, action, c))
}

const HTTP_SOURCE: [&str; 2] = ["requestPrincipals", "notRequestPrincipals"];
const HTTP_OPERATION: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
const L4_KEYS: [&str; 7] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
];

/// "A match occurs when at least one source, one operation and all conditions matches."
/// HTTP fields: an ALLOW rule with one matches nothing; other rules ignore them. An empty
/// list is an absent one (protobuf JSON). `broad`: the rule is not an ALLOW, so what is
/// uncertain (a `*` inside a namespace) reads as matching.
fn rule_matches(rule: &Value, ns: &str, action: &str, c: &Call) -> bool {
    let given = |v: &Value, field: &str| v[field].as_array().is_some_and(|a| !a.is_empty());
    let sources: Vec<Value> = list(&rule["from"])
        .into_iter()
        .map(|f| f["source"].clone())
        .collect();
    let operations: Vec<Value> = list(&rule["to"])
        .into_iter()
        .map(|t| t["operation"].clone())
        .collect();
    let conditions = list(&rule["when"]);
    let http = sources
        .iter()
        .any(|s| HTTP_SOURCE.iter().any(|f| given(s, f)))
        || operations
            .iter()
            .any(|o| HTTP_OPERATION.iter().any(|f| given(o, f)))
        || conditions
            .iter()
            .any(|w| !L4_KEYS.contains(&w["key"].as_str().unwrap_or("")));
    if http && action == "ALLOW" {
        return false;
    }
    let broad = action != "ALLOW";
    (sources.is_empty() || sources.iter().any(|s| source_matches(s, ns, broad, c)))
        && (operations.is_empty() || operations.iter().any(|o| operation_matches(o, c)))
        && conditions
            .iter()
            .all(|w| condition_matches(w, ns, broad, c))
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    list(v)
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// A field and its `not` field: "some value matches" when given, "no value matches" for the
/// negation. `matches(value, broad)`: a negation reads the other way round (excluding more is
/// matching less).
fn both(
    v: &Value,
    field: &str,
    not_field: &str,
    broad: bool,
    matches: &dyn Fn(&str, bool) -> bool,
) -> bool {
    let values = strings(&v[field]);
    let not_values = strings(&v[not_field]);
    (values.is_empty() || values.iter().any(|x| matches(x, broad)))
        && !not_values.iter().any(|x| matches(x, !broad))
}

/// Service accounts without a namespace are in the policy's (`ns`).
fn source_matches(s: &Value, ns: &str, broad: bool, c: &Call) -> bool {
    let principal = |p: &str, _| principal_matches(p, c);
    let namespace = |n: &str, broad| namespace_matches(n, broad, c);
    let domain = |d: &str, _| c.identity.as_ref().is_some_and(|(td, _, _)| wild(d, td));
    let account = |a: &str, _| account_matches(a, ns, c);
    let ip = |b: &str, _| in_block(b, c.source);
    both(s, "principals", "notPrincipals", broad, &principal)
        && both(s, "namespaces", "notNamespaces", broad, &namespace)
        && both(s, "trustDomains", "notTrustDomains", broad, &domain)
        && both(s, "serviceAccounts", "notServiceAccounts", broad, &account)
        && both(s, "ipBlocks", "notIpBlocks", broad, &ip)
        && both(s, "remoteIpBlocks", "notRemoteIpBlocks", broad, &ip)
}

/// Sidecars read a `*` inside a namespace as a glob, ztunnel as a literal: a broad reading
/// takes the glob, a narrow one the literal.
fn namespace_matches(pattern: &str, broad: bool, c: &Call) -> bool {
    let Some((_, ns, _)) = &c.identity else {
        return false;
    };
    let stars = pattern.matches('*').count();
    let documented =
        stars == 0 || (stars == 1 && (pattern.starts_with('*') || pattern.ends_with('*')));
    match (!documented, broad) {
        (false, _) => wild(pattern, ns),
        (true, false) => pattern == ns,
        (true, true) => glob(pattern.as_bytes(), ns.as_bytes()),
    }
}

/// `*` matches any run, by recursion (the patterns are short).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((p, rest)) => text
            .split_first()
            .is_some_and(|(t, more)| t == p && glob(rest, more)),
    }
}

fn operation_matches(o: &Value, c: &Call) -> bool {
    both(o, "ports", "notPorts", false, &|p: &str, _| {
        p.parse::<u16>().is_ok_and(|p| p == c.port)
    })
}

/// A value and the reading it is matched in, to whether it matches.
type Matcher<'a> = Box<dyn Fn(&str, bool) -> bool + 'a>;

fn condition_matches(w: &Value, ns: &str, broad: bool, c: &Call) -> bool {
    let key = w["key"].as_str().unwrap_or("");
    let matches: Matcher = match key {
        "source.ip" | "remote.ip" => Box::new(|b: &str, _| in_block(b, c.source)),
        "destination.ip" => Box::new(|b: &str, _| in_block(b, c.destination)),
        "destination.port" => Box::new(|p: &str, _| p.parse::<u16>().is_ok_and(|p| p == c.port)),
        "source.principal" => Box::new(|p: &str, _| principal_matches(p, c)),
        "source.namespace" => Box::new(|n: &str, broad| namespace_matches(n, broad, c)),
        "source.serviceAccount" => Box::new(|a: &str, _| account_matches(a, ns, c)),
        // An HTTP attribute in a rule that is not ALLOW: read without it.
        _ => return true,
    };
    both(w, "values", "notValues", broad, &*matches)
}

/// "Exact match, prefix match (`abc*`), suffix match (`*abc`) and presence match (`*`)".
fn wild(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

/// "Principals ... derived from the peer certificate. This field requires mTLS enabled."
/// `cluster.local` names the mesh's own trust domain.
fn principal_matches(pattern: &str, c: &Call) -> bool {
    c.identity.as_ref().is_some_and(|(td, ns, sa)| {
        wild(pattern, &format!("{td}/ns/{ns}/sa/{sa}"))
            || wild(pattern, &format!("cluster.local/ns/{ns}/sa/{sa}"))
    })
}

fn account_matches(account: &str, policy_ns: &str, c: &Call) -> bool {
    let (ns, sa) = account.split_once('/').unwrap_or((policy_ns, account));
    c.identity
        .as_ref()
        .is_some_and(|(_, n, s)| n == ns && s == sa)
}

fn in_block(block: &str, ip: IpAddr) -> bool {
    if let Ok(net) = block.parse::<IpNet>() {
        net.contains(&ip)
    } else {
        block.parse::<IpAddr>().is_ok_and(|b| b == ip)
    }
}

/// PeerAuthentication: mesh (root namespace, no selector) < namespace < workload (selector)
/// < its port; UNSET inherits; of one scope the first by name (files carry no creation time).
fn strict(root: &str, d: &Dest, peer_auth: &[Value], port: u16) -> bool {
    let ns_of = |p: &Value| {
        p["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    let name_of = |p: &Value| p["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let has_selector = |p: &Value| {
        p["spec"]["selector"]["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    };
    let first = |pred: &dyn Fn(&Value) -> bool| -> Option<Value> {
        let mut found: Vec<&Value> = peer_auth.iter().filter(|p| pred(p)).collect();
        found.sort_by_key(|p| name_of(p));
        found.first().map(|p| (*p).clone())
    };
    let mesh = first(&|p| ns_of(p) == root && !has_selector(p));
    let namespace = first(&|p| ns_of(p) == d.namespace && ns_of(p) != root && !has_selector(p));
    let workload = first(&|p| {
        ns_of(p) == d.namespace
            && ns_of(p) != root
            && has_selector(p)
            && labels_match(&p["spec"]["selector"], d.labels)
    });
    let mut is_strict = false;
    let apply = |mode: &Value, current: &mut bool| match mode.as_str() {
        Some("STRICT") => *current = true,
        Some("PERMISSIVE" | "DISABLE") => *current = false,
        _ => {}
    };
    for p in [&mesh, &namespace, &workload].into_iter().flatten() {
        apply(&p["spec"]["mtls"]["mode"], &mut is_strict);
    }
    if let Some(w) = &workload {
        let at_port = &w["spec"]["portLevelMtls"][port.to_string()];
        if !at_port.is_null() {
            apply(&at_port["mode"], &mut is_strict);
        }
    }
    is_strict
}
