//! Policy sync against in-memory maps that judge a set of probes after every single write:
//! between an old and a new state, no probe may be allowed that neither allows, nor denied
//! that both allow.
use std::{cell::RefCell, collections::BTreeMap, net::IpAddr};

use aya::maps::MapError;
use ipnet::IpNet;
use proptest::prelude::*;
use weft_abi::net::Direction;
use weft_abi::{
    IPPROTO_TCP, IPPROTO_UDP,
    policy::{EndpointInfo, IpcacheValue, PolicyData, PolicyValue},
};

use super::*;
use crate::compile::policy::{
    compile,
    judge::{Tables, judge, lpm_ipcache, lpm_policy},
    tests::{model::store_of, reference},
};
use crate::{sync::Reason, tests::MemoryPolicyMaps};

#[derive(Debug, Clone, Copy)]
struct Probe {
    cgroup: u64,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
}

#[derive(Debug, Default)]
struct Fake {
    maps: MemoryPolicyMaps,
    /// Probes with the lowest and highest acceptable verdict.
    bounds: Vec<(Probe, bool, bool)>,
    writes: usize,
    /// Writes fail once this many have succeeded.
    fail_after: Option<usize>,
    /// Inserting a new `POLICY` key fails beyond this many, as the kernel's does.
    entries_capacity: Option<usize>,
    /// Probes allowed that neither state allows.
    opened: RefCell<Vec<String>>,
    /// Probes denied that both states allow.
    closed: RefCell<Vec<String>>,
}

impl std::ops::Deref for Fake {
    type Target = MemoryPolicyMaps;

    fn deref(&self) -> &MemoryPolicyMaps {
        &self.maps
    }
}

impl std::ops::DerefMut for Fake {
    fn deref_mut(&mut self) -> &mut MemoryPolicyMaps {
        &mut self.maps
    }
}

impl Tables for Fake {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue> {
        lpm_ipcache(&self.ipcache, ip)
    }

    fn policy(&self, data: &PolicyData) -> Option<PolicyValue> {
        lpm_policy(&self.entries, data)
    }
}

impl Fake {
    fn verdict(&self, p: &Probe) -> bool {
        match self.endpoints.get(&p.cgroup) {
            None => true,
            Some(ep) => judge(self, ep, p.direction, p.peer, p.protocol, p.port).allowed,
        }
    }

    fn write(
        &mut self,
        change: impl FnOnce(&mut MemoryPolicyMaps) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.fail_after.is_some_and(|n| self.writes >= n) {
            return Err(Error::Map {
                map: "TEST",
                op: "write",
                source: MapError::KeyNotFound,
            });
        }
        self.writes += 1;
        change(&mut self.maps)?;
        for (p, lo, hi) in &self.bounds {
            let v = self.verdict(p);
            let msg = || {
                format!(
                    "after write {}: {p:?} is {v}, bounds {lo}..{hi}",
                    self.writes
                )
            };
            if v && !hi {
                self.opened.borrow_mut().push(msg());
            }
            if !v && *lo {
                self.closed.borrow_mut().push(msg());
            }
        }
        Ok(())
    }
}

/// Writes go to the memory maps through `write`, which judges every probe after each one.
impl PolicyMaps for Fake {
    fn read_endpoints(&self) -> Result<Vec<(u64, EndpointInfo)>, Error> {
        self.maps.read_endpoints()
    }
    fn read_ipcache(&self) -> Result<Vec<(IpNet, IpcacheValue)>, Error> {
        self.maps.read_ipcache()
    }
    fn read_entries(&self) -> Result<Vec<(EntryKey, PolicyValue)>, Error> {
        self.maps.read_entries()
    }
    fn put_endpoint(&mut self, id: u64, v: &EndpointInfo) -> Result<(), Error> {
        self.write(|m| m.put_endpoint(id, v))
    }
    fn del_endpoint(&mut self, id: u64) -> Result<(), Error> {
        self.write(|m| m.del_endpoint(id))
    }
    fn put_ipcache(&mut self, net: &IpNet, v: &IpcacheValue) -> Result<(), Error> {
        self.write(|m| m.put_ipcache(net, v))
    }
    fn del_ipcache(&mut self, net: &IpNet) -> Result<(), Error> {
        self.write(|m| m.del_ipcache(net))
    }
    fn put_entry(&mut self, k: &EntryKey, v: &PolicyValue) -> Result<(), Error> {
        let full = self
            .entries_capacity
            .is_some_and(|cap| !self.entries.contains_key(k) && self.entries.len() >= cap);
        if full {
            return Err(Error::Map {
                map: "POLICY",
                op: "update (E2BIG)",
                source: MapError::KeyNotFound,
            });
        }
        self.write(|m| m.put_entry(k, v))
    }
    fn del_entry(&mut self, k: &EntryKey) -> Result<(), Error> {
        self.write(|m| m.del_entry(k))
    }
    fn read_plaintext(&self) -> Result<Vec<(PlaintextRow, bool)>, Error> {
        self.maps.read_plaintext()
    }
    fn put_plaintext(&mut self, row: &PlaintextRow, allowed: bool) -> Result<(), Error> {
        self.write(|m| m.put_plaintext(row, allowed))
    }
    fn del_plaintext(&mut self, row: &PlaintextRow) -> Result<(), Error> {
        self.write(|m| m.del_plaintext(row))
    }
}

const CAPACITY: PolicyCapacity = PolicyCapacity {
    endpoints: 1000,
    ipcache: 1000,
    entries: 100_000,
    authz: 1000,
};

/// cgroup `c<i>` has id 1000 + i.
fn cgroup_ids(p: &Policies) -> BTreeMap<String, u64> {
    p.endpoints
        .keys()
        .filter_map(|cg| {
            Some((
                cg.clone(),
                1000 + cg.strip_prefix('c')?.parse::<u64>().ok()?,
            ))
        })
        .collect()
}

fn probes(cgroups: impl Iterator<Item = u64>) -> Vec<Probe> {
    let peers: Vec<IpAddr> = (10..16)
        .map(|i| format!("10.0.0.{i}"))
        .chain([
            "9.9.9.9".to_owned(),
            "10.0.0.9".to_owned(),
            "10.0.0.1".to_owned(),
        ])
        .map(|s| s.parse().expect("ip"))
        .collect();
    let mut out = Vec::new();
    for cgroup in cgroups {
        for &peer in &peers {
            for direction in [Direction::Ingress, Direction::Egress] {
                for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
                    for port in [53, 80, 8080, 8500] {
                        out.push(Probe {
                            cgroup,
                            direction,
                            peer,
                            protocol,
                            port,
                        });
                    }
                }
            }
        }
    }
    out
}

fn compiled(world: &reference::World, ids: &mut Ids) -> Policies {
    let docs: Vec<&str> = world.docs.iter().map(String::as_str).collect();
    let host: [IpAddr; 1] = ["10.0.0.1".parse().expect("ip")];
    compile(&store_of(&docs), &host, ids, CAPACITY.ipcache)
}

/// Syncs `old`, then `new` with bounds checked after every write; returns the syncer.
fn transition(
    old: &reference::World,
    new: &reference::World,
    fail_after: Option<usize>,
) -> (PolicySyncer<Fake>, Policies, PolicyReport) {
    let mut ids = Ids::default();
    let before = compiled(old, &mut ids);
    let mut syncer = PolicySyncer::new(Fake::default(), CAPACITY).expect("new");
    let report = syncer.apply(&before, &cgroup_ids(&before));
    assert!(report.errors.is_empty(), "{report:?}");
    let after = compiled(new, &mut ids);
    set_bounds(&mut syncer.maps, &before, &after);
    syncer.maps.fail_after = fail_after.map(|n| syncer.maps.writes + n);
    let report = syncer.apply(&after, &cgroup_ids(&after));
    (syncer, after, report)
}

/// Bounds for every probe between the maps' current state (`before` applied) and `after`.
fn set_bounds(maps: &mut Fake, before: &Policies, after: &Policies) {
    let cgroups: Vec<u64> = cgroup_ids(before)
        .into_values()
        .chain(cgroup_ids(after).into_values())
        .collect();
    let mut bounds = Vec::new();
    for p in probes(cgroups.into_iter()) {
        let old_v = maps.verdict(&p);
        bounds.push((p, old_v, old_v));
    }
    // The new verdict: on a scratch copy synced directly.
    let mut scratch = PolicySyncer::new(Fake::default(), CAPACITY).expect("new");
    scratch.apply(after, &cgroup_ids(after));
    let (old_ids, new_ids) = (cgroup_ids(before), cgroup_ids(after));
    for (p, lo, hi) in &mut bounds {
        let new_v = scratch.maps.verdict(p);
        *lo = *lo && new_v;
        // Also acceptable: a pod's old or new policies judging the peer's identity of the
        // other state, as if the label and policy changes had come one after the other.
        *hi =
            *hi || new_v || cross(before, &old_ids, after, p) || cross(after, &new_ids, before, p);
    }
    maps.bounds = bounds;
}

/// Policies judge addresses with identities from elsewhere.
struct Cross<'a> {
    policies: &'a Policies,
    addresses: &'a Policies,
}

impl Tables for Cross<'_> {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue> {
        lpm_ipcache(&self.addresses.ipcache, ip)
    }

    fn policy(&self, data: &PolicyData) -> Option<PolicyValue> {
        lpm_policy(&self.policies.entries, data)
    }
}

/// The verdict of `policies`' endpoint for the probe, with the peer's identity from
/// `addresses` (false when the pod has no endpoint there).
fn cross(
    policies: &Policies,
    ids: &BTreeMap<String, u64>,
    addresses: &Policies,
    p: &Probe,
) -> bool {
    let Some(cg) = ids
        .iter()
        .find(|(_, id)| **id == p.cgroup)
        .map(|(cg, _)| cg)
    else {
        return false;
    };
    let ep = policies.endpoints[cg].info;
    judge(
        &Cross {
            policies,
            addresses,
        },
        &ep,
        p.direction,
        p.peer,
        p.protocol,
        p.port,
    )
    .allowed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]
    #[test]
    fn no_write_allows_what_no_order_of_the_changes_allows(old in reference::world(), new in reference::world()) {
        let (syncer, after, report) = transition(&old, &new, None);
        prop_assert!(report.errors.is_empty(), "{:?}", report);
        let opened = syncer.maps.opened.borrow().clone();
        prop_assert!(opened.is_empty(), "{:?}", opened);
        // And the end state is exactly the new one.
        prop_assert_eq!(&syncer.maps.entries, &after.entries);
        prop_assert_eq!(&syncer.maps.ipcache, &after.ipcache);
    }

    #[test]
    fn a_failed_write_never_opens_anything(old in reference::world(), new in reference::world(), n in 0usize..40) {
        // A failure may leave something refused (fail closed), never anything open.
        let (syncer, _, _) = transition(&old, &new, Some(n));
        let opened = syncer.maps.opened.borrow().clone();
        prop_assert!(opened.is_empty(), "{:?}", opened);
        // Whatever failed, nothing is allowed that neither state allows.
        for (p, _, hi) in &syncer.maps.bounds {
            prop_assert!(!syncer.maps.verdict(p) || *hi, "{:?} open after failure", p);
        }
    }
}

#[test]
fn a_restarted_agent_keeps_the_numbers_and_rewrites_nothing() {
    let world = reference::World::generate(7);
    let mut ids = Ids::default();
    let first = compiled(&world, &mut ids);
    let mut syncer = PolicySyncer::new(Fake::default(), CAPACITY).expect("new");
    syncer.apply(&first, &cgroup_ids(&first));
    let kernel = std::mem::take(&mut syncer.maps);
    // A new agent: fresh numbering, seeded from what the kernel holds.
    let mut restarted = PolicySyncer::new(kernel, CAPACITY).expect("new");
    let mut ids = Ids::default();
    let probe = compiled(&world, &mut ids);
    restarted.seed(&mut ids, &probe, &cgroup_ids(&probe));
    let again = compiled(&world, &mut ids);
    let report = restarted.apply(&again, &cgroup_ids(&again));
    assert_eq!((report.written, report.deleted), (0, 0), "{report:?}");
}

#[test]
fn entries_that_do_not_fit_leave_new_pods_denied() {
    let world = reference::World::generate(11);
    let mut ids = Ids::default();
    let desired = compiled(&world, &mut ids);
    let small = PolicyCapacity {
        entries: 0,
        ..CAPACITY
    };
    let mut syncer = PolicySyncer::new(Fake::default(), small).expect("new");
    let report = syncer.apply(&desired, &cgroup_ids(&desired));
    if desired.entries.is_empty() {
        return;
    }
    assert!(
        report.errors.iter().any(|e| e.reason == Reason::MapFull
            && e.map == "POLICY"
            && e.message.contains("--max-policy-entries")),
        "{report:?}"
    );
    for (cg, e) in &desired.endpoints {
        let id = cgroup_ids(&desired)[cg];
        let have = syncer.maps.endpoints[&id];
        assert_eq!(have.flags, e.info.flags, "isolation is kept");
        assert_eq!(
            have.policy_set, 0,
            "nothing allowed beyond the pod itself and the node"
        );
    }
}

/// The usual change, pods relabelled while policies change with them: no connection starting
/// in between is refused.
#[test]
fn a_relabel_with_a_policy_change_refuses_nothing_in_between() {
    let pod = |labels: &str| {
        format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"name\":\"p0\",\"namespace\":\"x\",\"labels\":{labels},\"annotations\":{{\"weft.io/cgroup\":\"c0\"}}}},\"status\":{{\"podIP\":\"10.0.0.10\"}}}}"
        )
    };
    let client = |labels: &str, i: u32| {
        format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"name\":\"q{i}\",\"namespace\":\"x\",\"labels\":{labels}}},\"status\":{{\"podIP\":\"10.0.0.1{i}\"}}}}"
        )
    };
    let policy = |from: &str| {
        format!(
            "{{\"apiVersion\":\"networking.k8s.io/v1\",\"kind\":\"NetworkPolicy\",\"metadata\":{{\"name\":\"np\",\"namespace\":\"x\"}},\"spec\":{{\"podSelector\":{{}},\"ingress\":[{{\"from\":[{{\"podSelector\":{{\"matchLabels\":{from}}}}}]}}]}}}}"
        )
    };
    let old = reference::World {
        docs: vec![
            pod("{\"app\":\"web\"}"),
            client("{\"v\":\"1\"}", 1),
            client("{\"v\":\"1\"}", 2),
            policy("{\"v\":\"1\"}"),
        ],
    };
    let new = reference::World {
        docs: vec![
            pod("{\"app\":\"web\",\"tier\":\"1\"}"),
            client("{\"v\":\"2\"}", 1),
            client("{\"v\":\"2\"}", 2),
            policy("{\"v\":\"2\"}"),
        ],
    };
    let (syncer, _, report) = transition(&old, &new, None);
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(
        syncer.maps.opened.borrow().is_empty(),
        "{:?}",
        syncer.maps.opened.borrow()
    );
    assert!(
        syncer.maps.closed.borrow().is_empty(),
        "{:?}",
        syncer.maps.closed.borrow()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    #[test]
    fn a_restart_into_changed_policies_opens_nothing(old in reference::world(), new in reference::world()) {
        // The agent was down while the policies changed: the new one learns the kernel's
        // numbers, and must not give a set number new content in place.
        let mut ids = Ids::default();
        let before = compiled(&old, &mut ids);
        let mut syncer = PolicySyncer::new(Fake::default(), CAPACITY).expect("new");
        syncer.apply(&before, &cgroup_ids(&before));
        let kernel = std::mem::take(&mut syncer.maps);
        let mut restarted = PolicySyncer::new(kernel, CAPACITY).expect("new");
        let mut ids = Ids::default();
        let probe = compiled(&new, &mut ids);
        restarted.seed(&mut ids, &probe, &cgroup_ids(&probe));
        let after = compiled(&new, &mut ids);
        // `before` as the restarted agent would have numbered it is what the kernel holds.
        set_bounds(&mut restarted.maps, &before, &after);
        let report = restarted.apply(&after, &cgroup_ids(&after));
        prop_assert!(report.errors.is_empty(), "{:?}", report);
        let opened = restarted.maps.opened.borrow().clone();
        prop_assert!(opened.is_empty(), "{:?}", opened);
        prop_assert_eq!(&restarted.maps.entries, &after.entries);
    }
}

/// Pod `a` (cgroup c0) admitting TCP from every pod of `x` on `ports`, and the pods it names.
fn admitting(ports: std::ops::RangeInclusive<u16>) -> Vec<String> {
    let list: Vec<String> = ports.map(|p| format!("{{port: {p}}}")).collect();
    vec![
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}, annotations: {weft.io/cgroup: c0}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.10}\n".to_owned(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {pod: b}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.11}\n".to_owned(),
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{podSelector: {{}}}}], ports: [{}]}}]\n",
            list.join(", ")
        ),
    ]
}

fn compile_docs(docs: &[String], ids: &mut Ids) -> Policies {
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    compile(&store_of(&docs), &[], ids, CAPACITY.ipcache)
}

/// Old and new sets together exceed the capacity, each alone fits: the change completes in
/// one pass, and so does a later revocation.
#[test]
fn a_set_change_at_the_capacity_edge_completes_and_a_revocation_follows() {
    let mut ids = Ids::default();
    let v1 = compile_docs(&admitting(1..=30), &mut ids);
    let cap = v1.entries.len() + 4;
    let fake = Fake {
        entries_capacity: Some(cap),
        ..Fake::default()
    };
    let capacity = PolicyCapacity {
        entries: cap as u32,
        ..CAPACITY
    };
    let mut syncer = PolicySyncer::new(fake, capacity).expect("new");
    assert_eq!(syncer.apply(&v1, &cgroup_ids(&v1)).errors, []);
    let v2 = compile_docs(&admitting(101..=130), &mut ids);
    assert_eq!(v2.entries.len(), v1.entries.len());
    let report = syncer.apply(&v2, &cgroup_ids(&v2));
    assert_eq!(report.errors, [], "completed");
    assert_eq!(syncer.maps.entries, v2.entries);
    assert_eq!(
        syncer.maps.endpoints[&1000].policy_set,
        v2.endpoints["c0"].info.policy_set
    );
    let v3 = compile_docs(&admitting(101..=110), &mut ids);
    assert_eq!(syncer.apply(&v3, &cgroup_ids(&v3)).errors, []);
    assert_eq!(
        syncer.maps.entries, v3.entries,
        "the revocation took effect"
    );
}

/// A new set that cannot fit even alone: its pod allows nothing, the revocation holds, and
/// the agent says which map and flag.
#[test]
fn a_set_that_cannot_fit_denies_its_pod_instead_of_keeping_the_old_one() {
    let mut ids = Ids::default();
    let v1 = compile_docs(&admitting(1..=5), &mut ids);
    let cap = v1.entries.len() + 2;
    let capacity = PolicyCapacity {
        entries: cap as u32,
        ..CAPACITY
    };
    let fake = Fake {
        entries_capacity: Some(cap),
        ..Fake::default()
    };
    let mut syncer = PolicySyncer::new(fake, capacity).expect("new");
    assert_eq!(syncer.apply(&v1, &cgroup_ids(&v1)).errors, []);
    let v2 = compile_docs(&admitting(101..=140), &mut ids);
    let report = syncer.apply(&v2, &cgroup_ids(&v2));
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(report.errors[0].reason, Reason::MapFull);
    assert!(report.errors[0].message.contains("--max-policy-entries"));
    let ep = syncer.maps.endpoints[&1000];
    assert_eq!(ep.policy_set, 0);
    assert_eq!(ep.flags, v2.endpoints["c0"].info.flags);
    assert!(
        syncer.maps.entries.is_empty(),
        "the old set is gone: {:?}",
        syncer.maps.entries
    );
}

/// Addresses that cannot all be held: sets would judge addresses by stale identities, so the
/// isolated pods allow nothing, and the agent names the map and the flag.
#[test]
fn addresses_that_do_not_fit_deny_the_isolated_pods() {
    let mut ids = Ids::default();
    let desired = compile_docs(&admitting(1..=3), &mut ids);
    let capacity = PolicyCapacity {
        ipcache: (desired.ipcache.len() - 1) as u32,
        ..CAPACITY
    };
    let mut syncer = PolicySyncer::new(Fake::default(), capacity).expect("new");
    let report = syncer.apply(&desired, &cgroup_ids(&desired));
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(report.errors[0].map, "IPCACHE");
    assert!(report.errors[0].message.contains("--max-ipcache"));
    let ep = syncer.maps.endpoints[&1000];
    assert_eq!(ep.flags, desired.endpoints["c0"].info.flags);
    assert_eq!(ep.policy_set, 0, "allows nothing");
}

/// Once the addresses fit again, they are written before any pod leaves set 0, and the pass
/// ends in the desired state.
#[test]
fn addresses_that_fit_again_are_written_first() {
    let mut ids = Ids::default();
    let small = compile_docs(&admitting(1..=3), &mut ids);
    let capacity = PolicyCapacity {
        ipcache: small.ipcache.len() as u32,
        ..CAPACITY
    };
    let mut syncer = PolicySyncer::new(Fake::default(), capacity).expect("new");
    let mut big_docs = admitting(1..=3);
    big_docs.push("apiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: x, labels: {pod: c}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.0.0.12}\n".to_owned());
    let big = compile_docs(&big_docs, &mut ids);
    assert_eq!(syncer.apply(&big, &cgroup_ids(&big)).errors.len(), 1);
    assert_eq!(syncer.maps.endpoints[&1000].policy_set, 0);
    let again = compile_docs(&admitting(1..=3), &mut ids);
    let report = syncer.apply(&again, &cgroup_ids(&again));
    assert_eq!(report.errors, []);
    assert_eq!(syncer.maps.ipcache, again.ipcache);
    assert_eq!(syncer.maps.entries, again.entries);
    assert_eq!(
        syncer.maps.endpoints[&1000].policy_set,
        again.endpoints["c0"].info.policy_set
    );
}

mod plaintext;
