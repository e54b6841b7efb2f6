//! `policy`: connect + one 64-byte request/response + close from a client pod to a server pod
//! whose ingress is restricted by NetworkPolicy, with 0, 1 000 and 10 000 rules that do not
//! match the pair plus one that does, measured three ways in one run:
//!
//! - none: no agent and no rules (the floor);
//! - weft: `n` policies on the server pod, each allowing one /32 outside the node on the
//!   server port, plus the one allowing the client by podSelector (the kernel holds an
//!   ipcache entry and a policy entry per rule);
//! - iptables: the equivalent filter in the server pod's namespace: ESTABLISHED first, then
//!   `n` non-matching ACCEPT rules, then the matching one, then DROP for the port (a linear
//!   chain, as iptables-based policy engines lay out per-pod rules without ipsets).
//!
//! Every variant is a node of its own (seven nodes, three agents), all set up before
//! measuring, with the client and the server pinned ([`Pinning`]); their seven clients take
//! turns in bursts every round and the ratios are medians of per-round ratios: drift of the
//! machine cancels out. Each ratio is printed with the spread of its per-round ratios, as "no
//! measurable difference" when that spread reaches 1. It also reports the time from a policy
//! file change to the kernel maps with 1 000 policies in force, and the peak memory of
//! compiling 10 000 pods (`weft compile`).
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;
use weft_testkit::{Agent, Node, k8s, proc::Process};

use super::{
    BURST, Pinning, Ratio, RrClient, interleaved_round, iptables_restore, median,
    source_agent_options, time_to_log,
};

const SCALES: [usize; 3] = [0, 1_000, 10_000];
const PORT: u16 = 8080;

#[derive(Debug, Default, Serialize)]
struct Mode {
    p50_us: Vec<f64>,
    per_second: Vec<f64>,
}

impl Mode {
    fn add(&mut self, v: &Value) {
        self.p50_us.push(v["p50_us"].as_f64().unwrap_or(f64::NAN));
        self.per_second
            .push(v["per_second"].as_f64().unwrap_or(f64::NAN));
    }
}

#[derive(Debug, Serialize)]
struct Scale {
    rules: usize,
    weft: Mode,
    iptables: Mode,
    /// Connections per second relative to the same engine with 0 rules, per round.
    weft_vs_0: Ratio,
    iptables_vs_0: Ratio,
    /// weft / iptables connections per second at this scale.
    weft_vs_iptables: Ratio,
    /// Relative to no agent and no rules.
    weft_vs_none: Ratio,
    iptables_vs_none: Ratio,
}

#[derive(Debug, Serialize)]
pub struct PolicyResult {
    scenario: &'static str,
    pinning: Pinning,
    connections_per_round: u64,
    rounds: usize,
    /// No agent, no rules.
    none: Mode,
    scales: Vec<Scale>,
    /// Policy file change to kernel maps, with 1 000 policies in force.
    change_to_map_ms: Vec<f64>,
    change_to_map_p50_ms: f64,
    change_to_map_p99_ms: f64,
    /// `weft compile` of 10 000 pods: its report.
    compile: Value,
}

impl PolicyResult {
    pub fn print(&self) {
        println!(
            "\npolicy: connect + one 64-byte request/response + close to a pod with ingress policy (median of {} rounds of {} connections; client on CPU {}, server on CPU {})",
            self.rounds,
            self.connections_per_round,
            self.pinning.client_cpu,
            self.pinning.server_cpu
        );
        println!(
            "no agent, no rules: {:.0} conn/s, p50 {:.1} µs",
            median(&self.none.per_second),
            median(&self.none.p50_us)
        );
        println!(
            "{:>6} | {:>9} {:>9} | {:>9} {:>9}",
            "rules", "weft c/s", "weft p50", "ipt c/s", "ipt p50"
        );
        for s in &self.scales {
            println!(
                "{:>6} | {:>9.0} {:>9.1} | {:>9.0} {:>9.1}",
                s.rules,
                median(&s.weft.per_second),
                median(&s.weft.p50_us),
                median(&s.iptables.per_second),
                median(&s.iptables.p50_us),
            );
        }
        println!("ratios of connections per second, with the spread of the per-round ratios:");
        for s in &self.scales {
            println!(
                "{:>6} rules: weft/ipt {}\n{:>14}weft/none {}\n{:>14}ipt/none {}\n{:>14}weft/w0 {}\n{:>14}ipt/ipt0 {}",
                s.rules,
                s.weft_vs_iptables.verdict,
                "",
                s.weft_vs_none.verdict,
                "",
                s.iptables_vs_none.verdict,
                "",
                s.weft_vs_0.verdict,
                "",
                s.iptables_vs_0.verdict
            );
        }
        println!(
            "policy file change to kernel maps with 1 000 policies: p50 {:.1} ms, p99 {:.1} ms over {} changes (file renamed into place: 3 ms debounce included)",
            self.change_to_map_p50_ms,
            self.change_to_map_p99_ms,
            self.change_to_map_ms.len()
        );
        println!(
            "compile of {} pods, {} policies ({} on this node): {:.1} ms, peak memory {} KiB (RSS before {} KiB, peak {} KiB)",
            self.compile["pods"],
            self.compile["policies"],
            self.compile["local_pods"],
            self.compile["compile_ms"].as_f64().unwrap_or(f64::NAN),
            self.compile["compile_peak_kib"],
            self.compile["rss_before_kib"],
            self.compile["hwm_after_kib"]
        );
    }
}

/// The i-th address outside the node that rules allow: 172.16.0.1 onwards.
fn outside(i: usize) -> String {
    format!(
        "172.{}.{}.{}",
        16 + i / 62_500,
        (i / 250) % 250,
        i % 250 + 1
    )
}

fn policies_yaml(n: usize, extra_port: Option<u16>) -> String {
    let mut y = String::with_capacity(n * 260 + 400);
    let extra = extra_port
        .map(|p| format!(", {{port: {p}}}"))
        .unwrap_or_default();
    let _ = write!(
        y,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: bench}}\nspec:\n  \
         podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    \
         ports: [{{port: {PORT}}}{extra}]\n"
    );
    for i in 0..n {
        let _ = write!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: other{i}, namespace: bench}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: {}/32}}}}]\n    ports: [{{port: {PORT}}}]\n",
            outside(i)
        );
    }
    y
}

fn iptables_rules(client: &str, n: usize) -> String {
    let mut r = String::from("*filter\n:WEFT-BENCH - [0:0]\n");
    r.push_str("-A INPUT -p tcp --dport 8080 -j WEFT-BENCH\n");
    r.push_str("-A WEFT-BENCH -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for i in 0..n {
        let _ = writeln!(
            r,
            "-A WEFT-BENCH -s {}/32 -p tcp --dport {PORT} -j ACCEPT",
            outside(i)
        );
    }
    let _ = writeln!(
        r,
        "-A WEFT-BENCH -s {client}/32 -p tcp --dport {PORT} -j ACCEPT"
    );
    r.push_str("-A WEFT-BENCH -j DROP\nCOMMIT\n");
    r
}

/// A client and a server pod; the server answers request/response on [`PORT`].
struct Pair {
    node: Node,
    _server: Process,
    agent: Option<Agent>,
    target: String,
}

fn pair(bins: &Path, pin: &Pinning, name: &str) -> Pair {
    let node = Node::builder(name)
        .pod_tool(&bins.join("weft-pod"))
        .pod("client")
        .pod("server")
        .build();
    let server = node.start_server(
        "server",
        &pin.server(&["rr-server", "--listen", "[::]:8080"]),
    );
    let target = format!("{}:{PORT}", node.pod("server").ipv4);
    Pair {
        node,
        _server: server,
        agent: None,
        target,
    }
}

fn pods_yaml(node: &Node) -> String {
    k8s::file(&[
        k8s::pod(node.pod("client"), "bench", &[("app", "client")], &[], true),
        k8s::pod(
            node.pod("server"),
            "bench",
            &[("app", "server")],
            &[("http", PORT, "TCP")],
            true,
        ),
    ])
}

/// Waits until the agent holds `n` + 1 policies with the server's set in the kernel.
fn wait_policies(agent: &Agent, n: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let (_, v) = agent.client("policies");
        let count = v["policies"].as_array().map_or(0, Vec::len);
        let in_kernel = v["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["in_kernel"] == true));
        if count == n + 1 && in_kernel {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the agent did not enforce {} policies: {v}", n + 1);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The per-round ratios `num / den` of connections per second.
fn paired(num: &Mode, den: &Mode) -> Ratio {
    Ratio::per_round(&num.per_second, &den.per_second)
}

/// Every pair set up and measured once: (none, weft's at each scale, iptables' at each scale).
fn pairs(bins: &Path, pin: &Pinning) -> Result<(Pair, Vec<Pair>, Vec<Pair>)> {
    let none = pair(bins, pin, "xtask-bench-pol-none");
    let mut weft_pairs = Vec::new();
    let mut ipt_pairs = Vec::new();
    for &n in &SCALES {
        eprintln!("bench policy: {n} rules: starting weft's node");
        let mut p = pair(bins, pin, &format!("xtask-bench-pol-w{n}"));
        p.node.write_source("pods.yaml", &pods_yaml(&p.node));
        p.node
            .write_source("policies.yaml", &policies_yaml(n, None));
        let agent = Agent::start_with(&p.node, source_agent_options(bins));
        wait_policies(&agent, n)?;
        p.agent = Some(agent);
        weft_pairs.push(p);
        eprintln!("bench policy: {n} rules: iptables node");
        let q = pair(bins, pin, &format!("xtask-bench-pol-i{n}"));
        let client = q.node.pod("client").ipv4.to_string();
        iptables_restore(
            &q.node.pod("server").netns_path(),
            &iptables_rules(&client, n),
            false,
        )?;
        ipt_pairs.push(q);
    }
    Ok((none, weft_pairs, ipt_pairs))
}

pub fn run(bins: &Path, pin: &Pinning, rounds: usize, count: u64) -> Result<PolicyResult> {
    let (none_pair, weft_pairs, ipt_pairs) = pairs(bins, pin)?;
    // One client per variant, in this order: none, then weft and iptables at each scale.
    let mut clients: Vec<RrClient> = std::iter::once((&none_pair, "none"))
        .chain(
            weft_pairs
                .iter()
                .zip(ipt_pairs.iter())
                .flat_map(|(w, i)| [(w, "weft"), (i, "iptables")]),
        )
        .map(|(p, what)| RrClient::start(&p.node, ("client", true), pin, &p.target, &[], what))
        .collect();
    for c in &mut clients {
        // Warm-up, and a check that the path works at all (a DROP would time out here).
        c.burst(200)?;
        c.report()?;
    }
    let mut modes: Vec<Mode> = clients.iter().map(|_| Mode::default()).collect();
    for r in 0..rounds {
        eprintln!("bench policy: round {}/{rounds}", r + 1);
        let mut refs: Vec<&mut RrClient> = clients.iter_mut().collect();
        for (m, v) in modes
            .iter_mut()
            .zip(interleaved_round(&mut refs, r, count, BURST)?)
        {
            m.add(&v);
        }
    }
    drop(clients);
    let mut modes = modes.into_iter();
    let none = modes.next().unwrap_or_default();
    let (mut weft, mut ipt) = (Vec::new(), Vec::new());
    while let (Some(w), Some(i)) = (modes.next(), modes.next()) {
        weft.push(w);
        ipt.push(i);
    }
    let change = measure_change_latency(&weft_pairs[1], 1_000)?;
    drop((none_pair, weft_pairs, ipt_pairs));
    let compile = measure_compile(bins)?;
    let ratios: Vec<[Ratio; 5]> = (0..SCALES.len())
        .map(|i| {
            [
                paired(&weft[i], &weft[0]),
                paired(&ipt[i], &ipt[0]),
                paired(&weft[i], &ipt[i]),
                paired(&weft[i], &none),
                paired(&ipt[i], &none),
            ]
        })
        .collect();
    let scales = SCALES
        .iter()
        .zip(weft.into_iter().zip(ipt))
        .zip(ratios)
        .map(|((&n, (weft, iptables)), [w0, i0, wi, wn, inone])| Scale {
            rules: n,
            weft,
            iptables,
            weft_vs_0: w0,
            iptables_vs_0: i0,
            weft_vs_iptables: wi,
            weft_vs_none: wn,
            iptables_vs_none: inone,
        })
        .collect();
    let mut sorted = change.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(PolicyResult {
        scenario: "policy",
        pinning: pin.clone(),
        connections_per_round: count,
        rounds,
        none,
        scales,
        change_to_map_p50_ms: median(&sorted),
        change_to_map_p99_ms: sorted[((sorted.len() as f64 - 1.0) * 0.99).round() as usize],
        change_to_map_ms: change,
        compile,
    })
}

/// Changes the matching policy on disk (adds and removes a second port), 30 times, and reads
/// from the agent's log when each change reached the kernel maps ("policies synced" is logged
/// after the writes).
fn measure_change_latency(p: &Pair, n: usize) -> Result<Vec<f64>> {
    let agent = p.agent.as_ref().context("agent")?;
    let mut out = Vec::new();
    for i in 0..30u16 {
        let extra = i.is_multiple_of(2).then_some(9000 + i);
        let yaml = policies_yaml(n, extra);
        out.push(time_to_log(agent, "policies synced", || {
            p.node.write_source("policies.yaml", &yaml);
        })?);
        std::thread::sleep(Duration::from_millis(150));
    }
    Ok(out)
}

/// `weft compile` on 10 000 pods in 100 namespaces (100 of them on this node), 1 000 policies
/// mixing pod, namespace and ipBlock peers and named ports.
fn measure_compile(bins: &Path) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("weft-bench-compile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut pods = String::with_capacity(10_000 * 400);
    for i in 0..10_000usize {
        let ns = format!("ns{}", i % 100);
        let local = if i < 100 {
            format!("\n  annotations: {{weft.io/cgroup: pod{i}}}")
        } else {
            String::new()
        };
        let _ = write!(
            pods,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{i}\n  namespace: {ns}{local}\n  labels: {{app: app{}, tier: t{}}}\n\
             spec:\n  containers:\n  - name: main\n    image: x\n    ports: [{{name: http, containerPort: 8080}}]\n\
             status:\n  phase: Running\n  podIP: 10.{}.{}.{}\n",
            i % 500,
            i % 3,
            10 + i / 62_500,
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    let mut namespaces = String::new();
    for n in 0..100 {
        let _ = write!(
            namespaces,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: team{}}}}}\n",
            n % 10
        );
    }
    let mut policies = String::new();
    for i in 0..1_000usize {
        let _ = write!(
            policies,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{}}}\nspec:\n  \
             podSelector: {{matchLabels: {{app: app{}}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{tier: t{}}}}}\n    \
             - namespaceSelector: {{matchLabels: {{team: team{}}}}}\n    - ipBlock: {{cidr: 192.168.{}.0/24}}\n    ports: [{{port: http}}]\n",
            i % 100,
            i % 500,
            i % 3,
            i % 10,
            i % 250
        );
    }
    std::fs::write(dir.join("namespaces.yaml"), namespaces)?;
    std::fs::write(dir.join("pods.yaml"), pods)?;
    std::fs::write(dir.join("policies.yaml"), policies)?;
    let out = Command::new(bins.join("weft"))
        .args(["--log-level", "warn", "compile", "--source"])
        .arg(format!("dir:{}", dir.display()))
        .output()
        .context("run weft compile")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "weft compile failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
