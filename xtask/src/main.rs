//! `cargo xtask`: the project's tasks, in Rust so they run wherever cargo does.
//!
//! ```text
//! cargo xtask setup          install the Debian packages builds and tests need
//! cargo xtask guest          build the sample guests into target/guest/
//! cargo xtask test           setup + fmt + clippy + build + guests + every test
//! cargo xtask bench exits    exit-path cost of ftvmm vs a bare KVM_RUN loop
//! cargo xtask bench control  the control plane: create-to-Protected, status latency, RSS, leader failover
//! cargo xtask bench clone    cloning a running replica: pause, clone time, bytes (128 MiB, 1 GiB)
//! cargo xtask bench disk     private vs shared disks: log bytes per read and request, 8 GiB clones
//! cargo xtask demo           a 3-host cluster, an FT VM, a client, a host killed: a timeline
//! cargo xtask chaos          that cluster under random faults: nothing lost, never two live
//! cargo xtask fuzz           the fuzz targets under libFuzzer (cargo-fuzz), for long runs
//! ```

mod bench;
mod bench_clone;
mod bench_control;
mod bench_disk;
mod bench_failover;
mod bench_ft;
mod bench_kv;
mod bench_mutate;
mod chaos;
mod fuzz;
mod soak;
mod util;

use ftvm_tests::cluster::Binaries;
use std::path::PathBuf;
use std::process::ExitCode;
use util::{cargo, project_root, run, Failure};

/// Debian packages the builds and tests need (`dpkg -s` decides what is missing).
const PACKAGES: &[&str] = &[
    "build-essential",
    "iproute2",
    "redis-tools",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // protoc's well-known types (google/protobuf/*.proto): etcd-client's build needs them.
    "libprotobuf-dev",
    // tests/kv.rs checks the guest answers ICMP echo with a real ping.
    "iputils-ping",
    // The partition tests (tests/hosts.rs) cut a log channel with iptables in a namespace.
    "iptables",
    // promtool checks and tests the alert rules in deploy/prometheus (tests/deploy.rs).
    "prometheus",
    // `cargo xtask package` checks the Debian packages it builds (tests/deploy.rs too).
    "lintian",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["setup"] => setup(),
        ["guest"] => build_guests(),
        ["test"] => test(),
        ["bench", "exits"] => bench::exits(),
        ["bench", "kv"] => bench_kv::kv(),
        ["bench", "record"] => bench_kv::record(),
        ["bench", "ft"] => bench_ft::ft(bench_ft::Parts::All),
        ["bench", "failover", rest @ ..] => failover_task(rest),
        ["bench", "mutate", rest @ ..] => mutate_task(rest),
        ["bench", "control"] => bench_control::control(),
        ["bench", "clone"] => bench_clone::clone(),
        ["bench", "disk"] => bench_disk::disk(),
        ["bench", "switchover"] => bench_switchover(),
        ["package"] => package(),
        ["demo"] => demo(),
        ["chaos", rest @ ..] => chaos_task(rest),
        ["soak", "replay", rest @ ..] => soak_task(rest),
        ["fuzz", rest @ ..] => fuzz_task(rest),
        ["help" | "--help" | "-h"] | [] => {
            println!("{}", USAGE);
            Ok(())
        }
        _ => Err(Failure::new(format!(
            "unknown task '{}'\n{USAGE}",
            words.join(" ")
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("xtask: {failure}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <task>
  setup          install the Debian packages builds and tests need (apt-get)
  guest          build the sample guests into target/guest/
  test           setup, fmt and clippy checks, build, guests, every test, and a short
                 chaos run (every fault kind once, fixed seed)
  bench exits    PIO/MMIO/HLT round trips: ftvmm vs a bare KVM_RUN loop, start-up, RSS
  bench kv       the kv guest under redis-benchmark: req/s, p50/p99, exits and irqs per request
  bench record   kv with vs without recording, log bytes/request, idle log rate, replay time
  bench ft       kv as an FT pair vs alone, then the failover rows of `bench failover`
  bench failover [--trials N] [--fault kill|host-death]
                 a client across the primary's SIGKILL and its host's death (20 trials
                 each, idle and busy client; acknowledged writes read back)
  bench mutate [--mutations N] [--seed S]
                 one bit flipped in one valid frame of recorded logs (hello, kv; default and
                 per-exit digests), each replayed: DIVERGED (exits until noticed), refused
                 or IDENTICAL, by frame kind
  bench control  3 ftds: create-to-Protected, ftctl status latency, ftd RSS, leader failover
  bench clone    clone a running replica: pause, clone ms, bytes vs RAM (hello idle, kv under SET)
  bench disk     private disks vs a shared disk: log bytes per disk read and per request
                 (kv booting on a long log, GET and SET loads); clones of kv with a private
                 8 GiB disk, mostly unwritten and with 1 GiB written: pause, time vs link
  bench switchover
                 20 planned switchovers of the kv VM under a client on one connection:
                 the client's pause and the time to Protected again, p50/max; 0 lost
  chaos [--trials N] [--seed S]
                 the demo's cluster under a random fault per trial (kills, freezes, cut
                 links, host deaths, etcd down); checks nothing acknowledged is lost and
                 no two replicas were ever live; times per fault kind
  demo           3 hosts (namespaces) with ftd, ftctl create of an FT kv VM, a client,
                 the primary's host killed: a timeline
  soak replay [--minutes N] [--exits E]
                 determinism over long runs: the kv guest recorded N minutes (default 10)
                 under a mixed redis-benchmark load, and the sample guests (their loops
                 sized to reach E exits in all), each replayed; every replay must be
                 IDENTICAL; prints exits, log bytes, replay/record time
  package        Debian packages ftd (ftd, ftvmm, unit, config, man pages, completions)
                 and ftctl from the release build, into target/package; checked by lintian
  fuzz [--seconds N] [TARGET...]
                 each fuzz target (all by default) N seconds (default 60) under libFuzzer's
                 coverage guidance; installs cargo-fuzz if missing; prints executions,
                 coverage, corpus size and findings (corpora kept in target/fuzz/)";

/// Checks the toolchain and the devices, installs missing Debian packages (needs root and
/// the Debian package registry). One line for each thing checked.
pub(crate) fn setup() -> Result<(), Failure> {
    check_toolchain()?;
    for (device, needed_for) in [
        ("/dev/kvm", "every VM and most tests"),
        ("/dev/net/tun", "the guests' NICs (TAP devices)"),
    ] {
        if std::path::Path::new(device).exists() {
            println!("xtask: {device}: present");
        } else {
            println!("xtask: {device}: MISSING: {needed_for} need it (the tests that need it will fail, saying so)");
        }
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !std::process::Command::new("dpkg")
                .args(["-s", package])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    if missing.is_empty() {
        println!("xtask: Debian packages: all {} present", PACKAGES.len());
        return Ok(());
    }
    println!(
        "xtask: Debian packages missing: {}: installing",
        missing.join(" ")
    );
    run(std::process::Command::new("apt-get")
        .arg("update")
        .arg("-q"))?;
    run(std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Fails with what to do unless the rustc cargo uses is at least the workspace's
/// `rust-version` (Debian 12's own rustc is far older: use rustup).
fn check_toolchain() -> Result<(), Failure> {
    let manifest = std::fs::read_to_string(project_root().join("Cargo.toml"))
        .map_err(|err| Failure::new(format!("cannot read Cargo.toml: {err}")))?;
    let needed = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("rust-version = "))
        .map(|version| version.trim_matches('"').to_owned())
        .ok_or_else(|| Failure::new("Cargo.toml names no rust-version"))?;
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = util::output(std::process::Command::new(&rustc).arg("--version"))?;
    let found = version.split_whitespace().nth(1).unwrap_or("").to_owned();
    let numbers = |text: &str| -> Vec<u32> {
        text.split(['.', '-'])
            .map_while(|part| part.parse().ok())
            .collect()
    };
    if numbers(&found) < numbers(&needed) {
        return Err(Failure::new(format!(
            "rustc {found} is older than {needed}, which this workspace needs: install Rust with rustup (https://rustup.rs), then `rustup default stable`"
        )));
    }
    println!("xtask: rustc {found}: ok (needs {needed} or newer)");
    Ok(())
}

/// Installs, builds the guests and the release binaries of `packages`; returns the
/// release directory and the kv guest image.
fn release_build(packages: &[&str]) -> Result<(PathBuf, PathBuf), Failure> {
    setup()?;
    build_guests()?;
    let root = project_root();
    let mut command = cargo();
    command
        .current_dir(&root)
        .args(["build", "--release", "--quiet"]);
    for package in packages {
        command.args(["-p", package]);
    }
    run(&mut command)?;
    Ok((
        root.join("target/release"),
        root.join("target/guest/kv.elf"),
    ))
}

/// Installs, builds the guests and a release ftvmm; returns the ftvmm binary and the kv
/// guest image (what the kv benchmarks run).
pub(crate) fn release_paths() -> Result<(PathBuf, PathBuf), Failure> {
    let (release, kv) = release_build(&["ftvmm"])?;
    Ok((release.join("ftvmm"), kv))
}

/// Installs, builds the guests and release ftvmm, ftd and ftctl (what a cluster runs);
/// returns them and the kv guest image.
pub(crate) fn cluster_binaries() -> Result<(Binaries, PathBuf), Failure> {
    let (release, kv) = release_build(&["ftvmm", "ftd", "ftctl"])?;
    Ok((
        Binaries {
            ftvmm: release.join("ftvmm"),
            ftd: release.join("ftd"),
            ftctl: release.join("ftctl"),
        },
        kv,
    ))
}

/// `cargo xtask package`: the Debian packages from the release build, checked by lintian.
fn package() -> Result<(), Failure> {
    let (bins, _) = cluster_binaries()?;
    let bin_dir = bins
        .ftd
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| Failure::new("no release directory"))?;
    let out = project_root().join("target/package");
    let packages = ftvm_tests::package::build(&bin_dir, &out).map_err(Failure::new)?;
    for deb in [&packages.ftd, &packages.ftctl] {
        let lintian = std::process::Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(deb)
            .output()
            .map_err(|err| Failure::new(format!("lintian (package lintian): {err}")))?;
        print!("{}", String::from_utf8_lossy(&lintian.stdout));
        if !lintian.status.success() {
            return Err(Failure::new(format!(
                "lintian found errors in {}",
                deb.display()
            )));
        }
        println!("{}: lintian shows no errors", deb.display());
    }
    Ok(())
}

/// The README's first command: builds in release, then runs the demo
/// (`ftvm_tests::demo`): a 3-host cluster, an FT kv VM, a client, a host death.
fn demo() -> Result<(), Failure> {
    let (bins, kv) = cluster_binaries()?;
    ftvm_tests::demo::run(bins, &kv, "demo").map(|_| ())
}

/// `cargo xtask bench switchover`: release binaries, 20 switchovers under a client.
fn bench_switchover() -> Result<(), Failure> {
    const TRIALS: usize = 20;
    let (bins, kv) = cluster_binaries()?;
    let report = ftvm_tests::switchover::run(bins, &kv, "swb", TRIALS)?;
    if !report.lost.is_empty() || report.failovers != 0 {
        return Err(Failure::new(format!(
            "switchovers lost {} acknowledged writes and counted {} failovers: {:?}",
            report.lost.len(),
            report.failovers,
            report.lost
        )));
    }
    let summary = |what: &str, times: &[std::time::Duration]| {
        let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let p50 = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
        let max = ms.last().copied().unwrap_or(0.0);
        println!(
            "{what:<40} p50 {p50:>7.1} ms   max {max:>7.1} ms   ({} trials)",
            ms.len()
        );
    };
    println!();
    summary("client pause (longest write)", &report.pauses);
    summary(
        "ftctl switchover -> Protected again",
        &report.protected_again,
    );
    println!(
        "acknowledged writes {} over one connection, lost {}, failovers counted {}",
        report.acked,
        report.lost.len(),
        report.failovers
    );
    Ok(())
}

/// `cargo xtask chaos [--trials N] [--seed S]`: release binaries, random faults.
/// The `--flag value` pairs of a task's arguments; a flag without its value is an error.
fn flag_values<'a>(args: &[&'a str]) -> Result<Vec<(&'a str, &'a str)>, Failure> {
    args.chunks(2)
        .map(|pair| match pair {
            [flag, value] => Ok((*flag, *value)),
            _ => Err(Failure::new(format!("{} needs a value\n{USAGE}", pair[0]))),
        })
        .collect()
}

fn chaos_task(args: &[&str]) -> Result<(), Failure> {
    let mut trials = 20u32;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    for (word, value) in flag_values(args)? {
        let number = value
            .parse::<u64>()
            .map_err(|_| Failure::new(format!("{word} {value}: not a number\n{USAGE}")))?;
        match word {
            "--trials" => {
                trials = u32::try_from(number)
                    .map_err(|_| Failure::new(format!("--trials {value}: too many")))?
            }
            "--seed" => seed = number,
            other => return Err(Failure::new(format!("unknown chaos flag {other}\n{USAGE}"))),
        }
    }
    let (bins, kv) = cluster_binaries()?;
    chaos::chaos(bins, &kv, trials, seed, chaos::Pick::Random)
}

fn failover_task(args: &[&str]) -> Result<(), Failure> {
    let mut options = bench_failover::Options::default();
    for (word, value) in flag_values(args)? {
        match word {
            "--trials" => {
                options.trials = value
                    .parse::<usize>()
                    .ok()
                    .filter(|trials| *trials > 0)
                    .ok_or_else(|| Failure::new(format!("--trials {value}: not a count")))?
            }
            "--fault" => {
                options.faults = match value {
                    "kill" => vec![bench_failover::Fault::Kill],
                    "host-death" => vec![bench_failover::Fault::HostDeath],
                    other => {
                        return Err(Failure::new(format!(
                            "--fault {other}: kill or host-death\n{USAGE}"
                        )))
                    }
                }
            }
            other => {
                return Err(Failure::new(format!(
                    "unknown bench failover flag {other}\n{USAGE}"
                )))
            }
        }
    }
    bench_ft::ft(bench_ft::Parts::Failover(options))
}

fn mutate_task(args: &[&str]) -> Result<(), Failure> {
    let mut options = bench_mutate::Options::default();
    for (word, value) in flag_values(args)? {
        let number = value
            .parse::<u64>()
            .ok()
            .filter(|number| *number > 0)
            .ok_or_else(|| Failure::new(format!("{word} {value}: not a positive number")))?;
        match word {
            "--mutations" => options.mutations = number as usize,
            "--seed" => options.seed = number,
            other => {
                return Err(Failure::new(format!(
                    "unknown bench mutate flag {other}\n{USAGE}"
                )))
            }
        }
    }
    bench_mutate::mutate_bench(&options)
}

fn soak_task(args: &[&str]) -> Result<(), Failure> {
    let mut minutes = 10;
    let mut at_least = None;
    for (word, value) in flag_values(args)? {
        let number = value.parse::<u64>().ok();
        match word {
            "--minutes" => {
                minutes = number
                    .filter(|minutes| (1..=600).contains(minutes))
                    .ok_or_else(|| Failure::new(format!("--minutes {value}: 1 to 600\n{USAGE}")))?
            }
            "--exits" => {
                at_least = Some(number.filter(|exits| *exits > 0).ok_or_else(|| {
                    Failure::new(format!("--exits {value}: a positive count\n{USAGE}"))
                })?)
            }
            other => {
                return Err(Failure::new(format!(
                    "unknown soak replay flag {other}\n{USAGE}"
                )))
            }
        }
    }
    soak::replay_soak(minutes, at_least)
}

fn fuzz_task(args: &[&str]) -> Result<(), Failure> {
    let mut seconds = 60u64;
    let mut targets = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if *word == "--seconds" {
            let value = words
                .next()
                .ok_or_else(|| Failure::new(format!("--seconds needs a value\n{USAGE}")))?;
            seconds = value
                .parse()
                .map_err(|_| Failure::new(format!("--seconds {value}: not a number\n{USAGE}")))?;
        } else if word.starts_with('-') {
            return Err(Failure::new(format!("unknown fuzz flag {word}\n{USAGE}")));
        } else {
            targets.push(*word);
        }
    }
    fuzz::fuzz(seconds, &targets)
}

/// The sample guests and where their ELFs land.
const GUESTS: &[&str] = &["hello", "exits", "evil", "evilvirt", "kv"];

/// Builds the freestanding guests (their own workspace and flags) into target/guest/.
pub(crate) fn build_guests() -> Result<(), Failure> {
    let root = project_root();
    let guest_dir = root.join("guest");
    // The guest's .cargo/config.toml applies only when cargo runs inside guest/.
    run(cargo()
        .current_dir(&guest_dir)
        .args(["build", "--release", "--quiet"]))?;
    let out = root.join("target/guest");
    std::fs::create_dir_all(&out)
        .map_err(|err| Failure::new(format!("cannot create {}: {err}", out.display())))?;
    for name in GUESTS {
        let built = guest_dir
            .join("target/x86_64-unknown-linux-gnu/release")
            .join(name);
        let dest = out.join(format!("{name}.elf"));
        std::fs::copy(&built, &dest).map_err(|err| {
            Failure::new(format!(
                "cannot copy {} to {}: {err}",
                built.display(),
                dest.display()
            ))
        })?;
    }
    println!("xtask: guests in {}", out.display());
    Ok(())
}

fn test() -> Result<(), Failure> {
    setup()?;
    let root = project_root();
    run(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .current_dir(root.join("guest"))
        .args(["fmt", "--check"]))?;
    // kvcore, the kv guest's pure logic, is its own workspace so that it builds and tests
    // on the host; cargo is run from the root so the guest's freestanding flags stay out.
    let kvcore = root.join("guest/kvcore/Cargo.toml");
    run(cargo()
        .current_dir(root.join("guest/kvcore"))
        .args(["fmt", "--check"]))?;
    run(cargo()
        .current_dir(&root)
        .arg("clippy")
        .arg("--manifest-path")
        .arg(&kvcore)
        .args(["--all-targets", "--quiet", "--", "-D", "warnings"]))?;
    run(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().current_dir(root.join("guest")).args([
        "clippy",
        "--release",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    build_guests()?;
    run(cargo().current_dir(&root).args([
        "build",
        "--workspace",
        "--bins",
        "--examples",
        "--quiet",
    ]))?;
    run(cargo()
        .current_dir(&root)
        .arg("test")
        .arg("--manifest-path")
        .arg(&kvcore))?;
    run(cargo()
        .current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"]))?;
    // A short chaos run with the debug binaries: every fault kind once, fixed seed.
    let debug = root.join("target/debug");
    chaos::chaos(
        Binaries {
            ftvmm: debug.join("ftvmm"),
            ftd: debug.join("ftd"),
            ftctl: debug.join("ftctl"),
        },
        &root.join("target/guest/kv.elf"),
        12,
        1,
        chaos::Pick::EveryKind,
    )
}
