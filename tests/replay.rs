//! Record and replay on real KVM: identical replays, and every kind of tampering with the
//! log detected where it happened.

use ftvm_log::{Event, Frame, LogReader, LogWriter};
use ftvm_tests::{binary, guest, require_kvm, run, Ran, Scratch};
use std::path::Path;
use std::process::Command;

fn record(image: &str, cmdline: &str, log: &Path) -> Ran {
    require_kvm();
    let ran = run(Command::new(binary("ftvmm"))
        .args([
            "run",
            "--console",
            "none",
            "--digest-every",
            "1",
            "--mem-digest-every",
            "1",
            "--cmdline",
            cmdline,
        ])
        .arg("--image")
        .arg(guest(image))
        .arg("--record")
        .arg(log));
    assert!(!ran.stderr.contains("panicked"), "{ran:?}");
    ran
}

fn replay(image: &str, log: &Path) -> Ran {
    run(Command::new(binary("ftvmm"))
        .args(["replay", "--digest-every", "1", "--mem-digest-every", "1"])
        .arg("--image")
        .arg(guest(image))
        .arg("--log")
        .arg(log))
}

fn read_frames(log: &Path) -> (ftvm_log::LogHeader, Vec<Frame>) {
    let file = std::fs::File::open(log).expect("open log");
    let mut reader = LogReader::new(std::io::BufReader::new(file)).expect("log header");
    let header = reader.header().clone();
    let mut frames = Vec::new();
    while let Some(frame) = reader.next_frame().expect("log frame") {
        frames.push(frame);
    }
    (header, frames)
}

/// Writes a copy of `log` with its frames passed through `mutate` (checksums stay valid:
/// this tampers with meaning, not with bytes).
fn rewrite(log: &Path, out: &Path, mutate: impl FnOnce(&mut Vec<Frame>)) {
    let (header, mut frames) = read_frames(log);
    mutate(&mut frames);
    let file = std::fs::File::create(out).expect("create log");
    let mut writer = LogWriter::new(std::io::BufWriter::new(file), header).expect("write header");
    for frame in &frames {
        writer.write(frame).expect("write frame");
    }
    writer.flush().expect("flush");
}

/// Copies `log` to `out` with `change` applied to its first clock read; returns the
/// ordinal that read had.
fn rewrite_first_clock_read(log: &Path, out: &Path, change: impl FnOnce(&mut Frame)) -> u64 {
    let mut at = 0;
    rewrite(log, out, |frames| {
        let frame = frames
            .iter_mut()
            .find(|f| matches!(f.event, Event::ClockRead { .. }))
            .expect("a clock read");
        at = frame.ordinal;
        change(frame);
    });
    at
}

/// The exit ordinal named in a divergence report.
fn diverged_at(ran: &Ran) -> u64 {
    assert_eq!(ran.code, Some(1), "expected a divergence: {ran:?}");
    assert!(ran.stderr.contains("DIVERGED"), "{ran:?}");
    let text = ran
        .stderr
        .split("diverged at exit ordinal ")
        .nth(1)
        .expect("ordinal in report");
    text.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("number")
}

fn assert_identical(ran: &Ran) {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.contains("IDENTICAL"), "{ran:?}");
}

const HELLO: &str = "ticks=15 tick_us=700 work=2000000";

#[test]
fn recorded_hello_run_replays_identically_every_time() {
    let scratch = Scratch::new("replay-identical");
    let log = scratch.path("hello.ftlog");
    assert_eq!(record("hello", HELLO, &log).code, Some(0));
    for _ in 0..3 {
        let ran = replay("hello", &log);
        assert_identical(&ran);
        // Digests were checked at every exit: one per exit for registers and for memory,
        // plus the final one.
        let matched: u64 = ran
            .stderr
            .split(" digests matched")
            .next()
            .and_then(|text| text.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .expect("'N digests matched' in the summary");
        let exits: u64 = ran
            .stderr
            .split(" exits replayed")
            .next()
            .and_then(|text| text.rsplit('(').next())
            .and_then(|n| n.parse().ok())
            .expect("'N exits replayed' in the summary");
        // (The last exit ends the run: the end frame digests it.)
        assert_eq!(matched, 2 * (exits - 1) + 1, "{ran:?}");
    }
}

#[test]
fn flipped_clock_value_is_caught_at_the_next_exit() {
    let scratch = Scratch::new("replay-flip");
    let log = scratch.path("hello.ftlog");
    let bad = scratch.path("flipped.ftlog");
    record("hello", HELLO, &log);
    let at = rewrite_first_clock_read(&log, &bad, |frame| {
        if let Event::ClockRead { value, .. } = &mut frame.event {
            *value ^= 1 << 20;
        }
    });
    // The value reaches the guest's registers when it resumes, so the digest of the very
    // next exit differs.
    let ordinal = diverged_at(&replay("hello", &bad));
    assert!(
        (at..=at + 1).contains(&ordinal),
        "flipped at {at}, detected at {ordinal}"
    );
}

#[test]
fn dropped_timer_tick_is_caught_at_its_exit() {
    let scratch = Scratch::new("replay-drop");
    let log = scratch.path("hello.ftlog");
    let bad = scratch.path("dropped.ftlog");
    record("hello", HELLO, &log);
    let mut at = 0;
    rewrite(&log, &bad, |frames| {
        let index = frames
            .iter()
            .position(|f| matches!(f.event, Event::TimerTick))
            .expect("a tick");
        at = frames.remove(index).ordinal;
    });
    let ran = replay("hello", &bad);
    assert_eq!(diverged_at(&ran), at, "{ran:?}");
    assert!(ran.stderr.contains("injection of vector 32"), "{ran:?}");
}

#[test]
fn event_shifted_to_a_later_ordinal_is_caught_where_it_was_needed() {
    let scratch = Scratch::new("replay-shift");
    let log = scratch.path("hello.ftlog");
    let bad = scratch.path("shifted.ftlog");
    record("hello", HELLO, &log);
    let at = rewrite_first_clock_read(&log, &bad, |frame| frame.ordinal += 1);
    let ran = replay("hello", &bad);
    assert_eq!(diverged_at(&ran), at, "{ran:?}");
    assert!(ran.stderr.contains("got a clock read"), "{ran:?}");
}

#[test]
fn guest_reading_the_tsc_is_caught_as_a_divergence() {
    let scratch = Scratch::new("replay-rdtsc");
    let log = scratch.path("rdtsc.ftlog");
    assert_eq!(record("evil", "case=rdtsc", &log).code, Some(0));
    let ran = replay("evil", &log);
    diverged_at(&ran);
}

#[test]
fn corrupt_truncated_foreign_and_unfinished_logs_are_reported_as_such() {
    let scratch = Scratch::new("replay-badlog");
    let log = scratch.path("hello.ftlog");
    record("hello", HELLO, &log);
    let bytes = std::fs::read(&log).expect("read log");

    let corrupt = scratch.path("corrupt.ftlog");
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&corrupt, flipped).expect("write");
    let ran = replay("hello", &corrupt);
    assert_eq!(ran.code, Some(65), "{ran:?}");
    assert!(ran.stderr.contains("log is corrupt"), "{ran:?}");

    let truncated = scratch.path("truncated.ftlog");
    std::fs::write(&truncated, &bytes[..bytes.len() - 3]).expect("write");
    let ran = replay("hello", &truncated);
    assert_eq!(ran.code, Some(65), "{ran:?}");
    assert!(ran.stderr.contains("log is truncated"), "{ran:?}");

    let foreign = replay("exits", &log);
    assert_eq!(foreign.code, Some(65), "{foreign:?}");
    assert!(
        foreign.stderr.contains("was recorded with another image"),
        "{foreign:?}"
    );

    let unfinished = scratch.path("unfinished.ftlog");
    rewrite(&log, &unfinished, |frames| {
        frames.pop();
    });
    let ran = replay("hello", &unfinished);
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("INCOMPLETE"), "{ran:?}");

    let garbage = scratch.path("garbage.ftlog");
    std::fs::write(&garbage, b"this is not a log").expect("write");
    let ran = replay("hello", &garbage);
    assert_eq!(ran.code, Some(65), "{ran:?}");
    assert_eq!(ran.stderr.trim_end().lines().count(), 1, "{ran:?}");
}

#[test]
fn log_inspect_summarizes_and_dumps_a_range() {
    let scratch = Scratch::new("replay-inspect");
    let log = scratch.path("hello.ftlog");
    record("hello", HELLO, &log);
    let (_, frames) = read_frames(&log);
    let ticks = frames
        .iter()
        .filter(|f| matches!(f.event, Event::TimerTick))
        .count();
    let ran = run(Command::new(binary("ftvmm"))
        .args(["log", "inspect"])
        .arg(&log));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let tick_line = ran
        .stdout
        .lines()
        .find(|l| l.starts_with("timer-tick"))
        .expect("tick line");
    assert_eq!(
        tick_line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok()),
        Some(ticks)
    );
    let first = frames[0].ordinal;
    let ran = run(Command::new(binary("ftvmm"))
        .args([
            "log",
            "inspect",
            "--from",
            &first.to_string(),
            "--to",
            &first.to_string(),
        ])
        .arg(&log));
    let dumped = ran
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(&first.to_string()))
        .count();
    assert_eq!(
        dumped,
        frames.iter().filter(|f| f.ordinal == first).count(),
        "{ran:?}"
    );
}

/// Random timer periods, tick counts and work, with the recording process stopped and
/// continued at random moments: every recording must replay identically.
#[test]
fn random_input_timings_and_host_disturbance_always_replay() {
    let scratch = Scratch::new("replay-random");
    // FTVM_SEED=N replays a failed run's choices.
    let mut seed: u64 = std::env::var("FTVM_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    let first_seed = seed;
    eprintln!("random_input_timings_and_host_disturbance_always_replay: seed {seed} (FTVM_SEED={seed} repeats it)");
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    for round in 0..4 {
        let cmdline = format!(
            "ticks={} tick_us={} work={}",
            1 + next(25),
            20 + next(3000),
            next(3_000_000)
        );
        let log = scratch.path(&format!("round{round}.ftlog"));
        let mut child = Command::new(binary("ftvmm"))
            .args([
                "run",
                "--console",
                "none",
                "--digest-every",
                "7",
                "--cmdline",
                &cmdline,
            ])
            .arg("--image")
            .arg(guest("hello"))
            .arg("--record")
            .arg(&log)
            .spawn()
            .expect("start ftvmm");
        let pid = child.id() as libc::pid_t;
        for _ in 0..next(6) {
            std::thread::sleep(std::time::Duration::from_micros(500 + next(5000)));
            // SAFETY: kill(2) on our own child's pid with valid signal numbers.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            std::thread::sleep(std::time::Duration::from_micros(next(3000)));
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
        }
        let status = ftvm_tests::wait_child(&mut child, ftvm_tests::EXIT_PATIENCE, "the recorder");
        assert_eq!(status.code(), Some(0), "{cmdline} (seed {first_seed})");
        let ran = run(Command::new(binary("ftvmm"))
            .args(["replay", "--digest-every", "7"])
            .arg("--image")
            .arg(guest("hello"))
            .arg("--log")
            .arg(&log));
        assert_eq!(ran.code, Some(0), "seed {first_seed}, {cmdline}: {ran:?}");
        assert_identical(&ran);
    }
}

/// A recording stopped by SIGTERM (how a VM is stopped) ends its log with the stop: the
/// replay stops at the same point and checks the final state there, whether the guest
/// was halted when the signal came or computing between two exits (it then runs on to its
/// next exit before stopping).
#[test]
fn a_recording_stopped_by_sigterm_replays_identical_to_its_end() {
    require_kvm();
    let scratch = Scratch::new("replay-sigterm");
    for (case, cmdline) in [
        // Halted between ticks nearly all the time.
        ("idle", "ticks=1000000 tick_us=2000"),
        // Five ticks, then a computation of about half a second without an exit.
        ("busy", "ticks=5 tick_us=1000 work=300000000"),
    ] {
        let log = scratch.path(&format!("{case}.ftlog"));
        let recorder = ftvm_tests::Spawned::start(
            Command::new(binary("ftvmm"))
                .args(["run", "--console", "none", "--cmdline", cmdline])
                .args(["--digest-every", "1", "--mem-digest-every", "1"])
                .arg("--image")
                .arg(guest("hello"))
                .arg("--record")
                .arg(&log),
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: kill(2) on our own child's pid.
        let sent = unsafe { libc::kill(recorder.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "{case}: cannot signal the recorder");
        let ran = recorder.wait(std::time::Duration::from_secs(10));
        assert_eq!(ran.code, Some(128 + libc::SIGTERM), "{case}: {ran:?}");
        let (_, frames) = read_frames(&log);
        let end = frames.last().expect("frames");
        assert!(
            matches!(&end.event, Event::End(end) if end.outcome == ftvm_log::END_STOPPED
                && i32::from(end.code) == libc::SIGTERM),
            "{case}: the log must end with the stop, ends with {end:?}"
        );
        let ran = replay("hello", &log);
        assert_identical(&ran);
        assert!(
            ran.stderr
                .contains(&format!("stopped by signal {}", libc::SIGTERM)),
            "{case}: {ran:?}"
        );
    }
}
