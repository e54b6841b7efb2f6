//! [`ServiceMaps`] on the pinned kernel maps.
use aya::maps::{HashMap, MapData, MapError};
use weft_abi::{
    maps,
    svc::{Endpoint, MemberKey, Outlier, ServiceKey, ServiceValue, SlotKey},
};

use super::{Error, ServiceMaps};

/// The maps `sync` writes.
pub struct KernelMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, Endpoint>,
    pub members: HashMap<MapData, MemberKey, u32>,
    pub outliers: HashMap<MapData, u32, Outlier>,
}

impl KernelMaps {
    /// Takes the maps from the loaded object (once).
    pub fn take(datapath: &mut crate::datapath::Datapath) -> Result<Self, crate::datapath::Error> {
        Ok(Self {
            services: datapath.take(maps::SERVICES)?,
            slots: datapath.take(maps::BACKEND_SLOTS)?,
            members: datapath.take(maps::MEMBERS)?,
            outliers: datapath.take(maps::OUTLIER)?,
        })
    }
}

impl std::fmt::Debug for KernelMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelMaps").finish_non_exhaustive()
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, source }
}

impl ServiceMaps for KernelMaps {
    /// Values as the syncer holds them (unsealed). One whose seal does not match (the kernel
    /// refuses it) keeps its id and revision reserved but reads with an affinity no Service
    /// has, so the first pass rewrites it, or deletes it when its frontend is gone.
    fn read_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Error> {
        let all: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::SERVICES, "read"))?;
        Ok(all
            .into_iter()
            .map(|(k, v)| {
                let affinity_timeout_s = if v.is_sealed_for(&k) {
                    v.affinity_timeout_s
                } else {
                    u32::MAX
                };
                let v = ServiceValue {
                    affinity_timeout_s,
                    seal: 0,
                    ..v
                };
                (k, v)
            })
            .collect())
    }

    fn read_slots(&self) -> Result<Vec<(SlotKey, Endpoint)>, Error> {
        self.slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::BACKEND_SLOTS, "read"))
    }

    fn read_members(&self) -> Result<Vec<MemberKey>, Error> {
        self.members
            .keys()
            .collect::<Result<_, _>>()
            .map_err(err(maps::MEMBERS, "read"))
    }

    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Error> {
        self.services
            .insert(key, value.sealed(key), 0)
            .map_err(err(maps::SERVICES, "write"))
    }

    fn del_service(&mut self, key: &ServiceKey) -> Result<(), Error> {
        self.services
            .remove(key)
            .map_err(err(maps::SERVICES, "delete from"))
    }

    fn put_slot(&mut self, key: &SlotKey, value: &Endpoint) -> Result<(), Error> {
        self.slots
            .insert(key, value, 0)
            .map_err(err(maps::BACKEND_SLOTS, "write"))
    }

    fn del_slot(&mut self, key: &SlotKey) -> Result<(), Error> {
        self.slots
            .remove(key)
            .map_err(err(maps::BACKEND_SLOTS, "delete from"))
    }

    fn put_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.members
            .insert(key, 1, 0)
            .map_err(err(maps::MEMBERS, "write"))
    }

    fn del_member(&mut self, key: &MemberKey) -> Result<(), Error> {
        self.members
            .remove(key)
            .map_err(err(maps::MEMBERS, "delete from"))
    }

    fn read_outliers(&self) -> Result<Vec<(u32, Outlier)>, Error> {
        let all: Vec<(u32, Outlier)> = self
            .outliers
            .iter()
            .collect::<Result<_, _>>()
            .map_err(err(maps::OUTLIER, "read"))?;
        Ok(all
            .into_iter()
            .map(|(id, o)| {
                let o = if o.is_sealed_for(id) {
                    Outlier { seal: 0, ..o }
                } else {
                    Outlier {
                        consecutive: u32::MAX,
                        ..Outlier::default()
                    }
                };
                (id, o)
            })
            .collect())
    }

    fn put_outlier(&mut self, id: u32, value: &Outlier) -> Result<(), Error> {
        self.outliers
            .insert(id, value.sealed(id), 0)
            .map_err(err(maps::OUTLIER, "write"))
    }

    fn del_outlier(&mut self, id: u32) -> Result<(), Error> {
        self.outliers
            .remove(&id)
            .map_err(err(maps::OUTLIER, "delete from"))
    }
}
