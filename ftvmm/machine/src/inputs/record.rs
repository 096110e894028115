//! Recording: where the log goes (a file, or a backup through the pair's link) and how
//! the inputs write it, hold outputs for the output rule and hand the log over.

use super::*;

/// Where a recording goes: a file, or a backup through the log channel.
pub struct Recorder {
    pub(super) writer: LogWriter<Box<dyn Write + Send>>,
    pub(super) live: Option<LiveLog>,
}

/// A recording streamed to a backup: flushed often, each flush with a heartbeat.
pub(super) struct LiveLog {
    pub(super) link: Box<dyn PrimaryLink>,
    pub(super) last_flush: Instant,
    pub(super) flush_due: bool,
    pub(super) ended: bool,
}

impl Recorder {
    /// Records to `output` (a file, buffered by the caller), starting with `header`.
    pub fn new(output: Box<dyn Write + Send>, header: LogHeader) -> std::io::Result<Self> {
        Ok(Recorder {
            writer: LogWriter::new(output, header)?,
            live: None,
        })
    }

    /// Streams to a backup: frames go to `writer`, outputs are held by `link`. The
    /// header goes out at once, so the backup can check it while this side boots.
    pub fn streaming(
        link: Box<dyn PrimaryLink>,
        writer: Box<dyn Write + Send>,
        header: LogHeader,
    ) -> std::io::Result<Self> {
        let mut writer = LogWriter::new(writer, header)?;
        writer.flush()?;
        Ok(Recorder {
            writer,
            live: Some(LiveLog {
                link,
                last_flush: Instant::now(),
                flush_due: false,
                ended: false,
            }),
        })
    }

    /// The log writer, for counters.
    pub fn writer(&self) -> &LogWriter<Box<dyn Write + Send>> {
        &self.writer
    }
}

impl Inputs {
    /// Starts logging every input to `recorder` from here on (a live machine that was
    /// just snapshotted: the log continues the snapshot). Refused (returns false) unless
    /// the inputs are live.
    pub fn start_recording(&mut self, recorder: Recorder) -> bool {
        if !self.is_live() {
            return false;
        }
        self.mode = Mode::Record(Box::new(recorder));
        true
    }

    pub(super) fn record(&mut self, event: Event) {
        if let Mode::Record(recorder) = &mut self.mode {
            if self.record_error.is_none() {
                let frame = Frame {
                    ordinal: self.ordinal,
                    event,
                };
                if let Err(err) = recorder.writer.write(&frame) {
                    self.record_error = Some(err);
                }
            }
        }
    }

    /// A device produced an output (a TAP transmit, a disk write or flush). When streaming
    /// to a backup, the log is handed to the sender at the end of this exit; the returned
    /// log position (bytes of all frames so far) is what an acknowledgement must cover for
    /// the backup to be able to reproduce the output.
    pub fn output_produced(&mut self) -> Option<u64> {
        let Mode::Record(recorder) = &mut self.mode else {
            return None;
        };
        let live = recorder.live.as_mut()?;
        live.flush_due = true;
        Some(recorder.writer.bytes_total())
    }

    /// A frame the guest transmits on a NIC with a TAP: sent at once by `send` (live, or
    /// recording to a file), held by the log channel until the backup has acknowledged the
    /// log up to here (the primary of a pair: the output rule; the vCPU does not wait), or
    /// dropped (replay). Held and dropped frames count as sent.
    pub fn transmit(
        &mut self,
        frame: &[u8],
        send: impl FnOnce(&[u8]) -> std::io::Result<bool>,
    ) -> std::io::Result<bool> {
        match &mut self.mode {
            Mode::Replay(_) => Ok(true),
            Mode::Record(recorder) if recorder.live.is_some() => {
                let position = recorder.writer.bytes_total();
                if let Some(live) = &mut recorder.live {
                    live.flush_due = true;
                    live.link.hold(position, Output::Frame(frame.to_vec()));
                }
                Ok(true)
            }
            Mode::Record(_) | Mode::Live => send(frame),
        }
    }

    /// Whether a log is being written to a file (not streamed to a backup).
    pub fn is_recording_to_file(&self) -> bool {
        matches!(&self.mode, Mode::Record(recorder) if recorder.live.is_none())
    }

    /// Flushes a recording; a stream to a backup gets a heartbeat at the current ordinal
    /// (events of this exit may still follow, as when the guest waits in HLT).
    pub fn flush(&mut self) {
        self.flush_log(self.ordinal);
    }

    pub(super) fn flush_log(&mut self, heartbeat: u64) {
        let Mode::Record(recorder) = &mut self.mode else {
            return;
        };
        if let Some(live) = &mut recorder.live {
            // The end of an exit announced the next one already (`finish_exit`); a flush
            // after it (the final one of a stop) must not go back below that.
            let heartbeat = heartbeat.max(recorder.writer.last_ordinal());
            if !live.ended {
                let frame = Frame {
                    ordinal: heartbeat,
                    event: Event::Heartbeat,
                };
                if let Err(err) = recorder.writer.write(&frame) {
                    self.record_error.get_or_insert(err);
                }
            }
            live.link.progress(heartbeat);
            live.last_flush = Instant::now();
            live.flush_due = false;
        }
        if let Err(err) = recorder.writer.flush() {
            self.record_error.get_or_insert(err);
        }
    }

    /// Ends the log channel, if there is one: a primary sends what is left and waits (a
    /// bounded time) for the backup to acknowledge all of it; a backup disconnects.
    pub fn close_channel(&mut self) {
        match &mut self.mode {
            Mode::Record(recorder) => {
                if let Some(live) = &mut recorder.live {
                    live.link.close();
                }
            }
            Mode::Replay(replayer) => {
                if let Some(link) = &mut replayer.link {
                    link.close();
                }
            }
            Mode::Live => {}
        }
    }
}
