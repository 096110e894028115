//! `cargo xtask soak replay --minutes N`: determinism over long runs. The kv guest is
//! recorded for N minutes under a mixed load (16 clients, SETs and GETs of random keys
//! and sizes, INCRs), then replayed; the sample guests `hello` (timer ticks and
//! computation) and `exits` (PIO, MMIO, HLT loops) are recorded and replayed too, one per
//! core. Every replay must end IDENTICAL; the soak prints the exits replayed, the log
//! bytes, and replay time against recorded time per run.

use crate::util::Failure;
use ftvm_tests::{guest, wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One recorded run and its replay.
struct Soaked {
    what: String,
    exits: u64,
    log_bytes: u64,
    recorded: Duration,
    replayed: Duration,
}

fn stats_field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Replays `log` of `image`; fails unless IDENTICAL.
fn replay(ftvmm: &Path, image: &Path, log: &Path) -> Result<Duration, Failure> {
    let started = Instant::now();
    let out = Command::new(ftvmm)
        .args(["replay", "--console", "none", "--image"])
        .arg(image)
        .arg("--log")
        .arg(log)
        .output()
        .map_err(|err| Failure::new(format!("cannot run replay: {err}")))?;
    let took = started.elapsed();
    let verdict = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() || !verdict.contains("IDENTICAL") {
        return Err(Failure::new(format!(
            "replay of {} did not end IDENTICAL ({}): {verdict}",
            log.display(),
            out.status
        )));
    }
    Ok(took)
}

/// A recording: its log, the exits it ran and how long it took.
pub(crate) struct Recorded {
    pub log: PathBuf,
    pub exits: u64,
    pub took: Duration,
}

/// Records the sample guest `name` (run with `cmdline` until it ends by itself, and
/// `flags`) into `dir`.
pub(crate) fn record_sample(
    ftvmm: &Path,
    dir: &Path,
    name: &str,
    cmdline: &str,
    flags: &[&str],
) -> Result<Recorded, Failure> {
    let log = dir.join(format!("{name}.ftlog"));
    let started = Instant::now();
    let out = Command::new(ftvmm)
        .args(["run", "--mem", "64M", "--console", "none", "--stats"])
        .arg(format!("--cmdline={cmdline}"))
        .arg("--image")
        .arg(guest(name))
        .arg("--record")
        .arg(&log)
        .args(flags)
        .output()
        .map_err(|err| Failure::new(format!("cannot run ftvmm: {err}")))?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(Failure::new(format!(
            "{name} {cmdline}: {}: {stderr}",
            out.status
        )));
    }
    let exits = stats_field(&stderr, "exit_ordinal")
        .ok_or_else(|| Failure::new(format!("no stats from ftvmm: {stderr}")))?;
    Ok(Recorded { log, exits, took })
}

/// A sample guest that ends by itself, recorded then replayed.
fn sample(ftvmm: &Path, dir: &Path, name: &str, cmdline: &str) -> Result<Soaked, Failure> {
    let image = guest(name);
    let Recorded {
        log,
        exits,
        took: recorded,
    } = record_sample(ftvmm, dir, name, cmdline, &[])?;
    let replayed = replay(ftvmm, &image, &log)?;
    let log_bytes = std::fs::metadata(&log).map_or(0, |meta| meta.len());
    std::fs::remove_file(&log).ok();
    Ok(Soaked {
        what: format!("{name} {cmdline}"),
        exits,
        log_bytes,
        recorded,
        replayed,
    })
}

/// The kv guest recorded for `minutes` under a mixed load, then replayed.
fn kv(ftvmm: &Path, kv: &Path, dir: &Path, minutes: u64) -> Result<Soaked, Failure> {
    let (
        Recorded {
            log,
            exits,
            took: recorded,
        },
        round,
    ) = record_kv(
        ftvmm,
        kv,
        dir,
        Duration::from_secs(minutes * 60),
        20_000,
        &[],
    )?;
    let replayed = replay(ftvmm, kv, &log)?;
    let log_bytes = std::fs::metadata(&log).map_or(0, |meta| meta.len());
    std::fs::remove_file(&log).ok();
    Ok(Soaked {
        what: format!("kv, {minutes} min, {round} rounds of 60000 mixed requests (16 clients)"),
        exits,
        log_bytes,
        recorded,
        replayed,
    })
}

/// Records the kv guest (image `kv`, with `flags`) into `dir` under a mixed load of at
/// least `load` (whole rounds of `requests` SETs, GETs and INCRs each, 16 clients);
/// returns the recording and the rounds run.
pub(crate) fn record_kv(
    ftvmm: &Path,
    kv: &Path,
    dir: &Path,
    load: Duration,
    requests: u32,
    flags: &[&str],
) -> Result<(Recorded, u32), Failure> {
    let ns = NetNs::with_tap("soak");
    let disk = dir.join("kv.img");
    // Sparse: room for every SET of the run in the guest's log.
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len((256 + 256 * load.as_secs().div_ceil(60)) << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let log = dir.join("kv.ftlog");
    let mut command = ns.command(ftvmm);
    command
        .args(["run", "--mem", "256M", "--stats", "--console", "none"])
        .args(["--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .arg("--disk")
        .arg(&disk)
        .arg("--image")
        .arg(kv)
        .arg("--record")
        .arg(&log)
        .args(flags)
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|err| Failure::new(format!("cannot start ftvmm: {err}")))?;
    if !wait_for_pong(&ns, Duration::from_secs(30)) {
        let _ = child.kill();
        return Err(Failure::new("the kv guest did not answer PING"));
    }
    let until = Instant::now() + load;
    let mut round = 0u32;
    while Instant::now() < until {
        // Value sizes and key spaces vary by round; SET, GET and INCR interleave.
        let size = [3u32, 64, 512, 4096][round as usize % 4];
        let out = ns
            .command("redis-benchmark")
            .args(["-h", GUEST_IP, "-t", "set,get,incr", "-c", "16", "-q"])
            .args([
                "-n",
                &requests.to_string(),
                "-r",
                "10000",
                "-d",
                &size.to_string(),
            ])
            .output()
            .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
        if !out.status.success() {
            let _ = child.kill();
            return Err(Failure::new(format!(
                "redis-benchmark: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        round += 1;
    }
    // SAFETY: kill(2) on our own child's pid (ip netns exec execs ftvmm in place).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child
        .wait_with_output()
        .map_err(|err| Failure::new(format!("ftvmm did not stop: {err}")))?;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let exits = stats_field(&stderr, "exit_ordinal")
        .ok_or_else(|| Failure::new(format!("no stats from ftvmm: {stderr}")))?;
    Ok((Recorded { log, exits, took }, round))
}

/// Exits of the `exits` guest's loops unless the soak must reach a total.
const SAMPLE_EXITS: u64 = 4_200_000;

/// How many sample guests record or replay at once: each is one vCPU thread, so one
/// per core (two on the hosts this project is built on) halves the soak's wall time.
fn sample_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().min(4))
}

/// Records and replays each `(name, cmdline)` job, `workers` at a time, each in its own
/// scratch directory under `dir`; the results come back in job order.
fn samples(
    ftvmm: &Path,
    dir: &Path,
    jobs: &[(&str, String)],
    workers: usize,
) -> Vec<Result<Soaked, Failure>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect::<Vec<_>>());
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, cmdline)) = jobs.get(index) else {
                    return;
                };
                let job_dir = dir.join(format!("sample-{index}"));
                let result = std::fs::create_dir_all(&job_dir)
                    .map_err(|err| Failure::new(format!("scratch dir: {err}")))
                    .and_then(|()| sample(ftvmm, &job_dir, name, cmdline));
                // Progress for a run that can take hours; the table comes at the end.
                eprintln!(
                    "soak: {name} {cmdline}: {}",
                    match &result {
                        Ok(run) => format!("{} exits replayed IDENTICAL", run.exits),
                        Err(err) => format!("FAILED: {err}"),
                    }
                );
                results.lock().unwrap_or_else(|poison| poison.into_inner())[index] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|poison| poison.into_inner())
        .into_iter()
        .map(|result| result.unwrap_or_else(|| Err(Failure::new("a sample job did not run"))))
        .collect()
}

/// `cargo xtask soak replay --minutes N [--exits E]`: with `at_least`, the `exits`
/// guest's loops are sized so that the soak replays at least that many exits in all.
/// The kv guest runs alone (its load needs the cores); the sample guests run one per core.
pub fn replay_soak(minutes: u64, at_least: Option<u64>) -> Result<(), Failure> {
    let (ftvmm, kv_image) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let workers = sample_workers();
    println!(
        "replay soak: record, then replay; every replay must end IDENTICAL; sample guests {workers} at a time"
    );
    let started = Instant::now();
    let mut runs = vec![kv(&ftvmm, &kv_image, &dir, minutes)];
    let so_far: u64 = runs.iter().flatten().map(|run| run.exits).sum();
    let loops = at_least.map_or(SAMPLE_EXITS, |total| {
        total.saturating_sub(so_far).max(SAMPLE_EXITS)
    });
    // PIO and MMIO round trips share most of it, first as they take longest; halts (each
    // waits for a tick) a tenth; then hello's timer ticks and computation.
    let mut jobs: Vec<(&str, String)> = [("pio", 45), ("mmio", 45), ("hlt", 10)]
        .into_iter()
        .map(|(op, share)| ("exits", format!("op={op} n={}", loops * share / 100)))
        .collect();
    jobs.push(("hello", "ticks=20000 tick_us=100 work=2000".to_owned()));
    runs.extend(samples(&ftvmm, &dir, &jobs, workers));
    let mut total = 0u64;
    let mut failed = None;
    for run in runs {
        match run {
            Ok(run) => {
                total += run.exits;
                println!(
                    "{:<64} {:>11} exits {:>11} log bytes  recorded {:>7.1} s  replayed {:>7.1} s  (ratio {:.2})  IDENTICAL",
                    run.what,
                    run.exits,
                    run.log_bytes,
                    run.recorded.as_secs_f64(),
                    run.replayed.as_secs_f64(),
                    run.replayed.as_secs_f64() / run.recorded.as_secs_f64()
                );
            }
            Err(err) => {
                println!("FAILED: {err}");
                failed.get_or_insert(err);
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    match failed {
        Some(err) => Err(err),
        None => {
            println!(
                "total: {total} exits replayed, 0 divergences, {:.0} min",
                started.elapsed().as_secs_f64() / 60.0
            );
            Ok(())
        }
    }
}
