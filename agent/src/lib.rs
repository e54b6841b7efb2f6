//! weft: an eBPF node agent for Kubernetes service mesh datapaths.
//!
//! The binary `weft` is a thin CLI over this library; privileged tests use the library to reach
//! the embedded kernel object.
pub mod admin;
pub mod app;
pub mod cgroup;
pub mod cli;
pub mod compile;
pub mod conntrack;
pub mod datapath;
pub mod doctor;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod source;
pub mod stats;
pub mod store;
pub mod sync;
pub mod telemetry;

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
