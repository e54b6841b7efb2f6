//! Kubernetes YAML for the simulated node's standalone source, and the same objects as the
//! fake API server holds them.
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    fakeapi::FakeApi,
    node::{Node, Pod},
};

/// The node name of `--source kubernetes` tests (pods of the node have it as nodeName).
pub const NODE_NAME: &str = "node-a";

/// A document of the standalone source as the API server holds it: a Pod loses its
/// `weft.io/cgroup` annotation (it names the simulated pod) and gets that pod's UID and
/// `spec.nodeName` = [`NODE_NAME`].
pub fn api_object(node: &Node, doc: &str) -> Value {
    api_object_with(|sim| node.pod(sim), doc)
}

/// [`api_object`] with the simulated pod found by `pod_of` (on any node of a cluster): its
/// `spec.nodeName` is its own node's name ([`Pod::node`]), or [`NODE_NAME`].
pub fn api_object_with<'a>(pod_of: impl Fn(&str) -> &'a Pod, doc: &str) -> Value {
    let mut v: Value = serde_saphyr::from_str(doc)
        .unwrap_or_else(|e| panic!("test YAML does not parse: {e}\n{doc}"));
    if v["kind"] == "Pod" {
        let annotations = v["metadata"]["annotations"]
            .as_object_mut()
            .unwrap_or_else(|| panic!("a test Pod names its simulated pod: {doc}"));
        let sim = annotations
            .remove("weft.io/cgroup")
            .and_then(|c| c.as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("a test Pod names its simulated pod: {doc}"));
        let pod = pod_of(&sim);
        v["metadata"]["uid"] = json!(pod.uid);
        v["spec"]["nodeName"] = json!(pod.node.as_deref().unwrap_or(NODE_NAME));
    }
    v
}

/// Applies every document of a multi-document text to the fake API server.
pub fn apply_to_api(api: &FakeApi, node: &Node, text: &str) {
    for doc in text.split("---\n").filter(|d| !d.trim().is_empty()) {
        api.apply(api_object(node, doc));
    }
}

/// An EndpointSlice of a Service as the endpointslice controller writes it: one endpoint per
/// pod `(pod, ready)`, ports `(name, port, protocol)`.
pub fn endpoint_slice(
    service: &str,
    namespace: &str,
    endpoints: &[(&Pod, bool)],
    ports: &[(&str, u16, &str)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(p, ready)| json!({
            "addresses": [p.ipv4.to_string()],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "nodeName": p.node.as_deref().unwrap_or(NODE_NAME),
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": p.name, "uid": p.uid},
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(name, port, proto)| json!({
            "name": name, "port": port, "protocol": proto,
        })).collect::<Vec<_>>(),
    })
}

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
    let _ = writeln!(
        y,
        "  annotations:\n    weft.io/cgroup: {}\n    weft.io/netns: {}",
        p.relative_cgroup,
        p.netns_path().display()
    );
    if !labels.is_empty() {
        let _ = writeln!(y, "  labels:");
        for (k, v) in labels {
            let _ = writeln!(y, "    {k}: \"{v}\"");
        }
    }
    let _ = writeln!(y, "spec:");
    if let Some(node) = &p.node {
        let _ = writeln!(y, "  nodeName: \"{node}\"");
    }
    let _ = writeln!(y, "  containers:\n  - name: main\n    image: weft-pod");
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

/// A node with two pods, `client` and `server`, both declared (unlabelled, in `default`)
/// in the node's source directory.
pub fn client_server_node(test: &str) -> Node {
    let node = Node::builder(test).pod("client").pod("server").build();
    node.write_source(
        "pods.yaml",
        &http_pods(&node, "default", &[("client", &[]), ("server", &[])]),
    );
    node
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
