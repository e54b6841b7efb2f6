//! The CA directory watched (not recursively), so that a rotation is read as soon as its files
//! are in place rather than at the next resync: a Kubernetes Secret's update swaps its
//! `..data` link in the directory, and an edit by hand writes or renames the files there.
//! The resync's re-read stays, for a change a lost event would hide.
//!
//! The directory's parent is watched too, for the directory itself: one deleted and made
//! again (`weft ca init` into a fresh directory) is a new inode, which the old watch does
//! not see, so it is watched anew.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{sync::mpsc, time::Instant};

/// How long the directory must stay quiet before it is read: the files of one change come
/// in a burst (a certificate and its key written one after the other), and a read between
/// them would report a key that does not match.
pub const SETTLE: Duration = Duration::from_millis(200);
/// The longest a change waits for quiet: a directory that never settles is read anyway.
pub const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// Changes to the CA directory, as reads to do.
#[derive(Debug)]
pub struct CaWatch {
    watcher: notify::RecommendedWatcher,
    dir: PathBuf,
    touched: mpsc::UnboundedReceiver<Touch>,
    /// The first change not read yet, and when the directory will have been quiet for
    /// [`SETTLE`] (or that change will be [`SETTLE_AT_MOST`] old).
    due: Option<(Instant, Instant)>,
}

/// What an event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Touch {
    /// Something in the directory changed.
    Inside,
    /// The directory itself was removed, made or moved: watched anew if it is there.
    Itself,
}

impl CaWatch {
    pub fn start(dir: &Path) -> notify::Result<Self> {
        use notify::Watcher as _;
        let (tx, touched) = mpsc::unbounded_channel();
        // Absolute, so that it has a parent and the parent's events name it; not resolved,
        // so that a symlink swapped for another is the directory made again.
        let dir = std::path::absolute(dir)?;
        let watched = dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // An error (a lost event) could hide a change: read again.
                let touch = match event {
                    Ok(e) => touch(&watched, &e),
                    Err(_) => Some(Touch::Inside),
                };
                // The receiver is gone only when the agent stops.
                if let Some(t) = touch {
                    let _ = tx.send(t);
                }
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        if let Some(parent) = dir.parent() {
            // Without it only a directory made again goes unseen (until the resync).
            if let Err(e) = watcher.watch(parent, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(target: "weft::mesh", dir = %parent.display(), error = %e, "cannot watch the CA directory's parent: a CA directory made again is read at the next resync");
            }
        }
        Ok(Self {
            watcher,
            dir,
            touched,
            due: None,
        })
    }

    /// Returns once the directory changed and then stayed quiet for [`SETTLE`] (at most
    /// [`SETTLE_AT_MOST`] after the change). Cancel-safe: what was seen before a
    /// cancellation is kept.
    pub async fn changed(&mut self) {
        loop {
            let Some((first, quiet)) = self.due else {
                let Some(t) = self.touched.recv().await else {
                    return std::future::pending().await;
                };
                self.seen(t);
                let now = Instant::now();
                self.due = Some((now, now + SETTLE));
                continue;
            };
            let at = quiet.min(first + SETTLE_AT_MOST);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    self.due = None;
                    return;
                }
                touched = self.touched.recv() => match touched {
                    Some(t) => {
                        self.seen(t);
                        self.due = Some((first, Instant::now() + SETTLE));
                    }
                    // The watch ended: the change seen is read now.
                    None => {
                        self.due = None;
                        return;
                    }
                },
            }
        }
    }

    /// Watches the directory anew when it was made again (a new inode).
    fn seen(&mut self, t: Touch) {
        use notify::Watcher as _;
        if t == Touch::Itself && self.dir.is_dir() {
            // The old target's watch goes (it stays under the same path otherwise). Gone
            // again meanwhile: the next event about it tries again.
            let _ = self.watcher.unwatch(&self.dir);
            let _ = self
                .watcher
                .watch(&self.dir, notify::RecursiveMode::NonRecursive);
        }
    }
}

/// What `event` says about the directory `dir`: nothing for a read, or for another entry of
/// its parent.
fn touch(dir: &Path, event: &notify::Event) -> Option<Touch> {
    if crate::source::dir::only_read(&event.kind) {
        return None;
    }
    if event.paths.iter().any(|p| p == dir) {
        return Some(Touch::Itself);
    }
    event
        .paths
        .iter()
        .any(|p| p.parent() == Some(dir))
        .then_some(Touch::Inside)
}

/// [`CaWatch::changed`] of a watch that may not be there (no `--mesh-ca`, or the watch
/// could not be set up): never, then.
pub async fn changed(watch: &mut Option<CaWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TempDir;

    /// A CA directory deleted and made again is still watched: a write into the new one
    /// is a change.
    #[tokio::test]
    async fn a_directory_made_again_is_watched_anew() {
        let parent = TempDir::new("ca-watch-again");
        let dir = parent.path().join("ca");
        std::fs::create_dir(&dir).expect("mkdir");
        let mut watch = CaWatch::start(&dir).expect("watch");
        std::fs::remove_dir(&dir).expect("rmdir");
        let removed = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(removed.is_ok(), "the removal is a change");
        std::fs::create_dir(&dir).expect("mkdir again");
        let made = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(made.is_ok(), "its creation is a change");
        std::fs::write(dir.join("ca.crt"), "x").expect("write");
        let written = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(
            written.is_ok(),
            "a write into the new directory is a change"
        );
    }

    /// A watch on `parent/ca`, a symlink to `parent/v1` swapped for one to `parent/v2` once
    /// watched, after the swap's change: the watch and both targets.
    async fn swapped_link(parent: &Path) -> (CaWatch, [PathBuf; 2]) {
        let targets = [parent.join("v1"), parent.join("v2")];
        for d in &targets {
            std::fs::create_dir(d).expect("mkdir");
        }
        let dir = parent.join("ca");
        std::os::unix::fs::symlink(&targets[0], &dir).expect("link");
        let mut watch = CaWatch::start(&dir).expect("watch");
        let next = parent.join("ca.next");
        std::os::unix::fs::symlink(&targets[1], &next).expect("link");
        std::fs::rename(&next, &dir).expect("swap");
        let swapped = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(swapped.is_ok(), "the swap is a change");
        (watch, targets)
    }

    /// A CA directory that is a symlink swapped for one to another directory: a write into
    /// the new target is a change.
    #[tokio::test]
    async fn a_symlink_swapped_to_another_directory_is_watched_anew() {
        let parent = TempDir::new("ca-watch-link");
        let (mut watch, [_, second]) = swapped_link(parent.path()).await;
        std::fs::write(second.join("ca.crt"), "x").expect("write");
        let written = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(written.is_ok(), "a write into the new target is a change");
    }

    /// Once a symlinked CA directory points elsewhere, a write into its old target is no
    /// change: the old target's watch went with the swap.
    #[tokio::test]
    async fn a_symlink_swapped_away_leaves_its_old_target_unwatched() {
        let parent = TempDir::new("ca-watch-old");
        let (mut watch, [first, _]) = swapped_link(parent.path()).await;
        std::fs::write(first.join("ca.crt"), "x").expect("write");
        let old = tokio::time::timeout(4 * SETTLE, watch.changed()).await;
        assert!(old.is_err(), "a write into the old target is no change");
    }

    /// A burst of writes is one change, reported once the directory is quiet; reading the
    /// files is none.
    #[tokio::test]
    async fn a_burst_of_writes_is_one_change_and_reading_is_none() {
        let dir = TempDir::new("ca-watch");
        let mut watch = CaWatch::start(dir.path()).expect("watch");
        for file in ["ca.crt", "ca.key"] {
            std::fs::write(dir.path().join(file), "x").expect("write");
        }
        let waited = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(waited.is_ok(), "the change is reported");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.crt")).expect("read"),
            "x"
        );
        let again = tokio::time::timeout(4 * SETTLE, watch.changed()).await;
        assert!(
            again.is_err(),
            "a read is no change, and a burst is reported once"
        );
    }
}
