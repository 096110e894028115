//! `cargo xtask demo`: an FT pair of the kv guest on one machine, a client that keeps
//! writing over one connection, the primary killed, and a timeline of what happened.

use crate::util::Failure;
use ftvm_tests::{in_netns, wait_for_pong, NetNs, Reply, RespClient, GUEST_IP, GUEST_MAC};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs the demo.
pub fn demo() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let dir = std::env::temp_dir().join(format!("ftvm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let result = run_demo(&ftvmm, &kv, &dir);
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn run_demo(ftvmm: &Path, kv: &Path, dir: &Path) -> Result<(), Failure> {
    let start = Instant::now();
    let say = |what: &str| println!("t+{:>6.3}s  {what}", start.elapsed().as_secs_f64());
    let disk = dir.join("web1.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(64 << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let arbiter = format!("local:{}", dir.join("arbiter").display());
    // Two "hosts" on one L2 segment: each replica has its own TAP on the bridge where the
    // client lives (a namespace made for the demo, removed at the end).
    let mut ns = NetNs::with_bridged_taps("demo", &["tap-a", "tap-b"]);
    let log_addr = "127.0.0.1:7700";
    let replica = |ns: &NetNs, role: &str, tap: &str, peer: &[&str], stderr: &Path| {
        let mut command = ns.command(ftvmm);
        command
            .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", tap])
            .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
            .arg("--disk")
            .arg(&disk)
            .arg("--image")
            .arg(kv)
            .args(["--role", role, "--vm", "web1", "--arbiter", &arbiter])
            .args(peer);
        std::fs::File::create(stderr).map(|file| {
            command.stderr(Stdio::from(file));
            command
        })
    };
    let (primary_log, backup_log) = (dir.join("primary.log"), dir.join("backup.log"));
    let mut primary = replica(
        &ns,
        "primary",
        "tap-a",
        &["--log-listen", log_addr],
        &primary_log,
    )
    .map_err(|err| Failure::new(format!("primary log: {err}")))?;
    let primary = ns.spawn(&mut primary);
    let mut backup = replica(
        &ns,
        "backup",
        "tap-b",
        &["--log-connect", log_addr],
        &backup_log,
    )
    .map_err(|err| Failure::new(format!("backup log: {err}")))?;
    let backup = ns.spawn(&mut backup);
    say("web1 created: kv guest, primary on host a (tap-a), backup on host b (tap-b), shared disk");
    if !wait_for_pong(&ns, Duration::from_secs(30)) {
        return Err(Failure::new("the kv pair did not answer PING"));
    }
    say(&format!(
        "protected: the backup follows the primary's log; {GUEST_IP}:6379 answers PING"
    ));

    let name = ns.name.clone();
    let (kill_tx, kill_rx) = mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        in_netns(
            &name,
            move || -> Result<(usize, Duration, usize), String> {
                let mut client =
                    RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(20))
                        .map_err(|err| format!("connect: {err}"))?;
                let mut acked = Vec::new();
                let mut slowest = Duration::ZERO;
                for i in 0..600u32 {
                    if i == 300 {
                        let _ = kill_tx.send(());
                    }
                    let (key, value) = (format!("demo:{i}"), format!("value {i}"));
                    let sent = Instant::now();
                    match client.call(&[b"SET", key.as_bytes(), value.as_bytes()]) {
                        Ok(Reply::Status(ok)) if ok == "OK" => acked.push((key, value)),
                        other => return Err(format!("write {i}: {other:?}")),
                    }
                    slowest = slowest.max(sent.elapsed());
                }
                let lost = acked
                    .iter()
                    .filter(|(key, value)| {
                        client.call(&[b"GET", key.as_bytes()]).ok()
                            != Some(Reply::Bulk(Some(value.as_bytes().to_vec())))
                    })
                    .count();
                Ok((acked.len(), slowest, lost))
            },
        )
    });
    say("client: writing 600 keys, one at a time, over ONE TCP connection");
    kill_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| Failure::new("the client did not get halfway"))?;
    ns.kill(primary);
    let killed = Instant::now();
    say("FAILURE: host a's replica killed with SIGKILL after 300 acknowledged writes");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&backup_log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|line| line.contains("won the go-live claim"))
        {
            let detail = line
                .split("won the go-live claim")
                .nth(1)
                .unwrap_or("")
                .trim_start_matches(" for ");
            say(&format!(
                "backup LIVE {:.0} ms after the kill: won the go-live claim for {detail}; MAC announced on tap-b",
                killed.elapsed().as_secs_f64() * 1000.0
            ));
            break;
        }
        if Instant::now() > deadline {
            return Err(Failure::new(format!("the backup did not go live:\n{text}")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (acked, slowest, lost) = client
        .join()
        .map_err(|_| Failure::new("the client thread panicked"))?
        .map_err(Failure::new)?;
    say(&format!(
        "clients served: {acked} writes acknowledged on the same connection (slowest {:.0} ms, during the failover), read back: {lost} lost",
        slowest.as_secs_f64() * 1000.0
    ));
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "redis-cli",
            "-h",
            GUEST_IP,
            "SHUTDOWN",
        ])
        .output();
    let status = ns.wait(backup);
    say(&format!(
        "web1 shut down by the client on the surviving replica (exit status {status:?})"
    ));
    if lost > 0 || status != Some(0) {
        return Err(Failure::new(format!(
            "lost writes {lost}, backup exit {status:?}"
        )));
    }
    let winner = std::fs::read_to_string(dir.join("arbiter/web1.gen1.live")).unwrap_or_default();
    println!("lost writes: 0; the go-live claim of web1 generation 1 went to {winner} (the killed primary never claimed)");
    Ok(())
}
