//! Test harness for weft: a simulated Kubernetes node on one machine.
//!
//! A [`node::Node`] is a network namespace holding a bridge; each pod is a network namespace
//! with a veth to that bridge, IPv4 and IPv6 addresses, and its own cgroup v2 directory inside
//! the node's per-test cgroup. Processes run in a pod's namespace *and* cgroup, so weft sees
//! them as that pod's workload. Nothing is routed out of the node namespace.
//!
//! A [`cluster::Cluster`] joins several such nodes (each its own pod subnet and agent) on an
//! underlay bridge with routes between their pod subnets.
//!
//! Every resource is owned by a guard that removes it on drop, also when a test panics:
//! processes (killed by pid), namespaces, cgroups, and the agent's pins. Names derive from the
//! test's name and the process id so tests run concurrently.
pub mod agent;
pub mod cluster;
pub mod fakeapi;
pub mod k8s;
pub mod names;
pub mod netpol;
pub mod node;
pub mod proc;
pub mod prom;
pub mod prometheus;
pub mod workload;

pub use agent::{Agent, AgentOptions};
pub use cluster::Cluster;
pub use node::{Node, NodeBuilder, Pod};
pub use workload::{Close, Exchange, Spray, SprayFailure};
