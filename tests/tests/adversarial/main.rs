//! Adversarial suite: the ways a tenant could get around isolation, freeze it, or break
//! another tenant's traffic (issue 13), each shown closed. Every test here failed on the code
//! before the fix it covers.
mod capacity;
mod cgroups;
mod icmp;
mod input;
mod node;
mod surface;

use std::time::Duration;

use serde_json::Value;
use weft_testkit::{Agent, Node};

/// Waits until `weft policies` shows `pod` (`namespace/name`) isolated as asked, in the kernel.
pub fn wait_isolated(agent: &Agent, pod: &str, ingress: bool, egress: bool) {
    agent.wait_policies(&format!("{pod} isolated in {ingress}/{egress}"), |v| {
        v["endpoints"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["pod"] == pod
                    && e["ingress_isolated"] == ingress
                    && e["egress_isolated"] == egress
                    && e["in_kernel"] == true
            })
        })
    });
}

/// Probes `target` (`tcp:ip:port` or `udp:ip:port`) from `pod` once: the name the server
/// answered with, or the error.
pub fn probe(node: &Node, pod: &str, target: &str) -> String {
    let mut p = node.spawn(pod, &["probe", "--timeout-ms", "1000", target]);
    p.wait_success(Duration::from_secs(20));
    let v: Value = p
        .stdout()
        .wait_for("probe results", Duration::from_secs(5), |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["event"] == "probe")
            })
        });
    v["results"][target].as_str().unwrap_or_default().to_owned()
}

/// Probes until the answer is `want` (a change takes a moment to reach the kernel), for up to
/// 10 s; panics with the last answer otherwise.
#[track_caller]
pub fn expect_probe(node: &Node, pod: &str, target: &str, want: Reach) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe(node, pod, target);
        if want.matches(&got) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pod} -> {target}: expected {want:?}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a probe should find.
#[derive(Debug, Clone, Copy)]
pub enum Reach {
    /// The server named this.
    Answer(&'static str),
    /// Any error (refused by policy, timed out).
    Blocked,
}

impl Reach {
    fn matches(self, got: &str) -> bool {
        match self {
            Self::Answer(name) => got == name,
            Self::Blocked => got.starts_with("error"),
        }
    }
}
