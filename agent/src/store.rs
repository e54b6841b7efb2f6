//! The desired state as Kubernetes objects: what sources feed and what `compile` reads.
//!
//! Objects are decoded strictly (unknown fields are errors) and validated before they enter
//! the store; a rejected document never replaces a good object.
pub mod networking;
pub mod object;
pub mod security;
pub mod stand_in;
pub mod strict;
pub mod validate;

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use self::{
    object::{Kind, Object, ObjectRef},
    validate::FieldError,
};

/// Why a document was not accepted: the object (when it could be named) and its problems.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Invalid {
    pub object: Option<ObjectRef>,
    pub errors: Vec<FieldError>,
    /// What the store holds while no good version exists ([`stand_in`]).
    #[serde(skip)]
    pub stand_in: Option<Object>,
}

impl Invalid {
    fn new(object: Option<ObjectRef>, field: &str, message: impl Into<String>) -> Self {
        Self {
            object,
            errors: vec![FieldError {
                field: field.to_owned(),
                message: message.into(),
            }],
            stand_in: None,
        }
    }
}

/// Decodes one document (already parsed into a generic value) into a validated object.
/// Namespaced objects without a namespace are put in `default`, as kubectl does.
pub fn decode(mut value: Value) -> Result<(ObjectRef, Object), Invalid> {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    if !value.is_object() {
        return Err(Invalid::new(
            None,
            "",
            "a document must be a mapping with apiVersion and kind",
        ));
    }
    let api_version = text(&value, "apiVersion").unwrap_or_default();
    let kind_name = text(&value, "kind").unwrap_or_default();
    let Some(kind) = Kind::from_type(&api_version, &kind_name) else {
        let msg = format!(
            "unsupported kind {kind_name:?} of apiVersion {api_version:?}: weft reads v1 Namespace, Pod \
             and Service, discovery.k8s.io/v1 EndpointSlice, networking.k8s.io/v1 NetworkPolicy, \
             and security.istio.io/v1 (or v1beta1) PeerAuthentication and AuthorizationPolicy"
        );
        return Err(Invalid::new(None, "kind", msg));
    };
    // The API server refuses a name or namespace that is not a string (YAML 1.1 reads
    // `namespace: y` as true): taking it as absent would put the object in `default`.
    for field in ["name", "namespace"] {
        if let Some(v) = value.get("metadata").and_then(|m| m.get(field))
            && !(v.is_string() || v.is_null())
        {
            let msg = format!("must be a string, not {v} (quote it in YAML)");
            return Err(Invalid::new(None, &format!("metadata.{field}"), msg));
        }
    }
    let name = value
        .get("metadata")
        .map(|m| text(m, "name").unwrap_or_default())
        .unwrap_or_default();
    let mut namespace = String::new();
    if kind.namespaced() {
        namespace = value
            .get("metadata")
            .and_then(|m| text(m, "namespace"))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.clone()));
        }
    }
    let object_ref = (!name.is_empty()).then(|| ObjectRef::new(kind, &namespace, &name));
    let invalid = |errors| Invalid {
        object: object_ref.clone(),
        errors,
        stand_in: stand_in::stand_in(kind, &value, &namespace),
    };
    let object = match kind {
        Kind::Namespace => {
            Object::Namespace(Arc::new(typed::<Namespace>(&value).map_err(invalid)?))
        }
        Kind::Pod => Object::Pod(Arc::new(typed::<Pod>(&value).map_err(invalid)?)),
        Kind::Service => Object::Service(Arc::new(typed::<Service>(&value).map_err(invalid)?)),
        Kind::EndpointSlice => {
            Object::EndpointSlice(Arc::new(typed::<EndpointSlice>(&value).map_err(invalid)?))
        }
        Kind::NetworkPolicy => {
            Object::NetworkPolicy(Arc::new(typed::<NetworkPolicy>(&value).map_err(invalid)?))
        }
        Kind::PeerAuthentication => Object::PeerAuthentication(Arc::new(
            typed::<security::PeerAuthentication>(&value).map_err(invalid)?,
        )),
        Kind::AuthorizationPolicy => Object::AuthorizationPolicy(Arc::new(
            typed::<security::AuthorizationPolicy>(&value).map_err(invalid)?,
        )),
        Kind::DestinationRule => Object::DestinationRule(Arc::new(
            typed::<networking::DestinationRule>(&value).map_err(invalid)?,
        )),
    };
    validate::object(&object).map_err(invalid)?;
    let object_ref = object_ref.ok_or_else(|| Invalid::new(None, "metadata.name", "required"))?;
    Ok((object_ref, object))
}

/// Strict decoding: a type error names its field; a field the type does not know is an error.
fn typed<T: DeserializeOwned + serde::Serialize>(value: &Value) -> Result<T, Vec<FieldError>> {
    let decoded: T = serde_path_to_error::deserialize(value).map_err(|e| {
        vec![FieldError {
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        }]
    })?;
    let round_trip = serde_json::to_value(&decoded).map_err(|e| {
        vec![FieldError {
            field: String::new(),
            message: format!("cannot re-encode: {e}"),
        }]
    })?;
    let unknown = strict::unknown_fields(value, &round_trip);
    if unknown.is_empty() {
        Ok(decoded)
    } else {
        Err(unknown
            .into_iter()
            .map(|field| FieldError {
                field,
                message: "unknown field".into(),
            })
            .collect())
    }
}

/// Decodes and validates an AuthorizationPolicy document: `Err` names each problem's field.
pub fn authorization_policy(
    value: &Value,
) -> Result<security::AuthorizationPolicy, Vec<FieldError>> {
    let ap: security::AuthorizationPolicy = typed(value)?;
    validate::security::authorization_policy(&ap)?;
    Ok(ap)
}

/// Decodes and validates a PeerAuthentication document (as [`authorization_policy`]).
pub fn peer_authentication(value: &Value) -> Result<security::PeerAuthentication, Vec<FieldError>> {
    let pa: security::PeerAuthentication = typed(value)?;
    validate::security::peer_authentication(&pa)?;
    Ok(pa)
}

/// (namespace, name).
pub type Key = (String, String);

/// Every object the sources currently want, by kind.
#[derive(Debug, Default, Clone)]
pub struct Store {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<Key, Arc<Pod>>,
    pub services: BTreeMap<Key, Arc<Service>>,
    pub endpoint_slices: BTreeMap<Key, Arc<EndpointSlice>>,
    pub network_policies: BTreeMap<Key, Arc<NetworkPolicy>>,
    /// Istio's security API ([`security`]).
    pub peer_authentications: BTreeMap<Key, Arc<security::PeerAuthentication>>,
    pub authorization_policies: BTreeMap<Key, Arc<security::AuthorizationPolicy>>,
    /// Istio's DestinationRules ([`networking`]).
    pub destination_rules: BTreeMap<Key, Arc<networking::DestinationRule>>,
    /// Kinds the source reads but has not listed yet (one the API server began to serve
    /// after the first pass): what they would hold is unknown.
    pub unlisted: std::collections::BTreeSet<Kind>,
}

impl Store {
    pub fn from_objects<'a>(
        objects: impl IntoIterator<Item = (&'a ObjectRef, &'a Object)>,
    ) -> Self {
        let mut store = Self::default();
        for (r, o) in objects {
            let key = (r.namespace.clone(), r.name.clone());
            match o {
                Object::Namespace(x) => {
                    drop(store.namespaces.insert(r.name.clone(), Arc::clone(x)))
                }
                Object::Pod(x) => drop(store.pods.insert(key, Arc::clone(x))),
                Object::Service(x) => drop(store.services.insert(key, Arc::clone(x))),
                Object::EndpointSlice(x) => drop(store.endpoint_slices.insert(key, Arc::clone(x))),
                Object::NetworkPolicy(x) => drop(store.network_policies.insert(key, Arc::clone(x))),
                Object::PeerAuthentication(x) => {
                    drop(store.peer_authentications.insert(key, Arc::clone(x)))
                }
                Object::AuthorizationPolicy(x) => {
                    drop(store.authorization_policies.insert(key, Arc::clone(x)))
                }
                Object::DestinationRule(x) => {
                    drop(store.destination_rules.insert(key, Arc::clone(x)))
                }
            }
        }
        store
    }

    /// A directory source with `--node-name`: a pod whose `spec.nodeName` names another node
    /// is not this agent's to enforce on. Its cgroup annotation goes; its address still names
    /// it (a peer, as every pod of another node is in Kubernetes mode).
    pub fn unbind_other_nodes(&mut self, node: &str) {
        for pod in self.pods.values_mut() {
            let elsewhere = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n != node);
            let bound = pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(validate::CGROUP_ANNOTATION));
            if elsewhere && bound {
                let mut p = Pod::clone(pod);
                if let Some(a) = p.metadata.annotations.as_mut() {
                    a.remove(validate::CGROUP_ANNOTATION);
                }
                *pod = Arc::new(p);
            }
        }
    }

    /// This store as the node running `pod` sees it, for judging that pod's side of a
    /// connection here (`weft policy check`): only `pod` is bound, to cgroup `cgroup`.
    pub fn as_if_only_bound(&self, pod: &Key, cgroup: &str) -> Self {
        let mut out = self.clone();
        for (key, p) in &mut out.pods {
            let bound = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(validate::CGROUP_ANNOTATION));
            if key == pod {
                let mut x = Pod::clone(p);
                x.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(validate::CGROUP_ANNOTATION.to_owned(), cgroup.to_owned());
                *p = Arc::new(x);
            } else if bound {
                let mut x = Pod::clone(p);
                if let Some(a) = x.metadata.annotations.as_mut() {
                    a.remove(validate::CGROUP_ANNOTATION);
                }
                *p = Arc::new(x);
            }
        }
        out
    }

    /// Object counts by kind, for status.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        BTreeMap::from([
            (Kind::Namespace.as_str(), self.namespaces.len()),
            (Kind::Pod.as_str(), self.pods.len()),
            (Kind::Service.as_str(), self.services.len()),
            (Kind::EndpointSlice.as_str(), self.endpoint_slices.len()),
            (Kind::NetworkPolicy.as_str(), self.network_policies.len()),
            (
                Kind::PeerAuthentication.as_str(),
                self.peer_authentications.len(),
            ),
            (
                Kind::AuthorizationPolicy.as_str(),
                self.authorization_policies.len(),
            ),
            (Kind::DestinationRule.as_str(), self.destination_rules.len()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::yaml;

    fn doc(text: &str) -> Result<(ObjectRef, Object), Invalid> {
        decode(yaml::parse(text).expect("yaml"))
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n    targetPort: http\n";

    const RULE: &str = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: web, namespace: shop}\nspec:\n  host: web\n  subsets: [{name: v1, labels: {version: v1}}]\n  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n    connectionPool: {tcp: {maxConnections: 100, connectTimeout: 250ms}, http: {maxRetries: 3}}\n    outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, splitExternalLocalOriginErrors: true}\n    portLevelSettings:\n    - port: {number: 80}\n      outlierDetection: {maxEjectionPercent: 50}\n";

    /// A DestinationRule keeps every field weft does not read: never stricter than the
    /// API server.
    #[test]
    fn a_destination_rule_decodes_with_the_fields_weft_does_not_read() {
        let (r, o) = doc(RULE).expect("valid");
        assert_eq!(r.to_string(), "DestinationRule shop/web");
        let Object::DestinationRule(dr) = o else {
            panic!("not a DestinationRule")
        };
        let policy = dr.spec.traffic_policy.as_ref().expect("trafficPolicy");
        let o = policy.outlier_detection.as_ref().expect("outlierDetection");
        assert_eq!(o.consecutive_5xx_errors, Some(3));
        assert_eq!(o.base_ejection_time.as_deref(), Some("1m"));
        assert!(policy.other.contains_key("loadBalancer"));
        assert!(dr.spec.other.contains_key("subsets"));
        let pool = policy.connection_pool.as_ref().expect("connectionPool");
        let tcp = pool.tcp.as_ref().expect("tcp");
        assert_eq!(tcp.connect_timeout.as_deref(), Some("250ms"));
        assert!(tcp.other.contains_key("maxConnections"));
        assert!(pool.other.contains_key("http"));
    }

    /// What istiod refuses is refused, naming the field.
    #[test]
    fn a_destination_rule_is_validated_as_istiod_does() {
        let field = |from: &str, to: &str| {
            let e = doc(&RULE.replace(from, to)).expect_err(to);
            e.errors[0].field.clone()
        };
        assert_eq!(
            field("interval: 5s", "interval: 5"),
            "spec.trafficPolicy.outlierDetection.interval"
        );
        assert_eq!(
            field("maxEjectionPercent: 50", "maxEjectionPercent: 150"),
            "spec.trafficPolicy.portLevelSettings[0].outlierDetection.maxEjectionPercent"
        );
        assert_eq!(
            field("- port: {number: 80}\n      ", "- "),
            "spec.trafficPolicy.portLevelSettings[0].port"
        );
        assert_eq!(field("host: web", "host: \"\""), "spec.host");
        assert_eq!(
            field("connectTimeout: 250ms", "connectTimeout: 250us"),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout"
        );
    }

    #[test]
    fn decodes_a_service_into_the_default_namespace() {
        let (r, o) = doc(SERVICE).expect("valid");
        assert_eq!(r.to_string(), "Service default/web");
        let Object::Service(s) = o else {
            panic!("not a service")
        };
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn a_namespace_yaml_reads_as_a_boolean_is_refused_not_defaulted() {
        let text = SERVICE.replace("  name: web\n", "  name: web\n  namespace: y\n");
        assert!(text.contains("namespace: y"), "{text}");
        let e = doc(&text).expect_err("refused");
        assert_eq!(e.errors[0].field, "metadata.namespace");
        assert_eq!(
            e.errors[0].message,
            "must be a string, not true (quote it in YAML)"
        );
        assert!(doc(&text.replace("namespace: y", "namespace: \"y\"")).is_ok());
    }

    #[test]
    fn rejects_unknown_fields_with_their_path() {
        let text = SERVICE.replace(
            "    targetPort: http\n",
            "    targetPort: http\n    prot: TCP\n",
        );
        let err = doc(&text).expect_err("unknown field");
        assert_eq!(
            err.object.map(|o| o.to_string()).as_deref(),
            Some("Service default/web")
        );
        assert_eq!(err.errors[0].field, "spec.ports[0].prot");
        assert_eq!(err.errors[0].message, "unknown field");
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = SERVICE.replace("port: 80", "port: eighty");
        let err = doc(&text).expect_err("bad type");
        assert_eq!(err.errors[0].field, "spec.ports[0].port");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let err = doc(&SERVICE.replace("10.96.0.10", "10.96.0.300")).expect_err("bad ip");
        assert_eq!(err.errors[0].field, "spec.clusterIP");
        let err = doc(&SERVICE.replace("port: 80", "port: 70000")).expect_err("bad port");
        assert_eq!(err.errors[0].field, "spec.ports[0].port");
        let err =
            doc(&SERVICE.replace("targetPort: http", "targetPort: \"--x\"")).expect_err("bad name");
        assert_eq!(err.errors[0].field, "spec.ports[0].targetPort");
    }

    #[test]
    fn pods_of_other_nodes_lose_their_cgroup_and_keep_their_address() {
        let pod = |name: &str, node: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, annotations: {{weft.io/cgroup: {name}}}}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.0.1.10}}\n"
            )
        };
        let docs = [
            doc(&pod("here", "a")).expect("valid"),
            doc(&pod("there", "b")).expect("valid"),
        ];
        let mut store = Store::from_objects(docs.iter().map(|(r, o)| (r, o)));
        store.unbind_other_nodes("a");
        let cgroup = |name: &str| {
            let p = &store.pods[&("default".to_owned(), name.to_owned())];
            let a = p.metadata.annotations.as_ref().expect("annotations");
            (
                a.get(validate::CGROUP_ANNOTATION).cloned(),
                p.status.as_ref().and_then(|s| s.pod_ip.clone()),
            )
        };
        assert_eq!(
            cgroup("here"),
            (Some("here".to_owned()), Some("10.0.1.10".to_owned()))
        );
        assert_eq!(cgroup("there"), (None, Some("10.0.1.10".to_owned())));
    }

    #[test]
    fn unsupported_kinds_are_rejected_by_kind() {
        let err =
            doc("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n").expect_err("kind");
        assert_eq!(err.errors[0].field, "kind");
    }
}
