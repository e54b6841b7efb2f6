//! NetworkPolicy validation as the API server does it (kubernetes
//! pkg/apis/networking/validation). CIDRs are checked as without `StrictIPCIDRValidation`:
//! objects stored before it was on still carry legacy forms, and the API server serves them.
//! Messages are the API server's, so they read the same as `kubectl apply` would show.
use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    Errors, FieldError, is_dns1123_subdomain, is_label_value, is_qualified_name, metadata,
};

const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

pub fn network_policy(np: &NetworkPolicy) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &np.metadata, true, is_dns1123_subdomain);
    let Some(spec) = &np.spec else {
        return e.into_result();
    };
    if let Some(sel) = &spec.pod_selector {
        label_selector(&mut e, "spec.podSelector", sel);
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let base = format!("spec.ingress[{i}]");
        for (j, p) in rule.ports.iter().flatten().enumerate() {
            port(&mut e, &format!("{base}.ports[{j}]"), p);
        }
        for (j, p) in rule.from.iter().flatten().enumerate() {
            peer(&mut e, &format!("{base}.from[{j}]"), p);
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let base = format!("spec.egress[{i}]");
        for (j, p) in rule.ports.iter().flatten().enumerate() {
            port(&mut e, &format!("{base}.ports[{j}]"), p);
        }
        for (j, p) in rule.to.iter().flatten().enumerate() {
            peer(&mut e, &format!("{base}.to[{j}]"), p);
        }
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    if types.len() > 2 {
        e.add(
            "spec.policyTypes",
            format!("Invalid value: {types:?}: may not specify more than two policyTypes"),
        );
    } else {
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                e.add(
                    format!("spec.policyTypes[{i}]"),
                    format!("Unsupported value: {t:?}: supported values: \"Ingress\", \"Egress\""),
                );
            }
        }
    }
    e.into_result()
}

fn port(e: &mut Errors, base: &str, p: &NetworkPolicyPort) {
    if let Some(proto) = p.protocol.as_deref()
        && !matches!(proto, "TCP" | "UDP" | "SCTP")
    {
        e.add(
            format!("{base}.protocol"),
            format!("Unsupported value: {proto:?}: supported values: \"TCP\", \"UDP\", \"SCTP\""),
        );
    }
    match (&p.port, p.end_port) {
        (Some(IntOrString::Int(n)), end) => {
            if !(1..=65_535).contains(n) {
                e.add(
                    format!("{base}.port"),
                    format!("Invalid value: {n}: {PORT_RANGE}"),
                );
            }
            if let Some(end) = end {
                if end < *n {
                    e.add(
                        format!("{base}.endPort"),
                        format!("Invalid value: {end}: must be greater than or equal to `port`"),
                    );
                }
                if !(1..=65_535).contains(&end) {
                    e.add(
                        format!("{base}.endPort"),
                        format!("Invalid value: {end}: {PORT_RANGE}"),
                    );
                }
            }
        }
        (Some(IntOrString::String(name)), end) => {
            if let Some(end) = end {
                e.add(
                    format!("{base}.endPort"),
                    format!(
                        "Invalid value: {end}: may not be specified when `port` is non-numeric"
                    ),
                );
            }
            for msg in port_name_errors(name) {
                e.add(
                    format!("{base}.port"),
                    format!("Invalid value: {name:?}: {msg}"),
                );
            }
        }
        (None, Some(end)) => e.add(
            format!("{base}.endPort"),
            format!("Invalid value: {end}: may not be specified when `port` is not specified"),
        ),
        (None, None) => {}
    }
}

/// IsValidPortName's messages, in its order.
fn port_name_errors(name: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    if name.len() > 15 {
        out.push("must be no more than 15 characters");
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        out.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        out.push("must contain at least one letter (a-z)");
    }
    if name.contains("--") {
        out.push("must not contain consecutive hyphens");
    }
    if !name.is_empty() && (name.starts_with('-') || name.ends_with('-')) {
        out.push("must not begin or end with a hyphen");
    }
    out
}

fn peer(e: &mut Errors, base: &str, p: &NetworkPolicyPeer) {
    let mut count = 0;
    if let Some(sel) = &p.pod_selector {
        count += 1;
        label_selector(e, &format!("{base}.podSelector"), sel);
    }
    if let Some(sel) = &p.namespace_selector {
        count += 1;
        label_selector(e, &format!("{base}.namespaceSelector"), sel);
    }
    if let Some(b) = &p.ip_block {
        count += 1;
        ip_block(
            e,
            &format!("{base}.ipBlock"),
            &b.cidr,
            b.except.as_deref().unwrap_or_default(),
        );
    }
    if count == 0 {
        e.add(base, "Required value: must specify a peer");
    } else if count > 1 && p.ip_block.is_some() {
        e.add(
            base,
            "Forbidden: may not specify both ipBlock and another peer",
        );
    }
}

fn ip_block(e: &mut Errors, base: &str, cidr: &str, except: &[String]) {
    if cidr.is_empty() {
        e.add(format!("{base}.cidr"), "Required value");
        return;
    }
    let Some(net) = parse_cidr(e, &format!("{base}.cidr"), cidr) else {
        return;
    };
    for (k, ex) in except.iter().enumerate() {
        let field = format!("{base}.except[{k}]");
        let Some(ex_net) = parse_cidr(e, &field, ex) else {
            continue;
        };
        if !net.contains(&ex_net.addr()) || net.prefix_len() >= ex_net.prefix_len() {
            e.add(
                field,
                format!("Invalid value: {ex:?}: must be a strict subset of `cidr`"),
            );
        }
    }
}

/// A CIDR as the API server validates it: it must parse, sloppily. Host bits, leading zeros
/// and IPv4-mapped addresses are accepted: `StrictIPCIDRValidation` refuses them only in new
/// writes, and objects stored earlier keep them (ratcheting). [`cidr`] says what they mean.
fn parse_cidr(e: &mut Errors, field: &str, value: &str) -> Option<IpNet> {
    let net = cidr(value);
    if net.is_none() {
        e.add(
            field,
            format!(
                "Invalid value: {value:?}: must be a valid CIDR value, (e.g. 10.9.8.0/24 or \
                 2001:db8::/64)"
            ),
        );
    }
    net
}

/// What an ipBlock CIDR means, as Kubernetes interprets legacy forms
/// (`k8s.io/utils/net.ParseCIDRSloppy`, Go's pre-1.17 `net.ParseCIDR`): IPv4 octets and the
/// prefix length with leading zeros are decimal, host bits are masked off, and an
/// IPv4-mapped IPv6 prefix of at least /96 is the IPv4 prefix it maps. None when it does not
/// parse at all.
pub fn cidr(value: &str) -> Option<IpNet> {
    let (addr, len) = value.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let addr = crate::store::object::sloppy_ip(addr)?;
    let net = IpNet::new(addr, len).ok()?.trunc();
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => Some(IpNet::new(v4.into(), n.prefix_len() - 96).ok()?.trunc()),
            None => Some(net),
        },
        _ => Some(net),
    }
}

/// Whether a selector is one the API server would accept.
pub fn selector_is_valid(sel: &LabelSelector) -> bool {
    let mut e = Errors::default();
    label_selector(&mut e, "", sel);
    e.0.is_empty()
}

fn label_selector(e: &mut Errors, base: &str, sel: &LabelSelector) {
    for (k, v) in sel.match_labels.iter().flatten() {
        if !is_qualified_name(k) {
            e.add(
                format!("{base}.matchLabels"),
                format!("Invalid value: {k:?}: not a valid label key"),
            );
        }
        if !is_label_value(v) {
            e.add(
                format!("{base}.matchLabels"),
                format!("Invalid value: {v:?}: not a valid label value"),
            );
        }
    }
    for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{base}.matchExpressions[{i}]");
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => e.add(
                format!("{f}.values"),
                "Required value: must be specified when `operator` is 'In' or 'NotIn'",
            ),
            "Exists" | "DoesNotExist" if !values.is_empty() => e.add(
                format!("{f}.values"),
                "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => e.add(
                format!("{f}.operator"),
                format!("Invalid value: {other:?}: not a valid selector operator"),
            ),
        }
        if !is_qualified_name(&r.key) {
            e.add(
                format!("{f}.key"),
                format!("Invalid value: {:?}: not a valid label key", r.key),
            );
        }
        // `values` are not checked: invalid label values were accepted before 1.26 and are
        // kept on update (`AllowInvalidLabelValueInSelector`); they simply match no label.
    }
}

#[cfg(test)]
mod tests;
