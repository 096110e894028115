//! `cargo xtask bench disk`: private disks (`--disk-private`) against a shared disk
//! (release build).
//!
//! - Log bytes: the kv guest boots on a disk holding a long log (it reads the whole log
//!   back: the read-heavy part), serves a GET load, then a SET load, recorded to a file
//!   (the frames a pair streams to its backup, heartbeats aside), shared and private in
//!   alternating order. Printed: disk reads, their log bytes per read, log bytes per
//!   request of each load.
//! - Clone: kv alone with a private 8 GiB disk, mostly unwritten, and with 1 GiB written,
//!   cloned under a redis SET load: the pause and its parts, the disk blocks sent, the
//!   clone's time against what its bytes take at the link's measured throughput, and how
//!   much of the new backup's disk file is allocated (sparse stays sparse).

use crate::bench_clone::{link_throughput, rps, spread, spread_to, start_benchmark, versus_link};
use crate::util::Failure;
use ftvm_tests::{wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Rounds of the log-bytes part (each runs shared and private).
const ROUNDS: usize = 3;
/// Trials of each clone case.
const CLONE_TRIALS: usize = 3;
/// The disk of the log-bytes part.
const LOG_DISK: u64 = 64 << 20;
/// SETs of 4000-byte values that fill the disk's log before the boot that reads it.
const FILL_SETS: u32 = 8_000;
/// Requests of each load of the log-bytes part.
const REQUESTS: u32 = 20_000;
/// The clone cases' disk.
const CLONE_DISK: u64 = 8 << 30;
/// Bytes written before the clone in the "1 GiB written" case (at 1 GiB on, away from
/// the kv guest's log at the start of the disk).
const WRITTEN: u64 = 1 << 30;

struct Setup {
    ftvmm: PathBuf,
    kv: PathBuf,
    dir: PathBuf,
}

/// A sparse file of `len` bytes at `path`.
fn sparse(path: &Path, len: u64) -> Result<(), Failure> {
    std::fs::File::create(path)
        .and_then(|file| file.set_len(len))
        .map_err(|err| Failure::new(format!("disk image {}: {err}", path.display())))
}

/// `ftvmm run` of kv in `ns` on `tap`, its disk `disk` (`private` or shared), stderr to
/// `log`, plus `extra`.
fn kv(
    setup: &Setup,
    ns: &NetNs,
    tap: &str,
    disk: &Path,
    private: bool,
    log: &str,
    extra: &[&str],
) -> Result<Command, Failure> {
    let err = std::fs::File::create(setup.dir.join(log))
        .map_err(|err| Failure::new(format!("log file: {err}")))?;
    let mut command = ns.command(&setup.ftvmm);
    command
        .args(["run", "--mem", "256M", "--image"])
        .arg(&setup.kv)
        .args(["--console", "none", "--mac", GUEST_MAC, "--tap", tap])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .arg("--disk")
        .arg(disk)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(err);
    if private {
        command.arg("--disk-private");
    }
    Ok(command)
}

/// Runs redis-benchmark `test` with `values` bytes; fails unless it succeeded.
fn benchmark(ns: &NetNs, test: &str, values: usize) -> Result<(), Failure> {
    let out = ns
        .command("redis-benchmark")
        .args(["-h", GUEST_IP, "-t", test, "-c", "4", "-q"])
        .args(["-d", &values.to_string(), "-n", &REQUESTS.to_string()])
        .output()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "redis-benchmark {test}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// Asks kv to power off and waits for `child`; fails unless it ended with 0.
fn shut_down(ns: &NetNs, mut child: std::process::Child, log: &Path) -> Result<(), Failure> {
    let _ = ns
        .command("redis-cli")
        .args(["-h", GUEST_IP, "SHUTDOWN"])
        .output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return if status.success() {
                Ok(())
            } else {
                Err(Failure::new(format!(
                    "kv ended with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )))
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(Failure::new("kv did not power off"))
}

fn spawn(command: &mut Command) -> Result<std::process::Child, Failure> {
    command
        .spawn()
        .map_err(|err| Failure::new(format!("cannot start ftvmm: {err}")))
}

/// A disk whose kv log holds [`FILL_SETS`] SETs of 4000 bytes.
fn filled_disk(setup: &Setup, ns: &NetNs) -> Result<PathBuf, Failure> {
    let disk = setup.dir.join("filled.img");
    sparse(&disk, LOG_DISK)?;
    let child = spawn(&mut kv(setup, ns, "tap-a", &disk, false, "fill.err", &[])?)?;
    if !wait_for_pong(ns, Duration::from_secs(30)) {
        return Err(Failure::new("kv did not answer PING (filling its disk)"));
    }
    let out = ns
        .command("redis-benchmark")
        .args(["-h", GUEST_IP, "-t", "set", "-c", "4", "-q", "-d", "4000"])
        .args(["-r", "1000000", "-n", &FILL_SETS.to_string()])
        .output()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
    if !out.status.success() {
        return Err(Failure::new("redis-benchmark could not fill the disk"));
    }
    shut_down(ns, child, &setup.dir.join("fill.err"))?;
    Ok(disk)
}

/// What one recorded run's log holds.
struct LogFigures {
    reads: u64,
    read_bytes: u64,
    disk_data: u64,
    total: u64,
    /// Log bytes of the GET load, then of the SET load (each: bytes recorded while it
    /// ran).
    get: u64,
    set: u64,
}

/// Boots kv on a copy of `filled` (`private` or shared), recording; GET then SET load.
fn log_round(
    setup: &Setup,
    ns: &NetNs,
    filled: &Path,
    private: bool,
) -> Result<LogFigures, Failure> {
    let disk = setup.dir.join("run.img");
    std::fs::copy(filled, &disk).map_err(|err| Failure::new(format!("copy the disk: {err}")))?;
    let log = setup.dir.join("run.log");
    let err = setup.dir.join("run.err");
    let child = spawn(&mut kv(
        setup,
        ns,
        "tap-a",
        &disk,
        private,
        "run.err",
        &["--record", log.to_str().unwrap_or_default()],
    )?)?;
    let log_len = || std::fs::metadata(&log).map(|meta| meta.len()).unwrap_or(0);
    if !wait_for_pong(ns, Duration::from_secs(60)) {
        return Err(Failure::new(format!(
            "kv did not answer PING: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        )));
    }
    let booted = log_len();
    benchmark(ns, "get", 3)?;
    let got = log_len();
    benchmark(ns, "set", 100)?;
    let set = log_len();
    shut_down(ns, child, &err)?;
    let summary = ftvm_log::summary::summarize(&log, None)
        .map_err(|err| Failure::new(format!("read the log: {err}")))?;
    if let Some(err) = summary.error {
        return Err(Failure::new(format!("the log is unreadable: {err}")));
    }
    let kind = |name: &str| {
        summary
            .by_kind()
            .into_iter()
            .find(|(kind, _, _)| *kind == name)
            .map_or((0, 0), |(_, frames, bytes)| (frames, bytes))
    };
    let (reads, read_bytes) = if private {
        kind("disk-read-crc")
    } else {
        kind("disk-read")
    };
    if reads == 0 || booted == 0 {
        return Err(Failure::new("the boot read nothing from the disk"));
    }
    Ok(LogFigures {
        reads,
        read_bytes,
        disk_data: std::fs::metadata(filled).map(|m| m.len()).unwrap_or(0),
        total: summary.bytes,
        get: got - booted,
        set: set - got,
    })
}

/// The log-bytes part.
fn log_bytes(setup: &Setup) -> Result<(), Failure> {
    let ns = NetNs::with_bridged_taps("bdisk", &["tap-a"]);
    let filled = filled_disk(setup, &ns)?;
    println!(
        "log bytes: kv boots on a {} MiB disk holding {FILL_SETS} SETs of 4000 bytes (its boot reads the whole log), then {REQUESTS} GETs, then {REQUESTS} SETs of 100 bytes; recorded, {ROUNDS} rounds alternating the order, min/median/max",
        LOG_DISK >> 20
    );
    let mut rows: [Vec<LogFigures>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for private in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            rows[usize::from(private)].push(log_round(setup, &ns, &filled, private)?);
        }
    }
    println!(
        "{:<8} {:>12} {:>26} {:>22} {:>20} {:>20} {:>26}",
        "disk",
        "disk reads",
        "log bytes of reads",
        "log B / disk read",
        "log B / GET request",
        "log B / SET request",
        "log bytes total"
    );
    for (private, figures) in rows.iter().enumerate() {
        let of = |f: fn(&LogFigures) -> f64| spread(figures.iter().map(f).collect());
        let count = |f: fn(&LogFigures) -> f64| spread_to(figures.iter().map(f).collect(), 0);
        println!(
            "{:<8} {:>12} {:>26} {:>22} {:>20} {:>20} {:>26}",
            if private == 1 { "private" } else { "shared" },
            count(|f| f.reads as f64),
            count(|f| f.read_bytes as f64),
            of(|f| f.read_bytes as f64 / f.reads as f64),
            of(|f| f.get as f64 / f64::from(REQUESTS)),
            of(|f| f.set as f64 / f64::from(REQUESTS)),
            count(|f| f.total as f64),
        );
    }
    if let Some(f) = rows[0].first() {
        println!(
            "    (the disk file is {} bytes; the GET load reads no disk: kv serves it from memory)",
            f.disk_data
        );
    }
    Ok(())
}

/// One clone of kv with a private [`CLONE_DISK`] disk, `written` bytes of it written
/// first, under a SET load.
struct CloneTrial {
    pause_ms: f64,
    clone_ms: f64,
    bytes: u64,
    parts: String,
    disk_line: String,
    /// Bytes allocated to the new backup's disk file.
    allocated: u64,
    rps: f64,
    /// The furthest disk copy progress the primary's status line showed (copied, data
    /// bytes), and how many status lines showed one.
    progress: (u64, u64, u32),
}

/// Polls the status line at `control` until `done`: the furthest clone disk progress seen
/// (copied bytes, data bytes) and how many lines showed one.
fn watch_progress(
    control: PathBuf,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64, u32)> {
    std::thread::spawn(move || {
        let mut seen = (0, 0, 0);
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok(line) = ftvm_tests::unix_request(&control, b"status\n") {
                let word = |key: &str| {
                    line.split_whitespace()
                        .find_map(|word| word.strip_prefix(key))
                        .and_then(|value| value.parse::<u64>().ok())
                };
                if let (Some(copied), Some(data)) = (
                    word("clone_disk_copied_bytes="),
                    word("clone_disk_data_bytes="),
                ) {
                    seen = (seen.0.max(copied), seen.1.max(data), seen.2 + 1);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

fn clone_trial(setup: &Setup, written: u64, trial: usize) -> Result<CloneTrial, Failure> {
    let ns = NetNs::with_bridged_taps(&format!("bdcl{trial}"), &["tap-a", "tap-b"]);
    let (source, target) = (setup.dir.join("a.img"), setup.dir.join("b.img"));
    sparse(&source, CLONE_DISK)?;
    sparse(&target, CLONE_DISK)?;
    if written > 0 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&source)
            .map_err(|err| Failure::new(format!("disk: {err}")))?;
        let mut chunk = vec![0u8; 1 << 20];
        for (index, offset) in (WRITTEN..WRITTEN + written).step_by(1 << 20).enumerate() {
            chunk.fill((index % 251) as u8 + 1);
            file.write_all_at(&chunk, offset)
                .map_err(|err| Failure::new(format!("disk: {err}")))?;
        }
    }
    let arbiter = format!("local:{}", setup.dir.join("arbiter").display());
    let vm = format!("bdisk-{written}-{trial}");
    let addr = "127.0.0.1:7712";
    let mut common = vec!["--vm", &vm, "--arbiter", &arbiter];
    let tls = ftvm_tests::replica_tls();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    common.extend(tls);
    let control = setup.dir.join("clone-a.sock");
    let mut primary = spawn(
        kv(setup, &ns, "tap-a", &source, true, "clone-a.err", &common)?
            .args(["--generation", "1", "--clone-listen", addr])
            .arg("--control")
            .arg(&control),
    )?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_progress(control, done.clone());
    let result = (|| {
        if !wait_for_pong(&ns, Duration::from_secs(60)) {
            return Err(Failure::new("kv did not answer PING"));
        }
        let run = start_benchmark(&ns)?;
        std::thread::sleep(Duration::from_millis(300));
        let mut backup = spawn(
            kv(setup, &ns, "tap-b", &target, true, "clone-b.err", &common)?.args([
                "--generation",
                "2",
                "--role",
                "backup",
                "--clone-from",
                addr,
            ]),
        )?;
        let log = setup.dir.join("clone-a.err");
        let deadline = Instant::now() + Duration::from_secs(300);
        let line = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|line| line.contains("backup cloned at")) {
                let disk_line = text
                    .lines()
                    .find(|line| line.contains("clone: disk copied"))
                    .unwrap_or_default()
                    .to_owned();
                break Ok((line.to_owned(), disk_line));
            }
            if Instant::now() > deadline || text.contains("clone: aborted") {
                break Err(Failure::new(format!(
                    "no clone: {text}\n{}",
                    std::fs::read_to_string(setup.dir.join("clone-b.err")).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        done.store(true, std::sync::atomic::Ordering::Release);
        let rps = rps(run)?;
        let _ = backup.kill();
        let _ = backup.wait();
        let (line, disk_line) = line?;
        let number = |key: &str| -> Option<f64> {
            let rest = &line[line.find(key)? + key.len()..];
            rest.split([' ', ',']).next()?.parse().ok()
        };
        let parsed = (|| {
            Some(CloneTrial {
                pause_ms: number("pause ")?,
                clone_ms: number("clone ")?,
                bytes: line
                    .strip_suffix(" bytes")?
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()?,
                parts: line.split(" ms (").nth(1)?.split(')').next()?.to_owned(),
                disk_line: disk_line
                    .split("disk copied: ")
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned(),
                allocated: std::fs::metadata(&target).ok()?.blocks() * 512,
                rps,
                progress: (0, 0, 0),
            })
        })();
        parsed.ok_or_else(|| Failure::new(format!("cannot read the clone line: {line}")))
    })();
    let _ = primary.kill();
    let _ = primary.wait();
    done.store(true, std::sync::atomic::Ordering::Release);
    let progress = watcher.join().unwrap_or_default();
    std::fs::remove_file(&source).ok();
    std::fs::remove_file(&target).ok();
    result.map(|trial| CloneTrial { progress, ..trial })
}

/// The clone part.
fn clones(setup: &Setup) -> Result<(), Failure> {
    let link = link_throughput()?;
    println!(
        "clone: kv alone, 256 MiB RAM, a private {} GiB disk, cloned under redis SET traffic; link: loopback TCP {:.0} MB/s measured (the clone's stream is TLS); {CLONE_TRIALS} trials, min/median/max",
        CLONE_DISK >> 30,
        link / 1e6
    );
    println!(
        "{:<28} {:>18} {:>18} {:>14} {:>15} {:>18} {:>12}",
        "disk",
        "pause ms",
        "clone ms",
        "bytes (med)",
        "clone / link",
        "backup allocated",
        "SET req/s"
    );
    for (name, written) in [
        ("8 GiB, mostly unwritten", 0),
        ("8 GiB, 1 GiB written", WRITTEN),
    ] {
        let mut trials = Vec::new();
        for trial in 0..CLONE_TRIALS {
            trials.push(clone_trial(setup, written, trial)?);
        }
        let of = |f: fn(&CloneTrial) -> f64| spread(trials.iter().map(f).collect());
        let mut bytes: Vec<u64> = trials.iter().map(|t| t.bytes).collect();
        bytes.sort_unstable();
        let versus = spread(
            trials
                .iter()
                .map(|t| versus_link(t.clone_ms, t.bytes, link))
                .collect(),
        );
        println!(
            "{name:<28} {:>18} {:>18} {:>14} {versus:>15} {:>18} {:>12}",
            of(|t| t.pause_ms),
            of(|t| t.clone_ms),
            bytes[bytes.len() / 2],
            of(|t| t.allocated as f64 / f64::from(1 << 20)) + " MiB",
            of(|t| t.rps),
        );
        for t in &trials {
            println!(
                "    pause {:.1} ms ({}); disk: {}; status showed the copy {} times, up to {} of {} bytes",
                t.pause_ms, t.parts, t.disk_line, t.progress.2, t.progress.0, t.progress.1
            );
        }
    }
    Ok(())
}

/// Runs both parts.
pub fn disk() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let setup = Setup { ftvmm, kv, dir };
    println!("private disks vs a shared disk (release build)");
    let result = log_bytes(&setup).and_then(|()| clones(&setup));
    std::fs::remove_dir_all(&setup.dir).ok();
    result
}
