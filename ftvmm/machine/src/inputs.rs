//! Where nondeterministic inputs come from: the host (live), the host with every value
//! logged (record), or a log (replay).
//!
//! Every device and the vCPU loop obtain nondeterministic values only through [`Inputs`],
//! each stamped with the current exit ordinal. In replay the same calls, made at the same
//! ordinals by the same deterministic code, take the logged values instead; any mismatch
//! is a [`Divergence`], reported with the ordinal and what was expected.

use crate::link::{BackupLink, DiskAction, Output, PairEnd, PrimaryLink};
use crate::outcome::{Divergence, ReplayStop};
use ftvm_log::{EndState, Event, Frame, LogError, LogHeader, LogReader, LogWriter, END_STOPPED};
use std::io::{Read, Write};
use std::time::Instant;

/// A log stream from any source: a file, or the primary's log channel.
pub type LogSource = LogReader<Box<dyn Read + Send>>;

/// Counters of a replay.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    /// Events applied.
    pub events: u64,
    /// Register and memory digests that matched.
    pub digests_matched: u64,
    /// Heartbeats read (a live stream only).
    pub heartbeats: u64,
}

mod record;
mod replay;

pub use record::Recorder;
pub use replay::Replayer;
use replay::{describe, logged_stop, Peek};

/// What became of a disk write or flush ([`Inputs::disk_output`]).
pub enum DiskOutput<R> {
    /// Completed at this exit with this status.
    Done(u8),
    /// Held by the log channel (the primary of a pair); completes later.
    Held,
    /// Replaying a primary that held it: the log completes it later. The request is given
    /// back to be re-issued if this backup goes live first.
    Pending(R),
}

/// The three ways inputs are sourced.
pub enum Mode {
    /// From the host, not logged.
    Live,
    /// From the host, every value logged (to a file or to a backup).
    Record(Box<Recorder>),
    /// From a log (a file or a live primary); outputs are dropped.
    Replay(Box<Replayer>),
}

/// The one gate for nondeterministic inputs.
pub struct Inputs {
    mode: Mode,
    ordinal: u64,
    stop: Option<ReplayStop>,
    record_error: Option<std::io::Error>,
    /// The exit ordinal at which this backup went live.
    went_live_at: Option<u64>,
    /// The replay's counters as they were when this backup went live.
    replayed: ReplayStats,
    /// The last value each clock (monotonic, wall) gave the guest.
    clock_floor: [u64; 2],
    /// What is added to each host clock so the guest's clocks never go backwards.
    clock_shift: [u64; 2],
}

/// The bookkeeping of [`Inputs`] a snapshot carries, so that a restored machine takes
/// and logs inputs from the snapshot's exit ordinal on as the original would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// The exit ordinal of the snapshot.
    pub ordinal: u64,
    /// The last value each clock (monotonic, wall) gave the guest.
    pub clock_floor: [u64; 2],
    /// What is added to each host clock so the guest's clocks never go backwards.
    pub clock_shift: [u64; 2],
}

fn describe_event(event: &Event) -> String {
    match event {
        Event::ClockRead { register, value } => {
            format!("clock read of register {register:#x} = {value}")
        }
        Event::Injected { vector } => format!("injection of vector {vector}"),
        Event::NetRx { frame } => format!("a received frame of {} bytes", frame.len()),
        Event::DiskRead { status, data } => {
            format!("a disk read (status {status}, {} bytes)", data.len())
        }
        Event::DiskDone { status } => format!("a disk write or flush (status {status})"),
        Event::DiskReadCrc { status, len, crc } => {
            format!("a private disk read (status {status}, {len} bytes, crc {crc:#010x})")
        }
        Event::DiskComplete { request, status } => {
            format!("completion of held disk request {request} (status {status})")
        }
        Event::RegsDigest { rip, hash } => format!("registers digest {hash:#018x} at rip {rip:#x}"),
        Event::MemDigest { pages, hash } => {
            format!("memory digest {hash:#018x} over {pages} dirty pages")
        }
        Event::End(end) => format!(
            "the end of the run (outcome {}, code {})",
            end.outcome, end.code
        ),
        other => other.name().to_owned(),
    }
}

impl Inputs {
    /// Inputs sourced by `mode`.
    pub fn new(mode: Mode) -> Self {
        Inputs {
            mode,
            ordinal: 0,
            stop: None,
            record_error: None,
            went_live_at: None,
            replayed: ReplayStats::default(),
            clock_floor: [0; 2],
            clock_shift: [0; 2],
        }
    }

    /// Where the inputs stand, for a snapshot.
    pub fn resume_point(&self) -> ResumePoint {
        ResumePoint {
            ordinal: self.ordinal,
            clock_floor: self.clock_floor,
            clock_shift: self.clock_shift,
        }
    }

    /// Continues from a snapshot's `point` (a restored machine, before it runs).
    pub fn resume_at(&mut self, point: ResumePoint) {
        self.set_ordinal(point.ordinal);
        self.clock_floor = point.clock_floor;
        self.clock_shift = point.clock_shift;
    }

    /// The exit ordinal at which this backup went live, if it did.
    pub fn went_live_at(&self) -> Option<u64> {
        self.went_live_at
    }

    /// Whether outputs must be dropped (a replaying replica never emits them).
    pub fn is_replay(&self) -> bool {
        matches!(self.mode, Mode::Replay(_))
    }

    /// Whether inputs come from the host unlogged.
    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Live)
    }

    /// Whether a log is being written.
    pub fn is_recording(&self) -> bool {
        matches!(self.mode, Mode::Record(_))
    }

    /// Sets the ordinal of the exit being handled.
    pub fn set_ordinal(&mut self, ordinal: u64) {
        self.ordinal = ordinal;
        if let Mode::Replay(replayer) = &self.mode {
            if let Some(link) = &replayer.link {
                link.replayed_to(ordinal);
            }
        }
    }

    /// Switches to live inputs (the peer is gone).
    fn go_on_alone(&mut self) {
        self.mode = Mode::Live;
    }

    /// Why the replay must stop, if it must.
    pub fn replay_stop(&self) -> Option<&ReplayStop> {
        self.stop.as_ref()
    }

    /// Takes a write error of the recording, if one happened.
    pub fn take_record_error(&mut self) -> Option<std::io::Error> {
        self.record_error.take()
    }

    /// Replay counters (zero unless replaying).
    pub fn replay_stats(&self) -> ReplayStats {
        match &self.mode {
            Mode::Replay(replayer) => replayer.stats,
            // A backup that went live keeps what its replay did.
            _ => self.replayed,
        }
    }

    /// The recording writer, for counters.
    pub fn recorder(&self) -> Option<&LogWriter<Box<dyn Write + Send>>> {
        match &self.mode {
            Mode::Record(recorder) => Some(recorder.writer()),
            _ => None,
        }
    }

    /// A platform clock register read: live from `read`, or from the log.
    pub fn clock_read(&mut self, register: u8, read: impl FnOnce() -> u64) -> u64 {
        let clock = usize::from(register != 0);
        if self.is_replay() {
            match self.take(|e| matches!(e, Event::ClockRead { register: r, .. } if *r == register))
            {
                Some(Event::ClockRead { value, .. }) => {
                    self.clock_floor[clock] = value;
                    return value;
                }
                _ => {
                    if !self.diverge(format!("a clock read of register {register:#x}")) {
                        return 0;
                    }
                }
            }
        }
        // A backup that went live reads its own host's clocks, which may be behind what the
        // guest saw from the primary: shift them so guest time never runs backwards.
        let mut value = read().saturating_add(self.clock_shift[clock]);
        if value < self.clock_floor[clock] {
            self.clock_shift[clock] += self.clock_floor[clock] - value;
            value = self.clock_floor[clock];
        }
        self.clock_floor[clock] = value;
        self.record(Event::ClockRead { register, value });
        value
    }

    /// Whether the timer fires at this exit: live from `due`, or from the log.
    pub fn timer_tick(&mut self, due: impl FnOnce() -> bool) -> bool {
        if self.is_replay() {
            return self.take(|e| matches!(e, Event::TimerTick)).is_some();
        }
        let fired = due();
        if fired {
            self.record(Event::TimerTick);
        }
        fired
    }

    /// A frame from the NIC backend at this exit: live from `receive`, or from the log.
    pub fn net_rx(
        &mut self,
        receive: impl FnOnce() -> std::io::Result<Option<Vec<u8>>>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        if self.is_replay() {
            return Ok(match self.take(|e| matches!(e, Event::NetRx { .. })) {
                Some(Event::NetRx { frame }) => Some(frame),
                _ => None,
            });
        }
        let frame = receive()?;
        if let Some(frame) = &frame {
            self.record(Event::NetRx {
                frame: frame.clone(),
            });
        }
        Ok(frame)
    }

    /// A disk read: live from `read` (status, data), or from the log.
    pub fn disk_read(&mut self, read: impl FnOnce() -> (u8, Vec<u8>)) -> (u8, Vec<u8>) {
        if self.is_replay() {
            match self.take(|e| matches!(e, Event::DiskRead { .. })) {
                Some(Event::DiskRead { status, data }) => return (status, data),
                _ => {
                    if !self.diverge("a disk read".into()) {
                        return (1, Vec::new());
                    }
                }
            }
        }
        let (status, data) = read();
        self.record(Event::DiskRead {
            status,
            data: data.clone(),
        });
        (status, data)
    }

    /// A read of a private disk (this replica's own copy): the data always comes from
    /// `read`; it is logged as its CRC, and in replay the CRC of what this replica read
    /// must be the primary's (a difference is a divergence: the copies differ).
    pub fn disk_read_own(&mut self, read: impl FnOnce() -> (u8, Vec<u8>)) -> (u8, Vec<u8>) {
        let (status, data) = read();
        let event = Event::DiskReadCrc {
            status,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            crc: if status == 0 {
                crc32fast::hash(&data)
            } else {
                0
            },
        };
        if self.is_replay() {
            match self.take(|e| matches!(e, Event::DiskReadCrc { .. })) {
                Some(logged) if logged == event => return (status, data),
                Some(logged) => {
                    self.stop = Some(ReplayStop::Diverged(Divergence {
                        ordinal: self.ordinal,
                        expected: describe_event(&logged),
                        actual: format!("{} from this replica's own disk", describe_event(&event)),
                    }));
                    return (status, data);
                }
                // The log ended and this backup went live: the read is its own now.
                None if self.diverge(describe_event(&event)) => {}
                None => return (status, data),
            }
        }
        self.record(event);
        (status, data)
    }

    /// A write or flush of a private disk: internal state, not an output, so it is done
    /// at once by `perform` (on this replica's own copy) on every replica, a backup
    /// included, in log order. Logged as its status; in replay, a write the primary
    /// completed must complete here too (a copy that missed it is no copy), and one that
    /// failed there is not attempted.
    pub fn disk_write_own(&mut self, perform: impl FnOnce() -> u8) -> u8 {
        if self.is_replay() {
            match self.take(|e| matches!(e, Event::DiskDone { .. })) {
                Some(Event::DiskDone { status: 0 }) => {
                    let own = perform();
                    if own != 0 {
                        self.stop = Some(ReplayStop::Diverged(Divergence {
                            ordinal: self.ordinal,
                            expected: "a disk write or flush that completed (status 0)".into(),
                            actual: format!("this replica's own disk failed it (status {own})"),
                        }));
                    }
                    return 0;
                }
                Some(Event::DiskDone { status }) => return status,
                _ => {
                    if !self.diverge("a disk write or flush".into()) {
                        return 1;
                    }
                }
            }
        }
        let status = perform();
        self.record(Event::DiskDone { status });
        status
    }

    /// A disk write or flush: an output. Done at once by `perform` (returning its status)
    /// when live or recording to a file; handed to the log channel as the action `hold`
    /// makes (a pair's primary: it runs once the backup has acknowledged this exit, and
    /// the device completes the request later through [`Inputs::disk_complete`]); in
    /// replay, completed with the status the log has at this exit, or left pending when
    /// the primary held it.
    pub fn disk_output<R>(
        &mut self,
        request: R,
        perform: impl FnOnce(&R) -> u8,
        hold: impl FnOnce(R) -> (u64, DiskAction),
    ) -> DiskOutput<R> {
        match &mut self.mode {
            Mode::Replay(_) => match self.take(|e| matches!(e, Event::DiskDone { .. })) {
                Some(Event::DiskDone { status }) => DiskOutput::Done(status),
                _ => DiskOutput::Pending(request),
            },
            Mode::Record(recorder) if recorder.live.is_some() => {
                let position = recorder.writer.bytes_total();
                if let Some(live) = &mut recorder.live {
                    live.flush_due = true;
                    let (bytes, action) = hold(request);
                    live.link.hold(position, Output::Disk(bytes, action));
                }
                DiskOutput::Held
            }
            Mode::Record(_) | Mode::Live => {
                let status = perform(&request);
                self.record(Event::DiskDone { status });
                DiskOutput::Done(status)
            }
        }
    }

    /// The next completion of a held disk request at this exit: `(request number,
    /// status)` from `next` (logged), or from the log in replay.
    pub fn disk_complete(&mut self, next: impl FnOnce() -> Option<(u64, u8)>) -> Option<(u64, u8)> {
        if self.is_replay() {
            return match self.take(|e| matches!(e, Event::DiskComplete { .. })) {
                Some(Event::DiskComplete { request, status }) => Some((request, status)),
                _ => None,
            };
        }
        let (request, status) = next()?;
        self.record(Event::DiskComplete { request, status });
        Some((request, status))
    }

    /// The VMM injected `vector` at this exit.
    pub fn injected(&mut self, vector: u8) {
        if self.is_replay() {
            if self
                .take(|e| matches!(e, Event::Injected { vector: v } if *v == vector))
                .is_none()
            {
                self.diverge(format!("injection of vector {vector}"));
            }
            return;
        }
        self.record(Event::Injected { vector });
    }

    /// A registers digest after this exit.
    pub fn regs_digest(&mut self, rip: u64, hash: u64) {
        self.digest(Event::RegsDigest { rip, hash });
    }

    /// A memory digest after this exit.
    pub fn mem_digest(&mut self, pages: u32, hash: u64) {
        self.digest(Event::MemDigest { pages, hash });
    }

    fn digest(&mut self, event: Event) {
        if !self.is_replay() {
            self.record(event);
            return;
        }
        let kind = event.kind();
        match self.take(|e| e.kind() == kind) {
            Some(logged) if logged == event => {
                if let Mode::Replay(replayer) = &mut self.mode {
                    replayer.stats.digests_matched += 1;
                }
            }
            Some(logged) => {
                self.stop = Some(ReplayStop::Diverged(Divergence {
                    ordinal: self.ordinal,
                    expected: describe_event(&logged),
                    actual: describe_event(&event),
                }));
            }
            None => {
                self.diverge(describe_event(&event));
            }
        }
    }

    /// The run ended at this exit with `end`; in replay, checks it against the log.
    pub fn end(&mut self, end: EndState) {
        if !self.is_replay() {
            self.record(Event::End(end));
            if let Mode::Record(recorder) = &mut self.mode {
                if let Some(live) = &mut recorder.live {
                    // Nothing follows an end frame, not even a heartbeat.
                    live.ended = true;
                }
            }
            return;
        }
        // The end frame is the final digest: checked like the others.
        self.digest(Event::End(end));
    }

    /// In replay, after an exit was handled: any event still waiting at this ordinal means
    /// the replay did not do what the recorded run did.
    ///
    /// When streaming to a backup, this is where the log is handed to the sender: if an
    /// output is waiting for it, or [`crate::link::FLUSH_EVERY`] passed since the last
    /// hand-over. Every event of this exit is logged by now, so the heartbeat says
    /// `ordinal + 1`.
    pub fn finish_exit(&mut self) {
        let ordinal = self.ordinal;
        let replayer = match &mut self.mode {
            Mode::Replay(replayer) => replayer,
            Mode::Record(recorder) => {
                match recorder.live.as_ref().and_then(|live| live.link.pair_end()) {
                    Some(PairEnd::Alone) => {
                        // The backup is gone and the arbiter let this primary go on:
                        // nothing to log for any more.
                        self.go_on_alone();
                        return;
                    }
                    Some(PairEnd::Halt(stop)) => {
                        self.stop = Some(stop);
                        return;
                    }
                    None => {}
                }
                if recorder.live.as_ref().is_some_and(|live| {
                    live.flush_due || live.last_flush.elapsed() >= crate::link::FLUSH_EVERY
                }) {
                    self.flush_log(ordinal + 1);
                    if let Mode::Record(recorder) = &self.mode {
                        if let Some(live) = &recorder.live {
                            live.link.hold_back();
                        }
                    }
                }
                return;
            }
            Mode::Live => return,
        };
        if self.stop.is_some() {
            return;
        }
        let last_ordinal = replayer.last_ordinal;
        match replayer.peek(ordinal) {
            Ok(Peek::Event(frame))
                if frame.ordinal <= ordinal && logged_stop(frame, ordinal).is_none() =>
            {
                let expected = describe(&Peek::Event(frame));
                self.stop = Some(ReplayStop::Diverged(Divergence {
                    ordinal,
                    expected,
                    actual: "no such event".into(),
                }));
            }
            Ok(Peek::End) => {
                self.on_log_end(last_ordinal);
            }
            Ok(_) => {}
            Err(err) => self.stop = Some(ReplayStop::BadLog(err)),
        }
    }
}

#[cfg(test)]
mod tests;
