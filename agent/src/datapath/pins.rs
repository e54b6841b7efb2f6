//! Where an instance keeps its pins, and the lock that makes one agent own an instance.
//!
//! ```text
//! <bpffs>/weft/<instance>/maps-v<ABI>-<SHAPE>/<MAP>  every map of the object
//! <bpffs>/weft/<instance>/links/<PROGRAM>            one cgroup link per program
//! ```
//! The maps directory is named after `weft_abi::ABI_VERSION` and a fingerprint of every map's
//! shape (type, key and value sizes, capacity, flags): an agent adopts only maps its programs
//! read the same way. Another directory (another version or shape, or `maps/` of agents
//! before versions) is left to the programs still running on it until the new maps are
//! filled and the links switched; then it is removed. The agent holds an exclusive flock on
//! `<bpffs>/weft/<instance>` while it runs. A successor started with `--take-over` holds one
//! on `<bpffs>/weft/<instance>/successor` from before it has the instance until its proxy
//! listens: the running agent hands over when it sees it held, and stops accepting once it
//! is released.
use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use super::Error;

/// The pin layout of one instance.
#[derive(Debug, Clone)]
pub struct Pins {
    instance: String,
    dir: PathBuf,
    /// The maps directory's name (see the module's documentation).
    maps: String,
}

/// The maps directory of agents before maps were versioned.
const LEGACY_MAPS: &str = "maps";

impl Pins {
    /// Validates the instance name and the bpffs mount. Creates nothing.
    pub fn new(bpffs: &Path, instance: &str) -> Result<Self, Error> {
        validate_instance(instance)?;
        check_bpffs(bpffs)?;
        Ok(Self {
            instance: instance.to_owned(),
            dir: bpffs.join("weft").join(instance),
            maps: LEGACY_MAPS.to_owned(),
        })
    }

    /// These pins with the maps of version `abi` and shape `fingerprint`.
    pub fn versioned(mut self, abi: u32, fingerprint: u64) -> Self {
        self.maps = format!("maps-v{abi}-{fingerprint:016x}");
        self
    }

    /// Every maps directory of the instance (this agent's and any other), sorted.
    pub fn all_maps_dirs(&self) -> Result<Vec<PathBuf>, Error> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(Error::Pin {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name == LEGACY_MAPS || name.starts_with("maps-")
            })
            .map(|e| e.path())
            .collect();
        dirs.sort();
        Ok(dirs)
    }

    /// Pins under `bpffs` without checking it (tests that never open one).
    #[cfg(test)]
    pub fn unchecked(bpffs: &Path, instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            dir: bpffs.join("weft").join(instance),
            maps: LEGACY_MAPS.to_owned(),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join(&self.maps)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// Creates the instance's directory (idempotent), which [`Pins::lock`] locks.
    pub fn create_instance_dir(&self) -> Result<(), Error> {
        fs::create_dir_all(&self.dir).map_err(|source| Error::Pin {
            path: self.dir.clone(),
            source,
        })
    }

    /// Creates the maps and links directories (idempotent).
    pub fn create_dirs(&self) -> Result<(), Error> {
        for dir in [self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| Error::Pin { path: dir, source })?;
        }
        Ok(())
    }

    /// Takes the instance lock without waiting. Fails when another agent (or a cleanup) holds it.
    pub fn lock(&self) -> Result<InstanceLock, Error> {
        let file = File::open(&self.dir).map_err(|source| Error::Pin {
            path: self.dir.clone(),
            source,
        })?;
        match try_flock(&file) {
            Ok(true) => Ok(InstanceLock { _file: file }),
            Ok(false) => Err(Error::InstanceBusy {
                instance: self.instance.clone(),
                dir: self.dir.clone(),
            }),
            Err(source) => Err(Error::Pin {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

/// Held while an agent or a cleanup owns the instance; released on drop (or process death).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Held by a successor while it waits for the instance and starts; released on drop (or
/// process death), which tells the agent it replaces that its listeners are up.
#[derive(Debug)]
pub struct SuccessorLock {
    _file: File,
}

/// How a flock attempt went.
fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

impl Pins {
    fn successor_dir(&self) -> PathBuf {
        self.dir.join("successor")
    }

    /// Takes the successor lock (see the module's documentation) if nobody holds it.
    pub fn try_announce_successor(&self) -> Result<Option<SuccessorLock>, Error> {
        let dir = self.successor_dir();
        let pin_err = |source| Error::Pin {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(pin_err)?;
        let file = File::open(&dir).map_err(pin_err)?;
        Ok(try_flock(&file)
            .map_err(pin_err)?
            .then_some(SuccessorLock { _file: file }))
    }

    /// Whether a successor holds the successor lock. An error reads as none: the agent
    /// then keeps serving, which fails nothing.
    pub fn successor_waiting(&self) -> bool {
        let Ok(file) = File::open(self.successor_dir()) else {
            return false;
        };
        // Taken here: nobody else holds it (closing the file releases it).
        matches!(try_flock(&file), Ok(false))
    }

    /// The successor lock's directory, for a cleanup.
    pub fn successor_path(&self) -> PathBuf {
        self.successor_dir()
    }
}

fn validate_instance(instance: &str) -> Result<(), Error> {
    let ok = !instance.is_empty()
        && instance.len() <= 64
        && instance != "."
        && instance != ".."
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInstance {
            instance: instance.to_owned(),
        })
    }
}

pub(super) fn check_bpffs(bpffs: &Path) -> Result<(), Error> {
    if !crate::mounts::is_bpffs(bpffs) {
        return Err(Error::NotBpffs {
            path: bpffs.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for good in ["default", "node-1", "t_2.a"] {
            validate_instance(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_instance(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The running agent sees a successor exactly while one holds the lock, and a second
    /// successor does not get it meanwhile.
    #[test]
    fn a_successor_is_seen_while_it_holds_its_lock() {
        let dir = crate::tests::TempDir::new("successor-lock");
        let pins = Pins::unchecked(dir.path(), "node");
        pins.create_instance_dir().expect("instance dir");
        assert!(!pins.successor_waiting(), "no successor yet");
        let held = pins
            .try_announce_successor()
            .expect("lock")
            .expect("first successor");
        assert!(pins.successor_waiting(), "the successor is seen");
        let second = pins.try_announce_successor().expect("lock");
        assert!(second.is_none(), "a second successor waits its turn");
        drop(held);
        assert!(!pins.successor_waiting(), "released: the successor listens");
    }

    #[test]
    fn tmp_is_not_bpffs() {
        let err = check_bpffs(Path::new("/tmp")).expect_err("/tmp accepted as bpffs");
        assert!(err.to_string().contains("/tmp"), "{err}");
    }
}
