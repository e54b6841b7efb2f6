//! The ABI between weft's kernel programs and its agent.
//!
//! Every type here is `#[repr(C)]`, made only of integers, with explicit padding and a size
//! assertion, so both sides agree on the layout byte for byte. Each type says who writes it and
//! who reads it. Names of maps and programs live here too, so the agent and the object cannot
//! drift apart silently (the agent checks them against the object it embeds).
#![no_std]

pub mod conn;
pub mod policy;
pub mod stats;
pub mod svc;
pub mod traffic;

/// Names of the programs in the object, as the agent looks them up.
pub mod programs {
    /// sock_ops program attached to the workload cgroup: TCP connection lifecycle.
    pub const SOCKOPS: &str = "weft_sockops";
    /// cgroup_skb/ingress program: traffic accounting and ingress policy of received packets.
    pub const SKB_INGRESS: &str = "weft_skb_ingress";
    /// cgroup_skb/egress program: traffic accounting and egress policy of sent packets.
    pub const SKB_EGRESS: &str = "weft_skb_egress";

    /// cgroup/connect4 and connect6: ClusterIP to backend for TCP and connected UDP.
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    /// cgroup/sendmsg4 and sendmsg6: the same for unconnected UDP.
    pub const SENDMSG4: &str = "weft_sendmsg4";
    pub const SENDMSG6: &str = "weft_sendmsg6";
    /// cgroup/recvmsg4 and recvmsg6: UDP replies appear to come from the ClusterIP.
    pub const RECVMSG4: &str = "weft_recvmsg4";
    pub const RECVMSG6: &str = "weft_recvmsg6";
    /// cgroup/getpeername4 and getpeername6: getpeername() returns the ClusterIP.
    pub const GETPEERNAME4: &str = "weft_getpeername4";
    pub const GETPEERNAME6: &str = "weft_getpeername6";
    /// cgroup/sock_release: removes a UDP socket's translation entries.
    pub const SOCK_RELEASE: &str = "weft_sock_release";

    /// Every program the agent attaches, in attach order.
    pub const ALL: [&str; 12] = [
        SOCKOPS,
        SKB_INGRESS,
        SKB_EGRESS,
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        SOCK_RELEASE,
    ];
}

/// Names of the maps in the object. BPF object names are limited to 15 bytes.
pub mod maps {
    /// Ring buffer of [`crate::conn::ConnEvent`].
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
    /// Hash of socket cookie to [`crate::conn::ConnState`] for open connections.
    pub const CONN_STATE: &str = "CONN_STATE";
    /// Per-CPU array of u64 counters indexed by [`crate::stats::Counter`].
    pub const STATS: &str = "STATS";
    /// Per-CPU hash of [`crate::traffic::TrafficKey`] to [`crate::traffic::TrafficValue`].
    pub const TRAFFIC: &str = "TRAFFIC";
    /// aya-log's ring buffer (defined by aya-log-ebpf).
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// Hash of [`crate::svc::ServiceKey`] to [`crate::svc::ServiceValue`].
    pub const SERVICES: &str = "SERVICES";
    /// Hash of [`crate::svc::SlotKey`] to [`crate::svc::Endpoint`].
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    /// Hash of [`crate::svc::MemberKey`] to u32.
    pub const MEMBERS: &str = "MEMBERS";
    /// LRU hash of [`crate::svc::AffinityKey`] to [`crate::svc::AffinityValue`].
    pub const AFFINITY: &str = "AFFINITY";
    /// LRU hash of [`crate::svc::RevNatKey`] to [`crate::svc::Endpoint`].
    pub const REVNAT: &str = "REVNAT";
    /// LRU hash of [`crate::svc::UdpFlowKey`] to [`crate::svc::Endpoint`].
    pub const UDP_FLOWS: &str = "UDP_FLOWS";
    /// LRU hash of socket cookie to [`crate::svc::UdpSock`].
    pub const UDP_SOCKS: &str = "UDP_SOCKS";
    /// Hash of cgroup id to [`crate::policy::EndpointInfo`].
    pub const ENDPOINTS: &str = "ENDPOINTS";
    /// LPM trie of [`crate::policy::IpcacheData`] to [`crate::policy::IpcacheValue`].
    pub const IPCACHE: &str = "IPCACHE";
    /// LPM trie of [`crate::policy::PolicyData`] to [`crate::policy::PolicyValue`].
    pub const POLICY: &str = "POLICY";
    /// LRU hash of [`crate::policy::PolicyFlowKey`] to a timestamp.
    pub const POLICY_FLOWS: &str = "POLICY_FLOWS";
    /// Per-CPU array of u64 indexed by [`crate::policy::verdict_index`].
    pub const VERDICTS: &str = "VERDICTS";
    /// LRU hash of [`crate::traffic::UdpFlowStatsKey`] to [`crate::traffic::UdpFlowStatsValue`].
    pub const UDP_FLOW_STATS: &str = "UDP_FLOW_STATS";
    /// Per-CPU array (1 slot) of [`crate::conn::DropBudget`].
    pub const DROP_BUDGET: &str = "DROP_BUDGET";

    /// Every map of the object; all of them are pinned per instance.
    pub const ALL: [&str; 19] = [
        CONN_EVENTS,
        CONN_STATE,
        STATS,
        TRAFFIC,
        AYA_LOGS,
        SERVICES,
        BACKEND_SLOTS,
        MEMBERS,
        AFFINITY,
        REVNAT,
        UDP_FLOWS,
        UDP_SOCKS,
        ENDPOINTS,
        IPCACHE,
        POLICY,
        POLICY_FLOWS,
        VERDICTS,
        UDP_FLOW_STATS,
        DROP_BUDGET,
    ];
}

/// Names of global variables of the object that the agent sets at load time.
pub mod globals {
    /// u64: `CONN_EVENTS` wakes its reader only once this many bytes are pending (0: on every
    /// event). Fewer wakeups under load; the agent also drains on a timer.
    pub const CONN_EVENTS_WAKEUP_BYTES: &str = "CONN_EVENTS_WAKEUP_BYTES";
    /// u32: cgroup level of the agent's cgroup root (0 = the cgroup2 mount). Pods' cgroups
    /// are looked for below it.
    pub const POLICY_ROOT_LEVEL: &str = "POLICY_ROOT_LEVEL";
    /// u64: a connection reports its counters (an `Update` event) at most this often while
    /// it stays open; 0: never (only open and close).
    pub const CONN_UPDATE_INTERVAL_NS: &str = "CONN_UPDATE_INTERVAL_NS";
    /// u32: 1 = write connection and drop events; 0 = telemetry off (the datapath still
    /// translates, enforces and counts).
    pub const CONN_EVENTS_ENABLED: &str = "CONN_EVENTS_ENABLED";
}

/// Address families as the kernel numbers them.
pub const AF_INET: u32 = 2;
/// Address families as the kernel numbers them.
pub const AF_INET6: u32 = 10;

/// IP protocol numbers used by the programs.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol numbers used by the programs.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol numbers used by the programs.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol numbers used by the programs.
pub const IPPROTO_ICMPV6: u8 = 58;
/// IP protocol numbers used by the programs.
pub const IPPROTO_SCTP: u8 = 132;
