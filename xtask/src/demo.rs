//! `cargo xtask demo`: weft's main job on a simulated node. Three pods talk to each other;
//! the agent observes them from the node's cgroup and the demo prints what it reports.
use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use weft_testkit::{Agent, AgentOptions, Node, proc::Process};

use crate::{build, setup::Tools};

pub fn run(ws: &Path, tools: &Tools, duration: Option<Duration>) -> Result<()> {
    let bins = build::all(ws, tools, false)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("install the Ctrl-C handler")?;
    }

    eprintln!("demo: creating a simulated node (netns + bridge) with pods frontend, backend, db");
    let node = Node::builder("xtask-demo")
        .pod_tool(&bins.join("weft-pod"))
        .pod("frontend")
        .pod("backend")
        .pod("db")
        .build();
    let names: HashMap<String, String> = node
        .pods()
        .iter()
        .flat_map(|p| {
            [
                (p.ipv4.to_string(), p.name.clone()),
                (p.ipv6.to_string(), p.name.clone()),
            ]
        })
        .collect();
    // The node's desired state is the repository's example directory.
    let example = ws.join("examples").join("standalone");
    for entry in fs::read_dir(&example).with_context(|| format!("read {}", example.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path)?;
            node.write_source(
                &path.file_name().unwrap_or_default().to_string_lossy(),
                &text,
            );
        }
    }
    let servers: Vec<Process> = vec![
        node.spawn(
            "backend",
            &["tcp-server", "--listen", "[::]:8080", "--reply", "2048"],
        ),
        // The backend closes right after reading its reply: the server reads exactly 300 bytes.
        node.spawn(
            "db",
            &[
                "tcp-server",
                "--listen",
                "[::]:5432",
                "--reply",
                "512",
                "--read",
                "300",
            ],
        ),
        node.spawn("db", &["udp-echo", "--listen", "[::]:5353"]),
    ];
    servers.iter().for_each(Process::wait_listening);

    let agent = Agent::start_with(
        &node,
        AgentOptions {
            stats_interval: "5s".into(),
            binary: Some(bins.join("weft")),
            source: true,
            ..AgentOptions::default()
        },
    );
    eprintln!(
        "demo: weft agent (pid {}) attached to cgroup {}; pins in /sys/fs/bpf/weft/{}",
        agent.pid(),
        node.cgroup().display(),
        agent.instance()
    );
    eprintln!(
        "demo: desired state from {} (copied to {})",
        example.display(),
        node.source_dir().display()
    );
    eprintln!("demo: `weft services` (what the kernel maps hold):");
    let services = std::process::Command::new(bins.join("weft"))
        .arg("services")
        .arg("--admin-socket")
        .arg(agent.admin_socket())
        .output()
        .context("run weft services")?;
    eprint!("{}", String::from_utf8_lossy(&services.stdout));
    show_policy(&bins.join("weft"), &agent, &node)?;
    eprintln!(
        "demo: traffic through ClusterIPs: frontend -> web 10.96.0.10:80 and [fd00:96::10]:80 (tcp), \
         backend -> db [fd00:96::20]:5432 (tcp, ClientIP affinity), frontend -> dns 10.96.0.53:53 (udp)"
    );
    match duration {
        Some(d) => eprintln!("demo: running for {}", humantime::format_duration(d)),
        None => eprintln!("demo: running until Ctrl-C"),
    }
    println!(
        "{:<8} {:<6} {:<30} {:<30} {:>9} {:>9} {:>8} {:>9}  outcome",
        "event", "role", "local", "remote", "sent", "received", "rtt µs", "dur ms"
    );

    let started = Instant::now();
    let mut printed = 0;
    let mut next_round = Instant::now();
    let mut round = 0u64;
    let mut clients: Vec<Process> = Vec::new();
    while !stop.load(Ordering::SeqCst) && duration.is_none_or(|d| started.elapsed() < d) {
        if Instant::now() >= next_round {
            round += 1;
            clients.retain_mut(|c| c.try_finished().is_none());
            clients.push(node.spawn(
                "frontend",
                &[
                    "tcp-client",
                    "--connect",
                    if round.is_multiple_of(2) {
                        "10.96.0.10:80"
                    } else {
                        "[fd00:96::10]:80"
                    },
                    "--send",
                    &(100 + round % 50).to_string(),
                    "--expect",
                    "2048",
                ],
            ));
            clients.push(node.spawn(
                "backend",
                &[
                    "tcp-client",
                    "--connect",
                    "[fd00:96::20]:5432",
                    "--send",
                    "300",
                    "--expect",
                    "512",
                    "--close",
                    "close",
                ],
            ));
            clients.push(node.spawn(
                "frontend",
                &["udp-client", "--connect", "10.96.0.53:53", "--count", "3"],
            ));
            next_round = Instant::now() + Duration::from_millis(1000);
        }
        let lines = agent.logs().snapshot();
        for line in &lines[printed..] {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                print_record(&v, &names);
            }
        }
        printed = lines.len();
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("demo: stopping; removing the agent's programs and pins, the pods and the node");
    drop(clients);
    drop(agent);
    drop(servers);
    drop(node);
    Ok(())
}

fn with_pod(addr: &str, names: &HashMap<String, String>) -> String {
    let ip = addr
        .rsplit_once(':')
        .map_or(addr, |(ip, _)| ip)
        .trim_matches(['[', ']']);
    match names.get(ip) {
        Some(pod) => format!("{pod}/{addr}"),
        None => addr.to_owned(),
    }
}

fn print_record(v: &Value, names: &HashMap<String, String>) {
    let f = &v["fields"];
    // serde_json's Display ignores width: format numbers as text first.
    let n = |key: &str| {
        f[key]
            .as_u64()
            .map_or_else(|| "?".to_owned(), |x| x.to_string())
    };
    match v["target"].as_str() {
        Some("weft::conn") if f["event"] == "tcp_close" => println!(
            "{:<8} {:<6} {:<30} {:<30} {:>9} {:>9} {:>8} {:>9.2}  {}",
            "close",
            f["role"].as_str().unwrap_or("?"),
            with_pod(f["local"].as_str().unwrap_or("?"), names),
            with_pod(f["remote"].as_str().unwrap_or("?"), names),
            n("bytes_sent"),
            n("bytes_received"),
            n("srtt_us"),
            f["duration_us"].as_f64().unwrap_or(0.0) / 1000.0,
            f["outcome"].as_str().unwrap_or("?"),
        ),
        Some("weft::conn") => println!(
            "{:<8} {:<6} {:<30} {:<30} {:>9} {:>9} {:>8}",
            "open",
            f["role"].as_str().unwrap_or("?"),
            with_pod(f["local"].as_str().unwrap_or("?"), names),
            with_pod(f["remote"].as_str().unwrap_or("?"), names),
            "",
            "",
            n("srtt_us"),
        ),
        Some("weft::stats") if f["message"] == "traffic since the last report" => println!(
            "traffic  {} ipv{} {}: {} packets, {} bytes in the last 5 s",
            f["direction"].as_str().unwrap_or("?"),
            n("ip_version"),
            f["protocol"].as_str().unwrap_or("?"),
            n("packets"),
            n("bytes")
        ),
        _ if v["level"] == "WARN" || v["level"] == "ERROR" => {
            println!(
                "{} {}: {}",
                v["level"].as_str().unwrap_or("?"),
                v["target"].as_str().unwrap_or("?"),
                f
            );
        }
        _ => {}
    }
}

/// Shows the example's NetworkPolicies as the kernel holds them, asks weft about a connection
/// they forbid, and makes it: it fails at connect() with EPERM.
fn show_policy(weft: &std::path::Path, agent: &Agent, node: &Node) -> Result<()> {
    let client = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(weft)
            .args(args)
            .arg("--admin-socket")
            .arg(agent.admin_socket())
            .output()
            .with_context(|| format!("run weft {args:?}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The policies are compiled in the same pass as the services, but wait for them anyway.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client(&["policies"])?.contains("shop/frontend-egress") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("demo: `weft policies` (NetworkPolicies, the pods they select, kernel entries):");
    eprint!("{}", client(&["policies"])?);
    eprintln!("demo: `weft policy check --from shop/frontend --to shop/db --port 5432/TCP`:");
    eprint!(
        "{}",
        client(&[
            "policy",
            "check",
            "--from",
            "shop/frontend",
            "--to",
            "shop/db",
            "--port",
            "5432/TCP",
        ])?
    );
    let mut probe = node.spawn(
        "frontend",
        &["connect-probe", "--connect", "[fd00:96::20]:5432"],
    );
    probe.wait(Duration::from_secs(10));
    let result = probe.stdout().snapshot().join(" ");
    eprintln!("demo: frontend -> db [fd00:96::20]:5432 (denied by shop/frontend-egress): {result}");
    Ok(())
}
