//! Virtio devices against a guest that attacks them: each attack ends in
//! DEVICE_NEEDS_RESET with one log line, and the VMM, the console and the block device
//! keep working.

use ftvm_tests::{binary, guest, require_kvm, run, NetNs, Ran, GUEST_MAC};
use std::path::PathBuf;

/// A disk image whose sector 0 starts with "FTVMDISK", removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Disk {
        let path = std::env::temp_dir().join(format!("ftvm-{tag}-{}.img", std::process::id()));
        let mut bytes = vec![0u8; 64 * 1024];
        bytes[..8].copy_from_slice(b"FTVMDISK");
        std::fs::write(&path, bytes).expect("write disk image");
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn assert_attack_refused(ran: &Ran, device: &str) {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("needs_reset=yes"), "{ran:?}");
    assert!(
        ran.stdout.contains("blk read: status=0 data=FTVMDISK"),
        "{ran:?}"
    );
    let reports: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|line| line.contains("device needs reset"))
        .collect();
    assert_eq!(
        reports.len(),
        1,
        "exactly one log line per broken device: {}",
        ran.stderr
    );
    assert!(
        reports[0].contains(&format!("virtio {device}:")),
        "{}",
        ran.stderr
    );
}

#[test]
fn hostile_descriptor_chains_and_queues_break_only_the_block_device() {
    require_kvm();
    let disk = Disk::new("evil-blk");
    for (case, reason) in [
        ("chain-loop", "does not terminate"),
        ("wild-address", "points outside guest memory"),
        ("huge-length", "bytes long"),
        ("bad-queue-size", "size 3"),
        ("rings-outside-ram", "rings are not inside guest memory"),
        ("readonly-status", "no writable status byte"),
        ("dma-onto-rings", "write onto the queue's own rings"),
        ("indirect", "uses an indirect table, which was not offered"),
    ] {
        let ran = run(std::process::Command::new(binary("ftvmm"))
            .args([
                "run",
                "--console",
                "-",
                "--cmdline",
                &format!("case={case}"),
            ])
            .arg("--image")
            .arg(guest("evilvirt"))
            .arg("--disk")
            .arg(&disk.0));
        assert_attack_refused(&ran, "blk");
        assert!(ran.stderr.contains(reason), "{case}: {}", ran.stderr);
    }
}

#[test]
fn broken_network_device_leaves_the_block_device_working() {
    require_kvm();
    let disk = Disk::new("evil-net");
    let ns = NetNs::with_tap("evilnet");
    let ran = run(ns
        .command(binary("ftvmm"))
        .args([
            "run",
            "--console",
            "-",
            "--cmdline",
            "case=chain-loop dev=net",
        ])
        .args(["--tap", "tap0", "--mac", GUEST_MAC])
        .arg("--image")
        .arg(guest("evilvirt"))
        .arg("--disk")
        .arg(&disk.0));
    assert_attack_refused(&ran, "net");
}

#[test]
fn missing_disk_and_bad_network_flags_are_one_line_errors() {
    let image = guest("hello");
    for (args, code, needle) in [
        (
            vec!["--disk", "/nonexistent/disk.img"],
            66,
            "cannot open disk image /nonexistent/disk.img",
        ),
        (vec!["--tap", "tap0"], 64, "--mac"),
        (
            vec!["--tap", "tap0", "--mac", "01:00:5e:00:00:01"],
            64,
            "multicast",
        ),
        (
            vec!["--tap", "tap0", "--mac", "52:54:00:zz:34:56"],
            64,
            "not a MAC address",
        ),
        (vec!["--ip", "10.77.0.2"], 64, "prefix length"),
        (
            vec!["--tap", "a/b", "--mac", GUEST_MAC],
            64,
            "not a valid interface name",
        ),
    ] {
        let ran = run(std::process::Command::new(binary("ftvmm"))
            .arg("run")
            .arg("--image")
            .arg(&image)
            .args(&args));
        assert_eq!(ran.code, Some(code), "{args:?}: {ran:?}");
        assert_eq!(ran.stderr.trim_end().lines().count(), 1, "{ran:?}");
        assert!(ran.stderr.contains(needle), "{args:?}: {ran:?}");
    }
}
