//! Replay: the log being replayed (a file, or a live primary's stream) and what the
//! inputs do with it: take the logged value at each input, notice what the replay did
//! that the log does not have, and decide at the end of the log.

use super::*;

/// A log being replayed, with one event of look-ahead.
pub struct Replayer {
    pub(super) reader: LogSource,
    pub(super) next: Option<Frame>,
    pub(super) exhausted: bool,
    /// No event below this ordinal is still to come (the last heartbeat's ordinal).
    pub(super) horizon: u64,
    pub(super) last_ordinal: u64,
    /// The pair's link to the primary, when following a live primary.
    pub(super) link: Option<Box<dyn BackupLink>>,
    /// Counters.
    pub stats: ReplayStats,
}

/// What the log holds for an exit.
pub(super) enum Peek<'a> {
    /// This event is next.
    Event(&'a Frame),
    /// Nothing is due at or before the exit: a heartbeat at this later ordinal said so.
    Quiet(u64),
    /// The log ended.
    End,
}

impl Replayer {
    /// Opens a replay of `reader` (its header already checked by the caller).
    pub fn new(reader: LogSource) -> Self {
        Replayer {
            reader,
            next: None,
            exhausted: false,
            horizon: 0,
            last_ordinal: 0,
            link: None,
            stats: ReplayStats::default(),
        }
    }

    /// Follows a live primary: `reader` reads the stream `link` receives (header already
    /// checked).
    pub fn following(reader: LogSource, link: Box<dyn BackupLink>) -> Self {
        Replayer {
            link: Some(link),
            ..Self::new(reader)
        }
    }

    /// What is due at exit `ordinal`. Reads (and on a live stream waits) only when neither
    /// the look-ahead event nor the last heartbeat answers, so a backup runs up to the
    /// primary's heartbeat without waiting for the primary's next event.
    pub(super) fn peek(&mut self, ordinal: u64) -> Result<Peek<'_>, LogError> {
        while self.next.is_none() && !self.exhausted && self.horizon <= ordinal {
            let frame = match self.reader.next_frame() {
                // A live stream cut inside a frame: the primary is gone, and no output of
                // its depended on a frame the backup never acknowledged. Same as the end.
                Err(LogError::Truncated { .. } | LogError::Io(_)) if self.link.is_some() => None,
                other => other?,
            };
            match frame {
                Some(Frame {
                    ordinal: horizon,
                    event: Event::Heartbeat,
                }) => {
                    self.stats.heartbeats += 1;
                    self.horizon = self.horizon.max(horizon);
                }
                Some(frame) => {
                    self.last_ordinal = frame.ordinal;
                    self.next = Some(frame);
                }
                None => self.exhausted = true,
            }
        }
        Ok(match &self.next {
            Some(frame) => Peek::Event(frame),
            None if self.exhausted => Peek::End,
            None => Peek::Quiet(self.horizon),
        })
    }
}

pub(super) fn describe(peek: &Peek<'_>) -> String {
    match peek {
        Peek::Event(frame) => format!(
            "{} at exit ordinal {}",
            describe_event(&frame.event),
            frame.ordinal
        ),
        Peek::Quiet(horizon) => format!("no event before exit ordinal {horizon}"),
        Peek::End => "the end of the log".into(),
    }
}

/// The signal of `frame` if it is the end frame of a run stopped by a signal at `ordinal`.
pub(super) fn logged_stop(frame: &Frame, ordinal: u64) -> Option<i32> {
    match &frame.event {
        Event::End(end) if frame.ordinal == ordinal && end.outcome == END_STOPPED => {
            Some(i32::from(end.code))
        }
        _ => None,
    }
}

impl Inputs {
    /// The log ended: a backup following a primary asks its link, which decides (the
    /// arbiter) whether it goes live right here: whatever the log did not bring is then
    /// taken from the host (the primary released no output that depended on it, the
    /// output rule saw to that). Otherwise, and when replaying a file, the replay stops.
    /// Returns whether the inputs are live now.
    pub(super) fn on_log_end(&mut self, last_ordinal: u64) -> bool {
        let Mode::Replay(replayer) = &mut self.mode else {
            return false;
        };
        let Some(link) = replayer.link.as_mut() else {
            self.stop = Some(ReplayStop::LogEnded { last_ordinal });
            return false;
        };
        tracing::warn!(
            "primary lost: log ends at exit ordinal {last_ordinal}, replayed up to {}",
            self.ordinal
        );
        match link.log_ended(last_ordinal) {
            Ok(()) => {
                self.replayed = self.replay_stats();
                // Dropping the replayer closes the connection to the lost primary.
                self.go_on_alone();
                self.went_live_at = Some(self.ordinal);
                tracing::warn!("live from exit ordinal {}", self.ordinal);
                true
            }
            Err(stop) => {
                self.stop = Some(stop);
                false
            }
        }
    }

    /// In replay, takes the next event if it is at this ordinal and `matches` it.
    /// Returns `None` if not (and records why the replay must stop if the log cannot
    /// continue).
    pub(super) fn take(&mut self, matches: impl Fn(&Event) -> bool) -> Option<Event> {
        let ordinal = self.ordinal;
        let Mode::Replay(replayer) = &mut self.mode else {
            return None;
        };
        if self.stop.is_some() {
            return None;
        }
        match replayer.peek(ordinal) {
            Ok(Peek::Event(frame)) if frame.ordinal == ordinal && matches(&frame.event) => {
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

    /// Records that the replay needed an event the log does not have here. If the log
    /// simply ended and this backup went live, returns true: the caller takes the input
    /// from the host instead.
    pub(super) fn diverge(&mut self, actual: String) -> bool {
        if self.stop.is_some() {
            return false;
        }
        let ordinal = self.ordinal;
        let Mode::Replay(replayer) = &mut self.mode else {
            return false;
        };
        let last_ordinal = replayer.last_ordinal;
        let stop = match replayer.peek(ordinal) {
            Ok(Peek::End) => None,
            Ok(next) => Some(ReplayStop::Diverged(Divergence {
                ordinal,
                expected: describe(&next),
                actual,
            })),
            Err(err) => Some(ReplayStop::BadLog(err)),
        };
        match stop {
            Some(stop) => {
                self.stop = Some(stop);
                false
            }
            None => self.on_log_end(last_ordinal),
        }
    }

    /// In replay: the guest halted and the log has nothing at this ordinal to wake it.
    /// Returns whether the inputs are live now (the log ended and this backup went live:
    /// the halted guest then waits for the host's timer and devices).
    pub fn halted_without_input(&mut self) -> bool {
        self.diverge("a halt with nothing to wake the guest".into())
    }

    /// Replaying a file: the signal that stopped the recorded run here, if the log's next
    /// frame is the end frame of such a stop at this ordinal (every event before it was
    /// taken). The caller stops the run at the same point the recorder did.
    pub fn logged_stop_now(&mut self) -> Option<i32> {
        let ordinal = self.ordinal;
        let Mode::Replay(replayer) = &mut self.mode else {
            return None;
        };
        // A pair's primary never ends its stream this way: a backup does not look (the
        // look-ahead would wait for the primary's next frame).
        if self.stop.is_some() || replayer.link.is_some() {
            return None;
        }
        match replayer.peek(ordinal) {
            Ok(Peek::Event(frame)) => logged_stop(frame, ordinal),
            _ => None,
        }
    }

    /// In replay, whether the log has more events at this ordinal (a halted guest waits
    /// for them instead of for the host).
    pub fn has_event_now(&mut self) -> bool {
        let ordinal = self.ordinal;
        match &mut self.mode {
            Mode::Replay(replayer) => {
                matches!(replayer.peek(ordinal), Ok(Peek::Event(frame)) if frame.ordinal == ordinal)
            }
            _ => false,
        }
    }
}
