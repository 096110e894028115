//! The demo (`cargo xtask demo`, and `tests/demo.rs` in every test run): the kv guest as
//! an FT VM through the control plane. Three hosts
//! (network namespaces on one LAN bridge, etcd on the LAN), an ftd on each, `ftctl
//! create` with the primary on a and the backup on b, a client writing over one TCP
//! connection, host a killed, and a timeline of what the cluster and the client saw.
//!
//! Host a dies like a powered-off machine: its LAN link goes first (nothing it sends
//! reaches anyone any more, not even the resets of its dying sockets), then its ftd and
//! ftvmm are killed with SIGKILL. The backup notices the silence, wins the go-live claim in
//! etcd and answers on the guest's address from host b. The leader then makes it the
//! primary and clones a new backup from the running guest onto host c: protected again.

use crate::cluster::{self, check_interrupted, replica_of, wait_for, Binaries, Cluster, Failure};
use crate::AckedWrites;
use serde_json::Value;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The lease TTL of the demo's ftds (seconds): how long a dead host stays registered.
const LEASE_TTL: u64 = 3;
/// Writes over the client's connection, and the one before which host a dies.
const WRITES: u32 = 600;
const FAIL_AT: u32 = 300;
/// Where ftctl is pointed: host c is never killed.
const ASK: &str = "c";

/// What the demo saw, once it went through without a failure.
#[derive(Debug)]
pub struct DemoReport {
    /// The moments of the timeline (what, when since the start), in time order.
    pub moments: Vec<(&'static str, Duration)>,
    /// Writes the client had acknowledged.
    pub acked: usize,
    /// Acknowledged writes that could not be read back (the demo fails unless empty).
    pub lost: Vec<String>,
    /// `ftctl status web1 --json` at the end: protected again, by a cloned backup.
    pub final_status: Value,
}

/// Runs the demo with `bins` and the kv guest `kv` on LAN `tag` (namespaces
/// `<tag>-*`), printing the timeline as it goes; scratch files go to a directory of its
/// own, removed at the end.
pub fn run(bins: Binaries, kv: &Path, tag: &str) -> Result<DemoReport, Failure> {
    cluster::catch_interrupts();
    let dir = std::env::temp_dir().join(format!("ftvm-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let timeline = Timeline {
        start: Instant::now(),
        start_unix_ms: cluster::now_unix_ms(),
    };
    let result = Cluster::start(tag, &["a", "b", "c"], bins, &dir, LEASE_TTL)
        .and_then(|mut cluster| run_demo(&timeline, &mut cluster, kv));
    std::fs::remove_dir_all(&dir).ok();
    result
}

/// The timeline: printed as it happens, and kept for the summary.
struct Timeline {
    start: Instant,
    start_unix_ms: u64,
}

impl Timeline {
    fn say(&self, what: &str) {
        self.at(self.start.elapsed(), what);
    }

    fn at(&self, at: Duration, what: &str) {
        println!("t+{:>6.3}s  {what}", at.as_secs_f64());
    }

    /// An event time (ms since the epoch) on this timeline.
    fn of_unix_ms(&self, unix_ms: u64) -> Duration {
        Duration::from_millis(unix_ms.saturating_sub(self.start_unix_ms))
    }
}

/// Milliseconds since the epoch of a log line's UTC timestamp
/// (`2026-12-06T02:41:55.813010Z ...`, as ftvmm's log writes them).
fn unix_ms_of_log_line(line: &str) -> Option<u64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let numbers = |text: &str, separator: char| -> Option<Vec<i64>> {
        text.split(separator)
            .map(|part| part.parse().ok())
            .collect()
    };
    let [year, month, day] = numbers(date, '-')?[..] else {
        return None;
    };
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let [hour, minute, second] = numbers(clock, ':')?[..] else {
        return None;
    };
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis).ok()
}

/// When the replica whose log is at `log` went live (its `won the go-live claim ...:
/// going live` line), in ms since the epoch.
fn went_live_unix_ms(log: &Path) -> Option<u64> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .find(|line| line.contains("won the go-live claim") && line.contains("going live"))
        .and_then(unix_ms_of_log_line)
}

fn status(cluster: &Cluster) -> Option<Value> {
    cluster.ftctl_json(ASK, &["status", "web1"])
}

/// The first event of `kind` about web1, from `ftctl events`.
fn event(cluster: &Cluster, kind: &str) -> Option<(u64, String)> {
    events(cluster, kind).into_iter().next()
}

/// Every event of `kind` about web1 (time, message), oldest first.
fn events(cluster: &Cluster, kind: &str) -> Vec<(u64, String)> {
    let out = cluster
        .ftctl(ASK, &["--json", "events", "--backlog", "100"])
        .stdout;
    out.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["kind"] == kind && event["vm"] == "web1")
        .map(|event| {
            (
                event["unix_ms"].as_u64().unwrap_or(0),
                event["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The MAC of `host`'s bridge (where its IP is).
fn bridge_mac(cluster: &Cluster, host: &str) -> String {
    crate::run(
        cluster
            .lan
            .host(host)
            .command("cat")
            .arg("/sys/class/net/br0/address"),
    )
    .stdout
    .trim()
    .to_owned()
}

fn run_demo(timeline: &Timeline, cluster: &mut Cluster, kv: &Path) -> Result<DemoReport, Failure> {
    let leader = cluster.wait_for_hosts(3)?;
    timeline.say(&format!(
        "cluster up: etcd and hosts a, b, c on one LAN bridge (network namespaces), an ftd on each; leader {leader}"
    ));
    println!(
        "           mutual TLS everywhere: a cluster CA and host, operator and viewer certificates made with `ftctl certs` in {}",
        cluster.credentials("").display()
    );

    // The hosts' addresses on their bridges: a TAP joining a bridge must not change the
    // bridge's MAC (the host would drop off its neighbours' ARP caches).
    let bridge_macs: Vec<String> = ["b", "c"]
        .iter()
        .map(|host| bridge_mac(cluster, host))
        .collect();
    let guest_ip = cluster.lan.guest_ip();
    let create = cluster.kv_create_args("web1", kv)?;
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    println!("           $ ftctl {}", create.join(" "));
    cluster.ftctl_ok(ASK, &create)?;
    let created = timeline.start.elapsed();
    timeline.at(
        created,
        "CREATED: web1 (kv guest, 128 MiB, shared disk, NIC on a TAP each host's ftd made on its bridge)",
    );

    let protected = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "ftctl status web1 to say Protected",
        || {
            let vm = status(cluster)?;
            (vm["protection"] == "protected").then_some(vm)
        },
    )
    .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
    let protected_at = timeline.start.elapsed();
    let replica = |role: &str| {
        replica_of(&protected, role)
            .map(|r| format!("{} pid {}", r["host"].as_str().unwrap_or("?"), r["pid"]))
            .unwrap_or_default()
    };
    timeline.at(
        protected_at,
        &format!(
            "PROTECTED: ftctl status web1 says Protected (primary {}, backup {}; the primary's control socket says protected=1)",
            replica("primary"),
            replica("backup")
        ),
    );

    // The client: distinct SETs over one connection, every +OK recorded; it pauses
    // before write FAIL_AT until host a is dead, so that write is the first one after
    // the failure.
    let mut writes = AckedWrites::connect(
        &cluster.lan.client.name,
        &format!("{guest_ip}:6379"),
        "demo",
    );
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        let mut first_after = None;
        let result = writes.write_many(WRITES, |n| {
            if n == FAIL_AT {
                let _ = reached_tx.send(());
                let _ = go_rx.recv();
            }
            if n == FAIL_AT + 1 {
                first_after = Some(Instant::now());
            }
        });
        (writes, result, first_after)
    });
    timeline.say(&format!(
        "client: {WRITES} distinct SETs to {guest_ip}:6379 over ONE TCP connection, from the client namespace"
    ));
    reached_rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| Failure::new(format!("the client did not reach write {FAIL_AT}")))?;
    check_interrupted()?;

    // Host a dies: the link first, so that nothing it sends while dying gets out.
    cluster.lan.cut_off("a");
    let ftd_pid = cluster.ftd_pid("a");
    cluster.kill_ftd("a");
    let replicas = cluster.kill_replicas("a");
    let failed = Instant::now();
    let failed_at = timeline.start.elapsed();
    let _ = go_tx.send(());
    timeline.at(
        failed_at,
        &format!(
            "FAILURE INJECTED: host a dead after {FAIL_AT} acknowledged writes: LAN link down, then SIGKILL of its ftd (pid {}) and ftvmm (pid {replicas:?})",
            ftd_pid.unwrap_or(0)
        ),
    );
    if leader == "a" {
        timeline
            .say("           (host a was the leader: a new one is elected once its lease ends)");
    }

    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "ftctl status web1 to record the failover to b",
        || {
            let vm = status(cluster)?;
            (vm["last_failover"]["to_host"] == "b").then_some(())
        },
    )
    .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
    let seen_live = timeline.start.elapsed();
    let (failover_ms, failover_text) = event(cluster, "failover")
        .ok_or_else(|| Failure::new("no failover event in ftctl events"))?;
    let log = cluster.replica_log("b", "web1")?;
    let went_live_at = went_live_unix_ms(&log)
        .map(|ms| timeline.of_unix_ms(ms))
        .ok_or_else(|| {
            Failure::new(format!(
                "no 'going live' line in {}:\n{}",
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        })?;
    timeline.at(
        went_live_at,
        "BACKUP LIVE: the ftvmm on b won the go-live claim and runs the guest",
    );
    let recorded_at = timeline.of_unix_ms(failover_ms);
    timeline.at(
        recorded_at,
        &format!(
            "FAILOVER RECORDED: ftctl events: \"{failover_text}\" (ftctl status showed it at t+{:.3}s)",
            seen_live.as_secs_f64()
        ),
    );

    let (mut writes, result, first_after) = writer
        .join()
        .map_err(|_| Failure::new("the client thread panicked"))?;
    result.map_err(|err| {
        Failure::new(format!(
            "the client's connection broke: {err}\n{}",
            cluster.logs()
        ))
    })?;
    let served = first_after.ok_or_else(|| Failure::new("no write after the failure"))?;
    let served_at = failed_at + served.duration_since(failed);
    timeline.at(
        served_at,
        &format!(
            "CLIENTS SERVED AGAIN: write {FAIL_AT} answered +OK {:.0} ms after the failure, on the same connection",
            served.duration_since(failed).as_secs_f64() * 1000.0
        ),
    );
    let lost = writes.lost();
    timeline.say(&format!(
        "client done: {} writes acknowledged; every one read back: {} lost",
        writes.acked(),
        lost.len()
    ));
    if !lost.is_empty() {
        return Err(Failure::new(format!("lost acknowledged writes: {lost:?}")));
    }

    // Protection comes back: the leader makes b's replica the primary and clones a new
    // backup from the running guest onto c (not a, where the failover came from).
    let healed = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "ftctl status web1 to say Protected again (a backup cloned onto c)",
        || {
            let vm = status(cluster)?;
            let cloned = replica_of(&vm, "backup")?["cloned"] == true;
            (vm["protection"] == "protected" && cloned).then_some(vm)
        },
    )
    .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
    // The leader recorded the moment: the second `protected` event.
    let protected_again_at = events(cluster, "protected").get(1).map_or_else(
        || timeline.start.elapsed(),
        |(ms, _)| timeline.of_unix_ms(*ms),
    );
    let (placed_ms, placed_text) = event(cluster, "backup-placed")
        .ok_or_else(|| Failure::new("no backup-placed event in ftctl events"))?;
    let placed_at = timeline.of_unix_ms(placed_ms);
    timeline.at(
        placed_at,
        &format!("NEW BACKUP: ftctl events: \"{placed_text}\""),
    );
    let hosts_of = |role: &str| {
        replica_of(&healed, role)
            .and_then(|replica| replica["host"].as_str())
            .unwrap_or("?")
            .to_owned()
    };
    timeline.at(
        protected_again_at,
        &format!(
            "PROTECTED AGAIN: ftctl status web1 says Protected (primary {}, backup {} made by cloning the running guest)",
            hosts_of("primary"),
            hosts_of("backup")
        ),
    );
    let final_status = cluster.ftctl_ok(ASK, &["status", "web1"])?;
    println!("\n$ ftctl status web1\n{final_status}");

    println!("timeline (seconds since the demo started)");
    let mut moments = [
        ("created", created),
        ("protected", protected_at),
        ("failure injected (host a dead)", failed_at),
        ("backup live on b (its ftvmm)", went_live_at),
        ("failover recorded (ftctl events)", recorded_at),
        ("clients served again", served_at),
        ("new backup placed on c (clone)", placed_at),
        ("protected again", protected_again_at),
    ];
    moments.sort_by_key(|(_, at)| *at);
    for (what, at) in moments {
        println!("  {what:<34} {:>7.3}", at.as_secs_f64());
    }
    println!("  {:<34} {:>7}", "lost acknowledged writes", lost.len());

    // A clean end: delete stops the surviving replicas through their control sockets,
    // and their ftds remove the TAPs they made for them.
    let taps_on = |host: &str| {
        let listed = crate::run(
            cluster
                .lan
                .host(host)
                .command("ip")
                .args(["-o", "link", "show", "type", "tun"]),
        );
        listed
            .stdout
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .collect::<Vec<_>>()
    };
    let before: Vec<String> = ["b", "c"].iter().flat_map(|host| taps_on(host)).collect();
    let now: Vec<String> = ["b", "c"]
        .iter()
        .map(|host| bridge_mac(cluster, host))
        .collect();
    if now != bridge_macs {
        return Err(Failure::new(format!(
            "the bridges' MACs on b and c changed from {bridge_macs:?} to {now:?} when ftd added TAPs"
        )));
    }
    if before.len() != 2 {
        return Err(Failure::new(format!(
            "expected one TAP made by ftd on each of b and c, found {before:?}"
        )));
    }
    cluster.ftctl_ok(ASK, &["delete", "web1"])?;
    wait_for(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the TAPs of web1's replicas to be removed from b and c",
        || {
            ["b", "c"]
                .iter()
                .all(|host| taps_on(host).is_empty())
                .then_some(())
        },
    )?;
    println!(
        "           deleted: web1's replicas stopped and their TAPs ({}) removed",
        before.join(", ")
    );
    Ok(DemoReport {
        moments: moments.to_vec(),
        acked: writes.acked(),
        lost,
        final_status: healed,
    })
}

#[cfg(test)]
mod tests {
    use super::unix_ms_of_log_line;

    #[test]
    fn log_timestamps_read_as_unix_milliseconds() {
        assert_eq!(
            unix_ms_of_log_line("2026-12-06T02:41:55.813010Z  WARN live"),
            Some(1_796_524_915_813)
        );
        assert_eq!(unix_ms_of_log_line("1970-01-01T00:00:01.5Z x"), Some(1500));
        assert_eq!(
            unix_ms_of_log_line("2000-02-29T23:59:59Z"),
            Some(951_868_799_000)
        );
        assert_eq!(unix_ms_of_log_line("not a stamp"), None);
    }
}
