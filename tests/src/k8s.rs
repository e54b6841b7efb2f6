//! Kubernetes YAML for the simulated node's standalone source.
use std::fmt::Write as _;

use crate::node::Pod;

/// A Pod bound to a simulated pod: its cgroup (annotation `weft.io/cgroup`, relative to the
/// node's cgroup), its addresses, labels and named container ports `(name, port, protocol)`.
pub fn pod(
    p: &Pod,
    namespace: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
    ready: bool,
) -> String {
    pod_named(p, namespace, &p.name, labels, ports, ready)
}

/// [`pod`] with a Pod name other than the simulated pod's.
pub fn pod_named(
    p: &Pod,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
    ready: bool,
) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{name}\"\n  namespace: \"{namespace}\""
    );
    let _ = writeln!(y, "  annotations:\n    weft.io/cgroup: {}", p.name);
    if !labels.is_empty() {
        let _ = writeln!(y, "  labels:");
        for (k, v) in labels {
            let _ = writeln!(y, "    {k}: \"{v}\"");
        }
    }
    let _ = writeln!(
        y,
        "spec:\n  containers:\n  - name: main\n    image: weft-pod"
    );
    if !ports.is_empty() {
        let _ = writeln!(y, "    ports:");
        for (name, port, proto) in ports {
            let _ = writeln!(
                y,
                "    - {{name: {name}, containerPort: {port}, protocol: {proto}}}"
            );
        }
    }
    let _ = writeln!(y, "status:\n  phase: Running\n  podIP: {}", p.ipv4);
    let _ = writeln!(y, "  podIPs:\n  - ip: {}\n  - ip: \"{}\"", p.ipv4, p.ipv6);
    let status = if ready { "True" } else { "False" };
    let _ = writeln!(
        y,
        "  conditions:\n  - {{type: Ready, status: \"{status}\"}}"
    );
    y
}

/// A Service port: (name, port, targetPort, protocol).
pub type Port<'a> = (&'a str, u16, &'a str, &'a str);

/// A ClusterIP Service (one or two cluster IPs) selecting pods by labels.
pub fn service(
    name: &str,
    namespace: &str,
    cluster_ips: &[&str],
    selector: &[(&str, &str)],
    ports: &[Port<'_>],
    affinity_timeout: Option<u32>,
) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: \"{name}\"\n  namespace: \"{namespace}\"\nspec:"
    );
    let _ = writeln!(y, "  clusterIP: \"{}\"", cluster_ips[0]);
    let _ = writeln!(
        y,
        "  clusterIPs: [{}]",
        cluster_ips
            .iter()
            .map(|ip| format!("\"{ip}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !selector.is_empty() {
        let _ = writeln!(y, "  selector:");
        for (k, v) in selector {
            let _ = writeln!(y, "    {k}: \"{v}\"");
        }
    }
    if let Some(t) = affinity_timeout {
        let _ = writeln!(
            y,
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}"
        );
    }
    let _ = writeln!(y, "  ports:");
    for (pname, port, target, proto) in ports {
        let target = if target.parse::<u16>().is_ok() {
            (*target).to_owned()
        } else {
            format!("\"{target}\"")
        };
        let _ = writeln!(
            y,
            "  - {{name: {pname}, port: {port}, targetPort: {target}, protocol: {proto}}}"
        );
    }
    y
}

/// Documents joined into one multi-document file.
pub fn file(docs: &[String]) -> String {
    docs.join("---\n")
}

/// Pods of the node in one namespace, each with its labels and a named `http` port 8080/TCP,
/// ready, as one file.
pub fn http_pods(
    node: &crate::node::Node,
    namespace: &str,
    pods: &[(&str, &[(&str, &str)])],
) -> String {
    let docs: Vec<String> = pods
        .iter()
        .map(|(name, labels)| {
            pod(
                node.pod(name),
                namespace,
                labels,
                &[("http", 8080, "TCP")],
                true,
            )
        })
        .collect();
    file(&docs)
}
