//! Loading weft's kernel object, attaching (or adopting) its programs, and removing them.
//!
//! Every map is pinned under the instance directory, so a restarted agent finds the same maps
//! and the kernel keeps counting while no agent runs. Every program is attached through a
//! pinned cgroup link, so it stays attached after the agent exits or is killed. On start the
//! agent adopts a pinned link whose program is the one it embeds, replaces the program in place
//! (BPF_LINK_UPDATE, atomic) when it differs, and attaches only where there is no link. All
//! of that happens after the first full sync has filled the maps ([`Datapath::commit`]): a
//! new instance judges every pod by its policy from the first packet, and a restarted one
//! keeps the previous programs until then.
mod admin;
mod config;
mod level;
pub mod metrics;
mod pins;
mod sys;

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        SkMsg, SockOps,
        links::{FdLink, LinkError},
    },
};
use weft_abi::{globals, maps, programs};

use self::{admin::remove_link, config::MapSpec};
pub use self::{
    admin::{Attached, CleanupReport, MapUsage, attached_programs, cleanup, map_memory, map_usage},
    config::{Capacities, Config, Globals, Instance, Settings, Unbound, map_flag},
    pins::{InstanceLock, Pins, SuccessorLock},
};
use crate::cgroup;

/// This agent's entry in `AGENT_CGROUPS`: its sockets are no pod's for the programs of the
/// instance's other agents too (the one it replaces, a successor). Added before the mesh
/// listens, removed when the agent exits ([`AgentCgroups::leave`]); a killed agent's entry
/// ages out of the LRU map (cgroup ids are not reused).
#[derive(Debug)]
pub struct AgentCgroups {
    map: aya::maps::HashMap<MapData, u64, u32>,
    own: Option<u64>,
}

impl AgentCgroups {
    /// Adds `own` (the agent's cgroup id, when it has one below the root) to the map.
    pub fn join(datapath: &mut Datapath, own: Option<u64>) -> Result<Self, Error> {
        let name = maps::AGENT_CGROUPS;
        let mut map: aya::maps::HashMap<MapData, u64, u32> = datapath.take(name)?;
        if let Some(id) = own {
            map.insert(id, 1, 0)
                .map_err(|source| Error::JoinAgents { name, source })?;
        }
        Ok(Self { map, own })
    }

    /// Removes this agent's entry.
    pub fn leave(&mut self) {
        if let Some(id) = self.own.take() {
            let _ = self.map.remove(&id);
        }
    }
}

/// The instance's pins, checked, with the instance directory made (for its locks).
pub fn instance_pins(instance: &Instance) -> Result<Pins, Error> {
    let pins = Pins::new(&instance.bpffs, &instance.name)?;
    pins.create_instance_dir()?;
    Ok(pins)
}

/// The kernel object, built by `cargo xtask build-ebpf` and embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJECT"));

/// How a program is loaded and attached.
#[derive(Debug, Clone, Copy)]
enum Kind {
    SockOps,
    Skb(CgroupSkbAttachType),
    SockAddr,
    Sock,
}

/// One program weft attaches to the workload cgroup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attachment {
    pub program: &'static str,
    /// `enum bpf_attach_type`.
    pub attach_type: u32,
    /// How operators name the hook.
    pub label: &'static str,
    kind: Kind,
}

const fn attachment(
    program: &'static str,
    attach_type: u32,
    label: &'static str,
    kind: Kind,
) -> Attachment {
    Attachment {
        program,
        attach_type,
        label,
        kind,
    }
}

/// Every program weft attaches, in attach order (attach types from enum bpf_attach_type).
pub(crate) const ATTACHMENTS: [Attachment; 12] = [
    attachment(programs::SOCKOPS, 3, "sock_ops", Kind::SockOps),
    attachment(
        programs::SKB_INGRESS,
        0,
        "cgroup_skb/ingress",
        Kind::Skb(CgroupSkbAttachType::Ingress),
    ),
    attachment(
        programs::SKB_EGRESS,
        1,
        "cgroup_skb/egress",
        Kind::Skb(CgroupSkbAttachType::Egress),
    ),
    attachment(programs::CONNECT4, 10, "connect4", Kind::SockAddr),
    attachment(programs::CONNECT6, 11, "connect6", Kind::SockAddr),
    attachment(programs::SENDMSG4, 14, "sendmsg4", Kind::SockAddr),
    attachment(programs::SENDMSG6, 15, "sendmsg6", Kind::SockAddr),
    attachment(programs::RECVMSG4, 19, "recvmsg4", Kind::SockAddr),
    attachment(programs::RECVMSG6, 20, "recvmsg6", Kind::SockAddr),
    attachment(programs::GETPEERNAME4, 29, "getpeername4", Kind::SockAddr),
    attachment(programs::GETPEERNAME6, 30, "getpeername6", Kind::SockAddr),
    attachment(programs::SOCK_RELEASE, 34, "sock_release", Kind::Sock),
];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error("invalid --instance {instance:?}: use 1 to 64 characters of [A-Za-z0-9._-]")]
    InvalidInstance { instance: String },
    #[error(
        "{path} is not a bpffs mount; mount it with `mount -t bpf bpf {path}` \
         (`cargo xtask setup` does it)",
        path = path.display()
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "instance {instance:?} is in use by another weft process (lock on {dir} is held); \
         stop it first or choose another --instance",
        dir = dir.display()
    )]
    InstanceBusy { instance: String, dir: PathBuf },
    #[error("cannot use pin {path}", path = path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open cgroup {path}", path = path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the kernel object")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error(
        "pinned map {path} does not match this agent: it has {found}, this agent needs \
         {expected}; run `weft cleanup --instance {instance}` to start the instance afresh, \
         or start with the settings it was created with",
        path = path.display()
    )]
    MapMismatch {
        instance: String,
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot inspect map {name}")]
    MapInfo {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the kernel object has no {kind} named {name}: the agent and its object disagree")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the programs are not loaded (their load did not finish)")]
    Verifying,
    #[error("cannot load program {name} (the verifier log, if any, is in the cause)")]
    LoadProgram {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach program {name} to cgroup {cgroup}", cgroup = cgroup.display())]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: AttachError,
    },
    #[error("cannot pin link of {name}")]
    PinLink {
        name: &'static str,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot {op} link {path}", path = path.display())]
    LinkSyscall {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned link {path} is attached to cgroup id {found} (attach type {found_type}), but this \
         agent was asked for {cgroup} (cgroup id {expected}, attach type {expected_type}); use \
         another --instance or run `weft cleanup --instance {instance}` first",
        path = path.display(),
        cgroup = cgroup.display()
    )]
    LinkMismatch {
        instance: String,
        path: PathBuf,
        cgroup: PathBuf,
        found: u64,
        expected: u64,
        found_type: u32,
        expected_type: u32,
    },
    #[error(
        "cannot tell the cgroup level of {path}: none of its ancestors in this view is an \
         ancestor of the agent's own cgroup",
        path = path.display()
    )]
    CgroupLevel { path: PathBuf },
    #[error("cannot read the cookie of the node's network namespace {path}", path = path.display())]
    HostNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach program {name} to map {map} (--sockmap)")]
    AttachSockmap {
        name: &'static str,
        map: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cannot write this agent's cgroup into {name}")]
    JoinAgents {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open map {name}")]
    TakeMap {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Why attaching one program failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// What the agent did with a program's link at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// There was no link: the program was attached and the link pinned.
    Attached,
    /// A pinned link ran the same program: kept, with this agent's copy swapped in (same
    /// code, this agent's load-time globals).
    Adopted,
    /// A pinned link ran another version of the program: replaced in place.
    Replaced { old_program_id: u32 },
}

/// One attached program.
#[derive(Debug)]
pub struct InstalledLink {
    pub program: &'static str,
    pub install: Install,
    pub link_id: u32,
    pub program_id: u32,
    /// The program the link ran before this agent's (adopted or replaced links), held open
    /// until the commit is done so that a failed one can put it back.
    previous: Option<std::os::fd::OwnedFd>,
}

/// The loaded object with its programs attached; maps are taken from it by the readers.
#[derive(Debug)]
pub struct Datapath {
    pins: Pins,
    cgroup: PathBuf,
    cgroup_file: File,
    cgroup_id: u64,
    /// None only while [`Datapath::verify`] runs.
    ebpf: Option<Ebpf>,
    /// Every program loaded (verified).
    verified: bool,
    specs: Vec<MapSpec>,
    links: Vec<InstalledLink>,
    /// The programs are loaded but not attached yet (see [`Datapath::commit`]).
    pending: bool,
    /// Maps directories of another version or shape, removed once the links are switched.
    superseded: Vec<PathBuf>,
    migration_noted: bool,
    /// `--sockmap`: attach `weft_sk_msg` to `SOCK_PAIRS` at the commit (once).
    sockmap: bool,
    sockmap_attached: bool,
}

impl Datapath {
    /// Loads the object and checks or creates the pinned maps; the programs are loaded by
    /// [`Datapath::verify`], and attaching them (or adopting the pinned links) waits for
    /// [`Datapath::commit`].
    /// The caller holds the instance's lock for as long as the datapath is in use.
    pub fn start(config: &Config, _owner: &InstanceLock) -> Result<Self, Error> {
        let cgroup_id = cgroup::cgroup_id(&config.cgroup)?;
        let cgroup_file = File::open(&config.cgroup).map_err(|source| Error::OpenCgroup {
            path: config.cgroup.clone(),
            source,
        })?;
        let specs = config::map_specs(&config.capacities);
        let pins = Pins::new(&config.instance.bpffs, &config.instance.name)?
            .versioned(weft_abi::ABI_VERSION, config::fingerprint(&specs));
        pins.create_instance_dir()?;
        let others = announce_migration(&pins)?;
        pins.create_dirs()?;
        carry_over(&pins, &others, &specs);

        let ebpf = load_object(&pins, &specs, &config.globals)?;
        check_maps(&pins, &specs)?;
        // Nothing changes in the kernel before `commit`, after the first full sync: a fresh
        // instance's programs attached to empty maps would take every pod for one not bound
        // yet, and pinned links keep running the previous agent's programs (with the rules
        // and the settings the maps were filled under) until this agent's are in the maps.
        Ok(Self {
            pins,
            cgroup: config.cgroup.clone(),
            cgroup_file,
            cgroup_id,
            ebpf: Some(ebpf),
            verified: false,
            specs,
            links: Vec::new(),
            pending: true,
            superseded: others,
            migration_noted: false,
            sockmap: config.globals.sockmap_enabled != 0,
            sockmap_attached: false,
        })
    }

    /// Loads every program, off the async runtime: the kernel's verifier takes a second or
    /// more, while the agent's other tasks (the mesh proxy) go on. When a program does not
    /// load and `fallback` is given, the object is loaded again with those globals and its
    /// programs instead. Returns whether the fallback was taken.
    pub async fn verify(&mut self, fallback: Option<Globals>) -> Result<bool, Error> {
        if self.verified {
            return Ok(false);
        }
        let mut ebpf = self.ebpf.take().ok_or(Error::Verifying)?;
        let (pins, specs) = (self.pins.clone(), self.specs.clone());
        let loaded = tokio::task::spawn_blocking(move || match load_all(&mut ebpf) {
            Ok(()) => Ok((ebpf, false)),
            // Only what the fallback changes: the cgroup_skb programs' isolation of pods not
            // bound yet (a helper of Linux 6.15). Any other failure stays one.
            Err(Error::LoadProgram { name, source }) => {
                let skb = ATTACHMENTS
                    .iter()
                    .any(|a| a.program == name && matches!(a.kind, Kind::Skb(_)));
                let Some(globals) = fallback.filter(|_| skb) else {
                    return Err(Error::LoadProgram { name, source });
                };
                tracing::warn!(program = name, error = %crate::chain(&source), "a program does not load; loading the object again with the fallback settings");
                let mut ebpf = load_object(&pins, &specs, &globals)?;
                load_all(&mut ebpf)?;
                Ok((ebpf, true))
            }
            Err(e) => Err(e),
        })
        .await
        .map_err(|_| Error::Verifying)?;
        let (ebpf, fell_back) = loaded?;
        self.ebpf = Some(ebpf);
        self.verified = true;
        Ok(fell_back)
    }

    fn object(&mut self) -> Result<&mut Ebpf, Error> {
        self.ebpf.as_mut().ok_or(Error::Verifying)
    }

    /// Whether this agent moves off maps of another version or shape at its commit.
    pub fn migrating(&self) -> bool {
        !self.superseded.is_empty()
    }

    /// True the first time it is called: the caller says once that the move waits.
    pub fn note_migration_waits(&mut self) -> bool {
        !std::mem::replace(&mut self.migration_noted, true)
    }

    /// Whether the programs still wait for [`Datapath::commit`].
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Attaches (or adopts) every program; once, after the first full sync. On failure
    /// nothing this call attached stays attached.
    pub fn commit(&mut self) -> Result<&[InstalledLink], Error> {
        if !self.pending {
            return Ok(&self.links);
        }
        if !self.verified {
            return Err(Error::Verifying);
        }
        let ebpf = self.ebpf.as_mut().ok_or(Error::Verifying)?;
        let ctx = AttachCtx {
            pins: &self.pins,
            cgroup: &self.cgroup,
            cgroup_id: self.cgroup_id,
        };
        // Before the links, which pair sockets that need it; a failure here stops the commit
        // before any link changes. (Once attached, this program stays the map's even if the
        // links fail next: it reads the same maps as the previous one.)
        if self.sockmap && !self.sockmap_attached {
            attach_sockmap(ebpf, &self.pins)?;
            self.sockmap_attached = true;
        }
        let mut links = Vec::new();
        if let Err(e) = install_all(ebpf, &ctx, &self.cgroup_file, &mut links) {
            // Leave no half-installed instance: undo what this commit did, so every hook runs
            // what it ran before (programs of the maps they were filled for).
            for link in &links {
                let path = self.pins.link(link.program);
                let undone = match &link.previous {
                    None => remove_link(&path).map_err(|e| crate::chain(&e)),
                    Some(prog) => restore_program(&path, prog).map_err(|e| e.to_string()),
                };
                if let Err(undo) = undone {
                    tracing::warn!(path = %path.display(), error = undo, "cannot undo the link's change");
                }
            }
            return Err(e);
        }
        // The previous programs may go now.
        for link in &mut links {
            link.previous = None;
        }
        self.links = links;
        self.pending = false;
        remove_retired_links(&self.pins);
        // No program reads the other maps directories now: their maps go with their pins.
        // (A socket map's sockets stay paired until they close: each keeps the program it
        // was paired with, which holds the map.)
        for dir in std::mem::take(&mut self.superseded) {
            match admin::remove_maps_dir(&dir) {
                Ok(n) => {
                    tracing::info!(dir = %dir.display(), maps = n, "maps of another version or shape removed")
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %crate::chain(&e), "cannot remove maps of another version or shape")
                }
            }
        }
        Ok(&self.links)
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn links(&self) -> &[InstalledLink] {
        &self.links
    }

    /// A map of the loaded object, typed by what it holds (each can be taken once).
    pub fn take<T>(&mut self, name: &'static str) -> Result<T, Error>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        let map = self
            .object()?
            .take_map(name)
            .ok_or(Error::Missing { kind: "map", name })?;
        T::try_from(map).map_err(|source| Error::TakeMap { name, source })
    }

    /// A second handle on a pinned map of this instance (for readers beside its owner).
    pub fn open_pinned<T>(&self, name: &'static str) -> Result<T, Error>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        open_pinned(self.pins(), name).map_err(|source| Error::TakeMap { name, source })
    }

    /// The loaded object, for what takes its own maps (aya-log's `AYA_LOGS`).
    pub fn ebpf_mut(&mut self) -> Result<&mut Ebpf, Error> {
        self.object()
    }
}

/// Puts `prog` back into the pinned link at `path`.
fn restore_program(path: &Path, prog: &std::os::fd::OwnedFd) -> io::Result<()> {
    let link = sys::obj_get(path)?;
    sys::link_update(link.as_fd(), prog.as_fd())
}

/// Attaches `weft_sk_msg` to the pinned `SOCK_PAIRS` map. The attachment belongs to the map,
/// not to this process: it stays while the map is pinned, as the cgroup links do (the
/// handle is forgotten, since dropping it would detach the program). Sockets already paired
/// keep the program they were paired with until they close.
fn attach_sockmap(ebpf: &mut Ebpf, pins: &Pins) -> Result<(), Error> {
    let map: aya::maps::SockHash<MapData, weft_abi::conn::PairKey> =
        open_pinned(pins, maps::SOCK_PAIRS).map_err(|source| Error::TakeMap {
            name: maps::SOCK_PAIRS,
            source,
        })?;
    let failed = |source| Error::AttachSockmap {
        name: programs::SK_MSG,
        map: maps::SOCK_PAIRS,
        source,
    };
    let prog = program::<SkMsg>(ebpf, programs::SK_MSG)?;
    let id = prog.attach(map.fd()).map_err(failed)?;
    let link = prog.take_link(id).map_err(failed)?;
    std::mem::forget(link);
    Ok(())
}

/// Loads every program (the verifier runs here, before anything is attached).
/// The object with its maps pinned under `pins` and `globals` set; its programs are not
/// loaded yet ([`Datapath::verify`]).
fn load_object(pins: &Pins, specs: &[MapSpec], g: &Globals) -> Result<Ebpf, Error> {
    let map_paths: Vec<(&'static str, PathBuf)> =
        maps::ALL.iter().map(|m| (*m, pins.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    for spec in specs {
        loader.map_max_entries(spec.name, spec.max_entries);
    }
    loader
        .override_global("AYA_LOG_LEVEL", &g.kernel_log_level, true)
        .override_global(
            globals::CONN_EVENTS_WAKEUP_BYTES,
            &g.events_wakeup_bytes,
            true,
        )
        .override_global(globals::POLICY_ROOT_LEVEL, &g.cgroup_level, true)
        .override_global(
            globals::CONN_UPDATE_INTERVAL_NS,
            &g.conn_update_interval_ns,
            true,
        )
        .override_global(globals::CONN_EVENTS_ENABLED, &g.conn_events_enabled, true)
        .override_global(globals::UNBOUND_ISOLATED, &g.unbound_isolated, true)
        .override_global(globals::UNBOUND_SCOPE_LEVEL, &g.unbound_scope_level, true)
        .override_global(globals::UNBOUND_SCOPE_ID, &g.unbound_scope_id, true)
        .override_global(globals::HOST_NETNS_COOKIE, &g.host_netns_cookie, true)
        .override_global(globals::SOCK_STATES, &g.sock_states, true)
        .override_global(globals::SOCK_STATES_PER_POD, &g.sock_states_per_pod, true)
        .override_global(globals::SOCK_STATES_FLOOR, &g.sock_states_floor, true)
        .override_global(globals::SOCKMAP_ENABLED, &g.sockmap_enabled, true)
        .override_global(globals::AGENT_CGROUP_LEVEL, &g.agent_cgroup_level, true)
        .override_global(globals::AGENT_CGROUP_ID, &g.agent_cgroup_id, true)
        .override_global(globals::KERNEL_HZ, &g.kernel_hz, true);
    loader.load(OBJECT).map_err(|source| Error::Load { source })
}

fn load_all(ebpf: &mut Ebpf) -> Result<(), Error> {
    program::<SkMsg>(ebpf, programs::SK_MSG)?
        .load()
        .map_err(|source| load_err(programs::SK_MSG, source))?;
    for a in &ATTACHMENTS {
        let name = a.program;
        let loaded = match a.kind {
            Kind::SockOps => program::<SockOps>(ebpf, name)?.load(),
            Kind::Skb(_) => program::<CgroupSkb>(ebpf, name)?.load(),
            Kind::SockAddr => program::<CgroupSockAddr>(ebpf, name)?.load(),
            Kind::Sock => program::<CgroupSock>(ebpf, name)?.load(),
        };
        loaded.map_err(|source| load_err(name, source))?;
    }
    Ok(())
}

fn install_all(
    ebpf: &mut Ebpf,
    ctx: &AttachCtx<'_>,
    cgroup_file: &File,
    links: &mut Vec<InstalledLink>,
) -> Result<(), Error> {
    // Cgroup links take no flags (the kernel rejects any with EINVAL) and always coexist with
    // other programs; `Single` is what passes 0.
    let mode = CgroupAttachMode::Single;
    for a in &ATTACHMENTS {
        let name = a.program;
        let link = match a.kind {
            Kind::SockOps => {
                ctx.install(name, a.attach_type, program::<SockOps>(ebpf, name)?, |p| {
                    let id = p.attach(cgroup_file, mode)?;
                    Ok(p.take_link(id)?.try_into()?)
                })?
            }
            Kind::Skb(kind) => ctx.install(
                name,
                a.attach_type,
                program::<CgroupSkb>(ebpf, name)?,
                |p| {
                    let id = p.attach(cgroup_file, kind, mode)?;
                    Ok(p.take_link(id)?.try_into()?)
                },
            )?,
            Kind::SockAddr => ctx.install(
                name,
                a.attach_type,
                program::<CgroupSockAddr>(ebpf, name)?,
                |p| {
                    let id = p.attach(cgroup_file, mode)?;
                    Ok(p.take_link(id)?.try_into()?)
                },
            )?,
            Kind::Sock => ctx.install(
                name,
                a.attach_type,
                program::<CgroupSock>(ebpf, name)?,
                |p| {
                    let id = p.attach(cgroup_file, mode)?;
                    Ok(p.take_link(id)?.try_into()?)
                },
            )?,
        };
        links.push(link);
    }
    Ok(())
}

/// Links pinned by an earlier version for programs this one no longer has: detached once this
/// agent's programs run, so nothing keeps running on maps no program of this version fills.
fn remove_retired_links(pins: &Pins) {
    let Ok(entries) = std::fs::read_dir(pins.links_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if ATTACHMENTS.iter().any(|a| a.program == name) {
            continue;
        }
        match remove_link(&entry.path()) {
            Ok(()) => tracing::info!(link = name, "link of a retired program removed"),
            Err(e) => {
                tracing::warn!(link = name, error = %crate::chain(&e), "cannot remove the link of a retired program")
            }
        }
    }
}

/// A handle on a pinned map of an instance, typed by what it holds.
pub fn open_pinned<T>(pins: &Pins, name: &str) -> Result<T, MapError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = MapData::from_pin(pins.map(name)).and_then(aya::maps::Map::from_map_data)?;
    T::try_from(map)
}

/// The absolute cgroup level of `cgroup` (what the kernel's ancestor lookups count), right
/// under a cgroup namespace too.
/// The absolute level of the attach cgroup, and the agent's own cgroup (level, id) when it
/// is below it.
pub fn cgroup_level(
    cgroup: &Path,
    capacities: &Capacities,
) -> Result<(u32, Option<(u32, u64)>), Error> {
    level::cgroup_level(cgroup, &config::map_specs(capacities))
}

/// The cookie of the node's network namespace (`--host-netns`, else the agent's own).
pub fn host_netns_cookie(path: Option<&Path>) -> Result<u64, Error> {
    sys::netns_cookie(path).map_err(|source| Error::HostNetns {
        path: path.map_or_else(|| PathBuf::from("/proc/self/ns/net"), Path::to_owned),
        source,
    })
}

/// The kernel's tick rate, which a SYN's first retransmission timeout is counted in (None:
/// unknown; connect timeouts then start from the kernel's own first timeout, 1 s).
pub fn kernel_hz(host_proc: &Path) -> Option<u32> {
    sys::kernel_hz(host_proc)
}

/// The cookie of the calling thread's network namespace.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    sys::netns_cookie(None)
}

/// Whether `path` is a bpffs mount.
pub fn check_bpffs(path: &Path) -> Result<(), Error> {
    pins::check_bpffs(path)
}

/// Why a program did not load: (error, the verifier's log if it gave one).
pub type LoadFailure = (String, String);

/// Loads every program of the embedded object into the kernel and drops it again (nothing is
/// attached or pinned): (program, hook, outcome).
pub fn load_each_program() -> Vec<(&'static str, &'static str, Result<(), LoadFailure>)> {
    let mut ebpf = match EbpfLoader::new().load(OBJECT) {
        Ok(e) => e,
        Err(e) => {
            let error = crate::chain(&e);
            return ATTACHMENTS
                .iter()
                .map(|a| (a.program, a.label))
                .chain([(programs::SK_MSG, "sk_msg (--sockmap)")])
                .map(|(program, label)| (program, label, Err((error.clone(), String::new()))))
                .collect();
        }
    };
    let failed = |e: ProgramError| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => (io_error.to_string(), format!("{verifier_log}")),
        other => (crate::chain(&other), String::new()),
    };
    let sk_msg = program::<SkMsg>(&mut ebpf, programs::SK_MSG)
        .map_err(|e| (crate::chain(&e), String::new()))
        .and_then(|p| p.load().map_err(failed));
    let mut outcomes: Vec<_> = ATTACHMENTS
        .iter()
        .map(|a| {
            let name = a.program;
            let result = match a.kind {
                Kind::SockOps => program::<SockOps>(&mut ebpf, name)
                    .map_err(|e| (crate::chain(&e), String::new()))
                    .and_then(|p| p.load().map_err(failed)),
                Kind::Skb(_) => program::<CgroupSkb>(&mut ebpf, name)
                    .map_err(|e| (crate::chain(&e), String::new()))
                    .and_then(|p| p.load().map_err(failed)),
                Kind::SockAddr => program::<CgroupSockAddr>(&mut ebpf, name)
                    .map_err(|e| (crate::chain(&e), String::new()))
                    .and_then(|p| p.load().map_err(failed)),
                Kind::Sock => program::<CgroupSock>(&mut ebpf, name)
                    .map_err(|e| (crate::chain(&e), String::new()))
                    .and_then(|p| p.load().map_err(failed)),
            };
            (name, a.label, result)
        })
        .collect();
    outcomes.push((programs::SK_MSG, "sk_msg (--sockmap)", sk_msg));
    outcomes
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(|source| load_err(name, source))
}

fn load_err(name: &'static str, source: ProgramError) -> Error {
    Error::LoadProgram { name, source }
}

/// The maps directories other than this agent's, announced: the programs still running on
/// them keep doing so until this agent's maps hold its first full sync.
fn announce_migration(pins: &Pins) -> Result<Vec<PathBuf>, Error> {
    let ours = pins.maps_dir();
    let others: Vec<PathBuf> = pins
        .all_maps_dirs()?
        .into_iter()
        .filter(|d| *d != ours)
        .collect();
    if !others.is_empty() {
        tracing::warn!(
            found = ?others,
            ours = %ours.display(),
            "pinned maps of another version or shape: new maps are filled first, then the programs switch to them in place; connection state (tracked connections, affinity, socket translations) starts afresh"
        );
    }
    Ok(others)
}

/// Maps of the same ABI version and the same shape in another directory (a capacity change
/// moved the others) are pinned into this agent's too: they keep their state (flows allowed
/// for replies, socket translations, tracked connections) and the programs of both sides
/// share them while the links switch. A map that cannot be taken over starts afresh.
fn carry_over(pins: &Pins, others: &[PathBuf], specs: &[MapSpec]) {
    let same_abi = format!("maps-v{}-", weft_abi::ABI_VERSION);
    let sources = others.iter().filter(|d| {
        d.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&same_abi))
    });
    for dir in sources {
        let keeps = |spec: &MapSpec| {
            let from = dir.join(spec.name);
            from.exists() && shape_of(&from, spec.name).ok() == Some(*spec)
        };
        // Connection state and the socket-to-socket pairs refer to one another (a paired
        // connection's close takes its REDIRECTED entry): kept together or not at all.
        let together = [maps::CONN_STATE, maps::SOCK_PAIRS, maps::REDIRECTED];
        let keep_together = specs
            .iter()
            .filter(|s| together.contains(&s.name))
            .all(keeps);
        for spec in specs {
            let (from, to) = (dir.join(spec.name), pins.map(spec.name));
            let grouped = together.contains(&spec.name);
            if to.exists() || !keeps(spec) || (grouped && !keep_together) {
                continue;
            }
            match sys::obj_get(&from).and_then(|fd| sys::obj_pin(fd.as_fd(), &to)) {
                Ok(()) => {
                    tracing::info!(map = spec.name, from = %from.display(), "map kept across the move")
                }
                Err(e) => {
                    tracing::warn!(map = spec.name, from = %from.display(), error = %e, "cannot keep map across the move; it starts afresh")
                }
            }
        }
    }
}

/// The shape of the map pinned at `path`.
fn shape_of(path: &Path, name: &'static str) -> Result<MapSpec, Error> {
    let info = MapInfo::from_pin(path).map_err(|source| Error::MapInfo { name, source })?;
    Ok(MapSpec {
        name,
        map_type: info
            .map_type()
            .map_err(|source| Error::MapInfo { name, source })?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

fn check_maps(pins: &Pins, specs: &[MapSpec]) -> Result<(), Error> {
    for &spec in specs {
        let path = pins.map(spec.name);
        let found = shape_of(&path, spec.name)?;
        if found != spec {
            return Err(Error::MapMismatch {
                instance: pins.instance().to_owned(),
                path,
                found: found.describe(),
                expected: spec.describe(),
            });
        }
    }
    Ok(())
}

struct AttachCtx<'a> {
    pins: &'a Pins,
    cgroup: &'a Path,
    cgroup_id: u64,
}

/// What a loaded program offers to `install`.
trait Attachable {
    fn program_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError>;
    fn program_info(&self) -> Result<aya::programs::ProgramInfo, ProgramError>;
}

macro_rules! attachable {
    ($($t:ty),*) => {$(
        impl Attachable for $t {
            fn program_fd(&self) -> Result<&aya::programs::ProgramFd, ProgramError> {
                self.fd()
            }
            fn program_info(&self) -> Result<aya::programs::ProgramInfo, ProgramError> {
                self.info()
            }
        }
    )*};
}
attachable!(SockOps, CgroupSkb, CgroupSock, CgroupSockAddr);

impl AttachCtx<'_> {
    fn install<P: Attachable>(
        &self,
        name: &'static str,
        attach_type: u32,
        prog: &mut P,
        attach: impl FnOnce(&mut P) -> Result<FdLink, AttachError>,
    ) -> Result<InstalledLink, Error> {
        let path = self.pins.link(name);
        let syscall_err = |op, source| Error::LinkSyscall {
            op,
            path: path.clone(),
            source,
        };
        let info = prog
            .program_info()
            .map_err(|source| load_err(name, source))?;
        let mut previous = None;
        let install = if path.exists() {
            let link = sys::obj_get(&path).map_err(|e| syscall_err("open", e))?;
            let current =
                sys::cgroup_link_info(link.as_fd()).map_err(|e| syscall_err("inspect", e))?;
            if current.cgroup_id != self.cgroup_id || current.attach_type != attach_type {
                return Err(Error::LinkMismatch {
                    instance: self.pins.instance().to_owned(),
                    path,
                    cgroup: self.cgroup.to_owned(),
                    found: current.cgroup_id,
                    expected: self.cgroup_id,
                    found_type: current.attach_type,
                    expected_type: attach_type,
                });
            }
            // Swap in the program this agent loaded even when it is the same code: its load-time
            // globals (kernel log level, wakeup threshold) are this agent's. The update is atomic
            // and the link, the attachment itself, stays.
            // The tag identifies the code; read it before the update frees the old program.
            let same_code = program_info(current.prog_id).map(|p| p.tag()) == Some(info.tag());
            let new_fd = prog.program_fd().map_err(|source| load_err(name, source))?;
            // Held: the update frees the old program, and a failed commit puts it back.
            let old = sys::prog_fd_by_id(current.prog_id).map_err(|e| syscall_err("hold", e))?;
            sys::link_update(link.as_fd(), new_fd.as_fd()).map_err(|e| syscall_err("update", e))?;
            previous = Some(old);
            if same_code {
                Install::Adopted
            } else {
                Install::Replaced {
                    old_program_id: current.prog_id,
                }
            }
        } else {
            let fd_link = attach(prog).map_err(|source| Error::Attach {
                name,
                cgroup: self.cgroup.to_owned(),
                source,
            })?;
            // Dropping the returned PinnedLink closes our descriptor; the pin keeps the link.
            drop(
                fd_link
                    .pin(&path)
                    .map_err(|source| Error::PinLink { name, source })?,
            );
            Install::Attached
        };
        let link = sys::obj_get(&path).map_err(|e| syscall_err("open", e))?;
        let now = sys::cgroup_link_info(link.as_fd()).map_err(|e| syscall_err("inspect", e))?;
        Ok(InstalledLink {
            program: name,
            install,
            link_id: now.link_id,
            program_id: now.prog_id,
            previous,
        })
    }
}

/// A loaded program by id (its tag hashes the instructions with map references masked, so
/// it identifies the code, not the load-time globals).
pub(crate) fn program_info(id: u32) -> Option<aya::programs::ProgramInfo> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
}
