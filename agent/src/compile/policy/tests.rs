//! Compile tests: examples, and a property test of the compiled maps (evaluated the way the
//! kernel looks them up) against a direct reading of the NetworkPolicy API.
pub(crate) mod model;
pub(crate) mod reference;

use std::net::IpAddr;

use weft_abi::{IPPROTO_TCP, IPPROTO_UDP, net::Direction, policy::*};

use self::model::{Eval, store_of};
use super::*;

const POD_A: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}, annotations: {weft.io/cgroup: x-a}}\nspec: {containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 80}, {name: serve-81-udp, containerPort: 81, protocol: UDP}]}]}\nstatus: {podIP: 10.0.0.11}\n";
const POD_B: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {pod: b}, annotations: {weft.io/cgroup: x-b}}\nspec: {containers: [{name: c, ports: [{name: serve-80-tcp, containerPort: 8080}]}]}\nstatus: {podIP: 10.0.0.12}\n";
const POD_Y: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: 'y', labels: {pod: a}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.1.11}\n";

fn compile_docs(docs: &[&str]) -> (Policies, Ids) {
    let mut ids = Ids::default();
    let store = store_of(docs);
    let host: [IpAddr; 1] = ["10.0.0.1".parse().expect("ip")];
    (compile(&store, &host, &mut ids, u32::MAX), ids)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn a_pod_selected_by_no_policy_is_not_isolated() {
    let (p, _) = compile_docs(&[POD_A, POD_B, POD_Y]);
    let a = &p.endpoints["x-a"];
    assert_eq!(a.info.flags, 0);
    assert_eq!(a.info.policy_set, 0);
    assert!(p.entries.is_empty());
    // Every pod address is known, local ones with their endpoint.
    assert_eq!(
        p.ipcache.len(),
        4,
        "three pods and the node: {:?}",
        p.ipcache
    );
    assert_eq!(
        a.info.ip4,
        u32::from_ne_bytes([10, 0, 0, 11]),
        "its own address"
    );
    assert_ne!(
        p.ipcache[&"10.0.1.11/32".parse().expect("net")].identity,
        a.info.identity
    );
    assert_eq!(
        p.ipcache[&"10.0.0.1/32".parse().expect("net")].flags,
        IP_HOST
    );
}

#[test]
fn a_local_pod_is_enforced_before_it_has_an_address() {
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n";
    let starting = POD_B.replace("status: {podIP: 10.0.0.12}\n", "status: {phase: Pending}\n");
    let (p, _) = compile_docs(&[POD_A, &starting, deny]);
    let b = &p.endpoints["x-b"];
    assert_eq!(b.info.flags, EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    assert_eq!((b.info.ip4, b.info.ip6), (0, [0; 4]), "no address yet");
    let eval = Eval::new(&p);
    assert!(
        !eval
            .allowed("x-b", Direction::Egress, ip("10.0.0.11"), IPPROTO_TCP, 80)
            .0
    );
}

#[test]
fn pods_with_different_named_ports_get_different_identities() {
    // Same labels, "http" on 80 and on 8080: an egress rule to port "http" must open 80 to
    // the first and 8080 to the second, not both ports to both.
    let pod = |name: &str, ip: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: 'y', labels: {{app: web}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    };
    let (w1, w2) = (pod("w1", "10.0.1.21", 80), pod("w2", "10.0.1.22", 8080));
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: http}]}]\n";
    let (p, _) = compile_docs(&[POD_A, &w1, &w2, np]);
    let eval = Eval::new(&p);
    let allowed = |ip_s: &str, port| {
        eval.allowed("x-a", Direction::Egress, ip(ip_s), IPPROTO_TCP, port)
            .0
    };
    assert!(allowed("10.0.1.21", 80) && allowed("10.0.1.22", 8080));
    assert!(!allowed("10.0.1.21", 8080) && !allowed("10.0.1.22", 80));
}

#[test]
fn default_deny_ingress_isolates_without_entries() {
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    let (p, _) = compile_docs(&[POD_A, POD_B, POD_Y, deny]);
    for cg in ["x-a", "x-b"] {
        let e = &p.endpoints[cg];
        assert_eq!(e.info.flags, EP_INGRESS_ISOLATED, "{cg}");
        assert_ne!(e.info.policy_set, 0);
        assert_eq!(e.ingress_policies, ["x/deny"]);
    }
    assert!(p.entries.is_empty());
    let eval = Eval::new(&p);
    assert!(
        !eval
            .allowed("x-a", Direction::Ingress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0
    );
    assert!(
        eval.allowed("x-a", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0
    );
    assert!(
        eval.allowed("x-a", Direction::Ingress, ip("10.0.0.1"), IPPROTO_TCP, 80)
            .0,
        "the node"
    );
    assert!(
        eval.allowed("x-a", Direction::Ingress, ip("10.0.0.11"), IPPROTO_TCP, 80)
            .0,
        "itself"
    );
}

#[test]
fn named_ports_resolve_against_the_destination() {
    // Ingress: x/a's own serve-80-tcp (80); egress from x/b to pods named serve-80-tcp: 80 on
    // x/a, 8080 on x/b.
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: named, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{ports: [{port: serve-80-tcp}]}]\n  egress: [{ports: [{port: serve-80-tcp}]}]\n";
    let (p, _) = compile_docs(&[POD_A, POD_B, POD_Y, np]);
    let eval = Eval::new(&p);
    assert!(
        eval.allowed("x-a", Direction::Ingress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0
    );
    assert!(
        !eval
            .allowed(
                "x-a",
                Direction::Ingress,
                ip("10.0.1.11"),
                IPPROTO_TCP,
                8080
            )
            .0
    );
    assert!(
        eval.allowed(
            "x-b",
            Direction::Ingress,
            ip("10.0.1.11"),
            IPPROTO_TCP,
            8080
        )
        .0
    );
    assert!(
        eval.allowed("x-b", Direction::Egress, ip("10.0.0.11"), IPPROTO_TCP, 80)
            .0
    );
    assert!(
        !eval
            .allowed("x-b", Direction::Egress, ip("10.0.0.11"), IPPROTO_TCP, 8080)
            .0
    );
    assert!(
        !eval
            .allowed("x-b", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0,
        "y/a has no such port"
    );
    assert!(
        !eval
            .allowed("x-b", Direction::Egress, ip("10.0.0.11"), IPPROTO_UDP, 80)
            .0
    );
}

#[test]
fn ip_blocks_with_except_apply_to_pod_addresses_too() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: cidr, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 0.0.0.0/4, except: [10.0.0.12/32]}}]}]\n";
    let (p, _) = compile_docs(&[POD_A, POD_B, POD_Y, np]);
    let eval = Eval::new(&p);
    assert!(
        eval.allowed("x-a", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0,
        "pod in the block"
    );
    assert!(
        !eval
            .allowed("x-a", Direction::Egress, ip("10.0.0.12"), IPPROTO_TCP, 80)
            .0,
        "excepted pod"
    );
    assert!(
        eval.allowed("x-a", Direction::Egress, ip("9.9.9.9"), IPPROTO_UDP, 53)
            .0,
        "outside address"
    );
    assert!(
        !eval
            .allowed("x-a", Direction::Egress, ip("192.168.0.1"), IPPROTO_UDP, 53)
            .0,
        "world"
    );
    // x/b is isolated by nothing.
    assert_eq!(p.endpoints["x-b"].info.flags, 0);
}

#[test]
fn port_ranges_become_prefixes_and_verdicts_name_the_rule() {
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: range, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 8000, endPort: 8999, protocol: UDP}]}]\n";
    let (p, _) = compile_docs(&[POD_A, POD_B, POD_Y, np]);
    let eval = Eval::new(&p);
    for (port, ok) in [
        (7999, false),
        (8000, true),
        (8500, true),
        (8999, true),
        (9000, false),
    ] {
        assert_eq!(
            eval.allowed(
                "x-a",
                Direction::Ingress,
                ip("10.0.1.11"),
                IPPROTO_UDP,
                port
            )
            .0,
            ok,
            "{port}"
        );
    }
    assert!(
        !eval
            .allowed(
                "x-a",
                Direction::Ingress,
                ip("10.0.1.11"),
                IPPROTO_TCP,
                8000
            )
            .0
    );
    assert!(
        !eval
            .allowed("x-a", Direction::Ingress, ip("9.9.9.9"), IPPROTO_UDP, 8000)
            .0,
        "not a pod"
    );
    let (_, rule) = eval.allowed(
        "x-a",
        Direction::Ingress,
        ip("10.0.1.11"),
        IPPROTO_UDP,
        8000,
    );
    assert_eq!(
        rule.map(|r| r.to_string()).as_deref(),
        Some("x/range ingress[0]")
    );
    let summary = &p.policies[0];
    assert_eq!(summary.selects, ["x/a"]);
    assert_eq!(summary.policy_types, ["Ingress"]);
    assert!(summary.entries > 1);
}

#[test]
fn numbers_stay_put_when_something_unrelated_changes() {
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {}}]}]}\n";
    let mut ids = Ids::default();
    let host: [IpAddr; 0] = [];
    let before = compile(
        &store_of(&[POD_A, POD_B, POD_Y, deny]),
        &host,
        &mut ids,
        u32::MAX,
    );
    let relabelled = POD_Y.replace("labels: {pod: a}", "labels: {pod: a, v: '2'}");
    let after = compile(
        &store_of(&[POD_A, POD_B, &relabelled, deny]),
        &host,
        &mut ids,
        u32::MAX,
    );
    assert_eq!(before.endpoints, after.endpoints);
    assert_eq!(
        before.entries, after.entries,
        "y/a is not a peer in x: no entry changes"
    );
    let y = "10.0.1.11/32".parse().expect("net");
    assert_ne!(
        before.ipcache[&y], after.ipcache[&y],
        "y/a got a new identity"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
    /// The compiled maps, looked up as the kernel does, agree with the API's semantics for
    /// every local pod, peer address, direction, protocol and port.
    #[test]
    fn compiled_maps_agree_with_the_reference(world in reference::world()) {
        reference::check(&world)?;
    }
}

/// A pod weft could not read stands in isolated, and no selector matches its address.
#[test]
fn a_rejected_pod_is_isolated_and_matches_no_peer() {
    let bad_b = POD_B.replace(
        "name: serve-80-tcp, containerPort: 8080",
        "name: Bad_Name, containerPort: 8080",
    );
    let invalid = crate::store::decode(crate::source::yaml::parse(&bad_b).expect("yaml"))
        .expect_err("rejected");
    let stand_in = invalid.stand_in.expect("a stand-in");
    let allow_x = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-x, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.0/8}}]}]\n";
    let mut store = store_of(&[POD_A, allow_x]);
    let key = ("x".to_owned(), "b".to_owned());
    let crate::store::Object::Pod(pod) = stand_in else {
        panic!("not a pod")
    };
    store.pods.insert(key, pod);
    let mut ids = Ids::default();
    let p = compile(&store, &[], &mut ids, u32::MAX);
    let b = &p.endpoints["x-b"];
    assert_eq!(b.quarantine, Some(Quarantine::Unreadable));
    assert_eq!(b.info.flags, EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
    assert_eq!(b.info.policy_set, 0);
    let b_id = p.ipcache[&"10.0.0.12/32".parse().expect("net")].identity;
    assert_eq!(p.identities[&b_id], IdentityKey::RejectedPod);
    let eval = Eval::new(&p);
    let egress = eval.allowed("x-b", Direction::Egress, ip("10.0.0.11"), IPPROTO_TCP, 80);
    assert!(!egress.0, "the rejected pod sends nothing");
    let ingress = eval.allowed("x-a", Direction::Ingress, ip("10.0.0.12"), IPPROTO_TCP, 80);
    assert!(
        !ingress.0,
        "neither podSelector {{}} nor the ipBlock matches it"
    );
}

/// A policy with `n` ipBlocks (10.<i>.0.0/16, each with an except) in namespace `ns`.
fn many_blocks(ns: &str, name: &str, n: usize) -> String {
    let peers: Vec<String> = (0..n)
        .map(|i| {
            let (a, b) = (100 + i / 256, i % 256);
            format!("{{ipBlock: {{cidr: {a}.{b}.0.0/16, except: [{a}.{b}.1.0/24]}}}}")
        })
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: '{ns}'}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{}]}}]\n",
        peers.join(", ")
    )
}

#[test]
fn ip_blocks_of_policies_selecting_no_local_pod_stay_out_of_the_ipcache() {
    let (without, _) = compile_docs(&[POD_A, POD_B, POD_Y]);
    let elsewhere = many_blocks("y", "far", 300);
    let (with, _) = compile_docs(&[POD_A, POD_B, POD_Y, &elsewhere]);
    assert_eq!(with.ipcache.len(), without.ipcache.len());
    assert_eq!(with.over_capacity, Vec::<String>::new());
}

#[test]
fn a_local_policy_whose_ip_blocks_do_not_fit_isolates_and_allows_nothing() {
    let big = many_blocks("x", "big", 300);
    let small = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: small, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}]}]\n";
    let store = store_of(&[POD_A, POD_B, POD_Y, &big, small]);
    let mut ids = Ids::default();
    let host: [IpAddr; 1] = [ip("10.0.0.1")];
    // Three pods and the node, the small policy's prefix, and not the big one's 600.
    let p = compile(&store, &host, &mut ids, 100);
    assert_eq!(p.over_capacity, ["x/big"]);
    assert_eq!(p.ipcache.len(), 5);
    let a = &p.endpoints["x-a"];
    assert_eq!(a.info.flags, EP_INGRESS_ISOLATED);
    let eval = Eval::new(&p);
    let from_block = eval.allowed("x-a", Direction::Ingress, ip("100.0.2.3"), IPPROTO_TCP, 80);
    assert!(!from_block.0, "the dropped policy allows nothing");
    let to_b = eval.allowed(
        "x-b",
        Direction::Ingress,
        ip("192.168.1.1"),
        IPPROTO_TCP,
        80,
    );
    assert!(to_b.0, "the policy that fits still allows");
    assert!(
        p.problems
            .iter()
            .any(|pr| pr.object == "x/big" && pr.message.contains("--max-ipcache 100")),
        "{:?}",
        p.problems
    );
}

/// A pod deeper below the cgroup root than the kernel looks is reported, not silently
/// unenforced.
#[test]
fn a_pod_too_deep_for_the_kernel_is_reported() {
    let deep = "a/b/c/d/e/f/g/h/i/j/k/l/m";
    let pod = POD_A.replace("weft.io/cgroup: x-a", &format!("weft.io/cgroup: {deep}"));
    let (p, _) = compile_docs(&[&pod, POD_B]);
    assert_eq!(p.unreachable, ["x/a"]);
    assert!(
        p.problems
            .iter()
            .any(|pr| pr.object == "x/a" && pr.message.contains("NOT enforced"))
    );
    let (p, _) = compile_docs(&[POD_A, POD_B]);
    assert_eq!(p.unreachable, Vec::<String>::new());
}

/// x/a may send only to `role: db` pods.
const EGRESS_TO_DB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: to-db, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]\n";

/// A pod of namespace shop on another node with address 10.0.1.11 and `role`, plus metadata.
fn remote(name: &str, role: &str, meta: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{role: {role}}}{meta}}}\nstatus: {{phase: Running, podIP: 10.0.1.11}}\n"
    )
}

/// The address of a terminating pod handed to a new pod is judged as the new pod, never the
/// old one, and the old pod's name no longer resolves to it.
#[test]
fn an_address_handed_on_is_judged_as_its_new_pod() {
    let gone = remote("db", "db", ", deletionTimestamp: '2026-12-03T10:00:00Z'");
    // Named to come before the old pod in the store's order.
    let api = remote("api", "web", "");
    let (before, _) = compile_docs(&[POD_A, &remote("db", "db", ""), EGRESS_TO_DB]);
    let (after, _) = compile_docs(&[POD_A, &gone, &api, EGRESS_TO_DB]);
    let to_db_ip = |p: &Policies| {
        Eval::new(p)
            .allowed("x-a", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0
    };
    assert!(to_db_ip(&before), "the db");
    assert!(!to_db_ip(&after), "now the api pod's");
    assert!(after.problems.is_empty(), "{:?}", after.problems);
    let to_web = EGRESS_TO_DB.replace("role: db", "role: web");
    let (web, _) = compile_docs(&[POD_A, &gone, &api, &to_web]);
    assert!(to_db_ip(&web), "judged as the api pod");
}

/// A local pod whose address another pod claims too keeps it as its own source (the kernel
/// still drops its packets from any other source address), but traffic with that address is
/// not the pod reaching itself: the other claimant may hold it.
#[test]
fn a_local_pod_keeps_its_contested_address_as_its_source_only() {
    let twin = POD_Y.replace("10.0.1.11", "10.0.0.11");
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    let (p, _) = compile_docs(&[POD_A, &twin, deny]);
    assert_eq!(p.contested.len(), 1, "{:?}", p.contested);
    let a = &p.endpoints["x-a"];
    assert_eq!(a.info.ip4, u32::from_ne_bytes([10, 0, 0, 11]));
    assert_eq!(a.info.flags, EP_INGRESS_ISOLATED | EP_SHARED_ADDRESS);
    assert_eq!(a.ips, vec![ip("10.0.0.11")]);
    assert_eq!(a.info.identity, 0, "no identity of its own address");
    let eval = Eval::new(&p);
    let from_twin = eval.allowed("x-a", Direction::Ingress, ip("10.0.0.11"), IPPROTO_TCP, 80);
    assert!(!from_twin.0, "judged by its policy, not passed as itself");
    let (q, _) = compile_docs(&[POD_A, deny]);
    assert_eq!(q.endpoints["x-a"].info.flags, EP_INGRESS_ISOLATED);
    let eval = Eval::new(&q);
    let itself = eval.allowed("x-a", Direction::Ingress, ip("10.0.0.11"), IPPROTO_TCP, 80);
    assert!(itself.0, "an address of its own alone is itself");
}

/// Two live pods claiming one address: nobody's identity, reported on both.
#[test]
fn an_address_two_live_pods_claim_matches_no_selector() {
    let allow_all =
        EGRESS_TO_DB.replace("podSelector: {matchLabels: {role: db}}", "podSelector: {}");
    let docs = [POD_A, &remote("db", "db", ""), &remote("web", "web", "")];
    let (p, _) = compile_docs(&[&docs[..], &[EGRESS_TO_DB]].concat());
    let id = p.ipcache[&"10.0.1.11/32".parse().expect("net")].identity;
    assert_eq!(p.identities[&id], IdentityKey::ContestedAddress);
    let eval = Eval::new(&p);
    let to_db_ip = eval.allowed("x-a", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80);
    assert!(!to_db_ip.0, "matches the db selector no more");
    let objects: Vec<&str> = p.problems.iter().map(|x| x.object.as_str()).collect();
    assert_eq!(objects, ["shop/db", "shop/web"]);
    let (q, _) = compile_docs(&[&docs[..], &[allow_all.as_str()]].concat());
    let eval = Eval::new(&q);
    assert!(
        !eval
            .allowed("x-a", Direction::Egress, ip("10.0.1.11"), IPPROTO_TCP, 80)
            .0,
        "not even podSelector {{}} in every namespace"
    );
}

/// The mesh's capture flags: a local meshed pod is `EP_MESHED`; the address of a meshed pod
/// of another node is `IP_MESHED_REMOTE`, a local meshed pod's and a non-meshed pod's are
/// not; an address a meshed remote pod contests stays captured.
#[test]
fn meshed_pods_are_marked_for_capture_only_across_nodes() {
    let meshed = ", labels: {weft.io/mesh: enabled, pod: a}";
    let local_a = POD_A.replace(", labels: {pod: a}", meshed);
    let remote_db = remote("db", "db", ", labels: {weft.io/mesh: enabled, role: db}")
        .replace("labels: {role: db}, labels:", "labels:");
    let (p, _) = compile_docs(&[&local_a, POD_B, &remote_db]);
    assert_eq!(p.endpoints["x-a"].info.flags, EP_MESHED);
    assert_eq!(p.endpoints["x-b"].info.flags, 0);
    let flags = |net: &str| p.ipcache[&net.parse().expect("net")].flags;
    assert_eq!(flags("10.0.1.11/32"), IP_MESHED_REMOTE);
    assert_eq!(
        flags("10.0.0.11/32"),
        0,
        "a local meshed pod is not tunnelled to"
    );
    assert_eq!(flags("10.0.0.12/32"), 0, "not meshed");
    let twin = remote("web", "web", "");
    let (q, _) = compile_docs(&[&local_a, &remote_db, &twin]);
    let id = q.ipcache[&"10.0.1.11/32".parse().expect("net")];
    assert_eq!(q.identities[&id.identity], IdentityKey::ContestedAddress);
    assert_eq!(
        id.flags, IP_MESHED_REMOTE,
        "contested, but a meshed claimant is remote"
    );
}
