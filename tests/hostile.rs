//! Hostile guests against the VMM's bounds: floods of console output, of device breaks
//! and of disk writes cost the host bounded memory, disk and log lines; a receive buffer
//! over the rings breaks only the NIC; and every attack run as an FT pair ends with the
//! backup in step (its replay IDENTICAL, its console the same).

use ftvm_tests::{
    binary, field, free_port, guest, require_kvm, run, stop_process, Disk, NetNs, Ran, Spawned,
    GUEST_IP, GUEST_MAC,
};
use std::process::Command;
use std::time::Duration;

/// What the test measures a replica's memory against: its peak resident set (guest RAM
/// included). By design a primary holds at most 64 MiB of writes plus one look at the
/// queue (64 MiB and a request); a backup as much in flight, plus the writes since the
/// last synced one (64 MiB and a request). Without those bounds a round of the write
/// flood below offers 512 MiB at once and a backup kept every write (3 GiB here).
const PEAK_RSS_LIMIT: u64 = 320 << 20;

/// A pair's shared disk, with the signature the guest's final read checks, and room for
/// the endless read's 32 MiB of sector images.
fn signed_disk(tag: &str) -> Disk {
    use std::os::unix::fs::FileExt;
    let disk = Disk::new(tag);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(disk.path())
        .expect("open the disk image");
    file.write_all_at(b"FTVMDISK", 0).expect("sign the disk");
    file.set_len(33 << 20).expect("size the disk");
    disk
}

fn stats_line(ran: &Ran) -> &str {
    ran.stderr
        .lines()
        .find(|line| line.starts_with("ftvmm stats:"))
        .unwrap_or_else(|| panic!("no stats line: {ran:?}"))
}

/// The peak resident set the `--stats` line reports, printed for the record.
fn peak_rss(ran: &Ran, who: &str) -> u64 {
    let peak = field(stats_line(ran), "peak_rss_bytes").expect("peak_rss_bytes");
    eprintln!("{who}: peak RSS {} MiB", peak >> 20);
    peak
}

/// `ftvmm run` of evilvirt with `cmdline`, alone, with `disk` and `--stats`.
fn alone(cmdline: &str, disk: &Disk, extra: &[&str]) -> Ran {
    require_kvm();
    run(Command::new(binary("ftvmm"))
        .args(["run", "--console", "-", "--stats", "--cmdline", cmdline])
        .arg("--image")
        .arg(guest("evilvirt"))
        .arg("--disk")
        .arg(disk.path())
        .args(extra))
}

/// Fails unless `ran` is evilvirt that finished its flood and then read the disk.
fn assert_flood_absorbed(ran: &Ran) {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("flood done:"), "{ran:?}");
    assert!(
        ran.stdout.contains("blk read: status=0 data=FTVMDISK"),
        "{ran:?}"
    );
}

#[test]
fn a_console_flood_costs_the_host_at_most_twice_the_console_cap() {
    let disk = signed_disk("console-flood");
    let dir = disk.path().with_file_name("console");
    std::fs::create_dir_all(&dir).expect("console dir");
    let console = dir.join("console.log");
    // 150 KB of output against a 64 KiB cap: two rotations.
    let ran = run(Command::new(binary("ftvmm"))
        .args(["run", "--stats", "--console-max", "64K"])
        .args(["--cmdline", "case=console-flood bytes=150000"])
        .arg("--console")
        .arg(&console)
        .arg("--image")
        .arg(guest("evilvirt"))
        .arg("--disk")
        .arg(disk.path()));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let current = std::fs::read_to_string(&console).expect("console log");
    let rotated = console.with_file_name("console.log.1");
    let older = std::fs::metadata(&rotated)
        .expect("a rotated console log")
        .len();
    assert_eq!(older, 64 << 10, "rotated at the cap");
    assert!(current.len() <= 64 << 10, "{} bytes", current.len());
    assert!(
        current.contains("blk read: status=0 data=FTVMDISK"),
        "the newest output is in the current file: {current}"
    );
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("console dir")
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(files.len(), 2, "one rotated file kept: {files:?}");
    assert!(peak_rss(&ran, "console flood") < PEAK_RSS_LIMIT);
}

#[test]
fn a_device_broken_in_a_loop_costs_five_log_lines_and_one_summary() {
    let disk = signed_disk("reset-loop");
    let ran = alone("case=reset-loop rounds=300", &disk, &[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("reset loop: 300 of 300 breaks refused"),
        "{ran:?}"
    );
    let reports = ran
        .stderr
        .lines()
        .filter(|line| line.contains("device needs reset"))
        .count();
    assert_eq!(reports, 5, "{}", ran.stderr);
    assert_eq!(
        ran.stderr
            .lines()
            .filter(|line| line.contains("keeps breaking the device"))
            .count(),
        1,
        "{}",
        ran.stderr
    );
}

#[test]
fn a_receive_buffer_over_the_rings_breaks_only_the_network_device() {
    require_kvm();
    let disk = signed_disk("rx-rings");
    let mut ns = NetNs::with_tap("rx-rings");
    // Frames for the guest: ARP requests for its address, broadcast onto the TAP.
    let pinger = ns.spawn(ns.command("ping").args(["-c", "60", "-i", "0.2", GUEST_IP]));
    let ran = run(ns
        .command(binary("ftvmm"))
        .args(["run", "--console", "-"])
        .args(["--cmdline", "case=rx-onto-rings dev=net"])
        .args(["--tap", "tap0", "--mac", GUEST_MAC])
        .arg("--image")
        .arg(guest("evilvirt"))
        .arg("--disk")
        .arg(disk.path()));
    ns.kill(pinger);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("needs_reset=yes"), "{ran:?}");
    assert!(
        ran.stdout.contains("blk read: status=0 data=FTVMDISK"),
        "{ran:?}"
    );
    assert!(
        ran.stderr.contains("virtio net:") && ran.stderr.contains("queue's own rings"),
        "{}",
        ran.stderr
    );
}

#[test]
fn an_endless_read_is_refused_at_its_first_chain() {
    // Before the device refused writes onto its rings, this exit never ended: SIGTERM
    // went unanswered, a recording grew by hundreds of MB a second, and so did a
    // primary's memory.
    let disk = signed_disk("endless-read");
    let started = std::time::Instant::now();
    let ran = alone("case=endless-read", &disk, &[]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("needs_reset=yes"), "{ran:?}");
    assert!(
        ran.stderr.contains("write onto the queue's own rings"),
        "{}",
        ran.stderr
    );
    assert!(
        ran.stdout.contains("blk read: status=0 data=FTVMDISK"),
        "{ran:?}"
    );
    eprintln!(
        "endless read refused, guest done in {:?}",
        started.elapsed()
    );
    assert!(peak_rss(&ran, "endless read") < PEAK_RSS_LIMIT);
}

#[test]
fn a_write_flood_alone_stays_within_its_memory_bound() {
    let disk = signed_disk("write-flood");
    let ran = alone("case=write-flood rounds=4 chains=32", &disk, &[]);
    assert_flood_absorbed(&ran);
    assert!(peak_rss(&ran, "write flood alone") < PEAK_RSS_LIMIT);
}

/// `ftvmm run` of evilvirt as `role` of the pair on `port` in `ns` (the primary on tap0),
/// with `disk` shared and a local arbiter in `arbiter`.
fn replica(ns: &NetNs, role: &str, cmdline: &str, port: u16, disk: &Disk) -> Command {
    require_kvm();
    let arbiter = disk.path().with_file_name("arbiter");
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--console", "-", "--stats", "--mac", GUEST_MAC])
        .args(["--cmdline", cmdline])
        .arg("--image")
        .arg(guest("evilvirt"))
        .arg("--disk")
        .arg(disk.path())
        .args(["--role", role, "--vm", &format!("hostile-{port}")])
        .args(ftvm_tests::replica_tls())
        .arg("--arbiter")
        .arg(format!("local:{}", arbiter.display()));
    let addr = format!("127.0.0.1:{port}");
    match role {
        "primary" => command.args(["--tap", "tap0", "--log-listen", &addr]),
        _ => command.args(["--log-connect", &addr]),
    };
    command
}

/// Fails unless `backup` replayed `primary`'s run to the same end.
fn assert_in_step(case: &str, primary: &Ran, backup: &Ran) {
    assert_eq!(primary.code, backup.code, "{case}: {primary:?}\n{backup:?}");
    assert_eq!(
        primary.stdout, backup.stdout,
        "{case}: both consoles show the same guest"
    );
    assert!(
        backup.stderr.contains("IDENTICAL"),
        "{case}: {}",
        backup.stderr
    );
    let exits = |ran: &Ran| field(stats_line(ran), "exit_ordinal");
    assert_eq!(exits(primary), exits(backup), "{case}");
}

#[test]
fn every_attack_run_as_an_ft_pair_leaves_the_backup_in_step() {
    let disk = signed_disk("hostile-pairs");
    let mut ns = NetNs::with_tap("hostile-pairs");
    let pinger = ns.spawn(
        ns.command("ping")
            .args(["-c", "1000", "-i", "0.2", GUEST_IP]),
    );
    for (case, refused) in [
        ("case=chain-loop", true),
        ("case=wild-address", true),
        ("case=huge-length", true),
        ("case=bad-queue-size", true),
        ("case=rings-outside-ram", true),
        ("case=readonly-status", true),
        ("case=dma-onto-rings", true),
        ("case=endless-read", true),
        ("case=indirect", true),
        // Refused only here: an FT primary holds writes, so the second use of the head
        // finds the first still in flight.
        ("case=head-reuse", true),
        ("case=rx-onto-rings dev=net", true),
        ("case=reset-loop rounds=50", true),
        ("case=console-flood bytes=20000", false),
        ("case=write-flood rounds=2 chains=8", false),
    ] {
        let port = free_port();
        let primary = Spawned::start(&mut replica(&ns, "primary", case, port, &disk));
        let backup = Spawned::start(&mut replica(&ns, "backup", case, port, &disk));
        let backup = backup.wait(Duration::from_secs(60));
        let primary = primary.wait(Duration::from_secs(60));
        assert_eq!(primary.code, Some(0), "{case}: {primary:?}");
        if refused {
            assert!(
                primary.stdout.contains("needs_reset=yes"),
                "{case}: {primary:?}"
            );
        } else {
            assert!(
                primary.stdout.contains("flood done:"),
                "{case}: {primary:?}"
            );
        }
        assert_in_step(case, &primary, &backup);
    }
    ns.kill(pinger);
}

#[test]
fn a_write_flood_against_a_stalling_backup_stays_within_its_memory_bound() {
    let disk = signed_disk("flood-pair");
    let ns = NetNs::with_tap("flood-pair");
    let case = "case=write-flood rounds=6 chains=32";
    let port = free_port();
    let primary = Spawned::start(&mut replica(&ns, "primary", case, port, &disk));
    let backup = Spawned::start(&mut replica(&ns, "backup", case, port, &disk));
    // The backup stalls half the peer timeout at a time: the primary must hold the
    // flood's writes back, not pile them up.
    let backup_pid = backup.pid();
    let stalls = std::thread::spawn(move || {
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(300));
            if !ftvm_tests::alive(backup_pid) {
                break;
            }
            stop_process(backup_pid);
            std::thread::sleep(ftvm_pair::channel::PEER_TIMEOUT / 2);
            // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
            unsafe {
                libc::kill(backup_pid as libc::pid_t, libc::SIGCONT);
            }
        }
    });
    let backup = backup.wait(Duration::from_secs(120));
    let primary = primary.wait(Duration::from_secs(120));
    stalls.join().expect("stalls");
    assert_flood_absorbed(&primary);
    assert_in_step(case, &primary, &backup);
    assert!(peak_rss(&primary, "write flood, primary") < PEAK_RSS_LIMIT);
    assert!(peak_rss(&backup, "write flood, backup") < PEAK_RSS_LIMIT);
    let p = stats_line(&primary);
    assert_eq!(
        field(p, "backup_lost"),
        Some(0),
        "stalls shorter than the peer timeout: {p}"
    );
    eprintln!(
        "primary held back {:?} times, {:?} ms in all",
        field(p, "throttles"),
        field(p, "throttled_ms")
    );
}
