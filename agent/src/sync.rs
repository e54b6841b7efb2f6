//! Writes the difference between desired and applied service state into the kernel maps.
//!
//! Order makes every change safe for a concurrent reader (see `weft_abi::svc`): a new backend
//! set is written under a fresh revision, with its new `MEMBERS`, before the `SERVICES` entry
//! switches to it in one update; removed members go after the switch; the old revision's slots
//! are freed after a grace period. A reader never sees a service with ready endpoints as empty
//! or half-written.
//!
//! Capacity is checked before writing. A change that does not fit is skipped and reported
//! (the service keeps what it had, or is not created), and every other change is applied.
pub mod kernel;
pub mod policy;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

use aya::maps::MapError;
use serde::Serialize;
use weft_abi::svc::{Endpoint, MemberKey, Outlier, ServiceKey, ServiceValue, SlotKey};

use crate::{
    compile::{Frontend, Services},
    datapath::Capacities,
};

/// Why a change (or part of one) was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {op} map {map}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is full: {need} entries needed, capacity {capacity}; raise {flag}")]
    Full {
        map: &'static str,
        /// The flag that raises the capacity.
        flag: String,
        /// Entries the map would hold with the change.
        need: u64,
        capacity: u32,
    },
}

/// What kind of failure: the `reason` label of `weft_sync_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A map has no room: its flag must be raised.
    MapFull,
    /// The kernel refused a write or delete.
    MapWrite,
}

impl Reason {
    pub const ALL: [Self; 2] = [Self::MapFull, Self::MapWrite];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MapFull => "map_full",
            Self::MapWrite => "map_write",
        }
    }
}

crate::metrics::label_value!(Reason);

/// A failure as status shows it: typed (reason, map) for metrics and tools, and the whole
/// story for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub reason: Reason,
    pub map: &'static str,
    /// The error, its causes, and what weft did about it.
    pub message: String,
}

impl Failure {
    /// `consequence`: what stays in force, e.g. "the service keeps its previous state".
    pub fn new(error: &Error, consequence: &str) -> Self {
        Self {
            reason: error.reason(),
            map: error.map(),
            message: format!("{}. {consequence}", crate::chain(error)),
        }
    }
}

impl Error {
    /// `map` cannot hold `need` entries.
    pub fn full(map: &'static str, need: u64, capacity: u32) -> Self {
        Self::Full {
            map,
            flag: crate::datapath::map_flag(map).unwrap_or_default(),
            need,
            capacity,
        }
    }

    /// Whether `used + more` entries do not fit in `capacity`.
    pub fn check(map: &'static str, used: u64, more: u64, capacity: u32) -> Result<(), Self> {
        let need = used + more;
        if need > u64::from(capacity) {
            return Err(Self::full(map, need, capacity));
        }
        Ok(())
    }

    pub const fn reason(&self) -> Reason {
        match self {
            Self::Map { .. } => Reason::MapWrite,
            Self::Full { .. } => Reason::MapFull,
        }
    }

    pub const fn map(&self) -> &'static str {
        match self {
            Self::Map { map, .. } | Self::Full { map, .. } => map,
        }
    }

    /// The key was not in the map (deleting it again is not a failure).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::Map {
                source: MapError::KeyNotFound,
                ..
            } => true,
            Self::Map {
                source: MapError::SyscallError(e),
                ..
            } => e.io_error.raw_os_error() == Some(libc::ENOENT),
            Self::Map { .. } | Self::Full { .. } => false,
        }
    }
}

/// The maps `sync` writes; the kernel implementation is [`kernel::KernelMaps`].
pub trait ServiceMaps {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error>;
    fn read_slots(&self) -> Result<Vec<(SlotKey, Endpoint)>, Error>;
    fn read_members(&self) -> Result<Vec<MemberKey>, Error>;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), Error>;
    fn put_slot(&mut self, key: &SlotKey, value: &Endpoint) -> Result<(), Error>;
    fn del_slot(&mut self, key: &SlotKey) -> Result<(), Error>;
    fn put_member(&mut self, key: &MemberKey) -> Result<(), Error>;
    fn del_member(&mut self, key: &MemberKey) -> Result<(), Error>;
    /// Health checking by service id; a value read torn comes back with `consecutive`
    /// `u32::MAX`, which no frontend asks for (rewritten by the first pass).
    fn read_outliers(&self) -> Result<Vec<(u32, Outlier)>, Error>;
    fn put_outlier(&mut self, id: u32, value: &Outlier) -> Result<(), Error>;
    fn del_outlier(&mut self, id: u32) -> Result<(), Error>;
}

/// Capacities of the service maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub slots: u32,
    pub members: u32,
}

impl From<&Capacities> for Capacity {
    fn from(c: &Capacities) -> Self {
        Self {
            services: c.max_services,
            slots: c.max_backends,
            members: c.max_backends,
        }
    }
}

/// What the kernel holds for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Applied {
    id: u32,
    revision: u32,
    backends: Vec<Endpoint>,
    /// Slots under `revision` in the kernel: `backends.len()`, or the count the kernel had
    /// when the agent started and found the set incomplete (all of them must be freed).
    slots: u32,
    affinity_timeout_s: u32,
    outlier: Outlier,
}

/// A service change that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncError {
    /// `namespace/name` of the Service.
    pub service: String,
    /// `ClusterIP:port/protocol`.
    pub frontend: String,
    #[serde(flatten)]
    pub failure: Failure,
}

/// What a service keeps when its change fails.
const SERVICE_KEEPS: &str = "The service keeps its previous state.";

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub errors: Vec<SyncError>,
}

/// Applies desired service state to the maps.
#[derive(Debug)]
pub struct Syncer<M> {
    maps: M,
    capacity: Capacity,
    applied: BTreeMap<ServiceKey, Applied>,
    next_id: u32,
    next_revision: u32,
    /// Old revisions whose slots are freed once their grace period is over.
    retired: VecDeque<(u32, u32, Instant)>,
    slots_used: u64,
    members_used: u64,
    /// Deletes that failed, retried by `collect_garbage`.
    failed_slots: Vec<SlotKey>,
    failed_members: Vec<MemberKey>,
    grace: Duration,
}

/// How long a replaced revision's slots stay readable. Programs hold a slot for
/// microseconds; this is generous on purpose.
pub const GRACE: Duration = Duration::from_secs(1);

/// `ip:port/protocol` of a frontend, for messages.
pub fn frontend_name(key: &ServiceKey) -> String {
    let ip = weft_abi::net::words_ip(key.family, key.addr);
    let proto = if key.protocol == weft_abi::IPPROTO_UDP {
        "UDP"
    } else {
        "TCP"
    };
    let port = u16::from_be(key.port);
    if key.family == 6 {
        format!("[{ip}]:{port}/{proto}")
    } else {
        format!("{ip}:{port}/{proto}")
    }
}

impl<M: ServiceMaps> Syncer<M> {
    /// Takes over what the maps already hold (from an earlier agent), so the first pass
    /// changes only what differs.
    pub fn new(maps: M, capacity: Capacity, now: Instant) -> Result<Self, Error> {
        let services = maps.read_services()?;
        let mut outliers: BTreeMap<u32, Outlier> = maps.read_outliers()?.into_iter().collect();
        let slots: BTreeMap<SlotKey, Endpoint> = maps.read_slots()?.into_iter().collect();
        let mut applied = BTreeMap::new();
        let mut live_revisions = BTreeSet::new();
        let (mut next_id, mut next_revision) = (1, 1);
        for (key, v) in services {
            let backends = (0..v.count)
                .filter_map(|index| {
                    slots
                        .get(&SlotKey {
                            revision: v.revision,
                            index,
                        })
                        .copied()
                })
                .collect::<Vec<_>>();
            next_id = next_id.max(v.service_id + 1);
            next_revision = next_revision.max(v.revision + 1);
            live_revisions.insert(v.revision);
            applied.insert(
                key,
                Applied {
                    id: v.service_id,
                    revision: v.revision,
                    // A set the kernel holds incompletely is rewritten by the first pass.
                    backends: if backends.len() == v.count as usize {
                        backends
                    } else {
                        Vec::new()
                    },
                    slots: v.count,
                    affinity_timeout_s: v.affinity_timeout_s,
                    outlier: outliers.remove(&v.service_id).unwrap_or_default(),
                },
            );
        }
        let mut syncer = Self {
            maps,
            capacity,
            applied,
            next_id,
            next_revision,
            retired: VecDeque::new(),
            slots_used: slots.len() as u64,
            members_used: 0,
            failed_slots: Vec::new(),
            failed_members: Vec::new(),
            grace: GRACE,
        };
        // Slots of no live revision are leftovers: free them after the usual grace.
        let mut orphans: BTreeMap<u32, u32> = BTreeMap::new();
        for k in slots
            .keys()
            .filter(|k| !live_revisions.contains(&k.revision))
        {
            syncer.next_revision = syncer.next_revision.max(k.revision + 1);
            let n = orphans.entry(k.revision).or_default();
            *n = (*n).max(k.index + 1);
        }
        syncer
            .retired
            .extend(orphans.into_iter().map(|(rev, count)| (rev, count, now)));
        // Members that match no applied backend are stale: remove them now (they only
        // validate remembered backends; removing one is always safe).
        let wanted: BTreeSet<MemberKey> = syncer.wanted_members().collect();
        for m in syncer.maps.read_members()? {
            if wanted.contains(&m) {
                syncer.members_used += 1;
            } else {
                syncer.maps.del_member(&m)?;
            }
        }
        // Health checking of no live frontend: its id may be given to a new one.
        for id in outliers.into_keys() {
            syncer.write_outlier(id, &Outlier::default())?;
        }
        Ok(syncer)
    }

    fn wanted_members(&self) -> impl Iterator<Item = MemberKey> + '_ {
        self.applied.values().flat_map(|a| {
            a.backends.iter().map(|b| MemberKey {
                service_id: a.id,
                backend: *b,
            })
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Entries in use per map: (services, slots, members).
    pub fn usage(&self) -> (u64, u64, u64) {
        (
            self.applied.len() as u64,
            self.slots_used,
            self.members_used,
        )
    }

    /// One pass: deletions first (they free capacity), then updates, then creations.
    pub fn apply(&mut self, desired: &Services, now: Instant) -> Report {
        let mut report = Report::default();
        self.collect_garbage(now);
        let gone: Vec<ServiceKey> = self
            .applied
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match self.delete(&key, now) {
                Ok(()) => report.deleted += 1,
                Err(e) => report.errors.push(sync_error("(deleted)", &key, &e)),
            }
        }
        for (key, want) in &desired.frontends {
            let Some(have) = self.applied.get(key).cloned() else {
                continue;
            };
            if have.backends == want.backends
                && have.affinity_timeout_s == want.affinity_timeout_s
                && have.outlier == want.outlier
            {
                continue;
            }
            match self.update(key, &have, want, now) {
                Ok(()) => report.updated += 1,
                Err(e) => report.errors.push(sync_error(&want.service, key, &e)),
            }
        }
        for (key, want) in &desired.frontends {
            if self.applied.contains_key(key) {
                continue;
            }
            match self.create(key, want) {
                Ok(()) => report.created += 1,
                Err(e) => report.errors.push(sync_error(&want.service, key, &e)),
            }
        }
        report
    }

    /// Frees slots of revisions whose grace period is over.
    pub fn collect_garbage(&mut self, now: Instant) {
        while let Some(&(revision, count, at)) = self.retired.front() {
            if now.duration_since(at) < self.grace {
                break;
            }
            self.retired.pop_front();
            for index in 0..count {
                self.del_slot(SlotKey { revision, index });
            }
        }
        for key in std::mem::take(&mut self.failed_slots) {
            self.del_slot(key);
        }
        for key in std::mem::take(&mut self.failed_members) {
            self.del_member(key);
        }
    }

    fn check_capacity(
        &self,
        new_frontend: bool,
        slots: usize,
        members: usize,
    ) -> Result<(), Error> {
        use weft_abi::maps::{BACKEND_SLOTS, MEMBERS, SERVICES};
        let c = &self.capacity;
        Error::check(
            SERVICES,
            self.applied.len() as u64,
            u64::from(new_frontend),
            c.services,
        )?;
        Error::check(BACKEND_SLOTS, self.slots_used, slots as u64, c.slots)?;
        Error::check(MEMBERS, self.members_used, members as u64, c.members)
    }

    /// Writes a revision's slots; on failure removes what it wrote.
    fn write_slots(&mut self, revision: u32, backends: &[Endpoint]) -> Result<(), Error> {
        for (index, b) in (0u32..).zip(backends) {
            if let Err(e) = self.maps.put_slot(&SlotKey { revision, index }, b) {
                for undo in 0..index {
                    let _ = self.maps.del_slot(&SlotKey {
                        revision,
                        index: undo,
                    });
                }
                return Err(e);
            }
        }
        self.slots_used += backends.len() as u64;
        Ok(())
    }

    fn put_members(&mut self, id: u32, backends: &[Endpoint]) -> Result<(), Error> {
        for b in backends {
            self.maps.put_member(&MemberKey {
                service_id: id,
                backend: *b,
            })?;
            self.members_used += 1;
        }
        Ok(())
    }

    fn del_members(&mut self, id: u32, backends: &[Endpoint]) {
        for b in backends {
            self.del_member(MemberKey {
                service_id: id,
                backend: *b,
            });
        }
    }

    /// A member that stays would keep affinity and UDP flows on a removed backend: a failed
    /// delete is logged and retried until it succeeds.
    fn del_member(&mut self, key: MemberKey) {
        match self.maps.del_member(&key) {
            Ok(()) => self.members_used = self.members_used.saturating_sub(1),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(target: "weft::sync", error = %crate::chain(&e), "cannot remove a backend's membership; retrying");
                self.failed_members.push(key);
            }
        }
    }

    /// The next revision no live frontend and no retired set in its grace period holds: the
    /// counter wraps after 2^32 changes (weeks of a churning cluster), and a reused number
    /// would overwrite slots a connect may be reading. Never 0.
    fn fresh_revision(&mut self) -> u32 {
        loop {
            let r = self.next_revision;
            self.next_revision = self.next_revision.wrapping_add(1).max(1);
            let live = self.applied.values().any(|a| a.revision == r)
                || self.retired.iter().any(|(rev, _, _)| *rev == r);
            if r != 0 && !live {
                return r;
            }
        }
    }

    /// The next service id no live frontend holds (ids key `MEMBERS`). Never 0.
    fn fresh_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if id != 0 && !self.applied.values().any(|a| a.id == id) {
                return id;
            }
        }
    }

    /// Frees one slot; a failed delete is logged and retried.
    fn del_slot(&mut self, key: SlotKey) {
        match self.maps.del_slot(&key) {
            Ok(()) => self.slots_used = self.slots_used.saturating_sub(1),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::warn!(target: "weft::sync", error = %crate::chain(&e), "cannot free a backend slot; retrying");
                self.failed_slots.push(key);
            }
        }
    }

    fn create(&mut self, key: &ServiceKey, want: &Frontend) -> Result<(), Error> {
        let n = want.backends.len();
        self.check_capacity(true, n, n)?;
        let (id, revision) = (self.fresh_id(), self.fresh_revision());
        let written = self
            .put_members(id, &want.backends)
            .and_then(|()| self.write_slots(revision, &want.backends));
        let value = ServiceValue {
            service_id: id,
            revision,
            count: n as u32,
            affinity_timeout_s: want.affinity_timeout_s,
            seal: 0,
        };
        if let Err(e) = written.and_then(|()| self.maps.put_service(key, &value)) {
            self.del_members(id, &want.backends);
            self.retired.push_back((revision, n as u32, Instant::now()));
            return Err(e);
        }
        // Health checking follows: until then the frontend is served without it.
        let checked = self.write_outlier(id, &want.outlier);
        self.applied.insert(
            *key,
            Applied {
                id,
                revision,
                backends: want.backends.clone(),
                slots: n as u32,
                affinity_timeout_s: want.affinity_timeout_s,
                outlier: if checked.is_ok() {
                    want.outlier
                } else {
                    Outlier::default()
                },
            },
        );
        checked
    }

    /// Writes frontend `id`'s health checking (none: deletes it).
    fn write_outlier(&mut self, id: u32, want: &Outlier) -> Result<(), Error> {
        if !want.is_off() {
            return self.maps.put_outlier(id, want);
        }
        match self.maps.del_outlier(id) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    fn update(
        &mut self,
        key: &ServiceKey,
        have: &Applied,
        want: &Frontend,
        now: Instant,
    ) -> Result<(), Error> {
        if have.outlier != want.outlier {
            self.write_outlier(have.id, &want.outlier)?;
            if let Some(a) = self.applied.get_mut(key) {
                a.outlier = want.outlier;
            }
        }
        if have.backends == want.backends {
            if have.affinity_timeout_s == want.affinity_timeout_s {
                return Ok(());
            }
            // Only the affinity timeout changed: same revision, one update.
            let value = ServiceValue {
                service_id: have.id,
                revision: have.revision,
                count: have.backends.len() as u32,
                affinity_timeout_s: want.affinity_timeout_s,
                seal: 0,
            };
            self.maps.put_service(key, &value)?;
            if let Some(a) = self.applied.get_mut(key) {
                a.affinity_timeout_s = want.affinity_timeout_s;
            }
            return Ok(());
        }
        let old: BTreeSet<Endpoint> = have.backends.iter().copied().collect();
        let new: BTreeSet<Endpoint> = want.backends.iter().copied().collect();
        let added: Vec<Endpoint> = new.difference(&old).copied().collect();
        let removed: Vec<Endpoint> = old.difference(&new).copied().collect();
        self.check_capacity(false, want.backends.len(), added.len())?;
        let revision = self.fresh_revision();
        // New members and slots first; the switch; then what the old set no longer needs.
        let written = self
            .put_members(have.id, &added)
            .and_then(|()| self.write_slots(revision, &want.backends));
        let value = ServiceValue {
            service_id: have.id,
            revision,
            count: want.backends.len() as u32,
            affinity_timeout_s: want.affinity_timeout_s,
            seal: 0,
        };
        if let Err(e) = written.and_then(|()| self.maps.put_service(key, &value)) {
            self.del_members(have.id, &added);
            self.retired
                .push_back((revision, want.backends.len() as u32, now));
            return Err(e);
        }
        self.del_members(have.id, &removed);
        self.retired.push_back((have.revision, have.slots, now));
        self.applied.insert(
            *key,
            Applied {
                id: have.id,
                revision,
                backends: want.backends.clone(),
                slots: want.backends.len() as u32,
                affinity_timeout_s: want.affinity_timeout_s,
                outlier: want.outlier,
            },
        );
        Ok(())
    }

    fn delete(&mut self, key: &ServiceKey, now: Instant) -> Result<(), Error> {
        let Some(have) = self.applied.get(key).cloned() else {
            return Ok(());
        };
        self.maps.del_service(key)?;
        self.applied.remove(key);
        if !have.outlier.is_off()
            && let Err(e) = self.write_outlier(have.id, &Outlier::default())
        {
            // A later frontend could get this id only from another agent's start, which
            // deletes what no live frontend holds.
            tracing::warn!(target: "weft::sync", error = %crate::chain(&e), "cannot delete a frontend's health checking");
        }
        self.del_members(have.id, &have.backends);
        self.retired.push_back((have.revision, have.slots, now));
        Ok(())
    }
}

fn sync_error(service: &str, key: &ServiceKey, e: &Error) -> SyncError {
    SyncError {
        service: service.to_owned(),
        frontend: frontend_name(key),
        failure: Failure::new(e, SERVICE_KEEPS),
    }
}

#[cfg(test)]
mod tests;
