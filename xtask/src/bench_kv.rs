//! `cargo xtask bench kv` and `cargo xtask bench record`: the kv guest under Debian's
//! redis-benchmark, inside a network namespace made for the run.

use crate::util::{project_root, Failure};
use ftvm_tests::{wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Requests per redis-benchmark test with one client; 16 clients get five times as many so
/// that the fast tests still run for a good fraction of a second.
const REQUESTS: u32 = 4000;

fn requests_for(clients: u32) -> u32 {
    if clients > 1 {
        REQUESTS * 5
    } else {
        REQUESTS
    }
}

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

fn field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Boots kv in a fresh namespace, runs the benchmarks, stops it with SIGTERM.
fn session(
    ftvmm: &Path,
    kv: &Path,
    record: Option<&Path>,
    tests: &[&str],
    clients: &[u32],
    after_boot: &dyn Fn(),
) -> Result<Session, Failure> {
    let ns = NetNs::with_tap("bench");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let disk = dir.join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(64 << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let mut command = ns.command(ftvmm);
    command
        .args([
            "run",
            "--mem",
            "128M",
            "--stats",
            "--console",
            "none",
            "--tap",
            "tap0",
            "--mac",
            GUEST_MAC,
        ])
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
    after_boot();
    let mut figures = Vec::new();
    let mut requests = 0u64;
    for &clients in clients {
        let out = ns
            .command("redis-benchmark")
            .args([
                "-h",
                GUEST_IP,
                "-p",
                "6379",
                "-t",
                &tests.join(","),
                "--csv",
            ])
            .args([
                "-n",
                &requests_for(clients).to_string(),
                "-c",
                &clients.to_string(),
            ])
            .output()
            .map_err(|err| Failure::new(format!("cannot run redis-benchmark: {err}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().skip(1) {
            let cells: Vec<String> = line
                .split(',')
                .map(|cell| cell.trim_matches('"').to_owned())
                .collect();
            let number = |index: usize| cells.get(index).and_then(|cell| cell.parse::<f64>().ok());
            if let (Some(test), Some(rps), Some(p50), Some(p99)) =
                (cells.first(), number(1), number(4), number(6))
            {
                figures.push(Figure {
                    test: test.clone(),
                    clients,
                    rps,
                    p50_ms: p50,
                    p99_ms: p99,
                });
                requests += u64::from(requests_for(clients));
            }
        }
        if !out.status.success() || figures.is_empty() {
            return Err(Failure::new(format!(
                "redis-benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
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
    let exits = field(&stderr, "exit_ordinal")
        .ok_or_else(|| Failure::new(format!("no stats from ftvmm: {stderr}")))?;
    let injected = field(&stderr, "injected").unwrap_or(0);
    let log_bytes = record
        .and_then(|log| std::fs::metadata(log).ok())
        .map_or(0, |meta| meta.len());
    drop(ns);
    std::fs::remove_dir_all(&dir).ok();
    Ok(Session {
        figures,
        requests,
        exits,
        injected,
        wall,
        log_bytes,
    })
}

fn print_figures(label: &str, session: &Session) {
    if session.requests == 0 {
        return;
    }
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

/// PIO exits per second through ftvmm on this host right now (the exit-bound ceiling).
fn pio_exits_per_second(ftvmm: &Path) -> Result<f64, Failure> {
    Ok(1e9 / pio_ns_per_exit(ftvmm, &[])?)
}

/// `cargo xtask bench kv`.
pub fn kv() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    println!("kv guest under redis-benchmark (-n {REQUESTS} per test with 1 client, 5x that with 16), TAP in a namespace, disk on a file;");
    println!("one VM per row; exits and interrupts per request net of an idle VM's boot");
    let idle = session(&ftvmm, &kv, None, &[], &[], &|| {})?;
    let ceiling = pio_exits_per_second(&ftvmm)?;
    println!(
        "{:<5} {:>7} {:>10} {:>9} {:>9} {:>11} {:>10} {:>12}",
        "test", "clients", "req/s", "p50 ms", "p99 ms", "exits/req", "irqs/req", "of ceiling"
    );
    for test in ["set", "get"] {
        for clients in [1u32, 16] {
            let one = session(&ftvmm, &kv, None, &[test], &[clients], &|| {})?;
            let figure = one
                .figures
                .first()
                .ok_or_else(|| Failure::new("no figure"))?;
            let requests = one.requests as f64;
            let exits = one.exits.saturating_sub(idle.exits) as f64 / requests;
            let irqs = one.injected.saturating_sub(idle.injected) as f64 / requests;
            println!(
                "{:<5} {:>7} {:>10.0} {:>9.3} {:>9.3} {:>11.2} {:>10.2} {:>11.0}%",
                figure.test,
                clients,
                figure.rps,
                figure.p50_ms,
                figure.p99_ms,
                exits,
                irqs,
                100.0 * figure.rps / (ceiling / exits)
            );
        }
    }
    println!("exit-bound ceiling: {ceiling:.0} PIO exits/s through ftvmm on this host (req/s ceiling = that / exits per request)");
    Ok(())
}

/// Nanoseconds per exit of the `exits` guest (PIO) under `ftvmm run` with `extra` flags;
/// the median of five runs.
fn pio_ns_per_exit(ftvmm: &Path, extra: &[&str]) -> Result<f64, Failure> {
    let exits = project_root().join("target/guest/exits.elf");
    let n = 10_000u64;
    let mut samples = Vec::new();
    for _ in 0..5 {
        let out = Command::new(ftvmm)
            .args([
                "run",
                "--console",
                "-",
                "--cmdline",
                &format!("op=pio n={n}"),
            ])
            .arg("--image")
            .arg(&exits)
            .args(extra)
            .output()
            .map_err(|err| Failure::new(format!("cannot run the exits guest: {err}")))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ns = field(&text, "ns")
            .ok_or_else(|| Failure::new(format!("no figure from the exits guest: {text}")))?;
        samples.push(ns as f64 / n as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// The cost of a registers digest and of a dirty-page digest, from runs that take one at
/// every exit against a recording that takes none.
fn digest_costs(ftvmm: &Path) -> Result<(), Failure> {
    let log = std::env::temp_dir().join(format!("ftvm-bench-digest-{}.ftlog", std::process::id()));
    let log = log.to_string_lossy().into_owned();
    let base = pio_ns_per_exit(
        ftvmm,
        &[
            "--record",
            &log,
            "--digest-every",
            "0",
            "--mem-digest-every",
            "0",
        ],
    )?;
    let regs = pio_ns_per_exit(
        ftvmm,
        &[
            "--record",
            &log,
            "--digest-every",
            "1",
            "--mem-digest-every",
            "0",
        ],
    )?;
    let mem = pio_ns_per_exit(
        ftvmm,
        &[
            "--record",
            &log,
            "--digest-every",
            "0",
            "--mem-digest-every",
            "1",
        ],
    )?;
    let live = pio_ns_per_exit(ftvmm, &[])?;
    std::fs::remove_file(&log).ok();
    println!(
        "digest cost: registers {:.1} us, dirty pages {:.1} us (PIO loop, few dirty pages); a PIO exit is {:.1} us live, {:.1} us recording without digests",
        (regs - base) / 1000.0,
        (mem - base) / 1000.0,
        live / 1000.0,
        base / 1000.0
    );
    Ok(())
}

/// `cargo xtask bench record`.
pub fn record() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let log = dir.join("kv.ftlog");
    const ROUNDS: usize = 3;
    println!("kv throughput with and without recording, side by side: {ROUNDS} rounds, the order alternating, -n {REQUESTS} per test with 1 client, 5x that with 16");
    let mut ratios: Vec<(String, Vec<f64>)> = Vec::new();
    let mut last = None;
    for round in 0..ROUNDS {
        let run =
            |record: Option<&Path>| session(&ftvmm, &kv, record, &["set", "get"], &[1, 16], &|| {});
        // Neither always runs first (on a colder or warmer machine).
        let (plain, recorded) = if round % 2 == 0 {
            let plain = run(None)?;
            (plain, run(Some(&log))?)
        } else {
            let recorded = run(Some(&log))?;
            (run(None)?, recorded)
        };
        for (a, b) in plain.figures.iter().zip(&recorded.figures) {
            let name = format!("{} c={}", a.test, a.clients);
            match ratios.iter_mut().find(|(known, _)| *known == name) {
                Some((_, list)) => list.push(b.rps / a.rps),
                None => ratios.push((name, vec![b.rps / a.rps])),
            }
        }
        last = Some((plain, recorded));
    }
    let Some((plain, recorded)) = last else {
        return Err(Failure::new("no rounds ran"));
    };
    print_figures("plain", &plain);
    print_figures("recording", &recorded);
    for (name, list) in &mut ratios {
        list.sort_by(f64::total_cmp);
        println!(
            "throughput ratio recording/plain {name:<10} median {:.3} [{:.3}..{:.3}]",
            list[list.len() / 2],
            list[0],
            list[list.len() - 1]
        );
    }

    // What the log of the last recorded session is made of.
    let inspect = Command::new(&ftvmm)
        .args(["log", "inspect"])
        .arg(&log)
        .output()
        .map_err(|err| Failure::new(format!("cannot inspect the log: {err}")))?;
    let table = String::from_utf8_lossy(&inspect.stdout);
    let bytes_of = |kind: &str| -> u64 {
        table
            .lines()
            .find(|line| line.starts_with(kind))
            .and_then(|line| line.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let requests = recorded.requests as f64;
    let disk_reads = bytes_of("disk-read");
    let received = bytes_of("net-rx");
    let per_request = (recorded.log_bytes - disk_reads) as f64 / requests;
    println!(
        "log: {:.0} bytes/request without the boot-time disk reads ({disk_reads} bytes); of that {:.0} bytes/request are received frames, so {:.0} bytes/request of overhead",
        per_request,
        received as f64 / requests,
        per_request - received as f64 / requests
    );
    for line in table.lines().skip(2) {
        println!("  {line}");
    }
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
    // A replay that diverged or failed measured nothing worth a ratio.
    if !replay.status.success() || !verdict.contains("IDENTICAL") {
        return Err(Failure::new(format!(
            "the replay of the recorded session did not end IDENTICAL ({}): {verdict}",
            replay.status
        )));
    }
    println!(
        "replay wall time {:.2} s vs record wall time {:.2} s (ratio {:.2}, boot included in both): {verdict}",
        replay_wall.as_secs_f64(),
        recorded.wall.as_secs_f64(),
        replay_wall.as_secs_f64() / recorded.wall.as_secs_f64()
    );

    digest_costs(&ftvmm)?;

    let window = Duration::from_secs(5);
    let growth = std::cell::Cell::new(0u64);
    let log_len = || std::fs::metadata(&log).map_or(0, |meta| meta.len());
    session(&ftvmm, &kv, Some(&log), &[], &[], &|| {
        // Let the boot's disk reads and ARP settle, then watch an idle guest.
        std::thread::sleep(Duration::from_secs(1));
        let before = log_len();
        std::thread::sleep(window);
        growth.set(log_len().saturating_sub(before));
    })?;
    println!(
        "idle log bandwidth: {} bytes in {:.0} s of an idle kv guest (10 ms timer) = {:.0} bytes/s",
        growth.get(),
        window.as_secs_f64(),
        growth.get() as f64 / window.as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
