use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{reflector::store::Writer, watcher::Event};
use serde_json::json;

use std::time::Duration;

use kube::runtime::reflector;

use kube::api::DynamicObject;

use super::{watch::KINDS, *};

const NODE: &str = "node-a";
const UID: &str = "0b1c2d3e-aaaa-bbbb-cccc-123456789abc";

/// A source over reflectors the test writes, with a temporary cgroup root.
struct Harness {
    source: KubeSource,
    pods: Writer<Pod>,
    services: Writer<Service>,
    others: (
        Writer<Namespace>,
        Writer<EndpointSlice>,
        Writer<NetworkPolicy>,
    ),
    root: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Harness {
    fn new(test: &str) -> Self {
        let root = std::env::temp_dir().join(format!("weft-kube-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("cgroup root");
        let (namespaces, ns_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        let (services, svc_w) = reflector::store();
        let (endpoint_slices, eps_w) = reflector::store();
        let (network_policies, np_w) = reflector::store();
        let source = KubeSource {
            server: "https://test".into(),
            node_name: NODE.into(),
            readers: Readers {
                namespaces,
                pods,
                services,
                endpoint_slices,
                network_policies,
                istio: istio::Readers::default(),
            },
            health: Arc::default(),
            tasks: Vec::new(),
            seen: 0,
            cgroups_changed: false,
            node_seen: false,
            node_warned: false,
            validated: BTreeMap::new(),
            cgroups: Cgroups::new(&root),
        };
        Self {
            source,
            pods: pods_w,
            services: svc_w,
            others: (ns_w, eps_w, np_w),
            root,
        }
    }

    fn list_all(&self) {
        for (kind, _) in KINDS {
            self.source.health.set_listed(kind);
        }
        self.source.health.discovered(&[]);
    }

    /// A reflector of `kind` as discovery starts one (read as v1), listed.
    fn watch_security(&self, kind: Kind) -> Writer<DynamicObject> {
        let (group, _, plural) = istio::optional_kinds()
            .find(|(_, k, _)| *k == kind)
            .expect("an optional kind");
        let gvk = kube::api::GroupVersionKind::gvk(group.group, "v1", kind.as_str());
        let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, plural);
        let writer = Writer::new(ar.clone());
        self.source.health.expect(kind);
        self.source.health.set_listed(kind);
        self.source
            .readers
            .istio
            .lock()
            .expect("lock")
            .push(istio::Watched {
                kind,
                api_version: ar.api_version,
                reader: writer.as_reader(),
            });
        writer
    }

    fn snapshot(&mut self) -> (Store, Vec<Rejection>) {
        self.source.snapshot().expect("every kind listed")
    }
}

fn pod(name: &str, node: &str, rv: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "default", "uid": UID, "resourceVersion": rv,
            "annotations": annotations,
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.10", "podIPs": [{"ip": "10.0.0.10"}]},
    }))
    .expect("pod")
}

fn service(cluster_ip: &str, rv: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        },
        spec: serde_json::from_value(json!({
            "clusterIP": cluster_ip, "ports": [{"port": 80}]
        }))
        .expect("spec"),
        status: None,
    }
}

fn annotation(store: &Store, name: &str) -> Option<String> {
    store.pods[&("default".to_owned(), name.to_owned())]
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CGROUP_ANNOTATION).cloned())
}

#[test]
fn nothing_is_compiled_before_every_kind_is_listed() {
    let mut h = Harness::new("unlisted");
    h.services
        .apply_watcher_event(&Event::Apply(service("10.96.0.10", "1")));
    assert!(h.source.snapshot().is_none());
    h.list_all();
    assert_eq!(h.snapshot().0.services.len(), 1);
}

#[test]
fn cgroups_come_from_the_node_never_from_the_api() {
    let mut h = Harness::new("cgroups");
    h.list_all();
    let evil = json!({ CGROUP_ANNOTATION: "system.slice/sshd.service" });
    // A pod of another node claiming a cgroup of this one: no cgroup at all.
    h.pods
        .apply_watcher_event(&Event::Apply(pod("remote", "node-b", "1", evil.clone())));
    // A local pod claiming one: the kubelet's path for its UID instead, found once it exists.
    h.pods
        .apply_watcher_event(&Event::Apply(pod("local", NODE, "2", evil)));
    let (store, rejections) = h.snapshot();
    assert!(rejections.is_empty(), "{rejections:?}");
    assert_eq!(annotation(&store, "remote"), None);
    let expected = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        UID.replace('-', "_")
    );
    assert_eq!(
        annotation(&store, "local").as_deref(),
        Some(expected.as_str())
    );
    assert!(!h.source.cgroups_appeared());

    // The kubelet uses the cgroupfs driver after all: found by the rule, a new pass binds it.
    let actual = format!("kubepods/besteffort/pod{UID}");
    std::fs::create_dir_all(h.root.join(&actual)).expect("pod cgroup");
    assert!(h.source.cgroups_appeared());
    assert!(h.source.changed(), "a pass is due");
    let (store, _) = h.snapshot();
    assert_eq!(
        annotation(&store, "local").as_deref(),
        Some(actual.as_str())
    );
}

#[test]
fn a_static_pods_mirror_is_found_by_its_config_hash() {
    let mut h = Harness::new("mirror");
    h.list_all();
    let hash = "6f1b0a3c9d2e4f5a8b7c6d5e4f3a2b1c";
    let annotations =
        json!({"kubernetes.io/config.mirror": hash, "kubernetes.io/config.hash": hash});
    let mut mirror = pod("etcd-node-a", NODE, "1", annotations);
    mirror.metadata.owner_references = Some(vec![node_owner(NODE)]);
    h.pods.apply_watcher_event(&Event::Apply(mirror));
    let (store, _) = h.snapshot();
    assert_eq!(
        annotation(&store, "etcd-node-a").as_deref(),
        Some(
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{hash}.slice")
                .as_str()
        ),
        "the kubelet names a static pod's cgroup after its config hash, not the mirror's UID"
    );
}

fn node_owner(node: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "name": node, "uid": "node-uid", "controller": true,
    }))
    .expect("owner")
}

/// Anyone who can create a pod can write the annotation; only the kubelet's mirror pods,
/// owned by their Node, are resolved through it.
#[test]
fn a_mirror_annotation_on_a_pod_not_owned_by_its_node_is_ignored() {
    let mut h = Harness::new("forged-mirror");
    h.list_all();
    let victim = "11111111-2222-3333-4444-555555555555";
    let annotations = json!({"kubernetes.io/config.mirror": victim});
    let mut forged = pod("zz-attacker", NODE, "1", annotations);
    forged.metadata.owner_references = Some(vec![node_owner("node-b")]);
    h.pods.apply_watcher_event(&Event::Apply(forged));
    let (store, _) = h.snapshot();
    assert_eq!(
        annotation(&store, "zz-attacker").as_deref(),
        Some(
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                UID.replace('-', "_")
            )
            .as_str()
        ),
        "its own UID's cgroup, not the victim's"
    );
}

/// Static pods' config hashes are no API object's UID: a mirror annotation naming one is
/// forged, even on a pod claiming its Node as owner.
#[test]
fn a_mirror_annotation_naming_an_api_pods_uid_is_ignored() {
    let mut h = Harness::new("uid-mirror");
    h.list_all();
    let victim = "11111111-2222-3333-4444-555555555555";
    let mut real = pod("victim", NODE, "1", json!({}));
    real.metadata.uid = Some(victim.into());
    let mut forged = pod(
        "zz-forged",
        NODE,
        "1",
        json!({"kubernetes.io/config.mirror": victim}),
    );
    forged.metadata.owner_references = Some(vec![node_owner(NODE)]);
    h.pods.apply_watcher_event(&Event::Apply(real));
    h.pods.apply_watcher_event(&Event::Apply(forged));
    let (store, _) = h.snapshot();
    assert_ne!(
        annotation(&store, "zz-forged"),
        annotation(&store, "victim")
    );
}

#[test]
fn an_invalid_version_keeps_the_last_good_one_and_is_reported() {
    let mut h = Harness::new("invalid");
    h.list_all();
    h.services
        .apply_watcher_event(&Event::Apply(service("10.96.0.10", "1")));
    assert!(h.snapshot().1.is_empty());
    h.services
        .apply_watcher_event(&Event::Apply(service("10.96.0.300", "2")));
    let (store, rejections) = h.snapshot();
    let svc = &store.services[&("default".to_owned(), "web".to_owned())];
    assert_eq!(
        svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.0.10"),
        "the last good version stays"
    );
    assert_eq!(rejections.len(), 1);
    assert_eq!(rejections[0].errors[0].field, "spec.clusterIP");
    assert_eq!(
        rejections[0].to_string().split(':').next(),
        Some("Service default/web from the API server")
    );
    // Deleted: gone, and so is its rejection.
    h.services
        .apply_watcher_event(&Event::Delete(service("10.96.0.300", "3")));
    let (store, rejections) = h.snapshot();
    assert!(store.services.is_empty() && rejections.is_empty());
    let _ = &h.others;
}

#[tokio::test]
async fn an_unreachable_api_server_is_reported_degraded_over_tls_too() {
    let dir = std::env::temp_dir().join(format!("weft-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("config");
    // Nothing listens on port 9 of loopback: every request fails at once.
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:9\n\
         contexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n\
         users:\n- name: u\n  user: {token: t}\n",
    )
    .expect("kubeconfig");
    let source = KubeSource::start(
        &KubeConfig {
            kubeconfig: Some(path),
            node_name: NODE.into(),
            cgroup_root: dir.clone(),
            crd_discovery_interval: Duration::from_secs(60),
        },
        KubeMetrics::default(),
    )
    .await
    .expect("a TLS client is built");
    let health = source.health();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health.degraded().len() < KINDS.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            health.degraded()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!health.listed());
    let _ = std::fs::remove_dir_all(&dir);
}

fn bad_pod(rv: &str, ip: &str) -> Pod {
    let mut p = pod("web", NODE, rv, json!({}));
    p.spec.as_mut().expect("spec").containers[0].ports = Some(vec![
        serde_json::from_value(json!({"name": "Not_A_Name", "containerPort": 80})).expect("port"),
    ]);
    let status = p.status.as_mut().expect("status");
    status.pod_ip = Some(ip.into());
    status.pod_ips = Some(vec![serde_json::from_value(json!({"ip": ip})).expect("ip")]);
    p
}

fn pod_ip(store: &Store, name: &str) -> Option<String> {
    store.pods[&("default".to_owned(), name.to_owned())]
        .status
        .as_ref()?
        .pod_ip
        .clone()
}

/// A stand-in follows the rejected pod as it changes (addresses, cgroup): it is rebuilt from
/// each rejected version, not kept from the first.
#[test]
fn a_stand_in_follows_each_rejected_version() {
    let mut h = Harness::new("stand-in-follows");
    h.list_all();
    h.pods
        .apply_watcher_event(&Event::Apply(bad_pod("1", "10.0.0.10")));
    let (store, rejections) = h.snapshot();
    assert_eq!(rejections.len(), 1);
    let web = &store.pods[&("default".to_owned(), "web".to_owned())];
    assert!(crate::store::stand_in::is_rejected(web));
    h.pods
        .apply_watcher_event(&Event::Apply(bad_pod("2", "10.0.0.20")));
    let (store, _) = h.snapshot();
    assert_eq!(pod_ip(&store, "web").as_deref(), Some("10.0.0.20"));
}

/// A rejected version replaces even a good pod by its stand-in: the new labels may revoke
/// what peers allowed the old ones.
#[test]
fn a_rejected_pod_version_stands_in_for_the_good_one() {
    let mut h = Harness::new("kept-addresses");
    h.list_all();
    h.pods
        .apply_watcher_event(&Event::Apply(pod("web", NODE, "1", json!({}))));
    assert!(h.snapshot().1.is_empty());
    h.pods
        .apply_watcher_event(&Event::Apply(bad_pod("2", "10.0.0.20")));
    let (store, rejections) = h.snapshot();
    assert_eq!(rejections.len(), 1);
    let web = &store.pods[&("default".to_owned(), "web".to_owned())];
    assert!(crate::store::stand_in::is_rejected(web));
    assert_eq!(web.metadata.labels, None);
    assert_eq!(pod_ip(&store, "web").as_deref(), Some("10.0.0.20"));
}

/// A policy's rejected version: the last version stays without its rules (they may be
/// revoked), the rejected one's stand-in beside it.
#[test]
fn a_rejected_policy_version_stands_beside_the_last_one_stripped() {
    let mut h = Harness::new("policy-beside");
    h.list_all();
    let policy = |rv: &str, cidr: &str| -> NetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "resourceVersion": rv, "uid": "np-1"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]},
        }))
        .expect("policy")
    };
    h.others
        .2
        .apply_watcher_event(&Event::Apply(policy("1", "10.0.0.0/8")));
    assert!(h.snapshot().1.is_empty());
    h.others
        .2
        .apply_watcher_event(&Event::Apply(policy("2", "not-a-cidr")));
    let (store, rejections) = h.snapshot();
    assert_eq!(rejections.len(), 1);
    let names: Vec<&str> = store
        .network_policies
        .keys()
        .map(|(_, n)| n.as_str())
        .collect();
    assert_eq!(names, ["p", "p~rejected-version"]);
    for np in store.network_policies.values() {
        let spec = np.spec.as_ref().expect("spec");
        assert_eq!((spec.ingress.as_ref(), spec.egress.as_ref()), (None, None));
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_owned()][..])
        );
    }
}

/// An AuthorizationPolicy as a list item has it (no apiVersion, no kind).
fn authorization_policy(rv: &str, principal: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "metadata": {"name": "only", "namespace": "default", "resourceVersion": rv, "uid": "ap-1"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "rules": [{"from": [{"source": {"principals": [principal]}}]}]},
    }))
    .expect("authorization policy")
}

/// Nothing is compiled before a kind discovery found is listed, nor before discovery has
/// answered at all (a store without the cluster's security policies would lift them).
#[test]
fn nothing_is_compiled_before_discovery_answers_and_what_it_found_is_listed() {
    let mut h = Harness::new("discovery");
    for (kind, _) in KINDS {
        h.source.health.set_listed(kind);
    }
    assert!(h.source.snapshot().is_none(), "discovery has not answered");
    h.source.health.expect(Kind::AuthorizationPolicy);
    h.source.health.discovered(&[Kind::AuthorizationPolicy]);
    assert!(h.source.snapshot().is_none(), "a kind found is not listed");
    h.source.health.set_listed(Kind::AuthorizationPolicy);
    assert!(h.source.snapshot().is_some());
}

/// DestinationRules not listed (their reflector refused, e.g. for want of RBAC) do not
/// hold the first pass back: health checking is missing, not policy.
#[test]
fn destination_rules_not_listed_do_not_hold_the_source_back() {
    let mut h = Harness::new("rules-unlisted");
    for (kind, _) in KINDS {
        h.source.health.set_listed(kind);
    }
    h.source.health.expect(Kind::AuthorizationPolicy);
    h.source.health.expect(Kind::DestinationRule);
    h.source
        .health
        .discovered(&[Kind::AuthorizationPolicy, Kind::DestinationRule]);
    assert!(h.source.snapshot().is_none(), "AuthorizationPolicy gates");
    h.source.health.set_listed(Kind::AuthorizationPolicy);
    let (store, _) = h.source.snapshot().expect("listed");
    assert_eq!(store.unlisted, BTreeSet::from([Kind::DestinationRule]));
}

/// An AuthorizationPolicy from its reflector is decoded and validated as a document of the
/// directory source: a valid one is in the store; a rejected version is reported, and the
/// last one stays without its rules (an ALLOW that allows nothing) beside its stand-in.
#[test]
fn security_objects_are_validated_and_a_rejected_allow_allows_nothing() {
    let mut h = Harness::new("security");
    h.list_all();
    let mut w = h.watch_security(Kind::AuthorizationPolicy);
    w.apply_watcher_event(&Event::Apply(authorization_policy(
        "1",
        "cluster.local/ns/default/sa/client",
    )));
    let (store, rejections) = h.snapshot();
    assert!(rejections.is_empty(), "{rejections:?}");
    let key = ("default".to_owned(), "only".to_owned());
    let rules = |store: &Store, name: &str| {
        store.authorization_policies[&("default".to_owned(), name.to_owned())]
            .spec
            .rules
            .as_ref()
            .map(Vec::len)
    };
    assert_eq!(rules(&store, "only"), Some(1));
    assert_eq!(
        store.authorization_policies[&key].api_version,
        "security.istio.io/v1"
    );
    // istiod refuses an empty principal.
    w.apply_watcher_event(&Event::Apply(authorization_policy("2", "")));
    let (store, rejections) = h.snapshot();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    let names: Vec<&str> = store
        .authorization_policies
        .keys()
        .map(|(_, n)| n.as_str())
        .collect();
    assert_eq!(names, ["only", "only~rejected-version"]);
    assert_eq!(
        rules(&store, "only"),
        None,
        "the last version allows nothing"
    );
}

/// A kind discovery finds after the first pass does not hold passes back: the store says it
/// is not listed (compile then makes the meshed pods STRICT and deny-all) until it is.
#[test]
fn a_kind_found_after_the_first_pass_is_unlisted_not_blocking() {
    let mut h = Harness::new("found-later");
    h.list_all();
    assert!(h.snapshot().0.unlisted.is_empty());
    h.source.health.expect(Kind::AuthorizationPolicy);
    let (store, _) = h.source.snapshot().expect("passes go on");
    assert_eq!(store.unlisted, BTreeSet::from([Kind::AuthorizationPolicy]));
    h.source.health.set_listed(Kind::AuthorizationPolicy);
    assert!(h.snapshot().0.unlisted.is_empty());
}

/// weft's stand-in mark on an object from the API is dropped: whoever can annotate must not
/// make weft take an object for a stand-in.
#[test]
fn the_stand_in_mark_is_never_taken_from_the_api() {
    let mut h = Harness::new("marked");
    h.list_all();
    let mut w = h.watch_security(Kind::PeerAuthentication);
    let pa: DynamicObject = serde_json::from_value(json!({
        "metadata": {"name": "pa", "namespace": "default", "resourceVersion": "1",
                     "annotations": {REJECTED_ANNOTATION: "true"}},
        "spec": {"mtls": {"mode": "PERMISSIVE"}},
    }))
    .expect("peer authentication");
    w.apply_watcher_event(&Event::Apply(pa));
    let (store, rejections) = h.snapshot();
    assert!(rejections.is_empty(), "{rejections:?}");
    let annotations = store.peer_authentications[&("default".to_owned(), "pa".to_owned())]
        .metadata
        .annotations
        .clone()
        .unwrap_or_default();
    assert_eq!(annotations.get(REJECTED_ANNOTATION), None);
}

/// Discovery's first answer wakes the pipeline: the source may be listed now, and a pass
/// must not wait for the next change of some object.
#[test]
fn discovery_answering_is_a_change() {
    let mut h = Harness::new("discovery-wakes");
    for (kind, _) in KINDS {
        h.source.health.set_listed(kind);
    }
    let _ = h.source.changed();
    h.source.health.discovered(&[]);
    assert!(h.source.changed(), "the first answer wakes a pass");
    h.source.health.discovered(&[]);
    assert!(
        !h.source.changed(),
        "a later answer finding nothing new does not"
    );
}
