//! `services`: a connection plus one 64-byte request/response through a Service, for 1, 1 000
//! and 10 000 Services of 3 backends each, measured four ways in the same rounds:
//!
//! - (a) direct: round-robin over the three backends' pod IPs from the client pod's network
//!   namespace, the process outside weft's cgroups (nothing of weft on the client's sockets);
//! - (a') direct from the client pod's cgroup: every weft hook runs, nothing is translated;
//! - (b) weft: to the ClusterIP from the client pod's cgroup, translated at connect() by weft;
//! - (c) iptables: to the ClusterIP from a second client pod whose namespace holds
//!   kube-proxy's iptables layout (KUBE-SERVICES → KUBE-SVC-* → KUBE-SEP-* with
//!   statistic-random DNAT and masquerade marking); its rules and conntrack tax only that
//!   namespace, so (c) runs in the same rounds as the others.
//!
//! Every variant reaches the same three backends in the same proportions, from a client on
//! the same CPU to servers on the same CPU ([`Pinning`]); the four clients live for the whole
//! scale and take turns in bursts of [`BURST`] connections in rotating order. It also
//! reports, at the largest scale, the agent's memory, the BPF maps' memory, and the time from
//! a Service change on disk to the kernel maps.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, Node, k8s, proc::Process};

use super::{
    BURST, Other, Pinning, Ratio, RrClient, bpftool_json, interleaved_round, iptables_restore,
    median, source_agent_options, time_to_log,
};

const SCALES: [usize; 3] = [1, 1_000, 10_000];
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// The client pod of (a), (a') and (b); (c)'s client pod, whose namespace holds the rules.
const CLIENT: &str = "client";
const IPT_CLIENT: &str = "client-ipt";

#[derive(Debug, Default, Serialize)]
struct Mode {
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    per_second: Vec<f64>,
}

impl Mode {
    fn add(&mut self, v: &Value) {
        self.p50_us.push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
        self.p99_us.push(v["p99_us"].as_f64().unwrap_or(f64::NAN));
        self.per_second
            .push(v["per_second"].as_f64().unwrap_or(f64::NAN));
    }

    fn p50(&self) -> f64 {
        median(&self.p50_us)
    }

    fn p99(&self) -> f64 {
        median(&self.p99_us)
    }

    /// `self / den` of the p50 latencies, per round (both measured in the same round).
    fn over(&self, den: &Mode) -> Ratio {
        Ratio::per_round(&self.p50_us, &den.p50_us)
    }
}

#[derive(Debug, Serialize)]
struct Scale {
    services: usize,
    direct: Mode,
    direct_hooked: Mode,
    weft: Mode,
    iptables: Mode,
    /// weft / direct, p50 latency, per round.
    b_over_a: Ratio,
    /// weft / direct from the pod cgroup: the translation alone.
    b_over_a_hooked: Ratio,
    /// iptables / weft.
    c_over_b: Ratio,
    /// iptables / direct.
    c_over_a: Ratio,
    /// With `--compare`: this build and the other one through the ClusterIP, each with a
    /// fresh agent, in the same rounds in rotating order.
    #[serde(skip_serializing_if = "Option::is_none")]
    compare: Option<CompareScale>,
}

/// This build against another, each round starting each build's agent in turn and measuring
/// direct and through the ClusterIP back to back.
#[derive(Debug, Serialize)]
struct CompareScale {
    binary: String,
    this_direct: Mode,
    this_weft: Mode,
    that_direct: Mode,
    that_weft: Mode,
    /// (this b/a) / (that b/a) per round: below 1, this build adds less per connection.
    this_over_that: Ratio,
}

#[derive(Debug, Serialize)]
pub struct ServicesResult {
    scenario: &'static str,
    pinning: Pinning,
    connections_per_round: u64,
    rounds: usize,
    iptables: String,
    scales: Vec<Scale>,
    /// At the largest scale.
    agent_rss_kib: u64,
    bpf_map_bytes: u64,
    bpf_map_bytes_by_map: Vec<(String, u64)>,
    agent_start_to_ready_s: f64,
    change_to_map_ms: Vec<f64>,
    change_to_map_p50_ms: f64,
    change_to_map_p99_ms: f64,
}

impl ServicesResult {
    pub fn print(&self) {
        println!(
            "\nservices: connect + one 64-byte request/response + close, per connection (median of {} rounds of {} connections; client on CPU {}, servers on CPU {})",
            self.rounds,
            self.connections_per_round,
            self.pinning.client_cpu,
            self.pinning.server_cpu
        );
        println!(
            "{:>8} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9}",
            "services",
            "a p50 µs",
            "a p99 µs",
            "a' p50 µs",
            "a' p99 µs",
            "b p50 µs",
            "b p99 µs",
            "c p50 µs",
            "c p99 µs"
        );
        for s in &self.scales {
            println!(
                "{:>8} | {:>9.1} {:>9.1} | {:>9.1} {:>9.1} | {:>9.1} {:>9.1} | {:>9.1} {:>9.1}",
                s.services,
                s.direct.p50(),
                s.direct.p99(),
                s.direct_hooked.p50(),
                s.direct_hooked.p99(),
                s.weft.p50(),
                s.weft.p99(),
                s.iptables.p50(),
                s.iptables.p99(),
            );
        }
        for s in &self.scales {
            println!(
                "{:>8} services: b/a {}\n{:>18} b/a' {}\n{:>18} c/b {}\n{:>18} c/a {}",
                s.services,
                s.b_over_a.verdict,
                "",
                s.b_over_a_hooked.verdict,
                "",
                s.c_over_b.verdict,
                "",
                s.c_over_a.verdict
            );
            if let Some(c) = &s.compare {
                println!(
                    "{:>18} compared with {}: this/that {}",
                    "", c.binary, c.this_over_that.verdict
                );
            }
        }
        println!(
            "a = direct round-robin over the backends' pod IPs, b = weft via the ClusterIP, c = iptables ({}) via the ClusterIP;\n\
             a' = direct from the client pod's cgroup (weft's hooks run, nothing is translated): b/a' is the translation alone",
            self.iptables
        );
        let largest = SCALES[SCALES.len() - 1];
        println!(
            "at {largest} services: agent RSS {} KiB, BPF maps {} KiB, agent start to ready {:.2} s",
            self.agent_rss_kib,
            self.bpf_map_bytes / 1024,
            self.agent_start_to_ready_s
        );
        println!(
            "Service change on disk to kernel maps: p50 {:.1} ms, p99 {:.1} ms over {} changes (file renamed into place: 3 ms debounce included)",
            self.change_to_map_p50_ms,
            self.change_to_map_p99_ms,
            self.change_to_map_ms.len()
        );
    }
}

/// The i-th ClusterIP: 10.96.0.1 onwards (10.96.0.0/12 holds far more than needed).
fn vip(i: usize) -> String {
    format!(
        "10.{}.{}.{}",
        96 + i / 65_000,
        (i % 65_000) / 250,
        i % 250 + 1
    )
}

fn services_yaml(n: usize) -> String {
    let mut y = String::with_capacity(n * 220);
    for i in 0..n {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: bench}}\nspec:\n  \
             clusterIP: {}\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n",
            vip(i)
        );
    }
    y
}

/// kube-proxy's nat rules for `n` services of the node's three backends (large-cluster mode:
/// no comments on the per-endpoint rules; the cluster CIDR is the pods' range, so pod clients
/// are not masqueraded), as iptables-restore input.
fn iptables_rules(node: &Node, n: usize) -> String {
    let ips: Vec<String> = BACKENDS
        .iter()
        .map(|b| node.pod(b).ipv4.to_string())
        .collect();
    let hash = |s: &str| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in s.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016X}")
    };
    let mut chains = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for i in 0..n {
        let name = format!("bench/svc{i}:http");
        let svc = format!("KUBE-SVC-{}", hash(&format!("{name}tcp")));
        let ip = vip(i);
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {ip} --dport 80 -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {ip} --dport 80 ! -s 10.0.0.0/16 -j KUBE-MARK-MASQ"
        );
        for (k, backend) in ips.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", hash(&format!("{name}tcp{backend}:8080")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let probability = match k {
                0 => " -m statistic --mode random --probability 0.3333333333",
                1 => " -m statistic --mode random --probability 0.5000000000",
                _ => "",
            };
            let _ = writeln!(rules, "-A {svc}{probability} -j {sep}");
            let _ = writeln!(rules, "-A {sep} -s {backend} -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A {sep} -m tcp -p tcp -j DNAT --to-destination {backend}:8080"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("{chains}{rules}COMMIT\n")
}

fn wait_frontends(agent: &Agent, n: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (_, status) = agent.client("status");
        if status["services"]["frontends"].as_u64() == Some(n as u64) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not program {n} frontends: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One scale's node: the client pods, the three backends serving, the Services on disk, and
/// one client per variant: (a), (a'), (b), (c).
struct Bed {
    node: Node,
    _servers: Vec<Process>,
    clients: [RrClient; 4],
}

impl Bed {
    fn new(bins: &Path, pin: &Pinning, n: usize) -> Result<Self> {
        let node = Node::builder(&format!("xtask-bench-svc-{n}"))
            .pod_tool(&bins.join("weft-pod"))
            .pod(CLIENT)
            .pod(IPT_CLIENT)
            .pod("b1")
            .pod("b2")
            .pod("b3")
            .build();
        let _servers = BACKENDS
            .iter()
            .map(|b| node.start_server(b, &pin.server(&["rr-server", "--listen", "[::]:8080"])))
            .collect();
        let mut pods: Vec<String> = BACKENDS
            .iter()
            .map(|b| {
                k8s::pod(
                    node.pod(b),
                    "bench",
                    &[("app", "web")],
                    &[("http", 8080, "TCP")],
                    true,
                )
            })
            .collect();
        pods.push(k8s::pod(
            node.pod(CLIENT),
            "bench",
            &[("app", "client")],
            &[],
            true,
        ));
        node.write_source("pods.yaml", &k8s::file(&pods));
        node.write_source("services.yaml", &services_yaml(n));
        iptables_restore(
            &node.pod(IPT_CLIENT).netns_path(),
            &iptables_rules(&node, n),
            false,
        )?;
        let direct = BACKENDS
            .iter()
            .map(|b| format!("{}:8080", node.pod(b).ipv4))
            .collect::<Vec<_>>()
            .join(",");
        let via_vip = format!("{}:80", vip(n / 2));
        let clients = [
            RrClient::start(&node, (CLIENT, false), pin, &direct, &[], "direct"),
            RrClient::start(
                &node,
                (CLIENT, true),
                pin,
                &direct,
                &[],
                "direct, pod cgroup",
            ),
            RrClient::start(&node, (CLIENT, true), pin, &via_vip, &[], "weft"),
            RrClient::start(&node, (IPT_CLIENT, false), pin, &via_vip, &[], "iptables"),
        ];
        Ok(Self {
            node,
            _servers,
            clients,
        })
    }

    /// A burst from every client, not counted: caches, ARP, conntrack, the first page faults.
    fn warm_up(&mut self) -> Result<()> {
        for c in &mut self.clients {
            c.burst(200)?;
            c.report()?;
        }
        Ok(())
    }
}

pub fn run(
    bins: &Path,
    pin: &Pinning,
    compare: Option<&Other>,
    rounds: usize,
    count: u64,
) -> Result<ServicesResult> {
    let iptables = String::from_utf8_lossy(&Command::new("iptables").arg("-V").output()?.stdout)
        .trim()
        .to_owned();
    let mut result = ServicesResult {
        scenario: "services",
        pinning: pin.clone(),
        connections_per_round: count,
        rounds,
        iptables,
        scales: Vec::new(),
        agent_rss_kib: 0,
        bpf_map_bytes: 0,
        bpf_map_bytes_by_map: Vec::new(),
        agent_start_to_ready_s: 0.0,
        change_to_map_ms: Vec::new(),
        change_to_map_p50_ms: f64::NAN,
        change_to_map_p99_ms: f64::NAN,
    };
    for (si, &n) in SCALES.iter().enumerate() {
        let mut bed = Bed::new(bins, pin, n)?;
        eprintln!("bench services: {n} services: starting the agent");
        let started = std::time::Instant::now();
        let agent = Agent::start_with(&bed.node, source_agent_options(bins));
        wait_frontends(&agent, n)?;
        let ready_s = started.elapsed().as_secs_f64();
        bed.warm_up()?;
        let mut modes: [Mode; 4] = Default::default();
        for r in 0..rounds {
            eprintln!("bench services: {n} services: round {}/{rounds}", r + 1);
            let mut clients: Vec<&mut RrClient> = bed.clients.iter_mut().collect();
            for (m, v) in modes
                .iter_mut()
                .zip(interleaved_round(&mut clients, r, count, BURST)?)
            {
                m.add(&v);
            }
        }
        if si == SCALES.len() - 1 {
            result.agent_start_to_ready_s = ready_s;
            measure_memory(&agent, &mut result)?;
            measure_change_latency(&bed.node, &agent, &mut result)?;
        }
        drop(agent);
        let compared = match compare {
            Some(that) => Some(compare_builds(&mut bed, bins, that, rounds, count)?),
            None => None,
        };
        let [a, a_hooked, b, c] = modes;
        result.scales.push(Scale {
            services: n,
            b_over_a: b.over(&a),
            b_over_a_hooked: b.over(&a_hooked),
            c_over_b: c.over(&b),
            c_over_a: c.over(&a),
            direct: a,
            direct_hooked: a_hooked,
            weft: b,
            iptables: c,
            compare: compared,
        });
    }
    Ok(result)
}

/// Each round, for this build and `that` in rotating order: a fresh agent, then direct and
/// through the ClusterIP back to back (the same node, services and backends for both).
fn compare_builds(
    bed: &mut Bed,
    this: &Path,
    that: &Other,
    rounds: usize,
    count: u64,
) -> Result<CompareScale> {
    let n = node_frontends(&bed.node);
    let mut modes: [(Mode, Mode); 2] = Default::default();
    for r in 0..rounds {
        for k in 0..2 {
            let v = (r + k) % 2;
            let options = if v == 0 {
                source_agent_options(this)
            } else {
                that.options(source_agent_options(that.bins(this)))
            };
            eprintln!(
                "bench services: compare round {}/{rounds}: {}",
                r + 1,
                if v == 0 {
                    "this build".to_owned()
                } else {
                    that.label(this)
                }
            );
            let agent = Agent::start_with(&bed.node, options);
            wait_frontends(&agent, n)?;
            let [direct, _, weft, _] = &mut bed.clients;
            for c in [&mut *direct, &mut *weft] {
                c.burst(200)?;
                c.report()?;
            }
            let reports = interleaved_round(&mut [direct, weft], r, count, BURST)?;
            let (a, b) = &mut modes[v];
            a.add(&reports[0]);
            b.add(&reports[1]);
        }
    }
    let [(this_direct, this_weft), (that_direct, that_weft)] = modes;
    let this_over_that = Ratio::per_round(
        &this_weft.over(&this_direct).rounds,
        &that_weft.over(&that_direct).rounds,
    );
    Ok(CompareScale {
        binary: that.label(this),
        this_direct,
        this_weft,
        that_direct,
        that_weft,
        this_over_that,
    })
}

/// How many frontends the node's source directory defines (one port per Service).
fn node_frontends(node: &Node) -> usize {
    std::fs::read_dir(node.source_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .map(|s| s.matches("kind: Service\n").count())
        .sum()
}

fn measure_memory(agent: &Agent, result: &mut ServicesResult) -> Result<()> {
    result.agent_rss_kib = super::rss_kib(agent.pid())?;
    for entry in std::fs::read_dir(agent.maps_dir())? {
        let path = entry?.path();
        let info = bpftool_json(&["map", "show", "pinned", &path.to_string_lossy()])?;
        let bytes = info["bytes_memlock"].as_u64().unwrap_or(0);
        result.bpf_map_bytes += bytes;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        result.bpf_map_bytes_by_map.push((name, bytes));
    }
    Ok(())
}

/// Changes one Service's endpoints on disk, 30 times, and reads from the agent's log when each
/// change reached the kernel maps ("services synced" is logged after the writes).
fn measure_change_latency(node: &Node, agent: &Agent, result: &mut ServicesResult) -> Result<()> {
    for i in 0..30 {
        let ip = node.pod(BACKENDS[i % 3]).ipv4;
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: probe, namespace: bench}}\nspec:\n  clusterIP: 10.111.255.1\n  \
             ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
             name: probe-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: probe}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"{ip}\"]}}]\n"
        );
        let ms = time_to_log(agent, "services synced", || {
            node.write_source("probe.yaml", &yaml);
        })?;
        result.change_to_map_ms.push(ms);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sorted = result.change_to_map_ms.clone();
    sorted.sort_by(f64::total_cmp);
    result.change_to_map_p50_ms = median(&sorted);
    result.change_to_map_p99_ms = sorted[((sorted.len() as f64 - 1.0) * 0.99).round() as usize];
    Ok(())
}
