//! `cargo xtask chaos [--trials N] [--seed S]`: the demo's cluster (three hosts as network
//! namespaces, an ftd on each, etcd, the kv guest with a disk and a NIC) under a random
//! fault per trial, with a client that writes distinct keys the whole time and remembers
//! every acknowledged one.
//!
//! After each fault the cluster must be Protected again; no two replicas may ever have
//! been live at once, judged from the frames the guest's MAC left each host's TAP with
//! (`ftvm_tests::watch`), not from what ftvmm says. At the end every acknowledged write
//! is read back from the live guest, and again from the disk alone after a cold start.
//! A fault that takes no replica away (an ftd, etcd or a link to them, the client's
//! link, a slow link) must leave the same pair: a new one is a false failover.
//! It prints the trials, faults by kind, lost writes, double-live trials, false
//! failovers, and per fault kind the time to clients served again and to Protected
//! again (p50, max).

use crate::util::{percentile, Failure, Rng};
use ftvm_tests::cluster::{self, check_interrupted, replica_of, wait_for, Binaries, Cluster};
use ftvm_tests::watch::{double_live, emitters, FrameWatch};
use ftvm_tests::{run, AckedWrites, GUEST_MAC};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The hosts of the cluster; the VM starts with its primary on a and its backup on b.
const HOSTS: [&str; 3] = ["a", "b", "c"];
/// The lease TTL of the ftds (seconds).
const LEASE_TTL: u64 = 3;
/// How long a trial may take to be Protected again.
const HEAL_PATIENCE: Duration = Duration::from_secs(90);
/// How long one pair must stay Protected to count (longer than a failover takes to show).
const STABLE: Duration = Duration::from_millis(2500);
/// The client opens a fresh connection after this many writes on one.
const WRITES_PER_CONNECTION: u32 = 300;

/// The faults a trial draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillPrimary,
    KillBackup,
    KillFtd,
    KillLeaderFtd,
    KillEtcd,
    FreezePrimary,
    FreezeBackup,
    PartitionPair,
    CutEtcdLink,
    CutClientLink,
    HostDeath,
    SlowLink,
}

impl Fault {
    const ALL: [Fault; 12] = [
        Fault::KillPrimary,
        Fault::KillBackup,
        Fault::KillFtd,
        Fault::KillLeaderFtd,
        Fault::KillEtcd,
        Fault::FreezePrimary,
        Fault::FreezeBackup,
        Fault::PartitionPair,
        Fault::CutEtcdLink,
        Fault::CutClientLink,
        Fault::HostDeath,
        Fault::SlowLink,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill -9 primary",
            Fault::KillBackup => "kill -9 backup",
            Fault::KillFtd => "kill -9 an ftd",
            Fault::KillLeaderFtd => "kill -9 the leader's ftd",
            Fault::KillEtcd => "kill -9 etcd",
            Fault::FreezePrimary => "freeze the primary",
            Fault::FreezeBackup => "freeze the backup",
            Fault::PartitionPair => "cut primary <-> backup hosts",
            Fault::CutEtcdLink => "cut a host from etcd",
            Fault::CutClientLink => "cut the client's link",
            Fault::HostDeath => "the primary's host dies",
            Fault::SlowLink => "slow primary host link",
        }
    }

    /// Whether the fault takes a replica away: `Some(true)` if it must end with another
    /// pair, `Some(false)` if a new pair would be a false failover (nothing died; the
    /// replicas still hear each other), `None` if either is right (a freeze near the
    /// peer timeout, a partition between the replicas).
    fn replaces_the_pair(self) -> Option<bool> {
        match self {
            Fault::KillPrimary | Fault::KillBackup | Fault::HostDeath => Some(true),
            Fault::KillFtd
            | Fault::KillLeaderFtd
            | Fault::KillEtcd
            | Fault::CutEtcdLink
            | Fault::CutClientLink
            | Fault::SlowLink => Some(false),
            Fault::FreezePrimary | Fault::FreezeBackup | Fault::PartitionPair => None,
        }
    }
}

/// What the client thread saw: every acknowledged write, and when each was acknowledged.
#[derive(Default)]
struct Client {
    acked: Vec<(String, String)>,
    /// When each acknowledged write was sent, and when its reply came.
    acked_at: Vec<(Instant, Instant)>,
    reconnects: u64,
    errors: Vec<String>,
}

/// The writing client: distinct keys, one connection for [`WRITES_PER_CONNECTION`] writes
/// or until it breaks, then a fresh one.
fn start_client(
    ns: String,
    addr: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Client>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut connection = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let prefix = format!("chaos{connection}");
            connection += 1;
            let Ok(mut writes) =
                std::panic::catch_unwind(|| AckedWrites::connect(&ns, &addr, &prefix))
            else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            let mut written = 0;
            while !stop.load(Ordering::Relaxed) && written < WRITES_PER_CONNECTION {
                let sent = Instant::now();
                let result = writes.write();
                written += 1;
                let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                match result {
                    Ok(()) => {
                        if let Some(last) = writes.acked_writes().last() {
                            seen.acked.push(last.clone());
                            seen.acked_at.push((sent, Instant::now()));
                        }
                    }
                    Err(err) => {
                        // A write not acknowledged is not counted; the connection may be
                        // gone (a dead host, a cut link): take a fresh one.
                        seen.errors.push(err);
                        seen.reconnects += 1;
                        break;
                    }
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
}

/// One trial's figures.
struct Trial {
    /// The stable Protected status it ended with (the next trial's starting point).
    after: Value,
    fault: Fault,
    served_after: Option<Duration>,
    protected_after: Duration,
    double_live: bool,
    /// The pair it ended with is another than the one it started with.
    pair_replaced: bool,
}

impl Trial {
    /// A new pair after a fault that took no replica away.
    fn false_failover(&self) -> bool {
        self.pair_replaced && self.fault.replaces_the_pair() == Some(false)
    }
}

/// How a run picks its faults.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// At random (from the seed).
    Random,
    /// Every kind in turn (a short run that covers them all).
    EveryKind,
}

/// Runs the chaos with `bins` and the kv guest `kv`: `trials` faults picked as `pick`
/// says, durations drawn from `seed`.
pub fn chaos(bins: Binaries, kv: &Path, trials: u32, seed: u64, pick: Pick) -> Result<(), Failure> {
    cluster::catch_interrupts();
    println!("chaos: {trials} trials, seed {seed} (--seed {seed} repeats them)");
    let dir = std::env::temp_dir().join(format!("ftvm-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let result = Cluster::start("chaos", &HOSTS, bins.clone(), &dir, LEASE_TTL)
        .and_then(|mut cluster| run_chaos(&mut cluster, &bins, kv, trials, seed, pick));
    match &result {
        Ok(()) => {
            std::fs::remove_dir_all(&dir).ok();
        }
        // The whole logs, the disk and the state directories, for whoever looks next.
        Err(_) => eprintln!("chaos: the scratch directory is kept: {}", dir.display()),
    }
    result
}

fn status(cluster: &Cluster) -> Option<Value> {
    HOSTS
        .iter()
        .find_map(|host| cluster.ftctl_json(host, &["status", "web1"]))
}

/// The host and pid of the replica of `role`.
fn replica(status: &Value, role: &str) -> Option<(String, u32)> {
    let replica = replica_of(status, role)?;
    Some((
        replica["host"].as_str()?.to_owned(),
        u32::try_from(replica["pid"].as_u64()?).ok()?,
    ))
}

fn protected(cluster: &Cluster) -> Option<Value> {
    let vm = status(cluster)?;
    (vm["protection"] == "protected").then_some(vm)
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) with a pid read from the cluster's status and a signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn run_chaos(
    cluster: &mut Cluster,
    bins: &Binaries,
    kv: &Path,
    trials: u32,
    seed: u64,
    pick: Pick,
) -> Result<(), Failure> {
    let create = cluster.kv_create_args("web1", kv)?;
    let disk = create
        .iter()
        .skip_while(|arg| *arg != "--disk")
        .nth(1)
        .cloned()
        .ok_or_else(|| Failure::new("no disk in the create arguments"))?;
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster.ftctl_ok("c", &create)?;
    wait_for(
        Duration::from_secs(60),
        Duration::from_millis(100),
        "web1 to be protected",
        || protected(cluster),
    )
    .map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
    let host_ns: Vec<(String, String)> = HOSTS
        .iter()
        .map(|host| (host.to_string(), cluster.lan.host(host).name.clone()))
        .collect();
    let watch_hosts: Vec<(&str, &str)> = host_ns
        .iter()
        .map(|(host, ns)| (host.as_str(), ns.as_str()))
        .collect();
    // ftd names the TAPs after the replicas: the frames are watched leaving each host.
    let watch = FrameWatch::start(
        &watch_hosts,
        &ftvm_tests::watch::Watched::Uplink("uplink".into()),
        GUEST_MAC,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Client::default()));
    let client = start_client(
        cluster.lan.client.name.clone(),
        format!("{}:6379", cluster.lan.guest_ip()),
        stop.clone(),
        seen.clone(),
    );
    let mut rng = Rng(seed | 1);
    let mut results = Vec::new();
    let outcome = (|| -> Result<(), Failure> {
        for trial in 0..trials {
            check_interrupted()?;
            let fault = match pick {
                Pick::Random => Fault::ALL[rng.below(Fault::ALL.len() as u64) as usize],
                Pick::EveryKind => Fault::ALL[trial as usize % Fault::ALL.len()],
            };
            // The status the last trial ended with was stable Protected just now.
            let before = match results.last() {
                Some(Trial { after, .. }) => after.clone(),
                None => stable_protected(cluster, None)?.0,
            };
            let result = one_trial(cluster, &watch, &seen, &mut rng, fault, &before)
                .map_err(|err| Failure::new(format!("trial {trial} ({}): {err}", fault.name())))?;
            // Every write acknowledged so far is on the shared disk already (a reply goes
            // out after the write it depends on): a hole shows at the trial that made it.
            let missing = missing_on_disk(&disk, &seen);
            if missing > 0 {
                return Err(Failure::new(format!(
                    "trial {trial} ({}): {missing} acknowledged writes are not in the log on the shared disk {disk}",
                    fault.name()
                )));
            }
            println!(
                "trial {trial:>4}  {:<30} served again {:>8}  protected again {:>7.0} ms{}{}",
                fault.name(),
                result.served_after.map_or("-".into(), |at| format!(
                    "{:.0} ms",
                    at.as_secs_f64() * 1000.0
                )),
                result.protected_after.as_secs_f64() * 1000.0,
                if result.double_live {
                    "  DOUBLE LIVE"
                } else {
                    ""
                },
                if result.pair_replaced {
                    "  new pair"
                } else {
                    ""
                }
            );
            results.push(result);
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    outcome.map_err(|err| Failure::new(format!("{err}\n{}", cluster.logs())))?;
    let client = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
    let live_lost = read_back_live(cluster, &client.acked);
    let cold_lost = read_back_cold(cluster, bins, kv, &disk, &client.acked)?;
    report(&results, &client, live_lost, cold_lost);
    let double = results.iter().filter(|trial| trial.double_live).count();
    let false_failovers = results
        .iter()
        .filter(|trial| trial.false_failover())
        .count();
    if live_lost + cold_lost > 0 || double > 0 || false_failovers > 0 {
        return Err(Failure::new(format!(
            "chaos found {live_lost} writes lost on the live guest, {cold_lost} lost after a cold start, {double} double-live trials, {false_failovers} false failovers"
        )));
    }
    Ok(())
}

/// One fault, then waits for Protected again and looks at the TAPs.
fn one_trial(
    cluster: &mut Cluster,
    watch: &FrameWatch,
    seen: &Mutex<Client>,
    rng: &mut Rng,
    fault: Fault,
    before: &Value,
) -> Result<Trial, Failure> {
    let (primary_host, primary_pid) =
        replica(before, "primary").ok_or_else(|| Failure::new("no primary"))?;
    let (backup_host, backup_pid) =
        replica(before, "backup").ok_or_else(|| Failure::new("no backup"))?;
    // What the TAPs saw before the fault is the last trial's business.
    let _ = watch.take();
    // When the fault took effect: now for a signal, after the command for a link.
    let mut injected = Instant::now();
    match fault {
        Fault::KillPrimary => signal(primary_pid, libc::SIGKILL),
        Fault::KillBackup => signal(backup_pid, libc::SIGKILL),
        Fault::KillFtd | Fault::KillLeaderFtd => {
            let host = if fault == Fault::KillLeaderFtd {
                cluster.wait_for_hosts(HOSTS.len())?
            } else {
                HOSTS[rng.below(3) as usize].to_owned()
            };
            cluster.kill_ftd(&host);
            std::thread::sleep(rng.millis(200, 4000));
            cluster.start_ftd(&host)?;
        }
        Fault::KillEtcd => {
            cluster.lan.stop_etcd();
            std::thread::sleep(rng.millis(500, 4000));
            cluster.lan.start_etcd();
        }
        Fault::FreezePrimary | Fault::FreezeBackup => {
            let pid = if fault == Fault::FreezePrimary {
                primary_pid
            } else {
                backup_pid
            };
            signal(pid, libc::SIGSTOP);
            // Around the peer timeout (300 ms): sometimes the other side gives it up.
            std::thread::sleep(rng.millis(100, 1000));
            signal(pid, libc::SIGCONT);
        }
        Fault::PartitionPair => {
            let other = cluster.lan.ip(&backup_host);
            iptables(
                cluster,
                &primary_host,
                &["-A", "INPUT", "-s", &other, "-j", "DROP"],
            )?;
            iptables(
                cluster,
                &primary_host,
                &["-A", "OUTPUT", "-d", &other, "-j", "DROP"],
            )?;
            injected = Instant::now();
            std::thread::sleep(rng.millis(500, 5000));
            iptables(cluster, &primary_host, &["-F"])?;
        }
        Fault::CutEtcdLink => {
            let host = HOSTS[rng.below(3) as usize];
            let etcd = cluster.lan.gateway();
            iptables(cluster, host, &["-A", "OUTPUT", "-d", &etcd, "-j", "DROP"])?;
            iptables(cluster, host, &["-A", "INPUT", "-s", &etcd, "-j", "DROP"])?;
            injected = Instant::now();
            std::thread::sleep(rng.millis(500, 5000));
            iptables(cluster, host, &["-F"])?;
        }
        Fault::CutClientLink => {
            let client = &cluster.lan.client;
            client.exec_ok(&["ip", "link", "set", "uplink", "down"]);
            injected = Instant::now();
            std::thread::sleep(rng.millis(200, 3000));
            client.exec_ok(&["ip", "link", "set", "uplink", "up"]);
        }
        Fault::HostDeath => {
            cluster.lan.cut_off(&primary_host);
            injected = Instant::now();
            cluster.kill_ftd(&primary_host);
            cluster.kill_replicas(&primary_host);
            // Back once the cluster healed without it: a new machine in its place.
            let mut seen = String::from("no answer");
            wait_for(
                HEAL_PATIENCE,
                Duration::from_millis(50),
                &format!("Protected without the dead host {primary_host}"),
                || {
                    let vm = status(cluster)?;
                    seen = vm.to_string();
                    (vm["protection"] == "protected").then_some(())?;
                    let on: Vec<String> = ["primary", "backup"]
                        .iter()
                        .filter_map(|role| replica(&vm, role).map(|(host, _)| host))
                        .collect();
                    (!on.contains(&primary_host)).then_some(())
                },
            )
            .map_err(|failure| Failure::new(format!("{failure}; the last status: {seen}")))?;
            cluster
                .lan
                .host(&primary_host)
                .exec_ok(&["ip", "link", "set", "uplink", "up"]);
            cluster.start_ftd(&primary_host)?;
        }
        Fault::SlowLink => {
            let host = cluster.lan.host(&primary_host);
            host.exec_ok(&[
                "tc", "qdisc", "add", "dev", "uplink", "root", "tbf", "rate", "2mbit", "burst",
                "32kbit", "latency", "200ms",
            ]);
            injected = Instant::now();
            std::thread::sleep(rng.millis(1000, 4000));
            host.exec_ok(&["tc", "qdisc", "del", "dev", "uplink", "root"]);
        }
    }
    // A fault that takes a replica away must show a new pair (the status read right
    // after it may still be the old one's).
    let must_change = fault.replaces_the_pair() == Some(true);
    let (after, since) = stable_protected(cluster, must_change.then_some(before))?;
    let pair_replaced = pair(&after) != pair(before);
    let protected_after = since.saturating_duration_since(injected);
    // Clients served: the first reply to a write sent after the fault was injected (a
    // write already under way could be answered before the fault took effect).
    let served_after = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(20),
        "a write acknowledged after the fault",
        || {
            let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.acked_at
                .iter()
                .find(|(sent, _)| *sent > injected)
                .map(|(_, at)| at.duration_since(injected))
        },
    )
    .ok();
    let sightings = watch.take();
    // The client writes all through the trial: a watch that saw none of the guest's
    // frames is blind, and "no double live" would mean nothing.
    if sightings.is_empty() {
        return Err(Failure::new(format!(
            "{}: the frame watch saw none of the guest's frames leave any host: the double-live detector is blind",
            fault.name()
        )));
    }
    let double = double_live(&sightings);
    if double {
        eprintln!(
            "DOUBLE LIVE: the guest's frames came from {:?}; status before {before}, after {after}",
            emitters(&sightings)
        );
    }
    Ok(Trial {
        after,
        fault,
        served_after,
        protected_after,
        double_live: double,
        pair_replaced,
    })
}

/// How many writes the client saw acknowledged are not in the kv log of `disk` as the
/// page cache holds it now (every replica writes the same shared file).
fn missing_on_disk(disk: &str, seen: &Mutex<Client>) -> usize {
    // Taken before the disk is read: every one of these was written before its reply.
    let acked = seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .acked
        .clone();
    let Ok(image) = std::fs::read(disk) else {
        return acked.len();
    };
    let mut on_disk = std::collections::HashMap::new();
    for op in kvcore::log::replay_image(&image).ops {
        if let kvcore::db::Op::Set { key, value } = op {
            on_disk.insert(key, value);
        }
    }
    let missing: Vec<&(String, String)> = acked
        .iter()
        .filter(|(key, value)| on_disk.get(key.as_bytes()) != Some(&value.as_bytes().to_vec()))
        .collect();
    for (key, _) in missing.iter().take(5) {
        eprintln!("not on the disk: {key}");
    }
    missing.len()
}

/// Where a replica runs: host and pid.
type Placed = Option<(String, u32)>;

/// The pair a status shows.
fn pair(vm: &Value) -> (Placed, Placed) {
    (replica(vm, "primary"), replica(vm, "backup"))
}

/// Waits until the VM is Protected by the same pair for [`STABLE`] (a status read just
/// after a fault may still show the pair from before it; a failover that is under way
/// shows within that time), and, with `changed_from`, by another pair than that one.
/// Returns the status and when that pair was first seen Protected.
fn stable_protected(
    cluster: &Cluster,
    changed_from: Option<&Value>,
) -> Result<(Value, Instant), Failure> {
    let deadline = Instant::now() + HEAL_PATIENCE;
    let mut seen: Option<(Value, Instant)> = None;
    loop {
        check_interrupted()?;
        let now = protected(cluster)
            .filter(|vm| changed_from.is_none_or(|before| pair(vm) != pair(before)));
        seen = match (now, seen) {
            (Some(vm), Some((first, since))) if pair(&vm) == pair(&first) => {
                if since.elapsed() >= STABLE {
                    return Ok((vm, since));
                }
                Some((first, since))
            }
            (Some(vm), _) => Some((vm, Instant::now())),
            (None, _) => None,
        };
        if Instant::now() > deadline {
            return Err(Failure::new(format!(
                "timed out after {HEAL_PATIENCE:?} waiting for a stable Protected"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn iptables(cluster: &Cluster, host: &str, args: &[&str]) -> Result<(), Failure> {
    let ran = run(cluster.lan.host(host).command("iptables").args(args));
    if ran.code == Some(0) {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "iptables {args:?} in {host}: {ran:?}"
        )))
    }
}

/// Reads every acknowledged write back from the live guest; the count missing.
fn read_back_live(cluster: &Cluster, acked: &[(String, String)]) -> usize {
    let mut reader = AckedWrites::connect(
        &cluster.lan.client.name,
        &format!("{}:6379", cluster.lan.guest_ip()),
        "check",
    );
    acked
        .iter()
        .filter(|(key, value)| {
            reader.client().call(&[b"GET", key.as_bytes()]).ok()
                != Some(ftvm_tests::Reply::Bulk(Some(value.as_bytes().to_vec())))
        })
        .inspect(|(key, _)| eprintln!("lost on the live guest: {key}"))
        .count()
}

/// Deletes the VM (its replicas stop), boots kv alone on its disk in host a, reads every
/// acknowledged write back; the count missing.
fn read_back_cold(
    cluster: &Cluster,
    bins: &Binaries,
    kv: &Path,
    disk: &str,
    acked: &[(String, String)],
) -> Result<usize, Failure> {
    cluster.ftctl_ok("c", &["delete", "web1"])?;
    wait_for(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "web1 deleted",
        || status(cluster).is_none().then_some(()),
    )?;
    let host = cluster.lan.host("a");
    // By hand, outside ftd: a TAP of its own on host a's bridge.
    host.exec_ok(&["ip", "tuntap", "add", "dev", "cold0", "mode", "tap"]);
    // An fe: MAC, so that the bridge keeps its own (see ftd's taps).
    host.exec_ok(&["ip", "link", "set", "cold0", "address", "fe:00:00:00:00:01"]);
    host.exec_ok(&["ip", "link", "set", "cold0", "master", "br0"]);
    host.exec_ok(&["ip", "link", "set", "cold0", "up"]);
    let mut alone = ftvm_tests::Spawned::start(
        host.command(&bins.ftvmm)
            .args(["run", "--mem", "128M", "--console", "none"])
            .args(["--mac", GUEST_MAC, "--tap", "cold0"])
            .args(["--ip", &format!("{}/24", cluster.lan.guest_ip())])
            .args(["--disk", disk, "--image"])
            .arg(kv),
    );
    if !ftvm_tests::wait_for_pong_at(
        &cluster.lan.client,
        &cluster.lan.guest_ip(),
        Duration::from_secs(30),
    ) {
        alone.kill();
        return Err(Failure::new("the cold-started kv did not answer"));
    }
    let mut reader = AckedWrites::connect(
        &cluster.lan.client.name,
        &format!("{}:6379", cluster.lan.guest_ip()),
        "cold",
    );
    let lost = acked
        .iter()
        .filter(|(key, value)| {
            reader.client().call(&[b"GET", key.as_bytes()]).ok()
                != Some(ftvm_tests::Reply::Bulk(Some(value.as_bytes().to_vec())))
        })
        .inspect(|(key, _)| eprintln!("lost after a cold start: {key}"))
        .count();
    alone.kill();
    Ok(lost)
}

fn report(results: &[Trial], client: &Client, live_lost: usize, cold_lost: usize) {
    let double = results.iter().filter(|trial| trial.double_live).count();
    println!("\nchaos: {} trials", results.len());
    println!(
        "client: {} writes acknowledged, {} connections broke (a fresh one each time)",
        client.acked.len(),
        client.reconnects
    );
    println!("lost acknowledged writes: {live_lost} on the live guest, {cold_lost} after a cold start from the disk");
    println!("double-live trials (the guest's MAC from two hosts in turns): {double}");
    println!(
        "false failovers (a new pair after a fault that took no replica away): {}",
        results
            .iter()
            .filter(|trial| trial.false_failover())
            .count()
    );
    let mut by_kind: BTreeMap<Fault, Vec<&Trial>> = BTreeMap::new();
    for trial in results {
        by_kind.entry(trial.fault).or_default().push(trial);
    }
    println!(
        "{:<30} {:>6} {:>9} {:>22} {:>24}",
        "fault", "trials", "new pair", "served again p50/max", "protected again p50/max"
    );
    for (fault, trials) in by_kind {
        let ms = |values: Vec<f64>| -> String {
            let mut values = values;
            if values.is_empty() {
                return "-".into();
            }
            values.sort_by(f64::total_cmp);
            format!(
                "{:.0}/{:.0} ms",
                percentile(&values, 50.0),
                values.last().copied().unwrap_or(f64::NAN)
            )
        };
        let served = ms(trials
            .iter()
            .filter_map(|trial| trial.served_after)
            .map(|at| at.as_secs_f64() * 1000.0)
            .collect());
        let healed = ms(trials
            .iter()
            .map(|trial| trial.protected_after.as_secs_f64() * 1000.0)
            .collect());
        println!(
            "{:<30} {:>6} {:>9} {:>22} {:>24}",
            fault.name(),
            trials.len(),
            trials.iter().filter(|trial| trial.pair_replaced).count(),
            served,
            healed
        );
    }
}
