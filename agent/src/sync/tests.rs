//! `Syncer` against in-memory maps that check, after every single write, what a concurrent
//! kernel reader could observe.
use std::time::{Duration, Instant};

use weft_abi::{
    IPPROTO_TCP,
    svc::{Outlier, ServiceKey},
};

use super::*;
use weft_abi::net::ip_words;

use crate::{
    compile::{Frontend, Services},
    tests::MemoryServiceMaps,
};

#[derive(Debug, Default)]
struct FakeMaps {
    maps: MemoryServiceMaps,
    writes: usize,
    /// Fail the write with this number (1-based), to test rollback.
    fail_at: Option<usize>,
    /// A revision a test left broken on purpose (not checked until sync replaces it).
    broken_revision: Option<u32>,
}

impl FakeMaps {
    /// What a reader may rely on: every service's current revision is complete, and every
    /// backend in it is a member.
    fn check(&self) {
        for (k, v) in &self.services {
            if Some(v.revision) == self.broken_revision {
                continue;
            }
            for index in 0..v.count {
                let slot = SlotKey {
                    revision: v.revision,
                    index,
                };
                let b = self.slots.get(&slot).unwrap_or_else(|| {
                    panic!("{} points at missing slot {slot:?}", frontend_name(k))
                });
                let m = MemberKey {
                    service_id: v.service_id,
                    backend: *b,
                };
                assert!(
                    self.members.contains(&m),
                    "{} slot {index} is not a member",
                    frontend_name(k)
                );
            }
        }
    }

    fn write(&mut self) -> Result<(), Error> {
        self.writes += 1;
        if self.fail_at == Some(self.writes) {
            return Err(Error::Map {
                map: "fake",
                op: "write",
                source: MapError::KeyNotFound,
            });
        }
        Ok(())
    }
}

impl std::ops::Deref for FakeMaps {
    type Target = MemoryServiceMaps;

    fn deref(&self) -> &MemoryServiceMaps {
        &self.maps
    }
}

impl std::ops::DerefMut for FakeMaps {
    fn deref_mut(&mut self) -> &mut MemoryServiceMaps {
        &mut self.maps
    }
}

/// The memory maps, with a consistency check after every write and deletes of absent keys
/// failing as in the kernel.
impl ServiceMaps for FakeMaps {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        self.maps.read_services()
    }
    fn read_slots(&self) -> Result<Vec<(SlotKey, Endpoint)>, Error> {
        self.maps.read_slots()
    }
    fn read_members(&self) -> Result<Vec<MemberKey>, Error> {
        self.maps.read_members()
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        self.write()?;
        self.services.insert(*key, *value);
        self.check();
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.write()?;
        self.services.remove(key);
        self.check();
        Ok(())
    }
    fn put_slot(&mut self, key: &SlotKey, value: &Endpoint) -> Result<(), Error> {
        self.write()?;
        self.slots.insert(*key, *value);
        self.check();
        Ok(())
    }
    fn del_slot(&mut self, key: &SlotKey) -> Result<(), Error> {
        self.write()?;
        self.slots.remove(key).map(drop).ok_or(Error::Map {
            map: "fake",
            op: "delete",
            source: MapError::KeyNotFound,
        })?;
        self.check();
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.write()?;
        self.members.insert(*key);
        self.check();
        Ok(())
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.write()?;
        // Like the kernel: deleting an absent key fails with "not found".
        if !self.members.remove(key) {
            return Err(Error::Map {
                map: "fake",
                op: "delete",
                source: MapError::KeyNotFound,
            });
        }
        self.check();
        Ok(())
    }
    fn read_outliers(&self) -> Result<Vec<(u32, Outlier)>, Error> {
        self.maps.read_outliers()
    }
    fn put_outlier(&mut self, id: u32, value: &Outlier) -> Result<(), Error> {
        self.write()?;
        self.maps.put_outlier(id, value)
    }
    fn del_outlier(&mut self, id: u32) -> Result<(), Error> {
        self.write()?;
        self.maps.del_outlier(id)
    }
}

const ROOMY: Capacity = Capacity {
    services: 100,
    slots: 1000,
    members: 1000,
};

fn key(last: u8) -> ServiceKey {
    let (family, addr) = ip_words(format!("10.96.0.{last}").parse().expect("ip"));
    ServiceKey {
        addr,
        port: 80u16.to_be(),
        protocol: IPPROTO_TCP,
        family: family as u8,
    }
}

fn backend(last: u8) -> Endpoint {
    let (family, addr) = ip_words(format!("10.0.0.{last}").parse().expect("ip"));
    Endpoint {
        addr,
        port: 8080u16.to_be(),
        family: family as u8,
        _pad: 0,
    }
}

fn desired(services: &[(u8, &[u8])]) -> Services {
    let mut s = Services::default();
    for (k, backends) in services {
        s.frontends.insert(
            key(*k),
            Frontend {
                service: format!("default/svc{k}"),
                port_name: String::new(),
                backends: backends.iter().map(|b| backend(*b)).collect(),
                affinity_timeout_s: 0,
                outlier: Default::default(),
            },
        );
    }
    s
}

fn kernel_backends(maps: &FakeMaps, k: u8) -> Vec<Endpoint> {
    let v = maps.services[&key(k)];
    (0..v.count)
        .map(|index| {
            maps.slots[&SlotKey {
                revision: v.revision,
                index,
            }]
        })
        .collect()
}

#[test]
fn creates_updates_and_deletes_without_a_window_for_readers() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    let r = s.apply(&desired(&[(1, &[11, 12, 13]), (2, &[21])]), t0);
    assert_eq!(
        (r.created, r.updated, r.deleted, r.errors.len()),
        (2, 0, 0, 0)
    );
    let rev1 = s.maps().services[&key(1)].revision;

    let r = s.apply(&desired(&[(1, &[12, 13, 14]), (2, &[21])]), t0);
    assert_eq!((r.created, r.updated, r.deleted), (0, 1, 0));
    assert_eq!(
        kernel_backends(s.maps(), 1),
        [backend(12), backend(13), backend(14)]
    );
    assert_ne!(s.maps().services[&key(1)].revision, rev1);
    // The old revision stays readable until its grace period is over.
    assert!(s.maps().slots.keys().any(|k| k.revision == rev1));
    s.collect_garbage(t0 + GRACE + Duration::from_millis(1));
    assert!(!s.maps().slots.keys().any(|k| k.revision == rev1));
    assert!(
        !s.maps().members.iter().any(|m| m.backend == backend(11)),
        "removed backend is no member"
    );

    let r = s.apply(&desired(&[(2, &[21])]), t0);
    assert_eq!(r.deleted, 1);
    s.collect_garbage(t0 + 2 * GRACE);
    assert_eq!(s.maps().slots.len(), 1);
    assert_eq!(s.maps().members.len(), 1);
    assert_eq!(s.usage(), (1, 1, 1));
}

#[test]
fn an_unchanged_state_writes_nothing_also_after_a_restart() {
    let t0 = Instant::now();
    let want = desired(&[(1, &[11, 12]), (2, &[]), (3, &[31])]);
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    s.apply(&want, t0);
    let maps = std::mem::take(&mut s.maps);
    let writes = maps.writes;
    // A new agent takes over the same maps.
    let mut s = Syncer::new(maps, ROOMY, t0).expect("new");
    let r = s.apply(&want, t0);
    assert_eq!(r, Report::default());
    assert_eq!(s.maps().writes, writes, "no write at all");
    assert_eq!(s.usage(), (3, 3, 3));
}

#[test]
fn a_service_with_no_ready_backend_is_present_with_count_zero() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    s.apply(&desired(&[(1, &[])]), t0);
    assert_eq!(s.maps().services[&key(1)].count, 0);
}

#[test]
fn what_does_not_fit_is_reported_and_the_rest_applied() {
    let t0 = Instant::now();
    let small = Capacity {
        services: 2,
        slots: 4,
        members: 4,
    };
    let mut s = Syncer::new(FakeMaps::default(), small, t0).expect("new");
    let r = s.apply(&desired(&[(1, &[11]), (2, &[21]), (3, &[31])]), t0);
    assert_eq!(r.created, 2);
    assert_eq!(r.errors.len(), 1);
    let failure = &r.errors[0].failure;
    assert_eq!((failure.reason, failure.map), (Reason::MapFull, "SERVICES"));
    assert!(
        failure.message.contains("SERVICES is full") && failure.message.contains("--max-services"),
        "{:?}",
        r.errors
    );
    assert_eq!(r.errors[0].service, "default/svc3");

    // Growing service 1 to 4 backends needs 4 new slots while the old one is still held.
    let r = s.apply(&desired(&[(1, &[11, 12, 13, 14]), (2, &[21])]), t0);
    assert_eq!(r.updated, 0);
    assert!(
        r.errors.iter().any(|e| e.failure.reason == Reason::MapFull
            && e.failure.message.contains("BACKEND_SLOTS is full")),
        "{:?}",
        r.errors
    );
    assert_eq!(
        kernel_backends(s.maps(), 1),
        [backend(11)],
        "the previous state keeps serving"
    );
}

#[test]
fn a_failed_write_leaves_the_previous_state() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    s.apply(&desired(&[(1, &[11, 12])]), t0);
    // Fail the third slot write (after 2 new members and 2 slots); it must be rolled back.
    let w = s.maps().writes;
    s.maps.fail_at = Some(w + 5);
    let r = s.apply(&desired(&[(1, &[12, 13, 14])]), t0);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(kernel_backends(s.maps(), 1), [backend(11), backend(12)]);
    // The rollback left the accounting as the maps are.
    s.collect_garbage(t0 + 2 * GRACE);
    assert_eq!(s.usage(), (1, 2, 2));
    assert_eq!((s.maps().slots.len(), s.maps().members.len()), (2, 2));
    s.maps.fail_at = None;
    let r = s.apply(&desired(&[(1, &[12, 13, 14])]), t0);
    assert_eq!(r.updated, 1, "{r:?}");
    assert_eq!(
        kernel_backends(s.maps(), 1),
        [backend(12), backend(13), backend(14)]
    );
}

#[test]
fn an_incomplete_set_found_at_start_is_freed_completely() {
    let t0 = Instant::now();
    let mut maps = FakeMaps::default();
    // An earlier agent left service 1 at revision 7 with 3 slots, one of them missing.
    maps.slots.insert(
        SlotKey {
            revision: 7,
            index: 0,
        },
        backend(11),
    );
    maps.slots.insert(
        SlotKey {
            revision: 7,
            index: 2,
        },
        backend(13),
    );
    maps.services.insert(
        key(1),
        ServiceValue {
            service_id: 1,
            revision: 7,
            count: 3,
            affinity_timeout_s: 0,
            seal: 0,
        },
    );
    maps.broken_revision = Some(7);
    let mut s = Syncer::new(maps, ROOMY, t0).expect("new");
    let r = s.apply(&desired(&[(1, &[11, 12])]), t0);
    assert_eq!(r.updated, 1, "an incomplete set is rewritten: {r:?}");
    s.collect_garbage(t0 + 2 * GRACE);
    assert!(
        !s.maps().slots.keys().any(|k| k.revision == 7),
        "every old slot is freed: {:?}",
        s.maps().slots
    );
    assert_eq!(s.usage(), (1, 2, 2));
}

#[test]
fn an_affinity_change_keeps_the_revision() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    let mut want = desired(&[(1, &[11])]);
    s.apply(&want, t0);
    let rev = s.maps().services[&key(1)].revision;
    want.frontends
        .values_mut()
        .for_each(|f| f.affinity_timeout_s = 60);
    assert_eq!(s.apply(&want, t0).updated, 1);
    assert_eq!(s.maps().services[&key(1)].revision, rev);
    assert_eq!(s.maps().services[&key(1)].affinity_timeout_s, 60);
}

/// Health checking switched on is written beside the frontend, whose value and revision
/// stay; switched off, its entry goes.
#[test]
fn a_health_checking_change_keeps_the_revision() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    let mut want = desired(&[(1, &[11])]);
    s.apply(&want, t0);
    let before = s.maps().services[&key(1)];
    let id = before.service_id;
    let outlier = Outlier {
        consecutive: 3,
        ..Default::default()
    };
    want.frontends
        .values_mut()
        .for_each(|f| f.outlier = outlier);
    assert_eq!(s.apply(&want, t0).updated, 1);
    assert_eq!(s.maps().services[&key(1)], before);
    assert_eq!(s.maps().outliers.get(&id), Some(&outlier));
    assert_eq!(s.apply(&want, t0).updated, 0);
    want.frontends
        .values_mut()
        .for_each(|f| f.outlier = Outlier::default());
    assert_eq!(s.apply(&want, t0).updated, 1);
    assert_eq!(s.maps().outliers.get(&id), None);
}

/// A restarted agent takes over health checking it finds for a live frontend, and deletes
/// any other (its id may go to a new frontend).
#[test]
fn a_restart_keeps_live_health_checking_and_drops_the_rest() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    let mut want = desired(&[(1, &[11])]);
    let outlier = Outlier {
        consecutive: 3,
        ..Default::default()
    };
    want.frontends
        .values_mut()
        .for_each(|f| f.outlier = outlier);
    s.apply(&want, t0);
    let id = s.maps().services[&key(1)].service_id;
    let mut maps = std::mem::take(&mut s.maps);
    maps.outliers.insert(id + 40, outlier);
    let mut s = Syncer::new(maps, ROOMY, t0).expect("restart");
    assert_eq!(s.apply(&want, t0).updated, 0, "nothing to rewrite");
    assert_eq!(s.maps().outliers.keys().copied().collect::<Vec<_>>(), [id]);
}

/// Revisions wrap after 2^32 changes: a wrapped number skips 0 and every revision still in
/// use, so no live slot is overwritten.
#[test]
fn a_wrapping_revision_never_reuses_a_live_one() {
    let t0 = Instant::now();
    let mut s = Syncer::new(FakeMaps::default(), ROOMY, t0).expect("new");
    s.next_revision = 1;
    s.apply(&desired(&[(1, &[11]), (2, &[21])]), t0);
    let live: Vec<u32> = [1, 2]
        .iter()
        .map(|k| s.maps().services[&key(*k)].revision)
        .collect();
    assert_eq!(live, [1, 2]);
    s.next_revision = u32::MAX;
    s.apply(&desired(&[(1, &[11]), (2, &[22])]), t0);
    assert_eq!(s.maps().services[&key(2)].revision, u32::MAX);
    // Wraps past 0, 1 (service 1's live set) and 2 (service 2's first set, retired and
    // still in its grace period).
    s.apply(&desired(&[(1, &[11]), (2, &[23])]), t0);
    assert_eq!(s.maps().services[&key(2)].revision, 3);
    assert_eq!(kernel_backends(s.maps(), 1), [backend(11)]);
    assert_eq!(kernel_backends(s.maps(), 2), [backend(23)]);
}
