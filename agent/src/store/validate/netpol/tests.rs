use super::*;
use crate::{
    source::yaml,
    store::{self, Object},
};

/// Decodes a NetworkPolicy whose spec is `spec` (YAML flow or block text, indented by 2).
fn check(spec: &str) -> Result<(), Vec<FieldError>> {
    let text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\nspec:\n{spec}"
    );
    match store::decode(yaml::parse(&text).expect("yaml")) {
        Ok((_, Object::NetworkPolicy(_))) => Ok(()),
        Ok(_) => panic!("not a policy"),
        Err(invalid) => Err(invalid.errors),
    }
}

/// Asserts `spec` is rejected with an error at `field` whose message contains `needle`.
#[track_caller]
fn rejected(spec: &str, field: &str, needle: &str) {
    let errors = check(spec).expect_err("must be rejected");
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.message.contains(needle)),
        "no error at {field} containing {needle:?}: {errors:?}"
    );
}

#[test]
fn a_complete_valid_policy_passes() {
    let spec = "  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: 'y'}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {port: 80}
    - {port: http, protocol: TCP}
    - {port: 8000, endPort: 9000, protocol: UDP}
    - {protocol: SCTP}
  egress:
  - to: [{ipBlock: {cidr: 'fd00::/8'}}]
  - {}
";
    check(spec).expect("valid");
}

#[test]
fn ports_are_checked_like_the_api_server() {
    let ingress = |port: &str| format!("  ingress:\n  - ports: [{port}]\n");
    rejected(
        &ingress("{port: 80, protocol: ICMP}"),
        "spec.ingress[0].ports[0].protocol",
        "Unsupported value: \"ICMP\"",
    );
    rejected(
        &ingress("{port: 80, protocol: tcp}"),
        "spec.ingress[0].ports[0].protocol",
        "supported values",
    );
    rejected(
        &ingress("{port: 0}"),
        "spec.ingress[0].ports[0].port",
        "must be between 1 and 65535",
    );
    rejected(
        &ingress("{port: 70000}"),
        "spec.ingress[0].ports[0].port",
        "must be between 1 and 65535",
    );
    rejected(
        &ingress("{endPort: 90}"),
        "spec.ingress[0].ports[0].endPort",
        "may not be specified when `port` is not specified",
    );
    rejected(
        &ingress("{port: http, endPort: 90}"),
        "spec.ingress[0].ports[0].endPort",
        "non-numeric",
    );
    rejected(
        &ingress("{port: 90, endPort: 80}"),
        "spec.ingress[0].ports[0].endPort",
        "must be greater than or equal to `port`",
    );
    rejected(
        &ingress("{port: 90, endPort: 70000}"),
        "spec.ingress[0].ports[0].endPort",
        "must be between 1 and 65535",
    );
    rejected(
        &ingress("{port: HTTP}"),
        "spec.ingress[0].ports[0].port",
        "must contain only alpha-numeric",
    );
    rejected(
        &ingress("{port: a--b}"),
        "spec.ingress[0].ports[0].port",
        "consecutive hyphens",
    );
    rejected(
        &ingress("{port: this-name-is-too-long}"),
        "spec.ingress[0].ports[0].port",
        "no more than 15",
    );
    rejected(
        &ingress("{port: '8080'}"),
        "spec.ingress[0].ports[0].port",
        "at least one letter",
    );
    check(&ingress("{port: 80, endPort: 80}")).expect("endPort equal to port is fine");
}

#[test]
fn peers_and_ip_blocks_are_checked() {
    let from = |peer: &str| format!("  ingress:\n  - from: [{peer}]\n");
    rejected(
        &from("{}"),
        "spec.ingress[0].from[0]",
        "must specify a peer",
    );
    rejected(
        &from("{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}"),
        "spec.ingress[0].from[0]",
        "may not specify both ipBlock and another peer",
    );
    rejected(
        &from("{ipBlock: {cidr: 10.0.0.0/33}}"),
        "spec.ingress[0].from[0].ipBlock.cidr",
        "must be a valid CIDR value",
    );
    rejected(
        &from("{ipBlock: {cidr: ''}}"),
        "spec.ingress[0].from[0].ipBlock.cidr",
        "Required value",
    );
    rejected(
        &from("{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}"),
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    rejected(
        &from("{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}"),
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    rejected(
        &from("{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/16']}}"),
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    let egress = "  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [bad]}}]\n";
    rejected(
        egress,
        "spec.egress[0].to[0].ipBlock.except[0]",
        "must be a valid CIDR value",
    );
}

#[test]
fn selectors_and_policy_types_are_checked() {
    let sel = |s: &str| format!("  podSelector: {s}\n");
    rejected(
        &sel("{matchExpressions: [{key: pod, operator: Equals, values: [a]}]}"),
        "spec.podSelector.matchExpressions[0].operator",
        "not a valid selector operator",
    );
    rejected(
        &sel("{matchExpressions: [{key: pod, operator: In}]}"),
        "spec.podSelector.matchExpressions[0].values",
        "must be specified when `operator` is 'In' or 'NotIn'",
    );
    rejected(
        &sel("{matchExpressions: [{key: pod, operator: Exists, values: [a]}]}"),
        "spec.podSelector.matchExpressions[0].values",
        "may not be specified",
    );
    // Accepted before 1.26 and kept on update (`AllowInvalidLabelValueInSelector`).
    assert_eq!(
        check(&sel(
            "{matchExpressions: [{key: pod, operator: In, values: ['a b']}]}"
        )),
        Ok(())
    );
    rejected(
        &sel("{matchLabels: {pod: '-a'}}"),
        "spec.podSelector.matchLabels",
        "not a valid label value",
    );
    rejected(
        &sel("{matchLabels: {'a/b/c': x}}"),
        "spec.podSelector.matchLabels",
        "not a valid label key",
    );
    let ns = "  ingress:\n  - from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: []}]}}]\n";
    rejected(
        ns,
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "must be specified",
    );
    rejected(
        "  policyTypes: [Ingress, Sideways]\n",
        "spec.policyTypes[1]",
        "Unsupported value: \"Sideways\"",
    );
    rejected(
        "  policyTypes: [Ingress, Egress, Ingress]\n",
        "spec.policyTypes",
        "may not specify more than two",
    );
    check("  policyTypes: [Ingress, Ingress]\n").expect("duplicates are accepted, as upstream");
}

/// Legacy forms the API server still serves (stored before `StrictIPCIDRValidation`).
#[test]
fn legacy_cidr_forms_are_accepted() {
    for cidr in [
        "10.0.0.1/8",
        "10.0.0.0/08",
        "010.000.0.0/8",
        "'::ffff:10.0.0.0/104'",
    ] {
        let spec = format!("  ingress:\n  - from: [{{ipBlock: {{cidr: {cidr}}}}}]\n");
        assert_eq!(check(&spec), Ok(()), "{cidr}");
    }
    let spec = "  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.2.3/16]}}]\n";
    assert_eq!(check(spec), Ok(()));
}

#[test]
fn legacy_cidrs_mean_their_masked_prefix() {
    let net = |s: &str| s.parse::<IpNet>().expect("net");
    assert_eq!(cidr("10.0.0.1/8"), Some(net("10.0.0.0/8")));
    assert_eq!(cidr("010.001.002.003/024"), Some(net("10.1.2.0/24")));
    assert_eq!(cidr("0010.0.0.1/0008"), Some(net("10.0.0.0/8")));
    assert_eq!(cidr("::ffff:10.0.0.0/104"), Some(net("10.0.0.0/8")));
    assert_eq!(cidr("::ffff:0a00:0001/112"), Some(net("10.0.0.0/16")));
    assert_eq!(cidr("fd00::1/8"), Some(net("fd00::/8")));
    assert_eq!(cidr("::ffff:0:0/95"), Some(net("::fffe:0:0/95")));
}

#[test]
fn what_does_not_parse_is_no_cidr() {
    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "10.0.0.256/8",
        "10.0.0/8",
        "0x0a.0.0.0/8",
        "fd00::/129",
        "10.0.0.0/",
        "10.0.0.0/+8",
        "1111.0.0.0/8",
        "10.0.0.0/256",
    ] {
        assert_eq!(cidr(bad), None, "{bad}");
    }
}
