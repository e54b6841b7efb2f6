//! A meshed pod's network namespace, as the proxy uses it: one thread lives in it (setns
//! affects only the calling thread), prepares it once, and then makes the sockets the proxy
//! needs there. A socket belongs to the namespace it was created in, so everything else
//! (bind, listen, connect, I/O) runs on the agent's runtime as for any socket.
//!
//! Preparing the namespace: the proxy delivers a tunnelled connection from inside the pod
//! with the client pod's address as its source (`IP_TRANSPARENT`), so the server's replies to
//! that address must come back to the proxy's socket rather than leave through the pod's
//! interface. The proxy's sockets carry [`MARK`]; `tcp_fwmark_accept` makes the server's
//! accepted socket inherit the mark of the SYN; a policy-routing rule sends marked packets to
//! a table whose only route is local. No iptables or nftables rule is involved.
//!
//! The rule is added before the pod's first delivery, not when the namespace is entered: any
//! rule besides the kernel's own takes every route lookup of the namespace off its fast path
//! (the local and main tables are searched apart, rule by rule), which cost a meshed pod's
//! short connections to anything about 2.5% (`cargo xtask bench mesh`). A pod that only
//! calls out never pays it.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

/// The mark of the proxy's delivery sockets (and, through `tcp_fwmark_accept`, of the
/// servers' sockets accepting them).
pub const MARK: u32 = weft_abi::mesh::DELIVERY_MARK;
/// The routing table holding the local default route for marked packets.
pub const TABLE: u32 = 15_008;
/// The rule's priority: before `main` (32766).
const PRIORITY: u32 = 15_008;

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Loopback, [`weft_abi::mesh::OUTBOUND_PORT`]: the pod's captured connections. What it
    /// accepts is armed from birth (SO_LINGER 0, inherited): a client's connection closes with
    /// a reset until its carry ended in order, also when the agent is killed between accept
    /// and the carry, where a FIN would pass for an empty answer.
    Outbound,
    /// The pod's address, [`weft_abi::mesh::INBOUND_PORT`]: tunnels from other nodes, which
    /// end with TLS's close_notify and a FIN.
    Inbound,
}

impl Role {
    /// The port a listener for this role binds.
    pub fn port(self) -> u16 {
        match self {
            Self::Outbound => weft_abi::mesh::OUTBOUND_PORT,
            Self::Inbound => weft_abi::mesh::INBOUND_PORT,
        }
    }
}

/// A request to the namespace's thread.
enum Request {
    /// A listener on `addr` for `Role` (SO_REUSEPORT, so that a successor can bind it too;
    /// TCP_NODELAY, which the connections it accepts inherit).
    Listen(SocketAddr, Role, Reply<std::net::TcpListener>),
    /// A delivery socket of the family of the address: marked, transparent, not bound.
    Deliver(IpAddr, Reply<OwnedFd>),
    /// A plain TCP socket of the family of the address (a tunnel from the node).
    Socket(IpAddr, Reply<std::net::TcpStream>),
    /// Tops up the spare sockets of the family of the address.
    Refill(IpAddr),
    /// Adds the rule and table that bring replies to delivery sockets of the family of the
    /// address back.
    Route(IpAddr, Reply<()>),
}

/// Delivery sockets made ahead in the namespace, with their options, by family (IPv4,
/// IPv6). A socket belongs to the namespace it was made in, and only that takes the
/// namespace's thread; binding it does not. So a delivery takes a spare socket, binds it and
/// asks for another without waiting, instead of a round trip to the thread for each
/// connection.
type Spares = Arc<Mutex<[Vec<OwnedFd>; 2]>>;

/// Spare sockets kept per family, once the family had a delivery; the thread is asked to
/// top them up when half are used (a wake-up per few deliveries, not one for each).
const SPARES: usize = 8;

fn family_slot(ip: &IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

/// Where the namespace's thread answers (a runtime task awaits it without blocking).
type Reply<T> = tokio::sync::oneshot::Sender<io::Result<T>>;

/// The thread in a network namespace (a pod's, or the node's).
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    spares: Spares,
    /// Set once the rule and table for deliveries are in place, by family (IPv4, IPv6): a
    /// family that cannot have them does not hold back the other.
    routed: [tokio::sync::OnceCell<()>; 2],
    /// The namespace's cookie (`MESH_ORIG` keys carry it).
    pub cookie: u64,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Listen(a, role, _) => write!(f, "Listen({a}, {role:?})"),
            Self::Deliver(a, _) => write!(f, "Deliver({a})"),
            Self::Socket(a, _) => write!(f, "Socket({a})"),
            Self::Refill(a) => write!(f, "Refill({a})"),
            Self::Route(a, _) => write!(f, "Route({a})"),
        }
    }
}

impl Netns {
    /// Enters the node's namespace at `path` (when the agent runs outside it, as in tests:
    /// `--host-netns`) on a new thread, to make the tunnels' sockets there.
    pub fn enter_node(path: &Path) -> io::Result<Self> {
        Self::start(path, None)
    }

    /// Enters a pod's namespace at `path` on a new thread and prepares it (sysctls, written
    /// through `host_proc`; the routing for deliveries waits for the first). Refused
    /// when the namespace is the node's (`host_cookie`): a path that leads there (a process
    /// that exited and whose PID was reused, an annotation naming it) must not change the
    /// node's routing.
    pub fn enter(path: &Path, host_proc: &Path, host_cookie: u64) -> io::Result<Self> {
        Self::start(path, Some((host_proc.to_owned(), host_cookie)))
    }

    fn start(path: &Path, pod: Option<(PathBuf, u64)>) -> io::Result<Self> {
        let ns = std::fs::File::open(path)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<u64>>();
        let (requests, rx) = mpsc::channel::<Request>();
        let spares = Spares::default();
        let filled = Arc::clone(&spares);
        std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn(move || {
                let prepared = enter_and_prepare(&ns, pod.as_ref());
                let ok = prepared.is_ok();
                let _ = ready_tx.send(prepared);
                if ok {
                    serve(&rx, &filled);
                }
            })?;
        let cookie = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended"))??;
        Ok(Self {
            path: path.to_owned(),
            requests,
            spares,
            routed: Default::default(),
            cookie,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A listener for `role` on `ip` and the role's port, in the namespace (blocking: call it
    /// off the runtime's workers).
    pub fn listen(&self, ip: IpAddr, role: Role) -> io::Result<std::net::TcpListener> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Request::Listen(SocketAddr::new(ip, role.port()), role, tx))?;
        rx.blocking_recv().map_err(|_| gone())?
    }

    /// A delivery socket for a connection from `source` (marked, transparent, bound to
    /// `source` with any port), not connected yet.
    pub async fn delivery(&self, source: IpAddr) -> io::Result<std::net::TcpStream> {
        self.routed[family_slot(&source)]
            .get_or_try_init(|| async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.ask(Request::Route(source, tx))?;
                rx.await.map_err(|_| gone())?
            })
            .await?;
        let (spare, left) = {
            let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
            let family = &mut spares[family_slot(&source)];
            (family.pop(), family.len())
        };
        let fd = match spare {
            Some(fd) => {
                if left <= SPARES / 2 {
                    self.ask(Request::Refill(source))?;
                }
                fd
            }
            // This one first, the spares after it.
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.ask(Request::Deliver(source, tx))?;
                self.ask(Request::Refill(source))?;
                rx.await.map_err(|_| gone())??
            }
        };
        // The port is chosen at connect (IP_BIND_ADDRESS_NO_PORT).
        bind(fd.as_raw_fd(), SocketAddr::new(source, 0))?;
        Ok(std::net::TcpStream::from(fd))
    }

    /// A TCP socket of `to`'s family in the namespace, not connected yet.
    pub async fn socket(&self, to: IpAddr) -> io::Result<std::net::TcpStream> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Request::Socket(to, tx))?;
        rx.await.map_err(|_| gone())?
    }

    fn ask(&self, r: Request) -> io::Result<()> {
        self.requests.send(r).map_err(|_| gone())
    }
}

fn gone() -> io::Error {
    io::Error::other("the namespace thread ended")
}

fn serve(rx: &mpsc::Receiver<Request>, spares: &Spares) {
    while let Ok(request) = rx.recv() {
        match request {
            Request::Listen(addr, role, tx) => {
                let _ = tx.send(listener(addr, role));
            }
            Request::Deliver(family, tx) => {
                let _ = tx.send(delivery(family));
            }
            Request::Socket(to, tx) => {
                let _ = tx.send(plain(to));
            }
            Request::Refill(family) => refill(spares, family),
            Request::Route(family, tx) => {
                let _ = tx.send(route_deliveries(&family));
            }
        }
    }
}

/// Tops up the spare sockets of `family`'s family; one that cannot be made (out of
/// descriptors) is left for the next delivery to make itself.
fn refill(spares: &Spares, family: IpAddr) {
    let slot = family_slot(&family);
    loop {
        let short = spares.lock().unwrap_or_else(|e| e.into_inner())[slot].len() < SPARES;
        let Some(fd) = short.then(|| delivery(family).ok()).flatten() else {
            return;
        };
        spares.lock().unwrap_or_else(|e| e.into_inner())[slot].push(fd);
    }
}

fn enter_and_prepare(ns: &std::fs::File, pod: Option<&(PathBuf, u64)>) -> io::Result<u64> {
    // SAFETY: setns on a descriptor we own, for this thread only; no memory is passed.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cookie = crate::datapath::own_netns_cookie()?;
    let Some((host_proc, host_cookie)) = pod else {
        return Ok(cookie);
    };
    if cookie == *host_cookie {
        return Err(io::Error::other(
            "the path leads to the node's own network namespace, not a pod's",
        ));
    }
    // sys/net is the namespace of the thread that opens it (a container's own /proc/sys is
    // read-only: the host's procfs mounted elsewhere is not).
    for (name, value) in [
        ("ipv4/tcp_fwmark_accept", "1"),
        // A listener closed while a successor shares its port hands over its queue.
        ("ipv4/tcp_migrate_req", "1"),
    ] {
        std::fs::write(host_proc.join("sys/net").join(name), value)?;
    }
    Ok(cookie)
}

/// The policy-routing rule and table of deliveries of `family`'s family, in the thread's
/// namespace (one an earlier agent added counts as added).
fn route_deliveries(family: &IpAddr) -> io::Result<()> {
    let af = if family.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let lo = loopback_index()?;
    let nl = Netlink::open()?;
    nl.rule(af)?;
    nl.local_route(af, lo)
}

fn loopback_index() -> io::Result<u32> {
    // SAFETY: a NUL-terminated literal.
    let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

/// A TCP socket of `addr`'s family, close-on-exec and non-blocking (as the runtime uses it).
fn socket(addr: &IpAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: no memory is passed; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn set_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    set_opt(fd, level, name, &value)
}

/// SO_LINGER on with a zero time: close() sends a reset.
fn zero_linger(fd: RawFd) -> io::Result<()> {
    let value = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_opt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &value)
}

/// setsockopt with `value` as the option's value (the kernel checks its length).
fn set_opt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is `size_of::<T>()` readable bytes, which is the length passed.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listener on `addr` with the options of `role` (the unit tests' too, on any port).
pub(super) fn listener(addr: SocketAddr, role: Role) -> io::Result<std::net::TcpListener> {
    let fd = socket(&addr.ip())?;
    let raw = fd.as_raw_fd();
    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    // Accepted connections inherit these: no setsockopt per connection.
    set_int(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if role == Role::Outbound {
        zero_linger(raw)?;
    }
    if addr.is_ipv6() {
        set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    bind(raw, addr)?;
    // SAFETY: no memory is passed.
    if unsafe { libc::listen(raw, 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

fn plain(to: IpAddr) -> io::Result<std::net::TcpStream> {
    let fd = socket(&to)?;
    set_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    Ok(std::net::TcpStream::from(fd))
}

/// A delivery socket of `family`'s family: marked, transparent, without Nagle, its port
/// left to connect (not bound yet: the source address is the connection's).
fn delivery(family: IpAddr) -> io::Result<OwnedFd> {
    let fd = socket(&family)?;
    let raw = fd.as_raw_fd();
    set_int(raw, libc::SOL_SOCKET, libc::SO_MARK, MARK as i32)?;
    match family {
        IpAddr::V4(_) => set_int(raw, libc::SOL_IP, libc::IP_TRANSPARENT, 1)?,
        IpAddr::V6(_) => {
            set_int(raw, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)?;
            set_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        }
    }
    set_int(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    // Armed from birth: a delivery closes with a reset until its carry ended in order.
    zero_linger(raw)?;
    // The port is chosen at connect, among those free for this 4-tuple: bind's search for a
    // port free for every destination was most of a delivery's cost.
    set_int(raw, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    Ok(fd)
}

fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let ret = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sa` is a valid sockaddr_in of the length given.
            unsafe {
                libc::bind(
                    fd,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: `sa` is a valid sockaddr_in6 of the length given.
            unsafe {
                libc::bind(
                    fd,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The wildcard address of a family, for the local route.
fn any(family: u8) -> IpAddr {
    if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    }
}

/// An rtnetlink socket of the thread's namespace, for one rule and one route per family.
struct Netlink(OwnedFd);

const NLMSG_HDR: usize = 16;
const FRA_TABLE: u16 = 15;
const FRA_FWMARK: u16 = 10;
const FRA_FWMASK: u16 = 16;
const FRA_PRIORITY: u16 = 6;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTA_DST: u16 = 1;
const FR_ACT_TO_TBL: u8 = 1;

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: no memory is passed; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// `ip rule add fwmark MARK/0xffff lookup TABLE priority PRIORITY`.
    fn rule(&self, family: u8) -> io::Result<()> {
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action;
        // flags (u32).
        let mut body = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
        attr(&mut body, FRA_FWMARK, &MARK.to_ne_bytes());
        attr(&mut body, FRA_FWMASK, &0xffff_u32.to_ne_bytes());
        attr(&mut body, FRA_TABLE, &TABLE.to_ne_bytes());
        attr(&mut body, FRA_PRIORITY, &PRIORITY.to_ne_bytes());
        self.request(libc::RTM_NEWRULE, &body)
    }

    /// `ip route add local default dev lo table TABLE`.
    fn local_route(&self, family: u8, lo: u32) -> io::Result<()> {
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol (boot), scope (host),
        // type (local); flags (u32).
        let mut body = vec![
            family,
            0,
            0,
            0,
            0,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_HOST,
            libc::RTN_LOCAL,
            0,
            0,
            0,
            0,
        ];
        let dst = match any(family) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        attr(&mut body, RTA_DST, &dst);
        attr(&mut body, RTA_TABLE, &TABLE.to_ne_bytes());
        attr(&mut body, RTA_OIF, &lo.to_ne_bytes());
        self.request(libc::RTM_NEWROUTE, &body)
    }

    /// Sends one request and reads its acknowledgement; "exists" is success (a namespace
    /// prepared by an earlier agent).
    fn request(&self, kind: u16, body: &[u8]) -> io::Result<()> {
        let len = NLMSG_HDR + body.len();
        let flags =
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is valid for reads of its length.
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // struct nlmsgerr follows the header: error (i32, negative errno; 0 for an ack).
        let n = n as usize;
        if n < NLMSG_HDR + 4 {
            return Err(io::Error::other("short netlink answer"));
        }
        let errno = i32::from_ne_bytes([
            buf[NLMSG_HDR],
            buf[NLMSG_HDR + 1],
            buf[NLMSG_HDR + 2],
            buf[NLMSG_HDR + 3],
        ]);
        match -errno {
            0 | libc::EEXIST => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Appends a netlink attribute (length, type, value, padding to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Connects to a listener made for `role`, accepts, and closes the accepted socket
    /// without a word, as an agent killed between accept and the carry does; returns what
    /// the client then reads.
    fn read_after_accepted_close(role: Role) -> io::Result<usize> {
        let l = listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0), role).expect("listen");
        let mut client =
            std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        l.set_nonblocking(false).expect("blocking");
        let (accepted, _) = l.accept().expect("accept");
        client.write_all(b"request").expect("write");
        // Read before the close: closing a socket with unread data resets it whatever its
        // linger.
        let mut first = [0u8; 7];
        (&accepted)
            .read_exact(&mut first)
            .expect("read the request");
        drop(accepted);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        client.read(&mut [0u8; 16])
    }

    /// An outbound listener's connections close with a reset from the moment they are
    /// accepted: a client reads ECONNRESET, not an end it would take for an empty answer.
    #[test]
    fn an_outbound_connection_closed_before_its_carry_is_reset() {
        let read = read_after_accepted_close(Role::Outbound);
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
    }

    /// A delivery socket closes with a reset from the moment it is made: a server whose
    /// client's agent is killed before the carry reads ECONNRESET, not an end of request.
    #[tokio::test]
    async fn a_delivery_closed_before_its_carry_is_reset() {
        use tokio::io::AsyncReadExt as _;
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let fd = delivery(Ipv4Addr::LOCALHOST.into()).expect("a delivery socket");
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        let delivered = socket
            .connect(server.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut accepted, _) = server.accept().await.expect("accept");
        drop(delivered);
        let read = accepted.read(&mut [0u8; 16]).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
    }

    /// An inbound listener's connections (tunnels) close with a FIN.
    #[test]
    fn an_inbound_connection_closes_in_order() {
        let read = read_after_accepted_close(Role::Inbound);
        assert_eq!(read.map_err(|e| e.kind()), Ok(0));
    }
}
