//! What stands in for an object weft cannot use, so that the pods it concerns are more
//! isolated, never less.
//!
//! A Pod or NetworkPolicy that fails validation and has no earlier good version would
//! otherwise be missing from the store: a missing pod runs unenforced and its address has no
//! identity; a missing policy does not isolate the pods it selects. Instead the store holds:
//! - for a Pod, its name, cgroup and addresses only, marked [`REJECTED_ANNOTATION`]: compile
//!   isolates it both ways and gives its addresses an identity no policy peer matches;
//! - for a NetworkPolicy, a policy of the same name with no rules for both directions,
//!   selecting what the original selects (its whole namespace when even the selector is
//!   unusable).
//!
//! The rejection itself is reported as before (`weft status`, the rejection metric).
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Pod, PodIP, PodSpec, PodStatus},
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde_json::Value;

use super::{Kind, Object, validate::CGROUP_ANNOTATION};

/// Marks a Pod that stands in for a rejected one. Never taken from the API.
pub const REJECTED_ANNOTATION: &str = "weft.io/rejected";

/// The stand-in for a rejected document of `kind` (its raw value), if the kind needs one and
/// the document names its object.
pub fn stand_in(kind: Kind, value: &Value, namespace: &str) -> Option<Object> {
    let name = value["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())?;
    let metadata = ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        uid: value["metadata"]["uid"].as_str().map(str::to_owned),
        ..ObjectMeta::default()
    };
    match kind {
        Kind::Pod => Some(Object::Pod(Arc::new(pod(metadata, value)))),
        Kind::NetworkPolicy => Some(Object::NetworkPolicy(Arc::new(policy(metadata, value)))),
        Kind::Namespace | Kind::Service | Kind::EndpointSlice => None,
    }
}

/// Whether the pod stands in for a rejected one.
pub fn is_rejected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REJECTED_ANNOTATION))
}

fn pod(mut metadata: ObjectMeta, value: &Value) -> Pod {
    let mut annotations = BTreeMap::from([(REJECTED_ANNOTATION.to_owned(), "true".to_owned())]);
    if let Some(cgroup) = value["metadata"]["annotations"][CGROUP_ANNOTATION].as_str() {
        annotations.insert(CGROUP_ANNOTATION.to_owned(), cgroup.to_owned());
    }
    metadata.annotations = Some(annotations);
    let spec = &value["spec"];
    let status = &value["status"];
    let ip = |v: &Value| Some(super::object::ip(v.as_str()?)?.to_string());
    let pod_ips: Vec<PodIP> = status["podIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| ip(&p["ip"]))
        .map(|ip| PodIP { ip })
        .collect();
    Pod {
        metadata,
        spec: Some(PodSpec {
            node_name: spec["nodeName"].as_str().map(str::to_owned),
            host_network: spec["hostNetwork"].as_bool(),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: status["phase"].as_str().map(str::to_owned),
            pod_ip: ip(&status["podIP"]),
            pod_ips: (!pod_ips.is_empty()).then_some(pod_ips),
            ..PodStatus::default()
        }),
    }
}

fn policy(metadata: ObjectMeta, value: &Value) -> NetworkPolicy {
    // Selecting more than the original would isolate more pods: that is the direction to
    // err in, so an unusable selector selects the whole namespace.
    let selector = serde_json::from_value::<LabelSelector>(value["spec"]["podSelector"].clone())
        .ok()
        .filter(super::validate::netpol::selector_is_valid)
        .unwrap_or_default();
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: None,
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests;
