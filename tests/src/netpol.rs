//! The upstream NetworkPolicy e2e model (kubernetes test/e2e/network/netpol): namespaces x, y,
//! z with pods a, b, c; every pod serves TCP and UDP on 80 and 81 and has a ClusterIP Service.
//! Probes run from every pod to every pod at once and are compared as whole truth tables.
use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    sync::Arc,
    time::Duration,
};

use crate::{cluster::Cluster, fakeapi::FakeApi, k8s, node::Node, proc::Process};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Ports every pod serves, on TCP and UDP, with named container ports `serve-80-tcp` etc.
pub const PORTS: [u16; 2] = [80, 81];

/// How a probe reaches its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    PodIp,
    ClusterIp,
}

/// A NetworkPolicy document; `spec` is YAML indented by 2 (the body of `spec:`).
pub fn np(namespace: &str, name: &str, spec: &str) -> String {
    let spec: String = spec
        .trim_matches('\n')
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: \"{namespace}\"\nspec:\n{spec}"
    )
}

/// `namespace/name` of a Kubernetes document, read from its metadata.
pub fn object_name(doc: &str) -> String {
    let v: serde_json::Value = serde_saphyr::from_str(doc).expect("a YAML document");
    let meta = &v["metadata"];
    let (ns, name) = (meta["namespace"].as_str(), meta["name"].as_str());
    format!(
        "{}/{}",
        ns.expect("metadata.namespace"),
        name.expect("metadata.name")
    )
}

/// `namespace/pod` of every pod, in table order.
pub fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Reachability from each pod (rows) to each pod (columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    cells: BTreeMap<(String, String), bool>,
}

impl Table {
    /// Every pair set to `value`.
    pub fn all(value: bool) -> Self {
        let pods = all_pods();
        let cells = pods
            .iter()
            .flat_map(|f| pods.iter().map(move |t| ((f.clone(), t.clone()), value)))
            .collect();
        Self { cells }
    }

    pub fn set(&mut self, from: &str, to: &str, value: bool) -> &mut Self {
        assert!(
            self.cells.contains_key(&(from.to_owned(), to.to_owned())),
            "no pair {from} -> {to}"
        );
        self.cells.insert((from.to_owned(), to.to_owned()), value);
        self
    }

    pub fn get(&self, from: &str, to: &str) -> bool {
        self.cells[&(from.to_owned(), to.to_owned())]
    }

    /// Sets every pair whose source matches `from` and destination matches `to`.
    pub fn set_where(
        &mut self,
        from: impl Fn(&str) -> bool,
        to: impl Fn(&str) -> bool,
        value: bool,
    ) -> &mut Self {
        for ((f, t), v) in &mut self.cells {
            if from(f) && to(t) {
                *v = value;
            }
        }
        self
    }

    /// Nothing reaches `to` except from `except` sources (and itself: a pod always reaches
    /// itself).
    pub fn deny_to(&mut self, to: &str) -> &mut Self {
        self.set_where(|f| f != to, |t| t == to, false)
    }

    /// `from` reaches nothing (except itself).
    pub fn deny_from(&mut self, from: &str) -> &mut Self {
        self.set_where(|f| f == from, |t| t != from, false)
    }

    /// The pairs where `self` and `other` differ.
    pub fn diff(&self, other: &Self) -> Vec<String> {
        self.cells
            .iter()
            .filter(|(k, v)| other.cells.get(*k) != Some(*v))
            .map(|((f, t), v)| format!("{f} -> {t}: expected {v}"))
            .collect()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pods = all_pods();
        write!(f, "{:>5}", "")?;
        for t in &pods {
            write!(f, " {t:>4}")?;
        }
        writeln!(f)?;
        for from in &pods {
            write!(f, "{from:>5}")?;
            for to in &pods {
                let v = if self.get(from, to) { "." } else { "X" };
                write!(f, " {v:>4}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// Where the model's pods run.
#[derive(Debug)]
enum Place {
    Node(Node),
    /// Over two nodes, every other pod of [`all_pods`] on each (x/a on `a`, x/b on `b`, ...).
    Cluster(Cluster),
}

/// The model's node(s), its objects and its servers.
#[derive(Debug)]
pub struct Model {
    place: Place,
    /// Objects go to this fake API server instead of the source directory.
    api: Option<Arc<FakeApi>>,
    namespace_labels: BTreeMap<String, Vec<(String, String)>>,
    pod_labels: BTreeMap<String, Vec<(String, String)>>,
    _servers: Vec<Process>,
}

/// The node's pod of `ns/pod` (named `ns-pod`).
fn node_pod(pod: &str) -> String {
    pod.replace('/', "-")
}

impl Model {
    /// Builds the node, writes namespaces, pods and services to the source directory, and
    /// starts every server. Start the agent afterwards.
    pub fn new(test: &str) -> Self {
        Self::build(test, None)
    }

    /// Like [`Model::new`], with every object in a fake API server (pods are of node
    /// [`k8s::NODE_NAME`], their cgroups where the kubelet puts them).
    pub fn with_api(test: &str, api: Arc<FakeApi>) -> Self {
        Self::build(test, Some(api))
    }

    /// Like [`Model::new`], with the pods over two nodes of a cluster (`a` and `b`, every
    /// other pod on each), their objects in the cluster's shared source directory. Start an
    /// agent on each node afterwards.
    pub fn over_two_nodes(test: &str) -> Self {
        let pods: Vec<String> = all_pods().iter().map(|p| node_pod(p)).collect();
        let on = |parity: usize| -> Vec<&str> {
            pods.iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == parity)
                .map(|(_, p)| p.as_str())
                .collect()
        };
        let cluster = Cluster::builder(test)
            .node("a", &on(0))
            .node("b", &on(1))
            .build();
        Self::serve(Place::Cluster(cluster), None)
    }

    fn build(test: &str, api: Option<Arc<FakeApi>>) -> Self {
        let mut builder = Node::builder(test);
        if api.is_some() {
            builder = builder.kubelet_cgroups();
        }
        for p in all_pods() {
            builder = builder.pod(&node_pod(&p));
        }
        Self::serve(Place::Node(builder.build()), api)
    }

    /// Starts every pod's server and writes every object.
    fn serve(place: Place, api: Option<Arc<FakeApi>>) -> Self {
        let mut model = Self {
            namespace_labels: NAMESPACES
                .iter()
                .map(|ns| ((*ns).to_owned(), vec![("ns".to_owned(), (*ns).to_owned())]))
                .collect(),
            pod_labels: all_pods()
                .into_iter()
                .map(|p| {
                    let name = p.split('/').nth(1).unwrap_or_default().to_owned();
                    (p, vec![("pod".to_owned(), name)])
                })
                .collect(),
            place,
            api,
            _servers: Vec::new(),
        };
        for p in all_pods() {
            let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
            let mut args: Vec<&str> = vec!["serve", "--name", p.as_str()];
            for port in &ports {
                args.extend(["--tcp", port, "--udp", port]);
            }
            let server = model.host(&p).start_server(&node_pod(&p), &args);
            model._servers.push(server);
        }
        model.write_namespaces();
        model.write_pods();
        model.write_services();
        model
    }

    /// The node (of a one-node model).
    pub fn node(&self) -> &Node {
        match &self.place {
            Place::Node(node) => node,
            Place::Cluster(_) => panic!("the model is over two nodes: use cluster()"),
        }
    }

    /// The cluster (of a two-node model).
    pub fn cluster(&self) -> &Cluster {
        match &self.place {
            Place::Cluster(c) => c,
            Place::Node(_) => panic!("the model is on one node: use node()"),
        }
    }

    /// The node pod `ns/pod` runs on.
    pub fn host(&self, pod: &str) -> &Node {
        match &self.place {
            Place::Node(node) => node,
            Place::Cluster(c) => c.pod(&node_pod(pod)).0,
        }
    }

    /// Writes a file of the source directory the model's agents read.
    pub fn write_source(&self, file: &str, text: &str) {
        match &self.place {
            Place::Node(node) => node.write_source(file, text),
            Place::Cluster(c) => c.write_source(file, text),
        }
    }

    pub fn pod_ip(&self, pod: &str) -> String {
        self.host(pod).pod(&node_pod(pod)).ipv4.to_string()
    }

    /// The ClusterIP of the pod's Service `s-<pod>`.
    pub fn cluster_ip(&self, pod: &str) -> String {
        let i = all_pods()
            .iter()
            .position(|p| p == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        format!("10.96.1.{}", 10 + i)
    }

    pub fn set_namespace_labels(&mut self, ns: &str, labels: &[(&str, &str)]) {
        self.namespace_labels.insert(ns.to_owned(), owned(labels));
        self.write_namespaces();
    }

    pub fn set_pod_labels(&mut self, pod: &str, labels: &[(&str, &str)]) {
        self.pod_labels.insert(pod.to_owned(), owned(labels));
        self.write_pods();
    }

    fn write_namespaces(&self) {
        let docs: Vec<String> = self
            .namespace_labels
            .iter()
            .map(|(ns, labels)| {
                let mut y =
                    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n");
                if !labels.is_empty() {
                    y.push_str("  labels:\n");
                    for (k, v) in labels {
                        let _ = writeln!(y, "    {k}: \"{v}\"");
                    }
                }
                y
            })
            .collect();
        self.publish("namespaces.yaml", &docs);
    }

    fn write_pods(&self) {
        let ports: Vec<(String, u16, &str)> = PORTS
            .iter()
            .flat_map(|p| {
                [
                    (format!("serve-{p}-tcp"), *p, "TCP"),
                    (format!("serve-{p}-udp"), *p, "UDP"),
                ]
            })
            .collect();
        let ports: Vec<(&str, u16, &str)> =
            ports.iter().map(|(n, p, t)| (n.as_str(), *p, *t)).collect();
        let docs: Vec<String> = all_pods()
            .iter()
            .map(|p| {
                let (ns, name) = p.split_once('/').unwrap_or_default();
                let labels: Vec<(&str, &str)> = self.pod_labels[p]
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let pod = self.host(p).pod(&node_pod(p));
                k8s::pod_named(pod, ns, name, &labels, &ports, true)
            })
            .collect();
        self.publish("pods.yaml", &docs);
    }

    fn write_services(&self) {
        let docs: Vec<String> = all_pods()
            .iter()
            .map(|p| {
                let (ns, name) = p.split_once('/').unwrap_or_default();
                let ip = self.cluster_ip(p);
                let ports: [k8s::Port<'_>; 4] = [
                    ("tcp-80", 80, "80", "TCP"),
                    ("tcp-81", 81, "81", "TCP"),
                    ("udp-80", 80, "80", "UDP"),
                    ("udp-81", 81, "81", "UDP"),
                ];
                k8s::service(
                    &format!("s-{name}"),
                    ns,
                    &[ip.as_str()],
                    &[("pod", name)],
                    &ports,
                    None,
                )
            })
            .collect();
        self.publish("services.yaml", &docs);
    }

    /// Writes `docs` as one file of the source directory, or applies them to the API server.
    pub fn publish(&self, file: &str, docs: &[String]) {
        match &self.api {
            None => self.write_source(file, &k8s::file(docs)),
            Some(api) => k8s::apply_to_api(api, self.node(), &k8s::file(docs)),
        }
    }

    /// Probes every pair once on `port`/`protocol` ("tcp" or "udp"): who reached whom.
    /// A reply must name the pod probed (a ClusterIP has that pod as its only backend).
    pub fn probe(&self, port: u16, protocol: &str, via: Via) -> Table {
        let mut procs = Vec::new();
        for from in all_pods() {
            let targets: Vec<String> = all_pods()
                .iter()
                .map(|to| {
                    let ip = match via {
                        Via::PodIp => self.pod_ip(to),
                        Via::ClusterIp => self.cluster_ip(to),
                    };
                    format!("{protocol}:{ip}:{port}")
                })
                .collect();
            let mut args = vec!["probe", "--timeout-ms", "1000"];
            args.extend(targets.iter().map(String::as_str));
            let p = self.host(&from).spawn(&node_pod(&from), &args);
            procs.push((from.clone(), targets, p));
        }
        let mut table = Table::all(false);
        for (from, targets, mut p) in procs {
            let results = p.probe_results();
            for (to, target) in all_pods().iter().zip(&targets) {
                let answer = results[target].as_str().unwrap_or_default();
                let reached = answer == to.as_str();
                assert!(
                    reached || answer.starts_with("error"),
                    "{from} probing {target} ({to}) got an answer from {answer:?}"
                );
                table.set(&from, to, reached);
            }
        }
        table
    }

    /// Probes until the table is `expected` (a policy change takes a moment to be read), at
    /// most 4 times; panics with both tables otherwise.
    pub fn expect(&self, what: &str, port: u16, protocol: &str, via: Via, expected: &Table) {
        let mut last = None;
        for attempt in 0..4 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            let got = self.probe(port, protocol, via);
            if &got == expected {
                return;
            }
            last = Some(got);
        }
        let got = last.unwrap_or_else(|| Table::all(false));
        panic!(
            "{what}: {protocol}/{port} via {via:?}:\nexpected\n{expected}\ngot\n{got}\ndifferences: {:#?}",
            expected.diff(&got)
        );
    }

    /// [`Model::expect`] through the pod IPs and through the ClusterIPs.
    pub fn expect_both(&self, what: &str, port: u16, protocol: &str, expected: &Table) {
        self.expect(what, port, protocol, Via::PodIp, expected);
        self.expect(what, port, protocol, Via::ClusterIp, expected);
    }
}

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_document_is_named_by_its_metadata() {
        assert_eq!(object_name(&np("x", "deny", "podSelector: {}")), "x/deny");
    }
}
