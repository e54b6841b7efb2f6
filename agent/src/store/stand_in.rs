//! What stands in for an object weft cannot use, so that the pods it concerns are more
//! isolated, never less.
//!
//! A Pod or NetworkPolicy that fails validation and has no earlier good version would
//! otherwise be missing from the store: a missing pod runs unenforced and its address has no
//! identity; a missing policy does not isolate the pods it selects. Instead the store holds:
//! - for a Pod, its name, cgroup and addresses only, marked [`REJECTED_ANNOTATION`]: compile
//!   isolates it both ways and gives its addresses an identity no policy peer matches;
//! - for a NetworkPolicy, a policy of the same name with no rules, isolating the directions
//!   the original does (both when its `policyTypes` cannot be read) for what the original
//!   selects (its whole namespace when even the selector is unusable);
//! - for an AuthorizationPolicy ([`authorization_policy`]), one that allows nothing where the
//!   original would allow (ALLOW) and denies everything where it could deny (DENY, CUSTOM, an
//!   action weft cannot read), for what it selects (its whole scope when the selector is
//!   unusable); one that decides nothing for AUDIT or a policy that targets a waypoint (it
//!   still strips the last version beside it);
//! - for a PeerAuthentication ([`peer_authentication`]), STRICT for what it selects, over
//!   every other PeerAuthentication (`compile::authz::mtls`), and the last version beside it
//!   STRICT for what it selects.
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

use super::{
    Kind, Object,
    security::{
        self, Action, AuthorizationPolicy, AuthorizationPolicySpec, Mode, MutualTls,
        PeerAuthentication, PeerAuthenticationSpec, WorkloadSelector,
    },
    validate::CGROUP_ANNOTATION,
};

/// Marks an object that stands in for a rejected one. Never taken from the API.
pub const REJECTED_ANNOTATION: &str = "weft.io/rejected";

/// The name suffix of the stand-in beside a policy's last version: `~` is in no name the API
/// server accepts, so it never meets a real policy's.
pub const REJECTED_VERSION_SUFFIX: &str = "~rejected-version";

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
        Kind::PeerAuthentication => {
            peer_authentication(value, namespace).map(|p| Object::PeerAuthentication(Arc::new(p)))
        }
        Kind::AuthorizationPolicy => {
            authorization_policy(value, namespace).map(|p| Object::AuthorizationPolicy(Arc::new(p)))
        }
        // A rejected DestinationRule keeps its last good version: health checking is no
        // limit on what a pod may reach.
        Kind::Namespace | Kind::Service | Kind::EndpointSlice | Kind::DestinationRule => None,
    }
}

/// Whether the pod stands in for a rejected one.
pub fn is_rejected(pod: &Pod) -> bool {
    marked(&pod.metadata)
}

/// Whether the object is a stand-in (rather than a good version).
pub fn is_stand_in(object: &Object) -> bool {
    match object {
        Object::Pod(p) => marked(&p.metadata),
        Object::NetworkPolicy(p) => marked(&p.metadata),
        Object::PeerAuthentication(p) => marked(&p.metadata),
        Object::AuthorizationPolicy(p) => marked(&p.metadata),
        Object::Namespace(_)
        | Object::Service(_)
        | Object::EndpointSlice(_)
        | Object::DestinationRule(_) => false,
    }
}

/// What stays of a policy's last version beside the stand-in of a newer, rejected one: a
/// NetworkPolicy without its rules ([`stripped`]), an ALLOW AuthorizationPolicy without its
/// rules (the rejected version may have revoked what they allowed), any other
/// AuthorizationPolicy as it was (it only denies), a PeerAuthentication made STRICT.
/// `None` for the kinds whose stand-in replaces the object.
pub fn kept_beside(kept: &Object) -> Option<Object> {
    match kept {
        Object::NetworkPolicy(np) if is_stand_in_policy(np) => Some(kept.clone()),
        Object::NetworkPolicy(np) => Some(Object::NetworkPolicy(Arc::new(stripped(np)))),
        Object::AuthorizationPolicy(ap)
            if !matches!(ap.spec.action, None | Some(Action::Allow)) =>
        {
            Some(kept.clone())
        }
        Object::AuthorizationPolicy(ap) => {
            let mut ap = AuthorizationPolicy::clone(ap);
            mark(&mut ap.metadata);
            ap.spec.rules = None;
            Some(Object::AuthorizationPolicy(Arc::new(ap)))
        }
        // The rejected version may have narrowed an exception: what the old one selects
        // becomes STRICT too.
        Object::PeerAuthentication(pa) => {
            let mut pa = PeerAuthentication::clone(pa);
            mark(&mut pa.metadata);
            pa.spec.mtls = Some(MutualTls {
                mode: Some(Mode::Strict),
            });
            pa.spec.port_level_mtls = None;
            Some(Object::PeerAuthentication(Arc::new(pa)))
        }
        Object::Pod(_)
        | Object::Namespace(_)
        | Object::Service(_)
        | Object::EndpointSlice(_)
        | Object::DestinationRule(_) => None,
    }
}

/// Marks an object as standing in for what weft could not use.
fn mark(meta: &mut ObjectMeta) {
    meta.annotations
        .get_or_insert_default()
        .insert(REJECTED_ANNOTATION.to_owned(), "true".to_owned());
}

/// Whether the policy is a stand-in.
pub fn is_stand_in_policy(np: &NetworkPolicy) -> bool {
    marked(&np.metadata)
}

fn marked(meta: &ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(REJECTED_ANNOTATION))
}

/// What stays of a policy's last good version once a newer one is rejected: its selector and
/// directions, none of its rules (the rejected version may have revoked them). Together with
/// the stand-in of the rejected version, beside it, what either version selects is isolated.
pub fn stripped(kept: &NetworkPolicy) -> NetworkPolicy {
    let mut np = kept.clone();
    np.metadata
        .annotations
        .get_or_insert_default()
        .insert(REJECTED_ANNOTATION.to_owned(), "true".to_owned());
    let value = serde_json::to_value(kept).unwrap_or_default();
    if let Some(spec) = np.spec.as_mut() {
        spec.policy_types = Some(policy_types(&value["spec"]));
        spec.ingress = None;
        spec.egress = None;
    }
    np
}

/// The stand-in of a rejected policy version, named to sit beside its last version.
pub fn beside(of: &super::ObjectRef, stand_in: Object) -> (super::ObjectRef, Object) {
    let name = format!("{}{REJECTED_VERSION_SUFFIX}", of.name);
    let object = match stand_in {
        Object::NetworkPolicy(np) => {
            let mut np = Arc::unwrap_or_clone(np);
            np.metadata.name = Some(name.clone());
            Object::NetworkPolicy(Arc::new(np))
        }
        Object::AuthorizationPolicy(ap) => {
            let mut ap = Arc::unwrap_or_clone(ap);
            ap.metadata.name = Some(name.clone());
            Object::AuthorizationPolicy(Arc::new(ap))
        }
        Object::PeerAuthentication(pa) => {
            let mut pa = Arc::unwrap_or_clone(pa);
            pa.metadata.name = Some(name.clone());
            Object::PeerAuthentication(Arc::new(pa))
        }
        other => other,
    };
    (super::ObjectRef::new(of.kind, &of.namespace, &name), object)
}

/// The stand-in of a rejected AuthorizationPolicy document (see the module's documentation).
pub fn authorization_policy(value: &Value, namespace: &str) -> Option<AuthorizationPolicy> {
    let spec = &value["spec"];
    let targeted = spec["targetRef"].is_object()
        || spec["targetRefs"].as_array().is_some_and(|t| !t.is_empty());
    let deny_all = (Some(Action::Deny), Some(vec![security::Rule::default()]));
    // An AUDIT policy without rules: it decides nothing, but as a stand-in it still strips
    // an ALLOW last version beside it (`kept_beside`).
    let no_effect = (Some(Action::Audit), None);
    let (action, rules) = match &spec["action"] {
        // A spec weft cannot read could say anything.
        _ if !(spec.is_object() || spec.is_null()) => deny_all,
        // For a waypoint: nothing of it is weft's.
        _ if targeted && spec["selector"].is_null() => no_effect,
        Value::Null => (None, None),
        Value::String(a) if a == "ALLOW" => (Some(Action::Allow), None),
        Value::String(a) if a == "AUDIT" => no_effect,
        _ => deny_all,
    };
    Some(AuthorizationPolicy {
        api_version: value["apiVersion"].as_str().unwrap_or_default().to_owned(),
        kind: "AuthorizationPolicy".to_owned(),
        metadata: stand_in_metadata(value, namespace)?,
        spec: AuthorizationPolicySpec {
            selector: workload_selector(&spec["selector"]),
            action,
            rules,
            ..AuthorizationPolicySpec::default()
        },
        status: None,
    })
}

/// The stand-in of a rejected PeerAuthentication document: STRICT for what it selects.
pub fn peer_authentication(value: &Value, namespace: &str) -> Option<PeerAuthentication> {
    Some(PeerAuthentication {
        api_version: value["apiVersion"].as_str().unwrap_or_default().to_owned(),
        kind: "PeerAuthentication".to_owned(),
        metadata: stand_in_metadata(value, namespace)?,
        spec: PeerAuthenticationSpec {
            selector: workload_selector(&value["spec"]["selector"]),
            mtls: Some(MutualTls {
                mode: Some(Mode::Strict),
            }),
            port_level_mtls: None,
        },
        status: None,
    })
}

fn stand_in_metadata(value: &Value, namespace: &str) -> Option<ObjectMeta> {
    let name = value["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())?;
    Some(ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        annotations: Some(BTreeMap::from([(
            REJECTED_ANNOTATION.to_owned(),
            "true".to_owned(),
        )])),
        ..ObjectMeta::default()
    })
}

/// The selector when it can be used as written; `None` (the whole scope) otherwise.
fn workload_selector(value: &Value) -> Option<WorkloadSelector> {
    let selector: WorkloadSelector = serde_json::from_value(value.clone()).ok()?;
    let usable = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| !k.is_empty() && !k.contains('*') && !v.contains('*'));
    usable.then_some(selector)
}

fn pod(mut metadata: ObjectMeta, value: &Value) -> Pod {
    let mut annotations = BTreeMap::from([(REJECTED_ANNOTATION.to_owned(), "true".to_owned())]);
    // Only a path that could be right: an unusable one may be why the pod was rejected.
    let cgroup = value["metadata"]["annotations"][CGROUP_ANNOTATION].as_str();
    if let Some(cgroup) = cgroup.filter(|c| super::validate::is_cgroup_path(c)) {
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

fn policy(mut metadata: ObjectMeta, value: &Value) -> NetworkPolicy {
    metadata.annotations = Some(BTreeMap::from([(
        REJECTED_ANNOTATION.to_owned(),
        "true".to_owned(),
    )]));
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
            policy_types: Some(policy_types(&value["spec"])),
            ingress: None,
            egress: None,
        }),
    }
}

/// The directions the rejected version isolates: its `policyTypes` when they can be read
/// (defaulted as the API server does when absent), both when they cannot.
fn policy_types(spec: &Value) -> Vec<String> {
    let both = || vec!["Ingress".to_owned(), "Egress".to_owned()];
    match &spec["policyTypes"] {
        Value::Null => {
            let egress = match &spec["egress"] {
                Value::Null => false,
                Value::Array(rules) => !rules.is_empty(),
                // Something weft cannot read: as if it had egress rules.
                _ => true,
            };
            let mut types = vec!["Ingress".to_owned()];
            if egress {
                types.push("Egress".to_owned());
            }
            types
        }
        Value::Array(given) => {
            let known: Vec<String> = given
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| matches!(*t, "Ingress" | "Egress"))
                .map(str::to_owned)
                .collect();
            if known.is_empty() || known.len() != given.len() {
                both()
            } else {
                known
            }
        }
        _ => both(),
    }
}

#[cfg(test)]
mod tests;
