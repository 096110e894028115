//! An FT pair on one machine: a primary streams its log over TCP to a backup that executes
//! the same guest from it (docs/replay.md, "The log channel").

use ftvm_tests::{
    binary, field, free_port, guest, redis_cli, require_kvm, run, wait_for_pong, AckedWrites, Disk,
    NetNs, Ran, Spawned, GUEST_IP, GUEST_MAC,
};
use std::process::Command;
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
        .args(["--vm", &format!("pair-{port}"), "--arbiter", arbiter]);
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
        .args(["--arbiter", &arbiter_spec()]);
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

#[test]
fn backup_follows_the_primary_and_ends_identically() {
    let port = free_port();
    let primary = Spawned::start(&mut replica("primary", "hello", HELLO, port));
    let backup = Spawned::start(&mut replica("backup", "hello", HELLO, port));
    let backup = backup.wait(Duration::from_secs(30));
    let primary = primary.wait(Duration::from_secs(30));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(primary.stdout.contains("hello from"), "{primary:?}");
    assert_eq!(
        primary.stdout, backup.stdout,
        "both consoles show the same guest"
    );
    assert!(backup.stderr.contains("IDENTICAL"), "{backup:?}");

    let (p, b) = (stats_line(&primary), stats_line(&backup));
    let exits = field(p, "exit_ordinal").expect("primary exit_ordinal");
    assert!(exits > 100, "{p}");
    assert_eq!(field(b, "exit_ordinal"), Some(exits), "{b}");
    assert_eq!(
        count_before(&backup.stderr, " exits replayed"),
        Some(exits),
        "{backup:?}"
    );
    // Everything sent was received and acknowledged; heartbeats rode along.
    let sent = field(p, "log_bytes_sent").expect("log_bytes_sent");
    assert_eq!(field(b, "log_bytes_received"), Some(sent), "{b}");
    assert_eq!(field(p, "log_acked"), Some(sent), "{p}");
    assert_eq!(field(p, "backup_lag_bytes"), Some(0), "{p}");
    assert_eq!(
        field(b, "log_frames_received"),
        field(p, "log_frames_sent"),
        "{p}\n{b}"
    );
    assert!(
        field(p, "log_heartbeats_sent").is_some_and(|n| n > 0),
        "{p}"
    );
    assert_eq!(field(p, "backup_lost"), Some(0), "{p}");
}

#[test]
fn backup_refuses_a_primary_running_another_machine() {
    for (image, cmdline, mem, needle) in [
        ("exits", HELLO, "64M", "runs another image"),
        (
            "hello",
            "ticks=16 tick_us=700",
            "64M",
            "runs the command line [ticks=15",
        ),
        ("hello", HELLO, "32M", "with 64 MiB of memory, not 32 MiB"),
    ] {
        let port = free_port();
        let primary = Spawned::start(&mut replica("primary", "hello", HELLO, port));
        let backup = run(&mut replica_with_mem("backup", image, cmdline, mem, port));
        assert_eq!(backup.code, Some(65), "{backup:?}");
        assert_eq!(backup.stderr.trim_end().lines().count(), 1, "{backup:?}");
        assert!(backup.stderr.contains(needle), "{needle}: {backup:?}");
        assert!(backup.stdout.is_empty(), "the refused backup ran nothing");
        // The primary is not stopped by a backup that refused: it runs on without one.
        let primary = primary.wait(Duration::from_secs(30));
        assert_eq!(primary.code, Some(0), "{primary:?}");
        assert_eq!(field(stats_line(&primary), "backup_lost"), Some(1));
    }
}

/// A hello guest that runs about three seconds.
const FINITE_HELLO: &str = "ticks=600 tick_us=5000 work=1000";

#[test]
fn backup_goes_live_when_the_primary_is_killed_and_finishes_the_guest() {
    let port = free_port();
    let mut primary = Spawned::start(&mut replica("primary", "hello", FINITE_HELLO, port));
    let backup = Spawned::start(&mut replica("backup", "hello", FINITE_HELLO, port));
    std::thread::sleep(Duration::from_millis(1000));
    primary.kill();
    let backup = backup.wait(Duration::from_secs(20));
    assert_eq!(backup.code, Some(0), "{backup:?}");
    let line = backup
        .stderr
        .lines()
        .find(|line| line.contains("WENT LIVE at exit ordinal"))
        .unwrap_or_else(|| panic!("no 'WENT LIVE' line: {backup:?}"));
    let ordinal = count_before(line, " after the primary was lost").expect("ordinal");
    assert!(
        ordinal > 50,
        "the backup followed the primary for a while: {line}"
    );
    // The guest ran to its end on the backup: every tick, the same checksum as a solo run.
    assert!(backup.stdout.contains("ticks: 600 "), "{backup:?}");
    assert!(backup.stdout.ends_with("bye (exit 0)\n"), "{backup:?}");
    assert_winner(port, "backup");
}

#[test]
fn primary_goes_on_alone_when_the_backup_is_killed() {
    let port = free_port();
    let primary = Spawned::start(&mut replica("primary", "hello", FINITE_HELLO, port));
    let mut backup = Spawned::start(&mut replica("backup", "hello", FINITE_HELLO, port));
    std::thread::sleep(Duration::from_millis(1000));
    backup.kill();
    let primary = primary.wait(Duration::from_secs(20));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert!(primary.stdout.ends_with("bye (exit 0)\n"), "{primary:?}");
    assert!(
        primary.stderr.contains("won the go-live claim"),
        "{primary:?}"
    );
    assert_winner(port, "primary");
}

/// The primary is frozen (a partition, as far as the backup can tell): the backup gives
/// it up after the timeout and goes live; when the primary wakes, it finds its backup
/// gone, asks the arbiter, loses, and halts without output. Exactly one replica lives.
#[test]
fn after_a_partition_exactly_one_replica_goes_live() {
    let port = free_port();
    let primary = Spawned::start(&mut replica("primary", "hello", FINITE_HELLO, port));
    let backup = Spawned::start(&mut replica("backup", "hello", FINITE_HELLO, port));
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on a child we started; it is killed when `primary` drops.
    unsafe {
        libc::kill(primary.pid() as libc::pid_t, libc::SIGSTOP);
    }
    let backup = backup.wait(Duration::from_secs(20));
    // SAFETY: as above.
    unsafe {
        libc::kill(primary.pid() as libc::pid_t, libc::SIGCONT);
    }
    let primary = primary.wait(Duration::from_secs(20));
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup
            .stderr
            .contains("nothing from the primary for 2000 ms"),
        "{backup:?}"
    );
    assert!(backup.stderr.contains("WENT LIVE"), "{backup:?}");
    assert_halted_by_the_claim(&primary);
    assert_winner(port, "backup");
}

#[test]
fn a_backup_that_cannot_reach_the_arbiter_never_goes_live() {
    let port = free_port();
    // The backup's arbiter directory stops being usable while it follows the primary:
    // its claim fails, and it must halt instead of going live.
    let dir = std::env::temp_dir().join(format!("ftvm-pair-broken-arbiter-{port}"));
    std::fs::create_dir_all(&dir).expect("arbiter dir");
    let mut primary = Spawned::start(&mut replica("primary", "hello", FINITE_HELLO, port));
    let backup = Spawned::start(&mut replica_with_arbiter(
        "backup",
        "hello",
        FINITE_HELLO,
        "64M",
        port,
        &format!("local:{}", dir.display()),
    ));
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::remove_dir_all(&dir).expect("remove arbiter dir");
    std::fs::write(&dir, b"not a directory").expect("replace it with a file");
    primary.kill();
    let backup = backup.wait(Duration::from_secs(20));
    std::fs::remove_file(&dir).ok();
    assert_eq!(backup.code, Some(73), "{backup:?}");
    assert!(
        backup.stderr.contains("the arbiter cannot be reached"),
        "{backup:?}"
    );
    assert!(!backup.stdout.contains("bye"), "{backup:?}");
}

/// The kv guest as a pair in one namespace: the primary on the TAP and the shared disk,
/// the backup with the same NIC address but no TAP (it emits nothing) and the same disk
/// path (never opened). Under redis-cli traffic and then SHUTDOWN both end with code 0
/// and the backup finds the same final state.
#[test]
fn kv_pair_under_redis_traffic_shuts_down_identically() {
    require_kvm();
    let disk = Disk::new("kv");
    let ns = NetNs::with_tap("pair");
    let port = free_port();
    let kv = |role: &str, extra: &[&str]| {
        Spawned::start(
            kv_replica(&ns, &disk, role, port)
                .arg("--stats")
                .args(DIGESTS)
                .args(extra),
        )
    };
    let addr = format!("127.0.0.1:{port}");
    let primary = kv("primary", &["--tap", "tap0", "--log-listen", &addr]);
    let backup = kv("backup", &["--log-connect", &addr]);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the kv primary did not answer PING"
    );
    for i in 0..30 {
        assert_eq!(
            redis_cli(&ns, &["SET", &format!("key:{i}"), &"v".repeat(i * 7)]),
            "OK"
        );
    }
    assert_eq!(redis_cli(&ns, &["INCR", "counter"]), "1");
    assert_eq!(redis_cli(&ns, &["GET", "key:3"]), "v".repeat(21));
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), "31");
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let primary = primary.wait(Duration::from_secs(30));
    let backup = backup.wait(Duration::from_secs(30));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(backup.stderr.contains("IDENTICAL"), "{backup:?}");
    let (p, b) = (stats_line(&primary), stats_line(&backup));
    assert_eq!(
        field(p, "exit_ordinal"),
        field(b, "exit_ordinal"),
        "{p}\n{b}"
    );
    assert_eq!(field(p, "log_acked"), field(p, "log_bytes_sent"), "{p}");
    assert_eq!(field(p, "backup_lost"), Some(0), "{p}");
    // Every reply went out through the output rule, none unprotected.
    let held = field(p, "output_held").expect("output_held");
    assert!(held >= 33, "{p}");
    assert_eq!(field(p, "output_released"), Some(held), "{p}");
    assert_eq!(field(p, "output_unprotected"), Some(0), "{p}");
}

/// Whether the disk image holds `bytes` anywhere.
fn disk_has(disk: &Disk, bytes: &[u8]) -> bool {
    let image = std::fs::read(disk.path()).expect("read the disk image");
    image.windows(bytes.len()).any(|window| window == bytes)
}

/// The output rule: with the backup stopped (SIGSTOP: its kernel still takes the stream,
/// but nothing acknowledges it) the primary's disk write and reply wait until the primary
/// gives the backup up (no acknowledgement for 2 s) and goes on unprotected. The backup, continued,
/// replays what it got and reports the primary lost.
#[test]
fn transmits_wait_for_the_backups_acknowledgement() {
    require_kvm();
    let disk = Disk::new("hold");
    let ns = NetNs::with_tap("hold");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let kv = |role: &str, extra: &[&str]| {
        Spawned::start(
            kv_replica(&ns, &disk, role, port)
                .arg("--stats")
                .args(extra),
        )
    };
    let primary = kv("primary", &["--tap", "tap0", "--log-listen", &addr]);
    let backup = kv("backup", &["--log-connect", &addr]);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the kv primary did not answer PING"
    );
    let timed = |args: &[&str]| {
        let started = std::time::Instant::now();
        let reply = redis_cli(&ns, args);
        (reply, started.elapsed())
    };
    let (reply, quick) = timed(&["SET", "before", "1"]);
    assert_eq!(reply, "OK");
    assert!(
        quick < Duration::from_secs(1),
        "{quick:?} with a live backup"
    );

    ftvm_tests::stop_process(backup.pid());
    let during = std::thread::scope(|scope| {
        let during = scope.spawn(|| timed(&["SET", "during", "held-disk-write-marker"]));
        // Before the primary gives the backup up (2 s), the write is held too: the
        // shared disk does not have it yet.
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            !disk_has(&disk, b"held-disk-write-marker"),
            "the write reached the disk before the backup acknowledged it"
        );
        during.join().expect("client thread")
    });
    let (reply, held) = during;
    assert!(disk_has(&disk, b"held-disk-write-marker"));
    assert_eq!(reply, "OK");
    assert!(
        held > Duration::from_millis(1000) && held < Duration::from_secs(10),
        "the reply left after {held:?}, not when the backup was given up"
    );
    // Unprotected now: replies are quick again.
    let (_, quick) = timed(&["GET", "during"]);
    assert!(quick < Duration::from_secs(1), "{quick:?} unprotected");
    // SAFETY: as above.
    unsafe {
        libc::kill(backup.pid() as libc::pid_t, libc::SIGCONT);
    }
    // The woken backup finds its primary gone, asks the arbiter, and loses: the primary
    // claimed the pair when it gave the backup up.
    let backup = backup.wait(Duration::from_secs(30));
    assert_eq!(backup.code, Some(72), "{backup:?}");
    assert!(
        backup.stderr.contains("won the go-live claim: halting"),
        "{backup:?}"
    );

    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let primary = primary.wait(Duration::from_secs(30));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    let p = stats_line(&primary);
    assert_eq!(field(p, "backup_lost"), Some(1), "{p}");
    // It asked the arbiter before letting the held reply go, and then went on alone.
    assert!(
        primary.stderr.contains("won the go-live claim")
            && primary.stderr.contains("running unprotected"),
        "{primary:?}"
    );
    assert!(
        field(p, "output_hold_us_max").is_some_and(|us| us > 1_000_000),
        "{p}"
    );
    assert!(
        primary
            .stderr
            .contains("no acknowledgement from the backup"),
        "{primary:?}"
    );
}

#[test]
fn pair_flags_that_do_not_fit_are_one_line_usage_errors() {
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    for (extra, needle) in [
        (
            vec!["--role", "primary"],
            "--role primary needs --log-listen",
        ),
        (
            vec!["--role", "backup"],
            "--role backup needs --log-connect",
        ),
        (
            vec!["--log-listen", "127.0.0.1:1"],
            "--log-listen needs --role primary",
        ),
        (
            vec![
                "--role",
                "backup",
                "--vm",
                "t",
                "--log-connect",
                "x:1",
                "--log-listen",
                "y:2",
            ],
            "--log-listen is for a primary",
        ),
        (
            vec![
                "--role",
                "primary",
                "--vm",
                "t",
                "--log-listen",
                "x:1",
                "--record",
                "/tmp/x",
            ],
            "--record cannot be combined with --role",
        ),
        (vec!["--mac", GUEST_MAC], "--mac needs --tap"),
        (
            vec![
                "--role",
                "primary",
                "--vm",
                "t",
                "--arbiter",
                "local:/tmp/ftvm-unused-arbiter",
                "--log-listen",
                "no-port",
            ],
            "cannot listen for the backup on no-port",
        ),
        (vec!["--role", "sidekick"], "sidekick"),
        (
            vec!["--role", "primary", "--log-listen", "127.0.0.1:1"],
            "--role needs --vm NAME",
        ),
    ] {
        let ran = run(Command::new(binary("ftvmm"))
            .args(["run", "--image", image])
            .args(&extra));
        assert_eq!(ran.code, Some(64), "{extra:?}: {ran:?}");
        assert_eq!(ran.stderr.trim_end().lines().count(), 1, "{ran:?}");
        assert!(ran.stderr.contains(needle), "{needle}: {ran:?}");
    }
}

/// Heartbeats keep a backup from taking a primary that waits in HLT for longer than the
/// loss timeout (2 s) for a dead one.
#[test]
fn a_primary_quiet_in_a_long_halt_is_not_taken_for_lost() {
    let quiet = "ticks=1 tick_us=2500000";
    let port = free_port();
    let primary = Spawned::start(&mut replica("primary", "hello", quiet, port));
    let backup = Spawned::start(&mut replica("backup", "hello", quiet, port));
    let backup = backup.wait(Duration::from_secs(30));
    let primary = primary.wait(Duration::from_secs(30));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    let p = stats_line(&primary);
    // The sender repeated the last heartbeat every 10 ms of the wait.
    assert!(
        field(p, "log_heartbeats_sent").is_some_and(|n| n > 100),
        "{p}"
    );
    assert_eq!(field(p, "backup_lost"), Some(0), "{p}");
}

/// The kv guest as a pair on one bridge (primary on tap-a, backup on tap-b), a checker
/// writing over ONE TCP connection that stays open, the primary killed with SIGKILL in
/// the middle: the backup goes live, announces the guest's MAC, the same connection goes
/// on (TCP retransmits; no reconnect), and every write acknowledged before or after the
/// failover reads back.
#[test]
fn kv_failover_keeps_the_client_connection_and_every_acknowledged_write() {
    kv_failover_round("failover", 150);
}

/// The failover above, ten times over, the kill landing at a different write each time.
#[test]
fn kv_failover_ten_times_loses_no_acknowledged_write() {
    for round in 0..10u32 {
        kv_failover_round(&format!("fo{round}"), 20 + round * 37);
    }
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

/// Go-live re-issues disk writes the log never completed: with the backup stopped the
/// primary holds a client's write (not on disk, no reply); the primary is then killed and
/// the backup continued. The backup replays up to the write, goes live, writes it itself,
/// and the client - still on its first connection - gets its OK from the backup.
#[test]
fn a_write_held_when_the_primary_dies_is_reissued_by_the_backup() {
    require_kvm();
    let disk = Disk::new("reissue");
    let ns = NetNs::with_bridged_taps("reissue", &["tap-a", "tap-b"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let kv = |role: &str, tap: &str, extra: &[&str]| {
        Spawned::start(
            kv_replica(&ns, &disk, role, port)
                .args(["--stats", "--tap", tap])
                .args(extra),
        )
    };
    let primary = kv("primary", "tap-a", &["--log-listen", &addr]);
    let backup = kv("backup", "tap-b", &["--log-connect", &addr]);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the kv pair did not answer PING"
    );
    let mut client = {
        let name = ns.name.clone();
        ftvm_tests::in_netns(&name, || {
            ftvm_tests::RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(30))
        })
        .expect("connect to the kv guest")
    };
    assert_eq!(
        client.call(&[b"SET", b"before", b"1"]).ok(),
        Some(ftvm_tests::Reply::Status("OK".into()))
    );
    ftvm_tests::stop_process(backup.pid());
    let (early, reply) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| client.call(&[b"SET", b"held", b"reissued-write-marker"]));
        std::thread::sleep(Duration::from_millis(600));
        let early = disk_has(&disk, b"reissued-write-marker");
        let signal = if early { libc::SIGTERM } else { libc::SIGKILL };
        for (pid, signal) in [
            (primary.pid(), signal),
            (backup.pid(), libc::SIGCONT),
            (backup.pid(), if early { libc::SIGTERM } else { 0 }),
        ] {
            // SAFETY: kill(2) on children we started.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
        (early, writer.join().expect("client thread"))
    });
    assert!(
        !early,
        "the write reached the disk before the backup acknowledged it: {:?}",
        primary.wait(Duration::from_secs(10))
    );
    assert_eq!(
        reply.ok(),
        Some(ftvm_tests::Reply::Status("OK".into())),
        "the held write was not completed by the backup"
    );
    assert!(disk_has(&disk, b"reissued-write-marker"));
    assert_eq!(redis_cli(&ns, &["GET", "held"]), "reissued-write-marker");
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let backup = backup.wait(Duration::from_secs(30));
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup.stderr.contains("re-issued write request"),
        "{backup:?}"
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

/// Back-pressure: a backup that stops replaying (SIGSTOP for 500 ms, well within the
/// peer timeout even on a loaded host) holds the primary's guest back once it trails by
/// more than 100 ms, so a failover never has much log left to replay; when it resumes,
/// both go on and end identically.
#[test]
fn a_lagging_backup_holds_the_primary_back() {
    let (primary, backup) = pair_with_a_stall(
        Replica::Backup,
        Duration::from_millis(500),
        Duration::from_millis(500),
    );
    assert!(backup.stderr.contains("IDENTICAL"), "{backup:?}");
    let p = stats_line(&primary);
    assert_eq!(field(p, "backup_lost"), Some(0), "{p}");
    assert!(field(p, "throttles").is_some_and(|n| n >= 1), "{p}");
    let held_back = field(p, "throttled_ms").expect("throttled_ms");
    assert!(
        (250..2000).contains(&held_back),
        "held back {held_back} ms for a 500 ms stop: {p}"
    );
}

/// The channel's health figures: a primary frozen for 300 ms (shorter than the peer
/// timeout) is a heartbeat miss on the backup, not a loss; the primary measures the log
/// channel's round trip.
#[test]
fn a_short_primary_stall_is_a_heartbeat_miss_not_a_loss() {
    let (primary, backup) = pair_with_a_stall(
        Replica::Primary,
        Duration::from_millis(700),
        Duration::from_millis(300),
    );
    let (p, b) = (stats_line(&primary), stats_line(&backup));
    assert!(field(b, "heartbeat_misses").is_some_and(|n| n >= 1), "{b}");
    assert_eq!(field(b, "primary_lost"), Some(0), "{b}");
    let rtt = field(p, "log_rtt_min_us").expect("log_rtt_min_us");
    assert!(rtt > 0 && rtt < 100_000, "{p}");
}

/// A primary whose backup never comes does not keep its guest waiting for ever: after
/// `--backup-wait` it claims the pair and runs unprotected; if another replica already
/// holds the claim, it halts with 72 and runs nothing.
#[test]
fn a_primary_without_a_backup_runs_alone_after_the_backup_wait() {
    let port = free_port();
    let mut alone = replica("primary", "hello", FINITE_HELLO, port);
    alone.args(["--backup-wait", "1"]);
    let started = std::time::Instant::now();
    let ran = Spawned::start(&mut alone).wait(Duration::from_secs(30));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        ran.stderr
            .contains("no backup connected within 1 s: won the go-live claim"),
        "{ran:?}"
    );
    assert!(ran.stdout.ends_with("bye (exit 0)\n"), "{ran:?}");
    assert_winner(port, "primary");

    // The same pair again: the claim is taken, so this primary must not run.
    let mut late = replica("primary", "hello", FINITE_HELLO, port);
    late.args(["--backup-wait", "1"]);
    let ran = Spawned::start(&mut late).wait(Duration::from_secs(30));
    assert_halted_by_the_claim(&ran);
}

/// No late writes: a primary frozen (SIGSTOP) with a held disk write whose
/// acknowledgement is in flight finds that acknowledgement when it wakes up, long after
/// its backup went live and went on writing the same log tail. It must perform nothing
/// (the acknowledgement is older than its lease), lose the claim and halt; the disk,
/// cold-started alone afterwards, holds every acknowledged write.
#[test]
fn a_frozen_primary_writes_nothing_late_after_its_backup_went_live() {
    require_kvm();
    let disk = Disk::new("frozen");
    let ns = NetNs::with_bridged_taps("frozen", &["tap-a", "tap-b"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let gate = ftvm_tests::relay::AckGate::start(&ns.name, &addr);
    let kv = |role: &str, tap: &str, extra: &[&str]| {
        Spawned::start(
            kv_replica(&ns, &disk, role, port)
                .args(["--stats", "--tap", tap])
                .args(extra),
        )
    };
    let primary = kv("primary", "tap-a", &["--log-listen", &addr]);
    let backup = kv("backup", "tap-b", &["--log-connect", &gate.addr]);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the kv pair did not answer PING"
    );
    let mut writes = AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "frozen");
    writes
        .write_many(20, |_| {})
        .expect("writes with both replicas");
    // The backup's acknowledgements stop reaching the primary: the next write is held.
    gate.hold();
    let (mut writes, held) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            let result = writes.write();
            (writes, result)
        });
        std::thread::sleep(Duration::from_millis(500));
        // Frozen with the write held, then the acknowledgement arrives in its socket.
        ftvm_tests::stop_process(primary.pid());
        gate.release();
        writer.join().expect("client thread")
    });
    held.expect("the held write, answered by the backup once live");
    assert!(
        winner(port).is_some_and(|winner| winner.starts_with("backup@")),
        "the backup did not win the claim: {:?}",
        winner(port)
    );
    // The live backup goes on appending to the same log tail.
    writes
        .write_many(15, |_| {})
        .expect("writes to the live backup");
    // SAFETY: kill(2) on a child we started.
    unsafe {
        libc::kill(primary.pid() as libc::pid_t, libc::SIGCONT);
    }
    let primary = primary.wait(Duration::from_secs(30));
    assert_halted_by_the_claim(&primary);
    let acked = writes.acked();
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost on the live backup: {lost:?}");
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let backup = backup.wait(Duration::from_secs(30));
    assert_eq!(backup.code, Some(0), "{backup:?}");
    // Cold start from the disk alone: every acknowledged write is there.
    let alone = Spawned::start(
        ns.command(binary("ftvmm"))
            .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", "tap-a"])
            .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
            .arg("--disk")
            .arg(disk.path())
            .arg("--image")
            .arg(guest("kv")),
    );
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the cold-started kv did not answer PING"
    );
    for i in 0..acked {
        let key = format!("frozen:{i}");
        assert_eq!(
            redis_cli(&ns, &["GET", &key]),
            format!("v{i}"),
            "{key} lost after the cold start"
        );
    }
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let alone = alone.wait(Duration::from_secs(30));
    assert_eq!(alone.code, Some(0), "{alone:?}");
    // What kept the disk whole: the acknowledgement came too late to release anything.
    let p = stats_line(&primary);
    assert!(field(p, "log_stale_acks").is_some_and(|n| n >= 1), "{p}");
    assert_eq!(
        field(p, "output_released"),
        field(p, "output_held").map(|held| held - field(p, "output_discarded").unwrap_or(0)),
        "{p}"
    );
}

/// Completed is not durable: a primary whose writes sit in its host's page cache
/// (`--disk-cache-in-process`: kept in the process, lost with it) dies after its guest was
/// told a write completed but before the flush after it reached the disk. The backup, gone
/// live, re-issues every write the log completed since the last completed flush, so a
/// cold start from the disk alone holds every acknowledged write. The backup is frozen at
/// a random moment of a stream of writes (its acknowledgements stop, the primary's held
/// output waits), then the primary is killed; trials go on until one froze it between a
/// write's completion and its flush (the backup then says it re-issued a completed write).
#[test]
fn writes_the_guest_saw_complete_but_not_flushed_survive_the_primarys_death() {
    require_kvm();
    let mut pace: u64 = u64::from(std::process::id()) | 1;
    eprintln!("random pacing seed {pace}");
    let mut hit = false;
    for trial in 0..12 {
        let disk = Disk::new("unflushed");
        let ns = NetNs::with_bridged_taps(&format!("unfl{trial}"), &["tap-a", "tap-b"]);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let kv = |role: &str, tap: &str, extra: &[&str]| {
            Spawned::start(
                kv_replica(&ns, &disk, role, port)
                    .args(["--tap", tap])
                    .args(extra),
            )
        };
        let primary = kv(
            "primary",
            "tap-a",
            &["--log-listen", &addr, "--disk-cache-in-process"],
        );
        let backup = kv("backup", "tap-b", &["--log-connect", &addr]);
        assert!(
            wait_for_pong(&ns, Duration::from_secs(30)),
            "the kv pair did not answer PING"
        );
        // Records of about 1 KiB span disk sectors: a lost write is not written again
        // as part of the log's tail sector by the writes after it.
        let mut writes = AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "unfl")
            .with_value_len(1000);
        writes
            .write_many(10, |_| {})
            .expect("writes with both replicas");
        pace = pace
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(20 + (pace >> 33) % 200);
        let writes = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let result = writes.write_many(150, |_| {});
                (writes, result)
            });
            std::thread::sleep(after);
            ftvm_tests::stop_process(backup.pid());
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(2) on children we started.
            unsafe {
                libc::kill(primary.pid() as libc::pid_t, libc::SIGKILL);
                libc::kill(backup.pid() as libc::pid_t, libc::SIGCONT);
            }
            let (writes, result) = writer.join().expect("client thread");
            result.unwrap_or_else(|err| panic!("trial {trial}: {err}"));
            writes
        });
        let acked = writes.acked_writes().to_vec();
        let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
        let backup = backup.wait(Duration::from_secs(30));
        assert_eq!(backup.code, Some(0), "trial {trial}: {backup:?}");
        drop(primary);
        let alone = Spawned::start(
            ns.command(binary("ftvmm"))
                .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", "tap-a"])
                .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
                .arg("--disk")
                .arg(disk.path())
                .arg("--image")
                .arg(guest("kv")),
        );
        assert!(
            wait_for_pong(&ns, Duration::from_secs(30)),
            "the cold-started kv did not answer PING"
        );
        for (key, value) in &acked {
            assert_eq!(
                &redis_cli(&ns, &["GET", key]),
                value,
                "trial {trial}: {key} lost after the cold start ({})",
                backup.stderr
            );
        }
        let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
        let alone = alone.wait(Duration::from_secs(30));
        assert_eq!(alone.code, Some(0), "{alone:?}");
        if backup.stderr.contains("re-issued completed write request") {
            hit = true;
            break;
        }
    }
    assert!(
        hit,
        "no trial froze the backup between a write's completion and its flush: the test proved nothing"
    );
}
