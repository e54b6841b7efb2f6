//! The secure overlay on two nodes: meshed pods' connections are captured in the kernel and
//! carried through mutually authenticated tunnels between the agents; nothing of them crosses
//! the underlay in plaintext, and the server sees the client pod's address.
use std::{path::Path, time::Duration};

use serde_json::Value;
use weft_testkit::{
    Agent, AgentOptions, Cluster,
    agent::{MeshCa, init_mesh_ca},
    k8s, proc,
    proc::Process,
};

const WAIT: Duration = Duration::from_secs(20);
/// The `web` Service (backend: `server` on node b).
const WEB: &str = "10.96.0.20";
/// The `plain` Service (backend: `plainsrv`, not meshed, on node b).
const PLAIN: &str = "10.96.0.21";
/// What the servers answer: looked for on the underlay.
const SECRET: &str = "weft-mesh-secret-reply";
/// The client's identity (service account `default` of namespace `default`).
const ID: &str = "spiffe://cluster.local/ns/default/sa/default";
/// The server's (its own service account).
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// The server's neighbour on node b (its own service account too).
const NEIGHBOR_ID: &str = "spiffe://cluster.local/ns/default/sa/neighbor";

/// Pod `pod` of namespace `default` (labels `app: <pod>` and `node: <its node>`, port `http`
/// 8080), meshed or not, running as the service account of its own name or as `default`.
fn pod_doc(c: &Cluster, pod: &str, meshed: bool, own_account: bool) -> String {
    let node = c.pod(pod).1.node.as_deref().expect("a named node");
    let mut labels = vec![("app", pod), ("node", node)];
    if meshed {
        labels.push(("weft.io/mesh", "enabled"));
    }
    let doc = k8s::pod(
        c.pod(pod).1,
        "default",
        &labels,
        &[("http", 8080, "TCP")],
        true,
    );
    if own_account {
        doc.replace("spec:\n", &format!("spec:\n  serviceAccountName: {pod}\n"))
    } else {
        doc
    }
}

/// `client` and `plain` on node a, `server`, `plainsrv` and `neighbor` on node b; `client`,
/// `server` and `neighbor` are meshed.
fn mesh_cluster(test: &str) -> Cluster {
    mesh_cluster_with(test, &[])
}

/// [`mesh_cluster`] with more meshed pods on node a, each running as a service account of
/// its own name.
fn mesh_cluster_with(test: &str, more: &[&'static str]) -> Cluster {
    let on_a: Vec<&str> = ["client", "plain"].iter().chain(more).copied().collect();
    let c = Cluster::builder(test)
        .node("a", &on_a)
        .node("b", &["server", "plainsrv", "neighbor"])
        .build();
    let mut docs = Vec::new();
    let pods = [
        ("client", true),
        ("plain", false),
        ("server", true),
        ("plainsrv", false),
        ("neighbor", true),
    ];
    for (pod, meshed) in pods.into_iter().chain(more.iter().map(|p| (*p, true))) {
        // The server and its neighbour run as service accounts of their own: identities to
        // tell apart.
        let own_account = pod == "server" || pod == "neighbor" || more.contains(&pod);
        docs.push(pod_doc(&c, pod, meshed, own_account));
    }
    let http: [k8s::Port<'_>; 1] = [("http", 80, "http", "TCP")];
    docs.push(k8s::service(
        "web",
        "default",
        &[WEB],
        &[("app", "server")],
        &http,
        None,
    ));
    docs.push(k8s::service(
        "plain",
        "default",
        &[PLAIN],
        &[("app", "plainsrv")],
        &http,
        None,
    ));
    c.write_source("mesh.yaml", &k8s::file(&docs));
    c
}

/// A new mesh CA (`weft ca init`) beside the cluster's source directory.
fn ca(c: &Cluster) -> MeshCa {
    init_mesh_ca(&c.source_dir().with_file_name("ca"))
}

fn agents(c: &Cluster, ca: &Path) -> Vec<Agent> {
    agents_with(c, ca, &[])
}

/// [`agents`] with more `weft agent` arguments.
fn agents_with(c: &Cluster, ca: &Path, extra: &[&str]) -> Vec<Agent> {
    agents_of(c, [ca, ca], extra)
}

/// [`agents_with`], each node with a CA directory of its own.
fn agents_of(c: &Cluster, cas: [&Path; 2], extra: &[&str]) -> Vec<Agent> {
    ["a", "b"]
        .iter()
        .zip(cas)
        .map(|(n, ca)| {
            Agent::start_with(
                c.node(n),
                AgentOptions {
                    source: true,
                    source_dir: Some(c.source_dir()),
                    extra_args: ["--node-name", n, "--mesh-ca", &ca.display().to_string()]
                        .iter()
                        .chain(extra)
                        .map(|s| (*s).to_owned())
                        .collect(),
                    log_level: "info,weft::mesh=debug".into(),
                    ..AgentOptions::default()
                },
            )
        })
        .collect()
}

/// Waits until `agent` holds a certificate for `identity` and listens for `pod`.
fn wait_meshed(agent: &Agent, identity: &str, pod: &str) -> Value {
    agent.wait_output("certs", "a certificate and listeners", WAIT, |v: &Value| {
        let held = v["identities"].as_array().is_some_and(|ids| {
            ids.iter()
                .any(|i| i["identity"] == identity && i["certificate"]["serial"].is_string())
        });
        let listening = v["pods"].as_array().is_some_and(|pods| {
            pods.iter().any(|p| {
                p["pod"] == pod && p["listeners"].as_array().is_some_and(|l| !l.is_empty())
            })
        });
        held && listening
    })
}

/// Captures node a's underlay interface while `f` runs: (frames carrying the secret, frames
/// to or from port 15008).
fn on_the_underlay(c: &Cluster, f: impl FnOnce()) -> (u64, u64) {
    let mut capture: Process = c.node("a").spawn_host(&[
        "capture",
        "--iface",
        "ul",
        "--needle",
        SECRET,
        "--port",
        "15008",
        "--seconds",
        "4",
    ]);
    capture.stdout().wait_for("capture to start", WAIT, |l| {
        l.iter().any(|l| l.contains("\"listening\"")).then_some(())
    });
    f();
    capture.wait_success(Duration::from_secs(10));
    let v: Value = capture.stdout().wait_for("capture result", WAIT, |lines| {
        lines.iter().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["event"] == "captured")
        })
    });
    (
        v["found"].as_u64().expect("found"),
        v["port_frames"].as_u64().expect("port frames"),
    )
}

/// Peers a one-shot server saw (`--connections n`).
fn served_peers(server: &mut Process, n: usize) -> Vec<String> {
    server
        .stdout()
        .wait_for("connections served", WAIT, |lines| {
            let peers: Vec<String> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["event"] == "served")
                .filter_map(|v| v["peer"].as_str().map(str::to_owned))
                .collect();
            (peers.len() >= n).then_some(peers)
        })
}

/// The address of a peer as a dual-stack server prints it (`[::ffff:a.b.c.d]:port`).
fn host(peer: &str) -> String {
    let h = peer
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or_default();
    h.strip_prefix("::ffff:").unwrap_or(h).to_owned()
}

/// A meshed client reaches a meshed server on the other node through a ClusterIP and by pod
/// address: the exchange never crosses the underlay in plaintext, it does cross it on port
/// 15008, getpeername shows what the client dialled, and the server sees the client pod. No
/// iptables or nftables rule exists on either node or in either pod.
#[test]
fn meshed_pods_talk_through_mutual_tls_across_nodes() {
    let c = mesh_cluster("mesh_tls");
    let ca = ca(&c);
    let agents = agents(&c, ca.path());
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    agents[0].wait_backends(&format!("{WEB}:80/TCP"), 1, WAIT);
    let (server_node, server_pod) = c.pod("server");
    let mut server = server_node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "[::]:8080",
            "--reply-name",
            SECRET,
            "--connections",
            "2",
        ],
    );
    let direct = format!("{}:8080", server_pod.ipv4);
    let (found, tunnelled) = on_the_underlay(&c, || {
        let via_service = c.pod("client").0.spray("client", &format!("{WEB}:80"), 1);
        assert_eq!(via_service.get(SECRET), Some(&1), "{via_service:?}");
        let by_address = c.pod("client").0.spray("client", &direct, 1);
        assert_eq!(by_address.get(SECRET), Some(&1), "{by_address:?}");
    });
    assert_eq!(
        found, 0,
        "no frame on the underlay carries the reply in plaintext"
    );
    assert!(
        tunnelled > 0,
        "the exchange crossed the underlay on port 15008"
    );
    assert_no_firewall_rules_anywhere(&c);
    assert_mesh_telemetry(&agents);
    let client_ip = c.pod("client").1.ipv4.to_string();
    let peers = served_peers(&mut server, 2);
    assert_eq!(
        peers.iter().map(|p| host(p)).collect::<Vec<_>>(),
        [client_ip.clone(), client_ip],
        "the server sees the client pod's address"
    );
}

/// UDP between meshed pods of two nodes passes untouched (the mesh carries TCP): the
/// datagram and its answer cross the underlay as they were sent, the answer in plaintext,
/// and neither agent opens a stream for them.
#[test]
fn udp_between_meshed_pods_crosses_the_underlay_untouched() {
    let (c, _ca, agents) = meshed_with("mesh_udp", &[], &[]);
    let _server = c
        .pod("server")
        .0
        .start_server("server", &["serve", "--name", SECRET, "--udp", "8080"]);
    let to = format!("udp:{}:8080", c.pod("server").1.ipv4);
    let mut answer = Value::Null;
    let (found, tunnelled) = on_the_underlay(&c, || {
        let mut p = c
            .pod("client")
            .0
            .spawn("client", &["probe", "--timeout-ms", "3000", &to]);
        answer = p.probe_results()[&to].clone();
    });
    assert_eq!(answer, SECRET);
    assert!(found >= 1, "the answer crossed the underlay as sent");
    assert_eq!(tunnelled, 0, "no tunnel carried anything");
    for (agent, direction) in [(&agents[0], "outbound"), (&agents[1], "inbound")] {
        assert_eq!(
            by_direction(agent, "weft_mesh_streams_total", direction),
            0.0
        );
    }
}

/// Both reporters label the exchanges `mutual_tls` with both principals, name the client and
/// the server workloads (not the client's loopback leg), and their flow records carry the
/// principals.
fn assert_mesh_telemetry(agents: &[Agent]) {
    for (agent, reporter) in agents.iter().zip(["source", "destination"]) {
        let seen = || {
            let opened: f64 = agent
                .metrics()
                .iter()
                .filter(|s| {
                    s.name == "weft_tcp_connections_closed_total"
                        && s.label("reporter") == Some(reporter)
                        && s.label("connection_security_policy") == Some("mutual_tls")
                        && s.label("source_principal") == Some(ID)
                        && s.label("destination_principal") == Some(SERVER_ID)
                        && s.label("source_workload") == Some("client")
                        && s.label("destination_workload") == Some("server")
                })
                .map(|s| s.value)
                .sum();
            let records = agent.flows(&["--last", "100"]);
            let meshed = records
                .iter()
                .filter(|r| {
                    r["event"] == "tcp_close"
                        && r["mesh"]["source_principal"] == ID
                        && r["mesh"]["destination_principal"] == SERVER_ID
                })
                .count();
            (opened, meshed)
        };
        assert_eq!(
            settled((2.0, 2), seen),
            (2.0, 2),
            "{reporter}: both connections closed, labelled and recorded as carried"
        );
    }
}

/// Two meshed pods of one node talk directly: nothing is captured or tunnelled, and both
/// reporters name both principals, `mutual_tls`, the flow records saying `local`.
#[test]
fn meshed_pods_of_one_node_talk_directly_with_both_principals() {
    let c = mesh_cluster("mesh_local");
    let ca = ca(&c);
    let agents = agents(&c, ca.path());
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    let (node, server_pod) = c.pod("server");
    let _server = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "[::]:8080",
            "--reply-name",
            SECRET,
        ],
    );
    let got = node.spray("neighbor", &format!("{}:8080", server_pod.ipv4), 1);
    assert_eq!(got.get(SECRET), Some(&1), "{got:?}");
    let seen = || {
        let metrics = agents[1].metrics();
        let closed = |reporter: &str| {
            metrics
                .iter()
                .filter(|s| {
                    s.name == "weft_tcp_connections_closed_total"
                        && s.label("reporter") == Some(reporter)
                        && s.label("connection_security_policy") == Some("mutual_tls")
                        && s.label("source_principal") == Some(NEIGHBOR_ID)
                        && s.label("destination_principal") == Some(SERVER_ID)
                })
                .map(|s| s.value)
                .sum::<f64>()
        };
        let local = agents[1]
            .flows(&["--last", "100"])
            .iter()
            .filter(|r| {
                r["event"] == "tcp_close"
                    && r["mesh"]["transport"] == "local"
                    && r["mesh"]["source_principal"] == NEIGHBOR_ID
                    && r["mesh"]["destination_principal"] == SERVER_ID
            })
            .count();
        (closed("source"), closed("destination"), local)
    };
    assert_eq!(
        settled((1.0, 1.0, 2), seen),
        (1.0, 1.0, 2),
        "both ends labelled and recorded"
    );
    let streams: f64 = agents
        .iter()
        .flat_map(|a| a.metrics())
        .filter(|s| s.name == "weft_mesh_streams_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(streams, 0.0, "nothing went through a tunnel");
}

/// What `seen` reports once it reports `want`, or after [`WAIT`] (telemetry arrives a little
/// after the exchange).
fn settled<T: PartialEq>(want: T, seen: impl Fn() -> T) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let got = seen();
        if got == want || std::time::Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No iptables or nftables rule in a network namespace (weft's capture and delivery use
/// none).
/// [`assert_no_firewall_rules`] on both nodes and in the client and server pods.
fn assert_no_firewall_rules_anywhere(c: &Cluster) {
    for netns in [
        c.node("a").netns_name(),
        c.node("b").netns_name(),
        c.pod("client").1.netns_name(),
        c.pod("server").1.netns_name(),
    ] {
        assert_no_firewall_rules(netns);
    }
}

fn assert_no_firewall_rules(netns: &str) {
    let ns = format!("--net=/run/netns/{netns}");
    let nft = proc::run("nsenter", [ns.as_str(), "nft", "list", "ruleset"]);
    assert_eq!(nft.trim(), "", "nftables ruleset of {netns}");
    for save in ["iptables-save", "ip6tables-save"] {
        let out = proc::run("nsenter", [ns.as_str(), save]);
        // Rules, and chains of anyone's own (a built-in chain has a policy, `:INPUT ACCEPT`;
        // a user-defined one has none, `:NAME - [0:0]`).
        let rules: Vec<&str> = out
            .lines()
            .filter(|l| {
                l.starts_with("-A") || (l.starts_with(':') && l.split(' ').nth(1) == Some("-"))
            })
            .collect();
        assert!(rules.is_empty(), "{save} in {netns}: {rules:?}");
    }
}

/// Whether the policy-routing rules of a network namespace (`family`: `-4` or `-6`) send
/// something to the deliveries' table.
fn has_delivery_rule(netns: &str, family: &str) -> bool {
    let ns = format!("--net=/run/netns/{netns}");
    proc::run("nsenter", [ns.as_str(), "ip", family, "rule", "show"]).contains("lookup 15008")
}

/// The rule that brings replies back to the proxy's delivery sockets is added to a meshed
/// pod's namespace before the first connection of its family delivered there, and never to
/// one that only calls out: any rule takes all of a namespace's route lookups off the
/// kernel's fast path.
#[test]
fn only_a_pod_the_mesh_delivered_to_has_the_delivery_rule() {
    let (c, _ca, _agents, _server, target) = serving("mesh_rule");
    let (client, server) = (
        c.pod("client").1.netns_name(),
        c.pod("server").1.netns_name(),
    );
    assert!(!has_delivery_rule(server, "-4"), "before any delivery");
    assert_eq!(probe(&c, "client", &target), SECRET);
    assert!(has_delivery_rule(server, "-4"), "after an IPv4 delivery");
    assert!(!has_delivery_rule(server, "-6"), "before an IPv6 delivery");
    let v6 = format!("[{}]:8080", c.pod("server").1.ipv6);
    assert_eq!(probe(&c, "client", &v6), SECRET);
    assert!(has_delivery_rule(server, "-6"), "after an IPv6 delivery");
    for family in ["-4", "-6"] {
        assert!(
            !has_delivery_rule(client, family),
            "a pod that only called out"
        );
    }
}

/// Traffic with a pod outside the mesh stays plaintext both ways and works.
#[test]
fn a_pod_outside_the_mesh_talks_in_plaintext_both_ways() {
    let c = mesh_cluster("mesh_plain");
    let ca = ca(&c);
    let agents = agents(&c, ca.path());
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    agents[0].wait_backends(&format!("{WEB}:80/TCP"), 1, WAIT);
    agents[0].wait_backends(&format!("{PLAIN}:80/TCP"), 1, WAIT);
    let _server = c.pod("server").0.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "[::]:8080",
            "--reply-name",
            SECRET,
        ],
    );
    let _plainsrv = c.pod("plainsrv").0.start_server(
        "plainsrv",
        &[
            "tcp-server",
            "--listen",
            "[::]:8080",
            "--reply-name",
            SECRET,
        ],
    );
    let (found, tunnelled) = on_the_underlay(&c, || {
        let to_meshed = c.pod("plain").0.spray("plain", &format!("{WEB}:80"), 1);
        assert_eq!(to_meshed.get(SECRET), Some(&1), "{to_meshed:?}");
        let from_meshed = c.pod("client").0.spray("client", &format!("{PLAIN}:80"), 1);
        assert_eq!(from_meshed.get(SECRET), Some(&1), "{from_meshed:?}");
    });
    assert!(
        found >= 2,
        "both exchanges crossed the underlay in plaintext: {found}"
    );
    assert_eq!(tunnelled, 0, "no tunnel was used");
    assert_plaintext_telemetry(&agents[1]);
}

/// The meshed server's node reports the plaintext client's connection, unlabelled.
fn assert_plaintext_telemetry(agent: &Agent) {
    let closed = |policy: &str| -> f64 {
        agent
            .metrics()
            .iter()
            .filter(|s| {
                s.name == "weft_tcp_connections_closed_total"
                    && s.label("reporter") == Some("destination")
                    && s.label("source_workload") == Some("plain")
                    && s.label("destination_workload") == Some("server")
                    && s.label("connection_security_policy") == Some(policy)
            })
            .map(|s| s.value)
            .sum()
    };
    let seen = || (closed("unknown"), closed("mutual_tls"));
    assert_eq!(
        settled((1.0, 0.0), seen),
        (1.0, 0.0),
        "the plaintext connection is reported, not as mutual_tls"
    );
}

/// What `pod` gets probing `target` over TCP (the server's name, or `error: ...`).
fn probe(c: &Cluster, pod: &str, target: &str) -> String {
    let to = format!("tcp:{target}");
    let mut p = c
        .pod(pod)
        .0
        .spawn(pod, &["probe", "--timeout-ms", "1000", &to]);
    p.probe_results()[&to]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// SIGKILL of the client node's agent under a stream of new meshed connections (200 a
/// second): while no agent runs, a meshed pod's connects to a meshed pod are refused at
/// connect() (nothing listens where the kernel sends them), never sent in plaintext; every
/// other connection opened after the kill works, through the successor once it runs; a
/// connection open across the kill is lost.
#[test]
fn without_an_agent_meshed_connects_are_refused_then_work_again() {
    let (c, _ca, mut agents, _server, target) = serving("mesh_kill");
    assert_eq!(probe(&c, "client", &target), SECRET);
    let long_target = format!("{}:8081", c.pod("server").1.ipv4);
    let _sink = c.pod("server").0.start_server(
        "server",
        &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
    );
    let mut long = open_long(&c, &long_target);
    let mut load = c.pod("client").0.spawn(
        "client",
        &[
            "tcp-load",
            "--connect",
            &target,
            "--rate",
            "200",
            "--seconds",
            "5",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    // Connections begun before the killed agent was gone may have reached it: they are cut.
    let mut gone = 0;
    let (found, _) = on_the_underlay(&c, || {
        agents[0].kill();
        gone = proc::monotonic_ns();
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(probe(&c, "client", &target), "error: connect: ECONNREFUSED");
        agents[0].restart();
        wait_meshed(&agents[0], ID, "default/client");
    });
    assert_eq!(found, 0, "nothing went in plaintext meanwhile");
    assert_eq!(probe(&c, "client", &target), SECRET);
    load.wait_success(Duration::from_secs(20));
    let result = event(&load, "load");
    let names: Vec<&String> = result["counts"]
        .as_object()
        .expect("counts")
        .keys()
        .collect();
    assert_eq!(names, [SECRET], "every answer came from the server");
    let failures = result["failures"].as_array().expect("failures");
    let refused = |f: &&Value| f["error"] == "ECONNREFUSED" && f["connected"] == false;
    let cut = |f: &&Value| f["start_ns"].as_u64().is_some_and(|t| t < gone);
    let other: Vec<&Value> = failures.iter().filter(|f| !refused(f) && !cut(f)).collect();
    assert!(
        other.is_empty(),
        "a connection begun once the agent was gone was refused at connect() or worked: {other:?}"
    );
    assert!(
        failures.iter().any(|f| refused(&f)),
        "connections while no agent ran were refused: {failures:?}"
    );
    let ended = long.wait(Duration::from_secs(20));
    assert!(
        !ended.success(),
        "a meshed connection open across the kill is lost: {:?}",
        long.stdout().snapshot()
    );
}

/// Runs `f` on a thread of its own inside the network namespace at `netns` (setns affects
/// the calling thread only) and returns what it returned.
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(netns).unwrap_or_else(|e| panic!("{}: {e}", netns.display()));
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on a namespace file this thread holds open; it moves only this
        // thread, which exits when `f` returns.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// Peers that must be refused present themselves to node b's agent, from node a's
/// namespace and as a meshed client would (HBONE on the server pod's port 15008, trusting
/// the mesh's CA): a certificate from another CA, one without a SPIFFE ID, an expired one.
/// Each handshake is refused, counted under its reason on node b, and opens no tunnel.
#[test]
fn peers_with_a_foreign_nameless_or_expired_certificate_are_refused_and_counted() {
    use weft::{
        identity::{SpiffeId, ca::Ca},
        mesh::{
            hbone::{Pool, Route},
            metrics::ProxyMetrics,
            tls::Credentials,
        },
    };
    let (c, ca, agents, _server, target) = serving("mesh_rogue");
    let now = std::time::SystemTime::now();
    let hour = Duration::from_secs(3600);
    let client = SpiffeId::parse(ID).expect("the client's id");
    let mesh = Ca::load(ca.path()).expect("the mesh CA");
    let other = init_mesh_ca(&c.source_dir().with_file_name("other-ca"));
    let foreign = Ca::load(other.path())
        .and_then(|o| o.issue(&client, hour, now))
        .expect("a leaf of another CA");
    let dns = rcgen::SanType::DnsName("client.default".try_into().expect("a DNS name"));
    let nameless = mesh
        .issue_with_names(&client, vec![dns], hour, now)
        .expect("a leaf without a SPIFFE ID");
    let expired = mesh
        .issue(&client, Duration::from_secs(60), now - 2 * hour)
        .expect("an expired leaf");
    let roots: Vec<Vec<u8>> = mesh.roots().iter().map(|r| r.der.clone()).collect();
    let route = Route {
        source: client,
        destination: SpiffeId::parse(SERVER_ID).expect("the server's id"),
        tunnel: format!("{}:15008", c.pod("server").1.ipv4)
            .parse()
            .expect("the tunnel address"),
    };
    let target: std::net::SocketAddr = target.parse().expect("the target");
    let source_ip = std::net::IpAddr::V4(c.pod("client").1.ipv4);
    for (reason, leaf) in [
        ("unknown_ca", foreign),
        ("no_spiffe_id", nameless),
        ("expired", expired),
    ] {
        let creds = Credentials::new(roots.iter().map(Vec::as_slice), &[leaf])
            .expect("the rogue's credentials");
        let route = route.clone();
        let opened = in_netns(&c.node("a").netns_path(), move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let metrics = ProxyMetrics::new(&mut prometheus_client::registry::Registry::default());
            runtime.block_on(async {
                Pool::default()
                    .connect(
                        &creds,
                        &metrics,
                        &route,
                        (target, source_ip),
                        &mut tokio::io::empty(),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        });
        assert!(opened.is_err(), "{reason}: the rogue opened a stream");
        let refused = || {
            agents[1]
                .metrics()
                .iter()
                .filter(|s| {
                    s.name == "weft_mesh_handshake_failures_total"
                        && s.label("direction") == Some("inbound")
                        && s.label("reason") == Some(reason)
                })
                .map(|s| s.value)
                .sum::<f64>()
        };
        assert_eq!(
            settled(1.0, refused),
            1.0,
            "{reason}: counted once on node b"
        );
    }
    assert_eq!(
        tunnels_open(&agents[1], "inbound"),
        0.0,
        "no rogue holds a tunnel to node b"
    );
}

/// The SHA-256 of the certificate in `pem_file`, lower-case hex, as openssl reads it.
fn openssl_fingerprint(pem_file: &Path) -> String {
    let path = pem_file.to_str().expect("a UTF-8 path");
    let out = proc::run(
        "openssl",
        ["x509", "-in", path, "-noout", "-fingerprint", "-sha256"],
    );
    let (_, hex) = out
        .trim()
        .split_once('=')
        .expect("openssl's fingerprint line");
    hex.replace(':', "").to_lowercase()
}

/// `weft certs` reports the certificate held for a local identity (its serial, and an expiry
/// `--mesh-cert-ttl` after its issue) and the trust bundle's root (openssl's fingerprint of
/// `ca.crt`); the expiry gauge gives the same instant.
#[test]
fn the_held_certificate_its_expiry_and_the_roots_are_reported() {
    const TTL: u64 = 2 * 3600;
    let c = mesh_cluster("mesh_certs");
    let ca = ca(&c);
    let issued_after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let agents = agents_with(&c, ca.path(), &["--mesh-cert-ttl", "2h"]);
    let certs = wait_meshed(&agents[0], ID, "default/client");
    let issued_before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let held = certs["identities"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["identity"] == ID))
        .map(|i| i["certificate"].clone())
        .expect("the client's identity");
    let not_after = held["not_after_unix"].as_u64().expect("an expiry");
    assert!(
        (issued_after + TTL..=issued_before + TTL).contains(&not_after),
        "expiry {not_after}: issued between {issued_after} and {issued_before}, {TTL} s to live"
    );
    assert_eq!(held["expired"], false);
    assert!(held["serial"].as_str().is_some_and(|s| !s.is_empty()));
    let roots: Vec<&str> = certs["ca"]["roots"]
        .as_array()
        .expect("the trust bundle")
        .iter()
        .filter_map(|r| r["fingerprint"].as_str())
        .collect();
    assert_eq!(roots, [openssl_fingerprint(&ca.path().join("ca.crt"))]);
    let gauge = || {
        agents[0]
            .metrics()
            .iter()
            .find(|s| {
                s.name == "weft_mesh_certificate_expiry_timestamp_seconds"
                    && s.label("identity") == Some(ID)
            })
            .map(|s| s.value)
    };
    assert_eq!(
        settled(Some(not_after as f64), gauge),
        Some(not_after as f64)
    );
}

/// `weft status` of a running agent sums up its mesh: the CA loaded with its root, a
/// certificate for each local meshed pod's identity, and every meshed pod listened for
/// (node a: the client; node b: the server and its neighbour, two identities).
#[test]
fn status_sums_up_the_mesh_of_a_running_agent() {
    let c = mesh_cluster("mesh_status");
    let ca = ca(&c);
    let agents = agents(&c, ca.path());
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    let dir = ca.path().display().to_string();
    for (agent, meshed) in agents.iter().zip([1, 2]) {
        let summary = || {
            let (ok, status) = agent.client("status");
            assert!(ok, "weft status: {status}");
            let m = &status["mesh"];
            (
                m["ca"].as_str().map(str::to_owned),
                m["ca_loaded"].as_bool(),
                m["roots"].as_u64(),
                [
                    &m["identities"],
                    &m["certificates"],
                    &m["pods"],
                    &m["pods_listening"],
                ]
                .map(Value::as_u64),
            )
        };
        let want = (Some(dir.clone()), Some(true), Some(1), [Some(meshed); 4]);
        assert_eq!(settled(want.clone(), summary), want);
    }
}

/// A CA directory as the kubelet mounts a Secret: each file a link through `..data` to a
/// version's directory; an update writes a new version and swaps `..data` in one rename.
struct SecretDir {
    path: std::path::PathBuf,
    version: u32,
}

impl SecretDir {
    fn new(path: std::path::PathBuf, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(&path).expect("secret dir");
        let mut dir = Self { path, version: 0 };
        dir.update(files);
        for (name, _) in files {
            let link = dir.path.join(name);
            std::os::unix::fs::symlink(format!("..data/{name}"), link).expect("file link");
        }
        dir
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.path.join(&version)).expect("version dir");
        for (name, text) in files {
            std::fs::write(self.path.join(&version).join(name), text).expect("secret file");
        }
        let tmp = self.path.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("data link");
        std::fs::rename(&tmp, self.path.join("..data")).expect("swap");
        // The version replaced goes, as the kubelet removes it.
        if self.version > 1 {
            let old = self.path.join(format!("..v{}", self.version - 1));
            std::fs::remove_dir_all(old).expect("old version");
        }
    }
}

/// A step of a CA rotation: what it is, the nodes whose Secret it updates and to what
/// files, and then the signer's fingerprint and the number of roots they hold.
type RotationStep<'a> = (
    &'a str,
    &'a [usize],
    &'a [(&'a str, &'a str)],
    (&'a str, usize),
);

/// A CA rotation in the steps README gives, with each node's CA a Secret the kubelet
/// updates: both trust the new root, node a signs with it, node b too, the old root goes.
/// Each node takes each step as soon as its Secret changes (not at the next resync), a new
/// meshed connection works after every step, and one open from the start carries every byte;
/// no firewall rule appears anywhere.
#[test]
fn a_ca_rotation_keeps_the_mesh_working_at_every_step() {
    let c = mesh_cluster("mesh_ca_rotation");
    let (old, new) = (ca(&c), init_mesh_ca(&c.source_dir().with_file_name("ca2")));
    let read =
        |ca: &MeshCa, file: &str| std::fs::read_to_string(ca.path().join(file)).expect("pem");
    let (old_crt, old_key, new_crt, new_key) = (
        read(&old, "ca.crt"),
        read(&old, "ca.key"),
        read(&new, "ca.crt"),
        read(&new, "ca.key"),
    );
    let fingerprint = |ca: &MeshCa| openssl_fingerprint(&ca.path().join("ca.crt"));
    let (old_id, new_id) = (fingerprint(&old), fingerprint(&new));
    let both = format!("{old_crt}{new_crt}");
    let start = [
        ("tls.crt", old_crt.as_str()),
        ("tls.key", &old_key),
        ("ca.crt", &old_crt),
    ];
    let mut secrets = ["a", "b"]
        .map(|n| SecretDir::new(c.source_dir().with_file_name(format!("secret-{n}")), &start));
    let agents = agents_of(&c, [&secrets[0].path, &secrets[1].path], &[]);
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    let (server_node, server_pod) = c.pod("server");
    let _server = server_node.start_server("server", &["serve", "--name", SECRET, "--tcp", "8080"]);
    let mut sink = server_node.start_server(
        "server",
        &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
    );
    let target = format!("{}:8080", server_pod.ipv4);
    let mut long = open_trickle(&c, &format!("{}:8081", server_pod.ipv4), 30);
    assert_eq!(probe(&c, "client", &target), SECRET);
    let signing_old = [
        ("tls.crt", old_crt.as_str()),
        ("tls.key", &old_key),
        ("ca.crt", &both),
    ];
    let signing_new = [
        ("tls.crt", new_crt.as_str()),
        ("tls.key", &new_key),
        ("ca.crt", &both),
    ];
    let only_new = [
        ("tls.crt", new_crt.as_str()),
        ("tls.key", &new_key),
        ("ca.crt", &new_crt),
    ];
    let steps: [RotationStep<'_>; 4] = [
        (
            "both trust the new root",
            &[0, 1],
            &signing_old,
            (&old_id, 2),
        ),
        ("node a signs with it", &[0], &signing_new, (&new_id, 2)),
        ("node b signs with it", &[1], &signing_new, (&new_id, 2)),
        ("the old root goes", &[0, 1], &only_new, (&new_id, 1)),
    ];
    for (step, nodes, files, (signer, roots)) in steps {
        for &n in nodes {
            secrets[n].update(files);
        }
        // The signer and the bundle of the CA in use, and whether every certificate was
        // issued (a changed CA renews them all before this is published).
        let held = |certs: &Value| {
            let issued = certs["identities"]
                .as_array()
                .is_some_and(|ids| ids.iter().all(|i| i["error"].is_null()));
            let ca = &certs["ca"];
            (
                ca["signer"].clone(),
                ca["roots"].as_array().map(Vec::len),
                issued,
            )
        };
        let want = (Value::from(signer), Some(roots), true);
        for &n in nodes {
            // Well before the resync (30 s) would read it.
            let what = format!("{step}: node {n}");
            let certs =
                agents[n].wait_output("certs", &what, Duration::from_secs(10), |v| held(v) == want);
            assert_eq!(held(&certs), want, "{what}");
        }
        assert_eq!(probe(&c, "client", &target), SECRET, "{step}");
    }
    assert!(
        long.try_finished().is_none(),
        "the connection was still open at the rotation's end"
    );
    long.wait_success(Duration::from_secs(40));
    assert_all_arrived(&long, &mut sink, "the connection open across the rotation");
    assert_no_firewall_rules_anywhere(&c);
}

/// `weft doctor` against node b's running agent checks its mesh: the CA it loaded, a valid
/// certificate for both identities of its meshed pods, the proxy listening for both pods.
#[test]
fn doctor_checks_the_mesh_of_a_running_agent() {
    let (_c, ca, agents) = meshed_with("mesh_doctor", &[], &[]);
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    let (ok, checks) = agents[1].client_args(&["doctor"]);
    let of_agent: Vec<(String, bool, String)> = checks
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("agent: ")))
        .map(|c| {
            let text = |k: &str| c[k].as_str().expect(k).to_owned();
            (text("name"), c["ok"] == true, text("detail"))
        })
        .collect();
    let check = |name: &str, detail: &str| (name.to_owned(), true, detail.to_owned());
    assert_eq!(
        of_agent,
        [
            check(
                "agent: mesh CA",
                &format!("{}: loaded, 1 root(s) trusted", ca.path().display())
            ),
            check(
                "agent: certificates",
                "2 identities of meshed pods, each with a valid certificate"
            ),
            check("agent: renewals", "no renewal failed"),
            check(
                "agent: listeners",
                "2 meshed pods, the proxy listening for each"
            ),
            check(
                "agent: mesh labels",
                "every weft.io/mesh value is enabled or disabled"
            ),
        ]
    );
    assert!(ok, "{checks:#}");
}

/// A Service over the `backends` meshed pods `selector` picks, each answering its name on
/// 8080, and the agents: the cluster, its CA, the agents, the servers, and the Service's
/// address:port.
fn meshed_service(
    test: &str,
    (selector, backends): (&[(&str, &str)], usize),
    affinity: Option<u32>,
) -> (Cluster, MeshCa, Vec<Agent>, Vec<Process>, String) {
    const ALL: &str = "10.96.0.22";
    let c = mesh_cluster(test);
    let http: [k8s::Port<'_>; 1] = [("http", 80, "http", "TCP")];
    let service = k8s::service("all", "default", &[ALL], selector, &http, affinity);
    c.write_source("all.yaml", &service);
    let ca = ca(&c);
    let agents = agents(&c, ca.path());
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    agents[0].wait_backends(&format!("{ALL}:80/TCP"), backends, WAIT);
    let servers = ["client", "server", "neighbor"]
        .iter()
        .map(|pod| {
            c.pod(pod)
                .0
                .start_server(pod, &["serve", "--name", pod, "--tcp", "8080"])
        })
        .collect();
    (c, ca, agents, servers, format!("{ALL}:80"))
}

/// Through a ClusterIP whose backends are meshed, the kernel's choice of backend stands:
/// 60 connections from the client reach all three (itself directly, the two of node b
/// through the tunnel, one stream each), getpeername() always the ClusterIP.
#[test]
fn a_meshed_service_spreads_over_all_its_backends() {
    let every_meshed_pod = [("weft.io/mesh", "enabled")];
    let (c, _ca, agents, _servers, target) =
        meshed_service("mesh_spread", (&every_meshed_pod, 3), None);
    let counts = c.pod("client").0.spray("client", &target, 60);
    let names: Vec<&String> = counts.keys().collect();
    assert_eq!(names, ["client", "neighbor", "server"], "{counts:?}");
    let tunnelled = counts["neighbor"] + counts["server"];
    let streams = || by_direction(&agents[1], "weft_mesh_streams_total", "inbound");
    assert_eq!(settled(tunnelled as f64, streams), tunnelled as f64);
}

/// With ClientIP session affinity over the two meshed pods of node b, every connection of
/// the client goes through the tunnel to the backend its first one took.
#[test]
fn a_meshed_service_keeps_its_session_affinity() {
    let node_b = [("weft.io/mesh", "enabled"), ("node", "b")];
    let (c, _ca, agents, _servers, target) =
        meshed_service("mesh_affinity", (&node_b, 2), Some(600));
    let counts = c.pod("client").0.spray("client", &target, 30);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [30],
        "{counts:?}"
    );
    let streams = || by_direction(&agents[1], "weft_mesh_streams_total", "inbound");
    assert_eq!(settled(30.0, streams), 30.0);
}

/// `weft connections` on either node lists an open meshed connection as carried by a
/// tunnel, with the client's and the server's principals.
#[test]
fn an_open_meshed_connection_is_listed_on_both_nodes_with_both_principals() {
    let (c, _ca, agents, _server, _target) = serving("mesh_listed");
    let server_node = c.pod("server").0;
    let _sink = server_node.start_server(
        "server",
        &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
    );
    let _long = open_long(&c, &format!("{}:8081", c.pod("server").1.ipv4));
    for (agent, node) in agents.iter().zip(["a", "b"]) {
        let listed = || {
            let (ok, list) = agent.client("connections");
            assert!(ok, "weft connections on node {node}: {list}");
            list.as_array()
                .into_iter()
                .flatten()
                .filter(|conn| {
                    ["local", "remote"].iter().any(|end| {
                        conn[end]["address"]
                            .as_str()
                            .is_some_and(|a| a.ends_with(":8081"))
                    })
                })
                .map(|conn| conn["mesh"].clone())
                .collect::<Vec<Value>>()
        };
        let want = serde_json::json!({
            "source_principal": ID,
            "destination_principal": SERVER_ID,
            "transport": "tunnel",
        });
        assert_eq!(settled(vec![want.clone()], listed), [want], "node {node}");
    }
}

/// Both nodes' agents meshed, and a server in `server` answering [`SECRET`] on 8080: the
/// cluster, its CA, the agents, the server, and its address.
fn serving(test: &str) -> (Cluster, MeshCa, Vec<Agent>, Process, String) {
    serving_with(test, &[], &[])
}

/// [`serving`] on [`mesh_cluster_with`], the agents run with `agent_args` too.
fn serving_with(
    test: &str,
    more: &[&'static str],
    agent_args: &[&str],
) -> (Cluster, MeshCa, Vec<Agent>, Process, String) {
    let (c, ca, agents) = meshed_with(test, more, agent_args);
    let server = c
        .pod("server")
        .0
        .start_server("server", &["serve", "--name", SECRET, "--tcp", "8080"]);
    let target = format!("{}:8080", c.pod("server").1.ipv4);
    (c, ca, agents, server, target)
}

/// [`mesh_cluster_with`], its CA, and its agents (run with `agent_args` too) once node a's
/// holds the client's certificate and node b's the server's, each listening for its pod.
fn meshed_with(
    test: &str,
    more: &[&'static str],
    agent_args: &[&str],
) -> (Cluster, MeshCa, Vec<Agent>) {
    let c = mesh_cluster_with(test, more);
    let ca = ca(&c);
    let agents = agents_with(&c, ca.path(), agent_args);
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    (c, ca, agents)
}

/// The serial of the certificate `agent` holds for [`ID`].
fn serial(agent: &Agent) -> String {
    let (_, v) = agent.client("certs");
    v["identities"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["identity"] == ID))
        .and_then(|i| i["certificate"]["serial"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The sum of `agent`'s series `name` in `direction`.
fn by_direction(agent: &Agent, name: &str, direction: &str) -> f64 {
    agent
        .metrics()
        .iter()
        .filter(|s| {
            s.name == name
                && s.labels
                    .iter()
                    .any(|(k, v)| k == "direction" && v == direction)
        })
        .map(|s| s.value)
        .sum()
}

/// Outbound handshakes `agent` completed.
fn outbound_handshakes(agent: &Agent) -> f64 {
    by_direction(agent, "weft_mesh_handshakes_total", "outbound")
}

/// Tunnels `agent` has open in `direction`.
fn tunnels_open(agent: &Agent, direction: &str) -> f64 {
    by_direction(agent, "weft_mesh_tunnels_open", direction)
}

/// With `--mesh-tunnel-idle-timeout 1s`, the tunnel a connection took is closed on both
/// nodes about a second after the connection ended, and the next connection opens another.
#[test]
fn an_unused_tunnel_is_closed_after_the_idle_timeout() {
    let (c, _ca, agents, _server, target) =
        serving_with("mesh_idle", &[], &["--mesh-tunnel-idle-timeout", "1s"]);
    assert_eq!(probe(&c, "client", &target), SECRET);
    assert_eq!(outbound_handshakes(&agents[0]), 1.0);
    assert_eq!(settled(0.0, || tunnels_open(&agents[0], "outbound")), 0.0);
    assert_eq!(settled(0.0, || tunnels_open(&agents[1], "inbound")), 0.0);
    assert_eq!(probe(&c, "client", &target), SECRET);
    assert_eq!(outbound_handshakes(&agents[0]), 2.0);
}

/// With a 20 s lifetime, certificates renew at 10 s: a connection opened before keeps going
/// on its tunnel, and a new one opens a new tunnel with the new certificate.
#[test]
fn a_rotation_keeps_open_connections_and_new_ones_use_the_new_certificate() {
    let c = mesh_cluster("mesh_rotate");
    let ca = ca(&c);
    let agents = agents_with(&c, ca.path(), &["--mesh-cert-ttl", "20s"]);
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    let _server = c.pod("server").0.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "[::]:8080",
            "--reply-name",
            SECRET,
        ],
    );
    let target = format!("{}:8080", c.pod("server").1.ipv4);
    let mut open = c.pod("client").0.spawn(
        "client",
        &[
            "tcp-trickle",
            "--connect",
            &target,
            "--chunk",
            "100",
            "--every-ms",
            "200",
            "--seconds",
            "14",
        ],
    );
    open.stdout().wait_for("the connection to open", WAIT, |l| {
        l.iter().any(|l| l.contains("\"open\"")).then_some(())
    });
    // The client is connected to the local listener at once; its tunnel follows.
    let deadline = std::time::Instant::now() + WAIT;
    while outbound_handshakes(&agents[0]) < 1.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(outbound_handshakes(&agents[0]), 1.0);
    // The tunnel uses this certificate (read after it opened: a renewal cannot fall between).
    let first = serial(&agents[0]);
    agents[0].wait_output("certs", "a renewed certificate", WAIT, |v| {
        v["identities"].as_array().is_some_and(|ids| {
            ids.iter().any(|i| {
                i["identity"] == ID
                    && i["certificate"]["serial"]
                        .as_str()
                        .is_some_and(|s| s != first)
            })
        })
    });
    assert!(
        !open
            .stdout()
            .snapshot()
            .iter()
            .any(|l| l.contains("\"done\"")),
        "the connection is still open across the renewal"
    );
    let again = c.pod("client").0.spray("client", &format!("{WEB}:80"), 1);
    assert_eq!(again.get(SECRET), Some(&1), "{again:?}");
    assert_eq!(
        outbound_handshakes(&agents[0]),
        2.0,
        "a new tunnel for the new certificate"
    );
    open.wait_success(Duration::from_secs(30));
    let done: Value = open
        .stdout()
        .wait_for("the connection to end", WAIT, |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "done")
            })
        });
    assert_eq!(
        done["received"],
        SECRET.len(),
        "the old connection ended whole: {done}"
    );
}

/// SIGTERM restarts of either node's agent with a successor started first (`--take-over`,
/// as a rolling update with surge starts one): under a stream of new meshed connections none
/// fails, a connection open across the handover carries every byte to its end, and the old
/// agent exits only once that connection has ended; no firewall rule appears anywhere.
#[test]
fn a_successor_takes_over_without_failing_a_meshed_connection() {
    let c = mesh_cluster("mesh_handover");
    let ca = ca(&c);
    let mut agents = agents(&c, ca.path());
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    let (server_node, server_pod) = c.pod("server");
    let _rr = server_node.start_server("server", &["rr-server", "--listen", "[::]:9000"]);
    let rr_target = format!("{}:9000", server_pod.ipv4);
    let long_target = format!("{}:8081", server_pod.ipv4);
    for (i, identity, pod) in [(1, SERVER_ID, "default/server"), (0, ID, "default/client")] {
        let mut sink = server_node.start_server(
            "server",
            &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
        );
        let mut long = open_long(&c, &long_target);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let batches = std::thread::scope(|s| {
            let load = s.spawn(|| load_until(&c, &rr_target, &stop));
            let mut old = agents[i].start_successor();
            wait_meshed(&agents[i], identity, pod);
            old.signal(libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
            // Looked at in this order: a long connection still open after the old agent
            // was seen running or exited was open when it was seen.
            let old_running = old.try_finished().is_none();
            if long.try_finished().is_none() {
                assert!(
                    old_running,
                    "node {i}: the old agent drains the connection it carries"
                );
            }
            long.wait_success(WAIT);
            old.wait_success(WAIT);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            load.join().expect("load")
        });
        assert!(
            batches >= 2,
            "node {i}: load ran across the handover ({batches} batches)"
        );
        assert_all_arrived(&long, &mut sink, &format!("node {i}: the long connection"));
    }
    // Handovers add no firewall rule either.
    assert_no_firewall_rules_anywhere(&c);
}

/// `--drain-timeout` ends a drain that would outlast it: after SIGTERM, with a successor or
/// without one, node a's agent exits although a meshed connection it carries was to last a
/// minute, and that connection is cut; without a successor, the draining agent still
/// serves new meshed connections (nobody else could).
#[test]
fn the_drain_ends_at_the_drain_timeout_and_cuts_what_is_left() {
    let (c, _ca, mut agents) = meshed_with("mesh_drain_timeout", &[], &["--drain-timeout", "5s"]);
    let (server_node, server_pod) = c.pod("server");
    let _server = server_node.start_server("server", &["serve", "--name", SECRET, "--tcp", "8080"]);
    let target = format!("{}:8080", server_pod.ipv4);
    let long_target = format!("{}:8081", server_pod.ipv4);
    for successor in [true, false] {
        let _sink = server_node.start_server(
            "server",
            &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
        );
        let mut long = open_trickle(&c, &long_target, 60);
        let (status, drained_for) = if successor {
            let mut old = agents[0].start_successor();
            wait_meshed(&agents[0], ID, "default/client");
            let signalled = std::time::Instant::now();
            old.signal(libc::SIGTERM);
            (old.wait(WAIT), signalled.elapsed())
        } else {
            let signalled = std::time::Instant::now();
            agents[0].signal(libc::SIGTERM);
            agents[0]
                .logs()
                .wait_for("the drain to start", WAIT, |lines| {
                    lines
                        .iter()
                        .any(|l| l.contains("stopping once the meshed connections"))
                        .then_some(())
                });
            assert_eq!(
                probe(&c, "client", &target),
                SECRET,
                "served while draining"
            );
            (agents[0].wait_exit(WAIT), signalled.elapsed())
        };
        assert!(status.success(), "successor {successor}: {status}");
        // The deadline counts from the agent's own receipt of the signal, after this.
        assert!(
            drained_for >= Duration::from_secs(5),
            "successor {successor}: drained until the deadline, not {drained_for:?}"
        );
        assert!(
            !long.wait(WAIT).success(),
            "successor {successor}: the connection left is cut"
        );
    }
}

/// An 8 s connection from the client to `target` sending 1 000 B every 100 ms, open.
fn open_long(c: &Cluster, target: &str) -> Process {
    open_trickle(c, target, 8)
}

/// [`open_long`] lasting `seconds`.
fn open_trickle(c: &Cluster, target: &str, seconds: u32) -> Process {
    let seconds = seconds.to_string();
    let long = c.pod("client").0.spawn(
        "client",
        &["tcp-trickle", "--connect", target, "--seconds", &seconds],
    );
    long.stdout()
        .wait_for("the long connection to open", WAIT, |l| {
            l.iter().any(|l| l.contains("\"open\"")).then_some(())
        });
    long
}

/// Batches of new meshed connections (each: connect, 64 B each way, close) until `stop`;
/// every connection of every batch must succeed. Returns the batches run.
fn load_until(c: &Cluster, target: &str, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut batches = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut p = c
            .pod("client")
            .0
            .spawn("client", &["rr", "--connect", target, "--count", "50"]);
        p.wait_success(WAIT);
        batches += 1;
    }
    batches
}

/// Every byte `long` (a `tcp-trickle` that ended) sent reached `sink` (a one-connection
/// `tcp-server`), which then exits in order.
fn assert_all_arrived(long: &Process, sink: &mut Process, what: &str) {
    let sent = event(long, "done")["sent"].as_u64().expect("sent");
    let received = event(sink, "served")["received"]
        .as_u64()
        .expect("received");
    assert_eq!(received, sent, "{what}: every byte arrived");
    sink.wait_success(WAIT);
}

/// The first JSON line of `p` whose `event` is `name`.
fn event(p: &Process, name: &str) -> Value {
    p.stdout().wait_for(name, WAIT, |lines| {
        lines.iter().find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v["event"] == name)
        })
    })
}

/// A successor that announces itself and exits before it listens: the old agent keeps its
/// listeners (meshed connections still work) until it sees nobody runs the instance, then
/// exits with an error, for a restart to take the instance.
#[test]
fn an_agent_whose_successor_exits_before_listening_exits_for_a_restart() {
    let (c, _ca, mut agents, _server, target) = serving("mesh_orphan");
    let successor = hold_successor_lock(&agents[0].pin_dir());
    agents[0]
        .logs()
        .wait_for("the agent to hand over", WAIT, |l| {
            l.iter()
                .any(|l| l.contains("the mesh listeners stay until its listen"))
                .then_some(())
        });
    assert_eq!(probe(&c, "client", &target), SECRET, "still carried");
    drop(successor);
    let status = agents[0].wait_exit(WAIT);
    assert_eq!(status.code(), Some(1), "the old agent exits with an error");
    agents[0].restart();
    wait_meshed(&agents[0], ID, "default/client");
    assert_eq!(probe(&c, "client", &target), SECRET);
}

/// Takes the successor lock of the instance pinned at `pin_dir` (as a successor would),
/// until dropped.
fn hold_successor_lock(pin_dir: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    let dir = pin_dir.join("successor");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let file = std::fs::File::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    // The agent holds it itself until its listeners are up.
    let deadline = std::time::Instant::now() + WAIT;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "flock {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    file
}

/// Removes a cgroup directory when dropped (after the agents in it have exited).
struct CgroupDir(std::path::PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Kubernetes mode, pods not bound yet isolated (the default), each agent in a cgroup of its
/// own below the kubelet's pods cgroup, as a DaemonSet pod's container is: a successor in
/// another cgroup takes over the server's node (the pods meshed by their namespace's label).
/// The connection the old agent still carries keeps going after the successor's programs are
/// attached (the agents' sockets in pods' namespaces are no pod's for either agent's
/// programs), and new ones work.
#[test]
fn in_kubernetes_mode_a_successor_in_another_cgroup_takes_over() {
    let c = Cluster::builder("mesh_kube")
        .kubelet_cgroups()
        .node("a", &["client"])
        .node("b", &["server"])
        .build();
    let ca = ca(&c);
    let api = weft_testkit::fakeapi::FakeApi::start();
    // Enrolled by their namespace's label (the standalone tests enroll pods by their own).
    api.apply(serde_json::json!({"kind": "Namespace", "metadata": {
        "name": "default", "labels": {"weft.io/mesh": "enabled"},
    }}));
    let mut docs = Vec::new();
    for pod in ["client", "server"] {
        let labels = [("app", pod)];
        let doc = k8s::pod(c.pod(pod).1, "default", &labels, &[], true);
        docs.push(if pod == "server" {
            doc.replace("spec:\n", "spec:\n  serviceAccountName: server\n")
        } else {
            doc
        });
    }
    c.apply_to_api(&api, &k8s::file(&docs));
    // Guards first: removed after the agents (declared later, dropped first) exited.
    let cgroups: Vec<CgroupDir> = [("a", 1), ("b", 1), ("b", 2)]
        .iter()
        .map(|(n, i)| {
            let dir = c
                .node(n)
                .cgroup()
                .join("kubepods.slice")
                .join(format!("weft-agent-{i}"));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            CgroupDir(dir)
        })
        .collect();
    // The pods' network namespaces are found through their processes.
    let (server_node, server_pod) = c.pod("server");
    let _hold = c
        .pod("client")
        .0
        .start_server("client", &["hold-server", "--listen", "[::]:9999"]);
    let _rr = server_node.start_server("server", &["rr-server", "--listen", "[::]:9000"]);
    let mut sink = server_node.start_server(
        "server",
        &["tcp-server", "--listen", "[::]:8081", "--connections", "1"],
    );
    let ca_arg = ca.path().display().to_string();
    let mut agents: Vec<Agent> = [("a", 0), ("b", 1)]
        .iter()
        .map(|(n, i)| {
            let mut options = AgentOptions::with_api(&api, c.node(n), &["--mesh-ca", &ca_arg]);
            options.log_level = "info,weft::mesh=debug".into();
            options.cgroup = Some(cgroups[*i].0.clone());
            Agent::start_with(c.node(n), options)
        })
        .collect();
    wait_meshed(&agents[0], ID, "default/client");
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    let rr_target = format!("{}:9000", server_pod.ipv4);
    let mut first = c
        .pod("client")
        .0
        .spawn("client", &["rr", "--connect", &rr_target, "--count", "20"]);
    first.wait_success(WAIT);
    let long_target = format!("{}:8081", server_pod.ipv4);
    let mut long = open_long(&c, &long_target);
    let mut old = agents[1].start_successor_in(Some(cgroups[2].0.clone()));
    wait_meshed(&agents[1], SERVER_ID, "default/server");
    old.signal(libc::SIGTERM);
    long.wait_success(WAIT);
    old.wait_success(WAIT);
    assert_all_arrived(&long, &mut sink, "the long connection");
    let mut after = c
        .pod("client")
        .0
        .spawn("client", &["rr", "--connect", &rr_target, "--count", "20"]);
    after.wait_success(WAIT);
    drop(agents);
}

/// Istio's security policy, applied where the pods are served: a document in namespace
/// `default` of the source directory.
fn apply_security(c: &Cluster, docs: &[&str]) {
    c.write_source("security.yaml", &docs.join("---\n"));
}

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: default}\nspec:\n  mtls: {mode: STRICT}\n";

/// STRICT refuses a plaintext client at its SYN (the server never accepts it) and keeps
/// serving a meshed one; before it, the plaintext client was served (PERMISSIVE).
#[test]
fn strict_refuses_plaintext_and_serves_the_mesh() {
    let (c, _ca, agents, _server, target) = serving("authz_strict");
    assert_eq!(
        probe(&c, "plain", &target),
        SECRET,
        "PERMISSIVE without a policy"
    );
    apply_security(&c, &[STRICT]);
    let refused = settled(true, || probe(&c, "plain", &target).starts_with("error"));
    assert!(refused, "plaintext refused once STRICT is in force");
    let (_, listed) = agents[1].client("authz");
    let server = listed["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["pod"] == "default/server"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(server["mtls"], "STRICT", "weft authz: {listed}");
    assert_eq!(server["mtls_from"], serde_json::json!(["default/strict"]));
    let (ok, v) = agents[1].client_args(&[
        "authz",
        "check",
        "--from",
        "default/plain",
        "--to",
        "default/server",
        "--port",
        "8080/TCP",
    ]);
    assert_eq!((ok, v["reason"].as_str()), (false, Some("mtls_required")));
    // Nor through packets the datapath cannot parse (IPv6 extension headers past its limit).
    let v6 = format!("[{}]:8080", c.pod("server").1.ipv6);
    let mut p = c.pod("plain").0.spawn(
        "plain",
        &[
            "probe",
            "--timeout-ms",
            "1000",
            &format!("tcp-dstopts:{v6}"),
        ],
    );
    let unparsed = p.probe_results()[&format!("tcp-dstopts:{v6}")]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(unparsed.starts_with("error"), "{unparsed}");
    assert_eq!(probe(&c, "client", &target), SECRET, "the meshed client");
    // The kubelet's probes come from the node: exempt, as in Istio's ambient mode.
    let to = format!("tcp:{target}");
    let mut kubelet = c
        .node("b")
        .spawn_outside(&["probe", "--timeout-ms", "1000", &to]);
    assert_eq!(
        kubelet.probe_results()[&to].as_str(),
        Some(SECRET),
        "a probe from the node"
    );
    let drops: f64 = agents[1]
        .metrics()
        .into_iter()
        .filter(|s| {
            s.name == "weft_dropped_flows_total" && s.label("reason") == Some("authorization")
        })
        .map(|s| s.value)
        .sum();
    assert!(
        drops >= 1.0,
        "the refusal is counted with its reason: {drops}"
    );
}

/// Plaintext is judged in the kernel by port and source, not refused as a whole: a STRICT
/// port refuses plaintext while the other ports serve it; an ALLOW from an address block
/// admits plaintext callers inside it (except on the STRICT port) and refuses the others at
/// their SYN, over IPv4 and IPv6.
#[test]
fn plaintext_is_refused_only_where_the_policy_refuses_it() {
    let (c, _ca, agents, _server, target) = serving("authz_table");
    let _on_9090 = c
        .pod("server")
        .0
        .start_server("server", &["serve", "--name", SECRET, "--tcp", "9090"]);
    let strict_port = target.replace(":8080", ":9090");
    let v6 = format!("[{}]:8080", c.pod("server").1.ipv6);
    assert_eq!(probe(&c, "plainsrv", &target), SECRET, "no policy yet");
    let strict_9090 = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict-9090, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {\"9090\": {mode: STRICT}}\n";
    apply_security(&c, &[strict_9090]);
    let refused = settled(true, || {
        probe(&c, "plain", &strict_port).starts_with("error")
    });
    assert!(refused, "plaintext to the STRICT port refused");
    assert_eq!(
        probe(&c, "plain", &target),
        SECRET,
        "plaintext to another port"
    );
    assert_eq!(probe(&c, "plain", &v6), SECRET, "and over IPv6");
    assert_eq!(
        probe(&c, "client", &strict_port),
        SECRET,
        "the meshed client"
    );
    let plain = c.pod("plain").1;
    let from_plain = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: from-plain, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{ipBlocks: [{}/32, {}/128]}}}}]\n",
        plain.ipv4, plain.ipv6
    );
    apply_security(&c, &[strict_9090, &from_plain]);
    let refused = settled(true, || probe(&c, "plainsrv", &target).starts_with("error"));
    assert!(refused, "a plaintext caller outside the block refused");
    let plainsrv_v6 = probe(&c, "plainsrv", &v6);
    assert!(plainsrv_v6.starts_with("error"), "over IPv6: {plainsrv_v6}");
    assert_eq!(probe(&c, "plain", &target), SECRET, "the block's caller");
    assert_eq!(
        probe(&c, "plain", &v6),
        SECRET,
        "the block's caller over IPv6"
    );
    let strict = probe(&c, "plain", &strict_port);
    assert!(strict.starts_with("error"), "STRICT still holds: {strict}");
    let refusals = agents[1]
        .metrics()
        .into_iter()
        .filter(|s| {
            s.name == "weft_dropped_flows_total" && s.label("reason") == Some("authorization")
        })
        .map(|s| s.value)
        .sum::<f64>();
    assert!(refusals >= 4.0, "each refusal counted: {refusals}");
    let plain_decision = |event: &str, source: &str, reason: &str| {
        let found = || {
            agents[1].flows(&["--last", "300"]).iter().any(|r| {
                r["event"] == event
                    && r["source"]["pod"] == source
                    && r["authorization"]["reason"] == reason
            })
        };
        settled(true, found)
    };
    assert!(
        plain_decision("drop", "plainsrv", "not_allowed"),
        "the kernel's refusal names why"
    );
    assert!(
        plain_decision("tcp_open", "plain", "allowed"),
        "the accepted plaintext connection too"
    );
    let counted = |action: &str, policy: &str| decisions(&agents[1], action, policy);
    assert!(
        counted("allow", "default/from-plain") >= 2.0,
        "plaintext decisions counted"
    );
    assert!(counted("deny", "") >= 2.0, "plaintext refusals counted");
}

/// `weft_authorization_decisions_total{action, policy, reporter="destination"}` on `agent`.
/// `weft_mesh_streams_refused_total{reason}` of `agent`.
fn streams_refused(agent: &Agent, reason: &str) -> f64 {
    agent
        .metrics()
        .into_iter()
        .filter(|s| {
            s.name == "weft_mesh_streams_refused_total" && s.label("reason") == Some(reason)
        })
        .map(|s| s.value)
        .sum()
}

fn decisions(agent: &Agent, action: &str, policy: &str) -> f64 {
    agent
        .metrics()
        .into_iter()
        .filter(|s| {
            s.name == "weft_authorization_decisions_total"
                && s.label("action") == Some(action)
                && s.label("policy") == Some(policy)
                && s.label("reporter") == Some("destination")
        })
        .map(|s| s.value)
        .sum()
}

/// An ALLOW policy by principal admits one service account's pods and refuses another's;
/// a DENY by namespace wins over an ALLOW of everything.
#[test]
fn authorization_policies_decide_by_principal_and_deny_wins() {
    let (c, _ca, agents, _server, target) = serving_with("authz_allow", &["other"], &[]);
    wait_meshed(
        &agents[0],
        "spiffe://cluster.local/ns/default/sa/other",
        "default/other",
    );
    assert_eq!(probe(&c, "other", &target), SECRET, "no policy yet");
    let allow = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/default]}}]\n";
    let audit = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit-all, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: AUDIT\n  rules: [{}]\n";
    apply_security(&c, &[allow, audit]);
    let refused = settled(true, || probe(&c, "other", &target).starts_with("error"));
    assert!(refused, "another service account is refused");
    assert_eq!(
        probe(&c, "client", &target),
        SECRET,
        "the principal allowed"
    );
    // The server's flows name the deciding policy, and the AUDIT one beside it.
    let decided = |event: &str, reason: &str, policy: Value, principal: &str| {
        let found = || {
            agents[1].flows(&["--last", "200"]).iter().any(|r| {
                let a = &r["authorization"];
                r["event"] == event
                    && r["reporter"] == "destination"
                    && a["reason"] == reason
                    && a["by"]["policy"] == policy
                    && a["audit"]["policy"] == "default/audit-all"
                    && r["mesh"]["source_principal"] == principal
            })
        };
        settled(true, found)
    };
    assert!(
        decided(
            "drop",
            "not_allowed",
            Value::Null,
            "spiffe://cluster.local/ns/default/sa/other"
        ),
        "the refused stream's record"
    );
    assert!(
        decided(
            "tcp_open",
            "allowed",
            Value::from("default/only-client"),
            ID
        ),
        "the delivered connection's record"
    );
    let check = |from: &str| {
        let (ok, v) = agents[1].client_args(&[
            "authz",
            "check",
            "--from",
            from,
            "--to",
            "default/server",
            "--port",
            "8080/TCP",
        ]);
        (
            ok,
            v["reason"].as_str().unwrap_or_default().to_owned(),
            v["policy"].clone(),
        )
    };
    assert_eq!(
        check("default/other"),
        (false, "not_allowed".to_owned(), Value::Null),
        "weft authz check exits 1 and says why"
    );
    assert_eq!(
        check("default/client"),
        (
            true,
            "allowed".to_owned(),
            Value::from("default/only-client")
        )
    );
    let everyone = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: everyone, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{}]\n";
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: not-default, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [default]}}]\n";
    apply_security(&c, &[everyone, deny]);
    let refused = settled(true, || probe(&c, "client", &target).starts_with("error"));
    assert!(refused, "the DENY wins over the ALLOW");
    assert_eq!(
        check("default/client"),
        (
            false,
            "denied".to_owned(),
            Value::from("default/not-default")
        )
    );
    let unauthorized = streams_refused(&agents[1], "unauthorized");
    assert!(unauthorized >= 2.0, "refusals counted: {unauthorized}");
    let decisions = |action: &str, policy: &str| decisions(&agents[1], action, policy);
    assert!(
        decisions("allow", "default/only-client") >= 1.0,
        "the ALLOW that decided"
    );
    assert!(
        decisions("deny", "default/not-default") >= 1.0,
        "the DENY that decided"
    );
    assert!(
        decisions("deny", "") >= 1.0,
        "no ALLOW matching: no policy named"
    );
}

/// A policy change never refuses, even for an instant, what both the old and the new policy
/// allow: while the policy flips between two versions that both admit the meshed client (by
/// principal) and the plaintext pod (by address block, with a plaintext table that changes
/// each time), every one of their connections is served.
#[test]
fn a_policy_change_never_refuses_what_both_versions_allow() {
    let (c, _ca, agents, _server, target) = serving("authz_flip");
    let (plain, plainsrv) = (c.pod("plain").1.ipv4, c.pod("plainsrv").1.ipv4);
    let version = |principal: &str, blocks: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: flip, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/default/sa/default, cluster.local/ns/default/sa/{principal}]}}}}]\n  - from: [{{source: {{ipBlocks: [{blocks}]}}}}]\n"
        )
    };
    let versions = [
        version("other", &format!("{plain}/32")),
        version("neighbor", &format!("{plain}/32, {plainsrv}/32")),
    ];
    apply_security(&c, &[&versions[0]]);
    let refused = settled(true, || probe(&c, "plainsrv", &target).starts_with("error"));
    assert!(refused, "the first version is in force");
    // A refused plaintext SYN is retransmitted and may pass a second later: refusals are
    // counted, not only failed connections.
    let refusals = || {
        agents[1]
            .metrics()
            .into_iter()
            .filter(|s| {
                (s.name == "weft_dropped_flows_total" && s.label("reason") == Some("authorization"))
                    || (s.name == "weft_mesh_streams_refused_total"
                        && s.label("reason") == Some("unauthorized"))
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = refusals();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let flips = std::thread::scope(|s| {
        // About as long each: a plaintext connection costs a fraction of a meshed one.
        for (pod, count) in [("client", 600), ("plain", 4000)] {
            let (c, target, done) = (&c, &target, &done);
            s.spawn(move || {
                let counts = c.pod(pod).0.spray(pod, target, count);
                assert_eq!(counts, [(SECRET.to_owned(), count)].into(), "{pod}");
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let mut flips = 0usize;
        while done.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            flips += 1;
            apply_security(&c, &[&versions[flips % 2]]);
            std::thread::sleep(Duration::from_millis(40));
        }
        flips
    });
    assert!(flips >= 10, "the policy changed {flips} times meanwhile");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(refusals(), before, "nothing refused meanwhile");
    let syncs = agents[1]
        .metrics()
        .into_iter()
        .find(|s| s.name == "weft_bpf_map_entries" && s.label("map_name") == Some("AUTHZ"))
        .map(|s| s.value);
    assert!(
        syncs.is_some_and(|n| n > 0.0),
        "plaintext tables held: {syncs:?}"
    );
}

/// NetworkPolicy and AuthorizationPolicy together: a connection passes only when both allow
/// it. The NetworkPolicy admits `client` and `neighbor`, the AuthorizationPolicy the
/// principals of `client` and `other`: only `client` is served; `other` (admitted by
/// principal) is refused by the NetworkPolicy on its real address, `neighbor` (admitted by
/// address, same node) by its principal, and the plaintext pod by both.
#[test]
fn network_and_authorization_policies_must_both_allow() {
    let (c, _ca, agents, _server, target) = serving_with("authz_np", &["other"], &[]);
    wait_meshed(
        &agents[0],
        "spiffe://cluster.local/ns/default/sa/other",
        "default/other",
    );
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-in, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchExpressions: [{key: app, operator: In, values: [client, neighbor]}]}\n";
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-principal, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/default, cluster.local/ns/default/sa/other]}}]\n";
    // Each alone first: which layer admits whom.
    c.write_source("np.yaml", np);
    let other = settled(true, || probe(&c, "other", &target).starts_with("error"));
    assert!(other, "the NetworkPolicy alone refuses other");
    assert_eq!(
        probe(&c, "neighbor", &target),
        SECRET,
        "and admits neighbor"
    );
    c.write_source("np.yaml", "");
    apply_security(&c, &[ap]);
    let refused = settled(true, || probe(&c, "neighbor", &target).starts_with("error"));
    assert!(refused, "the AuthorizationPolicy alone refuses neighbor");
    assert_eq!(probe(&c, "other", &target), SECRET, "and admits other");
    c.write_source("np.yaml", np);
    let refused = settled(true, || probe(&c, "other", &target).starts_with("error"));
    assert!(refused, "admitted by principal, refused by address");
    let refused = probe(&c, "neighbor", &target);
    assert!(
        refused.starts_with("error"),
        "admitted by address, refused by principal: {refused}"
    );
    let plain = probe(&c, "plain", &target);
    assert!(plain.starts_with("error"), "refused by both: {plain}");
    assert_eq!(probe(&c, "client", &target), SECRET, "admitted by both");
}

/// A meshed caller whose address the server pod's NetworkPolicy refuses is reset as soon as
/// the server's agent finds that the kernel dropped its delivery, not left connected until
/// the delivery's 10 s timeout: the probe (which reads for 1 s) reads a reset, and node b
/// counts the refusal as the NetworkPolicy's.
#[test]
fn a_meshed_caller_the_network_policy_refuses_is_reset() {
    let (c, _ca, agents, _server, target) = serving("mesh_np_reset");
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server-in, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: nobody}}\n";
    c.write_source("np.yaml", np);
    let refused = settled(true, || probe(&c, "client", &target).starts_with("error"));
    assert!(refused, "the NetworkPolicy refuses the client");
    assert_eq!(
        probe(&c, "client", &target),
        "error: read: Connection reset by peer (os error 104)"
    );
    let by_policy = streams_refused(&agents[1], "network_policy");
    assert!(by_policy >= 1.0, "refusals counted: {by_policy}");
    c.write_source("np.yaml", "");
    let served = settled(SECRET.to_owned(), || probe(&c, "client", &target));
    assert_eq!(served, SECRET, "served again once the policy is gone");
}

/// A meshed pod of the same node reaches a pod whose policy depends on who calls through the
/// proxy: decided on its identity (never refused as plaintext), delivered with its own pod
/// address; a plaintext pod of the node stays refused, and a policy change applies to it too.
#[test]
fn same_node_meshed_callers_are_decided_by_their_identity() {
    let (c, _ca, agents, _server, target) = serving("authz_local");
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    let only = |sa: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/default/sa/{sa}]}}}}]\n"
        )
    };
    apply_security(&c, &[STRICT, &only("neighbor")]);
    let refused = settled(true, || probe(&c, "client", &target).starts_with("error"));
    assert!(
        refused,
        "the other node's client is not the principal allowed"
    );
    assert_eq!(
        probe(&c, "neighbor", &target),
        SECRET,
        "the same-node principal allowed"
    );
    let (server_node, server_pod) = c.pod("server");
    let mut once = server_node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            "[::]:8081",
            "--reply-name",
            "once",
            "--connections",
            "1",
        ],
    );
    let once_target = format!("{}:8081", server_pod.ipv4);
    let sprayed = c.pod("neighbor").0.spray("neighbor", &once_target, 1);
    assert_eq!(sprayed.get("once"), Some(&1), "{sprayed:?}");
    assert_eq!(
        served_peers(&mut once, 1)
            .iter()
            .map(|p| host(p))
            .collect::<Vec<_>>(),
        [c.pod("neighbor").1.ipv4.to_string()],
        "the server sees the caller's pod address"
    );
    let plain = probe(&c, "plainsrv", &target);
    assert!(plain.starts_with("error"), "same-node plaintext: {plain}");
    let allowed: f64 = agents[1]
        .metrics()
        .into_iter()
        .filter(|s| {
            s.name == "weft_authorization_decisions_total"
                && s.label("action") == Some("allow")
                && s.label("policy") == Some("default/only")
        })
        .map(|s| s.value)
        .sum();
    assert!(
        allowed >= 1.0,
        "the same-node decision is counted: {allowed}"
    );
    apply_security(&c, &[STRICT, &only("default")]);
    let refused = settled(true, || probe(&c, "neighbor", &target).starts_with("error"));
    assert!(refused, "the same-node caller is refused once not allowed");
    assert_eq!(
        probe(&c, "client", &target),
        SECRET,
        "the principal now allowed"
    );
    // A DENY by principal alone: plaintext passes, the same-node caller it names does not.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: not-neighbor, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/neighbor]}}]\n";
    apply_security(&c, &[deny]);
    let served = settled(true, || probe(&c, "plainsrv", &target) == SECRET);
    assert!(served, "plaintext is not what the DENY names");
    let refused = probe(&c, "neighbor", &target);
    assert!(
        refused.starts_with("error"),
        "the principal denied: {refused}"
    );
}

/// A meshed connection to a pod's port 15008, the proxy's own inbound listener there, is
/// refused on both of the proxy's paths (a tunnel inside a tunnel, with the caller's
/// address): from another node's meshed pod, and from a meshed pod of the same node once the
/// server's STRICT policy has those captured. Node b counts both as forbidden.
#[test]
fn a_meshed_connection_to_a_pods_proxy_port_is_refused() {
    let (c, _ca, agents, _server, target) = serving("mesh_own_port");
    wait_meshed(&agents[1], NEIGHBOR_ID, "default/neighbor");
    apply_security(&c, &[STRICT]);
    let captured = settled(true, || probe(&c, "plainsrv", &target).starts_with("error"));
    assert!(captured, "STRICT applies: same-node callers are captured");
    let own_port = format!("{}:15008", c.pod("server").1.ipv4);
    let before = streams_refused(&agents[1], "forbidden");
    // A reset either way: the same-node refusal comes at accept, so it may reach the probe
    // before its connect() returned.
    let resets = [
        "error: read: Connection reset by peer (os error 104)",
        "error: connect: ECONNRESET",
    ];
    for pod in ["client", "neighbor"] {
        let got = probe(&c, pod, &own_port);
        assert!(resets.contains(&got.as_str()), "{pod}: {got}");
    }
    assert_eq!(
        streams_refused(&agents[1], "forbidden") - before,
        2.0,
        "both refusals counted by the server's agent"
    );
}

/// In Kubernetes mode Istio's security API is read once the API server serves it: without
/// its CRDs the agent is ready and plaintext is served; once they appear, a STRICT
/// PeerAuthentication from the API refuses plaintext while a meshed client of the same node
/// gets through; deleting it lifts it.
#[test]
fn in_kubernetes_mode_security_policies_are_read_once_their_crds_exist() {
    let c = Cluster::builder("authz_kube")
        .kubelet_cgroups()
        .node("a", &["client", "plain", "server"])
        .build();
    let ca = ca(&c);
    let api = weft_testkit::fakeapi::FakeApi::start();
    api.apply(serde_json::json!({"kind": "Namespace", "metadata": {"name": "default"}}));
    let docs: Vec<String> = [("client", true), ("plain", false), ("server", true)]
        .into_iter()
        .map(|(pod, meshed)| pod_doc(&c, pod, meshed, true))
        .collect();
    c.apply_to_api(&api, &k8s::file(&docs));
    // The pods' network namespaces are found through their processes.
    let _hold = c
        .pod("client")
        .0
        .start_server("client", &["hold-server", "--listen", "[::]:9999"]);
    let _server = c
        .pod("server")
        .0
        .start_server("server", &["serve", "--name", SECRET, "--tcp", "8080"]);
    let ca_arg = ca.path().display().to_string();
    let options = AgentOptions::with_api(
        &api,
        c.node("a"),
        &["--mesh-ca", &ca_arg, "--crd-discovery-interval", "1s"],
    );
    let agent = Agent::start_with(c.node("a"), options);
    wait_meshed(
        &agent,
        "spiffe://cluster.local/ns/default/sa/client",
        "default/client",
    );
    wait_meshed(&agent, SERVER_ID, "default/server");
    let target = format!("{}:8080", c.pod("server").1.ipv4);
    assert_eq!(probe(&c, "plain", &target), SECRET, "no CRDs: PERMISSIVE");
    api.serve_security_api();
    api.apply(serde_json::json!({
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "default"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }));
    let refused = settled(true, || probe(&c, "plain", &target).starts_with("error"));
    assert!(refused, "plaintext refused once STRICT comes from the API");
    assert_eq!(
        probe(&c, "client", &target),
        SECRET,
        "the meshed client of the same node"
    );
    let (_, listed) = agent.client("authz");
    assert_eq!(
        listed["policies"]
            .as_array()
            .map(|p| p.iter().map(|p| p["name"].clone()).collect::<Vec<_>>()),
        Some(vec![Value::from("default/strict")]),
        "{listed}"
    );
    assert!(api.delete("PeerAuthentication", "default", "strict"));
    let served = settled(true, || probe(&c, "plain", &target) == SECRET);
    assert!(served, "deleting it lifts it");
}
