//! Small helpers for running commands.

use std::path::PathBuf;
use std::process::Command;

/// A task failed; the message says what to do about it.
pub use ftvm_tests::cluster::Failure;

/// The workspace root (the parent of xtask/).
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `cargo`, as the one running this task.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs `command`, failing unless it exits 0.
pub fn run(command: &mut Command) -> Result<(), Failure> {
    let shown = format!("{command:?}");
    let status = command
        .status()
        .map_err(|err| Failure::new(format!("cannot start {shown}: {err}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::new(format!("{shown} failed ({status})")))
    }
}

/// Runs `command` and returns its stdout, failing unless it exits 0.
pub fn output(command: &mut Command) -> Result<String, Failure> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|err| Failure::new(format!("cannot start {shown}: {err}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Percentile `p` (0..=100) of sorted `values`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A small seeded generator (xorshift64*): the same seed draws the same choices.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..bound` (0 if `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// A duration between `low` and `high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> std::time::Duration {
        std::time::Duration::from_millis(low + self.below(high - low + 1))
    }
}
