//! Every map of the object, declared once.
//!
//! [`for_each_map!`] holds one row per map: its name, kind, key and value types, and the
//! agent setting that sizes it (with the default the kernel object is built with). The kernel
//! programs declare their maps from it, the agent derives from it the shape every pinned map
//! must have and which flag raises it, and the names below come from it too: a map cannot be
//! added, resized or retyped on one side only.
//!
//! Kinds: `RingBuf` (capacity in bytes), `Hash`, `HashNoPrealloc` (allocated as they are written:
//! a map sized for the worst case costs only what it holds; a replaced element may be reused
//! at once, so values replaced while programs read them carry a seal, see [`crate::seal`]),
//! `LruHash`,
//! `PerCpuHash`, `LpmTrie` (the key type is the data after the prefix length), `PerCpuArray`
//! (key: u32 index), `SkStorage` (socket storage, a BTF-defined map: one value per socket,
//! created by the programs, freed with the socket; no capacity), `SockHash` (sockets by key,
//! value a socket; entries leave with their socket), and `External` (declared by a library: aya-log's ring buffer). The
//! setting is a field of the agent's capacity flags, or `fixed` for a size the agent does not
//! choose. BPF object names are limited to 15 bytes.

/// Calls `$callback!` with every map's row (see the module's documentation).
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            /// Connection events for the agent (`ConnEvent`).
            CONN_EVENTS: RingBuf(ring_buffer_size = 512 * 1024);
            /// Open connections by socket cookie (`ConnState`).
            CONN_STATE: HashNoPrealloc<u64, $crate::conn::ConnState>(max_connections = 65_536);
            /// Datapath health counters, indexed by `Counter`.
            STATS: PerCpuArray<u64>(fixed = $crate::stats::COUNTERS);
            /// Packets and bytes per cgroup, direction and protocol.
            TRAFFIC: PerCpuHash<$crate::traffic::TrafficKey, $crate::traffic::TrafficValue>(
                traffic_entries = 4_096
            );
            /// aya-log's records (declared by aya-log-ebpf; its size is that crate's).
            AYA_LOGS: External(fixed = 1 << 17);
            /// Service frontends.
            SERVICES: HashNoPrealloc<$crate::svc::ServiceKey, $crate::svc::ServiceValue>(
                max_services = 65_536
            );
            /// Endpoint sets by revision.
            BACKEND_SLOTS: HashNoPrealloc<$crate::svc::SlotKey, $crate::svc::Endpoint>(
                max_backends = 262_144
            );
            /// Which backends currently serve which service (value unused).
            MEMBERS: HashNoPrealloc<$crate::svc::MemberKey, u32>(max_backends = 262_144);
            /// Passive health checking of frontends, by service id (`Outlier`).
            OUTLIER: HashNoPrealloc<u32, $crate::svc::Outlier>(max_services = 65_536);
            /// Passive health checking: each backend's failures and ejection per frontend
            /// (`BackendHealth`; LRU: a backend long gone ages out).
            HEALTH: LruHash<$crate::svc::MemberKey, $crate::svc::BackendHealth>(
                max_backends = 262_144
            );
            /// ClientIP session affinity: (client netns, service) to backend.
            AFFINITY: LruHash<$crate::svc::AffinityKey, $crate::svc::AffinityValue>(
                max_affinity = 16_384
            );
            /// Per socket: the ClusterIP translations it made (`SockXlate`).
            SOCK_XLATE: SkStorage<$crate::svc::SockXlate>(fixed = 0);
            /// Local pods by cgroup id.
            ENDPOINTS: HashNoPrealloc<u64, $crate::policy::EndpointInfo>(
                max_endpoints = 16_384
            );
            /// Address (prefix) to identity.
            IPCACHE: LpmTrie<$crate::policy::IpcacheData, $crate::policy::IpcacheValue>(
                max_ipcache = 65_536
            );
            /// What each policy set allows: (set, identity, direction, protocol, port prefix).
            POLICY: LpmTrie<$crate::policy::PolicyData, $crate::policy::PolicyValue>(
                max_policy_entries = 262_144
            );
            /// Plaintext tables of meshed pods' security policies (see `PlaintextData`).
            AUTHZ: LpmTrie<$crate::policy::PlaintextData, $crate::policy::PlaintextValue>(
                max_authz_entries = 65_536
            );
            /// Per socket: its allowed UDP/SCTP/echo exchanges (`SockFlows`); their packets
            /// pass unjudged.
            SOCK_FLOWS: SkStorage<$crate::policy::SockFlows>(fixed = 0);
            /// Allowed exchanges of sockets whose own `SOCK_FLOWS` slots were full.
            POLICY_FLOWS: LruHash<$crate::policy::PolicyFlowKey, u64>(
                max_policy_flows = 65_536
            );
            /// Socket-storage values held, per owner and in total (`SockOwner`).
            SOCK_COUNTS: Hash<$crate::svc::SockOwner, $crate::svc::SockCounts>(
                max_endpoints = 16_384
            );
            /// Policy verdicts by (direction, match), see `verdict_index`.
            VERDICTS: PerCpuArray<u64>(fixed = $crate::policy::VERDICTS);
            /// Packets and bytes per UDP flow of a local socket.
            UDP_FLOW_STATS: LruHash<
                $crate::traffic::UdpFlowStatsKey,
                $crate::traffic::UdpFlowStatsValue,
            >(max_udp_flows = 16_384);
            /// Each CPU's budget of drop events for the current second.
            DROP_BUDGET: PerCpuArray<$crate::conn::DropBudget>(fixed = 1);
            /// Each CPU's counts of a walk over a frontend's backends (`WalkCounts`).
            WALK_COUNTS: PerCpuArray<$crate::svc::WalkCounts>(fixed = 1);
            /// With `--sockmap`: established TCP sockets of pods by (local, remote) address.
            SOCK_PAIRS: SockHash<$crate::conn::PairKey>(max_sockmap_connections = 16_384);
            /// With `--sockmap`: bytes redirected socket to socket, per socket of `SOCK_PAIRS`.
            REDIRECTED: HashNoPrealloc<$crate::conn::PairKey, $crate::conn::Redirected>(
                max_sockmap_connections = 16_384
            );
            /// Captured connections established and not yet accepted by the agent: where
            /// each was going (`MeshOrig`), by the client socket's netns and port (LRU).
            MESH_ORIG: LruHash<$crate::mesh::MeshOrigKey, $crate::mesh::MeshOrig>(
                fixed = 16_384
            );
            /// The cgroups of the instance's other agents (a successor, the agent it
            /// replaces), at `AGENT_CGROUP_LEVEL`: their sockets belong to no pod, as the
            /// loading agent's own (value unused; LRU: a killed agent's entry ages out).
            AGENT_CGROUPS: LruHash<u64, u32>(fixed = 64);
        }
    };
}

/// `pub const NAME: &str = "NAME";` for every row, and [`ALL`].
macro_rules! names {
    ($($(#[doc = $doc:literal])* $name:ident: $kind:ident $(<$($t:ty),+ $(,)?>)? ($setting:ident = $size:expr);)*) => {
        $(
            $(#[doc = $doc])*
            pub const $name: &str = stringify!($name);
        )*
        /// Every map of the object, in table order; all of them are pinned per instance.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

for_each_map!(names);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_the_kernel_limit() {
        for (i, name) in ALL.iter().enumerate() {
            assert!(
                name.len() <= 15,
                "{name} is longer than BPF_OBJ_NAME_LEN - 1"
            );
            assert!(!ALL[..i].contains(name), "{name} twice");
        }
        assert_eq!(ALL.len(), 27);
        assert_eq!(POLICY, "POLICY");
    }
}
