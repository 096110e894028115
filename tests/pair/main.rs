//! An FT pair on one machine: a primary streams its log over TCP to a backup that executes
//! the same guest from it (docs/replay.md, "The log channel").

use ftvm_tests::{
    binary, field, free_port, guest, redis_cli, require_kvm, run, wait_for_pong, AckedWrites, Disk,
    NetNs, Ran, Spawned, GUEST_IP, GUEST_MAC,
};

use std::process::Command;

use ftvm_pair::channel::PEER_TIMEOUT;
use std::time::Duration;

const HELLO: &str = "ticks=15 tick_us=700 work=2000000";

/// Both replicas must use the same digest periods; small ones check the stream often.
const DIGESTS: [&str; 4] = ["--digest-every", "16", "--mem-digest-every", "64"];

/// `ftvmm run` of `image` with `cmdline` in role `role` on the log channel at `port`.
fn replica(role: &str, image: &str, cmdline: &str, port: u16) -> Command {
    replica_with_mem(role, image, cmdline, "64M", port)
}

fn replica_with_mem(role: &str, image: &str, cmdline: &str, mem: &str, port: u16) -> Command {
    replica_with_arbiter(role, image, cmdline, mem, port, &arbiter_spec())
}

fn arbiter_spec() -> String {
    format!("local:{}", arbiter_dir().display())
}

fn replica_with_arbiter(
    role: &str,
    image: &str,
    cmdline: &str,
    mem: &str,
    port: u16,
    arbiter: &str,
) -> Command {
    require_kvm();
    let mut command = Command::new(binary("ftvmm"));
    command
        .args(["run", "--mem", mem, "--console", "-", "--stats"])
        .args(["--cmdline", cmdline])
        .args(DIGESTS)
        .arg("--image")
        .arg(guest(image))
        .args(["--role", role])
        // One pair per port, so tests running side by side never share a claim.
        .args(["--vm", &format!("pair-{port}"), "--arbiter", arbiter])
        .args(ftvm_tests::replica_tls());
    let addr = format!("127.0.0.1:{port}");
    match role {
        "primary" => command.args(["--log-listen", &addr]),
        _ => command.args(["--log-connect", &addr]),
    };
    command
}

/// The local arbiter's directory of this test process.
fn arbiter_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ftvm-pair-arbiter-{}", std::process::id()))
}

/// Who won the go-live claim of the pair on `port` (generation 1), if anyone.
fn winner(port: u16) -> Option<String> {
    std::fs::read_to_string(arbiter_dir().join(format!("pair-{port}.gen1.live"))).ok()
}

/// `ftvmm run` of the kv guest in `ns` as `role` of the pair on `port`: 128 MiB, the test
/// MAC and address, the shared `disk`, this process's local arbiter. Callers add the rest.
fn kv_replica(ns: &NetNs, disk: &Disk, role: &str, port: u16) -> Command {
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
        .arg("--disk")
        .arg(disk.path())
        .arg("--image")
        .arg(guest("kv"))
        .args(["--role", role, "--vm", &format!("pair-{port}")])
        .args(["--arbiter", &arbiter_spec()])
        .args(ftvm_tests::replica_tls());
    command
}

/// Fails the test unless `ran` is a replica that found the pair's claim taken and halted
/// with 72 before its guest finished.
fn assert_halted_by_the_claim(ran: &Ran) {
    assert_eq!(ran.code, Some(72), "{ran:?}");
    assert!(
        ran.stderr.contains("won the go-live claim: halting"),
        "{ran:?}"
    );
    assert!(
        !ran.stdout.contains("bye"),
        "the halted replica finished the guest: {ran:?}"
    );
}

/// Fails the test unless the go-live claim of the pair on `port` names a `role` replica.
fn assert_winner(port: u16, role: &str) {
    let winner = winner(port);
    assert!(
        winner
            .as_deref()
            .is_some_and(|w| w.starts_with(&format!("{role}@"))),
        "the go-live claim names {winner:?}, not a {role} replica"
    );
}

/// The number before `what` in `text` ("... 135 exits replayed ...").
fn count_before(text: &str, what: &str) -> Option<u64> {
    let before = text.split(what).next()?;
    before
        .rsplit(|c: char| !c.is_ascii_digit())
        .find(|word| !word.is_empty())?
        .parse()
        .ok()
}

fn stats_line(ran: &Ran) -> &str {
    ran.stderr
        .lines()
        .find(|line| line.starts_with("ftvmm stats:"))
        .unwrap_or_else(|| panic!("no stats line: {ran:?}"))
}

/// A hello guest that runs about three seconds.
const FINITE_HELLO: &str = "ticks=600 tick_us=5000 work=1000";

/// Whether the disk image holds `bytes` anywhere.
fn disk_has(disk: &Disk, bytes: &[u8]) -> bool {
    let image = std::fs::read(disk.path()).expect("read the disk image");
    image.windows(bytes.len()).any(|window| window == bytes)
}

/// One kv pair, a checker writing 400 keys over one connection, SIGKILL of the primary
/// when the checker reaches write `kill_at`.
fn kv_failover_round(tag: &str, kill_at: u32) {
    require_kvm();
    let disk = Disk::new(tag);
    let mut ns = NetNs::with_bridged_taps(tag, &["tap-a", "tap-b"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let kv = |ns: &mut NetNs, role: &str, tap: &str, extra: &[&str]| {
        let mut command = kv_replica(ns, &disk, role, port);
        command
            .args(["--tap", tap])
            .args(DIGESTS)
            .args(extra)
            .stderr(std::process::Stdio::null());
        ns.spawn(&mut command)
    };
    let primary = kv(&mut ns, "primary", "tap-a", &["--log-listen", &addr]);
    let backup = kv(&mut ns, "backup", "tap-b", &["--log-connect", &addr]);
    assert!(
        ftvm_tests::wait_for_pong(&ns, Duration::from_secs(30)),
        "the kv pair did not answer PING"
    );
    let writes = AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "fo");
    let (kill_point, writer) = writes.spawn(400, kill_at);
    kill_point
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the kill point");
    ns.kill(primary);
    let (mut writes, result) = writer.join().expect("checker");
    result.unwrap_or_else(|err| panic!("across the failover: {err}"));
    assert_eq!(writes.acked(), 400);
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert_winner(port, "backup");
    // A new client reaches the live backup too.
    assert_eq!(ftvm_tests::redis_cli(&ns, &["GET", "fo:399"]), "v399");
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(
        ns.wait(backup),
        Some(0),
        "the live backup did not power off cleanly"
    );
}

/// Which replica of a pair a test freezes.
#[derive(Clone, Copy)]
enum Replica {
    Primary,
    Backup,
}

/// A hello pair that runs to its end, with `frozen` stopped (SIGSTOP) for `stall` after
/// `after`; both must end with the guest's code 0. Returns (primary, backup).
fn pair_with_a_stall(frozen: Replica, after: Duration, stall: Duration) -> (Ran, Ran) {
    let port = free_port();
    let primary = Spawned::start(&mut replica("primary", "hello", FINITE_HELLO, port));
    let backup = Spawned::start(&mut replica("backup", "hello", FINITE_HELLO, port));
    let pid = match frozen {
        Replica::Primary => primary.pid(),
        Replica::Backup => backup.pid(),
    };
    std::thread::sleep(after);
    for (signal, pause) in [(libc::SIGSTOP, stall), (libc::SIGCONT, Duration::ZERO)] {
        // SAFETY: kill(2) on a child we started.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
        std::thread::sleep(pause);
    }
    let primary = primary.wait(Duration::from_secs(20));
    let backup = backup.wait(Duration::from_secs(20));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    (primary, backup)
}

mod following;
mod losing;
mod private;
