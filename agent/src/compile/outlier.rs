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

use crate::store::{
    Store,
    networking::{self, DestinationRule},
    validate::networking::go_duration,
};

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
            connect_timeout_ms: 0,
            seal: 0,
        }
    }
}

impl From<&networking::OutlierDetection> for OutlierDetection {
    /// A validated `outlierDetection` (a duration that does not parse is unset).
    fn from(o: &networking::OutlierDetection) -> Self {
        let duration = |d: &Option<String>| d.as_deref().and_then(go_duration);
        let percent = |p: Option<i32>| p.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        Self {
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            consecutive_5xx_errors: o.consecutive_5xx_errors,
            interval: duration(&o.interval),
            base_ejection_time: duration(&o.base_ejection_time),
            max_ejection_percent: percent(o.max_ejection_percent),
            min_health_percent: percent(o.min_health_percent),
        }
    }
}

/// Where a Service's health checking comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope<'a> {
    /// The mesh root namespace: its rules apply to every client.
    pub root: &'a str,
    /// The cluster's DNS domain (`name.ns.svc.<domain>`).
    pub domain: &'a str,
    /// `--outlier-detection-default`, compiled.
    pub default: Outlier,
}

/// What applies to the TCP ports of one Service.
#[derive(Debug, Clone, Copy)]
pub struct ServiceOutlier<'a> {
    rule: Option<&'a DestinationRule>,
    default: Outlier,
}

impl<'a> ServiceOutlier<'a> {
    /// For Service `ns/name`: the DestinationRule for its host, from its namespace, else
    /// from the mesh root namespace (Istio applies one elsewhere only to that namespace's
    /// clients, and weft decides for every client of the node); the exact host before a
    /// wildcard of the namespace before a wider one, then the oldest, then by name.
    pub fn of(store: &'a Store, scope: &Scope<'_>, service: (&str, &str)) -> Self {
        let rule = [service.0, scope.root]
            .into_iter()
            .find_map(|ns| best_rule(store, ns, scope.domain, service));
        Self {
            rule,
            default: scope.default,
        }
    }

    /// What applies to Service port `port`: the rule's port-level `outlierDetection`, else
    /// its own, else the default (a rule without one leaves the default); and the
    /// `connectionPool.tcp.connectTimeout` of the same level, if any.
    pub fn port(&self, port: u16) -> Outlier {
        let Some(policy) = self.rule.and_then(|r| r.spec.traffic_policy.as_ref()) else {
            return self.default;
        };
        let port_level = policy
            .port_level_settings
            .iter()
            .flatten()
            .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(u32::from(port)));
        // A port's settings replace the rule's whole, as Istio's do: they inherit nothing.
        let (outlier, pool) = match port_level {
            Some(p) => (p.outlier_detection.as_ref(), p.connection_pool.as_ref()),
            None => (
                policy.outlier_detection.as_ref(),
                policy.connection_pool.as_ref(),
            ),
        };
        let mut out = outlier.map_or(self.default, |o| OutlierDetection::from(o).kernel());
        out.connect_timeout_ms = pool
            .and_then(|p| p.tcp.as_ref()?.connect_timeout.as_deref())
            .and_then(go_duration)
            .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
        out
    }
}

/// The best DestinationRule of namespace `scope` for Service `ns/name` (see
/// [`ServiceOutlier::of`]).
fn best_rule<'a>(
    store: &'a Store,
    scope: &str,
    domain: &str,
    service: (&str, &str),
) -> Option<&'a DestinationRule> {
    store
        .destination_rules
        .range((scope.to_owned(), String::new())..)
        .take_while(|((rule_ns, _), _)| rule_ns == scope)
        .filter_map(|((rule_ns, rule_name), dr)| {
            let rank = host_rank(&dr.spec.host, rule_ns, domain, service)?;
            // Istio merges the rules of one host and takes the traffic policy of the oldest
            // that has one.
            let without_policy = dr.spec.traffic_policy.is_none();
            let created = dr.metadata.creation_timestamp.as_ref().map(|t| t.0);
            Some((
                (rank, without_policy, created, rule_name.as_str()),
                dr.as_ref(),
            ))
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, dr)| dr)
}

/// How well `host` (of a rule in namespace `rule_ns`) names Service `ns/name`, lower
/// better: the exact name first, then wildcards, the longest first; None not at all. A name
/// without a dot is short for one in the rule's namespace (Istio expands no other form); a
/// trailing dot is allowed.
fn host_rank(
    host: &str,
    rule_ns: &str,
    domain: &str,
    (ns, name): (&str, &str),
) -> Option<(u8, usize)> {
    let fqdn = format!("{name}.{ns}.svc.{domain}");
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Some(suffix) = host.strip_prefix('*') {
        return fqdn
            .ends_with(suffix)
            .then(|| (1, usize::MAX - suffix.len()));
    }
    let exact = if host.contains('.') {
        host.eq_ignore_ascii_case(&fqdn)
    } else {
        host.eq_ignore_ascii_case(name) && rule_ns == ns
    };
    exact.then_some((0, 0))
}

/// What weft does not apply as a DestinationRule is written, as (`DestinationRule ns/name`,
/// why): each rule is named for what it asks that weft, deciding per node for every client,
/// cannot give (Istio's sidecars decide per client).
pub fn problems(store: &Store, root: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ((ns, name), dr) in &store.destination_rules {
        let object = format!("DestinationRule {ns}/{name}");
        let mut say = |message: &str| out.push((object.clone(), message.to_owned()));
        let spec = &dr.spec;
        let labels: Vec<&str> = spec.host.split('.').collect();
        // `name.ns.svc.<domain>`: a Service's name (other hosts name none).
        if let [_, of, "svc", ..] = labels.as_slice()
            && ns != root
            && of != ns
        {
            say(
                "names a Service of another namespace: Istio applies it to the clients of its own namespace only, weft (per node, for every client) does not apply it; put it in the Service's namespace or the mesh root namespace",
            );
        }
        if spec.other.contains_key("workloadSelector") {
            say(
                "workloadSelector: Istio applies the rule to the selected clients only; weft applies it to every client of the node",
            );
        }
        let export_to = spec.other.get("exportTo").and_then(|v| v.as_array());
        if export_to.is_some_and(|e| !e.iter().any(|v| v == "*")) {
            say(
                "exportTo: Istio applies the rule to some namespaces' clients only; weft applies it to every client of the node",
            );
        }
        let outliers = spec.traffic_policy.iter().flat_map(|p| {
            let ports = p.port_level_settings.iter().flatten();
            p.outlier_detection
                .iter()
                .chain(ports.filter_map(|p| p.outlier_detection.as_ref()))
        });
        if outliers
            .into_iter()
            .any(|o| o.other.contains_key("consecutiveErrors"))
        {
            say(
                "outlierDetection.consecutiveErrors (deprecated) is not applied: use consecutiveGatewayErrors or consecutive5xxErrors",
            );
        }
    }
    out
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
    use std::sync::Arc;

    use serde_json::{Value, json};

    use super::*;

    /// A store of DestinationRules: (namespace, name, created, spec).
    fn rules(rules: &[(&str, &str, &str, Value)]) -> Store {
        let mut store = Store::default();
        for (ns, name, created, spec) in rules {
            let dr: DestinationRule = serde_json::from_value(json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
                "spec": spec,
            }))
            .expect("rule");
            store
                .destination_rules
                .insert(((*ns).to_owned(), (*name).to_owned()), Arc::new(dr));
        }
        store
    }

    /// The mesh root `istio-system`, the domain `cluster.local`, and `default`.
    fn scope(default: Outlier) -> Scope<'static> {
        Scope {
            root: "istio-system",
            domain: "cluster.local",
            default,
        }
    }

    fn outlier(consecutive: u32) -> Value {
        json!({"outlierDetection": {"consecutive5xxErrors": consecutive}})
    }

    /// The consecutive failures that eject for Service `ns/name` port 80.
    fn consecutive(store: &Store, service: (&str, &str)) -> u32 {
        ServiceOutlier::of(store, &scope(Outlier::default()), service)
            .port(80)
            .consecutive
    }

    /// Every form of a host names its Service, and only it.
    #[test]
    fn hosts_name_services_as_istio_reads_them() {
        let rank =
            |host: &str, rule_ns: &str| host_rank(host, rule_ns, "cluster.local", ("prod", "web"));
        assert_eq!(rank("web", "prod"), Some((0, 0)));
        assert_eq!(rank("WEB", "prod"), Some((0, 0)));
        assert_eq!(rank("web", "other"), None);
        // Istio expands only names without a dot.
        assert_eq!(rank("web.prod", "prod"), None);
        assert_eq!(rank("web.prod.svc", "prod"), None);
        assert_eq!(rank("web.prod.svc.cluster.local", "other"), Some((0, 0)));
        assert_eq!(rank("web.prod.svc.cluster.local.", "other"), Some((0, 0)));
        assert_eq!(rank("web.prod.svc.example.org", "other"), None);
        assert_eq!(rank("db.prod.svc.cluster.local", "prod"), None);
        // Wildcards: the longest suffix first.
        let ns = rank("*.prod.svc.cluster.local", "prod").expect("namespace");
        let svc = rank("*.svc.cluster.local", "prod").expect("svc");
        let domain = rank("*.cluster.local", "prod").expect("domain");
        let all = rank("*", "prod").expect("all");
        assert!((0, 0) < ns && ns < svc && svc < domain && domain < all);
        assert_eq!(rank("*.example.com", "prod"), None);
    }

    /// What weft does not apply as written is said, by rule.
    #[test]
    fn rules_not_applied_as_written_are_reported() {
        let at = "2026-01-01T00:00:00Z";
        let store = rules(&[
            (
                "prod",
                "fine",
                at,
                json!({"host": "web", "exportTo": ["*"]}),
            ),
            (
                "dev",
                "other",
                at,
                json!({"host": "web.prod.svc.cluster.local"}),
            ),
            (
                "prod",
                "some",
                at,
                json!({"host": "web", "exportTo": ["."], "workloadSelector": {"matchLabels": {"app": "x"}}}),
            ),
            (
                "prod",
                "old",
                at,
                json!({"host": "web", "trafficPolicy": {"outlierDetection": {"consecutiveErrors": 3}}}),
            ),
            (
                "istio-system",
                "mesh",
                at,
                json!({"host": "web.prod.svc.cluster.local"}),
            ),
            ("dev", "external", at, json!({"host": "api.example.com"})),
            (
                "prod",
                "own",
                at,
                json!({"host": "web.prod.svc.cluster.local"}),
            ),
        ]);
        let said: Vec<(String, String)> = problems(&store, "istio-system")
            .into_iter()
            .map(|(o, m)| (o, m.split(':').next().unwrap_or_default().to_owned()))
            .collect();
        let want = |o: &str, m: &str| (format!("DestinationRule {o}"), m.to_owned());
        assert_eq!(
            said,
            [
                want("dev/other", "names a Service of another namespace"),
                want(
                    "prod/old",
                    "outlierDetection.consecutiveErrors (deprecated) is not applied"
                ),
                want("prod/some", "workloadSelector"),
                want("prod/some", "exportTo"),
            ]
        );
    }

    /// The Service's namespace before the root's; there, the exact host before a wildcard,
    /// then the oldest rule.
    #[test]
    fn the_nearest_most_exact_oldest_rule_applies() {
        let old = "2026-01-01T00:00:00Z";
        let new = "2026-06-01T00:00:00Z";
        let host = |h: &str, o: Value| {
            let mut spec = json!({"host": h, "trafficPolicy": o});
            spec["trafficPolicy"]["outlierDetection"]["consecutiveGatewayErrors"] = json!(0);
            spec
        };
        let store = rules(&[
            ("istio-system", "mesh", old, host("*", outlier(9))),
            (
                "prod",
                "wild",
                "2025-01-01T00:00:00Z", // the oldest, yet after every exact host
                host("*.prod.svc.cluster.local", outlier(7)),
            ),
            ("prod", "b-new", new, host("web", outlier(3))),
            (
                "prod",
                "a-newest",
                "2026-07-01T00:00:00Z",
                host("web", outlier(4)),
            ),
            (
                "prod",
                "c-old",
                old,
                host("web.prod.svc.cluster.local", outlier(2)),
            ),
            (
                "other",
                "elsewhere",
                old,
                host("web.prod.svc.cluster.local", outlier(1)),
            ),
        ]);
        assert_eq!(consecutive(&store, ("prod", "web")), 2);
        assert_eq!(consecutive(&store, ("prod", "db")), 7);
        assert_eq!(consecutive(&store, ("dev", "web")), 9);
    }

    /// A port's own settings before the rule's; a rule without outlierDetection leaves the
    /// default.
    #[test]
    fn port_level_settings_come_first() {
        let store = rules(&[(
            "prod",
            "web",
            "2026-01-01T00:00:00Z",
            json!({"host": "web", "trafficPolicy": {
                "outlierDetection": {"consecutive5xxErrors": 3},
                "portLevelSettings": [
                    {"port": {"number": 8080}, "outlierDetection": {"consecutive5xxErrors": 6}},
                    {"port": {"number": 9090}, "loadBalancer": {"simple": "ROUND_ROBIN"}},
                ],
            }}),
        )]);
        let default = Outlier {
            consecutive: 11,
            ..Outlier::default()
        };
        let scope = scope(default);
        let s = ServiceOutlier::of(&store, &scope, ("prod", "web"));
        assert_eq!(s.port(8080).consecutive, 6);
        // A port's entry inherits nothing, as in Istio: the default.
        assert_eq!(s.port(9090).consecutive, 11);
        assert_eq!(s.port(80).consecutive, 3);
        let none = rules(&[(
            "prod",
            "web",
            "2026-01-01T00:00:00Z",
            json!({"host": "web"}),
        )]);
        assert_eq!(
            ServiceOutlier::of(&none, &scope, ("prod", "web")).port(80),
            default
        );
    }

    /// connectTimeout comes from the same level as outlierDetection: a port's entry, else
    /// the rule's; it is kept with the default's health checking.
    #[test]
    fn connect_timeouts_come_from_the_ports_entry_else_the_rules() {
        let store = rules(&[(
            "prod",
            "web",
            "2026-01-01T00:00:00Z",
            json!({"host": "web", "trafficPolicy": {
                "connectionPool": {"tcp": {"connectTimeout": "1.5s"}, "http": {"maxRetries": 2}},
                "portLevelSettings": [
                    {"port": {"number": 8080}, "connectionPool": {"tcp": {"connectTimeout": "250ms"}}},
                    {"port": {"number": 9090}, "outlierDetection": {"consecutive5xxErrors": 6}},
                ],
            }}),
        )]);
        let default = Outlier {
            consecutive: 11,
            ..Outlier::default()
        };
        let scope = scope(default);
        let s = ServiceOutlier::of(&store, &scope, ("prod", "web"));
        let at = |port| (s.port(port).consecutive, s.port(port).connect_timeout_ms);
        assert_eq!(at(80), (11, 1500));
        assert_eq!(at(8080), (11, 250));
        assert_eq!(at(9090), (6, 0));
    }

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
                connect_timeout_ms: 0,
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
