//! The CA directory watched (not recursively), so that a rotation is read as soon as its files
//! are in place rather than at the next resync: a Kubernetes Secret's update swaps its
//! `..data` link in the directory, and an edit by hand writes or renames the files there.
//! The resync's re-read stays, for a change a lost event would hide.
use std::{path::Path, time::Duration};

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
    _watcher: notify::RecommendedWatcher,
    touched: mpsc::UnboundedReceiver<()>,
    /// The first change not read yet, and when the directory will have been quiet for
    /// [`SETTLE`] (or that change will be [`SETTLE_AT_MOST`] old).
    due: Option<(Instant, Instant)>,
}

impl CaWatch {
    pub fn start(dir: &Path) -> notify::Result<Self> {
        use notify::Watcher as _;
        let (tx, touched) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // An error (a lost event) could hide a change: read again.
                if event.is_ok_and(|e| crate::source::dir::only_read(&e.kind)) {
                    return;
                }
                // The receiver is gone only when the agent stops.
                let _ = tx.send(());
            })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(Self {
            _watcher: watcher,
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
                if self.touched.recv().await.is_none() {
                    return std::future::pending().await;
                }
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
                    Some(()) => self.due = Some((first, Instant::now() + SETTLE)),
                    // The watch ended: the change seen is read now.
                    None => {
                        self.due = None;
                        return;
                    }
                },
            }
        }
    }
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
