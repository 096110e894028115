//! `cargo xtask bench failover` (also the end of `bench ft`): how long a client of the kv
//! guest goes unserved when its primary fails, [`TRIALS`] trials per row, with an idle
//! client (it sends its next write right after the failure: from the failure to that
//! write's reply) and a busy one (writing back to back: the longest pause between two
//! replies from the failure on):
//! - the primary process is killed (SIGKILL): its host's kernel closes its connections,
//!   so the backup learns of it at once;
//! - the primary's host dies: its LAN link goes down, then its processes are killed. No
//!   FIN or RST reaches anyone; the backup learns of it from the log channel's silence.
//!
//! Every trial then reads back, on the same connection, every write it had acknowledged.

use crate::bench_ft::{control_socket, start, Mode, Setup};
use crate::util::Failure;
use ftvm_tests::{in_netns, wait_for_pong_at, Lan, Reply, RespClient, GUEST_IP};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// Trials per row unless told.
const TRIALS: usize = 20;
/// Writes before the failure.
const WARM_UP: u32 = 200;
/// A busy client's writes after the failure before it stops.
const BUSY_AFTER: u32 = 100;

/// What to run.
pub(crate) struct Options {
    /// Trials per row.
    pub trials: usize,
    /// The faults, a pair of rows each.
    pub faults: Vec<Fault>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            trials: TRIALS,
            faults: vec![Fault::Kill, Fault::HostDeath],
        }
    }
}

/// How the primary fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL of the primary process.
    Kill,
    /// The primary's host leaves the LAN (link down) and its processes are killed.
    HostDeath,
}

/// What one trial measured.
struct Trial {
    /// Milliseconds without service (see the module's description).
    unserved_ms: f64,
    /// Writes the client had acknowledged.
    acknowledged: u32,
    /// Acknowledged writes that did not read back.
    lost: u32,
    /// The backup's own go-live time (end of the lost primary's log to running live).
    go_live_ms: Option<u64>,
}

/// A client on one connection to the guest at `addr`, from namespace `ns`: [`WARM_UP`]
/// writes, then says so on `warm` and measures across the failure announced on `failed`
/// (idle or busy, see the module), then reads every acknowledged write back.
fn client(
    ns: String,
    addr: String,
    busy: bool,
    warm: Sender<()>,
    failed: Receiver<Instant>,
) -> std::thread::JoinHandle<Result<Trial, String>> {
    std::thread::spawn(move || {
        in_netns(&ns, move || {
            let mut client = RespClient::connect(&addr, Duration::from_secs(20))
                .map_err(|err| err.to_string())?;
            let value = |i: u32| format!("v{i}-{}", i.wrapping_mul(2_654_435_761));
            let set = |client: &mut RespClient, i: u32| -> Result<Instant, String> {
                let key = format!("k{i}");
                match client.call(&[b"SET", key.as_bytes(), value(i).as_bytes()]) {
                    Ok(Reply::Status(_)) => Ok(Instant::now()),
                    other => Err(format!("write {i}: {other:?}")),
                }
            };
            for i in 0..WARM_UP {
                set(&mut client, i)?;
            }
            let _ = warm.send(());
            let (unserved, acknowledged) = if busy {
                let mut replies = vec![Instant::now()];
                let mut failure = None;
                let mut after = 0;
                let mut i = WARM_UP;
                while after < BUSY_AFTER {
                    replies.push(set(&mut client, i)?);
                    i += 1;
                    failure = failure.or_else(|| failed.try_recv().ok());
                    after += u32::from(failure.is_some_and(|at| replies[replies.len() - 1] > at));
                }
                let failure = failure.ok_or("the failure never came")?;
                let pause = replies
                    .windows(2)
                    .filter(|pair| pair[1] > failure)
                    .map(|pair| pair[1].duration_since(pair[0].max(failure)))
                    .max()
                    .unwrap_or_default();
                (pause, i)
            } else {
                let failure = failed.recv().map_err(|err| err.to_string())?;
                (
                    set(&mut client, WARM_UP)?.duration_since(failure),
                    WARM_UP + 1,
                )
            };
            let mut lost = 0;
            for i in 0..acknowledged {
                let key = format!("k{i}");
                match client.call(&[b"GET", key.as_bytes()]) {
                    Ok(Reply::Bulk(Some(read))) if read == value(i).as_bytes() => {}
                    Ok(_) => lost += 1,
                    Err(err) => return Err(format!("reading back {key}: {err}")),
                }
            }
            Ok(Trial {
                unserved_ms: unserved.as_secs_f64() * 1000.0,
                acknowledged,
                lost,
                go_live_ms: None,
            })
        })
    })
}

/// The backup's go-live time from its control socket, if it went live.
fn go_live_ms(socket: &std::path::Path) -> Option<u64> {
    let status = ftvm_tests::unix_request(socket, b"status\n").ok()?;
    ftvm_tests::field(&status, "go_live_ms")
}

/// Waits for the client to be warm, lets a busy one get going, injects `fail` (it
/// returns when the failure happened) and returns the client's measurement.
fn across(
    busy: bool,
    warm: &Receiver<()>,
    failed: &Sender<Instant>,
    measured: std::thread::JoinHandle<Result<Trial, String>>,
    fail: impl FnOnce(),
) -> Result<Trial, Failure> {
    warm.recv_timeout(Duration::from_secs(60))
        .map_err(|_| Failure::new("the client did not start"))?;
    if busy {
        // Let the back-to-back writes get going.
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = Instant::now();
    fail();
    let _ = failed.send(at);
    measured
        .join()
        .map_err(|_| Failure::new("client thread panicked"))?
        .map_err(Failure::new)
}

/// One trial of `fault`: a fresh pair (its own arbiter, so no earlier claim counts).
fn trial(setup: &Setup, fault: Fault, trial: usize, busy: bool) -> Result<Trial, Failure> {
    let (warm_tx, warm) = channel();
    let (failed, failed_rx) = channel();
    match fault {
        Fault::Kill => {
            let tag = format!("{}{trial}", if busy { "fb" } else { "fi" });
            let (mut ns, pids) = start(setup, &tag, Mode::Pair)?;
            let measured = client(
                ns.name.clone(),
                format!("{GUEST_IP}:6379"),
                busy,
                warm_tx,
                failed_rx,
            );
            let mut result = across(busy, &warm, &failed, measured, || ns.kill(pids[0]))?;
            result.go_live_ms = go_live_ms(&control_socket(setup, &tag, false));
            Ok(result)
        }
        Fault::HostDeath => {
            let tag = format!("{}{trial}", if busy { "hb" } else { "hi" });
            let mut lan = Lan::new(&tag, &["a", "b"]);
            let disk = setup.dir.join(format!("{tag}.img"));
            std::fs::File::create(&disk)
                .and_then(|file| file.set_len(64 << 20))
                .map_err(|err| Failure::new(format!("disk image: {err}")))?;
            let log = format!("{}:7700", lan.ip("a"));
            let backup_control = setup.dir.join(format!("{tag}-b.sock"));
            let binaries = (setup.ftvmm.as_path(), setup.kv.as_path());
            let mut primary = lan.kv_replica(
                "a",
                binaries,
                &disk,
                "bench",
                &["--role", "primary", "--log-listen", &log],
            );
            let mut backup = lan.kv_replica(
                "b",
                binaries,
                &disk,
                "bench",
                &["--role", "backup", "--log-connect", &log],
            );
            backup.arg("--control").arg(&backup_control);
            let backup_log = setup.dir.join(format!("{tag}-b.log"));
            let log_file = std::fs::File::create(&backup_log)
                .map_err(|err| Failure::new(format!("{}: {err}", backup_log.display())))?;
            primary.stderr(std::process::Stdio::null());
            backup.stderr(log_file);
            let primary = lan.spawn_on("a", &mut primary);
            lan.spawn_on("b", &mut backup);
            if !wait_for_pong_at(&lan.client, &lan.guest_ip(), Duration::from_secs(30)) {
                return Err(Failure::new("the kv pair did not answer PING"));
            }
            let measured = client(
                lan.client.name.clone(),
                format!("{}:6379", lan.guest_ip()),
                busy,
                warm_tx,
                failed_rx,
            );
            let measured = across(busy, &warm, &failed, measured, || {
                lan.cut_off("a");
                lan.kill_on("a", primary);
            });
            let mut result = measured.map_err(|failure| {
                let log = std::fs::read_to_string(&backup_log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Failure::new(format!("{failure}; the backup said:\n{}", tail.join("\n")))
            })?;
            result.go_live_ms = go_live_ms(&backup_control);
            std::fs::remove_file(&disk).ok();
            Ok(result)
        }
    }
}

/// The rows: each fault with an idle and a busy client.
pub(crate) fn run(setup: &Setup, options: &Options) -> Result<(), Failure> {
    let trials_per_row = options.trials;
    println!(
        "failover: a client of the kv pair across the primary's failure, {trials_per_row} trials per row; every acknowledged write read back after it"
    );
    for &fault in &options.faults {
        let what = match fault {
            Fault::Kill => "SIGKILL of the primary",
            Fault::HostDeath => "the primary's host dies (link down + SIGKILL)",
        };
        for (busy, client_kind) in [
            (false, "idle client: failure -> reply to the next write"),
            (true, "busy client: longest pause between replies"),
        ] {
            let mut trials = Vec::new();
            for index in 0..trials_per_row {
                trials.push(trial(setup, fault, index, busy)?);
            }
            let acknowledged: u32 = trials.iter().map(|t| t.acknowledged).sum();
            let lost: u32 = trials.iter().map(|t| t.lost).sum();
            let mut unserved: Vec<f64> = trials.iter().map(|t| t.unserved_ms).collect();
            println!(
                "  trials (ms): {:?}",
                unserved
                    .iter()
                    .map(|ms| ms.round() as u64)
                    .collect::<Vec<_>>()
            );
            unserved.sort_by(f64::total_cmp);
            let mut go_live: Vec<u64> = trials.iter().filter_map(|t| t.go_live_ms).collect();
            go_live.sort_unstable();
            let go_live = match go_live.len() {
                0 => "no go-live time read".to_owned(),
                n => format!(
                    "backup go-live p50 {} ms max {} ms ({n} read)",
                    go_live[n / 2],
                    go_live[n - 1]
                ),
            };
            println!(
                "{what}, {client_kind}: p50 {:.0} ms, max {:.0} ms, min {:.0} ms; {go_live}; {acknowledged} writes acknowledged, {lost} lost",
                unserved[trials_per_row / 2],
                unserved[trials_per_row - 1],
                unserved[0],
            );
            if lost > 0 {
                return Err(Failure::new(format!(
                    "{lost} acknowledged writes did not read back after {what}"
                )));
            }
        }
    }
    Ok(())
}
