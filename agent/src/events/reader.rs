//! Reads connection events from the ring buffer as they arrive.
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

    /// Resolves when the kernel wakes the reader or `poll` ticks (the kernel batches
    /// wakeups): then [`Reader::drain`].
    pub async fn ready(&mut self, poll: &mut tokio::time::Interval) -> Result<(), Error> {
        tokio::select! {
            ready = self.ring.readable_mut() => ready.map_err(Error::Io)?.clear_ready(),
            _ = poll.tick() => {}
        }
        Ok(())
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
