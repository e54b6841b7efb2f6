//! `weft connections`, `weft flows` and `weft config dump`.
use std::{fmt::Write as _, io::Write as _, path::Path};

use super::{Error, Output, structured};
use crate::{
    admin::{
        self,
        telemetry::{ConfigDump, StreamQuery},
    },
    telemetry::{
        OpenConnection,
        flows::{Filter, FlowEvent, FlowRecord, Lost},
    },
};

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `weft connections`: open TCP connections with their counters as last reported.
pub async fn connections(socket: &Path, output: Output) -> Result<String, Error> {
    let list: Vec<OpenConnection> = admin::get_json(socket, "/connections").await?;
    if let Some(text) = structured(&list, output)? {
        return Ok(text);
    }
    Ok(connections_table(&list))
}

/// The connections as a table; SECURITY says how the mesh carries one (a tunnel: `mTLS`, or
/// within the node: `local`) and both principals, `-` outside the mesh.
fn connections_table(list: &[OpenConnection]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<7} {:<26} {:<26} {:<18} {:>10} {:>10} {:>9} {:>6} {:>9}  SECURITY",
        "ROLE", "LOCAL", "REMOTE", "SERVICE", "SENT", "RECEIVED", "SRTT", "RETX", "AGE"
    );
    for c in list {
        let security = c.mesh.as_ref().map_or_else(
            || "-".to_owned(),
            |m| {
                let how = match m.transport {
                    crate::events::Transport::Tunnel => "mTLS",
                    crate::events::Transport::Local => "local",
                };
                format!(
                    "{how} {} -> {}",
                    m.source_principal, m.destination_principal
                )
            },
        );
        let _ = writeln!(
            out,
            "{:<7} {:<26} {:<26} {:<18} {:>10} {:>10} {:>7}us {:>6} {:>8}s  {security}",
            c.role.as_str(),
            c.local.display(),
            c.remote.display(),
            c.service.as_deref().unwrap_or("-"),
            human_bytes(c.bytes_sent),
            human_bytes(c.bytes_received),
            c.srtt_us,
            c.retransmits,
            c.duration_ms / 1000,
        );
    }
    if list.is_empty() {
        let _ = writeln!(out, "(no open connections)");
    }
    out
}

/// One flow record on one line, in the manner of `hubble observe`.
pub fn flow_line(r: &FlowRecord) -> String {
    let verdict = match (r.event, r.verdict) {
        (FlowEvent::Drop, _) => format!(
            "DROPPED ({})",
            r.drop_reason.map_or("unknown", |d| d.as_str())
        ),
        (FlowEvent::TcpOpen, _) => "OPEN".to_owned(),
        (FlowEvent::TcpClose, _) => {
            format!("CLOSED ({})", r.outcome.map_or("unknown", |o| o.as_str()))
        }
        (FlowEvent::UdpFlow, _) => "UDP FLOW ENDED".to_owned(),
    };
    let src = format!("{} ({})", r.source.display(), r.source.address);
    let dst = format!("{} ({})", r.destination.display(), r.destination.address);
    let mut via = r
        .service
        .as_deref()
        .map_or_else(String::new, |s| format!(" via {s}"));
    if let Some(m) = &r.mesh {
        let _ = write!(
            via,
            " mTLS {} -> {}",
            m.source_principal, m.destination_principal
        );
    }
    if let Some(a) = &r.authorization {
        let verdict = if a.allowed { "allowed" } else { "denied" };
        let _ = write!(via, " authz {verdict} ({})", a.reason.as_str());
        if let Some(by) = &a.by {
            let _ = write!(via, " by {}[{}]", by.policy, by.rule);
        }
        if let Some(audit) = &a.audit {
            let _ = write!(via, " audit {}[{}]", audit.policy, audit.rule);
        }
    }
    let mut detail = String::new();
    if r.event != FlowEvent::Drop && r.event != FlowEvent::TcpOpen {
        let _ = write!(
            detail,
            " {} -> / {} <-",
            human_bytes(r.bytes_to_destination),
            human_bytes(r.bytes_to_source)
        );
    }
    if let Some(rtt) = r.rtt_us.filter(|_| r.event == FlowEvent::TcpClose) {
        let _ = write!(detail, " rtt {rtt}us");
    }
    let time = humantime::format_rfc3339_millis(r.time.0).to_string();
    let time = time.get(11..23).unwrap_or(&time).to_owned();
    format!(
        "{time} {:<4} {src} -> {dst}{via} {verdict}{detail} [{}]",
        r.protocol,
        r.reporter.as_str()
    )
}

/// `weft flows`: prints matching buffered records, then (with `follow`) new ones until the
/// agent goes away. A stream that fell behind is said so on stderr.
pub async fn flows(
    socket: &Path,
    filter: &Filter,
    query: &StreamQuery,
    output: Output,
) -> Result<(), Error> {
    let qs = [
        serde_urlencoded::to_string(filter).map_err(Error::Query)?,
        serde_urlencoded::to_string(query).map_err(Error::Query)?,
    ];
    let path = format!("/flows?{}", qs.join("&"));
    let mut pending: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout();
    let mut print = |line: &[u8]| -> bool {
        if line.is_empty() {
            return true;
        }
        if let Ok(lost) = serde_json::from_slice::<Lost>(line) {
            eprintln!(
                "weft: {} flow records lost: this reader was too slow",
                lost.lost
            );
            return true;
        }
        let text = match output {
            Output::Json => String::from_utf8_lossy(line).into_owned(),
            Output::Yaml | Output::Table => match serde_json::from_slice::<FlowRecord>(line) {
                Ok(r) if output == Output::Table => flow_line(&r),
                Ok(r) => serde_saphyr::to_string(&r)
                    .map(|y| format!("---\n{}", y.trim_end()))
                    .unwrap_or_default(),
                Err(e) => format!("(unreadable record: {e})"),
            },
        };
        // A closed stdout (`| head`) ends the stream.
        writeln!(stdout, "{text}").is_ok() && stdout.flush().is_ok()
    };
    admin::stream(socket, &path, |data| {
        pending.extend_from_slice(data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if !print(&line[..line.len() - 1]) {
                return false;
            }
        }
        true
    })
    .await?;
    if !pending.is_empty() {
        print(&pending);
    }
    Ok(())
}

/// `weft config dump`: the desired state as JSON (or YAML).
pub async fn config_dump(socket: &Path, output: Output) -> Result<String, Error> {
    let dump: ConfigDump = admin::get_json(socket, "/config/dump").await?;
    let output = if output == Output::Table {
        Output::Json
    } else {
        output
    };
    Ok(structured(&dump, output)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::connections_table;

    /// The SECURITY column: a tunnel's connection reads `mTLS` with both principals, one
    /// between two meshed pods of the node `local`, one outside the mesh `-`.
    #[test]
    fn the_table_says_how_the_mesh_carries_each_connection() {
        let conn = |mesh: serde_json::Value| {
            let mut c = serde_json::json!({
                "cookie": 7, "role": "client",
                "local": {"address": "10.0.1.10:40000"},
                "remote": {"address": "10.0.2.10:8080"},
                "bytes_sent": 64, "bytes_received": 64, "srtt_us": 30, "retransmits": 0,
                "duration_ms": 2000, "updated": "2026-12-06T03:00:00.000Z",
            });
            if !mesh.is_null() {
                c["mesh"] = mesh;
            }
            serde_json::from_value(c).expect("a connection")
        };
        let principals = |transport: &str| {
            serde_json::json!({
                "source_principal": "spiffe://cluster.local/ns/shop/sa/web",
                "destination_principal": "spiffe://cluster.local/ns/shop/sa/db",
                "transport": transport,
            })
        };
        let table = connections_table(&[
            conn(principals("tunnel")),
            conn(principals("local")),
            conn(serde_json::Value::Null),
        ]);
        let security: Vec<&str> = table
            .lines()
            .skip(1)
            // The column after AGE (`2s`), the last one.
            .map(|l| l.rsplit_once("s  ").expect("a SECURITY column").1)
            .collect();
        assert_eq!(
            security,
            [
                "mTLS spiffe://cluster.local/ns/shop/sa/web -> spiffe://cluster.local/ns/shop/sa/db",
                "local spiffe://cluster.local/ns/shop/sa/web -> spiffe://cluster.local/ns/shop/sa/db",
                "-",
            ]
        );
    }
}
