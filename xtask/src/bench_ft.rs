//! `cargo xtask bench ft`: the kv guest as an FT pair against the same guest alone, side
//! by side, then the failover rows of [`crate::bench_failover`].

use crate::util::Failure;
use ftvm_tests::{wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Requests per redis-benchmark test.
const REQUESTS: u32 = 20_000;
/// Requests of the receive-heavy rows (large values: the disk log must hold them).
const LARGE_REQUESTS: u32 = 1_500;

/// What every run of the FT benches uses: the release ftvmm, the kv guest and a scratch
/// directory.
pub(crate) struct Setup {
    pub(crate) ftvmm: PathBuf,
    pub(crate) kv: PathBuf,
    pub(crate) dir: PathBuf,
}

/// What runs the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One VM.
    Solo,
    /// An FT pair, its channels under mutual TLS (as ftd runs them).
    Pair,
    /// An FT pair in plaintext (`--insecure`): what TLS costs, side by side.
    PlainPair,
}

/// One VM or one FT pair on a bridge; returns the namespace and the pids (primary
/// first).
pub(crate) fn start(setup: &Setup, tag: &str, mode: Mode) -> Result<(NetNs, Vec<u32>), Failure> {
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
            command
                .arg("--control")
                .arg(control_socket(setup, tag, role == "primary"));
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

/// The primary's (or the backup's) control socket in run `tag`.
pub(crate) fn control_socket(setup: &Setup, tag: &str, primary: bool) -> PathBuf {
    let role = if primary { "p" } else { "b" };
    setup.dir.join(format!("{tag}-{role}.sock"))
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
    /// Log bytes per request (FT only).
    log_per_request: f64,
    /// The longest log-channel silence each replica saw (primary: between
    /// acknowledgements, backup: between reads of the log), milliseconds (FT only).
    silence_ms: [f64; 2],
}

/// One redis-benchmark run: the test, its clients, the value size and the requests.
#[derive(Clone, Copy)]
struct Load {
    test: &'static str,
    clients: u32,
    value_bytes: u32,
    requests: u32,
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

/// redis-benchmark `load` against the VM of `pids` (with the primary's and the backup's
/// control sockets at `control` for a pair).
fn run_load(
    ns: &NetNs,
    pids: &[u32],
    controls: Option<[PathBuf; 2]>,
    load: Load,
) -> Result<Figures, Failure> {
    let control = controls.as_ref().map(|[primary, _]| primary.as_path());
    let Load {
        test,
        clients,
        value_bytes,
        requests,
    } = load;
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
            &requests.to_string(),
            "-d",
            &value_bytes.to_string(),
        ])
        .args(["-c", &clients.to_string()])
        .output()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(Failure::new(format!(
            "redis-benchmark -t {test} -c {clients} -d {value_bytes}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // A pair that lost its backup during the run would measure a lone VM.
    let mut silence_ms = [0.0; 2];
    for (index, socket) in controls.iter().flatten().enumerate() {
        let status = ftvm_tests::unix_request(socket, b"status\n")
            .map_err(|err| Failure::new(format!("a replica's control socket: {err}")))?;
        if ftvm_tests::field(&status, "protected") != Some(1) {
            return Err(Failure::new(format!(
                "the pair was not protected at the end of the run, so it measured no pair: {status}"
            )));
        }
        let silence = ftvm_tests::field(&status, "peer_silence_max_us")
            .ok_or_else(|| Failure::new(format!("no peer_silence_max_us in {status}")))?;
        silence_ms[index] = silence as f64 / 1000.0;
    }
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
        cpu_us[index] = (cpu_seconds(*pid) - before) * 1e6 / f64::from(requests);
    }
    let log_delta = match (log_before, control.and_then(log_bytes)) {
        (Some(before), Some(after)) => after.saturating_sub(before) as f64,
        _ => 0.0,
    };
    let log_mbit = log_delta * 8.0 / seconds / 1e6;
    let log_per_request = log_delta / f64::from(requests);
    Ok(Figures {
        rps: *rps,
        p50_ms: *p50_ms,
        p99_ms: *p99_ms,
        cpu_us,
        log_mbit,
        log_per_request,
        silence_ms,
    })
}

/// What `bench ft` measures.
pub(crate) enum Parts {
    /// Throughput and latency FT vs solo, then failover times.
    All,
    /// Failover times only (`cargo xtask bench failover`), with its options.
    Failover(crate::bench_failover::Options),
}

/// `cargo xtask bench ft` / `bench failover`.
pub(crate) fn ft(parts: Parts) -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let setup = Setup { ftvmm, kv, dir };
    let result = match parts {
        Parts::All => {
            measure(&setup).and_then(|()| crate::bench_failover::run(&setup, &Default::default()))
        }
        Parts::Failover(options) => crate::bench_failover::run(&setup, &options),
    };
    std::fs::remove_dir_all(&setup.dir).ok();
    result
}

/// Rounds of every side-by-side comparison.
const ROUNDS: usize = 3;

/// A tag for the runs of `mode`.
fn tag_of(mode: Mode) -> &'static str {
    match mode {
        Mode::Solo => "s",
        Mode::Pair => "p",
        Mode::PlainPair => "q",
    }
}

/// `load` on `a` and on `b`, [`ROUNDS`] rounds, `a` first in even rounds and `b` first
/// in odd ones (so that neither always runs on a cold or a warm machine).
fn side_by_side(
    setup: &Setup,
    a: Mode,
    b: Mode,
    load: Load,
) -> Result<(Vec<Figures>, Vec<Figures>), Failure> {
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [a, b] } else { [b, a] };
        for (position, mode) in order.into_iter().enumerate() {
            let tag = format!("{}{round}{position}", tag_of(mode));
            let (ns, pids) = start(setup, &tag, mode)?;
            let controls = (mode != Mode::Solo).then(|| {
                [
                    control_socket(setup, &tag, true),
                    control_socket(setup, &tag, false),
                ]
            });
            let figures = run_load(&ns, &pids, controls, load)?;
            drop(ns);
            if mode == a {
                on_a.push(figures);
            } else {
                on_b.push(figures);
            }
        }
    }
    Ok((on_a, on_b))
}

/// The longest peer silences over `runs`: "primary/backup" in ms.
fn silences(runs: &[Figures]) -> String {
    let max = |index: usize| runs.iter().map(|f| f.silence_ms[index]).fold(0.0, f64::max);
    format!("{:.1}/{:.1}", max(0), max(1))
}

/// The median of `value` over `runs`.
fn median(runs: &[Figures], value: fn(&Figures) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The per-round ratios of `value`, b over a: "median [min-max]".
fn ratio_spread(a: &[Figures], b: &[Figures], value: fn(&Figures) -> f64) -> String {
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| value(b) / value(a)).collect();
    ratios.sort_by(f64::total_cmp);
    match (ratios.first(), ratios.last()) {
        (Some(min), Some(max)) => format!("{:.3} [{min:.3}-{max:.3}]", ratios[ratios.len() / 2]),
        _ => "-".to_owned(),
    }
}

/// The small-value rows: SET and GET, 1 and 16 clients.
const SMALL: [(&str, u32); 4] = [("set", 1), ("get", 1), ("set", 16), ("get", 16)];

fn small(test: &'static str, clients: u32) -> Load {
    Load {
        test,
        clients,
        value_bytes: 3,
        requests: REQUESTS,
    }
}

fn measure(setup: &Setup) -> Result<(), Failure> {
    println!(
        "kv: FT pair vs one VM, side by side ({ROUNDS} rounds, order alternating, -n {REQUESTS}; medians, ratio median [min-max] over the rounds; every FT run checked protected at its end)"
    );
    println!(
        "{:<4} {:>2} {:>8} {:>8} {:>21} {:>15} {:>15} {:>21} {:>18} {:>8} {:>13}",
        "test",
        "c",
        "solo r/s",
        "FT r/s",
        "ratio",
        "p50 solo->FT",
        "p99 solo->FT",
        "primary CPU FT/solo",
        "CPU us/req s->p+b",
        "log Mb/s",
        "silence p/b"
    );
    for (test, clients) in SMALL {
        let (solo, ft) = side_by_side(setup, Mode::Solo, Mode::Pair, small(test, clients))?;
        println!(
            "{test:<4} {clients:>2} {:>8.0} {:>8.0} {:>21} {:>6.3}->{:>6.3}ms {:>6.3}->{:>6.3}ms {:>21} {:>5.0}->{:>5.0}+{:>5.0} {:>8.2} {:>13}",
            median(&solo, |f| f.rps),
            median(&ft, |f| f.rps),
            ratio_spread(&solo, &ft, |f| f.rps),
            median(&solo, |f| f.p50_ms),
            median(&ft, |f| f.p50_ms),
            median(&solo, |f| f.p99_ms),
            median(&ft, |f| f.p99_ms),
            ratio_spread(&solo, &ft, |f| f.cpu_us[0]),
            median(&solo, |f| f.cpu_us[0]),
            median(&ft, |f| f.cpu_us[0]),
            median(&ft, |f| f.cpu_us[1]),
            median(&ft, |f| f.log_mbit),
            silences(&ft),
        );
    }
    println!("(CPU: user+system time of each ftvmm process, all threads, per request)");
    println!(
        "(silence p/b: the longest the primary waited between acknowledgements / the backup between log reads, max over the rounds, ms: the peer timeout must stay above it)"
    );
    println!();
    receive_heavy(setup)?;
    println!();
    println!(
        "what TLS costs: the same FT pair with its log channel in plaintext (--insecure) and under mutual TLS ({ROUNDS} rounds, order alternating)"
    );
    println!(
        "{:<4} {:>2} {:>10} {:>8} {:>21} {:>15} {:>21}",
        "test", "c", "plain r/s", "TLS r/s", "ratio", "p50 plain->TLS", "primary CPU TLS/plain"
    );
    for (test, clients) in SMALL {
        let (plain, tls) = side_by_side(setup, Mode::PlainPair, Mode::Pair, small(test, clients))?;
        println!(
            "{test:<4} {clients:>2} {:>10.0} {:>8.0} {:>21} {:>6.3}->{:>6.3}ms {:>21}",
            median(&plain, |f| f.rps),
            median(&tls, |f| f.rps),
            ratio_spread(&plain, &tls, |f| f.rps),
            median(&plain, |f| f.p50_ms),
            median(&tls, |f| f.p50_ms),
            ratio_spread(&plain, &tls, |f| f.cpu_us[0]),
        );
    }
    Ok(())
}

/// The paper's worst case: the guest receives a lot (SETs of large values, many
/// clients), and every received byte goes through the log to the backup.
fn receive_heavy(setup: &Setup) -> Result<(), Failure> {
    println!(
        "receive-heavy: SET of large values, FT pair vs one VM ({ROUNDS} rounds, order alternating; -n {LARGE_REQUESTS} for 16K, 500 for 64K); log bytes per request vs the value"
    );
    println!(
        "{:>6} {:>2} {:>8} {:>8} {:>21} {:>15} {:>21} {:>10} {:>9} {:>13}",
        "value",
        "c",
        "solo r/s",
        "FT r/s",
        "ratio",
        "p50 solo->FT",
        "primary CPU FT/solo",
        "log B/req",
        "log Mb/s",
        "silence p/b"
    );
    // At most ~32 MiB written per run: the kv guest's log on its 64 MiB disk holds it.
    for (value_bytes, clients, requests) in
        [(16u32 << 10, 8u32, LARGE_REQUESTS), (64 << 10, 8, 500)]
    {
        let load = Load {
            test: "set",
            clients,
            value_bytes,
            requests,
        };
        let (solo, ft) = side_by_side(setup, Mode::Solo, Mode::Pair, load)?;
        println!(
            "{:>5}K {clients:>2} {:>8.0} {:>8.0} {:>21} {:>6.2}->{:>6.2}ms {:>21} {:>10.0} {:>9.1} {:>13}",
            value_bytes >> 10,
            median(&solo, |f| f.rps),
            median(&ft, |f| f.rps),
            ratio_spread(&solo, &ft, |f| f.rps),
            median(&solo, |f| f.p50_ms),
            median(&ft, |f| f.p50_ms),
            ratio_spread(&solo, &ft, |f| f.cpu_us[0]),
            median(&ft, |f| f.log_per_request),
            median(&ft, |f| f.log_mbit),
            silences(&ft),
        );
    }
    println!("(a SET of V bytes is about V + 40 bytes of request on the wire)");
    Ok(())
}
