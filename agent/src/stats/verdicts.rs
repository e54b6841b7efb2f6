//! Policy verdict counters (`VERDICTS`), read from the kernel at every scrape:
//! `weft_policy_verdicts_total{direction,match,action}` and
//! `weft_drops_total{reason="policy_denied",direction}`, in the manner of Cilium's
//! `policy_verdict` and `drop_count` metrics.
use std::sync::Mutex;

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};
use weft_abi::policy::{DIR_EGRESS, DIR_INGRESS, Match, verdict_index};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    r#match: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
    direction: &'static str,
}

/// Reads `VERDICTS` when Prometheus scrapes.
pub struct VerdictCollector {
    map: Mutex<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for VerdictCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdictCollector").finish_non_exhaustive()
    }
}

impl VerdictCollector {
    pub fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }

    /// (direction, match, total over CPUs); a slot that cannot be read counts 0.
    pub fn read(&self) -> Vec<(u8, Match, u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for direction in [DIR_INGRESS, DIR_EGRESS] {
            for m in Match::ALL {
                let total = map
                    .get(&verdict_index(direction, m), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                out.push((direction, m, total));
            }
        }
        out
    }
}

fn direction_name(direction: u8) -> &'static str {
    if direction == DIR_EGRESS {
        "egress"
    } else {
        "ingress"
    }
}

impl Collector for VerdictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.read();
        let mut verdicts = encoder.encode_descriptor(
            "weft_policy_verdicts",
            "New connections and flows judged by NetworkPolicy, by direction, how they matched \
             and the action",
            None,
            MetricType::Counter,
        )?;
        for &(direction, m, total) in &counts {
            let labels = VerdictLabels {
                direction: direction_name(direction),
                r#match: m.name(),
                action: if m == Match::None { "deny" } else { "allow" },
            };
            ConstCounter::new(total).encode(verdicts.encode_family(&labels)?)?;
        }
        let mut drops = encoder.encode_descriptor(
            "weft_drops",
            "Packets and connection attempts the datapath refused, by reason and direction",
            None,
            MetricType::Counter,
        )?;
        for &(direction, _, total) in counts.iter().filter(|c| c.1 == Match::None) {
            let labels = DropLabels {
                reason: "policy_denied",
                direction: direction_name(direction),
            };
            ConstCounter::new(total).encode(drops.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
