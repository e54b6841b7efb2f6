//! A real Prometheus server (the Debian `prometheus` package) scraping agents, so that the
//! Grafana dashboard's queries are run on what the agents export, not only parsed.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{proc::Process, prom};

/// A Prometheus server on a loopback port. Dropping it kills it and removes its files.
#[derive(Debug)]
pub struct Prometheus {
    addr: SocketAddr,
    dir: PathBuf,
    process: Option<Process>,
}

impl Prometheus {
    /// Starts one scraping every `(node, address)` each second as job `job`, each target
    /// labelled `node` as the deploy/ monitors label them, evaluating `rules` (a rules file's
    /// content, e.g. [`deploy_rules`]) every second; returns once it is ready.
    pub fn start(job: &str, targets: &[(&str, SocketAddr)], rules: Option<&str>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir =
            std::env::temp_dir().join(format!("weft-prometheus-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: {job}\n  static_configs:\n"
        );
        for (node, target) in targets {
            config.push_str(&format!(
                "  - targets: [\"{target}\"]\n    labels: {{node: \"{node}\"}}\n"
            ));
        }
        if let Some(rules) = rules {
            let path = dir.join("rules.yml");
            std::fs::write(&path, rules)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            config.push_str(&format!("rule_files: [\"{}\"]\n", path.display()));
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let server = Self {
            addr,
            process: Some(Process::spawn("prometheus", command)),
            dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(self.addr).is_ok()
                && prom::get(self.addr, "/-/ready", None).status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus on {} never got ready",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The series an instant query returns now (`data.result`); panics on an error answer.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let r = prom::get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(expr)),
            None,
        );
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {}", r.body));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// `/api/v1/<what>` (`rules`, `alerts`): its `data`; panics on an error answer.
    pub fn api(&self, what: &str) -> Value {
        let r = prom::get(self.addr, &format!("/api/v1/{what}"), None);
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", r.body));
        assert_eq!(v["status"], "success", "{what}: {v}");
        v["data"].clone()
    }

    /// Queries `expr` until it returns a series; None after `timeout`.
    pub fn wait_series(&self, expr: &str, timeout: Duration) -> Option<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(expr);
            if !result.is_empty() {
                return Some(result);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // The server first: it writes below the directory.
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PrometheusRule deploy/ ships (`components/monitoring/prometheusrule.yaml`).
pub fn deploy_rule_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/components/monitoring/prometheusrule.yaml")
}

/// The rules of a PrometheusRule as a Prometheus rules file (its `spec`, as JSON, which is
/// YAML), the way the operator hands them to Prometheus.
pub fn rules_file(prometheus_rule: &str) -> Result<String, String> {
    let v: Value = serde_saphyr::from_str(prometheus_rule).map_err(|e| e.to_string())?;
    if v["kind"] != "PrometheusRule" || !v["spec"]["groups"].is_array() {
        return Err("not a PrometheusRule with spec.groups".into());
    }
    serde_json::to_string_pretty(&v["spec"]).map_err(|e| e.to_string())
}

/// [`rules_file`] of [`deploy_rule_path`].
pub fn deploy_rules() -> String {
    let path = deploy_rule_path();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    rules_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Percent-encodes a query parameter (everything but unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `expr` of every panel target of a Grafana dashboard.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.to_owned());
            }
        }
    }
    out
}

/// A dashboard expression with Grafana's variables replaced as Grafana would: `$job` and
/// `$node` by (regex) values, `$__rate_interval` by a range.
pub fn substitute(expr: &str, job: &str, node: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$job", job)
        .replace("$node", node)
}
