//! 2. A pod cannot take over another pod's cgroup.
use serde_json::json;
use weft_testkit::{
    Agent, AgentOptions, Node,
    k8s::{self, NODE_NAME},
    netpol::np,
};

use crate::{
    DENY_SERVER_INGRESS, Reach, client_server, client_server_pods, expect_probe, server_target,
};

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
    let (node, _server) = client_server(
        Node::builder("adv_cgroup_claim").kubelet_cgroups(),
        &["8080"],
    );
    let api = crate::api_with(
        &node,
        &[
            client_server_pods(&node),
            np("default", "deny", DENY_SERVER_INGRESS),
        ],
    );
    let agent = Agent::start_with(&node, AgentOptions::with_api(&api, &node, &[]));
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Blocked);
    api.apply(impostor(&node.pod("server").uid));
    agent.wait_policies("the impostor seen", |v| {
        v["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["pod"] == "default/zz-impostor"))
    });
    expect_probe(&node, "client", &target, Reach::Blocked);
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

/// Two pods of the standalone source naming one cgroup: neither pod's policies decide for the
/// processes in it; both are isolated and reported.
#[test]
fn two_pods_claiming_one_cgroup_are_both_isolated() {
    let (node, _server) = client_server(Node::builder("adv_cgroup_twice"), &["8080"]);
    let twin = k8s::pod_named(
        node.pod("server"),
        "default",
        "zz-twin",
        &[("app", "twin")],
        &[],
        true,
    )
    .replace(
        &format!("podIP: {}", node.pod("server").ipv4),
        "podIP: 10.0.0.99",
    )
    .replace(
        &format!("- ip: {}\n", node.pod("server").ipv4),
        "- ip: 10.0.0.99\n",
    );
    node.write_source("pods.yaml", &k8s::file(&[client_server_pods(&node), twin]));
    node.write_source("policy.yaml", &np("default", "deny", DENY_SERVER_INGRESS));
    let agent = Agent::with_source(&node, &[]);
    let v = agent.wait_policies("the cgroup quarantined", |v| {
        v["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["pod"] == "default/zz-twin"))
    });
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Blocked);
    let quarantined: Vec<_> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["quarantine"] == "shared_cgroup")
        .collect();
    assert_eq!(quarantined.len(), 1, "{v}");
    let status = agent.wait_status("reported", |s| s["healthy"] == false);
    assert!(status.to_string().contains("shared_cgroup"), "{status}");
}

/// Nested and rootless nodes put pods deeper than a kubelet on the host does: a pod 8 levels
/// below the root is enforced (the kernel used to look 6 deep and silently skip it).
#[test]
fn a_deeply_nested_pod_is_enforced() {
    let (node, _server) = client_server(Node::builder("adv_cgroup_deep").nested(7), &["8080"]);
    node.write_source("policy.yaml", &np("default", "deny", DENY_SERVER_INGRESS));
    let agent = Agent::with_source(&node, &[]);
    crate::wait_isolated(&agent, "default/server", true, false);
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Blocked);
}

/// Kubernetes mode: a pod whose cgroup exists before the agent knows the pod (the kubelet
/// creates it, the API has not told the agent yet) is isolated both ways until it is bound;
/// a host-network process of the node is not taken for one.
#[test]
fn a_pod_not_bound_yet_is_isolated_both_ways() {
    let (node, _server) = client_server(
        Node::builder("adv_cgroup_unbound")
            .kubelet_cgroups()
            .pod("newcomer"),
        &["8080"],
    );
    let _newcomer_server = node.start_server(
        "newcomer",
        &["serve", "--name", "newcomer", "--tcp", "8080"],
    );
    let api = crate::api_with(&node, &[client_server_pods(&node)]);
    let agent = Agent::start_with(&node, AgentOptions::with_api(&api, &node, &[]));
    agent.wait_status("ready", |s| s["services"]["ready"] == true);
    let to_server = server_target(&node, 8080);
    let to_newcomer = format!("tcp:{}:8080", node.pod("newcomer").ipv4);
    expect_probe(&node, "client", &to_server, Reach::Answer("server"));
    expect_probe(&node, "newcomer", &to_server, Reach::Blocked);
    expect_probe(&node, "client", &to_newcomer, Reach::Blocked);
    let mut host = node.spawn_host(&["probe", "--timeout-ms", "1000", &to_server]);
    assert_eq!(host.probe_results()[&to_server], "server");
    agent.wait_metrics("the unbound pod's drops counted", |m| {
        weft_testkit::prom::sum(m, "weft_dropped_flows_total", &[("reason", "unbound_pod")]) >= 2.0
    });

    k8s::apply_to_api(
        &api,
        &node,
        &k8s::http_pods(&node, "default", &[("newcomer", &[("app", "newcomer")])]),
    );
    expect_probe(&node, "newcomer", &to_server, Reach::Answer("server"));
    expect_probe(&node, "client", &to_newcomer, Reach::Answer("newcomer"));
}

/// Under a cgroup namespace the agent sees its cgroup root as the cgroup2 root, while the
/// kernel counts levels from the real one: the deepest pod the kernel looks for (12 levels
/// below the root) is enforced there too.
#[test]
fn under_a_cgroup_namespace_the_deepest_pod_is_enforced() {
    let (node, _server) = client_server(Node::builder("adv_cgroup_ns").nested(11), &["8080"]);
    node.write_source("policy.yaml", &np("default", "deny", DENY_SERVER_INGRESS));
    let mut options = AgentOptions::with_source(&[]);
    options.cgroup_namespace = true;
    let agent = Agent::start_with(&node, options);
    crate::wait_isolated(&agent, "default/server", true, false);
    expect_probe(&node, "client", &server_target(&node, 8080), Reach::Blocked);
}
