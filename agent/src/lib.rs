//! weft: an eBPF node agent for Kubernetes service mesh datapaths.
//!
//! The binary `weft` is a thin CLI over this library; privileged tests use the library to reach
//! the embedded kernel object.
pub mod app;
pub mod cgroup;
pub mod conntrack;
pub mod datapath;
pub mod logging;
pub mod stats;
