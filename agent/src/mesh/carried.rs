//! Which connections the mesh carried, for telemetry: a captured client's socket sits on
//! loopback in its pod's namespace (its events name the namespace, not the pod's address),
//! so the proxy remembers each served pod's namespace and addresses, and the identities of
//! the cluster's meshed pods. The kernel marks both ends it knows: captured clients, and
//! servers' connections accepted from the proxy's delivery sockets. A connection between two
//! served pods does not leave the node: captured or not, it is named from the served pods'
//! addresses.
//!
//! It also names what a served pod's security policy decided: for each connection it
//! accepts (delivered by the proxy or plaintext), for each plaintext SYN the kernel refused,
//! and for each stream the proxy refused (no connection exists then: the proxy hands a
//! drop record over, [`Carried::take_refused`]). Plaintext decisions are counted here; the
//! proxy counts its own.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use weft_abi::{IPPROTO_TCP, conn::DropReason, net::Direction};

use super::metrics::ProxyMetrics;
use crate::{
    compile::authz::{self, Authz, Decision},
    events::{ConnEventKindName, Connection, DropInfo, Role, Security, Transport},
    identity::SpiffeId,
};

/// The identity of every meshed pod address of the cluster.
pub type Directory = BTreeMap<IpAddr, SpiffeId>;

/// Refused streams waiting for telemetry, at most (the oldest go first).
const MAX_REFUSED: usize = 4096;
/// Plaintext SYNs refused from one caller's socket count as one decision for this long (the
/// kernel refuses each retransmission).
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Refused plaintext connections remembered for that, at most.
const MAX_REFUSALS: usize = 16_384;
/// The proxy's latest decisions kept for telemetry, at most (all go when full).
const MAX_DELIVERED: usize = 16_384;
/// Decisions remembered per policy, at most (all go when full).
const MAX_DECISIONS: usize = 4096;

/// What a decision depends on besides the pod's policy: (source, identity, destination,
/// port).
type Asked = (IpAddr, Option<SpiffeId>, IpAddr, u16);

/// The served pods' security policy as one pass compiled it.
#[derive(Debug, Default)]
pub struct Policy {
    pub authz: Authz,
    /// Which served pod (`namespace/name`) holds each address.
    pub holders: BTreeMap<IpAddr, String>,
    /// The node's own addresses: no pod's policy applies to what they send (the kernel
    /// exempts them, as kubelet probes).
    pub node_ips: BTreeSet<IpAddr>,
    /// Decisions taken on this policy, by pod: a pod's callers come back with the same
    /// address, identity and port, and a decision walks every policy the caller may match
    /// (their memory, cold by then, is most of its cost). Gone with the policy.
    decisions: Mutex<HashMap<String, HashMap<Asked, Arc<Decision>>>>,
}

impl Policy {
    /// What `pod`'s policy decides for `c` (None: it is not served), remembered.
    fn decide(&self, pod: &str, c: &authz::Connection<'_>) -> Option<Decision> {
        let asked: Asked = (c.source, c.identity.cloned(), c.destination, c.port);
        let known = self
            .decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .and_then(|m| m.get(&asked))
            .cloned();
        if let Some(d) = known {
            return Some(Decision::clone(&d));
        }
        let (ns, name) = pod.split_once('/')?;
        let workload = self
            .authz
            .workloads
            .get(&(ns.to_owned(), name.to_owned()))?;
        let d = authz::decide(workload, c);
        let mut decisions = self.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if decisions.values().map(HashMap::len).sum::<usize>() >= MAX_DECISIONS {
            decisions.clear();
        }
        decisions
            .entry(pod.to_owned())
            .or_default()
            .insert(asked, Arc::new(d.clone()));
        Some(d)
    }
}

/// What the proxy tells telemetry.
#[derive(Debug, Default)]
pub struct Carried {
    directory: RwLock<Arc<Directory>>,
    /// Each served pod's network namespace cookie and addresses.
    netns_ips: RwLock<BTreeMap<String, (u64, Vec<IpAddr>)>>,
    /// The last pass's policy, swapped whole.
    policy: RwLock<Arc<Policy>>,
    /// Counts plaintext decisions (absent in tests that do not look).
    metrics: Option<ProxyMetrics>,
    /// Streams the proxy refused, as drop events for telemetry.
    refused: Mutex<VecDeque<Connection>>,
    /// The proxy's latest decision for each (caller address, pod socket address): a
    /// delivered connection's, since the caller's identity is its address's and its port
    /// changes nothing. Written before the delivery connects, so its open finds it.
    delivered: Mutex<HashMap<(IpAddr, SocketAddr), Decision>>,
    /// Plaintext connections whose refusal was counted, by (caller, pod) socket address, and
    /// when it was.
    refusals: Mutex<HashMap<(SocketAddr, SocketAddr), Instant>>,
}

impl Carried {
    /// Counts plaintext decisions in `metrics`.
    pub fn new(metrics: ProxyMetrics) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    /// The security policy of the pods served, which pod holds each address, and the node's
    /// own addresses.
    pub fn set_policy(
        &self,
        authz: Authz,
        holders: BTreeMap<IpAddr, String>,
        node_ips: BTreeSet<IpAddr>,
    ) {
        let policy = Policy {
            authz,
            holders,
            node_ips,
            decisions: Mutex::default(),
        };
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The served pod (`namespace/name`) that holds address `ip`.
    pub fn holder(&self, ip: IpAddr) -> Option<String> {
        self.policy().holders.get(&ip).cloned()
    }

    /// What pod `pod`'s security policy decides for `c` (None: it is not served).
    pub fn decide(&self, pod: &str, c: &authz::Connection<'_>) -> Option<Decision> {
        self.policy().decide(pod, c)
    }

    /// The proxy delivers a connection from `client` to `server` on `decision`: telemetry
    /// names that one at its open rather than deciding again.
    pub fn delivered(&self, client: IpAddr, server: SocketAddr, decision: Decision) {
        let mut waiting = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= MAX_DELIVERED {
            waiting.clear();
        }
        waiting.insert((client, server), decision);
    }

    /// The proxy refused a stream from `client` to `server` (no connection was made): a drop
    /// record for telemetry, with both principals and the decision.
    pub fn refused(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        transport: Transport,
        decision: Option<Decision>,
    ) {
        let mut c = Connection::refused(
            server,
            client,
            DropInfo {
                reason: DropReason::Authorization,
                direction: Direction::Ingress,
                protocol: IPPROTO_TCP,
            },
        );
        c.security = Some(self.security(client, server, transport));
        c.authorization = decision;
        let mut queue = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() == MAX_REFUSED {
            queue.pop_front();
        }
        queue.push_back(c);
    }

    /// The drop records of the streams refused since the last call.
    pub fn take_refused(&self) -> Vec<Connection> {
        let mut queue = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        queue.drain(..).collect()
    }

    pub fn set_directory(&self, directory: Directory) {
        *self.directory.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(directory);
    }

    pub fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn identity_of(&self, ip: IpAddr) -> Option<SpiffeId> {
        self.directory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Pod `pod` is served in namespace `cookie` with addresses `ips`.
    pub fn serving(&self, pod: &str, cookie: u64, ips: Vec<IpAddr>) {
        self.netns_ips
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_owned(), (cookie, ips));
    }

    /// Keeps the pods `keep` says are still served.
    pub fn retain_pods(&self, keep: impl Fn(&str) -> bool) {
        self.netns_ips
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(name));
    }

    fn principal(&self, ip: IpAddr) -> Arc<str> {
        self.identity_of(ip)
            .map_or_else(|| Arc::from("unknown"), |id| Arc::from(id.to_string()))
    }

    /// Marks a connection the mesh carried with both ends' identities: a captured client's
    /// (its loopback address replaced by its pod's), a server's delivered from a tunnel, or
    /// either end of one between two meshed pods this node serves (it does not leave the
    /// node).
    pub fn annotate(&self, c: &mut Connection) {
        if c.meshed {
            if c.local.ip().is_loopback()
                && let Some(ip) = self.pod_address(c.mesh_netns, c.remote.is_ipv4())
            {
                c.local.set_ip(ip);
            }
            // Captured to a pod this node serves: delivered on the node, not tunnelled.
            let transport = if self.serves(c.remote.ip()) {
                Transport::Local
            } else {
                Transport::Tunnel
            };
            c.security = Some(self.security(c.local, c.remote, transport));
            return;
        }
        if c.event == ConnEventKindName::Drop {
            self.judge_refusal(c);
            return;
        }
        let (client, server) = match c.role {
            Role::Server => (c.remote, c.local),
            Role::Client => (c.local, c.remote),
        };
        let (client_served, server_served) = (self.serves(client.ip()), self.serves(server.ip()));
        // The mark says the proxy delivered it; a pod can mark its own listener too, so the
        // ends must also be what a delivery has: a meshed pod this node does not serve, to
        // one it serves (`proxy::admissible` refuses any other stream).
        let delivered = c.delivered
            && c.role == Role::Server
            && server_served
            && !client_served
            && self.identity_of(client.ip()).is_some();
        if delivered {
            c.security = Some(self.security(client, server, Transport::Tunnel));
        } else if client_served && server_served {
            c.security = Some(self.security(client, server, Transport::Local));
        }
        if c.event == ConnEventKindName::TcpOpen && c.role == Role::Server {
            self.judge_accepted(c);
        }
    }

    /// A served pod accepted `c`: the decision its policy took for it. The proxy's own for
    /// a connection it delivered (decided on the caller's verified identity, which is its
    /// address's: `proxy::admissible`; counted by the proxy); for a plaintext one, taken and
    /// counted here, unless the policy does not apply to its caller (the node, the pod
    /// itself, loopback: the kernel exempts them). A plaintext connection the policy now
    /// refuses was let in on the previous one: named, not counted.
    fn judge_accepted(&self, c: &mut Connection) {
        let policy = self.policy();
        let Some(pod) = policy.holders.get(&c.local.ip()) else {
            return;
        };
        if c.security.is_some() {
            let handed = self
                .delivered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&(c.remote.ip(), c.local))
                .cloned();
            let identity = self.identity_of(c.remote.ip());
            c.authorization =
                handed.or_else(|| policy.decide(pod, &connection(c, identity.as_ref())));
            return;
        }
        let (caller, own) = (c.remote.ip(), c.local.ip());
        if caller == own || caller.is_loopback() || policy.node_ips.contains(&caller) {
            return;
        }
        let d = policy.decide(pod, &connection(c, None));
        if let (Some(d), Some(m)) = (&d, &self.metrics)
            && d.allowed
        {
            m.authorization(d);
        }
        c.authorization = d;
    }

    /// The kernel refused a plaintext SYN to a served pod: the decision that refused it,
    /// counted once per caller's socket (each retransmission is refused too). The kernel can
    /// be stricter than the decision (a plaintext table that did not fit, a pod with several
    /// addresses of a family, a pass not in the proxy yet): no decision is named then.
    fn judge_refusal(&self, c: &mut Connection) {
        let refused = c.dropped.is_some_and(|d| {
            d.reason == DropReason::Authorization && d.direction == Direction::Ingress
        });
        if !refused {
            return;
        }
        let policy = self.policy();
        let Some(pod) = policy.holders.get(&c.local.ip()) else {
            return;
        };
        let Some(d) = policy
            .decide(pod, &connection(c, None))
            .filter(|d| !d.allowed)
        else {
            return;
        };
        if let Some(m) = &self.metrics
            && self.first_refusal(c.remote, c.local)
        {
            m.authorization(&d);
        }
        c.authorization = Some(d);
    }

    /// Whether this is the first refusal of `client`'s connection to `server` in
    /// [`REFUSAL_WINDOW`] (counted from the first).
    fn first_refusal(&self, client: SocketAddr, server: SocketAddr) -> bool {
        let now = Instant::now();
        let mut seen = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = seen.get(&(client, server))
            && now.duration_since(*at) < REFUSAL_WINDOW
        {
            return false;
        }
        if seen.len() >= MAX_REFUSALS {
            // Full: forget them all (a caller may be counted twice) rather than scan on
            // every refusal of a flood.
            seen.clear();
        }
        seen.insert((client, server), now);
        true
    }

    fn security(&self, client: SocketAddr, server: SocketAddr, transport: Transport) -> Security {
        Security {
            source_principal: self.principal(client.ip()),
            destination_principal: self.principal(server.ip()),
            transport,
        }
    }

    /// Whether `ip` is the address of a meshed pod this node serves.
    fn serves(&self, ip: IpAddr) -> bool {
        let pods = self.netns_ips.read().unwrap_or_else(|e| e.into_inner());
        pods.values().any(|(_, ips)| ips.contains(&ip))
    }

    /// The address of the family wanted of the pod served in namespace `cookie`.
    fn pod_address(&self, cookie: u64, v4: bool) -> Option<IpAddr> {
        let pods = self.netns_ips.read().unwrap_or_else(|e| e.into_inner());
        pods.values()
            .find(|(c, _)| *c == cookie)
            .and_then(|(_, ips)| ips.iter().find(|ip| ip.is_ipv4() == v4).copied())
    }
}

/// `c` as its server's policy reads it: from its remote end to its local one.
fn connection<'a>(c: &Connection, identity: Option<&'a SpiffeId>) -> authz::Connection<'a> {
    authz::Connection {
        source: c.remote.ip(),
        identity,
        destination: c.local.ip(),
        port: c.local.port(),
    }
}

#[cfg(test)]
mod tests;
