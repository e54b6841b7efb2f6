//! Item 6, upgrades: maps pinned by an agent of another ABI version are never read by new
//! programs, and the move to new maps leaves no window of wrong verdicts.
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

use serde_json::Value;
use weft_testkit::{Agent, AgentOptions, Node, netpol::np, proc::Process};

use crate::{
    DENY_SERVER_INGRESS, Reach, client_server, client_server_pods, expect_probe, probe,
    server_target,
};

/// The agent restarts onto pins of another ABI version (its maps under another directory)
/// while the API server is away: the programs in place keep enforcing on the maps they were
/// filled with; once the new maps hold the first full sync the programs switch to them and
/// the old maps go.
#[test]
fn pins_of_another_abi_version_keep_enforcing_until_new_maps_are_filled() {
    let (node, _server) = client_server(
        Node::builder("adv_upgrade_abi").kubelet_cgroups(),
        &["8080"],
    );
    let _client_server =
        node.start_server("client", &["serve", "--name", "client", "--tcp", "8080"]);
    let api = crate::api_with(
        &node,
        &[
            client_server_pods(&node),
            np("default", "deny", DENY_SERVER_INGRESS),
        ],
    );
    let mut agent = Agent::start_with(&node, AgentOptions::with_api(&api, &node, &[]));
    let denied = server_target(&node, 8080);
    let allowed = format!("tcp:{}:8080", node.pod("client").ipv4);
    expect_probe(&node, "client", &denied, Reach::Blocked);
    expect_probe(&node, "server", &allowed, Reach::Answer("client"));

    agent.stop();
    let other = agent.pin_dir().join("maps-v1-00000000000000ff");
    std::fs::rename(agent.maps_dir(), &other).expect("rename the maps directory");
    api.set_down(true);
    agent.restart();
    for _ in 0..3 {
        assert!(
            probe(&node, "client", &denied).starts_with("error"),
            "allowed while the new agent has not synced"
        );
        assert_eq!(probe(&node, "server", &allowed), "client");
    }
    assert!(
        agent.maps_dirs().contains(&other),
        "{:?}",
        agent.maps_dirs()
    );

    api.set_down(false);
    agent.wait_status("ready", |s| s["services"]["ready"] == true);
    expect_probe(&node, "client", &denied, Reach::Blocked);
    expect_probe(&node, "server", &allowed, Reach::Answer("client"));
    let dirs = agent.maps_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_ne!(dirs[0], other);
}

/// Kernel hash map elements are reused at once, so a program can copy a value half of one
/// write and half of another: the kernel checks each `ENDPOINTS` and `SERVICES` value's seal
/// and fails safe on one that does not match. Here a pod's endpoint is torn by hand.
#[test]
fn a_torn_endpoint_value_isolates_its_pod() {
    use std::os::unix::fs::MetadataExt as _;

    use aya::maps::{HashMap, Map, MapData};
    use weft_abi::policy::EndpointInfo;

    let (node, _server) = client_server(Node::builder("adv_upgrade_torn"), &["8080"]);
    let agent = Agent::with_source(&node, &[]);
    let target = server_target(&node, 8080);
    expect_probe(&node, "client", &target, Reach::Answer("server"));

    let id = std::fs::metadata(node.pod("server").cgroup())
        .expect("server cgroup")
        .ino();
    let path = agent.maps_dir().join("ENDPOINTS");
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut map = HashMap::<_, u64, EndpointInfo>::try_from(Map::HashMap(data)).expect("ENDPOINTS");
    let mut torn = map.get(&id, 0).expect("the server's endpoint");
    // A word of another write: the seal no longer matches.
    torn.policy_set ^= 1;
    map.insert(id, torn, 0).expect("write");

    expect_probe(&node, "client", &target, Reach::Blocked);
    agent.wait_metrics("torn reads counted", |m| {
        weft_testkit::prom::sum(m, "weft_datapath_errors_total", &[("reason", "torn_read")]) >= 1.0
    });
}

/// With `--sockmap`, a move to maps of another shape loses no data a paired socket was sent
/// socket to socket and has not read yet: the old socket map's pins go, but each paired
/// socket keeps the program it was paired with, which holds the map, until it closes. The
/// server reads only after the move; every byte arrives, in order.
#[test]
fn a_move_to_new_maps_loses_no_unread_paired_data() {
    let node = Node::builder("adv_upgrade_sockmap")
        .pod("client")
        .pod("server")
        .build();
    let mut agent = Agent::start_with(
        &node,
        AgentOptions {
            extra_args: vec!["--sockmap".into()],
            ..AgentOptions::default()
        },
    );
    let to = format!("{}:8080", node.pod("server").ipv4);
    let server = node.start_server(
        "server",
        &[
            "tcp-server",
            "--listen",
            &to,
            "--connections",
            "1",
            "--read-after-ms",
            "6000",
        ],
    );
    let mut client = node.spawn(
        "client",
        &[
            "tcp-trickle",
            "--connect",
            &to,
            "--chunk",
            "1000",
            "--every-ms",
            "50",
            "--seconds",
            "3",
        ],
    );
    result(&client, "open");
    std::thread::sleep(Duration::from_millis(500));
    let old = agent.maps_dir();
    agent.stop();
    agent.restart_with(&["--sockmap", "--max-sockmap-connections", "2048"]);
    agent.wait_status("ready", |s| s["services"]["ready"] == true);
    let dirs = agent.maps_dirs();
    assert!(dirs.len() == 1 && dirs[0] != old, "{dirs:?}");
    client.wait_success(WAIT);
    let sent = result(&client, "done")["sent"].as_u64().expect("sent");
    let served = result(&server, "served");
    assert_eq!(served["received"], sent, "{served}");
}

/// The first JSON line of `p` with this `event`.
fn result(p: &Process, event: &str) -> Value {
    p.stdout().wait_for(event, WAIT, |lines| {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["event"] == event)
    })
}
