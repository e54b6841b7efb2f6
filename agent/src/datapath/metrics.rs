//! BPF map pressure, per map: entries in use, capacity, fill ratio and kernel memory
//! (`weft_bpf_map_*`).
//! Written by the syncers (which know their own counts exactly) and by the periodic count of
//! every map's keys.
use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::MapUsage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map_name: &'static str,
}

/// Entries in use, capacity and fill of every map.
#[derive(Debug, Clone, Default)]
pub struct MapMetrics {
    entries: Family<MapLabels, Gauge>,
    capacity: Family<MapLabels, Gauge>,
    /// entries / capacity for hash, LRU and LPM maps.
    fill: Family<MapLabels, Gauge<f64, AtomicU64>>,
    memory: Family<MapLabels, Gauge>,
}

impl MapMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "bpf_map_entries",
            "Entries in use in a BPF map managed by the agent",
            m.entries.clone(),
        );
        registry.register(
            "bpf_map_capacity",
            "Capacity (max entries) of a BPF map managed by the agent",
            m.capacity.clone(),
        );
        registry.register(
            "bpf_map_fill_ratio",
            "Entries in use over capacity of a BPF map (hash, LRU and LPM maps; counted every stats interval)",
            m.fill.clone(),
        );
        registry.register(
            "bpf_map_memory_bytes",
            "Kernel memory a BPF map holds (preallocated maps: their whole capacity; counted every stats interval)",
            m.memory.clone(),
        );
        m
    }

    pub fn set_capacity(&self, map: &'static str, capacity: u32) {
        self.capacity
            .get_or_create(&MapLabels { map_name: map })
            .set(i64::from(capacity));
    }

    pub fn set_entries(&self, map: &'static str, entries: u64) {
        self.entries
            .get_or_create(&MapLabels { map_name: map })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Publishes a count of every map's entries.
    pub fn set_usage(&self, usage: &[MapUsage]) {
        for u in usage {
            let Some(&map) = weft_abi::maps::ALL.iter().find(|m| **m == u.name) else {
                continue;
            };
            self.set_capacity(map, u.max_entries);
            self.memory
                .get_or_create(&MapLabels { map_name: map })
                .set(i64::try_from(u.bytes).unwrap_or(i64::MAX));
            if let Some(n) = u.entries {
                self.set_entries(map, n);
            }
            if let Some(r) = u.fill_ratio {
                self.fill.get_or_create(&MapLabels { map_name: map }).set(r);
            }
        }
    }
}
