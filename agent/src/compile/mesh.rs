//! Which pods are in the mesh, and the identity each one has there.
//!
//! A pod is meshed when it or its namespace carries `weft.io/mesh: enabled`; the pod's own
//! label wins, and `disabled` opts a pod out of a meshed namespace. Any other value is
//! reported and read as `enabled` (mutual TLS is the side to err on). Its identity is its
//! service account's SPIFFE ID.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use crate::{
    identity::SpiffeId,
    store::{Key, Store},
};

/// The enrollment label, on namespaces and pods.
pub const MESH_LABEL: &str = "weft.io/mesh";

/// A value of [`MESH_LABEL`] that is neither `enabled` nor `disabled`: read as `enabled`,
/// and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// `Namespace NAME` or `Pod NAMESPACE/NAME`.
    pub object: String,
    pub value: String,
}

/// The meshed pods (by namespace and name) with their identities, and the label values that
/// were not understood.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub meshed: BTreeMap<Key, SpiffeId>,
    pub unknown: Vec<UnknownValue>,
}

/// Reads enrollment from the store's namespaces and pods.
pub fn enrollment(store: &Store, trust_domain: &str) -> Enrollment {
    let mut out = Enrollment::default();
    let mut namespaces: BTreeMap<&str, bool> = BTreeMap::new();
    for (name, ns) in &store.namespaces {
        let labels = ns.metadata.labels.as_ref();
        let choice = choice(
            labels.and_then(|l| l.get(MESH_LABEL)),
            &mut out.unknown,
            || format!("Namespace {name}"),
        );
        namespaces.insert(name, choice == Some(true));
    }
    for ((ns, name), pod) in &store.pods {
        let labels = pod.metadata.labels.as_ref();
        let own = choice(
            labels.and_then(|l| l.get(MESH_LABEL)),
            &mut out.unknown,
            || format!("Pod {ns}/{name}"),
        );
        let meshed = own.unwrap_or_else(|| namespaces.get(ns.as_str()).copied().unwrap_or(false));
        if meshed {
            let id = SpiffeId::new(trust_domain, ns, service_account(pod));
            out.meshed.insert((ns.clone(), name.clone()), id);
        }
    }
    out
}

/// `Some(true)` for `enabled`, `Some(false)` for `disabled`, `None` when absent. A value not
/// understood (recorded in `unknown`) meshes: what weft cannot read errs on the side of
/// mutual TLS, never of plaintext.
fn choice(
    value: Option<&String>,
    unknown: &mut Vec<UnknownValue>,
    object: impl FnOnce() -> String,
) -> Option<bool> {
    match value.map(String::as_str) {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => {
            unknown.push(UnknownValue {
                object: object(),
                value: other.to_owned(),
            });
            Some(true)
        }
    }
}

/// `spec.serviceAccountName`, or the deprecated `spec.serviceAccount`.
fn service_account(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    spec.service_account_name
        .as_deref()
        .or(spec.service_account.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::policy::tests::model::store_of;

    fn ns(name: &str, mesh: Option<&str>) -> String {
        let labels = mesh.map_or(String::new(), |m| {
            format!(", labels: {{weft.io/mesh: {m}}}")
        });
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{labels}}}\n")
    }

    fn pod(ns: &str, name: &str, mesh: Option<&str>, sa: Option<&str>) -> String {
        let labels = mesh.map_or(String::new(), |m| {
            format!(", labels: {{weft.io/mesh: {m}}}")
        });
        let spec = sa.map_or(String::new(), |s| {
            format!("spec: {{serviceAccountName: {s}, containers: []}}\n")
        });
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}{labels}}}\n{spec}"
        )
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_owned(), name.to_owned())
    }

    #[test]
    fn a_meshed_namespace_meshes_its_pods_unless_one_opts_out() {
        let docs = [
            ns("shop", Some("enabled")),
            ns("plain", None),
            pod("shop", "web", None, Some("web")),
            pod("shop", "legacy", Some("disabled"), None),
            pod("plain", "job", None, None),
            pod("plain", "api", Some("enabled"), None),
        ];
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let e = enrollment(&store_of(&refs), "cluster.local");
        let meshed: Vec<(Key, String)> = e
            .meshed
            .iter()
            .map(|(k, id)| (k.clone(), id.to_string()))
            .collect();
        assert_eq!(
            meshed,
            [
                (
                    key("plain", "api"),
                    "spiffe://cluster.local/ns/plain/sa/default".to_owned()
                ),
                (
                    key("shop", "web"),
                    "spiffe://cluster.local/ns/shop/sa/web".to_owned()
                ),
            ]
        );
        assert!(e.unknown.is_empty());
    }

    /// The API server accepts any label value: one weft does not understand is reported and
    /// the pod follows its namespace.
    #[test]
    fn an_unknown_value_is_reported_and_meshes_the_pod() {
        let docs = [
            ns("plain", None),
            ns("shop", Some("Disabled")),
            pod("plain", "web", Some("yes-please"), Some("web")),
            pod("shop", "db", None, None),
        ];
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let e = enrollment(&store_of(&refs), "example.org");
        let meshed: Vec<String> = e.meshed.values().map(ToString::to_string).collect();
        assert_eq!(
            meshed,
            [
                "spiffe://example.org/ns/plain/sa/web",
                "spiffe://example.org/ns/shop/sa/default"
            ]
        );
        assert_eq!(
            e.unknown,
            [
                UnknownValue {
                    object: "Namespace shop".into(),
                    value: "Disabled".into()
                },
                UnknownValue {
                    object: "Pod plain/web".into(),
                    value: "yes-please".into()
                }
            ]
        );
    }
}
