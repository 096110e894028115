//! Benchmarks that print figures. Ratios are measured side by side in one run, because
//! absolute exit costs on this kind of host differ from a real VMX host by 10-50x.

use crate::util::{cargo, output, project_root, run, Failure};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Rounds per variant; the median is reported with the spread.
const ROUNDS: usize = 5;

/// `cargo xtask bench exits`.
pub fn exits() -> Result<(), Failure> {
    crate::build_guests()?;
    let root = project_root();
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "ftvmm",
        "-p",
        "ftvm-machine",
        "--bins",
        "--examples",
    ]))?;
    let release = root.join("target/release");
    let ftvmm = release.join("ftvmm");
    let bare = release.join("examples/bare_exits");
    let exits_guest = root.join("target/guest/exits.elf");
    let hello = root.join("target/guest/hello.elf");

    println!("exit round trips: ftvmm's full exit path (with its system call filter, and without)");
    println!("vs a bare KVM_RUN loop, same guest, same run");
    println!("({ROUNDS} alternating rounds each; median [min..max] ns per round trip)");
    println!(
        "{:<5} {:>8} {:>24} {:>24} {:>24} {:>10} {:>9}",
        "op", "n", "ftvmm ns/op", "--seccomp off ns/op", "bare ns/op", "overhead", "filter"
    );
    for (op, count) in [("pio", 20_000u64), ("mmio", 20_000), ("hlt", 10_000)] {
        let cmdline = format!("op={op} n={count}");
        let (mut ours, mut unfiltered, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
        let ftvmm_run = |seccomp: &str| {
            let mut command = Command::new(&ftvmm);
            command
                .args([
                    "run",
                    "--mem",
                    "64M",
                    "--console",
                    "-",
                    "--cmdline",
                    &cmdline,
                ])
                .args(["--seccomp", seccomp])
                .arg("--image")
                .arg(&exits_guest);
            command
        };
        for _ in 0..ROUNDS {
            ours.push(per_op_ns(&mut ftvmm_run("enforce"), count)?);
            unfiltered.push(per_op_ns(&mut ftvmm_run("off"), count)?);
            baseline.push(per_op_ns(
                Command::new(&bare).arg(&exits_guest).arg(&cmdline),
                count,
            )?);
        }
        let (ours_median, unfiltered_median, baseline_median) = (
            median(&mut ours),
            median(&mut unfiltered),
            median(&mut baseline),
        );
        println!(
            "{op:<5} {count:>8} {:>24} {:>24} {:>24} {:>+9.1}% {:>+8.1}%",
            spread(&ours),
            spread(&unfiltered),
            spread(&baseline),
            (ours_median / baseline_median - 1.0) * 100.0,
            (ours_median / unfiltered_median - 1.0) * 100.0
        );
    }

    let mut startup = Vec::new();
    for _ in 0..ROUNDS * 2 {
        startup.push(first_console_byte(&ftvmm, &hello)?.as_secs_f64() * 1e6);
    }
    let startup_median = median(&mut startup);
    println!(
        "time from process start to the guest's first console byte: {:.0} us median [{:.0}..{:.0}]",
        startup_median,
        startup[0],
        startup[startup.len() - 1]
    );

    // --stats goes to stderr.
    let out = Command::new(&ftvmm)
        .args([
            "run",
            "--mem",
            "64M",
            "--console",
            "none",
            "--stats",
            "--cmdline",
            "ticks=20 work=1000000",
        ])
        .arg("--image")
        .arg(&hello)
        .output()
        .map_err(|err| Failure::new(format!("cannot run ftvmm: {err}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| -> Option<u64> {
        stderr
            .split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    match (field("vmm_rss_bytes"), field("guest_resident_bytes")) {
        (Some(vmm), Some(guest)) => println!(
            "ftvmm RSS beyond guest memory: {:.1} MiB (guest RAM resident: {:.1} MiB of 64 MiB)",
            vmm as f64 / 1048576.0,
            guest as f64 / 1048576.0
        ),
        _ => {
            return Err(Failure::new(format!(
                "no memory figures in ftvmm --stats output: {stderr}"
            )))
        }
    }
    Ok(())
}

/// Runs an `exits` guest and returns the nanoseconds per operation it measured itself.
fn per_op_ns(command: &mut Command, count: u64) -> Result<f64, Failure> {
    let out = output(command.stderr(Stdio::inherit()))?;
    let ns: u64 = out
        .lines()
        .find_map(|line| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix("ns=")?.parse().ok())
        })
        .ok_or_else(|| Failure::new(format!("the exits guest printed no 'ns=' figure: {out}")))?;
    Ok(ns as f64 / count as f64)
}

/// Starts ftvmm on `image` and times the first byte on its stdout.
fn first_console_byte(ftvmm: &Path, image: &PathBuf) -> Result<Duration, Failure> {
    let start = Instant::now();
    let mut child = Command::new(ftvmm)
        .args([
            "run",
            "--mem",
            "64M",
            "--console",
            "-",
            "--cmdline",
            "ticks=1 work=0",
        ])
        .arg("--image")
        .arg(image)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|err| Failure::new(format!("cannot start ftvmm: {err}")))?;
    let mut first = [0u8; 1];
    let mut stdout = child.stdout.take();
    let read = stdout.as_mut().map(|out| out.read_exact(&mut first));
    let elapsed = start.elapsed();
    // Drain the rest so the guest's console never writes into a closed pipe.
    if let Some(out) = stdout.as_mut() {
        let _ = out.read_to_end(&mut Vec::new());
    }
    let status = child
        .wait()
        .map_err(|err| Failure::new(format!("ftvmm did not finish: {err}")))?;
    match read {
        Some(Ok(())) if status.success() => Ok(elapsed),
        _ => Err(Failure::new(format!(
            "hello guest produced no console output ({status})"
        ))),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn spread(sorted: &[f64]) -> String {
    format!(
        "{:.0} [{:.0}..{:.0}]",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    )
}
