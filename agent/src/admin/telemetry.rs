//! Admin API routes of telemetry: open connections, the flow stream, the desired-state dump,
//! and `/metrics` with content negotiation (also served on `--metrics-addr`).
use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::stream;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use super::AdminState;
use weft_abi::net::words_ip;

use crate::{
    compile::{self, names::workload_name},
    metrics::{Format, render},
    sync::frontend_name,
    telemetry::{
        OpenConnection,
        flows::{Filter, FlowRecord, Lost},
    },
};

/// `GET /flows` parameters besides the filter (which is read from the same query string).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamQuery {
    /// Buffered records to send first (the last N matching); none: all buffered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
    /// Keep the stream open and send records as they come.
    #[serde(default)]
    pub follow: bool,
}

/// `GET /metrics`: OpenMetrics when the scraper asks for it, else the Prometheus text format.
pub async fn metrics(State(registry): State<Arc<Registry>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    let body = render(&registry, format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

pub async fn connections(State(state): State<AdminState>) -> Json<Vec<OpenConnection>> {
    Json(state.telemetry.connections())
}

/// Streams flow records as JSON lines. A follower that falls behind gets `{"lost": N}` lines;
/// the agent never waits for it.
pub async fn flows(
    State(state): State<AdminState>,
    Query(filter): Query<Filter>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let flows = Arc::clone(&state.telemetry.flows);
    // Subscribe before reading the buffer: nothing published in between is missed (a record
    // in both is sent once, by sequence number).
    let live = q.follow.then(|| flows.subscribe());
    let backlog = flows.recent(&filter, q.last);
    let last_seq = backlog.last().map_or(0, |r| r.seq);
    let mut lines: Vec<Result<String, std::io::Error>> =
        backlog.iter().map(|r| Ok(json_line(r))).collect();
    if live.is_none() {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::from(
                lines.into_iter().filter_map(Result::ok).collect::<String>(),
            ))
            .unwrap_or_else(|e| {
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            });
    }
    let head = stream::iter(std::mem::take(&mut lines));
    let tail = stream::unfold(live, move |rx| {
        let filter = filter.clone();
        let flows = Arc::clone(&flows);
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(r) if r.seq > last_seq && filter.matches(&r) => {
                        return Some((Ok(json_line(&r)), Some(rx)));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        flows.count_lost(n);
                        let line = serde_json::to_string(&Lost { lost: n }).unwrap_or_default();
                        return Some((Ok(line + "\n"), Some(rx)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    let body = Body::from_stream(futures_util::StreamExt::chain(head, tail));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

fn json_line(r: &FlowRecord) -> String {
    let mut s = serde_json::to_string(r).unwrap_or_default();
    s.push('\n');
    s
}

/// One service frontend in the dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpFrontend {
    pub service: String,
    pub port_name: String,
    pub frontend: String,
    pub backends: Vec<String>,
    pub affinity_timeout_s: u32,
}

/// One pod as telemetry names it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpWorkload {
    pub pod: String,
    pub workload: String,
    pub ips: Vec<std::net::IpAddr>,
}

/// `GET /config/dump`: the desired state the agent computed from its source, sorted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigDump {
    pub objects: BTreeMap<String, usize>,
    pub services: Vec<DumpFrontend>,
    pub service_problems: Vec<String>,
    pub policies: serde_json::Value,
    pub policy_endpoints: serde_json::Value,
    pub workloads: Vec<DumpWorkload>,
    pub telemetry: serde_json::Value,
}

pub async fn config_dump(State(state): State<AdminState>) -> Response {
    let store = Arc::clone(&state.store.read().unwrap_or_else(|e| e.into_inner()));
    let (policies, endpoints) = {
        let policy = state.policy.read().unwrap_or_else(|e| e.into_inner());
        (
            serde_json::to_value(&policy.policies).unwrap_or_default(),
            serde_json::to_value(&policy.endpoints).unwrap_or_default(),
        )
    };
    let telemetry = state.telemetry_settings.clone();
    let service_settings = state.service_settings.clone();
    // Compiling 10 000 services takes tens of milliseconds: off the async threads.
    let dump = tokio::task::spawn_blocking(move || {
        let desired = compile::services(&store, &service_settings);
        let services = desired
            .frontends
            .iter()
            .map(|(key, f)| DumpFrontend {
                service: f.service.clone(),
                port_name: f.port_name.clone(),
                frontend: frontend_name(key),
                backends: f
                    .backends
                    .iter()
                    .map(|b| {
                        std::net::SocketAddr::new(words_ip(b.family, b.addr), u16::from_be(b.port))
                            .to_string()
                    })
                    .collect(),
                affinity_timeout_s: f.affinity_timeout_s,
            })
            .collect();
        let workloads = store
            .pods
            .iter()
            .map(|((ns, name), pod)| DumpWorkload {
                pod: format!("{ns}/{name}"),
                workload: format!("{ns}/{}", workload_name(name, pod)),
                ips: compile::pod_ips(pod),
            })
            .collect();
        ConfigDump {
            objects: store
                .counts()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            services,
            service_problems: desired
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.service, p.message))
                .collect(),
            policies,
            policy_endpoints: endpoints,
            workloads,
            telemetry,
        }
    })
    .await;
    match dump {
        Ok(d) => Json(d).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
