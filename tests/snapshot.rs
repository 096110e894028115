//! Machine snapshots on real KVM: a guest stopped at an exit, saved, restored into a fresh
//! ftvmm process, shown equal by digest and then shown to continue identically (the
//! original records its continuation, the restored copy replays it with a registers and a
//! memory digest checked at every exit).

use ftvm_tests::{
    binary, guest, redis_cli, require_kvm, run, wait_for_pong, NetNs, Ran, Scratch, GUEST_IP,
    GUEST_MAC,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Digests checked at every exit of the continuation.
const EVERY_EXIT: [&str; 4] = ["--digest-every", "1", "--mem-digest-every", "1"];
const HELLO: &str = "ticks=400 tick_us=500 work=3000000";

/// The `ftvmm snapshot: <what> ...` line of `stderr`, as key=value words.
fn snapshot_line<'a>(stderr: &'a str, what: &str) -> &'a str {
    let prefix = format!("ftvmm snapshot: {what} ");
    stderr
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{stderr}"))
}

fn word<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
}

/// The machine's identity and state at the snapshot: these must be equal after a restore.
fn state_words(line: &str) -> [&str; 5] {
    [
        "exit_ordinal",
        "regs_digest",
        "mem_digest",
        "pages",
        "interrupt_queued",
    ]
    .map(|key| word(line, key))
}

fn replay(image: &str, log: &Path, snapshot: &Path, console: &Path) -> Ran {
    run(Command::new(binary("ftvmm"))
        .arg("replay")
        .args(EVERY_EXIT)
        .arg("--image")
        .arg(guest(image))
        .arg("--log")
        .arg(log)
        .arg("--snapshot")
        .arg(snapshot)
        .arg("--console")
        .arg(console))
}

/// hello snapshotted at exit 300 (in its timer loop: most exits there inject the tick).
fn hello_snapshot(files: &Scratch) -> Ran {
    require_kvm();
    let ran = run(Command::new(binary("ftvmm"))
        .args(["run", "--cmdline", HELLO, "--snapshot-at", "300"])
        .args(EVERY_EXIT)
        .arg("--image")
        .arg(guest("hello"))
        .arg("--console")
        .arg(files.path("original.txt"))
        .arg("--snapshot-out")
        .arg(files.path("hello.snap"))
        .arg("--snapshot-record")
        .arg(files.path("continuation.ftlog")));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    ran
}

#[test]
fn a_snapshot_restored_in_a_fresh_process_is_equal_and_continues_identically() {
    let files = Scratch::new("snapshot-hello");
    let original = hello_snapshot(&files);
    let saved = snapshot_line(&original.stderr, "saved");
    assert!(word(saved, "exit_ordinal").parse::<u64>().unwrap() >= 300);

    let restored = replay(
        "hello",
        &files.path("continuation.ftlog"),
        &files.path("hello.snap"),
        &files.path("restored.txt"),
    );
    assert_eq!(restored.code, Some(0), "{restored:?}");
    let loaded = snapshot_line(&restored.stderr, "restored");
    assert_eq!(state_words(loaded), state_words(saved));
    assert!(
        restored.stderr.contains("ftvmm replay: IDENTICAL"),
        "{restored:?}"
    );
    // Every exit of the continuation was checked: hundreds of digests, not a handful.
    let matched: u64 = restored
        .stderr
        .split(" digests matched")
        .next()
        .and_then(|head| head.rsplit(", ").next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no digest count in {restored:?}"));
    assert!(matched > 200, "{matched} digests: {restored:?}");
    // The restored guest printed the rest of the original's console, from its own UART.
    let original_console = std::fs::read_to_string(files.path("original.txt")).unwrap();
    let restored_console = std::fs::read_to_string(files.path("restored.txt")).unwrap();
    assert!(
        restored_console.contains("checksum: 0x") && original_console.ends_with(&restored_console),
        "original:\n{original_console}\nrestored:\n{restored_console}"
    );
}

#[test]
fn the_continuation_cannot_be_replayed_without_its_snapshot() {
    // The control: the log alone, from boot, must diverge at once, so the identical
    // replay above owes its success to the restored state.
    let files = Scratch::new("snapshot-control");
    hello_snapshot(&files);
    let ran = run(Command::new(binary("ftvmm"))
        .arg("replay")
        .args(EVERY_EXIT)
        .arg("--image")
        .arg(guest("hello"))
        .arg("--log")
        .arg(files.path("continuation.ftlog")));
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("DIVERGED"), "{ran:?}");
}

#[test]
fn a_damaged_or_foreign_snapshot_is_refused_in_one_line() {
    let files = Scratch::new("snapshot-refuse");
    hello_snapshot(&files);
    let good = std::fs::read(files.path("hello.snap")).unwrap();
    let restore = |bytes: &[u8], cmdline: &str| -> Ran {
        let path = files.path("damaged.snap");
        std::fs::write(&path, bytes).unwrap();
        run(Command::new(binary("ftvmm"))
            .args(["run", "--console", "none", "--cmdline", cmdline])
            .arg("--image")
            .arg(guest("hello"))
            .arg("--restore")
            .arg(&path))
    };
    let mut flipped = good.clone();
    let at = good.len() / 2;
    flipped[at] ^= 0x20;
    for (bytes, cmdline, expect) in [
        (&flipped[..], HELLO, "checksum mismatch"),
        (&good[..good.len() - 10], HELLO, "truncated"),
        (
            &good[..],
            "ticks=401 tick_us=500 work=3000000",
            "another machine",
        ),
        (&b"FTVMSNAQ"[..], HELLO, "bad magic"),
    ] {
        let ran = restore(bytes, cmdline);
        assert_eq!(ran.code, Some(65), "{expect}: {ran:?}");
        assert!(ran.stderr.contains(expect), "{expect}: {ran:?}");
        assert_eq!(ran.stderr.lines().count(), 1, "{expect}: {ran:?}");
        assert!(!ran.stderr.contains("panicked"), "{ran:?}");
    }
    // Intact, it runs to the guest's own end.
    let ran = restore(&good, HELLO);
    assert_eq!(ran.code, Some(0), "{ran:?}");
}

/// kv serving redis traffic, snapshotted mid-traffic with its NIC and disk queues busy:
/// the restored copy replays the rest of the session (more traffic, SHUTDOWN) identically.
#[test]
fn a_kv_guest_snapshotted_under_traffic_continues_identically() {
    let files = Scratch::new("snapshot-kv");
    let disk = files.path("kv.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(16 << 20))
        .expect("disk image");
    let mut ns = NetNs::with_tap("kvsnap");
    require_kvm();
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .args(["--digest-every", "1", "--mem-digest-every", "1"])
        .args(["--snapshot-at", "1200"])
        .arg("--snapshot-out")
        .arg(files.path("kv.snap"))
        .arg("--snapshot-record")
        .arg(files.path("kv.ftlog"))
        .arg("--console")
        .arg(files.path("original.txt"))
        .arg("--disk")
        .arg(&disk)
        .arg("--image")
        .arg(guest("kv"))
        .stderr(std::fs::File::create(files.path("original.err")).unwrap());
    let pid = ns.spawn(&mut command);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "kv did not start"
    );
    // About five exits per request: the snapshot falls inside this traffic.
    let benchmark = run(ns.command("redis-benchmark").args([
        "-h", GUEST_IP, "-t", "set,get", "-n", "400", "-c", "4", "-q",
    ]));
    assert_eq!(benchmark.code, Some(0), "{benchmark:?}");
    for i in 0..10 {
        assert_eq!(
            redis_cli(&ns, &["SET", &format!("after:{i}"), &i.to_string()]),
            "OK"
        );
    }
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    let code = ns.wait(pid);
    let original_err = std::fs::read_to_string(files.path("original.err")).unwrap();
    assert_eq!(code, Some(0), "kv did not power off: {original_err}");
    let saved = snapshot_line(&original_err, "saved");

    let restored = replay(
        "kv",
        &files.path("kv.ftlog"),
        &files.path("kv.snap"),
        &files.path("restored.txt"),
    );
    assert_eq!(restored.code, Some(0), "{restored:?}");
    assert_eq!(
        state_words(snapshot_line(&restored.stderr, "restored")),
        state_words(saved)
    );
    assert!(
        restored.stderr.contains("ftvmm replay: IDENTICAL"),
        "{restored:?}"
    );
    let restored_console = std::fs::read_to_string(files.path("restored.txt")).unwrap();
    assert!(
        restored_console.contains("kv: shutdown:"),
        "{restored_console}"
    );
    // For the record (cargo test -- --nocapture): where the snapshot fell, its size.
    eprintln!("original: {saved}\nrestored: {}", restored.stderr.trim());
}
