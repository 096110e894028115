//! The primary's outputs waiting for the backup (the output rule), and their counters.

use super::*;

/// The primary's transmits waiting for the backup (the output rule), in the order the
/// guest sent them.
#[derive(Default)]
pub(super) struct OutputHold {
    pub(super) queue: VecDeque<Held>,
    /// The channel's own descriptor of the TAP.
    pub(super) tap: Option<Tap>,
    /// The pair is broken (or closed): frames go out at once.
    pub(super) unprotected: bool,
    /// Bytes the queued outputs keep in memory.
    pub(super) bytes: u64,
    pub(super) stats: HoldStats,
}

pub(super) struct Held {
    /// The log's length when the output was produced.
    pub(super) position: u64,
    /// A frame for the TAP, or a disk write or flush done (on the ack thread, in order
    /// with the frames) by running it.
    pub(super) output: Output,
    pub(super) since: Instant,
}

/// Upper bounds (inclusive, microseconds) of the output hold time histogram's buckets; a
/// last bucket counts everything longer.
pub const HOLD_BUCKET_BOUNDS_US: [u64; 10] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

/// Counters of the output rule (primary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Frames held for an acknowledgement.
    pub held: u64,
    /// Held frames released to the TAP.
    pub released: u64,
    /// Frames sent at once because the backup was lost (unprotected).
    pub unprotected: u64,
    /// Frames the TAP refused (queue full) or failed.
    pub dropped: u64,
    /// Outputs never performed: the pair ended without a verdict that allowed them.
    pub discarded: u64,
    /// Total time held frames waited, in microseconds.
    pub hold_us_total: u64,
    /// The longest wait, in microseconds.
    pub hold_us_max: u64,
    /// Released outputs by wait: `hold_buckets[i]` counts waits of at most
    /// `HOLD_BUCKET_BOUNDS_US[i]` (and more than the bound before); the last bucket counts
    /// the longer ones. Not cumulative.
    pub hold_buckets: [u64; HOLD_BUCKET_BOUNDS_US.len() + 1],
}

impl OutputHold {
    pub(super) fn emit(&mut self, output: Output) {
        match output {
            Output::Frame(frame) => self.send(&frame),
            Output::Disk(_, action) => action(),
        }
    }

    pub(super) fn send(&mut self, frame: &[u8]) {
        let sent = self.tap.as_mut().map(|tap| tap.send(frame));
        if !matches!(sent, Some(Ok(true))) {
            self.stats.dropped += 1;
        }
    }

    /// Drops every held output without performing it (the replica halts).
    pub(super) fn discard(&mut self) {
        self.stats.discarded += self.queue.len() as u64;
        self.queue.clear();
        self.bytes = 0;
    }

    /// Performs, in order, the held outputs whose log position is covered by `acked` (all
    /// of them if `None`) while `allowed` says yes. It is asked before each one: a release
    /// takes time (disk writes), and a replica stopped in the middle of one (SIGSTOP, a
    /// paused host) must not go on with the rest once its backup may have gone live.
    pub(super) fn release(&mut self, acked: Option<u64>, allowed: &dyn Fn() -> bool) {
        while let Some(held) = self.queue.front() {
            if acked.is_some_and(|acked| held.position > acked) || !allowed() {
                break;
            }
            let Some(held) = self.queue.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(held.output.bytes());
            let waited = u64::try_from(held.since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.stats.released += 1;
            self.stats.hold_us_total = self.stats.hold_us_total.saturating_add(waited);
            self.stats.hold_us_max = self.stats.hold_us_max.max(waited);
            let bucket = HOLD_BUCKET_BOUNDS_US.partition_point(|&bound| bound < waited);
            self.stats.hold_buckets[bucket] += 1;
            self.emit(held.output);
        }
    }
}
