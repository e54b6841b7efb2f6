//! Datapath health counters.
//!
//! Writer: every kernel program, into the per-CPU array `STATS` at index `Counter as u32`.
//! Reader: the agent, which sums the CPUs and reports them.

/// Index of a counter in `STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A connection event could not be reserved in `CONN_EVENTS` (ring buffer full).
    ConnEventsLost = 0,
    /// A connection could not be tracked: `CONN_STATE` is full.
    ConnStateFull = 1,
    /// A traffic counter could not be created: `TRAFFIC` is full.
    TrafficFull = 2,
    /// A packet seen by cgroup_skb could not be parsed (truncated or unknown).
    PacketsUnparsed = 3,
    /// The kernel refused sock_ops callback flags: a connection went untracked, or its
    /// received byte count may include the peer's FIN.
    CallbackFlagsFailed = 4,
    /// A connect or send to a service without ready backends was refused (ECONNREFUSED).
    ServiceNoBackends = 5,
    /// A service's backend slot was missing (a sync bug): the connect was refused.
    ServiceSlotMissing = 6,
    /// A socket's storage could not be created (the kernel is out of memory for it): a
    /// translation or an allowed exchange of that socket was not remembered (getpeername and
    /// recvmsg may show the backend; the exchange's next packets are judged again).
    SockStateFailed = 7,
    /// A drop event was not written: the CPU's budget of `DROP_EVENTS_PER_SECOND` was spent
    /// (the drop itself is counted in `VERDICTS`/`STATS` as always).
    DropEventsSuppressed = 8,
    /// A `SERVICES` or `ENDPOINTS` value was copied while the agent replaced it (its seal did
    /// not match) and was looked up again; one still torn after that failed safe.
    TornRead = 9,
    /// An unconnected UDP socket reached one backend through two ClusterIPs (every backend
    /// looked at was taken): replies from it show the ClusterIP dialled last.
    RevNatShared = 10,
    /// A socket with more live exchanges than its own storage holds (a server answering many
    /// clients) put one in the node-wide `POLICY_FLOWS` LRU.
    FlowOverflow = 11,
    /// A socket's storage was not created: its pod (or the node) holds as many values as
    /// `--max-socket-states-per-pod` (`--max-socket-states`) allow. That pod's translations
    /// and exchanges are not remembered until some of its sockets close.
    SockStateOverBudget = 12,
    /// With `--sockmap`: an established socket could not enter `SOCK_PAIRS` or `REDIRECTED`
    /// (full, or the kernel refused it): its data takes the TCP/IP stack, as without.
    SockmapFull = 13,
    /// A connection to capture for the mesh could not be: its socket's storage or the
    /// agent's `MESH_ORIG` entry could not be written. It was refused (never sent in
    /// plaintext).
    MeshCaptureFailed = 14,
    /// A Service port's connect timeout could not be set on a connecting socket (it keeps
    /// the kernel's bound), or the socket's own `TCP_USER_TIMEOUT` could not be given back
    /// at establishment.
    ConnectTimeoutFailed = 15,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 16] = [
        Self::ConnEventsLost,
        Self::ConnStateFull,
        Self::TrafficFull,
        Self::PacketsUnparsed,
        Self::CallbackFlagsFailed,
        Self::ServiceNoBackends,
        Self::ServiceSlotMissing,
        Self::SockStateFailed,
        Self::DropEventsSuppressed,
        Self::TornRead,
        Self::RevNatShared,
        Self::FlowOverflow,
        Self::SockStateOverBudget,
        Self::SockmapFull,
        Self::MeshCaptureFailed,
        Self::ConnectTimeoutFailed,
    ];

    /// The name the agent reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ConnEventsLost => "conn_events_lost",
            Self::ConnStateFull => "conn_state_full",
            Self::TrafficFull => "traffic_full",
            Self::PacketsUnparsed => "packets_unparsed",
            Self::CallbackFlagsFailed => "callback_flags_failed",
            Self::ServiceNoBackends => "service_no_backends",
            Self::ServiceSlotMissing => "service_slot_missing",
            Self::SockStateFailed => "sock_state_failed",
            Self::DropEventsSuppressed => "drop_events_suppressed",
            Self::TornRead => "torn_read",
            Self::RevNatShared => "revnat_shared",
            Self::FlowOverflow => "flow_overflow",
            Self::SockStateOverBudget => "sock_state_over_budget",
            Self::SockmapFull => "sockmap_full",
            Self::MeshCaptureFailed => "mesh_capture_failed",
            Self::ConnectTimeoutFailed => "connect_timeout_failed",
        }
    }
}

/// Number of slots in `STATS`.
pub const COUNTERS: u32 = Counter::ALL.len() as u32;
