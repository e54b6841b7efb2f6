//! The datapath outlives the agent: pinned links stay attached after SIGKILL, a restarted
//! agent adopts them (one attachment, no event lost), and `weft cleanup` removes everything.
use std::{net::SocketAddr, path::Path, time::Duration};

use serde_json::Value;
use weft::datapath::{self, Attached};
use weft_testkit::{Agent, AgentOptions, Close, Node, agent::run_refused, prom};

const WAIT: Duration = Duration::from_secs(20);

fn attached(node: &Node) -> Vec<Attached> {
    datapath::attached_programs(node.cgroup())
        .unwrap_or_else(|e| panic!("query {}: {e}", node.cgroup().display()))
}

/// Every hook weft uses.
const HOOKS: [&str; 12] = [
    "sock_ops",
    "cgroup_skb/ingress",
    "cgroup_skb/egress",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "sock_release",
];

fn assert_one_of_each(list: &[Attached]) {
    for kind in HOOKS {
        let n = list.iter().filter(|a| a.attach_type == kind).count();
        assert_eq!(n, 1, "{kind} attachments on the test cgroup: {list:?}");
    }
    assert_eq!(list.len(), HOOKS.len(), "{list:?}");
    let ours = list
        .iter()
        .all(|a| a.link_id != 0 && a.program_name.starts_with("weft_"));
    assert!(ours, "{list:?}");
}

/// The attachments themselves: (attach type, link id).
fn links(list: &[Attached]) -> Vec<(&'static str, u32)> {
    list.iter().map(|a| (a.attach_type, a.link_id)).collect()
}

fn server(node: &Node, port: u16) -> SocketAddr {
    SocketAddr::new(node.pod("server").ipv4.into(), port)
}

#[test]
fn datapath_survives_sigkill_and_a_restarted_agent_adopts_it() {
    let node = Node::builder("survives_sigkill")
        .pod("client")
        .pod("server")
        .build();
    let mut agent = Agent::start(&node);
    let before = attached(&node);
    assert_one_of_each(&before);

    agent.kill();
    assert_eq!(
        links(&attached(&node)),
        links(&before),
        "SIGKILL detached nothing"
    );
    let maps = agent.maps_dir();
    for pin in [
        agent.pin_dir().join("links/weft_sockops"),
        maps.join("CONN_EVENTS"),
        maps.join("CONN_STATE"),
    ] {
        assert!(pin.exists(), "{} is still pinned", pin.display());
    }
    // Traffic while no agent runs: the kernel keeps recording into the pinned ring buffer.
    let x = node.tcp_exchange(
        "client",
        "server",
        server(&node, 8080),
        4321,
        1234,
        Close::Shutdown,
    );

    agent.restart();
    let installs: Vec<String> = agent
        .records()
        .iter()
        .filter(|r| r["fields"]["message"] == "program attached")
        .map(|r| {
            r["fields"]["install"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(installs, vec!["Adopted"; HOOKS.len()]);
    // Same links (the attachments); the programs behind them were swapped in place.
    assert_eq!(
        links(&attached(&node)),
        links(&before),
        "the restarted agent attached nothing new"
    );
    let rec = agent.wait_conn("the connection made while no agent ran", |f| {
        f["event"] == "tcp_close" && f["role"] == "client" && f["local"] == x.client.as_str()
    });
    assert_eq!(
        (rec["bytes_sent"].as_u64(), rec["bytes_received"].as_u64()),
        (Some(4321), Some(1234))
    );

    // And it keeps working.
    let x = node.tcp_exchange(
        "client",
        "server",
        server(&node, 8081),
        10,
        20,
        Close::Shutdown,
    );
    agent.wait_conn("a new connection", |f| {
        f["event"] == "tcp_close" && f["local"] == x.client.as_str()
    });
}

#[test]
fn cleanup_removes_every_program_link_and_pin() {
    let node = Node::builder("cleanup_removes")
        .pod("client")
        .pod("server")
        .build();
    let mut agent = Agent::start(&node);
    let list = attached(&node);
    assert_one_of_each(&list);

    // Refused while an agent holds the instance.
    let out = std::process::Command::new(weft_testkit::agent::weft_binary())
        .args([
            "cleanup",
            "--instance",
            agent.instance(),
            "--bpffs",
            weft_testkit::agent::BPFFS,
        ])
        .output()
        .expect("run weft cleanup");
    assert!(
        !out.status.success(),
        "cleanup must refuse while the agent runs"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("in use"),
        "{out:?}"
    );
    assert_one_of_each(&attached(&node));
    agent.stop();

    let logs = agent.cleanup();
    let detached = logs
        .iter()
        .filter(|r| r["fields"]["message"] == "link detached and unpinned");
    assert_eq!(detached.count(), HOOKS.len(), "{logs:?}");
    assert!(
        attached(&node).is_empty(),
        "programs still attached: {:?}",
        attached(&node)
    );
    assert!(
        !agent.pin_dir().exists(),
        "{} still exists",
        agent.pin_dir().display()
    );
    let programs: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    let links: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect();
    for a in &list {
        assert!(
            !programs.contains(&a.program_id),
            "program {} ({}) is still loaded",
            a.program_id,
            a.program_name
        );
        assert!(
            !links.contains(&a.link_id),
            "link {} still exists",
            a.link_id
        );
    }
    // Idempotent.
    let again = agent.cleanup();
    assert!(
        again
            .iter()
            .any(|r| r["fields"]["message"] == "nothing to clean up"),
        "{again:?}"
    );
}

#[test]
fn a_second_agent_for_a_running_instance_is_refused() {
    let node = Node::builder("second_refused").pod("client").build();
    let agent = Agent::start(&node);
    let text = run_refused(agent.instance(), node.cgroup(), &[]);
    assert!(text.contains("is in use by another weft process"), "{text}");
    assert_one_of_each(&attached(&node));
}

/// A capacity change is a move to new maps, as an upgrade is: the agent fills maps of the
/// new shape (keeping those whose shape did not change), switches the programs in place
/// (nothing is detached) and then removes the old directory.
#[test]
fn a_capacity_change_moves_to_new_maps_in_place() {
    let node = Node::builder("map_resize").pod("client").build();
    let options = AgentOptions {
        extra_args: vec!["--max-connections".into(), "1024".into()],
        ..AgentOptions::default()
    };
    let mut agent = Agent::start_with(&node, options);
    let before = attached(&node);
    let old = agent.maps_dir();
    let policy_map = aya::maps::MapInfo::from_pin(old.join("POLICY")).expect("POLICY");
    agent.stop();
    agent.restart_with(&[]);
    agent
        .logs()
        .wait_for("the old maps removed", Duration::from_secs(10), |lines| {
            lines
                .iter()
                .any(|l| l.contains("maps of another version or shape removed"))
                .then_some(())
        });
    let new = agent.maps_dir();
    assert_ne!(new, old);
    let info = aya::maps::MapInfo::from_pin(new.join("CONN_STATE")).expect("CONN_STATE");
    assert_eq!(info.max_entries(), 65_536);
    // A map whose shape did not change is the same map, state and all.
    let kept = aya::maps::MapInfo::from_pin(new.join("POLICY")).expect("POLICY");
    assert_eq!(kept.id(), policy_map.id());
    assert!(!old.exists(), "{} is left", old.display());
    assert_eq!(links(&attached(&node)), links(&before), "the links stayed");
}

/// The per-pod maps are sized from `--max-pods` (a map's own flag still wins), and `weft
/// maps`, `weft status` and the metrics report what each map holds in kernel memory.
#[test]
fn per_pod_maps_follow_max_pods_and_their_memory_is_reported() {
    let node = Node::builder("map_memory").pod("client").build();
    let options = AgentOptions {
        extra_args: ["--max-pods", "50", "--max-affinity", "2048"]
            .map(String::from)
            .to_vec(),
        ..AgentOptions::default()
    };
    let agent = Agent::start_with(&node, options);
    let info = |map: &str| aya::maps::MapInfo::from_pin(agent.maps_dir().join(map)).expect(map);
    // 50 pods: 128 per pod (UDP flows), 512 (remembered exchanges), 32 (TRAFFIC), rounded up
    // to a power of two.
    assert_eq!(info("UDP_FLOW_STATS").max_entries(), 8_192);
    assert_eq!(info("POLICY_FLOWS").max_entries(), 32_768);
    assert_eq!(info("TRAFFIC").max_entries(), 2_048);
    assert_eq!(info("AFFINITY").max_entries(), 2_048);
    let (_, maps) = agent.client("maps");
    let bytes: std::collections::BTreeMap<String, u64> = maps
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| {
            let name = m["name"].as_str().expect("name").to_owned();
            (name, m["bytes"].as_u64().expect("bytes"))
        })
        .collect();
    // An LRU map is allocated whole; CONN_STATE only as connections open (an idle node holds
    // its buckets, less than its 65 536 entries would take).
    let udp = info("UDP_FLOW_STATS");
    let udp_entry = u64::from(udp.key_size() + udp.value_size());
    assert!(bytes["UDP_FLOW_STATS"] >= 8_192 * udp_entry, "{bytes:?}");
    let conn = info("CONN_STATE");
    let conn_entry = u64::from(conn.key_size() + conn.value_size());
    assert!(bytes["CONN_STATE"] < 65_536 * conn_entry, "{bytes:?}");
    // `weft status` reads the same memory map by map, without walking keys.
    let (_, status) = agent.client("status");
    let reported: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(status["maps"]["by_map"].clone()).expect("by_map");
    assert_eq!(reported["UDP_FLOW_STATS"], bytes["UDP_FLOW_STATS"]);
    assert_eq!(
        reported.keys().collect::<Vec<_>>(),
        bytes.keys().collect::<Vec<_>>()
    );
    let udp_memory = |m: &[prom::Sample]| {
        prom::sum(
            m,
            "weft_bpf_map_memory_bytes",
            &[("map_name", "UDP_FLOW_STATS")],
        )
    };
    let m = agent.wait_metrics("the maps' memory counted", |m| udp_memory(m) > 0.0);
    assert_eq!(udp_memory(&m) as u64, bytes["UDP_FLOW_STATS"]);
}

#[test]
fn an_instance_is_bound_to_its_cgroup() {
    let node = Node::builder("bound_to_cgroup")
        .pod("client")
        .pod("other")
        .build();
    let mut agent = Agent::start(&node);
    agent.stop();
    let other = node.pod("other").cgroup();
    let text = run_refused(agent.instance(), other, &[]);
    assert!(text.contains("is attached to cgroup id"), "{text}");
    let stray = datapath::attached_programs(other).expect("query");
    assert!(
        stray.is_empty(),
        "nothing may be attached to {}: {stray:?}",
        other.display()
    );
    assert_one_of_each(&attached(&node));
}

#[test]
fn events_that_do_not_fit_the_ring_buffer_are_counted_not_silently_lost() {
    let node = Node::builder("events_lost")
        .pod("client")
        .pod("server")
        .build();
    // 8 KiB holds 64 events; nobody reads while the agent is down.
    let options = AgentOptions {
        extra_args: ["--ring-buffer-size", "8192", "--events-wakeup-bytes", "0"]
            .map(String::from)
            .to_vec(),
        ..AgentOptions::default()
    };
    let mut agent = Agent::start_with(&node, options);
    agent.kill();
    let addr = server(&node, 8080).to_string();
    let _srv = node.start_server(
        "server",
        &["tcp-server", "--listen", &addr, "--connections", "40"],
    );
    for _ in 0..40 {
        let mut c = node.spawn("client", &["tcp-client", "--connect", &addr, "--send", "1"]);
        c.wait_success(WAIT);
    }
    agent.restart();
    // 40 connections x 2 ends x (open + close) = 160 events, 64 fit.
    let warning = agent
        .logs()
        .wait_for("the lost-events warning", WAIT, |lines| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| r["fields"]["counter"] == "conn_events_lost")
        });
    assert_eq!(warning["level"], "WARN", "{warning}");
    let lost = warning["fields"]["total"].as_u64().expect("total");
    let delivered = agent.conns().len() as u64;
    assert_eq!(
        lost + delivered,
        160,
        "every event is delivered or counted as lost: {warning}"
    );
    assert!(lost >= 96, "{lost} lost");
}

#[test]
fn a_restarted_agent_applies_its_own_load_time_settings() {
    // The kernel log level is a load-time global: the restarted agent's must take effect
    // although the pinned programs' code is the same.
    let node = Node::builder("restart_settings")
        .pod("client")
        .pod("server")
        .build();
    let mut agent = Agent::start(&node);
    let x = node.tcp_exchange(
        "client",
        "server",
        server(&node, 8080),
        1,
        1,
        Close::Shutdown,
    );
    agent.wait_conn("a close", |f| {
        f["event"] == "tcp_close" && f["local"] == x.client.as_str()
    });
    assert!(
        !agent
            .records()
            .iter()
            .any(|r| r["target"] == "weft::kernel"),
        "no kernel debug records at info"
    );
    agent.stop();

    let mut debug = Agent::start_with(
        &node,
        AgentOptions {
            log_level: "info,weft::conn=debug,weft::kernel=debug".into(),
            ..AgentOptions::default()
        },
    );
    let x = node.tcp_exchange(
        "client",
        "server",
        server(&node, 8081),
        1,
        1,
        Close::Shutdown,
    );
    debug
        .logs()
        .wait_for("kernel debug records after the restart", WAIT, |lines| {
            lines
                .iter()
                .any(|l| l.contains("\"weft::kernel\"") && l.contains("tcp established"))
                .then_some(())
        });
    debug.wait_conn("a close", |f| {
        f["event"] == "tcp_close" && f["local"] == x.client.as_str()
    });
    debug.stop();
    drop(agent);
}

#[test]
fn doctor_loads_every_program_and_names_what_a_node_lacks() {
    let weft = weft_testkit::agent::weft_binary();
    let out = std::process::Command::new(&weft)
        .args(["doctor", "-o", "json"])
        .output()
        .expect("weft doctor");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert!(out.status.success(), "{checks:#?}");
    let programs = checks
        .iter()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("program "))
        })
        .count();
    assert_eq!(programs, 13, "every program is loaded once: {checks:#?}");

    // Without CAP_BPF and CAP_PERFMON (and CAP_SYS_ADMIN, which would stand in for them).
    let drop_caps = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([
                "--bounding-set",
                "-bpf,-perfmon,-sys_admin",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&weft)
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
    };
    let out = drop_caps(&["doctor", "-o", "json"]);
    assert!(
        !out.status.success(),
        "doctor must fail without capabilities"
    );
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    let caps = checks
        .iter()
        .find(|c| c["name"] == "capabilities")
        .expect("a capabilities check");
    assert_eq!(caps["ok"], false);
    assert_eq!(caps["detail"], "missing CAP_BPF, CAP_PERFMON", "{caps}");
    assert!(
        checks
            .iter()
            .filter(|c| c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("program ")))
            .all(|c| c["ok"] == false),
        "no program loads: {checks:#?}"
    );
    // The agent refuses to start, naming what is missing, before it loads anything.
    let node = Node::builder("doctor_agent").pod("client").build();
    let out = drop_caps(&[
        "agent",
        "--cgroup-root",
        &node.cgroup().to_string_lossy(),
        "--instance",
        node.tag(),
        "--metrics-addr",
        "off",
        "--admin-socket",
        &node.workdir().join("doctor.sock").to_string_lossy(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("lacks what the agent needs")
            && text.contains("missing CAP_BPF, CAP_PERFMON"),
        "{text}"
    );
    assert!(
        !Path::new(weft_testkit::agent::BPFFS)
            .join("weft")
            .join(node.tag())
            .exists(),
        "nothing was pinned"
    );
}
