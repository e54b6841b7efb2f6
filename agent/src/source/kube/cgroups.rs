//! Where this node's pods run: their cgroup directories, found once and remembered by UID.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::cgroup::pods::{self, Driver, QosClass};

/// A pod still without a cgroup is looked for by the kubelet's rule on every garbage
/// collection tick, but by a scan of the tree at most this often.
const SCAN_EVERY: Duration = Duration::from_secs(10);

/// Local pods' cgroups, relative to the cgroup root.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    found: HashMap<String, PathBuf>,
    /// Pods whose cgroup does not exist yet, with their QoS class and where the store was
    /// told the kubelet will create it.
    pending: HashMap<String, (QosClass, PathBuf)>,
    last_scan: Option<Instant>,
}

impl Cgroups {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            found: HashMap::new(),
            pending: HashMap::new(),
            last_scan: None,
        }
    }

    /// The pod's cgroup; while it does not exist, where the kubelet will create it (the
    /// policy stage enforces it once it appears). A pod seen for the first time is looked
    /// for by rule and by scan; a pending one by rule only (scans are [`Cgroups::appeared`]'s,
    /// rate-limited).
    pub fn resolve(&mut self, uid: &str, qos: QosClass) -> PathBuf {
        if let Some(path) = self.found.get(uid) {
            return path.clone();
        }
        let first_sight = !self.pending.contains_key(uid);
        if let Some(path) = self.find(uid, qos, first_sight) {
            self.pending.remove(uid);
            self.found.insert(uid.to_owned(), path.clone());
            return path;
        }
        let expected = pods::pod_cgroup(self.driver(), uid, qos);
        self.pending.insert(uid.to_owned(), (qos, expected.clone()));
        expected
    }

    /// Whether a pending pod's cgroup exists now somewhere else than where [`Cgroups::resolve`]
    /// said the kubelet would put it (the store must then change). One that appeared where
    /// expected changes nothing here: the policy stage binds it by its path.
    pub fn appeared(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let scan = self.last_scan.is_none_or(|t| t.elapsed() >= SCAN_EVERY);
        if scan {
            self.last_scan = Some(Instant::now());
        }
        let pending: Vec<(String, QosClass, PathBuf)> = self
            .pending
            .iter()
            .map(|(u, (q, p))| (u.clone(), *q, p.clone()))
            .collect();
        let mut moved = false;
        for (uid, qos, expected) in pending {
            if let Some(path) = self.find(&uid, qos, scan) {
                moved |= path != expected;
                self.pending.remove(&uid);
                self.found.insert(uid, path);
            }
        }
        moved
    }

    /// Forgets pods that are gone.
    pub fn retain<'a>(&mut self, uids: impl Iterator<Item = &'a str>) {
        let live: std::collections::HashSet<&str> = uids.collect();
        self.found.retain(|u, _| live.contains(u.as_str()));
        self.pending.retain(|u, _| live.contains(u.as_str()));
    }

    fn find(&self, uid: &str, qos: QosClass, scan: bool) -> Option<PathBuf> {
        let abs = if scan {
            pods::find_pod_cgroup(&self.root, uid, qos)?
        } else {
            [Driver::Systemd, Driver::Cgroupfs]
                .into_iter()
                .map(|d| self.root.join(pods::pod_cgroup(d, uid, qos)))
                .find(|p| p.is_dir())?
        };
        abs.strip_prefix(&self.root).ok().map(Path::to_owned)
    }

    /// The kubelet's driver as the tree shows it (systemd when it shows nothing yet).
    fn driver(&self) -> Driver {
        if !self.root.join("kubepods.slice").is_dir() && self.root.join("kubepods").is_dir() {
            Driver::Cgroupfs
        } else {
            Driver::Systemd
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "11111111-2222-3333-4444-555555555555";

    #[test]
    fn a_missing_cgroup_is_expected_where_the_kubelet_puts_it_and_found_when_it_appears() {
        let root = std::env::temp_dir().join(format!("weft-cgroups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("kubepods/besteffort")).expect("mkdir");
        let mut c = Cgroups::new(&root);
        let expected = c.resolve(UID, QosClass::BestEffort);
        assert_eq!(
            expected,
            PathBuf::from(format!("kubepods/besteffort/pod{UID}"))
        );
        assert!(!c.appeared(), "nothing yet");
        std::fs::create_dir_all(root.join(&expected)).expect("mkdir pod");
        assert!(!c.appeared(), "where expected: the store keeps its path");
        assert_eq!(c.resolve(UID, QosClass::BestEffort), expected);
        assert!(!c.appeared(), "found once");
        c.retain(std::iter::empty());
        assert!(c.found.is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_cgroup_elsewhere_is_found_by_the_scan() {
        let root = std::env::temp_dir().join(format!("weft-cgroups-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let nested = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        );
        std::fs::create_dir_all(root.join(&nested)).expect("mkdir");
        let mut c = Cgroups::new(&root);
        assert_eq!(c.resolve(UID, QosClass::Burstable), Path::new(&nested));
        let _ = std::fs::remove_dir_all(&root);
    }
}
