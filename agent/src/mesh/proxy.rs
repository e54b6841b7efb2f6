//! The node proxy: for each local meshed pod, listeners inside the pod's network namespace
//! (outbound on loopback, inbound HBONE on the pod's addresses), and the connections between
//! them and the tunnels.
//!
//! Outbound: the kernel sent the pod's connect to the loopback listener and left where it was
//! going in `MESH_ORIG`; the proxy opens (or reuses) a tunnel as the pod's identity to the
//! destination pod's address, port 15008, requiring the destination's identity, and splices.
//! Inbound: a tunnel's peer must chain to the bundle; each stream must target this pod and
//! name, in `Forwarded`, a source address that belongs to a pod of the peer's identity. The
//! connection is delivered from inside the pod with that source address, so the server and
//! NetworkPolicy see the client pod as without the mesh.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use weft_abi::{
    IPPROTO_TCP,
    mesh::{INBOUND_PORT, MeshOrig, MeshOrigKey},
    net::{Direction, Family},
    svc::Endpoint,
};

use super::{
    hbone::{self, Abort as _, Inbound, Pool, Route},
    metrics::{ProxyMetrics, Refusal},
    netns::{Netns, Role},
    tls::Credentials,
};
use crate::{
    compile::authz::{self, Connection},
    datapath::Pins,
    events::Transport,
    identity::SpiffeId,
    sync::policy::kernel::KernelTables,
};

/// A delivery that does not connect in this time is refused (a server that does not
/// answer).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// A delivery not connected this soon asks the kernel's policy tables: when the pod's
/// NetworkPolicy refuses the caller, the kernel dropped the SYN, and the caller is refused
/// then, not at [`DELIVERY_TIMEOUT`]. A SYN that is answered is answered far sooner.
const UNANSWERED: Duration = Duration::from_millis(100);
/// Inbound TLS handshakes in progress at once, over all pods (a peer that opens connections
/// and never finishes them holds no more than this).
const MAX_HANDSHAKES: usize = 1024;
/// An accept that fails (out of descriptors) is tried again after this.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A local meshed pod as the proxy serves it.
#[derive(Debug, Clone)]
pub struct MeshedPod {
    /// `namespace/name`.
    pub pod: String,
    pub id: SpiffeId,
    pub ips: Vec<IpAddr>,
    /// Its network namespace (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub netns: PathBuf,
    /// The namespace's inode: the same namespace through another process's path is the
    /// same pod to serve.
    pub netns_inode: u64,
}

impl PartialEq for MeshedPod {
    fn eq(&self, other: &Self) -> bool {
        self.pod == other.pod
            && self.id == other.id
            && self.ips == other.ips
            && self.netns_inode == other.netns_inode
    }
}

/// A pod served, and its namespace.
type ServedPod = (Arc<MeshedPod>, Arc<Netns>);

/// The listeners of each pod (`namespace/name`), or why it has none.
pub type Listeners = Arc<RwLock<BTreeMap<String, Result<Vec<SocketAddr>, String>>>>;

pub use super::carried::{Carried, Directory};

/// What every connection task reads.
#[derive(Debug)]
pub struct Shared {
    pub creds: RwLock<Arc<Credentials>>,
    /// Who is meshed, and which connections the mesh carried (telemetry reads it).
    pub carried: Arc<Carried>,
    orig: Mutex<BpfHashMap<MapData, MeshOrigKey, MeshOrig>>,
    /// The instance's pins: the kernel's policy tables are opened from them.
    pins: Pins,
    pool: Pool,
    pub metrics: ProxyMetrics,
    /// The host's procfs (pods' sysctls are written through it).
    host_proc: PathBuf,
    /// The node's network namespace, which no pod's may be.
    host_cookie: u64,
    /// Addresses of this node's pods: a tunnel never carries a connection from one (they
    /// are never tunnelled), so a stream naming one as its source is forged.
    pub local: RwLock<Arc<std::collections::BTreeSet<IpAddr>>>,
    /// The cgroup id of each pod of this node whose cgroup exists (`namespace/name`): the key
    /// of its policy in the kernel. Apart from the pods served, which a new id must not
    /// restart.
    pub cgroups: RwLock<BTreeMap<String, u64>>,
    /// Every pod served, with its namespace: a captured connection to one of them is
    /// delivered on the node.
    pods: RwLock<BTreeMap<String, ServedPod>>,
    /// TLS handshakes in progress on the inbound listeners.
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Set once the listeners are to close (a successor listens); connections go on.
    stop: tokio::sync::watch::Sender<bool>,
    /// User connections in progress: outbound ones, and streams delivered inbound.
    active: Arc<tokio::sync::watch::Sender<usize>>,
}

/// One user connection in progress, counted in [`Shared::active`] while it lives.
#[derive(Debug)]
struct Active(Arc<tokio::sync::watch::Sender<usize>>);

impl Active {
    fn new(counter: &Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(Arc::clone(counter))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A delivered stream's connection to the server, counted while it is open.
#[derive(Debug)]
struct Delivered {
    stream: TcpStream,
    _active: Active,
}

impl hbone::Abort for Delivered {
    fn orderly(&self) {
        self.stream.orderly();
    }

    fn abort(self) {
        self.stream.abort();
    }
}

impl tokio::io::AsyncRead for Delivered {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Delivered {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Shared {
    pub fn new(
        (orig, pins): (BpfHashMap<MapData, MeshOrigKey, MeshOrig>, Pins),
        creds: Arc<Credentials>,
        metrics: ProxyMetrics,
        node: Option<Arc<Netns>>,
        host: (PathBuf, u64),
        tunnel_idle: Duration,
    ) -> Self {
        Self {
            creds: RwLock::new(creds),
            carried: Arc::new(Carried::new(metrics.clone())),
            orig: Mutex::new(orig),
            pins,
            pool: Pool::new(node, tunnel_idle),
            metrics,
            host_proc: host.0,
            host_cookie: host.1,
            local: RwLock::default(),
            cgroups: RwLock::default(),
            pods: RwLock::default(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            stop: tokio::sync::watch::Sender::new(false),
            active: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Resolves once the listeners are to close.
    async fn stopping(&self) {
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    }

    fn creds(&self) -> Arc<Credentials> {
        Arc::clone(&self.creds.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn identity_of(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.carried.identity_of(ip)
    }

    /// The served pod that holds address `ip`, and its namespace.
    fn served_at(&self, ip: IpAddr) -> Option<ServedPod> {
        let holder = self.carried.holder(ip)?;
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.get(&holder)
            .map(|(p, n)| (Arc::clone(p), Arc::clone(n)))
    }

    /// Decides a connection to served pod `pod` on its security policy and counts the
    /// decision; a refusal is counted too, and recorded for the flows (carried by
    /// `transport`; the caller's port is not known here).
    fn authorized(
        &self,
        pod: &str,
        c: &Connection<'_>,
        transport: Transport,
    ) -> Result<authz::Decision, Refusal> {
        let decision = self.carried.decide(pod, c);
        if let Some(d) = &decision {
            self.metrics.authorization(d);
        }
        if let Some(d) = decision.clone().filter(|d| d.allowed) {
            return Ok(d);
        }
        tracing::debug!(target: "weft::mesh", pod, peer = ?c.identity.map(ToString::to_string), source = %c.source, "refused by the pod's authorization policy");
        let server = SocketAddr::new(c.destination, c.port);
        self.carried
            .refused(SocketAddr::new(c.source, 0), server, transport, decision);
        Err(Refusal::Unauthorized)
    }

    /// Where the connection from `peer` (in namespace `cookie`) was going; its entry goes.
    fn take_orig(&self, cookie: u64, peer: SocketAddr) -> Option<MeshOrig> {
        let key = MeshOrigKey {
            netns_cookie: cookie,
            port: peer.port(),
            family: if peer.is_ipv4() { 4 } else { 6 },
            _pad: [0; 5],
        };
        let mut map = self.orig.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok();
        let _ = map.remove(&key);
        orig
    }
}

/// The listeners of one pod: their tasks end when it is dropped.
#[derive(Debug)]
struct Served {
    pod: MeshedPod,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The proxy of every local meshed pod.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    served: BTreeMap<String, Served>,
    /// Listeners each pod has, or why it has none (for `weft certs` and `weft status`).
    pub listeners: Listeners,
    /// Told when `listeners` changes.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            served: BTreeMap::new(),
            listeners: Arc::default(),
            changed: Arc::default(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Closes every listener (a successor listens on the same addresses: the connections
    /// waiting in their queues move to its listeners) and tells inbound tunnels' peers to
    /// open no more streams; the connections in progress go on.
    pub fn stop_accepting(&self) {
        self.shared.stop.send_replace(true);
    }

    /// User connections in progress.
    pub fn active(&self) -> usize {
        *self.shared.active.borrow()
    }

    /// Whether every pod served has its listeners up.
    pub fn settled(&self) -> bool {
        let l = self.listeners.read().unwrap_or_else(|e| e.into_inner());
        self.served
            .keys()
            .all(|pod| matches!(l.get(pod), Some(Ok(_))))
    }

    /// Resolves once, after [`Proxy::stop_accepting`], no connection is in progress and
    /// every tunnel has ended.
    pub async fn drained(&mut self) {
        let mut active = self.shared.active.subscribe();
        let _ = active.wait_for(|n| *n == 0).await;
        for served in self.served.values_mut() {
            for task in &mut served.tasks {
                let _ = task.await;
            }
        }
    }

    /// The pod as served now, if it is.
    pub fn served(&self, pod: &str) -> Option<&MeshedPod> {
        self.served.get(pod).map(|s| &s.pod)
    }

    /// Serves exactly `pods`: new ones get listeners, gone or changed ones lose theirs
    /// (connections already spliced keep going).
    pub fn sync(&mut self, pods: &[MeshedPod]) {
        let wanted: BTreeMap<&str, &MeshedPod> = pods.iter().map(|p| (p.pod.as_str(), p)).collect();
        // A pod whose listeners failed (its task ended) is tried again.
        self.served.retain(|name, s| {
            wanted.get(name.as_str()).is_some_and(|p| **p == s.pod)
                && !s.tasks.iter().all(JoinHandle::is_finished)
        });
        {
            let mut l = self.listeners.write().unwrap_or_else(|e| e.into_inner());
            l.retain(|name, _| self.served.contains_key(name));
            self.shared
                .carried
                .retain_pods(|name| self.served.contains_key(name));
        }
        for (name, pod) in wanted {
            if self.served.contains_key(name) {
                continue;
            }
            let task = tokio::spawn(serve_pod(
                Arc::clone(&self.shared),
                pod.clone(),
                Arc::clone(&self.listeners),
                Arc::clone(&self.changed),
            ));
            self.served.insert(
                name.to_owned(),
                Served {
                    pod: pod.clone(),
                    tasks: vec![task],
                },
            );
        }
    }
}

/// Enters the pod's namespace, listens, and accepts until aborted.
async fn serve_pod(
    shared: Arc<Shared>,
    pod: MeshedPod,
    listeners: Listeners,
    changed: Arc<tokio::sync::Notify>,
) {
    let path = pod.netns.clone();
    let (proc_dir, host_cookie) = (shared.host_proc.clone(), shared.host_cookie);
    let opened =
        tokio::task::spawn_blocking(move || open(&path, &proc_dir, host_cookie, &pod)).await;
    let (netns, pod, outbound, inbound) = match opened {
        Ok(Ok(o)) => o,
        Ok(Err((pod, e))) => {
            tracing::error!(target: "weft::mesh", pod, error = %e, "cannot listen in the pod's network namespace; its meshed connections are refused");
            listeners
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pod, Err(e.to_string()));
            changed.notify_one();
            return;
        }
        Err(_) => return,
    };
    let addrs: Vec<SocketAddr> = outbound
        .iter()
        .chain(&inbound)
        .filter_map(|l| l.local_addr().ok())
        .collect();
    tracing::info!(target: "weft::mesh", pod = pod.pod, listeners = ?addrs, "pod meshed");
    listeners
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pod.pod.clone(), Ok(addrs));
    shared
        .carried
        .serving(&pod.pod, netns.cookie, pod.ips.clone());
    changed.notify_one();
    let (pod, netns) = (Arc::new(pod), Arc::new(netns));
    shared
        .pods
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pod.pod.clone(), (Arc::clone(&pod), Arc::clone(&netns)));
    let _registered = Registered {
        shared: Arc::clone(&shared),
        pod: Arc::clone(&pod),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for l in outbound {
        tasks.spawn(accept_outbound(
            Arc::clone(&shared),
            Arc::clone(&pod),
            netns.cookie,
            l,
        ));
    }
    for l in inbound {
        tasks.spawn(accept_inbound(
            Arc::clone(&shared),
            Arc::clone(&pod),
            Arc::clone(&netns),
            l,
        ));
    }
    while tasks.join_next().await.is_some() {}
}

/// A served pod's entry in [`Shared::pods`], removed when its task ends (the pod is no
/// longer served, or changed): its namespace goes with the last connection using it.
struct Registered {
    shared: Arc<Shared>,
    pod: Arc<MeshedPod>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut pods = self.shared.pods.write().unwrap_or_else(|e| e.into_inner());
        // A newer version of the pod may have registered meanwhile: only this one goes.
        if pods
            .get(&self.pod.pod)
            .is_some_and(|(p, _)| Arc::ptr_eq(p, &self.pod))
        {
            pods.remove(&self.pod.pod);
        }
    }
}

type Opened = (Netns, MeshedPod, Vec<TcpListener>, Vec<TcpListener>);

/// The namespace and the listeners (blocking: runs off the runtime's workers).
fn open(
    path: &std::path::Path,
    host_proc: &std::path::Path,
    host_cookie: u64,
    pod: &MeshedPod,
) -> Result<Opened, (String, std::io::Error)> {
    let fail = |e| (pod.pod.clone(), e);
    let netns = Netns::enter(path, host_proc, host_cookie).map_err(fail)?;
    let handle = tokio::runtime::Handle::current();
    let _guard = handle.enter();
    let mut outbound = Vec::new();
    let mut inbound = Vec::new();
    let loopbacks = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for lo in loopbacks {
        if !pod.ips.iter().any(|ip| ip.is_ipv4() == lo.is_ipv4()) {
            continue;
        }
        let l = netns
            .listen(lo, Role::Outbound)
            .and_then(TcpListener::from_std)
            .map_err(fail)?;
        outbound.push(l);
    }
    for ip in &pod.ips {
        let l = netns
            .listen(*ip, Role::Inbound)
            .and_then(TcpListener::from_std)
            .map_err(fail)?;
        inbound.push(l);
    }
    Ok((netns, pod.clone(), outbound, inbound))
}

async fn accept_outbound(shared: Arc<Shared>, pod: Arc<MeshedPod>, cookie: u64, l: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            () = shared.stopping() => return,
        };
        let Ok((client, peer)) = accepted else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let active = Active::new(&shared.active);
        let (shared, pod) = (Arc::clone(&shared), Arc::clone(&pod));
        tokio::spawn(async move {
            outbound(&shared, &pod, cookie, client, peer).await;
            drop(active);
        });
    }
}

fn socket_addr(e: &Endpoint) -> SocketAddr {
    let port = u16::from_be(e.port);
    let ip = match Family::of(e.family) {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::from_be(e.addr[0]))),
        Family::V6 => {
            let mut b = [0u8; 16];
            for (i, w) in e.addr.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
    };
    SocketAddr::new(ip, port)
}

/// One captured connection of `pod`: through a tunnel, or reset.
async fn outbound(
    shared: &Shared,
    pod: &MeshedPod,
    cookie: u64,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    // `client` came armed from its listener (`Role::Outbound`): a close is a reset until
    // the carry ends in order, also while the CONNECT waits with its first bytes read.
    let Some(orig) = shared.take_orig(cookie, peer) else {
        tracing::debug!(target: "weft::mesh", pod = pod.pod, %peer, "no origin for a captured connection");
        return client.abort();
    };
    let target = socket_addr(&orig.target);
    let Some(source_ip) = pod
        .ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == target.is_ipv4())
    else {
        return client.abort();
    };
    let is_local = shared
        .local
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&target.ip());
    if is_local {
        return on_node(shared, pod, client, source_ip, target).await;
    }
    let Some(destination) = shared.identity_of(target.ip()) else {
        tracing::debug!(target: "weft::mesh", pod = pod.pod, %target, "the destination is not in the mesh any more");
        return client.abort();
    };
    let route = Route {
        source: pod.id.clone(),
        destination,
        tunnel: SocketAddr::new(target.ip(), INBOUND_PORT),
    };
    let creds = shared.creds();
    match shared
        .pool
        .connect(
            &creds,
            &shared.metrics,
            &route,
            (target, source_ip),
            &mut client,
        )
        .await
    {
        Ok(stream) => {
            let _ = hbone::carry(stream, client).await;
        }
        Err(e) => {
            tracing::debug!(target: "weft::mesh", pod = pod.pod, %target, error = %crate::chain(&e), "tunnel refused");
            client.abort();
        }
    }
}

/// A captured connection of `pod` to a pod this node serves: decided on the caller's
/// identity and delivered from inside the destination's namespace with the caller's address,
/// without TLS (it never leaves the node). Reset when refused.
async fn on_node(
    shared: &Shared,
    pod: &MeshedPod,
    client: TcpStream,
    source: IpAddr,
    target: SocketAddr,
) {
    let Some((to, netns)) = shared.served_at(target.ip()) else {
        tracing::debug!(target: "weft::mesh", pod = pod.pod, %target, "not the address of a pod of this node the proxy serves");
        return client.abort();
    };
    if is_own_port(target) {
        shared.metrics.stream_refused(Refusal::Forbidden);
        return client.abort();
    }
    let c = Connection {
        source,
        identity: Some(&pod.id),
        destination: target.ip(),
        port: target.port(),
    };
    let delivered = match shared.authorized(&to.pod, &c, Transport::Local) {
        Ok(d) => connect_delivery(shared, &to, &netns, (source, target), d).await,
        Err(r) => Err(r),
    };
    match delivered {
        Ok(server) => {
            splice(client, server).await;
        }
        Err(reason) => {
            shared.metrics.stream_refused(reason);
            client.abort();
        }
    }
}

/// Copies both ways until both ends are done (a half-close is passed on); when either fails,
/// both end with a reset, so a reset reaches the other end as one.
async fn splice<C, S>(mut client: C, mut server: S)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + hbone::Abort,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + hbone::Abort,
{
    // Both came armed (`hbone::Abort`): a reset if the agent dies before both ended in order.
    if tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .is_err()
    {
        client.abort();
        server.abort();
    } else {
        client.orderly();
        server.orderly();
    }
}

async fn accept_inbound(
    shared: Arc<Shared>,
    pod: Arc<MeshedPod>,
    netns: Arc<Netns>,
    l: TcpListener,
) {
    // The pod's tunnels end with its listeners (the pod left the mesh or changed); when a
    // successor takes over they end with their last stream.
    let mut tunnels = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = l.accept() => a,
            Some(_) = tunnels.join_next() => continue,
            () = shared.stopping() => break,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.handshakes).try_acquire_owned() else {
            // Too many handshakes under way: this one is dropped.
            continue;
        };
        let Some(config) = shared.creds().server(&pod.id) else {
            // No certificate for the pod: nothing to prove who it is with.
            drop(tcp);
            continue;
        };
        let (shared, pod, netns) = (Arc::clone(&shared), Arc::clone(&pod), Arc::clone(&netns));
        tunnels.spawn(async move {
            let metrics = shared.metrics.clone();
            let stopping = Arc::clone(&shared);
            let open = move |inbound: Inbound| {
                let (shared, pod, netns) =
                    (Arc::clone(&shared), Arc::clone(&pod), Arc::clone(&netns));
                async move { deliver(&shared, &pod, &netns, inbound).await }
            };
            // The permit counts the handshake only, not the tunnel.
            let handshake_over = move || drop(permit);
            let shutdown = async move { stopping.stopping().await };
            let served = hbone::serve(tcp, config, metrics, handshake_over, open, shutdown).await;
            if let Err(e) = served {
                tracing::debug!(target: "weft::mesh", error = %crate::chain(&e), "inbound tunnel ended");
            }
        });
    }
    drop(l);
    while tunnels.join_next().await.is_some() {}
}

/// Whether a stream may be delivered to the pod with addresses `ips`: it targets the pod,
/// but not the proxy's own inbound port there (a tunnel inside a tunnel, from the pod's
/// address), and its source address is one of the peer's identity's pods, of another node
/// (`local`: this node's pods' addresses, never tunnelled). Returns the source.
pub fn admissible(
    inbound: &Inbound,
    ips: &[IpAddr],
    local: &std::collections::BTreeSet<IpAddr>,
    directory: &Directory,
) -> Result<IpAddr, Refusal> {
    if !ips.contains(&inbound.target.ip()) || is_own_port(inbound.target) {
        return Err(Refusal::Forbidden);
    }
    let source = inbound.source.ok_or(Refusal::Forbidden)?;
    if local.contains(&source) || directory.get(&source) != Some(&inbound.peer) {
        tracing::debug!(target: "weft::mesh", peer = %inbound.peer, %source, "source address not of the peer's identity on another node");
        return Err(Refusal::Forbidden);
    }
    Ok(source)
}

/// Whether `target` is the proxy's own inbound listener in a pod: a delivery there would be
/// a tunnel inside a tunnel, with the caller's address.
fn is_own_port(target: SocketAddr) -> bool {
    target.port() == INBOUND_PORT
}

/// A stream to this pod, from inside its namespace, with the client pod's address.
async fn deliver(
    shared: &Shared,
    pod: &MeshedPod,
    netns: &Netns,
    inbound: Inbound,
) -> Result<Delivered, Refusal> {
    let source = {
        let local = shared.local.read().unwrap_or_else(|e| e.into_inner());
        let directory = shared.carried.directory();
        admissible(&inbound, &pod.ips, &local, &directory)?
    };
    let c = Connection {
        source,
        identity: Some(&inbound.peer),
        destination: inbound.target.ip(),
        port: inbound.target.port(),
    };
    let d = shared.authorized(&pod.pod, &c, Transport::Tunnel)?;
    connect_delivery(shared, pod, netns, (source, inbound.target), d).await
}

/// Connects `target` from inside `pod`'s namespace with address `source`, and tells
/// telemetry the `decision` it was delivered on.
async fn connect_delivery(
    shared: &Shared,
    pod: &MeshedPod,
    netns: &Netns,
    (source, target): (IpAddr, SocketAddr),
    decision: authz::Decision,
) -> Result<Delivered, Refusal> {
    let socket = netns.delivery(source).await.map_err(|e| {
        tracing::warn!(target: "weft::mesh", pod = pod.pod, error = %e, "cannot make a delivery socket");
        Refusal::Unreachable
    })?;
    let socket = TcpSocket::from_std_stream(socket);
    let active = Active::new(&shared.active);
    shared.carried.delivered(source, target, decision);
    let connecting = socket.connect(target);
    tokio::pin!(connecting);
    let connected = match tokio::time::timeout(UNANSWERED, &mut connecting).await {
        Ok(connected) => Some(connected),
        Err(_) if shared.policy_refuses(&pod.pod, source, target.port()) => {
            return Err(Refusal::NetworkPolicy);
        }
        Err(_) => tokio::time::timeout(DELIVERY_TIMEOUT - UNANSWERED, connecting)
            .await
            .ok(),
    };
    match connected {
        Some(Ok(stream)) => Ok(Delivered {
            stream,
            _active: active,
        }),
        _ => Err(Refusal::Unreachable),
    }
}

impl Shared {
    /// Whether `pod`'s NetworkPolicy, as the kernel holds it now, refuses TCP from `source`
    /// to `port`. Judged twice, on tables opened afresh: a judgement that read a policy sync
    /// half way (a pod's new set of entries, the old one's deleted) must not refuse what
    /// both versions allow. Unknown (no cgroup, tables or entries that cannot be read) is
    /// no: the delivery then waits for its timeout, as the kernel decides it.
    fn policy_refuses(&self, pod: &str, source: IpAddr, port: u16) -> bool {
        let cgroups = self.cgroups.read().unwrap_or_else(|e| e.into_inner());
        let Some(&cgroup_id) = cgroups.get(pod) else {
            return false;
        };
        drop(cgroups);
        let refuses = || match KernelTables::open(&self.pins) {
            Ok(tables) => {
                let v = tables.judge(cgroup_id, Direction::Ingress, source, IPPROTO_TCP, port);
                !v.allowed && !tables.failed()
            }
            Err(e) => {
                tracing::debug!(target: "weft::mesh", error = %crate::chain(&e), "cannot read the kernel's policy tables");
                false
            }
        };
        refuses() && refuses()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::mesh::tunnel_tests::{
        delivery_connection, slow_reader_connection, slow_server_connection, user_connection,
    };

    /// A splice between two pods of the node that stops in the middle of an exchange (its
    /// task dropped, as when the agent is killed) resets both connections: neither end
    /// takes a FIN for the other's orderly end.
    #[tokio::test]
    async fn a_splice_dropped_mid_exchange_resets_both_ends() {
        let (mut client, proxied) = user_connection().await;
        let (delivered, mut server) = delivery_connection().await;
        let spliced = tokio::spawn(splice(proxied, delivered));
        client.write_all(b"ping").await.expect("write");
        let mut ping = [0u8; 4];
        server.read_exact(&mut ping).await.expect("read");
        spliced.abort();
        let _ = spliced.await;
        for end in [&mut client, &mut server] {
            let mut rest = Vec::new();
            let read = end.read_to_end(&mut rest).await;
            assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset)
            );
        }
    }

    /// A splice that ends in order closes with a FIN after every byte it still holds: an
    /// answer queued behind a slow client's full window when both ends are done is
    /// delivered whole.
    #[tokio::test]
    async fn a_spliced_answer_queued_for_a_slow_reader_is_delivered_whole() {
        const ANSWER: usize = 64 << 10;
        let (mut client, proxied) = slow_reader_connection(ANSWER).await;
        let (delivered, mut server) = delivery_connection().await;
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let serve = async move {
            let mut request = Vec::new();
            server.read_to_end(&mut request).await.expect("request");
            server.write_all(&[7u8; ANSWER]).await.expect("answer");
        };
        let both = async { tokio::join!(splice(proxied, delivered), serve) };
        tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("the answer fits the proxy's socket");
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("an orderly end");
        assert_eq!(all.len(), ANSWER);
    }

    /// A splice that ends in order closes the delivery with a FIN after every byte it still
    /// holds: a request queued behind a slow server's full window when both ends are done is
    /// delivered whole.
    #[tokio::test]
    async fn a_spliced_request_queued_for_a_slow_server_is_delivered_whole() {
        const REQUEST: usize = 64 << 10;
        let (mut client, proxied) = user_connection().await;
        let (delivered, mut server) = slow_server_connection(REQUEST).await;
        // The server ends its side first, with no answer; the client then sends it all.
        server.shutdown().await.expect("shutdown");
        let send = async move {
            client.write_all(&[7u8; REQUEST]).await.expect("request");
            client.shutdown().await.expect("shutdown");
            client
        };
        let both = async { tokio::join!(splice(proxied, delivered), send) };
        let (_, _client) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("the request fits the proxy's socket");
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.expect("an orderly end");
        assert_eq!(all.len(), REQUEST);
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", Some(sa))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// A stream is delivered only to this pod, and only from an address of a pod of the
    /// peer's identity on another node: a peer cannot speak for another identity's pod, for
    /// a pod of this node, or for the destination itself.
    #[test]
    fn a_stream_must_target_the_pod_and_come_from_a_remote_pod_of_the_peer() {
        let pod_ips = [ip("10.0.2.10")];
        let local: std::collections::BTreeSet<IpAddr> = [ip("10.0.2.10"), ip("10.0.2.11")].into();
        let directory: Directory = [
            (ip("10.0.1.10"), id("web")),
            (ip("10.0.1.20"), id("db")),
            (ip("10.0.2.10"), id("web")),
            (ip("10.0.2.11"), id("web")),
        ]
        .into();
        let stream = |target: &str, source: Option<&str>| Inbound {
            peer: id("web"),
            target: SocketAddr::new(ip(target), 8080),
            source: source.map(ip),
        };
        let check = |i: Inbound| admissible(&i, &pod_ips, &local, &directory);
        assert_eq!(
            check(stream("10.0.2.10", Some("10.0.1.10"))),
            Ok(ip("10.0.1.10"))
        );
        for (what, inbound) in [
            ("another pod", stream("10.0.2.11", Some("10.0.1.10"))),
            ("no source", stream("10.0.2.10", None)),
            (
                "another identity's pod",
                stream("10.0.2.10", Some("10.0.1.20")),
            ),
            ("a pod of this node", stream("10.0.2.10", Some("10.0.2.11"))),
            (
                "the destination itself",
                stream("10.0.2.10", Some("10.0.2.10")),
            ),
            ("no pod", stream("10.0.2.10", Some("10.0.9.9"))),
        ] {
            assert_eq!(check(inbound), Err(Refusal::Forbidden), "{what}");
        }
    }

    /// A stream to the pod's port 15008 would reach the proxy's own inbound listener there,
    /// with the caller's address: refused, as any other port of the pod is not.
    #[test]
    fn a_stream_to_the_proxys_inbound_port_is_refused() {
        let (source, pod) = (ip("10.0.1.10"), ip("10.0.2.10"));
        let local = std::collections::BTreeSet::new();
        let directory: Directory = [(source, id("web"))].into();
        let stream = |port| Inbound {
            peer: id("web"),
            target: SocketAddr::new(pod, port),
            source: Some(source),
        };
        let check = |port| admissible(&stream(port), &[pod], &local, &directory);
        assert_eq!(check(INBOUND_PORT), Err(Refusal::Forbidden));
        assert_eq!(check(INBOUND_PORT + 1), Ok(source));
    }
}
