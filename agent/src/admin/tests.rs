//! Health, readiness and metrics negotiation, on a state built from the subsystems' views.
use std::{path::Path, sync::Arc};

use axum::{
    body::to_bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
};

use super::*;
use crate::{
    datapath::Pins,
    pipeline::{Status, Views},
    sync::{Failure, Reason, SyncError},
    telemetry::{Telemetry, TelemetryConfig},
};

fn state() -> AdminState {
    let mut root = Registry::default();
    let views = Views::default();
    let telemetry = Telemetry::new(
        TelemetryConfig::default(),
        crate::metrics::weft(&mut root),
        Arc::clone(&views.directory),
    );
    AdminState {
        info: Arc::new(std::sync::RwLock::new(AgentInfo {
            instance: "unit".into(),
            node_name: None,
            version: "0".into(),
            cgroup: "/sys/fs/cgroup/unit".into(),
            pins: "/sys/fs/bpf/weft/unit".into(),
            programs: Vec::new(),
        })),
        services: views.status,
        policy: views.policy,
        registry: Arc::new(root),
        pins: Pins::unchecked(Path::new("/sys/fs/bpf"), "unit"),
        telemetry: telemetry.view(),
        metrics_addr: None,
        store: views.store,
        source_health: None,
        telemetry_settings: serde_json::Value::Null,
        service_settings: Default::default(),
        mesh: Arc::default(),
    }
}

fn set_status(state: &AdminState, status: Status) {
    *state.services.write().expect("status") = status;
}

async fn body(response: Response) -> (StatusCode, String) {
    let status = response.status();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn not_ready_before_the_first_full_sync() {
    let state = state();
    let (code, text) = body(ready(State(state)).await).await;
    assert_eq!(
        (code, text.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "first sync not done")
    );
}

#[tokio::test]
async fn ready_once_the_first_sync_is_done() {
    let state = state();
    set_status(
        &state,
        Status {
            ready: true,
            ..Status::default()
        },
    );
    let (code, text) = body(ready(State(state)).await).await;
    assert_eq!((code, text.as_str()), (StatusCode::OK, "ready"));
}

#[test]
fn a_sync_error_makes_the_agent_unhealthy() {
    let state = state();
    set_status(
        &state,
        Status {
            ready: true,
            ..Status::default()
        },
    );
    assert!(status_doc(&state, serde_json::Value::Null).healthy);
    let failure = Failure {
        reason: Reason::MapFull,
        map: "SERVICES",
        message: "map SERVICES is full".into(),
    };
    set_status(
        &state,
        Status {
            ready: true,
            sync_errors: vec![SyncError {
                service: "shop/web".into(),
                frontend: "10.96.0.10:80/TCP".into(),
                failure,
            }],
            ..Status::default()
        },
    );
    let doc = status_doc(&state, serde_json::Value::Null);
    assert!(!doc.healthy);
    assert_eq!(doc.services["sync_errors"][0]["reason"], "map_full");
    assert_eq!(doc.services["sync_errors"][0]["map"], "SERVICES");
}

#[tokio::test]
async fn metrics_are_openmetrics_only_when_asked_for() {
    let state = state();
    let (_, text) = body(metrics(State(state.clone()), HeaderMap::new()).await).await;
    assert!(text.contains("# TYPE weft_build_info gauge"), "{text}");
    assert!(!text.contains("# EOF"));
    let mut accept = HeaderMap::new();
    accept.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/openmetrics-text;version=1.0.0"),
    );
    let response = metrics(State(state), accept).await;
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let (_, text) = body(response).await;
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn the_metrics_flag_takes_an_address_or_off() {
    assert_eq!(parse_metrics_addr("off"), Ok(MetricsAddr(None)));
    assert_eq!(
        parse_metrics_addr("127.0.0.1:9967"),
        Ok(MetricsAddr(Some("127.0.0.1:9967".parse().expect("addr"))))
    );
    assert!(parse_metrics_addr("9967").is_err());
    // `$(NODE_IP):9967` on an IPv6 node.
    assert_eq!(
        parse_metrics_addr("fd00::1:9967"),
        Ok(MetricsAddr(Some("[fd00::1]:9967".parse().expect("addr"))))
    );
    assert!(
        parse_metrics_addr("fd00::1").is_err(),
        "the last group is no port"
    );
}
