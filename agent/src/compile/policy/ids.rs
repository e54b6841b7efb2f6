//! Stable numbers for identities, local endpoints and policy sets.
//!
//! Kernel keys hold these numbers, so a number must keep its meaning while any map refers to
//! it: a number is never reused by the same agent, and one that is still wanted keeps its
//! value from compile to compile (an unrelated change rewrites nothing). A restarted agent
//! first learns the numbers the kernel maps hold ([`Ids::hint_identity`] and friends).
use std::collections::{BTreeMap, BTreeSet};

use weft_abi::policy::IDENTITY_FIRST;

use super::selector::Labels;

/// What an identity stands for. Two addresses share an identity when policy cannot tell
/// them apart: same pod labels and namespace (and its labels), same ipBlocks around them, and
/// same named ports (an egress rule's named port resolves per destination pod).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdentityKey {
    Pod {
        namespace: String,
        labels: Labels,
        namespace_labels: Labels,
        /// The ipBlocks (cidr and excepts, as text) that contain the address.
        blocks: BTreeSet<String>,
        /// The pod's named container ports: (name, protocol) → port.
        named_ports: BTreeMap<(String, u8), u16>,
    },
    /// Addresses outside pods: the ipBlocks that contain them (never empty: an address in
    /// no block is `IDENTITY_WORLD`).
    External { blocks: BTreeSet<String> },
    /// Addresses of pods weft could not read (`store::stand_in`): no selector and no
    /// ipBlock matches them, only rules that allow every peer.
    RejectedPod,
    /// Addresses several pods claim at once (`compile::addresses`): like `RejectedPod`, no
    /// selector and no ipBlock matches them.
    ContestedAddress,
}

/// One kind of number: stable while wanted, never reused.
#[derive(Debug, Clone)]
struct Numbers<K: Ord> {
    assigned: BTreeMap<K, u32>,
    /// Numbers a restarted agent found in the kernel, by what they were for.
    hints: BTreeMap<K, u32>,
    next: u32,
    used_this_pass: BTreeSet<K>,
}

impl<K: Ord + Clone> Numbers<K> {
    fn new(first: u32) -> Self {
        Self {
            assigned: BTreeMap::new(),
            hints: BTreeMap::new(),
            next: first,
            used_this_pass: BTreeSet::new(),
        }
    }

    fn get(&mut self, key: &K) -> u32 {
        self.used_this_pass.insert(key.clone());
        if let Some(&n) = self.assigned.get(key) {
            return n;
        }
        let taken = |n: u32, assigned: &BTreeMap<K, u32>| assigned.values().any(|&v| v == n);
        let n = match self.hints.remove(key) {
            Some(h) if !taken(h, &self.assigned) => h,
            _ => {
                let n = self.next;
                self.next += 1;
                n
            }
        };
        self.assigned.insert(key.clone(), n);
        n
    }

    fn hint(&mut self, key: K, n: u32) {
        self.next = self.next.max(n.saturating_add(1));
        self.hints.insert(key, n);
    }

    /// Forgets what the last pass did not use (its numbers are not given out again).
    fn finish_pass(&mut self) {
        let used = std::mem::take(&mut self.used_this_pass);
        self.assigned.retain(|k, _| used.contains(k));
        self.hints.clear();
    }
}

/// The agent's numbering, carried from one compile to the next.
#[derive(Debug, Clone)]
pub struct Ids {
    identities: Numbers<IdentityKey>,
    /// Local endpoints by cgroup.
    endpoints: Numbers<String>,
    /// Policy sets by their content key.
    sets: Numbers<String>,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            identities: Numbers::new(IDENTITY_FIRST),
            endpoints: Numbers::new(1),
            // Set 0 holds no entry: what a pod whose policies could not be written gets.
            sets: Numbers::new(1),
        }
    }
}

impl Ids {
    pub fn identity(&mut self, key: &IdentityKey) -> u32 {
        self.identities.get(key)
    }

    pub fn endpoint(&mut self, cgroup: &str) -> u32 {
        self.endpoints.get(&cgroup.to_owned())
    }

    pub fn set(&mut self, key: &str) -> u32 {
        self.sets.get(&key.to_owned())
    }

    pub fn hint_identity(&mut self, key: IdentityKey, n: u32) {
        self.identities.hint(key, n);
    }

    pub fn hint_endpoint(&mut self, cgroup: String, n: u32) {
        self.endpoints.hint(cgroup, n);
    }

    pub fn hint_set(&mut self, key: String, n: u32) {
        self.sets.hint(key, n);
    }

    /// Raises the next numbers above those a restarted agent found in the kernel, whatever
    /// they were for.
    pub fn reserve(&mut self, identity: u32, endpoint: u32, set: u32) {
        self.identities.next = self.identities.next.max(identity.saturating_add(1));
        self.endpoints.next = self.endpoints.next.max(endpoint.saturating_add(1));
        self.sets.next = self.sets.next.max(set.saturating_add(1));
    }

    pub(super) fn finish_pass(&mut self) {
        self.identities.finish_pass();
        self.endpoints.finish_pass();
        self.sets.finish_pass();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(b: &str) -> IdentityKey {
        IdentityKey::External {
            blocks: BTreeSet::from([b.to_owned()]),
        }
    }

    #[test]
    fn numbers_are_stable_and_never_reused() {
        let mut ids = Ids::default();
        let a = ids.identity(&ext("a"));
        let b = ids.identity(&ext("b"));
        ids.finish_pass();
        assert_eq!(ids.identity(&ext("b")), b, "kept while wanted");
        ids.finish_pass();
        // "a" was not wanted in the last pass: it gets a new number, and "a"'s old one is not
        // given to anything else.
        let a2 = ids.identity(&ext("a"));
        assert_ne!(a2, a);
        assert_ne!(a2, b);
    }

    #[test]
    fn hints_restore_kernel_numbers() {
        let mut ids = Ids::default();
        ids.hint_identity(ext("a"), 900);
        assert_eq!(ids.identity(&ext("a")), 900);
        assert_eq!(
            ids.identity(&ext("b")),
            901,
            "allocation continues above hints"
        );
    }
}
