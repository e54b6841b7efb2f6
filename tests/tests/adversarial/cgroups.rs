//! 2. A pod cannot take over another pod's cgroup.
use serde_json::json;
use weft_testkit::{
    Agent, AgentOptions, Node,
    fakeapi::FakeApi,
    k8s::{self, NODE_NAME},
    netpol::np,
};

use crate::{Reach, expect_probe};

/// A pod of this node that names the victim's UID as its static pod's: the annotation a
/// kubelet writes on mirror pods, here with a forged Node owner too, and a name sorting after
/// the victim's.
fn impostor(victim_uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "zz-impostor",
            "namespace": "default",
            "uid": "99999999-8888-7777-6666-555555555555",
            "annotations": {"kubernetes.io/config.mirror": victim_uid},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": NODE_NAME,
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true,
            }],
        },
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running"},
    })
}

#[test]
fn a_pod_claiming_anothers_cgroup_never_loosens_its_isolation() {
    let node = Node::builder("adv_cgroup_claim")
        .kubelet_cgroups()
        .pod("client")
        .pod("server")
        .build();
    let _server = node.start_server("server", &["serve", "--name", "server", "--tcp", "8080"]);
    let api = FakeApi::start();
    api.apply(json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    let docs = k8s::file(&[
        k8s::pod(
            node.pod("client"),
            "default",
            &[("app", "client")],
            &[],
            true,
        ),
        k8s::pod(
            node.pod("server"),
            "default",
            &[("app", "server")],
            &[],
            true,
        ),
        np(
            "default",
            "deny",
            "podSelector: {matchLabels: {app: server}}\npolicyTypes: [Ingress]",
        ),
    ]);
    k8s::apply_to_api(&api, &node, &docs);
    let agent = Agent::start_with(&node, AgentOptions::with_api(&api, &node, &[]));
    let target = format!("tcp:{}:8080", node.pod("server").ipv4);
    expect_probe(&node, "client", &target, Reach::Blocked);
    api.apply(impostor(&node.pod("server").uid));
    let v = agent.wait_policies("the impostor seen", |v| {
        v["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["pod"] == "default/zz-impostor"))
    });
    expect_probe(&node, "client", &target, Reach::Blocked);
    let shared: Vec<_> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["quarantine"] == "shared_cgroup")
        .collect();
    assert_eq!(shared.len(), 1, "the one cgroup is quarantined: {v}");
    api.delete("Pod", "default", "zz-impostor");
    agent.wait_policies("the server alone again", |v| {
        v["endpoints"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["pod"] == "default/server" && e["ingress_policies"][0] == "default/deny")
                && e.iter().all(|e| e["quarantine"].is_null())
        })
    });
    expect_probe(&node, "client", &target, Reach::Blocked);
}
