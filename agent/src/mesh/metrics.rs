//! The mesh's metrics: certificates held and when they expire, issues and failures, the CA.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{MeshStatus, tls::HandshakeFailure};
use crate::{identity::certs::Changes, metrics::label_value};

/// Why a certificate was signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Issue {
    /// A new identity on the node.
    Issued,
    /// Half its lifetime passed, or the CA changed.
    Renewed,
}

impl Issue {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Issued => "issued",
            Self::Renewed => "renewed",
        }
    }
}

label_value!(Issue);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    pub kind: Issue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// [`crate::identity::Error::metric_label`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// The SPIFFE ID, as in the certificate.
    pub identity: String,
}

/// Every metric of the mesh's certificates.
#[derive(Debug, Clone)]
pub struct MeshMetrics {
    /// When each held certificate expires (Unix seconds).
    expiry: Family<IdentityLabels, Gauge>,
    /// Certificates signed.
    issued: Family<IssueLabels, Counter>,
    /// Certificates that could not be signed, and CA reads that failed, by reason.
    failures: Family<ReasonLabels, Counter>,
    /// 1 while a CA is in use.
    ca_loaded: Gauge,
    /// Certificates in the trust bundle.
    ca_roots: Gauge,
    /// Identities of local meshed pods without a valid certificate.
    without_certificate: Gauge,
}

impl MeshMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            expiry: Family::default(),
            issued: Family::default(),
            failures: Family::default(),
            ca_loaded: Gauge::default(),
            ca_roots: Gauge::default(),
            without_certificate: Gauge::default(),
        };
        registry.register(
            "mesh_certificate_expiry_timestamp_seconds",
            "When the node's certificate of each workload identity expires",
            m.expiry.clone(),
        );
        registry.register(
            "mesh_certificates_issued",
            "Workload certificates signed, by kind (issued for a new identity, renewed)",
            m.issued.clone(),
        );
        registry.register(
            "mesh_certificate_failures",
            "Workload certificates that could not be signed and mesh CA reads that failed, by reason",
            m.failures.clone(),
        );
        registry.register(
            "mesh_ca_loaded",
            "1 while the agent has a mesh CA",
            m.ca_loaded.clone(),
        );
        registry.register(
            "mesh_ca_roots",
            "Certificates in the mesh trust bundle",
            m.ca_roots.clone(),
        );
        registry.register(
            "mesh_identities_without_certificate",
            "Identities of local meshed pods without a valid certificate",
            m.without_certificate.clone(),
        );
        for kind in [Issue::Issued, Issue::Renewed] {
            let _ = m.issued.get_or_create(&IssueLabels { kind });
        }
        for reason in crate::identity::Error::METRIC_LABELS {
            let _ = m.failures.get_or_create(&ReasonLabels { reason });
        }
        m
    }

    pub fn changes(&self, changes: &Changes) {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        self.issued
            .get_or_create(&IssueLabels {
                kind: Issue::Issued,
            })
            .inc_by(count(changes.issued.len()));
        self.issued
            .get_or_create(&IssueLabels {
                kind: Issue::Renewed,
            })
            .inc_by(count(changes.renewed.len()));
        for (_, e) in &changes.failed {
            self.failure(e);
        }
    }

    pub fn ca_error(&self, e: &crate::identity::Error) {
        self.failure(e);
    }

    fn failure(&self, e: &crate::identity::Error) {
        self.failures
            .get_or_create(&ReasonLabels {
                reason: e.metric_label(),
            })
            .inc();
    }

    /// The gauges from the status just published.
    pub fn publish(&self, status: &MeshStatus) {
        let ca = status.ca.as_ref();
        self.ca_loaded.set(i64::from(ca.is_some_and(|c| c.loaded)));
        self.ca_roots
            .set(ca.map_or(0, |c| i64::try_from(c.roots.len()).unwrap_or(i64::MAX)));
        self.expiry.clear();
        let mut without = 0;
        for i in &status.identities {
            match &i.certificate {
                Some(c) => {
                    self.expiry
                        .get_or_create(&IdentityLabels {
                            identity: i.identity.clone(),
                        })
                        .set(i64::try_from(c.not_after_unix).unwrap_or(i64::MAX));
                    without += i64::from(c.expired);
                }
                None => without += 1,
            }
        }
        self.without_certificate.set(without);
    }
}

/// Which side of a tunnel this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This node's pod is the client.
    Outbound,
    /// This node's pod is the server.
    Inbound,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

label_value!(Direction);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    pub reason: HandshakeFailure,
}

/// Why a stream a peer asked for is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not for the pod the listener serves, or a source the peer may not claim.
    Forbidden,
    /// The target refused or could not be reached.
    Unreachable,
    /// The pod's security policy (an AuthorizationPolicy) refuses the peer.
    Unauthorized,
    /// The pod's NetworkPolicy refuses the caller's address (the kernel dropped the
    /// delivery's SYN).
    NetworkPolicy,
}

impl Refusal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::Unreachable => "unreachable",
            Self::Unauthorized => "unauthorized",
            Self::NetworkPolicy => "network_policy",
        }
    }
}

label_value!(Refusal);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: Refusal,
}

/// What a decision of a pod's security policy did.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AuthzAction {
    Allow,
    Deny,
    /// An AUDIT policy matched (beside the verdict).
    Audit,
}

impl AuthzAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

label_value!(AuthzAction);

/// Who decided: the destination's node (Istio's `reporter` vocabulary).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AuthzReporter {
    Destination,
}

impl AuthzReporter {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Destination => "destination",
        }
    }
}

label_value!(AuthzReporter);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub action: AuthzAction,
    /// `namespace/name` of the deciding (or auditing) policy; empty when none decided (no
    /// policy, no ALLOW matching, STRICT).
    pub policy: String,
    pub reporter: AuthzReporter,
}

/// The tunnels' metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    tunnels_open: Family<DirectionLabels, Gauge>,
    handshakes: Family<DirectionLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    streams: Family<DirectionLabels, Counter>,
    streams_refused: Family<RefusalLabels, Counter>,
    authorization: Family<AuthzLabels, Counter>,
}

impl ProxyMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            tunnels_open: Family::default(),
            handshakes: Family::default(),
            handshake_failures: Family::default(),
            streams: Family::default(),
            streams_refused: Family::default(),
            authorization: Family::default(),
        };
        registry.register(
            "mesh_tunnels_open",
            "Mutual TLS tunnels (HTTP/2 connections) open, by direction",
            m.tunnels_open.clone(),
        );
        registry.register(
            "mesh_handshakes",
            "Mutual TLS handshakes completed, by direction",
            m.handshakes.clone(),
        );
        registry.register(
            "mesh_handshake_failures",
            "Mutual TLS handshakes that failed, by direction and reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "mesh_streams",
            "Connections carried as streams of a tunnel, by direction",
            m.streams.clone(),
        );
        registry.register(
            "authorization_decisions",
            "Decisions of meshed pods' security policies on new connections with a certificate, \
             by action, deciding policy and reporter",
            m.authorization.clone(),
        );
        registry.register(
            "mesh_streams_refused",
            "Streams a peer asked for and this node refused, by reason",
            m.streams_refused.clone(),
        );
        for direction in [Direction::Outbound, Direction::Inbound] {
            let d = DirectionLabels { direction };
            let _ = m.tunnels_open.get_or_create(&d);
            let _ = m.handshakes.get_or_create(&d);
            let _ = m.streams.get_or_create(&d);
            for reason in HandshakeFailure::ALL {
                let _ = m
                    .handshake_failures
                    .get_or_create(&HandshakeLabels { direction, reason });
            }
        }
        for reason in [
            Refusal::Forbidden,
            Refusal::Unreachable,
            Refusal::Unauthorized,
        ] {
            let _ = m.streams_refused.get_or_create(&RefusalLabels { reason });
        }
        m
    }

    pub fn tunnel_opened(&self, direction: Direction) {
        self.tunnels_open
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn tunnel_closed(&self, direction: Direction) {
        self.tunnels_open
            .get_or_create(&DirectionLabels { direction })
            .dec();
    }

    pub fn handshake_done(&self, direction: Direction) {
        self.handshakes
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }

    pub fn stream_opened(&self, direction: Direction) {
        self.streams
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// A decision on a stream, and the AUDIT policy that matched beside it.
    pub fn authorization(&self, d: &crate::compile::authz::Decision) {
        let labels = |action, policy: Option<&str>| AuthzLabels {
            action,
            policy: policy.unwrap_or_default().to_owned(),
            reporter: AuthzReporter::Destination,
        };
        let action = if d.allowed {
            AuthzAction::Allow
        } else {
            AuthzAction::Deny
        };
        let by = d.by.as_ref().map(|b| b.policy.as_str());
        self.authorization.get_or_create(&labels(action, by)).inc();
        if let Some(a) = &d.audit {
            let audit = labels(AuthzAction::Audit, Some(&a.policy));
            self.authorization.get_or_create(&audit).inc();
        }
    }

    pub fn stream_refused(&self, reason: Refusal) {
        self.streams_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }
}
