//! Who may use the admin API: the socket is mode 0600 (0660 with `--admin-group`, owned by
//! that group), and every connection's peer credentials (SO_PEERCRED) are checked again, so
//! neither a umask nor a moment between bind and chmod opens it. `PUT /log-level` and
//! `/flows` (every connection of the node) are for the node's administrators only.
use std::{
    io,
    os::unix::fs::{PermissionsExt as _, chown},
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
    /// Sets the socket's owner group and mode: 0600, or 0660 for the group.
    pub fn restrict(&self, path: &Path) -> io::Result<()> {
        let mode = match self.group {
            Some(gid) => {
                chown(path, None, Some(gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
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

    #[test]
    fn groups_are_read_from_proc() {
        let mine = groups_of(i32::try_from(std::process::id()).expect("pid"));
        // SAFETY: getgroups(0, NULL) only counts.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        assert_eq!(mine.len(), usize::try_from(n).expect("count"));
    }
}
