//! UDP flow counters (`UDP_FLOW_STATS`): the kernel counts packets and bytes per flow of a
//! local socket; every interval the agent reads them off its event loop (two syscalls per
//! flow) and deletes flows idle past the timeout.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use weft_abi::traffic::{UdpFlowStatsKey, UdpFlowStatsValue};

use super::Error;

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn coarse_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// `clock` now, in nanoseconds (`CLOCK_MONOTONIC` is `bpf_ktime_get_ns`'s).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// One flow as a read saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFlowSample {
    pub key: UdpFlowStatsKey,
    pub value: UdpFlowStatsValue,
    /// Idle past the timeout: deleted from the map right after the read.
    pub ended: bool,
}

/// Every flow in the map at one read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UdpBatch {
    pub flows: Vec<UdpFlowSample>,
}

/// The kernel map, shared with the blocking reads.
#[derive(Clone)]
pub struct UdpFlowReader {
    map: Arc<Mutex<HashMap<MapData, UdpFlowStatsKey, UdpFlowStatsValue>>>,
}

impl std::fmt::Debug for UdpFlowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpFlowReader").finish_non_exhaustive()
    }
}

impl UdpFlowReader {
    pub fn new(map: HashMap<MapData, UdpFlowStatsKey, UdpFlowStatsValue>) -> Self {
        Self {
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// Reads every flow and deletes those idle longer than `idle`. A packet counted between
    /// the read and the delete is lost; the next one starts a new flow. Blocking: run it off
    /// the event loop.
    pub fn read(&self, idle: Duration) -> Result<UdpBatch, Error> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let entries: Vec<(UdpFlowStatsKey, UdpFlowStatsValue)> = map
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| Error::Map {
                map: weft_abi::maps::UDP_FLOW_STATS,
                source,
            })?;
        let now = coarse_now_ns();
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let flows = entries
            .into_iter()
            .map(|(key, value)| {
                let ended = now.saturating_sub(value.last_ns) > idle;
                if ended {
                    // Gone already (evicted) is as good.
                    let _ = map.remove(&key);
                }
                UdpFlowSample { key, value, ended }
            })
            .collect();
        Ok(UdpBatch { flows })
    }
}
