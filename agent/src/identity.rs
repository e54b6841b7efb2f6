//! Workload identities of the mesh: SPIFFE IDs and the certificate authority that signs them.
//!
//! A meshed pod's identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! The agent holds a short-lived leaf certificate for each identity with a pod on its node,
//! issued by the CA it is given ([`ca`]).
pub mod ca;
pub mod certs;

use std::{fmt, path::PathBuf};

/// A SPIFFE ID of a workload: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// The identity of a pod's service account (`default` when the pod names none).
    pub fn new(trust_domain: &str, namespace: &str, service_account: Option<&str>) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_owned(),
        }
    }
}

impl SpiffeId {
    /// Reads `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`; any other shape
    /// (another path, an empty part, a query) is not a workload identity.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        (plain(trust_domain) && plain(namespace) && plain(service_account)).then(|| Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// What can go wrong with the CA and certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{dir}: neither ca.crt and ca.key nor tls.crt, tls.key and ca.crt")]
    NoCa { dir: PathBuf },
    #[error("generate or sign a certificate")]
    Sign(#[source] rcgen::Error),
}

impl Error {
    /// Every value of [`Self::metric_label`] (the series start at zero).
    pub const METRIC_LABELS: [&'static str; 5] = ["read", "write", "invalid", "no_ca", "sign"];

    /// The `reason` label of a metric counting this error.
    pub const fn metric_label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::Invalid { .. } => "invalid",
            Self::NoCa { .. } => "no_ca",
            Self::Sign(_) => "sign",
        }
    }
}
