//! weft: an eBPF node agent for Kubernetes service mesh datapaths.
//!
//! The binary `weft` is a thin CLI over this library; privileged tests use the library to reach
//! the embedded kernel object.
pub mod admin;
pub mod app;
pub mod cgroup;
pub mod cli;
pub mod compile;
pub mod config;
pub mod datapath;
pub mod doctor;
pub mod events;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod mounts;
pub mod pipeline;
pub mod source;
pub mod stats;
pub mod store;
pub mod sync;
pub mod telemetry;

#[cfg(test)]
mod tests;

/// An error and its sources, one line: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A duration flag (`5s`, `100ms`, `0s`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 5s, 100ms)"))
}

/// A duration flag that must be more than zero (a period or a timeout).
pub fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}
