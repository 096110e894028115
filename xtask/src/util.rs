//! Small helpers for running commands.

use std::fmt;
use std::path::PathBuf;
use std::process::Command;

/// A task failed; the message says what to do about it.
#[derive(Debug)]
pub struct Failure(String);

impl Failure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Failure(message.into())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
