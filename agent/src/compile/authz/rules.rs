//! An AuthorizationPolicy rule as matchers, and whether a connection matches it.
//!
//! Istio's semantics (istio.io security reference): a rule matches when any of its `from`,
//! any of its `to` and every `when` does; within a source or an operation every field given
//! must hold: some listed value matches and no `not` value does. An empty list constrains
//! nothing. Principals and namespaces come from the peer's verified certificate, so a
//! plaintext caller matches none of them (and every `not` of them).
//!
//! What a rule cannot know for sure is read by [`Reading`]: an HTTP attribute (not seen at
//! L4), a value that does not parse, a `*` inside a namespace (sidecars read it as a glob,
//! ztunnel as a literal). An ALLOW rule reads it as matching less, so that a rule naming an
//! HTTP attribute matches nothing; the other actions read it as matching more (a DENY then
//! denies more than written, never less). `cluster.local` in a principal stands for the
//! mesh's own trust domain, as istiod rewrites it. An empty list is an absent one (istiod
//! decodes both alike).
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    identity::SpiffeId,
    store::{
        security::{self, Operation, Source},
        validate::security::{ip_or_cidr, port_number},
    },
};

/// What a rule is matched against.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The client's address as the server sees it.
    pub source: IpAddr,
    /// The verified identity, `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    pub destination: IpAddr,
    pub port: u16,
}

/// How a rule reads what it cannot know for sure (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// As matching more: DENY, CUSTOM, AUDIT.
    Broad,
    /// As matching less: ALLOW.
    Narrow,
}

impl Reading {
    /// The reading of a negation: excluding more is matching less.
    const fn flip(self) -> Self {
        match self {
            Self::Broad => Self::Narrow,
            Self::Narrow => Self::Broad,
        }
    }
}

/// How a string value of a policy matches (Istio: `*` alone is presence, a leading `*` a
/// suffix, a trailing `*` a prefix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Text {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
    /// A namespace with a `*` inside: a glob to sidecars, a literal to ztunnel.
    Glob(String),
}

impl Text {
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            Self::Present
        } else if let Some(rest) = value.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else if let Some(rest) = value.strip_suffix('*') {
            Self::Prefix(rest.to_owned())
        } else {
            Self::Exact(value.to_owned())
        }
    }

    /// A namespace value: as [`Text::parse`] in the documented forms (`*`, one `*` at an
    /// end), a glob otherwise (`a*b`, `**`).
    pub fn namespace(value: &str) -> Self {
        if is_documented(value) {
            Self::parse(value)
        } else {
            Self::Glob(value.to_owned())
        }
    }

    fn matches(&self, text: &str, reading: Reading) -> bool {
        match self {
            Self::Exact(e) => text == e,
            Self::Prefix(p) => text.starts_with(p.as_str()),
            Self::Suffix(s) => text.ends_with(s.as_str()),
            Self::Present => !text.is_empty(),
            Self::Glob(g) if reading == Reading::Broad => glob(g, text),
            Self::Glob(g) => text == g,
        }
    }
}

/// No `*`, `*` alone, or one `*` at either end.
fn is_documented(value: &str) -> bool {
    match value.matches('*').count() {
        0 => true,
        1 => value.starts_with('*') || value.ends_with('*'),
        _ => false,
    }
}

/// `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Values that must match (any of `any`, when given) and values that must not (none of
/// `none`). A value that did not parse is remembered, and read by [`Reading`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Set<T> {
    pub any: Vec<T>,
    pub none: Vec<T>,
    pub unreadable_any: bool,
    pub unreadable_none: bool,
}

impl<T> Default for Set<T> {
    fn default() -> Self {
        Self {
            any: Vec::new(),
            none: Vec::new(),
            unreadable_any: false,
            unreadable_none: false,
        }
    }
}

impl<T> Set<T> {
    fn of(
        any: Option<&Vec<String>>,
        none: Option<&Vec<String>>,
        read: impl Fn(&str) -> Option<T>,
    ) -> Self {
        let all = |v: Option<&Vec<String>>| -> (Vec<T>, bool) {
            let values = v.map_or(&[][..], Vec::as_slice);
            let read: Vec<T> = values.iter().filter_map(|s| read(s)).collect();
            let unreadable = read.len() != values.len();
            (read, unreadable)
        };
        let ((any, unreadable_any), (none, unreadable_none)) = (all(any), all(none));
        Self {
            any,
            none,
            unreadable_any,
            unreadable_none,
        }
    }

    fn holds(&self, reading: Reading, matches: impl Fn(&T, Reading) -> bool) -> bool {
        let broad = reading == Reading::Broad;
        let given = !self.any.is_empty() || self.unreadable_any;
        let any = !given
            || self.any.iter().any(|t| matches(t, reading))
            || (self.unreadable_any && broad);
        let excluded = self.none.iter().any(|t| matches(t, reading.flip()))
            || (self.unreadable_none && !broad);
        any && !excluded
    }
}

/// A service account: `namespace/name`, or `name` in the policy's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    pub namespace: String,
    pub name: String,
}

impl Account {
    fn parse(value: &str, policy_namespace: &str) -> Self {
        let (namespace, name) = value.split_once('/').unwrap_or((policy_namespace, value));
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// `from.source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct From {
    pub principals: Set<Text>,
    pub namespaces: Set<Text>,
    pub trust_domains: Set<Text>,
    pub accounts: Set<Account>,
    pub ips: Set<IpNet>,
    /// At L4 the remote address is the source address: no proxy in front adds another.
    pub remote_ips: Set<IpNet>,
}

/// `to.operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct To {
    pub ports: Set<u16>,
}

/// A `when` condition on an attribute weft sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum When {
    SourceIp(Set<IpNet>),
    RemoteIp(Set<IpNet>),
    Namespace(Set<Text>),
    Principal(Set<Text>),
    Account(Set<Account>),
    DestinationIp(Set<IpNet>),
    DestinationPort(Set<u16>),
    /// An HTTP attribute.
    Http,
}

/// One rule of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Option<Vec<From>>,
    pub to: Option<Vec<To>>,
    pub when: Vec<When>,
    /// The HTTP attributes the rule names (`methods`, `request.headers[x]`, ...).
    pub http: Vec<String>,
}

impl Rule {
    pub fn compile(rule: &security::Rule, policy_namespace: &str) -> Self {
        let mut http = Vec::new();
        let from = rule.from.as_ref().filter(|f| !f.is_empty()).map(|from| {
            from.iter()
                .map(|f| {
                    let source = f.source.clone().unwrap_or_default();
                    http.extend(source_http(&source));
                    compile_from(&source, policy_namespace)
                })
                .collect()
        });
        let to = rule.to.as_ref().filter(|t| !t.is_empty()).map(|to| {
            to.iter()
                .map(|t| {
                    let op = t.operation.clone().unwrap_or_default();
                    http.extend(operation_http(&op));
                    To {
                        ports: Set::of(op.ports.as_ref(), op.not_ports.as_ref(), port_number),
                    }
                })
                .collect()
        });
        let when = rule
            .when
            .iter()
            .flatten()
            .map(|c| {
                let w = compile_when(c, policy_namespace);
                if w == When::Http {
                    http.push(c.key.clone());
                }
                w
            })
            .collect();
        http.sort();
        http.dedup();
        Self {
            from,
            to,
            when,
            http,
        }
    }

    /// What a peer must show, one of, for the rule to match under `reading` (empty: it
    /// matches none); None when a peer showing none of these may match. A need may be
    /// looser than the rule (a service account needs its namespace), never stricter.
    pub fn needs(&self, reading: Reading) -> Option<Vec<Need>> {
        if !self.http.is_empty() && reading == Reading::Narrow {
            return Some(Vec::new());
        }
        let from = self.from.as_ref().and_then(|from| {
            let needs: Option<Vec<Vec<Need>>> = from.iter().map(From::needs).collect();
            needs.map(|n| n.concat())
        });
        // Every condition must hold as well: any one of them is a need of the rule.
        from.or_else(|| self.when.iter().find_map(When::needs))
    }

    /// Whether the rule matches the peer `view` shows, reading what it cannot know by
    /// `reading`.
    pub fn matches(&self, view: &View<'_>, reading: Reading) -> bool {
        if !self.http.is_empty() && reading == Reading::Narrow {
            return false;
        }
        let port = |p: &u16, _: Reading| *p == view.peer.port;
        self.from
            .as_ref()
            .is_none_or(|f| f.iter().any(|f| view.from(f, reading)))
            && self
                .to
                .as_ref()
                .is_none_or(|t| t.iter().any(|t| t.ports.holds(reading, port)))
            && self.when.iter().all(|w| view.when(w, reading))
    }
}

fn compile_from(s: &Source, ns: &str) -> From {
    let text = |v: &str| Some(Text::parse(v));
    let namespace = |v: &str| Some(Text::namespace(v));
    let account = |v: &str| Some(Account::parse(v, ns));
    From {
        principals: Set::of(s.principals.as_ref(), s.not_principals.as_ref(), text),
        namespaces: Set::of(s.namespaces.as_ref(), s.not_namespaces.as_ref(), namespace),
        trust_domains: Set::of(s.trust_domains.as_ref(), s.not_trust_domains.as_ref(), text),
        accounts: Set::of(
            s.service_accounts.as_ref(),
            s.not_service_accounts.as_ref(),
            account,
        ),
        ips: Set::of(s.ip_blocks.as_ref(), s.not_ip_blocks.as_ref(), ip_or_cidr),
        remote_ips: Set::of(
            s.remote_ip_blocks.as_ref(),
            s.not_remote_ip_blocks.as_ref(),
            ip_or_cidr,
        ),
    }
}

fn compile_when(c: &security::Condition, ns: &str) -> When {
    let (any, none) = (c.values.as_ref(), c.not_values.as_ref());
    let text = |v: &str| Some(Text::parse(v));
    match c.key.as_str() {
        "source.ip" => When::SourceIp(Set::of(any, none, ip_or_cidr)),
        "remote.ip" => When::RemoteIp(Set::of(any, none, ip_or_cidr)),
        "source.namespace" => When::Namespace(Set::of(any, none, |v| Some(Text::namespace(v)))),
        "source.principal" => When::Principal(Set::of(any, none, text)),
        "source.serviceAccount" => {
            When::Account(Set::of(any, none, |v| Some(Account::parse(v, ns))))
        }
        "destination.ip" => When::DestinationIp(Set::of(any, none, ip_or_cidr)),
        "destination.port" => When::DestinationPort(Set::of(any, none, port_number)),
        _ => When::Http,
    }
}

fn source_http(s: &Source) -> Vec<String> {
    let given = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
    [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ]
    .into_iter()
    .filter(|(_, v)| given(v))
    .map(|(name, _)| name.to_owned())
    .collect()
}

fn operation_http(op: &Operation) -> Vec<String> {
    let given = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
    [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ]
    .into_iter()
    .filter(|(_, v)| given(v))
    .map(|(name, _)| name.to_owned())
    .collect()
}

/// What a peer must show for a rule to match: one of a rule's [`Rule::needs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Principal(Pattern),
    Namespace(Pattern),
    /// The source address in this block.
    Source(IpNet),
}

/// A [`Text`] a value can be looked up by (not a glob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present,
}

impl Pattern {
    fn of(t: &Text) -> Option<Self> {
        match t {
            Text::Exact(e) => Some(Self::Exact(e.clone())),
            Text::Prefix(p) => Some(Self::Prefix(p.clone())),
            Text::Suffix(s) => Some(Self::Suffix(s.clone())),
            Text::Present => Some(Self::Present),
            Text::Glob(_) => None,
        }
    }
}

/// One of `set`'s values as a need (`set` must hold one), None when a value outside may
/// hold (none given, one unreadable, a glob).
fn needs_of<T>(set: &Set<T>, need: impl Fn(&T) -> Option<Need>) -> Option<Vec<Need>> {
    if set.any.is_empty() || set.unreadable_any {
        return None;
    }
    set.any.iter().map(need).collect()
}

fn principal(t: &Text) -> Option<Need> {
    Pattern::of(t).map(Need::Principal)
}

fn namespace(t: &Text) -> Option<Need> {
    Pattern::of(t).map(Need::Namespace)
}

/// A service account's namespace: looser than the account, which is what a need may be.
fn account(a: &Account) -> Option<Need> {
    Some(Need::Namespace(Pattern::Exact(a.namespace.clone())))
}

fn source(n: &IpNet) -> Option<Need> {
    Some(Need::Source(*n))
}

impl From {
    /// What a peer must show for this source to match (see [`Rule::needs`]).
    fn needs(&self) -> Option<Vec<Need>> {
        needs_of(&self.principals, principal)
            .or_else(|| needs_of(&self.namespaces, namespace))
            .or_else(|| needs_of(&self.accounts, account))
            .or_else(|| needs_of(&self.ips, source))
            .or_else(|| needs_of(&self.remote_ips, source))
    }
}

impl When {
    /// What a peer must show for this condition to hold (see [`Rule::needs`]).
    fn needs(&self) -> Option<Vec<Need>> {
        match self {
            Self::SourceIp(s) | Self::RemoteIp(s) => needs_of(s, source),
            Self::Namespace(s) => needs_of(s, namespace),
            Self::Principal(s) => needs_of(s, principal),
            Self::Account(s) => needs_of(s, account),
            Self::DestinationIp(_) | Self::DestinationPort(_) | Self::Http => None,
        }
    }
}

/// The trust domain `cluster.local` in a principal stands for the mesh's own.
const ALIAS: &str = "cluster.local";

/// The peer's attributes as policies name them (made once per decision: its principals are
/// formatted strings). A plaintext peer has no principal, namespace, trust domain or service
/// account: no value matches them, not even `*`.
#[derive(Debug)]
pub struct View<'a> {
    peer: &'a Peer<'a>,
    /// `<trust domain>/ns/<namespace>/sa/<account>` (the SPIFFE ID without `spiffe://`), and
    /// the same under [`ALIAS`].
    principals: Vec<String>,
}

impl<'a> View<'a> {
    pub fn of(peer: &'a Peer<'a>) -> Self {
        let mut principals = Vec::new();
        if let Some(id) = peer.identity {
            let path = format!("/ns/{}/sa/{}", id.namespace, id.service_account);
            principals.push(format!("{}{path}", id.trust_domain));
            if id.trust_domain != ALIAS {
                principals.push(format!("{ALIAS}{path}"));
            }
        }
        Self { peer, principals }
    }

    /// The peer's principals, as policies name them (none for plaintext).
    pub fn principals(&self) -> &[String] {
        &self.principals
    }

    /// The peer's namespace (none for plaintext).
    pub fn namespace_name(&self) -> Option<&str> {
        self.peer.identity.map(|id| id.namespace.as_str())
    }

    pub fn source(&self) -> IpAddr {
        self.peer.source
    }

    fn principal(&self, t: &Text, r: Reading) -> bool {
        self.principals.iter().any(|p| t.matches(p, r))
    }

    fn namespace(&self, t: &Text, r: Reading) -> bool {
        self.peer
            .identity
            .is_some_and(|id| t.matches(&id.namespace, r))
    }

    fn trust_domain(&self, t: &Text, r: Reading) -> bool {
        self.peer
            .identity
            .is_some_and(|id| t.matches(&id.trust_domain, r))
    }

    fn account(&self, a: &Account) -> bool {
        self.peer
            .identity
            .is_some_and(|id| id.namespace == a.namespace && id.service_account == a.name)
    }

    fn from(&self, f: &From, r: Reading) -> bool {
        let source = self.peer.source;
        let ip = |n: &IpNet, _: Reading| n.contains(&source);
        f.principals.holds(r, |t, r| self.principal(t, r))
            && f.namespaces.holds(r, |t, r| self.namespace(t, r))
            && f.trust_domains.holds(r, |t, r| self.trust_domain(t, r))
            && f.accounts.holds(r, |a, _| self.account(a))
            && f.ips.holds(r, ip)
            && f.remote_ips.holds(r, ip)
    }

    fn when(&self, w: &When, r: Reading) -> bool {
        let (source, destination) = (self.peer.source, self.peer.destination);
        match w {
            When::SourceIp(s) | When::RemoteIp(s) => s.holds(r, |n, _| n.contains(&source)),
            When::Namespace(s) => s.holds(r, |t, r| self.namespace(t, r)),
            When::Principal(s) => s.holds(r, |t, r| self.principal(t, r)),
            When::Account(s) => s.holds(r, |a, _| self.account(a)),
            When::DestinationIp(s) => s.holds(r, |n, _| n.contains(&destination)),
            When::DestinationPort(s) => s.holds(r, |p, _| *p == self.peer.port),
            When::Http => r == Reading::Broad,
        }
    }
}
