//! Metrics of the Kubernetes source.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::store::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// The kind: `Pod`, `Service`, ...
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub resource: &'static str,
    /// `list_failed`, `watch_start_failed`, `watch_failed`, `expired` (410 Gone: a relist
    /// follows), `watch_error` or `no_resource_version`.
    pub reason: &'static str,
}

/// Registered once per agent; clones share the series.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    errors: Family<WatchErrorLabels, Counter>,
    up: Family<ResourceLabels, Gauge>,
}

impl KubeMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "weft_kubernetes_watch_errors",
            "Failed list or watch requests to the Kubernetes API server, by kind and reason",
            m.errors.clone(),
        );
        registry.register(
            "weft_kubernetes_watch_up",
            "1 when the kind has been listed and its last request to the API server succeeded",
            m.up.clone(),
        );
        m
    }

    pub fn error(&self, kind: Kind, reason: &'static str) {
        self.errors
            .get_or_create(&WatchErrorLabels {
                resource: kind.as_str(),
                reason,
            })
            .inc();
    }

    pub fn set_up(&self, kind: Kind, up: bool) {
        self.up
            .get_or_create(&ResourceLabels {
                resource: kind.as_str(),
            })
            .set(i64::from(up));
    }
}

/// The metric label of a watcher error.
pub fn reason(e: &kube::runtime::watcher::Error) -> &'static str {
    use kube::runtime::watcher::Error as E;
    let gone = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 410);
    match e {
        E::WatchError(s) if s.code == 410 => "expired",
        E::InitialListFailed(e) | E::WatchStartFailed(e) | E::WatchFailed(e) if gone(e) => {
            "expired"
        }
        E::InitialListFailed(_) => "list_failed",
        E::WatchStartFailed(_) => "watch_start_failed",
        E::WatchFailed(_) => "watch_failed",
        E::WatchError(_) => "watch_error",
        E::NoResourceVersion => "no_resource_version",
    }
}
