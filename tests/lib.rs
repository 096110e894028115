//! Helpers for the end-to-end tests: where the binaries and guests are, and loud failures
//! when something a test needs is missing (a test that cannot run must never pass).

use std::path::PathBuf;
use std::process::{Command, Output};

/// The workspace root.
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A binary of this workspace, built by `cargo build` (or `cargo xtask test`).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("FTVM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo xtask test` does, or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A sample guest image from target/guest.
pub fn guest(name: &str) -> PathBuf {
    let path = project_root()
        .join("target/guest")
        .join(format!("{name}.elf"));
    assert!(
        path.is_file(),
        "{} is missing: build the guests first with `cargo xtask guest`",
        path.display()
    );
    path
}

/// Fails the test loudly unless /dev/kvm can be opened.
pub fn require_kvm() {
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm (read/write) and cannot run without it: {err}");
    }
}

/// The result of running a command, with its streams as text.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `command` to completion, capturing its output.
pub fn run(command: &mut Command) -> Ran {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    Ran {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// `ftvmm run --image <guest> --cmdline <cmdline> <extra...>`, with KVM required.
pub fn ftvmm_run(guest_name: &str, cmdline: &str, extra: &[&str]) -> Ran {
    require_kvm();
    run(Command::new(binary("ftvmm"))
        .args([
            "run",
            "--mem",
            "64M",
            "--console",
            "-",
            "--cmdline",
            cmdline,
        ])
        .arg("--image")
        .arg(guest(guest_name))
        .args(extra))
}

/// The value of `key=` in a `key=value` word of `text`.
pub fn field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}
