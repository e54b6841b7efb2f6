//! What unit tests of several modules share: scratch directories and in-memory maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use weft_abi::{
    policy::{EndpointInfo, IpcacheValue, PolicyValue},
    svc::{Endpoint, MemberKey, Outlier, ServiceKey, ServiceValue, SlotKey},
};

use crate::{
    compile::policy::EntryKey,
    sync::{
        Error, ServiceMaps,
        policy::{PlaintextRow, PolicyMaps},
    },
};

/// A directory of its own under the system's temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// `name` tells tests apart; the process id tells runs apart.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("weft-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, file: &str, text: &str) {
        fs::write(self.0.join(file), text).expect("write");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The service maps in memory, as the kernel would hold them.
#[derive(Debug, Default)]
pub struct MemoryServiceMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, Endpoint>,
    pub members: BTreeSet<MemberKey>,
    pub outliers: BTreeMap<u32, Outlier>,
}

impl MemoryServiceMaps {
    /// The backends `key` leads to now.
    pub fn backends(&self, key: &ServiceKey) -> Vec<Endpoint> {
        let Some(v) = self.services.get(key) else {
            return Vec::new();
        };
        (0..v.count)
            .filter_map(|index| {
                let slot = SlotKey {
                    revision: v.revision,
                    index,
                };
                self.slots.get(&slot).copied()
            })
            .collect()
    }
}

impl ServiceMaps for MemoryServiceMaps {
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_slots(&self) -> Result<Vec<(SlotKey, Endpoint)>, Error> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_members(&self) -> Result<Vec<MemberKey>, Error> {
        Ok(self.members.iter().copied().collect())
    }
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        self.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.services.remove(key);
        Ok(())
    }
    fn put_slot(&mut self, key: &SlotKey, value: &Endpoint) -> Result<(), Error> {
        self.slots.insert(*key, *value);
        Ok(())
    }
    fn del_slot(&mut self, key: &SlotKey) -> Result<(), Error> {
        self.slots.remove(key);
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.members.insert(*key);
        Ok(())
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.members.remove(key);
        Ok(())
    }
    fn read_outliers(&self) -> Result<Vec<(u32, Outlier)>, Error> {
        Ok(self.outliers.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_outlier(&mut self, id: u32, value: &Outlier) -> Result<(), Error> {
        self.outliers.insert(id, *value);
        Ok(())
    }
    fn del_outlier(&mut self, id: u32) -> Result<(), Error> {
        self.outliers.remove(&id).map(drop).ok_or(Error::Map {
            map: "memory",
            op: "delete",
            source: aya::maps::MapError::KeyNotFound,
        })
    }
}

/// The policy maps in memory.
#[derive(Debug, Default)]
pub struct MemoryPolicyMaps {
    pub endpoints: BTreeMap<u64, EndpointInfo>,
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub entries: BTreeMap<EntryKey, PolicyValue>,
    pub plaintext: BTreeMap<PlaintextRow, bool>,
}

impl PolicyMaps for MemoryPolicyMaps {
    fn read_endpoints(&self) -> Result<Vec<(u64, EndpointInfo)>, Error> {
        Ok(self.endpoints.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_ipcache(&self) -> Result<Vec<(IpNet, IpcacheValue)>, Error> {
        Ok(self.ipcache.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_entries(&self) -> Result<Vec<(EntryKey, PolicyValue)>, Error> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_endpoint(&mut self, id: u64, value: &EndpointInfo) -> Result<(), Error> {
        self.endpoints.insert(id, *value);
        Ok(())
    }
    fn del_endpoint(&mut self, id: u64) -> Result<(), Error> {
        self.endpoints.remove(&id);
        Ok(())
    }
    fn put_ipcache(&mut self, net: &IpNet, value: &IpcacheValue) -> Result<(), Error> {
        self.ipcache.insert(*net, *value);
        Ok(())
    }
    fn del_ipcache(&mut self, net: &IpNet) -> Result<(), Error> {
        self.ipcache.remove(net);
        Ok(())
    }
    fn put_entry(&mut self, key: &EntryKey, value: &PolicyValue) -> Result<(), Error> {
        self.entries.insert(*key, *value);
        Ok(())
    }
    fn del_entry(&mut self, key: &EntryKey) -> Result<(), Error> {
        self.entries.remove(key);
        Ok(())
    }
    fn read_plaintext(&self) -> Result<Vec<(PlaintextRow, bool)>, Error> {
        Ok(self.plaintext.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_plaintext(&mut self, row: &PlaintextRow, allowed: bool) -> Result<(), Error> {
        self.plaintext.insert(*row, allowed);
        Ok(())
    }
    fn del_plaintext(&mut self, row: &PlaintextRow) -> Result<(), Error> {
        self.plaintext.remove(row);
        Ok(())
    }
}
