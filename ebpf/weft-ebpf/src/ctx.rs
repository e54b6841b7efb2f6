//! Access to program context fields, one field per load or store.
//!
//! The verifier accepts only `ctx + constant` loads and stores of single fields; letting the
//! compiler copy a whole array (or keep a pointer into the context) produces "dereference of
//! modified ctx ptr". Volatile accesses keep every field access separate.

/// Reads `(*ptr).field`.
macro_rules! ctx_read {
    ($ptr:expr, $($f:tt)+) => {
        // SAFETY: `ptr` is the program's context pointer; the verifier checks and rewrites every
        // context load (fields a hook cannot see read as 0 or are rejected at load time).
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($f)+)) }
    };
}

/// Writes `value` to `(*ptr).field`.
macro_rules! ctx_write {
    ($ptr:expr, $value:expr, $($f:tt)+) => {
        // SAFETY: as for ctx_read; the verifier rejects programs that write fields their hook
        // may not write.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$($f)+), $value) }
    };
}

/// The socket cookie of a program's socket: unique per socket for the life of the kernel.
/// One implementation per context type, so no call site names the helper's raw pointer.
pub trait SocketCookie {
    fn cookie(&self) -> u64;
}

macro_rules! socket_cookie {
    ($($ctx:ty => $($field:ident).+),* $(,)?) => {$(
        impl SocketCookie for $ctx {
            #[inline(always)]
            fn cookie(&self) -> u64 {
                // SAFETY: the program's own context; the helper reads its socket only.
                unsafe {
                    aya_ebpf::helpers::bpf_get_socket_cookie(
                        self.$($field).+.cast::<core::ffi::c_void>(),
                    )
                }
            }
        }
    )*};
}

socket_cookie!(
    aya_ebpf::programs::SkBuffContext => skb.skb,
    aya_ebpf::programs::SockAddrContext => sock_addr,
    aya_ebpf::programs::SockOpsContext => ops,
);

/// The cookie of the network namespace of a program's socket (sock_addr: the caller's socket;
/// cgroup_skb: the packet's socket, kernel 6.15+).
pub trait NetnsCookie {
    fn netns_cookie(&self) -> u64;
}

macro_rules! netns_cookie {
    ($($ctx:ty => $($field:ident).+),* $(,)?) => {$(
        impl NetnsCookie for $ctx {
            #[inline(always)]
            fn netns_cookie(&self) -> u64 {
                // SAFETY: the program's own context; the helper reads its socket's namespace.
                unsafe {
                    aya_ebpf::helpers::generated::bpf_get_netns_cookie(
                        self.$($field).+.cast::<core::ffi::c_void>(),
                    )
                }
            }
        }
    )*};
}

netns_cookie!(
    aya_ebpf::programs::SkBuffContext => skb.skb,
    aya_ebpf::programs::SockAddrContext => sock_addr,
);
