//! [`PolicyMaps`] on the pinned kernel maps.
use std::net::IpAddr;

use aya::maps::{
    HashMap, Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use weft_abi::{
    maps,
    policy::{
        EndpointInfo, IPCACHE_PREFIX_FAMILY, IpcacheData, IpcacheValue, PLAINTEXT_ALLOW,
        PLAINTEXT_PREFIX_FIXED, POLICY_PREFIX_FULL, PlaintextData, PlaintextValue, PolicyData,
        PolicyValue,
    },
};

use super::{Error, PlaintextRow, PolicyMaps};
use weft_abi::net::{Direction, ip_words, words_ip};

use crate::compile::policy::{
    EntryKey,
    judge::{Tables, Verdict, judge},
};

/// The maps policy sync writes.
pub struct KernelPolicyMaps {
    pub endpoints: HashMap<MapData, u64, EndpointInfo>,
    pub ipcache: LpmTrie<MapData, IpcacheData, IpcacheValue>,
    pub policy: LpmTrie<MapData, PolicyData, PolicyValue>,
    pub authz: LpmTrie<MapData, PlaintextData, PlaintextValue>,
}

impl KernelPolicyMaps {
    /// Takes the maps from the loaded object (once).
    pub fn take(datapath: &mut crate::datapath::Datapath) -> Result<Self, crate::datapath::Error> {
        Ok(Self {
            endpoints: datapath.take(maps::ENDPOINTS)?,
            ipcache: datapath.take(maps::IPCACHE)?,
            policy: datapath.take(maps::POLICY)?,
            authz: datapath.take(maps::AUTHZ)?,
        })
    }
}

impl std::fmt::Debug for KernelPolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPolicyMaps").finish_non_exhaustive()
    }
}

/// The pinned policy maps, opened read-only and looked up the way the kernel does: what
/// the kernel decides now (`weft policy check`, the mesh's refusals).
pub struct KernelTables {
    pub endpoints: HashMap<MapData, u64, EndpointInfo>,
    pub ipcache: LpmTrie<MapData, IpcacheData, IpcacheValue>,
    pub policy: LpmTrie<MapData, PolicyData, PolicyValue>,
    /// A lookup failed otherwise than on a missing key: what was judged is not what the
    /// kernel holds.
    failed: std::cell::Cell<bool>,
}

/// A pinned map that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open kernel map {map}")]
pub struct OpenError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

impl KernelTables {
    pub fn open(pins: &crate::datapath::Pins) -> Result<Self, OpenError> {
        let err = |map: &'static str| move |source| OpenError { map, source };
        let open = |map: &'static str| MapData::from_pin(pins.map(map)).map_err(err(map));
        Ok(Self {
            endpoints: HashMap::try_from(Map::HashMap(open(maps::ENDPOINTS)?))
                .map_err(err(maps::ENDPOINTS))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(open(maps::IPCACHE)?))
                .map_err(err(maps::IPCACHE))?,
            policy: LpmTrie::try_from(Map::LpmTrie(open(maps::POLICY)?))
                .map_err(err(maps::POLICY))?,
            failed: std::cell::Cell::new(false),
        })
    }

    /// Whether a lookup since the tables were opened failed otherwise than on a missing key.
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// A lookup's value; a failure other than a missing key is noted.
    fn found<V>(&self, got: Result<V, MapError>) -> Option<V> {
        match got {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(_) => {
                self.failed.set(true);
                None
            }
        }
    }

    /// A pod's endpoint as the kernel takes it: one whose seal does not match is no endpoint
    /// (the kernel judges the pod as not bound).
    pub fn endpoint(&self, id: u64) -> Option<EndpointInfo> {
        self.found(self.endpoints.get(&id, 0))
            .filter(|e| e.is_sealed_for(id))
    }

    /// The kernel's verdict on traffic of the pod of cgroup `cgroup_id` with `peer`.
    pub fn judge(
        &self,
        cgroup_id: u64,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Verdict {
        match self.endpoint(cgroup_id) {
            Some(ep) => judge(self, &ep, direction, peer, protocol, port),
            // No sealed endpoint: the kernel does not isolate the pod.
            None => Verdict {
                allowed: true,
                matched: "not-isolated",
                peer_identity: self.ipcache(peer).map_or(0, |v| v.identity),
                rule: None,
            },
        }
    }
}

impl Tables for KernelTables {
    fn ipcache(&self, ip: IpAddr) -> Option<IpcacheValue> {
        self.found(self.ipcache.get(&ipcache_key(&IpNet::from(ip)), 0))
    }

    fn policy(&self, data: &PolicyData) -> Option<PolicyValue> {
        self.found(self.policy.get(&Key::new(POLICY_PREFIX_FULL, *data), 0))
    }
}

impl std::fmt::Debug for KernelTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTables").finish_non_exhaustive()
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, source }
}

/// The `IPCACHE` key of a prefix.
pub fn ipcache_key(net: &IpNet) -> Key<IpcacheData> {
    let (family, addr) = ip_words(net.network());
    Key::new(
        IPCACHE_PREFIX_FAMILY + u32::from(net.prefix_len()),
        IpcacheData {
            family: family as u32,
            addr,
        },
    )
}

/// The prefix of an `IPCACHE` key, if it is well formed.
pub fn ipcache_net(key: &Key<IpcacheData>) -> Option<IpNet> {
    let data = key.data();
    let ip: IpAddr = words_ip(u8::try_from(data.family).ok()?, data.addr);
    let len = key.prefix_len().checked_sub(IPCACHE_PREFIX_FAMILY)?;
    IpNet::new(ip, u8::try_from(len).ok()?).ok()
}

/// The `AUTHZ` key of a row.
pub fn plaintext_key(&(table, port, net): &PlaintextRow) -> Key<PlaintextData> {
    let (family, addr) = ip_words(net.network());
    Key::new(
        PLAINTEXT_PREFIX_FIXED + u32::from(net.prefix_len()),
        PlaintextData {
            table,
            port,
            family: family as u32,
            addr,
        },
    )
}

/// The row of an `AUTHZ` key, if it is well formed.
pub fn plaintext_row(key: &Key<PlaintextData>) -> Option<PlaintextRow> {
    let data = key.data();
    let ip: IpAddr = words_ip(u8::try_from(data.family).ok()?, data.addr);
    let len = key.prefix_len().checked_sub(PLAINTEXT_PREFIX_FIXED)?;
    let net = IpNet::new(ip, u8::try_from(len).ok()?).ok()?;
    Some((data.table, data.port, net))
}

impl PolicyMaps for KernelPolicyMaps {
    /// Values as the syncer holds them (unsealed). One whose seal does not match (the kernel
    /// treats its pod as not bound) keeps a seal no desired value has, so the first pass
    /// rewrites it, or deletes it when its pod is gone.
    fn read_endpoints(&self) -> Result<Vec<(u64, EndpointInfo)>, Error> {
        let all: Vec<(u64, EndpointInfo)> = self
            .endpoints
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::ENDPOINTS, "read"))?;
        Ok(all
            .into_iter()
            .map(|(id, v)| {
                let seal = u32::from(!v.is_sealed_for(id));
                (id, EndpointInfo { seal, ..v })
            })
            .collect())
    }

    fn read_ipcache(&self) -> Result<Vec<(IpNet, IpcacheValue)>, Error> {
        let mut out = Vec::new();
        for item in self.ipcache.iter() {
            let (k, v) = item.map_err(err(maps::IPCACHE, "read"))?;
            if let Some(net) = ipcache_net(&k) {
                out.push((net, v));
            }
        }
        Ok(out)
    }

    fn read_entries(&self) -> Result<Vec<(EntryKey, PolicyValue)>, Error> {
        let mut out = Vec::new();
        for item in self.policy.iter() {
            let (k, v) = item.map_err(err(maps::POLICY, "read"))?;
            out.push((
                EntryKey {
                    prefix_len: k.prefix_len(),
                    data: k.data(),
                },
                v,
            ));
        }
        Ok(out)
    }

    fn put_endpoint(&mut self, cgroup_id: u64, value: &EndpointInfo) -> Result<(), Error> {
        self.endpoints
            .insert(cgroup_id, value.sealed(cgroup_id), 0)
            .map_err(err(maps::ENDPOINTS, "write"))
    }

    fn del_endpoint(&mut self, cgroup_id: u64) -> Result<(), Error> {
        self.endpoints
            .remove(&cgroup_id)
            .map_err(err(maps::ENDPOINTS, "delete from"))
    }

    fn put_ipcache(&mut self, net: &IpNet, value: &IpcacheValue) -> Result<(), Error> {
        self.ipcache
            .insert(&ipcache_key(net), value, 0)
            .map_err(err(maps::IPCACHE, "write"))
    }

    fn del_ipcache(&mut self, net: &IpNet) -> Result<(), Error> {
        self.ipcache
            .remove(&ipcache_key(net))
            .map_err(err(maps::IPCACHE, "delete from"))
    }

    fn put_entry(&mut self, key: &EntryKey, value: &PolicyValue) -> Result<(), Error> {
        self.policy
            .insert(&Key::new(key.prefix_len, key.data), value, 0)
            .map_err(err(maps::POLICY, "write"))
    }

    fn del_entry(&mut self, key: &EntryKey) -> Result<(), Error> {
        self.policy
            .remove(&Key::new(key.prefix_len, key.data))
            .map_err(err(maps::POLICY, "delete from"))
    }

    /// A malformed key (not written by weft) is left out: it belongs to no table weft uses.
    fn read_plaintext(&self) -> Result<Vec<(PlaintextRow, bool)>, Error> {
        let mut out = Vec::new();
        for item in self.authz.iter() {
            let (k, v) = item.map_err(err(maps::AUTHZ, "read"))?;
            if let Some(row) = plaintext_row(&k) {
                out.push((row, v.flags & PLAINTEXT_ALLOW != 0));
            }
        }
        Ok(out)
    }

    fn put_plaintext(&mut self, row: &PlaintextRow, allowed: bool) -> Result<(), Error> {
        let flags = if allowed { PLAINTEXT_ALLOW } else { 0 };
        self.authz
            .insert(&plaintext_key(row), PlaintextValue { flags }, 0)
            .map_err(err(maps::AUTHZ, "write"))
    }

    fn del_plaintext(&mut self, row: &PlaintextRow) -> Result<(), Error> {
        self.authz
            .remove(&plaintext_key(row))
            .map_err(err(maps::AUTHZ, "delete from"))
    }
}
