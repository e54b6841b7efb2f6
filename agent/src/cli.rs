//! Client commands that talk to a running agent through its admin socket.
use std::{fmt::Write as _, path::Path};

mod telemetry;
pub use telemetry::{config_dump, connections, flow_line, flows};

use crate::admin::{
    self, KernelService, StatusDoc,
    policy::{CheckDoc, CheckQuery, PoliciesDoc},
};
use crate::mesh::MeshStatus;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("cannot encode the output")]
    Encode(#[source] serde_json::Error),
    #[error("cannot encode the output as YAML")]
    EncodeYaml(#[source] serde_saphyr::SerializeError),
    #[error("cannot encode the query")]
    Query(#[source] serde_urlencoded::ser::Error),
}

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// `value` as JSON or YAML when asked for; `None` for a table.
pub fn structured<T: serde::Serialize>(value: &T, output: Output) -> Result<Option<String>, Error> {
    match output {
        Output::Table => Ok(None),
        Output::Json => serde_json::to_string_pretty(value)
            .map(Some)
            .map_err(Error::Encode),
        Output::Yaml => serde_saphyr::to_string(value)
            .map(Some)
            .map_err(Error::EncodeYaml),
    }
}

/// `weft status`: returns the text to print and whether the agent is healthy.
pub async fn status(socket: &Path, output: Output, brief: bool) -> Result<(String, bool), Error> {
    let doc: StatusDoc = admin::get_json(socket, "/status").await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok((text, doc.healthy));
    }
    if brief {
        return Ok((brief_status(&doc), doc.healthy));
    }
    let mut out = status_summary(&doc);
    status_lists(&doc, &mut out);
    Ok((out, doc.healthy))
}

/// The summary lines of `weft status`.
fn status_summary(doc: &StatusDoc) -> String {
    let s = &doc.services;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance:   {} (weft {})",
        doc.agent.instance, doc.agent.version
    );
    let health = match (doc.healthy, doc.degraded.is_empty()) {
        (true, _) => "healthy",
        (false, false) => "DEGRADED (the datapath keeps its last state)",
        (false, true) => "UNHEALTHY",
    };
    let _ = writeln!(out, "health:     {health}");
    for d in &doc.degraded {
        let _ = writeln!(out, "  {d}");
    }
    let _ = writeln!(out, "ready:      {}", s["ready"]);
    let _ = writeln!(out, "cgroup:     {}", doc.agent.cgroup.display());
    let _ = writeln!(out, "pins:       {}", doc.agent.pins.display());
    let _ = writeln!(
        out,
        "source:     {}",
        s["source"].as_str().unwrap_or("none")
    );
    let objects = s["objects"].as_object().map(|o| {
        o.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let _ = writeln!(out, "objects:    {}", objects.unwrap_or_default());
    let _ = writeln!(out, "frontends:  {}", s["frontends"]);
    let pol = &doc.policy;
    let _ = writeln!(
        out,
        "policy:     {} policies, {} local pods, {} identities, {} ipcache / {} policy entries",
        pol["policies"],
        pol["endpoints"],
        pol["identities"],
        pol["ipcache_entries"],
        pol["policy_entries"]
    );
    let _ = writeln!(out, "programs:   {}", doc.agent.programs.len());
    let t = &doc.telemetry;
    let _ = writeln!(
        out,
        "telemetry:  {} open connections, {} flow records buffered, metrics {}",
        t["open_connections"],
        t["flow_records_buffered"],
        t["metrics_addr"].as_str().map_or_else(
            || "on the admin socket only".to_owned(),
            |a| format!("http://{a}/metrics")
        ),
    );
    let _ = writeln!(out, "bpf maps:   {}", maps_line(&doc.maps));
    let _ = writeln!(out, "mesh:       {}", mesh_line(&doc.mesh));
    out
}

/// The mesh in one line: the CA, certificates held, pods served (`weft certs` has it all).
fn mesh_line(m: &serde_json::Value) -> String {
    let ca = match (m["ca"].as_str(), m["ca_loaded"].as_bool()) {
        (None, _) => "no CA (--mesh-ca)".to_owned(),
        (Some(dir), Some(true)) => format!("CA {dir} ({} roots)", m["roots"]),
        (Some(dir), _) => format!("CA {dir} NOT LOADED"),
    };
    format!(
        "{ca}, {}/{} identities with a certificate, {}/{} meshed pods listening",
        m["certificates"], m["identities"], m["pods_listening"], m["pods"]
    )
}

/// The maps' memory: the total and the three largest (`weft maps` lists them all).
fn maps_line(maps: &serde_json::Value) -> String {
    if let Some(e) = maps["error"].as_str() {
        return format!("memory unknown ({e})");
    }
    if maps.is_null() {
        return "memory not reported (an older agent)".to_owned();
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut by_map: Vec<(&String, u64)> = maps["by_map"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k, v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    by_map.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    let largest = by_map
        .iter()
        .take(3)
        .map(|(m, b)| format!("{m} {:.1}", mib(*b)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{:.1} MiB of kernel memory (largest: {largest} MiB)",
        mib(maps["bytes"].as_u64().unwrap_or(0))
    )
}

/// The problems `weft status` lists, one per line.
fn status_lists(doc: &StatusDoc, out: &mut String) {
    let (s, pol) = (&doc.services, &doc.policy);
    for (title, key) in [
        ("rejected documents", "rejections"),
        ("service problems", "problems"),
        ("sync errors", "sync_errors"),
    ] {
        let items = s[key].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title} ({}):", items.len());
        for item in items {
            let _ = writeln!(out, "  {}", describe(&item));
        }
    }
    for (title, key) in [
        ("policy problems", "problems"),
        ("policy sync errors", "sync_errors"),
    ] {
        let items = pol[key].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title} ({}):", items.len());
        for item in items {
            let line = match (item["object"].as_str(), item["message"].as_str()) {
                (Some(o), Some(m)) => format!("{o}: {m}"),
                (None, Some(m)) => m.to_owned(),
                _ => item
                    .as_str()
                    .map_or_else(|| item.to_string(), str::to_owned),
            };
            let _ = writeln!(out, "  {line}");
        }
    }
}

/// One status list item on one line.
fn describe(item: &serde_json::Value) -> String {
    // A rejection: from a file of a directory source, or from the API server.
    if let Some(errors) = item["errors"].as_array() {
        let object = item["object"].as_object().map(|o| {
            let ns = o["namespace"].as_str().unwrap_or("");
            let name = o["name"].as_str().unwrap_or("");
            let kind = o["kind"].as_str().unwrap_or("");
            if ns.is_empty() {
                format!("{kind} {name}")
            } else {
                format!("{kind} {ns}/{name}")
            }
        });
        let errors: Vec<String> = errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        let origin = match item["file"].as_str() {
            Some(file) => format!(
                "{file}: document {} (line {}){}",
                item["document"],
                item["line"],
                object.map(|o| format!(", {o}")).unwrap_or_default()
            ),
            None => format!(
                "{} from the API server",
                object.unwrap_or_else(|| "an object".into())
            ),
        };
        return format!("{origin}: {}", errors.join("; "));
    }
    let service = item["service"].as_str().unwrap_or("");
    let frontend = item["frontend"]
        .as_str()
        .map(|f| format!(" {f}"))
        .unwrap_or_default();
    format!(
        "{service}{frontend}: {}",
        item["message"].as_str().unwrap_or("")
    )
}

/// `weft services`.
pub async fn services(socket: &Path, output: Output) -> Result<String, Error> {
    let list: Vec<KernelService> = admin::get_json(socket, "/services").await?;
    if let Some(text) = structured(&list, output)? {
        return Ok(text);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:<30} {:>8} {:>9}  BACKENDS",
        "SERVICE", "FRONTEND", "AFFINITY", "REVISION"
    );
    for s in &list {
        let name = if s.port_name.is_empty() {
            s.service.clone()
        } else {
            format!("{}:{}", s.service, s.port_name)
        };
        let affinity = if s.affinity_timeout_s == 0 {
            "-".to_owned()
        } else {
            format!("{}s", s.affinity_timeout_s)
        };
        let backends = if s.backends.is_empty() {
            "(none: connections refused)".to_owned()
        } else {
            s.backends
                .iter()
                .map(|b| match s.ejected.iter().find(|e| e.backend == *b) {
                    Some(e) => format!("{b} (ejected, {} ms left)", e.remaining_ms),
                    None => b.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{name:<32} {:<30} {affinity:>8} {:>9}  {backends}",
            s.frontend, s.revision
        );
    }
    Ok(out)
}

/// `weft certs`.
pub async fn certs(socket: &Path, output: Output) -> Result<String, Error> {
    let doc: MeshStatus = admin::get_json(socket, "/mesh/certs").await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok(text);
    }
    Ok(certs_table(&doc))
}

fn certs_table(doc: &MeshStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trust domain: {}", doc.trust_domain);
    match &doc.ca {
        None => {
            let _ = writeln!(out, "CA:           none (no --mesh-ca)");
        }
        Some(ca) => {
            let state = match (ca.loaded, &ca.error) {
                (true, None) => "loaded".to_owned(),
                (true, Some(e)) => format!("loaded; the last read FAILED: {e}"),
                (false, e) => format!("NOT LOADED: {}", e.as_deref().unwrap_or("not read yet")),
            };
            let _ = writeln!(out, "CA:           {} ({state})", ca.dir.display());
            for r in &ca.roots {
                let _ = writeln!(
                    out,
                    "  root:       {} (until {}, sha256 {})",
                    r.subject, r.not_after, r.fingerprint
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:<56} {:<34} {:<22} {:<22} PODS",
        "IDENTITY", "SERIAL", "EXPIRES", "RENEWS"
    );
    for i in &doc.identities {
        let (serial, expires, renews) = match &i.certificate {
            Some(c) => (
                c.serial.as_str(),
                if c.expired {
                    format!("EXPIRED {}", c.not_after)
                } else {
                    c.not_after.clone()
                },
                c.renew_at.as_str(),
            ),
            None => ("-", "-".to_owned(), "-"),
        };
        let _ = writeln!(
            out,
            "{:<56} {serial:<34} {expires:<22} {renews:<22} {}",
            i.identity,
            i.pods.join(", ")
        );
        if let Some(e) = &i.error {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    for u in &doc.unknown_labels {
        let _ = writeln!(out, "ignored label: {u}");
    }
    out
}

/// `weft policies`.
pub async fn policies(socket: &Path, output: Output) -> Result<String, Error> {
    let doc: PoliciesDoc = admin::get_json(socket, "/policies").await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok(text);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<16} {:>8} {:>8}  SELECTS (pods of this node)",
        "POLICY", "TYPES", "ENTRIES", "KERNEL"
    );
    for p in &doc.policies {
        let selects = joined_or_dash(&p.selects);
        let _ = writeln!(
            out,
            "{:<40} {:<16} {:>8} {:>8}  {selects}",
            p.policy,
            p.policy_types.join(","),
            p.entries,
            p.kernel_entries
        );
    }
    let _ = writeln!(out);
    endpoint_table(&doc, &mut out);
    let _ = writeln!(
        out,
        "\nidentities {}, ipcache entries {}, policy entries {}",
        doc.identities, doc.ipcache_entries, doc.policy_entries
    );
    for (title, items) in [
        ("problems", &doc.problems),
        ("sync errors", &doc.sync_errors),
    ] {
        if items.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title} ({}):", items.len());
        for item in items {
            let _ = writeln!(out, "  {item}");
        }
    }
    Ok(out)
}

/// The local pods of `weft policies`: what the kernel enforces for each.
fn endpoint_table(doc: &PoliciesDoc, out: &mut String) {
    let _ = writeln!(
        out,
        "{:<32} {:<16} {:>8} {:>5} {:<9} {:>8} {:>8}  POLICIES",
        "POD", "IP", "IDENTITY", "SET", "ISOLATED", "ENTRIES", "KERNEL"
    );
    for row in &doc.endpoints {
        let e = &row.status;
        let isolated = match (e.ingress_isolated, e.egress_isolated) {
            (true, true) => "in+out",
            (true, false) => "in",
            (false, true) => "out",
            (false, false) => "-",
        };
        let ip = e.ips.first().map(ToString::to_string).unwrap_or_default();
        let mut policies: Vec<String> = e
            .ingress_policies
            .iter()
            .map(|p| format!("in:{p}"))
            .collect();
        policies.extend(e.egress_policies.iter().map(|p| format!("out:{p}")));
        if let Some(q) = e.quarantine {
            policies.push(format!("QUARANTINED:{}", q.as_str()));
        }
        let kernel = if e.cgroup_id.is_none() {
            "no-cgroup".to_owned()
        } else if row.in_kernel {
            row.kernel_entries.to_string()
        } else {
            "STALE".to_owned()
        };
        let _ = writeln!(
            out,
            "{:<32} {ip:<16} {:>8} {:>5} {isolated:<9} {:>8} {kernel:>8}  {}",
            e.pod,
            e.identity,
            e.policy_set,
            e.entries,
            if policies.is_empty() {
                "-".to_owned()
            } else {
                policies.join(", ")
            }
        );
    }
}

/// `weft policy check`: returns the text and whether the connection would be allowed.
pub async fn policy_check(
    socket: &Path,
    query: &CheckQuery,
    output: Output,
) -> Result<(String, bool), Error> {
    let encoded = serde_urlencoded::to_string(query).map_err(Error::Query)?;
    let doc: CheckDoc = admin::get_json(socket, &format!("/policy/check?{encoded}")).await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok((text, doc.allowed));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}) -> {} ({}) port {}/{}: {}",
        doc.from,
        doc.from_ip,
        doc.to,
        doc.to_ip,
        doc.port,
        doc.protocol,
        match (doc.allowed, doc.complete) {
            (true, true) => "ALLOW",
            (false, true) => "DENY",
            (true, false) => "ALLOW (a side computed here: its node's kernel decides)",
            (false, false) => "DENY (not all from this kernel: see each side)",
        }
    );
    for side in [&doc.egress, &doc.ingress] {
        let how = match side.judged_by.as_str() {
            "kernel" => "this agent's kernel",
            "computed" => "computed here from the same objects",
            other => other,
        };
        let by = match side.node.as_deref() {
            Some(node) => format!("node {node}, {how}"),
            None => how.to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<5} [{by}] {}",
            side.direction,
            if side.allowed { "allow" } else { "deny" },
            side.reason
        );
    }
    Ok((out, doc.allowed))
}

/// A list for a table cell: comma-separated, `-` when empty.
fn joined_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// `weft authz`.
pub async fn authz(socket: &Path, output: Output) -> Result<String, Error> {
    let doc: crate::compile::authz::Listing = admin::get_json(socket, "/authz").await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok(text);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<40} {:<11} SELECTS",
        "KIND", "POLICY", "ACTION"
    );
    for p in &doc.policies {
        let selects = joined_or_dash(&p.selects);
        let _ = writeln!(
            out,
            "{:<20} {:<40} {:<11} {selects}",
            p.kind, p.name, p.action
        );
    }
    let _ = writeln!(
        out,
        "\n{:<40} {:<11} {:<24} POLICIES",
        "WORKLOAD", "MTLS", "PORTS"
    );
    for w in &doc.workloads {
        let ports: Vec<String> = w.ports.iter().map(|(p, m)| format!("{p}:{m}")).collect();
        let _ = writeln!(
            out,
            "{:<40} {:<11} {:<24} {}",
            w.pod,
            w.mtls,
            joined_or_dash(&ports),
            joined_or_dash(&w.policies)
        );
    }
    for p in &doc.problems {
        let _ = writeln!(out, "problem: {}: {}", p.object, p.message);
    }
    Ok(out)
}

/// `weft authz check`: returns the text and whether the connection would be allowed.
pub async fn authz_check(
    socket: &Path,
    query: &CheckQuery,
    output: Output,
) -> Result<(String, bool), Error> {
    let encoded = serde_urlencoded::to_string(query).map_err(Error::Query)?;
    let doc: crate::compile::authz::CheckDoc =
        admin::get_json(socket, &format!("/authz/check?{encoded}")).await?;
    if let Some(text) = structured(&doc, output)? {
        return Ok((text, doc.allowed));
    }
    let mut out = String::new();
    let verdict = if doc.allowed { "ALLOW" } else { "DENY" };
    let _ = writeln!(
        out,
        "{} ({}) -> {} ({}) port {}/TCP: {verdict}",
        doc.from, doc.from_ip, doc.to, doc.to_ip, doc.port
    );
    let caller = doc
        .identity
        .as_deref()
        .map_or("plaintext (no identity)".to_owned(), |id| {
            format!("{id} (mutual TLS)")
        });
    let _ = writeln!(out, "  caller   {caller}");
    if !doc.meshed {
        let _ = writeln!(out, "  {} is not meshed: no authorization applies", doc.to);
        return Ok((out, doc.allowed));
    }
    let _ = writeln!(out, "  port     {} {}", doc.port, doc.mtls);
    let by = match (&doc.policy, doc.rule) {
        (Some(p), Some(r)) => format!("AuthorizationPolicy {p} rules[{r}]"),
        _ => "-".to_owned(),
    };
    let _ = writeln!(out, "  decided  {} by {by}", doc.reason);
    if let Some(a) = &doc.audit {
        let _ = writeln!(out, "  audit    {a}");
    }
    Ok((out, doc.allowed))
}

/// `weft maps`.
pub async fn maps(socket: &Path, output: Output) -> Result<String, Error> {
    let list: Vec<crate::datapath::MapUsage> = admin::get_json(socket, "/maps").await?;
    if let Some(text) = structured(&list, output)? {
        return Ok(text);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<14} {:>10} {:>10} {:>6} {:>10}  KEY/VALUE BYTES",
        "MAP", "TYPE", "ENTRIES", "CAPACITY", "FILL", "MEMORY KiB"
    );
    for m in &list {
        let (entries, fill) = match (m.entries, m.fill_ratio) {
            (Some(n), Some(f)) => (n.to_string(), format!("{:.1}%", f * 100.0)),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<14} {entries:>10} {:>10} {fill:>6} {:>10}  {}/{}",
            m.name,
            m.map_type,
            m.max_entries,
            m.bytes / 1024,
            m.key_size,
            m.value_size
        );
    }
    let total: u64 = list.iter().map(|m| m.bytes).sum();
    let _ = writeln!(out, "total: {} KiB of kernel memory", total / 1024);
    Ok(out)
}

/// `weft status --brief`: one line.
fn brief_status(doc: &StatusDoc) -> String {
    let (s, p) = (&doc.services, &doc.policy);
    let len = |v: &serde_json::Value| v.as_array().map_or(0, Vec::len);
    format!(
        "{} ready={} frontends={} policies={} pods={} rejected={} problems={} sync_errors={}\n",
        if doc.healthy { "healthy" } else { "UNHEALTHY" },
        s["ready"],
        s["frontends"],
        p["policies"],
        p["endpoints"],
        len(&s["rejections"]),
        len(&s["problems"]) + len(&p["problems"]),
        len(&s["sync_errors"]) + len(&p["sync_errors"]),
    )
}

/// `weft version`: this binary's version, and the running agent's when one answers.
pub async fn version(socket: &Path, output: Output) -> Result<String, Error> {
    let client = env!("CARGO_PKG_VERSION");
    let agent = admin::get_json::<StatusDoc>(socket, "/status").await;
    if output != Output::Table {
        let v = match &agent {
            Ok(doc) => serde_json::json!({
                "client": {"version": client},
                "agent": {"version": doc.agent.version, "instance": doc.agent.instance},
            }),
            Err(e) => serde_json::json!({
                "client": {"version": client},
                "agent": null,
                "agent_error": crate::chain(e),
            }),
        };
        return Ok(structured(&v, output)?.unwrap_or_default());
    }
    Ok(match agent {
        Ok(doc) => format!(
            "client: weft {client}\nagent:  weft {} (instance {})\n",
            doc.agent.version, doc.agent.instance
        ),
        Err(e) => format!(
            "client: weft {client}\nagent:  not reachable: {}\n",
            crate::chain(&e)
        ),
    })
}

/// `weft log-level [FILTER]`: shows the agent's log filter, or replaces it.
pub async fn log_level(socket: &Path, filter: Option<&str>) -> Result<String, Error> {
    match filter {
        None => {
            let body = admin::fetch(socket, "/log-level").await?;
            Ok(format!("{}\n", String::from_utf8_lossy(&body)))
        }
        Some(f) => {
            let previous =
                admin::request(socket, hyper::Method::PUT, "/log-level", f.to_owned()).await?;
            Ok(format!(
                "log filter: {} -> {f}\n",
                String::from_utf8_lossy(&previous)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{maps_line, mesh_line};

    #[test]
    fn the_mesh_line_names_the_ca_and_counts() {
        let m = serde_json::json!({
            "trust_domain": "cluster.local", "ca": "/etc/weft/mesh-ca", "ca_loaded": true,
            "roots": 2, "identities": 3, "certificates": 2, "pods": 4, "pods_listening": 3,
        });
        assert_eq!(
            mesh_line(&m),
            "CA /etc/weft/mesh-ca (2 roots), 2/3 identities with a certificate, 3/4 meshed pods listening"
        );
        let none = serde_json::json!({
            "ca": null, "ca_loaded": false, "roots": 0, "identities": 0, "certificates": 0,
            "pods": 0, "pods_listening": 0,
        });
        assert!(
            mesh_line(&none).starts_with("no CA (--mesh-ca), 0/0"),
            "{}",
            mesh_line(&none)
        );
    }

    #[test]
    fn the_maps_line_gives_the_total_and_the_three_largest() {
        let maps = serde_json::json!({
            "bytes": 6 * 1024 * 1024,
            "by_map": {"A": 1024 * 1024, "B": 3 * 1024 * 1024, "C": 512 * 1024, "D": 1536 * 1024},
        });
        assert_eq!(
            maps_line(&maps),
            "6.0 MiB of kernel memory (largest: B 3.0, D 1.5, A 1.0 MiB)"
        );
        assert_eq!(
            maps_line(&serde_json::json!({"error": "cannot open pin"})),
            "memory unknown (cannot open pin)"
        );
        assert_eq!(
            maps_line(&serde_json::Value::Null),
            "memory not reported (an older agent)"
        );
    }
}
