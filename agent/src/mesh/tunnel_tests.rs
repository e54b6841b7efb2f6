//! Tunnels end to end on loopback: mutual TLS with workload certificates, HBONE streams,
//! pooling, and the peers that must be refused.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use super::{
    hbone::{self, Inbound, Pool, Route},
    metrics::{ProxyMetrics, Refusal},
    netns::{self, Role},
    tls::{Credentials, HandshakeFailure},
};
use crate::identity::{
    SpiffeId,
    ca::{Ca, Leaf},
};

struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-tunnel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create");
        Ca::init(&dir, SystemTime::now()).expect("init");
        let ca = Ca::load(&dir).expect("load");
        Self { dir, ca }
    }

    fn leaf(&self, sa: &str) -> Leaf {
        self.ca
            .issue(&id(sa), Duration::from_secs(3600), SystemTime::now())
            .expect("issue")
    }

    /// Credentials trusting this CA's roots, holding `leaves`.
    fn creds(&self, leaves: &[Leaf]) -> Arc<Credentials> {
        let roots: Vec<&[u8]> = self.ca.roots().iter().map(|r| r.der.as_slice()).collect();
        Arc::new(Credentials::new(roots, leaves).expect("credentials"))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", Some(sa))
}

/// Echoes whatever it reads, on loopback.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A tunnel server as `sa` of `creds`: streams go to their `:authority`; what each stream
/// asked for, and each connection's outcome, is reported.
struct Server {
    addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<Inbound>,
    outcomes: mpsc::UnboundedReceiver<Option<HandshakeFailure>>,
    /// Ends the server and every tunnel it serves.
    kill: tokio::task::AbortHandle,
    /// The GOAWAY of each tunnel served so far, not sent yet.
    goaways: Arc<std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>>,
}

impl Server {
    /// Tells the peer of every tunnel served so far to open no more streams there (a GOAWAY);
    /// their streams go on.
    fn go_away(&self) {
        for g in self.goaways.lock().expect("goaways").drain(..) {
            let _ = g.send(());
        }
    }
}

async fn server(creds: &Credentials, sa: &str, metrics: &ProxyMetrics) -> Server {
    let config = creds.server(&id(sa)).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stream_tx, streams) = mpsc::unbounded_channel();
    let (outcome_tx, outcomes) = mpsc::unbounded_channel();
    let metrics = metrics.clone();
    let goaways = Arc::new(std::sync::Mutex::new(Vec::new()));
    let pending_goaways = Arc::clone(&goaways);
    let accepting = tokio::spawn(async move {
        let mut tunnels = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, metrics) = (Arc::clone(&config), metrics.clone());
            let (stream_tx, outcome_tx) = (stream_tx.clone(), outcome_tx.clone());
            let (goaway_tx, goaway) = tokio::sync::oneshot::channel();
            pending_goaways.lock().expect("goaways").push(goaway_tx);
            tunnels.spawn(async move {
                let open = move |inbound: Inbound| {
                    let tx = stream_tx.clone();
                    async move {
                        let target = inbound.target;
                        let _ = tx.send(inbound);
                        deliver(target).await
                    }
                };
                let shutdown = async move {
                    if goaway.await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                let outcome = match hbone::serve(tcp, config, metrics, || {}, open, shutdown).await
                {
                    Err(hbone::Error::Handshake { reason, .. }) => Some(reason),
                    _ => None,
                };
                let _ = outcome_tx.send(outcome);
            });
        }
    });
    Server {
        addr,
        streams,
        outcomes,
        kill: accepting.abort_handle(),
        goaways,
    }
}

fn route(client: &str, server: &str, tunnel: SocketAddr) -> Route {
    Route {
        source: id(client),
        destination: id(server),
        tunnel,
    }
}

fn source_ip() -> IpAddr {
    "10.1.0.7".parse().expect("ip")
}

/// Writes `text` through a stream and reads it back.
async fn round_trip(mut io: hbone::Stream, text: &[u8]) -> Vec<u8> {
    io.write_all(text).await.expect("write");
    let mut back = vec![0u8; text.len()];
    io.read_exact(&mut back).await.expect("read");
    back
}

/// The value of a sample in the registry's exposition.
fn sample(registry: &Registry, series: &str) -> f64 {
    let text = crate::metrics::encode(registry);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn counter(registry: &Registry, name: &str, labels: &str) -> f64 {
    sample(registry, &format!("{name}_total{{{labels}}}"))
}

const OUTBOUND_TUNNELS: &str = "mesh_tunnels_open{direction=\"outbound\"}";

/// Waits (up to 10 s) until the registry counts `want` outbound tunnels open: a tunnel is
/// counted closed once its connection's task has ended.
async fn outbound_tunnels_become(registry: &Registry, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sample(registry, OUTBOUND_TUNNELS) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {want} open in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A stream reaches its target with the client's identity verified and its source named;
/// a second stream of the same route reuses the tunnel.
#[tokio::test]
async fn streams_carry_bytes_name_their_source_and_share_one_handshake() {
    let Served {
        creds,
        registry,
        metrics,
        mut server,
        ..
    } = serving("pool").await;
    let target = echo().await;
    let pool = Pool::default();
    let r = route("web", "db", server.addr);
    for text in [&b"ping"[..], b"pong"] {
        let stream = pool
            .connect(
                &creds,
                &metrics,
                &r,
                (target, source_ip()),
                &mut tokio::io::empty(),
            )
            .await
            .expect("stream");
        assert_eq!(round_trip(stream, text).await, text);
        let inbound = server.streams.recv().await.expect("inbound");
        assert_eq!(
            inbound,
            Inbound {
                peer: id("web"),
                target,
                source: Some(source_ip()),
            }
        );
    }
    assert_eq!(
        counter(&registry, "mesh_handshakes", "direction=\"outbound\""),
        1.0
    );
    assert_eq!(
        counter(&registry, "mesh_handshakes", "direction=\"inbound\""),
        1.0
    );
    assert_eq!(
        counter(&registry, "mesh_streams", "direction=\"outbound\""),
        2.0
    );
    assert_eq!(
        counter(&registry, "mesh_streams", "direction=\"inbound\""),
        2.0
    );
}

/// A server whose certificate the client must not accept: the stream is not opened and the
/// reason is counted on both sides.
#[tokio::test]
async fn servers_outside_the_bundle_without_an_id_expired_or_someone_else_are_refused() {
    let pki = Pki::new("server-refused");
    let other = Pki::new("server-other");
    let past = SystemTime::now() - Duration::from_secs(7200);
    let no_uri = pki
        .ca
        .issue_with_names(
            &id("db"),
            vec![rcgen::SanType::DnsName("db.shop".try_into().expect("dns"))],
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .expect("issue");
    let cases = [
        ("another CA", other.leaf("db"), HandshakeFailure::UnknownCa),
        ("no SPIFFE ID", no_uri, HandshakeFailure::NoSpiffeId),
        (
            "expired",
            pki.ca
                .issue(&id("db"), Duration::from_secs(60), past)
                .expect("issue"),
            HandshakeFailure::Expired,
        ),
        (
            "someone else",
            pki.leaf("cache"),
            HandshakeFailure::WrongIdentity,
        ),
    ];
    let client = pki.creds(&[pki.leaf("web")]);
    for (what, leaf, want) in cases {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::new(&mut registry);
        let served = pki.creds(std::slice::from_ref(&leaf));
        let mut server = server(&served, &leaf.id.service_account, &metrics).await;
        let e = Pool::default()
            .connect(
                &client,
                &metrics,
                &route("web", "db", server.addr),
                (echo().await, source_ip()),
                &mut tokio::io::empty(),
            )
            .await
            .expect_err(what);
        let reason = match e {
            hbone::Error::Handshake { reason, .. } => reason,
            other => panic!("{what}: {other}"),
        };
        assert_eq!(reason, want, "{what}");
        let label = format!("direction=\"outbound\",reason=\"{}\"", want.as_str());
        assert_eq!(
            counter(&registry, "mesh_handshake_failures", &label),
            1.0,
            "{what}"
        );
        assert_eq!(
            server.outcomes.recv().await.expect("outcome"),
            Some(HandshakeFailure::PeerRefused),
            "{what}"
        );
    }
}

/// A client the server must not accept (another CA, no SPIFFE ID, expired): refused and
/// counted by the server.
#[tokio::test]
async fn clients_outside_the_bundle_without_an_id_or_expired_are_refused() {
    let pki = Pki::new("client-refused");
    let other = Pki::new("client-other");
    let no_uri = pki
        .ca
        .issue_with_names(
            &id("web"),
            vec![rcgen::SanType::DnsName("web.shop".try_into().expect("dns"))],
            Duration::from_secs(3600),
            SystemTime::now(),
        )
        .expect("issue");
    let expired = pki
        .ca
        .issue(
            &id("web"),
            Duration::from_secs(60),
            SystemTime::now() - Duration::from_secs(7200),
        )
        .expect("issue");
    let cases = [
        ("another CA", other.leaf("web"), HandshakeFailure::UnknownCa),
        ("no SPIFFE ID", no_uri, HandshakeFailure::NoSpiffeId),
        ("expired", expired, HandshakeFailure::Expired),
    ];
    for (what, leaf, want) in cases {
        let mut registry = Registry::default();
        let metrics = ProxyMetrics::new(&mut registry);
        let served = pki.creds(&[pki.leaf("db")]);
        let mut server = server(&served, "db", &metrics).await;
        let client_metrics = ProxyMetrics::new(&mut Registry::default());
        // The client trusts the server's CA, whatever signed its own certificate.
        let client = pki.creds(&[leaf]);
        let result = Pool::default()
            .connect(
                &client,
                &client_metrics,
                &route("web", "db", server.addr),
                (echo().await, source_ip()),
                &mut tokio::io::empty(),
            )
            .await;
        assert!(result.is_err(), "{what}: a stream was opened");
        assert_eq!(
            server.outcomes.recv().await.expect("outcome"),
            Some(want),
            "{what}"
        );
        let label = format!("direction=\"inbound\",reason=\"{}\"", want.as_str());
        assert_eq!(
            counter(&registry, "mesh_handshake_failures", &label),
            1.0,
            "{what}"
        );
        assert!(
            server.streams.try_recv().is_err(),
            "{what}: no stream reached the target"
        );
    }
}

/// New credentials (a renewed certificate) open a new tunnel; a stream opened before keeps
/// working on the old one.
#[tokio::test]
async fn a_renewed_certificate_opens_a_new_tunnel_and_old_streams_keep_working() {
    let pki = Pki::new("renew");
    let db = pki.leaf("db");
    let before = pki.creds(&[pki.leaf("web"), db.clone()]);
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new(&mut registry);
    let mut server = server(&before, "db", &metrics).await;
    let target = echo().await;
    let pool = Pool::default();
    let r = route("web", "db", server.addr);
    let old = pool
        .connect(
            &before,
            &metrics,
            &r,
            (target, source_ip()),
            &mut tokio::io::empty(),
        )
        .await
        .expect("stream");
    let mut old = old;
    let after = pki.creds(&[pki.leaf("web"), db]);
    let new = pool
        .connect(
            &after,
            &metrics,
            &r,
            (target, source_ip()),
            &mut tokio::io::empty(),
        )
        .await
        .expect("stream");
    assert_eq!(round_trip(new, b"new").await, b"new");
    old.write_all(b"old").await.expect("write");
    let mut back = [0u8; 3];
    old.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"old");
    assert_eq!(
        counter(&registry, "mesh_handshakes", "direction=\"outbound\""),
        2.0
    );
    let _ = server.streams.recv().await;
    // The old tunnel ends with its last stream; the new one stays pooled.
    drop(old);
    outbound_tunnels_become(&registry, 1.0).await;
}

/// A PKI named `name` with leaves for `web` and `db`, the proxy's metrics, and a tunnel
/// server as `db`.
struct Served {
    creds: Arc<Credentials>,
    registry: Registry,
    metrics: ProxyMetrics,
    server: Server,
}

async fn serving(name: &str) -> Served {
    let pki = Pki::new(name);
    let creds = pki.creds(&[pki.leaf("web"), pki.leaf("db")]);
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::new(&mut registry);
    let server = server(&creds, "db", &metrics).await;
    Served {
        creds,
        registry,
        metrics,
        server,
    }
}

/// A stream from `web` to `target` through a tunnel to a server as `db` (a PKI of its own,
/// named `name`), with that server (killing it breaks the tunnel).
async fn stream_to(name: &str, target: SocketAddr) -> (Server, hbone::Stream) {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving(name).await;
    let stream = Pool::default()
        .connect(
            &creds,
            &metrics,
            &route("web", "db", server.addr),
            (target, source_ip()),
            &mut tokio::io::empty(),
        )
        .await
        .expect("stream");
    (server, stream)
}

/// A test tunnel server's delivery to `target`, armed as the proxy's are born.
async fn deliver(target: SocketAddr) -> Result<TcpStream, Refusal> {
    let delivered = TcpStream::connect(target)
        .await
        .map_err(|_| Refusal::Unreachable)?;
    delivered.set_zero_linger().expect("SO_LINGER");
    Ok(delivered)
}

/// A listener made as the proxy's outbound listeners are ([`Role::Outbound`]: what it
/// accepts is armed from birth), on a free loopback port.
fn outbound_listener() -> TcpListener {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = netns::listener(any, Role::Outbound).expect("listen");
    TcpListener::from_std(listener).expect("a runtime listener")
}

/// A client's captured connection: (the application's end, the proxy's end, accepted as
/// the proxy accepts it).
pub(super) async fn user_connection() -> (TcpStream, TcpStream) {
    let listener = outbound_listener();
    let app = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (proxied, _) = listener.accept().await.expect("accept");
    (app, proxied)
}

/// A delivery to a server: (the proxy's end, armed as delivery sockets are born, the
/// server's end).
pub(super) async fn delivery_connection() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let delivered = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    delivered.set_zero_linger().expect("SO_LINGER");
    let (server, _) = listener.accept().await.expect("accept");
    (delivered, server)
}

/// A send buffer that can queue `queue` bytes. It is kept small: the kernel caps it at
/// `net.core.wmem_max`, 208 KiB by default, and counts each small segment's overhead
/// against it.
fn send_buffer(queue: usize) -> u32 {
    u32::try_from(4 * queue).expect("a buffer size")
}

/// [`user_connection`] where the application's end reads with the smallest window and the
/// proxy's end can queue `queue` bytes for it (an accepted socket has its listener's
/// buffer sizes): what the proxy writes stays in its socket until the application reads.
pub(super) async fn slow_reader_connection(queue: usize) -> (TcpStream, TcpStream) {
    let listener = outbound_listener();
    let size = i32::try_from(send_buffer(queue)).expect("a buffer size");
    netns::set_int(
        listener.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        size,
    )
    .expect("SO_SNDBUF");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let app = socket
        .connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (proxied, _) = listener.accept().await.expect("accept");
    (app, proxied)
}

/// [`delivery_connection`] where the server's end reads with the smallest window and the
/// proxy's end can queue `queue` bytes for it.
pub(super) async fn slow_server_connection(queue: usize) -> (TcpStream, TcpStream) {
    let listening = tokio::net::TcpSocket::new_v4().expect("socket");
    listening.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    listening
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = listening.listen(1).expect("listen");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_send_buffer_size(send_buffer(queue))
        .expect("SO_SNDBUF");
    let delivered = socket
        .connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    delivered.set_zero_linger().expect("SO_LINGER");
    let (server, _) = listener.accept().await.expect("accept");
    (delivered, server)
}

/// A tunnel that breaks under a carried connection ends it with a reset, not with the
/// orderly close that would pass a truncated exchange off as complete.
#[tokio::test]
async fn a_broken_tunnel_resets_the_connection_it_carried() {
    let (server, stream) = stream_to("broken", echo().await).await;
    let (mut app, proxied) = user_connection().await;
    let carried = tokio::spawn(hbone::carry(stream, proxied));
    app.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    app.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"ping");
    server.kill.abort();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest))
        .await
        .expect("the connection ends");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(carried.await.expect("join").is_err());
}

/// A carry that stops in the middle of an exchange without ending it (its task dropped, as
/// all of them are when the agent is killed) leaves the user's connection to close with a
/// reset, not a FIN that a client reading to the end would take for the whole answer; an
/// exchange carried to its end still ends in order, every byte read after the close.
#[tokio::test]
async fn a_carry_dropped_mid_exchange_resets_the_connection() {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving("dropped").await;
    let target = echo().await;
    let pool = Pool::default();
    let r = route("web", "db", server.addr);
    let mut nothing = tokio::io::empty();
    let stream = pool.connect(&creds, &metrics, &r, (target, source_ip()), &mut nothing);
    let (mut app, proxied) = user_connection().await;
    let carried = tokio::spawn(hbone::carry(stream.await.expect("stream"), proxied));
    app.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    app.read_exact(&mut back).await.expect("read");
    carried.abort();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut rest))
        .await
        .expect("the connection ends");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let stream = pool.connect(&creds, &metrics, &r, (target, source_ip()), &mut nothing);
    let (mut app, proxied) = user_connection().await;
    let carried = tokio::spawn(hbone::carry(stream.await.expect("stream"), proxied));
    app.write_all(b"ping").await.expect("write");
    app.shutdown().await.expect("shutdown");
    // Read only once the carry is over and its socket closed: what it sent is still there.
    assert_eq!(carried.await.expect("join").expect("carried"), (4, 4));
    let mut all = Vec::new();
    app.read_to_end(&mut all).await.expect("an orderly end");
    assert_eq!(all, b"ping");
}

/// An exchange carried to its end closes the user's socket with a FIN, after every byte it
/// still holds: an answer that has not reached a slow reader yet (queued in the proxy's
/// socket behind the reader's full window when the carry ends) is not thrown away by a
/// reset left armed.
#[tokio::test]
async fn an_answer_queued_for_a_slow_reader_is_delivered_whole_after_the_carry() {
    const ANSWER: usize = 64 << 10;
    // Reads the request to its end, answers ANSWER bytes and closes.
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = target.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = target.accept().await.expect("accept");
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.expect("request");
        s.write_all(&[7u8; ANSWER]).await.expect("answer");
    });
    let (_server, stream) = stream_to("queued", addr).await;
    let (mut app, proxied) = slow_reader_connection(ANSWER).await;
    app.write_all(b"ping").await.expect("write");
    app.shutdown().await.expect("shutdown");
    let carried = tokio::time::timeout(Duration::from_secs(10), hbone::carry(stream, proxied));
    assert_eq!(
        carried
            .await
            .expect("the answer fits the proxy's socket")
            .expect("carried"),
        (4, ANSWER as u64)
    );
    let mut all = Vec::new();
    app.read_to_end(&mut all).await.expect("an orderly end");
    assert_eq!(all.len(), ANSWER);
}

/// A reset crosses the tunnel either way as a reset (RST_STREAM with CONNECT_ERROR between
/// the agents), not as an orderly close: the client's reaches the server, the server's the
/// client.
#[tokio::test]
async fn a_reset_crosses_the_tunnel_either_way() {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving("reset").await;
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let r = route("web", "db", server.addr);
    let pool = Pool::default();
    for client_resets in [true, false] {
        let stream = pool
            .connect(
                &creds,
                &metrics,
                &r,
                (target.local_addr().expect("addr"), source_ip()),
                &mut tokio::io::empty(),
            )
            .await
            .expect("stream");
        let (mut app, proxied) = user_connection().await;
        tokio::spawn(hbone::carry(stream, proxied));
        app.write_all(b"hi").await.expect("write");
        let (mut served, _) = target.accept().await.expect("accept");
        let mut hi = [0u8; 2];
        served.read_exact(&mut hi).await.expect("read");
        let (resets, mut sees) = if client_resets {
            (app, served)
        } else {
            (served, app)
        };
        resets.set_zero_linger().expect("linger");
        drop(resets);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), sees.read_to_end(&mut rest))
            .await
            .expect("the connection ends");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the {} reset",
            if client_resets { "client" } else { "server" }
        );
    }
}

/// What a user connection sent before its stream was opened (one read, taken while the
/// request waits for its answer) reaches the server once, before what follows.
async fn early_bytes_arrive_once(pool: &Pool, creds: &Credentials, r: &Route, target: SocketAddr) {
    let metrics = ProxyMetrics::new(&mut Registry::default());
    let (mut app, mut proxied) = user_connection().await;
    app.write_all(b"first ").await.expect("write");
    proxied.readable().await.expect("readable");
    let stream = pool
        .connect(creds, &metrics, r, (target, source_ip()), &mut proxied)
        .await
        .expect("stream");
    tokio::spawn(hbone::carry(stream, proxied));
    app.write_all(b"then").await.expect("write");
    let mut back = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .expect("read");
    assert_eq!(&back, b"first then");
}

#[tokio::test]
async fn the_first_bytes_go_with_the_request_and_arrive_once() {
    let Served { creds, server, .. } = serving("early").await;
    let r = route("web", "db", server.addr);
    early_bytes_arrive_once(&Pool::default(), &creds, &r, echo().await).await;
}

/// The HTTP/2 server end of a tunnel accepted as `config` (TLS without the proxy's checks).
async fn raw_h2(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, hyper::body::Bytes> {
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(tcp)
        .await
        .expect("tls");
    h2::server::handshake(tls).await.expect("h2")
}

/// A tunnel server whose first tunnel refuses every stream unprocessed (REFUSED_STREAM), and
/// whose later tunnels carry them to their `:authority`.
async fn refusing_first(creds: &Credentials, sa: &str) -> SocketAddr {
    let config = creds.server(&id(sa)).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = ProxyMetrics::new(&mut Registry::default());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let first = raw_h2(Arc::clone(&config), tcp);
        let refusing = async move {
            let mut conn = first.await;
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        };
        tokio::spawn(refusing);
        while let Ok((tcp, _)) = listener.accept().await {
            let open = |inbound: Inbound| deliver(inbound.target);
            let never = std::future::pending();
            let serving = hbone::serve(
                tcp,
                Arc::clone(&config),
                metrics.clone(),
                || {},
                open,
                never,
            );
            tokio::spawn(serving);
        }
    });
    addr
}

/// A stream the peer did not process is sent again on a new tunnel with the first bytes
/// again: they arrive once, neither lost nor doubled.
#[tokio::test]
async fn a_stream_sent_again_carries_its_first_bytes_again() {
    let pki = Pki::new("early-again");
    let creds = pki.creds(&[pki.leaf("web"), pki.leaf("db")]);
    let addr = refusing_first(&creds, "db").await;
    let r = route("web", "db", addr);
    early_bytes_arrive_once(&Pool::default(), &creds, &r, echo().await).await;
}

/// A half-close crosses the tunnel (END_STREAM, then a shutdown of the far socket) and the
/// other direction keeps flowing until its own end.
#[tokio::test]
async fn a_half_close_crosses_and_the_answer_still_comes_back() {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving("half").await;
    let target = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = target.local_addr().expect("addr");
    let answering = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.expect("accept");
        let mut asked = Vec::new();
        s.read_to_end(&mut asked).await.expect("read to the end");
        s.write_all(b"answer").await.expect("write");
        asked
    });
    let (mut app, proxied) = user_connection().await;
    let stream = Pool::default()
        .connect(
            &creds,
            &metrics,
            &route("web", "db", server.addr),
            (addr, source_ip()),
            &mut tokio::io::empty(),
        )
        .await
        .expect("stream");
    let carried = tokio::spawn(async move { hbone::carry(stream, proxied).await });
    app.write_all(b"ask").await.expect("write");
    app.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut answer))
        .await
        .expect("the answer and its end in time")
        .expect("read");
    assert_eq!(answer, b"answer");
    assert_eq!(answering.await.expect("join"), b"ask");
    assert_eq!(carried.await.expect("join").expect("carried"), (3, 6));
}

/// A tunnel server that answers a stream only once its first bytes arrived, and sends them
/// back: a client that waited for the answer before sending would wait for ever.
async fn answering_after_data(creds: &Credentials, sa: &str) -> SocketAddr {
    let config = creds.server(&id(sa)).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = raw_h2(config, tcp).await;
        let Some(Ok((request, mut respond))) = conn.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let first = request.into_body().data().await;
            let ok = http::Response::builder().status(200).body(()).expect("ok");
            let mut send = respond.send_response(ok, false).expect("respond");
            if let Some(Ok(first)) = first {
                send.send_data(first, false).expect("send");
            }
            // Open until the test ends (a dropped stream is reset).
            std::future::pending::<()>().await;
        });
        while conn.accept().await.is_some() {}
    });
    addr
}

#[tokio::test]
async fn the_first_bytes_are_sent_before_the_answer() {
    let pki = Pki::new("early-before");
    let creds = pki.creds(&[pki.leaf("web"), pki.leaf("db")]);
    let metrics = ProxyMetrics::new(&mut Registry::default());
    let r = route("web", "db", answering_after_data(&creds, "db").await);
    let (mut app, mut proxied) = user_connection().await;
    app.write_all(b"first").await.expect("write");
    proxied.readable().await.expect("readable");
    let target = SocketAddr::from(([127, 0, 0, 1], 9));
    let pool = Pool::default();
    let connecting = pool.connect(&creds, &metrics, &r, (target, source_ip()), &mut proxied);
    let stream = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("answered in time")
        .expect("stream");
    tokio::spawn(hbone::carry(stream, proxied));
    let mut back = [0u8; 5];
    app.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"first");
}

/// A user that sent everything and its end before the answer: the bytes and then the end
/// reach the server, and the server's answer and end come back.
#[tokio::test]
async fn a_user_done_before_the_answer_is_carried_whole() {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving("early-end").await;
    let r = route("web", "db", server.addr);
    let (mut app, mut proxied) = user_connection().await;
    app.write_all(b"all of it").await.expect("write");
    app.shutdown().await.expect("half-close");
    proxied.readable().await.expect("readable");
    let stream = Pool::default()
        .connect(
            &creds,
            &metrics,
            &r,
            (echo().await, source_ip()),
            &mut proxied,
        )
        .await
        .expect("stream");
    tokio::spawn(hbone::carry(stream, proxied));
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut back))
        .await
        .expect("the echo and its end in time")
        .expect("read");
    assert_eq!(back, b"all of it");
}

/// A connection over a tunnel of `pool`: one round trip, the stream kept.
async fn connected(
    pool: &Pool,
    creds: &Credentials,
    metrics: &ProxyMetrics,
    r: &Route,
    target: SocketAddr,
) -> hbone::Stream {
    let mut stream = pool
        .connect(
            creds,
            metrics,
            r,
            (target, source_ip()),
            &mut tokio::io::empty(),
        )
        .await
        .expect("stream");
    stream.write_all(b"hi").await.expect("write");
    let mut back = [0u8; 2];
    stream.read_exact(&mut back).await.expect("read");
    stream
}

/// A tunnel no connection has used for the pool's idle time is closed (its server sees it
/// end), and the next connection opens another.
#[tokio::test]
async fn an_unused_tunnel_is_closed_and_the_next_connection_opens_another() {
    let Served {
        creds,
        registry,
        metrics,
        mut server,
        ..
    } = serving("idle").await;
    let target = echo().await;
    let pool = Pool::new(None, Duration::from_millis(300));
    let r = route("web", "db", server.addr);
    drop(connected(&pool, &creds, &metrics, &r, target).await);
    let ended = tokio::time::timeout(Duration::from_secs(10), server.outcomes.recv()).await;
    assert_eq!(ended.expect("closed in time"), Some(None));
    outbound_tunnels_become(&registry, 0.0).await;
    let _again = connected(&pool, &creds, &metrics, &r, target).await;
    assert_eq!(
        counter(&registry, "mesh_handshakes", "direction=\"outbound\""),
        2.0
    );
    assert_eq!(sample(&registry, OUTBOUND_TUNNELS), 1.0);
}

/// A tunnel stays while a connection holds a stream on it, however long: that stream keeps
/// working and new connections share the tunnel.
#[tokio::test]
async fn a_tunnel_in_use_is_kept_past_the_idle_time() {
    let Served {
        creds,
        registry,
        metrics,
        server,
        ..
    } = serving("in-use").await;
    let target = echo().await;
    let pool = Pool::new(None, Duration::from_millis(200));
    let r = route("web", "db", server.addr);
    let held = connected(&pool, &creds, &metrics, &r, target).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _second = connected(&pool, &creds, &metrics, &r, target).await;
    assert_eq!(
        counter(&registry, "mesh_handshakes", "direction=\"outbound\""),
        1.0
    );
    assert_eq!(sample(&registry, OUTBOUND_TUNNELS), 1.0);
    assert_eq!(round_trip(held, b"still").await, b"still");
}

/// A tunnel replaced while one of its streams goes on (its peer said GOAWAY) does not keep
/// its route from new connections once the idle time has passed: they get a tunnel in time,
/// and the old stream keeps working.
#[tokio::test]
async fn a_replaced_tunnel_does_not_hold_up_its_route() {
    let Served {
        creds,
        metrics,
        server,
        ..
    } = serving("replaced").await;
    let target = echo().await;
    let pool = Pool::new(None, Duration::from_millis(300));
    let r = route("web", "db", server.addr);
    let held = connected(&pool, &creds, &metrics, &r, target).await;
    server.go_away();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(connected(&pool, &creds, &metrics, &r, target).await);
    // Past the idle time of both: the first (in use) is no longer its slot's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = tokio::time::timeout(
        Duration::from_secs(5),
        connected(&pool, &creds, &metrics, &r, target),
    )
    .await
    .expect("a tunnel in time");
    assert_eq!(round_trip(later, b"later").await, b"later");
    assert_eq!(round_trip(held, b"held").await, b"held");
}
