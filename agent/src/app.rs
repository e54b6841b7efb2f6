//! The `weft agent` process: named subsystems started in order from their slices of one
//! [`Config`], then a run loop that reads as a list of events and what handles each.
//!
//! Stopping the agent (SIGINT, SIGTERM, or a kill) leaves the programs attached and the maps
//! pinned: the datapath keeps working, and the next agent of the instance adopts it.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    time::{Interval, MissedTickBehavior},
};

mod handoff;

use crate::{
    admin::{self, Admin, AdminState, AgentInfo, ProgramInfo},
    cgroup::{self, watch::CgroupWatch},
    config::Config,
    datapath::{
        self, Datapath, Globals, InstanceLock, SuccessorLock, Unbound, metrics::MapMetrics,
    },
    events::{
        self, Connection,
        reader::Reader,
        tracked::Tracked,
        udp::{UdpBatch, UdpFlowReader},
    },
    logging::{self, KernelLogs},
    mesh::{
        LocalPod, Mesh,
        ca_watch::{self, CaWatch},
    },
    metrics,
    pipeline::{
        self, Pipeline,
        metrics::PipelineMetrics,
        schedule::{Change, Schedule},
    },
    source::{self, Source, SourceEvent},
    stats::{self, Stats},
    sync::{kernel::KernelMaps, policy::kernel::KernelPolicyMaps},
    telemetry::{self, Telemetry, TelemetryConfig},
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error(transparent)]
    Events(#[from] events::Error),
    #[error(transparent)]
    Stats(#[from] stats::Error),
    #[error(transparent)]
    Pipeline(#[from] pipeline::Error),
    #[error(transparent)]
    Source(#[from] source::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error(transparent)]
    Logging(#[from] logging::Error),
    #[error("cannot set up the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent this one handed over to exited and nobody runs the instance: exiting, for a restart to take it"
    )]
    SuccessorGone,
    #[error("this node lacks what the agent needs ({missing}); `weft doctor` checks it all")]
    NodeChecks { missing: String },
}

/// A full recompile and sync runs this often even without events (retries what did not fit,
/// catches missed events).
const RESYNC: Duration = Duration::from_secs(30);

/// How long an exiting agent waits for a UDP read under way.
const UDP_FINISH: Duration = Duration::from_secs(1);
/// How often the agent looks for a successor (and, as one, whether its listeners are up).
const HANDOFF_POLL: Duration = Duration::from_millis(200);

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), Error> {
    // Before anything else: a SIGTERM during start-up must stop the agent cleanly too.
    // (A signal during start-up is handled by the run loop, once every subsystem is up.)
    let mut signals = Signals::install()?;
    for flag in config.datapath.retired_flags() {
        tracing::warn!(
            flag,
            "retired flag ignored: socket state lives in socket storage, which has no capacity"
        );
    }
    let Some(agent) = Agent::start(&config, &mut signals).await? else {
        return Ok(());
    };
    agent.run(signals).await
}

/// SIGTERM and SIGINT.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Self, Error> {
        let handler = |kind, name| {
            signal(kind).map_err(|source| Error::Signal {
                signal: name,
                source,
            })
        };
        Ok(Self {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// What the node lacks is said plainly before anything is loaded.
fn check_node(config: &Config) -> Result<PathBuf, Error> {
    let settings = &config.datapath;
    let missing: Vec<String> =
        crate::doctor::quick(&settings.instance.bpffs, settings.cgroup_root.as_deref())
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
    if !missing.is_empty() {
        return Err(Error::NodeChecks {
            missing: missing.join("; "),
        });
    }
    Ok(match &settings.cgroup_root {
        Some(dir) => dir.clone(),
        None => cgroup::find_cgroup2_mount(Path::new("/proc/self/mountinfo"))?,
    })
}

/// `--unbound-pods`, or its default for the source: in Kubernetes mode a pod's cgroup can
/// exist before the agent has bound it, and must not run unenforced meanwhile.
fn unbound_pods(config: &Config) -> Unbound {
    config
        .datapath
        .unbound_pods
        .unwrap_or(match config.source.source {
            Some(source::Kind::Kubernetes) => Unbound::Isolate,
            _ => Unbound::Pass,
        })
}

/// Loads the object and opens the maps (the programs are loaded by [`verify`] and attached
/// after the first full sync).
fn start_datapath(
    config: &Config,
    cgroup_root: &Path,
    lock: &InstanceLock,
) -> Result<Loading, Error> {
    let capacities = &config.datapath.capacities;
    let (cgroup_level, agent_cgroup) = datapath::cgroup_level(cgroup_root, capacities)?;
    let mut globals = Globals {
        kernel_log_level: logging::kernel_log_level(),
        events_wakeup_bytes: config.datapath.events_wakeup_bytes,
        cgroup_level,
        conn_update_interval_ns: 0,
        conn_events_enabled: 0,
        unbound_isolated: 0,
        unbound_scope_level: 0,
        unbound_scope_id: 0,
        host_netns_cookie: datapath::host_netns_cookie(config.datapath.host_netns.as_deref())?,
        sock_states: u64::from(config.datapath.max_socket_states),
        sock_states_per_pod: u64::from(config.datapath.max_socket_states_per_pod),
        sock_states_floor: u64::from(config.datapath.min_socket_states_per_pod),
        sockmap_enabled: u32::from(config.datapath.sockmap),
        agent_cgroup_level: agent_cgroup.map_or(0, |(level, _)| level),
        agent_cgroup_id: agent_cgroup.map_or(0, |(_, id)| id),
        kernel_hz: datapath::kernel_hz(&config.mesh.host_proc).unwrap_or_else(|| {
            tracing::warn!(host_proc = %config.mesh.host_proc.display(), "the kernel's tick rate (CONFIG_HZ) is unknown: /proc/config.gz, /boot/config-<release> and timer_list (of --host-proc, and of /proc) do not say; connect timeouts under 1 s end after 1 s");
            0
        }),
    };
    config.telemetry.apply_to(&mut globals);
    if unbound_pods(config) == Unbound::Isolate {
        // Below the root, so its level follows from the root's (no second probe).
        let scope = pods_cgroup(config, cgroup_root).and_then(|dir| {
            let below = dir.strip_prefix(cgroup_root).ok()?.components().count();
            Some((dir, u32::try_from(below).ok()?))
        });
        match scope {
            Some((dir, below)) => {
                globals.unbound_isolated = 1;
                globals.unbound_scope_level = globals.cgroup_level + below;
                globals.unbound_scope_id = cgroup::cgroup_id(&dir)?;
            }
            None => tracing::warn!(
                root = %cgroup_root.display(),
                "no kubelet pods cgroup (kubepods.slice, kubepods, or --pods-cgroup) under the cgroup root: pods not bound yet are NOT isolated"
            ),
        }
    }
    let datapath = Datapath::start(
        &datapath::Config {
            cgroup: cgroup_root.to_owned(),
            instance: config.datapath.instance.clone(),
            capacities: capacities.clone(),
            globals,
        },
        lock,
    )?;
    // Kernels before 6.15 lack the netns cookie in cgroup_skb: the default gives way.
    let fallback = (globals.unbound_isolated == 1 && config.datapath.unbound_pods.is_none())
        .then_some(Globals {
            unbound_isolated: 0,
            ..globals
        });
    Ok(Loading {
        datapath,
        fallback,
        globals,
        own_cgroup: agent_cgroup.map(|(_, id)| id),
    })
}

/// The datapath with its programs still to load, and how.
struct Loading {
    datapath: Datapath,
    /// The globals to load with when the requested ones do not load (see [`verify`]).
    fallback: Option<Globals>,
    globals: Globals,
    /// The agent's own cgroup, when below the root (see [`datapath::AgentCgroups`]).
    own_cgroup: Option<u64>,
}

/// Loads the programs (the kernel's verifier: a second or more, during which the mesh proxy
/// already serves), falling back as [`Loading::fallback`] says.
async fn verify(
    datapath: &mut Datapath,
    fallback: Option<Globals>,
    globals: Globals,
) -> Result<(), Error> {
    let fell_back = datapath.verify(fallback).await?;
    if fell_back {
        tracing::warn!(
            "this kernel cannot isolate pods not bound yet (cgroup_skb needs bpf_get_netns_cookie, Linux 6.15): they are NOT isolated until bound"
        );
    }
    tracing::info!(
        cgroup_level = globals.cgroup_level,
        unbound_isolated = globals.unbound_isolated == 1 && !fell_back,
        "programs loaded"
    );
    Ok(())
}

/// `--pods-cgroup`, or the kubelet's pods cgroup under the root (either driver).
fn pods_cgroup(config: &Config, cgroup_root: &Path) -> Option<PathBuf> {
    if let Some(dir) = &config.datapath.pods_cgroup {
        return Some(dir.clone());
    }
    ["kubepods.slice", "kubepods"]
        .into_iter()
        .map(|d| cgroup_root.join(d))
        .find(|d| d.is_dir())
}

fn log_links(links: &[datapath::InstalledLink]) {
    for link in links {
        tracing::info!(
            program = link.program,
            install = ?link.install,
            link_id = link.link_id,
            program_id = link.program_id,
            "program attached"
        );
    }
}

/// The programs are attached (or the pinned links take this agent's programs) once the first
/// full sync is in the maps; the agent is ready only then. Returns whether that happened now.
/// Moving off maps of another version or shape waits for a pass that wrote everything: until
/// then the programs in place keep working on the maps they were filled for.
fn commit_when_synced(datapath: &mut Datapath, pipeline: &mut Pipeline) -> Result<bool, Error> {
    if !datapath.pending() || !pipeline.synced() {
        return Ok(false);
    }
    if datapath.migrating() && !pipeline.clean() {
        if datapath.note_migration_waits() {
            tracing::warn!(
                "the move to new maps waits for a pass without errors; the programs in place keep working on the previous maps"
            );
        }
        return Ok(false);
    }
    log_links(datapath.commit()?);
    pipeline.release_ready();
    Ok(true)
}

/// The pipeline and its first pass (the programs are attached once loaded).
fn start_pipeline(
    config: &Config,
    datapath: &mut Datapath,
    source: Option<Source>,
    cgroup_root: &Path,
    metrics: PipelineMetrics,
) -> Result<(Pipeline, Schedule), Error> {
    let mut pipeline = Pipeline::new(
        source,
        (
            KernelMaps::take(datapath)?,
            KernelPolicyMaps::take(datapath)?,
        ),
        &config.datapath.capacities,
        &config.pipeline,
        cgroup_root,
        config.datapath.host_netns.as_deref(),
        metrics,
    )?;
    if datapath.pending() {
        pipeline.hold_ready();
    }
    let mut schedule = Schedule::new(Instant::now());
    // A file still being written is read again shortly instead of waiting for the resync.
    if pipeline.refresh(true)? {
        schedule.retry_unsettled(Instant::now());
    }
    Ok((pipeline, schedule))
}

/// The instance lock (see [`handoff::acquire`]), with the successor lock until --drain-timeout
/// at the latest (listening or not: the agent replaced stops accepting then anyway), and
/// whether another agent handed the instance over.
async fn lock_instance(
    config: &Config,
    signals: &mut Signals,
) -> Result<Option<(InstanceLock, Option<(SuccessorLock, Instant)>, bool)>, Error> {
    let settings = &config.datapath;
    let acquired = handoff::acquire(&settings.instance, settings.take_over, signals).await?;
    Ok(acquired.map(|a| {
        let until = Instant::now() + config.mesh.drain_timeout;
        (a.lock, a.successor.map(|s| (s, until)), a.took_over)
    }))
}

type Started = (
    Option<Source>,
    Option<UnboundedReceiver<SourceEvent>>,
    Option<notify::RecommendedWatcher>,
    Option<Arc<source::kube::Health>>,
);

/// The source, its events, its directory watcher, and its health (Kubernetes).
async fn start_source(
    config: &Config,
    cgroup_root: &Path,
    registry: &mut Registry,
) -> Result<Started, Error> {
    let started = Source::start(&config.source, cgroup_root, registry).await?;
    let (source, events, watcher) = match started {
        Some(s) => (Some(s.source), Some(s.events), s.watcher),
        None => (None, None, None),
    };
    let health = match &source {
        Some(Source::Kubernetes(kube)) => Some(kube.health()),
        _ => None,
    };
    Ok((source, events, watcher, health))
}

/// Where everything is, once the agent has started.
fn log_ready(datapath: &Datapath, socket: &Path, admin: &Admin, pipeline: &Pipeline) {
    tracing::info!(
        instance = datapath.pins().instance(),
        cgroup = %datapath.cgroup().display(),
        pins = %datapath.pins().dir().display(),
        admin = %socket.display(),
        metrics = admin.metrics_addr.map(|a| format!("http://{a}/metrics")),
        source = pipeline.source_name(),
        "datapath ready"
    );
}

/// A watch for pods' new cgroups, and what it reports; without one (the watch failed), the
/// periodic check binds new pods.
fn watch_new_cgroups() -> (Option<CgroupWatch>, UnboundedReceiver<()>) {
    let (cgroup_tx, cgroup_created) = unbounded_channel();
    let cgroup_watch = CgroupWatch::new(cgroup_tx)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot watch for new cgroups; new pods are bound at the periodic check only"))
        .ok();
    (cgroup_watch, cgroup_created)
}

/// A watch on the mesh CA's directory, so that a rotation is read at once; without one
/// (the watch failed), the resync's re-read still finds it.
fn watch_ca(config: &Config) -> Option<CaWatch> {
    let dir = config.mesh.mesh_ca.as_deref()?;
    CaWatch::start(dir)
        .inspect_err(|e| {
            tracing::warn!(target: "weft::mesh", dir = %dir.display(), error = %e, "cannot watch the mesh CA; a change is read at the next resync (30 s)");
        })
        .ok()
}

/// The mesh, following the first pass when given `views` (serving its pods at once).
fn start_mesh(
    config: &Config,
    registry: &mut Registry,
    datapath: &mut Datapath,
    views: Option<&pipeline::Views>,
) -> Result<Mesh, Error> {
    let mut mesh = Mesh::new(
        &config.mesh,
        registry,
        Some((
            datapath.take(weft_abi::maps::MESH_ORIG)?,
            datapath.pins().clone(),
        )),
        config.datapath.host_netns.as_deref(),
    )
    .with_mesh_root(&config.pipeline.mesh_root_namespace);
    if let Some(views) = views {
        on_pass(&mut mesh, views, datapath.cgroup());
    }
    Ok(mesh)
}

/// Kernel events into telemetry: the ring buffer, the UDP flow counters (read off the event
/// loop; the results come back on a channel), and what the kernel still tracks.
struct TelemetryLoop {
    telemetry: Telemetry,
    reader: Reader,
    poll: Interval,
    udp: UdpFlowReader,
    udp_reading: bool,
    udp_tx: UnboundedSender<Result<UdpBatch, events::Error>>,
    udp_rx: UnboundedReceiver<Result<UdpBatch, events::Error>>,
    tracked: Tracked,
    settings: telemetry::Settings,
    /// Marks the connections the mesh carried.
    mesh: Option<Arc<crate::mesh::carried::Carried>>,
}

impl TelemetryLoop {
    fn new(
        config: &Config,
        datapath: &mut Datapath,
        registry: &mut Registry,
        views: &pipeline::Views,
    ) -> Result<Self, Error> {
        let telemetry = Telemetry::new(
            TelemetryConfig::from(&config.telemetry),
            registry,
            Arc::clone(&views.directory),
        );
        let mut poll = tokio::time::interval(config.events.events_poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (udp_tx, udp_rx) = unbounded_channel();
        Ok(Self {
            telemetry,
            reader: Reader::new(datapath.take(weft_abi::maps::CONN_EVENTS)?)?,
            poll,
            udp: UdpFlowReader::new(datapath.take(weft_abi::maps::UDP_FLOW_STATS)?),
            udp_reading: false,
            udp_tx,
            udp_rx,
            tracked: Tracked::new(datapath.open_pinned(weft_abi::maps::CONN_STATE)?),
            settings: config.telemetry.clone(),
            mesh: None,
        })
    }

    /// Every event in the ring buffer, to telemetry. The clocks are read once per 256 events:
    /// a batch is handled within a millisecond or so.
    fn drain(&mut self) {
        let telemetry = &mut self.telemetry;
        let mut handled = 0u32;
        let mut now = crate::telemetry::Now::read();
        let mesh = self.mesh.as_deref();
        self.reader.drain(&mut |mut c: Connection| {
            if handled == 256 {
                now = crate::telemetry::Now::read();
                handled = 0;
            }
            handled += 1;
            if let Some(mesh) = mesh {
                mesh.annotate(&mut c);
            }
            c.log();
            telemetry.on_event_at(&c, now);
        });
        // Streams the proxy refused: no socket of the kernel's saw them.
        for c in mesh.map(|m| m.take_refused()).unwrap_or_default() {
            c.log();
            telemetry.on_refused_stream(&c);
        }
    }

    /// Periodic work: connections whose close was lost, expired series, a UDP read.
    fn tick(&mut self) {
        // Lost closes: look, read what the kernel has submitted, then forget.
        let tracked = &self.tracked;
        let candidates = self
            .telemetry
            .lost_candidates(self.settings.stale_after(), |c| tracked.contains(c));
        self.drain();
        self.telemetry.forget(&candidates);
        self.telemetry.tick();
        if !self.udp_reading {
            self.udp_reading = true;
            let (udp, tx, idle) = (
                self.udp.clone(),
                self.udp_tx.clone(),
                self.settings.udp_idle_timeout,
            );
            tokio::task::spawn_blocking(move || {
                // The receiver is gone only when the agent stops.
                let _ = tx.send(udp.read(idle));
            });
        }
    }

    /// Waits (at most a second) for a UDP read under way and applies it: the read deletes
    /// the idle flows it returns, so a result dropped at exit would lose them.
    async fn finish_udp(&mut self) {
        if !self.udp_reading {
            return;
        }
        if let Ok(Some(batch)) = tokio::time::timeout(UDP_FINISH, self.udp_rx.recv()).await {
            self.apply_udp(batch);
        }
    }

    fn apply_udp(&mut self, batch: Result<UdpBatch, events::Error>) {
        self.udp_reading = false;
        match batch {
            Ok(batch) => self.telemetry.apply_udp(batch),
            Err(e) => {
                tracing::warn!(target: "weft::telemetry", error = %crate::chain(&e), "cannot read UDP flow counters")
            }
        }
    }
}

/// The periodic timers of the run loop.
struct Timers {
    resync: Interval,
    gc: Interval,
    stats: Interval,
    telemetry: Interval,
    /// A look at the successor lock (see [`handoff`]).
    handoff: Interval,
}

impl Timers {
    async fn new(config: &Config) -> Self {
        let resync = first_tick_done(tokio::time::interval(RESYNC)).await;
        let stats = first_tick_done(tokio::time::interval(config.stats.stats_interval)).await;
        let telemetry = first_tick_done(tokio::time::interval(config.telemetry.tick())).await;
        Self {
            resync,
            gc: tokio::time::interval(crate::sync::GRACE),
            stats,
            telemetry,
            handoff: tokio::time::interval(HANDOFF_POLL),
        }
    }
}

/// An interval whose immediate first tick is already taken.
async fn first_tick_done(mut interval: Interval) -> Interval {
    interval.tick().await;
    interval
}

/// The running agent.
struct Agent {
    datapath: Datapath,
    pipeline: Pipeline,
    schedule: Schedule,
    source_events: Option<UnboundedReceiver<SourceEvent>>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// The parents of pods' missing cgroups, and what it reports.
    cgroup_watch: Option<CgroupWatch>,
    cgroup_created: UnboundedReceiver<()>,
    /// The mesh CA's directory (none without `--mesh-ca`).
    ca_watch: Option<CaWatch>,
    kernel_logs: KernelLogs,
    telemetry: TelemetryLoop,
    stats: Stats,
    admin: Admin,
    /// The node's workload certificates.
    mesh: Mesh,
    /// What `weft status` says of the agent (its programs once attached).
    agent_info: Arc<std::sync::RwLock<AgentInfo>>,
    timers: Timers,
    /// The successor lock, held from the start until this agent's listeners are up (see
    /// [`handoff`]); with when it goes regardless.
    successor: Option<(SuccessorLock, Instant)>,
    /// The instance is this agent's while it holds this (dropped last).
    instance_lock: InstanceLock,
    /// This agent's cgroup among the instance's agents' (left when it exits).
    agent_cgroups: datapath::AgentCgroups,
}

/// What a handover keeps of the agent.
type Handover = (Datapath, Admin, Mesh, InstanceLock, datapath::AgentCgroups);

/// Why the run loop ended.
enum Exit {
    Stop,
    /// A successor waits: the drain ends at the deadline (set once SIGTERM came).
    HandOver(Option<Instant>),
}

impl Agent {
    /// Starts every subsystem in order: the datapath, the source and the pipeline (with its
    /// first pass), telemetry, stats, and last the admin API.
    async fn start(config: &Config, signals: &mut Signals) -> Result<Option<Self>, Error> {
        let cgroup_root = check_node(config)?;
        let Some((instance_lock, successor, took_over)) = lock_instance(config, signals).await?
        else {
            return Ok(None);
        };
        let Loading {
            mut datapath,
            fallback,
            globals,
            own_cgroup,
        } = start_datapath(config, &cgroup_root, &instance_lock)?;
        let agent_cgroups = datapath::AgentCgroups::join(&mut datapath, own_cgroup)?;
        let mut registry = metrics::registry();
        let weft = metrics::weft(&mut registry);
        let maps = MapMetrics::new(weft);
        let (source, source_events, watcher, source_health) =
            start_source(config, &cgroup_root, weft).await?;
        let (mut pipeline, schedule) = start_pipeline(
            config,
            &mut datapath,
            source,
            &cgroup_root,
            PipelineMetrics::new(weft, maps.clone()),
        )?;
        let views = pipeline.views();
        // Where the pinned programs capture for this agent's proxy, it serves before its own
        // programs are verified (a restart after a kill). Not when another agent still
        // serves (it goes on until this one's programs are attached) or the maps move (the
        // programs in place record origins in the others).
        let early = !took_over && !datapath.migrating();
        // Before the CA's first read: a change from then on is seen.
        let ca_watch = watch_ca(config);
        let mut mesh = start_mesh(config, weft, &mut datapath, early.then_some(&views))?;
        let mut telemetry = TelemetryLoop::new(config, &mut datapath, weft, &views)?;
        telemetry.mesh = mesh.telemetry();
        let stats = Stats::new(&mut datapath, &cgroup_root, maps, weft)?;
        verify(&mut datapath, fallback, globals).await?;
        let kernel_logs = KernelLogs::new(datapath.ebpf_mut()?)?;
        commit_when_synced(&mut datapath, &mut pipeline)?;
        if !early {
            on_pass(&mut mesh, &views, datapath.cgroup());
        }
        let mut state = admin_state(
            config,
            &datapath,
            registry,
            &views,
            &telemetry,
            source_health,
        );
        state.mesh = mesh.status();
        let socket = config.admin_socket();
        let agent_info = Arc::clone(&state.info);
        let admin = Admin::spawn(&config.admin, &socket, state).await?;
        log_ready(&datapath, &socket, &admin, &pipeline);
        let (cgroup_watch, cgroup_created) = watch_new_cgroups();
        let mut agent = Self {
            kernel_logs,
            datapath,
            pipeline,
            schedule,
            source_events,
            _watcher: watcher,
            cgroup_watch,
            cgroup_created,
            ca_watch,
            telemetry,
            stats,
            admin,
            mesh,
            agent_info,
            timers: Timers::new(config).await,
            successor,
            instance_lock,
            agent_cgroups,
        };
        agent.watch_cgroups();
        Ok(Some(agent))
    }

    /// Handles events until a signal (or a failed admin server) stops the agent.
    async fn run(mut self, mut signals: Signals) -> Result<(), Error> {
        let mut terminating: Option<Instant> = None;
        let exit = loop {
            let due = self.schedule.due();
            let renewal = self.mesh.next_due();
            tokio::select! {
                ready = self.telemetry.reader.ready(&mut self.telemetry.poll) => {
                    ready?;
                    self.telemetry.drain();
                }
                () = self.kernel_logs.readable() => self.kernel_logs.flush(),
                Some(event) = recv(&mut self.source_events) => self.on_source_event(event),
                () = sleep_until(due), if due.is_some() => self.pass(false)?,
                _ = self.timers.resync.tick() => {
                    self.mesh.reload_ca(SystemTime::now());
                    self.pass(true)?;
                }
                () = ca_watch::changed(&mut self.ca_watch) => {
                    self.mesh.reload_ca(SystemTime::now());
                }
                () = self.mesh.listeners_changed() => self.mesh.republish(),
                () = sleep_until_wall(renewal), if renewal.is_some() => {
                    self.mesh.renew(SystemTime::now());
                    // Pods waiting for a process in their namespace are looked at again.
                    on_pass(&mut self.mesh, &self.pipeline.views(), self.datapath.cgroup());
                }
                _ = self.timers.gc.tick() => self.bind_new_cgroups()?,
                Some(()) = self.cgroup_created.recv() => {
                    // One look covers every creation reported so far.
                    while self.cgroup_created.try_recv().is_ok() {}
                    self.bind_new_cgroups()?;
                }
                _ = self.timers.stats.tick() => self.stats.tick(self.telemetry.reader.stats())?,
                _ = self.timers.telemetry.tick() => self.telemetry.tick(),
                Some(batch) = self.telemetry.udp_rx.recv() => self.telemetry.apply_udp(batch),
                e = self.admin.stopped() => return Err(e.into()),
                _ = self.timers.handoff.tick() => {
                    if let Some(exit) = self.look_for_successor(terminating) {
                        break exit;
                    }
                }
                () = signals.recv() => {
                    if terminating.is_some() {
                        break Exit::Stop;
                    }
                    let deadline = Instant::now() + self.mesh.drain_timeout();
                    terminating = Some(deadline);
                    if let Some(exit) = self.look_for_successor(terminating) {
                        break exit;
                    }
                    tracing::info!(
                        connections = self.mesh.active(),
                        "stopping once the meshed connections in progress end (or at --drain-timeout); new ones are served meanwhile"
                    );
                }
            }
        };
        self.telemetry.finish_udp().await;
        match exit {
            Exit::Stop => self.stop(),
            Exit::HandOver(deadline) => self.hand_over(signals, deadline).await,
        }
    }

    /// A successor's lock, released once this agent (as a successor) listens; then whether
    /// to hand over to a successor of this agent, or, after SIGTERM (`terminating`: the
    /// drain's deadline), to stop because nothing is carried any more or the time is up.
    fn look_for_successor(&mut self, terminating: Option<Instant>) -> Option<Exit> {
        if let Some((_, settle_by)) = &self.successor {
            // The programs are this agent's (first full sync) and every meshed pod of the
            // node has its listeners.
            let settled = !self.datapath.pending() && self.mesh.settled();
            if settled || Instant::now() >= *settle_by {
                tracing::info!(
                    listening = settled,
                    "taken over: the agent replaced may close its mesh listeners"
                );
                self.successor = None;
            }
        }
        // While this agent holds the successor lock, it is its own, not a successor's.
        if self.successor.is_none() && self.datapath.pins().successor_waiting() {
            tracing::info!("a successor waits: handing the instance over");
            return Some(Exit::HandOver(terminating));
        }
        let deadline = terminating?;
        (self.mesh.active() == 0 || Instant::now() >= deadline).then_some(Exit::Stop)
    }

    /// Stops everything but the mesh proxy, releases the instance to the successor, and
    /// drains (see [`handoff::drain`]).
    async fn hand_over(
        mut self,
        mut signals: Signals,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        // What could not be read is lost to telemetry; the handover goes on.
        if let Err(e) = self.flush() {
            tracing::warn!(error = %crate::chain(&e), "cannot read the last statistics before handing over");
        }
        let (datapath, admin, mesh, instance_lock, mut agent_cgroups) = self.into_handover();
        // The admin socket and the metrics port are the successor's once the lock is.
        admin.shutdown().await;
        let pins = datapath.pins().clone();
        drop(datapath);
        drop(instance_lock);
        // The entry stays while this agent's connections drain (the successor's programs
        // read it), and goes with them.
        let drained = handoff::drain(mesh, &pins, &mut signals, deadline).await;
        agent_cgroups.leave();
        drained?;
        tracing::info!("agent stopping after handing over");
        Ok(())
    }

    /// What a handover keeps; the rest (the source, the pipeline, telemetry) stops here:
    /// the datapath is the successor's to change.
    fn into_handover(self) -> Handover {
        let Self {
            datapath,
            admin,
            mesh,
            instance_lock,
            agent_cgroups,
            ..
        } = self;
        (datapath, admin, mesh, instance_lock, agent_cgroups)
    }

    /// Reads what the kernel has left.
    fn flush(&mut self) -> Result<(), Error> {
        self.telemetry.drain();
        self.kernel_logs.flush();
        self.stats.tick(self.telemetry.reader.stats())?;
        Ok(())
    }

    /// Binds pods whose cgroup appeared (and collects the syncers' garbage), then watches
    /// where the still missing ones will appear.
    fn bind_new_cgroups(&mut self) -> Result<(), Error> {
        self.pipeline.collect_garbage();
        self.watch_cgroups();
        // A retried pass may be the first without errors.
        self.try_commit()
    }

    /// Watches the parents of the missing cgroups; a new watch is followed by a look, for
    /// what was created before it took effect.
    fn watch_cgroups(&mut self) {
        let Some(watch) = &mut self.cgroup_watch else {
            return;
        };
        let missing = self.pipeline.missing_cgroups();
        if watch.watch_parents_of(missing.iter().map(PathBuf::as_path)) {
            self.pipeline.collect_garbage();
        }
    }

    /// A change the source saw: schedules a pass.
    fn on_source_event(&mut self, event: SourceEvent) {
        let change = match event {
            SourceEvent::Complete(paths) => {
                self.pipeline.mark_complete(&paths);
                Change::Complete
            }
            SourceEvent::Changed => Change::Changed,
            SourceEvent::Api => Change::Api,
        };
        self.schedule.on_change(change, Instant::now());
    }

    /// One pass of the pipeline. A failed pass (the source directory vanished, a map read
    /// failed) keeps the state the kernel has; the next event or resync tries again. Fails
    /// only when the programs cannot be attached after the first full sync.
    fn pass(&mut self, force: bool) -> Result<(), Error> {
        let now = Instant::now();
        if !force {
            self.schedule.pass_started(now);
        }
        match self.pipeline.refresh(force) {
            Ok(true) => self.schedule.retry_unsettled(Instant::now()),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %crate::chain(&e), "cannot apply the source; the previous state stays in force");
            }
        }
        self.watch_cgroups();
        on_pass(
            &mut self.mesh,
            &self.pipeline.views(),
            self.datapath.cgroup(),
        );
        self.try_commit()
    }

    /// Attaches the programs once the state allows it (see [`commit_when_synced`]).
    fn try_commit(&mut self) -> Result<(), Error> {
        if commit_when_synced(&mut self.datapath, &mut self.pipeline)? {
            let mut info = self.agent_info.write().unwrap_or_else(|e| e.into_inner());
            info.programs = program_infos(self.datapath.links());
        }
        Ok(())
    }

    /// Reads what the kernel has left and says how to remove the datapath.
    fn stop(mut self) -> Result<(), Error> {
        self.flush()?;
        self.agent_cgroups.leave();
        let instance = self.datapath.pins().instance();
        tracing::info!(
            instance,
            "agent stopping; programs stay attached and pinned (remove them with `weft cleanup \
             --instance {instance}`)"
        );
        Ok(())
    }
}

/// The next event of an optional channel (never, without one).
async fn recv<T>(rx: &mut Option<UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until a wall-clock time (certificate times are wall-clock).
async fn sleep_until_wall(at: Option<SystemTime>) {
    if let Some(at) = at {
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
    }
}

/// The mesh follows the pass just published: its store and this node's pods.
fn on_pass(mesh: &mut Mesh, views: &pipeline::Views, cgroup_root: &Path) {
    let store = Arc::clone(&views.store.read().unwrap_or_else(|e| e.into_inner()));
    let policy = views.policy.read().unwrap_or_else(|e| e.into_inner());
    let local: Vec<LocalPod<'_>> = policy
        .endpoints
        .iter()
        .map(|e| LocalPod {
            pod: &e.pod,
            ips: &e.ips,
            cgroup: cgroup_root.join(&e.cgroup),
            cgroup_id: e.cgroup_id,
        })
        .collect();
    mesh.set_node_ips(&policy.node_ips);
    mesh.on_pass(&store, &local, SystemTime::now());
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(at) = due {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// What the admin API reads: facts about the agent and handles on what the subsystems publish.
fn program_infos(links: &[datapath::InstalledLink]) -> Vec<ProgramInfo> {
    links
        .iter()
        .map(|l| ProgramInfo {
            program: l.program.to_owned(),
            install: format!("{:?}", l.install),
            link_id: l.link_id,
            program_id: l.program_id,
        })
        .collect()
}

fn admin_state(
    config: &Config,
    datapath: &Datapath,
    registry: Registry,
    views: &pipeline::Views,
    telemetry: &TelemetryLoop,
    source_health: Option<Arc<source::kube::Health>>,
) -> AdminState {
    let info = AgentInfo {
        instance: config.datapath.instance.name.clone(),
        node_name: config.source.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        cgroup: datapath.cgroup().to_owned(),
        pins: datapath.pins().dir().to_owned(),
        programs: program_infos(datapath.links()),
    };
    AdminState {
        info: Arc::new(std::sync::RwLock::new(info)),
        services: Arc::clone(&views.status),
        policy: Arc::clone(&views.policy),
        registry: Arc::new(registry),
        pins: datapath.pins().clone(),
        telemetry: telemetry.telemetry.view(),
        metrics_addr: None,
        store: Arc::clone(&views.store),
        source_health,
        telemetry_settings: config.telemetry.summary(&config.pipeline.names),
        service_settings: config.pipeline.service_settings(),
        mesh: Arc::default(),
    }
}
