//! Where nondeterministic inputs come from: the host (live), the host with every value
//! logged (record), or a log (replay).
//!
//! Every device and the vCPU loop obtain nondeterministic values only through [`Inputs`],
//! each stamped with the current exit ordinal. In replay the same calls, made at the same
//! ordinals by the same deterministic code, take the logged values instead; any mismatch
//! is a [`Divergence`], reported with the ordinal and what was expected.

use crate::ftlog::{EndState, Event, Frame, LogError, LogReader, LogWriter};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter};

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
            ReplayStop::LogEnded { last_ordinal } => {
                write!(
                    f,
                    "log ends at exit ordinal {last_ordinal} without an end frame"
                )
            }
        }
    }
}

/// Counters of a replay.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplayStats {
    /// Events applied.
    pub events: u64,
    /// Register and memory digests that matched.
    pub digests_matched: u64,
}

/// A log being replayed, with one frame of look-ahead.
pub struct Replayer {
    reader: LogReader<BufReader<File>>,
    next: Option<Frame>,
    exhausted: bool,
    last_ordinal: u64,
    /// Counters.
    pub stats: ReplayStats,
}

impl Replayer {
    /// Opens a replay of `reader` (its header already checked by the caller).
    pub fn new(reader: LogReader<BufReader<File>>) -> Self {
        Replayer {
            reader,
            next: None,
            exhausted: false,
            last_ordinal: 0,
            stats: ReplayStats::default(),
        }
    }

    fn peek(&mut self) -> Result<Option<&Frame>, LogError> {
        if self.next.is_none() && !self.exhausted {
            self.next = self.reader.next_frame()?;
            match &self.next {
                Some(frame) => self.last_ordinal = frame.ordinal,
                None => self.exhausted = true,
            }
        }
        Ok(self.next.as_ref())
    }
}

/// The three ways inputs are sourced.
pub enum Mode {
    /// From the host, not logged.
    Live,
    /// From the host, every value logged.
    Record(Box<LogWriter<BufWriter<File>>>),
    /// From a log; outputs are dropped.
    Replay(Box<Replayer>),
}

/// The one gate for nondeterministic inputs.
pub struct Inputs {
    mode: Mode,
    ordinal: u64,
    stop: Option<ReplayStop>,
    record_error: Option<std::io::Error>,
}

fn describe(frame: Option<&Frame>) -> String {
    match frame {
        Some(frame) => format!(
            "{} at exit ordinal {}",
            describe_event(&frame.event),
            frame.ordinal
        ),
        None => "the end of the log".into(),
    }
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
        }
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
            _ => ReplayStats::default(),
        }
    }

    /// The recording writer, for counters.
    pub fn recorder(&self) -> Option<&LogWriter<BufWriter<File>>> {
        match &self.mode {
            Mode::Record(writer) => Some(writer),
            _ => None,
        }
    }

    fn record(&mut self, event: Event) {
        if let Mode::Record(writer) = &mut self.mode {
            if self.record_error.is_none() {
                let frame = Frame {
                    ordinal: self.ordinal,
                    event,
                };
                if let Err(err) = writer.write(&frame) {
                    self.record_error = Some(err);
                }
            }
        }
    }

    /// In replay, takes the next event if it is at this ordinal and `matches` it.
    /// Returns `None` if not (and records why the replay must stop if the log cannot
    /// continue).
    fn take(&mut self, matches: impl Fn(&Event) -> bool) -> Option<Event> {
        let ordinal = self.ordinal;
        let Mode::Replay(replayer) = &mut self.mode else {
            return None;
        };
        if self.stop.is_some() {
            return None;
        }
        match replayer.peek() {
            Ok(Some(frame)) if frame.ordinal == ordinal && matches(&frame.event) => {
                replayer.stats.events += 1;
                replayer.next.take().map(|frame| frame.event)
            }
            Ok(_) => None,
            Err(err) => {
                self.stop = Some(ReplayStop::BadLog(err));
                None
            }
        }
    }

    /// Records that the replay needed an event the log does not have here.
    fn diverge(&mut self, actual: String) {
        if self.stop.is_some() {
            return;
        }
        let Mode::Replay(replayer) = &mut self.mode else {
            return;
        };
        self.stop = Some(match replayer.peek() {
            Ok(None) => ReplayStop::LogEnded {
                last_ordinal: replayer.last_ordinal,
            },
            Ok(next) => ReplayStop::Diverged(Divergence {
                ordinal: self.ordinal,
                expected: describe(next),
                actual,
            }),
            Err(err) => ReplayStop::BadLog(err),
        });
    }

    /// A platform clock register read: live from `read`, or from the log.
    pub fn clock_read(&mut self, register: u8, read: impl FnOnce() -> u64) -> u64 {
        if self.is_replay() {
            return match self
                .take(|e| matches!(e, Event::ClockRead { register: r, .. } if *r == register))
            {
                Some(Event::ClockRead { value, .. }) => value,
                _ => {
                    self.diverge(format!("a clock read of register {register:#x}"));
                    0
                }
            };
        }
        let value = read();
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
            return match self.take(|e| matches!(e, Event::DiskRead { .. })) {
                Some(Event::DiskRead { status, data }) => (status, data),
                _ => {
                    self.diverge("a disk read".into());
                    (1, Vec::new())
                }
            };
        }
        let (status, data) = read();
        self.record(Event::DiskRead {
            status,
            data: data.clone(),
        });
        (status, data)
    }

    /// A disk write or flush: done live by `run` (returning its status), or skipped in
    /// replay with the logged status.
    pub fn disk_done(&mut self, run: impl FnOnce() -> u8) -> u8 {
        if self.is_replay() {
            return match self.take(|e| matches!(e, Event::DiskDone { .. })) {
                Some(Event::DiskDone { status }) => status,
                _ => {
                    self.diverge("a disk write or flush".into());
                    1
                }
            };
        }
        let status = run();
        self.record(Event::DiskDone { status });
        status
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
            None => self.diverge(describe_event(&event)),
        }
    }

    /// The run ended at this exit with `end`; in replay, checks it against the log.
    pub fn end(&mut self, end: EndState) {
        if !self.is_replay() {
            self.record(Event::End(end));
            return;
        }
        match self.take(|e| matches!(e, Event::End(_))) {
            Some(Event::End(logged)) if logged == end => {
                if let Mode::Replay(replayer) = &mut self.mode {
                    replayer.stats.digests_matched += 1;
                }
            }
            Some(logged) => {
                self.stop = Some(ReplayStop::Diverged(Divergence {
                    ordinal: self.ordinal,
                    expected: describe_event(&logged),
                    actual: describe_event(&Event::End(end)),
                }))
            }
            _ => self.diverge(describe_event(&Event::End(end))),
        }
    }

    /// In replay, after an exit was handled: any event still waiting at this ordinal means
    /// the replay did not do what the recorded run did.
    pub fn finish_exit(&mut self) {
        let ordinal = self.ordinal;
        let Mode::Replay(replayer) = &mut self.mode else {
            return;
        };
        if self.stop.is_some() {
            return;
        }
        match replayer.peek() {
            Ok(Some(frame)) if frame.ordinal <= ordinal => {
                let expected = describe(Some(frame));
                self.stop = Some(ReplayStop::Diverged(Divergence {
                    ordinal,
                    expected,
                    actual: "no such event".into(),
                }));
            }
            Ok(None) => {
                self.stop = Some(ReplayStop::LogEnded {
                    last_ordinal: replayer.last_ordinal,
                })
            }
            Ok(Some(_)) => {}
            Err(err) => self.stop = Some(ReplayStop::BadLog(err)),
        }
    }

    /// In replay: the guest halted and the log has nothing at this ordinal to wake it.
    pub fn halted_without_input(&mut self) {
        self.diverge("a halt with nothing to wake the guest".into());
    }

    /// In replay, whether the log has more events at this ordinal (a halted guest waits
    /// for them instead of for the host).
    pub fn has_event_now(&mut self) -> bool {
        let ordinal = self.ordinal;
        match &mut self.mode {
            Mode::Replay(replayer) => {
                matches!(replayer.peek(), Ok(Some(frame)) if frame.ordinal == ordinal)
            }
            _ => false,
        }
    }

    /// Flushes a recording.
    pub fn flush(&mut self) {
        if let Mode::Record(writer) = &mut self.mode {
            if let Err(err) = writer.flush() {
                self.record_error.get_or_insert(err);
            }
        }
    }
}
