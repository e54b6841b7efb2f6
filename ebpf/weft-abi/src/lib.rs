//! The ABI between weft's kernel programs and its agent.
//!
//! Every type here is `#[repr(C)]`, made only of integers, with explicit padding and a size
//! assertion, so both sides agree on the layout byte for byte. Each type says who writes it and
//! who reads it. Names of maps and programs live here too, so the agent and the object cannot
//! drift apart silently (the agent checks them against the object it embeds).
#![no_std]

pub mod conn;
pub mod maps;
pub mod mesh;
pub mod net;
pub mod policy;
pub mod seal;
pub mod stats;
pub mod svc;
pub mod traffic;
#[cfg(feature = "user")]
mod user;

/// The version of what the maps hold and how the programs read it. Bump it with every change
/// to a map's key or value layout or meaning (a same-size change included): maps are pinned
/// per version (and per shape, see the agent's `datapath::pins`), so an agent of another
/// version never adopts them; it fills new ones and switches the programs after.
pub const ABI_VERSION: u32 = 14;

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
    /// cgroup/sock_release: a closing socket's storage values leave its pod's budget.
    pub const SOCK_RELEASE: &str = "weft_sock_release";

    /// sk_msg program attached to the `SOCK_PAIRS` socket map (with `--sockmap`): data
    /// between two local sockets skips the TCP/IP stack.
    pub const SK_MSG: &str = "weft_sk_msg";

    /// Never attached: run by the agent (BPF_PROG_TEST_RUN) to learn cgroup levels.
    pub const LEVEL_PROBE: &str = "weft_level_probe";

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
    /// u32: 1 = a socket below the cgroup root, in a network namespace other than
    /// `HOST_NETNS_COOKIE`, whose cgroup `ENDPOINTS` does not know yet is a pod not bound yet:
    /// isolated both ways (Kubernetes mode). 0 = such sockets are not judged.
    pub const UNBOUND_ISOLATED: &str = "UNBOUND_ISOLATED";
    /// u32 and u64: the level and id of the cgroup that holds the kubelet's pods
    /// (`kubepods.slice`): only sockets below it can be pods not bound yet (other containers
    /// and network namespaces of the node are not pods).
    pub const UNBOUND_SCOPE_LEVEL: &str = "UNBOUND_SCOPE_LEVEL";
    pub const UNBOUND_SCOPE_ID: &str = "UNBOUND_SCOPE_ID";
    /// u64: the node's network namespace (its cookie): host-network pods and node processes
    /// live there and are never judged as unbound pods.
    pub const HOST_NETNS_COOKIE: &str = "HOST_NETNS_COOKIE";
    /// u64: socket-storage values the node may hold; one pod may, of each kind; and one pod
    /// may whatever the node holds (see `crate::svc::SockOwner`).
    pub const SOCK_STATES: &str = "SOCK_STATES";
    pub const SOCK_STATES_PER_POD: &str = "SOCK_STATES_PER_POD";
    pub const SOCK_STATES_FLOOR: &str = "SOCK_STATES_FLOOR";
    /// u32: 1 = established TCP sockets of pods enter `SOCK_PAIRS`, and data between two of
    /// them is redirected socket to socket (`--sockmap`); 0 = never.
    pub const SOCKMAP_ENABLED: &str = "SOCKMAP_ENABLED";
    /// u32 and u64: the level and id of the agent's own cgroup when it is below the cgroup
    /// root (a DaemonSet pod's), else 0 and 0. The agent's sockets, also those it makes in
    /// a pod's network namespace for the mesh, belong to no pod: never judged as one, nor as
    /// a pod not bound yet.
    pub const AGENT_CGROUP_LEVEL: &str = "AGENT_CGROUP_LEVEL";
    pub const AGENT_CGROUP_ID: &str = "AGENT_CGROUP_ID";
    /// u32: the kernel's tick rate (CONFIG_HZ), which a SYN's first retransmission timeout
    /// is counted in; 0: unknown (connect timeouts then keep the kernel's first one, 1 s).
    pub const KERNEL_HZ: &str = "KERNEL_HZ";
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
