//! A pair whose replicas both run: the backup follows, the output rule holds, the
//! primary waits for a lagging backup, stalls and halts are not losses, bad flags.

use super::*;

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

/// The output rule: with the backup stopped (SIGSTOP: its kernel still takes the stream,
/// but nothing acknowledges it) the primary's disk write and reply wait until the primary
/// gives the backup up (no acknowledgement for the peer timeout) and goes on unprotected. The backup, continued,
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
        // Before the primary gives the backup up (the peer timeout), the write is held
        // too: the shared disk does not have it yet. The primary is frozen while the
        // disk is searched, so the search's time does not count against the timeout
        // (woken, it gives the backup up at once).
        std::thread::sleep(PEER_TIMEOUT / 3);
        ftvm_tests::stop_process(primary.pid());
        let early = disk_has(&disk, b"held-disk-write-marker");
        // SAFETY: kill(2) on a child we started.
        unsafe {
            libc::kill(primary.pid() as libc::pid_t, libc::SIGCONT);
        }
        assert!(
            !early,
            "the write reached the disk before the backup acknowledged it"
        );
        during.join().expect("client thread")
    });
    let (reply, held) = during;
    assert!(disk_has(&disk, b"held-disk-write-marker"));
    assert_eq!(reply, "OK");
    assert!(
        held > PEER_TIMEOUT / 2 && held < Duration::from_secs(10),
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
        field(p, "output_hold_us_max")
            .is_some_and(|us| u128::from(us) > (PEER_TIMEOUT / 2).as_micros()),
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
    let tls = ftvm_tests::replica_tls();
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
                &tls[0],
                &tls[1],
                "--log-listen",
                "no-port",
            ],
            "cannot listen for the backup on no-port",
        ),
        // Neither TLS nor an explicit --insecure: refused before anything runs.
        (
            vec![
                "--role",
                "primary",
                "--vm",
                "t",
                "--arbiter",
                "local:/tmp/ftvm-unused-arbiter",
                "--log-listen",
                "127.0.0.1:0",
            ],
            "need --tls-dir DIR",
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
/// peer timeout for a dead one.
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

/// Back-pressure: a backup that stops replaying (SIGSTOP for half the peer timeout)
/// holds the primary's guest back once it trails by more than 100 ms, so a failover
/// never has much log left to replay; when it resumes, both go on and end identically.
#[test]
fn a_lagging_backup_holds_the_primary_back() {
    let (primary, backup) = pair_with_a_stall(
        Replica::Backup,
        Duration::from_millis(500),
        PEER_TIMEOUT / 2,
    );
    assert!(backup.stderr.contains("IDENTICAL"), "{backup:?}");
    let p = stats_line(&primary);
    assert_eq!(field(p, "backup_lost"), Some(0), "{p}");
    assert!(field(p, "throttles").is_some_and(|n| n >= 1), "{p}");
    let held_back = field(p, "throttled_ms").expect("throttled_ms");
    assert!(
        (20..1000).contains(&held_back),
        "held back {held_back} ms for a {} ms stop: {p}",
        (PEER_TIMEOUT / 2).as_millis()
    );
}

/// The channel's health figures: a primary frozen for a third of the peer timeout is a
/// heartbeat miss on the backup (a gap over 30 ms), not a loss; the primary measures the
/// log channel's round trip.
#[test]
fn a_short_primary_stall_is_a_heartbeat_miss_not_a_loss() {
    let (primary, backup) = pair_with_a_stall(
        Replica::Primary,
        Duration::from_millis(700),
        PEER_TIMEOUT / 3,
    );
    let (p, b) = (stats_line(&primary), stats_line(&backup));
    assert!(field(b, "heartbeat_misses").is_some_and(|n| n >= 1), "{b}");
    assert_eq!(field(b, "primary_lost"), Some(0), "{b}");
    let rtt = field(p, "log_rtt_min_us").expect("log_rtt_min_us");
    assert!(rtt > 0 && rtt < 100_000, "{p}");
}
