//! cgroup v2: where it is mounted and what a cgroup's id is.
//!
//! The cgroup v2 id that BPF helpers return (`bpf_skb_cgroup_id`, `bpf_get_current_cgroup_id`)
//! is the inode number of the cgroup's directory.
pub mod pods;
pub mod watch;

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::mounts::{CGROUP2_SUPER_MAGIC, fs_magic};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no cgroup2 filesystem is mounted (looked in {mountinfo}); weft needs cgroup v2, \
         unified or hybrid"
    )]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("{path} is not a cgroup v2 directory (no cgroup.procs in it)")]
    NotCgroup2 { path: PathBuf },
}

/// Finds the cgroup2 mount point in a mountinfo file (`/proc/self/mountinfo`).
pub fn find_cgroup2_mount(mountinfo: &Path) -> Result<PathBuf, Error> {
    let text = fs::read_to_string(mountinfo).map_err(|source| Error::Read {
        path: mountinfo.to_owned(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or_else(|| Error::NoCgroup2 {
        mountinfo: mountinfo.to_owned(),
    })
}

/// The mount point of the first cgroup2 filesystem in mountinfo text.
///
/// A mountinfo line is `id parent major:minor root mountpoint options [optional...] - fstype
/// source superoptions`; the optional fields vary in number, so the separator `-` is found
/// first. Mount points escape space, tab, newline and backslash as octal (`\040`).
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if fields.get(sep + 1) != Some(&"cgroup2") {
            return None;
        }
        fields.get(4).map(|m| PathBuf::from(unescape_octal(m)))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` is a cgroup v2 directory and returns its cgroup id.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    if !path.join("cgroup.procs").exists() || !path.join("cgroup.controllers").exists() {
        return Err(Error::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    let meta = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(meta.ino())
}

/// The level of a cgroup v2 directory: 0 for the cgroup2 mount's root, 1 for its children...
/// Counted by walking up while the parent is still on the cgroup2 filesystem.
pub fn level(path: &Path) -> Result<u32, Error> {
    let canonical = fs::canonicalize(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut level = 0;
    let mut at = canonical.as_path();
    while let Some(parent) = at.parent() {
        if fs_magic(parent) != Some(CGROUP2_SUPER_MAGIC) {
            break;
        }
        level += 1;
        at = parent;
    }
    Ok(level)
}

/// The cgroups under a root, and whether the listing is complete.
#[derive(Debug, Default)]
pub struct Walk {
    pub cgroups: Vec<(u64, PathBuf)>,
    /// False when a directory could not be read for another reason than having vanished:
    /// callers must not conclude that an unlisted cgroup is gone.
    pub complete: bool,
}

/// Every cgroup under `root` (itself included), by id. Directories that vanish while being
/// walked are skipped: cgroups come and go.
pub fn walk(root: &Path) -> Walk {
    let mut walk = Walk {
        cgroups: Vec::new(),
        complete: true,
    };
    let mut stack = vec![root.to_owned()];
    // A cgroup removed while we walk is fine; any other error makes the listing incomplete.
    let vanished = |e: &io::Error| {
        let gone = e.kind() == io::ErrorKind::NotFound;
        if !gone {
            tracing::debug!(error = %e, "cgroup listing incomplete");
        }
        gone
    };
    while let Some(dir) = stack.pop() {
        let entries = match fs::metadata(&dir).and_then(|m| Ok((m.ino(), fs::read_dir(&dir)?))) {
            Ok((ino, entries)) => {
                walk.cgroups.push((ino, dir.clone()));
                entries
            }
            Err(e) => {
                walk.complete &= vanished(&e);
                continue;
            }
        };
        for entry in entries {
            match entry.and_then(|e| Ok((e.file_type()?, e.path()))) {
                Ok((t, path)) if t.is_dir() => stack.push(path),
                Ok(_) => {}
                Err(e) => walk.complete &= vanished(&e),
            }
        }
    }
    walk
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount_with_optional_fields() {
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 \
                       master:1 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn ignores_cgroup_v1_and_other_filesystems() {
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                       22 1 0:21 / /proc rw - proc proc rw\n";
        assert_eq!(parse_cgroup2_mount(v1_only), None);
        // A source or mount point named cgroup2 is not the fstype.
        let tricky = "50 1 0:40 / /mnt/cgroup2 rw - tmpfs cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(tricky), None);
    }

    #[test]
    fn unescapes_mount_points() {
        let line = "41 31 0:38 / /run/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(line),
            Some(PathBuf::from("/run/my cgroups"))
        );
    }

    #[test]
    fn rejects_a_directory_that_is_not_a_cgroup() {
        let err = cgroup_id(Path::new("/tmp")).expect_err("/tmp is not a cgroup");
        assert!(matches!(err, Error::NotCgroup2 { .. }), "{err}");
    }
}
