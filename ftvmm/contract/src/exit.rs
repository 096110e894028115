//! Exit statuses of `ftvmm run` (docs/contract.md has what ftd does about each).

/// The highest status a guest may power off with: anything above is ftvmm's own.
pub const GUEST_MAX: u8 = 63;
/// A replay diverged from its log.
pub const DIVERGED: u8 = 1;
/// A replay's log ends without an end frame (everything in it matched).
pub const LOG_INCOMPLETE: u8 = 3;
/// A usage error (unknown flag, bad value, bad combination).
pub const USAGE: u8 = 64;
/// The image (or a log or snapshot) is not valid for this machine.
pub const BAD_IMAGE: u8 = 65;
/// An input file cannot be opened (or the primary cannot be reached).
pub const NO_INPUT: u8 = 66;
/// The guest crashed.
pub const GUEST_CRASHED: u8 = 70;
/// The VMM or the host failed (and a backup that diverged).
pub const VMM_FAILED: u8 = 71;
/// The peer was lost and the other replica won the go-live claim: halted without output.
pub const LOST_GO_LIVE: u8 = 72;
/// A backup lost its primary (or a primary got no backup in time) and could not reach the
/// arbiter: halted without going live.
pub const PRIMARY_LOST: u8 = 73;
/// A new backup's clone request was refused (not running alone yet, or busy): try later.
pub const CLONE_REFUSED: u8 = 75;
/// Stopped by signal N: the status is this plus N.
pub const SIGNALLED_BASE: u8 = 128;

/// The status of a run stopped by `signal`.
pub fn signalled(signal: i32) -> u8 {
    SIGNALLED_BASE.saturating_add(u8::try_from(signal).unwrap_or(u8::MAX))
}

/// Whether `status` is the guest's own power-off code (not a failure of the replica).
pub fn is_guest_power_off(status: i32) -> bool {
    (0..=i32::from(GUEST_MAX)).contains(&status)
}
