//! Where pods' cgroups will appear: the parent directories of the cgroups that do not exist
//! yet are watched (inotify), so a new pod is bound as soon as the kubelet (or whoever runs it)
//! creates its cgroup, instead of at the next periodic check.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use notify::Watcher as _;
use tokio::sync::mpsc::UnboundedSender;

/// Watches a changing set of directories; every event in them sends `()`.
pub struct CgroupWatch {
    watcher: notify::RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
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
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // An error (a lost event) is a reason to look too. The receiver is gone only when
            // the agent stops.
            let creation = match &event {
                Ok(e) => matches!(e.kind, notify::EventKind::Create(_)),
                Err(_) => true,
            };
            if creation {
                let _ = tx.send(());
            }
        })?;
        Ok(Self {
            watcher,
            watched: BTreeSet::new(),
        })
    }

    /// Watches the parents of `missing` (those that exist) and nothing else. Returns whether
    /// a watch was added: what was created before it took effect is only seen by looking.
    pub fn watch_parents_of<'a>(&mut self, missing: impl Iterator<Item = &'a Path>) -> bool {
        let wanted: BTreeSet<PathBuf> = missing
            .filter_map(Path::parent)
            .filter(|p| p.is_dir())
            .map(Path::to_owned)
            .collect();
        for gone in self
            .watched
            .difference(&wanted)
            .cloned()
            .collect::<Vec<_>>()
        {
            // A removed directory took its watch with it.
            let _ = self.watcher.unwatch(&gone);
            self.watched.remove(&gone);
        }
        let mut added = false;
        for dir in wanted {
            if self.watched.contains(&dir) {
                continue;
            }
            match self
                .watcher
                .watch(&dir, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => {
                    self.watched.insert(dir);
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
        assert!(!w.watch_parents_of(std::iter::empty()));
        assert!(w.watched.is_empty());
    }
}
