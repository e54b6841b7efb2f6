//! The few bpf(2) commands aya 0.14 does not expose: reading a cgroup link's target,
//! replacing the program of a link in place, and walking a map's keys whatever their type;
//! a map's memory (fdinfo) and a network namespace's cookie.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` member for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` member for BPF_MAP_GET_NEXT_KEY.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// `union bpf_attr` member for BPF_OBJ_GET.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` member for BPF_PROG_QUERY.
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `union bpf_attr` member for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `union bpf_attr` member for BPF_LINK_DETACH.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The head of `struct bpf_link_info` with the `cgroup` member of its union.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// What a cgroup link says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the cgroup is gone (the link is then defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly laid out prefix of `union bpf_attr` for `cmd`, and
    // the size passed is its size; the kernel zero-extends the rest.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Counts the keys of a map with keys of `key_size` bytes (hash, LRU, LPM trie), at most
/// `limit` (a map changing while it is walked can make the walk restart).
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32, limit: u64) -> io::Result<u64> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    while count < limit {
        let mut attr = NextKeyAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // No key: the first one.
            key: if count == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

/// The kernel memory a map holds now, in bytes: `memlock` of its descriptor's fdinfo (for
/// preallocated maps their whole capacity, for the others what they hold; before Linux 6.4,
/// an estimate from the capacity for every map).
pub fn map_memory(map: BorrowedFd<'_>) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no memlock in fdinfo"))
}

/// Pins a BPF object at `path` (another name for the same object).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}

/// A descriptor of a loaded program, by id.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    // `union bpf_attr` for BPF_PROG_GET_FD_BY_ID: prog_id, next_id, open_flags.
    let mut attr = [id, 0, 0];
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: on success the command returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a pinned BPF object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads the program id and cgroup of a cgroup link.
pub fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    let mut info = LinkInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(CgroupLinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// Atomically replaces the program behind `link`: no packet or callback sees neither or both.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link now, even while other file descriptors or pins still refer to it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Programs attached directly to a cgroup for one attach type, as (program id, link id);
/// the link id is 0 for programs attached without a link.
pub fn query_cgroup(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    const MAX: usize = 64;
    let mut prog_ids = [0u32; MAX];
    let mut link_ids = [0u32; MAX];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: prog_ids.as_mut_ptr() as u64,
        prog_cnt: MAX as u32,
        link_ids: link_ids.as_mut_ptr() as u64,
        ..ProgQueryAttr::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = (attr.prog_cnt as usize).min(MAX);
    Ok(prog_ids[..n]
        .iter()
        .copied()
        .zip(link_ids[..n].iter().copied())
        .collect())
}

/// The cookie of a network namespace (what `bpf_get_netns_cookie` returns for its sockets):
/// `path` (`/proc/PID/ns/net`, `/run/netns/NAME`), or the caller's own when None. Another
/// namespace is entered by a short-lived thread only (setns affects the calling thread).
pub fn netns_cookie(path: Option<&Path>) -> io::Result<u64> {
    let Some(path) = path else {
        return own_netns_cookie();
    };
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we own, in this thread only; no memory is passed.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            own_netns_cookie()
        })
        .join()
        .map_err(|_| io::Error::other("the thread entering the namespace panicked"))?
    })
}

fn own_netns_cookie() -> io::Result<u64> {
    // SAFETY: no memory is passed; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for the kernel to write 8 bytes and a length.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The kernel's tick rate (`CONFIG_HZ`): from its build configuration (`/proc/config.gz`,
/// else `/boot/config-<release>`, which a container may not see), else from its jiffies
/// counter and clock (`timer_list` of the host's procfs `host_proc`, which container
/// runtimes do not mask as they mask their own `/proc/timer_list`, else of `/proc`); None
/// when none says.
pub fn kernel_hz(host_proc: &std::path::Path) -> Option<u32> {
    use std::io::Read as _;
    let mut text = String::new();
    let gz = std::fs::File::open("/proc/config.gz").ok().and_then(|f| {
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut text)
            .ok()
    });
    if gz.is_some()
        && let Some(hz) = config_hz(&text)
    {
        return Some(hz);
    }
    // SAFETY: `uts` is a plain C struct uname fills.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to it.
    if unsafe { libc::uname(&raw mut uts) } == 0 {
        // SAFETY: uname NUL-terminates `release`.
        let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
        let boot = format!("/boot/config-{}", release.to_string_lossy());
        if let Some(hz) = std::fs::read_to_string(boot)
            .ok()
            .and_then(|t| config_hz(&t))
        {
            return Some(hz);
        }
    }
    [host_proc, std::path::Path::new("/proc")]
        .into_iter()
        .find_map(|dir| timer_list_hz(&std::fs::read_to_string(dir.join("timer_list")).ok()?))
}

/// The tick rate `/proc/timer_list` implies: its `jiffies` started at `INITIAL_JIFFIES`
/// (2^32 - 300 × HZ, so that they wrap 5 minutes after boot) and counted HZ a second of
/// CLOCK_MONOTONIC (`now at`); the rate among those kernels build with whose count fits
/// within a few seconds.
fn timer_list_hz(text: &str) -> Option<u32> {
    let field = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(prefix)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    };
    let now_s = field("now at")? as f64 / 1e9;
    let jiffies = field("jiffies:")?;
    [100u32, 250, 300, 1000]
        .into_iter()
        .map(|hz| {
            let initial = (1u64 << 32) - 300 * u64::from(hz);
            let counted = jiffies.wrapping_sub(initial) as f64 / f64::from(hz);
            (hz, (counted - now_s).abs())
        })
        .filter(|(_, off)| *off < 5.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(hz, _)| hz)
}

/// `CONFIG_HZ` of a kernel configuration's text.
fn config_hz(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|hz| *hz > 0)
}

#[cfg(test)]
mod hz_tests {
    #[test]
    fn config_hz_is_read_from_a_kernel_configuration() {
        let text =
            "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_SCHED_HRTICK=y\n";
        assert_eq!(super::config_hz(text), Some(250));
        assert_eq!(super::config_hz("CONFIG_HZ_250=y\n"), None);
        assert_eq!(super::config_hz("CONFIG_HZ=0\n"), None);
    }

    /// From a 6.18 kernel built with HZ=250, 15.6 hours after boot.
    #[test]
    fn the_tick_rate_follows_from_the_jiffies_and_the_clock() {
        let at = |now_ns: u64, jiffies: u64| {
            super::timer_list_hz(&format!(
                "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at {now_ns} nsecs\n\ncpu: 0\n  .last_jiffies   : 1\njiffies: {jiffies}\n"
            ))
        };
        assert_eq!(at(56_185_176_669_033, 4_308_938_528), Some(250));
        // 20 s after boot, at 1000 Hz.
        assert_eq!(at(20_000_000_000, (1 << 32) - 300_000 + 20_000), Some(1000));
        // A count no rate explains.
        assert_eq!(at(56_185_176_669_033, (1 << 32) + 1), None);
    }
}
