//! `cargo xtask bench clone`: cloning a running replica into a new backup (release
//! build): the primary's pause, the whole clone's time, bytes sent against guest RAM, for
//! the hello guest idle (its timer loop), the hello guest with 900 MiB of its 1 GiB in use
//! and being rewritten (a full working set), and the kv guest under redis-benchmark SET
//! traffic, at 128 MiB and 1 GiB; kv req/s before and during the clone; the clone's time
//! against what its bytes take at the link's measured throughput.

use crate::util::Failure;
use ftvm_tests::{wait_for_pong, NetNs, GUEST_IP, GUEST_MAC};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Trials per case.
const TRIALS: usize = 3;
/// SET requests per redis-benchmark run.
const REQUESTS: u32 = 30_000;
/// hello's timer loop: 60 s of 1 ms ticks, longer than any trial (the trial kills it).
const HELLO: &str = "ticks=60000 tick_us=1000 work=1";
/// The full working set: MiB hello writes before its ticks (of 1 GiB).
const TOUCH_MB: u64 = 900;
/// Bytes sent through the loopback link to measure its throughput.
const LINK_PROBE_BYTES: usize = 1 << 30;

/// What the primary's `clone: backup cloned ...` line and the benchmark said.
#[derive(Default, Clone)]
struct Trial {
    pause_ms: f64,
    clone_ms: f64,
    bytes: u64,
    rounds: u64,
    round_pages: String,
    final_pages: u64,
    /// The pause's parts as the line gives them: `state .., final pass .., confirmation ..`.
    parts: String,
    /// kv only: SET req/s of a run before the clone (alone), and of the run the clone
    /// happened in (alone, the clone, then as a pair with the output rule).
    rps: Option<(f64, f64)>,
}

/// The number after `key` in `line` (`"pause 12.5 ms"` with key `"pause "`).
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split([' ', ','])
        .next()
        .and_then(|word| word.parse().ok())
}

/// Reads the primary's clone line.
fn parse(line: &str) -> Option<Trial> {
    let pages = line.split("rounds ").nth(1)?;
    Some(Trial {
        pause_ms: number_after(line, "pause ")?,
        clone_ms: number_after(line, "clone ")?,
        bytes: line
            .strip_suffix(" bytes")?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?,
        rounds: number_after(line, "pre-copy ")? as u64,
        round_pages: pages.split(" pages").next()?.to_owned(),
        final_pages: number_after(line, "), final ")? as u64,
        parts: line.split(" ms (").nth(1)?.split(')').next()?.to_owned(),
        rps: None,
    })
}

/// Waits up to `patience` for the clone line in the primary's log at `log`.
fn clone_line(log: &Path, patience: Duration) -> Result<Trial, Failure> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|line| line.contains("backup cloned at")) {
            return parse(line).ok_or_else(|| Failure::new(format!("cannot read {line}")));
        }
        if text.contains("ftvmm: ") {
            return Err(Failure::new(format!("the primary failed: {text}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Failure::new(format!(
        "no clone within {patience:?}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    )))
}

struct Setup {
    ftvmm: PathBuf,
    hello: PathBuf,
    kv: PathBuf,
    dir: PathBuf,
}

/// `ftvmm run` of `image` as a replica of VM `vm`, stderr to `log` in the scratch dir
/// (the caller says where the console goes).
fn replica(
    setup: &Setup,
    mut command: Command,
    image: &Path,
    mem: &str,
    vm: &str,
    generation: u64,
    log: &str,
) -> Result<Command, Failure> {
    let log = std::fs::File::create(setup.dir.join(log))
        .map_err(|err| Failure::new(format!("log file: {err}")))?;
    command
        .args(["run", "--mem", mem, "--image"])
        .arg(image)
        .args(["--vm", vm, "--generation", &generation.to_string()])
        .args(ftvm_tests::replica_tls())
        .arg("--arbiter")
        .arg(format!("local:{}", setup.dir.join("arbiter").display()))
        .stdout(Stdio::null())
        .stderr(log);
    Ok(command)
}

fn spawn(command: &mut Command) -> Result<std::process::Child, Failure> {
    command
        .spawn()
        .map_err(|err| Failure::new(format!("cannot start ftvmm: {err}")))
}

/// hello, idle in its timer loop, cloned once.
fn hello_trial(setup: &Setup, mem: &str, trial: usize) -> Result<Trial, Failure> {
    hello_clone(setup, mem, trial, HELLO)
}

/// hello with [`TOUCH_MB`] MiB in use, rewriting 16 pages a tick (64 MiB/s), cloned once.
fn hello_full_slow(setup: &Setup, mem: &str, trial: usize) -> Result<Trial, Failure> {
    hello_clone(
        setup,
        mem,
        trial,
        &format!("{HELLO} touch_mb={TOUCH_MB} dirty_pages=16"),
    )
}

/// hello with [`TOUCH_MB`] MiB in use, rewriting 64 pages a tick (256 MiB/s), cloned once.
fn hello_full_fast(setup: &Setup, mem: &str, trial: usize) -> Result<Trial, Failure> {
    hello_clone(
        setup,
        mem,
        trial,
        &format!("{HELLO} touch_mb={TOUCH_MB} dirty_pages=64"),
    )
}

/// Waits up to `patience` for `line` on the console written to `console`.
fn wait_for_console(console: &Path, line: &str, patience: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if std::fs::read_to_string(console).is_ok_and(|text| text.contains(line)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Failure::new(format!(
        "no '{line}' on the console within {patience:?}: {}",
        std::fs::read_to_string(console).unwrap_or_default()
    )))
}

/// hello run with `cmdline`, cloned once its start is over (its working set touched).
fn hello_clone(setup: &Setup, mem: &str, trial: usize, cmdline: &str) -> Result<Trial, Failure> {
    let port = ftvm_tests::free_port();
    let vm = format!("hello-{}-{trial}", mem.to_lowercase());
    let addr = format!("127.0.0.1:{port}");
    let console = setup.dir.join("hello-a.console");
    std::fs::remove_file(&console).ok();
    let mut primary = replica(
        setup,
        Command::new(&setup.ftvmm),
        &setup.hello,
        mem,
        &vm,
        1,
        "hello-a.err",
    )?;
    let mut primary = spawn(
        primary
            .args(["--cmdline", cmdline, "--clone-listen", &addr])
            .arg("--console")
            .arg(&console),
    )?;
    // The greeting's last line before the ticks, then a little of the ticks.
    let started = if cmdline.contains("touch_mb") {
        "touched:"
    } else {
        "clock:"
    };
    if let Err(failure) = wait_for_console(&console, started, Duration::from_secs(60)) {
        let _ = primary.kill();
        let _ = primary.wait();
        return Err(failure);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut backup = replica(
        setup,
        Command::new(&setup.ftvmm),
        &setup.hello,
        mem,
        &vm,
        2,
        "hello-b.err",
    )?;
    let mut backup = spawn(backup.args([
        "--console",
        "none",
        "--cmdline",
        cmdline,
        "--role",
        "backup",
        "--clone-from",
        &addr,
    ]))?;
    let result = clone_line(&setup.dir.join("hello-a.err"), Duration::from_secs(60));
    for child in [&mut primary, &mut backup] {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// A redis-benchmark SET run against the kv guest, started.
pub(crate) fn start_benchmark(ns: &NetNs) -> Result<std::process::Child, Failure> {
    ns.command("redis-benchmark")
        .args(["-h", GUEST_IP, "-t", "set", "-c", "4", "--csv", "-n"])
        .arg(REQUESTS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))
}

/// The SET req/s of a run `start_benchmark` started, once it is over.
pub(crate) fn rps(run: std::process::Child) -> Result<f64, Failure> {
    let out = run
        .wait_with_output()
        .map_err(|err| Failure::new(format!("redis-benchmark: {err}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps",...: the second line's second cell.
    text.lines()
        .nth(1)
        .and_then(|line| line.split(',').nth(1))
        .and_then(|cell| cell.trim_matches('"').parse().ok())
        .ok_or_else(|| Failure::new(format!("no figures from redis-benchmark: {text}")))
}

/// kv alone under redis-benchmark SET traffic, cloned once while a run is under way.
fn kv_trial(setup: &Setup, mem: &str, trial: usize) -> Result<Trial, Failure> {
    let disk = setup.dir.join("kv.img");
    std::fs::File::create(&disk)
        .and_then(|file| file.set_len(64 << 20))
        .map_err(|err| Failure::new(format!("disk image: {err}")))?;
    let mut ns = NetNs::with_bridged_taps(&format!("bcl{trial}"), &["tap-a", "tap-b"]);
    let vm = format!("kv-{}-{trial}", mem.to_lowercase());
    let addr = "127.0.0.1:7702";
    let kv = |ns: &NetNs, tap: &str, generation: u64, log: &str| {
        let mut command = replica(
            setup,
            ns.command(&setup.ftvmm),
            &setup.kv,
            mem,
            &vm,
            generation,
            log,
        )?;
        command
            .args(["--console", "none"])
            .args(["--mac", GUEST_MAC, "--tap", tap])
            .args(["--ip", &format!("{GUEST_IP}/24")])
            .arg("--disk")
            .arg(&disk);
        Ok::<_, Failure>(command)
    };
    let mut primary = kv(&ns, "tap-a", 1, "kv-a.err")?;
    ns.spawn(primary.args(["--clone-listen", addr]));
    if !wait_for_pong(&ns, Duration::from_secs(30)) {
        return Err(Failure::new("the kv guest did not answer PING"));
    }
    let before = rps(start_benchmark(&ns)?)?;
    // The clone starts a little after the benchmark run and is over well before its end.
    let run = start_benchmark(&ns)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut backup = kv(&ns, "tap-b", 2, "kv-b.err")?;
    ns.spawn(backup.args(["--role", "backup", "--clone-from", addr]));
    let mut trial = clone_line(&setup.dir.join("kv-a.err"), Duration::from_secs(60))?;
    trial.rps = Some((before, rps(run)?));
    Ok(trial)
}

/// The loopback link's TCP throughput in bytes/s: [`LINK_PROBE_BYTES`] through one
/// plain connection (what a clone's stream could get at best between these two ends).
pub(crate) fn link_throughput() -> Result<f64, Failure> {
    probe_link(false)
}

/// [`link_throughput`] through a connection with the replicas' mutual TLS (the clone
/// stream's own transport, with this host's cores doing the cipher).
pub(crate) fn tls_link_throughput() -> Result<f64, Failure> {
    probe_link(true)
}

/// [`LINK_PROBE_BYTES`] from one thread to another over loopback, in plaintext or TLS.
fn probe_link(tls: bool) -> Result<f64, Failure> {
    use ftvm_tls::{Socket, TlsSide};
    use std::io::{Read, Write};
    let failed = |err: &dyn std::fmt::Display| Failure::new(format!("link probe: {err}"));
    let secure = move |tcp: std::net::TcpStream, server: bool| -> Result<Socket, String> {
        if !tls {
            return Ok(Socket::plain(tcp));
        }
        let credentials = ftvm_tls::TlsFiles::in_dir(&ftvm_tests::test_pki().host("test"))
            .load()
            .map_err(|err| err.to_string())?;
        let side = if server {
            TlsSide::Server(credentials.server_config().map_err(|err| err.to_string())?)
        } else {
            TlsSide::Client(credentials.client_config().map_err(|err| err.to_string())?)
        };
        Socket::handshake(tcp, side, Duration::from_secs(5)).map_err(|err| err.to_string())
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| failed(&e))?;
    let addr = listener.local_addr().map_err(|e| failed(&e))?;
    let reader = std::thread::spawn(move || -> Result<usize, String> {
        let (tcp, _) = listener.accept().map_err(|err| err.to_string())?;
        let mut socket = secure(tcp, true)?;
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            match socket.read(&mut buffer).map_err(|err| err.to_string())? {
                0 => return Ok(total),
                read => total += read,
            }
        }
    });
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| failed(&e))?;
    let mut socket = secure(tcp, false).map_err(|e| failed(&e))?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..LINK_PROBE_BYTES / chunk.len() {
        socket.write_all(&chunk).map_err(|e| failed(&e))?;
    }
    socket
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| failed(&e))?;
    let received = reader
        .join()
        .map_err(|_| Failure::new("link probe: the reader panicked"))?
        .map_err(|e| failed(&e))?;
    let took = started.elapsed().as_secs_f64();
    if received != LINK_PROBE_BYTES {
        return Err(Failure::new(format!(
            "link probe: {received} of {LINK_PROBE_BYTES} bytes arrived"
        )));
    }
    Ok(received as f64 / took)
}

/// Minimum, median and maximum of `values`, to one decimal.
pub(crate) fn spread(values: Vec<f64>) -> String {
    spread_to(values, 1)
}

/// Minimum, median and maximum of `values`, to `decimals` decimals.
pub(crate) fn spread_to(mut values: Vec<f64>, decimals: usize) -> String {
    values.sort_by(f64::total_cmp);
    match values.as_slice() {
        [] => "-".into(),
        [one] => format!("{one:.decimals$}"),
        _ => format!(
            "{:.decimals$}/{:.decimals$}/{:.decimals$}",
            values[0],
            values[values.len() / 2],
            values[values.len() - 1]
        ),
    }
}

/// How many times longer a clone of `bytes` took (`clone_ms`) than those bytes take at
/// the link's throughput `link` (bytes/s).
pub(crate) fn versus_link(clone_ms: f64, bytes: u64, link: f64) -> f64 {
    clone_ms / (bytes as f64 / link * 1000.0)
}

/// Runs every case and prints a table (min/median/max over the trials).
pub fn clone() -> Result<(), Failure> {
    let (ftvmm, kv) = crate::release_paths()?;
    let hello = kv.with_file_name("hello.elf");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-clone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|err| Failure::new(format!("scratch dir: {err}")))?;
    let setup = Setup {
        ftvmm,
        hello,
        kv,
        dir,
    };
    println!("clone of a running replica into a new backup (release build, {TRIALS} trials, min/median/max)");
    let link = link_throughput()?;
    let tls_link = tls_link_throughput()?;
    println!(
        "link: loopback TCP, one connection, {:.0} MB/s measured, {:.0} MB/s with the replicas' TLS ({} MiB sent each); the clone's stream is TLS",
        link / 1e6,
        tls_link / 1e6,
        LINK_PROBE_BYTES >> 20
    );
    println!(
        "{:<32} {:>6} {:>16} {:>18} {:>12} {:>15} {:>15} {:>7} {:>22} {:>22}",
        "case",
        "RAM",
        "pause ms",
        "clone ms",
        "bytes (med)",
        "clone / link",
        "/ TLS link",
        "rounds",
        "pages per round",
        "kv SET req/s alone / clone run"
    );
    type TrialFn = fn(&Setup, &str, usize) -> Result<Trial, Failure>;
    let cases: [(&str, &str, TrialFn); 6] = [
        ("hello idle (timer loop)", "128M", hello_trial),
        ("hello idle (timer loop)", "1G", hello_trial),
        ("hello 900M in use, 64 MiB/s written", "1G", hello_full_slow),
        (
            "hello 900M in use, 256 MiB/s written",
            "1G",
            hello_full_fast,
        ),
        ("kv under redis SET", "128M", kv_trial),
        ("kv under redis SET", "1G", kv_trial),
    ];
    for (name, mem, run) in cases {
        let mut trials = Vec::new();
        for trial in 0..TRIALS {
            trials.push(run(&setup, mem, trial)?);
        }
        let median = |f: fn(&Trial) -> f64| spread(trials.iter().map(f).collect());
        let mut bytes: Vec<u64> = trials.iter().map(|t| t.bytes).collect();
        bytes.sort_unstable();
        let rounds: Vec<String> = trials
            .iter()
            .map(|t| {
                format!(
                    "{}:{}+{} pause {:.1} ({})",
                    t.rounds, t.round_pages, t.final_pages, t.pause_ms, t.parts
                )
            })
            .collect();
        let rps = match trials.iter().map(|t| t.rps).collect::<Option<Vec<_>>>() {
            Some(rps) => format!(
                "{} / {}",
                spread(rps.iter().map(|r| r.0).collect()),
                spread(rps.iter().map(|r| r.1).collect())
            ),
            None => "-".into(),
        };
        // How much longer than its bytes take at the link's throughput each clone took.
        let versus = |link: f64| {
            spread(
                trials
                    .iter()
                    .map(|t| versus_link(t.clone_ms, t.bytes, link))
                    .collect(),
            )
        };
        println!(
            "{name:<32} {mem:>6} {:>16} {:>18} {:>12} {:>15} {:>15} {:>7} {:>22} {rps:>22}",
            median(|t| t.pause_ms),
            median(|t| t.clone_ms),
            bytes[bytes.len() / 2],
            versus(link),
            versus(tls_link),
            trials[0].rounds,
            trials[0].round_pages,
        );
        for line in rounds {
            println!("    rounds:[pages per round]+final pages, pause ms (parts): {line}");
        }
    }
    std::fs::remove_dir_all(&setup.dir).ok();
    Ok(())
}
