//! PeerAuthentication: the mutual TLS mode of each port of a workload.
//!
//! As istiod resolves it: the mesh policy (no selector, in the root namespace), then the
//! namespace's (no selector), then the workload's (a selector with labels, outside the root
//! namespace), each `UNSET` inheriting the wider one; a port of the workload policy's
//! `portLevelMtls` overrides the workload's mode, `UNSET` again inheriting. Of several
//! policies of one scope the oldest wins. No policy at all: PERMISSIVE. DISABLE accepts
//! plaintext as PERMISSIVE does (weft has no plaintext-only mode to offer at L4).
//!
//! A policy weft could not read stands in STRICT for every workload it may select, whatever
//! the other policies say.
use std::collections::BTreeMap;

use serde::Serialize;

use super::Problem;
use crate::{
    compile::policy::selector::Labels,
    store::{
        Key,
        security::{Mode, MutualTls, PeerAuthentication},
        stand_in::REJECTED_ANNOTATION,
        validate::security::port_number,
    },
};

/// Whether plaintext is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Tls {
    Permissive,
    Strict,
}

/// The modes of a workload's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Modes {
    /// Every port not in `ports`.
    pub default: Tls,
    pub ports: BTreeMap<u16, Tls>,
    /// The policies that decided (`namespace/name`), widest first.
    pub from: Vec<String>,
}

impl Default for Modes {
    fn default() -> Self {
        Self {
            default: Tls::Permissive,
            ports: BTreeMap::new(),
            from: Vec::new(),
        }
    }
}

impl Modes {
    pub fn of_port(&self, port: u16) -> Tls {
        self.ports.get(&port).copied().unwrap_or(self.default)
    }
}

/// The workload a mode is resolved for.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// Resolves the modes of `w` from every PeerAuthentication of the store.
pub fn modes(
    all: &BTreeMap<Key, std::sync::Arc<PeerAuthentication>>,
    root: &str,
    w: Workload,
    problems: &mut Vec<Problem>,
) -> Modes {
    let mut mesh = Vec::new();
    let mut namespace = Vec::new();
    let mut workload = Vec::new();
    let mut stand_ins = Vec::new();
    for ((ns, name), pa) in all {
        let scope_ns = ns == w.namespace;
        let selected = pa
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(w.labels));
        if is_stand_in(pa) && (scope_ns || ns == root) && selected {
            stand_ins.push(format!("{ns}/{name}"));
        } else if !pa.spec.selects_workloads() && ns == root {
            mesh.push(pa.as_ref());
        } else if !pa.spec.selects_workloads() && scope_ns {
            namespace.push(pa.as_ref());
        } else if scope_ns && ns != root && selected {
            workload.push(pa.as_ref());
        }
    }
    if !stand_ins.is_empty() {
        return Modes {
            default: Tls::Strict,
            ports: BTreeMap::new(),
            from: stand_ins,
        };
    }
    let [mesh, namespace, workload] =
        [mesh, namespace, workload].map(|candidates| oldest(candidates, problems));
    let mut out = Modes::default();
    // The root namespace's own policy is its mesh policy and its namespace policy at once.
    for pa in [mesh, namespace].into_iter().flatten() {
        inherit(&mut out.default, MutualTls::mode(pa.spec.mtls.as_ref()));
        out.from.push(name(pa));
    }
    if let Some(pa) = workload {
        inherit(&mut out.default, MutualTls::mode(pa.spec.mtls.as_ref()));
        for (port, mtls) in pa.spec.port_level_mtls.iter().flatten() {
            let mut mode = out.default;
            inherit(&mut mode, MutualTls::mode(Some(mtls)));
            if let Some(port) = port_number(port) {
                out.ports.insert(port, mode);
            }
        }
        out.from.push(name(pa));
    }
    out.from.dedup();
    out
}

fn inherit(current: &mut Tls, mode: Mode) {
    match mode {
        Mode::Unset => {}
        Mode::Disable | Mode::Permissive => *current = Tls::Permissive,
        Mode::Strict => *current = Tls::Strict,
    }
}

/// The oldest policy of one scope (creation time, then name: objects from files have no
/// creation time); the others are reported as ignored.
fn oldest<'a>(
    mut candidates: Vec<&'a PeerAuthentication>,
    problems: &mut Vec<Problem>,
) -> Option<&'a PeerAuthentication> {
    candidates.sort_by_key(|pa| {
        (
            pa.metadata.creation_timestamp.as_ref().map(|t| t.0),
            pa.metadata.name.clone(),
        )
    });
    let (first, rest) = candidates.split_first()?;
    for pa in rest {
        problems.push(Problem {
            object: format!("PeerAuthentication {}", name(pa)),
            message: format!(
                "ignored: {} is older and has the same scope (the oldest wins)",
                name(first)
            ),
        });
    }
    Some(first)
}

fn name(pa: &PeerAuthentication) -> String {
    format!(
        "{}/{}",
        pa.metadata.namespace.as_deref().unwrap_or_default(),
        pa.metadata.name.as_deref().unwrap_or_default()
    )
}

fn is_stand_in(pa: &PeerAuthentication) -> bool {
    pa.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REJECTED_ANNOTATION))
}
