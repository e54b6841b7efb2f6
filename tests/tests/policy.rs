//! NetworkPolicy on the upstream e2e model (see `weft_testkit::netpol`): cases adapted from
//! kubernetes test/e2e/network/netpol/network_policy.go, each compared as whole truth tables
//! through pod IPs and ClusterIPs.
use std::time::Duration;

use serde_json::Value;
use weft_testkit::{
    Agent, AgentOptions,
    netpol::{Model, Table, Via, np, object_name},
    prom,
};

fn start(test: &str) -> (Model, Agent) {
    start_with(test, &[])
}

/// The model with an agent given `extra` arguments too.
fn start_with(test: &str, extra: &[&str]) -> (Model, Agent) {
    let model = Model::new(test);
    let mut extra_args = vec!["--node-ip".to_owned(), "10.0.0.1".to_owned()];
    extra_args.extend(extra.iter().map(|a| (*a).to_owned()));
    let agent = Agent::start_with(
        model.node(),
        AgentOptions {
            source: true,
            extra_args,
            ..AgentOptions::default()
        },
    );
    agent.wait_policies("all nine pods", |v| {
        v["endpoints"].as_array().is_some_and(|e| e.len() == 9)
    });
    (model, agent)
}

/// Replaces the policy file and waits until the agent enforces exactly these policies (by
/// name) with every pod's set in the kernel.
fn apply(model: &Model, agent: &Agent, docs: &[String]) {
    model
        .node()
        .write_source("policies.yaml", &docs.join("---\n"));
    let want: Vec<String> = docs.iter().map(|d| object_name(d)).collect();
    agent.wait_policies_in_force(&want, Duration::from_secs(10));
}

/// Only `to` is isolated for ingress and only `from` reach it (plus itself).
fn only_from(to: &str, from: &[&str]) -> Table {
    let mut t = Table::all(true);
    t.deny_to(to);
    for f in from {
        t.set(f, to, true);
    }
    t
}

#[test]
fn without_policies_everything_reaches_everything() {
    let (model, _agent) = start("policy_none");
    model.expect_both(
        "no policies: everything reaches everything",
        80,
        "tcp",
        &Table::all(true),
    );
}

/// "should support a 'default-deny-ingress' policy"
#[test]
fn default_deny_ingress() {
    let (model, agent) = start("policy_deny_ingress");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "deny-ingress",
            "podSelector: {}\npolicyTypes: [Ingress]",
        )],
    );
    let mut t = Table::all(true);
    for p in ["x/a", "x/b", "x/c"] {
        t.deny_to(p);
    }
    model.expect_both("default-deny-ingress in x", 80, "tcp", &t);
    model.expect("default-deny-ingress in x", 81, "udp", Via::PodIp, &t);
}

/// "should enforce policy to allow traffic from pods within server namespace based on
/// PodSelector"
#[test]
fn pod_selector_within_the_namespace() {
    let (model, agent) = start("policy_pod_selector");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "allow-b",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
        )],
    );
    model.expect_both(
        "x/a from pod=b in x",
        80,
        "tcp",
        &only_from("x/a", &["x/b"]),
    );
}

/// "should enforce policy to allow ingress traffic for a target" (namespaceSelector In)
#[test]
fn namespace_selector_in() {
    let (model, agent) = start("policy_namespace_in");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "allow-ns-y",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: In, values: [\"y\"]}",
        )],
    );
    model.expect_both(
        "x/a from namespace y",
        80,
        "tcp",
        &only_from("x/a", &["y/a", "y/b", "y/c"]),
    );
}

/// "should enforce policy based on PodSelector or NamespaceSelector" (two peers: OR) and
/// "... PodSelector and NamespaceSelector" (one peer: AND), with NotIn and DoesNotExist.
#[test]
fn peers_are_or_and_selectors_within_a_peer_and() {
    let (model, agent) = start("policy_or_and");
    apply(
        &model,
        &agent,
        &[
            np(
                "x",
                "or",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [x, \"y\"]}\n  - podSelector:\n      matchLabels: {pod: b}",
            ),
            np(
                "x",
                "and",
                "podSelector:\n  matchLabels: {pod: b}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: \"y\"}\n    podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [c]}\n  - podSelector:\n      matchExpressions:\n      - {key: nothing, operator: DoesNotExist}\n      - {key: pod, operator: NotIn, values: [a, b]}",
            ),
        ],
    );
    let mut t = only_from("x/a", &["z/a", "z/b", "z/c", "x/b"]);
    t.deny_to("x/b");
    t.set("y/c", "x/b", true).set("x/c", "x/b", true);
    model.expect_both("OR of two peers, AND within one", 80, "tcp", &t);
}

/// Ports: numbered, named (resolved on the destination pod), ranged; a policy for SCTP must
/// not allow TCP ("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP'").
#[test]
fn named_ranged_and_sctp_ports() {
    let (model, agent) = start("policy_ports");
    apply(
        &model,
        &agent,
        &[
            np(
                "x",
                "named-81",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - {port: serve-81-tcp}\n  - {port: serve-80-udp, protocol: UDP}",
            ),
            np(
                "x",
                "range",
                "podSelector:\n  matchLabels: {pod: b}\ningress:\n- ports:\n  - {port: 79, endPort: 81, protocol: TCP}",
            ),
            np(
                "x",
                "sctp-only",
                "podSelector:\n  matchLabels: {pod: c}\ningress:\n- ports:\n  - {port: 80, protocol: SCTP}",
            ),
        ],
    );
    let deny_x_a_c = {
        let mut t = Table::all(true);
        t.deny_to("x/a").deny_to("x/c");
        t
    };
    model.expect_both("named port serve-81-tcp: not 80", 80, "tcp", &deny_x_a_c);
    let mut t81 = Table::all(true);
    t81.deny_to("x/c");
    model.expect_both("named port serve-81-tcp: 81 open", 81, "tcp", &t81);
    let mut u80 = Table::all(true);
    u80.deny_to("x/b").deny_to("x/c");
    model.expect_both("named UDP port serve-80-udp", 80, "udp", &u80);
}

/// Several policies at once: their union ("should enforce multiple, stacked policies with
/// overlapping podSelectors"; "should allow ingress access from namespace on one named
/// port" is in `named_ranged_and_sctp_ports`).
#[test]
fn stacked_policies_are_a_union() {
    let (model, agent) = start("policy_stacked");
    apply(
        &model,
        &agent,
        &[
            np(
                "x",
                "from-y-on-80",
                "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: \"y\"}\n  ports:\n  - port: 80",
            ),
            np(
                "x",
                "from-z-on-81",
                "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: z}\n  ports:\n  - port: 81",
            ),
        ],
    );
    let stacked = |from_ns: &str| {
        let mut t = Table::all(true);
        for p in ["x/a", "x/b", "x/c"] {
            t.deny_to(p);
        }
        t.set_where(|f| f.starts_with(from_ns), |to| to.starts_with("x/"), true);
        t
    };
    model.expect_both("stacked: y on 80", 80, "tcp", &stacked("y/"));
    model.expect_both("stacked: z on 81", 81, "tcp", &stacked("z/"));
}

/// ipBlock with except, applied to pod addresses ("should enforce except clause while egress
/// access to server in CIDR block"); `weft policy check` and `weft policies` name what
/// decides.
#[test]
fn ip_block_except_applies_to_pod_addresses_and_is_named_by_the_cli() {
    let (model, agent) = start("policy_ipblock");
    let xb = model.pod_ip("x/b");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "cidr",
            &format!(
                "podSelector:\n  matchLabels: {{pod: a}}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/24\n      except: [{xb}/32]"
            ),
        )],
    );
    let mut t = Table::all(true);
    t.set("x/b", "x/a", false);
    model.expect_both("ipBlock 10.0.0.0/24 except x/b", 80, "tcp", &t);

    // What decided, named by `weft policy check`.
    let (allowed, v) = agent.client_args(&[
        "policy", "check", "--from", "x/c", "--to", "x/a", "--port", "80/TCP",
    ]);
    assert!(allowed, "{v:#}");
    assert_eq!(v["ingress"]["rule"], "x/cidr ingress[0]", "{v:#}");
    let (allowed, v) = agent.client_args(&[
        "policy", "check", "--from", "x/b", "--to", "x/a", "--port", "80/TCP",
    ]);
    assert!(!allowed, "{v:#}");
    assert_eq!(v["ingress"]["matched"], "none", "{v:#}");
    assert!(
        v["ingress"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("x/cidr")),
        "the denial names the isolating policy: {v:#}"
    );
    let (_, list) = agent.client("policies");
    let cidr = list["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["policy"] == "x/cidr"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(cidr["selects"], serde_json::json!(["x/a"]), "{list:#}");
    assert!(
        cidr["kernel_entries"].as_u64().is_some_and(|n| n > 0)
            && cidr["kernel_entries"] == cidr["entries"],
        "the kernel holds the policy's entries: {list:#}"
    );
}

/// "should enforce egress policy allowing traffic to a server in a specific namespace based on
/// PodSelector and NamespaceSelector", plus DNS.
#[test]
fn egress_to_one_pod_of_another_namespace() {
    let (model, agent) = start("policy_egress");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "egress-to-y-b",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: \"y\"}\n    podSelector:\n      matchLabels: {pod: b}\n- ports:\n  - {port: 53, protocol: UDP}\n  - {port: 53, protocol: TCP}",
        )],
    );
    let mut t = Table::all(true);
    t.deny_from("x/a").set("x/a", "y/b", true);
    model.expect_both("x/a egress only to y/b", 80, "tcp", &t);
    model.expect_both("x/a egress only to y/b (UDP)", 81, "udp", &t);
}

/// With the socket-to-socket path (`--sockmap`), every pair of these pods is on one node:
/// allowed connections go socket to socket, and the verdicts are exactly those without it,
/// ingress and egress, TCP through pod IPs and ClusterIPs.
#[test]
fn with_sockmap_the_verdicts_are_the_same() {
    let (model, agent) = start_with("policy_sockmap", &["--sockmap"]);
    apply(
        &model,
        &agent,
        &[
            np(
                "x",
                "allow-b",
                "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
            ),
            np(
                "y",
                "egress-to-z",
                "podSelector:\n  matchLabels: {pod: c}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: \"z\"}",
            ),
        ],
    );
    let mut t = only_from("x/a", &["x/b"]);
    t.deny_from("y/c");
    for to in ["z/a", "z/b", "z/c", "y/c"] {
        t.set("y/c", to, true);
    }
    model.expect_both("x/a from x/b only; y/c to z only", 80, "tcp", &t);
}

/// "should allow egress access to DNS only": a DNS-like server on z/c port 53; anything else,
/// the pod's node included (traffic to the node is judged), fails at connect with EPERM.
#[test]
fn egress_to_dns_only_but_the_node() {
    let (model, agent) = start("policy_dns_only");
    let _dns = model
        .node()
        .start_server("z-c", &["serve", "--name", "z/c", "--udp", "53"]);
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "dns-only",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- ports:\n  - {port: 53, protocol: UDP}",
        )],
    );
    let mut t = Table::all(false);
    t.set_where(|_| true, |to| to == "z/c", true);
    model.expect("egress DNS allowed", 53, "udp", Via::PodIp, &t);
    let mut t = Table::all(true);
    t.deny_from("x/a");
    model.expect_both("egress DNS only: nothing else", 80, "tcp", &t);
    // The pod's node too: only traffic from it is always allowed.
    let _node_server = model
        .node()
        .spawn_host(&["serve", "--name", "node", "--tcp", "8081"]);
    _node_server.wait_listening();
    for (target, expected) in [("tcp:10.0.0.1:8081", ""), ("tcp:10.0.1.99:8081", "")] {
        let mut p = model
            .node()
            .spawn("x-a", &["probe", "--timeout-ms", "1000", target]);
        p.wait_success(std::time::Duration::from_secs(10));
        let line = p.stdout().snapshot().join("");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let answer = v["results"][target].as_str().unwrap_or_default();
        if expected.is_empty() {
            assert!(
                answer.contains("EPERM"),
                "x/a may reach nothing else: a denied connect fails at once with EPERM: {v}"
            );
        } else {
            assert_eq!(answer, expected, "x/a reaches its node: {v}");
        }
    }
}

/// A denied connect is one drop: counted once in the drops, once in the verdicts, and once in
/// the flow stream.
#[test]
fn a_denied_connect_is_counted_exactly_once() {
    let (model, agent) = start("policy_counted");
    apply(
        &model,
        &agent,
        &[np(
            "x",
            "deny-egress",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]",
        )],
    );
    let drops = |m: &[prom::Sample]| {
        let drops = prom::sum(
            m,
            "weft_drops_total",
            &[("reason", "policy_denied"), ("direction", "egress")],
        );
        let verdicts = prom::sum(
            m,
            "weft_policy_verdicts_total",
            &[("direction", "egress"), ("action", "deny")],
        );
        (drops, verdicts)
    };
    let before = drops(&agent.metrics());
    let flows_before = agent
        .flows(&["--last", "1000", "--verdict", "denied"])
        .len();
    let target = format!("tcp:{}:80", model.pod_ip("y/b"));
    let mut p = model
        .node()
        .spawn("x-a", &["probe", "--timeout-ms", "1000", &target]);
    p.wait_success(std::time::Duration::from_secs(10));
    let line = p.stdout().snapshot().join("");
    assert!(line.contains("EPERM"), "the connect fails at once: {line}");
    agent.wait_metrics("the denied connect counted", |m| {
        drops(m) == (before.0 + 1.0, before.1 + 1.0)
    });
    // The drop event reaches the flow stream on the reader's next wakeup.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let flows = loop {
        let flows = agent.flows(&["--last", "1000", "--verdict", "denied"]);
        if flows.len() > flows_before || std::time::Instant::now() > deadline {
            break flows;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(flows.len(), flows_before + 1, "{flows:#?}");
    assert_eq!(flows[flows.len() - 1]["destination"]["pod"], "b");
}

/// Replies pass whatever the other side's policies say: x/a may not receive anything and y/b
/// may not send anything, yet x/a -> y/b works both ways on TCP and UDP.
#[test]
fn replies_of_allowed_flows_pass() {
    let (model, agent) = start("policy_replies");
    apply(
        &model,
        &agent,
        &[
            np(
                "x",
                "a-no-ingress",
                "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Ingress]",
            ),
            np(
                "y",
                "b-no-egress",
                "podSelector:\n  matchLabels: {pod: b}\npolicyTypes: [Egress]",
            ),
        ],
    );
    let mut t = Table::all(true);
    t.deny_to("x/a").deny_from("y/b");
    model.expect_both("replies of allowed flows pass", 80, "tcp", &t);
    model.expect_both("replies of allowed UDP flows pass", 80, "udp", &t);
}

/// Updates: a policy, then pod labels, then namespace labels.
#[test]
fn policy_and_label_updates_apply_to_new_connections() {
    let (mut model, agent) = start("policy_updates");
    let allow_from = |selector: &str| {
        np(
            "x",
            "allow",
            &format!("podSelector:\n  matchLabels: {{pod: a}}\ningress:\n- from:\n  - {selector}"),
        )
    };
    apply(
        &model,
        &agent,
        &[allow_from("podSelector:\n      matchLabels: {pod: b}")],
    );
    model.expect(
        "policy: from pod=b",
        80,
        "tcp",
        Via::PodIp,
        &only_from("x/a", &["x/b"]),
    );
    apply(
        &model,
        &agent,
        &[allow_from("podSelector:\n      matchLabels: {pod: c}")],
    );
    model.expect(
        "policy updated: from pod=c",
        80,
        "tcp",
        Via::PodIp,
        &only_from("x/a", &["x/c"]),
    );
    model.set_pod_labels("x/b", &[("pod", "c")]);
    model.expect(
        "pod x/b relabelled pod=c",
        80,
        "tcp",
        Via::PodIp,
        &only_from("x/a", &["x/b", "x/c"]),
    );
    model.set_pod_labels("x/b", &[("pod", "b")]);
    apply(
        &model,
        &agent,
        &[allow_from(
            "namespaceSelector:\n      matchLabels: {team: blue}",
        )],
    );
    model.expect(
        "no namespace is blue",
        80,
        "tcp",
        Via::PodIp,
        &only_from("x/a", &[]),
    );
    model.set_namespace_labels("z", &[("ns", "z"), ("team", "blue")]);
    model.expect(
        "namespace z labelled team=blue",
        80,
        "tcp",
        Via::ClusterIp,
        &only_from("x/a", &["z/a", "z/b", "z/c"]),
    );
}

#[test]
fn invalid_policies_are_rejected_and_isolate_what_either_version_selects() {
    let (model, agent) = start("policy_invalid");
    let good = np(
        "x",
        "p",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
    );
    apply(&model, &agent, std::slice::from_ref(&good));
    let expected = only_from("x/a", &["x/b"]);
    model.expect("the valid version", 80, "tcp", Via::PodIp, &expected);
    // Each bad version of the same policy is rejected with its field named. Nothing either
    // version allowed stays allowed (the bad one may revoke it): the valid one stays without
    // its rules, the rejected one isolates what it selects in the directions it names.
    let bad = [
        (
            "ingress[0].ports[0].protocol",
            "ingress:\n- ports:\n  - {port: 80, protocol: ICMP}",
        ),
        (
            "ingress[0].ports[0].port",
            "ingress:\n- ports:\n  - port: 70000",
        ),
        (
            "ingress[0].ports[0].endPort",
            "ingress:\n- ports:\n  - {port: 81, endPort: 80}",
        ),
        (
            "ingress[0].from[0].ipBlock.cidr",
            "ingress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/33}",
        ),
        (
            "ingress[0].from[0].ipBlock.except[0]",
            "ingress:\n- from:\n  - ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.0/24]}",
        ),
        ("ingress[0].from[0]", "ingress:\n- from:\n  - {}"),
        ("policyTypes[0]", "policyTypes: [Sideways]"),
        (
            "podSelector.matchExpressions[0].operator",
            "podSelector:\n  matchExpressions:\n  - {key: pod, operator: Near, values: [a]}",
        ),
    ];
    for (field, spec) in bad {
        let spec = if spec.starts_with("podSelector") {
            spec.to_owned()
        } else {
            format!("podSelector:\n  matchLabels: {{pod: a}}\n{spec}")
        };
        let doc = np("x", "p", &spec);
        model.write_source("policies.yaml", &doc);
        let status = agent.wait_status(&format!("the rejection of {field}"), |s| {
            s["services"]["rejections"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r.to_string().contains(field)))
        });
        let rejection = status["services"]["rejections"].to_string();
        assert!(
            rejection.contains("NetworkPolicy")
                && rejection.contains("\"x\"")
                && rejection.contains("\"p\""),
            "the rejection names the object: {rejection}"
        );
        let mut now = Table::all(true);
        now.deny_to("x/a");
        match field {
            // Directions that cannot be read: both.
            "policyTypes[0]" => {
                now.deny_from("x/a");
            }
            // A selector that cannot be read: the whole namespace.
            "podSelector.matchExpressions[0].operator" => {
                now.deny_to("x/b").deny_to("x/c");
            }
            _ => {}
        }
        model.expect(
            &format!("both versions isolating, no rule allowing, after a bad {field}"),
            80,
            "tcp",
            Via::PodIp,
            &now,
        );
    }
}
