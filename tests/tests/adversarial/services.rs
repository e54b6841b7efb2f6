//! Item 7, service translation corners.
use std::time::Duration;

use weft_testkit::{Agent, Node, k8s, netpol::np, proc::Process};

const DNS_VIP: &str = "10.96.0.53";

/// A node with pods `client`, `b1` and `b2`; each backend answers its name on UDP 5353.
fn udp_backends(test: &str) -> (Node, Vec<Process>) {
    let node = Node::builder(test)
        .pod("client")
        .pod("b1")
        .pod("b2")
        .build();
    let servers = ["b1", "b2"]
        .iter()
        .map(|b| node.start_server(b, &["serve", "--name", b, "--udp", "5353"]))
        .collect();
    (node, servers)
}

/// The node's three pods, unlabelled, in `default`.
fn pods(node: &Node) -> String {
    k8s::http_pods(
        node,
        "default",
        &[("client", &[]), ("b1", &[]), ("b2", &[])],
    )
}

/// A resolver keeps one connected UDP socket to a ClusterIP (glibc does): when its backend
/// leaves the Service, its next send fails, the resolver opens a new socket, and from then
/// on the current backend answers. (It used to stay on the removed backend for good.)
#[test]
fn a_connected_udp_client_moves_off_a_removed_backend() {
    let (node, _servers) = udp_backends("adv_svc_udp_stale");
    let pods = pods(&node);
    let svc = k8s::service(
        "dns",
        "default",
        &[DNS_VIP],
        &[],
        &[("dns", 53, "5353", "UDP")],
        None,
    );
    node.write_source("pods.yaml", &k8s::file(&[pods, svc]));
    let slice = |b: &str| {
        k8s::endpoint_slice(
            "dns",
            "default",
            &[(node.pod(b), true)],
            &[("dns", 5353, "UDP")],
        )
        .to_string()
    };
    node.write_source("slice.yaml", &slice("b1"));
    let agent = Agent::with_source(&node, &[]);
    agent.wait_backends(&format!("{DNS_VIP}:53/UDP"), 1, Duration::from_secs(10));

    let target = format!("{DNS_VIP}:53");
    let resolver = node.spawn(
        "client",
        &["udp-resolver", "--connect", &target, "--seconds", "8"],
    );
    let answered =
        |name: &'static str| move |l: &String| l.contains(&format!("\"from\":\"{name}\""));
    resolver
        .stdout()
        .wait_for("an answer from b1", Duration::from_secs(5), |lines| {
            lines.iter().any(answered("b1")).then_some(())
        });
    node.write_source("slice.yaml", &slice("b2"));
    let after = resolver.stdout().wait_for(
        "answers from b2 once b1 has left",
        Duration::from_secs(5),
        |lines| {
            let first = lines.iter().position(answered("b2"))?;
            // A few answers more: none of them from b1.
            (lines.len() > first + 5).then(|| lines[first..].to_vec())
        },
    );
    assert!(!after.iter().any(answered("b1")), "{after:#?}");
    let failed = resolver.stdout().snapshot();
    assert!(
        failed
            .iter()
            .any(|l| l.contains("\"failed\"") && l.contains("EPERM")),
        "the send to b1 failed with EPERM: {failed:#?}"
    );
    agent.wait_metrics("the stale datagram counted", |m| {
        weft_testkit::prom::sum(
            m,
            "weft_dropped_flows_total",
            &[("reason", "stale_backend")],
        ) >= 1.0
    });
}

/// One unconnected UDP socket asks two ClusterIPs at once (as resolvers do with several
/// nameservers); a backend serves both. Each reply must show the ClusterIP it answers: the
/// kernel gives the socket a backend it does not already reach through the other frontend.
/// (It used to pick the shared backend half the time, and both replies then showed one
/// ClusterIP.)
#[test]
fn two_clusterips_sharing_a_backend_each_answer_from_their_own_address() {
    let (node, _servers) = udp_backends("adv_svc_udp_shared");
    let pods = pods(&node);
    let port = [("dns", 53, "5353", "UDP")];
    let only_b1 = k8s::service("one", "default", &["10.96.0.61"], &[], &port, None);
    let both = k8s::service("two", "default", &["10.96.0.62"], &[], &port, None);
    let slice = |svc: &str, pods: &[&str]| {
        let endpoints: Vec<_> = pods.iter().map(|p| (node.pod(p), true)).collect();
        format!(
            "{}\n",
            k8s::endpoint_slice(svc, "default", &endpoints, &[("dns", 5353, "UDP")])
        )
    };
    node.write_source(
        "services.yaml",
        &k8s::file(&[
            pods,
            only_b1,
            both,
            slice("one", &["b1"]),
            slice("two", &["b1", "b2"]),
        ]),
    );
    let agent = Agent::with_source(&node, &[]);
    agent.wait_backends("10.96.0.61:53/UDP", 1, Duration::from_secs(10));
    agent.wait_backends("10.96.0.62:53/UDP", 2, Duration::from_secs(10));
    // "one" is asked first: its only backend is taken when "two" is translated.
    let mut pair = node.spawn(
        "client",
        &[
            "udp-pair",
            "--to",
            "10.96.0.61:53",
            "--to",
            "10.96.0.62:53",
            "--rounds",
            "10",
        ],
    );
    let status = pair.wait(Duration::from_secs(30));
    let out = pair.stdout().snapshot();
    assert!(status.success(), "{out:#?}");
}

const SLOW_VIP: &str = "10.96.0.71";
const SINK_VIP: &str = "10.96.0.72";

/// Pods `client`, `attacker` (both ingress-isolated when `isolate`), `b1` and `sink`; Service
/// `slow` (SLOW_VIP:53/UDP) on b1:5353 and `sink` (SINK_VIP:53/UDP) on sink:5353, where
/// nothing listens. The agent runs with `extra` flags.
fn flood_node(test: &str, isolate: bool, extra: &[&str]) -> (Node, Agent) {
    let node = Node::builder(test)
        .pod("client")
        .pod("b1")
        .pod("attacker")
        .pod("sink")
        .build();
    let isolated: &[(&str, &str)] = &[("role", "isolated")];
    let pods = k8s::http_pods(
        &node,
        "default",
        &[
            ("client", isolated),
            ("attacker", isolated),
            ("b1", &[]),
            ("sink", &[]),
        ],
    );
    let port = [("dns", 53, "5353", "UDP")];
    let slice = |svc: &str, pod: &str| {
        let endpoints = [(node.pod(pod), true)];
        format!(
            "{}\n",
            k8s::endpoint_slice(svc, "default", &endpoints, &[("dns", 5353, "UDP")])
        )
    };
    let mut docs = vec![
        pods,
        k8s::service("slow", "default", &[SLOW_VIP], &[], &port, None),
        k8s::service("sink", "default", &[SINK_VIP], &[], &port, None),
        slice("slow", "b1"),
        slice("sink", "sink"),
    ];
    if isolate {
        docs.push(np(
            "default",
            "isolate",
            "podSelector: {matchLabels: {role: isolated}}\npolicyTypes: [Ingress]",
        ));
    }
    node.write_source("objects.yaml", &k8s::file(&docs));
    let agent = Agent::with_source(&node, extra);
    agent.wait_backends(&format!("{SLOW_VIP}:53/UDP"), 1, Duration::from_secs(10));
    agent.wait_backends(&format!("{SINK_VIP}:53/UDP"), 1, Duration::from_secs(10));
    if isolate {
        crate::wait_isolated(&agent, "default/client", true, false);
        crate::wait_isolated(&agent, "default/attacker", true, false);
    }
    (node, agent)
}

/// `attacker` processes opening `sockets` UDP sockets in all, each sending one datagram to
/// the sink Service and holding its socket for `hold` seconds: as many processes as the
/// open-files limit needs (pods may not raise it).
fn flood(node: &Node, sockets: u64, hold: &str) -> Vec<Process> {
    let per_process = (hard_nofile().saturating_sub(64)).min(sockets);
    assert!(
        per_process >= 1_000,
        "an open-files limit of {}",
        hard_nofile()
    );
    let to = format!("{SINK_VIP}:53");
    (0..sockets.div_ceil(per_process))
        .map(|i| {
            let n = per_process.min(sockets - i * per_process).to_string();
            let args = [
                "udp-flood",
                "--to",
                &to,
                "--sockets",
                &n,
                "--hold-seconds",
                hold,
            ];
            node.spawn("attacker", &args)
        })
        .collect()
}

/// One unconnected UDP exchange of `pod` with the slow Service; panics unless the echo came
/// back from the ClusterIP.
fn ask_slow(node: &Node, pod: &str, timeout_ms: &str) -> Process {
    let target = format!("{SLOW_VIP}:53");
    let args = [
        "udp-client",
        "--connect",
        &target,
        "--unconnected",
        "--timeout-ms",
        timeout_ms,
    ];
    node.spawn(pod, &args)
}

fn answered_from_the_clusterip(mut client: Process, within: Duration) {
    let status = client.wait(within);
    let out = client.stdout().snapshot();
    assert!(status.success(), "{out:#?}");
    assert!(
        out.iter()
            .any(|l| l.contains("\"echoed\":1") && l.contains("\"wrong_source\":0")),
        "{out:#?}"
    );
}

/// A reply that takes a while (a slow upstream) reaches a pod that asked through a ClusterIP
/// from an ingress-isolated pod, however many UDP sockets another pod opens meanwhile: what
/// the asking socket's reply needs (its allowed exchange, its reverse translation) lives in
/// that socket. (Both used to live in node-wide 65 536-entry LRU maps that one pod's sockets
/// could fill: the reply was then dropped, or showed the backend's address.)
#[test]
fn a_pod_opening_100k_udp_sockets_does_not_break_another_pods_replies() {
    let (node, agent) = flood_node("adv_svc_udp_flood", true, &[]);
    let server = node.start_server(
        "b1",
        &[
            "udp-echo",
            "--listen",
            "0.0.0.0:5353",
            "--delay-ms",
            "15000",
        ],
    );
    let client = ask_slow(&node, "client", "40000");
    server
        .stdout()
        .wait_for("the question", Duration::from_secs(5), |lines| {
            lines
                .iter()
                .any(|l| l.contains("\"received\""))
                .then_some(())
        });
    let attackers = flood(&node, FLOOD, "30");
    let flooded = attackers
        .iter()
        .map(|a| at_ms(a, "flooded", Duration::from_secs(14)))
        .max()
        .unwrap_or_default();
    let echoed = at_ms(&server, "echoed", Duration::from_secs(20));
    assert!(
        flooded < echoed,
        "the flood ({flooded}) must end before the reply leaves ({echoed}), or this proves nothing"
    );
    answered_from_the_clusterip(client, Duration::from_secs(30));
    // The attacker's sockets past its budget were not remembered, and that was said.
    agent.wait_metrics("the attacker over its budget", |m| {
        weft_testkit::prom::sum(
            m,
            "weft_datapath_errors_total",
            &[("reason", "sock_state_over_budget")],
        ) > 0.0
    });
}

/// A pod that spends the node's socket-state budget loses only its own new sockets' state
/// (counted): another pod keeps its floor. The budget comes back as the sockets close.
#[test]
fn a_pod_spending_the_nodes_socket_state_budget_degrades_alone_and_recovers() {
    let (node, agent) = flood_node(
        "adv_svc_udp_budget",
        false,
        &[
            "--max-socket-states",
            "100",
            "--min-socket-states-per-pod",
            "10",
        ],
    );
    let _server = node.start_server("b1", &["udp-echo", "--listen", "0.0.0.0:5353"]);
    let mut attackers = flood(&node, 1_150, "3");
    at_ms(&attackers[0], "flooded", Duration::from_secs(10));
    // Another pod is not affected.
    answered_from_the_clusterip(ask_slow(&node, "client", "2000"), Duration::from_secs(10));
    let over = |m: &[weft_testkit::prom::Sample]| {
        weft_testkit::prom::sum(
            m,
            "weft_datapath_errors_total",
            &[("reason", "sock_state_over_budget")],
        )
    };
    agent.wait_metrics("1 050 sockets past the node's 100", |m| over(m) == 1_050.0);
    for a in &mut attackers {
        a.wait_success(Duration::from_secs(10));
    }
    // Its sockets closed: the pod's own new socket is remembered again (its reply shows the
    // ClusterIP).
    answered_from_the_clusterip(ask_slow(&node, "attacker", "2000"), Duration::from_secs(10));
}

/// An egress-isolated UDP server answers many clients at once from one socket: its replies
/// pass by the exchanges the requests opened, more of them than the socket's own storage
/// holds (the rest go to the node-wide `POLICY_FLOWS`), and none is pushed out by the others.
#[test]
fn an_egress_isolated_udp_server_answers_64_clients_at_once() {
    let node = Node::builder("adv_svc_udp_server")
        .pod("client")
        .pod("server")
        .build();
    let pods = k8s::http_pods(
        &node,
        "default",
        &[("client", &[]), ("server", &[("role", "server")])],
    );
    let deny = np(
        "default",
        "no-egress",
        "podSelector: {matchLabels: {role: server}}\npolicyTypes: [Egress]",
    );
    node.write_source("objects.yaml", &k8s::file(&[pods, deny]));
    let agent = Agent::with_source(&node, &[]);
    crate::wait_isolated(&agent, "default/server", false, true);
    let _server = node.start_server(
        "server",
        &["udp-echo", "--listen", "0.0.0.0:5353", "--batch", "64"],
    );
    let to = format!("{}:5353", node.pod("server").ipv4);
    let mut client = node.spawn("client", &["udp-many", "--to", &to, "--sockets", "64"]);
    let status = client.wait(Duration::from_secs(20));
    let out = client.stdout().snapshot();
    assert!(status.success(), "{out:#?}");
    // At most 16 fit the socket's own slots.
    agent.wait_metrics("the rest in POLICY_FLOWS", |m| {
        weft_testkit::prom::sum(
            m,
            "weft_datapath_errors_total",
            &[("reason", "flow_overflow")],
        ) >= 48.0
    });
}

/// UDP sockets the attacking pod opens.
const FLOOD: u64 = 100_000;

/// This process's hard open-files limit (what the pods it starts may raise theirs to).
fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit into a valid struct.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(ret, 0, "getrlimit: {}", std::io::Error::last_os_error());
    lim.rlim_max
}

/// The `at_ms` of a process's first `event` line.
fn at_ms(p: &Process, event: &str, within: Duration) -> u64 {
    let tag = format!("\"event\":\"{event}\"");
    p.stdout().wait_for(event, within, |lines| {
        let line = lines.iter().find(|l| l.contains(&tag))?;
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["at_ms"].as_u64()
    })
}
