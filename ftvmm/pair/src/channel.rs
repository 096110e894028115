//! The log channel of an FT pair: the primary streams its log (`ftvm_log` frames) to
//! the backup over one TCP connection, and the backup acknowledges what it received on the
//! same connection.
//!
//! ```text
//!  primary                                           backup
//!  -------                                           ------
//!  vCPU thread: frames -> StreamWriter (memory)
//!    outputs (TAP frames, disk writes) -> hold queue (log position)
//!    flush (HLT wait, output produced, >= 1 ms):
//!    + Heartbeat(h), batch -> socket when nothing is queued, else -> queue;
//!      back-pressure
//!  sender thread: queue -> socket (TCP_NODELAY) ---> receiver thread: socket -> queue,
//!    idle 10 ms: repeats the last Heartbeat            counts whole frames (FrameSplitter)
//!    keeps unacknowledged bytes (Retransmit)
//!  ack thread: acked := ack.bytes  <---------------    ack {frames, bytes, ordinal} after
//!    held outputs with position <= acked -> done       every read that completed a frame
//!  resume thread: takes a reconnecting backup        vCPU thread: queue -> LogReader -> replay
//! ```
//!
//! The vCPU thread of the primary appends encoded frames to a buffer and, at a flush,
//! writes the batch to the socket itself when the sender thread has none queued (one
//! thread wake less for every held output), else queues it for that thread; one lock and
//! a queue counter keep batches in order. The backup's receiver acknowledges
//! on receipt, not after replay, so an acknowledgement means "the backup holds these frames
//! and can replay them without the primary".
//!
//! The output rule: an output the primary's guest produces (a frame for the TAP, a disk
//! write or flush) is queued with the log's length at that moment and is done by the ack
//! thread once an acknowledgement covers that length, in the order the guest produced
//! them. Acknowledgements count stream bytes, keepalives included; positions count the log
//! the recorder wrote, so keepalives are subtracted before comparing. Whether anything is
//! released is the pair's go-live's decision ([`crate::golive`]): on acknowledgements only
//! while paired (or stopping), everything once the claim after a lost backup was won,
//! nothing while the claim is open or after it was lost.
//!
//! An acknowledgement is [`ACK_LEN`] bytes, little-endian:
//! `frames u64 | bytes u64 | backup exit ordinal u64 | crc32 u32` where `frames` and `bytes`
//! count the whole frames received since the start of the stream (the header included) and
//! the crc32 (IEEE) covers the first 24 bytes. [`Ack::LEAVING`] (every field `u64::MAX`)
//! is not an acknowledgement: the backup goes away for good.
//!
//! A connection that fails is re-established within [`RECONNECT_WINDOW`] when it can be,
//! the stream resuming at the byte where it broke (see [`resume`]); either side declares
//! the other lost when that fails or the connection stays silent for [`PEER_TIMEOUT`] (the
//! primary's heartbeats and the backup's acks keep it busy).

use self::resume::{Hello, Retransmit, HELLO_LEN};
use crate::golive::{GoLive, Halt, Request, State, CLAIM_PATIENCE};
use ftvm_log::{Event, Frame, FrameSplitter, HEARTBEAT_KIND};
use ftvm_machine::devices::virtio::tap::Tap;
use ftvm_machine::inputs::ReplayStop;
use ftvm_machine::link::{BackupLink, Output, PairEnd, PrimaryLink};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The sender repeats the last heartbeat after this much silence (a halted or computing
/// guest), so the backup can tell a quiet primary from a dead one.
pub const KEEPALIVE_EVERY: Duration = Duration::from_millis(10);
/// Silence after which the peer is declared lost.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a broken connection may take to be re-established (the backup reconnects
/// and the stream resumes at the byte where it broke) before the peer is declared lost.
/// A backup stops trying early when nothing listens at the primary's address any more
/// (the primary process is gone).
pub const RECONNECT_WINDOW: Duration = Duration::from_millis(500);
/// How long a backup keeps trying to reach its primary.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// How far (in time) the backup's replay may trail the primary's guest before the
/// primary's vCPU is held back for it to catch up: this bounds how much log a backup
/// still has to replay when it goes live, and so the failover time.
pub const MAX_BACKUP_LAG: Duration = Duration::from_millis(100);
/// A backup counts a heartbeat miss when nothing arrived for this long (the primary
/// sends at least a keepalive every [`KEEPALIVE_EVERY`]).
pub const HEARTBEAT_MISS: Duration = Duration::from_millis(30);
/// Length of an acknowledgement on the wire.
pub const ACK_LEN: usize = 28;
/// The kind byte of a Header frame.
const HEADER_KIND: u8 = 1;

/// Setting up the log channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The listening socket cannot be made.
    #[error("cannot listen for the backup on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Accepting the backup's connection failed.
    #[error("cannot accept the backup's log connection")]
    Accept(#[source] std::io::Error),
    /// The primary cannot be reached.
    #[error("cannot connect to the primary at {addr} (tried for {} s)", CONNECT_PATIENCE.as_secs())]
    Connect {
        /// The address.
        addr: String,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// No backup connected in time.
    #[error("no backup connected within {} s", .waited.as_secs())]
    NoBackup {
        /// How long the primary waited.
        waited: Duration,
    },
    /// Socket options or a clone of the socket failed.
    #[error("cannot set up the log channel socket")]
    Socket(#[source] std::io::Error),
    /// A channel thread could not be started.
    #[error("cannot start a log channel thread")]
    Spawn(#[source] std::io::Error),
}

/// The backup's acknowledgement of what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Whole frames received, the header included.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// The exit ordinal the backup's replay has reached.
    pub ordinal: u64,
}

impl Ack {
    /// What a backup sends last when it goes away for good (it stopped, ended, went
    /// live): its primary then declares it lost at once instead of waiting
    /// [`RECONNECT_WINDOW`] for a reconnection that will not come. Never an
    /// acknowledgement of anything.
    pub const LEAVING: Ack = Ack {
        frames: u64::MAX,
        bytes: u64::MAX,
        ordinal: u64::MAX,
    };

    /// The wire form.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut out = [0u8; ACK_LEN];
        out[0..8].copy_from_slice(&self.frames.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.ordinal.to_le_bytes());
        let crc = crc32fast::hash(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the wire form; `None` if the checksum does not match.
    pub fn decode(bytes: &[u8; ACK_LEN]) -> Option<Ack> {
        let word = |at: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(le)
        };
        let crc = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
        (crc32fast::hash(&bytes[..24]) == crc).then(|| Ack {
            frames: word(0),
            bytes: word(8),
            ordinal: word(16),
        })
    }
}

/// Counters and state shared by the vCPU thread and the channel threads.
#[derive(Default)]
struct Shared {
    bytes: AtomicU64,
    frames: AtomicU64,
    heartbeats: AtomicU64,
    acked_bytes: AtomicU64,
    /// `acked_bytes` without the keepalive heartbeats the sender inserted: the position in
    /// the log the primary's recorder wrote, which is what held outputs wait for.
    acked_log_bytes: AtomicU64,
    /// Keepalive heartbeats in the stream: `(stream offset where one ends, keepalive bytes
    /// up to there)`, oldest first; entries the backup has acknowledged are folded into
    /// `keepalive_base`.
    keepalives: Mutex<(VecDeque<(u64, u64)>, u64)>,
    acked_frames: AtomicU64,
    acks: AtomicU64,
    backup_ordinal: AtomicU64,
    /// Primary: microseconds its vCPU was held back for a lagging backup.
    throttled_us: AtomicU64,
    /// Primary: how many times that happened.
    throttles: AtomicU64,
    /// Primary: when its guest reached which exit ordinal (at each hand-over to the
    /// sender), oldest first; entries the backup has passed are dropped.
    progress: Mutex<VecDeque<(u64, Instant)>>,
    lost: Mutex<Option<String>>,
    closing: AtomicBool,
    /// The primary sent the end frame (a backup may hang up once it has it all).
    end_sent: AtomicBool,
    hold: Mutex<OutputHold>,
    /// Primary: the pair's go-live, which decides what held output may do.
    golive: Option<Arc<GoLive>>,
    /// The stream's session number (primary: made at start; backup: learned).
    session: u64,
    /// The current connection, if any.
    link: Mutex<Link>,
    /// Signalled when the connection breaks or is replaced.
    link_changed: Condvar,
    /// `link.generation`, readable without the lock.
    link_generation: AtomicU64,
    /// Primary: stream bytes the backup has not acknowledged, for a resuming backup.
    retransmit: Mutex<Retransmit>,
    /// Connections re-established after a break.
    reconnects: AtomicU64,
    /// Primary: when each batch's last byte (stream offset) was written, oldest first.
    sent_at: Mutex<VecDeque<(u64, Instant)>>,
    /// Primary: smoothed time from writing a batch to its acknowledgement (µs, 1/8 EWMA).
    ack_rtt_us: AtomicU64,
    /// Primary: the shortest such time seen (µs; 0 before the first).
    ack_rtt_min_us: AtomicU64,
    /// Backup: gaps of more than [`HEARTBEAT_MISS`] between two reads of the stream.
    heartbeat_misses: AtomicU64,
    /// Primary: what writing the stream needs, used by the sender thread and, when no
    /// batch waits for that thread, by the vCPU thread itself (a thread hop less on the
    /// way of every held output).
    writing: Mutex<Writing>,
    /// Primary: batches handed to the sender thread and not written yet.
    queued: AtomicU64,
}

/// The primary's stream-writing state: where the frames stand, and the connection by
/// generation (a clone per connection, not per batch).
#[derive(Default)]
struct Writing {
    split: FrameSplitter,
    link: (u64, Option<TcpStream>),
}

/// The connection a channel currently uses.
#[derive(Default)]
struct Link {
    /// Counts installs and breaks, so a thread holding a clone of an older socket can
    /// tell that it is stale.
    generation: u64,
    socket: Option<TcpStream>,
    /// When and why the last connection broke, while no new one is installed, and
    /// whether it was silence (nothing for [`PEER_TIMEOUT`]) rather than an error.
    broken: Option<(Instant, String, bool)>,
}

/// The primary's transmits waiting for the backup (the output rule), in the order the
/// guest sent them.
#[derive(Default)]
struct OutputHold {
    queue: VecDeque<Held>,
    /// The channel's own descriptor of the TAP.
    tap: Option<Tap>,
    /// The pair is broken (or closed): frames go out at once.
    unprotected: bool,
    stats: HoldStats,
}

struct Held {
    /// The log's length when the output was produced.
    position: u64,
    /// A frame for the TAP, or a disk write or flush done (on the ack thread, in order
    /// with the frames) by running it.
    output: Output,
    since: Instant,
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
    fn emit(&mut self, output: Output) {
        match output {
            Output::Frame(frame) => self.send(&frame),
            Output::Disk(action) => action(),
        }
    }

    fn send(&mut self, frame: &[u8]) {
        let sent = self.tap.as_mut().map(|tap| tap.send(frame));
        if !matches!(sent, Some(Ok(true))) {
            self.stats.dropped += 1;
        }
    }

    /// Drops every held output without performing it (the replica halts).
    fn discard(&mut self) {
        self.stats.discarded += self.queue.len() as u64;
        self.queue.clear();
    }

    /// Sends, in order, the held frames whose log position is covered by `acked` (all of
    /// them if `None`).
    fn release(&mut self, acked: Option<u64>) {
        while let Some(held) = self.queue.front() {
            if acked.is_some_and(|acked| held.position > acked) {
                break;
            }
            let Some(held) = self.queue.pop_front() else {
                break;
            };
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

impl Shared {
    /// Declares the peer lost (the first reason sticks); ignored while closing on purpose.
    /// A primary's go-live then decides: held output is released if this replica won the
    /// claim, discarded if it lost, kept while another thread's claim is open.
    fn lose(&self, reason: String) {
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
    fn follow(&self, state: &State) {
        match state {
            State::Live => self.release_all(),
            State::Halted(_) => self.hold().discard(),
            _ => {}
        }
    }

    /// Whether acknowledgements may release held output now.
    fn releases_on_ack(&self) -> bool {
        self.golive
            .as_ref()
            .is_none_or(|golive| golive.state().releases_on_ack())
    }

    fn hold(&self) -> std::sync::MutexGuard<'_, OutputHold> {
        self.hold.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, Writing> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn retransmit(&self) -> std::sync::MutexGuard<'_, Retransmit> {
        self.retransmit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `socket` the connection.
    fn install(&self, socket: TcpStream) {
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
    fn broken(&self, generation: u64, reason: String, silent: bool) {
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
    fn current(&self) -> (u64, Option<TcpStream>) {
        let link = self.link();
        let socket = link
            .socket
            .as_ref()
            .and_then(|socket| socket.try_clone().ok());
        (link.generation, socket)
    }

    /// Waits for a connection to use; `None` once the channel is closing or the peer lost.
    fn wait_for_link(&self) -> Option<(u64, TcpStream)> {
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
    fn shutdown_link(&self) {
        if let Some(socket) = &self.link().socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.link_changed.notify_all();
    }

    /// Releases every held frame and sends later ones at once (the claim was won).
    fn release_all(&self) {
        let mut hold = self.hold();
        hold.unprotected = true;
        hold.release(None);
    }

    fn lost(&self) -> Option<String> {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_lost(&self) -> bool {
        self.lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn count_frames(&self, split: &FrameSplitter) {
        self.bytes.store(split.bytes, Ordering::Release);
        self.frames.store(split.frames, Ordering::Release);
        self.heartbeats.store(split.heartbeats, Ordering::Relaxed);
    }

    /// The sender put a keepalive heartbeat of `len` bytes into the stream at `offset`.
    fn keepalive_sent(&self, offset: u64, len: u64) {
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
    fn log_position(&self, stream_bytes: u64) -> u64 {
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
    fn batch_sent(&self, end: u64) {
        let mut sent_at = self.sent_at.lock().unwrap_or_else(PoisonError::into_inner);
        if sent_at.len() >= 4096 {
            sent_at.pop_front();
        }
        sent_at.push_back((end, Instant::now()));
    }

    /// An acknowledgement covers the stream up to `acked`: the round trip of the latest
    /// batch it covers.
    fn batch_acked(&self, acked: u64) {
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
    fn progress(&self, ordinal: u64) {
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
    fn lag(&self) -> (u64, Duration) {
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

    fn stats(&self) -> ChannelStats {
        let (backup_lag_exits, backup_lag) = self.lag();
        ChannelStats {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            ack_rtt_us: self.ack_rtt_us.load(Ordering::Relaxed),
            ack_rtt_min_us: self.ack_rtt_min_us.load(Ordering::Relaxed),
            heartbeat_misses: self.heartbeat_misses.load(Ordering::Relaxed),
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

/// Reads a channel's counters from any thread, also once the channel is closed.
#[derive(Clone)]
pub struct StatsSource(Source);

#[derive(Clone)]
enum Source {
    Channel(Arc<Shared>),
    Fixed(Box<ChannelStats>),
}

impl StatsSource {
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
}

/// Binds the address the backup will connect to.
///
/// An address still in use is tried again for [`CONNECT_PATIENCE`]: a control plane that
/// just stopped another VM's replica may hand its port on while that process is still
/// ending.
pub fn listen(addr: &str) -> Result<TcpListener, ChannelError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if err.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                tracing::debug!("log channel: {addr} is still in use; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(ChannelError::Listen {
                    addr: addr.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Connects to the primary at `addr`, retrying for [`CONNECT_PATIENCE`] (the primary may
/// not listen yet).
pub fn connect(addr: &str) -> Result<TcpStream, ChannelError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match TcpStream::connect(addr) {
            Ok(socket) => return Ok(socket),
            // A malformed address will not get better.
            Err(err) if err.kind() != ErrorKind::InvalidInput && Instant::now() < deadline => {
                tracing::debug!("log channel: {addr}: {err}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(ChannelError::Connect {
                    addr: addr.to_owned(),
                    source,
                })
            }
        }
    }
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ChannelError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(work)
        .map_err(ChannelError::Spawn)
}

fn configure(socket: &TcpStream) -> Result<(), ChannelError> {
    socket.set_nodelay(true).map_err(ChannelError::Socket)?;
    socket
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(ChannelError::Socket)?;
    socket
        .set_write_timeout(Some(PEER_TIMEOUT))
        .map_err(ChannelError::Socket)
}

/// Whether `err` is a read or write that timed out: the peer stayed silent.
fn is_silence(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn silence_or_error(err: &std::io::Error, silent: &str) -> String {
    match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{silent} for {} ms", PEER_TIMEOUT.as_millis())
        }
        _ => err.to_string(),
    }
}

enum ToSender {
    Batch(Vec<u8>),
    Close,
}

/// The primary's end of the channel: a sender thread, an acknowledgement thread and a
/// thread that takes a backup's reconnection.
pub struct PrimaryChannel {
    tx: mpsc::Sender<ToSender>,
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    reconnector: Option<JoinHandle<()>>,
}

/// Where the primary's recorder writes frames: memory on the vCPU thread; `flush` writes
/// what collected as one batch, on this thread when the sender thread has nothing queued
/// (and is not writing a keepalive), else through that thread's queue, so batches stay in
/// order. It never fails: a lost backup is the channel's business, not the guest's.
pub struct StreamWriter {
    pending: Vec<u8>,
    tx: mpsc::Sender<ToSender>,
    shared: Arc<Shared>,
}

impl Write for StreamWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Nothing queued (checked under the writing lock, which the sender thread holds
        // until a batch is written and uncounted): every earlier batch is out, so this
        // one may go now, from here.
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            if let Ok(mut writing) = self.shared.writing.try_lock() {
                if self.shared.queued.load(Ordering::Acquire) == 0 {
                    write_batch(&self.shared, &mut writing, &self.pending, false);
                    self.pending.clear();
                    return Ok(());
                }
            }
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(4096));
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        // The sender thread is gone only after `close`: nothing more is sent then.
        let _ = self.tx.send(ToSender::Batch(batch));
        Ok(())
    }
}

impl PrimaryChannel {
    /// Waits for the backup on `listener`, then starts the channel's threads. Held
    /// transmits go out on `tap`. Connections that do not start with a new backup's hello
    /// are refused and the wait goes on. The listener stays open for a backup that
    /// reconnects.
    ///
    /// With `patience`, gives up after that long ([`ChannelError::NoBackup`]). `golive`
    /// decides what held output does when the backup is lost.
    pub fn accept(
        listener: &TcpListener,
        tap: Option<Tap>,
        patience: Option<Duration>,
        golive: Arc<GoLive>,
    ) -> Result<(PrimaryChannel, StreamWriter), ChannelError> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("log channel: waiting for the backup on {addr}");
        }
        let started = Instant::now();
        let socket = loop {
            let (socket, peer) = match patience {
                None => listener.accept().map_err(ChannelError::Accept)?,
                Some(patience) => {
                    accept_within(listener, started + patience)?.ok_or(ChannelError::NoBackup {
                        waited: started.elapsed(),
                    })?
                }
            };
            match read_hello(&socket, PEER_TIMEOUT) {
                Ok(Hello::New) => {
                    tracing::info!("log channel: backup connected from {peer}");
                    break socket;
                }
                Ok(Hello::Resume { .. }) => tracing::warn!(
                    "log channel: {peer} resumes a stream this primary never had: refused"
                ),
                Err(err) => tracing::warn!("log channel: {peer}: {err}: refused"),
            }
        };
        let listener = listener.try_clone().map_err(ChannelError::Socket)?;
        Self::start(socket, Some(Resumptions::Listen(listener)), tap, golive)
    }

    /// Starts the channel's threads on a connected socket whose hello was read: answers
    /// with the session number, then streams. Held transmits go out on `tap`; a backup
    /// that reconnects comes from `resumptions` (without, a broken connection loses the
    /// backup at once); `golive` decides what held output does when the backup is lost.
    pub fn start(
        socket: TcpStream,
        resumptions: Option<Resumptions>,
        tap: Option<Tap>,
        golive: Arc<GoLive>,
    ) -> Result<(PrimaryChannel, StreamWriter), ChannelError> {
        configure(&socket)?;
        let session = new_session();
        (&socket)
            .write_all(&session.to_le_bytes())
            .map_err(ChannelError::Socket)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            session,
            golive: Some(golive),
            ..Shared::default()
        });
        shared.hold().tap = tap;
        shared.install(socket);
        let sender = {
            let shared = shared.clone();
            spawn("ftvmm-log-send", move || send_loop(&rx, &shared))?
        };
        let acker = {
            let shared = shared.clone();
            spawn("ftvmm-log-ack", move || ack_loop(&shared))?
        };
        let reconnector = {
            let shared = shared.clone();
            spawn("ftvmm-log-resume", move || {
                reconnect_loop(resumptions, &shared)
            })?
        };
        let writer = StreamWriter {
            pending: Vec::with_capacity(4096),
            tx: tx.clone(),
            shared: shared.clone(),
        };
        Ok((
            PrimaryChannel {
                tx,
                shared,
                sender: Some(sender),
                acker: Some(acker),
                reconnector: Some(reconnector),
            },
            writer,
        ))
    }

    /// The counters.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats()
    }

    /// The primary's guest has reached exit `ordinal` (for the backup lag figures).
    pub fn progress(&self, ordinal: u64) {
        self.shared.progress(ordinal);
    }

    /// Back-pressure: when the backup trails by more than [`MAX_BACKUP_LAG`], waits (the
    /// caller is the vCPU thread between two exits, so the guest stays stopped) until the
    /// backup is within half of it again, or is lost, or [`PEER_TIMEOUT`] passed.
    pub fn hold_back_for_backup(&self) {
        if self.shared.lag().1 <= MAX_BACKUP_LAG || self.shared.is_lost() {
            return;
        }
        let started = Instant::now();
        while !self.shared.is_lost() && started.elapsed() < PEER_TIMEOUT {
            std::thread::sleep(Duration::from_millis(1));
            if self.shared.lag().1 <= MAX_BACKUP_LAG / 2 {
                break;
            }
        }
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared
            .throttled_us
            .fetch_add(waited, Ordering::Relaxed);
        self.shared.throttles.fetch_add(1, Ordering::Relaxed);
    }

    /// The output rule: `output`, produced by the guest when the log was `position` bytes
    /// long (a frame for the TAP, or a disk write or flush run on the ack thread in order
    /// with the frames), is performed once the backup has acknowledged that much of the
    /// log, or as the pair's go-live decides once the backup is lost. The caller never
    /// waits.
    fn hold_output(&self, position: u64, output: Output) {
        let releases = self.shared.releases_on_ack();
        let mut hold = self.shared.hold();
        if hold.unprotected {
            hold.stats.unprotected += 1;
            hold.emit(output);
            return;
        }
        hold.stats.held += 1;
        hold.queue.push_back(Held {
            position,
            output,
            since: Instant::now(),
        });
        // The frames before it may be acknowledged already (nothing logged since).
        if releases {
            hold.release(Some(self.shared.acked_log_bytes.load(Ordering::Acquire)));
        }
    }

    /// Sends what is queued, waits up to `patience` for the backup to acknowledge all of it
    /// (unless it is lost), then closes the connection. Held output is released as the
    /// acknowledgements come; the pair then stops ([`Request::Stop`]): a claim still open
    /// decides the rest (released if won), and whatever is still held after that is
    /// discarded, never performed without a verdict.
    pub fn close(&mut self, patience: Duration) {
        let _ = self.tx.send(ToSender::Close);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let deadline = Instant::now() + patience;
        while !self.shared.is_lost()
            && self.shared.acked_bytes.load(Ordering::Acquire)
                < self.shared.bytes.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(golive) = &self.shared.golive {
            // Waits for a claim in progress (a thread of this channel asks the arbiter).
            let _ = golive.request(Request::Stop, CLAIM_PATIENCE + Duration::from_secs(1));
        }
        self.shared.closing.store(true, Ordering::Release);
        self.shared.shutdown_link();
        for thread in [self.acker.take(), self.reconnector.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
        match self.shared.golive.as_ref().map(|golive| golive.state()) {
            Some(State::Live) | None => self.shared.release_all(),
            Some(_) => self.shared.hold().discard(),
        }
    }

    /// Where the counters can be read from any thread.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource(Source::Channel(self.shared.clone()))
    }
}

impl PrimaryLink for PrimaryChannel {
    fn hold(&self, position: u64, output: Output) {
        self.hold_output(position, output);
    }

    fn progress(&self, ordinal: u64) {
        self.shared.progress(ordinal);
    }

    fn hold_back(&self) {
        self.hold_back_for_backup();
    }

    fn pair_end(&self) -> Option<PairEnd> {
        pair_end(&self.shared.golive.as_ref()?.state())
    }

    fn close(&mut self) {
        PrimaryChannel::close(self, FINAL_ACK_PATIENCE);
    }
}

/// What a go-live `state` means to the vCPU thread.
fn pair_end(state: &State) -> Option<PairEnd> {
    match state {
        State::Live => Some(PairEnd::Alone),
        State::Halted(Halt::LostTo(winner)) => Some(PairEnd::Halt(ReplayStop::LostGoLive {
            winner: winner.clone(),
        })),
        State::Halted(Halt::Unreachable(why)) => {
            Some(PairEnd::Halt(ReplayStop::ArbiterUnreachable(why.clone())))
        }
        State::Paired | State::Claiming { .. } | State::Stopping => None,
    }
}

/// How long a primary waits at the end of the run for the backup to acknowledge the
/// whole log.
const FINAL_ACK_PATIENCE: Duration = PEER_TIMEOUT;

impl Drop for PrimaryChannel {
    fn drop(&mut self) {
        // Without `close` (an error path): stop the threads without waiting for them.
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.tx.send(ToSender::Close);
        self.shared.shutdown_link();
    }
}

fn send_loop(rx: &mpsc::Receiver<ToSender>, shared: &Shared) {
    loop {
        match rx.recv_timeout(KEEPALIVE_EVERY) {
            Ok(ToSender::Batch(batch)) => {
                let mut writing = shared.writing();
                write_batch(shared, &mut writing, &batch, false);
                // Uncounted under the lock: a flush that then sees nothing queued knows
                // this batch is out.
                shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            Ok(ToSender::Close) | Err(RecvTimeoutError::Disconnected) => return,
            // Quiet vCPU thread: repeat the last promise, which stays true (a repeat after
            // anything but a heartbeat or the header could break ordinal order).
            Err(RecvTimeoutError::Timeout) => {
                let mut writing = shared.writing();
                if shared.queued.load(Ordering::Acquire) != 0 {
                    continue;
                }
                let Some((kind, ordinal)) = writing.split.last else {
                    continue;
                };
                if writing.split.ended || (kind != HEARTBEAT_KIND && kind != HEADER_KIND) {
                    continue;
                }
                let mut frame = Vec::with_capacity(32);
                Frame {
                    ordinal,
                    event: Event::Heartbeat,
                }
                .encode(&mut frame);
                write_batch(shared, &mut writing, &frame, true);
            }
        }
    }
}

/// Writes one batch of the stream (`keepalive`: a heartbeat the sender made up, not
/// from the recorder): counts it, keeps it for a resumption, and writes it to the
/// current connection, noting a broken one.
fn write_batch(shared: &Shared, writing: &mut Writing, batch: &[u8], keepalive: bool) {
    if shared.is_lost() {
        // Nobody to send to; batches still go through so the vCPU thread never notices.
        return;
    }
    let Writing { split, link } = writing;
    if keepalive {
        shared.keepalive_sent(split.bytes, batch.len() as u64);
    }
    // Counted before the write: an acknowledgement (or a backup that hangs up after the
    // end frame) may come back before `write_all` returns.
    split.feed(batch);
    shared.count_frames(split);
    if split.ended {
        shared.end_sent.store(true, Ordering::Release);
    }
    // Kept for a backup that reconnects, and written under the same lock, so that a
    // resumption (which holds it) never interleaves with a batch.
    let mut retransmit = shared.retransmit();
    retransmit.sent(batch);
    if link.0 != shared.link_generation.load(Ordering::Acquire) {
        *link = shared.current();
    }
    let (generation, Some(socket)) = link else {
        // Broken: the batch waits in the retransmit buffer.
        return;
    };
    // Noted before the write: the acknowledgement may come back before it returns.
    shared.batch_sent(split.bytes);
    if let Err(err) = socket.write_all(batch) {
        let generation = *generation;
        link.1 = None;
        drop(retransmit);
        shared.broken(
            generation,
            format!(
                "cannot send the log: {}",
                silence_or_error(&err, "the backup took nothing")
            ),
            is_silence(&err),
        );
    }
}

fn ack_loop(shared: &Shared) {
    let mut buffer = [0u8; ACK_LEN];
    // The backup has the whole log, its end included: its going away is normal.
    let done = || {
        shared.end_sent.load(Ordering::Acquire)
            && shared.acked_bytes.load(Ordering::Acquire) >= shared.bytes.load(Ordering::Acquire)
    };
    while let Some((generation, mut socket)) = shared.wait_for_link() {
        loop {
            if let Err(err) = socket.read_exact(&mut buffer) {
                if done() {
                    return;
                }
                shared.broken(
                    generation,
                    match err.kind() {
                        ErrorKind::UnexpectedEof => "the backup closed the log channel".to_owned(),
                        _ => silence_or_error(&err, "no acknowledgement from the backup"),
                    },
                    is_silence(&err),
                );
                break;
            }
            let Some(ack) = Ack::decode(&buffer) else {
                shared.broken(
                    generation,
                    "the backup sent a corrupt acknowledgement".to_owned(),
                    false,
                );
                break;
            };
            if ack == Ack::LEAVING {
                if done() {
                    return;
                }
                // Releases nothing: the loss path releases held outputs after the claim.
                // No reconnection will come (as after silence: lost at once).
                shared.broken(
                    generation,
                    "the backup left the pair (it stopped)".to_owned(),
                    true,
                );
                break;
            }
            let acked = shared
                .acked_bytes
                .fetch_max(ack.bytes, Ordering::AcqRel)
                .max(ack.bytes);
            shared.retransmit().acked(acked);
            shared.batch_acked(acked);
            let acked = shared.log_position(acked);
            shared.acked_log_bytes.fetch_max(acked, Ordering::AcqRel);
            shared.acked_frames.fetch_max(ack.frames, Ordering::AcqRel);
            shared.backup_ordinal.store(ack.ordinal, Ordering::Relaxed);
            shared.acks.fetch_add(1, Ordering::Relaxed);
            if shared.releases_on_ack() {
                shared.hold().release(Some(acked));
            }
        }
    }
}

/// Where a primary's backup reconnects after its connection broke.
pub enum Resumptions {
    /// The listener the pair started on: the channel accepts and reads the hellos.
    Listen(TcpListener),
    /// Connections someone else accepted and read the hello of (the clone listener of a
    /// cloned pair, which also takes new clone requests on the same address).
    Handed(mpsc::Receiver<Resumption>),
}

/// A connection that says it resumes a stream: the socket, its peer, its hello.
pub type Resumption = (TcpStream, std::net::SocketAddr, Hello);

impl Resumptions {
    /// The next connection whose hello was read, before `deadline` (`None`: none came).
    fn next(&self, deadline: Instant) -> Option<(TcpStream, std::net::SocketAddr, Hello)> {
        match self {
            Resumptions::Listen(listener) => loop {
                let (socket, peer) = accept_within(listener, deadline).ok().flatten()?;
                let patience = deadline.saturating_duration_since(Instant::now());
                match read_hello(&socket, patience) {
                    Ok(hello) => return Some((socket, peer, hello)),
                    // Another may still come before the deadline.
                    Err(err) => tracing::warn!("log channel: {peer}: {err}: refused"),
                }
            },
            Resumptions::Handed(handed) => {
                let patience = deadline.saturating_duration_since(Instant::now());
                handed.recv_timeout(patience).ok()
            }
        }
    }
}

/// Takes a reconnecting backup whenever the connection breaks; declares the backup lost
/// when none comes within [`RECONNECT_WINDOW`] (at once without a source of them).
fn reconnect_loop(resumptions: Option<Resumptions>, shared: &Shared) {
    loop {
        let (since, reason, silent) = {
            let mut link = shared.link();
            loop {
                if shared.closing.load(Ordering::Acquire) || shared.is_lost() {
                    return;
                }
                if let Some(broken) = &link.broken {
                    break broken.clone();
                }
                link = shared
                    .link_changed
                    .wait_timeout(link, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        // A peer silent for the whole peer timeout is not waited for any longer: a new
        // connection would not get through where the old one stayed silent.
        let resumed = !silent
            && resumptions.as_ref().is_some_and(|resumptions| {
                accept_resumption(resumptions, shared, since + RECONNECT_WINDOW)
            });
        if !resumed {
            if resumptions.is_some() && !silent {
                shared.lose(format!(
                    "{reason}; the backup did not reconnect within {} ms",
                    RECONNECT_WINDOW.as_millis()
                ));
            } else {
                shared.lose(reason);
            }
            return;
        }
    }
}

/// Takes connections from `resumptions` until `deadline` for the backup of this stream to
/// resume it: checks its hello, sends the session number and the stream from the byte
/// the backup asks for, and installs the connection. Returns whether that happened.
fn accept_resumption(resumptions: &Resumptions, shared: &Shared, deadline: Instant) -> bool {
    loop {
        if Instant::now() >= deadline || shared.closing.load(Ordering::Acquire) {
            return false;
        }
        let Some((socket, peer, hello)) = resumptions.next(deadline) else {
            return false;
        };
        if configure(&socket).is_err() {
            continue;
        }
        let offset = match hello {
            Hello::Resume { session, offset } if session == shared.session => offset,
            hello => {
                tracing::warn!(
                    "log channel: {peer} is not this stream's backup ({hello:?}): refused"
                );
                continue;
            }
        };
        let retransmit = shared.retransmit();
        let Some(resend) = retransmit.from(offset) else {
            tracing::warn!(
                "log channel: the backup resumes at byte {offset}, which this primary no longer has: refused"
            );
            continue;
        };
        let mut writer = &socket;
        if writer
            .write_all(&shared.session.to_le_bytes())
            .and_then(|()| writer.write_all(&resend))
            .is_err()
        {
            continue;
        }
        // Installed while the retransmit buffer is still locked: the sender's next batch
        // goes to this connection, after the resent bytes.
        shared.install(socket);
        drop(retransmit);
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "log channel: the backup reconnected from {peer}; the stream resumed at byte {offset} ({} bytes sent again)",
            resend.len()
        );
        return true;
    }
}

/// Accepts a connection on `listener` before `deadline` (`None` when none came).
fn accept_within(
    listener: &TcpListener,
    deadline: Instant,
) -> Result<Option<(TcpStream, std::net::SocketAddr)>, ChannelError> {
    listener
        .set_nonblocking(true)
        .map_err(ChannelError::Accept)?;
    let accepted = loop {
        match listener.accept() {
            Ok(accepted) => break Ok(Some(accepted)),
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => break Err(ChannelError::Accept(err)),
        }
    };
    listener
        .set_nonblocking(false)
        .map_err(ChannelError::Accept)?;
    let accepted = accepted?;
    if let Some((socket, _)) = &accepted {
        socket
            .set_nonblocking(false)
            .map_err(ChannelError::Socket)?;
    }
    Ok(accepted)
}

/// Reads a connection's hello, waiting at most `patience`.
pub fn read_hello(socket: &TcpStream, patience: Duration) -> Result<Hello, String> {
    let mut bytes = [0u8; HELLO_LEN];
    socket
        .set_read_timeout(Some(patience.max(Duration::from_millis(1))))
        .map_err(|err| err.to_string())?;
    let mut reader = socket;
    reader
        .read_exact(&mut bytes)
        .map_err(|err| format!("no hello: {err}"))?;
    socket
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(|err| err.to_string())?;
    Hello::decode(&bytes).map_err(str::to_owned)
}

/// A session number no other stream is likely to have: the OS-seeded hash keys std
/// makes for every `RandomState`.
fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}

/// A backup's link to its primary: the log channel, and the pair's go-live, which decides
/// whether this replica goes live when the log ends without an end frame.
pub struct Follower {
    channel: BackupChannel,
    golive: Arc<GoLive>,
}

impl Follower {
    /// Follows through `channel`; `golive` decides at the end of the log.
    pub fn new(channel: BackupChannel, golive: Arc<GoLive>) -> Follower {
        Follower { channel, golive }
    }

    /// The channel's counters.
    pub fn stats(&self) -> ChannelStats {
        self.channel.stats()
    }
}

impl BackupLink for Follower {
    fn replayed_to(&self, ordinal: u64) {
        self.channel.set_ordinal(ordinal);
    }

    fn log_ended(&mut self, last_ordinal: u64) -> Result<(), ReplayStop> {
        // A stop that ended the stream (the reader gives up waiting once one is pending)
        // reaches the go-live first: a stopping backup never claims.
        if ftvm_machine::signals::stop_requested().is_some() {
            let _ = self.golive.request(Request::Stop, Duration::ZERO);
        }
        let why = self
            .channel
            .stats()
            .lost
            .unwrap_or_else(|| "the log stream ended".into());
        match self
            .golive
            .peer_lost(&format!("primary lost ({why})"), false)
        {
            State::Live => Ok(()),
            state => Err(pair_end(&state)
                .and_then(|end| match end {
                    PairEnd::Halt(stop) => Some(stop),
                    PairEnd::Alone => None,
                })
                .unwrap_or(ReplayStop::LogEnded { last_ordinal })),
        }
    }

    fn close(&mut self) {
        self.channel.close();
    }
}

/// The backup's end of the channel: a receiver thread that queues what arrives and
/// acknowledges it.
pub struct BackupChannel {
    shared: Arc<Shared>,
    receiver: Option<JoinHandle<()>>,
}

/// What the backup's replay reads the log from: the receiver thread's queue. It blocks
/// until data arrives and ends (`Ok(0)`) when the stream does or a stop signal came.
pub struct StreamReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.chunk.len() {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                // A SIGTERM must not wait for the primary's next frame.
                Err(RecvTimeoutError::Timeout)
                    if ftvm_machine::signals::stop_requested().is_some() =>
                {
                    return Ok(0)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let len = buf.len().min(self.chunk.len() - self.pos);
        buf[..len].copy_from_slice(&self.chunk[self.pos..self.pos + len]);
        self.pos += len;
        Ok(len)
    }
}

impl BackupChannel {
    /// Connects to the primary at `addr` (see [`connect`]), says hello as a new backup
    /// and starts the receiver, which reconnects to `addr` if the connection breaks.
    ///
    /// A connection refused after the handshake started (another stream's primary still
    /// ending on that port, or a primary not ready yet) is tried again, within
    /// [`CONNECT_PATIENCE`] in all.
    pub fn connect(addr: &str) -> Result<(BackupChannel, StreamReader), ChannelError> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        loop {
            let socket = connect(addr)?;
            configure(&socket)?;
            match handshake(&socket, Hello::New) {
                Ok(session) => return Self::start(socket, session, Some(addr.to_owned())),
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!("log channel: {addr} refused the handshake ({err}); retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(ChannelError::Connect {
                        addr: addr.to_owned(),
                        source,
                    })
                }
            }
        }
    }

    /// Starts the receiver thread on a connected socket past the handshake (`session`
    /// answered). Without `addr` a broken connection loses the primary at once.
    pub fn start(
        socket: TcpStream,
        session: u64,
        addr: Option<String>,
    ) -> Result<(BackupChannel, StreamReader), ChannelError> {
        configure(&socket)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            session,
            ..Shared::default()
        });
        shared.install(socket.try_clone().map_err(ChannelError::Socket)?);
        let receiver = {
            let shared = shared.clone();
            spawn("ftvmm-log-recv", move || {
                receive_loop(socket, addr.as_deref(), &tx, &shared);
            })?
        };
        Ok((
            BackupChannel {
                shared,
                receiver: Some(receiver),
            },
            StreamReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            },
        ))
    }

    /// The exit ordinal the replay has reached, reported with every acknowledgement.
    pub fn set_ordinal(&self, ordinal: u64) {
        self.shared.backup_ordinal.store(ordinal, Ordering::Relaxed);
    }

    /// The counters.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats()
    }

    /// Where the counters can be read from any thread.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource(Source::Channel(self.shared.clone()))
    }

    /// Tells the primary this backup goes away for good ([`Ack::LEAVING`]), best effort.
    fn leave(&self) {
        if let Some(socket) = &self.shared.link().socket {
            let mut writer = socket;
            let _ = writer.write_all(&Ack::LEAVING.encode());
        }
    }

    /// Closes the connection and stops the receiver.
    pub fn close(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.leave();
        self.shared.shutdown_link();
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

impl Drop for BackupChannel {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.leave();
        self.shared.shutdown_link();
    }
}

/// Says `hello` on a fresh connection and reads the primary's answer, the session number.
fn handshake(socket: &TcpStream, hello: Hello) -> std::io::Result<u64> {
    let mut stream = socket;
    stream.write_all(&hello.encode())?;
    read_session(socket)
}

/// Reads the session number a primary sends before its stream ([`PrimaryChannel::start`]),
/// for a backup whose connection began some other way (a clone).
pub fn read_session(socket: &TcpStream) -> std::io::Result<u64> {
    let mut stream = socket;
    let mut session = [0u8; 8];
    stream.read_exact(&mut session)?;
    Ok(u64::from_le_bytes(session))
}

/// Reconnects to the primary at `addr` and resumes the stream of `session` at byte
/// `offset`, trying for [`RECONNECT_WINDOW`]; gives up at once when nothing listens there.
fn reconnect_and_resume(addr: &str, session: u64, offset: u64) -> Result<TcpStream, String> {
    use std::net::ToSocketAddrs;
    let deadline = Instant::now() + RECONNECT_WINDOW;
    let target = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("cannot resolve {addr}"))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no reconnection within {} ms",
                RECONNECT_WINDOW.as_millis()
            ));
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(socket) => {
                let answered = configure(&socket)
                    .map_err(|err| std::io::Error::other(err.to_string()))
                    .and_then(|()| socket.set_read_timeout(Some(left)))
                    .and_then(|()| handshake(&socket, Hello::Resume { session, offset }));
                match answered {
                    Ok(answer) if answer == session => {
                        let _ = socket.set_read_timeout(Some(PEER_TIMEOUT));
                        return Ok(socket);
                    }
                    Ok(_) => return Err("the primary answered for another stream".into()),
                    // Refused (closed) or not answered yet: the primary may not have
                    // noticed the break; try again.
                    Err(err) => tracing::debug!("log channel: resuming at {addr}: {err}"),
                }
            }
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                return Err(format!("nothing listens at {addr} any more"));
            }
            Err(err) => tracing::debug!("log channel: reconnecting to {addr}: {err}"),
        }
        // Short: a dying primary's listener refuses within moments, and every millisecond
        // here delays the go-live.
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn receive_loop(
    mut socket: TcpStream,
    addr: Option<&str>,
    tx: &mpsc::Sender<Vec<u8>>,
    shared: &Shared,
) {
    let mut split = FrameSplitter::default();
    let mut buffer = vec![0u8; 64 * 1024];
    // Stream bytes received, whole frames or not (the log reader has them all): where a
    // resumed stream must continue.
    let mut received = 0u64;
    let mut last_read = Instant::now();
    loop {
        let (broken, silent) = match socket.read(&mut buffer) {
            Ok(0) => (
                "the primary closed the log channel without an end frame".to_owned(),
                false,
            ),
            Ok(len) => {
                if last_read.elapsed() > HEARTBEAT_MISS {
                    shared.heartbeat_misses.fetch_add(1, Ordering::Relaxed);
                }
                last_read = Instant::now();
                received += len as u64;
                let before = split.frames;
                split.feed(&buffer[..len]);
                shared.count_frames(&split);
                if tx.send(buffer[..len].to_vec()).is_err() {
                    // The replay is over.
                    return;
                }
                if split.frames > before {
                    let ack = Ack {
                        frames: split.frames,
                        bytes: split.bytes,
                        ordinal: shared.backup_ordinal.load(Ordering::Relaxed),
                    };
                    // A primary that cannot take acks is noticed by the next read.
                    let _ = socket.write_all(&ack.encode());
                }
                continue;
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => (
                silence_or_error(&err, "nothing from the primary"),
                is_silence(&err),
            ),
        };
        if split.ended || shared.closing.load(Ordering::Acquire) {
            return;
        }
        let generation = shared.link_generation.load(Ordering::Acquire);
        // Shut down, so that the primary notices the break too and takes the resumption.
        shared.broken(generation, broken.clone(), silent);
        let resumed = match addr {
            // A primary silent for the whole peer timeout is not waited for any longer.
            Some(_) if silent => Err("not reconnecting to a silent primary".to_owned()),
            Some(addr) => reconnect_and_resume(addr, shared.session, received),
            None => Err("no address to reconnect to".to_owned()),
        };
        match resumed.and_then(|socket| {
            socket
                .try_clone()
                .map(|clone| (socket, clone))
                .map_err(|err| err.to_string())
        }) {
            Ok((resumed, clone)) => {
                shared.install(clone);
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "log channel: reconnected to the primary; resumed at byte {received}"
                );
                socket = resumed;
            }
            Err(why) => {
                shared.lose(format!("{broken}; {why}"));
                return;
            }
        }
    }
}

pub mod resume;

#[cfg(test)]
mod tests;
