//! Planned switchovers under a client (`tests/switchover.rs`, `cargo xtask bench
//! switchover`): the demo's three-host cluster with the kv guest, a client writing
//! distinct keys over ONE connection and timing every write, and `ftctl switchover` run
//! again and again, each time waiting until the VM is protected with its primary where
//! the backup was. The pause of a switchover is the longest write of the client while it
//! ran; at the end every acknowledged write is read back over the same connection.

use crate::cluster::{self, check_interrupted, replica_of, wait_for, Binaries, Cluster, Failure};
use crate::AckedWrites;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The ftds' lease TTL (seconds).
const LEASE_TTL: u64 = 3;
/// Where ftctl is pointed.
const ASK: &str = "c";

/// What the switchovers did.
#[derive(Debug)]
pub struct SwitchoverReport {
    /// Per switchover: the client's longest write while it ran.
    pub pauses: Vec<Duration>,
    /// Per switchover: from `ftctl switchover` to protected again (ftctl's own wait).
    pub protected_again: Vec<Duration>,
    /// Per switchover: the host the primary moved to.
    pub primary_hosts: Vec<String>,
    /// Writes the client had acknowledged, all over one connection.
    pub acked: usize,
    /// Acknowledged writes that could not be read back (must be empty).
    pub lost: Vec<String>,
    /// Failovers the cluster counted for the VM (a switchover is none).
    pub failovers: u64,
}

/// One write's timing.
struct Timed {
    started: Instant,
    took: Duration,
}

/// Runs `trials` switchovers of the kv guest `kv` (namespaces `<tag>-*`).
pub fn run(
    bins: Binaries,
    kv: &Path,
    tag: &str,
    trials: usize,
) -> Result<SwitchoverReport, Failure> {
    cluster::catch_interrupts();
    let dir = std::env::temp_dir().join(format!("ftvm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let result = Cluster::start(tag, &["a", "b", "c"], bins, &dir, LEASE_TTL)
        .and_then(|mut cluster| switchovers(&mut cluster, kv, trials));
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn switchovers(
    cluster: &mut Cluster,
    kv: &Path,
    trials: usize,
) -> Result<SwitchoverReport, Failure> {
    cluster.wait_for_hosts(3)?;
    let create = cluster.kv_create_args("web1", kv)?;
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster.ftctl_ok(ASK, &create)?;
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "web1 protected",
        || {
            let vm = cluster.ftctl_json(ASK, &["status", "web1"])?;
            (vm["protection"] == "protected").then_some(())
        },
    )
    .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;

    let guest_ip = cluster.lan.guest_ip();
    let mut writes = AckedWrites::connect(
        &cluster.lan.client.name,
        &format!("{guest_ip}:6379"),
        "switch",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let timings = Arc::new(Mutex::new(Vec::<Timed>::new()));
    let writer = {
        let (stop, timings) = (stop.clone(), timings.clone());
        std::thread::spawn(move || {
            let mut result = Ok(());
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                result = writes.write();
                let took = started.elapsed();
                timings
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Timed { started, took });
                if result.is_err() {
                    break;
                }
            }
            (writes, result)
        })
    };
    // Writes flow before the first switchover.
    std::thread::sleep(Duration::from_millis(500));

    let mut report = SwitchoverReport {
        pauses: Vec::new(),
        protected_again: Vec::new(),
        primary_hosts: Vec::new(),
        acked: 0,
        lost: Vec::new(),
        failovers: 0,
    };
    let mut outcome = Ok(());
    for trial in 0..trials {
        if let Err(err) = check_interrupted() {
            outcome = Err(err);
            break;
        }
        let started = Instant::now();
        let ran = cluster.ftctl(ASK, &["--json", "switchover", "web1", "--wait", "60"]);
        let ended = Instant::now();
        if ran.code != Some(0) {
            outcome = Err(Failure::new(format!(
                "switchover {trial} failed ({:?}): {}\n{}",
                ran.code,
                ran.stderr.trim(),
                cluster.logs()
            )));
            break;
        }
        let answer: serde_json::Value = serde_json::from_str(&ran.stdout).map_err(|err| {
            Failure::new(format!("ftctl switchover --json: {err}: {}", ran.stdout))
        })?;
        report.protected_again.push(ended - started);
        report
            .primary_hosts
            .push(answer["to_host"].as_str().unwrap_or("?").to_owned());
        // Writes answered after the switchover show how long the one it held lasted.
        std::thread::sleep(Duration::from_millis(300));
        let pause = timings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|timed| timed.started + timed.took >= started && timed.started <= ended)
            .map(|timed| timed.took)
            .max()
            .unwrap_or_default();
        report.pauses.push(pause);
        println!(
            "switchover {:>2}: primary now on {}, client pause {:>6.1} ms, protected again after {:>6.0} ms",
            trial + 1,
            report.primary_hosts[trial],
            pause.as_secs_f64() * 1000.0,
            (ended - started).as_secs_f64() * 1000.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (mut writes, result) = writer
        .join()
        .map_err(|_| Failure::new("the client thread panicked"))?;
    outcome?;
    result.map_err(|err| {
        Failure::new(format!(
            "the client's connection broke: {err}\n{}",
            cluster.logs()
        ))
    })?;
    report.acked = writes.acked();
    report.lost = writes.lost();
    let vm = cluster
        .ftctl_json(ASK, &["status", "web1"])
        .ok_or_else(|| Failure::new("no status of web1"))?;
    report.failovers = vm["failovers"].as_u64().unwrap_or(u64::MAX);
    if replica_of(&vm, "primary").is_none() {
        return Err(Failure::new(format!(
            "web1 has no primary at the end: {vm}"
        )));
    }
    Ok(report)
}
