//! What a program answers the kernel, and the failures inside weft that decide an answer.
//!
//! Every entry point is `match try_x(&ctx) { Ok(verdict) => verdict.code(), Err(fault) =>
//! fault.code() }`: decisions are verdicts, and a fault is counted once, in one place, and
//! answered with the verdict that fails safe for it.
use aya_ebpf::helpers::generated::bpf_set_retval;
use weft_abi::stats::Counter;

use crate::stats;

const ECONNREFUSED: i32 = 111;

/// A cgroup hook's answer for a call (connect, sendmsg, ...) or a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The call or packet goes on.
    Pass,
    /// Denied: a call fails with EPERM, a packet is dropped.
    Deny,
    /// A connect or send to a Service without a backend fails with ECONNREFUSED.
    Refuse,
}

impl Verdict {
    /// The program's return value (a refusal also sets the call's errno).
    #[inline(always)]
    pub fn code(self) -> i32 {
        match self {
            Self::Pass => 1,
            Self::Deny => 0,
            Self::Refuse => {
                // SAFETY: sets the errno the failing call returns; no memory is passed.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                0
            }
        }
    }
}

/// Something weft's own state did not allow (not a decision about the traffic).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A service's current revision lacks a backend slot (a sync bug): the connect is refused,
    /// as for a service without backends, rather than sent somewhere unknown.
    SlotMissing,
    /// A `SERVICES` value stayed torn over every try (see `weft_abi::seal`): the call is
    /// denied rather than sent where a mix of two writes points.
    Torn,
}

impl Fault {
    /// Counts the fault and answers with its safe verdict.
    #[inline(always)]
    pub fn code(self) -> i32 {
        match self {
            Self::SlotMissing => {
                stats::bump(Counter::ServiceSlotMissing);
                Verdict::Refuse.code()
            }
            // Counted at each try already.
            Self::Torn => Verdict::Deny.code(),
        }
    }
}
