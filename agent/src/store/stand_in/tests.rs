use super::*;
use crate::{source::yaml, store};

fn stand_in_of(text: &str) -> Object {
    let invalid = store::decode(yaml::parse(text).expect("yaml")).expect_err("rejected");
    invalid.stand_in.expect("a stand-in")
}

const BAD_POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: x
  labels: {app: web}
  annotations: {weft.io/cgroup: pod-web}
spec:
  containers:
  - name: main
    ports: [{name: Not_A_Name, containerPort: 80}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]
";

#[test]
fn a_rejected_pod_keeps_its_cgroup_and_addresses_and_nothing_else() {
    let Object::Pod(pod) = stand_in_of(BAD_POD) else {
        panic!("not a pod")
    };
    assert!(is_rejected(&pod));
    assert_eq!(
        pod.metadata.annotations.as_ref().expect("annotations")[CGROUP_ANNOTATION],
        "pod-web"
    );
    assert_eq!(
        pod.metadata.labels, None,
        "no label a policy could select on"
    );
    assert_eq!(pod.metadata.namespace.as_deref(), Some("x"));
    let status = pod.status.as_ref().expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
    let ips: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
    assert_eq!(pod.spec.as_ref().expect("spec").containers, []);
}

#[test]
fn a_rejected_pod_without_a_name_has_no_stand_in() {
    let text = BAD_POD.replace("  name: web\n", "");
    let invalid = store::decode(yaml::parse(&text).expect("yaml")).expect_err("rejected");
    assert_eq!(invalid.stand_in, None);
}

const BAD_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: not-a-cidr}}]
";

#[test]
fn a_rejected_policy_isolates_what_it_selects_with_no_rules() {
    let Object::NetworkPolicy(np) = stand_in_of(BAD_POLICY) else {
        panic!("not a policy")
    };
    let spec = np.spec.as_ref().expect("spec");
    let selector = spec.pod_selector.as_ref().expect("selector");
    assert_eq!(
        selector.match_labels,
        Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]))
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    assert_eq!((spec.ingress.as_ref(), spec.egress.as_ref()), (None, None));
}

fn types_of(text: &str) -> Vec<String> {
    let Object::NetworkPolicy(np) = stand_in_of(text) else {
        panic!("not a policy")
    };
    np.spec
        .clone()
        .and_then(|s| s.policy_types)
        .unwrap_or_default()
}

#[test]
fn a_rejected_policy_without_policy_types_isolates_as_the_api_server_defaults() {
    let no_types = BAD_POLICY.replace("  policyTypes: [Ingress]\n", "");
    assert_eq!(types_of(&no_types), ["Ingress"]);
    let with_egress = format!("{no_types}  egress: [{{}}]\n");
    assert_eq!(types_of(&with_egress), ["Ingress", "Egress"]);
}

#[test]
fn a_rejected_policy_whose_types_cannot_be_read_isolates_both_ways() {
    let bad = BAD_POLICY.replace("[Ingress]", "[Ingress, Sideways]");
    assert_eq!(types_of(&bad), ["Ingress", "Egress"]);
}

#[test]
fn a_rejected_policy_with_an_unusable_selector_selects_its_whole_namespace() {
    let text = BAD_POLICY.replace("{app: web}", "{'bad key!': web}");
    let Object::NetworkPolicy(np) = stand_in_of(&text) else {
        panic!("not a policy")
    };
    let spec = np.spec.as_ref().expect("spec");
    assert_eq!(spec.pod_selector, Some(LabelSelector::default()));
}

#[test]
fn other_kinds_have_no_stand_in() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n";
    let invalid = store::decode(yaml::parse(text).expect("yaml")).expect_err("rejected");
    assert_eq!(invalid.stand_in, None);
}

/// A rejected AuthorizationPolicy decodes through `store::decode` to its stand-in; beside it,
/// an ALLOW's last good version loses its rules, a DENY's stays whole.
#[test]
fn security_policies_stand_in_and_their_last_versions_stay_beside() {
    let ap = |action: &str, rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  action: {action}\n  rules: {rules}\n"
        )
    };
    let Object::AuthorizationPolicy(bad_allow) = stand_in_of(&ap(
        "ALLOW",
        "[{from: [{source: {ipBlocks: [1.2.3.4/40]}}]}]",
    )) else {
        panic!("not an AuthorizationPolicy")
    };
    assert_eq!(
        (bad_allow.spec.action, bad_allow.spec.rules.clone()),
        (Some(Action::Allow), None)
    );
    let Object::AuthorizationPolicy(bad_deny) =
        stand_in_of(&ap("DENY", "[{to: [{operation: {ports: [http]}}]}]"))
    else {
        panic!("not an AuthorizationPolicy")
    };
    assert_eq!(
        (bad_deny.spec.action, bad_deny.spec.rules.clone()),
        (Some(Action::Deny), Some(vec![security::Rule::default()]))
    );
    let good = |action: &str| {
        let (_, o) = store::decode(
            yaml::parse(&ap(action, "[{from: [{source: {namespaces: [a]}}]}]")).expect("yaml"),
        )
        .expect("valid");
        o
    };
    let Some(Object::AuthorizationPolicy(kept)) = kept_beside(&good("ALLOW")) else {
        panic!("kept")
    };
    assert_eq!(kept.spec.rules, None, "an ALLOW's rules go");
    assert!(is_stand_in(&Object::AuthorizationPolicy(kept)));
    assert_eq!(
        kept_beside(&good("DENY")),
        Some(good("DENY")),
        "a DENY stays"
    );
    let Object::PeerAuthentication(pa) = stand_in_of(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: x}\nspec:\n  mtls: {mode: strict}\n",
    ) else {
        panic!("not a PeerAuthentication")
    };
    assert_eq!(MutualTls::mode(pa.spec.mtls.as_ref()), Mode::Strict);
    let (_, old) = store::decode(
        yaml::parse("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: x}\nspec:\n  selector: {matchLabels: {app: legacy}}\n  mtls: {mode: PERMISSIVE}\n")
            .expect("yaml"),
    )
    .expect("valid");
    let Some(Object::PeerAuthentication(kept)) = kept_beside(&old) else {
        panic!("kept")
    };
    assert_eq!(
        MutualTls::mode(kept.spec.mtls.as_ref()),
        Mode::Strict,
        "the last version beside a rejected one is STRICT for what it selects"
    );
    assert!(is_stand_in(&Object::PeerAuthentication(kept)));
}
