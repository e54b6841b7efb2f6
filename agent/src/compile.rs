//! Pure functions from the store to desired datapath state. No I/O, no clock: the same store
//! always compiles to the same result, which is what makes the sync diff small and testable.
//! This file compiles Services; [`policy`] compiles NetworkPolicies.
pub mod addresses;
pub mod authz;
pub mod mesh;
pub mod names;
pub mod outlier;
pub mod policy;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Serialize;
use weft_abi::{
    IPPROTO_TCP, IPPROTO_UDP,
    net::ip_words,
    svc::{Endpoint, Outlier, ServiceKey},
};

use self::outlier::{OutlierDefault, OutlierDetection, Scope, ServiceOutlier};
use crate::store::{Store, object::ip, validate::SERVICE_NAME_LABEL};

/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// What the kernel should do for one frontend (ClusterIP, port, protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service port's name ("" when it has one unnamed port).
    pub port_name: String,
    /// Ready backends, sorted and without duplicates.
    pub backends: Vec<Endpoint>,
    /// 0 = no session affinity.
    pub affinity_timeout_s: u32,
    /// Passive health checking of the backends (off by default).
    pub outlier: Outlier,
}

/// Something in the store that weft could not turn into datapath state, by Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub service: String,
    pub message: String,
}

/// Desired service state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Services {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    pub problems: Vec<Problem>,
}

fn endpoint(ip: IpAddr, port: u16) -> Endpoint {
    let (family, addr) = ip_words(ip);
    Endpoint {
        addr,
        port: port.to_be(),
        family: family as u8,
        _pad: 0,
    }
}

/// EndpointSlices by (namespace, Service) and Pods by namespace, built once per compile so
/// each Service reads only its own (10 000 Services must not each scan every slice).
struct Index<'a> {
    slices: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    pods: BTreeMap<&'a str, Vec<(&'a str, &'a Pod)>>,
}

impl<'a> Index<'a> {
    fn new(store: &'a Store) -> Self {
        let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for ((ns, _), slice) in &store.endpoint_slices {
            if let Some(svc) = label(&slice.metadata.labels, SERVICE_NAME_LABEL) {
                slices.entry((ns.as_str(), svc)).or_default().push(slice);
            }
        }
        let mut pods: BTreeMap<&str, Vec<(&str, &Pod)>> = BTreeMap::new();
        for ((ns, name), pod) in &store.pods {
            pods.entry(ns.as_str())
                .or_default()
                .push((name.as_str(), pod));
        }
        Self { slices, pods }
    }
}

/// What services compile with besides the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// `--outlier-detection-default`: health checking of TCP ports no DestinationRule
    /// configures.
    pub outlier_default: OutlierDefault,
    /// `--mesh-root-namespace`: its DestinationRules apply mesh-wide.
    pub mesh_root: String,
    pub cluster_domain: String,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            outlier_default: OutlierDefault::default(),
            mesh_root: "istio-system".to_owned(),
            cluster_domain: "cluster.local".to_owned(),
        }
    }
}

/// Compiles every Service of the store.
pub fn services(store: &Store, settings: &ServiceSettings) -> Services {
    let index = Index::new(store);
    let mut out = Services::default();
    let scope = Scope {
        root: &settings.mesh_root,
        domain: &settings.cluster_domain,
        default: settings
            .outlier_default
            .0
            .as_ref()
            .map(OutlierDetection::kernel)
            .unwrap_or_default(),
    };
    for ((ns, name), svc) in &store.services {
        let outlier = ServiceOutlier::of(store, &scope, (ns, name));
        compile_service(&index, (ns, name), svc, outlier, &mut out);
    }
    for (object, message) in outlier::problems(store, &settings.mesh_root) {
        out.problems.push(Problem {
            service: object,
            message,
        });
    }
    out
}

/// One Service being compiled: where its endpoints come from.
struct ServiceCtx<'a> {
    index: &'a Index<'a>,
    ns: &'a str,
    /// `namespace/name`.
    id: String,
    slices: &'a [&'a EndpointSlice],
    selector: Option<&'a BTreeMap<String, String>>,
    include_not_ready: bool,
    affinity_timeout_s: u32,
    /// For TCP ports.
    outlier: ServiceOutlier<'a>,
}

fn compile_service(
    index: &Index<'_>,
    (ns, name): (&str, &str),
    svc: &Service,
    outlier: ServiceOutlier<'_>,
    out: &mut Services,
) {
    let id = format!("{ns}/{name}");
    let Some(spec) = &svc.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") {
        return;
    }
    let cluster_ips = cluster_ips(spec);
    if cluster_ips.is_empty() {
        // Headless ("None"): nothing to translate. Without any ClusterIP the API server would
        // allocate one; standalone mode does not.
        if spec.cluster_ip.as_deref() != Some("None") {
            out.problems.push(Problem {
                service: id,
                message: "no spec.clusterIP: standalone mode does not allocate one, so nothing is translated".into(),
            });
        }
        return;
    }
    let ctx = ServiceCtx {
        index,
        ns,
        slices: index.slices.get(&(ns, name)).map_or(&[][..], Vec::as_slice),
        selector: spec.selector.as_ref().filter(|s| !s.is_empty()),
        include_not_ready: spec.publish_not_ready_addresses == Some(true),
        affinity_timeout_s: affinity_timeout_s(spec),
        outlier,
        id,
    };
    for port in spec.ports.iter().flatten() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            other => {
                out.problems.push(Problem {
                    service: ctx.id.clone(),
                    message: format!(
                        "port {} ({other}) is not load-balanced: weft handles TCP and UDP",
                        port.port
                    ),
                });
                continue;
            }
        };
        for ip in &cluster_ips {
            ctx.add_frontend(*ip, port, protocol, out);
        }
    }
}

/// spec.clusterIPs, or spec.clusterIP (none for a headless Service).
fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|s| ip(s)).collect(),
        _ => spec.cluster_ip.iter().filter_map(|s| ip(s)).collect(),
    }
}

/// ClientIP affinity's timeout (kube-proxy's default when unset); 0 without affinity.
fn affinity_timeout_s(spec: &ServiceSpec) -> u32 {
    match spec.session_affinity.as_deref() {
        Some("ClientIP") => spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
        _ => 0,
    }
}

impl ServiceCtx<'_> {
    /// The ready backends of `port` of the family of `v4`.
    fn backends(
        &self,
        port: &ServicePort,
        v4: bool,
        problems: &mut Vec<Problem>,
    ) -> BTreeSet<Endpoint> {
        if !self.slices.is_empty() {
            return from_slices(self.slices, port, v4);
        }
        let Some(selector) = self.selector else {
            // A Service without selector and without EndpointSlices has no endpoints.
            return BTreeSet::new();
        };
        let source = PodSource {
            index: self.index,
            ns: self.ns,
            selector,
            include_not_ready: self.include_not_ready,
            service: &self.id,
        };
        from_pods(&source, port, v4, problems)
    }

    /// The frontend (ip, port, protocol), unless another Service has it already.
    fn add_frontend(&self, ip: IpAddr, port: &ServicePort, protocol: u8, out: &mut Services) {
        let Ok(service_port) = u16::try_from(port.port) else {
            return;
        };
        let backends = self.backends(port, ip.is_ipv4(), &mut out.problems);
        let (family, addr) = ip_words(ip);
        let key = ServiceKey {
            addr,
            port: service_port.to_be(),
            protocol,
            family: family as u8,
        };
        // Two Services cannot share a frontend: the first (by namespace/name) keeps it.
        if let Some(first) = out.frontends.get(&key) {
            out.problems.push(Problem {
                service: self.id.clone(),
                message: format!(
                    "{ip} port {} is already served by {}; this port is not programmed",
                    port.port, first.service
                ),
            });
            return;
        }
        out.frontends.insert(
            key,
            Frontend {
                service: self.id.clone(),
                port_name: port.name.clone().unwrap_or_default(),
                backends: backends.into_iter().collect(),
                affinity_timeout_s: self.affinity_timeout_s,
                outlier: if protocol == IPPROTO_TCP {
                    self.outlier.port(service_port)
                } else {
                    Outlier::default()
                },
            },
        );
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref().and_then(|l| l.get(key)).map(String::as_str)
}

/// Ready endpoints of the Service's EndpointSlices of one family, at the slice port that
/// matches the Service port by name (and protocol).
fn from_slices(slices: &[&EndpointSlice], port: &ServicePort, v4: bool) -> BTreeSet<Endpoint> {
    let want_name = port.name.as_deref().unwrap_or("");
    let want_proto = port.protocol.as_deref().unwrap_or("TCP");
    let address_type = if v4 { "IPv4" } else { "IPv6" };
    let (mut out, mut terminating) = (BTreeSet::new(), BTreeSet::new());
    for slice in slices {
        if slice.address_type != address_type {
            continue;
        }
        let Some(number) = slice.ports.iter().flatten().find_map(|p| {
            let matches = p.name.as_deref().unwrap_or("") == want_name
                && p.protocol.as_deref().unwrap_or("TCP") == want_proto;
            matches.then_some(p.port).flatten()
        }) else {
            continue;
        };
        let Some(number) = u16::try_from(number).ok().filter(|n| *n != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            // "ready" unset means ready (EndpointConditions).
            let ready = c.and_then(|c| c.ready) != Some(false);
            let set = if ready {
                &mut out
            } else if c.and_then(|c| c.serving) == Some(true)
                && c.and_then(|c| c.terminating) == Some(true)
            {
                &mut terminating
            } else {
                continue;
            };
            for a in &ep.addresses {
                if let Some(ip) = ip(a) {
                    set.insert(endpoint(ip, number));
                }
            }
        }
    }
    // Like kube-proxy: when nothing is ready, endpoints that still serve while terminating do,
    // so a rolling update does not refuse connections.
    if out.is_empty() { terminating } else { out }
}

/// Whether a pod may serve: Running (when a phase is given) and Ready. A pod without a Ready
/// condition counts as ready: hand-written standalone YAML rarely carries conditions, and a
/// pod explicitly marked not ready is still excluded.
pub fn pod_is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    if status.phase.as_deref().is_some_and(|p| p != "Running") {
        return false;
    }
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True")
}

/// The pod's addresses from status.podIPs (or status.podIP).
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().filter_map(|p| ip(&p.ip)).collect(),
        _ => status.pod_ip.iter().filter_map(|s| ip(s)).collect(),
    }
}

/// A Service's selector and where it selects pods.
struct PodSource<'a> {
    index: &'a Index<'a>,
    ns: &'a str,
    selector: &'a BTreeMap<String, String>,
    include_not_ready: bool,
    /// `namespace/name` of the Service, for problems.
    service: &'a str,
}

fn from_pods(
    source: &PodSource<'_>,
    port: &ServicePort,
    v4: bool,
    problems: &mut Vec<Problem>,
) -> BTreeSet<Endpoint> {
    let PodSource {
        index,
        ns,
        selector,
        include_not_ready,
        service,
    } = *source;
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let mut out = BTreeSet::new();
    for &(pname, pod) in index.pods.get(ns).into_iter().flatten() {
        let pns = ns;
        let labels = pod.metadata.labels.as_ref();
        let selected = selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        // publishNotReadyAddresses includes pods that are not ready, not pods that ended.
        let ended = crate::store::object::is_finished(pod);
        if !selected || ended || !(include_not_ready || pod_is_ready(pod)) {
            continue;
        }
        let number = match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(name)) => {
                let found = pod
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| {
                        p.name.as_deref() == Some(name.as_str())
                            && p.protocol.as_deref().unwrap_or("TCP") == protocol
                    });
                if found.is_none() {
                    problems.push(Problem {
                        service: service.to_owned(),
                        message: format!("pod {pns}/{pname} has no {protocol} port named {name:?}; it does not serve port {}", port.port),
                    });
                }
                found.map(|p| p.container_port)
            }
        };
        let Some(number) = number.and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        for ip in pod_ips(pod).into_iter().filter(|ip| ip.is_ipv4() == v4) {
            out.insert(endpoint(ip, number));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_abi::net::words_ip;

    use super::*;
    use crate::{source::yaml, store};

    fn store(docs: &[&str]) -> Store {
        let objects: BTreeMap<_, _> = docs
            .iter()
            .map(|d| store::decode(yaml::parse(d).expect("yaml")).expect("valid"))
            .collect();
        Store::from_objects(&objects)
    }

    fn key(ip: &str, port: u16, protocol: u8) -> ServiceKey {
        let (family, addr) = ip_words(ip.parse().expect("ip"));
        ServiceKey {
            addr,
            port: port.to_be(),
            protocol,
            family: family as u8,
        }
    }

    fn backends(f: &Frontend) -> Vec<String> {
        f.backends
            .iter()
            .map(|b| format!("{}:{}", words_ip(b.family, b.addr), u16::from_be(b.port)))
            .collect()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIPs: [10.96.0.10, fd00:96::10]\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n";

    fn pod(name: &str, ip4: &str, ip6: &str, ready: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: web}}}}\nspec:\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}]\nstatus:\n  phase: Running\n  podIPs: [{{ip: {ip4}}}, {{ip: '{ip6}'}}]\n  conditions: [{{type: Ready, status: '{ready}'}}]\n"
        )
    }

    #[test]
    fn selector_services_use_ready_pods_and_named_target_ports_per_family() {
        let (a, b, c) = (
            pod("a", "10.0.0.11", "fd00::11", "True"),
            pod("b", "10.0.0.12", "fd00::12", "True"),
            pod("c", "10.0.0.13", "fd00::13", "False"),
        );
        let out = services(&store(&[SVC, &a, &b, &c]), &ServiceSettings::default());
        let v4 = &out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)];
        assert_eq!(backends(v4), ["10.0.0.11:8080", "10.0.0.12:8080"]);
        assert_eq!(v4.service, "shop/web");
        let v6 = &out.frontends[&key("fd00:96::10", 80, IPPROTO_TCP)];
        assert_eq!(backends(v6), ["fd00::11:8080", "fd00::12:8080"]);
        let dns = &out.frontends[&key("10.96.0.10", 53, IPPROTO_UDP)];
        assert_eq!(backends(dns), ["10.0.0.11:5353", "10.0.0.12:5353"]);
        assert_eq!(out.frontends.len(), 4);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn endpoint_slices_win_over_the_selector_and_only_ready_endpoints_serve() {
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 9090}]\nendpoints:\n- {addresses: [10.0.1.1]}\n- {addresses: [10.0.1.2], conditions: {ready: false}}\n- {addresses: [10.0.1.3], conditions: {ready: true}}\n";
        let a = pod("a", "10.0.0.11", "fd00::11", "True");
        let out = services(&store(&[SVC, slice, &a]), &ServiceSettings::default());
        assert_eq!(
            backends(&out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)]),
            ["10.0.1.1:9090", "10.0.1.3:9090"]
        );
        // No IPv6 slice: the IPv6 frontend has no backends (and refuses), it does not fall back.
        assert!(
            out.frontends[&key("fd00:96::10", 80, IPPROTO_TCP)]
                .backends
                .is_empty()
        );
        // No slice port named dns.
        assert!(
            out.frontends[&key("10.96.0.10", 53, IPPROTO_UDP)]
                .backends
                .is_empty()
        );
    }

    #[test]
    fn missing_named_ports_are_reported() {
        let p = pod("a", "10.0.0.11", "fd00::11", "True")
            .replace("name: http, containerPort", "name: web, containerPort");
        let out = services(&store(&[SVC, &p]), &ServiceSettings::default());
        assert!(
            out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)]
                .backends
                .is_empty()
        );
        assert!(
            out.problems
                .iter()
                .any(|p| p.message.contains("no TCP port named \"http\"")),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn affinity_headless_and_sctp() {
        let aff = SVC.replace("  selector:", "  sessionAffinity: ClientIP\n  selector:");
        let out = services(&store(&[&aff]), &ServiceSettings::default());
        assert_eq!(
            out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)].affinity_timeout_s,
            DEFAULT_AFFINITY_TIMEOUT_S
        );
        let headless = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n";
        assert!(
            services(&store(&[headless]), &ServiceSettings::default())
                .frontends
                .is_empty()
        );
        let sctp = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{port: 80, protocol: SCTP}]\n";
        let out = services(&store(&[sctp]), &ServiceSettings::default());
        assert!(out.frontends.is_empty());
        assert_eq!(out.problems.len(), 1);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_is_ready() {
        let slice = |conditions: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 9090}}]\nendpoints:\n- {{addresses: [10.0.1.1], conditions: {{ready: false, serving: true, terminating: true}}}}\n- {{addresses: [10.0.1.2], conditions: {conditions}}}\n"
            )
        };
        let with_ready = slice("{ready: true}");
        let out = services(&store(&[SVC, &with_ready]), &ServiceSettings::default());
        assert_eq!(
            backends(&out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)]),
            ["10.0.1.2:9090"]
        );
        let none_ready = slice("{ready: false, serving: false}");
        let out = services(&store(&[SVC, &none_ready]), &ServiceSettings::default());
        assert_eq!(
            backends(&out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)]),
            ["10.0.1.1:9090"]
        );
    }

    #[test]
    fn a_frontend_is_served_by_the_first_service_and_the_other_is_reported() {
        let other = SVC.replace("name: web,", "name: zz-web,");
        let out = services(&store(&[SVC, &other]), &ServiceSettings::default());
        assert_eq!(
            out.frontends[&key("10.96.0.10", 80, IPPROTO_TCP)].service,
            "shop/web"
        );
        assert!(
            out.problems
                .iter()
                .any(|p| p.service == "shop/zz-web"
                    && p.message.contains("already served by shop/web")),
            "{:?}",
            out.problems
        );
        let no_ip =
            "apiVersion: v1\nkind: Service\nmetadata: {name: noip}\nspec:\n  ports: [{port: 80}]\n";
        let out = services(&store(&[no_ip]), &ServiceSettings::default());
        assert!(
            out.problems
                .iter()
                .any(|p| p.message.contains("no spec.clusterIP")),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.96.0.10", "fd00:96::10", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let (family, words) = ip_words(ip);
            assert_eq!(words_ip(family as u8, words), ip);
        }
    }
}

#[cfg(test)]
mod example_dir {
    use std::path::Path;

    use super::*;
    use crate::source::dir::DirSource;

    /// examples/standalone decodes without a rejection and compiles to what its README says.
    #[test]
    fn the_example_directory_compiles() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone");
        let mut src = DirSource::new(&dir);
        src.rescan(false).expect("read the example directory");
        let (objects, rejections) = src.objects();
        assert!(rejections.is_empty(), "{rejections:#?}");
        assert_eq!(
            objects.len(),
            18,
            "1 namespace, 3 pods, 3 services, 1 slice, 4 policies, 2 PeerAuthentications, 3 \
             AuthorizationPolicies, 1 DestinationRule: {:?}",
            objects.keys().collect::<Vec<_>>()
        );
        let out = services(
            &Store::from_objects(objects.clone()),
            &ServiceSettings::default(),
        );
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let list: Vec<(String, Vec<String>, u32)> = out
            .frontends
            .iter()
            .map(|(k, f)| {
                let backends = f
                    .backends
                    .iter()
                    .map(|b| {
                        std::net::SocketAddr::new(
                            weft_abi::net::words_ip(b.family, b.addr),
                            u16::from_be(b.port),
                        )
                        .to_string()
                    })
                    .collect();
                (
                    crate::sync::frontend_name(k),
                    backends,
                    f.affinity_timeout_s,
                )
            })
            .collect();
        let expect = |fe: &str, b: &str, a: u32| (fe.to_owned(), vec![b.to_owned()], a);
        let mut want = vec![
            expect("10.96.0.10:80/TCP", "10.0.0.11:8080", 0),
            expect("[fd00:96::10]:80/TCP", "[fd00::b]:8080", 0),
            expect("10.96.0.53:53/UDP", "10.0.0.12:5353", 0),
            expect("[fd00:96::20]:5432/TCP", "[fd00::c]:5432", 600),
        ];
        want.sort();
        let mut got = list;
        got.sort();
        assert_eq!(got, want);
        // The DestinationRule checks web's backends, and only those, with a 2 s connect
        // timeout.
        let checked: Vec<(String, u32, u32)> = out
            .frontends
            .iter()
            .map(|(k, f)| {
                let o = &f.outlier;
                (
                    crate::sync::frontend_name(k),
                    o.consecutive,
                    o.connect_timeout_ms,
                )
            })
            .filter(|(_, n, _)| *n != 0)
            .collect();
        assert_eq!(
            checked,
            [
                ("10.96.0.10:80/TCP".to_owned(), 3, 2000),
                ("[fd00:96::10]:80/TCP".to_owned(), 3, 2000)
            ]
        );

        // The policies: every pod ingress-isolated, the frontend egress-isolated too, and the
        // demo's traffic allowed while the frontend cannot reach postgres.
        let store = Store::from_objects(objects);
        let p = policy::compile(&store, &[], &mut policy::Ids::default(), u32::MAX);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let flags = |cg: &str| p.endpoints[cg].info.flags;
        use weft_abi::{
            net::Direction,
            policy::{EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED},
        };
        assert_eq!(flags("frontend"), EP_INGRESS_ISOLATED | EP_EGRESS_ISOLATED);
        assert_eq!(flags("backend"), EP_INGRESS_ISOLATED);
        assert_eq!(flags("db"), EP_INGRESS_ISOLATED);
        let tables = policy::judge::Compiled(&p);
        let judge = |from: &str, dir, peer: &str, proto, port| {
            let ep = p.endpoints[from].info;
            policy::judge::judge(&tables, &ep, dir, peer.parse().expect("ip"), proto, port).allowed
        };
        assert!(judge(
            "frontend",
            Direction::Egress,
            "10.0.0.11",
            IPPROTO_TCP,
            8080
        ));
        assert!(judge(
            "frontend",
            Direction::Egress,
            "10.0.0.12",
            IPPROTO_UDP,
            5353
        ));
        assert!(!judge(
            "frontend",
            Direction::Egress,
            "fd00::c",
            IPPROTO_TCP,
            5432
        ));
        assert!(judge(
            "db",
            Direction::Ingress,
            "fd00::b",
            IPPROTO_TCP,
            5432
        ));
    }
}
