use serde_json::Value;

use crate::{
    source::yaml,
    store::{
        FieldError,
        security::{self, Action, Mode},
    },
};

fn value(text: &str) -> Value {
    yaml::parse(text).expect("yaml")
}

fn ap(spec: &str) -> Result<security::AuthorizationPolicy, Vec<FieldError>> {
    crate::store::authorization_policy(&value(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}"
    )))
}

fn pa(spec: &str) -> Result<security::PeerAuthentication, Vec<FieldError>> {
    crate::store::peer_authentication(&value(&format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}"
    )))
}

/// The fields of the first problem, and its message.
fn refused(r: Result<impl std::fmt::Debug, Vec<FieldError>>) -> (String, String) {
    let errors = r.expect_err("refused");
    (errors[0].field.clone(), errors[0].message.clone())
}

#[test]
fn every_l4_field_decodes() {
    let p = ap("  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/a/sa/b, '*-admin']\n        notPrincipals: ['*']\n        namespaces: [a]\n        notNamespaces: [b]\n        ipBlocks: [10.0.0.0/8, 1.2.3.4]\n        notIpBlocks: ['::1']\n        remoteIpBlocks: [10.1.0.0/16]\n        notRemoteIpBlocks: [10.1.2.3]\n    to:\n    - operation: {ports: ['80', '0'], notPorts: ['65535']}\n    when:\n    - {key: source.ip, values: [10.0.0.1]}\n    - {key: destination.port, notValues: ['8080']}\n    - {key: 'request.headers[x-user]', values: [a]}\n")
        .expect("valid");
    assert_eq!(p.spec.action, Some(Action::Deny));
    let rule = &p.spec.rules.as_ref().expect("rules")[0];
    assert_eq!(rule.when.as_ref().map(Vec::len), Some(3));
}

#[test]
fn an_empty_spec_is_an_allow_nothing_policy() {
    let p = crate::store::authorization_policy(&value(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: x}\nspec: {}\n",
    ))
    .expect("valid");
    assert_eq!((p.spec.action, p.spec.rules), (None, None));
}

#[test]
fn unknown_fields_and_values_are_refused_by_their_field() {
    assert_eq!(
        refused(ap("  action: ALLOWED\n")).0,
        "spec.action",
        "the CRD's enumeration"
    );
    assert_eq!(
        refused(ap("  rules: [{from: [{source: {principal: [a]}}]}]\n")).0,
        "spec.rules[0].from[0].source.principal"
    );
    assert_eq!(refused(pa("  mtls: {mode: strict}\n")).0, "spec.mtls.mode");
}

#[test]
fn istiod_refusals_name_their_field() {
    let cases = [
        (
            "  action: DENY\n",
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        ),
        (
            "  rules: [{from: [{}]}]\n",
            "spec.rules[0].from[0].source",
            "`from.source` must not be nil",
        ),
        (
            "  rules: [{from: [{source: {principals: []}}]}]\n",
            "spec.rules[0].from[0].source",
            "`from.source` must not be empty",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "bad CIDR range (10.0.0.0/33)",
        ),
        (
            "  rules: [{from: [{source: {notIpBlocks: [10.0.0.01]}}]}]\n",
            "spec.rules[0].from[0].source.notIpBlocks[0]",
            "bad IP address (10.0.0.01)",
        ),
        (
            "  rules: [{from: [{source: {principals: [a, '']}}]}]\n",
            "spec.rules[0].from[0].source.principals[1]",
            "empty value not allowed, found in principals",
        ),
        (
            "  rules: [{from: [{source: {namespaces: [a], serviceAccounts: [b]}}]}]\n",
            "spec.rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            "  rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]\n",
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "expected format 'serviceAccount' or 'namespace/serviceAccount', found \"a/b/c\" in serviceAccounts",
        ),
        (
            "  rules: [{to: [{operation: {}}]}]\n",
            "spec.rules[0].to[0].operation",
            "`to.operation` must not be empty",
        ),
        (
            "  rules: [{to: [{operation: {ports: ['+80']}}]}]\n",
            "spec.rules[0].to[0].operation.ports[0]",
            "bad port (+80)",
        ),
        (
            "  rules: [{to: [{operation: {notPorts: ['65536']}}]}]\n",
            "spec.rules[0].to[0].operation.notPorts[0]",
            "bad port (65536)",
        ),
        (
            "  rules: [{when: [{key: source.ip}]}]\n",
            "spec.rules[0].when[0]",
            "at least one of `values` or `notValues` must be set for key source.ip",
        ),
        (
            "  rules: [{when: [{key: source.nam, values: [a]}]}]\n",
            "spec.rules[0].when[0].key",
            "unknown attribute: source.nam",
        ),
        (
            "  rules: [{when: [{key: request.headers, values: [a]}]}]\n",
            "spec.rules[0].when[0].key",
            "bad key (request.headers): should have format a[b]",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [010.0.0.0/8]}}]}]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "bad CIDR range (010.0.0.0/8)",
        ),
        (
            "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/08]}}]}]\n",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "bad CIDR range (10.0.0.0/08)",
        ),
        (
            "  action: DENY\n  rules: []\n",
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        ),
        (
            "  rules: [{when: [{key: destination.port, notValues: [http]}]}]\n",
            "spec.rules[0].when[0].notValues[0]",
            "bad port (http)",
        ),
        (
            "  selector: {matchLabels: {app: 'web*'}}\n",
            "spec.selector.matchLabels[app]",
            "wildcard is not supported in selector: \"app=web*\"",
        ),
        (
            "  selector: {matchLabels: {app: web}}\n  targetRef: {kind: Service, name: web}\n",
            "spec",
            "only one of targetRefs or workloadSelector can be set",
        ),
        (
            "  action: CUSTOM\n  rules: [{}]\n",
            "spec.provider.name",
            "must not be empty",
        ),
        (
            "  provider: {name: ext}\n  rules: [{}]\n",
            "spec.provider",
            "`provider` must not be with non CUSTOM action, found ALLOW",
        ),
    ];
    for (spec, field, message) in cases {
        assert_eq!(
            refused(ap(spec)),
            (field.to_owned(), message.to_owned()),
            "{spec}"
        );
    }
}

#[test]
fn peer_authentication_modes_and_port_levels() {
    let p = pa("  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {'8080': {mode: PERMISSIVE}, '9090': {}}\n")
        .expect("valid");
    assert_eq!(
        security::MutualTls::mode(p.spec.mtls.as_ref()),
        Mode::Strict
    );
    let ports = p.spec.port_level_mtls.expect("ports");
    assert_eq!(
        security::MutualTls::mode(ports.get("8080")),
        Mode::Permissive
    );
    assert_eq!(security::MutualTls::mode(ports.get("9090")), Mode::Unset);
    let cases = [
        (
            "  portLevelMtls: {'80': {mode: STRICT}}\n",
            "spec.portLevelMtls",
            "mesh/namespace peer authentication cannot have port level mTLS",
        ),
        (
            "  selector: {matchLabels: {app: db}}\n  portLevelMtls: {'0': {mode: STRICT}}\n",
            "spec.portLevelMtls[0]",
            "port must be in range 1..65535",
        ),
    ];
    for (spec, field, message) in cases {
        assert_eq!(
            refused(pa(spec)),
            (field.to_owned(), message.to_owned()),
            "{spec}"
        );
    }
}

#[test]
fn both_served_versions_are_the_security_api() {
    assert!(security::is_security_api("security.istio.io/v1"));
    assert!(security::is_security_api("security.istio.io/v1beta1"));
    assert!(!security::is_security_api("security.istio.io/v1alpha1"));
    assert!(!security::is_security_api("security.istio.io"));
}

/// What istiod accepts that a stricter reading would refuse.
#[test]
fn what_istiod_accepts_is_accepted() {
    let accepted = [
        "  rules: [{from: [], to: []}]\n",
        "  rules: [{from: [{source: {ipBlocks: ['fe80::1%eth0']}}]}]\n",
        "  rules: [{when: [{key: 'request.headersX[y]', values: [a]}]}]\n",
        "  rules: [{from: [{source: {trustDomains: [example.org], notTrustDomains: ['*']}}]}]\n",
        "  rules: [{to: [{operation: {ports: ['080']}}]}]\n",
    ];
    for spec in accepted {
        assert!(ap(spec).is_ok(), "{spec}: {:?}", ap(spec));
    }
    let p = pa("  selector: {matchLabels: {app: db}}\n  portLevelMtls: {}\n").expect("valid");
    assert_eq!(p.spec.port_level_mtls.map(|m| m.len()), Some(0));
}
