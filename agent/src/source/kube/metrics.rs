//! Metrics of the Kubernetes source.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{metrics::label_value, store::Kind};

/// Why a request of a reflector failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reason {
    ListFailed,
    WatchStartFailed,
    WatchFailed,
    /// 410 Gone: the API server compacted past the watch's version; a relist follows.
    Expired,
    /// An error event in a watch stream.
    WatchError,
    NoResourceVersion,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ListFailed => "list_failed",
            Self::WatchStartFailed => "watch_start_failed",
            Self::WatchFailed => "watch_failed",
            Self::Expired => "expired",
            Self::WatchError => "watch_error",
            Self::NoResourceVersion => "no_resource_version",
        }
    }
}

label_value!(Reason, Kind);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// The kind: `Pod`, `Service`, ...
    pub resource: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchErrorLabels {
    pub resource: Kind,
    pub reason: Reason,
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
            "kubernetes_watch_errors",
            "Failed list or watch requests to the Kubernetes API server, by kind and reason",
            m.errors.clone(),
        );
        registry.register(
            "kubernetes_watch_up",
            "1 when the kind has been listed and its last request to the API server succeeded",
            m.up.clone(),
        );
        m
    }

    pub fn error(&self, kind: Kind, reason: Reason) {
        self.errors
            .get_or_create(&WatchErrorLabels {
                resource: kind,
                reason,
            })
            .inc();
    }

    pub fn set_up(&self, kind: Kind, up: bool) {
        self.up
            .get_or_create(&ResourceLabels { resource: kind })
            .set(i64::from(up));
    }
}

/// Why a watcher failed, from its error's type.
pub fn reason(e: &kube::runtime::watcher::Error) -> Reason {
    use kube::runtime::watcher::Error as E;
    let gone = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 410);
    match e {
        E::WatchError(s) if s.code == 410 => Reason::Expired,
        E::InitialListFailed(e) | E::WatchStartFailed(e) | E::WatchFailed(e) if gone(e) => {
            Reason::Expired
        }
        E::InitialListFailed(_) => Reason::ListFailed,
        E::WatchStartFailed(_) => Reason::WatchStartFailed,
        E::WatchFailed(_) => Reason::WatchFailed,
        E::WatchError(_) => Reason::WatchError,
        E::NoResourceVersion => Reason::NoResourceVersion,
    }
}
