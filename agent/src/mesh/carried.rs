//! Which connections the mesh carried, for telemetry: a captured client's socket sits on
//! loopback in its pod's namespace (its events name the namespace, not the pod's address),
//! so the proxy remembers each served pod's namespace and addresses, and the identities of
//! the cluster's meshed pods. The kernel marks both ends it knows: captured clients, and
//! servers' connections accepted from the proxy's delivery sockets. A connection between two
//! served pods does not leave the node: captured or not, it is named from the served pods'
//! addresses.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use crate::{
    events::{ConnEventKindName, Connection, Role, Security, Transport},
    identity::SpiffeId,
};

/// The identity of every meshed pod address of the cluster.
pub type Directory = BTreeMap<IpAddr, SpiffeId>;

/// What the proxy tells telemetry.
#[derive(Debug, Default)]
pub struct Carried {
    directory: RwLock<Arc<Directory>>,
    /// Each served pod's network namespace cookie and addresses.
    netns_ips: RwLock<BTreeMap<String, (u64, Vec<IpAddr>)>>,
}

impl Carried {
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

#[cfg(test)]
mod tests;
