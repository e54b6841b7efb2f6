//! DestinationRule validation as istiod's webhook does it, for the fields weft reads.
use std::time::Duration;

use super::{Errors, FieldError, is_dns1123_subdomain, metadata};
use crate::store::networking::{ConnectionPool, DestinationRule, OutlierDetection};

pub fn destination_rule(dr: &DestinationRule) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &dr.metadata, true, is_dns1123_subdomain);
    let spec = &dr.spec;
    if spec.host.is_empty() {
        e.add("spec.host", "host is required");
    } else if !is_host(&spec.host) {
        e.add(
            "spec.host",
            "must be a DNS name, optionally starting with the wildcard *.",
        );
    }
    let Some(policy) = &spec.traffic_policy else {
        return e.into_result();
    };
    if let Some(o) = &policy.outlier_detection {
        outlier_detection(&mut e, "spec.trafficPolicy.outlierDetection", o);
    }
    if let Some(c) = &policy.connection_pool {
        connection_pool(&mut e, "spec.trafficPolicy.connectionPool", c);
    }
    for (i, p) in policy.port_level_settings.iter().flatten().enumerate() {
        let at = format!("spec.trafficPolicy.portLevelSettings[{i}]");
        if p.port.is_none() {
            e.add(format!("{at}.port"), "port must be set");
        }
        if let Some(o) = &p.outlier_detection {
            outlier_detection(&mut e, &format!("{at}.outlierDetection"), o);
        }
        if let Some(c) = &p.connection_pool {
            connection_pool(&mut e, &format!("{at}.connectionPool"), c);
        }
    }
    e.into_result()
}

fn connection_pool(e: &mut Errors, at: &str, c: &ConnectionPool) {
    if let Some(text) = c.tcp.as_ref().and_then(|t| t.connect_timeout.as_ref())
        && let Err(message) = duration(text)
    {
        e.add(format!("{at}.tcp.connectTimeout"), message);
    }
}

fn outlier_detection(e: &mut Errors, at: &str, o: &OutlierDetection) {
    for (name, value) in [
        ("interval", &o.interval),
        ("baseEjectionTime", &o.base_ejection_time),
    ] {
        if let Some(text) = value
            && let Err(message) = duration(text)
        {
            e.add(format!("{at}.{name}"), message);
        }
    }
    for (name, value) in [
        ("maxEjectionPercent", o.max_ejection_percent),
        ("minHealthPercent", o.min_health_percent),
    ] {
        if value.is_some_and(|p| !(0..=100).contains(&p)) {
            e.add(format!("{at}.{name}"), "percentage must be in range 0..100");
        }
    }
}

/// A duration as istiod takes one: Go's `time.Duration` text, at least 1 ms, whole ms.
pub fn duration(text: &str) -> Result<Duration, String> {
    let d = go_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration (e.g. 30s, 1m30s, 100ms)"))?;
    if d < Duration::from_millis(1) {
        return Err("duration must be greater than 1ms".into());
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err("only durations to ms precision are supported".into());
    }
    Ok(d)
}

/// Go's `time.ParseDuration`: a sequence of decimal numbers, each with a unit (`ns`, `us`,
/// `µs`, `ms`, `s`, `m`, `h`), optionally signed; negative durations are None.
pub fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() || rest.starts_with('-') {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// A host as istiod's `ValidateWildcardDomain` takes it: DNS labels (the last may be empty:
/// a trailing dot), the first possibly starting with `*` (`*`, `*.example.com`,
/// `*web.example.com`).
fn is_host(host: &str) -> bool {
    let labels: Vec<&str> = host.split('.').collect();
    let last = labels.len() - 1;
    let wildcard = host.starts_with('*');
    host.len() <= 255
        && labels.iter().enumerate().all(|(i, l)| {
            let l = if i == 0 && wildcard { &l[1..] } else { l };
            let dns = !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && (!l.starts_with('-') || (i == 0 && wildcard))
                && !l.ends_with('-');
            dns || (i == 0 && wildcard && l.is_empty()) || (i == last && i > 0 && l.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        let ms = |t: &str| go_duration(t).map(|d| d.as_millis());
        assert_eq!(ms("30s"), Some(30_000));
        assert_eq!(ms("1m30s"), Some(90_000));
        assert_eq!(ms("1.5s"), Some(1_500));
        assert_eq!(ms("100ms"), Some(100));
        assert_eq!(ms("2h"), Some(7_200_000));
        assert_eq!(ms("0"), Some(0));
        assert_eq!(ms("10"), None);
        assert_eq!(ms("-1s"), None);
        assert_eq!(ms("1d"), None);
        assert_eq!(ms(""), None);
    }

    #[test]
    fn hosts_are_taken_as_istiod_takes_them() {
        for ok in [
            "web",
            "web.prod.svc.cluster.local",
            "web.prod.svc.cluster.local.",
            "*",
            "*.prod.svc.cluster.local",
            "*web.example.com",
            "*-x.example.com",
            "Web.Example.com",
        ] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["", ".", "a..b", "-web", "web-", "we b", "a.*.b"] {
            assert!(!is_host(bad), "{bad}");
        }
    }

    #[test]
    fn durations_are_whole_milliseconds_of_at_least_one() {
        assert_eq!(duration("1ms"), Ok(Duration::from_millis(1)));
        assert!(duration("500us").is_err());
        assert!(duration("1500us").is_err());
        assert!(duration("0s").is_err());
    }
}
