//! The absolute cgroup level of the attach cgroup, which the kernel's ancestor lookups count
//! from the real cgroup2 root. Counting directories is right only when the agent sees that
//! root; under a cgroup namespace (nested and rootless nodes, a private cgroupns with its own
//! cgroup2 mount) the mount's root is some cgroup deeper down. The kernel tells: a probe
//! program run with BPF_PROG_TEST_RUN lists the ancestors of the agent's own cgroup by level,
//! and the nearest of them seen above the attach cgroup anchors the count.
use std::{os::unix::fs::MetadataExt as _, path::Path};

use aya::{
    EbpfLoader,
    maps::MapType,
    programs::{CgroupSkb, TestRun as _, TestRunOptions},
};
use weft_abi::programs;

use super::{Error, OBJECT, config::MapSpec, load_err, program};
use crate::mounts::{CGROUP2_SUPER_MAGIC, fs_magic};

/// cgroup levels the kernel allows are far fewer; the probe stops at the caller's own.
const MAX_LEVEL: u32 = 256;
/// `struct __sk_buff`: its size and the offsets of `cb[0]`, `cb[1]`, `cb[2]`.
const SKB_CTX_SIZE: usize = 192;
const CB: [usize; 3] = [48, 52, 56];

/// The absolute level of `cgroup` (a directory of a cgroup2 mount), and the agent's own
/// cgroup (level, id) when it is deeper than that level (see `AGENT_CGROUP_ID`).
pub fn cgroup_level(cgroup: &Path, specs: &[MapSpec]) -> Result<(u32, Option<(u32, u64)>), Error> {
    let ancestors = own_ancestors(specs)?;
    let level = level_of(cgroup, &ancestors)?;
    let own = ancestors
        .last()
        .map(|id| (ancestors.len() as u32 - 1, *id))
        .filter(|(own_level, _)| *own_level > level);
    Ok((level, own))
}

fn level_of(cgroup: &Path, ancestors: &[u64]) -> Result<u32, Error> {
    let mut up = 0;
    let mut at = std::fs::canonicalize(cgroup).map_err(|source| Error::OpenCgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    loop {
        let id = std::fs::metadata(&at)
            .map_err(|source| Error::OpenCgroup {
                path: at.clone(),
                source,
            })?
            .ino();
        if let Some(level) = ancestors.iter().position(|a| *a == id) {
            return Ok(level as u32 + up);
        }
        match at.parent() {
            Some(parent) if fs_magic(parent) == Some(CGROUP2_SUPER_MAGIC) => {
                at = parent.to_owned();
                up += 1;
            }
            _ => {
                return Err(Error::CgroupLevel {
                    path: cgroup.to_owned(),
                });
            }
        }
    }
}

/// The ids of the calling thread's cgroup and its ancestors, by level (index 0: the root).
fn own_ancestors(specs: &[MapSpec]) -> Result<Vec<u64>, Error> {
    let mut loader = EbpfLoader::new();
    // Nothing is written to the maps of this throwaway copy: make them as small as allowed
    // (ring buffers have a minimum, socket storage no capacity at all).
    for spec in specs
        .iter()
        .filter(|s| !matches!(s.map_type, MapType::RingBuf | MapType::SkStorage))
    {
        loader.map_max_entries(spec.name, 1);
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|source| Error::Load { source })?;
    let name = programs::LEVEL_PROBE;
    let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
    prog.load().map_err(|source| load_err(name, source))?;
    // An Ethernet header and an empty IPv4 header: the smallest packet a test run accepts.
    let mut packet = vec![0u8; 14 + 20];
    packet[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    packet[14] = 0x45;
    let mut ancestors = Vec::new();
    for level in 0..MAX_LEVEL {
        let mut ctx = vec![0u8; SKB_CTX_SIZE];
        ctx[CB[0]..CB[0] + 4].copy_from_slice(&level.to_ne_bytes());
        let mut out = vec![0u8; SKB_CTX_SIZE];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&packet);
        opts.ctx_in = Some(&ctx);
        opts.ctx_out = Some(&mut out);
        prog.test_run(opts)
            .map_err(|source| load_err(name, source))?;
        let word = |i: usize| {
            u64::from(u32::from_ne_bytes(
                out[CB[i]..CB[i] + 4].try_into().unwrap_or_default(),
            ))
        };
        let id = word(1) | word(2) << 32;
        if id == 0 {
            break;
        }
        ancestors.push(id);
    }
    Ok(ancestors)
}
