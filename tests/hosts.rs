//! An FT pair across hosts: each host is its own network namespace, and the hosts, a
//! client and etcd are joined by a LAN ([`Lan`]). The primary runs on host a, the backup
//! on host b; the log channel and the arbiter are reached over the LAN. Every test writes
//! through the acknowledged-writes checker ([`AckedWrites`]) over one TCP connection and
//! injects one failure: a killed replica, a partitioned log channel, etcd gone, a host
//! cut off.

use ftvm_tests::watch::{double_live, emitters, FrameWatch};
use ftvm_tests::{
    binary, guest, redis_cli_at, require_kvm, run, wait_for_pong_at, AckedWrites, Disk, Lan, Ran,
    Spawned, GUEST_MAC,
};
use std::time::{Duration, Instant};

/// The pair's name (each test has a LAN and an etcd of its own, so one name will do).
const VM: &str = "kv";
/// The log channel's port on host a.
const LOG_PORT: u16 = 7700;
/// The go-live claim key of generation 1 (docs/replay.md, "Go-live").
const CLAIM_KEY: &str = "/ft/vms/kv/gen/1/live";

/// A kv pair on a fresh LAN: primary on host a, backup on host b, one shared disk, and
/// a checker connected to the guest from the client namespace. Fields drop in order:
/// the replicas go before their LAN.
struct Pair {
    primary: Spawned,
    backup: Spawned,
    writes: AckedWrites,
    /// Frames of the guest leaving each host's TAP (two live replicas would show).
    watch: FrameWatch,
    lan: Lan,
    _disk: Disk,
}

/// Builds the LAN, starts both replicas and waits until the guest answers PING from the
/// client namespace.
fn start_pair(tag: &str) -> Pair {
    require_kvm();
    let lan = Lan::new(tag, &["a", "b"]);
    let disk = Disk::new(tag);
    let log = format!("{}:{LOG_PORT}", lan.ip("a"));
    let primary = replica(
        &lan,
        "a",
        &disk,
        &["--role", "primary", "--log-listen", &log],
    );
    let backup = replica(
        &lan,
        "b",
        &disk,
        &["--role", "backup", "--log-connect", &log],
    );
    if !wait_for_pong_at(&lan.client, &lan.guest_ip(), Duration::from_secs(30)) {
        // A replica that exited has its reason on stderr.
        let primary = primary.wait(Duration::from_secs(1));
        let backup = backup.wait(Duration::from_secs(1));
        panic!("the kv pair did not answer PING: {primary:?} {backup:?}");
    }
    let writes = AckedWrites::connect(&lan.client.name, &format!("{}:6379", lan.guest_ip()), tag);
    let watch = FrameWatch::start(
        &[("a", &lan.host("a").name), ("b", &lan.host("b").name)],
        &ftvm_tests::watch::Watched::GuestTap("tap0".into()),
        GUEST_MAC,
    );
    Pair {
        primary,
        backup,
        writes,
        watch,
        lan,
        _disk: disk,
    }
}

/// `ftvmm run` of the kv guest in `host`'s namespace with the pair's common flags (the
/// same disk, MAC, addresses and arbiter on both hosts) and `role_flags`.
fn replica(lan: &Lan, host: &str, disk: &Disk, role_flags: &[&str]) -> Spawned {
    let (ftvmm, kv) = (binary("ftvmm"), guest("kv"));
    Spawned::start(&mut lan.kv_replica(host, (&ftvmm, &kv), &disk.path(), VM, role_flags))
}

/// `count` writes on `writes`' connection with `fault` injected when the checker reaches
/// write `at` (later writes are in flight meanwhile); fails the test unless every write
/// was acknowledged and every acknowledged write reads back.
fn writes_across(writes: AckedWrites, count: u32, at: u32, fault: impl FnOnce()) -> AckedWrites {
    let (reached, writer) = writes.spawn(count, at);
    reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the fault");
    fault();
    let (mut writes, result) = writer.join().expect("the checker thread");
    result.unwrap_or_else(|err| panic!("the client connection broke: {err}"));
    assert_eq!(writes.acked(), count as usize);
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    writes
}

/// Fails the test if the guest's frames left two hosts' TAPs in turns (two live
/// replicas), judged from the TAPs, not from the replicas' word.
fn assert_one_live(watch: &FrameWatch) -> Vec<String> {
    let seen = watch.take();
    assert!(
        !double_live(&seen),
        "two replicas were live: the guest's frames came from {:?}",
        emitters(&seen)
    );
    emitters(&seen)
}

/// Boots the kv guest alone on `disk` on `host` (the pair is gone; a host still on the
/// LAN) and fails the test unless it reads back every write in `acked`: what the disk
/// itself holds, not what a live replica kept in memory.
fn assert_cold_start_holds(lan: &Lan, host: &str, disk: &Disk, acked: &[(String, String)]) {
    let alone = replica(lan, host, disk, &[]);
    assert!(
        wait_for_pong_at(&lan.client, &lan.guest_ip(), Duration::from_secs(30)),
        "the cold-started kv did not answer PING"
    );
    let mut reader = AckedWrites::connect(
        &lan.client.name,
        &format!("{}:6379", lan.guest_ip()),
        "cold",
    );
    for (key, value) in acked {
        let reply = reader.client().call(&[b"GET", key.as_bytes()]);
        assert_eq!(
            reply.ok(),
            Some(ftvm_tests::Reply::Bulk(Some(value.as_bytes().to_vec()))),
            "{key} is not on the disk after a cold start"
        );
    }
    shut_down(lan, alone);
}

/// Powers the guest off through whichever replica serves it; `survivor` must end with
/// the guest's code 0.
fn shut_down(lan: &Lan, survivor: Spawned) -> Ran {
    let _ = run(lan
        .client
        .command("redis-cli")
        .args(["-h", &lan.guest_ip(), "SHUTDOWN"]));
    let ran = survivor.wait(Duration::from_secs(30));
    assert_eq!(ran.code, Some(0), "the survivor did not power off: {ran:?}");
    ran
}

/// Fails the test unless the pair's go-live claim in etcd names a `role` (`primary@`
/// or `backup@`).
fn assert_winner(lan: &Lan, role: &str) {
    let winner = lan.etcd_get(CLAIM_KEY);
    assert!(
        winner.as_deref().is_some_and(|w| w.starts_with(role)),
        "the go-live claim names {winner:?}, not a {role} replica"
    );
}

/// A backup on host b that lost its primary while it could not reach etcd: it must halt
/// with 73 within its claim patience (5 s, and at most 4 s an attempt), never go live,
/// and never emit on the LAN.
fn backup_halted_without_arbiter(lan: &Lan, backup: Spawned) {
    let backup = backup.wait(Duration::from_secs(20));
    assert_eq!(backup.code, Some(73), "{backup:?}");
    line_with(&backup, "the arbiter cannot be reached");
    assert!(!backup.stderr.contains("WENT LIVE"), "{backup:?}");
    assert_eq!(
        lan.tap_packets_from_guest("b"),
        0,
        "the halted backup emitted"
    );
}

/// The replica's stderr line containing `needle`, or a failure naming the run.
fn line_with<'a>(ran: &'a Ran, needle: &str) -> &'a str {
    ran.stderr
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}: {ran:?}"))
}

/// SIGKILL of the primary on host a mid-writes: the backup on host b wins the claim, goes
/// live on b's TAP, and the client's same TCP connection goes on; nothing acknowledged is
/// lost.
#[test]
fn primary_killed_backup_on_host_b_goes_live_and_keeps_the_connection() {
    let Pair {
        mut primary,
        backup,
        writes,
        watch,
        lan,
        _disk,
    } = start_pair("kp");
    let writes = writes_across(writes, 300, 100, || primary.kill());
    assert_winner(&lan, "backup@");
    // The backup announced the guest and answered from host b's TAP.
    assert!(lan.tap_packets_from_guest("b") > 0);
    assert_eq!(
        redis_cli_at(&lan.client, &lan.guest_ip(), &["GET", "kp:299"]),
        "v299"
    );
    let primary = primary.wait(Duration::from_secs(5));
    assert_eq!(
        primary.code, None,
        "the old primary died of SIGKILL: {primary:?}"
    );
    let backup = shut_down(&lan, backup);
    line_with(&backup, "won the go-live claim for kv generation 1");
    line_with(&backup, "WENT LIVE");
    assert_eq!(
        assert_one_live(&watch),
        ["a", "b"],
        "the guest moved from a to b"
    );
    assert_cold_start_holds(&lan, "a", &_disk, writes.acked_writes());
}

/// Host a dies (its link goes down, then its processes are killed: no FIN, no RST): an
/// echo request the client sends while the backup still waits out the peer timeout is
/// flooded to host b, steered to its standby TAP, kept there, and answered once the
/// backup is live (ICMP is never retransmitted: without the kept frame there would be no
/// reply); then writes go on and nothing acknowledged is lost.
#[test]
fn primary_host_dies_and_a_request_sent_before_the_go_live_is_answered_after_it() {
    let Pair {
        mut primary,
        backup,
        mut writes,
        watch,
        lan,
        _disk,
    } = start_pair("hd");
    writes
        .write_many(100, |_| {})
        .unwrap_or_else(|err| panic!("before the failure: {err}"));
    lan.cut_off("a");
    primary.kill();
    // Within the backup's peer timeout (300 ms from the last frame it had).
    std::thread::sleep(Duration::from_millis(100));
    let ping = run(lan
        .client
        .command("ping")
        .args(["-c", "1", "-W", "10", &lan.guest_ip()]));
    assert_eq!(
        ping.code,
        Some(0),
        "the echo sent before the go-live was not answered: {ping:?}"
    );
    writes
        .write_many(100, |_| {})
        .unwrap_or_else(|err| panic!("after the failover: {err}"));
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert_winner(&lan, "backup@");
    let backup = shut_down(&lan, backup);
    let live = line_with(&backup, "frames that arrived before handed to the guest");
    let handed: u64 = live
        .split(", ")
        .find_map(|part| part.strip_suffix(" frames that arrived before handed to the guest"))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {live:?}"));
    assert!(
        handed >= 1,
        "the backup handed nothing it had kept: {live:?}"
    );
    assert_eq!(
        assert_one_live(&watch),
        ["a", "b"],
        "the guest moved from a to b"
    );
    assert_cold_start_holds(&lan, "b", &_disk, writes.acked_writes());
}

/// SIGKILL of the backup on host b mid-writes: the primary wins the claim and serves on
/// unprotected; nothing acknowledged is lost.
#[test]
fn backup_killed_primary_goes_on_alone() {
    let Pair {
        primary,
        mut backup,
        writes,
        watch,
        lan,
        _disk,
    } = start_pair("kb");
    let writes = writes_across(writes, 300, 100, || backup.kill());
    assert_winner(&lan, "primary@");
    let backup = backup.wait(Duration::from_secs(5));
    assert_eq!(backup.code, None, "the backup died of SIGKILL: {backup:?}");
    // Host b never emitted anything: the backup never went live.
    assert_eq!(lan.tap_packets_from_guest("b"), 0);
    let primary = shut_down(&lan, primary);
    line_with(
        &primary,
        "backup lost: won the go-live claim for kv generation 1: running unprotected",
    );
    assert_eq!(assert_one_live(&watch), ["a"], "only a emitted");
    assert_cold_start_holds(&lan, "a", &_disk, writes.acked_writes());
}

/// The log channel is cut (iptables DROP on its port in host a) while both hosts still
/// reach etcd: both replicas give each other up after the peer timeout and claim; exactly
/// one wins and serves on, the other halts with 72.
#[test]
fn partitioned_log_channel_leaves_exactly_one_live_replica() {
    let Pair {
        mut primary,
        mut backup,
        writes,
        watch,
        lan,
        _disk,
    } = start_pair("pt");
    let writes = writes_across(writes, 300, 100, || lan.drop_tcp_port("a", LOG_PORT));
    let primary_lost = first_to_exit(&mut primary, &mut backup, Duration::from_secs(30));
    let (loser, survivor, survivor_role) = match primary_lost {
        true => (primary, backup, "backup@"),
        false => (backup, primary, "primary@"),
    };
    let loser = loser.wait(Duration::from_secs(5));
    assert_eq!(loser.code, Some(72), "the loser: {loser:?}");
    // One clear line: who won, and that this replica halts.
    let line = line_with(&loser, "won the go-live claim: halting");
    assert!(line.contains(survivor_role), "{line}");
    assert_winner(&lan, survivor_role);
    eprintln!("partition: the {survivor_role} replica won the claim");
    if primary_lost {
        assert!(
            lan.tap_packets_from_guest("b") > 0,
            "the live backup emitted nothing"
        );
    } else {
        assert_eq!(
            lan.tap_packets_from_guest("b"),
            0,
            "the halted backup emitted"
        );
    }
    let survivor = shut_down(&lan, survivor);
    line_with(&survivor, "won the go-live claim for kv generation 1");
    assert_one_live(&watch);
    assert_cold_start_holds(&lan, "a", &_disk, writes.acked_writes());
}

/// Waits up to `timeout` for one of `a` and `b` to exit (the other must still run);
/// `true` if it was `a`.
fn first_to_exit(a: &mut Spawned, b: &mut Spawned, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match (a.running(), b.running()) {
            (true, true) => std::thread::sleep(Duration::from_millis(20)),
            (false, true) => return true,
            (true, false) => return false,
            (false, false) => panic!("both replicas exited: nothing is live"),
        }
    }
    panic!("neither replica exited within {timeout:?}: two live replicas?")
}

/// etcd stops while the pair runs: nothing needs the arbiter, so the pair runs and
/// serves on. Then the primary dies while etcd is still down: the backup must not go
/// live (73 after its claim patience) and must emit nothing.
#[test]
fn etcd_down_the_pair_runs_on_and_an_orphaned_backup_never_goes_live() {
    let Pair {
        mut primary,
        mut backup,
        writes,
        watch,
        mut lan,
        _disk,
    } = start_pair("ed");
    let mut writes = writes_across(writes, 50, 0, || {});
    lan.stop_etcd();
    writes
        .write_many(150, |_| {})
        .unwrap_or_else(|err| panic!("etcd down, the pair stopped serving: {err}"));
    // Much longer than the peer timeout: nobody took anybody for lost.
    std::thread::sleep(Duration::from_secs(3));
    writes
        .write_many(50, |_| {})
        .unwrap_or_else(|err| panic!("etcd down, the pair stopped serving: {err}"));
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert!(
        primary.running() && backup.running(),
        "a replica exited with etcd down"
    );

    primary.kill();
    // No replica may answer this write: the backup cannot reach the arbiter.
    writes
        .client()
        .set_timeout(Duration::from_secs(9))
        .expect("set the client timeout");
    let orphan_write = writes.write();
    assert!(
        orphan_write.is_err(),
        "a write was answered with the primary dead and etcd down: {orphan_write:?}"
    );
    backup_halted_without_arbiter(&lan, backup);
    let primary = primary.wait(Duration::from_secs(5));
    assert!(
        !primary.stderr.contains("claim"),
        "the primary asked the arbiter while its backup was fine: {primary:?}"
    );
    assert_one_live(&watch);
    assert_cold_start_holds(&lan, "a", &_disk, writes.acked_writes());
}

/// Host b is cut off the LAN (its uplink down) while etcd is up: b reaches neither the
/// primary nor etcd, so it never goes live; a wins the claim and serves on unprotected.
#[test]
fn isolated_backup_host_never_goes_live_and_the_primary_serves_on() {
    let Pair {
        primary,
        backup,
        writes,
        watch,
        lan,
        _disk,
    } = start_pair("is");
    let writes = writes_across(writes, 300, 100, || lan.cut_off("b"));
    assert_winner(&lan, "primary@");
    backup_halted_without_arbiter(&lan, backup);
    let primary = shut_down(&lan, primary);
    line_with(
        &primary,
        "backup lost: won the go-live claim for kv generation 1: running unprotected",
    );
    assert_one_live(&watch);
    assert_cold_start_holds(&lan, "a", &_disk, writes.acked_writes());
}

/// The log connection is reset three times (`ss -K` in host a) while the client writes:
/// each time the backup reconnects within the reconnect window and the stream resumes at
/// the byte where it broke. Nobody claims the pair, nothing is lost, and at the end the
/// backup has replayed the primary's run exactly.
#[test]
fn reset_log_connections_resume_and_the_pair_stays_whole() {
    require_kvm();
    let lan = Lan::new("rs", &["a", "b"]);
    let disk = Disk::new("rs");
    let log = format!("{}:{LOG_PORT}", lan.ip("a"));
    let primary = replica(
        &lan,
        "a",
        &disk,
        &["--role", "primary", "--log-listen", &log, "--stats"],
    );
    let backup = replica(
        &lan,
        "b",
        &disk,
        &["--role", "backup", "--log-connect", &log, "--stats"],
    );
    assert!(
        wait_for_pong_at(&lan.client, &lan.guest_ip(), Duration::from_secs(30)),
        "the kv pair did not answer PING"
    );
    let writes = AckedWrites::connect(&lan.client.name, &format!("{}:6379", lan.guest_ip()), "rs");
    let host_a = lan.host("a");
    let _writes = writes_across(writes, 400, 50, || {
        for _ in 0..3 {
            host_a.exec_ok(&["ss", "-K", "sport", "=", &format!(":{LOG_PORT}")]);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert_eq!(lan.etcd_get(CLAIM_KEY), None, "somebody claimed the pair");
    let primary = shut_down(&lan, primary);
    let backup = backup.wait(Duration::from_secs(30));
    assert_eq!(backup.code, Some(0), "{backup:?}");
    line_with(&backup, "IDENTICAL");
    let stats = |ran: &Ran| {
        ran.stderr
            .lines()
            .find(|line| line.starts_with("ftvmm stats:"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no stats line: {ran:?}"))
    };
    let (p, b) = (stats(&primary), stats(&backup));
    assert_eq!(ftvm_tests::field(&p, "log_reconnects"), Some(3), "{p}");
    assert_eq!(ftvm_tests::field(&b, "log_reconnects"), Some(3), "{b}");
    assert_eq!(ftvm_tests::field(&p, "backup_lost"), Some(0), "{p}");
}
