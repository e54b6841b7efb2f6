//! Sources of desired state. Standalone mode reads a directory of Kubernetes YAML (`dir`);
//! Kubernetes mode reads the API server (`kube`). Both produce objects for the `store`.
pub mod dir;
pub mod kube;
pub mod yaml;

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use self::{
    dir::DirSource,
    kube::{KubeConfig, KubeSource, metrics::KubeMetrics},
};
use crate::store::{FieldError, ObjectRef};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dir(#[from] dir::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// `--source`, `--node-name`, `--kubeconfig`.
#[derive(Debug, Clone, clap::Args)]
#[group(skip)]
pub struct Settings {
    /// Where desired state comes from: `dir:PATH`, a directory of Kubernetes YAML, or
    /// `kubernetes`, the API server (in-cluster config, --kubeconfig, KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, value_parser = parse_source)]
    pub source: Option<Kind>,
    /// This node's name, as pods' spec.nodeName has it (required with --source kubernetes;
    /// the DaemonSet takes it from the downward API). With a directory source shared by
    /// several nodes, a pod whose spec.nodeName names another node is a peer only.
    #[arg(long, env = "NODE_NAME", required_if_eq("source", "kubernetes"))]
    pub node_name: Option<String>,
    /// A kubeconfig file for --source kubernetes (default: in-cluster config, else
    /// KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// With --source kubernetes, how often the API server is asked again whether it serves
    /// Istio's APIs (security.istio.io PeerAuthentication and AuthorizationPolicy,
    /// networking.istio.io DestinationRule) until it serves every one; each kind's reflector
    /// starts once it is served.
    #[arg(long, default_value = "60s", value_parser = crate::parse_positive_duration)]
    pub crd_discovery_interval: std::time::Duration,
}

/// The kind of `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory of Kubernetes YAML (standalone mode).
    Dir(PathBuf),
    /// The API server (Kubernetes mode).
    Kubernetes,
}

/// `dir:PATH` or `kubernetes`.
pub fn parse_source(s: &str) -> Result<Kind, String> {
    if s == "kubernetes" {
        return Ok(Kind::Kubernetes);
    }
    match s.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => {
            let p = PathBuf::from(path);
            if p.is_dir() {
                Ok(Kind::Dir(p))
            } else {
                Err(format!("{path} is not a directory"))
            }
        }
        _ => Err(format!(
            "{s:?}: use dir:PATH (a directory of Kubernetes YAML) or kubernetes (the API server)"
        )),
    }
}

/// What the source saw change (the pipeline decides when to run a pass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// Files closed after writing, or renamed into place: complete as they are now.
    Complete(Vec<PathBuf>),
    /// Anything else in the directory: a file may be in the middle of a write.
    Changed,
    /// A reflector applied a change from the API server.
    Api,
}

/// Where the pipeline reads desired state.
#[derive(Debug)]
pub enum Source {
    Dir(DirSource),
    Kubernetes(Box<KubeSource>),
}

/// A started source: what reads it, and its change notifications.
#[derive(Debug)]
pub struct Started {
    pub source: Source,
    pub events: UnboundedReceiver<SourceEvent>,
    /// The directory watcher, alive as long as this is.
    pub watcher: Option<notify::RecommendedWatcher>,
}

impl Source {
    /// Starts watching (before the first read, so no change between the two is missed).
    /// None without `--source`: no services and no policies. Must run inside a tokio runtime.
    pub async fn start(
        settings: &Settings,
        cgroup_root: &Path,
        registry: &mut Registry,
    ) -> Result<Option<Started>, Error> {
        let (tx, events) = unbounded_channel();
        match &settings.source {
            None => Ok(None),
            Some(Kind::Dir(dir)) => Ok(Some(Started {
                source: Self::Dir(DirSource::new(dir).for_node(settings.node_name.clone())),
                events,
                watcher: Some(dir::watch(dir, tx)?),
            })),
            Some(Kind::Kubernetes) => {
                let config = KubeConfig {
                    kubeconfig: settings.kubeconfig.clone(),
                    node_name: settings.node_name.clone().unwrap_or_default(),
                    cgroup_root: cgroup_root.to_owned(),
                    crd_discovery_interval: settings.crd_discovery_interval,
                };
                let kube = KubeSource::start(&config, KubeMetrics::new(registry)).await?;
                tracing::info!(target: "weft::source", source = kube.describe(), "watching the Kubernetes API; ready once every kind is listed");
                forward_api_changes(kube.health(), tx);
                Ok(Some(Started {
                    source: Self::Kubernetes(Box::new(kube)),
                    events,
                    watcher: None,
                }))
            }
        }
    }

    /// For status: `dir:PATH` or `kubernetes:SERVER (node NAME)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(d) => format!("dir:{}", d.dir().display()),
            Self::Kubernetes(k) => k.describe(),
        }
    }
}

/// Reflector changes go through the same debounce as file changes.
fn forward_api_changes(health: Arc<kube::Health>, tx: UnboundedSender<SourceEvent>) {
    tokio::spawn(async move {
        loop {
            health.changed().await;
            if tx.send(SourceEvent::Api).is_err() {
                return;
            }
        }
    });
}

/// Where a rejected document is in a directory source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub file: PathBuf,
    /// 0-based document index in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

/// A document (or an object from the API server) that was not accepted. Its object (when it
/// could be named) keeps its last good version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// None for objects from the API server.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    pub object: Option<ObjectRef>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(at) => {
                write!(
                    f,
                    "{}: document {} (line {})",
                    at.file.display(),
                    at.document,
                    at.line
                )?;
                if let Some(o) = &self.object {
                    write!(f, ", {o}")?;
                }
            }
            None => match &self.object {
                Some(o) => write!(f, "{o} from the API server")?,
                None => f.write_str("an object from the API server")?,
            },
        }
        for (i, e) in self.errors.iter().enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            if e.field.is_empty() {
                write!(f, "{sep}{}", e.message)?;
            } else {
                write!(f, "{sep}{}: {}", e.field, e.message)?;
            }
        }
        Ok(())
    }
}
