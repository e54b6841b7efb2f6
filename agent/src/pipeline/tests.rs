//! The pipeline on in-memory maps: a directory source, a scratch cgroup root, and what each
//! pass leaves in the maps, the status and the metrics.
use std::{fs, sync::Arc, time::Duration};

use clap::Parser as _;
use prometheus_client::registry::Registry;
use weft_abi::{IPPROTO_TCP, net::ip_words, svc::ServiceKey};

use super::*;
use crate::{
    datapath::{Capacities, metrics::MapMetrics},
    metrics::{Format, render},
    source::dir::DirSource,
    sync::Reason,
    tests::{MemoryPolicyMaps, MemoryServiceMaps, TempDir},
};

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{port: 80, targetPort: http}]\n";
const DB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  clusterIP: 10.96.0.11\n  selector: {app: web}\n  ports: [{port: 5432}]\n";
const WEB_ONLY_FROM_CLIENT: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n";

/// A pod of namespace shop, local (its cgroup is its name), serving `http` on 8080.
fn pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  \
         labels: {{app: {app}}}\n  annotations: {{weft.io/cgroup: {name}}}\nspec: {{containers: \
         [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// A source directory, a cgroup root with a cgroup per pod, and the pipeline over them.
struct Fixture {
    source: TempDir,
    cgroups: TempDir,
    registry: Registry,
    pipeline: Pipeline<MemoryServiceMaps, MemoryPolicyMaps>,
}

#[derive(Debug, clap::Parser)]
struct Flags {
    #[command(flatten)]
    capacities: Capacities,
}

fn fixture(name: &str, capacity_flags: &[&str]) -> Fixture {
    let source = TempDir::new(&format!("pipeline-{name}"));
    source.write(
        "pods.yaml",
        &[
            pod("web-1", "web", "10.0.0.2"),
            pod("client", "client", "10.0.0.1"),
        ]
        .join("---\n"),
    );
    source.write("services.yaml", WEB);
    let cgroups = TempDir::new(&format!("pipeline-{name}-cgroups"));
    fs::create_dir(cgroups.path().join("web-1")).expect("cgroup dir");
    fs::create_dir(cgroups.path().join("client")).expect("cgroup dir");
    let capacities =
        Flags::try_parse_from(std::iter::once("weft").chain(capacity_flags.iter().copied()))
            .expect("capacities")
            .capacities;
    let mut registry = Registry::default();
    let weft = crate::metrics::weft(&mut registry);
    let maps = MapMetrics::new(weft);
    let metrics = PipelineMetrics::new(weft, maps);
    let settings = Settings {
        node_ips: vec!["192.168.0.1".parse().expect("ip")],
        names: NameConfig::default(),
        mesh_root_namespace: "istio-system".to_owned(),
        outlier_detection_default: Default::default(),
    };
    let pipeline = Pipeline::new(
        Some(Source::Dir(DirSource::with_settle(
            source.path(),
            Duration::ZERO,
        ))),
        (MemoryServiceMaps::default(), MemoryPolicyMaps::default()),
        &capacities,
        &settings,
        cgroups.path(),
        None,
        metrics,
    )
    .expect("pipeline")
    .with_cgroup_ids(inode);
    Fixture {
        source,
        cgroups,
        registry,
        pipeline,
    }
}

impl Fixture {
    fn pass(&mut self) {
        self.pipeline.refresh(true).expect("pass");
    }

    fn sample(&self, name: &str, label: &str) -> f64 {
        render(&self.registry, Format::Text)
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    fn cgroup_id(&self, pod: &str) -> u64 {
        inode(&self.cgroups.path().join(pod)).expect("cgroup id")
    }
}

/// A cgroup's id is its directory's inode (cgroup2 checks aside).
fn inode(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| m.ino())
}

fn frontend(ip: &str, port: u16) -> ServiceKey {
    let (family, addr) = ip_words(ip.parse().expect("ip"));
    ServiceKey {
        addr,
        port: port.to_be(),
        protocol: IPPROTO_TCP,
        family: family as u8,
    }
}

#[test]
fn a_pass_programs_the_services_of_the_source() {
    let mut f = fixture("services", &[]);
    f.pass();
    let (services, _) = f.pipeline.maps();
    let backends = services.backends(&frontend("10.96.0.10", 80));
    let (family, addr) = ip_words("10.0.0.2".parse().expect("ip"));
    assert_eq!(backends.len(), 1);
    assert_eq!(
        (
            backends[0].family,
            backends[0].addr,
            u16::from_be(backends[0].port)
        ),
        (family as u8, addr, 8080)
    );
    let status = f.pipeline.views().status;
    let status = status.read().expect("status");
    assert!(status.ready);
    assert_eq!(status.frontends, 1);
    assert_eq!(
        status.names[&frontend("10.96.0.10", 80)].service,
        "shop/web"
    );
}

#[test]
fn a_pass_publishes_the_names_telemetry_reads() {
    let mut f = fixture("names", &[]);
    f.pass();
    let directory = Arc::clone(&f.pipeline.views().directory.read().expect("names"));
    let pod = directory
        .pod("10.0.0.2".parse().expect("ip"))
        .expect("web-1");
    assert_eq!((&*pod.pod, &*pod.peer.workload), ("web-1", "web-1"));
    assert!(directory.has_service_named("shop", "web"));
}

#[test]
fn a_rejected_document_is_counted_once_by_kind_and_the_rest_applies() {
    let mut f = fixture("rejected", &[]);
    f.source.write(
        "bad.yaml",
        &WEB.replace("name: web", "name: broken")
            .replace("10.96.0.10", "10.96.0.999"),
    );
    f.pass();
    f.pass();
    assert_eq!(
        f.sample("weft_config_rejections_total", "kind=\"Service\""),
        1.0
    );
    assert_eq!(f.sample("weft_config_rejected_documents", ""), 1.0);
    assert_eq!(f.pipeline.maps().0.services.len(), 1);
}

#[test]
fn a_service_that_does_not_fit_is_a_typed_sync_error() {
    let mut f = fixture("full", &["--max-services", "1"]);
    f.source.write("db.yaml", DB);
    f.pass();
    assert_eq!(
        f.sample("weft_sync_errors_total", "reason=\"map_full\""),
        1.0
    );
    let status = f.pipeline.views().status;
    let status = status.read().expect("status");
    assert_eq!(status.sync_errors.len(), 1);
    let failure = &status.sync_errors[0].failure;
    assert_eq!((failure.reason, failure.map), (Reason::MapFull, "SERVICES"));
    assert!(
        failure.message.contains("raise --max-services"),
        "{}",
        failure.message
    );
    assert_eq!(f.pipeline.maps().0.services.len(), 1, "the first fits");
}

#[test]
fn a_policy_isolates_its_pod_by_cgroup() {
    let mut f = fixture("policy", &[]);
    f.source.write("policy.yaml", WEB_ONLY_FROM_CLIENT);
    f.pass();
    let (_, policy) = f.pipeline.maps();
    let web = policy.endpoints[&f.cgroup_id("web-1")];
    assert_eq!(
        web.flags & weft_abi::policy::EP_INGRESS_ISOLATED,
        weft_abi::policy::EP_INGRESS_ISOLATED
    );
    let client = policy.endpoints[&f.cgroup_id("client")];
    assert_eq!(client.flags, 0, "selected by no policy");
    let status = f.pipeline.views().policy;
    let status = status.read().expect("policy status");
    assert_eq!(status.policies.len(), 1);
    assert_eq!(status.sync_errors, []);
}

#[test]
fn a_pod_whose_cgroup_appears_later_is_enforced_then() {
    let mut f = fixture("late-cgroup", &[]);
    f.source
        .write("late.yaml", &pod("web-2", "web", "10.0.0.3"));
    f.source.write("policy.yaml", WEB_ONLY_FROM_CLIENT);
    f.pass();
    {
        let status = f.pipeline.views().policy;
        let status = status.read().expect("policy status");
        let late = status
            .endpoints
            .iter()
            .find(|e| e.pod == "shop/web-2")
            .expect("listed");
        assert_eq!(late.cgroup_id, None);
        assert!(status.problems.iter().any(|p| p.object == "shop/web-2"));
    }
    assert_eq!(f.pipeline.maps().1.endpoints.len(), 2);
    fs::create_dir(f.cgroups.path().join("web-2")).expect("cgroup dir");
    f.pipeline.collect_garbage();
    let id = f.cgroup_id("web-2");
    assert!(f.pipeline.maps().1.endpoints.contains_key(&id));
}
