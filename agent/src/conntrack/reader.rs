//! Reads connection events from the ring buffer as they arrive.
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::{Connection, Error};

/// Counts of what the reader has seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReaderStats {
    pub events: u64,
    pub malformed: u64,
}

/// Drains `CONN_EVENTS` and hands each decoded record to a sink.
pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
    stats: ReaderStats,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Must be called inside a tokio runtime.
    pub fn new(ring: RingBuf<MapData>) -> Result<Self, Error> {
        // SAFETY: the ring buffer owns its map descriptor; it stays open and unchanged for as
        // long as the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| Error::Io(e.into()))?;
        Ok(Self {
            ring,
            stats: ReaderStats::default(),
        })
    }

    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// Processes events as the kernel wakes the reader and at least every `poll` (the kernel
    /// batches wakeups), forever. Cancel by dropping the future; call [`Reader::drain`]
    /// afterwards to take what is left.
    pub async fn run(
        &mut self,
        poll: Duration,
        sink: &mut impl FnMut(Connection),
    ) -> Result<(), Error> {
        let mut timer = tokio::time::interval(poll);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = self.ring.readable_mut() => {
                    let mut guard = ready.map_err(Error::Io)?;
                    guard.clear_ready();
                    drain_into(guard.get_inner_mut(), &mut self.stats, sink);
                }
                _ = timer.tick() => drain_into(self.ring.get_mut(), &mut self.stats, sink),
            }
        }
    }

    /// Processes every event already in the buffer; returns how many.
    pub fn drain(&mut self, sink: &mut impl FnMut(Connection)) -> u64 {
        let before = self.stats.events + self.stats.malformed;
        drain_into(self.ring.get_mut(), &mut self.stats, sink);
        self.stats.events + self.stats.malformed - before
    }
}

fn drain_into(
    ring: &mut RingBuf<MapData>,
    stats: &mut ReaderStats,
    sink: &mut impl FnMut(Connection),
) {
    while let Some(item) = ring.next() {
        match Connection::decode(&item) {
            Ok(c) => {
                stats.events += 1;
                sink(c);
            }
            Err(e) => {
                stats.malformed += 1;
                tracing::warn!(error = %e, "dropping malformed connection event");
            }
        }
    }
}
