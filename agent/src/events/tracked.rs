//! Whether the kernel still tracks a connection (`CONN_STATE`): tells a connection whose close
//! event was lost (the ring buffer was full) from one that is merely idle.
use aya::maps::{HashMap, MapData, MapError};
use weft_abi::conn::ConnState;

/// A read-only handle on `CONN_STATE`.
pub struct Tracked {
    map: HashMap<MapData, u64, ConnState>,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked").finish_non_exhaustive()
    }
}

impl Tracked {
    pub fn new(map: HashMap<MapData, u64, ConnState>) -> Self {
        Self { map }
    }

    /// False only when the kernel says the socket is not there; a failed lookup counts as
    /// tracked (a connection is never forgotten on a doubt).
    pub fn contains(&self, cookie: u64) -> bool {
        !matches!(self.map.get(&cookie, 0), Err(MapError::KeyNotFound))
    }
}
