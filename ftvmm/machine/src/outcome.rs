//! How a run ended and what it counted.

use ftvm_log::LogError;
use std::fmt;
use std::time::Duration;

/// The replay took a different path than the recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Exit ordinal where it was noticed.
    pub ordinal: u64,
    /// What the log says happened.
    pub expected: String,
    /// What the replay did instead.
    pub actual: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replay diverged at exit ordinal {}: expected {}, got {}",
            self.ordinal, self.expected, self.actual
        )
    }
}

/// Why a replay stopped before the guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayStop {
    /// The replay took another path.
    Diverged(Divergence),
    /// The log is unreadable from here on (corrupt or truncated frame).
    BadLog(LogError),
    /// The primary was lost and the other replica won the go-live claim: this one halts.
    LostGoLive {
        /// The claimant that won.
        winner: String,
    },
    /// The primary was lost and the arbiter could not be asked: never go live then.
    ArbiterUnreachable(String),
    /// The log ends (no End frame): everything recorded was replayed.
    LogEnded {
        /// The last ordinal the log covered.
        last_ordinal: u64,
    },
}

impl fmt::Display for ReplayStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayStop::Diverged(divergence) => divergence.fmt(f),
            ReplayStop::BadLog(err) => err.fmt(f),
            ReplayStop::LostGoLive { winner } => {
                write!(f, "the primary was lost and {winner} won the go-live claim: halting")
            }
            ReplayStop::ArbiterUnreachable(why) => write!(
                f,
                "the primary was lost and the arbiter cannot be reached ({why}): halting without going live"
            ),
            ReplayStop::LogEnded { last_ordinal } => {
                write!(
                    f,
                    "log ends at exit ordinal {last_ordinal} without an end frame"
                )
            }
        }
    }
}

/// Why the guest stopped by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashReason {
    /// A fault while delivering a double fault: the CPU shut down.
    TripleFault,
    /// The guest reported an exception through the fault port.
    GuestFault {
        /// Exception vector.
        vector: u32,
        /// Error code (0 if none).
        error_code: u64,
        /// RIP of the faulting instruction.
        fault_rip: u64,
        /// CR2 (page-fault address).
        cr2: u64,
    },
    /// KVM could not emulate an instruction (for example, code fetched from a hole).
    InternalError {
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
    },
    /// KVM refused to enter the guest.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// `HLT` with interrupts disabled: nothing can ever wake the guest.
    HaltedWithInterruptsDisabled,
    /// `HLT` with no timer running and nothing else to wake the guest.
    HaltedWithNoWakeSource,
    /// An exit kind this machine does not have.
    UnexpectedExit(String),
}

fn exception_name(vector: u32) -> &'static str {
    const NAMES: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS",
        "#GP", "#PF", "", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("")
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrashReason::TripleFault => write!(f, "triple fault (CPU shutdown)"),
            CrashReason::GuestFault {
                vector,
                error_code,
                fault_rip,
                cr2,
            } => write!(
                f,
                "unhandled exception {vector} {} (error {error_code:#x}) at guest rip {fault_rip:#x}, cr2 {cr2:#x}",
                exception_name(*vector)
            ),
            CrashReason::InternalError { suberror: 1 } => {
                write!(f, "KVM could not emulate an instruction (code outside RAM?)")
            }
            CrashReason::InternalError { suberror } => write!(f, "KVM internal error {suberror}"),
            CrashReason::FailEntry { reason } => write!(f, "KVM could not enter the guest (reason {reason:#x})"),
            CrashReason::HaltedWithInterruptsDisabled => write!(f, "halted with interrupts disabled (hang)"),
            CrashReason::HaltedWithNoWakeSource => write!(f, "halted with no timer and no device to wake it (hang)"),
            CrashReason::UnexpectedExit(kind) => write!(f, "unexpected exit {kind}"),
        }
    }
}

/// A guest crash with where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// What went wrong.
    pub reason: CrashReason,
    /// RIP at the exit that ended the run.
    pub rip: u64,
    /// Guest-caused exits counted before the crash.
    pub exit_ordinal: u64,
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest crashed: {} (rip {:#x}, exit ordinal {})",
            self.reason, self.rip, self.exit_ordinal
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest wrote this code to the power port.
    PowerOff(u8),
    /// The guest crashed.
    Crashed(CrashReport),
    /// A replay stopped before the guest did (divergence, bad log, or end of log).
    ReplayStopped(ReplayStop),
    /// The VMM was asked to stop (SIGTERM or SIGINT) before the guest did.
    Signalled(i32),
    /// A replay reached the point where the recorded run was stopped by this signal (its
    /// end frame says so) and checked the final state there.
    StoppedAsRecorded(i32),
}

/// Counters of a run.
#[derive(Debug, Default, Clone)]
pub struct ExitStats {
    /// Port writes.
    pub pio_out: u64,
    /// Port reads.
    pub pio_in: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Interrupt-window exits (none since the VMM stopped asking for them; counted in
    /// case KVM sends one).
    pub irq_window: u64,
    /// HLT exits with a vector pending that the guest could not take yet.
    pub halt_not_ready: u64,
    /// Returns from KVM_RUN the host caused (signals, EINTR); not in the ordinal.
    pub host_caused: u64,
    /// Interrupts injected.
    pub injected: u64,
    /// Port and MMIO accesses no device claimed.
    pub unhandled: u64,
    /// Time spent waiting in HLT.
    pub halted: Duration,
}
