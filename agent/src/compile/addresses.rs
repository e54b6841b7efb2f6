//! Which pod an address belongs to.
//!
//! Two pods can claim one address in the store. The network plugin hands a pod's address to a
//! new pod once the old pod's sandbox is gone, possibly on another node, and the old pod's
//! object lingers while it terminates; a watch may also deliver the new pod before the old
//! one's deletion. Policy and telemetry must never give the new pod the old one's identity,
//! so an address belongs to one pod only when the store says so unambiguously.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::core::v1::Pod;

use crate::store::{Key, Store, object::is_finished};

/// The owner of each pod address in the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owners {
    owners: BTreeMap<IpAddr, Key>,
    /// Addresses several pods claim and none can be told apart as the holder: the pods
    /// claiming each (`namespace/name`, sorted).
    pub contested: BTreeMap<IpAddr, Vec<String>>,
}

impl Owners {
    /// Resolves every claim. A pod that is not being deleted wins over pods that are (the
    /// address can only have been handed on once their sandbox was gone). When that leaves
    /// more than one claimant, nobody owns the address.
    pub fn of(store: &Store) -> Self {
        let mut claims: BTreeMap<IpAddr, Vec<(&Key, &Pod)>> = BTreeMap::new();
        for (key, pod) in &store.pods {
            for ip in own_addresses(pod) {
                claims.entry(ip).or_default().push((key, pod));
            }
        }
        let mut out = Self::default();
        for (ip, claimants) in claims {
            let live: Vec<&(&Key, &Pod)> =
                claimants.iter().filter(|(_, p)| !terminating(p)).collect();
            let winners: Vec<&Key> = if live.is_empty() {
                claimants.iter().map(|(k, _)| *k).collect()
            } else {
                live.iter().map(|(k, _)| *k).collect()
            };
            match winners.as_slice() {
                [one] => {
                    out.owners.insert(ip, (*one).clone());
                }
                _ => {
                    let names: BTreeSet<String> = claimants
                        .iter()
                        .map(|((ns, name), _)| format!("{ns}/{name}"))
                        .collect();
                    out.contested.insert(ip, names.into_iter().collect());
                }
            }
        }
        out
    }

    /// The pod holding `ip`, if exactly one does.
    pub fn owner(&self, ip: IpAddr) -> Option<&Key> {
        self.owners.get(&ip)
    }

    /// The addresses of `pod` (by key) that are its own: claimed and not contested or won by
    /// another pod.
    pub fn owned_by<'a>(&'a self, key: &'a Key, pod: &Pod) -> impl Iterator<Item = IpAddr> + 'a {
        own_addresses(pod)
            .into_iter()
            .filter(move |ip| self.owners.get(ip) == Some(key))
    }
}

/// The addresses a pod claims as its own: none for host-network pods (the node's) and for
/// finished pods (their sandbox is gone and the address may already be another pod's).
pub fn own_addresses(pod: &Pod) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) || is_finished(pod) {
        return Vec::new();
    }
    super::pod_ips(pod)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::policy::tests::model::store_of;

    fn pod(ns: &str, name: &str, ip: &str, extra_meta: &str, phase: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{extra_meta}}}\nstatus: {{phase: {phase}, podIP: {ip}}}\n"
        )
    }

    const GONE: &str = ", deletionTimestamp: '2026-12-03T10:00:00Z'";

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn a_pod_that_is_not_being_deleted_wins_over_one_that_is() {
        let s = store_of(&[
            &pod("shop", "db", "10.0.2.10", GONE, "Running"),
            &pod("z", "web", "10.0.2.10", "", "Running"),
        ]);
        let o = Owners::of(&s);
        let ip: IpAddr = "10.0.2.10".parse().expect("ip");
        assert_eq!(o.owner(ip), Some(&key("z", "web")));
        assert!(o.contested.is_empty());
    }

    #[test]
    fn a_terminating_pod_alone_keeps_its_address() {
        let s = store_of(&[&pod("shop", "db", "10.0.2.10", GONE, "Running")]);
        let o = Owners::of(&s);
        assert_eq!(
            o.owner("10.0.2.10".parse().expect("ip")),
            Some(&key("shop", "db"))
        );
    }

    #[test]
    fn two_live_claimants_leave_the_address_to_nobody() {
        let s = store_of(&[
            &pod("shop", "db", "10.0.2.10", "", "Running"),
            &pod("z", "web", "10.0.2.10", "", "Running"),
        ]);
        let o = Owners::of(&s);
        let ip: IpAddr = "10.0.2.10".parse().expect("ip");
        assert_eq!(o.owner(ip), None);
        assert_eq!(
            o.contested[&ip],
            vec!["shop/db".to_owned(), "z/web".to_owned()]
        );
        let (k, p) = s.pods.iter().next().expect("a pod");
        assert_eq!(o.owned_by(k, p).count(), 0);
    }

    #[test]
    fn a_finished_pod_claims_nothing() {
        let s = store_of(&[
            &pod("shop", "job", "10.0.2.10", "", "Succeeded"),
            &pod("z", "web", "10.0.2.10", "", "Running"),
        ]);
        let o = Owners::of(&s);
        assert_eq!(
            o.owner("10.0.2.10".parse().expect("ip")),
            Some(&key("z", "web"))
        );
        assert!(o.contested.is_empty());
    }
}
