//! Checks deploy/ the way an operator's CI would, with pinned validators: the kustomize base
//! and the kind overlay render (`kubectl kustomize`); the YAML passes yamllint; every object
//! passes `kubernetes-validate --strict` for the Kubernetes version k8s-openapi is pinned to;
//! the ServiceMonitor, PodMonitor and PrometheusRule pass the prometheus-operator schema;
//! every PromQL expression of the Grafana dashboard parses (`promtool check rules`); the
//! PrometheusRule's alerts parse and pass their unit tests (`promtool test rules`). That the
//! dashboard and the alerts read only metrics the agent exports is checked against a real
//! agent, in tests/tests/exposition.rs; tests/tests/cluster.rs runs both on a real Prometheus.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use weft_testkit::prometheus::{dashboard_exprs, substitute};

use crate::{
    build,
    setup::{ManifestTools, status},
};

/// The Kubernetes version of k8s-openapi's feature (`v1_35`).
const KUBERNETES_VERSION: &str = "1.35.0";

/// Kinds validated against the prometheus-operator schema instead of Kubernetes'.
const OPERATOR_KINDS: [&str; 3] = ["ServiceMonitor", "PodMonitor", "PrometheusRule"];

pub fn check(ws: &Path, tools: Option<&ManifestTools>) -> Result<()> {
    let tools = tools.context("the manifest validators were not set up")?;
    let deploy = ws.join("deploy");
    let out = build::target_dir(ws).join("manifests");
    fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;

    status(
        Command::new(tools.venv_bin.join("yamllint"))
            .arg("--strict")
            .arg("-c")
            .arg(deploy.join(".yamllint"))
            .arg(&deploy),
    )
    .context("yamllint deploy/")?;

    let mut operator_objects = Vec::new();
    for (name, dir) in [("base", "base"), ("kind", "overlays/kind")] {
        let rendered = render(&deploy.join(dir))?;
        let (core, operator) = split(&rendered)?;
        let core_file = out.join(format!("{name}.yaml"));
        fs::write(&core_file, core.join("---\n"))
            .with_context(|| format!("write {}", core_file.display()))?;
        status(
            Command::new(tools.venv_bin.join("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
                .arg(&core_file),
        )
        .with_context(|| format!("kubernetes-validate of deploy/{dir}"))?;
        operator_objects.extend(operator);
    }
    if operator_objects.len() < 3 {
        bail!("the kind overlay renders no ServiceMonitor, PodMonitor and PrometheusRule");
    }
    validate_operator(&out, tools, &operator_objects)?;
    check_promql(&out, &deploy.join("base").join("weft-dashboard.json"))?;
    test_rules(&out, &deploy.join("components").join("monitoring"))?;
    Ok(())
}

fn render(dir: &Path) -> Result<String> {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("run `kubectl kustomize` (kubectl with kustomize v5 must be installed)")?;
    if !o.status.success() {
        bail!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8(o.stdout).context("kustomize output is not UTF-8")
}

/// Splits rendered YAML into Kubernetes objects (as YAML documents) and prometheus-operator
/// objects (as JSON).
fn split(rendered: &str) -> Result<(Vec<String>, Vec<Value>)> {
    let mut core = Vec::new();
    let mut operator = Vec::new();
    for doc in rendered.split("\n---\n") {
        if doc.trim().is_empty() {
            continue;
        }
        let v: Value = serde_saphyr::from_str(doc).context("parse rendered YAML")?;
        if OPERATOR_KINDS.contains(&v["kind"].as_str().unwrap_or_default()) {
            operator.push(v);
        } else {
            core.push(format!("{}\n", doc.trim_end()));
        }
    }
    Ok((core, operator))
}

fn validate_operator(out: &Path, tools: &ManifestTools, objects: &[Value]) -> Result<()> {
    let input = out.join("operator-objects.json");
    fs::write(&input, serde_json::to_string(objects)?)
        .with_context(|| format!("write {}", input.display()))?;
    // The models are ES modules: the script lives next to their node_modules to import them.
    let npm_dir = tools
        .node_modules
        .parent()
        .context("node_modules has no parent directory")?;
    let script = npm_dir.join("validate-operator.mjs");
    fs::write(
        &script,
        r#"import fs from 'node:fs';
import * as v1 from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
const objects = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
let failed = false;
for (const o of objects) {
  const Model = v1[o.kind];
  if (!Model) { console.error(`no schema for ${o.kind}`); failed = true; continue; }
  try { new Model(o).validate(); console.log(`${o.kind}/${o.metadata.name}: valid`); }
  catch (e) { console.error(`${o.kind}/${o.metadata.name}: ${e.message}`); failed = true; }
}
process.exit(failed ? 1 : 0);
"#,
    )
    .with_context(|| format!("write {}", script.display()))?;
    status(Command::new("node").arg(&script).arg(&input))
        .context("ServiceMonitor/PodMonitor against the prometheus-operator schema")
}

/// The PrometheusRule's rules parse (`promtool check rules`) and pass their unit tests
/// (`promtool test rules`), run on the rules file the operator would give Prometheus.
fn test_rules(out: &Path, monitoring: &Path) -> Result<()> {
    let source = monitoring.join("prometheusrule.yaml");
    let text = fs::read_to_string(&source).with_context(|| format!("read {}", source.display()))?;
    let rules = weft_testkit::prometheus::rules_file(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", source.display()))?;
    let dir = out.join("rules");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    fs::write(dir.join("weft-rules.yaml"), rules)?;
    let test = "prometheusrule_test.yaml";
    fs::copy(monitoring.join(test), dir.join(test)).with_context(|| format!("copy {test}"))?;
    status(
        Command::new("promtool")
            .args(["check", "rules", "weft-rules.yaml"])
            .current_dir(&dir),
    )
    .context("promtool check rules on deploy/'s PrometheusRule")?;
    status(
        Command::new("promtool")
            .args(["test", "rules", test])
            .current_dir(&dir),
    )
    .context("promtool test rules on deploy/'s PrometheusRule")
}

/// Every expression of the dashboard as a recording rule, with Grafana's variables replaced
/// the way Grafana would: `promtool check rules` parses each one.
fn check_promql(out: &Path, dashboard: &Path) -> Result<()> {
    let text =
        fs::read_to_string(dashboard).with_context(|| format!("read {}", dashboard.display()))?;
    let exprs = dashboard_exprs(&serde_json::from_str(&text)?);
    if exprs.is_empty() {
        bail!("{} has no queries", dashboard.display());
    }
    let mut rules = String::from("groups:\n  - name: weft-dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = substitute(e, ".*", ".*", "5m");
        rules.push_str(&format!(
            "      - record: weft:dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e)?
        ));
    }
    let file: PathBuf = out.join("dashboard-rules.yaml");
    fs::write(&file, rules).with_context(|| format!("write {}", file.display()))?;
    status(Command::new("promtool").args(["check", "rules"]).arg(&file))
        .context("promtool check rules on the dashboard's queries")
}
