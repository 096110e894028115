//! `cargo xtask fuzz`: the fuzz targets (each crate's `fuzz` module; `cargo test` runs
//! them on generated inputs with a fixed budget) under libFuzzer's coverage guidance for
//! long runs, through cargo-fuzz on the stable toolchain (no sanitizer: the targets are
//! safe Rust, and panics are what they look for). Corpora and findings stay under
//! target/fuzz/, so a later run goes on from where the last one stopped.

use crate::util::{cargo, project_root, Failure};
use std::path::Path;
use std::process::Stdio;

/// The targets (tests/fuzz/fuzz_targets/<name>.rs).
pub const TARGETS: &[&str] = &[
    "log_stream",
    "log_events",
    "virtio_block",
    "virtio_net",
    "snapshot_sections",
    "memory_stream",
    "pair_wire",
    "control_request",
    "replica_status",
    "grpc_request",
];

/// What one target's run gave.
struct Run {
    target: String,
    executions: u64,
    seconds: u64,
    coverage: u64,
    corpus: u64,
    peak_rss_mb: u64,
    findings: Vec<String>,
}

/// Runs each of `targets` (all when empty) for `seconds`, then prints one line per target.
pub fn fuzz(seconds: u64, targets: &[&str]) -> Result<(), Failure> {
    for target in targets {
        if !TARGETS.contains(target) {
            return Err(Failure::new(format!(
                "no fuzz target {target} (targets: {})",
                TARGETS.join(", ")
            )));
        }
    }
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.to_vec()
    };
    ensure_cargo_fuzz()?;
    let root = project_root();
    let mut runs = Vec::new();
    for target in targets {
        println!("xtask: fuzzing {target} for {seconds} s");
        runs.push(run_target(&root, target, seconds)?);
    }
    println!(
        "\n{:<18} {:>8} {:>12} {:>9} {:>8} {:>7} {:>8}  findings",
        "target", "seconds", "executions", "per s", "cov", "corpus", "rss MiB"
    );
    for run in &runs {
        println!(
            "{:<18} {:>8} {:>12} {:>9} {:>8} {:>7} {:>8}  {}",
            run.target,
            run.seconds,
            run.executions,
            run.executions / run.seconds.max(1),
            run.coverage,
            run.corpus,
            run.peak_rss_mb,
            if run.findings.is_empty() {
                "none".to_owned()
            } else {
                run.findings.join(", ")
            }
        );
    }
    let found: usize = runs.iter().map(|run| run.findings.len()).sum();
    if found > 0 {
        return Err(Failure::new(format!(
            "{found} findings: reproduce one with `cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none <target> <file>`"
        )));
    }
    Ok(())
}

/// Installs cargo-fuzz (from crates.io, locked) unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<(), Failure> {
    let present = cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if present {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    crate::util::run(cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn run_target(root: &Path, target: &str, seconds: u64) -> Result<Run, Failure> {
    let corpus = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir)
            .map_err(|err| Failure::new(format!("cannot create {}: {err}", dir.display())))?;
    }
    let before = files(&artifacts);
    let output = cargo()
        .current_dir(root)
        .args([
            "fuzz",
            "run",
            "--fuzz-dir",
            "tests/fuzz",
            "--sanitizer",
            "none",
        ])
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-rss_limit_mb=2048")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdin(Stdio::null())
        .output()
        .map_err(|err| Failure::new(format!("cannot run cargo fuzz: {err}")))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let last_status = log
        .lines()
        .rev()
        .find(|line| line.starts_with('#') && line.contains("cov:"));
    let word_after = |key: &str| {
        last_status
            .and_then(|line| line.split(key).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.split('/').next())
            .and_then(|value| value.parse::<u64>().ok())
    };
    let findings: Vec<String> = files(&artifacts)
        .into_iter()
        .filter(|file| !before.contains(file))
        .collect();
    let Some(executions) = stat("number_of_executed_units") else {
        // No final statistics: the build or the start failed.
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        return Err(Failure::new(format!(
            "cargo fuzz run {target} gave no statistics ({}):\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )));
    };
    Ok(Run {
        target: target.to_owned(),
        executions,
        seconds: seconds.max(1),
        coverage: word_after("cov:").unwrap_or(0),
        corpus: word_after("corp:").unwrap_or(0),
        peak_rss_mb: stat("peak_rss_mb").unwrap_or(0),
        findings,
    })
}

/// The file names in `dir`.
fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
