//! `weft compile`: the pipeline without a kernel. Reads a source directory, compiles it as the
//! agent would, and reports what it would program, what it rejects, and what compiling cost
//! (time and peak memory): a dry run for configuration changes and the bench's memory figure.
use std::{net::IpAddr, path::Path, time::Instant};

use serde::Serialize;

use super::Error;
use crate::{
    compile::{self, ServiceSettings, policy::Ids},
    source::{Rejection, dir::DirSource},
    store::Store,
};

/// What `weft compile` prints.
#[derive(Debug, Serialize)]
pub struct CompileReport {
    pub pods: usize,
    pub policies: usize,
    pub services: usize,
    /// Pods of this node (with a cgroup), whose policies are compiled.
    pub local_pods: usize,
    pub frontends: usize,
    pub identities: usize,
    pub ipcache_entries: usize,
    pub policy_entries: usize,
    pub rejections: Vec<Rejection>,
    /// `object: message` notes of compile.
    pub problems: Vec<String>,
    pub compile_ms: f64,
    /// Resident memory once the objects are loaded, and its peak during compile.
    pub rss_before_kib: u64,
    pub hwm_after_kib: u64,
    /// What compiling added at its peak.
    pub compile_peak_kib: u64,
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Loads `dir` and compiles services and policies once.
pub fn compile_dir(dir: &Path, host_ips: &[IpAddr]) -> Result<CompileReport, Error> {
    let mut source = DirSource::with_settle(dir, std::time::Duration::ZERO);
    source.rescan(true)?;
    let (objects, rejections) = source.objects();
    let store = Store::from_objects(objects);
    let rss_before_kib = proc_status_kib("VmRSS:");
    // Resets the peak resident size to the current one (Linux ≥ 4.0), so the peak read below
    // is the compile's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let started = Instant::now();
    let services = compile::services(&store, &ServiceSettings::default());
    let policies = compile::policy::compile(&store, host_ips, &mut Ids::default(), u32::MAX);
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    let hwm_after_kib = proc_status_kib("VmHWM:");
    Ok(CompileReport {
        pods: store.pods.len(),
        policies: store.network_policies.len(),
        services: store.services.len(),
        local_pods: policies.endpoints.len(),
        frontends: services.frontends.len(),
        identities: policies.identities.len(),
        ipcache_entries: policies.ipcache.len(),
        policy_entries: policies.entries.len(),
        rejections,
        problems: services
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.service, p.message))
            .chain(
                policies
                    .problems
                    .iter()
                    .map(|p| format!("{}: {}", p.object, p.message)),
            )
            .collect(),
        compile_ms,
        rss_before_kib,
        hwm_after_kib,
        compile_peak_kib: hwm_after_kib.saturating_sub(rss_before_kib),
    })
}
