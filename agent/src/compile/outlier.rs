//! Passive health checking of a Service's backends, configured as Istio's
//! `trafficPolicy.outlierDetection` is, and compiled to what the kernel applies ([`Outlier`]).
//!
//! At L4 a failure is a connection that failed: `consecutive5xxErrors` and
//! `consecutiveGatewayErrors` both count those (Envoy maps a TCP connect failure to both),
//! so the lower of the two that are enabled ejects. Envoy's defaults fill what is unset, as
//! istiod leaves them to Envoy: 5 consecutive 5xx errors (0 turns them off), gateway errors
//! off, an interval of 10 s, a base ejection time of 30 s (an ejection lasts it times the
//! number of ejections, at most 300 s or the base if longer), at most 10% ejected at once,
//! and no panic threshold (`minHealthPercent` 0).
use std::{fmt, str::FromStr, time::Duration};

use weft_abi::svc::Outlier;

/// Envoy's defaults.
const CONSECUTIVE_5XX: u32 = 5;
const INTERVAL: Duration = Duration::from_secs(10);
const BASE_EJECTION: Duration = Duration::from_secs(30);
const MAX_EJECTION: Duration = Duration::from_secs(300);
const MAX_EJECTION_PERCENT: u32 = 10;

/// The fields of `outlierDetection` weft applies (unset: Envoy's default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_5xx_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    /// 0 is unset, as istiod reads it.
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl OutlierDetection {
    /// What the kernel applies: off when neither error count is enabled.
    pub fn kernel(&self) -> Outlier {
        let enabled = |n: Option<u32>| n.filter(|n| *n > 0);
        let consecutive = [
            enabled(self.consecutive_gateway_errors),
            enabled(Some(self.consecutive_5xx_errors.unwrap_or(CONSECUTIVE_5XX))),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(consecutive) = consecutive else {
            return Outlier::default();
        };
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        let base = self.base_ejection_time.unwrap_or(BASE_EJECTION);
        let percent = |p: u32| p.min(100) as u8;
        Outlier {
            consecutive,
            base_ejection_ms: ms(base),
            max_ejection_ms: ms(base.max(MAX_EJECTION)),
            interval_ms: ms(self.interval.unwrap_or(INTERVAL)).max(1),
            max_ejection_percent: percent(match self.max_ejection_percent {
                0 => MAX_EJECTION_PERCENT,
                p => p,
            }),
            min_health_percent: percent(self.min_health_percent),
            _pad: 0,
            seal: 0,
        }
    }
}

/// `--outlier-detection-default`: what applies to a Service no DestinationRule configures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlierDefault(pub Option<OutlierDetection>);

/// A malformed `--outlier-detection-default`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{field}: {message} (expected off, on, or FIELD=VALUE,... with outlierDetection's fields, e.g. consecutive5xxErrors=3,baseEjectionTime=10s)"
)]
pub struct FlagError {
    pub field: String,
    pub message: String,
}

impl FromStr for OutlierDefault {
    type Err = FlagError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "" => return Ok(Self(None)),
            "on" => return Ok(Self(Some(OutlierDetection::default()))),
            _ => {}
        }
        let mut out = OutlierDetection::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (field, value) = item.split_once('=').ok_or_else(|| FlagError {
                field: item.to_owned(),
                message: "no value".into(),
            })?;
            set(&mut out, field.trim(), value.trim()).map_err(|message| FlagError {
                field: field.trim().to_owned(),
                message,
            })?;
        }
        Ok(Self(Some(out)))
    }
}

/// Sets one field of `out` from its text.
fn set(out: &mut OutlierDetection, field: &str, value: &str) -> Result<(), String> {
    let count = || value.parse::<u32>().map_err(|e| format!("{value:?}: {e}"));
    let percent = || {
        count().and_then(|p| {
            (p <= 100)
                .then_some(p)
                .ok_or_else(|| format!("{p} is not a percentage (0-100)"))
        })
    };
    let duration = || {
        crate::parse_duration(value).and_then(|d| {
            (d >= Duration::from_millis(1))
                .then_some(d)
                .ok_or_else(|| format!("{value:?} is shorter than 1ms"))
        })
    };
    match field {
        "consecutiveGatewayErrors" => out.consecutive_gateway_errors = Some(count()?),
        "consecutive5xxErrors" => out.consecutive_5xx_errors = Some(count()?),
        "interval" => out.interval = Some(duration()?),
        "baseEjectionTime" => out.base_ejection_time = Some(duration()?),
        "maxEjectionPercent" => out.max_ejection_percent = percent()?,
        "minHealthPercent" => out.min_health_percent = percent()?,
        _ => return Err("not a field of outlierDetection weft applies".into()),
    }
    Ok(())
}

impl fmt::Display for OutlierDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "on" } else { "off" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(flag: &str) -> Outlier {
        flag.parse::<OutlierDefault>()
            .expect("flag")
            .0
            .map(|o| o.kernel())
            .unwrap_or_default()
    }

    /// `on` is Envoy's defaults as istiod leaves them.
    #[test]
    fn on_is_envoys_defaults() {
        assert_eq!(
            kernel("on"),
            Outlier {
                consecutive: 5,
                base_ejection_ms: 30_000,
                max_ejection_ms: 300_000,
                interval_ms: 10_000,
                max_ejection_percent: 10,
                min_health_percent: 0,
                _pad: 0,
                seal: 0,
            }
        );
        assert_eq!(kernel("off"), Outlier::default());
    }

    /// The lower enabled error count ejects; 0 turns a count off.
    #[test]
    fn the_lower_enabled_count_ejects() {
        assert_eq!(kernel("consecutiveGatewayErrors=3").consecutive, 3);
        assert_eq!(kernel("consecutiveGatewayErrors=7").consecutive, 5);
        assert_eq!(
            kernel("consecutive5xxErrors=0,consecutiveGatewayErrors=7").consecutive,
            7
        );
        assert_eq!(kernel("consecutive5xxErrors=0"), Outlier::default());
    }

    /// Fields given replace the defaults; the longest ejection is at least the base.
    #[test]
    fn fields_replace_the_defaults() {
        let o =
            kernel("baseEjectionTime=10m,interval=1s,maxEjectionPercent=50,minHealthPercent=20");
        assert_eq!(
            (
                o.base_ejection_ms,
                o.max_ejection_ms,
                o.interval_ms,
                o.max_ejection_percent,
                o.min_health_percent
            ),
            (600_000, 600_000, 1_000, 50, 20)
        );
    }

    /// A bad field names itself.
    #[test]
    fn a_bad_field_names_itself() {
        let err = |s: &str| s.parse::<OutlierDefault>().expect_err(s).field;
        assert_eq!(err("maxEjectionPercent=101"), "maxEjectionPercent");
        assert_eq!(err("interval=0s"), "interval");
        assert_eq!(err("consecutiveErrors=3"), "consecutiveErrors");
        assert_eq!(err("baseEjectionTime"), "baseEjectionTime");
    }
}
