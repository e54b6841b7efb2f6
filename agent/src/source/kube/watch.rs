//! One reflector task per kind, and what they tell the rest of the agent: [`Health`].
//!
//! - The task applies watcher events to its reflector's writer itself (rather than through
//!   `.reflect()`), so that it can start the watcher over: kube-runtime retries a watch that
//!   the server refuses with HTTP 410 from the same resourceVersion forever.
//! - Health is decided by the HTTP responses themselves ([`Observe`], a layer of the
//!   client): a request of a kind that gets a 2xx answer means the server serves that kind.
//!   A watch resumed after an outage yields no event, so events alone cannot tell.
//! - Retries back off from 0.8 s to 30 s ([`WatchBackoff`]) and start over only after such
//!   a success. kube-runtime's own backoff is reset by the `Init` it yields before every
//!   list attempt, so a failing list would be retried every 0.8 s forever.
use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures_util::{StreamExt as _, future::BoxFuture};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store as Reader, store::Writer},
        utils::Backoff,
        watcher,
    },
};
use serde::de::DeserializeOwned;

use super::metrics::{self, KubeMetrics};
use crate::store::Kind;

/// Every kind the source always reads, with its collection path below `/api` or `/apis`
/// (Istio's security kinds are read when the server serves them: `super::security`).
pub const KINDS: [(Kind, &str); 5] = [
    (Kind::Namespace, "/api/v1/namespaces"),
    (Kind::Pod, "/api/v1/pods"),
    (Kind::Service, "/api/v1/services"),
    (
        Kind::EndpointSlice,
        "/apis/discovery.k8s.io/v1/endpointslices",
    ),
    (
        Kind::NetworkPolicy,
        "/apis/networking.k8s.io/v1/networkpolicies",
    ),
];

/// An API group of Istio's, read only when the server serves it (`super::istio` looks):
/// its versions (preferred first, one schema), and its kinds with their resource names.
#[derive(Debug, Clone, Copy)]
pub struct OptionalGroup {
    pub group: &'static str,
    pub versions: &'static [&'static str],
    pub kinds: &'static [(Kind, &'static str)],
    /// Discovery has answered only once this group's answer came (policy: a pass without
    /// it could lift what a cluster enforces); other groups' failures are retried later.
    pub required: bool,
}

/// Istio's security API and its DestinationRules.
pub const OPTIONAL: [OptionalGroup; 2] = [
    OptionalGroup {
        group: "security.istio.io",
        versions: &["v1", "v1beta1"],
        kinds: &[
            (Kind::PeerAuthentication, "peerauthentications"),
            (Kind::AuthorizationPolicy, "authorizationpolicies"),
        ],
        required: true,
    },
    OptionalGroup {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1", "v1alpha3"],
        kinds: &[(Kind::DestinationRule, "destinationrules")],
        required: false,
    },
];

/// Every optional kind, with its group.
pub fn optional_kinds() -> impl Iterator<Item = (&'static OptionalGroup, Kind, &'static str)> {
    OPTIONAL.iter().flat_map(|g| {
        g.kinds
            .iter()
            .map(move |(kind, plural)| (g, *kind, *plural))
    })
}

/// What one kind's watch has reached.
#[derive(Debug, Clone, Default)]
struct KindState {
    /// The first complete list is in the reflector.
    listed: bool,
    /// The last failure, while no request for this kind has succeeded since.
    failing: Option<(SystemTime, String)>,
    /// A request succeeded since the backoff last looked: the next delay starts over.
    progress: bool,
    /// The source is listed without waiting for this kind (DestinationRule: its absence
    /// only leaves Services without health checking for a while).
    optional: bool,
}

/// What discovery of the kinds that may not be served (`super::security`) has reached.
#[derive(Debug, Clone, Default)]
struct Discovery {
    /// It has answered once: the kinds it found are in [`Health::kinds`].
    answered: bool,
    /// The last failure, while it has not answered since.
    failing: Option<(SystemTime, String)>,
}

/// State shared between the watch tasks, the client, the pipeline and the admin API.
#[derive(Debug, Default)]
pub struct Health {
    kinds: Mutex<BTreeMap<Kind, KindState>>,
    discovery: Mutex<Discovery>,
    /// Every kind expected then was listed once: a kind discovery finds later does not
    /// hold passes back (the store says it is not listed, see [`Health::unlisted`]).
    once_listed: std::sync::atomic::AtomicBool,
    /// Bumped on every change a reflector applied.
    generation: AtomicU64,
    changed: tokio::sync::Notify,
    metrics: KubeMetrics,
}

impl Health {
    pub fn new(metrics: KubeMetrics) -> Self {
        let health = Self {
            metrics,
            ..Self::default()
        };
        for (kind, _) in KINDS {
            health.state(|k| k.insert(kind, KindState::default()));
            health.metrics.set_up(kind, false);
        }
        health
    }

    fn state<R>(&self, f: impl FnOnce(&mut BTreeMap<Kind, KindState>) -> R) -> R {
        f(&mut self.kinds.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn discovery<R>(&self, f: impl FnOnce(&mut Discovery) -> R) -> R {
        f(&mut self.discovery.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every kind has been listed once, the ones discovery found included; or that held
    /// once (a kind found later is compiled as unknown until listed: [`Health::unlisted`]).
    pub fn listed(&self) -> bool {
        if self.once_listed.load(Ordering::Acquire) {
            return true;
        }
        let all = self.discovery(|d| d.answered)
            && self.state(|k| {
                KINDS.iter().all(|(kind, _)| k.contains_key(kind))
                    && k.values().all(|s| s.listed || s.optional)
            });
        if all {
            self.once_listed.store(true, Ordering::Release);
        }
        all
    }

    /// The kinds expected and not listed yet.
    pub fn unlisted(&self) -> std::collections::BTreeSet<Kind> {
        self.state(|k| {
            k.iter()
                .filter(|(_, s)| !s.listed)
                .map(|(kind, _)| *kind)
                .collect()
        })
    }

    /// Discovery found `kind`: it must be listed before the source is, unless it does not
    /// gate (a DestinationRule: its reflector failing, e.g. for want of RBAC, must not keep
    /// the agent from being ready; it is reported degraded).
    pub(super) fn expect(&self, kind: Kind) {
        let new = self.state(|k| {
            let new = !k.contains_key(&kind);
            k.entry(kind).or_default().optional = kind == Kind::DestinationRule;
            new
        });
        if new {
            self.metrics.set_up(kind, false);
        }
    }

    /// Discovery answered; the kinds it found are expected.
    pub(super) fn discovered(&self, found: &[Kind]) {
        let (first, was) =
            self.discovery(|d| (!std::mem::replace(&mut d.answered, true), d.failing.take()));
        if first {
            // The source may be listed now: a pass must not wait for the next change.
            self.bump();
        }
        if let Some((since, _)) = was {
            tracing::info!(
                target: "weft::source",
                after_s = since.elapsed().unwrap_or_default().as_secs(),
                found = ?found,
                "API discovery answers again"
            );
        }
    }

    /// Discovery failed: until it answers, the source is not listed.
    pub(super) fn discovery_failed(&self, e: &kube::Error) {
        let first = self.discovery(|d| {
            let first = d.failing.is_none();
            let since = d.failing.as_ref().map_or_else(SystemTime::now, |f| f.0);
            d.failing = Some((since, e.to_string()));
            first
        });
        if first {
            tracing::warn!(target: "weft::source", error = %crate::chain(e), "API discovery of Istio's groups failed; retrying");
        }
    }

    /// Why the source is degraded: one line per kind whose requests fail, and one when
    /// discovery fails. Empty: healthy.
    pub fn degraded(&self) -> Vec<String> {
        let discovery = self.discovery(|d| d.failing.clone()).map(|(since, error)| {
            let ago = since.elapsed().unwrap_or_default().as_secs();
            format!(
                "discovery of Istio's API groups: the API server has failed for {ago} s ({error})"
            )
        });
        let kinds = self.state(|kinds| {
            kinds
                .iter()
                .filter_map(|(kind, s)| {
                    let (since, error) = s.failing.as_ref()?;
                    let ago = since.elapsed().unwrap_or_default().as_secs();
                    Some(format!(
                        "{kind}: the API server has failed for {ago} s ({error}); the datapath \
                         keeps its last state"
                    ))
                })
                .collect::<Vec<_>>()
        });
        kinds.into_iter().chain(discovery).collect()
    }

    /// Resolves when a reflector applied a change since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    #[cfg(test)]
    pub(super) fn set_listed(&self, kind: Kind) {
        self.state(|k| k.entry(kind).or_default().listed = true);
    }

    fn done_listing(&self, kind: Kind) {
        let up = self.state(|k| {
            let s = k.entry(kind).or_default();
            s.listed = true;
            s.failing.is_none()
        });
        self.metrics.set_up(kind, up);
        tracing::info!(target: "weft::source", kind = %kind, "listed");
        self.bump();
    }

    /// A request of `kind` got a 2xx answer.
    fn succeeded(&self, kind: Kind) {
        let (was, listed) = self.state(|k| {
            let s = k.entry(kind).or_default();
            s.progress = true;
            (s.failing.take(), s.listed)
        });
        if let Some((since, _)) = was {
            self.metrics.set_up(kind, listed);
            tracing::info!(
                target: "weft::source",
                kind = %kind,
                after_s = since.elapsed().unwrap_or_default().as_secs(),
                "Kubernetes API serves it again"
            );
        }
    }

    /// A watcher error of `kind`: the reflector keeps its objects (fail-static).
    fn failed(&self, kind: Kind, e: &watcher::Error) {
        let reason = metrics::reason(e);
        self.metrics.error(kind, reason);
        if reason == metrics::Reason::Expired {
            // Normal: the API server compacted past our version; a relist follows at once.
            tracing::info!(target: "weft::source", kind = %kind, "resourceVersion expired (410 Gone); relisting");
            return;
        }
        self.metrics.set_up(kind, false);
        let first = self.state(|k| {
            let s = k.entry(kind).or_default();
            let first = s.failing.is_none();
            let since = s.failing.as_ref().map_or_else(SystemTime::now, |f| f.0);
            s.failing = Some((since, e.to_string()));
            first
        });
        if first {
            tracing::warn!(target: "weft::source", kind = %kind, error = %crate::chain(e), "Kubernetes API request failed; keeping the last state and retrying with backoff");
        } else {
            tracing::debug!(target: "weft::source", kind = %kind, error = %crate::chain(e), "Kubernetes API request failed again");
        }
    }

    fn take_progress(&self, kind: Kind) -> bool {
        self.state(|k| std::mem::take(&mut k.entry(kind).or_default().progress))
    }
}

/// The kind a request path is for (`/api/v1/pods?watch=true...`).
fn kind_of(path: &str) -> Option<Kind> {
    KINDS
        .iter()
        .find(|(_, p)| path == *p)
        .map(|(kind, _)| *kind)
        .or_else(|| optional_kind_of(path))
}

/// The optional kind whose collection `path` is, at any version of its group.
fn optional_kind_of(path: &str) -> Option<Kind> {
    let rest = path.strip_prefix("/apis/")?;
    let (group, rest) = rest.split_once('/')?;
    let (version, plural) = rest.split_once('/')?;
    optional_kinds()
        .find(|(g, _, p)| g.group == group && g.versions.contains(&version) && *p == plural)
        .map(|(_, kind, _)| kind)
}

/// A client layer that tells [`Health`] which kinds the server answers with success.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    health: Arc<Health>,
}

impl<S> Observe<S> {
    pub fn layer(health: Arc<Health>) -> impl tower::Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(move |inner| Self {
            inner,
            health: Arc::clone(&health),
        })
    }
}

impl<S, B> tower::Service<http::Request<kube::client::Body>> for Observe<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let kind = kind_of(request.uri().path());
        let health = Arc::clone(&self.health);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            if let (Some(kind), Ok(r)) = (kind, &response)
                && r.status().is_success()
            {
                health.succeeded(kind);
            }
            response
        })
    }
}

/// The watcher's retry delays: 0.8 s doubling to 30 s, with jitter; they start over only
/// once a request of the kind has succeeded.
#[derive(Debug)]
struct WatchBackoff {
    kind: Kind,
    health: Arc<Health>,
    attempt: u32,
}

pub(super) const BACKOFF_FIRST: Duration = Duration::from_millis(800);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.health.take_progress(self.kind) {
            self.attempt = 0;
        }
        let base = BACKOFF_FIRST
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter (50% to 100% of the delay) from the clock: agents of a whole cluster that
        // lost the API server together must not come back in step.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Some(base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0))
    }
}

impl Backoff for WatchBackoff {
    /// Called by kube-runtime on every item, the `Init` before each list attempt included:
    /// progress is decided by [`Health::succeeded`] instead.
    fn reset(&mut self) {}
}

/// Starts the watch of one kind and returns its reader.
pub fn spawn<K>(
    client: &Client,
    kind: Kind,
    health: &Arc<Health>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Reader<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    tasks.push(tokio::spawn(watch(api, writer, kind, Arc::clone(health))));
    reader
}

/// Runs one kind's reflector until the source is dropped.
pub async fn watch<K>(api: Api<K>, mut writer: Writer<K>, kind: Kind, health: Arc<Health>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let start = || {
        watcher(api.clone(), watcher::Config::default())
            .backoff(WatchBackoff {
                kind,
                health: Arc::clone(&health),
                attempt: 0,
            })
            // managedFields are most of an object's size and weft never reads them.
            .modify(|o: &mut K| o.managed_fields_mut().clear())
            .boxed()
    };
    let mut stream = start();
    loop {
        let Some(item) = stream.next().await else {
            // The watcher never ends on its own; start it over rather than go stale.
            tracing::error!(target: "weft::source", kind = %kind, "watch stream ended; restarting it");
            stream = start();
            continue;
        };
        match item {
            Ok(event) => {
                // The writer buffers a relist and swaps it in at InitDone, so a pass never
                // sees half a list.
                writer.apply_watcher_event(&event);
                match event {
                    watcher::Event::InitDone => health.done_listing(kind),
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => health.bump(),
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
            Err(e) => {
                health.failed(kind, &e);
                if let watcher::Error::WatchStartFailed(kube::Error::Api(s)) = &e
                    && s.code == 410
                {
                    // Refused with HTTP 410 (a proxy, or an older server): kube-runtime would
                    // retry the same version forever. List again instead.
                    stream = start();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Box<kube::core::Status> {
        Box::new(kube::core::Status {
            code,
            ..kube::core::Status::default()
        })
    }

    #[test]
    fn retries_back_off_to_30_s_and_start_over_only_after_a_success() {
        let health = Arc::new(Health::new(KubeMetrics::default()));
        let mut b = WatchBackoff {
            kind: Kind::Pod,
            health: Arc::clone(&health),
            attempt: 0,
        };
        for i in 0..10 {
            let base = BACKOFF_FIRST.saturating_mul(1 << i).min(BACKOFF_MAX);
            // kube-runtime resets on every item, the Init before each list included.
            b.reset();
            let d = b.next().expect("never gives up");
            assert!(d >= base / 2 && d <= base, "attempt {i}: {d:?} vs {base:?}");
        }
        assert!(b.next().expect("delay") >= BACKOFF_MAX / 2);
        health.succeeded(Kind::Pod);
        assert!(
            b.next().expect("delay") <= BACKOFF_FIRST,
            "a success starts over"
        );
    }

    #[test]
    fn failures_degrade_until_the_kind_is_served_again_and_410_is_no_failure() {
        let health = Health::new(KubeMetrics::default());
        health.failed(Kind::Pod, &watcher::Error::WatchError(status(410)));
        assert!(
            health.degraded().is_empty(),
            "an expired version only relists"
        );
        health.failed(Kind::Pod, &watcher::Error::WatchError(status(500)));
        health.failed(Kind::Pod, &watcher::Error::WatchError(status(503)));
        let degraded = health.degraded();
        assert_eq!(degraded.len(), 1, "{degraded:?}");
        assert!(
            degraded[0].starts_with("Pod: the API server has failed for "),
            "{degraded:?}"
        );
        health.succeeded(Kind::Service);
        assert_eq!(
            health.degraded().len(),
            1,
            "another kind's success says nothing"
        );
        health.succeeded(Kind::Pod);
        assert!(health.degraded().is_empty());
    }

    #[test]
    fn request_paths_name_their_kind() {
        assert_eq!(kind_of("/api/v1/pods"), Some(Kind::Pod));
        assert_eq!(
            kind_of("/apis/networking.k8s.io/v1/networkpolicies"),
            Some(Kind::NetworkPolicy)
        );
        assert_eq!(
            kind_of("/apis/security.istio.io/v1beta1/authorizationpolicies"),
            Some(Kind::AuthorizationPolicy)
        );
        assert_eq!(
            kind_of("/apis/security.istio.io/v2/authorizationpolicies"),
            None
        );
        assert_eq!(
            kind_of("/apis/networking.istio.io/v1alpha3/destinationrules"),
            Some(Kind::DestinationRule)
        );
        assert_eq!(kind_of("/apis/security.istio.io/v1/destinationrules"), None);
        assert_eq!(kind_of("/api/v1/namespaces/default/pods"), None);
        assert_eq!(kind_of("/version"), None);
    }
}
