//! Unit tests of `crate::inputs`.
use super::*;
use ftvm_log::LOG_VERSION;

/// A stream that fails when read past its bytes, as a live stream would block.
struct Starving(std::io::Cursor<Vec<u8>>);

impl Read for Starving {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => Err(std::io::Error::other("read past the last frame")),
            n => Ok(n),
        }
    }
}

/// A header for logs that only these tests read.
fn test_header() -> LogHeader {
    LogHeader {
        version: LOG_VERSION,
        mem_size: 2 << 20,
        image_crc: 0,
        image_len: 0,
        machine: String::new(),
        cmdline: String::new(),
    }
}

fn replaying(frames: &[Frame]) -> Inputs {
    let header = test_header();
    let mut writer = LogWriter::new(Vec::new(), header).unwrap();
    for frame in frames {
        writer.write(frame).unwrap();
    }
    let bytes = std::mem::take(writer.get_mut());
    let source: Box<dyn Read + Send> = Box::new(Starving(std::io::Cursor::new(bytes)));
    let reader = LogReader::new(source).unwrap();
    Inputs::new(Mode::Replay(Box::new(Replayer::new(reader))))
}

/// One exit of a replay without events: no tick, nothing injected, exit finished.
fn quiet_exit(inputs: &mut Inputs, ordinal: u64) {
    inputs.set_ordinal(ordinal);
    assert!(!inputs.timer_tick(|| unreachable!("live timer in replay")));
    inputs.finish_exit();
}

#[test]
fn a_heartbeat_lets_the_replay_run_to_it_without_reading_further() {
    let mut inputs = replaying(&[
        Frame {
            ordinal: 2,
            event: Event::TimerTick,
        },
        Frame {
            ordinal: 2,
            event: Event::Heartbeat,
        },
        Frame {
            ordinal: 10,
            event: Event::Heartbeat,
        },
    ]);
    quiet_exit(&mut inputs, 1);
    inputs.set_ordinal(2);
    assert!(inputs.timer_tick(|| unreachable!()));
    inputs.finish_exit();
    for ordinal in 3..10 {
        quiet_exit(&mut inputs, ordinal);
        assert_eq!(inputs.replay_stop(), None, "exit {ordinal}");
    }
    // Heartbeats are progress, not events.
    assert_eq!(inputs.replay_stats().events, 1);
    assert_eq!(inputs.replay_stats().heartbeats, 2);
    // Exit 10 is not covered: the replay must read on (here: past the end).
    quiet_exit(&mut inputs, 10);
    assert!(
        matches!(
            inputs.replay_stop(),
            Some(ReplayStop::BadLog(LogError::Io(_)))
        ),
        "{:?}",
        inputs.replay_stop()
    );
}

#[test]
fn an_event_the_heartbeat_skipped_over_is_a_divergence() {
    let mut inputs = replaying(&[Frame {
        ordinal: 5,
        event: Event::Heartbeat,
    }]);
    inputs.set_ordinal(3);
    inputs.injected(32);
    match inputs.replay_stop() {
        Some(ReplayStop::Diverged(divergence)) => {
            assert_eq!(divergence.ordinal, 3);
            assert!(divergence
                .expected
                .contains("no event before exit ordinal 5"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn guest_clocks_never_go_backwards_when_inputs_turn_live() {
    let mut inputs = Inputs::new(Mode::Live);
    assert_eq!(inputs.clock_read(0, || 1000), 1000);
    // The host clock behind what the guest already saw (a backup that went live on a host
    // whose clock started later): the guest sees time stand still, then advance.
    assert_eq!(inputs.clock_read(0, || 400), 1000);
    assert_eq!(inputs.clock_read(0, || 500), 1100);
    // The wall clock is kept apart.
    assert_eq!(inputs.clock_read(8, || 50), 50);
    assert_eq!(inputs.clock_read(8, || 40), 50);
    assert_eq!(inputs.clock_read(0, || 600), 1200);
}

/// A primary link that holds nothing and never ends the pair.
struct QuietLink;

impl PrimaryLink for QuietLink {
    fn hold(&self, _position: u64, _output: Output) {}
    fn progress(&self, _ordinal: u64) {}
    fn hold_back(&self) {}
    fn pair_end(&self) -> Option<PairEnd> {
        None
    }
    fn close(&mut self) {}
}

/// A stream whose bytes a test reads afterwards.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stopping_primary_never_sends_a_heartbeat_below_the_one_it_sent() {
    let header = test_header();
    let stream = Shared::default();
    let recorder =
        Recorder::streaming(Box::new(QuietLink), Box::new(stream.clone()), header).unwrap();
    let mut inputs = Inputs::new(Mode::Live);
    assert!(inputs.start_recording(recorder));
    // Exit 7 produced an output: its end hands the log over with a heartbeat at 8 (the
    // backup may run through exit 7).
    inputs.set_ordinal(7);
    inputs.output_produced();
    inputs.finish_exit();
    // Stopped before exit 8: the final flush of the stop.
    inputs.flush();
    let bytes = stream.0.lock().unwrap().clone();
    let mut reader = LogReader::new(std::io::Cursor::new(bytes)).unwrap();
    let mut ordinals = Vec::new();
    while let Some(frame) = reader
        .next_frame()
        .unwrap_or_else(|err| panic!("the backup would refuse the stream: {err}"))
    {
        ordinals.push(frame.ordinal);
    }
    assert_eq!(ordinals, [8, 8], "heartbeats after the header");
}
