//! A direct reading of the NetworkPolicy API (no identities, no maps) and random worlds to
//! compare the compiled state against it.
use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use proptest::{prelude::*, test_runner::TestCaseError};
use serde_json::{Value, json};
use weft_abi::{IPPROTO_TCP, IPPROTO_UDP, net::Direction};

use super::{
    super::{Ids, compile, selector},
    model::{Eval, store_of},
};

/// A small random cluster: namespaces, pods (some local), policies.
#[derive(Debug, Clone)]
pub struct World {
    pub docs: Vec<String>,
}

/// xorshift64*: deterministic from the proptest seed, so a failure reproduces.
#[derive(Debug)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 2] = ["x", "y"];
const HOST: &str = "10.0.0.1";
const OUTSIDE: [&str; 3] = ["10.0.0.9", "9.9.9.9", "10.0.7.7"];
const PORTS: [u16; 6] = [53, 79, 80, 81, 8080, 9000];

fn selector(r: &mut Rng) -> Value {
    match r.below(6) {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": r.pick(&["web", "db"])}}),
        2 => {
            json!({"matchExpressions": [{"key": "app", "operator": r.pick(&["In", "NotIn"]), "values": [r.pick(&["web", "db"])]}]})
        }
        3 => {
            json!({"matchExpressions": [{"key": "tier", "operator": r.pick(&["Exists", "DoesNotExist"])}]})
        }
        4 => json!({"matchLabels": {"team": r.pick(&["a", "b"])}}),
        _ => json!({"matchLabels": {"app": "web", "tier": "1"}}),
    }
}

fn peer(r: &mut Rng) -> Value {
    match r.below(5) {
        0 => json!({"podSelector": selector(r)}),
        1 => json!({"namespaceSelector": selector(r)}),
        2 => json!({"podSelector": selector(r), "namespaceSelector": selector(r)}),
        3 => {
            let blocks: [(&str, &[&str]); 5] = [
                ("10.0.0.0/16", &["10.0.0.8/29"]),
                ("10.0.0.0/24", &[]),
                ("10.0.0.8/29", &["10.0.0.12/32"]),
                ("0.0.0.0/0", &["10.0.0.0/8"]),
                ("10.0.0.0/8", &["10.0.0.0/24", "10.0.7.0/24"]),
            ];
            let (cidr, except) = *r.pick(&blocks);
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
        _ => {
            json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": r.pick(&NAMESPACES)}}})
        }
    }
}

fn port(r: &mut Rng) -> Value {
    match r.below(7) {
        0 => json!({"port": 80}),
        1 => json!({"port": 80, "protocol": "UDP"}),
        2 => json!({"protocol": "UDP"}),
        3 => json!({"port": 79, "endPort": 81}),
        4 => json!({"port": "http"}),
        5 => json!({"port": "dns", "protocol": "UDP"}),
        _ => json!({"port": 8000, "endPort": 9000, "protocol": "TCP"}),
    }
}

fn rules(r: &mut Rng, peers_key: &str) -> Value {
    let n = r.below(3);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut rule = serde_json::Map::new();
        if r.chance(70) {
            let peers: Vec<Value> = (0..1 + r.below(2)).map(|_| peer(r)).collect();
            rule.insert(peers_key.into(), Value::Array(peers));
        }
        if r.chance(60) {
            let ports: Vec<Value> = (0..1 + r.below(2)).map(|_| port(r)).collect();
            rule.insert("ports".into(), Value::Array(ports));
        }
        out.push(Value::Object(rule));
    }
    Value::Array(out)
}

impl World {
    pub fn generate(seed: u64) -> Self {
        let mut r = Rng(seed | 1);
        let mut docs = Vec::new();
        for ns in NAMESPACES {
            let mut labels = serde_json::Map::new();
            if r.chance(60) {
                labels.insert("team".into(), json!(r.pick(&["a", "b"])));
            }
            docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}));
        }
        let pods = 3 + r.below(4);
        for i in 0..pods {
            let app = *r.pick(&["web", "db"]);
            let mut labels = serde_json::Map::from_iter([("app".to_owned(), json!(app))]);
            if r.chance(50) {
                labels.insert("tier".into(), json!(r.pick(&["1", "2"])));
            }
            // Named ports follow the labels, so pods that policy cannot tell apart agree on
            // them (weft resolves egress named ports per identity).
            let http = if app == "web" { 80 } else { 8080 };
            let ip = format!("10.0.0.{}", 10 + i);
            let mut meta = json!({"name": format!("p{i}"), "namespace": r.pick(&NAMESPACES), "labels": labels});
            if r.chance(60) {
                meta["annotations"] = json!({"weft.io/cgroup": format!("c{i}")});
            }
            docs.push(json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": meta,
                "spec": {"containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": http},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
                "status": {"podIP": ip}
            }));
        }
        for i in 0..r.below(5) {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), selector(&mut r));
            match r.below(4) {
                0 => {}
                1 => drop(spec.insert("policyTypes".into(), json!(["Ingress"]))),
                2 => drop(spec.insert("policyTypes".into(), json!(["Egress"]))),
                _ => drop(spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]))),
            }
            if r.chance(70) {
                spec.insert("ingress".into(), rules(&mut r, "from"));
            }
            if r.chance(60) {
                spec.insert("egress".into(), rules(&mut r, "to"));
            }
            docs.push(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("np{i}"), "namespace": r.pick(&NAMESPACES)},
                "spec": spec,
            }));
        }
        Self {
            docs: docs.iter().map(Value::to_string).collect(),
        }
    }
}

pub fn world() -> impl Strategy<Value = World> {
    any::<u64>().prop_map(World::generate)
}

/// A pod as the reference sees it.
struct RefPod {
    ns: String,
    labels: selector::Labels,
    ip: IpAddr,
    cgroup: Option<String>,
    ports: BTreeMap<(String, u8), u16>,
}

fn str_map(v: &Value) -> selector::Labels {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn proto(v: &Value) -> u8 {
    match v.as_str().unwrap_or("TCP") {
        "UDP" => IPPROTO_UDP,
        "SCTP" => weft_abi::IPPROTO_SCTP,
        _ => IPPROTO_TCP,
    }
}

/// Whether the NetworkPolicy API allows this, read directly from the documents.
#[expect(
    clippy::too_many_arguments,
    reason = "a test oracle: every input spelled out"
)]
fn reference(
    pods: &[RefPod],
    ns_labels: &BTreeMap<String, selector::Labels>,
    policies: &[Value],
    local: &RefPod,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> bool {
    // From the node always (Kubernetes); to it only as the policies say.
    if peer == local.ip || (direction == Direction::Ingress && peer.to_string() == HOST) {
        return true;
    }
    let sel = |v: &Value| -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        serde_json::from_value(v.clone()).expect("selector")
    };
    let peer_pod = pods.iter().find(|p| p.ip == peer);
    let mut selected = false;
    for np in policies {
        let ns = np["metadata"]["namespace"].as_str().unwrap_or_default();
        let spec = &np["spec"];
        if ns != local.ns || !selector::matches(&sel(&spec["podSelector"]), &local.labels) {
            continue;
        }
        let types: Vec<&str> = spec["policyTypes"].as_array().map_or_else(
            || {
                let mut t = vec!["Ingress"];
                if spec["egress"].as_array().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress");
                }
                t
            },
            |a| a.iter().filter_map(Value::as_str).collect(),
        );
        let (dir_name, rules_key, peers_key) = if direction == Direction::Ingress {
            ("Ingress", "ingress", "from")
        } else {
            ("Egress", "egress", "to")
        };
        if !types.contains(&dir_name) {
            continue;
        }
        selected = true;
        for rule in spec[rules_key].as_array().into_iter().flatten() {
            let peers_ok = match rule[peers_key].as_array() {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|p| {
                    if let Some(b) = p.get("ipBlock") {
                        let cidr: IpNet = b["cidr"]
                            .as_str()
                            .unwrap_or_default()
                            .parse()
                            .expect("cidr");
                        let out = b["except"].as_array().into_iter().flatten().any(|e| {
                            e.as_str()
                                .unwrap_or_default()
                                .parse::<IpNet>()
                                .expect("except")
                                .contains(&peer)
                        });
                        return cidr.contains(&peer) && !out;
                    }
                    let Some(pp) = peer_pod else { return false };
                    let ns_ok = match p.get("namespaceSelector") {
                        Some(s) => selector::matches(&sel(s), &ns_labels[&pp.ns]),
                        None => pp.ns == ns,
                    };
                    ns_ok
                        && p.get("podSelector")
                            .is_none_or(|s| selector::matches(&sel(s), &pp.labels))
                }),
            };
            let dest_ports = if direction == Direction::Ingress {
                Some(&local.ports)
            } else {
                peer_pod.map(|p| &p.ports)
            };
            let ports_ok = match rule["ports"].as_array() {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|p| {
                    if proto(&p["protocol"]) != protocol {
                        return false;
                    }
                    match &p["port"] {
                        Value::Null => true,
                        Value::Number(n) => {
                            let first = n.as_u64().unwrap_or(0) as u16;
                            let last = p["endPort"].as_u64().map_or(first, |e| e as u16);
                            (first..=last).contains(&port)
                        }
                        Value::String(name) => dest_ports
                            .and_then(|d| d.get(&(name.clone(), protocol)))
                            .is_some_and(|n| *n == port),
                        _ => false,
                    }
                }),
            };
            if peers_ok && ports_ok {
                return true;
            }
        }
    }
    !selected
}

/// Compiles the world and compares every verdict with the reference.
pub fn check(world: &World) -> Result<(), TestCaseError> {
    let docs: Vec<&str> = world.docs.iter().map(String::as_str).collect();
    let store = store_of(&docs);
    let host: [IpAddr; 1] = [HOST.parse().expect("ip")];
    let compiled = compile(&store, &host, &mut Ids::default(), u32::MAX);
    let eval = Eval::new(&compiled);
    let values: Vec<Value> = world
        .docs
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let ns_labels: BTreeMap<String, selector::Labels> = values
        .iter()
        .filter(|v| v["kind"] == "Namespace")
        .map(|v| {
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut l = str_map(&v["metadata"]["labels"]);
            l.insert("kubernetes.io/metadata.name".into(), name.clone());
            (name, l)
        })
        .collect();
    let pods: Vec<RefPod> = values
        .iter()
        .filter(|v| v["kind"] == "Pod")
        .map(|v| RefPod {
            ns: v["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            labels: str_map(&v["metadata"]["labels"]),
            ip: v["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .expect("ip"),
            cgroup: v["metadata"]["annotations"]["weft.io/cgroup"]
                .as_str()
                .map(str::to_owned),
            ports: v["spec"]["containers"][0]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let name = p["name"].as_str().unwrap_or_default().to_owned();
                    (
                        (name, proto(&p["protocol"])),
                        p["containerPort"].as_u64().unwrap_or(0) as u16,
                    )
                })
                .collect(),
        })
        .collect();
    let policies: Vec<Value> = values
        .into_iter()
        .filter(|v| v["kind"] == "NetworkPolicy")
        .collect();
    let peers: Vec<IpAddr> = pods
        .iter()
        .map(|p| p.ip)
        .chain(
            OUTSIDE
                .iter()
                .chain([&HOST])
                .map(|s| s.parse().expect("ip")),
        )
        .collect();
    for local in pods.iter().filter(|p| p.cgroup.is_some()) {
        let cgroup = local.cgroup.as_deref().unwrap_or_default();
        for &peer in &peers {
            for direction in [Direction::Ingress, Direction::Egress] {
                for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
                    for port in PORTS {
                        let want = reference(
                            &pods, &ns_labels, &policies, local, direction, peer, protocol, port,
                        );
                        let (got, _) = eval.allowed(cgroup, direction, peer, protocol, port);
                        prop_assert_eq!(
                            got,
                            want,
                            "pod {} direction {} peer {} proto {} port {}",
                            cgroup,
                            direction.as_str(),
                            peer,
                            protocol,
                            port
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
