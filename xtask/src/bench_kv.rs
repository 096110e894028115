//! `cargo xtask bench kv` and `cargo xtask bench record`: the kv guest under Debian's
//! redis-benchmark, inside a network namespace made for the run.

use crate::util::{cargo, project_root, run, Failure};
use ftvm_tests::{wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Requests per redis-benchmark test.
const REQUESTS: u32 = 4000;

/// One redis-benchmark figure.
#[derive(Debug, Clone)]
struct Figure {
    test: String,
    clients: u32,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What one kv session measured.
struct Session {
    figures: Vec<Figure>,
    requests: u64,
    exits: u64,
    injected: u64,
    wall: Duration,
    log_bytes: u64,
}

fn release_paths() -> Result<(PathBuf, PathBuf), Failure> {
    crate::setup()?;
    crate::build_guests()?;
    let root = project_root();
    run(cargo().current_dir(&root).args(["build", "--release", "--quiet", "-p", "ftvmm"]))?;
    Ok((root.join("target/release/ftvmm"), root.join("target/guest/kv.elf")))
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Boots kv in a fresh namespace, runs the benchmarks, stops it with SIGTERM.
fn session(ftvmm: &Path, kv: &Path, record: Option<&Path>, clients: &[u32], idle: Duration) -> Result<Session, Failure> {
    let ns = NetNs::with_tap("bench");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let disk = dir.join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(64 << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let mut command = ns.command(ftvmm);
    command
        .args(["run", "--mem", "128M", "--stats", "--console", "none", "--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .arg("--disk")
        .arg(&disk)
        .arg("--image")
        .arg(kv)
        .stderr(Stdio::piped());
    if let Some(log) = record {
        command.arg("--record").arg(log);
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|err| Failure::new(format!("cannot start ftvmm: {err}")))?;
    if !wait_for_pong(&ns, Duration::from_secs(30)) {
        let _ = child.kill();
        return Err(Failure::new("the kv guest did not answer PING"));
    }
    std::thread::sleep(idle);
    let mut figures = Vec::new();
    let mut requests = 0u64;
    for &clients in clients {
        let out = ns
            .command("redis-benchmark")
            .args(["-h", GUEST_IP, "-p", "6379", "-t", "set,get", "--csv"])
            .args(["-n", &REQUESTS.to_string(), "-c", &clients.to_string()])
            .output()
            .map_err(|err| Failure::new(format!("cannot run redis-benchmark: {err}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().skip(1) {
            let cells: Vec<String> = line.split(',').map(|cell| cell.trim_matches('"').to_owned()).collect();
            let number = |index: usize| cells.get(index).and_then(|cell| cell.parse::<f64>().ok());
            if let (Some(test), Some(rps), Some(p50), Some(p99)) = (cells.first(), number(1), number(4), number(6)) {
                figures.push(Figure { test: test.clone(), clients, rps, p50_ms: p50, p99_ms: p99 });
                requests += u64::from(REQUESTS);
            }
        }
        if !out.status.success() || figures.is_empty() {
            return Err(Failure::new(format!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
    }
    // SAFETY: kill(2) on our own child's pid (ip netns exec execs ftvmm in place).
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child
        .wait_with_output()
        .map_err(|err| Failure::new(format!("ftvmm did not stop: {err}")))?;
    let wall = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let exits = field(&stderr, "exit_ordinal").ok_or_else(|| Failure::new(format!("no stats from ftvmm: {stderr}")))?;
    let injected = field(&stderr, "injected").unwrap_or(0);
    let log_bytes = record.and_then(|log| std::fs::metadata(log).ok()).map_or(0, |meta| meta.len());
    drop(ns);
    std::fs::remove_dir_all(&dir).ok();
    Ok(Session { figures, requests, exits, injected, wall, log_bytes })
}

fn print_figures(label: &str, session: &Session) {
    for figure in &session.figures {
        println!(
            "{label:<10} {:<5} {:>3} clients {:>9.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms",
            figure.test, figure.clients, figure.rps, figure.p50_ms, figure.p99_ms
        );
    }
    println!(
        "{label:<10} {:.2} guest-caused exits/request, {:.2} interrupts/request ({} requests, all exits of the run counted)",
        session.exits as f64 / session.requests as f64,
        session.injected as f64 / session.requests as f64,
        session.requests
    );
}

/// `cargo xtask bench kv`.
pub fn kv() -> Result<(), Failure> {
    let (ftvmm, kv) = release_paths()?;
    println!("kv guest under redis-benchmark (-n {REQUESTS} per test), TAP in a namespace, disk on a file");
    let plain = session(&ftvmm, &kv, None, &[1, 16], Duration::ZERO)?;
    print_figures("kv", &plain);
    println!("(the exit-bound ceiling is exits/s from `cargo xtask bench exits` divided by exits/request)");
    Ok(())
}

/// `cargo xtask bench record`.
pub fn record() -> Result<(), Failure> {
    let (ftvmm, kv) = release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let log = dir.join("kv.ftlog");
    println!("kv throughput with and without recording, side by side (-n {REQUESTS} per test)");
    let mut ratios = Vec::new();
    for round in 0..2 {
        let plain = session(&ftvmm, &kv, None, &[1, 16], Duration::ZERO)?;
        let recorded = session(&ftvmm, &kv, Some(&log), &[1, 16], Duration::ZERO)?;
        if round == 0 {
            print_figures("plain", &plain);
            print_figures("recording", &recorded);
        }
        for (a, b) in plain.figures.iter().zip(&recorded.figures) {
            ratios.push((format!("{} c={}", a.test, a.clients), b.rps / a.rps));
        }
        if round == 1 {
            println!(
                "log: {} bytes for {} requests = {:.0} bytes/request (SET payload 3 bytes + RESP framing)",
                recorded.log_bytes,
                recorded.requests,
                recorded.log_bytes as f64 / recorded.requests as f64
            );
            let started = Instant::now();
            let replay = Command::new(&ftvmm)
                .args(["replay", "--console", "none"])
                .arg("--image")
                .arg(&kv)
                .arg("--log")
                .arg(&log)
                .output()
                .map_err(|err| Failure::new(format!("cannot run replay: {err}")))?;
            let replay_wall = started.elapsed();
            let verdict = String::from_utf8_lossy(&replay.stderr).trim().to_owned();
            println!(
                "replay wall time {:.2} s vs record wall time {:.2} s (ratio {:.2}): {verdict}",
                replay_wall.as_secs_f64(),
                recorded.wall.as_secs_f64(),
                replay_wall.as_secs_f64() / recorded.wall.as_secs_f64()
            );
        }
    }
    for (name, ratio) in &ratios {
        println!("throughput ratio recording/plain {name:<12} {ratio:.3}");
    }
    let idle = Duration::from_secs(5);
    let quiet = session(&ftvmm, &kv, Some(&log), &[], idle)?;
    println!(
        "idle log bandwidth: {} bytes over {:.1} s of an idle kv guest = {:.0} bytes/s (includes boot)",
        quiet.log_bytes,
        quiet.wall.as_secs_f64(),
        quiet.log_bytes as f64 / quiet.wall.as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
