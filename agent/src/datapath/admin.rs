//! Operations on an instance from outside a running agent: listing what is attached to a
//! cgroup, and removing everything an instance made.
use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use super::{ATTACHMENTS, Error, Pins, program_info, sys};

/// Detaches a pinned link now and removes its pin.
pub(super) fn remove_link(path: &Path) -> Result<(), Error> {
    let link = sys::obj_get(path).map_err(|source| Error::LinkSyscall {
        op: "open",
        path: path.to_owned(),
        source,
    })?;
    match sys::link_detach(link.as_fd()) {
        // ENOLINK: already defunct (its cgroup was removed); only the pin is left.
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
        Err(source) => {
            return Err(Error::LinkSyscall {
                op: "detach",
                path: path.to_owned(),
                source,
            });
        }
    }
    fs::remove_file(path).map_err(|source| Error::Pin {
        path: path.to_owned(),
        source,
    })
}

/// A program attached directly to a cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub attach_type: &'static str,
    pub program_id: u32,
    /// 0 when attached without a link.
    pub link_id: u32,
    pub program_name: String,
}

/// Every program attached directly to `cgroup` (by anyone) at the hooks weft uses.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<Attached>, Error> {
    let file = File::open(cgroup).map_err(|source| Error::OpenCgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (attach_type, label) in ATTACHMENTS.iter().map(|a| (a.attach_type, a.label)) {
        let ids =
            sys::query_cgroup(file.as_fd(), attach_type).map_err(|source| Error::LinkSyscall {
                op: "query programs of",
                path: cgroup.to_owned(),
                source,
            })?;
        for (program_id, link_id) in ids {
            // Cgroup queries do not report link ids on every kernel: find the link by program.
            let link_id = if link_id != 0 {
                link_id
            } else {
                aya::programs::loaded_links()
                    .filter_map(Result::ok)
                    .find(|l| l.program_id() == program_id)
                    .map_or(0, |l| l.id())
            };
            let program_name = program_info(program_id)
                .and_then(|p| p.name_as_str().map(str::to_owned))
                .unwrap_or_default();
            out.push(Attached {
                attach_type: label,
                program_id,
                link_id,
                program_name,
            });
        }
    }
    Ok(out)
}

/// What `cleanup` removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CleanupReport {
    pub links_detached: Vec<PathBuf>,
    pub maps_unpinned: Vec<PathBuf>,
    pub dirs_removed: Vec<PathBuf>,
}

/// Unpins every map of a maps directory and removes it; returns how many maps it held.
pub(super) fn remove_maps_dir(dir: &Path) -> Result<usize, Error> {
    let maps = list(dir)?;
    for path in &maps {
        fs::remove_file(path).map_err(|source| Error::Pin {
            path: path.clone(),
            source,
        })?;
    }
    fs::remove_dir(dir).map_err(|source| Error::Pin {
        path: dir.to_owned(),
        source,
    })?;
    Ok(maps.len())
}

/// Detaches every link of an instance and removes every pin and directory it made. Refuses
/// while an agent holds the instance. Removing nothing is not an error.
pub fn cleanup(bpffs: &Path, instance: &str) -> Result<CleanupReport, Error> {
    let pins = Pins::new(bpffs, instance)?;
    let mut report = CleanupReport::default();
    if !pins.dir().exists() {
        return Ok(report);
    }
    let _lock = pins.lock()?;
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Pin { path, source }
    };
    for path in list(&pins.links_dir())? {
        // Detached explicitly: another process may still hold a descriptor of the link.
        remove_link(&path)?;
        report.links_detached.push(path);
    }
    let maps_dirs = pins.all_maps_dirs()?;
    for dir in &maps_dirs {
        for path in list(dir)? {
            fs::remove_file(&path).map_err(pin_err(&path))?;
            report.maps_unpinned.push(path);
        }
    }
    let dirs = [pins.links_dir(), pins.successor_path()]
        .into_iter()
        .chain(maps_dirs)
        .chain([pins.dir().to_owned()]);
    for dir in dirs {
        match fs::remove_dir(&dir) {
            Ok(()) => report.dirs_removed.push(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Pin { path: dir, source }),
        }
    }
    // The shared parent goes only when no other instance is left in it.
    if let Some(parent) = pins.dir().parent()
        && fs::remove_dir(parent).is_ok()
    {
        report.dirs_removed.push(parent.to_owned());
    }
    Ok(report)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths = entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| Error::Pin {
                    path: dir.to_owned(),
                    source,
                })?;
            paths.sort();
            Ok(paths)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Pin {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// One pinned map of an instance, as `weft maps` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MapUsage {
    pub name: String,
    pub map_type: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// Keys present, for maps that hold keys (hash, LRU, LPM trie); arrays and ring buffers
    /// have none to count.
    pub entries: Option<u64>,
    /// `entries / max_entries`.
    pub fill_ratio: Option<f64>,
    /// Kernel memory the map holds (fdinfo `memlock`).
    #[serde(default)]
    pub bytes: u64,
}

/// The kernel memory of every map of `weft_abi::maps::ALL` under the instance's pins (no key
/// is walked: cheap enough for every `weft status`).
pub fn map_memory(pins: &Pins) -> Result<Vec<(&'static str, u64)>, Error> {
    use aya::maps::MapInfo;
    weft_abi::maps::ALL
        .iter()
        .map(|&name| {
            let fd = MapInfo::from_pin(pins.map(name))
                .and_then(|info| info.fd())
                .map_err(|source| Error::MapInfo { name, source })?;
            Ok((name, memory_of(pins, name, fd.as_fd())?))
        })
        .collect()
}

/// One map's kernel memory, its pin named in the error.
fn memory_of(pins: &Pins, name: &'static str, fd: BorrowedFd<'_>) -> Result<u64, Error> {
    sys::map_memory(fd).map_err(|source| Error::Pin {
        path: pins.map(name),
        source,
    })
}

/// Every map of `weft_abi::maps::ALL` under the instance's pins, with its entries counted.
pub fn map_usage(pins: &Pins) -> Result<Vec<MapUsage>, Error> {
    use aya::maps::{MapInfo, MapType};
    let mut out = Vec::new();
    for &name in weft_abi::maps::ALL {
        let info =
            MapInfo::from_pin(pins.map(name)).map_err(|source| Error::MapInfo { name, source })?;
        let map_type = info
            .map_type()
            .map_err(|source| Error::MapInfo { name, source })?;
        let counted = matches!(
            map_type,
            MapType::Hash
                | MapType::LruHash
                | MapType::PerCpuHash
                | MapType::LruPerCpuHash
                | MapType::LpmTrie
        );
        let fd = info
            .fd()
            .map_err(|source| Error::MapInfo { name, source })?;
        let bytes = memory_of(pins, name, fd.as_fd())?;
        let entries = if counted {
            let limit = u64::from(info.max_entries()).saturating_mul(2);
            let n = sys::count_keys(fd.as_fd(), info.key_size(), limit).map_err(|source| {
                Error::Pin {
                    path: pins.map(name),
                    source,
                }
            })?;
            Some(n)
        } else {
            None
        };
        out.push(MapUsage {
            name: name.to_owned(),
            map_type: format!("{map_type:?}"),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            entries,
            fill_ratio: entries
                .filter(|_| info.max_entries() > 0)
                .map(|n| n as f64 / f64::from(info.max_entries())),
            bytes,
        });
    }
    Ok(out)
}
