//! Writes the difference between desired and applied policy state into `ENDPOINTS`,
//! `IPCACHE` and `POLICY`.
//!
//! Order keeps every moment safe for the programs reading concurrently:
//! 1. new and changed `POLICY` entries (a new identity or set is allowed before anything
//!    refers to it), with bridge entries for identities being retired (see `bridge`),
//! 2. new and changed `ENDPOINTS` (a pod becomes isolated only once its entries exist, and
//!    points to a plaintext table in `AUTHZ` only once the table is written whole),
//! 3. stale `ENDPOINTS` (a pod that is gone no longer holds an old set while addresses
//!    move),
//! 4. new and changed `IPCACHE` entries (an address moves to an identity whose entries exist),
//! 5. stale `IPCACHE`, 6. stale `POLICY` entries, 7. `AUTHZ` tables no endpoint points to.
//!
//! A set number stands for fixed content (compile numbers sets by what their entries say), so
//! a set whose rules change is written whole under a new number before endpoints move to it,
//! and each endpoint sees exactly its old rules or its new ones, never a mix. Numbers are
//! never reused while the kernel may hold them (see `compile::policy::ids`), so an old key
//! never takes a new meaning.
//!
//! When a set's entries do not fit (or a write fails), the pods that want it get set 0,
//! which allows nothing in the directions they are isolated in: keeping their previous set
//! could keep a permission the new policy revokes. Room is made from sets no pod uses, and
//! once those pods have left their old sets the pass tries again, so a change at the edge of
//! the capacity completes in the same pass or fails closed for those pods only; every other
//! pod's update (revocations, addresses) still applies. Old and new addresses that do not fit
//! together make room from stale addresses whose removal gives them what the new state does.
//! A plaintext table is numbered by its content like a set: a table that does not fit leaves
//! its pods on table 0, which refuses every plaintext caller.
//! The exception is `ENDPOINTS` itself: a pod that does not fit there cannot be enforced, and
//! the error says so (with `--max-endpoints`).
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::Serialize;
use weft_abi::{
    maps,
    policy::{EP_AUTHZ, EndpointInfo, IDENTITY_FIRST, IpcacheValue, PolicyValue},
};

use super::{Error, Failure};
use crate::compile::policy::{EntryKey, Ids, PlaintextTable, Policies};

pub mod kernel;

/// The maps policy sync writes; the kernel implementation is [`kernel::KernelPolicyMaps`].
pub trait PolicyMaps {
    fn read_endpoints(&self) -> Result<Vec<(u64, EndpointInfo)>, Error>;
    fn read_ipcache(&self) -> Result<Vec<(IpNet, IpcacheValue)>, Error>;
    fn read_entries(&self) -> Result<Vec<(EntryKey, PolicyValue)>, Error>;
    fn put_endpoint(&mut self, cgroup_id: u64, value: &EndpointInfo) -> Result<(), Error>;
    fn del_endpoint(&mut self, cgroup_id: u64) -> Result<(), Error>;
    fn put_ipcache(&mut self, net: &IpNet, value: &IpcacheValue) -> Result<(), Error>;
    fn del_ipcache(&mut self, net: &IpNet) -> Result<(), Error>;
    fn put_entry(&mut self, key: &EntryKey, value: &PolicyValue) -> Result<(), Error>;
    fn del_entry(&mut self, key: &EntryKey) -> Result<(), Error>;
    /// `AUTHZ`: (table, port word, caller prefix) → allowed.
    fn read_plaintext(&self) -> Result<Vec<(PlaintextRow, bool)>, Error>;
    fn put_plaintext(&mut self, row: &PlaintextRow, allowed: bool) -> Result<(), Error>;
    fn del_plaintext(&mut self, row: &PlaintextRow) -> Result<(), Error>;
}

/// An `AUTHZ` key: (table, port word, caller prefix).
pub type PlaintextRow = (u32, u32, IpNet);

/// Capacities of the policy maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyCapacity {
    pub endpoints: u32,
    pub ipcache: u32,
    pub entries: u32,
    pub authz: u32,
}

impl From<&crate::datapath::Capacities> for PolicyCapacity {
    fn from(c: &crate::datapath::Capacities) -> Self {
        Self {
            endpoints: c.max_endpoints,
            ipcache: c.max_ipcache,
            entries: c.max_policy_entries,
            authz: c.max_authz_entries,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    pub written: usize,
    pub deleted: usize,
    /// Problems that left some of the desired state out; each names its map (and, when full,
    /// the flag that raises it).
    pub errors: Vec<Failure>,
}

/// What stays in force when a step fails.
const SETS_DENIED: &str = "Pods whose policies did not fit allow nothing in the directions they are isolated in, until they fit.";
const ENDPOINT_KEPT: &str = "The pod keeps its previous policies.";
const ADDRESSES_KEPT: &str =
    "Addresses keep their previous identities; isolated pods allow nothing until they are written.";
const STALE_KEPT: &str = "The stale entry stays until a later pass removes it.";
const PLAINTEXT_REFUSED: &str =
    "Meshed pods whose plaintext table did not fit refuse every plaintext caller until it fits.";

/// Applies desired policy state to the maps.
#[derive(Debug)]
pub struct PolicySyncer<M> {
    maps: M,
    capacity: PolicyCapacity,
    endpoints: BTreeMap<u64, EndpointInfo>,
    ipcache: BTreeMap<IpNet, IpcacheValue>,
    entries: BTreeMap<EntryKey, PolicyValue>,
    /// `AUTHZ` as written, by table number (a table whose writing failed half way included).
    tables: BTreeMap<u32, PlaintextTable>,
    /// The number of each table written whole, by content.
    table_ids: BTreeMap<PlaintextTable, u32>,
    /// The last table number given out. The next is the one after it that no table and no
    /// endpoint has, so a program that read an endpoint just before it changed does not find
    /// another table's entries under its number (a restarted agent starts after the highest
    /// number the maps hold).
    last_table: u32,
    /// The last pass could not write every address (isolated pods were left on set 0).
    addresses_pending: bool,
}

impl<M: PolicyMaps> PolicySyncer<M> {
    /// Takes over what the maps hold (from an earlier agent).
    pub fn new(maps: M, capacity: PolicyCapacity) -> Result<Self, Error> {
        let mut tables: BTreeMap<u32, PlaintextTable> = BTreeMap::new();
        for ((table, port, net), allowed) in maps.read_plaintext()? {
            tables
                .entry(table)
                .or_default()
                .insert((port, net), allowed);
        }
        // A table an earlier agent left half written or half deleted is taken for what it
        // holds: reused only for exactly that content.
        let table_ids = tables.iter().map(|(id, t)| (t.clone(), *id)).collect();
        let endpoints: BTreeMap<u64, EndpointInfo> = maps.read_endpoints()?.into_iter().collect();
        let last_table = endpoints
            .values()
            .map(|e| e.authz_table)
            .chain(tables.keys().copied())
            .max()
            .unwrap_or(0);
        Ok(Self {
            endpoints,
            ipcache: maps.read_ipcache()?.into_iter().collect(),
            entries: maps.read_entries()?.into_iter().collect(),
            tables,
            table_ids,
            last_table,
            maps,
            capacity,
            addresses_pending: false,
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Entries in use: (endpoints, ipcache, policy entries).
    pub fn usage(&self) -> (usize, usize, usize) {
        (self.endpoints.len(), self.ipcache.len(), self.entries.len())
    }

    /// `AUTHZ` entries in use.
    pub fn plaintext_usage(&self) -> usize {
        self.tables.values().map(BTreeMap::len).sum()
    }

    /// Teaches a fresh numbering the numbers the kernel holds, so a restarted agent rewrites
    /// nothing that did not change and never gives an old number a new meaning. `first` is a
    /// compile with `ids` as they are; `cgroup_ids` resolves its endpoints.
    pub fn seed(&self, ids: &mut Ids, first: &Policies, cgroup_ids: &BTreeMap<String, u64>) {
        // Entries may still name identities no address has any more: never reuse those either.
        let max_identity = self
            .ipcache
            .values()
            .map(|v| v.identity)
            .chain(self.entries.keys().map(|k| k.data.identity))
            .max()
            .unwrap_or(0);
        let max_endpoint = self
            .endpoints
            .values()
            .map(|v| v.endpoint_id)
            .max()
            .unwrap_or(0);
        let max_set = self
            .endpoints
            .values()
            .map(|v| v.policy_set)
            .chain(self.entries.keys().map(|k| k.data.policy_set))
            .max()
            .unwrap_or(0);
        let mut fresh = Ids::default();
        fresh.reserve(max_identity, max_endpoint, max_set);
        let mut identity_hints: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (net, want) in &first.ipcache {
            if let Some(have) = self.ipcache.get(net) {
                identity_hints
                    .entry(want.identity)
                    .or_default()
                    .insert(have.identity);
            }
        }
        // Kernel identity → `first`'s identity, where the mapping is unambiguous both ways.
        let mut kernel_to_first: BTreeMap<u32, Option<u32>> = BTreeMap::new();
        for (want, have) in identity_hints {
            // Only an unambiguous mapping is a hint.
            if let (Some(key), [old]) = (
                first.identities.get(&want),
                &have.into_iter().collect::<Vec<_>>()[..],
            ) {
                fresh.hint_identity(key.clone(), *old);
                kernel_to_first
                    .entry(*old)
                    .and_modify(|w| *w = None)
                    .or_insert(Some(want));
            }
        }
        let kernel_sets = entries_by_set(&self.entries, |id| {
            if id < IDENTITY_FIRST {
                Some(id)
            } else {
                kernel_to_first.get(&id).copied().flatten()
            }
        });
        let first_sets = entries_by_set(&first.entries, Some);
        for (cgroup, e) in &first.endpoints {
            let Some(have) = cgroup_ids.get(cgroup).and_then(|id| self.endpoints.get(id)) else {
                continue;
            };
            fresh.hint_endpoint(cgroup.clone(), have.endpoint_id);
            // A set number keeps its content: the kernel's set is reused only when it already
            // says what the new one says (otherwise the new content gets a new number). A
            // kernel set naming an identity that cannot be translated is unknown, and an empty
            // new set must not match it.
            let empty = Some(BTreeSet::new());
            let kernel = kernel_sets.get(&have.policy_set).unwrap_or(&empty);
            let wanted = first_sets.get(&e.info.policy_set).unwrap_or(&empty);
            if let Some(key) = first.set_keys.get(&e.info.policy_set)
                && have.policy_set != 0
                && kernel.is_some()
                && kernel == wanted
            {
                fresh.hint_set(key.clone(), have.policy_set);
            }
        }
        *ids = fresh;
    }

    /// One pass. `cgroup_ids`: the cgroup id of each desired endpoint's cgroup that exists.
    pub fn apply(
        &mut self,
        desired: &Policies,
        cgroup_ids: &BTreeMap<String, u64>,
    ) -> PolicyReport {
        let mut report = PolicyReport::default();
        let tables = self.write_tables(desired, cgroup_ids, &mut report);
        let want_endpoints = endpoint_values(desired, cgroup_ids, &tables.ids);
        // Addresses that cannot all be held make every set's judgement unreliable: the
        // isolated pods allow nothing until they can be (decided before anything moves).
        let mut addresses_fit = self.make_ipcache_room(desired, &mut report);
        if addresses_fit && self.addresses_pending {
            // The last pass could not hold every address: its isolated pods are on set 0 and
            // `IPCACHE` is half-written. Addresses first, before any pod leaves set 0.
            addresses_fit = self.write_ipcache(desired, &mut report);
        }
        let bridge = self.bridge(desired);
        let mut sets = PolicyReport::default();
        let missing = if addresses_fit {
            self.write_sets(desired, &bridge, &mut sets)
        } else {
            desired.entries.keys().map(|k| k.data.policy_set).collect()
        };
        self.write_endpoints(&want_endpoints, &missing, &mut report);
        self.remove_stale_endpoints(&want_endpoints, &mut report);
        if !self.write_ipcache(desired, &mut report) && addresses_fit {
            // A write failed half way: the sets in place may judge stale identities.
            addresses_fit = false;
            let all = desired.entries.keys().map(|k| k.data.policy_set).collect();
            self.write_endpoints(&want_endpoints, &all, &mut report);
        }
        self.remove_stale_entries(desired, &mut report);
        if !missing.is_empty() && addresses_fit {
            self.retry_sets(desired, &want_endpoints, &mut sets, &mut report);
        }
        self.addresses_pending = !addresses_fit;
        self.finish_tables(desired, cgroup_ids, &tables, addresses_fit, &mut report);
        report.written += sets.written;
        report.deleted += sets.deleted;
        report.errors.splice(0..0, sets.errors);
        report
    }

    /// The pods whose sets did not fit are denied now and their old sets are gone: the room
    /// those held may be enough. (Addresses have moved: no bridge needed.)
    fn retry_sets(
        &mut self,
        desired: &Policies,
        want_endpoints: &BTreeMap<u64, EndpointInfo>,
        sets: &mut PolicyReport,
        report: &mut PolicyReport,
    ) {
        let mut again = PolicyReport::default();
        let still = self.write_sets(desired, &BTreeMap::new(), &mut again);
        if still.is_empty() {
            // Nothing is left out after all: the first round's failures are history.
            sets.errors.clear();
        }
        // The sets' failures are the first round's (told once); the endpoints' are new.
        again.errors.clear();
        self.write_endpoints(want_endpoints, &still, &mut again);
        report.written += again.written;
        report.deleted += again.deleted;
        for e in again.errors {
            if !sets.errors.contains(&e) && !report.errors.contains(&e) {
                report.errors.push(e);
            }
        }
    }

    /// Step 1: each set's entries (with the bridge entries for identities being retired),
    /// set by set as they fit. Returns the sets that could not be written whole: the pods
    /// that want one of them are denied until it is (step 2).
    fn write_sets(
        &mut self,
        desired: &Policies,
        bridge: &BTreeMap<EntryKey, PolicyValue>,
        report: &mut PolicyReport,
    ) -> BTreeSet<u32> {
        let mut sets: BTreeMap<u32, Vec<(&EntryKey, &PolicyValue)>> = BTreeMap::new();
        for (k, v) in desired.entries.iter().chain(bridge) {
            sets.entry(k.data.policy_set).or_default().push((k, v));
        }
        let mut missing = BTreeSet::new();
        let mut freed = false;
        for (set, entries) in sets {
            let new = entries
                .iter()
                .filter(|(k, _)| !self.entries.contains_key(k))
                .count() as u64;
            let used = self.entries.len() as u64;
            if new > 0 && !freed && used + new > u64::from(self.capacity.entries) {
                // Room first: entries of sets no pod uses (left by an earlier pass).
                freed = true;
                self.remove_unused_entries(desired, report);
            }
            let used = self.entries.len() as u64;
            if let Err(e) = Error::check(maps::POLICY, used, new, self.capacity.entries) {
                if missing.is_empty() {
                    report.errors.push(Failure::new(&e, SETS_DENIED));
                }
                missing.insert(set);
                continue;
            }
            if !self.write_set(&entries, report) {
                missing.insert(set);
            }
        }
        missing
    }

    fn write_set(
        &mut self,
        entries: &[(&EntryKey, &PolicyValue)],
        report: &mut PolicyReport,
    ) -> bool {
        for (k, v) in entries {
            if self.entries.get(k) == Some(v) {
                continue;
            }
            if let Err(e) = self.maps.put_entry(k, v) {
                report.errors.push(Failure::new(&e, SETS_DENIED));
                return false;
            }
            self.entries.insert(**k, **v);
            report.written += 1;
        }
        true
    }

    /// Step 2: endpoints, as many as fit. A pod whose set could not be written is denied in
    /// the directions it is isolated in (set 0 allows nothing): keeping its previous set
    /// could keep a revoked permission.
    fn write_endpoints(
        &mut self,
        want: &BTreeMap<u64, EndpointInfo>,
        missing: &BTreeSet<u32>,
        report: &mut PolicyReport,
    ) {
        for (id, want) in want {
            let have = self.endpoints.get(id).copied();
            let mut value = *want;
            if missing.contains(&value.policy_set) {
                value.policy_set = 0;
            }
            if have == Some(value) {
                continue;
            }
            if have.is_none() {
                let used = self.endpoints.len() as u64;
                if let Err(e) = Error::check(maps::ENDPOINTS, used, 1, self.capacity.endpoints) {
                    let consequence = format!(
                        "The pod with cgroup id {id} is not enforced by its policies \
                         (isolated both ways with --unbound-pods=isolate)."
                    );
                    report.errors.push(Failure::new(&e, &consequence));
                    continue;
                }
            }
            match self.maps.put_endpoint(*id, &value) {
                Ok(()) => {
                    self.endpoints.insert(*id, value);
                    report.written += 1;
                }
                Err(e) => report.errors.push(Failure::new(&e, ENDPOINT_KEPT)),
            }
        }
    }

    /// Step 3: endpoints that are gone (isolation lifted: never more restrictive than before).
    fn remove_stale_endpoints(
        &mut self,
        want: &BTreeMap<u64, EndpointInfo>,
        report: &mut PolicyReport,
    ) {
        let stale: Vec<u64> = self
            .endpoints
            .keys()
            .filter(|id| !want.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.delete(
                report,
                |m| m.del_endpoint(id),
                |s| {
                    s.endpoints.remove(&id);
                },
            );
        }
    }

    /// Whether every desired address can be held: the desired state alone fits, and old and
    /// new together fit once stale addresses that can go early are gone.
    fn make_ipcache_room(&mut self, desired: &Policies, report: &mut PolicyReport) -> bool {
        let consequence = "Isolated pods allow nothing until the addresses fit.";
        let need = desired.ipcache.len() as u64;
        if let Err(e) = Error::check(maps::IPCACHE, 0, need, self.capacity.ipcache) {
            report.errors.push(Failure::new(&e, consequence));
            return false;
        }
        let new = |s: &Self| {
            desired
                .ipcache
                .keys()
                .filter(|n| !s.ipcache.contains_key(n))
                .count() as u64
        };
        let fits = |s: &Self| {
            Error::check(
                maps::IPCACHE,
                s.ipcache.len() as u64,
                new(s),
                s.capacity.ipcache,
            )
        };
        if fits(self).is_ok() {
            return true;
        }
        self.remove_stale_ipcache_early(desired, report);
        match fits(self) {
            Ok(()) => true,
            Err(e) => {
                report.errors.push(Failure::new(&e, consequence));
                false
            }
        }
    }

    /// Steps 4 and 5: addresses, most specific first, as many as fit (all, unless
    /// [`Self::make_ipcache_room`] said otherwise). Returns false when a write failed.
    fn write_ipcache(&mut self, desired: &Policies, report: &mut PolicyReport) -> bool {
        // Most specific first: a wider prefix never appears before the narrower ones
        // (excepts, pods) that carve into it, so no address briefly takes its identity.
        let mut writes: Vec<(&IpNet, &IpcacheValue)> = desired.ipcache.iter().collect();
        writes.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        for (net, v) in writes {
            if self.ipcache.get(net) == Some(v) {
                continue;
            }
            let used = self.ipcache.len() as u64;
            if !self.ipcache.contains_key(net)
                && Error::check(maps::IPCACHE, used, 1, self.capacity.ipcache).is_err()
            {
                // Reported by make_ipcache_room; the isolated pods already allow nothing.
                continue;
            }
            if let Err(e) = self.maps.put_ipcache(net, v) {
                report.errors.push(Failure::new(&e, ADDRESSES_KEPT));
                return false;
            }
            self.ipcache.insert(*net, *v);
            report.written += 1;
        }
        self.remove_stale_ipcache(desired, report, |_, _| false);
        true
    }

    /// Addresses the desired state no longer has, widest first (no address briefly takes a
    /// wider prefix's identity; an entry is judged against what remains), except those
    /// `hold` keeps for now.
    fn remove_stale_ipcache(
        &mut self,
        desired: &Policies,
        report: &mut PolicyReport,
        hold: impl Fn(&Self, &IpNet) -> bool,
    ) {
        let mut stale: Vec<IpNet> = self
            .ipcache
            .keys()
            .filter(|n| !desired.ipcache.contains_key(n))
            .copied()
            .collect();
        stale.sort_by_key(IpNet::prefix_len);
        for net in stale {
            if hold(self, &net) {
                continue;
            }
            self.delete(
                report,
                |m| m.del_ipcache(&net),
                |s| {
                    s.ipcache.remove(&net);
                },
            );
        }
    }

    /// Stale addresses removed before the new ones are written, to make room: only those
    /// whose addresses then fall to exactly what the desired state gives them (the same
    /// covering prefix and value), or to no entry at all (the world, which only rules that
    /// allow every peer match).
    fn remove_stale_ipcache_early(&mut self, desired: &Policies, report: &mut PolicyReport) {
        self.remove_stale_ipcache(desired, report, |s, net| {
            let after = covering(&s.ipcache, net);
            after.is_some() && after != covering(&desired.ipcache, net)
        });
    }

    /// Step 6: entries nothing wants (bridges included), except those of an old set a pod
    /// still uses because its endpoint could not be rewritten.
    fn remove_stale_entries(&mut self, desired: &Policies, report: &mut PolicyReport) {
        let wanted: BTreeSet<u32> = desired.entries.keys().map(|k| k.data.policy_set).collect();
        let held: BTreeSet<u32> = self
            .endpoints
            .values()
            .map(|e| e.policy_set)
            .filter(|s| !wanted.contains(s))
            .collect();
        let stale: Vec<EntryKey> = self
            .entries
            .keys()
            .filter(|k| !desired.entries.contains_key(k) && !held.contains(&k.data.policy_set))
            .copied()
            .collect();
        self.remove_entries(stale, report);
    }

    /// Entries of sets that no pod uses and no pod will: nothing reads them.
    fn remove_unused_entries(&mut self, desired: &Policies, report: &mut PolicyReport) {
        let in_use: BTreeSet<u32> = self
            .endpoints
            .values()
            .map(|e| e.policy_set)
            .chain(desired.entries.keys().map(|k| k.data.policy_set))
            .collect();
        let unused: Vec<EntryKey> = self
            .entries
            .keys()
            .filter(|k| !in_use.contains(&k.data.policy_set))
            .copied()
            .collect();
        self.remove_entries(unused, report);
    }

    fn remove_entries(&mut self, keys: Vec<EntryKey>, report: &mut PolicyReport) {
        for k in keys {
            self.delete(
                report,
                |m| m.del_entry(&k),
                |s| {
                    s.entries.remove(&k);
                },
            );
        }
    }

    /// Step 0: the plaintext tables the bound `EP_AUTHZ` endpoints want that `AUTHZ` does
    /// not hold yet, each whole under a new number. A table left out of the result (it did
    /// not fit, a write failed) leaves its pods on table 0.
    fn write_tables(
        &mut self,
        desired: &Policies,
        cgroup_ids: &BTreeMap<String, u64>,
        report: &mut PolicyReport,
    ) -> Tables {
        let wanted: BTreeSet<&PlaintextTable> = desired
            .endpoints
            .iter()
            .filter(|(cg, e)| cgroup_ids.contains_key(*cg) && e.info.flags & EP_AUTHZ != 0)
            .map(|(_, e)| &e.plaintext)
            .filter(|t| !t.is_empty())
            .collect();
        let mut ids = BTreeMap::new();
        let mut freed = false;
        let first_error = report.errors.len();
        for table in wanted.iter().copied() {
            if let Some(id) = self.table_ids.get(table) {
                ids.insert(table.clone(), *id);
                continue;
            }
            let used = self.plaintext_usage() as u64;
            let need = table.len() as u64;
            if !freed && used + need > u64::from(self.capacity.authz) {
                // Room first: tables no endpoint points to and none is about to.
                freed = true;
                let keep = wanted
                    .iter()
                    .filter_map(|t| self.table_ids.get(*t).copied())
                    .collect();
                self.remove_unused_tables(&keep, report);
            }
            let used = self.plaintext_usage() as u64;
            if let Err(e) = Error::check(maps::AUTHZ, used, need, self.capacity.authz) {
                report.errors.push(Failure::new(&e, PLAINTEXT_REFUSED));
                continue;
            }
            if let Some(id) = self.write_table(table, report) {
                ids.insert(table.clone(), id);
            }
        }
        Tables {
            complete: ids.len() == wanted.len(),
            ids,
            failures: report.errors[first_error..].to_vec(),
        }
    }

    /// Step 7: tables no endpoint points to. When some table did not fit, the room the old
    /// tables of its pods held may be enough now (those pods are on table 0): it is written
    /// and they move to it in the same pass.
    fn finish_tables(
        &mut self,
        desired: &Policies,
        cgroup_ids: &BTreeMap<String, u64>,
        tables: &Tables,
        addresses_fit: bool,
        report: &mut PolicyReport,
    ) {
        let keep = tables.ids.values().copied().collect();
        self.remove_unused_tables(&keep, report);
        if tables.complete {
            return;
        }
        // The first round's failures are told once.
        let mut retry = PolicyReport::default();
        let again = self.write_tables(desired, cgroup_ids, &mut retry);
        report.written += retry.written;
        report.deleted += retry.deleted;
        if again.ids.len() == tables.ids.len() {
            return;
        }
        if again.complete {
            report.errors.retain(|e| !tables.failures.contains(e));
        }
        let missing: BTreeSet<u32> = desired
            .entries
            .iter()
            .filter(|(k, v)| !addresses_fit || self.entries.get(k) != Some(v))
            .map(|(k, _)| k.data.policy_set)
            .collect();
        let want = endpoint_values(desired, cgroup_ids, &again.ids);
        self.write_endpoints(&want, &missing, report);
    }

    /// Writes `table` under a new number; None when a write failed (what was written stays
    /// recorded, unreferenced, for step 7).
    fn write_table(&mut self, table: &PlaintextTable, report: &mut PolicyReport) -> Option<u32> {
        let id = self.next_table_id()?;
        self.last_table = id;
        for (&(port, net), &allowed) in table {
            if let Err(e) = self.maps.put_plaintext(&(id, port, net), allowed) {
                report.errors.push(Failure::new(&e, PLAINTEXT_REFUSED));
                return None;
            }
            self.tables
                .entry(id)
                .or_default()
                .insert((port, net), allowed);
            report.written += 1;
        }
        self.table_ids.insert(table.clone(), id);
        Some(id)
    }

    /// The first number after the last one given out (0 skipped) that no table and no
    /// endpoint has.
    fn next_table_id(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.endpoints.values().map(|e| e.authz_table).collect();
        let mut id = self.last_table;
        // There are fewer tables and endpoints than numbers: the search ends.
        loop {
            id = id.checked_add(1).unwrap_or(1);
            if id == self.last_table {
                return None;
            }
            if !self.tables.contains_key(&id) && !used.contains(&id) {
                return Some(id);
            }
        }
    }

    /// Step 7: tables no endpoint points to, except those in `keep` (wanted by this pass).
    fn remove_unused_tables(&mut self, keep: &BTreeSet<u32>, report: &mut PolicyReport) {
        let used: BTreeSet<u32> = self.endpoints.values().map(|e| e.authz_table).collect();
        let unused: Vec<u32> = self
            .tables
            .keys()
            .filter(|id| !used.contains(id) && !keep.contains(id))
            .copied()
            .collect();
        for id in unused {
            // Not reusable once a row is gone, whatever happens to the rest.
            self.table_ids.retain(|_, t| *t != id);
            self.remove_table(id, report);
        }
    }

    /// Deletes table `id`'s rows, those that allow first. A program that read its endpoint
    /// before it moved off the table may still look in it: while every row that refuses
    /// is there, what it finds allows no more than the whole table did (a gone allowing
    /// row leaves a wider row of the port, which allows only if it did for these callers,
    /// or a refusing one, or the other ports' rows where the port had nothing but allowing
    /// rows). So the refusing rows go only once every allowing row has.
    fn remove_table(&mut self, id: u32, report: &mut PolicyReport) {
        for allowing in [true, false] {
            let rows: Vec<(u32, IpNet)> = self.tables[&id]
                .iter()
                .filter(|(_, a)| **a == allowing)
                .map(|(k, _)| *k)
                .collect();
            let before = report.errors.len();
            for (port, net) in rows {
                self.delete(
                    report,
                    |m| m.del_plaintext(&(id, port, net)),
                    |s| {
                        if let Some(t) = s.tables.get_mut(&id) {
                            t.remove(&(port, net));
                        }
                    },
                );
            }
            if report.errors.len() > before {
                return;
            }
        }
        self.tables.remove(&id);
    }

    /// Entries that let a set treat an identity being retired like its successor.
    ///
    /// A pod moves to its new set (step 2) before addresses move to their new identities
    /// (step 4); in between, the new set would not know the addresses' old identities. When
    /// every address of a retiring pod identity moves to the same new identity, the new set
    /// allows the old one exactly as it allows the new one. (An identity whose addresses
    /// split among several successors gets no bridge: a connection starting in that instant
    /// may be refused, never wrongly allowed.) Step 6 removes the bridge.
    fn bridge(&self, desired: &Policies) -> BTreeMap<EntryKey, PolicyValue> {
        let kept: BTreeSet<u32> = desired.ipcache.values().map(|v| v.identity).collect();
        let mut successors: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (net, old) in &self.ipcache {
            // Reserved identities (the world) stand for more than these addresses.
            if kept.contains(&old.identity) || old.identity < IDENTITY_FIRST {
                continue;
            }
            // Only single addresses: a new, narrower prefix can carve a wider one, and the
            // addresses it takes away go elsewhere than the prefix's successor.
            let new = if net.prefix_len() == net.max_prefix_len() {
                desired.ipcache.get(net).map_or(0, |v| v.identity)
            } else {
                0
            };
            successors.entry(old.identity).or_default().insert(new);
        }
        let single: BTreeMap<u32, u32> = successors
            .into_iter()
            .filter_map(|(old, new)| match new.into_iter().collect::<Vec<_>>()[..] {
                [n] if n != 0 => Some((n, old)),
                _ => None,
            })
            .collect();
        if single.is_empty() {
            return BTreeMap::new();
        }
        desired
            .entries
            .iter()
            .filter_map(|(k, v)| {
                let old = *single.get(&k.data.identity)?;
                let mut bridged = *k;
                bridged.data.identity = old;
                (!desired.entries.contains_key(&bridged)).then_some((bridged, *v))
            })
            .collect()
    }

    fn delete(
        &mut self,
        report: &mut PolicyReport,
        op: impl FnOnce(&mut M) -> Result<(), Error>,
        forget: impl FnOnce(&mut Self),
    ) {
        match op(&mut self.maps) {
            Ok(()) => {
                forget(self);
                report.deleted += 1;
            }
            Err(e) if e.is_not_found() => forget(self),
            // Kept as applied: the next pass tries again.
            Err(e) => report.errors.push(Failure::new(&e, STALE_KEPT)),
        }
    }
}

/// The plaintext tables a pass numbered.
struct Tables {
    /// Each wanted table held whole, by content.
    ids: BTreeMap<PlaintextTable, u32>,
    /// Whether every wanted table is.
    complete: bool,
    /// What went wrong numbering them (already in the pass's report).
    failures: Vec<Failure>,
}

/// The `ENDPOINTS` values of the desired endpoints whose cgroups exist, each `EP_AUTHZ` one
/// pointing to its table (0 when it is not held whole: every plaintext caller refused).
fn endpoint_values(
    desired: &Policies,
    cgroup_ids: &BTreeMap<String, u64>,
    tables: &BTreeMap<PlaintextTable, u32>,
) -> BTreeMap<u64, EndpointInfo> {
    desired
        .endpoints
        .iter()
        .filter_map(|(cg, e)| {
            let mut info = e.info;
            info.authz_table = if info.flags & EP_AUTHZ != 0 {
                tables.get(&e.plaintext).copied().unwrap_or(0)
            } else {
                0
            };
            Some((*cgroup_ids.get(cg)?, info))
        })
        .collect()
}

/// The longest prefix strictly wider than `net` that `map` holds, with its value.
fn covering(map: &BTreeMap<IpNet, IpcacheValue>, net: &IpNet) -> Option<(IpNet, IpcacheValue)> {
    (0..net.prefix_len()).rev().find_map(|len| {
        let wider = IpNet::new(net.addr(), len).ok()?.trunc();
        map.get(&wider).map(|v| (wider, *v))
    })
}

/// An entry without its set number: (prefix length, identity, direction, protocol, port,
/// rule, flags).
type SetRow = (u32, u32, u8, u8, u16, u32, u32);

/// Entries grouped by set, identities translated by `identity` (a set with an entry it cannot
/// translate is left out: it cannot match anything).
/// Each set's entries with identities translated; `None` for a set with an entry whose
/// identity has no translation (its content cannot be compared: it is unknown, not empty).
fn entries_by_set(
    entries: &BTreeMap<EntryKey, PolicyValue>,
    identity: impl Fn(u32) -> Option<u32>,
) -> BTreeMap<u32, Option<BTreeSet<SetRow>>> {
    let mut out: BTreeMap<u32, BTreeSet<SetRow>> = BTreeMap::new();
    let mut broken = BTreeSet::new();
    for (k, v) in entries {
        let d = &k.data;
        match identity(d.identity) {
            Some(id) => {
                out.entry(d.policy_set).or_default().insert((
                    k.prefix_len,
                    id,
                    d.direction,
                    d.protocol,
                    d.port,
                    v.rule,
                    v.flags,
                ));
            }
            None => {
                broken.insert(d.policy_set);
            }
        }
    }
    let mut out: BTreeMap<u32, Option<BTreeSet<SetRow>>> = out
        .into_iter()
        .map(|(set, rows)| (set, Some(rows)))
        .collect();
    for set in broken {
        out.insert(set, None);
    }
    out
}

#[cfg(test)]
mod tests;
