//! HBONE, as ztunnel speaks it: HTTP/2 `CONNECT` streams over mutual TLS 1.3, port 15008.
//! The stream's `:authority` is the target `ip:port`; `Forwarded: for=<ip>` names the
//! original source. Tunnels are pooled per (source identity and its certificate, destination
//! identity, tunnel address), so a new user connection costs a stream, not a handshake, and a
//! renewed certificate starts new tunnels while the old ones carry their streams to the end.
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Bytes, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    metrics::{Direction, ProxyMetrics, Refusal},
    tls::{Credentials, HandshakeFailure, spiffe_id},
};
use crate::identity::SpiffeId;

/// The HBONE port.
pub const PORT: u16 = 15008;

/// Window sizes large enough for one stream to fill a fast link (as ztunnel sets them).
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// A silent peer is noticed this soon.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Copy buffers.
const BUFFER: usize = 64 << 10;
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
        source: hyper::Error,
    },
    #[error("HTTP/2 stream on the tunnel to {addr}")]
    Stream {
        addr: SocketAddr,
        /// The peer did not process it: it may be sent again.
        unprocessed: bool,
        #[source]
        source: hyper::Error,
    },
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
    sender: SendRequest<Empty<Bytes>>,
    id: u64,
}

type Slot = Arc<tokio::sync::Mutex<Option<Tunnel>>>;

/// Ids of tunnels opened by this process.
static TUNNEL_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The client side: pooled tunnels.
#[derive(Debug, Default)]
pub struct Pool {
    /// Where tunnels' sockets are made: the node's namespace when the agent runs outside it;
    /// the agent's own otherwise.
    netns: Option<Arc<super::netns::Netns>>,
    /// One entry per route and certificate; its lock is held while a tunnel is opened, so
    /// that concurrent first connections share one handshake.
    tunnels: Mutex<HashMap<(Route, String), Slot>>,
}

impl Pool {
    /// Tunnels from the namespace of `netns` (None: the agent's own).
    pub fn new(netns: Option<Arc<super::netns::Netns>>) -> Self {
        Self {
            netns,
            tunnels: Mutex::default(),
        }
    }

    /// A stream to `target` (`Forwarded: for=source_ip`) through a tunnel of `route`, opened
    /// or reused.
    pub async fn connect(
        &self,
        creds: &Credentials,
        metrics: &ProxyMetrics,
        route: &Route,
        target: SocketAddr,
        source_ip: IpAddr,
    ) -> Result<hyper::upgrade::Upgraded, Error> {
        let serial = creds
            .serial(&route.source)
            .ok_or_else(|| Error::NoCertificate(route.source.clone()))?
            .to_owned();
        let slot = {
            let mut tunnels = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
            // Tunnels of a renewed certificate take no new streams (dropping the sender lets
            // them close once their streams end); closed ones go.
            // A slot someone holds is in use; an idle one stays only with an open tunnel
            // (one whose opening failed holds nothing).
            tunnels.retain(|(r, serial), slot| {
                creds.serial(&r.source) == Some(serial.as_str())
                    && (Arc::strong_count(slot) > 1
                        || slot
                            .try_lock()
                            .is_ok_and(|s| s.as_ref().is_some_and(|t| !t.sender.is_closed())))
            });
            Arc::clone(tunnels.entry((route.clone(), serial)).or_default())
        };
        // A stream the peer did not process (refused, or beyond the last stream of its
        // GOAWAY: its agent hands over) is sent once more on a new tunnel, before any byte
        // of the client's; one it may have processed is not (the server would see two).
        let mut tunnel = self.tunnel(&slot, creds, metrics, route, None).await?;
        match open_stream(&mut tunnel.sender, route, target, source_ip).await {
            Err(Error::Stream {
                unprocessed: true, ..
            }) => {
                let replace = Some(tunnel.id);
                let mut tunnel = self.tunnel(&slot, creds, metrics, route, replace).await?;
                open_stream(&mut tunnel.sender, route, target, source_ip).await
            }
            other => other,
        }
        .inspect(|_| metrics.stream_opened(Direction::Outbound))
    }

    /// The slot's tunnel when it takes streams and is not the one to `replace`, else a new
    /// one (another connection may have replaced it already: that one is used).
    async fn tunnel(
        &self,
        slot: &Slot,
        creds: &Credentials,
        metrics: &ProxyMetrics,
        route: &Route,
        replace: Option<u64>,
    ) -> Result<Tunnel, Error> {
        let mut held = slot.lock().await;
        let usable = held
            .as_ref()
            .filter(|t| t.sender.is_ready() && Some(t.id) != replace);
        if let Some(t) = usable {
            return Ok(t.clone());
        }
        let opening = open_tunnel(self.netns.as_deref(), creds, metrics, route);
        let sender = tokio::time::timeout(OPEN_TIMEOUT, opening)
            .await
            .map_err(|_| Error::Connect {
                addr: route.tunnel,
                source: std::io::ErrorKind::TimedOut.into(),
            })??;
        let id = TUNNEL_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = Tunnel { sender, id };
        *held = Some(t.clone());
        Ok(t)
    }
}

/// Whether the peer did not process a stream (RFC 9113 §8.7: it refused it, or the stream
/// is beyond the last one of the peer's GOAWAY), so that it may be sent again.
fn unprocessed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
                    || h2.is_go_away());
        }
        source = s.source();
    }
    false
}

/// A CONNECT stream to `target` on a tunnel.
async fn open_stream(
    sender: &mut SendRequest<Empty<Bytes>>,
    route: &Route,
    target: SocketAddr,
    source_ip: IpAddr,
) -> Result<hyper::upgrade::Upgraded, Error> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .version(http::Version::HTTP_2)
        .header("forwarded", forwarded_for(source_ip))
        .body(Empty::new())
        .map_err(|_| Error::Refused {
            addr: route.tunnel,
            target,
            status: StatusCode::BAD_REQUEST,
        })?;
    let response = sender.try_send_request(request).await.map_err(|e| {
        // A request handed back was never sent.
        let unprocessed = e.message().is_some() || unprocessed(e.error());
        Error::Stream {
            addr: route.tunnel,
            unprocessed,
            source: e.into_error(),
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(Error::Refused {
            addr: route.tunnel,
            target,
            status: response.status(),
        });
    }
    hyper::upgrade::on(response)
        .await
        .map_err(|source| Error::Http {
            addr: route.tunnel,
            source,
        })
}

/// TCP, TLS as the source identity (the server must prove the destination's), HTTP/2.
async fn open_tunnel(
    netns: Option<&super::netns::Netns>,
    creds: &Credentials,
    metrics: &ProxyMetrics,
    route: &Route,
) -> Result<SendRequest<Empty<Bytes>>, Error> {
    let addr = route.tunnel;
    let config = creds
        .client(&route.source, &route.destination)
        .ok_or_else(|| Error::NoCertificate(route.source.clone()))?;
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
    let tls = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(source) => {
            let reason = HandshakeFailure::of(&source);
            metrics.handshake_failed(Direction::Outbound, reason);
            return Err(Error::Handshake {
                addr,
                reason,
                source,
            });
        }
    };
    metrics.handshake_done(Direction::Outbound);
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| Error::Http { addr, source })?;
    let metrics = metrics.clone();
    metrics.tunnel_opened(Direction::Outbound);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(target: "weft::mesh", tunnel = %addr, error = %e, "tunnel closed");
        }
        metrics.tunnel_closed(Direction::Outbound);
    });
    Ok(sender)
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
        Refusal::Forbidden => StatusCode::FORBIDDEN,
        Refusal::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
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
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Inbound) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Refusal>> + Send + 'static,
    T: Abort,
{
    let addr = SocketAddr::from(([0, 0, 0, 0], PORT));
    let accepting = tokio_rustls::TlsAcceptor::from(config).accept(io);
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
    metrics.tunnel_opened(Direction::Inbound);
    let service_metrics = metrics.clone();
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let (open, peer, metrics) = (open.clone(), peer.clone(), service_metrics.clone());
        async move { Ok::<_, Infallible>(stream(request, peer, open, metrics).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service);
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = shutdown => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    metrics.tunnel_closed(Direction::Inbound);
    served.map_err(|source| Error::Http { addr, source })
}

/// One CONNECT stream: the target is connected before the peer is told 200, so that a refused
/// target is a refused stream.
async fn stream<T, F, Fut>(
    request: Request<hyper::body::Incoming>,
    peer: SpiffeId,
    open: F,
    metrics: ProxyMetrics,
) -> Response<Empty<Bytes>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + Abort + 'static,
    F: Fn(Inbound) -> Fut,
    Fut: Future<Output = Result<T, Refusal>>,
{
    let status = |s: StatusCode| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = s;
        r
    };
    if request.method() != Method::CONNECT {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    let source = request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    let upstream = match open(Inbound {
        peer,
        target,
        source,
    })
    .await
    {
        Ok(t) => t,
        Err(refusal) => {
            metrics.stream_refused(refusal);
            return status(status_of(refusal));
        }
    };
    metrics.stream_opened(Direction::Inbound);
    tokio::spawn(async move {
        match hyper::upgrade::on(request).await {
            Ok(upgraded) => {
                let _ = carry(TokioIo::new(upgraded), upstream).await;
            }
            Err(e) => {
                tracing::debug!(target: "weft::mesh", error = %e, "stream upgrade failed");
                upstream.abort();
            }
        }
    });
    status(StatusCode::OK)
}

/// A user connection's socket, which can end with a reset.
pub trait Abort {
    /// Closes with a reset (SO_LINGER 0), not a FIN.
    fn abort(self);
}

impl Abort for TcpStream {
    fn abort(self) {
        let _ = self.set_zero_linger();
    }
}

/// Carries a user connection over a stream: copies both ways until both sides are done; a
/// half-close is passed on. When either side fails the socket is aborted (RFC 9113 8.5: a
/// proxy resets the TCP connection on an error of the stream or of HTTP/2), so that a tunnel
/// that broke is not passed off as an orderly end of a truncated exchange. The other way, a
/// socket's reset only ends the stream (END_STREAM, then CANCEL): hyper's upgraded stream
/// cannot send the CONNECT_ERROR reset the RFC asks for, so the far end sees a close.
pub async fn carry<S, U>(stream: S, mut user: U) -> std::io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let mut stream = stream;
    let copied =
        tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut user, BUFFER, BUFFER).await;
    if copied.is_err() {
        drop(stream);
        user.abort();
    }
    copied
}
