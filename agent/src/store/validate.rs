//! Validation of the objects weft reads, following the API server's rules
//! (kubernetes pkg/apis/core/validation, pkg/apis/discovery/validation) for the fields weft
//! uses. Every problem names its field.
pub mod netpol;
pub mod networking;
pub mod security;

use std::{collections::BTreeSet, net::IpAddr, path::Component, path::Path};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

pub use self::netpol::network_policy;

/// The annotation that binds a Pod to a cgroup on this node (standalone mode).
pub const CGROUP_ANNOTATION: &str = "weft.io/cgroup";
/// The annotation naming a local pod's network namespace (standalone mode, for the mesh's
/// proxy; in Kubernetes mode the namespace of a process in the pod's cgroup).
pub const NETNS_ANNOTATION: &str = "weft.io/netns";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.ports[1].port`.
    pub field: String,
    pub message: String,
}

#[derive(Debug, Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// apimachinery's `IsDNS1123Subdomain`: a regular expression and 253 characters in all, with
/// no limit on a part between dots.
fn is_dns1123_subdomain(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(part)
}

/// A `weft.io/cgroup` path: relative, in its one normal spelling (two spellings of one cgroup
/// would be two pods' claims that never meet).
pub fn is_cgroup_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|part| {
            matches!(
                Path::new(part).components().next(),
                Some(Component::Normal(n)) if n == part
            )
        })
}

/// IANA_SVC_NAME: what a named port must look like (1-15 characters of [a-z0-9-], at least one
/// letter, no leading, trailing or double hyphen).
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A label or annotation key: an optional DNS subdomain prefix and a name of up to 63
/// characters of [A-Za-z0-9._-] starting and ending alphanumeric.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns1123_subdomain) && is_label_value(name) && !name.is_empty()
}

/// A label value: empty, or up to 63 characters of [A-Za-z0-9._-] starting and ending
/// alphanumeric.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

fn protocol(errors: &mut Errors, field: String, value: Option<&str>) {
    if let Some(p) = value
        && !matches!(p, "TCP" | "UDP" | "SCTP")
    {
        errors.add(
            field,
            format!("unsupported protocol {p:?}: use TCP, UDP or SCTP"),
        );
    }
}

fn port_number(errors: &mut Errors, field: String, port: i32) {
    if !(1..=65_535).contains(&port) {
        errors.add(
            field,
            format!("{port} is not a valid port number (1-65535)"),
        );
    }
}

/// An address as the API server accepts it outside `StrictIPCIDRValidation` (and for values
/// stored before it): read as [`crate::store::object::ip`] reads it.
fn ip(errors: &mut Errors, field: String, value: &str) -> Option<IpAddr> {
    let addr = crate::store::object::ip(value);
    if addr.is_none() {
        errors.add(field, format!("{value:?} is not a valid IP address"));
    }
    addr
}

fn metadata(errors: &mut Errors, meta: &ObjectMeta, namespaced: bool, name_ok: fn(&str) -> bool) {
    match meta.name.as_deref() {
        None | Some("") => errors.add("metadata.name", "required"),
        Some(n) if !name_ok(n) => errors.add("metadata.name", format!("{n:?} is not a valid name")),
        Some(_) => {}
    }
    if let Some(ns) = meta.namespace.as_deref()
        && namespaced
        && !is_dns1123_label(ns)
    {
        errors.add(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name"),
        );
    }
    for (key, value) in meta.labels.iter().flatten() {
        if !is_qualified_name(key) {
            errors.add(format!("metadata.labels[{key}]"), "invalid label key");
        }
        if !is_label_value(value) {
            errors.add(
                format!("metadata.labels[{key}]"),
                format!("invalid label value {value:?}"),
            );
        }
    }
}

/// Validates an object of any kind.
pub fn object(object: &super::Object) -> Result<(), Vec<FieldError>> {
    use super::Object;
    match object {
        Object::Namespace(o) => namespace(o),
        Object::Pod(o) => pod(o),
        Object::Service(o) => service(o),
        Object::EndpointSlice(o) => endpoint_slice(o),
        Object::NetworkPolicy(o) => network_policy(o),
        Object::PeerAuthentication(o) => security::peer_authentication(o),
        Object::AuthorizationPolicy(o) => security::authorization_policy(o),
        Object::DestinationRule(o) => networking::destination_rule(o),
    }
}

pub fn namespace(ns: &Namespace) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &ns.metadata, false, is_dns1123_label);
    e.into_result()
}

pub fn service(svc: &Service) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    // A DNS-1123 label, not DNS-1035: `RelaxedServiceNameValidation` (on from 1.36) lets a
    // name start with a digit.
    metadata(&mut e, &svc.metadata, true, is_dns1123_label);
    let Some(spec) = &svc.spec else {
        e.add("spec", "required");
        return e.into_result();
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        kind,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        e.add("spec.type", format!("unsupported type {kind:?}"));
    }
    let families = cluster_ips(&mut e, spec);
    ip_families(&mut e, spec, &families);
    let ports = spec.ports.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if ports.is_empty() && kind != "ExternalName" && !headless {
        e.add("spec.ports", "at least one port is required");
    }
    service_ports(&mut e, ports);
    session_affinity(&mut e, spec);
    for (key, value) in spec.selector.iter().flatten() {
        if !is_qualified_name(key) || !is_label_value(value) {
            e.add(
                format!("spec.selector[{key}]"),
                format!("invalid selector {key}={value}"),
            );
        }
    }
    e.into_result()
}

/// clusterIP and clusterIPs: "None" (headless) or IP addresses of distinct families, the first
/// of clusterIPs equal to clusterIP. Returns whether each address is IPv4, in order.
fn cluster_ips(e: &mut Errors, spec: &ServiceSpec) -> Vec<bool> {
    let cluster_ip = spec.cluster_ip.as_deref().filter(|s| !s.is_empty());
    let cluster_ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if let (Some(ip), Some(first)) = (cluster_ip, cluster_ips.first())
        && ip != *first
    {
        e.add(
            "spec.clusterIPs[0]",
            format!("must equal spec.clusterIP {ip:?}"),
        );
    }
    let all: Vec<(String, &str)> = if cluster_ips.is_empty() {
        cluster_ip
            .map(|ip| ("spec.clusterIP".to_owned(), ip))
            .into_iter()
            .collect()
    } else {
        cluster_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), *ip))
            .collect()
    };
    if all.len() > 2 {
        e.add("spec.clusterIPs", "at most two addresses (one per family)");
    }
    let mut families = Vec::new();
    for (field, value) in &all {
        if *value == "None" {
            if all.len() > 1 {
                e.add(field.clone(), "\"None\" (headless) must be the only value");
            }
            continue;
        }
        if let Some(addr) = ip(e, field.clone(), value) {
            if families.contains(&addr.is_ipv4()) {
                e.add(field.clone(), "two addresses of the same family");
            }
            families.push(addr.is_ipv4());
        }
    }
    families
}

/// ipFamilies: IPv4 or IPv6, matching the cluster IP at the same position.
fn ip_families(e: &mut Errors, spec: &ServiceSpec, families: &[bool]) {
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        let field = format!("spec.ipFamilies[{i}]");
        match (family.as_str(), families.get(i)) {
            ("IPv4" | "IPv6", None) => {}
            ("IPv4", Some(true)) | ("IPv6", Some(false)) => {}
            ("IPv4" | "IPv6", Some(_)) => e.add(
                field,
                format!(
                    "{family} does not match the family of the cluster IP at the same position"
                ),
            ),
            _ => e.add(
                field,
                format!("unsupported family {family:?}: use IPv4 or IPv6"),
            ),
        }
    }
}

/// Names (required when there are several, unique), numbers, protocols and target ports.
fn service_ports(e: &mut Errors, ports: &[ServicePort]) {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = |s: &str| format!("spec.ports[{i}].{s}");
        match p.name.as_deref() {
            Some(n) if !n.is_empty() => {
                if !is_dns1123_label(n) {
                    e.add(f("name"), format!("{n:?} is not a valid port name"));
                }
                if !names.insert(n) {
                    e.add(f("name"), format!("duplicate port name {n:?}"));
                }
            }
            _ if ports.len() > 1 => e.add(f("name"), "required when a Service has several ports"),
            _ => {}
        }
        port_number(e, f("port"), p.port);
        protocol(e, f("protocol"), p.protocol.as_deref());
        if !numbers.insert((p.port, p.protocol.as_deref().unwrap_or("TCP"))) {
            e.add(
                f("port"),
                format!("duplicate port {} with the same protocol", p.port),
            );
        }
        match &p.target_port {
            Some(IntOrString::Int(n)) => port_number(e, f("targetPort"), *n),
            Some(IntOrString::String(s)) if !is_port_name(s) => {
                e.add(
                    f("targetPort"),
                    format!("{s:?} is neither a port number nor a valid port name"),
                );
            }
            _ => {}
        }
    }
}

/// sessionAffinity None or ClientIP, its config only with ClientIP, a timeout of 1 s to a day.
fn session_affinity(e: &mut Errors, spec: &ServiceSpec) {
    let client_ip = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref());
    match spec.session_affinity.as_deref() {
        None | Some("None") => {
            if client_ip.is_some() {
                e.add(
                    "spec.sessionAffinityConfig",
                    "only valid with sessionAffinity: ClientIP",
                );
            }
        }
        Some("ClientIP") => {
            if let Some(t) = client_ip.and_then(|c| c.timeout_seconds)
                && !(1..=86_400).contains(&t)
            {
                e.add(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not in 1-86400"),
                );
            }
        }
        Some(other) => e.add(
            "spec.sessionAffinity",
            format!("unsupported value {other:?}: use None or ClientIP"),
        ),
    }
}

pub fn pod(pod: &Pod) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &pod.metadata, true, is_dns1123_subdomain);
    if let Some(path) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CGROUP_ANNOTATION))
    {
        let field = format!("metadata.annotations[{CGROUP_ANNOTATION}]");
        if !is_cgroup_path(path) {
            e.add(
                field,
                format!(
                    "{path:?} must be a relative path below --cgroup-root, without `..`, `.`, \
                     empty parts or a trailing slash"
                ),
            );
        }
    }
    let status = pod.status.as_ref();
    let pod_ip = status.and_then(|s| s.pod_ip.as_deref());
    let pod_ips: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if let Some(ip_str) = pod_ip {
        ip(&mut e, "status.podIP".into(), ip_str);
        if let Some(first) = pod_ips.first()
            && first != &ip_str
        {
            e.add(
                "status.podIPs[0].ip",
                format!("must equal status.podIP {ip_str:?}"),
            );
        }
    }
    let mut families = Vec::new();
    for (i, value) in pod_ips.iter().enumerate() {
        if let Some(addr) = ip(&mut e, format!("status.podIPs[{i}].ip"), value) {
            if families.contains(&addr.is_ipv4()) {
                e.add(
                    format!("status.podIPs[{i}].ip"),
                    "two addresses of the same family",
                );
            }
            families.push(addr.is_ipv4());
        }
    }
    for (c, container) in pod.spec.iter().flat_map(|s| &s.containers).enumerate() {
        // Unique within a container only: the API server accepts (with a warning) two
        // containers of one pod naming a port alike, and charts do it.
        let mut names = BTreeSet::new();
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let f = |s: &str| format!("spec.containers[{c}].ports[{i}].{s}");
            port_number(&mut e, f("containerPort"), p.container_port);
            protocol(&mut e, f("protocol"), p.protocol.as_deref());
            if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
                if !is_port_name(n) {
                    e.add(f("name"), format!("{n:?} is not a valid port name"));
                }
                if !names.insert(n) {
                    e.add(
                        f("name"),
                        format!("duplicate port name {n:?} in the container"),
                    );
                }
            }
        }
    }
    // Condition statuses are not checked: the API server does not either (only "True"
    // counts as ready).
    e.into_result()
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &slice.metadata, true, is_dns1123_subdomain);
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            e.add(
                "addressType",
                format!("unsupported address type {other:?}: use IPv4, IPv6 or FQDN"),
            );
            None
        }
    };
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() || ep.addresses.len() > 100 {
            e.add(
                format!("endpoints[{i}].addresses"),
                "must have 1 to 100 addresses",
            );
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match family {
                Some(v4) => {
                    if let Some(addr) = ip(&mut e, field.clone(), a)
                        && addr.is_ipv4() != v4
                    {
                        e.add(
                            field,
                            format!("{a} does not match addressType {}", slice.address_type),
                        );
                    }
                }
                // `IsFullyQualifiedDomainName` allows one trailing dot.
                None if !is_dns1123_subdomain(a.strip_suffix('.').unwrap_or(a)) => {
                    e.add(field, format!("{a:?} is not a valid FQDN"))
                }
                None => {}
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let f = |s: &str| format!("ports[{i}].{s}");
        // The port number is not range-checked by the API server; compile skips one that is
        // not a port.
        protocol(&mut e, f("protocol"), p.protocol.as_deref());
        let name = p.name.as_deref().unwrap_or("");
        if !name.is_empty() && !is_dns1123_label(name) {
            e.add(f("name"), format!("{name:?} is not a valid port name"));
        }
        if !names.insert(name) {
            e.add(f("name"), format!("duplicate port name {name:?}"));
        }
    }
    e.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_dns1123_label("web-1"));
        assert!(!is_dns1123_label("Web"));
        assert!(is_dns1123_subdomain(&format!("{}.example", "a".repeat(70))));
        assert!(is_port_name("http-alt"));
        assert!(!is_port_name("http--alt"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("a-very-long-port-name"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("-bad"));
        assert!(is_label_value(""));
        assert!(!is_label_value("a b"));
    }

    fn pod_with_ports(containers: &[&[&str]]) -> Result<(), Vec<FieldError>> {
        let containers: Vec<serde_json::Value> = containers
            .iter()
            .enumerate()
            .map(|(i, names)| {
                let ports: Vec<_> = names
                    .iter()
                    .enumerate()
                    .map(
                        |(j, n)| serde_json::json!({"name": n, "containerPort": 8000 + 10 * i + j}),
                    )
                    .collect();
                serde_json::json!({"name": format!("c{i}"), "ports": ports})
            })
            .collect();
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": {"containers": containers},
        }))
        .expect("pod");
        pod(&p)
    }

    /// The API server only warns about this; charts do it.
    #[test]
    fn two_containers_may_name_a_port_alike() {
        assert_eq!(pod_with_ports(&[&["metrics"], &["metrics"]]), Ok(()));
    }

    #[test]
    fn one_container_may_not_name_two_ports_alike() {
        let errors = pod_with_ports(&[&["metrics", "metrics"]]).expect_err("rejected");
        assert_eq!(
            errors,
            [FieldError {
                field: "spec.containers[0].ports[1].name".into(),
                message: "duplicate port name \"metrics\" in the container".into(),
            }]
        );
    }
}
