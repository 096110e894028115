//! `cargo xtask bench control`: the control plane measured on the demo's three-host
//! cluster ([`Cluster`]): how long `ftctl create` takes to reach Protected, how long
//! `ftctl status` takes against the leader and a non-leader, the ftds' resident memory with
//! and without a VM, how long protection takes to come back (a new backup cloned) after
//! `ftctl restart-backup` and after a failover, and how long a SIGKILLed leader takes to
//! be replaced.
//!
//! Times are wall-clock as an operator sees them: every figure includes starting `ftctl`
//! (a process per call, run from the client namespace); protection and leadership are
//! polled every 20 ms, which bounds their resolution.

use crate::util::percentile;
use crate::util::Failure;
use ftvm_tests::cluster::{self, leader_of, wait_for, Cluster};
use std::path::Path;
use std::time::{Duration, Instant};

/// The lease TTL of the bench's ftds (seconds): it bounds the leader failover.
const LEASE_TTL: u64 = 3;
/// Trials of create-to-Protected, of protection coming back and of leader failover.
const CREATE_TRIALS: usize = 5;
const HEAL_TRIALS: usize = 3;
const FAILOVER_TRIALS: usize = 3;
/// `ftctl status` calls per ftd.
const STATUS_CALLS: usize = 200;
const POLL: Duration = Duration::from_millis(20);

/// Runs the benchmark.
pub fn control() -> Result<(), Failure> {
    let (bins, kv) = crate::cluster_binaries()?;
    cluster::catch_interrupts();
    let dir = std::env::temp_dir().join(format!("ftvm-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let result = Cluster::start("bench", &["a", "b", "c"], bins, &dir, LEASE_TTL)
        .and_then(|mut cluster| measure(&mut cluster, &kv));
    if result.is_ok() {
        std::fs::remove_dir_all(&dir).ok();
    } else {
        eprintln!("KEPT {}", dir.display());
    }
    result
}

fn summary(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        percentile(&values, 50.0),
        percentile(&values, 99.0),
        values.last().copied().unwrap_or(f64::NAN),
    )
}

fn measure(cluster: &mut Cluster, kv: &Path) -> Result<(), Failure> {
    let hosts = ["a", "b", "c"];
    println!("cluster: 3 ftds (release), etcd on the LAN, lease TTL {LEASE_TTL} s");
    let rss_idle: Vec<(String, u64)> = hosts
        .iter()
        .map(|host| (host.to_string(), cluster.ftd_rss_kib(host).unwrap_or(0)))
        .collect();

    // Create to Protected: the kv pair (a, b) with disk and NIC, as in the demo.
    let create = |vm: &str| -> Result<Duration, Failure> {
        let args = cluster.kv_create_args(vm, kv)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        cluster.ftctl_ok("c", &args)?;
        wait_for(
            Duration::from_secs(30),
            POLL,
            &format!("{vm} protected"),
            || {
                let status = cluster.ftctl_json("c", &["status", vm])?;
                (status["protection"] == "protected").then_some(())
            },
        )
        .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
        Ok(started.elapsed())
    };
    let mut to_protected = Vec::new();
    for trial in 0..CREATE_TRIALS {
        let vm = format!("t{trial}");
        to_protected.push(create(&vm)?.as_secs_f64() * 1000.0);
        cluster.ftctl_ok("c", &["delete", &vm])?;
        // The next pair needs the TAPs: wait until no host runs a replica.
        wait_for(
            Duration::from_secs(30),
            POLL,
            "the replicas to stop",
            || {
                let hosts = cluster.ftctl_json("c", &["hosts"])?;
                hosts
                    .as_array()?
                    .iter()
                    .all(|host| host["replicas"] == 0)
                    .then_some(())
            },
        )?;
    }
    println!(
        "  trials (ms): {:?}",
        to_protected
            .iter()
            .map(|ms| ms.round() as u64)
            .collect::<Vec<_>>()
    );
    let (p50, _, max) = summary(to_protected);
    println!(
        "ftctl create -> Protected (kv pair a+b, {CREATE_TRIALS} trials): p50 {p50:.0} ms, max {max:.0} ms"
    );

    // A VM that stays: status latency and RSS with it.
    create("web1")?;
    let hosts_now = cluster
        .ftctl_json("c", &["hosts"])
        .and_then(|hosts| leader_of(hosts.as_array()?))
        .ok_or_else(|| Failure::new("no leader"))?;
    let leader = hosts_now;
    // A non-leader that does not run the primary: it asks host a's ftd for the live figures.
    let follower = ["c", "b"]
        .into_iter()
        .find(|host| *host != leader)
        .unwrap_or("b");
    for (what, host) in [("leader", leader.as_str()), ("non-leader", follower)] {
        let mut times = Vec::new();
        for _ in 0..STATUS_CALLS {
            cluster::check_interrupted()?;
            let started = Instant::now();
            cluster.ftctl_ok(host, &["status", "web1"])?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let (p50, p99, max) = summary(times);
        println!(
            "ftctl status web1 against the {what} ({host}), {STATUS_CALLS} calls: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        );
    }
    // Give the supervisors a few passes with the VM before reading memory.
    std::thread::sleep(Duration::from_secs(2));
    for (host, idle) in &rss_idle {
        let with_vm = cluster.ftd_rss_kib(host).unwrap_or(0);
        let runs = match host.as_str() {
            "a" => "the primary",
            "b" => "the backup",
            _ => "no replica",
        };
        println!(
            "ftd RSS on {host}: {:.1} MiB without VMs, {:.1} MiB with web1 ({runs} here)",
            *idle as f64 / 1024.0,
            with_vm as f64 / 1024.0
        );
    }
    heal(cluster)?;
    cluster.ftctl_ok("c", &["delete", "web1"])?;

    // Leader failover: SIGKILL the leader's ftd, time until a survivor names another.
    let mut failovers = Vec::new();
    for _ in 0..FAILOVER_TRIALS {
        let old = cluster.wait_for_hosts(3)?;
        let survivor = hosts
            .iter()
            .find(|host| **host != old)
            .copied()
            .unwrap_or("c");
        cluster.kill_ftd(&old);
        let killed = Instant::now();
        let new = wait_for(
            Duration::from_secs(LEASE_TTL * 5),
            POLL,
            "a new leader",
            || {
                let hosts = cluster.ftctl_json(survivor, &["hosts"])?;
                leader_of(hosts.as_array()?).filter(|leader| *leader != old)
            },
        )?;
        let took = killed.elapsed();
        println!(
            "  leader {old} killed: {new} leads after {:.0} ms",
            took.as_secs_f64() * 1000.0
        );
        failovers.push(took.as_secs_f64() * 1000.0);
        cluster.start_ftd(&old)?;
    }
    let (p50, _, max) = summary(failovers);
    println!(
        "leader failover (SIGKILL of the leader's ftd -> ftctl hosts names another), {FAILOVER_TRIALS} trials: p50 {p50:.0} ms, max {max:.0} ms (lease TTL {LEASE_TTL} s)"
    );
    Ok(())
}

/// The backup replica's number in a `ftctl status --json` answer, if the VM is protected.
fn protected_backup(status: &serde_json::Value) -> Option<u64> {
    if status["protection"] != "protected" {
        return None;
    }
    cluster::replica_of(status, "backup")?["id"].as_u64()
}

/// Protection coming back on web1: after `ftctl restart-backup` (the backup stopped, a
/// new one cloned from the running primary) and after a failover drill (the primary
/// killed, the backup goes live, is made primary, and a new backup is cloned from it).
/// Each time until `ftctl status` shows Protected with a backup of a new replica number.
fn heal(cluster: &Cluster) -> Result<(), Failure> {
    for (what, command) in [
        ("ftctl restart-backup", ["restart-backup", "web1"]),
        (
            "ftctl failover --test (primary killed)",
            ["failover", "web1"],
        ),
    ] {
        let mut times = Vec::new();
        for _ in 0..HEAL_TRIALS {
            cluster::check_interrupted()?;
            let status = cluster
                .ftctl_json("c", &["status", "web1"])
                .ok_or_else(|| Failure::new("no status of web1"))?;
            let before = protected_backup(&status)
                .ok_or_else(|| Failure::new(format!("web1 is not protected: {status}")))?;
            let mut args = command.to_vec();
            if command[0] == "failover" {
                args.push("--test");
            }
            let started = Instant::now();
            let started_unix_ms = cluster::now_unix_ms();
            cluster.ftctl_ok("c", &args)?;
            wait_for(
                Duration::from_secs(60),
                POLL,
                "web1 protected by a new backup",
                || {
                    let status = cluster.ftctl_json("c", &["status", "web1"])?;
                    protected_backup(&status)
                        .filter(|backup| *backup != before)
                        .map(|_| ())
                },
            )
            .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            // Where the time went, as the cluster's event log has it.
            let events = cluster
                .ftctl("c", &["--json", "events", "--backlog", "30"])
                .stdout;
            let steps: Vec<String> = events
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter_map(|event| {
                    let at = event["unix_ms"].as_u64()?.checked_sub(started_unix_ms)?;
                    Some(format!("{} +{at}", event["kind"].as_str()?))
                })
                .collect();
            println!("    events (ms after the command): {}", steps.join(", "));
        }
        println!(
            "  trials (ms): {:?}",
            times.iter().map(|ms| ms.round() as u64).collect::<Vec<_>>()
        );
        let (p50, _, max) = summary(times);
        println!(
            "{what} -> Protected again by a cloned backup (kv, 128 MiB), {HEAL_TRIALS} trials: p50 {p50:.0} ms, max {max:.0} ms"
        );
    }
    Ok(())
}
