//! The admin API: HTTP on a unix socket, local only. The `weft` CLI is its client.
//!
//! - `GET /status`: the agent, its datapath, its source and the last sync (JSON)
//! - `GET /services`: every service frontend and its backends as the kernel maps hold them
//! - `GET /maps`: every BPF map of the instance with its entries and capacity
//! - `GET /policies`: policies, the local pods they select, and their kernel entries
//! - `GET /authz`: security policies, the local meshed workloads they select, their mTLS
//!   modes (`weft authz`).
//! - `GET /authz/check?from=NS/POD&to=NS/POD&port=80`: the destination's security policy's
//!   decision for a new TCP connection (`weft authz check`).
//! - `GET /policy/check?from=NS/POD&to=NS/POD&port=80&protocol=TCP`: the kernel's decision
//! - `GET /log-level`, `PUT /log-level` (body: a tracing filter): the agent's log filter
//! - `GET /connections`: open TCP connections with their counters as last reported
//! - `GET /flows?follow=true&last=N&namespace=..&pod=..&from_pod=..&to_pod=..&verdict=..&protocol=..`:
//!   flow records as JSON lines
//! - `GET /config/dump`: the desired state computed from the source (JSON)
//! - `GET /metrics`: Prometheus text format, or OpenMetrics when asked (also on `--metrics-addr`)
//! - `GET /healthz`, `GET /readyz`: liveness, and readiness (the first full sync is done)
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use aya::maps::{HashMap, MapData, MapError};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use weft_abi::{
    maps,
    svc::{BackendHealth, Endpoint, MemberKey, Outlier, ServiceKey, ServiceValue, SlotKey},
};

use weft_abi::net::words_ip;

use crate::{datapath::Pins, pipeline, sync::frontend_name};

pub mod access;
pub mod policy;
pub mod telemetry;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {path}", path = path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no weft agent answers on {path} (is it running, and is --instance right?)", path = path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("request to the agent failed")]
    Http(#[source] hyper::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("cannot read kernel map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot decode the agent's answer")]
    Decode(#[source] serde_json::Error),
    #[error("the {what} server failed")]
    Serve {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen for metrics on {addr} (--metrics-addr)")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the metrics token {path} (--metrics-token-file)", path = path.display())]
    MetricsToken {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the admin API stopped")]
    Stopped,
}

/// Where admin sockets live.
pub const RUN_DIR: &str = "/run/weft";

/// The default admin socket of an instance.
pub fn socket_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.sock"))
}

/// The admin API's flags.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// Admin API socket [default: <run-dir>/<instance>.sock].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Where Prometheus scrapes /metrics (`off`: only on the admin socket). 9967 clashes with
    /// neither Cilium (9962-9965), Istio (15000-15021) nor node-exporter (9100).
    #[arg(long, default_value = "0.0.0.0:9967", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// A group (name or number) whose members may use the admin socket besides root and the
    /// agent's own user (the socket becomes 0660 and owned by it; otherwise 0600).
    #[arg(long, value_parser = access::parse_group)]
    pub admin_group: Option<u32>,
    /// A file holding a bearer token that /metrics on --metrics-addr requires
    /// (`Authorization: Bearer <token>`, as Prometheus' `authorization` sends it). /healthz and
    /// /readyz stay open for the kubelet's probes.
    #[arg(long)]
    pub metrics_token_file: Option<PathBuf>,
}

impl Settings {
    /// The socket of `instance`: `--admin-socket`, or the default path.
    pub fn socket(&self, instance: &str) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| socket_path(Path::new(RUN_DIR), instance))
    }
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

pub fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    if let Ok(a) = s.parse() {
        return Ok(MetricsAddr(Some(a)));
    }
    // An IPv6 address without brackets, as `$(NODE_IP):9967` expands on an IPv6 node.
    let unbracketed = s
        .rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    unbracketed
        .map(|a| MetricsAddr(Some(a)))
        .ok_or_else(|| format!("{s:?}: not an address (use IP:PORT, e.g. 0.0.0.0:9967, or off)"))
}

/// The admin API and the metrics listener, serving until dropped or failed.
#[derive(Debug)]
pub struct Admin {
    admin: tokio::task::JoinHandle<Result<(), Error>>,
    metrics: Option<tokio::task::JoinHandle<Result<(), Error>>>,
    /// Where `/metrics` is served over TCP, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Removes the socket on every exit, error paths included.
    _socket: RemoveOnDrop,
}

impl Admin {
    /// Binds both listeners (before the agent reports ready: whoever waits for it can use the
    /// API at once) and serves them. Must run inside a tokio runtime.
    pub async fn spawn(
        settings: &Settings,
        socket: &Path,
        state: AdminState,
    ) -> Result<Self, Error> {
        let listener = bind(
            socket,
            access::Access {
                group: settings.admin_group,
            },
        )?;
        let guard = RemoveOnDrop(socket.to_owned());
        let token = match &settings.metrics_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let tcp = match settings.metrics_addr.0 {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::MetricsListen { addr, source })?,
            ),
            None => None,
        };
        let metrics_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let state = AdminState {
            metrics_addr,
            ..state
        };
        let metrics = tcp.map(|l| tokio::spawn(serve_metrics(l, state.clone(), token)));
        let admin = tokio::spawn(serve(listener, socket.to_owned(), state));
        Ok(Self {
            admin,
            metrics,
            metrics_addr,
            _socket: guard,
        })
    }

    /// Stops both servers and waits until their listeners are closed (and the socket file
    /// removed): another agent may bind the same addresses right after.
    pub async fn shutdown(mut self) {
        self.admin.abort();
        let _ = (&mut self.admin).await;
        if let Some(mut m) = self.metrics.take() {
            m.abort();
            let _ = (&mut m).await;
        }
    }

    /// Resolves when a server stops (they serve forever, so only on failure).
    pub async fn stopped(&mut self) -> Error {
        let result = match &mut self.metrics {
            Some(metrics) => tokio::select! {
                r = &mut self.admin => r,
                r = metrics => r,
            },
            None => (&mut self.admin).await,
        };
        match result {
            Ok(Err(e)) => e,
            _ => Error::Stopped,
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.admin.abort();
        if let Some(m) = &self.metrics {
            m.abort();
        }
    }
}

/// Removes a path when dropped.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Static facts about the running agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub instance: String,
    /// `--node-name`, when given.
    #[serde(default)]
    pub node_name: Option<String>,
    pub version: String,
    pub cgroup: PathBuf,
    pub pins: PathBuf,
    pub programs: Vec<ProgramInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramInfo {
    pub program: String,
    pub install: String,
    pub link_id: u32,
    pub program_id: u32,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    pub healthy: bool,
    pub agent: AgentInfo,
    pub services: serde_json::Value,
    /// Policy counts, problems and sync errors.
    #[serde(default)]
    pub policy: serde_json::Value,
    /// Open connections, flow records buffered, and where metrics are served.
    #[serde(default)]
    pub telemetry: serde_json::Value,
    /// Why the source is degraded (the API server fails); the datapath keeps its last state.
    #[serde(default)]
    pub degraded: Vec<String>,
    /// The kernel memory of weft's BPF maps: `bytes` in all, and `by_map`; `error` when they
    /// could not be read.
    #[serde(default)]
    pub maps: serde_json::Value,
    /// The mesh CA and how many identities hold a certificate (`weft certs` has them all).
    #[serde(default)]
    pub mesh: serde_json::Value,
}

/// One frontend as the kernel holds it (`GET /services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelService {
    pub service: String,
    pub port_name: String,
    pub frontend: String,
    pub revision: u32,
    pub affinity_timeout_s: u32,
    pub backends: Vec<String>,
    /// Failures in a row that eject a backend (0: no health checking).
    #[serde(default)]
    pub outlier_consecutive: u32,
    /// A connect with no answer after this long times out (0: the kernel's bound).
    #[serde(default)]
    pub connect_timeout_ms: u32,
    /// Backends the kernel's health checking has ejected, now.
    #[serde(default)]
    pub ejected: Vec<EjectedBackend>,
}

/// A backend ejected by the kernel's health checking (`GET /services`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectedBackend {
    pub backend: String,
    /// Until its ejection ends.
    pub remaining_ms: u64,
    /// Times ejected (less one per interval in service), which lengthens the next ejection.
    pub ejections: u32,
}

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The programs change once, when a fresh instance attaches after its first sync.
    pub info: Arc<std::sync::RwLock<AgentInfo>>,
    pub services: Arc<RwLock<pipeline::Status>>,
    pub policy: Arc<RwLock<pipeline::policy::PolicyStatus>>,
    pub registry: Arc<Registry>,
    pub pins: Pins,
    pub telemetry: crate::telemetry::TelemetryView,
    /// The TCP address `/metrics` is served on, if any (set by [`Admin::spawn`]).
    pub metrics_addr: Option<SocketAddr>,
    pub store: crate::pipeline::StoreHandle,
    /// The Kubernetes source's health (none in standalone mode).
    pub source_health: Option<Arc<crate::source::kube::Health>>,
    /// Telemetry settings, for `/config/dump`.
    pub telemetry_settings: serde_json::Value,
    /// What services compile with, for `/config/dump`.
    pub service_settings: crate::compile::ServiceSettings,
    /// The mesh's CA and certificates.
    pub mesh: Arc<RwLock<crate::mesh::MeshStatus>>,
}

/// Listens on `path`, for the peers `access` allows only (see [`access`]). A stale socket
/// file from an earlier agent is replaced (the instance lock guarantees no other agent owns
/// it). Must be called inside a tokio runtime.
pub fn bind(path: &Path, access: access::Access) -> Result<access::CheckedListener, Error> {
    let listen_err = |source| Error::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = access.bind(path).map_err(listen_err)?;
    Ok(access::CheckedListener {
        listener,
        access,
        // SAFETY: geteuid has no preconditions.
        own_uid: unsafe { libc::geteuid() },
    })
}

/// Serves the admin API until the future is dropped.
pub async fn serve(
    listener: access::CheckedListener,
    path: PathBuf,
    state: AdminState,
) -> Result<(), Error> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/services", get(kernel_services_handler))
        .route("/maps", get(maps_handler))
        .route("/log-level", get(get_log_level).put(put_log_level))
        .route("/policies", get(policy::policies_handler))
        .route("/policy/check", get(policy::check_handler))
        .route("/authz", get(policy::authz_handler))
        .route("/authz/check", get(policy::authz_check_handler))
        .route("/mesh/certs", get(mesh_certs))
        .route("/connections", get(telemetry::connections))
        .route("/flows", get(telemetry::flows))
        .route("/config/dump", get(telemetry::config_dump))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state);
    axum::serve(listener, app)
        .await
        .map_err(|source| Error::Listen { path, source })
}

/// What is served over TCP: metrics and the kubelet's probes.
fn public_routes() -> Router<AdminState> {
    probe_routes().route("/metrics", get(metrics))
}

fn probe_routes() -> Router<AdminState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_brief))
}

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
fn bearer_matches(headers: &axum::http::HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The metrics token: the file's content without surrounding whitespace; never empty.
fn read_token(path: &Path) -> Result<Arc<str>, Error> {
    let err = |source| Error::MetricsToken {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(err)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(Arc::from(token))
}

fn status_doc(state: &AdminState, maps: serde_json::Value) -> StatusDoc {
    // Before taking the locks below: it takes them itself.
    let degraded = degraded(state);
    let services = state.services.read().unwrap_or_else(|e| e.into_inner());
    let policy = state.policy.read().unwrap_or_else(|e| e.into_inner());
    StatusDoc {
        healthy: services.ready && degraded.is_empty(),
        degraded,
        agent: state.info.read().unwrap_or_else(|e| e.into_inner()).clone(),
        services: serde_json::to_value(&*services).unwrap_or_default(),
        policy: serde_json::json!({
            "policies": policy.policies.len(),
            "endpoints": policy.endpoints.len(),
            "identities": policy.identities,
            "ipcache_entries": policy.ipcache_entries,
            "policy_entries": policy.policy_entries,
            "problems": policy.problems,
            "sync_errors": policy.sync_errors.iter().map(|f| &f.message).collect::<Vec<_>>(),
            "over_capacity": policy.over_capacity,
        }),
        telemetry: serde_json::json!({
            "open_connections": state.telemetry.open_count(),
            "flow_records_buffered": state.telemetry.flows.len(),
            "metrics_addr": state.metrics_addr,
        }),
        maps,
        mesh: mesh_summary(&state.mesh.read().unwrap_or_else(|e| e.into_inner())),
    }
}

fn mesh_summary(mesh: &crate::mesh::MeshStatus) -> serde_json::Value {
    let held = mesh
        .identities
        .iter()
        .filter(|i| i.certificate.as_ref().is_some_and(|c| !c.expired))
        .count();
    serde_json::json!({
        "trust_domain": mesh.trust_domain,
        "ca": mesh.ca.as_ref().map(|c| &c.dir),
        "ca_loaded": mesh.ca.as_ref().is_some_and(|c| c.loaded),
        "roots": mesh.ca.as_ref().map_or(0, |c| c.roots.len()),
        "identities": mesh.identities.len(),
        "certificates": held,
        "pods": mesh.pods.len(),
        "pods_listening": mesh.pods.iter().filter(|p| !p.listeners.is_empty()).count(),
    })
}

/// `weft certs`: the mesh CA, the identities held and their certificates.
async fn mesh_certs(State(state): State<AdminState>) -> Json<crate::mesh::MeshStatus> {
    Json(state.mesh.read().unwrap_or_else(|e| e.into_inner()).clone())
}

async fn status(State(state): State<AdminState>) -> Json<StatusDoc> {
    let pins = state.pins.clone();
    let maps = match tokio::task::spawn_blocking(move || crate::datapath::map_memory(&pins)).await {
        Ok(Ok(list)) => serde_json::json!({
            "bytes": list.iter().map(|(_, b)| b).sum::<u64>(),
            "by_map": list.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }),
        Ok(Err(e)) => serde_json::json!({ "error": crate::chain(&e) }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    Json(status_doc(&state, maps))
}

/// Why the agent is not doing its whole job: the source fails, or part of the desired state
/// is not in the kernel (a map full, a write failed), or pods are isolated because weft could
/// not read or hold what concerns them.
fn degraded(state: &AdminState) -> Vec<String> {
    let mut out: Vec<String> = state
        .source_health
        .as_ref()
        .map(|h| h.degraded())
        .unwrap_or_default();
    let services = state.services.read().unwrap_or_else(|e| e.into_inner());
    out.extend(
        services
            .sync_errors
            .iter()
            .map(|e| format!("service sync: {}", e.failure.message)),
    );
    drop(services);
    let policy = state.policy.read().unwrap_or_else(|e| e.into_inner());
    out.extend(
        policy
            .sync_errors
            .iter()
            .map(|e| format!("policy sync: {}", e.message)),
    );
    if !policy.over_capacity.is_empty() {
        out.push(format!(
            "policies over --max-ipcache, isolating what they select: {}",
            policy.over_capacity.join(", ")
        ));
    }
    if !policy.unreachable.is_empty() {
        out.push(format!(
            "pods NOT enforced by their policies (isolated with --unbound-pods=isolate), their \
             cgroups deeper than the kernel looks: {}",
            policy.unreachable.join(", ")
        ));
    }
    if !policy.unreadable.is_empty() {
        out.push(format!(
            "policies weft cannot read, isolating what they select: {}",
            policy.unreadable.join(", ")
        ));
    }
    if !policy.contested.is_empty() {
        out.push(format!(
            "addresses this node's pods share with other pods, matching no selector until one \
             pod is left: {}",
            policy.contested.join(", ")
        ));
    }
    drop(policy);
    out.extend(
        state
            .mesh
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .degraded(),
    );
    let policy = state.policy.read().unwrap_or_else(|e| e.into_inner());
    let quarantined: Vec<String> = policy
        .endpoints
        .iter()
        .filter_map(|e| Some(format!("{} ({})", e.pod, e.quarantine?.as_str())))
        .collect();
    if !quarantined.is_empty() {
        out.push(format!(
            "pods isolated both ways by weft: {}",
            quarantined.join(", ")
        ));
    }
    out
}

/// Ready: the first full sync is done and the source is not failing. Liveness (`/healthz`)
/// stays ok while the API server is away: a restart would not bring it back, and the
/// datapath keeps its last state either way.
async fn ready(State(state): State<AdminState>) -> Response {
    readiness(&state, true)
}

/// `/readyz` over TCP: the same answer without the names of pods and policies (whoever
/// reaches the port may not see them; `weft status` has them).
async fn ready_brief(State(state): State<AdminState>) -> Response {
    readiness(&state, false)
}

fn readiness(state: &AdminState, detail: bool) -> Response {
    if !state
        .services
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .ready
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "first sync not done").into_response();
    }
    let degraded = degraded(state);
    let body = match (degraded.is_empty(), detail) {
        (true, _) => return (StatusCode::OK, "ready").into_response(),
        (false, true) => format!("degraded: {}", degraded.join("; ")),
        (false, false) => format!(
            "degraded: {} problem(s); see `weft status` on the node",
            degraded.len()
        ),
    };
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    telemetry::metrics(State(Arc::clone(&state.registry)), headers).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` (for the kubelet's probes) on a TCP listener
/// (`--metrics-addr`) until the future is dropped. Nothing else is exposed there. With a
/// token, `/metrics` answers only requests that carry it.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: AdminState,
    token: Option<Arc<str>>,
) -> Result<(), Error> {
    let routes = match token {
        None => public_routes(),
        Some(token) => probe_routes().route(
            "/metrics",
            get(
                move |state: State<AdminState>, headers: axum::http::HeaderMap| {
                    let token = Arc::clone(&token);
                    async move {
                        if bearer_matches(&headers, &token) {
                            metrics(state, headers).await
                        } else {
                            let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
                            (
                                StatusCode::UNAUTHORIZED,
                                challenge,
                                "a bearer token is required",
                            )
                                .into_response()
                        }
                    }
                },
            ),
        ),
    };
    axum::serve(listener, routes.with_state(state))
        .await
        .map_err(|source| Error::Serve {
            what: "metrics",
            source,
        })
}

async fn get_log_level() -> Response {
    match crate::logging::filter() {
        Some(f) => (StatusCode::OK, f).into_response(),
        None => (StatusCode::NOT_FOUND, "logging is not reloadable").into_response(),
    }
}

/// Replaces the log filter; answers with the previous one.
async fn put_log_level(body: String) -> Response {
    let filter = body.trim();
    match crate::logging::set_filter(filter) {
        Ok(previous) => {
            tracing::info!(previous, filter, "log filter changed");
            (StatusCode::OK, previous).into_response()
        }
        Err(e @ crate::logging::Error::Filter { .. }) => {
            (StatusCode::BAD_REQUEST, crate::chain(&e)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)).into_response(),
    }
}

async fn maps_handler(State(state): State<AdminState>) -> Response {
    // Counting walks every key with a syscall each: off the async threads.
    let pins = state.pins.clone();
    match tokio::task::spawn_blocking(move || crate::datapath::map_usage(&pins)).await {
        Ok(Ok(list)) => Json(list).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, crate::chain(&e)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn kernel_services_handler(State(state): State<AdminState>) -> Response {
    match kernel_services(&state) {
        Ok(list) => Json(list).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")).into_response(),
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pins: &Pins,
    map: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    crate::datapath::open_pinned(pins, map).map_err(|source| Error::Map { map, source })
}

/// Reads SERVICES, BACKEND_SLOTS and HEALTH through their pins (independent of the
/// syncer).
fn kernel_services(state: &AdminState) -> Result<Vec<KernelService>, Error> {
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        open_hash(&state.pins, maps::SERVICES)?;
    let slots: HashMap<MapData, SlotKey, Endpoint> = open_hash(&state.pins, maps::BACKEND_SLOTS)?;
    let health: HashMap<MapData, MemberKey, BackendHealth> = open_hash(&state.pins, maps::HEALTH)?;
    let outliers: HashMap<MapData, u32, Outlier> = open_hash(&state.pins, maps::OUTLIER)?;
    // The clock of the kernel's `bpf_ktime_get_ns`.
    let now = crate::events::udp::clock_ns(libc::CLOCK_MONOTONIC);
    let names = state
        .services
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .names
        .clone();
    let mut out = Vec::new();
    for entry in services.iter() {
        let (key, value) = entry.map_err(|source| Error::Map {
            map: maps::SERVICES,
            source,
        })?;
        // A value whose seal does not match is refused by the kernel: no backend serves it.
        if !value.is_sealed_for(&key) {
            tracing::warn!(frontend = ?key, "SERVICES holds a value whose seal does not match: connections to it are denied");
            continue;
        }
        let mut backends = Vec::new();
        let mut ejected = Vec::new();
        let outlier = outliers
            .get(&value.service_id, 0)
            .ok()
            .filter(|o| o.is_sealed_for(value.service_id))
            .unwrap_or_default();
        let consecutive = outlier.consecutive;
        for index in 0..value.count {
            let slot = SlotKey {
                revision: value.revision,
                index,
            };
            let b = slots.get(&slot, 0).map_err(|source| Error::Map {
                map: maps::BACKEND_SLOTS,
                source,
            })?;
            let ip = words_ip(b.family, b.addr);
            let name = SocketAddr::new(ip, u16::from_be(b.port)).to_string();
            let member = MemberKey {
                service_id: value.service_id,
                backend: b,
            };
            if consecutive != 0
                && let Ok(h) = health.get(&member, 0)
                && h.ejected_until_ns > now
            {
                ejected.push(EjectedBackend {
                    backend: name.clone(),
                    remaining_ms: (h.ejected_until_ns - now) / 1_000_000,
                    ejections: h.ejections,
                });
            }
            backends.push(name);
        }
        let name = names.get(&key);
        out.push(KernelService {
            service: name.map_or_else(|| "(unknown)".to_owned(), |n| n.service.clone()),
            port_name: name.map(|n| n.port_name.clone()).unwrap_or_default(),
            frontend: frontend_name(&key),
            revision: value.revision,
            affinity_timeout_s: value.affinity_timeout_s,
            backends,
            outlier_consecutive: consecutive,
            connect_timeout_ms: outlier.connect_timeout_ms,
            ejected,
        });
    }
    out.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    Ok(out)
}

/// `GET path` on the admin socket; returns the body of a 2xx answer.
pub async fn fetch(socket: &Path, path: &str) -> Result<Bytes, Error> {
    request(socket, hyper::Method::GET, path, String::new()).await
}

/// Sends one request on the admin socket; returns the response and the connection's driver
/// (abort it when done).
async fn send(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: String,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ),
    Error,
> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Error::Http)?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "weft")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::Status {
            status: 0,
            body: e.to_string(),
        })?;
    let response = sender.send_request(request).await.map_err(Error::Http)?;
    Ok((response, driver))
}

/// Reads a whole body; a non-2xx answer becomes `Error::Status` with its text.
async fn whole_body(response: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, Error> {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(Error::Http)?
        .to_bytes();
    if !status.is_success() {
        return Err(Error::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}

/// `method path` with `body` on the admin socket; returns the body of a 2xx answer.
pub async fn request(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: String,
) -> Result<Bytes, Error> {
    let (response, driver) = send(socket, method, path, body).await?;
    let result = whole_body(response).await;
    driver.abort();
    result
}

/// `GET path`, handing each piece of the body to `on_data` as it arrives (for streams); stops
/// when the body ends or `on_data` returns false.
pub async fn stream(
    socket: &Path,
    path: &str,
    mut on_data: impl FnMut(&[u8]) -> bool,
) -> Result<(), Error> {
    let (response, driver) = send(socket, hyper::Method::GET, path, String::new()).await?;
    if !response.status().is_success() {
        let result = whole_body(response).await;
        driver.abort();
        return result.map(|_| ());
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Error::Http)?;
        if let Some(data) = frame.data_ref()
            && !on_data(data)
        {
            break;
        }
    }
    driver.abort();
    Ok(())
}

/// `GET path` and decode JSON.
pub async fn get_json<T: for<'de> Deserialize<'de>>(socket: &Path, path: &str) -> Result<T, Error> {
    let body = fetch(socket, path).await?;
    serde_json::from_slice(&body).map_err(Error::Decode)
}

#[cfg(test)]
mod tests;
