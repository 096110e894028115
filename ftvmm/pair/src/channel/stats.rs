//! A channel's counters, readable from any thread.

use super::*;

/// Reads a channel's counters from any thread, also once the channel is closed.
#[derive(Clone)]
pub struct StatsSource(Source);

#[derive(Clone)]
pub(super) enum Source {
    Channel(Arc<Shared>),
    Fixed(Box<ChannelStats>),
}

impl StatsSource {
    /// The counters of the channel whose state is `shared`.
    pub(super) fn of(shared: Arc<Shared>) -> StatsSource {
        StatsSource(Source::Channel(shared))
    }

    /// A source that always reads `stats` (a test's figures).
    pub fn fixed(stats: ChannelStats) -> StatsSource {
        StatsSource(Source::Fixed(Box::new(stats)))
    }

    /// The counters now.
    pub fn stats(&self) -> ChannelStats {
        match &self.0 {
            Source::Channel(shared) => shared.stats(),
            Source::Fixed(stats) => (**stats).clone(),
        }
    }
}

/// A snapshot of a channel's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Primary: log bytes written to the socket. Backup: bytes of whole frames received.
    pub bytes: u64,
    /// Frames sent (primary) or received (backup), the header and heartbeats included.
    pub frames: u64,
    /// Heartbeat frames among them.
    pub heartbeats: u64,
    /// Primary: bytes the backup acknowledged.
    pub acked_bytes: u64,
    /// Primary: frames the backup acknowledged.
    pub acked_frames: u64,
    /// Acknowledgements received (primary).
    pub acks: u64,
    /// The backup's exit ordinal (the primary knows it as of the last acknowledgement).
    pub backup_ordinal: u64,
    /// Primary: exits between the primary's guest and the backup's replay.
    pub backup_lag_exits: u64,
    /// Primary: how long ago the primary's guest was where the backup's replay is now,
    /// in microseconds (0 when the backup has caught up).
    pub backup_lag_us: u64,
    /// Why the peer was declared lost, if it was.
    pub lost: Option<String>,
    /// The output rule's counters (primary).
    pub outputs: HoldStats,
    /// Primary: microseconds its vCPU was held back because the backup lagged more than
    /// [`MAX_BACKUP_LAG`].
    pub throttled_us: u64,
    /// Primary: how many times it was held back.
    pub throttles: u64,
    /// Connections re-established after a break (the stream resumed where it broke).
    pub reconnects: u64,
    /// Primary: smoothed round trip of the log channel, from writing a batch to the
    /// acknowledgement that covers it, in microseconds.
    pub ack_rtt_us: u64,
    /// Primary: the shortest such round trip, in microseconds.
    pub ack_rtt_min_us: u64,
    /// Backup: times the stream was silent for more than [`HEARTBEAT_MISS`].
    pub heartbeat_misses: u64,
    /// The longest the peer was silent so far, in microseconds: a backup's longest gap
    /// between two reads of the stream, a primary's between two acknowledgements. The
    /// peer is declared lost when a gap reaches [`PEER_TIMEOUT`].
    pub peer_silence_max_us: u64,
    /// Primary: acknowledgements read too late to release anything ([`super::ACK_LEASE`]).
    pub stale_acks: u64,
}
