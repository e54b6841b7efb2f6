//! `cargo xtask demo`: weft's main job on a simulated node. Three pods talk to each other;
//! the agent observes them from the node's cgroup and the demo prints what it reports.
use std::{
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
            // weft's default port, on loopback only: the demo's metrics are for this machine.
            metrics_addr: "127.0.0.1:9967".into(),
            // UDP flows (the dns queries) end, and show as flow records, within the demo.
            extra_args: vec!["--udp-idle-timeout".into(), "5s".into()],
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
    eprintln!(
        "demo: Prometheus metrics (Istio labels) on http://{}/metrics; try \
         `curl -s http://{}/metrics | grep weft_tcp_`",
        agent.metrics_addr(),
        agent.metrics_addr()
    );
    eprintln!(
        "demo: a long-lived connection frontend -> backend sends 2 KB every 200 ms; \
         `weft connections` every 5 s shows its counters rising; flows follow (`weft flows -f`)"
    );
    match duration {
        Some(d) => eprintln!("demo: running for {}", humantime::format_duration(d)),
        None => eprintln!("demo: running until Ctrl-C"),
    }
    let weft = bins.join("weft");
    let admin = agent.admin_socket().to_owned();
    let weft_cmd = |args: &[&str]| {
        let mut c = std::process::Command::new(&weft);
        c.args(args).arg("--admin-socket").arg(&admin);
        c
    };
    let follower = Process::spawn("weft flows --follow", weft_cmd(&["flows", "--follow"]));
    let long_lived = node.spawn(
        "frontend",
        &[
            "tcp-trickle",
            "--connect",
            "10.96.0.10:80",
            "--chunk",
            "2048",
            "--every-ms",
            "200",
            "--seconds",
            "86400",
        ],
    );
    let mut next_table = Instant::now() + Duration::from_secs(5);

    let started = Instant::now();
    let mut printed = 0;
    let mut logged = 0;
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
            if round.is_multiple_of(5) {
                // Denied by shop/frontend-egress: a DROPPED flow.
                clients.push(node.spawn(
                    "frontend",
                    &["connect-probe", "--connect", "[fd00:96::20]:5432"],
                ));
            }
            next_round = Instant::now() + Duration::from_millis(1000);
        }
        let lines = follower.stdout().snapshot();
        for line in &lines[printed..] {
            println!("{line}");
        }
        printed = lines.len();
        for line in agent.logs().snapshot().iter().skip(logged) {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                print_problem(&v);
            }
        }
        logged = agent.logs().snapshot().len();
        if Instant::now() >= next_table {
            let out = weft_cmd(&["connections"])
                .output()
                .context("weft connections")?;
            println!("--- weft connections ---");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            println!("---");
            next_table = Instant::now() + Duration::from_secs(5);
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("demo: stopping; removing the agent's programs and pins, the pods and the node");
    drop(long_lived);
    drop(follower);
    drop(clients);
    drop(agent);
    drop(servers);
    drop(node);
    Ok(())
}

/// Agent warnings and errors, as they come.
fn print_problem(v: &Value) {
    if v["level"] == "WARN" || v["level"] == "ERROR" {
        println!(
            "{} {}: {}",
            v["level"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?"),
            v["fields"]
        );
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
