//! Who may use the admin API: the socket is mode 0600 (0660 with `--admin-group`, owned by
//! that group), and every connection's peer credentials (SO_PEERCRED) are checked again, so
//! neither a umask nor a moment between bind and chmod opens it. `PUT /log-level` and
//! `/flows` (every connection of the node) are for the node's administrators only.
use std::{
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::lchown},
    },
    path::Path,
};

use tokio::net::{UnixListener, UnixStream, unix::UCred};

/// Who may connect besides root and the agent's own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Members of this group (primary or supplementary).
    pub group: Option<u32>,
}

impl Access {
    /// The socket's mode: 0600, or 0660 for the group.
    pub const fn mode(&self) -> u32 {
        match self.group {
            Some(_) => 0o660,
            None => 0o600,
        }
    }

    /// Binds and listens on `path`. The socket's mode is set before bind (Linux creates the
    /// file with it, less the umask), so the file never exists with a looser one; the group
    /// and its exact mode are then set on the file bound, never through a symlink swapped in
    /// its place. Must be called inside a tokio runtime.
    pub fn bind(&self, path: &Path) -> io::Result<UnixListener> {
        let fd = unix_socket()?;
        // SAFETY: fchmod on the socket we own.
        if unsafe { libc::fchmod(fd.as_raw_fd(), self.mode()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let std = std::os::unix::net::UnixListener::from(fd);
        bind_listen(&std, path)?;
        if let Some(gid) = self.group {
            lchown(path, None, Some(gid))?;
            set_mode_no_follow(path, self.mode())?;
        }
        std.set_nonblocking(true)?;
        UnixListener::from_std(std)
    }

    /// Whether a peer with these credentials may use the API.
    pub fn allows(&self, cred: &UCred, own_uid: u32, groups_of: impl Fn(i32) -> Vec<u32>) -> bool {
        self.allows_peer(
            Peer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            own_uid,
            groups_of,
        )
    }

    fn allows_peer(&self, peer: Peer, own_uid: u32, groups_of: impl Fn(i32) -> Vec<u32>) -> bool {
        if peer.uid == 0 || peer.uid == own_uid {
            return true;
        }
        let Some(gid) = self.group else {
            return false;
        };
        peer.gid == gid || peer.pid.is_some_and(|pid| groups_of(pid).contains(&gid))
    }
}

/// A peer's credentials.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

/// chmod of `path` itself (a socket), not of what a symlink there would point at: through an
/// O_PATH descriptor opened without following links.
fn set_mode_no_follow(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not the socket bound",
        ));
    }
    let handle = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::set_permissions(handle, std::fs::Permissions::from_mode(mode))
}

fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_listen(listener: &std::os::unix::net::UnixListener, path: &Path) -> io::Result<()> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let fd = listener.as_raw_fd();
    // SAFETY: `addr` outlives the call and `len` is within it.
    if unsafe { libc::bind(fd, std::ptr::from_ref(&addr).cast(), len as libc::socklen_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on the socket we own.
    if unsafe { libc::listen(fd, 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The supplementary groups of a process (`Groups:` in /proc/PID/status).
pub fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A group by name or number.
pub fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("{s:?} is not a group name"))?;
    // SAFETY: getgrnam reads a NUL-terminated name; the result is read at once, before any
    // other call could reuse its static buffer.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no group {s:?} on this machine"));
    }
    // SAFETY: a non-null result points at a valid group entry.
    Ok(unsafe { (*entry).gr_gid })
}

/// The admin socket's listener: connections from peers [`Access`] refuses are closed at once.
#[derive(Debug)]
pub struct CheckedListener {
    pub listener: UnixListener,
    pub access: Access,
    pub own_uid: u32,
}

impl axum::serve::Listener for CheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if self.access.allows(&cred, self.own_uid, groups_of) => {
                    return (stream, addr);
                }
                Ok(cred) => {
                    tracing::warn!(
                        uid = cred.uid(),
                        gid = cred.gid(),
                        pid = cred.pid(),
                        "admin socket: connection refused (not root, the agent's user or --admin-group)"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "admin socket: no peer credentials; refused"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: u32 = 1000;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(4321),
        }
    }

    fn no_groups(_: i32) -> Vec<u32> {
        Vec::new()
    }

    #[test]
    fn root_and_the_agents_own_user_are_allowed() {
        let access = Access::default();
        assert!(access.allows_peer(peer(0, 0), AGENT, no_groups));
        assert!(access.allows_peer(peer(AGENT, 5), AGENT, no_groups));
    }

    #[test]
    fn another_user_is_refused_without_an_admin_group() {
        assert!(!Access::default().allows_peer(peer(1001, 1001), AGENT, no_groups));
    }

    #[test]
    fn members_of_the_admin_group_are_allowed_by_primary_or_supplementary_group() {
        let access = Access { group: Some(4242) };
        assert!(access.allows_peer(peer(1001, 4242), AGENT, no_groups));
        assert!(access.allows_peer(peer(1001, 1001), AGENT, |pid| {
            assert_eq!(pid, 4321);
            vec![7, 4242]
        }));
        assert!(!access.allows_peer(peer(1001, 1001), AGENT, |_| vec![7]));
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn the_socket_is_created_in_its_final_mode() {
        let dir = crate::tests::TempDir::new("admin-mode");
        let path = dir.path().join("a.sock");
        let _listener = Access::default().bind(&path).expect("bind");
        assert_eq!(mode_of(&path), 0o600);
    }

    #[tokio::test]
    async fn an_admin_group_owns_the_socket_with_mode_0660() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = crate::tests::TempDir::new("admin-group");
        let path = dir.path().join("a.sock");
        let _listener = Access { group: Some(4242) }.bind(&path).expect("bind");
        assert_eq!(mode_of(&path), 0o660);
        assert_eq!(std::fs::metadata(&path).expect("socket").gid(), 4242);
    }

    #[tokio::test]
    async fn a_path_too_long_for_a_socket_is_refused() {
        let long = Path::new("/tmp").join("x".repeat(200));
        let err = Access::default().bind(&long).expect_err("too long");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn groups_are_read_from_proc() {
        let mine = groups_of(i32::try_from(std::process::id()).expect("pid"));
        // SAFETY: getgroups(0, NULL) only counts.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(mine.len(), usize::try_from(n).expect("count"));
    }
}
