//! UDP flow accounting on synthetic reads of the kernel's counters.
use weft_abi::{
    net::{Direction, Family, ip_words},
    traffic::{UdpFlowStatsKey, UdpFlowStatsValue},
};

use crate::{
    events::udp::{UdpBatch, UdpFlowSample},
    telemetry::{
        TelemetryConfig,
        flows::{Filter, FlowEvent, Reporter},
        tests::fixture,
    },
};

/// The flow client 10.0.0.1:5000 → server 10.0.0.2:53, seen from the client's socket.
fn key() -> UdpFlowStatsKey {
    let (family, local) = ip_words("10.0.0.1".parse().expect("ip"));
    let (_, remote) = ip_words("10.0.0.2".parse().expect("ip"));
    assert_eq!(family, Family::V4);
    UdpFlowStatsKey {
        local,
        remote,
        local_port: 5000u16.to_be(),
        remote_port: 53u16.to_be(),
        family: family as u8,
        ..UdpFlowStatsKey::default()
    }
}

fn value(tx: (u64, u64), rx: (u64, u64), first_ns: u64) -> UdpFlowStatsValue {
    UdpFlowStatsValue {
        tx_packets: tx.0,
        tx_bytes: tx.1,
        rx_packets: rx.0,
        rx_bytes: rx.1,
        first_ns,
        last_ns: first_ns + 1_000,
        initiator: Direction::Egress as u32,
        ..UdpFlowStatsValue::default()
    }
}

fn batch(flows: &[(UdpFlowStatsValue, bool)]) -> UdpBatch {
    UdpBatch {
        flows: flows
            .iter()
            .map(|&(value, ended)| UdpFlowSample {
                key: key(),
                value,
                ended,
            })
            .collect(),
    }
}

const SOURCE: &str = "reporter=\"source\"";

#[test]
fn reads_add_their_increases_and_the_initiator_sends_the_requests() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .apply_udp(batch(&[(value((2, 200), (1, 100), 1), false)]));
    f.telemetry
        .apply_udp(batch(&[(value((5, 500), (4, 400), 1), false)]));
    assert_eq!(f.sample("weft_udp_flows_opened_total", &[SOURCE]), 1.0);
    assert_eq!(f.sample("weft_udp_received_packets_total", &[SOURCE]), 5.0);
    assert_eq!(f.sample("weft_udp_received_bytes_total", &[SOURCE]), 500.0);
    assert_eq!(f.sample("weft_udp_sent_bytes_total", &[SOURCE]), 400.0);
    assert_eq!(f.sample("weft_udp_flows_closed_total", &[SOURCE]), 0.0);
}

#[test]
fn an_idle_flow_ends_with_a_record_of_its_totals() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .apply_udp(batch(&[(value((3, 300), (3, 330), 1), true)]));
    assert_eq!(f.sample("weft_udp_flows_closed_total", &[SOURCE]), 1.0);
    let records = f.telemetry.view().flows.recent(&Filter::default(), None);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(
        (r.event, r.reporter),
        (FlowEvent::UdpFlow, Reporter::Source)
    );
    assert_eq!((r.bytes_to_destination, r.bytes_to_source), (300, 330));
    assert_eq!(
        (r.packets_to_destination, r.packets_to_source),
        (Some(3), Some(3))
    );
    assert_eq!(r.destination.pod.as_deref(), Some("server"));
}

#[test]
fn a_flow_the_lru_evicted_ends_with_what_was_last_read() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .apply_udp(batch(&[(value((1, 100), (0, 0), 1), false)]));
    f.telemetry.apply_udp(batch(&[]));
    assert_eq!(f.sample("weft_udp_flows_closed_total", &[SOURCE]), 1.0);
    let records = f.telemetry.view().flows.recent(&Filter::default(), None);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].bytes_to_destination, 100);
}

#[test]
fn a_flow_recreated_between_reads_starts_from_zero() {
    let mut f = fixture(TelemetryConfig::default());
    f.telemetry
        .apply_udp(batch(&[(value((5, 500), (0, 0), 1), false)]));
    // Same key, another first packet: the old flow ended and the new one counts its own.
    f.telemetry
        .apply_udp(batch(&[(value((2, 200), (0, 0), 99), false)]));
    assert_eq!(f.sample("weft_udp_flows_opened_total", &[SOURCE]), 2.0);
    assert_eq!(f.sample("weft_udp_flows_closed_total", &[SOURCE]), 1.0);
    assert_eq!(f.sample("weft_udp_received_bytes_total", &[SOURCE]), 700.0);
}
