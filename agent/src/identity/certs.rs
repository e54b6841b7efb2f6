//! The leaf certificates a node holds: one per identity with a pod on the node, and only
//! those, renewed at half their lifetime (as ztunnel does) and whenever the CA's signing
//! certificate changes. The clock is a parameter, so that rotation is tested without waiting.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use super::{
    Error, SpiffeId,
    ca::{Ca, Leaf},
};

/// What one [`Certs::refresh`] did.
#[derive(Debug, Default)]
pub struct Changes {
    pub issued: Vec<SpiffeId>,
    pub renewed: Vec<SpiffeId>,
    /// No pod of the node has the identity any more.
    pub dropped: Vec<SpiffeId>,
    /// Identities whose certificate could not be issued or renewed: a held one stays in use
    /// until it expires.
    pub failed: Vec<(SpiffeId, Error)>,
}

/// The held certificates.
#[derive(Debug)]
pub struct Certs {
    ttl: Duration,
    leaves: BTreeMap<SpiffeId, Leaf>,
}

impl Certs {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            leaves: BTreeMap::new(),
        }
    }

    /// Holds a certificate for exactly the identities in `wanted` at `now`: issues the
    /// missing ones, renews those past half their lifetime or signed by another CA, and drops
    /// the rest.
    pub fn refresh(&mut self, ca: &Ca, wanted: &BTreeSet<SpiffeId>, now: SystemTime) -> Changes {
        let mut changes = Changes::default();
        let unwanted: Vec<SpiffeId> = self
            .leaves
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in unwanted {
            self.leaves.remove(&id);
            changes.dropped.push(id);
        }
        for id in wanted {
            let held = self.leaves.get(id);
            let due = held.is_none_or(|l| l.signer != ca.fingerprint() || now >= Self::renew_at(l));
            if !due {
                continue;
            }
            match ca.issue(id, self.ttl, now) {
                Ok(leaf) => {
                    if held.is_some() {
                        changes.renewed.push(id.clone());
                    } else {
                        changes.issued.push(id.clone());
                    }
                    self.leaves.insert(id.clone(), leaf);
                }
                Err(e) => changes.failed.push((id.clone(), e)),
            }
        }
        changes
    }

    /// When the next certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.leaves.values().map(Self::renew_at).min()
    }

    /// The certificate of an identity, if held and not expired at `now`.
    pub fn get(&self, id: &SpiffeId, now: SystemTime) -> Option<&Leaf> {
        self.leaves.get(id).filter(|l| now < l.not_after)
    }

    /// When a certificate is renewed: half-way from its issue to its expiry (the backdating
    /// for clock skew aside).
    pub fn renew_at(leaf: &Leaf) -> SystemTime {
        let life = leaf
            .not_after
            .duration_since(leaf.issued)
            .unwrap_or_default();
        leaf.issued + life / 2
    }

    /// Every held certificate, by identity.
    pub fn held(&self) -> impl Iterator<Item = &Leaf> {
        self.leaves.values()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn with_ca(name: &str, now: SystemTime) -> Self {
            let d = std::env::temp_dir().join(format!("weft-certs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("create");
            Ca::init(&d, now).expect("init");
            Self(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000)
    }

    fn ids(names: &[&str]) -> BTreeSet<SpiffeId> {
        names
            .iter()
            .map(|n| SpiffeId::new("cluster.local", "shop", Some(n)))
            .collect()
    }

    fn names(list: &[SpiffeId]) -> Vec<&str> {
        list.iter().map(|id| id.service_account.as_str()).collect()
    }

    /// With a 20 s lifetime, a certificate is renewed from 10 s after its issue on, not
    /// before; unwanted ones go.
    #[test]
    fn certificates_follow_the_wanted_identities_and_renew_at_half_life() {
        let d = Dir::with_ca("rotate", t0());
        let ca = Ca::load(&d.0).expect("load");
        let mut certs = Certs::new(Duration::from_secs(20));
        let c = certs.refresh(&ca, &ids(&["web", "db"]), t0());
        assert_eq!(names(&c.issued), ["db", "web"]);
        assert!(c.renewed.is_empty() && c.dropped.is_empty() && c.failed.is_empty());
        let first = certs
            .get(&ids(&["web"]).into_iter().next().expect("id"), t0())
            .expect("held")
            .serial
            .clone();
        assert_eq!(certs.next_renewal(), Some(t0() + Duration::from_secs(10)));
        let c = certs.refresh(&ca, &ids(&["web"]), t0() + Duration::from_secs(9));
        assert_eq!(names(&c.dropped), ["db"]);
        assert!(c.renewed.is_empty(), "not yet: {c:?}");
        let c = certs.refresh(&ca, &ids(&["web"]), t0() + Duration::from_secs(10));
        assert_eq!(names(&c.renewed), ["web"]);
        let web = &ids(&["web"]).into_iter().next().expect("id");
        let second = certs
            .get(web, t0() + Duration::from_secs(10))
            .expect("held");
        assert_ne!(second.serial, first);
        assert_eq!(certs.next_renewal(), Some(t0() + Duration::from_secs(20)));
        assert!(
            certs.get(web, t0() + Duration::from_secs(30)).is_none(),
            "expired"
        );
    }

    /// A long lifetime is not renewed early; a new signing CA renews everything at once.
    #[test]
    fn nothing_is_reissued_before_half_life_and_a_new_ca_renews_all() {
        let d = Dir::with_ca("stable", t0());
        let ca = Ca::load(&d.0).expect("load");
        let mut certs = Certs::new(Duration::from_secs(24 * 3600));
        certs.refresh(&ca, &ids(&["web"]), t0());
        let c = certs.refresh(&ca, &ids(&["web"]), t0() + Duration::from_secs(3600));
        assert!(c.issued.is_empty() && c.renewed.is_empty(), "{c:?}");
        let other = Dir::with_ca("stable-2", t0());
        let ca2 = Ca::load(&other.0).expect("load");
        let c = certs.refresh(&ca2, &ids(&["web"]), t0() + Duration::from_secs(3600));
        assert_eq!(names(&c.renewed), ["web"]);
        let leaf = certs.held().next().expect("held");
        assert_eq!(leaf.signer, ca2.fingerprint());
    }
}
