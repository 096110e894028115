//! Private disks (`--disk-private`): each replica has its own copy, the backup applies the
//! logged writes to it and checks each read against the primary's checksum.

use super::*;

/// A kv replica of the pair on `port` on its own copy `disk`, in `ns`, on `tap`.
fn private_kv(ns: &NetNs, disk: &Disk, role: &str, port: u16, tap: &str) -> Command {
    let mut command = kv_replica(ns, disk, role, port);
    command.args(["--disk-private", "--tap", tap]).args(DIGESTS);
    let addr = format!("127.0.0.1:{port}");
    match role {
        "primary" => command.args(["--log-listen", &addr]),
        _ => command.args(["--log-connect", &addr]),
    };
    command
}

/// The kv guest alone on `disk` (plain, not private) in `ns`, answering PING.
fn kv_alone(ns: &NetNs, disk: &Disk) -> Spawned {
    let alone = Spawned::start(&mut ftvm_tests::kv_alone(ns, "tap-a", &disk.path()));
    assert!(
        wait_for_pong(ns, Duration::from_secs(30)),
        "kv alone on {} did not answer PING",
        disk.path().display()
    );
    alone
}

/// Asks the kv guest in `ns` to power off and waits for `replica` to end with 0.
fn shut_down(ns: &NetNs, replica: Spawned) -> Ran {
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let ran = replica.wait(Duration::from_secs(30));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    ran
}

#[test]
fn a_private_disk_pair_loses_no_acknowledged_write_and_the_survivors_own_disk_has_them_all() {
    require_kvm();
    let (disk_a, disk_b) = (Disk::new("priv-a"), Disk::new("priv-b"));
    let ns = NetNs::with_bridged_taps("privfo", &["tap-a", "tap-b"]);
    let port = free_port();
    let primary = Spawned::start(&mut private_kv(&ns, &disk_a, "primary", port, "tap-a"));
    let backup = Spawned::start(&mut private_kv(&ns, &disk_b, "backup", port, "tap-b"));
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the private-disk kv pair did not answer PING"
    );
    let writes =
        AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "pv").with_value_len(700);
    let (kill_point, writer) = writes.spawn(300, 150);
    kill_point
        .recv_timeout(Duration::from_secs(60))
        .expect("the checker reached the kill point");
    let primary_pid = primary.pid();
    // SAFETY: kill(2) on a child we started.
    unsafe { libc::kill(primary_pid as libc::pid_t, libc::SIGKILL) };
    let (mut writes, result) = writer.join().expect("checker");
    result.unwrap_or_else(|err| panic!("across the failover: {err}"));
    assert_eq!(writes.acked(), 300);
    let lost = writes.lost();
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert_winner(port, "backup");
    let acked = writes.acked_writes().to_vec();
    let backup = shut_down(&ns, backup);
    drop(primary);
    // The primary's writes were not held for the output rule, and the live backup had
    // nothing to re-issue: its own disk had every write in log order.
    assert!(
        !backup.stderr.contains("re-issued") && backup.stderr.contains("WENT LIVE"),
        "{backup:?}"
    );
    // The survivor's own disk, cold-started alone, has every acknowledged write.
    let alone = kv_alone(&ns, &disk_b);
    for (key, value) in &acked {
        assert_eq!(
            &redis_cli(&ns, &["GET", key]),
            value,
            "{key} is not on the survivor's disk"
        );
    }
    shut_down(&ns, alone);
}

#[test]
fn a_corrupted_sector_on_the_backups_own_disk_is_caught_by_the_read_checksum() {
    require_kvm();
    let (disk_a, disk_b) = (Disk::new("crc-a"), Disk::new("crc-b"));
    let ns = NetNs::with_bridged_taps("privcrc", &["tap-a", "tap-b"]);
    // Some data on the disk first, then two equal copies.
    let alone = kv_alone(&ns, &disk_a);
    let mut writes =
        AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "crc").with_value_len(300);
    writes.write_many(20, |_| {}).expect("writes");
    shut_down(&ns, alone);
    let mut image = std::fs::read(disk_a.path()).expect("read disk a");
    std::fs::write(disk_b.path(), &image).expect("copy disk a to b");
    // One bit flipped in the first sector that holds data, on the backup's copy only.
    let at = image
        .iter()
        .position(|byte| *byte != 0)
        .expect("kv wrote nothing to its disk");
    image[at] ^= 0x10;
    std::fs::write(disk_b.path(), &image).expect("corrupt disk b");
    let port = free_port();
    let primary = Spawned::start(&mut private_kv(&ns, &disk_a, "primary", port, "tap-a"));
    let backup = Spawned::start(&mut private_kv(&ns, &disk_b, "backup", port, "tap-b"));
    let backup = backup.wait(Duration::from_secs(60));
    assert_ne!(backup.code, Some(0), "{backup:?}");
    assert!(
        backup.stderr.contains("diverged")
            && backup.stderr.contains("from this replica's own disk"),
        "the backup did not report its disk's read as a divergence: {backup:?}"
    );
    // The primary, its backup gone, goes on alone with every write.
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "the primary did not go on alone"
    );
    for (key, value) in writes.acked_writes() {
        assert_eq!(&redis_cli(&ns, &["GET", key]), value);
    }
    shut_down(&ns, primary);
}

#[test]
fn a_private_disk_recording_replays_on_a_copy_of_the_disk_and_not_without_one() {
    require_kvm();
    let (disk, copy) = (Disk::new("privrec"), Disk::new("privrec-copy"));
    let scratch = ftvm_tests::Scratch::new("privrec-log");
    let log = scratch.path("kv.log");
    let ns = NetNs::with_bridged_taps("privrec", &["tap-a"]);
    // The recording starts from the disk's state: keep a copy of it.
    std::fs::copy(disk.path(), copy.path()).expect("copy the disk");
    let recorded = Spawned::start(
        ftvm_tests::kv_alone(&ns, "tap-a", &disk.path())
            .arg("--disk-private")
            .arg("--record")
            .arg(&log),
    );
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "kv did not answer PING"
    );
    let mut writes =
        AckedWrites::connect(&ns.name, &format!("{GUEST_IP}:6379"), "rec").with_value_len(2000);
    writes.write_many(50, |_| {}).expect("writes");
    shut_down(&ns, recorded);
    let replay = |disk: Option<&Disk>| {
        let mut command = Command::new(binary("ftvmm"));
        command.args(["replay", "--log"]).arg(&log);
        command.arg("--image").arg(guest("kv"));
        if let Some(disk) = disk {
            command.arg("--disk").arg(disk.path());
        }
        run(&mut command)
    };
    let without = replay(None);
    assert_ne!(without.code, Some(0), "{without:?}");
    assert!(
        without.stderr.contains("the log of a private disk"),
        "{without:?}"
    );
    let before = std::fs::read(copy.path()).expect("read the copy");
    let replayed = replay(Some(&copy));
    assert_eq!(replayed.code, Some(0), "{replayed:?}");
    assert!(replayed.stderr.contains("IDENTICAL"), "{replayed:?}");
    // The replay kept the guest's writes in memory: the copy is as it was.
    assert!(
        std::fs::read(copy.path()).expect("read the copy") == before,
        "the replay wrote the disk copy"
    );
    // Its reads are in the log as checksums, never as data.
    let mut reader =
        ftvm_log::LogReader::new(std::fs::File::open(&log).expect("open the log")).expect("log");
    let (mut crcs, mut data) = (0, 0);
    while let Some(frame) = reader.next_frame().expect("a frame") {
        match frame.event {
            ftvm_log::Event::DiskReadCrc { .. } => crcs += 1,
            ftvm_log::Event::DiskRead { .. } => data += 1,
            _ => {}
        }
    }
    assert!(
        crcs > 0 && data == 0,
        "{crcs} read checksums, {data} reads with data"
    );
}
