//! Backends the kernel's health checking ejected, from its ejection events: a counter per
//! Service port (`weft_backend_ejections_total`) and a gauge of the backends out now
//! (`weft_ejected_backends`).
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Instant,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// A Service port whose backends are health-checked.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServicePortLabels {
    /// The Service's name (`unknown` for a frontend the agent no longer names).
    pub service: String,
    pub namespace: String,
    /// The Service port (the frontend's).
    pub port: u16,
}

/// The ejection metrics and the backends out now.
#[derive(Debug)]
pub struct Ejections {
    total: Family<ServicePortLabels, Counter>,
    ejected: Family<ServicePortLabels, Gauge>,
    /// Until when each (Service port, backend) is out.
    out: HashMap<(ServicePortLabels, SocketAddr), Instant>,
    /// The gauge's series.
    gauged: HashSet<ServicePortLabels>,
    /// The counter's series.
    counted: HashSet<ServicePortLabels>,
}

impl Ejections {
    pub fn new(registry: &mut Registry) -> Self {
        let e = Self {
            total: Family::default(),
            ejected: Family::default(),
            out: HashMap::new(),
            gauged: HashSet::new(),
            counted: HashSet::new(),
        };
        registry.register(
            "backend_ejections",
            "Backends ejected by passive health checking (outlierDetection), by Service port",
            e.total.clone(),
        );
        registry.register(
            "ejected_backends",
            "Backends passive health checking keeps out of a Service port now",
            e.ejected.clone(),
        );
        e
    }

    /// `backend` of `labels` is out until `until`.
    pub fn ejected(&mut self, labels: ServicePortLabels, backend: SocketAddr, until: Instant) {
        self.total.get_or_create(&labels).inc();
        self.counted.insert(labels.clone());
        self.out.insert((labels, backend), until);
        self.expire(Instant::now());
    }

    /// Removes every series and ejection of the Service ports `current` says are gone.
    pub fn prune(&mut self, current: impl Fn(&ServicePortLabels) -> bool) {
        let gone: HashSet<ServicePortLabels> = self
            .out
            .keys()
            .map(|(l, _)| l)
            .chain(self.gauged.iter())
            .chain(self.counted.iter())
            .filter(|l| !current(l))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        self.out.retain(|(l, _), _| !gone.contains(l));
        for l in &gone {
            self.total.remove(l);
            self.ejected.remove(l);
            self.counted.remove(l);
            self.gauged.remove(l);
        }
    }

    /// Ejections over at `now` end; the gauges count what is left (a Service port with
    /// none loses its series).
    pub fn expire(&mut self, now: Instant) {
        self.out.retain(|_, until| *until > now);
        let mut counts: HashMap<&ServicePortLabels, i64> = HashMap::new();
        for (labels, _) in self.out.keys() {
            *counts.entry(labels).or_default() += 1;
        }
        for labels in self.gauged.iter().filter(|l| !counts.contains_key(l)) {
            self.ejected.remove(labels);
        }
        for (labels, n) in &counts {
            self.ejected.get_or_create(labels).set(*n);
        }
        self.gauged = counts.into_keys().cloned().collect();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn labels(service: &str, port: u16) -> ServicePortLabels {
        ServicePortLabels {
            service: service.to_owned(),
            namespace: "shop".to_owned(),
            port,
        }
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("encode");
        // Series in a stable order (a family's own is its hash map's).
        let mut lines: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        lines.sort_unstable();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Each ejection counts; the gauge holds the backends out until their time ends.
    #[test]
    fn ejections_count_and_the_gauge_follows_their_end() {
        let mut registry = Registry::default();
        let mut e = Ejections::new(&mut registry);
        let start = Instant::now();
        let b = |n: u8| SocketAddr::from(([10, 0, 0, n], 8080));
        let later = start + Duration::from_secs(3600);
        e.ejected(labels("web", 80), b(1), later);
        e.ejected(labels("web", 80), b(2), later + Duration::from_secs(60));
        e.ejected(labels("api", 81), b(3), later);
        assert_eq!(
            text(&registry),
            "backend_ejections_total{service=\"api\",namespace=\"shop\",port=\"81\"} 1\n\
             backend_ejections_total{service=\"web\",namespace=\"shop\",port=\"80\"} 2\n\
             ejected_backends{service=\"api\",namespace=\"shop\",port=\"81\"} 1\n\
             ejected_backends{service=\"web\",namespace=\"shop\",port=\"80\"} 2\n"
        );
        e.expire(later + Duration::from_secs(1));
        assert_eq!(
            text(&registry),
            "backend_ejections_total{service=\"api\",namespace=\"shop\",port=\"81\"} 1\n\
             backend_ejections_total{service=\"web\",namespace=\"shop\",port=\"80\"} 2\n\
             ejected_backends{service=\"web\",namespace=\"shop\",port=\"80\"} 1\n"
        );
        // The Service web is deleted: its series go.
        e.prune(|l| l.service != "web");
        assert_eq!(
            text(&registry),
            "backend_ejections_total{service=\"api\",namespace=\"shop\",port=\"81\"} 1\n"
        );
    }
}
