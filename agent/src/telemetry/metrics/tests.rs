//! The label sets as Prometheus sees them, and the series cache.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{metrics::counter::Counter, metrics::family::Family, registry::Registry};

use super::*;
use crate::{
    compile::names::{Peer, ServiceName},
    metrics::{Format, render},
};

fn peer(workload: &str) -> Peer {
    Peer {
        namespace: Arc::from("shop"),
        workload: Arc::from(workload),
        app: Arc::from(workload),
        version: Arc::from("v1"),
        canonical_service: Arc::from(workload),
        canonical_revision: Arc::from("v1"),
    }
}

fn service() -> ServiceName {
    ServiceName {
        name: Arc::from("web"),
        namespace: Arc::from("shop"),
        key: Arc::from("shop/web"),
        host: Arc::from("web.shop.svc.cluster.local"),
    }
}

/// The one sample line of a counter family holding `labels`.
fn line<
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
>(
    labels: &L,
) -> String {
    let family: Family<L, Counter> = Family::default();
    family.get_or_create(labels).inc();
    let mut registry = Registry::default();
    registry.register("x", "x", family);
    render(&registry, Format::Text)
        .lines()
        .find(|l| l.starts_with("x_total{"))
        .expect("a sample")
        .to_owned()
}

#[test]
fn connection_labels_are_istios_in_istios_order() {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let (client, server) = (peer("frontend"), peer("backend"));
    let svc = service();
    let ends = Ends {
        reporter: Reporter::Destination,
        protocol: Protocol::Tcp,
        source: Some(&client),
        destination: Some(&server),
        service: Some(&svc),
        cluster: &cluster,
        security: None,
    };
    let labels = ClosedLabels {
        conn: ConnLabels::new(&ends, Detail::None),
        outcome: Outcome::Refused,
    };
    assert_eq!(
        line(&labels),
        "x_total{reporter=\"destination\",source_workload=\"frontend\",\
         source_workload_namespace=\"shop\",source_principal=\"unknown\",source_app=\"frontend\",\
         source_version=\"v1\",source_canonical_service=\"frontend\",\
         source_canonical_revision=\"v1\",source_cluster=\"Kubernetes\",\
         destination_workload=\"backend\",destination_workload_namespace=\"shop\",\
         destination_principal=\"unknown\",destination_app=\"backend\",destination_version=\"v1\",\
         destination_canonical_service=\"backend\",destination_canonical_revision=\"v1\",\
         destination_cluster=\"Kubernetes\",destination_service=\"web.shop.svc.cluster.local\",\
         destination_service_name=\"web\",destination_service_namespace=\"shop\",\
         request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"unknown\",\
         outcome=\"refused\"} 1"
    );
}

#[test]
fn an_address_no_pod_holds_is_unknown_even_its_cluster() {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let ends = Ends {
        reporter: Reporter::Source,
        protocol: Protocol::Udp,
        source: None,
        destination: None,
        service: None,
        cluster: &cluster,
        security: None,
    };
    let labels = ConnLabels::new(&ends, Detail::None);
    assert_eq!(&*labels.source_cluster, "unknown");
    assert_eq!(&*labels.destination_service, "unknown");
    assert_eq!(labels.request_protocol.as_str(), "udp");
}

#[test]
fn finer_granularities_add_pods_then_addresses() {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let ends = Ends {
        reporter: Reporter::Source,
        protocol: Protocol::Tcp,
        source: None,
        destination: None,
        service: None,
        cluster: &cluster,
        security: None,
    };
    let pods = PodLabels {
        source_pod: Arc::from("a"),
        destination_pod: Arc::from("b"),
    };
    let with_pods = line(&ConnLabels::new(&ends, Detail::Pod(pods.clone())));
    assert!(
        with_pods.ends_with("source_pod=\"a\",destination_pod=\"b\"} 1"),
        "{with_pods}"
    );
    let connection = Detail::Connection(ConnectionLabels {
        pods,
        source_address: Arc::from("10.0.0.1:1"),
        destination_address: Arc::from("10.0.0.2:80"),
    });
    let with_addresses = line(&ConnLabels::new(&ends, connection));
    assert!(
        with_addresses.ends_with(
            "source_pod=\"a\",destination_pod=\"b\",source_address=\"10.0.0.1:1\",\
             destination_address=\"10.0.0.2:80\"} 1"
        ),
        "{with_addresses}"
    );
}

fn families() -> (Registry, Families) {
    let mut registry = Registry::default();
    let families = Families::new(&mut registry);
    (registry, families)
}

fn labels(workload: &str) -> ConnLabels {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let p = peer(workload);
    let ends = Ends {
        reporter: Reporter::Source,
        protocol: Protocol::Tcp,
        source: Some(&p),
        destination: None,
        service: None,
        cluster: &cluster,
        security: None,
    };
    ConnLabels::new(&ends, Detail::None)
}

fn opened_lines(registry: &Registry) -> usize {
    render(registry, Format::Text)
        .lines()
        .filter(|l| l.starts_with("tcp_connections_opened_total{"))
        .count()
}

#[test]
fn one_label_set_is_one_series() {
    let (registry, f) = families();
    let mut cache: SeriesCache<TcpSeries> = SeriesCache::new(Duration::ZERO);
    let a = cache.get(&f, &labels("a"));
    let again = cache.get(&f, &labels("a"));
    assert!(Arc::ptr_eq(&a, &again));
    a.opened.inc();
    assert_eq!(cache.len(), 1);
    assert_eq!(opened_lines(&registry), 1);
}

#[test]
fn pruning_keeps_series_in_use_and_removes_the_rest() {
    let (registry, f) = families();
    let mut cache: SeriesCache<TcpSeries> = SeriesCache::new(Duration::ZERO);
    let held = cache.get(&f, &labels("held"));
    held.opened.inc();
    cache.get(&f, &labels("free")).opened.inc();
    cache.prune(&f, |_| false);
    assert_eq!(cache.len(), 1);
    assert_eq!(opened_lines(&registry), 1);
    drop(held);
    cache.prune(&f, |_| false);
    assert!(cache.is_empty());
    assert_eq!(opened_lines(&registry), 0);
}

#[test]
fn an_expired_series_still_in_use_waits_another_ttl() {
    let (registry, f) = families();
    let ttl = Duration::from_secs(60);
    let mut cache: SeriesCache<TcpSeries> = SeriesCache::new(ttl);
    let t0 = Instant::now();
    let held = cache.get(&f, &labels("a"));
    held.opened.inc();
    cache.expire_later(labels("a"), t0);
    cache.expire(&f, t0 + ttl);
    assert_eq!(cache.len(), 1, "still counted into");
    drop(held);
    cache.expire(&f, t0 + ttl + ttl);
    assert!(cache.is_empty());
    assert_eq!(opened_lines(&registry), 0);
}

#[test]
fn a_namespace_named_unknown_is_a_namespace_not_a_missing_pod() {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let mut p = peer("unknown");
    p.namespace = Arc::from("unknown");
    let ends = Ends {
        reporter: Reporter::Source,
        protocol: Protocol::Tcp,
        source: Some(&p),
        destination: None,
        service: None,
        cluster: &cluster,
        security: None,
    };
    let labels = ConnLabels::new(&ends, Detail::None);
    // Its workload is gone from the (empty) directory: its series are stale.
    assert!(!labels.is_current(&crate::compile::names::Directory::default()));
    // An end no pod holds names nothing that can go.
    let nobody = Ends {
        source: None,
        ..ends
    };
    assert!(
        ConnLabels::new(&nobody, Detail::None)
            .is_current(&crate::compile::names::Directory::default())
    );
}

/// A connection the mesh carried names both principals and `mutual_tls`.
#[test]
fn a_connection_the_mesh_carried_names_its_principals() {
    let cluster: Arc<str> = Arc::from("Kubernetes");
    let (client, server) = (peer("frontend"), peer("backend"));
    let security = crate::events::Security {
        source_principal: Arc::from("spiffe://cluster.local/ns/shop/sa/frontend"),
        destination_principal: Arc::from("spiffe://cluster.local/ns/shop/sa/backend"),
        transport: crate::events::Transport::Tunnel,
    };
    let ends = Ends {
        reporter: Reporter::Source,
        protocol: Protocol::Tcp,
        source: Some(&client),
        destination: Some(&server),
        service: None,
        cluster: &cluster,
        security: Some(&security),
    };
    let labels = ConnLabels::new(&ends, Detail::None);
    assert_eq!(
        &*labels.source_principal,
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    assert_eq!(
        &*labels.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/backend"
    );
    assert_eq!(labels.connection_security_policy, SecurityPolicy::MutualTls);
    assert_eq!(labels.connection_security_policy.as_str(), "mutual_tls");
}
