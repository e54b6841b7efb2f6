//! PeerAuthentication and AuthorizationPolicy validation as istiod's webhook does it
//! (pkg/config/validation, pkg/config/security) for the fields weft reads, and the CRDs' own
//! rules (enumerations, port ranges). Messages are istiod's where it has one.
use ipnet::IpNet;

use super::{Errors, FieldError, is_dns1123_subdomain, metadata};
use crate::store::security::{
    Action, AuthorizationPolicy, Operation, PeerAuthentication, Rule, Source, TargetRef,
    WorkloadSelector,
};

pub fn authorization_policy(ap: &AuthorizationPolicy) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &ap.metadata, true, is_dns1123_subdomain);
    let spec = &ap.spec;
    let targets = usize::from(spec.selector.is_some())
        + usize::from(spec.target_ref.is_some())
        + usize::from(spec.target_refs.as_ref().is_some_and(|t| !t.is_empty()));
    if targets > 1 {
        e.add(
            "spec",
            "only one of targetRefs or workloadSelector can be set",
        );
    }
    selector(&mut e, "spec.selector", spec.selector.as_ref());
    if let Some(t) = &spec.target_ref {
        target_ref(&mut e, "spec.targetRef", t);
    }
    for (i, t) in spec.target_refs.iter().flatten().enumerate() {
        target_ref(&mut e, &format!("spec.targetRefs[{i}]"), t);
    }
    let action = spec.action.unwrap_or(Action::Allow);
    // istiod decodes an empty list as an absent one.
    let no_rules = spec.rules.as_ref().is_none_or(Vec::is_empty);
    let named = spec
        .provider
        .as_ref()
        .and_then(|p| p.name.as_deref())
        .is_some_and(|n| !n.is_empty());
    match action {
        Action::Custom if no_rules => e.add(
            "spec.rules",
            "CUSTOM action without `rules` is meaningless as it will never be triggered, add an \
             empty rule `{}` if you want it be triggered for every request",
        ),
        Action::Custom if !named => e.add("spec.provider.name", "must not be empty"),
        Action::Deny if no_rules => e.add(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an \
             empty rule `{}` if you want it be triggered for every request",
        ),
        _ => {}
    }
    if spec.provider.is_some() && action != Action::Custom {
        e.add(
            "spec.provider",
            format!(
                "`provider` must not be with non CUSTOM action, found {}",
                action.as_str()
            ),
        );
    }
    for (i, r) in spec.rules.iter().flatten().enumerate() {
        rule(&mut e, &format!("spec.rules[{i}]"), r, action);
    }
    e.into_result()
}

pub fn peer_authentication(pa: &PeerAuthentication) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    metadata(&mut e, &pa.metadata, true, is_dns1123_subdomain);
    let spec = &pa.spec;
    selector(&mut e, "spec.selector", spec.selector.as_ref());
    if let Some(ports) = &spec.port_level_mtls {
        if !spec.selects_workloads() {
            e.add(
                "spec.portLevelMtls",
                "mesh/namespace peer authentication cannot have port level mTLS",
            );
        }
        for port in ports.keys() {
            if port_number(port).is_none_or(|p| p == 0) {
                e.add(
                    format!("spec.portLevelMtls[{port}]"),
                    "port must be in range 1..65535",
                );
            }
        }
    }
    e.into_result()
}

/// A port as istiod parses one (`strconv.ParseUint(p, 10, 32)`, at most 65535): digits only.
pub fn port_number(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u32>().ok()?.try_into().ok()
}

/// An address or a CIDR as Go's `netip` parses it: no leading zeros (in the address or the
/// prefix length), host bits allowed. An IPv6 address with a zone is valid to istiod
/// ([`is_zoned`]) but names no address weft can match: `None`.
pub fn ip_or_cidr(text: &str) -> Option<IpNet> {
    let (addr, bits) = match text.split_once('/') {
        Some((addr, bits)) => (addr, Some(bits)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let Some(bits) = bits else {
        return Some(IpNet::from(addr));
    };
    let canonical =
        bits == "0" || (!bits.starts_with('0') && bits.bytes().all(|b| b.is_ascii_digit()));
    if !canonical || bits.len() > 3 {
        return None;
    }
    IpNet::new(addr, bits.parse().ok()?).ok()
}

/// `fe80::1%eth0`: an address `netip.ParseAddr` accepts.
fn is_zoned(text: &str) -> bool {
    text.split_once('%').is_some_and(|(addr, zone)| {
        !zone.is_empty() && !text.contains('/') && addr.parse::<std::net::Ipv6Addr>().is_ok()
    })
}

fn selector(e: &mut Errors, field: &str, selector: Option<&WorkloadSelector>) {
    for (k, v) in selector
        .and_then(|s| s.match_labels.as_ref())
        .into_iter()
        .flatten()
    {
        let field = format!("{field}.matchLabels[{k}]");
        if k.is_empty() {
            e.add(
                field.clone(),
                format!("empty key is not supported in selector: \"{k}={v}\""),
            );
        }
        if k.contains('*') || v.contains('*') {
            e.add(
                field,
                format!("wildcard is not supported in selector: \"{k}={v}\""),
            );
        }
    }
}

fn target_ref(e: &mut Errors, field: &str, t: &TargetRef) {
    if t.name.as_deref().unwrap_or_default().is_empty() {
        e.add(format!("{field}.name"), "targetRef name must be set");
    }
    if t.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        e.add(
            format!("{field}.namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    let group = t
        .group
        .as_deref()
        .filter(|g| !g.is_empty())
        .unwrap_or("core");
    let kind = t.kind.as_deref().unwrap_or_default();
    let allowed = matches!(
        (group, kind),
        ("core", "Service")
            | ("networking.istio.io", "ServiceEntry")
            | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
    );
    if !allowed {
        e.add(
            format!("{field}.kind"),
            format!(
                "targetRef must be to a Service, ServiceEntry, Gateway or GatewayClass but was \
                 {group}/{kind}"
            ),
        );
    }
}

fn rule(e: &mut Errors, base: &str, r: &Rule, action: Action) {
    for (i, f) in r.from.iter().flatten().enumerate() {
        let field = format!("{base}.from[{i}].source");
        match &f.source {
            None => e.add(field, "`from.source` must not be nil"),
            Some(s) => source(e, &field, s, action),
        }
    }
    for (i, t) in r.to.iter().flatten().enumerate() {
        let field = format!("{base}.to[{i}].operation");
        match &t.operation {
            None => e.add(field, "`to.operation` must not be nil"),
            Some(op) => operation(e, &field, op),
        }
    }
    for (i, c) in r.when.iter().flatten().enumerate() {
        let field = format!("{base}.when[{i}]");
        if c.key.is_empty() {
            e.add(format!("{field}.key"), "`key` must not be empty");
            continue;
        }
        let values = c.values.as_deref().unwrap_or_default();
        let not_values = c.not_values.as_deref().unwrap_or_default();
        if values.is_empty() && not_values.is_empty() {
            e.add(
                field.clone(),
                format!(
                    "at least one of `values` or `notValues` must be set for key {}",
                    c.key
                ),
            );
        }
        if let Some(problem) = key_problem(&c.key) {
            e.add(format!("{field}.key"), problem);
        } else {
            attribute_values(e, &format!("{field}.values"), &c.key, values);
            attribute_values(e, &format!("{field}.notValues"), &c.key, not_values);
        }
        if action == Action::Custom && custom_refuses(&c.key) {
            e.add(
                format!("{field}.key"),
                format!("{} is currently not supported with CUSTOM action", c.key),
            );
        }
    }
}

fn custom_refuses(key: &str) -> bool {
    matches!(
        key,
        "source.namespace" | "source.serviceAccount" | "source.principal"
    ) || key.starts_with("request.auth.")
}

fn source(e: &mut Errors, field: &str, s: &Source, action: Action) {
    let lists: [(&str, &Option<Vec<String>>); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    let len = |v: &Option<Vec<String>>| v.as_ref().map_or(0, Vec::len);
    if lists.iter().all(|(_, v)| len(v) == 0) {
        e.add(field, "`from.source` must not be empty");
    }
    let identity = len(&s.principals) + len(&s.not_principals);
    let named = identity + len(&s.namespaces) + len(&s.not_namespaces);
    if named > 0 && len(&s.service_accounts) + len(&s.not_service_accounts) > 0 {
        e.add(
            field,
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
    for (name, values) in lists {
        let values = values.as_deref().unwrap_or_default();
        let at = |i: usize| format!("{field}.{name}[{i}]");
        non_empty(e, &at, name, values);
        match name {
            "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks" => {
                ips(e, &at, values);
            }
            "serviceAccounts" | "notServiceAccounts" => {
                service_accounts(e, &format!("{field}.{name}"), &at, name, values);
            }
            _ => {}
        }
        let custom_refused = !name.contains("IpBlocks") && !name.contains("TrustDomains");
        if action == Action::Custom && custom_refused && !values.is_empty() {
            e.add(
                format!("{field}.{name}"),
                format!(
                    "From.{}{} is currently not supported with CUSTOM action",
                    name[..1].to_uppercase(),
                    &name[1..]
                ),
            );
        }
    }
}

fn operation(e: &mut Errors, field: &str, op: &Operation) {
    let lists: [(&str, &Option<Vec<String>>); 8] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("ports", &op.ports),
        ("notPorts", &op.not_ports),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if lists
        .iter()
        .all(|(_, v)| v.as_ref().is_none_or(Vec::is_empty))
    {
        e.add(field, "`to.operation` must not be empty");
    }
    for (name, values) in lists {
        let values = values.as_deref().unwrap_or_default();
        let at = |i: usize| format!("{field}.{name}[{i}]");
        non_empty(e, &at, name, values);
        if name == "ports" || name == "notPorts" {
            ports(e, &at, values);
        }
    }
}

/// `security.ValidateAttribute`, for the key: why istiod refuses it, if it does.
fn key_problem(key: &str) -> Option<String> {
    // istiod's `validateMapKey`: `a[b]` over the whole key.
    let map_key = || {
        let open = key.find('[').unwrap_or(0);
        (!(key.ends_with(']') && open > 0 && open < key.len() - 2))
            .then(|| format!("bad key ({key}): should have format a[b]"))
    };
    match key {
        _ if key.starts_with("request.headers") => map_key(),
        _ if key.starts_with("request.experimental.inline.headers") => map_key(),
        "source.ip"
        | "remote.ip"
        | "destination.ip"
        | "destination.port"
        | "source.serviceAccount"
        | "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => None,
        _ if key.starts_with("request.auth.claims") => map_key(),
        _ if key.starts_with("experimental.envoy.filters.") => map_key(),
        "destination.namespace" => Some(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        _ if key.starts_with("destination.labels") => Some(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Some(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Some(format!("unknown attribute: {key}")),
    }
}

/// `security.ValidateAttribute`, for the values of a key istiod knows.
fn attribute_values(e: &mut Errors, field: &str, key: &str, values: &[String]) {
    let at = |i: usize| format!("{field}[{i}]");
    non_empty(e, &at, key, values);
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => ips(e, &at, values),
        "destination.port" => ports(e, &at, values),
        "source.serviceAccount" => service_accounts(e, field, &at, key, values),
        _ => {}
    }
}

fn non_empty(e: &mut Errors, at: &dyn Fn(usize) -> String, name: &str, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            e.add(at(i), format!("empty value not allowed, found in {name}"));
        }
    }
}

fn ips(e: &mut Errors, at: &dyn Fn(usize) -> String, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if !v.is_empty() && ip_or_cidr(v).is_none() && !is_zoned(v) {
            let what = if v.contains('/') {
                "bad CIDR range"
            } else {
                "bad IP address"
            };
            e.add(at(i), format!("{what} ({v})"));
        }
    }
}

fn ports(e: &mut Errors, at: &dyn Fn(usize) -> String, values: &[String]) {
    for (i, v) in values.iter().enumerate() {
        if !v.is_empty() && port_number(v).is_none() {
            e.add(at(i), format!("bad port ({v})"));
        }
    }
}

/// `security.CheckServiceAccount`.
fn service_accounts(
    e: &mut Errors,
    field: &str,
    at: &dyn Fn(usize) -> String,
    name: &str,
    values: &[String],
) {
    if values.len() > 16 {
        e.add(field, "may not have more than 16 values");
    }
    let format = "expected format 'serviceAccount' or 'namespace/serviceAccount'";
    for (i, v) in values.iter().enumerate() {
        if v.contains('*') {
            e.add(at(i), format!("wildcard not allowed, found in {name}"));
        } else if v.len() > 320 {
            e.add(
                at(i),
                format!("value cannot exceed 320 characters, found {v:?} in {name}"),
            );
        } else if !v.is_empty() && (v.split('/').count() > 2 || v.split('/').any(str::is_empty)) {
            e.add(at(i), format!("{format}, found {v:?} in {name}"));
        }
    }
}

#[cfg(test)]
mod tests;
