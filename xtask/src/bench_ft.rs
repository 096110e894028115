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

/// One VM (`pair` false) or one FT pair on a bridge; returns the namespace and the pids
/// (primary first).
fn start(setup: &Setup, tag: &str, pair: bool) -> Result<(NetNs, Vec<u32>), Failure> {
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
            match role {
                "primary" => command.args(["--log-listen", "127.0.0.1:7701"]),
                _ => command.args(["--log-connect", "127.0.0.1:7701"]),
            };
        }
        command
    };
    let mut pids = Vec::new();
    if pair {
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

/// redis-benchmark requests/s and p50 latency (ms) for `test` with `clients`.
fn benchmark(ns: &NetNs, test: &str, clients: u32) -> Result<(f64, f64), Failure> {
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
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .nth(1)
        .ok_or_else(|| Failure::new(format!("no figures from redis-benchmark: {text}")))?;
    let cells: Vec<f64> = line
        .split(',')
        .skip(1)
        .filter_map(|cell| cell.trim_matches('"').parse().ok())
        .collect();
    match (cells.first(), cells.get(3)) {
        (Some(rps), Some(p50)) => Ok((*rps, *p50)),
        _ => Err(Failure::new(format!("cannot read {line}"))),
    }
}

/// Milliseconds from SIGKILL of the primary to the first reply the client gets after it.
fn failover_trial(setup: &Setup, trial: usize) -> Result<f64, Failure> {
    let (mut ns, pids) = start(setup, &format!("ft{trial}"), true)?;
    let name = ns.name.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<Instant>();
    let client = std::thread::spawn(move || {
        in_netns(&name, move || -> Result<f64, String> {
            let mut client =
                RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(20))
                    .map_err(|err| err.to_string())?;
            for i in 0..200u32 {
                let key = format!("k{i}");
                client
                    .call(&[b"SET", key.as_bytes(), b"v"])
                    .map_err(|err| err.to_string())?;
            }
            let _ = tx.send(());
            let killed = killed_rx.recv().map_err(|err| err.to_string())?;
            loop {
                if let Ok(Reply::Status(_)) = client.call(&[b"SET", b"after", b"v"]) {
                    return Ok(killed.elapsed().as_secs_f64() * 1000.0);
                }
            }
        })
    });
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| Failure::new("the client did not start"))?;
    ns.kill(pids[0]);
    let _ = killed_tx.send(Instant::now());
    let took = client
        .join()
        .map_err(|_| Failure::new("client thread panicked"))?
        .map_err(Failure::new)?;
    Ok(took)
}

/// `cargo xtask bench ft`.
pub fn ft() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let setup = Setup { ftvmm, kv, dir };
    let result = measure(&setup);
    std::fs::remove_dir_all(&setup.dir).ok();
    result
}

fn measure(setup: &Setup) -> Result<(), Failure> {
    println!(
        "kv: FT pair vs one VM, side by side (2 alternating rounds, -n {REQUESTS}, mean of the 2)"
    );
    println!(
        "{:<5} {:>7} {:>12} {:>12} {:>8} {:>10} {:>10}",
        "test", "clients", "solo req/s", "FT req/s", "ratio", "solo p50", "FT p50"
    );
    for (test, clients) in [("set", 1u32), ("get", 1), ("set", 16), ("get", 16)] {
        let mut solo = Vec::new();
        let mut ft = Vec::new();
        for round in 0..2 {
            let (ns, _) = start(setup, &format!("s{round}"), false)?;
            solo.push(benchmark(&ns, test, clients)?);
            drop(ns);
            let (ns, _) = start(setup, &format!("p{round}"), true)?;
            ft.push(benchmark(&ns, test, clients)?);
            drop(ns);
        }
        let mean = |list: &[(f64, f64)]| {
            let rps = list.iter().map(|(rps, _)| *rps).sum::<f64>() / list.len() as f64;
            let p50 = list.iter().map(|(_, p50)| *p50).sum::<f64>() / list.len() as f64;
            (rps, p50)
        };
        let ((solo_rps, solo_p50), (ft_rps, ft_p50)) = (mean(&solo), mean(&ft));
        println!(
            "{test:<5} {clients:>7} {solo_rps:>12.0} {ft_rps:>12.0} {:>8.3} {solo_p50:>9.3}ms {ft_p50:>9.3}ms",
            ft_rps / solo_rps
        );
    }
    let mut times = Vec::new();
    for trial in 0..TRIALS {
        times.push(failover_trial(setup, trial)?);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "failover, SIGKILL of the primary to the first client reply, {TRIALS} trials: p50 {:.0} ms, max {:.0} ms, min {:.0} ms (0 lost writes checked by tests/pair.rs)",
        times[TRIALS / 2],
        times[TRIALS - 1],
        times[0]
    );
    Ok(())
}
