//! Adversarial suite: the ways a tenant could get around isolation, freeze it, or break
//! another tenant's traffic (issue 13), each shown closed. Every test here failed on the code
//! before the fix it covers.
mod capacity;
mod cgroups;
mod icmp;
mod input;
mod node;
mod services;
mod surface;
mod upgrade;

use std::time::Duration;

use weft_testkit::{Agent, Node, NodeBuilder, k8s, proc::Process};

/// Pods `client` and `server` of `default`, labelled `app: client` and `app: server` (with
/// an `http` port 8080), as a source file.
pub fn client_server_pods(node: &Node) -> String {
    k8s::http_pods(
        node,
        "default",
        &[
            ("client", &[("app", "client")]),
            ("server", &[("app", "server")]),
        ],
    )
}

/// A node of `builder` with pods `client` and `server` declared ([`client_server_pods`]), and
/// a server in `server` answering "server" on these TCP ports.
pub fn client_server(builder: NodeBuilder, ports: &[&str]) -> (Node, Process) {
    let node = builder.pod("client").pod("server").build();
    node.write_source("pods.yaml", &client_server_pods(&node));
    let mut args = vec!["serve", "--name", "server"];
    for p in ports {
        args.extend(["--tcp", *p]);
    }
    let server = node.start_server("server", &args);
    (node, server)
}

/// A fake API server holding namespace `default` and the documents of `docs` (the node's pods
/// bound to their simulated pods).
pub fn api_with(node: &Node, docs: &[String]) -> weft_testkit::fakeapi::FakeApi {
    let api = weft_testkit::fakeapi::FakeApi::start();
    api.apply(serde_json::json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    k8s::apply_to_api(&api, node, &k8s::file(docs));
    api
}

/// Ingress to `server` isolated, nothing allowed.
pub const DENY_SERVER_INGRESS: &str =
    "podSelector: {matchLabels: {app: server}}\npolicyTypes: [Ingress]";

/// `tcp:<server's address>:<port>`.
pub fn server_target(node: &Node, port: u16) -> String {
    format!("tcp:{}:{port}", node.pod("server").ipv4)
}

/// Waits until `weft policies` shows `pod` (`namespace/name`) isolated as asked, in the kernel.
pub fn wait_isolated(agent: &Agent, pod: &str, ingress: bool, egress: bool) {
    agent.wait_policies(&format!("{pod} isolated in {ingress}/{egress}"), |v| {
        v["endpoints"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["pod"] == pod
                    && e["ingress_isolated"] == ingress
                    && e["egress_isolated"] == egress
                    && e["in_kernel"] == true
            })
        })
    });
}

/// Probes `target` (`tcp:ip:port` or `udp:ip:port`) from `pod` once: the name the server
/// answered with, or the error.
pub fn probe(node: &Node, pod: &str, target: &str) -> String {
    let mut p = node.spawn(pod, &["probe", "--timeout-ms", "1000", target]);
    p.probe_results()[target]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Probes until the answer is `want` (a change takes a moment to reach the kernel), for up to
/// 10 s; panics with the last answer otherwise.
#[track_caller]
pub fn expect_probe(node: &Node, pod: &str, target: &str, want: Reach) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe(node, pod, target);
        if want.matches(&got) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pod} -> {target}: expected {want:?}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a probe should find.
#[derive(Debug, Clone, Copy)]
pub enum Reach {
    /// The server named this.
    Answer(&'static str),
    /// Any error (refused by policy, timed out).
    Blocked,
}

impl Reach {
    fn matches(self, got: &str) -> bool {
        match self {
            Self::Answer(name) => got == name,
            Self::Blocked => got.starts_with("error"),
        }
    }
}
