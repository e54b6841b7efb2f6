//! Plaintext tables (`AUTHZ`): written whole before an endpoint points to one, numbered by
//! content, deleted once no endpoint points to them, and taken over by a restarted agent.
use std::collections::BTreeMap;

use ipnet::IpNet;
use weft_abi::policy::{EP_AUTHZ, EP_MESHED, EndpointInfo, PLAINTEXT_OTHER_PORTS, PLAINTEXT_PORT};

use super::super::{Error, PlaintextRow, PolicyCapacity, PolicyMaps, PolicySyncer};
use crate::{
    compile::policy::{EntryKey, LocalEndpoint, PlaintextTable, Policies},
    tests::MemoryPolicyMaps,
};

/// Memory maps that check, at every write, that an endpoint points only to a table holding
/// exactly what its pod wants, and that no row is deleted from a table an endpoint points to.
#[derive(Debug, Default)]
struct Checked {
    maps: MemoryPolicyMaps,
    /// What each cgroup id's table must hold when its endpoint points to one.
    want: BTreeMap<u64, PlaintextTable>,
    violations: Vec<String>,
    /// Rows deleted, in order, with whether they allowed.
    deleted: Vec<(PlaintextRow, bool)>,
    /// Writes of `AUTHZ` rows fail once this many have succeeded.
    puts_before_failing: Option<usize>,
    /// Deleting rows that allow fails.
    allowing_rows_stuck: bool,
}

fn injected(op: &'static str) -> Error {
    Error::Map {
        map: "AUTHZ",
        op,
        // Not "not found", which a delete takes for done.
        source: aya::maps::MapError::OutOfBounds {
            index: 0,
            max_entries: 0,
        },
    }
}

impl Checked {
    fn table(&self, id: u32) -> PlaintextTable {
        self.maps
            .plaintext
            .iter()
            .filter(|((t, _, _), _)| *t == id)
            .map(|((_, port, net), allowed)| ((*port, *net), *allowed))
            .collect()
    }
}

impl PolicyMaps for Checked {
    fn read_endpoints(&self) -> Result<Vec<(u64, EndpointInfo)>, Error> {
        self.maps.read_endpoints()
    }
    fn read_ipcache(&self) -> Result<Vec<(IpNet, weft_abi::policy::IpcacheValue)>, Error> {
        self.maps.read_ipcache()
    }
    fn read_entries(&self) -> Result<Vec<(EntryKey, weft_abi::policy::PolicyValue)>, Error> {
        self.maps.read_entries()
    }
    fn put_endpoint(&mut self, id: u64, value: &EndpointInfo) -> Result<(), Error> {
        if value.authz_table != 0 && self.want.get(&id) != Some(&self.table(value.authz_table)) {
            self.violations.push(format!(
                "cgroup {id} points to table {} before it is whole",
                value.authz_table
            ));
        }
        self.maps.put_endpoint(id, value)
    }
    fn del_endpoint(&mut self, id: u64) -> Result<(), Error> {
        self.maps.del_endpoint(id)
    }
    fn put_ipcache(
        &mut self,
        net: &IpNet,
        value: &weft_abi::policy::IpcacheValue,
    ) -> Result<(), Error> {
        self.maps.put_ipcache(net, value)
    }
    fn del_ipcache(&mut self, net: &IpNet) -> Result<(), Error> {
        self.maps.del_ipcache(net)
    }
    fn put_entry(&mut self, k: &EntryKey, v: &weft_abi::policy::PolicyValue) -> Result<(), Error> {
        self.maps.put_entry(k, v)
    }
    fn del_entry(&mut self, k: &EntryKey) -> Result<(), Error> {
        self.maps.del_entry(k)
    }
    fn read_plaintext(&self) -> Result<Vec<(PlaintextRow, bool)>, Error> {
        self.maps.read_plaintext()
    }
    fn put_plaintext(&mut self, row: &PlaintextRow, allowed: bool) -> Result<(), Error> {
        if let Some(n) = &mut self.puts_before_failing {
            if *n == 0 {
                return Err(injected("write"));
            }
            *n -= 1;
        }
        if self.maps.endpoints.values().any(|e| e.authz_table == row.0) {
            self.violations
                .push(format!("row {row:?} written into table in use"));
        }
        self.maps.put_plaintext(row, allowed)
    }
    fn del_plaintext(&mut self, row: &PlaintextRow) -> Result<(), Error> {
        let allowed = self.maps.plaintext.get(row).copied().unwrap_or_default();
        if allowed && self.allowing_rows_stuck {
            return Err(injected("delete from"));
        }
        if self.maps.endpoints.values().any(|e| e.authz_table == row.0) {
            self.violations
                .push(format!("row {row:?} deleted from a table in use"));
        }
        self.deleted.push((*row, allowed));
        self.maps.del_plaintext(row)
    }
}

const CAPACITY: PolicyCapacity = PolicyCapacity {
    endpoints: 100,
    ipcache: 100,
    entries: 100,
    authz: 100,
};

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

/// A table allowing plaintext to `port` from `allowed`, refusing the rest.
fn table(port: u16, allowed: &str) -> PlaintextTable {
    [
        ((PLAINTEXT_PORT | u32::from(port), net("0.0.0.0/0")), false),
        ((PLAINTEXT_PORT | u32::from(port), net(allowed)), true),
        ((PLAINTEXT_OTHER_PORTS, net("0.0.0.0/0")), false),
    ]
    .into()
}

/// Pods `c<i>` (cgroup id 1000 + i), meshed, refusing plaintext by the given tables.
fn desired(tables: &[PlaintextTable]) -> (Policies, BTreeMap<String, u64>) {
    let mut p = Policies::default();
    let mut ids = BTreeMap::new();
    for (i, t) in tables.iter().enumerate() {
        let cgroup = format!("c{i}");
        let info = EndpointInfo {
            endpoint_id: i as u32 + 1,
            flags: EP_MESHED | EP_AUTHZ,
            ..EndpointInfo::default()
        };
        p.endpoints.insert(
            cgroup.clone(),
            LocalEndpoint {
                pod: format!("x/c{i}"),
                cgroup: cgroup.clone(),
                info,
                ingress_policies: Vec::new(),
                egress_policies: Vec::new(),
                ips: Vec::new(),
                quarantine: None,
                plaintext: t.clone(),
            },
        );
        ids.insert(cgroup, 1000 + i as u64);
    }
    (p, ids)
}

fn apply(s: &mut PolicySyncer<Checked>, tables: &[PlaintextTable]) -> super::super::PolicyReport {
    let (p, ids) = desired(tables);
    s.maps.want = (1000..).zip(tables.iter().cloned()).collect();
    s.apply(&p, &ids)
}

fn table_of(s: &PolicySyncer<Checked>, cgroup: u64) -> u32 {
    s.maps.maps.endpoints[&cgroup].authz_table
}

/// Pods with the same table share it; a pod whose table changes moves to a new one written
/// whole first; a table is deleted once no pod points to it, never while one does.
#[test]
fn tables_are_whole_before_use_shared_by_content_and_deleted_when_unused() {
    let (a, b, c) = (
        table(8080, "10.1.0.0/16"),
        table(9090, "10.2.0.0/16"),
        table(7070, "10.3.0.0/16"),
    );
    let mut s = PolicySyncer::new(Checked::default(), CAPACITY).expect("new");
    let report = apply(&mut s, &[a.clone(), a.clone(), b.clone()]);
    assert_eq!(report.errors, []);
    assert_eq!(table_of(&s, 1000), table_of(&s, 1001));
    assert_ne!(table_of(&s, 1000), table_of(&s, 1002));
    assert_eq!(s.plaintext_usage(), 6);
    let first = table_of(&s, 1000);
    apply(&mut s, &[a.clone(), c.clone(), b.clone()]);
    assert_eq!(table_of(&s, 1000), first, "a is still in use");
    assert_eq!(s.plaintext_usage(), 9);
    apply(&mut s, &[c.clone(), c.clone(), b.clone()]);
    assert_eq!(table_of(&s, 1000), table_of(&s, 1001));
    assert_eq!(s.plaintext_usage(), 6, "a is gone");
    assert_eq!(s.maps.table(first), PlaintextTable::new());
    assert_eq!(s.maps.violations, Vec::<String>::new());
}

/// A restarted agent finds the tables and the endpoints pointing to them: the same state
/// writes nothing; new content never reuses a number the kernel has seen.
#[test]
fn a_restarted_syncer_keeps_the_tables_it_finds() {
    let (a, b) = (table(8080, "10.1.0.0/16"), table(9090, "10.2.0.0/16"));
    let mut s = PolicySyncer::new(Checked::default(), CAPACITY).expect("new");
    apply(&mut s, &[a.clone(), b.clone()]);
    let numbers = (table_of(&s, 1000), table_of(&s, 1001));
    let maps = std::mem::take(&mut s.maps.maps);
    let mut again = PolicySyncer::new(
        Checked {
            maps,
            ..Checked::default()
        },
        CAPACITY,
    )
    .expect("new");
    let report = apply(&mut again, &[a.clone(), b.clone()]);
    assert_eq!((report.written, report.deleted), (0, 0));
    assert_eq!((table_of(&again, 1000), table_of(&again, 1001)), numbers);
    apply(&mut again, &[b.clone(), table(1, "10.9.0.0/16")]);
    assert_eq!(table_of(&again, 1000), numbers.1);
    assert!(table_of(&again, 1001) > numbers.1.max(numbers.0));
    assert_eq!(again.maps.violations, Vec::<String>::new());
}

/// A table that does not fit leaves its pod on table 0 (every plaintext caller refused),
/// names the flag that raises the map, and is written once room is made.
#[test]
fn a_table_that_does_not_fit_refuses_every_plaintext_caller() {
    let (a, b) = (table(8080, "10.1.0.0/16"), table(9090, "10.2.0.0/16"));
    let capacity = PolicyCapacity {
        authz: 4,
        ..CAPACITY
    };
    let mut s = PolicySyncer::new(Checked::default(), capacity).expect("new");
    let report = apply(&mut s, &[a.clone(), b.clone()]);
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].message.contains("--max-authz-entries"),
        "{report:?}"
    );
    assert_ne!(table_of(&s, 1000), 0);
    assert_eq!(table_of(&s, 1001), 0);
    assert_eq!(s.maps.maps.endpoints[&1001].flags & EP_AUTHZ, EP_AUTHZ);
    // The first pod moves to b: a's room is made before b is written.
    let report = apply(&mut s, &[b.clone(), b.clone()]);
    assert_eq!(report.errors, []);
    assert_eq!(table_of(&s, 1000), table_of(&s, 1001));
    assert_ne!(table_of(&s, 1001), 0);
    assert_eq!(s.maps.violations, Vec::<String>::new());
}

/// An old table loses its allowing rows before its refusing ones (a program still reading
/// it finds no more than it allowed); when an allowing row cannot be deleted, every refusing
/// row stays, and a later pass finishes the job.
#[test]
fn an_old_table_loses_its_allowing_rows_first() {
    let old: PlaintextTable = [
        ((PLAINTEXT_PORT | 9090, net("0.0.0.0/0")), false),
        ((PLAINTEXT_OTHER_PORTS, net("0.0.0.0/0")), true),
        ((PLAINTEXT_OTHER_PORTS, net("10.0.0.0/8")), false),
        ((PLAINTEXT_OTHER_PORTS, net("10.1.0.0/16")), true),
    ]
    .into();
    let mut s = PolicySyncer::new(Checked::default(), CAPACITY).expect("new");
    apply(&mut s, std::slice::from_ref(&old));
    let first = table_of(&s, 1000);
    s.maps.allowing_rows_stuck = true;
    let report = apply(&mut s, &[table(8080, "10.1.0.0/16")]);
    assert_eq!(report.errors.len(), 2, "one per allowing row: {report:?}");
    assert_eq!(
        s.maps.deleted,
        [],
        "no refusing row goes before the allowing ones"
    );
    assert_eq!(s.maps.table(first), old);
    s.maps.allowing_rows_stuck = false;
    let report = apply(&mut s, &[table(8080, "10.1.0.0/16")]);
    assert_eq!(report.errors, []);
    let order: Vec<bool> = s.maps.deleted.iter().map(|(_, allowed)| *allowed).collect();
    assert_eq!(order, [true, true, false, false]);
    assert_eq!(s.maps.table(first), PlaintextTable::new());
    assert_eq!(s.maps.violations, Vec::<String>::new());
}

/// A write failing half way through a table leaves its pod on table 0 (every plaintext
/// caller refused) and the written rows are removed; the next pass writes it whole.
#[test]
fn a_table_written_half_way_is_never_pointed_to() {
    let a = table(8080, "10.1.0.0/16");
    let mut s = PolicySyncer::new(Checked::default(), CAPACITY).expect("new");
    s.maps.puts_before_failing = Some(2);
    let report = apply(&mut s, std::slice::from_ref(&a));
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(table_of(&s, 1000), 0);
    assert_eq!(
        s.maps.deleted.len(),
        2,
        "the half-written rows removed at once"
    );
    s.maps.puts_before_failing = None;
    let report = apply(&mut s, std::slice::from_ref(&a));
    assert_eq!(report.errors, []);
    let id = table_of(&s, 1000);
    assert_ne!(id, 0);
    assert_eq!(s.maps.table(id), a);
    assert_eq!(
        s.maps.maps.plaintext.len(),
        a.len(),
        "the half-written rows are gone"
    );
    assert_eq!(s.maps.violations, Vec::<String>::new());
}
