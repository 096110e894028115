//! `cargo xtask bench ft`: the kv guest as an FT pair against the same guest alone, side
//! by side, and failover times from SIGKILL of the primary to the first client reply.

use crate::util::Failure;
use ftvm_tests::{in_netns, wait_for_pong, NetNs, Reply, RespClient, GUEST_IP, GUEST_MAC};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Failover trials.
const TRIALS: usize = 20;
/// Requests per redis-benchmark test.
const REQUESTS: u32 = 20_000;

struct Setup {
    ftvmm: PathBuf,
    kv: PathBuf,
    dir: PathBuf,
}

/// What runs the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One VM.
    Solo,
    /// An FT pair, its channels under mutual TLS (as ftd runs them).
    Pair,
    /// An FT pair in plaintext (`--insecure`): what TLS costs, side by side.
    PlainPair,
}

/// One VM or one FT pair on a bridge; returns the namespace and the pids (primary
/// first).
fn start(setup: &Setup, tag: &str, mode: Mode) -> Result<(NetNs, Vec<u32>), Failure> {
    let disk = setup.dir.join(format!("{tag}.img"));
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(64 << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let mut ns = NetNs::with_bridged_taps(tag, &["tap-a", "tap-b"]);
    let arbiter = format!(
        "local:{}",
        setup.dir.join(format!("arbiter-{tag}")).display()
    );
    let command = |role: Option<&str>, tap: &str| {
        let mut command = ns.command(&setup.ftvmm);
        command
            .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", tap])
            .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
            .arg("--disk")
            .arg(&disk)
            .arg("--image")
            .arg(&setup.kv)
            .stderr(Stdio::null());
        if let Some(role) = role {
            command.args(["--role", role, "--vm", "bench", "--arbiter", &arbiter]);
            if mode == Mode::PlainPair {
                command.arg("--insecure");
            } else {
                command.args(ftvm_tests::replica_tls());
            }
            if role == "primary" {
                command.arg("--control").arg(control_socket(setup, tag));
            }
            match role {
                "primary" => command.args(["--log-listen", "127.0.0.1:7701"]),
                _ => command.args(["--log-connect", "127.0.0.1:7701"]),
            };
        }
        command
    };
    let mut pids = Vec::new();
    if mode != Mode::Solo {
        let mut primary = command(Some("primary"), "tap-a");
        let mut backup = command(Some("backup"), "tap-b");
        pids.push(ns.spawn(&mut primary));
        pids.push(ns.spawn(&mut backup));
    } else {
        let mut solo = command(None, "tap-a");
        pids.push(ns.spawn(&mut solo));
    }
    if !wait_for_pong(&ns, Duration::from_secs(30)) {
        return Err(Failure::new("the kv guest did not answer PING"));
    }
    Ok((ns, pids))
}

/// The primary's control socket in run `tag`.
fn control_socket(setup: &Setup, tag: &str) -> PathBuf {
    setup.dir.join(format!("{tag}.sock"))
}

/// What one redis-benchmark run gave.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time per request of each replica process (primary first), microseconds.
    cpu_us: [f64; 2],
    /// Log channel bandwidth during the run, Mbit/s (FT only).
    log_mbit: f64,
}

/// CPU seconds (user + system, all threads) process `pid` used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |at: usize| {
        fields
            .get(at)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf reads a constant of the running system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of stat(5); 11 and 12 after the command.
    (ticks(11) + ticks(12)) / per_second.max(1.0)
}

/// The primary's log bytes so far, from its control socket.
fn log_bytes(socket: &std::path::Path) -> Option<u64> {
    let status = ftvm_tests::unix_request(socket, b"status\n").ok()?;
    ftvm_tests::field(&status, "log_bytes_total")
}

/// redis-benchmark `test` with `clients` against the VM of `pids` (with the primary's
/// control socket at `control` for a pair).
fn benchmark(
    ns: &NetNs,
    pids: &[u32],
    control: Option<&std::path::Path>,
    test: &str,
    clients: u32,
) -> Result<Figures, Failure> {
    let cpu_before: Vec<f64> = pids.iter().map(|pid| cpu_seconds(*pid)).collect();
    let log_before = control.and_then(log_bytes);
    let started = Instant::now();
    let out = ns
        .command("redis-benchmark")
        .args([
            "-h",
            GUEST_IP,
            "-t",
            test,
            "--csv",
            "-n",
            &REQUESTS.to_string(),
        ])
        .args(["-c", &clients.to_string()])
        .output()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .nth(1)
        .ok_or_else(|| Failure::new(format!("no figures from redis-benchmark: {text}")))?;
    // "test","rps","avg","min","p50","p95","p99","max" (latencies in ms)
    let cells: Vec<f64> = line
        .split(',')
        .skip(1)
        .filter_map(|cell| cell.trim_matches('"').parse().ok())
        .collect();
    let (Some(rps), Some(p50_ms), Some(p99_ms)) = (cells.first(), cells.get(3), cells.get(5))
    else {
        return Err(Failure::new(format!("cannot read {line}")));
    };
    let mut cpu_us = [0.0; 2];
    for (index, (pid, before)) in pids.iter().zip(&cpu_before).enumerate().take(2) {
        cpu_us[index] = (cpu_seconds(*pid) - before) * 1e6 / f64::from(REQUESTS);
    }
    let log_mbit = match (log_before, control.and_then(log_bytes)) {
        (Some(before), Some(after)) => (after - before) as f64 * 8.0 / seconds / 1e6,
        _ => 0.0,
    };
    Ok(Figures {
        rps: *rps,
        p50_ms: *p50_ms,
        p99_ms: *p99_ms,
        cpu_us,
        log_mbit,
    })
}

/// One failover: SIGKILL of the primary while a client holds one connection. An idle
/// client (it sends its next write right after the kill) gives the time from the kill to
/// that write's reply; a busy client (writing back to back through the kill) gives the
/// longest pause between two replies from the kill on. Milliseconds.
fn failover_trial(setup: &Setup, trial: usize, busy: bool) -> Result<f64, Failure> {
    // A run of its own per trial: its arbiter directory too, or an earlier trial's claim
    // of generation 1 would make this trial's backup lose the go-live claim.
    let tag = format!("{}{trial}", if busy { "fb" } else { "fi" });
    let (mut ns, pids) = start(setup, &tag, Mode::Pair)?;
    let name = ns.name.clone();
    let (warm_tx, warm_rx) = std::sync::mpsc::channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<Instant>();
    let client = std::thread::spawn(move || {
        in_netns(&name, move || -> Result<f64, String> {
            let mut client =
                RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(20))
                    .map_err(|err| err.to_string())?;
            let mut set = |i: u32| -> Result<Instant, String> {
                let key = format!("k{i}");
                match client.call(&[b"SET", key.as_bytes(), b"v"]) {
                    Ok(Reply::Status(_)) => Ok(Instant::now()),
                    other => Err(format!("write {i}: {other:?}")),
                }
            };
            for i in 0..200u32 {
                set(i)?;
            }
            let _ = warm_tx.send(());
            if !busy {
                let killed = killed_rx.recv().map_err(|err| err.to_string())?;
                return Ok(set(200)?.duration_since(killed).as_secs_f64() * 1000.0);
            }
            let mut replies = vec![Instant::now()];
            let mut killed = None;
            let mut after = 0;
            for i in 200u32.. {
                replies.push(set(i)?);
                killed = killed.or_else(|| killed_rx.try_recv().ok());
                if killed.is_some_and(|killed| *replies.last().unwrap_or(&killed) > killed) {
                    after += 1;
                    if after == 100 {
                        break;
                    }
                }
            }
            let killed = killed.ok_or("no kill")?;
            let pause = replies
                .windows(2)
                .filter(|pair| pair[1] > killed)
                .map(|pair| pair[1].duration_since(pair[0]))
                .max()
                .unwrap_or_default();
            Ok(pause.as_secs_f64() * 1000.0)
        })
    });
    warm_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| Failure::new("the client did not start"))?;
    if busy {
        // Let the back-to-back writes get going.
        std::thread::sleep(Duration::from_millis(100));
    }
    ns.kill(pids[0]);
    let _ = killed_tx.send(Instant::now());
    let took = client
        .join()
        .map_err(|_| Failure::new("client thread panicked"))?
        .map_err(Failure::new)?;
    Ok(took)
}

/// What `bench ft` measures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// Throughput and latency FT vs solo, then failover times.
    All,
    /// Failover times only (`cargo xtask bench failover`).
    Failover,
}

/// `cargo xtask bench ft` / `bench failover`.
pub fn ft(parts: Parts) -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let setup = Setup { ftvmm, kv, dir };
    let result = if parts == Parts::All {
        measure(&setup)
    } else {
        Ok(())
    }
    .and_then(|()| failovers(&setup));
    std::fs::remove_dir_all(&setup.dir).ok();
    result
}

fn measure(setup: &Setup) -> Result<(), Failure> {
    println!(
        "kv: FT pair vs one VM, side by side (2 alternating rounds, -n {REQUESTS}, mean of the 2)"
    );
    println!(
        "{:<4} {:>2} {:>8} {:>8} {:>6} {:>15} {:>15} {:>15} {:>20} {:>8}",
        "test",
        "c",
        "solo r/s",
        "FT r/s",
        "ratio",
        "p50 solo->FT",
        "p99 solo->FT",
        "CPU us/req solo",
        "FT primary+backup",
        "log Mb/s"
    );
    for (test, clients) in [("set", 1u32), ("get", 1), ("set", 16), ("get", 16)] {
        let mut solo = Vec::new();
        let mut ft = Vec::new();
        for round in 0..2 {
            let (ns, pids) = start(setup, &format!("s{round}"), Mode::Solo)?;
            solo.push(benchmark(&ns, &pids, None, test, clients)?);
            drop(ns);
            let tag = format!("p{round}");
            let (ns, pids) = start(setup, &tag, Mode::Pair)?;
            let control = control_socket(setup, &tag);
            ft.push(benchmark(&ns, &pids, Some(&control), test, clients)?);
            drop(ns);
        }
        let mean = |list: &[Figures], value: fn(&Figures) -> f64| {
            list.iter().map(value).sum::<f64>() / list.len() as f64
        };
        let (solo_rps, ft_rps) = (mean(&solo, |f| f.rps), mean(&ft, |f| f.rps));
        println!(
            "{test:<4} {clients:>2} {solo_rps:>8.0} {ft_rps:>8.0} {:>6.3} {:>6.3}->{:>6.3}ms {:>6.3}->{:>6.3}ms {:>15.1} {:>9.1} + {:>8.1} {:>8.2}",
            ft_rps / solo_rps,
            mean(&solo, |f| f.p50_ms),
            mean(&ft, |f| f.p50_ms),
            mean(&solo, |f| f.p99_ms),
            mean(&ft, |f| f.p99_ms),
            mean(&solo, |f| f.cpu_us[0]),
            mean(&ft, |f| f.cpu_us[0]),
            mean(&ft, |f| f.cpu_us[1]),
            mean(&ft, |f| f.log_mbit),
        );
    }
    println!("(CPU: user+system time of each ftvmm process, all threads, per request)");
    println!();
    println!("what TLS costs: the same FT pair with its log channel in plaintext (--insecure) and under mutual TLS, side by side");
    println!(
        "{:<4} {:>2} {:>10} {:>8} {:>6} {:>15} {:>24}",
        "test", "c", "plain r/s", "TLS r/s", "ratio", "p50 plain->TLS", "primary CPU us plain->TLS"
    );
    for (test, clients) in [("set", 1u32), ("get", 1), ("set", 16), ("get", 16)] {
        let mut plain = Vec::new();
        let mut tls = Vec::new();
        for round in 0..2 {
            for (mode, into) in [(Mode::PlainPair, &mut plain), (Mode::Pair, &mut tls)] {
                let tag = format!("t{round}");
                let (ns, pids) = start(setup, &tag, mode)?;
                let control = control_socket(setup, &tag);
                into.push(benchmark(&ns, &pids, Some(&control), test, clients)?);
            }
        }
        let mean = |list: &[Figures], value: fn(&Figures) -> f64| {
            list.iter().map(value).sum::<f64>() / list.len() as f64
        };
        let (plain_rps, tls_rps) = (mean(&plain, |f| f.rps), mean(&tls, |f| f.rps));
        println!(
            "{test:<4} {clients:>2} {plain_rps:>10.0} {tls_rps:>8.0} {:>6.3} {:>6.3}->{:>6.3}ms {:>11.1} -> {:>8.1}",
            tls_rps / plain_rps,
            mean(&plain, |f| f.p50_ms),
            mean(&tls, |f| f.p50_ms),
            mean(&plain, |f| f.cpu_us[0]),
            mean(&tls, |f| f.cpu_us[0]),
        );
    }
    Ok(())
}

fn failovers(setup: &Setup) -> Result<(), Failure> {
    for (busy, what) in [
        (
            false,
            "idle client, SIGKILL of the primary to the reply to the next write",
        ),
        (
            true,
            "busy client, longest pause between replies from the SIGKILL on",
        ),
    ] {
        let mut times = Vec::new();
        for trial in 0..TRIALS {
            times.push(failover_trial(setup, trial, busy)?);
        }
        println!(
            "  trials (ms): {:?}",
            times.iter().map(|ms| ms.round() as u64).collect::<Vec<_>>()
        );
        times.sort_by(f64::total_cmp);
        println!(
            "failover, {what}, {TRIALS} trials: p50 {:.0} ms, max {:.0} ms, min {:.0} ms",
            times[TRIALS / 2],
            times[TRIALS - 1],
            times[0]
        );
    }
    println!("(0 lost acknowledged writes: checked by tests/pair.rs and tests/hosts.rs)");
    Ok(())
}
