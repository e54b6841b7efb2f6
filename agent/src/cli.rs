//! Client commands that talk to a running agent through its admin socket.
use std::{fmt::Write as _, path::Path};

use crate::admin::{self, KernelService, StatusDoc};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("cannot encode the output")]
    Encode(#[source] serde_json::Error),
}

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `weft status`: returns the text to print and whether the agent is healthy.
pub async fn status(socket: &Path, output: Output) -> Result<(String, bool), Error> {
    let doc: StatusDoc = admin::get_json(socket, "/status").await?;
    if output == Output::Json {
        return Ok((
            serde_json::to_string_pretty(&doc).map_err(Error::Encode)?,
            doc.healthy,
        ));
    }
    let s = &doc.services;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance:   {} (weft {})",
        doc.agent.instance, doc.agent.version
    );
    let _ = writeln!(
        out,
        "health:     {}",
        if doc.healthy { "healthy" } else { "UNHEALTHY" }
    );
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
    let _ = writeln!(out, "programs:   {}", doc.agent.programs.len());
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
    Ok((out, doc.healthy))
}

/// One status list item on one line.
fn describe(item: &serde_json::Value) -> String {
    if let Some(file) = item["file"].as_str() {
        let object = item["object"].as_object().map(|o| {
            let ns = o["namespace"].as_str().unwrap_or("");
            let name = o["name"].as_str().unwrap_or("");
            let kind = o["kind"].as_str().unwrap_or("");
            if ns.is_empty() {
                format!(", {kind} {name}")
            } else {
                format!(", {kind} {ns}/{name}")
            }
        });
        let errors: Vec<String> = item["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        return format!(
            "{file}: document {} (line {}){}: {}",
            item["document"],
            item["line"],
            object.unwrap_or_default(),
            errors.join("; ")
        );
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
    if output == Output::Json {
        return serde_json::to_string_pretty(&list).map_err(Error::Encode);
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
            s.backends.join(", ")
        };
        let _ = writeln!(
            out,
            "{name:<32} {:<30} {affinity:>8} {:>9}  {backends}",
            s.frontend, s.revision
        );
    }
    Ok(out)
}
