//! Which of a workload's policies a caller may match: with many policies naming their
//! callers (by principal, namespace or address block, exact or wildcard), a decision tries
//! only those that name something the caller shows, and the policies any caller may match.
//!
//! Each lookup is a hash lookup per distinct wildcard length or prefix length in use, not
//! a walk over the policies. The index may offer a policy that then does not match, never
//! leave out one that does (see [`Rule::needs`](super::rules::Rule::needs)).
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use super::{
    Policy,
    rules::{Need, Pattern, View},
};

/// The policies of one workload by what their callers must show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallerIndex {
    principals: Texts,
    namespaces: Texts,
    sources: Blocks,
    /// Positions (in `Workload::policies`) of the policies any peer may match.
    unindexed: Vec<usize>,
}

impl CallerIndex {
    pub fn of(policies: &[Arc<Policy>]) -> Self {
        let mut out = Self::default();
        for (i, p) in policies.iter().enumerate() {
            let Some(needs) = p.needs() else {
                out.unindexed.push(i);
                continue;
            };
            for need in needs {
                match need {
                    Need::Principal(t) => out.principals.file(t, i),
                    Need::Namespace(t) => out.namespaces.file(t, i),
                    Need::Source(net) => out.sources.file(net, i),
                }
            }
        }
        out
    }

    /// The positions of the policies the peer `view` shows may match, in order.
    pub fn candidates(&self, view: &View<'_>) -> Vec<usize> {
        let mut out = self.unindexed.clone();
        for p in view.principals() {
            self.principals.find(p, &mut out);
        }
        if let Some(ns) = view.namespace_name() {
            self.namespaces.find(ns, &mut out);
        }
        self.sources.find(view.source(), &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn push_once(at: &mut Vec<usize>, i: usize) {
    if at.last() != Some(&i) {
        at.push(i);
    }
}

fn extend(out: &mut Vec<usize>, found: Option<&Vec<usize>>) {
    out.extend(found.into_iter().flatten());
}

/// Policies by the patterns of one attribute's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Texts {
    exact: HashMap<String, Vec<usize>>,
    /// By the prefix's length: a value is looked up by its head of each length in use.
    prefixes: BTreeMap<usize, HashMap<String, Vec<usize>>>,
    suffixes: BTreeMap<usize, HashMap<String, Vec<usize>>>,
    /// `*`: any value that is not empty.
    present: Vec<usize>,
}

impl Texts {
    fn file(&mut self, p: Pattern, i: usize) {
        let at = match p {
            Pattern::Exact(e) => self.exact.entry(e).or_default(),
            Pattern::Prefix(p) => self
                .prefixes
                .entry(p.len())
                .or_default()
                .entry(p)
                .or_default(),
            Pattern::Suffix(s) => self
                .suffixes
                .entry(s.len())
                .or_default()
                .entry(s)
                .or_default(),
            Pattern::Present => &mut self.present,
        };
        push_once(at, i);
    }

    /// Adds the policies whose pattern `value` matches.
    fn find(&self, value: &str, out: &mut Vec<usize>) {
        extend(out, self.exact.get(value));
        // `get` is None past the end or inside a character: no pattern matches there.
        for (len, by) in &self.prefixes {
            if let Some(head) = value.get(..*len) {
                extend(out, by.get(head));
            }
        }
        for (len, by) in &self.suffixes {
            let tail = value.len().checked_sub(*len).and_then(|at| value.get(at..));
            if let Some(tail) = tail {
                extend(out, by.get(tail));
            }
        }
        if !value.is_empty() {
            out.extend(&self.present);
        }
    }
}

/// Policies by the address blocks their callers must come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Blocks {
    /// By (IPv6, prefix length): an address is looked up by its network of each in use.
    by_length: BTreeMap<(bool, u8), HashMap<IpNet, Vec<usize>>>,
}

impl Blocks {
    fn file(&mut self, net: IpNet, i: usize) {
        let key = (matches!(net, IpNet::V6(_)), net.prefix_len());
        let at = self
            .by_length
            .entry(key)
            .or_default()
            .entry(net.trunc())
            .or_default();
        push_once(at, i);
    }

    /// Adds the policies with a block holding `ip` (of its family, as `IpNet::contains`).
    fn find(&self, ip: IpAddr, out: &mut Vec<usize>) {
        let v6 = ip.is_ipv6();
        let lengths = self.by_length.range((v6, 0)..=(v6, u8::MAX));
        for ((_, len), by) in lengths {
            if let Ok(net) = IpNet::new(ip, *len) {
                extend(out, by.get(&net.trunc()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        compile::authz::rules::{Peer, Rule},
        identity::SpiffeId,
        store::security::{self, Action},
    };

    /// One policy of one rule with one source.
    fn policy(action: Action, source: Value) -> Arc<Policy> {
        let rule: security::Rule =
            serde_json::from_value(json!({"from": [{"source": source}]})).expect("rule");
        Arc::new(Policy {
            name: "x/p".to_owned(),
            action,
            rules: vec![Rule::compile(&rule, "x")],
            stand_in: false,
        })
    }

    /// The candidates for a caller from `source` with `identity` (namespace, account).
    fn candidates(index: &CallerIndex, source: &str, identity: Option<(&str, &str)>) -> Vec<usize> {
        let id = identity.map(|(ns, sa)| SpiffeId::new("cluster.local", ns, Some(sa)));
        let peer = Peer {
            source: source.parse().expect("ip"),
            identity: id.as_ref(),
            destination: "10.0.1.10".parse().expect("ip"),
            port: 80,
        };
        index.candidates(&View::of(&peer))
    }

    /// Each policy is tried for the callers showing what it names, and only for them.
    #[test]
    fn a_policy_naming_its_callers_is_tried_for_them_alone() {
        let index = CallerIndex::of(&[
            policy(
                Action::Deny,
                json!({"principals": ["cluster.local/ns/y/sa/a"]}),
            ),
            policy(
                Action::Deny,
                json!({"principals": ["cluster.local/ns/z/*"]}),
            ),
            policy(Action::Deny, json!({"principals": ["*/sa/b"]})),
            policy(Action::Deny, json!({"namespaces": ["y"]})),
            policy(Action::Deny, json!({"ipBlocks": ["10.0.2.0/24"]})),
            policy(Action::Deny, json!({"remoteIpBlocks": ["fd00::/64"]})),
            policy(Action::Deny, json!({"serviceAccounts": ["w/c"]})),
            policy(Action::Deny, json!({"principals": ["*"]})),
        ]);
        assert_eq!(
            candidates(&index, "10.0.2.5", Some(("y", "a"))),
            [0, 3, 4, 7]
        );
        assert_eq!(candidates(&index, "10.0.3.5", Some(("z", "b"))), [1, 2, 7]);
        assert_eq!(candidates(&index, "fd00::5", Some(("w", "c"))), [5, 6, 7]);
        assert_eq!(candidates(&index, "10.0.2.5", None), [4]);
        assert_eq!(candidates(&index, "10.0.3.5", None), Vec::<usize>::new());
    }

    /// A value weft cannot read may be anything: a DENY naming one is tried for every caller.
    #[test]
    fn a_policy_with_an_unreadable_value_is_tried_for_every_caller() {
        let index = CallerIndex::of(&[policy(
            Action::Deny,
            json!({"ipBlocks": ["10.0.2.0/24", "10.0.2.999"]}),
        )]);
        assert_eq!(candidates(&index, "192.168.0.1", None), [0]);
    }
}
