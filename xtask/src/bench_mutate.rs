//! `cargo xtask bench mutate [--mutations N] [--seed S]`: how replay notices a log that
//! lies. Recorded logs (hello: timer ticks, clock reads and computation; kv under a mixed
//! redis-benchmark load) get one bit flipped inside one valid frame, with the frame's
//! checksum recomputed, so only the replay itself can notice; each mutated log is
//! replayed and the verdict counted by frame kind: DIVERGED (and how many exits after
//! the mutated frame), refused (the log is unusable: a frame that cannot be, ordinals out
//! of order), or IDENTICAL.
//!
//! Each guest is recorded twice: with the default digest periods (registers every 256
//! exits, the pages the guest wrote every 1024), the detection latency a deployment gets;
//! and with both digests at every exit, where IDENTICAL means no guest state differed at
//! any exit (registers and the pages the guest wrote compared after every exit, all of
//! RAM at the end): the mutation changed nothing the guest kept.

use crate::soak::{record_kv, record_sample, Recorded};
use crate::util::{percentile, Failure, Rng};
use ftvm_log::{kind_name, LogReader};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Mutations per recorded log unless told.
const MUTATIONS: usize = 60;
/// hello's run: ticks, clock reads (start and end of the ticks) and a computation.
const HELLO: &str = "ticks=300 tick_us=1000 work=200000";
/// kv's load: at least this long, in rounds of [`KV_REQUESTS`] per command.
const KV_LOAD: Duration = Duration::from_secs(2);
const KV_REQUESTS: u32 = 1500;

/// What to run.
pub(crate) struct Options {
    /// Mutations per recorded log.
    pub mutations: usize,
    /// The generator's seed: the same seed flips the same bits of the same frames.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mutations: MUTATIONS,
            seed: 1,
        }
    }
}

/// Where one frame lies in a log file.
struct FrameAt {
    kind: u8,
    ordinal: u64,
    /// Byte range of the whole frame, and of its payload.
    frame: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
}

/// The frames of the log `bytes` after its header, checked by the log reader.
fn frames(bytes: &[u8]) -> Result<Vec<FrameAt>, Failure> {
    let bad = |err: ftvm_log::LogError| Failure::new(format!("the recorded log: {err}"));
    let mut reader = LogReader::new(bytes).map_err(bad)?;
    let mut found = Vec::new();
    loop {
        let start = reader.offset() as usize;
        let Some(frame) = reader.next_frame().map_err(bad)? else {
            return Ok(found);
        };
        let end = reader.offset() as usize;
        // len u32 LE first, the CRC last (4 bytes): the payload ends where the CRC starts.
        let len = u32::from_le_bytes(
            bytes[start..start + 4]
                .try_into()
                .map_err(|_| Failure::new("a frame shorter than its length"))?,
        ) as usize;
        found.push(FrameAt {
            kind: frame.event.kind(),
            ordinal: frame.ordinal,
            frame: start..end,
            payload: end - 4 - len..end - 4,
        });
    }
}

/// `bytes` with one bit of `frame` flipped (in its payload; in the low byte of its
/// ordinal if it has none) and its CRC recomputed; and what was flipped.
fn mutate(bytes: &[u8], frame: &FrameAt, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut mutated = bytes.to_vec();
    let (at, what) = if frame.payload.is_empty() {
        // The ordinal is the 8 bytes before the payload.
        (frame.payload.start - 8, "ordinal".to_owned())
    } else {
        let at = frame.payload.start + rng.below(frame.payload.len() as u64) as usize;
        (at, format!("payload byte {}", at - frame.payload.start))
    };
    let bit = rng.below(8);
    mutated[at] ^= 1 << bit;
    let crc = crc32fast::hash(&mutated[frame.frame.start..frame.frame.end - 4]);
    mutated[frame.frame.end - 4..frame.frame.end].copy_from_slice(&crc.to_le_bytes());
    (mutated, format!("{what}, bit {bit}"))
}

/// What a replay of a mutated log said.
#[derive(Debug)]
enum Verdict {
    Identical,
    /// At this exit ordinal.
    Diverged(u64),
    Refused,
    /// Anything else (an incomplete log, a hang past the patience, a crash): listed.
    Other(String),
}

/// Replays `log` of `image` with `flags` (the recording's digest periods), for at most
/// `patience`.
fn replay(
    ftvmm: &Path,
    image: &Path,
    log: &Path,
    flags: &[&str],
    patience: Duration,
) -> Result<Verdict, Failure> {
    let mut child = Command::new(ftvmm)
        .args(["replay", "--console", "none", "--image"])
        .arg(image)
        .arg("--log")
        .arg(log)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| Failure::new(format!("cannot run ftvmm replay: {err}")))?;
    let deadline = Instant::now() + patience;
    loop {
        let done = child
            .try_wait()
            .map_err(|err| Failure::new(format!("ftvmm replay: {err}")))?;
        if done.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Verdict::Other(format!("still running after {patience:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child
        .wait_with_output()
        .map_err(|err| Failure::new(format!("ftvmm replay: {err}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(match out.status.code() {
        Some(0) if stderr.contains("IDENTICAL") => Verdict::Identical,
        Some(1) => {
            let ordinal = stderr
                .split("diverged at exit ordinal ")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|number| number.trim().parse().ok())
                .ok_or_else(|| Failure::new(format!("a divergence without its exit: {stderr}")))?;
            Verdict::Diverged(ordinal)
        }
        Some(65) => Verdict::Refused,
        _ => Verdict::Other(format!("{}: {}", out.status, stderr.trim())),
    })
}

/// Verdicts of one frame kind.
#[derive(Default)]
struct Tally {
    identical: usize,
    diverged: Vec<u64>,
    refused: usize,
    other: Vec<String>,
}

/// Mutates the recording `recorded` of `image` `mutations` times and prints a row per
/// frame kind. Every kind but the header is mutated, as evenly as the log allows.
fn mutate_log(
    ftvmm: &Path,
    image: &Path,
    name: &str,
    recorded: &Recorded,
    flags: &[&str],
    options: &Options,
    rng: &mut Rng,
) -> Result<(), Failure> {
    let bytes = std::fs::read(&recorded.log)
        .map_err(|err| Failure::new(format!("{}: {err}", recorded.log.display())))?;
    let all = frames(&bytes)?;
    let mut by_kind: BTreeMap<u8, Vec<&FrameAt>> = BTreeMap::new();
    for frame in &all {
        by_kind.entry(frame.kind).or_default().push(frame);
    }
    let kinds: Vec<u8> = by_kind.keys().copied().collect();
    // The replay of the untouched log first: it must be IDENTICAL, and it sets the
    // patience for the mutated ones.
    let started = Instant::now();
    let clean = replay(ftvmm, image, &recorded.log, flags, Duration::from_secs(600))?;
    if !matches!(clean, Verdict::Identical) {
        return Err(Failure::new(format!(
            "{name}: the unmutated log replayed {clean:?}"
        )));
    }
    let patience = started.elapsed() * 4 + Duration::from_secs(5);
    let mutated_log = recorded.log.with_extension("mutated");
    let mut tallies: BTreeMap<u8, Tally> = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    for i in 0..options.mutations {
        let kind = kinds[i % kinds.len()];
        let candidates = &by_kind[&kind];
        let frame = candidates[rng.below(candidates.len() as u64) as usize];
        let (mutated, what) = mutate(&bytes, frame, rng);
        std::fs::write(&mutated_log, &mutated)
            .map_err(|err| Failure::new(format!("{}: {err}", mutated_log.display())))?;
        let verdict = replay(ftvmm, image, &mutated_log, flags, patience)?;
        let tally = tallies.entry(kind).or_default();
        match verdict {
            Verdict::Identical => {
                tally.identical += 1;
                if examples.len() < 12 {
                    examples.push(format!(
                        "IDENTICAL: {} at exit {}, {what}",
                        kind_name(kind),
                        frame.ordinal
                    ));
                }
            }
            Verdict::Diverged(at) => tally.diverged.push(at.saturating_sub(frame.ordinal)),
            Verdict::Refused => tally.refused += 1,
            Verdict::Other(why) => tally.other.push(format!(
                "{} at exit {}, {what}: {why}",
                kind_name(kind),
                frame.ordinal
            )),
        }
    }
    std::fs::remove_file(&mutated_log).ok();
    println!(
        "{name}: {} exits, {} frames, {} bytes, {flags:?}",
        recorded.exits,
        all.len(),
        bytes.len()
    );
    println!(
        "  {:<14} {:>9} {:>9} {:>8} {:>10} {:>6}   exits from the mutated frame to the divergence p50/max",
        "kind", "mutations", "DIVERGED", "refused", "IDENTICAL", "other"
    );
    for (kind, tally) in &tallies {
        let mut latency: Vec<f64> = tally.diverged.iter().map(|&exits| exits as f64).collect();
        latency.sort_by(f64::total_cmp);
        let latency = match latency.last() {
            Some(max) => format!("{:.0}/{max:.0}", percentile(&latency, 50.0)),
            None => "-".into(),
        };
        println!(
            "  {:<14} {:>9} {:>9} {:>8} {:>10} {:>6}   {latency}",
            kind_name(*kind),
            tally.identical + tally.diverged.len() + tally.refused + tally.other.len(),
            tally.diverged.len(),
            tally.refused,
            tally.identical,
            tally.other.len()
        );
    }
    for line in examples
        .iter()
        .chain(tallies.values().flat_map(|tally| tally.other.iter()))
    {
        println!("    {line}");
    }
    Ok(())
}

/// Runs the bench: hello and kv, each recorded with the default digest periods and with
/// digests at every exit.
pub(crate) fn mutate_bench(options: &Options) -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let hello = kv.with_file_name("hello.elf");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-mutate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    println!(
        "mutate: one bit flipped in one frame of a recorded log (its CRC recomputed), {} mutations per log, seed {}",
        options.mutations, options.seed
    );
    let mut rng = Rng(options.seed | 1);
    let every_exit: &[&str] = &["--digest-every", "1", "--mem-digest-every", "1"];
    let result = (|| {
        for flags in [&[][..], every_exit] {
            let recorded = record_sample(&ftvmm, &dir, "hello", HELLO, flags)?;
            mutate_log(&ftvmm, &hello, "hello", &recorded, flags, options, &mut rng)?;
            let (recorded, _) = record_kv(&ftvmm, &kv, &dir, KV_LOAD, KV_REQUESTS, flags)?;
            mutate_log(
                &ftvmm,
                &kv,
                "kv under a mixed load",
                &recorded,
                flags,
                options,
                &mut rng,
            )?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&dir).ok();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_log::{Event, Frame, LogHeader, LogWriter};

    fn log() -> Vec<u8> {
        let mut writer = LogWriter::new(
            Vec::new(),
            LogHeader::for_machine(b"image", 1 << 20, "m".into(), "c"),
        )
        .expect("a log in memory");
        // The tick last, at 256: a flipped bit of its ordinal's low byte keeps the
        // ordinals in order.
        for (ordinal, event) in [
            (
                5,
                Event::ClockRead {
                    register: 0,
                    value: 42,
                },
            ),
            (256, Event::TimerTick),
        ] {
            writer.write(&Frame { ordinal, event }).expect("written");
        }
        writer.flush().expect("flushed");
        writer.get_mut().clone()
    }

    #[test]
    fn a_mutated_log_still_reads_and_differs_in_one_bit_of_one_frame() {
        let bytes = log();
        let found = frames(&bytes).expect("frames");
        assert_eq!(found.len(), 2);
        let mut rng = Rng(7);
        for frame in &found {
            let (mutated, what) = mutate(&bytes, frame, &mut rng);
            let flipped: u32 = bytes[..frame.frame.end - 4]
                .iter()
                .zip(&mutated)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flipped, 1, "{what}");
            // The reader accepts it: only replay can tell.
            let events: Vec<u64> = {
                let mut reader = LogReader::new(&mutated[..]).expect("header");
                std::iter::from_fn(|| reader.next_frame().expect("valid frames"))
                    .map(|frame| frame.ordinal)
                    .collect()
            };
            assert_eq!(events.len(), 2, "{what}");
        }
    }
}
