//! What the agent shows of the mesh (`weft certs`, `weft status`, `/readyz`).
use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::Settings;
use crate::identity::{Error, SpiffeId, ca::Ca, certs::Certs};

/// The mesh on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MeshStatus {
    pub trust_domain: String,
    /// Istio's root namespace (`--mesh-root-namespace`).
    #[serde(default)]
    pub root_namespace: String,
    pub ca: Option<CaStatus>,
    /// One per identity of a local meshed pod.
    pub identities: Vec<IdentityStatus>,
    /// `weft.io/mesh` values that are neither `enabled` nor `disabled`.
    pub unknown_labels: Vec<String>,
    /// The proxy's listeners for each local meshed pod.
    #[serde(default)]
    pub pods: Vec<PodStatus>,
}

/// A local meshed pod as the proxy serves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodStatus {
    /// `namespace/name`.
    pub pod: String,
    /// Where the proxy listens in the pod's network namespace.
    pub listeners: Vec<String>,
    /// Why it does not (its meshed connections are refused meanwhile).
    pub error: Option<String>,
}

/// The CA in use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaStatus {
    pub dir: PathBuf,
    /// A CA is in use (it may be an earlier read when `error` is set).
    pub loaded: bool,
    /// Why the last read failed.
    pub error: Option<String>,
    /// SHA-256 of the signing certificate, hex.
    pub signer: Option<String>,
    pub roots: Vec<RootStatus>,
}

/// A certificate of the trust bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootStatus {
    pub subject: String,
    /// RFC 3339.
    pub not_after: String,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
}

/// An identity this node holds a certificate for (or should).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub identity: String,
    /// Local pods (`namespace/name`) with this identity.
    pub pods: Vec<String>,
    pub certificate: Option<CertStatus>,
    /// Why no valid certificate could be issued or renewed.
    pub error: Option<String>,
}

/// A held certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertStatus {
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    /// Seconds since the Unix epoch (the metric's value).
    pub not_after_unix: u64,
    pub renew_at: String,
    pub expired: bool,
}

/// What a status is made of.
#[derive(Debug)]
pub struct Parts<'a> {
    pub settings: &'a Settings,
    pub root_namespace: &'a str,
    pub ca: Option<&'a Ca>,
    pub ca_error: Option<&'a Error>,
    pub certs: &'a Certs,
    pub pods: &'a BTreeMap<SpiffeId, Vec<String>>,
    pub failed: &'a BTreeMap<SpiffeId, String>,
    pub unknown_labels: &'a [String],
    pub proxied: Vec<PodStatus>,
    pub now: SystemTime,
}

impl MeshStatus {
    pub fn of(p: Parts<'_>) -> Self {
        let ca = p.settings.mesh_ca.as_ref().map(|dir| CaStatus {
            dir: dir.clone(),
            loaded: p.ca.is_some(),
            error: p.ca_error.map(|e| crate::chain(e)),
            signer: p.ca.map(|ca| hex(&ca.fingerprint())),
            roots: p.ca.map_or_else(Vec::new, |ca| {
                ca.roots()
                    .iter()
                    .map(|r| RootStatus {
                        subject: r.subject.clone(),
                        not_after: rfc3339(r.not_after),
                        fingerprint: hex(
                            ring::digest::digest(&ring::digest::SHA256, &r.der).as_ref()
                        ),
                    })
                    .collect()
            }),
        });
        let identities = p
            .pods
            .iter()
            .map(|(id, pods)| IdentityStatus {
                identity: id.to_string(),
                pods: pods.clone(),
                certificate: p.certs.held().find(|l| &l.id == id).map(|l| CertStatus {
                    serial: l.serial.clone(),
                    not_before: rfc3339(l.not_before),
                    not_after: rfc3339(l.not_after),
                    not_after_unix: unix(l.not_after),
                    renew_at: rfc3339(Certs::renew_at(l)),
                    expired: p.now >= l.not_after,
                }),
                error: p.failed.get(id).cloned(),
            })
            .collect();
        Self {
            trust_domain: p.settings.trust_domain.clone(),
            root_namespace: p.root_namespace.to_owned(),
            ca,
            identities,
            unknown_labels: p.unknown_labels.to_vec(),
            pods: p.proxied,
        }
    }

    /// Why the mesh is not doing its whole job on this node, for `weft status` and `/readyz`.
    pub fn degraded(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(ca) = &self.ca
            && let Some(e) = &ca.error
        {
            out.push(if ca.loaded {
                format!("mesh CA: the last read failed ({e}); the CA read before stays in use")
            } else {
                format!("mesh CA not loaded: {e}")
            });
        }
        let without: Vec<String> = self
            .identities
            .iter()
            .filter(|i| i.certificate.as_ref().is_none_or(|c| c.expired))
            .map(|i| match &i.error {
                Some(e) => format!("{} ({e})", i.identity),
                None => i.identity.clone(),
            })
            .collect();
        if !without.is_empty() {
            out.push(format!(
                "meshed pods without a valid certificate: {}",
                without.join(", ")
            ));
        }
        let unserved: Vec<String> = self
            .pods
            .iter()
            .filter_map(|p| Some(format!("{} ({})", p.pod, p.error.as_ref()?)))
            .collect();
        if !unserved.is_empty() {
            out.push(format!(
                "meshed pods the proxy cannot serve (their meshed connections are refused): {}",
                unserved.join(", ")
            ));
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
