//! The state a channel's threads and the vCPU thread share: counters, the connection
//! (with its breaks and replacements), what was sent for a resumption, and the loss of the
//! peer, on which the pair's go-live decides.

use super::*;

/// Counters and state shared by the vCPU thread and the channel threads.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) bytes: AtomicU64,
    pub(super) frames: AtomicU64,
    pub(super) heartbeats: AtomicU64,
    pub(super) acked_bytes: AtomicU64,
    /// `acked_bytes` without the keepalive heartbeats the sender inserted: the position in
    /// the log the primary's recorder wrote, which is what held outputs wait for.
    pub(super) acked_log_bytes: AtomicU64,
    /// Keepalive heartbeats in the stream: `(stream offset where one ends, keepalive bytes
    /// up to there)`, oldest first; entries the backup has acknowledged are folded into
    /// `keepalive_base`.
    pub(super) keepalives: Mutex<(VecDeque<(u64, u64)>, u64)>,
    pub(super) acked_frames: AtomicU64,
    pub(super) acks: AtomicU64,
    pub(super) backup_ordinal: AtomicU64,
    /// Primary: microseconds its vCPU was held back for a lagging backup.
    pub(super) throttled_us: AtomicU64,
    /// Primary: how many times that happened.
    pub(super) throttles: AtomicU64,
    /// Primary: when its guest reached which exit ordinal (at each hand-over to the
    /// sender), oldest first; entries the backup has passed are dropped.
    pub(super) progress: Mutex<VecDeque<(u64, Instant)>>,
    pub(super) lost: Mutex<Option<String>>,
    pub(super) closing: AtomicBool,
    /// The primary sent the end frame (a backup may hang up once it has it all).
    pub(super) end_sent: AtomicBool,
    pub(super) hold: Mutex<OutputHold>,
    /// Primary: the pair's go-live, which decides what held output may do.
    pub(super) golive: Option<Arc<GoLive>>,
    /// The stream's session number (primary: made at start; backup: learned).
    pub(super) session: u64,
    /// The current connection, if any.
    pub(super) link: Mutex<Link>,
    /// Signalled when the connection breaks or is replaced.
    pub(super) link_changed: Condvar,
    /// `link.generation`, readable without the lock.
    pub(super) link_generation: AtomicU64,
    /// Primary: stream bytes the backup has not acknowledged, for a resuming backup.
    pub(super) retransmit: Mutex<Retransmit>,
    /// Connections re-established after a break.
    pub(super) reconnects: AtomicU64,
    /// Primary: when each batch's last byte (stream offset) was written, oldest first.
    pub(super) sent_at: Mutex<VecDeque<(u64, Instant)>>,
    /// Primary: until when the acknowledgements received so far may release output
    /// (the newest batch they cover, written at `t`, gives `t + ACK_LEASE`).
    pub(super) ack_fresh_until: Mutex<Option<Instant>>,
    /// Primary: acknowledgements that arrived too late to release anything.
    pub(super) stale_acks: AtomicU64,
    /// Primary: smoothed time from writing a batch to its acknowledgement (µs, 1/8 EWMA).
    pub(super) ack_rtt_us: AtomicU64,
    /// Primary: the shortest such time seen (µs; 0 before the first).
    pub(super) ack_rtt_min_us: AtomicU64,
    /// Backup: gaps of more than [`HEARTBEAT_MISS`] between two reads of the stream.
    pub(super) heartbeat_misses: AtomicU64,
    /// The longest gap between two reads from the peer (µs), see
    /// [`ChannelStats::peer_silence_max_us`].
    pub(super) peer_silence_max_us: AtomicU64,
    /// Primary: what writing the stream needs, used by the sender thread and, when no
    /// batch waits for that thread, by the vCPU thread itself (a thread hop less on the
    /// way of every held output).
    pub(super) writing: Mutex<Writing>,
    /// Primary: batches handed to the sender thread and not written yet.
    pub(super) queued: AtomicU64,
}

/// The primary's stream-writing state: where the frames stand, and the connection by
/// generation (a clone per connection, not per batch).
#[derive(Default)]
pub(super) struct Writing {
    pub(super) split: FrameSplitter,
    pub(super) link: (u64, Option<Socket>),
}

/// The connection a channel currently uses.
#[derive(Default)]
pub(super) struct Link {
    /// Counts installs and breaks, so a thread holding a clone of an older socket can
    /// tell that it is stale.
    pub(super) generation: u64,
    pub(super) socket: Option<Socket>,
    /// When and why the last connection broke, while no new one is installed, and
    /// whether it was silence (nothing for [`PEER_TIMEOUT`]) rather than an error.
    pub(super) broken: Option<(Instant, String, bool)>,
}

impl Shared {
    /// Notes that the peer was heard from, `silent` after it was last heard from (for
    /// [`ChannelStats::peer_silence_max_us`]).
    pub(super) fn heard_after(&self, silent: Duration) {
        let micros = u64::try_from(silent.as_micros()).unwrap_or(u64::MAX);
        self.peer_silence_max_us
            .fetch_max(micros, Ordering::Relaxed);
    }

    /// Declares the peer lost (the first reason sticks); ignored while closing on purpose.
    /// A primary's go-live then decides: held output is released if this replica won the
    /// claim, discarded if it lost, kept while another thread's claim is open.
    pub(super) fn lose(&self, reason: String) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
        if lost.is_none() {
            tracing::warn!("log channel: peer lost: {reason}");
            *lost = Some(reason.clone());
        }
        drop(lost);
        if let Some(golive) = &self.golive {
            let state = golive.peer_lost("backup lost", true);
            self.follow(&state);
        }
    }

    /// Does to held output what the go-live `state` says: all of it out once won, none
    /// of it ever after a loss.
    pub(super) fn follow(&self, state: &State) {
        match state {
            State::Live => self.release_all(),
            State::Halted(_) => self.hold().discard(),
            _ => {}
        }
    }

    /// Whether acknowledgements may release held output now: the go-live allows it
    /// (paired, or a primary stopping), and the newest acknowledged batch was written
    /// within [`ACK_LEASE`] (a primary that was frozen releases nothing on the stale
    /// acknowledgements it finds when it wakes up).
    pub(super) fn releases_on_ack(&self) -> bool {
        let allowed = self
            .golive
            .as_ref()
            .is_none_or(|golive| golive.state().releases_on_ack());
        allowed && self.ack_is_fresh()
    }

    /// Whether the acknowledgements received so far are within their lease.
    pub(super) fn ack_is_fresh(&self) -> bool {
        self.ack_fresh_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    pub(super) fn hold(&self) -> std::sync::MutexGuard<'_, OutputHold> {
        self.hold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn writing(&self) -> std::sync::MutexGuard<'_, Writing> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn retransmit(&self) -> std::sync::MutexGuard<'_, Retransmit> {
        self.retransmit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `socket` the connection.
    pub(super) fn install(&self, socket: Socket) {
        let mut link = self.link();
        link.generation += 1;
        link.socket = Some(socket);
        link.broken = None;
        self.link_generation
            .store(link.generation, Ordering::Release);
        self.link_changed.notify_all();
    }

    /// The connection of `generation` failed for `reason` (`silent`: nothing came for
    /// [`PEER_TIMEOUT`]): it is shut down and, unless a newer one replaced it already, the
    /// channel waits for a reconnection (see [`RECONNECT_WINDOW`]).
    pub(super) fn broken(&self, generation: u64, reason: String, silent: bool) {
        let mut link = self.link();
        if link.generation != generation || link.socket.is_none() {
            return;
        }
        if let Some(socket) = link.socket.take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if !self.closing.load(Ordering::Acquire) {
            tracing::warn!("log channel: connection broken: {reason}");
        }
        link.generation += 1;
        link.broken = Some((Instant::now(), reason, silent));
        self.link_generation
            .store(link.generation, Ordering::Release);
        self.link_changed.notify_all();
    }

    /// The current connection's generation and a clone of its socket (`None` while
    /// broken).
    pub(super) fn current(&self) -> (u64, Option<Socket>) {
        let link = self.link();
        let socket = link
            .socket
            .as_ref()
            .and_then(|socket| socket.try_clone().ok());
        (link.generation, socket)
    }

    /// Waits for a connection to use; `None` once the channel is closing or the peer lost.
    pub(super) fn wait_for_link(&self) -> Option<(u64, Socket)> {
        let mut link = self.link();
        loop {
            if self.closing.load(Ordering::Acquire) || self.is_lost() {
                return None;
            }
            if let Some(socket) = link.socket.as_ref().and_then(|s| s.try_clone().ok()) {
                return Some((link.generation, socket));
            }
            link = self
                .link_changed
                .wait_timeout(link, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Shuts the current connection down (closing the channel).
    pub(super) fn shutdown_link(&self) {
        if let Some(socket) = &self.link().socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.link_changed.notify_all();
    }

    /// Releases every held frame and sends later ones at once (the claim was won).
    pub(super) fn release_all(&self) {
        let mut hold = self.hold();
        hold.unprotected = true;
        hold.release(None, &|| true);
    }

    pub(super) fn lost(&self) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn is_lost(&self) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    pub(super) fn count_frames(&self, split: &FrameSplitter) {
        self.bytes.store(split.bytes, Ordering::Release);
        self.frames.store(split.frames, Ordering::Release);
        self.heartbeats.store(split.heartbeats, Ordering::Relaxed);
    }

    /// The sender put a keepalive heartbeat of `len` bytes into the stream at `offset`.
    pub(super) fn keepalive_sent(&self, offset: u64, len: u64) {
        let mut keepalives = self
            .keepalives
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total = keepalives
            .0
            .back()
            .map_or(keepalives.1, |&(_, total)| total)
            + len;
        keepalives.0.push_back((offset + len, total));
    }

    /// The log position (bytes the recorder wrote) of stream offset `stream_bytes`, an
    /// acknowledged frame boundary: the keepalives before it do not count.
    pub(super) fn log_position(&self, stream_bytes: u64) -> u64 {
        let mut keepalives = self
            .keepalives
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while let Some(&(end, total)) = keepalives.0.front() {
            if end > stream_bytes {
                break;
            }
            keepalives.1 = total;
            keepalives.0.pop_front();
        }
        stream_bytes - keepalives.1
    }

    /// The sender wrote the stream up to offset `end` now.
    pub(super) fn batch_sent(&self, end: u64) {
        let mut sent_at = self.sent_at.lock().unwrap_or_else(PoisonError::into_inner);
        if sent_at.len() >= 4096 {
            sent_at.pop_front();
        }
        sent_at.push_back((end, Instant::now()));
    }

    /// An acknowledgement covers the stream up to `acked`: the round trip of the latest
    /// batch it covers.
    pub(super) fn batch_acked(&self, acked: u64) {
        let mut sent_at = self.sent_at.lock().unwrap_or_else(PoisonError::into_inner);
        let mut covered = None;
        while let Some(&(end, at)) = sent_at.front() {
            if end > acked {
                break;
            }
            covered = Some(at);
            sent_at.pop_front();
        }
        drop(sent_at);
        let Some(at) = covered else {
            return;
        };
        let until = at + ACK_LEASE;
        let mut fresh = self
            .ack_fresh_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if fresh.is_none_or(|fresh| fresh < until) {
            *fresh = Some(until);
        }
        drop(fresh);
        let rtt = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
        let smoothed = self.ack_rtt_us.load(Ordering::Relaxed);
        let smoothed = if smoothed == 0 {
            rtt
        } else {
            smoothed - smoothed / 8 + rtt / 8
        };
        self.ack_rtt_us.store(smoothed, Ordering::Relaxed);
        let min = self.ack_rtt_min_us.load(Ordering::Relaxed);
        if min == 0 || rtt < min {
            self.ack_rtt_min_us.store(rtt, Ordering::Relaxed);
        }
    }

    /// The primary's guest reached `ordinal` now.
    pub(super) fn progress(&self, ordinal: u64) {
        let mut progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        if progress.back().is_none_or(|&(last, _)| last < ordinal) {
            progress.push_back((ordinal, Instant::now()));
        }
        // Bounded even when no acknowledgement comes.
        if progress.len() > 100_000 {
            progress.pop_front();
        }
    }

    /// How far the backup trails the primary: exits, and how long ago the primary was
    /// where the backup is now (zero when it is caught up).
    pub(super) fn lag(&self) -> (u64, Duration) {
        let backup = self.backup_ordinal.load(Ordering::Relaxed);
        let mut progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
        while progress.len() > 1
            && progress
                .get(1)
                .is_some_and(|&(ordinal, _)| ordinal <= backup)
        {
            progress.pop_front();
        }
        let primary = progress.back().map_or(0, |&(ordinal, _)| ordinal);
        let behind_since = progress
            .iter()
            .find(|&&(ordinal, _)| ordinal > backup)
            .map(|&(_, since)| since);
        (
            primary.saturating_sub(backup),
            behind_since.map_or(Duration::ZERO, |since| since.elapsed()),
        )
    }

    pub(super) fn stats(&self) -> ChannelStats {
        let (backup_lag_exits, backup_lag) = self.lag();
        ChannelStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            ack_rtt_us: self.ack_rtt_us.load(Ordering::Relaxed),
            ack_rtt_min_us: self.ack_rtt_min_us.load(Ordering::Relaxed),
            heartbeat_misses: self.heartbeat_misses.load(Ordering::Relaxed),
            peer_silence_max_us: self.peer_silence_max_us.load(Ordering::Relaxed),
            stale_acks: self.stale_acks.load(Ordering::Relaxed),
            throttled_us: self.throttled_us.load(Ordering::Relaxed),
            throttles: self.throttles.load(Ordering::Relaxed),
            backup_lag_exits,
            backup_lag_us: u64::try_from(backup_lag.as_micros()).unwrap_or(u64::MAX),
            bytes: self.bytes.load(Ordering::Acquire),
            frames: self.frames.load(Ordering::Acquire),
            heartbeats: self.heartbeats.load(Ordering::Relaxed),
            acked_bytes: self.acked_bytes.load(Ordering::Acquire),
            acked_frames: self.acked_frames.load(Ordering::Acquire),
            acks: self.acks.load(Ordering::Relaxed),
            backup_ordinal: self.backup_ordinal.load(Ordering::Relaxed),
            lost: self.lost(),
            outputs: self.hold().stats,
        }
    }
}
