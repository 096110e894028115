//! A pair that loses a replica: go-live, partitions, an unreachable arbiter, failovers
//! under a kv client, held and unflushed writes, a frozen primary.

use super::*;

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
        backup.stderr.contains(&format!(
            "nothing from the primary for {} ms",
            PEER_TIMEOUT.as_millis()
        )),
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
        // Within the peer timeout the primary still holds the write; frozen there, it
        // cannot give the backup up while the disk is searched.
        std::thread::sleep(PEER_TIMEOUT / 3);
        ftvm_tests::stop_process(primary.pid());
        let early = disk_has(&disk, b"reissued-write-marker");
        for (pid, signal) in [
            (
                primary.pid(),
                if early { libc::SIGCONT } else { libc::SIGKILL },
            ),
            (primary.pid(), if early { libc::SIGTERM } else { 0 }),
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
        // Frozen with the write held (before its own peer timeout gives the backup up),
        // then the acknowledgement arrives in its socket.
        std::thread::sleep(PEER_TIMEOUT / 3);
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
    let alone = Spawned::start(&mut ftvm_tests::kv_alone(&ns, "tap-a", &disk.path()));
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
/// a random write of a stream of writes (its acknowledgements stop, the primary's held
/// output waits), then the primary is killed; trials go on until one froze it between a
/// write's completion and its flush (the backup then says it re-issued a completed write).
#[test]
fn writes_the_guest_saw_complete_but_not_flushed_survive_the_primarys_death() {
    require_kvm();
    let mut pace: u64 = u64::from(std::process::id()) | 1;
    eprintln!("random pacing seed {pace}");
    let mut hit = false;
    for trial in 0..40 {
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
        let started = std::time::Instant::now();
        writes
            .write_many(10, |_| {})
            .expect("writes with both replicas");
        let per_write = started.elapsed() / 10;
        // The freeze lands just before a random write of the stream goes out, plus a
        // random part of one write's time, so it always falls while writes are flowing
        // (a freeze timed from the stream's start could come after its last write). A
        // write's time is three holds (the write, the flush, the reply); the freeze must
        // fall in the flush's, so about one trial in three or four hits.
        pace = pace
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let freeze_at = 5 + ((pace >> 33) % 100) as u32;
        let offset = per_write.mul_f64(((pace >> 11) % 1000) as f64 / 1000.0);
        let (freeze_point, writer) = writes.spawn(200, freeze_at);
        freeze_point
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("trial {trial}: the writes stopped before write {freeze_at}")
            });
        std::thread::sleep(offset);
        ftvm_tests::stop_process(backup.pid());
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: kill(2) on children we started.
        unsafe {
            libc::kill(primary.pid() as libc::pid_t, libc::SIGKILL);
            libc::kill(backup.pid() as libc::pid_t, libc::SIGCONT);
        }
        let (writes, result) = writer.join().expect("client thread");
        result.unwrap_or_else(|err| panic!("trial {trial}: {err}"));
        let acked = writes.acked_writes().to_vec();
        let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
        let backup = backup.wait(Duration::from_secs(30));
        assert_eq!(backup.code, Some(0), "trial {trial}: {backup:?}");
        drop(primary);
        let alone = Spawned::start(&mut ftvm_tests::kv_alone(&ns, "tap-a", &disk.path()));
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
            eprintln!(
                "trial {trial} (freeze at write {freeze_at} + {offset:?} of {per_write:?}) re-issued a completed write"
            );
            hit = true;
            break;
        }
    }
    assert!(
        hit,
        "no trial froze the backup between a write's completion and its flush: the test proved nothing"
    );
}
