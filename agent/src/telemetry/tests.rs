//! Telemetry on synthetic events: exact metric values and flow records, no kernel.
use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus_client::registry::Registry;
use weft_abi::{conn::DropReason, net::Direction};

use super::*;
use crate::{
    compile::names::{Directory, NameConfig},
    events::{ConnEventKindName, Connection, DropInfo, Outcome, Role},
    metrics::{Format, render},
    source::yaml,
    store,
};

/// Two pods, `client` (10.0.0.1, app c) and `server` (10.0.0.2, app s), in namespace `ns`.
pub(super) fn directory() -> Arc<Directory> {
    let docs = [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: ns, labels: {app: c}}\nstatus: {podIP: 10.0.0.1}",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: ns, labels: {app: s}}\nstatus: {podIP: 10.0.0.2}",
    ];
    let objects: std::collections::BTreeMap<_, _> = docs
        .iter()
        .map(|d| store::decode(yaml::parse(d).expect("yaml")).expect("valid"))
        .collect();
    let st = store::Store::from_objects(&objects);
    Arc::new(Directory::build(
        &st,
        &std::collections::BTreeMap::new(),
        &NameConfig::default(),
    ))
}

/// Telemetry registered under the `weft` prefix, as the agent registers it.
pub(super) struct Fixture {
    pub root: Registry,
    pub telemetry: Telemetry,
    pub names: DirectoryHandle,
}

pub(super) fn fixture(config: TelemetryConfig) -> Fixture {
    let mut root = Registry::default();
    let names: DirectoryHandle = Arc::new(RwLock::new(directory()));
    let telemetry = Telemetry::new(config, crate::metrics::weft(&mut root), Arc::clone(&names));
    Fixture {
        root,
        telemetry,
        names,
    }
}

impl Fixture {
    /// The sum of the samples of `name` whose labels contain every one of `labels`.
    pub fn sample(&self, name: &str, labels: &[&str]) -> f64 {
        render(&self.root, Format::Text)
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Every sample line of `name`.
    pub fn lines(&self, name: &str) -> Vec<String> {
        render(&self.root, Format::Text)
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(str::to_owned)
            .collect()
    }
}

fn event(kind: ConnEventKindName, sent: u64, received: u64) -> Connection {
    let client: SocketAddr = "10.0.0.1:40000".parse().expect("addr");
    let server: SocketAddr = "10.0.0.2:80".parse().expect("addr");
    Connection {
        event: kind,
        cookie: 7,
        role: Role::Client,
        local: client,
        remote: server,
        bytes_sent: sent,
        bytes_received: received,
        srtt: Duration::from_micros(100),
        rtt_min: Duration::from_micros(50),
        retransmits: 0,
        segments_in: 0,
        segments_out: 0,
        duration: Duration::from_millis(1),
        outcome: (kind == ConnEventKindName::TcpClose).then_some(Outcome::Normal),
        service: None,
        dropped: None,
        meshed: false,
        mesh_netns: 0,
        delivered: false,
        security: None,
        authorization: None,
    }
}

const SOURCE: &str = "reporter=\"source\"";

#[test]
fn cumulative_counters_become_exact_increases_despite_duplicates_and_reordering() {
    let mut f = fixture(TelemetryConfig::default());
    let t = &mut f.telemetry;
    t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    t.on_event(&event(ConnEventKindName::TcpUpdate, 1000, 10));
    // A duplicate and a late, older update add nothing.
    t.on_event(&event(ConnEventKindName::TcpUpdate, 1000, 10));
    t.on_event(&event(ConnEventKindName::TcpUpdate, 500, 5));
    assert_eq!(t.view().connections().len(), 1);
    t.on_event(&event(ConnEventKindName::TcpClose, 5000, 20));
    assert!(t.view().connections().is_empty());
    // The client's sent bytes are the request: Istio's received.
    assert_eq!(f.sample("weft_tcp_received_bytes_total", &[SOURCE]), 5000.0);
    assert_eq!(f.sample("weft_tcp_sent_bytes_total", &[SOURCE]), 20.0);
    assert_eq!(
        f.sample("weft_tcp_connections_opened_total", &[SOURCE]),
        1.0
    );
    assert_eq!(
        f.sample("weft_tcp_connections_closed_total", &[SOURCE]),
        1.0
    );
}

#[test]
fn series_name_both_workloads_in_istio_labels() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    let lines = f.lines("weft_tcp_connections_opened_total");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("source_workload=\"client\"")
            && lines[0].contains("destination_workload=\"server\"")
            && lines[0].contains("source_app=\"c\"")
            && lines[0].contains("destination_service=\"unknown\""),
        "{lines:?}"
    );
}

#[test]
fn open_and_close_are_flow_records_with_their_bytes() {
    let mut f = fixture(TelemetryConfig::default());
    let t = &mut f.telemetry;
    t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    t.on_event(&event(ConnEventKindName::TcpClose, 5000, 20));
    let records = t.view().flows.recent(&flows::Filter::default(), None);
    let events: Vec<FlowEvent> = records.iter().map(|r| r.event).collect();
    assert_eq!(events, [FlowEvent::TcpOpen, FlowEvent::TcpClose]);
    assert_eq!(
        (records[1].bytes_to_destination, records[1].bytes_to_source),
        (5000, 20)
    );
    assert_eq!(records[1].outcome, Some(Outcome::Normal));
}

#[test]
fn series_of_a_deleted_workload_go_once_no_connection_uses_them() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    // The client pod is deleted while its connection is open: its series stay...
    *f.names.write().expect("lock") = Arc::new(Directory::default());
    f.telemetry.tick();
    assert_eq!(
        f.sample("weft_tcp_connections_opened_total", &[SOURCE]),
        1.0
    );
    // ...until it closes and a later pass finds them unused.
    f.telemetry
        .on_event(&event(ConnEventKindName::TcpClose, 10, 10));
    f.telemetry.tick();
    assert_eq!(
        f.lines("weft_tcp_connections_opened_total"),
        Vec::<String>::new()
    );
}

#[test]
fn a_connection_gone_from_the_kernel_and_quiet_is_forgotten() {
    let mut f = fixture(TelemetryConfig::default());
    let t = &mut f.telemetry;
    t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    // Still tracked by the kernel: not a candidate, however quiet.
    assert_eq!(t.lost_candidates(Duration::ZERO, |_| true), []);
    let lost = t.lost_candidates(Duration::ZERO, |_| false);
    assert_eq!(lost.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [7]);
    t.forget(&lost);
    assert_eq!(t.view().open_count(), 0);
    assert_eq!(f.sample("weft_tcp_open_connections", &[]), 0.0);
}

#[test]
fn an_event_after_the_lookup_keeps_the_connection() {
    let mut f = fixture(TelemetryConfig::default());
    let t = &mut f.telemetry;
    t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    let lost = t.lost_candidates(Duration::ZERO, |_| false);
    // An update read between the lookup and the forget: the connection is alive.
    t.on_event(&event(ConnEventKindName::TcpUpdate, 10, 10));
    t.forget(&lost);
    assert_eq!(t.view().open_count(), 1);
}

#[test]
fn a_drop_is_counted_by_reason_and_published_as_denied() {
    let mut f = fixture(TelemetryConfig::default());
    let mut drop = event(ConnEventKindName::Drop, 0, 0);
    drop.dropped = Some(DropInfo {
        reason: DropReason::PolicyDenied,
        direction: Direction::Egress,
        protocol: weft_abi::IPPROTO_TCP,
    });
    f.telemetry.on_event(&drop);
    assert_eq!(
        f.sample(
            "weft_dropped_flows_total",
            &[
                "reason=\"policy_denied\"",
                "direction=\"egress\"",
                "protocol=\"TCP\""
            ]
        ),
        1.0
    );
    let records = f
        .telemetry
        .view()
        .flows
        .recent(&flows::Filter::default(), None);
    assert_eq!(records.len(), 1);
    assert_eq!(
        (
            records[0].verdict,
            records[0].reporter,
            records[0].drop_reason
        ),
        (
            Verdict::Denied,
            Reporter::Source,
            Some(DropReason::PolicyDenied)
        )
    );
    assert_eq!(records[0].source.pod.as_deref(), Some("client"));
}

#[test]
fn per_connection_series_expire_after_their_connection() {
    let mut f = fixture(TelemetryConfig {
        granularity: Granularity::Connection,
        connection_series_ttl: Duration::ZERO,
        ..TelemetryConfig::default()
    });
    let t = &mut f.telemetry;
    t.on_event(&event(ConnEventKindName::TcpOpen, 0, 0));
    let lines = f.lines("weft_tcp_connections_opened_total");
    assert!(
        lines.len() == 1 && lines[0].contains("source_address=\"10.0.0.1:40000\""),
        "{lines:?}"
    );
    f.telemetry
        .on_event(&event(ConnEventKindName::TcpClose, 0, 0));
    f.telemetry.tick();
    assert_eq!(
        f.lines("weft_tcp_connections_opened_total"),
        Vec::<String>::new()
    );
}
