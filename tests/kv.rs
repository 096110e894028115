//! The kv guest on virtio-net and virtio-blk, served to real clients (Debian's redis-cli
//! and redis-benchmark) inside a network namespace the test makes.

use ftvm_tests::{
    binary, guest, in_netns, redis_cli, require_kvm, run, wait_for_pong, NetNs, Reply, RespClient,
    GUEST_IP, GUEST_MAC,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A zeroed disk image and a console file in a scratch directory, removed on drop.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("ftvm-kv-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let disk = std::fs::File::create(dir.join("kv.img")).expect("disk image");
        disk.set_len(16 << 20).expect("size disk image");
        Files { dir }
    }
    fn disk(&self) -> PathBuf {
        self.dir.join("kv.img")
    }
    fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Starts the kv guest in `ns` on `disk` and waits until it answers PING.
fn start_kv(ns: &mut NetNs, files: &Files) -> u32 {
    require_kvm();
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .arg("--console")
        .arg(files.console())
        .arg("--disk")
        .arg(files.disk())
        .arg("--image")
        .arg(guest("kv"));
    let pid = ns.spawn(&mut command);
    assert!(
        wait_for_pong(ns, Duration::from_secs(30)),
        "the kv guest did not answer PING within 30 s; console:\n{}",
        std::fs::read_to_string(files.console()).unwrap_or_default()
    );
    pid
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn redis_cli_commands_work_against_the_kv_guest() {
    let files = Files::new("cli");
    let mut ns = NetNs::with_tap("kvcli");
    start_kv(&mut ns, &files);
    assert_eq!(redis_cli(&ns, &["PING"]), "PONG");
    assert_eq!(redis_cli(&ns, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(redis_cli(&ns, &["GET", "greeting"]), "hello world");
    assert_eq!(redis_cli(&ns, &["GET", "missing"]), "");
    assert_eq!(redis_cli(&ns, &["INCR", "counter"]), "1");
    assert_eq!(redis_cli(&ns, &["INCR", "counter"]), "2");
    assert_eq!(redis_cli(&ns, &["EXISTS", "greeting"]), "1");
    assert_eq!(redis_cli(&ns, &["EXISTS", "missing"]), "0");
    assert_eq!(redis_cli(&ns, &["DBSIZE"]), "2");
    assert_eq!(redis_cli(&ns, &["DEL", "greeting"]), "1");
    assert_eq!(redis_cli(&ns, &["EXISTS", "greeting"]), "0");
    assert!(
        redis_cli(&ns, &["INCR", "nonsense", "extra"]).contains("ERR"),
        "wrong arity is an error"
    );
    // The guest answered over the real TAP: ping works too.
    ns.exec_ok(&["ping", "-c", "1", "-W", "2", GUEST_IP]);
}

/// A checker writes keys one at a time and remembers every write the guest acknowledged;
/// the VM is killed with SIGKILL in the middle of it, restarted on the same disk, and
/// every acknowledged write must be there.
#[test]
fn every_acknowledged_write_survives_kill_and_restart() {
    let files = Files::new("durable");
    let mut ns = NetNs::with_tap("kvdur");
    let pid = start_kv(&mut ns, &files);
    let name = ns.name.clone();
    let writer = std::thread::spawn(move || {
        in_netns(&name, || {
            let mut acked = Vec::new();
            let Ok(mut client) =
                RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(5))
            else {
                return acked;
            };
            for i in 0..100_000u32 {
                let (key, value) = (
                    format!("key:{i}"),
                    format!("value:{i}:{}", "x".repeat(i as usize % 300)),
                );
                match client.call(&[b"SET", key.as_bytes(), value.as_bytes()]) {
                    Ok(Reply::Status(status)) if status == "OK" => acked.push((key, value)),
                    _ => break,
                }
            }
            acked
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    ns.kill(pid);
    let acked = writer.join().expect("writer thread");
    assert!(
        acked.len() > 10,
        "only {} writes acknowledged before the kill",
        acked.len()
    );

    start_kv(&mut ns, &files);
    let name = ns.name.clone();
    let expected = acked.clone();
    let missing = in_netns(&name, move || {
        let mut client = RespClient::connect(&format!("{GUEST_IP}:6379"), Duration::from_secs(5))
            .expect("connect");
        expected
            .into_iter()
            .filter(|(key, value)| {
                client.call(&[b"GET", key.as_bytes()]).ok()
                    != Some(Reply::Bulk(Some(value.as_bytes().to_vec())))
            })
            .map(|(key, _)| key)
            .collect::<Vec<_>>()
    });
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}; console:\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        console(&files.console())
    );
    assert!(
        console(&files.console()).contains("kv: replayed"),
        "{}",
        console(&files.console())
    );
}

#[test]
fn redis_benchmark_runs_against_the_kv_guest() {
    let files = Files::new("bench");
    let mut ns = NetNs::with_tap("kvbench");
    start_kv(&mut ns, &files);
    let ran = run(ns.command("redis-benchmark").args([
        "-h",
        GUEST_IP,
        "-p",
        "6379",
        "-t",
        "ping,set,get,incr",
        "-n",
        "2000",
        "-c",
        "16",
        "-q",
    ]));
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let rates = ran
        .stdout
        .lines()
        .filter(|line| line.contains("requests per second"))
        .count();
    // PING_INLINE, PING_MBULK, SET, GET, INCR.
    assert!(rates >= 4, "{ran:?}");
}

/// Records a kv session under concurrent redis-benchmark traffic with randomly paced
/// redis-cli commands, ends it with SHUTDOWN (so the log has an end frame), and replays
/// the log ten times: every replay must be identical.
#[test]
fn kv_session_under_load_replays_identically_ten_times() {
    let files = Files::new("replay");
    let log = files.dir.join("kv.ftlog");
    let mut ns = NetNs::with_tap("kvrep");
    require_kvm();
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--ip", &format!("{GUEST_IP}/24")])
        .args(["--digest-every", "64", "--mem-digest-every", "256"])
        .arg("--console")
        .arg(files.console())
        .arg("--disk")
        .arg(files.disk())
        .arg("--record")
        .arg(&log)
        .arg("--image")
        .arg(guest("kv"));
    let pid = ns.spawn(&mut command);
    assert!(
        wait_for_pong(&ns, Duration::from_secs(30)),
        "kv did not start"
    );
    let mut benchmark = ns
        .command("redis-benchmark")
        .args([
            "-h",
            GUEST_IP,
            "-t",
            "set,get,incr",
            "-n",
            "3000",
            "-c",
            "8",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis-benchmark");
    let mut pace: u64 = std::process::id() as u64 | 1;
    eprintln!("random pacing seed {pace}");
    for i in 0..20 {
        pace = pace
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(pace >> 58));
        assert_eq!(
            redis_cli(&ns, &["SET", &format!("paced:{i}"), &i.to_string()]),
            "OK"
        );
    }
    assert!(
        ftvm_tests::wait_child(&mut benchmark, ftvm_tests::EXIT_PATIENCE, "redis-benchmark")
            .success()
    );
    // SHUTDOWN makes the guest power off (code 0) once every write is durable.
    let _ = run(ns.command("redis-cli").args(["-h", GUEST_IP, "SHUTDOWN"]));
    assert_eq!(
        ns.wait(pid),
        Some(0),
        "kv did not power off; console:\n{}",
        console(&files.console())
    );

    for round in 0..10 {
        let ran = run(std::process::Command::new(binary("ftvmm"))
            .args([
                "replay",
                "--digest-every",
                "64",
                "--mem-digest-every",
                "256",
            ])
            .arg("--image")
            .arg(guest("kv"))
            .arg("--log")
            .arg(&log));
        assert_eq!(ran.code, Some(0), "replay {round}: {ran:?}");
        assert!(ran.stderr.contains("IDENTICAL"), "replay {round}: {ran:?}");
    }
}
