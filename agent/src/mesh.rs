//! The mesh: workload certificates for the meshed pods of this node, and (in `proxy`) the
//! tunnels that carry their connections.
//!
//! Constructed from its [`Settings`]; the run loop hands it each pass's store and local pods
//! ([`Mesh::on_pass`]), wakes it when a certificate is due ([`Mesh::next_due`]), and asks it
//! to re-read the CA at every resync ([`Mesh::reload_ca`]), so that a rotated Secret is taken
//! up without a restart.
pub mod hbone;
pub mod metrics;
pub mod status;
pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use prometheus_client::registry::Registry;

use crate::{
    compile::mesh::enrollment,
    identity::{
        SpiffeId,
        ca::Ca,
        certs::{Certs, Changes},
    },
    store::Store,
};
use metrics::MeshMetrics;
pub use status::MeshStatus;

/// A certificate that could not be issued is tried again this soon.
const RETRY: Duration = Duration::from_secs(5);

/// The mesh's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// The mesh CA: a directory with `ca.crt` and `ca.key` (`weft ca init` makes one), or a
    /// cert-manager CA Secret mounted as files (`tls.crt`, `tls.key`, `ca.crt`). Re-read at
    /// every resync. Without it, meshed pods get no certificate.
    #[arg(long, value_name = "DIR")]
    pub mesh_ca: Option<PathBuf>,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local", value_parser = parse_trust_domain)]
    pub trust_domain: String,
    /// The lifetime of a workload certificate; it is renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = parse_cert_ttl)]
    pub mesh_cert_ttl: Duration,
}

/// A trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-`, `_`.
fn parse_trust_domain(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: a SPIFFE trust domain has only lowercase letters, digits, '.', '-' and '_'"
        ))
    }
}

/// At least 10 s: renewal at half the lifetime must leave time to use the new certificate.
fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let d = crate::parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?}: must be at least 10s"));
    }
    Ok(d)
}

/// The CA as last read.
#[derive(Debug, Default)]
struct CaState {
    ca: Option<Ca>,
    /// Why the last read failed (the CA read before it, if any, stays in use).
    error: Option<crate::identity::Error>,
}

/// The node's side of the mesh: the CA, the certificates, and what they are for.
#[derive(Debug)]
pub struct Mesh {
    settings: Settings,
    ca: CaState,
    certs: Certs,
    /// Local meshed pods (`namespace/name`) by identity.
    pods: BTreeMap<SpiffeId, Vec<String>>,
    /// Identities whose certificate could not be issued, and why.
    failed: BTreeMap<SpiffeId, String>,
    unknown_labels: Vec<String>,
    metrics: MeshMetrics,
    status: Arc<RwLock<MeshStatus>>,
}

impl Mesh {
    /// Reads the CA (a failure is reported, not fatal: meshed pods then get no certificate).
    pub fn new(settings: &Settings, registry: &mut Registry) -> Self {
        let mut mesh = Self {
            settings: settings.clone(),
            ca: CaState::default(),
            certs: Certs::new(settings.mesh_cert_ttl),
            pods: BTreeMap::new(),
            failed: BTreeMap::new(),
            unknown_labels: Vec::new(),
            metrics: MeshMetrics::new(registry),
            status: Arc::default(),
        };
        mesh.reload_ca(SystemTime::now());
        mesh
    }

    /// What `weft certs` and `weft status` show.
    pub fn status(&self) -> Arc<RwLock<MeshStatus>> {
        Arc::clone(&self.status)
    }

    /// Re-reads the CA directory. A changed CA renews every certificate; a read that fails
    /// keeps the CA read before (its certificates stay valid) and is reported.
    pub fn reload_ca(&mut self, now: SystemTime) {
        let Some(dir) = &self.settings.mesh_ca else {
            return self.publish(now);
        };
        match Ca::load(dir) {
            Ok(ca) => {
                let changed = self.ca.ca.as_ref().is_none_or(|old| !old.same_as(&ca));
                if changed {
                    tracing::info!(target: "weft::mesh", dir = %dir.display(), roots = ca.roots().len(), "mesh CA loaded");
                }
                if self.ca.error.take().is_some() {
                    tracing::info!(target: "weft::mesh", dir = %dir.display(), "mesh CA readable again");
                }
                self.ca.ca = Some(ca);
                if changed {
                    self.refresh(now);
                }
            }
            Err(e) => {
                if self.ca.error.as_ref().map(ToString::to_string) != Some(e.to_string()) {
                    tracing::error!(target: "weft::mesh", error = %crate::chain(&e), "cannot read the mesh CA; certificates already held stay in use until they expire");
                }
                self.metrics.ca_error(&e);
                self.ca.error = Some(e);
            }
        }
        self.publish(now);
    }

    /// After a pass: the identities of the local meshed pods (`namespace/name` in `local`)
    /// get a certificate, the others lose theirs.
    pub fn on_pass<'a>(
        &mut self,
        store: &Store,
        local: impl IntoIterator<Item = &'a str>,
        now: SystemTime,
    ) {
        let enrolled = enrollment(store, &self.settings.trust_domain);
        let local: BTreeSet<&str> = local.into_iter().collect();
        let mut pods: BTreeMap<SpiffeId, Vec<String>> = BTreeMap::new();
        for ((ns, name), id) in &enrolled.meshed {
            let pod = format!("{ns}/{name}");
            if local.contains(pod.as_str()) {
                pods.entry(id.clone()).or_default().push(pod);
            }
        }
        let unknown: Vec<String> = enrolled
            .unknown
            .iter()
            .map(|u| format!("{}: {}={:?}", u.object, compile_label(), u.value))
            .collect();
        for u in unknown.iter().filter(|u| !self.unknown_labels.contains(u)) {
            tracing::warn!(target: "weft::mesh", label = u, "mesh label value not understood (enabled or disabled): ignored");
        }
        self.unknown_labels = unknown;
        if pods != self.pods {
            self.pods = pods;
            self.refresh(now);
        }
        self.publish(now);
    }

    /// When a certificate is next due for renewal (or a failed one for another try).
    pub fn next_due(&self) -> Option<SystemTime> {
        // Without a CA there is nothing to retry with: a CA that becomes readable refreshes.
        let retry =
            (self.ca.ca.is_some() && !self.failed.is_empty()).then(|| SystemTime::now() + RETRY);
        [self.certs.next_renewal(), retry]
            .into_iter()
            .flatten()
            .min()
    }

    /// Renews what is due.
    pub fn renew(&mut self, now: SystemTime) {
        self.refresh(now);
        self.publish(now);
    }

    fn refresh(&mut self, now: SystemTime) {
        let Some(ca) = &self.ca.ca else {
            self.failed = self
                .pods
                .keys()
                .map(|id| (id.clone(), no_ca(&self.settings)))
                .collect();
            return;
        };
        let wanted: BTreeSet<SpiffeId> = self.pods.keys().cloned().collect();
        let changes = self.certs.refresh(ca, &wanted, now);
        self.report(&changes);
        self.failed.retain(|id, _| wanted.contains(id));
        for id in changes.issued.iter().chain(&changes.renewed) {
            self.failed.remove(id);
        }
        for (id, e) in changes.failed {
            self.failed.insert(id, crate::chain(&e));
        }
    }

    fn report(&self, changes: &Changes) {
        for id in &changes.issued {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate issued");
        }
        for id in &changes.renewed {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate renewed");
        }
        for id in &changes.dropped {
            tracing::info!(target: "weft::mesh", identity = %id, "certificate dropped: no pod of this node has the identity");
        }
        for (id, e) in &changes.failed {
            tracing::error!(target: "weft::mesh", identity = %id, error = %crate::chain(e), "cannot issue a certificate; a held one stays in use until it expires");
        }
        self.metrics.changes(changes);
    }

    fn publish(&mut self, now: SystemTime) {
        let status = MeshStatus::of(status::Parts {
            settings: &self.settings,
            ca: self.ca.ca.as_ref(),
            ca_error: self.ca.error.as_ref(),
            certs: &self.certs,
            pods: &self.pods,
            failed: &self.failed,
            unknown_labels: &self.unknown_labels,
            now,
        });
        self.metrics.publish(&status);
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status;
    }
}

fn compile_label() -> &'static str {
    crate::compile::mesh::MESH_LABEL
}

fn no_ca(settings: &Settings) -> String {
    match &settings.mesh_ca {
        None => "no mesh CA: the agent runs without --mesh-ca".to_owned(),
        Some(dir) => format!("the mesh CA in {} is not readable", dir.display()),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tunnel_tests;
