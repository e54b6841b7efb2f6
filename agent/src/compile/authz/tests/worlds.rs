//! Random security policies over the fixed pods and callers, judged by weft and by the
//! reference.
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

use super::{ADMIN, CLIENT, Caller, PLAIN, ROOT, authz, peer, referee, weft, world};

use crate::compile::policy::tests::reference::Rng;

/// One to three values of `items`.
fn some(r: &mut Rng, items: &[&str]) -> Value {
    let n = 1 + r.below(3);
    json!((0..n).map(|_| *r.pick(items)).collect::<Vec<_>>())
}

const PRINCIPALS: [&str; 7] = [
    "cluster.local/ns/y/sa/client",
    "cluster.local/ns/x/sa/admin",
    "*",
    "*/sa/client",
    "cluster.local/ns/y/*",
    "*admin",
    "cluster.local/ns/x/sa/*",
];
const NAMESPACES: [&str; 8] = ["x", "y", "*", "y*", "*-*", "y**", "**", "x*x"];
const DOMAINS: [&str; 4] = ["cluster.local", "example.org", "*", "example*"];
const ACCOUNTS: [&str; 4] = ["client", "y/client", "x/admin", "admin"];
const BLOCKS: [&str; 11] = [
    "10.0.2.0/24",
    "10.0.2.20",
    "10.0.0.0/16",
    "10.0.3.0/24",
    "10.0.2.30/32",
    "10.0.2.0/25",
    "10.0.0.0/8",
    "10.0.2.16/28",
    "fd00::/64",
    "fd00::20",
    "10.0.2.999",
];
const DESTINATIONS: [&str; 3] = ["10.0.1.10", "10.0.1.0/24", "10.0.1.11"];
const PORTS: [&str; 3] = ["80", "8080", "9000"];

fn source(r: &mut Rng) -> Value {
    let mut s = serde_json::Map::new();
    // serviceAccounts may not sit beside principals or namespaces.
    let accounts = r.chance(20);
    let fields: [(&str, &[&str]); 13] = [
        ("principals", &PRINCIPALS),
        ("notPrincipals", &PRINCIPALS),
        ("namespaces", &NAMESPACES),
        ("notNamespaces", &NAMESPACES),
        ("ipBlocks", &BLOCKS),
        ("notIpBlocks", &BLOCKS),
        ("remoteIpBlocks", &BLOCKS),
        ("notRemoteIpBlocks", &BLOCKS),
        ("requestPrincipals", &["*"]),
        ("serviceAccounts", &ACCOUNTS),
        ("notServiceAccounts", &ACCOUNTS),
        ("trustDomains", &DOMAINS),
        ("notTrustDomains", &DOMAINS),
    ];
    for (field, values) in fields {
        let identity = field.contains("rincipals") && !field.contains("request")
            || field.contains("amespaces");
        let account = field.contains("ervice");
        let chance = match field {
            "requestPrincipals" => 5,
            _ if account != accounts || (accounts && identity) => 0,
            _ => 25,
        };
        if r.chance(chance) {
            s.insert(field.to_owned(), some(r, values));
        }
    }
    if s.is_empty() {
        s.insert("ipBlocks".to_owned(), some(r, &BLOCKS));
    }
    Value::Object(s)
}

fn operation(r: &mut Rng) -> Value {
    let mut op = serde_json::Map::new();
    if r.chance(60) {
        op.insert("ports".to_owned(), some(r, &PORTS));
    }
    if r.chance(30) {
        op.insert("notPorts".to_owned(), some(r, &PORTS));
    }
    if op.is_empty() || r.chance(10) {
        op.insert("methods".to_owned(), json!(["GET"]));
    }
    Value::Object(op)
}

fn condition(r: &mut Rng) -> Value {
    let (key, values): (&str, &[&str]) = *r.pick(&[
        ("source.ip", &BLOCKS[..]),
        ("remote.ip", &BLOCKS[..]),
        ("source.namespace", &NAMESPACES[..]),
        ("source.principal", &PRINCIPALS[..]),
        ("source.serviceAccount", &ACCOUNTS[..]),
        ("destination.ip", &DESTINATIONS[..]),
        ("destination.port", &PORTS[..]),
        ("request.headers[x-user]", &["a"][..]),
    ]);
    let mut c = json!({"key": key});
    let both = r.below(3);
    if both != 1 {
        c["values"] = some(r, values);
    }
    if both != 0 {
        c["notValues"] = some(r, values);
    }
    c
}

fn rule(r: &mut Rng) -> Value {
    let mut rule = serde_json::Map::new();
    if r.chance(60) {
        let from: Vec<Value> = (0..1 + r.below(2))
            .map(|_| json!({"source": source(r)}))
            .collect();
        rule.insert("from".to_owned(), json!(from));
    }
    if r.chance(40) {
        let to: Vec<Value> = (0..1 + r.below(2))
            .map(|_| json!({"operation": operation(r)}))
            .collect();
        rule.insert("to".to_owned(), json!(to));
    }
    if r.chance(35) {
        let when: Vec<Value> = (0..1 + r.below(2)).map(|_| condition(r)).collect();
        rule.insert("when".to_owned(), json!(when));
    }
    Value::Object(rule)
}

fn policy(r: &mut Rng, i: usize) -> Value {
    let ns = if r.chance(25) {
        ROOT
    } else {
        *r.pick(&["x", "x", "y"])
    };
    let mut spec = serde_json::Map::new();
    match r.below(4) {
        0 => {}
        1 => drop(spec.insert(
            "selector".to_owned(),
            json!({"matchLabels": {"app": "web"}}),
        )),
        2 => drop(spec.insert("selector".to_owned(), json!({"matchLabels": {"app": "db"}}))),
        _ => drop(spec.insert("selector".to_owned(), json!({}))),
    }
    let action = *r.pick(&["ALLOW", "ALLOW", "DENY", "AUDIT", "CUSTOM"]);
    if action != "ALLOW" || r.chance(50) {
        spec.insert("action".to_owned(), json!(action));
    }
    if action == "CUSTOM" {
        spec.insert("provider".to_owned(), json!({"name": "opa"}));
    }
    // An ALLOW policy may have no rules at all; the others must have some.
    if action != "ALLOW" || r.chance(85) {
        let rules: Vec<Value> = (0..1 + r.below(3)).map(|_| rule(r)).collect();
        spec.insert("rules".to_owned(), json!(rules));
    }
    authz(ns, &format!("p{i}"), Value::Object(spec))
}

fn peer_authentication(r: &mut Rng, i: usize) -> Value {
    let mode = |r: &mut Rng| *r.pick(&["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]);
    let ns = *r.pick(&[ROOT, "x", "x", "y"]);
    let mut spec = json!({});
    if r.chance(80) {
        spec["mtls"] = json!({"mode": mode(r)});
    }
    if ns != ROOT && r.chance(50) {
        spec["selector"] = json!({"matchLabels": {"app": *r.pick(&["web", "db"])}});
        if r.chance(60) {
            let port = *r.pick(&PORTS);
            spec["portLevelMtls"] = json!({port: {"mode": mode(r)}});
        }
    }
    peer(ns, &format!("pa{i}"), spec)
}

/// Up to 4 valid AuthorizationPolicies and 3 PeerAuthentications, and their store.
fn random_world(r: &mut Rng) -> (Vec<Value>, Vec<Value>, crate::store::Store) {
    let authz: Vec<Value> = (0..r.below(5))
        .map(|i| policy(r, i))
        .filter(|p| crate::store::authorization_policy(p).is_ok())
        .collect();
    let peers: Vec<Value> = (0..r.below(4)).map(|i| peer_authentication(r, i)).collect();
    let store = world(&authz, &peers);
    (authz, peers, store)
}

/// One random world: every destination, caller and port judged both ways.
pub fn check(seed: u64) -> Result<(), TestCaseError> {
    let mut r = Rng(seed | 1);
    let (authz, peers, store) = random_world(&mut r);
    let td = if r.chance(50) {
        "cluster.local"
    } else {
        "example.org"
    };
    for to in ["web", "db"] {
        let callers = [CLIENT, ADMIN, PLAIN, Caller("10.0.3.7", CLIENT.1, td)];
        for from in callers.map(|c| Caller(c.0, c.1, td)) {
            for port in [80, 8080, 9000] {
                let (allowed, reason, _) = weft(&store, to, from, port);
                let expected = referee(&authz, &peers, to, from, port);
                proptest::prop_assert_eq!(
                    (allowed, reason.as_str()),
                    expected,
                    "to {} from {:?} port {}\nauthz {}\npeer {}",
                    to,
                    from,
                    port,
                    serde_json::to_string_pretty(&authz).unwrap_or_default(),
                    serde_json::to_string_pretty(&peers).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Addresses around every block the generator uses, and some outside them all.
const PROBES: [&str; 16] = [
    "10.0.2.20",
    "10.0.2.30",
    "10.0.2.0",
    "10.0.2.255",
    "10.0.1.255",
    "10.0.3.0",
    "10.0.3.255",
    "10.0.4.0",
    "10.0.0.0",
    "10.1.0.0",
    "9.255.255.255",
    "192.168.1.1",
    "10.0.2.127",
    "10.0.2.128",
    "10.0.2.15",
    "10.0.2.32",
];

/// One random world: the plaintext entries, looked up as the kernel will, decide as
/// `decide` does for every probe address and port.
pub fn check_table(seed: u64) -> Result<(), TestCaseError> {
    use super::super::{Connection, decide, table};
    let mut r = Rng(seed | 1);
    let (authz, peers, store) = random_world(&mut r);
    for (pod, destination) in [("web", "10.0.1.10"), ("db", "10.0.1.11")] {
        let key = ("x".to_owned(), pod.to_owned());
        let compiled = super::super::compile(&store, ROOT, [&key]);
        let w = &compiled.workloads[&key];
        let destination = destination.parse().expect("ip");
        let entries = table::plaintext(w, destination);
        for source in PROBES {
            let source = source.parse().expect("ip");
            for port in [80, 8080, 9000, 1, 443] {
                let want = decide(
                    w,
                    &Connection {
                        source,
                        identity: None,
                        destination,
                        port,
                    },
                );
                let got = table::lookup(&entries, source, port).map(|e| &e.decision);
                proptest::prop_assert_eq!(
                    got,
                    Some(&want),
                    "to {} from {} port {}\nauthz {}\npeer {}",
                    pod,
                    source,
                    port,
                    serde_json::to_string_pretty(&authz).unwrap_or_default(),
                    serde_json::to_string_pretty(&peers).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// What the kernel finds in `table` for plaintext from `source` to `port`: the longest
/// prefix among the port's own entries of the source's family, else among the other ports'.
/// No entry refuses.
fn kernel_lookup(
    table: &crate::compile::policy::PlaintextTable,
    source: std::net::IpAddr,
    port: u16,
) -> bool {
    use weft_abi::policy::{PLAINTEXT_OTHER_PORTS, PLAINTEXT_PORT};
    let hit = |word: u32| {
        table
            .iter()
            .filter(|((w, net), _)| *w == word && net.contains(&source))
            .max_by_key(|((_, net), _)| net.prefix_len())
            .map(|(_, allowed)| *allowed)
    };
    hit(PLAINTEXT_PORT | u32::from(port))
        .or_else(|| hit(PLAINTEXT_OTHER_PORTS))
        .unwrap_or(false)
}

/// Addresses of a pod with several of a family: the web pod's, another IPv4 and an IPv6.
const WEB_ADDRESSES: [&str; 3] = ["10.0.1.10", "10.0.1.12", "fd00::10"];

/// IPv6 callers: outside every block, and IPv4-mapped ones inside and outside the blocks.
const PROBES_V6: [&str; 4] = [
    "fd00::7",
    "::ffff:10.0.2.20",
    "::ffff:192.168.1.1",
    "::ffff:10.0.3.0",
];

/// One random world: the kernel's table of a pod with several addresses, looked up as the
/// kernel does, allows a plaintext caller exactly when `decide` allows it at every address
/// of the caller's family.
pub fn check_kernel_table(seed: u64) -> Result<(), TestCaseError> {
    use super::super::{Connection, decide, table};
    let mut r = Rng(seed | 1);
    let (authz, peers, store) = random_world(&mut r);
    let key = ("x".to_owned(), "web".to_owned());
    let compiled = super::super::compile(&store, ROOT, [&key]);
    let w = &compiled.workloads[&key];
    let destinations: Vec<std::net::IpAddr> = WEB_ADDRESSES
        .iter()
        .map(|d| d.parse().expect("ip"))
        .collect();
    let kernel = table::kernel_table(w, &destinations);
    for source in PROBES.iter().chain(&PROBES_V6) {
        let source: std::net::IpAddr = source.parse().expect("ip");
        for port in [80, 8080, 9000, 1, 443] {
            let want = destinations
                .iter()
                .filter(|d| d.is_ipv4() == source.is_ipv4())
                .all(|d| {
                    let c = Connection {
                        source,
                        identity: None,
                        destination: *d,
                        port,
                    };
                    decide(w, &c).allowed
                });
            proptest::prop_assert_eq!(
                kernel_lookup(&kernel, source, port),
                want,
                "from {} port {}\nauthz {}\npeer {}",
                source,
                port,
                serde_json::to_string_pretty(&authz).unwrap_or_default(),
                serde_json::to_string_pretty(&peers).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// One random world: every decision, with the deciding and the AUDIT rule, is the same with
/// the workload's policy index as when every policy is tried.
pub fn check_index(seed: u64) -> Result<(), TestCaseError> {
    use super::super::{Connection, decide};
    let mut r = Rng(seed | 1);
    let (authz, peers, store) = random_world(&mut r);
    for pod in ["web", "db"] {
        let key = ("x".to_owned(), pod.to_owned());
        let compiled = super::super::compile(&store, ROOT, [&key]);
        let indexed = &compiled.workloads[&key];
        let mut all = indexed.clone();
        all.index = None;
        let destination: std::net::IpAddr = "10.0.1.10".parse().expect("ip");
        for caller in [
            CLIENT,
            ADMIN,
            PLAIN,
            Caller("10.0.3.7", CLIENT.1, "example.org"),
            Caller("10.0.2.17", Some(("y-x", "admin")), "cluster.local"),
            Caller("10.0.2.130", ADMIN.1, "example.org"),
            Caller("::ffff:10.0.2.30", None, "cluster.local"),
            Caller("fd00::20", CLIENT.1, "cluster.local"),
            Caller("192.168.0.1", None, "cluster.local"),
        ] {
            let id = caller
                .1
                .map(|(ns, sa)| crate::identity::SpiffeId::new(caller.2, ns, Some(sa)));
            for port in [80, 8080, 9000] {
                let c = Connection {
                    source: caller.0.parse().expect("ip"),
                    identity: id.as_ref(),
                    destination,
                    port,
                };
                proptest::prop_assert_eq!(
                    decide(indexed, &c),
                    decide(&all, &c),
                    "{:?} port {}\nauthz {}",
                    caller,
                    port,
                    serde_json::to_string_pretty(&authz).unwrap_or_default()
                );
            }
        }
    }
    let _ = peers;
    Ok(())
}
