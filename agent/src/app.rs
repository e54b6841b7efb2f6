//! The `weft agent` process: start the datapath, then report what it sees until stopped.
//!
//! Stopping the agent (SIGINT, SIGTERM, or a kill) leaves the programs attached and the maps
//! pinned: the datapath keeps working, and the next agent of the instance adopts it.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cgroup,
    conntrack::{self, reader::Reader},
    datapath::{self, Datapath},
    logging::{self, KernelLog},
    stats::{self, Reporter, StatsReader},
};
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Conntrack(#[from] conntrack::Error),
    #[error(transparent)]
    Stats(#[from] stats::Error),
    #[error("cannot read kernel logs")]
    KernelLogs(#[source] std::io::Error),
    #[error("cannot set up the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What `weft agent` was asked to do.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// None: the host's cgroup2 mount.
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub instance: String,
    pub max_connections: u32,
    pub traffic_entries: u32,
    pub ring_buffer_bytes: u32,
    pub events_wakeup_bytes: u64,
    pub events_poll_interval: Duration,
    pub stats_interval: Duration,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> Result<(), Error> {
    // Before anything else: a SIGTERM during start-up must stop the agent cleanly too.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| Error::Signal {
        signal: "SIGINT",
        source,
    })?;
    let cgroup_root = match &config.cgroup_root {
        Some(dir) => dir.clone(),
        None => cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?,
    };
    let mut datapath = Datapath::start(&datapath::Config {
        cgroup: cgroup_root.clone(),
        bpffs: config.bpffs.clone(),
        instance: config.instance.clone(),
        max_connections: config.max_connections,
        traffic_entries: config.traffic_entries,
        ring_buffer_bytes: config.ring_buffer_bytes,
        kernel_log_level: logging::kernel_log_level(),
        events_wakeup_bytes: config.events_wakeup_bytes,
    })?;
    for link in datapath.links() {
        tracing::info!(
            program = link.program,
            install = ?link.install,
            link_id = link.link_id,
            program_id = link.program_id,
            "program attached"
        );
    }
    tracing::info!(
        instance = datapath.pins().instance(),
        cgroup = %datapath.cgroup().display(),
        pins = %datapath.pins().dir().display(),
        "datapath ready"
    );

    let mut reader = Reader::new(datapath.take_conn_events()?)?;
    let mut stats = StatsReader::new(
        datapath.take_stats()?,
        datapath.take_traffic()?,
        &cgroup_root,
    );
    let mut kernel_logs = EbpfLogger::init_with_logger(datapath.ebpf_mut(), KernelLog)
        .map_err(|e| Error::KernelLogs(std::io::Error::other(e)))?;
    // SAFETY: the logger owns the ring buffer's descriptor, which stays open and unchanged
    // while the AsyncFd exists; the AsyncFd only borrows it through this wrapper.
    let kernel_logs_fd = unsafe {
        AsyncFd::register_with_interest(RawFdWrapper(kernel_logs.as_raw()), Interest::READABLE)
    }
    .map_err(|e| Error::KernelLogs(e.into()))?;

    let mut ticker = tokio::time::interval(config.stats_interval);
    ticker.tick().await;
    let mut report = Reporter::default();
    let mut sink = |c: conntrack::Connection| c.log();

    loop {
        tokio::select! {
            result = reader.run(config.events_poll_interval, &mut sink) => result?,
            ready = kernel_logs_fd.readable() => {
                let mut guard = ready.map_err(Error::KernelLogs)?;
                guard.clear_ready();
                kernel_logs.flush();
            }
            _ = ticker.tick() => report.tick(&mut stats, reader.stats())?,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    reader.drain(&mut sink);
    kernel_logs.flush();
    report.tick(&mut stats, reader.stats())?;
    tracing::info!(
        instance = datapath.pins().instance(),
        "agent stopping; programs stay attached and pinned (remove them with `weft cleanup \
         --instance {}`)",
        datapath.pins().instance()
    );
    Ok(())
}

/// Lets tokio watch a descriptor owned elsewhere (aya-log's ring buffer).
struct RawFdWrapper(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawFdWrapper {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

trait AsRaw {
    fn as_raw(&self) -> std::os::fd::RawFd;
}

impl<T> AsRaw for EbpfLogger<T> {
    fn as_raw(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}
