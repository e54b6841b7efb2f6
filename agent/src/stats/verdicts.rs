//! Kernel counters read at every scrape: policy verdicts (`VERDICTS`) as
//! `weft_policy_verdicts_total{direction,match,action}`, drops as
//! `weft_drops_total{reason,direction}` (in the manner of Cilium's `policy_verdict` and
//! `drop_count`), and the datapath's health counters (`STATS`) as `weft_events_lost_total` and
//! `weft_datapath_errors_total{reason}`.
use std::sync::Mutex;

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};
use weft_abi::{
    conn::DropReason,
    net::Direction,
    policy::{Match, verdict_index},
    stats::Counter,
};

use crate::metrics::label_value;

/// What a verdict did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

impl Action {
    const fn of(m: Match) -> Self {
        match m {
            Match::None => Self::Deny,
            _ => Self::Allow,
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

label_value!(Action);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: Direction,
    r#match: Match,
    action: Action,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: DropReason,
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    reason: Counter,
}

/// Reads `VERDICTS` and `STATS` when Prometheus scrapes.
pub struct VerdictCollector {
    map: Mutex<PerCpuArray<MapData, u64>>,
    stats: Mutex<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for VerdictCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdictCollector").finish_non_exhaustive()
    }
}

impl VerdictCollector {
    pub fn new(map: PerCpuArray<MapData, u64>, stats: PerCpuArray<MapData, u64>) -> Self {
        Self {
            map: Mutex::new(map),
            stats: Mutex::new(stats),
        }
    }

    /// A health counter summed over CPUs; None when it cannot be read (then no sample is
    /// exported: a missing series is visible, a 0 would not be).
    fn stat(&self, c: Counter) -> Option<u64> {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.get(&(c as u32), 0).ok().map(|v| v.iter().sum())
    }

    /// (direction, match, total over CPUs); a slot that cannot be read counts 0.
    pub fn read(&self) -> Vec<(Direction, Match, u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for direction in Direction::ALL {
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

impl Collector for VerdictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.read();
        let mut verdicts = encoder.encode_descriptor(
            "policy_verdicts",
            "New connections and flows judged by NetworkPolicy, by direction, how they matched \
             and the action",
            None,
            MetricType::Counter,
        )?;
        for &(direction, m, total) in &counts {
            let labels = VerdictLabels {
                direction,
                r#match: m,
                action: Action::of(m),
            };
            ConstCounter::new(total).encode(verdicts.encode_family(&labels)?)?;
        }
        {
            let mut drops = encoder.encode_descriptor(
                "drops",
                "Packets and connection attempts the datapath refused, by reason and direction",
                None,
                MetricType::Counter,
            )?;
            for &(direction, _, total) in counts.iter().filter(|c| c.1 == Match::None) {
                let labels = DropLabels {
                    reason: DropReason::PolicyDenied,
                    direction,
                };
                ConstCounter::new(total).encode(drops.encode_family(&labels)?)?;
            }
            let labels = DropLabels {
                reason: DropReason::NoBackends,
                direction: Direction::Egress,
            };
            if let Some(n) = self.stat(Counter::ServiceNoBackends) {
                ConstCounter::new(n).encode(drops.encode_family(&labels)?)?;
            }
        }
        let lost = encoder.encode_descriptor(
            "events_lost",
            "Connection and drop events the kernel could not hand to the agent (ring buffer full)",
            None,
            MetricType::Counter,
        )?;
        if let Some(n) = self.stat(Counter::ConnEventsLost) {
            ConstCounter::new(n).encode(lost)?;
        }
        let suppressed = encoder.encode_descriptor(
            "drop_events_suppressed",
            "Drops not reported one by one (past a CPU's budget of drop events per second); weft_drops_total counts them all",
            None,
            MetricType::Counter,
        )?;
        if let Some(n) = self.stat(Counter::DropEventsSuppressed) {
            ConstCounter::new(n).encode(suppressed)?;
        }
        let mut errors = encoder.encode_descriptor(
            "datapath_errors",
            "Datapath problems counted in the kernel, by reason (a full map, a refused callback, ...)",
            None,
            MetricType::Counter,
        )?;
        for c in Counter::ALL
            .into_iter()
            .filter(|c| !matches!(c, Counter::ConnEventsLost | Counter::ServiceNoBackends))
        {
            let labels = ErrorLabels { reason: c };
            if let Some(n) = self.stat(c) {
                ConstCounter::new(n).encode(errors.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
