//! HBONE, as ztunnel speaks it: HTTP/2 `CONNECT` streams over mutual TLS 1.3, port 15008.
//! The stream's `:authority` is the target `ip:port`; `Forwarded: for=<ip>` names the
//! original source. Tunnels are pooled per (source identity and its certificate, destination
//! identity, tunnel address), so a new user connection costs a stream, not a handshake, and a
//! renewed certificate starts new tunnels while the old ones carry their streams to the end.
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use h2::{client::SendRequest, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, BufReader},
    net::TcpStream,
};

use super::{
    metrics::{Direction, ProxyMetrics, Refusal},
    tls::{Credentials, HandshakeFailure, spiffe_id},
};
use crate::identity::SpiffeId;

mod stream;

pub use stream::Stream;

/// The HBONE port.
pub const PORT: u16 = 15008;

/// Window sizes large enough for one stream to fill a fast link (as ztunnel sets them).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// Streams one tunnel carries at once (a client waits for one to end beyond it), and the
/// size of a stream's headers (a CONNECT's are a few dozen bytes): hyper's defaults.
const MAX_STREAMS: u32 = 200;
const MAX_HEADERS: u32 = 16 << 10;
/// Bytes a client's streams may queue for the connection to write (hyper's client default).
const SEND_BUFFER: usize = 1 << 20;
/// A silent peer is noticed this soon.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bytes read from a tunnel's socket at once. rustls asks for at most 4 KiB per read; a
/// buffer under it lets one read take what the socket holds (a 64 KiB exchange in one
/// system call instead of sixteen).
const TLS_READ: usize = 64 << 10;
/// A tunnel not open (TCP, TLS, HTTP/2) this soon is given up: the connections waiting for
/// it are reset rather than left hanging for the kernel's SYN retries.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that has not finished its TLS handshake this soon is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {0}")]
    NoCertificate(SpiffeId),
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} ({reason})", reason = reason.as_str())]
    Handshake {
        addr: SocketAddr,
        reason: HandshakeFailure,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("HTTP/2 stream on the tunnel to {addr}")]
    Stream {
        addr: SocketAddr,
        /// The peer did not process it: it may be sent again.
        unprocessed: bool,
        #[source]
        source: h2::Error,
    },
    #[error("HTTP/2 with {addr}: the peer went silent (no preface, or a ping unanswered)")]
    Silent { addr: SocketAddr },
    #[error("the user connection failed before its stream was answered")]
    User(#[source] std::io::Error),
    #[error("{addr} refused the stream to {target}: {status}")]
    Refused {
        addr: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
}

/// Where a user connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The client workload's identity.
    pub source: SpiffeId,
    /// The identity the server must prove (the destination pod's).
    pub destination: SpiffeId,
    /// Where the tunnel goes: the destination pod's address, port 15008.
    pub tunnel: SocketAddr,
}

/// A pooled tunnel's sender, and an id telling it from the one that replaced it.
#[derive(Debug, Clone)]
struct Tunnel {
    sender: SendRequest<Bytes>,
    id: u64,
    /// Set once its connection has ended.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// The user connections holding it.
    users: Arc<Users>,
}

impl Tunnel {
    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it takes a new stream now (not closed, no GOAWAY; a stream beyond the peer's
    /// limit waits on it for one to end).
    fn is_ready(&self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        !self.is_closed()
            && matches!(
                self.sender.clone().poll_ready(&mut cx),
                std::task::Poll::Ready(Ok(()))
            )
    }
}

/// How many user connections hold a tunnel (from taking it out of the pool to the end of
/// their stream), and since when none has.
#[derive(Debug)]
struct Users(Mutex<(usize, tokio::time::Instant)>);

impl Users {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new((0, tokio::time::Instant::now()))))
    }

    fn lease(self: &Arc<Self>) -> Lease {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Lease(Arc::clone(self))
    }

    /// How long it has had no user; None while it has one.
    fn idle_for(&self) -> Option<Duration> {
        let (count, since) = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        (count == 0).then(|| since.elapsed())
    }
}

/// One user connection's hold on its tunnel, which keeps the pool from releasing it; its
/// stream carries it to the end.
#[derive(Debug)]
pub struct Lease(Arc<Users>);

impl Drop for Lease {
    fn drop(&mut self) {
        let mut users = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        users.0 -= 1;
        if users.0 == 0 {
            users.1 = tokio::time::Instant::now();
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Tunnel>>>;

/// Takes a pooled tunnel out of its slot once no user connection has held it for `after`
/// (ztunnel's pool releases unused connections after 5 minutes too): without it, every pod
/// a node's pods ever reached would keep a tunnel open on both nodes, kept alive by pings.
struct Release {
    slot: std::sync::Weak<tokio::sync::Mutex<Option<Tunnel>>>,
    id: u64,
    users: Arc<Users>,
    after: Duration,
}

impl Release {
    /// Resolves once the tunnel was taken out of the pool here (then, without users, it has
    /// no stream, and HTTP/2 ends it with a GOAWAY once its last sender is gone). Never for
    /// a tunnel the slot no longer holds (replaced, or the pool dropped the slot): it ends
    /// with its last stream, and its pings go on until then.
    async fn released(self) {
        loop {
            let wait = self
                .users
                .idle_for()
                .map_or(self.after, |idle| self.after.saturating_sub(idle));
            tokio::time::sleep(wait).await;
            match self.try_release().await {
                Some(true) => return,
                Some(false) => {}
                // Never while holding the slot: its next tunnel's connections need it.
                None => return std::future::pending().await,
            }
        }
    }

    /// Some(true) once taken out of its slot, Some(false) while in use or not idle long
    /// enough, None when the slot no longer holds it.
    async fn try_release(&self) -> Option<bool> {
        let slot = self.slot.upgrade()?;
        let mut held = slot.lock().await;
        if held.as_ref()?.id != self.id {
            return None;
        }
        // Under the slot's lock: no connection can take it between this and its release.
        let idle = self.users.idle_for().is_some_and(|idle| idle >= self.after);
        if idle {
            *held = None;
        }
        Some(idle)
    }
}

/// Ids of tunnels opened by this process.
static TUNNEL_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slots are pruned (closed tunnels, those of renewed certificates) when a connection makes a
/// new one, or when there are this many, and then at twice as many as were left: a
/// connection that reuses a tunnel does not walk every slot.
const PRUNE_AT: usize = 64;

/// The pool's slots, one per route and certificate.
#[derive(Debug)]
struct Slots {
    map: HashMap<(Route, String), Slot>,
    /// Pruned when `map` reaches this.
    prune_at: usize,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: PRUNE_AT,
        }
    }
}

impl Slots {
    /// Drops the slots no connection uses: those of certificates renewed since (their
    /// tunnels take no new streams, and end with their last), and idle ones without an open
    /// tunnel (closed, released, or never opened).
    fn prune(&mut self, creds: &Credentials) {
        self.map.retain(|(r, serial), slot| {
            creds.serial(&r.source) == Some(serial.as_str())
                && (Arc::strong_count(slot) > 1
                    || slot
                        .try_lock()
                        .is_ok_and(|s| s.as_ref().is_some_and(|t| !t.is_closed())))
        });
        self.prune_at = (self.map.len() * 2).max(PRUNE_AT);
    }
}

/// The client side: pooled tunnels.
#[derive(Debug)]
pub struct Pool {
    /// Where tunnels' sockets are made: the node's namespace when the agent runs outside it;
    /// the agent's own otherwise.
    netns: Option<Arc<super::netns::Netns>>,
    /// One slot per route and certificate; a slot's lock is held while its tunnel is opened,
    /// so that concurrent first connections share one handshake.
    tunnels: Mutex<Slots>,
    /// A tunnel no user connection has held this long is closed.
    idle: Duration,
}

/// The default of `--mesh-tunnel-idle-timeout` (ztunnel's `POOL_UNUSED_RELEASE_TIMEOUT`).
pub const TUNNEL_IDLE: Duration = Duration::from_secs(300);

impl Default for Pool {
    fn default() -> Self {
        Self::new(None, TUNNEL_IDLE)
    }
}

impl Pool {
    /// Tunnels from the namespace of `netns` (None: the agent's own), each closed once no
    /// user connection has held it for `idle`.
    pub fn new(netns: Option<Arc<super::netns::Netns>>, idle: Duration) -> Self {
        Self {
            netns,
            tunnels: Mutex::default(),
            idle,
        }
    }

    /// A stream to `target` (`Forwarded: for=source_ip`) through a tunnel of `route`, opened
    /// or reused, for the connection `user`. What `user` sends first (one read) while the
    /// peer decides goes with the request instead of a round trip later: the peer holds it
    /// until the stream is admitted and its target connected, and drops it if not. `user`'s
    /// reads must be cancel-safe (a socket's are): the read is dropped when the answer
    /// comes first.
    pub async fn connect<R: AsyncRead + Unpin>(
        &self,
        creds: &Credentials,
        metrics: &ProxyMetrics,
        route: &Route,
        (target, source_ip): (SocketAddr, IpAddr),
        user: &mut R,
    ) -> Result<Stream, Error> {
        let serial = creds
            .serial(&route.source)
            .ok_or_else(|| Error::NoCertificate(route.source.clone()))?
            .to_owned();
        let slot = {
            let mut slots = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
            let key = (route.clone(), serial);
            // A new slot (a new route, or a renewed certificate: its old tunnels then close
            // once their streams end) comes with a handshake, which costs far more.
            if !slots.map.contains_key(&key) || slots.map.len() >= slots.prune_at {
                slots.prune(creds);
            }
            Arc::clone(slots.map.entry(key).or_default())
        };
        // A stream the peer did not process (refused, or beyond the last stream of its
        // GOAWAY: its agent hands over) is sent once more on a new tunnel, with the client's
        // first bytes again (none of them reached the server); one it may have processed is
        // not (the server would see two).
        let mut early = Early {
            user,
            data: Bytes::new(),
            read: false,
        };
        let (mut tunnel, lease) = self.tunnel(&slot, creds, metrics, route, None).await?;
        match open_stream(&mut tunnel.sender, route, (target, source_ip), &mut early).await {
            Err(Error::Stream {
                unprocessed: true, ..
            }) => {
                let replace = Some(tunnel.id);
                let (mut tunnel, lease) =
                    self.tunnel(&slot, creds, metrics, route, replace).await?;
                open_stream(&mut tunnel.sender, route, (target, source_ip), &mut early)
                    .await
                    .map(|s| s.leased(lease))
            }
            other => other.map(|s| s.leased(lease)),
        }
        .inspect(|_| metrics.stream_opened(Direction::Outbound))
    }

    /// The slot's tunnel when it takes streams and is not the one to `replace`, else a new
    /// one (another connection may have replaced it already: that one is used); with the
    /// caller's hold on it, taken under the slot's lock (so not while it is being released).
    async fn tunnel(
        &self,
        slot: &Slot,
        creds: &Credentials,
        metrics: &ProxyMetrics,
        route: &Route,
        replace: Option<u64>,
    ) -> Result<(Tunnel, Lease), Error> {
        let mut held = slot.lock().await;
        let usable = held
            .as_ref()
            .filter(|t| t.is_ready() && Some(t.id) != replace);
        if let Some(t) = usable {
            return Ok((t.clone(), t.users.lease()));
        }
        let id = TUNNEL_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let users = Users::new();
        let lease = users.lease();
        let release = Release {
            slot: Arc::downgrade(slot),
            id,
            users: Arc::clone(&users),
            after: self.idle,
        };
        let opening = open_tunnel(self.netns.as_deref(), creds, metrics, route, release);
        let (sender, closed) =
            tokio::time::timeout(OPEN_TIMEOUT, opening)
                .await
                .map_err(|_| Error::Connect {
                    addr: route.tunnel,
                    source: std::io::ErrorKind::TimedOut.into(),
                })??;
        let t = Tunnel {
            sender,
            id,
            closed,
            users,
        };
        *held = Some(t.clone());
        Ok((t, lease))
    }
}

/// Whether the peer did not process a stream (RFC 9113 §8.7: it refused it, or the stream
/// is beyond the last one of the peer's GOAWAY), so that it may be sent again.
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && ((e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)) || e.is_go_away())
}

/// A user connection's first bytes, read while its stream's request waits for an answer.
struct Early<'a, R> {
    user: &'a mut R,
    /// What was read (sent with the request; sent again with a request sent again).
    data: Bytes,
    /// Whether the one read happened.
    read: bool,
}

/// The most a user connection's first read takes.
const EARLY: usize = 16 << 10;

impl<R: AsyncRead + Unpin> Early<'_, R> {
    /// Awaits the stream's answer; meanwhile, once, what the user sends first is read and
    /// sent on the stream. Bytes read before (the request is sent again) are sent again.
    async fn answer(
        &mut self,
        response: h2::client::ResponseFuture,
        send: &mut h2::SendStream<Bytes>,
    ) -> Result<Result<Response<h2::RecvStream>, h2::Error>, std::io::Error> {
        // Without a reserved capacity h2 queues the bytes and asks for it (at most EARLY).
        if !self.data.is_empty() {
            let _ = send.send_data(self.data.clone(), false);
        }
        let mut response = std::pin::pin!(response);
        if !self.read {
            let mut buf = bytes::BytesMut::with_capacity(EARLY);
            tokio::select! {
                biased;
                answered = &mut response => return Ok(answered),
                read = tokio::io::AsyncReadExt::read_buf(&mut *self.user, &mut buf) => {
                    self.read = true;
                    if read? > 0 {
                        self.data = buf.freeze();
                        let _ = send.send_data(self.data.clone(), false);
                    }
                }
            }
        }
        Ok(response.await)
    }
}

/// A CONNECT stream to `target` on a tunnel.
async fn open_stream<R: AsyncRead + Unpin>(
    sender: &mut SendRequest<Bytes>,
    route: &Route,
    (target, source_ip): (SocketAddr, IpAddr),
    early: &mut Early<'_, R>,
) -> Result<Stream, Error> {
    let addr = route.tunnel;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .version(http::Version::HTTP_2)
        .header("forwarded", forwarded_for(source_ip))
        .body(())
        .map_err(|_| Error::Refused {
            addr,
            target,
            status: StatusCode::BAD_REQUEST,
        })?;
    // A request the tunnel could not take (closed, or past the peer's GOAWAY) was not sent.
    let not_sent = |source| Error::Stream {
        addr,
        unprocessed: true,
        source,
    };
    std::future::poll_fn(|cx| sender.poll_ready(cx))
        .await
        .map_err(not_sent)?;
    let (response, mut send) = sender.send_request(request, false).map_err(not_sent)?;
    let answered = early.answer(response, &mut send).await.map_err(|e| {
        // The far end resets its connection to the server, as this end resets the user's.
        send.send_reset(h2::Reason::CONNECT_ERROR);
        Error::User(e)
    })?;
    let response = answered.map_err(|source| Error::Stream {
        addr,
        unprocessed: unprocessed(&source),
        source,
    })?;
    if response.status() != StatusCode::OK {
        return Err(Error::Refused {
            addr,
            target,
            status: response.status(),
        });
    }
    Ok(Stream::new(send, response.into_body()))
}

/// TCP, TLS as the source identity (the server must prove the destination's), HTTP/2; the
/// connection is driven by a task of its own, which sets the flag it returns when it ends
/// and closes it once `release` took it out of the pool.
async fn open_tunnel(
    netns: Option<&super::netns::Netns>,
    creds: &Credentials,
    metrics: &ProxyMetrics,
    route: &Route,
    release: Release,
) -> Result<(SendRequest<Bytes>, Arc<std::sync::atomic::AtomicBool>), Error> {
    let addr = route.tunnel;
    let config = creds
        .client(&route.source, &route.destination)
        .ok_or_else(|| Error::NoCertificate(route.source.clone()))?;
    let tls = connect_tls(netns, metrics, addr, config).await?;
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .initial_max_send_streams(MAX_STREAMS as usize)
        .max_header_list_size(MAX_HEADERS)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| Error::Http { addr, source })?;
    let pings = connection.ping_pong();
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = Arc::clone(&closed);
    let metrics = metrics.clone();
    metrics.tunnel_opened(Direction::Outbound);
    tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        let outcome = tokio::select! {
            done = &mut connection => done.map_err(|source| Error::Http { addr, source }),
            () = keepalive(pings) => Err(Error::Silent { addr }),
            () = release.released() => {
                tracing::debug!(target: "weft::mesh", tunnel = %addr, "tunnel unused: closing");
                connection.await.map_err(|source| Error::Http { addr, source })
            }
        };
        if let Err(e) = outcome {
            tracing::debug!(target: "weft::mesh", tunnel = %addr, error = %crate::chain(&e), "tunnel closed");
        }
        ended.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics.tunnel_closed(Direction::Outbound);
    });
    Ok((sender, closed))
}

/// The TCP connection (in `netns` when given) and the TLS handshake of a tunnel.
async fn connect_tls(
    netns: Option<&super::netns::Netns>,
    metrics: &ProxyMetrics,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<BufReader<TcpStream>>, Error> {
    let connect_err = |source| Error::Connect { addr, source };
    let tcp = match netns {
        None => TcpStream::connect(addr).await.map_err(connect_err)?,
        Some(ns) => {
            let socket = ns.socket(addr.ip()).await.map_err(connect_err)?;
            tokio::net::TcpSocket::from_std_stream(socket)
                .connect(addr)
                .await
                .map_err(connect_err)?
        }
    };
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, BufReader::with_capacity(TLS_READ, tcp))
        .await
    {
        Ok(tls) => {
            metrics.handshake_done(Direction::Outbound);
            Ok(tls)
        }
        Err(source) => {
            let reason = HandshakeFailure::of(&source);
            metrics.handshake_failed(Direction::Outbound, reason);
            Err(Error::Handshake {
                addr,
                reason,
                source,
            })
        }
    }
}

/// Resolves when the peer leaves a ping unanswered (or the connection cannot carry one): a
/// silent peer is noticed within [`KEEPALIVE`] + [`KEEPALIVE_TIMEOUT`]. Never without a
/// `PingPong` (taken already).
async fn keepalive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque()));
        if !matches!(pong.await, Ok(Ok(_))) {
            return;
        }
    }
}

/// `Forwarded: for=...` as RFC 7239 writes an address (IPv6 quoted and bracketed).
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The `for=` address of a `Forwarded` header, if it names one.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, v) = pair.trim().split_once('=')?;
        if !key.eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        let v = v
            .strip_prefix('[')
            .map_or(v, |rest| rest.trim_end_matches(']'));
        v.parse().ok()
    })
}

/// One stream a peer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The peer's verified identity.
    pub peer: SpiffeId,
    /// `:authority`.
    pub target: SocketAddr,
    /// `Forwarded: for=`.
    pub source: Option<IpAddr>,
}

/// The HTTP status a peer gets for a refused stream.
const fn status_of(refusal: Refusal) -> StatusCode {
    match refusal {
        Refusal::Forbidden | Refusal::NetworkPolicy => StatusCode::FORBIDDEN,
        Refusal::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
    }
}

/// The server side of one accepted TCP connection: the TLS handshake as `server`
/// ([`Credentials::server`]; `handshake_over` is called when it ended, either way), then
/// every CONNECT stream handed to `open`, which connects to the target (or refuses); bytes
/// are copied both ways until either side closes. Once `shutdown` resolves the peer is told
/// (GOAWAY) to open no more streams here, and the tunnel ends with its last stream.
pub async fn serve<IO, T, F, Fut>(
    io: IO,
    config: Arc<rustls::ServerConfig>,
    metrics: ProxyMetrics,
    handshake_over: impl FnOnce(),
    open: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + Abort + 'static,
    F: Fn(Inbound) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Refusal>> + Send + 'static,
{
    let addr = SocketAddr::from(([0, 0, 0, 0], PORT));
    let accepting =
        tokio_rustls::TlsAcceptor::from(config).accept(BufReader::with_capacity(TLS_READ, io));
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accepting)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    handshake_over();
    let tls = match accepted {
        Ok(tls) => tls,
        Err(source) => {
            let reason = HandshakeFailure::of(&source);
            metrics.handshake_failed(Direction::Inbound, reason);
            return Err(Error::Handshake {
                addr,
                reason,
                source,
            });
        }
    };
    // The verifier accepted the chain and its SPIFFE ID; read it again for the streams.
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id(c).ok());
    let Some(peer) = peer else {
        metrics.handshake_failed(Direction::Inbound, HandshakeFailure::NoSpiffeId);
        return Ok(());
    };
    metrics.handshake_done(Direction::Inbound);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADERS)
        .handshake::<_, Bytes>(tls);
    // A peer that never sends HTTP/2's preface is dropped as one that never ends TLS is.
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(made) => made.map_err(|source| Error::Http { addr, source })?,
        Err(_) => return Err(Error::Silent { addr }),
    };
    metrics.tunnel_opened(Direction::Inbound);
    let pings = connection.ping_pong();
    let streams = Streams {
        peer,
        open,
        metrics: metrics.clone(),
    };
    let served = accept_streams(&mut connection, &streams, shutdown, keepalive(pings)).await;
    metrics.tunnel_closed(Direction::Inbound);
    served.map_err(|source| match source {
        Some(source) => Error::Http { addr, source },
        None => Error::Silent { addr },
    })
}

/// What each stream of one tunnel needs.
struct Streams<F> {
    /// The peer's verified identity.
    peer: SpiffeId,
    open: F,
    metrics: ProxyMetrics,
}

/// Accepts the tunnel's streams, each carried by a task of its own, until the connection
/// ends (after `shutdown`, once its last stream has: GOAWAY first) or the peer goes silent
/// (Err(None)). Accepting also drives the connection, the streams' bytes included.
async fn accept_streams<IO, T, F, Fut>(
    connection: &mut h2::server::Connection<IO, Bytes>,
    streams: &Streams<F>,
    shutdown: impl Future<Output = ()>,
    silent: impl Future<Output = ()>,
) -> Result<(), Option<h2::Error>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin + Send + Abort + 'static,
    F: Fn(Inbound) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Refusal>> + Send + 'static,
{
    let (mut shutdown, mut silent) = (std::pin::pin!(shutdown), std::pin::pin!(silent));
    let mut closing = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut shutdown, if !closing => {
                connection.graceful_shutdown();
                closing = true;
                continue;
            }
            () = &mut silent => return Err(None),
        };
        let (request, respond) = match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(Some(e)),
            Some(Ok(accepted)) => accepted,
        };
        let (peer, open, metrics) = (
            streams.peer.clone(),
            streams.open.clone(),
            streams.metrics.clone(),
        );
        tokio::spawn(stream(request, respond, peer, open, metrics));
    }
}

/// One CONNECT stream: the target is connected before the peer is told 200, so that a refused
/// target is a refused stream; then the bytes are carried.
async fn stream<T, F, Fut>(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SpiffeId,
    open: F,
    metrics: ProxyMetrics,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + Abort + 'static,
    F: Fn(Inbound) -> Fut,
    Fut: Future<Output = Result<T, Refusal>>,
{
    let inbound = match inbound(&request, peer) {
        Ok(inbound) => inbound,
        Err(status) => return refuse(&mut respond, status),
    };
    // A peer that gives up on the stream (RST_STREAM) while the target is connected to ends
    // the connecting too.
    let opened = tokio::select! {
        opened = open(inbound) => opened,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let upstream = match opened {
        Ok(t) => t,
        Err(refusal) => {
            metrics.stream_refused(refusal);
            return refuse(&mut respond, status_of(refusal));
        }
    };
    metrics.stream_opened(Direction::Inbound);
    let ok = Response::builder().status(StatusCode::OK).body(());
    let send = match ok.map(|r| respond.send_response(r, false)) {
        Ok(Ok(send)) => send,
        _ => return upstream.abort(),
    };
    let _ = carry(Stream::new(send, request.into_body()), upstream).await;
}

/// What `peer` asks for with a request, or the status refusing it.
fn inbound(request: &Request<h2::RecvStream>, peer: SpiffeId) -> Result<Inbound, StatusCode> {
    if request.method() != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(StatusCode::BAD_REQUEST)?;
    let source = request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    Ok(Inbound {
        peer,
        target,
        source,
    })
}

/// Answers a stream with `status` and ends it.
fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(r) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(r, true);
    }
}

/// A user connection's socket, which can end with a reset.
///
/// The proxy's user sockets are armed from birth (SO_LINGER 0, set on the outbound listener,
/// whose connections inherit it, and on each delivery socket): until [`Abort::orderly`] they
/// close with a reset however they are closed, also when the agent exits or is killed
/// between accept and carry or in the middle of an exchange.
pub trait Abort {
    /// The exchange ended in order: the socket closes with a FIN.
    fn orderly(&self);
    /// Closes with a reset, not a FIN.
    fn abort(self);
}

impl Abort for TcpStream {
    fn orderly(&self) {
        // SO_LINGER off: close() sends a FIN and returns at once (only a linger time
        // blocks, which is what the deprecation is about).
        #[expect(deprecated, reason = "SO_LINGER off blocks nothing")]
        let _ = self.set_linger(None);
    }

    fn abort(self) {
        let _ = self.set_zero_linger();
    }
}

/// Carries a user connection over a stream: copies both ways until both sides are done; a
/// half-close is passed on. When either side fails, both end with a reset, as RFC 9113 8.5
/// asks of a CONNECT proxy: the stream with `CONNECT_ERROR` (the far end resets its socket)
/// and the socket with a TCP reset. So a client's or server's reset reaches the other end as
/// one, and a tunnel that broke is not passed off as an orderly end of a truncated exchange.
/// `user` comes armed ([`Abort`]) and is disarmed once both sides are done, so that an agent
/// killed (or a carry dropped) in the middle of an exchange does not end it with a FIN,
/// which a client reading to the end would take for the whole answer.
/// Returns the bytes carried from `user` and to it (early bytes, sent before, not counted).
pub async fn carry<U>(mut stream: Stream, mut user: U) -> std::io::Result<(u64, u64)>
where
    U: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let copied = stream.carry(&mut user).await;
    if copied.is_err() {
        stream.reset();
        user.abort();
    } else {
        user.orderly();
    }
    copied
}
