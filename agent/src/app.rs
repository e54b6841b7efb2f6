//! The `weft agent` process: start the datapath, then report what it sees until stopped.
//!
//! Stopping the agent (SIGINT, SIGTERM, or a kill) leaves the programs attached and the maps
//! pinned: the datapath keeps working, and the next agent of the instance adopts it.
use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;

use crate::{
    admin::{self, AdminState, AgentInfo, ProgramInfo},
    cgroup,
    conntrack::{self, reader::Reader},
    datapath::{self, Datapath},
    logging::{self, KernelLog},
    metrics::Metrics,
    pipeline::{self, Pipeline},
    source::{
        Source,
        dir::DirSource,
        kube::{KubeConfig, KubeSource, metrics::KubeMetrics},
    },
    stats::{self, Reporter, StatsReader},
    sync::{Capacity, policy::PolicyCapacity},
    telemetry::{DirectoryHandle, Telemetry, TelemetryConfig},
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
    #[error(transparent)]
    Pipeline(#[from] pipeline::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("cannot read kernel logs")]
    KernelLogs(#[source] std::io::Error),
    #[error("cannot set up the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the source directory {dir}", dir = dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error(transparent)]
    Kube(#[from] crate::source::kube::Error),
    #[error("the admin API stopped")]
    AdminStopped,
    #[error("this node lacks what the agent needs ({missing}); `weft doctor` checks it all")]
    NodeChecks { missing: String },
    #[error("cannot listen for metrics on {addr} (--metrics-addr)")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Counts every map's entries off the event loop (walking a big map takes a syscall per key)
/// and publishes fill ratios; skipped while the previous count still runs.
fn refresh_map_gauges(busy: &Arc<AtomicBool>, pins: &datapath::Pins, metrics: &Arc<Metrics>) {
    if busy.swap(true, Ordering::AcqRel) {
        return;
    }
    let (busy, pins, metrics) = (Arc::clone(busy), pins.clone(), Arc::clone(metrics));
    tokio::task::spawn_blocking(move || {
        match datapath::map_usage(&pins) {
            Ok(usage) => metrics.set_map_usage(&usage),
            Err(e) => {
                tracing::warn!(target: "weft::stats", error = %crate::chain(&e), "cannot count map entries")
            }
        }
        busy.store(false, Ordering::Release);
    });
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
    pub max_services: u32,
    pub max_backends: u32,
    pub max_affinity: u32,
    pub max_socket_translations: u32,
    pub max_endpoints: u32,
    pub max_ipcache: u32,
    pub max_policy_entries: u32,
    pub max_policy_flows: u32,
    /// The node's own addresses; None: those of the agent's network namespace.
    pub node_ips: Option<Vec<std::net::IpAddr>>,
    pub events_poll_interval: Duration,
    pub stats_interval: Duration,
    /// `--source`; none: no services and no policies.
    pub source: Option<SourceConfig>,
    pub admin_socket: PathBuf,
    /// Connection and drop events (and UDP flow counting); off: no telemetry in the kernel.
    pub telemetry: bool,
    /// An open connection reports its counters this often (0: only at open and close).
    pub conn_update_interval: Duration,
    pub max_udp_flows: u32,
    pub telemetry_config: TelemetryConfig,
    /// Where Prometheus scrapes `/metrics` over TCP (None: only on the admin socket).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Where desired state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A directory of Kubernetes YAML (standalone mode).
    Dir(PathBuf),
    /// The API server (Kubernetes mode).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        node_name: String,
    },
}

/// A change in the source directory is applied once it has been quiet this long (editors and
/// atomic writers produce bursts of events)...
const DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but never later than this after the first event.
const DEBOUNCE_MAX: Duration = Duration::from_millis(60);
/// A file closed after writing or renamed into place is complete: applied after this much
/// quiet only (what else the same tool writes at once usually follows within it).
const DEBOUNCE_COMPLETE: Duration = Duration::from_millis(3);
/// Changes from the API server come in streams (a rollout, a node draining), and a pass
/// compiles the whole store: applied after 50 ms of quiet, 250 ms after the first change at
/// the latest, and never sooner than 250 ms after the previous pass (4 passes a second at
/// most).
const DEBOUNCE_API: Duration = Duration::from_millis(50);
const DEBOUNCE_API_MAX: Duration = Duration::from_millis(250);

/// What the source watcher saw.
#[derive(Debug)]
enum SourceEvent {
    /// Files closed after writing, or renamed into place: complete as they are now.
    Complete(Vec<PathBuf>),
    /// Anything else: a file may be in the middle of a write.
    Changed,
    /// A reflector applied a change from the API server.
    Api,
}
/// A full recompile and sync runs this often even without events (retries what did not fit,
/// catches missed events).
const RESYNC: Duration = Duration::from_secs(30);

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
    // What the node lacks is said plainly before anything is loaded.
    let missing: Vec<String> = crate::doctor::quick(&config.bpffs, config.cgroup_root.as_deref())
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if !missing.is_empty() {
        return Err(Error::NodeChecks {
            missing: missing.join("; "),
        });
    }
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
        max_services: config.max_services,
        max_backends: config.max_backends,
        max_affinity: config.max_affinity,
        max_socket_translations: config.max_socket_translations,
        max_endpoints: config.max_endpoints,
        max_ipcache: config.max_ipcache,
        max_policy_entries: config.max_policy_entries,
        max_policy_flows: config.max_policy_flows,
        cgroup_level: cgroup::level(&cgroup_root)?,
        // Telemetry off: no per-packet update check either.
        conn_update_interval_ns: if config.telemetry {
            u64::try_from(config.conn_update_interval.as_nanos()).unwrap_or(u64::MAX)
        } else {
            0
        },
        conn_events_enabled: u32::from(config.telemetry),
        max_udp_flows: config.max_udp_flows,
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

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    registry.register_collector(Box::new(stats::verdicts::VerdictCollector::new(
        datapath.take_verdicts()?,
        datapath.open_pinned(weft_abi::maps::STATS)?,
    )));
    registry.register_collector(Box::new(crate::metrics::process::ProcessCollector));
    let directory: DirectoryHandle = Arc::default();
    let telemetry = Telemetry::new(
        config.telemetry_config.clone(),
        &mut registry,
        Arc::clone(&directory),
    )
    .with_maps(
        datapath.take_udp_flow_stats()?,
        datapath.open_pinned(weft_abi::maps::CONN_STATE)?,
    );
    let status = Arc::new(RwLock::new(pipeline::Status::default()));
    let policy_status = Arc::new(RwLock::new(pipeline::policy::PolicyStatus::default()));
    let node_ips = config
        .node_ips
        .clone()
        .unwrap_or_else(pipeline::policy::host_ips);
    let policy_stage = pipeline::policy::PolicyStage::new(
        datapath.take_policy_maps()?,
        PolicyCapacity {
            endpoints: config.max_endpoints,
            ipcache: config.max_ipcache,
            entries: config.max_policy_entries,
        },
        &cgroup_root,
        node_ips,
        &metrics,
        Arc::clone(&policy_status),
    )
    .map_err(pipeline::Error::from)?;
    let capacity = Capacity {
        services: config.max_services,
        slots: config.max_backends,
        members: config.max_backends,
    };
    let (source, source_health) = match &config.source {
        None => (None, None),
        Some(SourceConfig::Dir(dir)) => (Some(Source::Dir(DirSource::new(dir))), None),
        Some(SourceConfig::Kubernetes {
            kubeconfig,
            node_name,
        }) => {
            let kube = KubeSource::start(
                &KubeConfig {
                    kubeconfig: kubeconfig.clone(),
                    node_name: node_name.clone(),
                    cgroup_root: cgroup_root.clone(),
                },
                KubeMetrics::new(&mut registry),
            )
            .await?;
            tracing::info!(target: "weft::source", source = kube.describe(), "watching the Kubernetes API; ready once every kind is listed");
            let health = kube.health();
            (Some(Source::Kubernetes(Box::new(kube))), Some(health))
        }
    };
    let mut pipeline = Pipeline::new(
        source,
        datapath.take_service_maps()?,
        capacity,
        policy_stage,
        Arc::clone(&metrics),
        Arc::clone(&status),
    )?
    .with_names(
        Arc::clone(&directory),
        config.telemetry_config.names.clone(),
    );
    // Watch before the first read so no change between the two is missed.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<SourceEvent>();
    let _watcher = match &config.source {
        Some(SourceConfig::Dir(dir)) => Some(watch(dir, events_tx.clone())?),
        _ => None,
    };
    if let Some(health) = &source_health {
        // Reflector changes go through the same debounce as file changes.
        let (health, tx) = (Arc::clone(health), events_tx.clone());
        tokio::spawn(async move {
            loop {
                health.changed().await;
                if tx.send(SourceEvent::Api).is_err() {
                    return;
                }
            }
        });
    }
    // A file still being written is read again shortly instead of waiting for the resync.
    let first_unsettled = pipeline.refresh(true)?;

    let info = AgentInfo {
        instance: config.instance.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        cgroup: cgroup_root.clone(),
        pins: datapath.pins().dir().to_owned(),
        programs: datapath
            .links()
            .iter()
            .map(|l| ProgramInfo {
                program: l.program.to_owned(),
                install: format!("{:?}", l.install),
                link_id: l.link_id,
                program_id: l.program_id,
            })
            .collect(),
    };
    let admin_state = AdminState {
        info: Arc::new(info),
        services: Arc::clone(&status),
        policy: Arc::clone(&policy_status),
        registry: Arc::new(registry),
        pins: datapath.pins().clone(),
        telemetry: telemetry.view(),
        metrics_addr: None,
        store: pipeline.store_handle(),
        source_health,
        telemetry_settings: serde_json::json!({
            "enabled": config.telemetry,
            "granularity": config.telemetry_config.granularity,
            "conn_update_interval": humantime::format_duration(config.conn_update_interval).to_string(),
            "udp_idle_timeout": humantime::format_duration(config.telemetry_config.udp_idle).to_string(),
            "flow_buffer": config.telemetry_config.flow_buffer,
            "cluster": config.telemetry_config.cluster,
            "cluster_domain": config.telemetry_config.names.cluster_domain,
        }),
    };
    // Listening before "ready" is logged: whoever waits for it can use the API at once.
    let listener = admin::bind(&config.admin_socket)?;
    // Removes the socket on every exit, error paths included, so a stale path is never left.
    let _socket_guard = RemoveOnDrop(config.admin_socket.clone());
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_state = AdminState {
        metrics_addr,
        ..admin_state
    };
    let mut metrics_server = match metrics_listener {
        Some(l) => tokio::spawn(admin::serve_metrics(l, admin_state.clone())),
        None => tokio::spawn(std::future::pending()),
    };
    let mut admin = tokio::spawn(admin::serve(
        listener,
        config.admin_socket.clone(),
        admin_state,
    ));
    tracing::info!(
        instance = datapath.pins().instance(),
        cgroup = %datapath.cgroup().display(),
        pins = %datapath.pins().dir().display(),
        admin = %config.admin_socket.display(),
        metrics = metrics_addr.map(|a| format!("http://{a}/metrics")),
        source = pipeline.source_name(),
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
    let map_gauges_busy = Arc::new(AtomicBool::new(false));
    refresh_map_gauges(&map_gauges_busy, datapath.pins(), &metrics);
    let mut gc = tokio::time::interval(crate::sync::GRACE);
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    let mut report = Reporter::default();
    // The sink and the periodic telemetry work share it; they never run at the same time.
    let telemetry = RefCell::new(telemetry);
    let mut sink = |c: conntrack::Connection| {
        c.log();
        telemetry.borrow_mut().on_event(&c);
    };
    let tick_every = if config.conn_update_interval.is_zero() {
        Duration::from_secs(5)
    } else {
        config.conn_update_interval
    };
    // A connection quiet for this long and gone from the kernel lost its close event.
    let stale_after = (tick_every * 3).max(Duration::from_secs(60));
    let mut telemetry_tick = tokio::time::interval(tick_every);
    telemetry_tick.tick().await;
    // UDP flow counters are read off the event loop (a syscall per flow) and come back here.
    let (udp_tx, mut udp_rx) = tokio::sync::mpsc::unbounded_channel();
    // Set while events are pending: (apply at the latest, quiet deadline).
    let mut pending: Option<(Instant, Instant)> =
        first_unsettled.then(|| (Instant::now() + DEBOUNCE_MAX, Instant::now() + DEBOUNCE));
    // API changes are not applied before this (one pass per DEBOUNCE_API_MAX at most).
    let mut api_not_before = Instant::now();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);

    loop {
        let apply_at = pending.map_or(far, |(latest, quiet)| quiet.min(latest));
        tokio::select! {
            result = reader.run(config.events_poll_interval, &mut sink) => result?,
            ready = kernel_logs_fd.readable() => {
                let mut guard = ready.map_err(Error::KernelLogs)?;
                guard.clear_ready();
                kernel_logs.flush();
            }
            Some(event) = events.recv() => {
                let now = Instant::now();
                let (quiet, max) = match event {
                    SourceEvent::Complete(paths) => {
                        // Soon, even when other files changed too: one still being written
                        // is left for a later pass, until it settles.
                        pipeline.mark_complete(&paths);
                        (now + DEBOUNCE_COMPLETE, now + DEBOUNCE_MAX)
                    }
                    SourceEvent::Changed => (now + DEBOUNCE, now + DEBOUNCE_MAX),
                    SourceEvent::Api => {
                        let quiet = (now + DEBOUNCE_API).max(api_not_before);
                        (quiet, (now + DEBOUNCE_API_MAX).max(api_not_before))
                    }
                };
                let latest = pending.map_or(max, |(latest, _)| latest);
                pending = Some((latest, quiet));
            }
            () = tokio::time::sleep_until(apply_at.into()), if pending.is_some() => {
                pending = None;
                api_not_before = Instant::now() + DEBOUNCE_API_MAX;
                if refresh(&mut pipeline, false) {
                    pending = Some((Instant::now() + DEBOUNCE_MAX, Instant::now() + DEBOUNCE));
                }
            }
            _ = resync.tick() => if refresh(&mut pipeline, true) {
                pending = Some((Instant::now() + DEBOUNCE_MAX, Instant::now() + DEBOUNCE));
            },
            _ = gc.tick() => pipeline.collect_garbage(),
            _ = ticker.tick() => {
                report.tick(&mut stats, reader.stats())?;
                refresh_map_gauges(&map_gauges_busy, datapath.pins(), &metrics);
            }
            _ = telemetry_tick.tick() => {
                // Lost closes: look, read what the kernel has submitted, then forget.
                let candidates = telemetry.borrow().lost_candidates(stale_after);
                reader.drain(&mut sink);
                let mut t = telemetry.borrow_mut();
                t.forget(&candidates);
                t.tick();
                if let Some(job) = t.udp_read_job() {
                    let tx = udp_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        // The receiver is gone only when the agent stops.
                        let _ = tx.send(job());
                    });
                }
            }
            Some(batch) = udp_rx.recv() => {
                if let Err(e) = telemetry.borrow_mut().apply_udp(batch) {
                    tracing::warn!(target: "weft::telemetry", error = %crate::chain(&e), "cannot read UDP flow counters");
                }
            }
            result = &mut metrics_server => {
                return Err(match result {
                    Ok(Err(e)) => e.into(),
                    _ => Error::AdminStopped,
                });
            }
            result = &mut admin => {
                return match result {
                    Ok(Err(e)) => Err(e.into()),
                    _ => Err(Error::AdminStopped),
                };
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    admin.abort();
    metrics_server.abort();
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

/// A failed refresh (the source directory vanished, a map read failed) keeps the state the
/// kernel has; the next event or resync tries again. Returns whether a file was still being
/// written, so the caller reads it again after the debounce.
fn refresh(pipeline: &mut Pipeline, force: bool) -> bool {
    match pipeline.refresh(force) {
        Ok(unsettled) => unsettled,
        Err(e) => {
            tracing::error!(error = %crate::chain(&e), "cannot apply the source; the previous state stays in force");
            false
        }
    }
}

/// Removes a path when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Watches a directory (not recursively) and signals every change.
fn watch(
    dir: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<SourceEvent>,
) -> Result<notify::RecommendedWatcher, Error> {
    use notify::{
        EventKind, Watcher as _,
        event::{AccessKind, AccessMode, ModifyKind, RenameMode},
    };
    let err = |source| Error::Watch {
        dir: dir.to_owned(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let sent = match event {
            Err(e) => {
                // A lost event (queue overflow, watch removed) could hide a change: rescan.
                tracing::warn!(target: "weft::source", error = %e, "source watch reported an error; rescanning");
                SourceEvent::Changed
            }
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                    SourceEvent::Complete(e.paths)
                }
                _ => SourceEvent::Changed,
            },
        };
        // The receiver is gone only when the agent stops.
        let _ = tx.send(sent);
    })
    .map_err(err)?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(watcher)
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
