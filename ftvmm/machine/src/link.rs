//! What the machine needs from the other replica of a pair, as traits the pair's log
//! channel implements: the machine records, replays and holds outputs through them and
//! never knows about sockets, arbiters or the go-live decision.
//!
//! - A primary's recording is streamed: [`PrimaryLink`] takes each output the guest
//!   produces with the log position it depends on (the output rule), hears how far the
//!   guest got, may hold the vCPU back, and says when the pair is over.
//! - A backup replays a stream: [`BackupLink`] hears how far the replay got and decides,
//!   when the stream ends without an end frame, whether this replica goes live.

use crate::outcome::ReplayStop;
use std::time::Duration;

/// A primary's vCPU thread hands the log to its link at least this often while the guest
/// runs (and before it waits in HLT, and at the end of an exit that produced an output).
pub const FLUSH_EVERY: Duration = Duration::from_millis(1);

/// A held disk write or flush: performs the request and reports its completion to the
/// device.
pub type DiskAction = Box<dyn FnOnce() + Send>;

/// One output of the guest that a pair's primary holds until its backup has the log up
/// to it.
pub enum Output {
    /// A frame for the TAP.
    Frame(Vec<u8>),
    /// A disk write or flush, and the bytes it holds (the data of a write).
    Disk(u64, DiskAction),
}

impl Output {
    /// The bytes this output keeps in memory while it is held.
    pub fn bytes(&self) -> u64 {
        match self {
            Output::Frame(frame) => frame.len() as u64,
            Output::Disk(bytes, _) => *bytes,
        }
    }
}

/// What became of the pair, as the vCPU thread sees it between exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairEnd {
    /// The backup is gone and this replica won the pair: it runs on alone, unlogged.
    Alone,
    /// This replica must stop without output.
    Halt(ReplayStop),
}

/// The primary's side of a pair, as the machine uses it.
pub trait PrimaryLink: Send {
    /// The output rule: `output`, produced when the log was `position` bytes long, is
    /// performed once the backup has acknowledged that much of the log (or when the pair
    /// ended in this replica's favour). Never blocks the caller.
    fn hold(&self, position: u64, output: Output);
    /// The log was handed over up to exit `ordinal`.
    fn progress(&self, ordinal: u64);
    /// Back-pressure, between exits: waits while the backup trails too far, or while the
    /// outputs held take too much memory.
    fn hold_back(&self);
    /// Whether the pair is over for this replica (`None`: go on as the primary).
    fn pair_end(&self) -> Option<PairEnd>;
    /// The run ended: sends the rest of the log and waits (bounded) for the backup.
    fn close(&mut self);
}

/// The backup's side of a pair, as the machine uses it.
pub trait BackupLink: Send {
    /// The replay reached exit `ordinal` (reported to the primary with acknowledgements).
    fn replayed_to(&self, ordinal: u64);
    /// The log ended without an end frame at `last_ordinal`: the primary is gone. `Ok`:
    /// this replica won the pair and goes live here; `Err`: why it stops instead.
    fn log_ended(&mut self, last_ordinal: u64) -> Result<(), ReplayStop>;
    /// The run ended: disconnects.
    fn close(&mut self);
}
