//! The Kubernetes objects weft reads, and how they are named.
use std::{fmt, net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::Serialize;

use super::{
    networking::{self, DestinationRule},
    security::{self, AuthorizationPolicy, PeerAuthentication},
};

/// The pod has ended (phase Succeeded or Failed): its containers are gone, and its address
/// may already belong to another pod.
pub fn is_finished(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

/// The kinds weft reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
    PeerAuthentication,
    AuthorizationPolicy,
    DestinationRule,
}

impl Kind {
    /// The kind for an `apiVersion` and `kind`, if weft reads it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Self> {
        match (api_version, kind) {
            ("v1", "Namespace") => Some(Self::Namespace),
            ("v1", "Pod") => Some(Self::Pod),
            ("v1", "Service") => Some(Self::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Self::EndpointSlice),
            ("networking.k8s.io/v1", "NetworkPolicy") => Some(Self::NetworkPolicy),
            (v, "PeerAuthentication") if security::is_security_api(v) => {
                Some(Self::PeerAuthentication)
            }
            (v, "AuthorizationPolicy") if security::is_security_api(v) => {
                Some(Self::AuthorizationPolicy)
            }
            (v, "DestinationRule") if networking::is_networking_api(v) => {
                Some(Self::DestinationRule)
            }
            _ => None,
        }
    }

    pub const fn namespaced(self) -> bool {
        !matches!(self, Self::Namespace)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::DestinationRule => "DestinationRule",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names an object: `Service default/web`, `Namespace prod`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A decoded, validated object. Shared, not copied, between the source, the store and
/// compile: a change to one file must not copy 10 000 Services.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    NetworkPolicy(Arc<NetworkPolicy>),
    PeerAuthentication(Arc<PeerAuthentication>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    DestinationRule(Arc<DestinationRule>),
}

impl Object {
    pub const fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::NetworkPolicy(_) => Kind::NetworkPolicy,
            Self::PeerAuthentication(_) => Kind::PeerAuthentication,
            Self::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Self::DestinationRule(_) => Kind::DestinationRule,
        }
    }
}

/// An address as Kubernetes reads it (`k8s.io/utils/net.ParseIPSloppy`, accepted outside
/// `StrictIPCIDRValidation` and kept in objects stored before it): IPv4 octets with leading
/// zeros are decimal, never octal; an IPv4-mapped IPv6 address is its IPv4 address.
pub fn ip(text: &str) -> Option<IpAddr> {
    sloppy_ip(text).map(|a| a.to_canonical())
}

/// [`ip`] without mapping IPv4-mapped addresses (a CIDR's prefix length depends on the form).
pub fn sloppy_ip(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    let (head, tail) = match text.rfind(':') {
        Some(i) => text.split_at(i + 1),
        None => ("", text),
    };
    let octets: Vec<&str> = tail.split('.').collect();
    if octets.len() != 4 {
        return None;
    }
    let mut clean = Vec::with_capacity(4);
    for o in octets {
        // Any number of leading zeros, as Go's parser reads them; the value must fit a byte.
        if o.is_empty() || !o.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        clean.push(o.parse::<u8>().ok()?.to_string());
    }
    format!("{head}{}", clean.join(".")).parse().ok()
}
