//! Restoring redundancy: a replica running alone is cloned, while its guest runs, into a
//! new backup that then follows its log (docs/snapshot.md, "Clone").

use ftvm_tests::{
    binary, free_port, guest, require_kvm, run, AckedWrites, Disk, NetNs, Ran, Spawned, GUEST_IP,
    GUEST_MAC,
};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const HELLO: &str = "ticks=4000 tick_us=500 work=3000000";
/// Both replicas must use the same digest periods.
const DIGESTS: [&str; 4] = ["--digest-every", "1", "--mem-digest-every", "1"];

/// The local arbiter's directory of this test process.
fn arbiter_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvm-clone-arbiter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("arbiter dir");
    dir
}

/// Who won the go-live claim of `vm`'s generation `generation`, if anyone.
fn winner(vm: &str, generation: u64) -> Option<String> {
    std::fs::read_to_string(arbiter_dir().join(format!("{vm}.gen{generation}.live")))
        .ok()
        .map(|text| text.trim().to_owned())
}

/// `ftvmm run` of hello as a replica of `vm` (generation `generation`), plus `extra`.
fn hello(vm: &str, generation: u64, cmdline: &str, extra: &[&str]) -> Command {
    require_kvm();
    let mut command = Command::new(binary("ftvmm"));
    command
        .args(["run", "--console", "-", "--cmdline", cmdline])
        .args(DIGESTS)
        .arg("--image")
        .arg(guest("hello"))
        .args(["--vm", vm, "--generation", &generation.to_string()])
        .args(ftvm_tests::replica_tls())
        .arg("--arbiter")
        .arg(format!("local:{}", arbiter_dir().display()))
        .args(extra);
    command
}

fn clone_backup(vm: &str, port: u16, cmdline: &str) -> Ran {
    run(&mut hello(
        vm,
        2,
        cmdline,
        &[
            "--role",
            "backup",
            "--clone-from",
            &format!("127.0.0.1:{port}"),
        ],
    ))
}

/// The number before `what` in `text` (`"4973 digests matched"`).
fn count_before(text: &str, what: &str) -> u64 {
    text.split(what)
        .next()
        .and_then(|head| head.rsplit([' ', '(']).next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count before '{what}' in {text}"))
}

/// Starts a kv replica in `ns` on `tap` for pair `vm`, `generation`, with digests at
/// short periods, the shared `disk`, this process's local arbiter, `extra` flags, and its
/// stderr in `log`. Returns its pid.
fn kv_replica(
    ns: &mut NetNs,
    disk: &Disk,
    vm: &str,
    tap: &str,
    generation: u64,
    extra: &[&str],
    log: &std::path::Path,
) -> u32 {
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", tap])
        .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
        .args(["--digest-every", "16", "--mem-digest-every", "64"])
        .arg("--disk")
        .arg(disk.path())
        .arg("--image")
        .arg(guest("kv"))
        .args(["--vm", vm, "--generation", &generation.to_string()])
        .args(ftvm_tests::replica_tls())
        .arg("--arbiter")
        .arg(format!("local:{}", arbiter_dir().display()))
        .args(extra)
        .stderr(std::fs::File::create(log).expect("the replica's log file"));
    ns.spawn(&mut command)
}

/// A kv pair answering PING: the primary on tap-a, the backup on tap-b serving clones
/// (once it went live) at `clone_addr` and its control socket at `control`; tap-c is free
/// for a clone. Replica logs go to `dir`.
struct ClonablePair {
    /// One shared disk, or a private disk per TAP (a, b, c).
    disks: Vec<Disk>,
    ns: NetNs,
    vm: String,
    dir: PathBuf,
    clone_addr: String,
    control: PathBuf,
    primary: u32,
    backup: u32,
}

impl ClonablePair {
    fn start(tag: &str) -> ClonablePair {
        ClonablePair::start_with(tag, false)
    }

    /// A pair whose replicas each have a private disk (`--disk-private`) when `private`.
    fn start_with(tag: &str, private: bool) -> ClonablePair {
        require_kvm();
        let disks = if private {
            ["a", "b", "c"]
                .iter()
                .map(|copy| Disk::new(&format!("clone-{tag}-{copy}")))
                .collect()
        } else {
            vec![Disk::new(&format!("clone-{tag}"))]
        };
        let ns = NetNs::with_bridged_taps(&format!("clone{tag}"), &["tap-a", "tap-b", "tap-c"]);
        let (log_port, clone_port) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("ftvm-clone-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the pair's log directory");
        let mut pair = ClonablePair {
            disks,
            ns,
            vm: format!("clone{tag}-{log_port}"),
            clone_addr: format!("127.0.0.1:{clone_port}"),
            control: dir.join("b.sock"),
            dir,
            primary: 0,
            backup: 0,
        };
        let log_addr = format!("127.0.0.1:{log_port}");
        pair.primary = pair.replica(
            "tap-a",
            1,
            &["--role", "primary", "--log-listen", &log_addr],
            "a.err",
        );
        let (clone_addr, control) = (pair.clone_addr.clone(), pair.control.clone());
        pair.backup = pair.replica(
            "tap-b",
            1,
            &[
                "--role",
                "backup",
                "--log-connect",
                &log_addr,
                "--clone-listen",
                &clone_addr,
                "--control",
                control.to_str().expect("a UTF-8 temp path"),
            ],
            "b.err",
        );
        assert!(
            ftvm_tests::wait_for_pong(&pair.ns, Duration::from_secs(60)),
            "the kv pair did not answer PING: {}\n{}",
            pair.read("a.err"),
            pair.read("b.err")
        );
        pair
    }

    /// Starts a kv replica of this pair's VM on `tap` (see [`kv_replica`]), its stderr in
    /// `log` under the pair's directory.
    fn replica(&mut self, tap: &str, generation: u64, extra: &[&str], log: &str) -> u32 {
        let log = self.dir.join(log);
        let disk = self.disk_of(tap);
        let private: &[&str] = if self.disks.len() > 1 {
            &["--disk-private"]
        } else {
            &[]
        };
        kv_replica(
            &mut self.ns,
            &self.disks[disk],
            &self.vm,
            tap,
            generation,
            &[extra, private].concat(),
            &log,
        )
    }

    /// Which of `disks` the replica on `tap` uses.
    fn disk_of(&self, tap: &str) -> usize {
        match (self.disks.len(), tap) {
            (1, _) => 0,
            (_, "tap-a") => 0,
            (_, "tap-b") => 1,
            _ => 2,
        }
    }

    /// A replica's log so far.
    fn read(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.join(log)).unwrap_or_default()
    }

    /// The backup's control socket `status` line (empty when it does not answer).
    fn status(&self) -> String {
        ftvm_tests::unix_request(&self.control, b"status\n").unwrap_or_default()
    }
}

#[test]
fn a_running_primary_is_cloned_and_the_clone_follows_it_to_an_identical_end() {
    let port = free_port();
    let vm = format!("clone-{port}");
    let primary = Spawned::start(&mut hello(
        &vm,
        1,
        HELLO,
        &["--clone-listen", &format!("127.0.0.1:{port}")],
    ));
    std::thread::sleep(Duration::from_millis(300));
    // A backup for another machine is refused before anything is sent or claimed.
    let refused = clone_backup(&vm, port, "ticks=1");
    assert_eq!(refused.code, Some(65), "{refused:?}");
    assert!(
        refused.stderr.contains("command line [ticks=4000"),
        "{refused:?}"
    );
    let backup = clone_backup(&vm, port, HELLO);
    let primary = primary.wait(Duration::from_secs(60));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup
            .stderr
            .contains("ftvmm snapshot: cloned exit_ordinal="),
        "{backup:?}"
    );
    assert!(
        backup.stderr.contains("ftvmm backup: IDENTICAL"),
        "{backup:?}"
    );
    // Lockstep from the clone on: a registers and a memory digest at every exit.
    assert!(
        count_before(&backup.stderr, " digests matched") > 1000,
        "{backup:?}"
    );
    assert!(
        primary.stderr.contains("refused the machine")
            && primary.stderr.contains("as generation 2"),
        "{primary:?}"
    );
    // The guest's output: whole on the primary; from the clone point on, the backup's
    // own replay produced the same ending (its console is not the primary's).
    assert!(primary.stdout.ends_with("bye (exit 0)\n"), "{primary:?}");
    assert!(backup.stdout.ends_with("bye (exit 0)\n"), "{backup:?}");
    assert_eq!(winner(&vm, 2), None, "nobody was lost, nobody claimed");
    eprintln!(
        "{}",
        primary
            .stderr
            .lines()
            .find(|line| line.contains("backup cloned"))
            .unwrap_or("")
    );
}

#[test]
fn a_clone_cut_halfway_leaves_the_primary_running_alone_and_unharmed() {
    let port = free_port();
    let vm = format!("cut-{port}");
    let primary = Spawned::start(&mut hello(
        &vm,
        1,
        HELLO,
        &["--clone-listen", &format!("127.0.0.1:{port}")],
    ));
    std::thread::sleep(Duration::from_millis(300));
    // A "backup" that takes the machine, reads part of the memory, and vanishes.
    let mut socket = ftvm_tests::connect_replica(&format!("127.0.0.1:{port}"));
    socket
        .write_all(
            &ftvm_pair::channel::resume::Hello::new_backup(&ftvm_pair::arbiter::PairId {
                vm: vm.clone(),
                uid: None,
                generation: 2,
            })
            .encode(),
        )
        .expect("hello");
    let mut head = [0u8; 12];
    socket.read_exact(&mut head).expect("clone stream");
    assert_eq!(&head[..8], b"FTVMCLON");
    // The CLON section: tag, version, length, payload, crc.
    let mut section = [0u8; 10];
    socket.read_exact(&mut section).expect("clone header");
    assert_eq!(&section[..4], b"CLON");
    let len = u32::from_le_bytes(section[6..10].try_into().unwrap()) as usize;
    socket
        .read_exact(&mut vec![0u8; len + 4])
        .expect("clone header");
    socket.write_all(b"Y").expect("accept");
    socket.read_exact(&mut [0u8; 4096]).expect("some memory");
    drop(socket);
    // A real clone afterwards still gets generation 2: nothing was claimed.
    std::thread::sleep(Duration::from_millis(300));
    let backup = clone_backup(&vm, port, HELLO);
    let primary = primary.wait(Duration::from_secs(60));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert!(
        primary.stderr.contains("aborted") && primary.stderr.contains("running alone"),
        "{primary:?}"
    );
    assert!(primary.stdout.ends_with("bye (exit 0)\n"), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup.stderr.contains("ftvmm backup: IDENTICAL"),
        "{backup:?}"
    );
}

/// kv running alone under redis traffic is cloned; the clone follows in lockstep; the
/// primary is killed mid-writes; the clone goes live with every acknowledged write.
#[test]
fn a_kv_primary_cloned_under_traffic_fails_over_to_its_clone_without_losing_writes() {
    require_kvm();
    let disk = Disk::new("clone-kv");
    let mut ns = NetNs::with_bridged_taps("clonekv", &["tap-a", "tap-b"]);
    let port = free_port();
    let vm = format!("clonekv-{port}");
    let log_dir = std::env::temp_dir().join(format!("ftvm-clone-kv-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let kv = |ns: &mut NetNs, tap: &str, generation: u64, extra: &[&str], log: &str| {
        kv_replica(ns, &disk, &vm, tap, generation, extra, &log_dir.join(log))
    };
    let addr = format!("127.0.0.1:{port}");
    let primary = kv(
        &mut ns,
        "tap-a",
        1,
        &["--clone-listen", &addr],
        "primary.err",
    );
    assert!(
        ftvm_tests::wait_for_pong(&ns, Duration::from_secs(30)),
        "kv did not answer PING"
    );
    let mut writes = AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "cl");
    writes
        .write_many(100, |_| {})
        .expect("writes before the clone");
    // Traffic while the clone is made: a benchmark, and the checker's writes.
    let mut benchmark = ns
        .command("redis-benchmark")
        .args([
            "-h", GUEST_IP, "-t", "set,get", "-n", "4000", "-c", "4", "-q",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-benchmark");
    let backup = kv(
        &mut ns,
        "tap-b",
        2,
        &["--role", "backup", "--clone-from", &addr],
        "backup.err",
    );
    let cloned = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let _ = writes.write();
        std::fs::read_to_string(log_dir.join("backup.err"))
            .is_ok_and(|text| text.contains("ftvmm snapshot: cloned"))
    });
    let backup_err = || std::fs::read_to_string(log_dir.join("backup.err")).unwrap_or_default();
    let primary_err = || std::fs::read_to_string(log_dir.join("primary.err")).unwrap_or_default();
    assert!(cloned, "no clone: {}\n{}", primary_err(), backup_err());
    let _ = ftvm_tests::wait_child(&mut benchmark, ftvm_tests::EXIT_PATIENCE, "redis-benchmark");
    // In lockstep now: more writes, then the primary dies in the middle of the next ones.
    writes
        .write_many(100, |_| {})
        .expect("writes after the clone");
    let (kill_point, writer) = writes.spawn(200, 80);
    kill_point
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the kill point");
    ns.kill(primary);
    let (mut writes, result) = writer.join().expect("checker");
    result.unwrap_or_else(|err| panic!("across the failover: {err}\n{}", backup_err()));
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert!(
        winner(&vm, 2).is_some_and(|w| w.starts_with("backup@")),
        "{:?}",
        winner(&vm, 2)
    );
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(ns.wait(backup), Some(0), "{}", backup_err());
    let backup_log = backup_err();
    assert!(backup_log.contains("WENT LIVE"), "{backup_log}");
    // It replayed in lockstep with digests checked until the primary was lost.
    assert!(
        count_before(&backup_log, " digests matched") > 10,
        "{backup_log}"
    );
    eprintln!(
        "{}\n{}",
        primary_err()
            .lines()
            .find(|line| line.contains("backup cloned"))
            .unwrap_or(""),
        backup_log
            .lines()
            .filter(|line| line.contains("cloned") || line.contains("WENT LIVE"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::remove_dir_all(&log_dir).ok();
}

/// The "done when": a kv pair loses its primary, the backup goes live, is cloned
/// into a new backup (generation 2) on a third TAP, loses itself in turn, and the clone
/// goes live; one client connection writes throughout and loses no acknowledged write.
#[test]
fn a_backup_that_went_live_is_cloned_and_its_clone_survives_a_second_failover() {
    two_failovers_with_a_clone("2fo", false);
}

#[test]
fn a_private_disk_pair_survives_two_failovers_with_a_clone_whose_disk_was_copied_under_writes() {
    two_failovers_with_a_clone("2fopriv", true);
}

/// A kv pair (shared disk, or `private` disks) loses its primary, the backup that went
/// live is cloned under writes, then it dies too and the clone goes live: no acknowledged
/// write is lost. With private disks, the clone's own disk, cold-started alone, has them
/// all.
fn two_failovers_with_a_clone(tag: &str, private: bool) {
    let mut pair = ClonablePair::start_with(tag, private);
    let clone_addr = pair.clone_addr.clone();
    // A backup still following its primary is not alone: a clone request is refused.
    let refused = pair.replica(
        "tap-c",
        2,
        &["--role", "backup", "--clone-from", &clone_addr],
        "refused.err",
    );
    assert_eq!(
        pair.ns.wait(refused),
        Some(75),
        "{}",
        pair.read("refused.err")
    );
    assert!(
        pair.read("refused.err")
            .contains("refused: the replica is not running alone"),
        "{}",
        pair.read("refused.err")
    );
    assert!(
        pair.read("b.err")
            .contains("clone: refused, this replica is not running alone"),
        "{}",
        pair.read("b.err")
    );
    let mut writes = AckedWrites::connect(&pair.ns.name, &format!("{GUEST_IP}:6379"), "fo2");
    if private {
        // Records that span sectors and blocks: the disk copy has data to move.
        writes = writes.with_value_len(3000);
    }
    // Room for a loaded host: a go-live or a clone's pause may hold a reply for a while.
    writes
        .client()
        .set_timeout(Duration::from_secs(30))
        .expect("a client timeout");
    writes.write_many(50, |_| {}).expect("writes in the pair");

    // First failure: the primary dies mid-writes; the backup goes live (generation 1).
    let (kill_point, writer) = writes.spawn(150, 60);
    kill_point
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the first kill point");
    pair.ns.kill(pair.primary);
    let (mut writes, result) = writer.join().expect("checker");
    result.unwrap_or_else(|err| panic!("across the first failover: {err}\n{}", pair.read("b.err")));
    assert!(
        winner(&pair.vm, 1).is_some_and(|w| w.starts_with("backup@")),
        "{:?}",
        winner(&pair.vm, 1)
    );
    // The control socket: the VM now, alone (the snapshot it answers from may be ms old).
    let alone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let status = pair.status();
        status.contains(" role=live ") && status.contains(" protected=0")
    });
    assert!(alone, "{}\n{}", pair.status(), pair.read("b.err"));

    // The live replica, alone now, is cloned onto a third TAP as generation 2, under writes.
    let clone = pair.replica(
        "tap-c",
        2,
        &["--role", "backup", "--clone-from", &clone_addr],
        "c.err",
    );
    let cloned = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        writes.write().expect("writes during the clone");
        pair.read("c.err").contains("ftvmm snapshot: cloned")
            && pair.read("b.err").contains("as generation 2")
    });
    assert!(
        cloned,
        "no clone: {}\n{}",
        pair.read("b.err"),
        pair.read("c.err")
    );
    assert!(
        pair.read("b.err").contains("backup cloned at exit ordinal"),
        "{}",
        pair.read("b.err")
    );
    // In lockstep: the live replica has a backup again (its control socket says so).
    writes
        .write_many(50, |_| {})
        .expect("writes after the clone");
    let protected = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pair.status().contains(" protected=1")
    });
    assert!(protected, "{}", pair.status());

    // Second failure: the replica that went live dies; the clone goes live (generation 2).
    let (kill_point, writer) = writes.spawn(150, 60);
    kill_point
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the second kill point");
    pair.ns.kill(pair.backup);
    let (mut writes, result) = writer.join().expect("checker");
    result
        .unwrap_or_else(|err| panic!("across the second failover: {err}\n{}", pair.read("c.err")));
    assert!(
        winner(&pair.vm, 2).is_some_and(|w| w.starts_with("backup@")),
        "{:?}\n{}",
        winner(&pair.vm, 2),
        pair.read("c.err")
    );
    let lost = writes.lost();
    assert!(
        writes.acked() >= 400,
        "only {} writes acknowledged",
        writes.acked()
    );
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    let _ = run(pair
        .ns
        .command("redis-cli")
        .args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(pair.ns.wait(clone), Some(0), "{}", pair.read("c.err"));
    let clone_log = pair.read("c.err");
    assert!(clone_log.contains("WENT LIVE"), "{clone_log}");
    if private {
        let source_log = pair.read("b.err");
        assert!(
            source_log.contains("clone: disk copied"),
            "no disk copy: {source_log}"
        );
        // The clone's own disk: copied while writes went on, then written as the backup
        // replayed and once it went live. Alone, it has every acknowledged write.
        let alone = Spawned::start(&mut ftvm_tests::kv_alone(
            &pair.ns,
            "tap-a",
            &pair.disks[2].path(),
        ));
        assert!(
            ftvm_tests::wait_for_pong(&pair.ns, Duration::from_secs(30)),
            "kv alone on the clone's disk did not answer PING"
        );
        for (key, value) in writes.acked_writes() {
            assert_eq!(
                &ftvm_tests::redis_cli(&pair.ns, &["GET", key]),
                value,
                "{key} is not on the clone's disk"
            );
        }
        let _ = run(pair
            .ns
            .command("redis-cli")
            .args(["-h", GUEST_IP, "SHUTDOWN"]));
        let alone = alone.wait(Duration::from_secs(30));
        assert_eq!(alone.code, Some(0), "{alone:?}");
    }
    // It replayed the live replica's log with digests checked until that one was lost.
    assert!(
        count_before(&clone_log, " digests matched") > 10,
        "{clone_log}"
    );
    eprintln!(
        "{}\n{}",
        pair.read("b.err")
            .lines()
            .filter(|line| line.contains("WENT LIVE") || line.contains("backup cloned"))
            .collect::<Vec<_>>()
            .join("\n"),
        clone_log
            .lines()
            .filter(|line| line.contains("cloned") || line.contains("WENT LIVE"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::remove_dir_all(&pair.dir).ok();
}

#[test]
fn a_backup_that_went_live_idle_and_was_cloned_writes_to_its_disk() {
    let mut pair = ClonablePair::start("idle");
    let clone_addr = pair.clone_addr.clone();
    // The primary dies with no client about: the backup goes live and touches nothing
    // on its disk before it is cloned.
    pair.ns.kill(pair.primary);
    let alone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pair.status().contains(" role=live ")
    });
    assert!(alone, "{}\n{}", pair.status(), pair.read("b.err"));
    let clone = pair.replica(
        "tap-c",
        2,
        &["--role", "backup", "--clone-from", &clone_addr],
        "c.err",
    );
    let cloned = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        pair.status().contains(" role=primary ") && pair.status().contains(" protected=1 ")
    });
    assert!(
        cloned,
        "no clone: {}\n{}\n{}",
        pair.status(),
        pair.read("b.err"),
        pair.read("c.err")
    );
    assert!(
        pair.status().contains(" generation=2 "),
        "{}",
        pair.status()
    );

    // Its writes are held for the clone's acknowledgement and then done on the disk.
    let mut writes = AckedWrites::connect(&pair.ns.name, &format!("{GUEST_IP}:6379"), "idle");
    writes
        .write_many(30, |_| {})
        .unwrap_or_else(|err| panic!("writes after the clone: {err}\n{}", pair.read("b.err")));
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    let _ = run(pair
        .ns
        .command("redis-cli")
        .args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(pair.ns.wait(pair.backup), Some(0), "{}", pair.read("b.err"));
    assert_eq!(pair.ns.wait(clone), Some(0), "{}", pair.read("c.err"));
    assert!(
        pair.read("c.err").contains("IDENTICAL"),
        "{}",
        pair.read("c.err")
    );
    std::fs::remove_dir_all(&pair.dir).ok();
}

/// A cloned pair's log connection is reset three times (`ss -K`) while a client writes:
/// each time the clone reconnects to the clone listener, which hands the connection to the
/// log channel, and the stream resumes where it broke. Nobody claims generation 2, no
/// write is lost, and the clone follows to an identical end.
#[test]
fn a_cloned_pairs_log_connection_resumes_after_resets() {
    let mut pair = ClonablePair::start("rs");
    let clone_addr = pair.clone_addr.clone();
    let clone_port = clone_addr.rsplit(':').next().expect("a port").to_owned();
    pair.ns.kill(pair.primary);
    let alone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pair.status().contains(" role=live ")
    });
    assert!(alone, "{}\n{}", pair.status(), pair.read("b.err"));
    let clone = pair.replica(
        "tap-c",
        2,
        &["--role", "backup", "--clone-from", &clone_addr],
        "c.err",
    );
    let protected = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        pair.status().contains(" protected=1 ")
    });
    assert!(protected, "{}\n{}", pair.status(), pair.read("c.err"));

    let mut writes = AckedWrites::connect(&pair.ns.name, &format!("{GUEST_IP}:6379"), "rs");
    writes
        .write_many(20, |_| {})
        .expect("writes before the resets");
    for _ in 0..3 {
        pair.ns
            .exec_ok(&["ss", "-K", "sport", "=", &format!(":{clone_port}")]);
        writes.write_many(20, |_| {}).unwrap_or_else(|err| {
            panic!(
                "writes across a reset: {err}\n{}\n{}",
                pair.read("b.err"),
                pair.read("c.err")
            )
        });
    }
    let status = pair.status();
    assert!(
        ftvm_tests::field(&status, "log_reconnects") == Some(3) && status.contains(" protected=1 "),
        "{status}\n{}",
        pair.read("b.err")
    );
    assert_eq!(winner(&pair.vm, 2), None, "somebody claimed generation 2");
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    let _ = run(pair
        .ns
        .command("redis-cli")
        .args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(pair.ns.wait(pair.backup), Some(0), "{}", pair.read("b.err"));
    assert_eq!(pair.ns.wait(clone), Some(0), "{}", pair.read("c.err"));
    assert!(
        pair.read("c.err").contains("IDENTICAL"),
        "{}",
        pair.read("c.err")
    );
    std::fs::remove_dir_all(&pair.dir).ok();
}

/// Reads a clone stream on `peer` after its hello as a new backup would, accepting the
/// machine, until the primary closes. With `answer_sync`, says that the pre-copy was
/// applied (but never confirms the restore); without, never answers SYNC.
fn take_clone_stream(peer: &mut ftvm_tls::Socket, answer_sync: bool) {
    let mut head = [0u8; 12];
    peer.read_exact(&mut head).expect("clone stream");
    assert_eq!(&head[..8], b"FTVMCLON");
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut accepted = false;
    loop {
        // A section: tag, version, payload length, payload, CRC.
        let mut section = [0u8; 10];
        match peer.read_exact(&mut section) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Err(err) => panic!("the primary did not close: {err}"),
        }
        let len = u32::from_le_bytes([section[6], section[7], section[8], section[9]]) as usize;
        if let Err(err) = peer.read_exact(&mut vec![0u8; len + 4]) {
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::UnexpectedEof,
                "the primary did not close: {err}"
            );
            return;
        }
        if !accepted {
            peer.write_all(b"Y").expect("accept");
            accepted = true;
        }
        if &section[..4] == b"SYNC" && answer_sync {
            peer.write_all(b"Y").expect("applied");
        }
    }
}

/// Peers that are not a backup: a stranger's bytes, a "backup" that says hello and then
/// stalls, one that takes the pre-copy and never says it applied it, one that takes the
/// whole clone and never confirms it. Each is cut off (the guest, stopped only for the
/// final copy, waits at most `FINISH_PATIENCE` for the last one), and a real backup
/// cloned afterwards follows to an identical end.
#[test]
fn rogue_clone_peers_are_cut_off_and_the_guest_pause_stays_bounded() {
    const LONG: &str = "ticks=30000 tick_us=500 work=3000000";
    let port = free_port();
    let vm = format!("rogue-{port}");
    let addr = format!("127.0.0.1:{port}");
    let primary = Spawned::start(&mut hello(&vm, 1, LONG, &["--clone-listen", &addr]));
    std::thread::sleep(Duration::from_millis(300));
    let hello = ftvm_pair::channel::resume::Hello::new_backup(&ftvm_pair::arbiter::PairId {
        vm: vm.clone(),
        uid: None,
        generation: 2,
    })
    .encode();

    // No certificate at all (plaintext): refused in the TLS handshake, answered with at
    // most a TLS alert, never a byte of the clone protocol.
    let mut plain = std::net::TcpStream::connect(&addr).expect("connect");
    plain
        .write_all(b"FTVMHELO and other bytes a replica might take for a hello")
        .expect("write");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        got.is_empty() || (got[0] == 0x15 && got.len() < 64),
        "a peer without a certificate got {} bytes: {got:?}",
        got.len()
    );
    // A host certificate of another cluster's CA: refused in the handshake too.
    let foreign = ftvm_tests::Pki::new(&ftvm_tests::temp_dir("foreign-pki"));
    let credentials = ftvm_tls::TlsFiles::in_dir(&foreign.host("test"))
        .load()
        .expect("foreign credentials");
    let handshake = ftvm_tls::Socket::handshake(
        std::net::TcpStream::connect(&addr).expect("connect"),
        ftvm_tls::TlsSide::Client(credentials.client_config().expect("client config")),
        Duration::from_secs(5),
    );
    assert!(
        handshake.is_err(),
        "a host of another cluster completed the handshake"
    );

    // A stranger with a valid certificate: refused at the hello, the connection closed.
    let mut stranger = ftvm_tests::connect_replica(&addr);
    stranger
        .write_all(b"GET / HTTP/1.0\r\n\r\n and some more bytes")
        .expect("write");
    stranger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let read = stranger.read_to_end(&mut got);
    // Closed with its bytes unread: an end of stream or a reset, and nothing sent.
    let closed = match &read {
        Ok(_) => true,
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && got.is_empty(),
        "a stranger got {} bytes: {read:?}",
        got.len()
    );

    // Says hello, then neither reads nor answers: given up after the header's patience.
    let stalled = ftvm_tests::connect_replica(&addr);
    (&stalled).write_all(&hello).expect("hello");
    std::thread::sleep(Duration::from_secs(7));
    drop(stalled);

    // Takes the pre-copy, never says it applied it: cut off before the guest stops.
    let mut lagging = ftvm_tests::connect_replica(&addr);
    lagging.write_all(&hello).expect("hello");
    take_clone_stream(&mut lagging, false);
    // Takes everything, never confirms: the guest waits for it only so long.
    let mut taker = ftvm_tests::connect_replica(&addr);
    taker.write_all(&hello).expect("hello");
    take_clone_stream(&mut taker, true);

    let backup = clone_backup(&vm, port, LONG);
    let primary = primary.wait(Duration::from_secs(120));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup.stderr.contains("ftvmm backup: IDENTICAL"),
        "{backup:?}"
    );
    assert!(
        primary.stderr.contains("refused the machine"),
        "the stalled peer: {}",
        primary.stderr
    );
    assert!(
        primary
            .stderr
            .contains("aborted during the pre-copy (the new backup did not keep up"),
        "the peer that never answered SYNC: {}",
        primary.stderr
    );
    let pause_ms: f64 = primary
        .stderr
        .lines()
        .find_map(|line| {
            line.split("after a pause of ")
                .nth(1)?
                .split(" ms")
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no aborted final copy: {}", primary.stderr));
    eprintln!("guest paused {pause_ms:.0} ms for a clone peer that never confirmed");
    let bound = ftvm_pair::clone::FINISH_PATIENCE.as_secs_f64() * 1000.0 + 500.0;
    assert!(pause_ms < bound, "paused {pause_ms} ms");
    assert!(
        primary.stderr.contains("as generation 2"),
        "the real backup was cloned: {}",
        primary.stderr
    );
}
