//! ftvmm's control socket (`--control PATH`, docs/contract.md): status, metrics and stop
//! from a real ftvmm running a real guest, alone and as a pair.

use ftvm_tests::{
    alive, binary, field, free_port, guest, parse_prometheus, require_kvm, run, sample,
    unix_request, Sample, Spawned,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A guest that runs for a long while (ticks of 1 ms) unless stopped.
const LONG: &str = "ticks=60000 tick_us=1000 work=20000";

/// A directory of this test's own for sockets and arbiter files.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ftvm-control-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn ftvmm(cmdline: &str, control: &Path) -> Command {
    require_kvm();
    let mut command = Command::new(binary("ftvmm"));
    command
        .args(["run", "--mem", "64M", "--console", "none"])
        .args(["--cmdline", cmdline])
        .arg("--image")
        .arg(guest("hello"))
        .arg("--control")
        .arg(control);
    command
}

/// Waits until `check` returns something, asking every 50 ms.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(path: &Path) -> Option<String> {
    let line = unix_request(path, b"status\n").ok()?;
    Some(line.trim_end().to_owned())
}

fn word<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn metrics(path: &Path) -> Vec<Sample> {
    let text = unix_request(path, b"metrics\n").expect("metrics request");
    parse_prometheus(&text).unwrap_or_else(|err| panic!("{err}\n{text}"))
}

#[test]
fn a_running_vm_answers_status_and_metrics_and_stops_on_request() {
    let dir = scratch("alone");
    let socket = dir.join("vm.sock");
    let vm = Spawned::start(&mut ftvmm(LONG, &socket));
    let first = wait_for("a running status", Duration::from_secs(10), || {
        status(&socket).filter(|line| field(line, "exit_ordinal").is_some_and(|n| n > 0))
    });
    assert_eq!(field(&first, "pid"), Some(u64::from(vm.pid())), "{first}");
    assert_eq!(word(&first, "role"), Some("none"), "{first}");
    assert_eq!(word(&first, "vm"), Some("-"), "{first}");
    assert!(
        matches!(word(&first, "state"), Some("running" | "halted")),
        "{first}"
    );
    assert_eq!(field(&first, "generation"), Some(1), "{first}");
    assert!(field(&first, "uptime_ms").is_some(), "{first}");
    assert!(
        word(&first, "backup_lag_exits").is_none(),
        "not a pair: {first}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let second = status(&socket).expect("second status");
    assert!(
        field(&second, "exit_ordinal") > field(&first, "exit_ordinal"),
        "the guest moves on: {first}\n{second}"
    );

    let samples = metrics(&socket);
    let ordinal = sample(&samples, "ftvmm_exit_ordinal", "").expect("ftvmm_exit_ordinal");
    assert!(ordinal >= field(&second, "exit_ordinal").unwrap_or(0) as f64);
    let by_kind: f64 = samples
        .iter()
        .filter(|s| s.name == "ftvmm_exits_total")
        .map(|s| s.value)
        .sum();
    assert!(
        by_kind > 0.0 && by_kind <= ordinal,
        "exits by kind add up to at most the ordinal published with them"
    );
    assert!(sample(&samples, "ftvmm_exits_total", "kind=\"hlt\"").is_some_and(|n| n > 0.0));
    assert_eq!(sample(&samples, "ftvmm_role", "role=\"none\""), Some(1.0));
    assert_eq!(
        sample(&samples, "ftvmm_role", "role=\"primary\""),
        Some(0.0)
    );
    assert!(
        sample(&samples, "ftvmm_resident_memory_bytes", "part=\"vmm\"").is_some_and(|n| n > 0.0)
    );
    assert!(sample(&samples, "ftvmm_interrupts_injected_total", "").is_some_and(|n| n > 0.0));
    assert!(
        !samples.iter().any(|s| s.name.starts_with("ftvmm_log_")),
        "no log channel, no log metrics"
    );

    assert_eq!(
        unix_request(&socket, b"stop\n").expect("stop"),
        "ok: stopping\n"
    );
    let ran = vm.wait(Duration::from_secs(10));
    assert_eq!(ran.code, Some(143), "stop exits like SIGTERM: {ran:?}");
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn bad_requests_get_one_line_errors_and_the_vm_runs_on() {
    use std::io::{Read, Write};
    let dir = scratch("garbage");
    let socket = dir.join("vm.sock");
    let vm = Spawned::start(&mut ftvmm(LONG, &socket));
    wait_for("the socket", Duration::from_secs(10), || status(&socket));

    let unknown = unix_request(&socket, b"reboot now\n").expect("unknown command");
    assert_eq!(
        unknown,
        "error: unknown command 'reboot now' (expected status, metrics, stop or stop-backup)\n"
    );
    let binary_junk = unix_request(&socket, &[0xff, 0x00, 0x1b, b'\n']).expect("junk");
    assert!(
        binary_junk.starts_with("error: unknown command"),
        "{binary_junk}"
    );
    assert_eq!(binary_junk.lines().count(), 1, "{binary_junk}");
    // A megabyte without a newline: cut off after the bound, the rest is not read.
    let mut huge = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    huge.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = huge.write_all(&vec![b'x'; 1 << 20]);
    let mut answer = String::new();
    huge.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = huge.read_to_string(&mut answer);
    assert_eq!(answer, "error: request longer than 256 bytes\n");
    // A client that connects and says nothing is dropped after a second; others are
    // served meanwhile.
    let mut silent = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let started = Instant::now();
    assert!(
        status(&socket).is_some(),
        "served while another client is silent"
    );
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = silent.read_to_string(&mut answer);
    assert!(
        answer.starts_with("error: no request line within"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Many clients at once that never send: the extra ones are refused, none hangs ftvmm.
    let idle: Vec<_> = (0..12)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&socket).ok())
        .collect();
    drop(idle);
    std::thread::sleep(Duration::from_millis(1200));

    assert!(alive(vm.pid()), "ftvmm still runs");
    let before = status(&socket).expect("status after the abuse");
    std::thread::sleep(Duration::from_millis(100));
    let after = status(&socket).expect("status after the abuse");
    assert!(
        field(&after, "exit_ordinal") > field(&before, "exit_ordinal"),
        "the guest still runs: {before}\n{after}"
    );
    unix_request(&socket, b"stop").expect("stop without a newline");
    assert_eq!(vm.wait(Duration::from_secs(10)).code, Some(143));
}

#[test]
fn a_control_path_that_cannot_be_bound_is_a_usage_error_and_a_stale_one_is_replaced() {
    require_kvm();
    let dir = scratch("paths");
    for bad in [
        dir.join("no-such-dir").join("vm.sock"),
        dir.join(format!("{}.sock", "x".repeat(120))),
    ] {
        let ran = run(&mut ftvmm("ticks=2", &bad));
        assert_eq!(ran.code, Some(64), "{ran:?}");
        assert_eq!(ran.stderr.lines().count(), 1, "{ran:?}");
        assert!(
            ran.stderr
                .starts_with("ftvmm: cannot bind the control socket"),
            "{ran:?}"
        );
    }
    let file = dir.join("plain-file");
    std::fs::write(&file, "keep me").expect("write");
    let ran = run(&mut ftvmm("ticks=2", &file));
    assert_eq!(ran.code, Some(64), "{ran:?}");
    assert!(ran.stderr.contains("not a socket"), "{ran:?}");
    assert_eq!(
        std::fs::read_to_string(&file).ok().as_deref(),
        Some("keep me")
    );

    // A socket left by a process that died: nobody answers, so it is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let ran = run(&mut ftvmm("ticks=2", &stale));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(!stale.exists(), "removed at exit");
    // A socket someone answers on is not stale.
    let busy = dir.join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).expect("bind");
    let ran = run(&mut ftvmm("ticks=2", &busy));
    assert_eq!(ran.code, Some(64), "{ran:?}");
    assert!(ran.stderr.contains("in use"), "{ran:?}");
}

fn replica(role: &str, port: u16, dir: &Path) -> Command {
    let mut command = ftvmm(LONG, &dir.join(format!("{role}.sock")));
    let addr = format!("127.0.0.1:{port}");
    command
        .args(["--role", role, "--vm", "ctl", "--generation", "4"])
        .args(ftvm_tests::replica_tls())
        .arg("--arbiter")
        .arg(format!("local:{}", dir.join("arbiter").display()));
    match role {
        "primary" => command.args(["--log-listen", &addr]),
        _ => command.args(["--log-connect", &addr]),
    };
    command
}

#[test]
fn a_pair_shows_lag_and_log_traffic_and_the_backup_reports_its_go_live() {
    let dir = scratch("pair");
    let port = free_port();
    let mut primary = Spawned::start(&mut replica("primary", port, &dir));
    let primary_socket = dir.join("primary.sock");
    let backup_socket = dir.join("backup.sock");
    // The primary answers while it waits for its backup.
    let booting = wait_for("the primary's socket", Duration::from_secs(10), || {
        status(&primary_socket)
    });
    assert_eq!(word(&booting, "state"), Some("booting"), "{booting}");
    let backup = Spawned::start(&mut replica("backup", port, &dir));

    let first = wait_for("log traffic", Duration::from_secs(10), || {
        status(&primary_socket).filter(|line| field(line, "log_bytes_total").is_some_and(|n| n > 0))
    });
    for (key, value) in [("vm", "ctl"), ("role", "primary"), ("protected", "1")] {
        assert_eq!(word(&first, key), Some(value), "{first}");
    }
    assert_eq!(field(&first, "generation"), Some(4), "{first}");
    for key in [
        "backup_lag_exits",
        "backup_lag_ms",
        "log_frames_total",
        "output_held",
    ] {
        assert!(field(&first, key).is_some(), "{key} in {first}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let second = status(&primary_socket).expect("status");
    assert!(
        field(&second, "log_bytes_total") > field(&first, "log_bytes_total"),
        "the log flows: {first}\n{second}"
    );
    assert!(
        field(&second, "backup_exit_ordinal") > field(&first, "backup_exit_ordinal"),
        "the backup follows: {first}\n{second}"
    );
    assert!(
        field(&second, "backup_lag_exits") < Some(5000),
        "the backup keeps up: {second}"
    );
    let backup_line = status(&backup_socket).expect("backup status");
    assert_eq!(word(&backup_line, "role"), Some("backup"), "{backup_line}");
    assert!(
        field(&backup_line, "log_bytes_total").is_some_and(|n| n > 0),
        "{backup_line}"
    );

    let samples = metrics(&primary_socket);
    assert_eq!(
        sample(&samples, "ftvmm_role", "role=\"primary\""),
        Some(1.0)
    );
    assert!(sample(&samples, "ftvmm_log_bytes_total", "").is_some_and(|n| n > 0.0));
    assert!(sample(&samples, "ftvmm_log_frames_total", "").is_some_and(|n| n > 0.0));
    assert!(sample(&samples, "ftvmm_backup_lag_exits", "").is_some());
    assert!(sample(&samples, "ftvmm_backup_lag_seconds", "").is_some_and(|s| s >= 0.0));
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == "ftvmm_output_hold_seconds_bucket")
        .map(|s| {
            let le = s
                .labels
                .strip_prefix("le=\"")
                .and_then(|l| l.strip_suffix('"'));
            let le = match le {
                Some("+Inf") => f64::INFINITY,
                Some(bound) => bound.parse().expect("le is a number"),
                None => panic!("bucket without le: {s:?}"),
            };
            (le, s.value)
        })
        .collect();
    assert_eq!(buckets.len(), 11, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "bounds rise and counts are cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.1),
        sample(&samples, "ftvmm_output_hold_seconds_count", "")
    );
    assert!(sample(&samples, "ftvmm_output_hold_seconds_sum", "").is_some());

    // The primary's host dies: the backup goes live and says how long that took.
    primary.kill();
    // The role turns live when the claim is won; went_live_at follows once the vCPU
    // thread has replayed the log to its end and runs live (the next status it posts).
    let live = wait_for("the backup to go live", Duration::from_secs(15), || {
        status(&backup_socket).filter(|line| {
            word(line, "role") == Some("live") && field(line, "went_live_at").is_some()
        })
    });
    assert!(field(&live, "go_live_ms").is_some(), "{live}");
    assert!(
        field(&live, "went_live_at").is_some_and(|n| n > 0),
        "{live}"
    );
    assert_eq!(word(&live, "peer_lost"), Some("1"), "{live}");
    assert_eq!(word(&live, "protected"), Some("0"), "{live}");
    let samples = metrics(&backup_socket);
    assert_eq!(sample(&samples, "ftvmm_role", "role=\"live\""), Some(1.0));
    assert_eq!(sample(&samples, "ftvmm_role", "role=\"backup\""), Some(0.0));
    assert!(sample(&samples, "ftvmm_go_live_seconds", "").is_some_and(|s| s >= 0.0));
    // A backup being replaced is stopped only while it follows its primary: this one is
    // the VM now and refuses.
    let refused = unix_request(&backup_socket, b"stop-backup\n").expect("stop-backup");
    assert_eq!(
        refused,
        "error: not stopping: this replica went live: it is the VM now (role=live)\n"
    );
    assert!(status(&backup_socket).is_some(), "it runs on");
    unix_request(&backup_socket, b"stop\n").expect("stop");
    assert_eq!(backup.wait(Duration::from_secs(10)).code, Some(143));
    assert!(!backup_socket.exists());
}

/// The ftd <-> ftvmm contract end to end: ftd's own builder (`ftd::supervisor::run_args`)
/// makes the flags of both halves of a pair, ftvmm runs them, and the status lines read
/// back with the contract's parser say what the builder asked for.
#[test]
fn a_pair_started_with_flags_built_by_ftds_builder_runs_and_reports_through_the_contract() {
    use ftd::model::{Assignment, HostName, Role, VmName, VmSpec};
    use ftd::supervisor::{run_args, ReplicaFiles};
    use ftvm_contract::status::{ReplicaRole, ReplicaStatus};
    require_kvm();
    let dir = scratch("builder");
    let vm = VmName::new("built").expect("a VM name");
    let spec = VmSpec {
        name: vm.clone(),
        image: guest("hello").display().to_string(),
        image_sha256: None,
        mem_bytes: 64 << 20,
        cmdline: "ticks=300 tick_us=2000 work=20000".into(),
        disk: None,
        disk_mode: ftd::model::DiskMode::Shared,
        disk_size_bytes: None,
        disk_image: None,
        net: None,
        hosts: Vec::new(),
        uid: "u1".into(),
        created_unix_ms: 0,
    };
    let log = format!("127.0.0.1:{}", free_port());
    let assignment = |replica, host: &str| Assignment {
        host: HostName::new(host).expect("a host name"),
        generation: 1,
        uid: "u1".into(),
        replica,
        log_address: Some(log.clone()),
        clone_listen: None,
        clone_from: None,
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    };
    let arbiter = format!("local:{}", dir.join("arbiter").display());
    let start = |role, replica, host: &str| {
        let files = ReplicaFiles {
            console: dir.join(format!("{replica}.console")),
            control: dir.join(format!("{replica}.sock")),
            disk: None,
        };
        let flags = run_args(
            files,
            &arbiter,
            &vm,
            role,
            &assignment(replica, host),
            &spec,
        );
        let mut command = Command::new(binary("ftvmm"));
        command
            .arg("run")
            .args(flags.to_args())
            .args(ftvm_tests::replica_tls());
        (
            Spawned::start(&mut command),
            dir.join(format!("{replica}.sock")),
        )
    };
    let (primary, primary_socket) = start(Role::Primary, 1, "a");
    let (backup, backup_socket) = start(Role::Backup, 2, "b");
    let parsed = |socket: &Path| status(socket).and_then(|line| ReplicaStatus::parse(&line));
    let protected = wait_for(
        "the primary to say protected",
        Duration::from_secs(20),
        || parsed(&primary_socket).filter(|s| s.pair.as_ref().is_some_and(|pair| pair.protected)),
    );
    assert_eq!(protected.role, ReplicaRole::Primary);
    assert_eq!(protected.vm.as_deref(), Some("built"));
    assert_eq!(protected.generation, 1);
    let following = wait_for("the backup's status", Duration::from_secs(20), || {
        parsed(&backup_socket)
    });
    assert_eq!(following.role, ReplicaRole::Backup);
    assert_eq!(following.pid, backup.pid());
    let primary = primary.wait(Duration::from_secs(60));
    let backup = backup.wait(Duration::from_secs(60));
    assert_eq!(primary.code, Some(0), "{primary:?}");
    assert_eq!(backup.code, Some(0), "{backup:?}");
    assert!(backup.stderr.contains("IDENTICAL"), "{backup:?}");
}
