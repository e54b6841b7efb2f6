//! The kernel's lookups over compiled state.
use std::net::IpAddr;

use weft_abi::net::Direction;

use super::super::{
    Policies, RuleRef,
    judge::{Compiled, judge},
};
use crate::{
    source::yaml,
    store::{self, Store},
};

/// A store of the given documents (each must be valid).
pub fn store_of(docs: &[&str]) -> Store {
    let objects: Vec<_> = docs
        .iter()
        .map(|d| {
            store::decode(yaml::parse(d).expect("yaml"))
                .unwrap_or_else(|e| panic!("invalid document {d}: {e:?}"))
        })
        .collect();
    Store::from_objects(objects.iter().map(|(r, o)| (r, o)))
}

pub struct Eval<'a> {
    p: &'a Policies,
}

impl<'a> Eval<'a> {
    pub fn new(p: &'a Policies) -> Self {
        Self { p }
    }

    /// The verdict for traffic of the local pod in `cgroup` with `peer`, and the rule that
    /// allowed it (none when the pod is not isolated or the peer is itself or the node).
    pub fn allowed(
        &self,
        cgroup: &str,
        direction: Direction,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> (bool, Option<&RuleRef>) {
        let v = judge(
            &Compiled(self.p),
            &self.p.endpoints[cgroup].info,
            direction,
            peer,
            proto,
            port,
        );
        (v.allowed, v.rule.and_then(|r| self.p.rules.get(&r)))
    }
}
