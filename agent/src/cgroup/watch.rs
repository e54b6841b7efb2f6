//! Where pods' cgroups will appear: the parent directories of the cgroups that do not exist
//! yet are watched (inotify), so a new pod is bound as soon as the kubelet (or whoever runs it)
//! creates its cgroup, instead of at the next periodic check.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use notify::Watcher as _;
use tokio::sync::mpsc::UnboundedSender;

/// Watches a changing set of directories; every event in them sends `()`.
pub struct CgroupWatch {
    watcher: notify::RecommendedWatcher,
    /// Watched directories by their inode: one removed and created again is a new directory
    /// (its watch went with the old one).
    watched: BTreeMap<PathBuf, u64>,
    /// Paths the watcher saw removed since the last look (inode numbers may be reused).
    removed: Arc<Mutex<BTreeSet<PathBuf>>>,
}

impl std::fmt::Debug for CgroupWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupWatch")
            .field("watched", &self.watched)
            .finish_non_exhaustive()
    }
}

impl CgroupWatch {
    pub fn new(tx: UnboundedSender<()>) -> notify::Result<Self> {
        let removed = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::clone(&removed);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // An error (a lost event) is a reason to look too. The receiver is gone only when
            // the agent stops.
            let creation = match event {
                Ok(e) if matches!(e.kind, notify::EventKind::Remove(_)) => {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(e.paths);
                    false
                }
                Ok(e) => matches!(e.kind, notify::EventKind::Create(_)),
                Err(_) => true,
            };
            if creation {
                let _ = tx.send(());
            }
        })?;
        Ok(Self {
            watcher,
            watched: BTreeMap::new(),
            removed,
        })
    }

    /// Watches the parents of `missing` (those that exist) and nothing else. Returns whether
    /// a watch was added: what was created before it took effect is only seen by looking.
    pub fn watch_parents_of<'a>(&mut self, missing: impl Iterator<Item = &'a Path>) -> bool {
        let wanted: BTreeMap<PathBuf, u64> = missing
            .filter_map(Path::parent)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|p| Some((p.to_owned(), inode(p)?)))
            .collect();
        let removed = std::mem::take(&mut *self.removed.lock().unwrap_or_else(|e| e.into_inner()));
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(dir, ino)| wanted.get(*dir) != Some(*ino) || removed.contains(*dir))
            .map(|(dir, _)| dir.clone())
            .collect();
        for dir in stale {
            // A removed directory took its watch with it.
            let _ = self.watcher.unwatch(&dir);
            self.watched.remove(&dir);
        }
        let mut added = false;
        for (dir, ino) in wanted {
            if self.watched.contains_key(&dir) {
                continue;
            }
            match self
                .watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => {
                    self.watched.insert(dir, ino);
                    added = true;
                }
                // The periodic check still finds the cgroup.
                Err(e) => {
                    tracing::debug!(target: "weft::sync", dir = %dir.display(), error = %e, "cannot watch for new cgroups")
                }
            }
        }
        added
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tests::TempDir;

    #[tokio::test]
    async fn a_directory_created_where_a_cgroup_is_missing_is_reported() {
        let root = TempDir::new("cgroup-watch");
        let missing = root.path().join("kubepods/besteffort/pod-a");
        std::fs::create_dir_all(missing.parent().expect("parent")).expect("mkdir");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = CgroupWatch::new(tx).expect("watcher");
        assert!(w.watch_parents_of([missing.as_path()].into_iter()));
        assert!(
            !w.watch_parents_of([missing.as_path()].into_iter()),
            "watched already"
        );
        std::fs::create_dir(&missing).expect("mkdir pod");
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event within 5 s")
            .expect("sender alive");
        // The parent removed and created again: a new directory, watched anew.
        let other = root.path().join("kubepods/besteffort/pod-b");
        std::fs::remove_dir_all(missing.parent().expect("parent")).expect("rm");
        std::fs::create_dir_all(missing.parent().expect("parent")).expect("mkdir");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !w.watch_parents_of([other.as_path()].into_iter()) {
            assert!(std::time::Instant::now() < deadline, "never watched again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::create_dir(&other).expect("mkdir pod b");
        tokio::time::timeout(Duration::from_secs(5), async {
            while rx.recv().await.is_some() {
                if other.is_dir() {
                    break;
                }
            }
        })
        .await
        .expect("an event for the new directory");
        assert!(!w.watch_parents_of(std::iter::empty()));
        assert!(w.watched.is_empty());
    }
}
