//! Helpers for the end-to-end tests: where the binaries and guests are, and loud failures
//! when something a test needs is missing (a test that cannot run must never pass). The
//! unit tests of ftd and ftvmm use it too, for a throwaway etcd ([`LocalEtcd`]), free
//! ports, scratch directories and test certificates ([`Pki`]); of ftvm's crates it uses
//! only ftvm-tls.

pub mod cluster;
pub mod demo;
pub mod etcd;
mod kv;
mod lan;
mod netns;
pub mod package;
mod pki;
mod process;
mod prometheus;
pub mod relay;
pub mod switchover;
pub mod watch;

pub use etcd::LocalEtcd;
pub use kv::*;
pub use lan::*;
pub use netns::*;
pub use pki::Pki;
pub use process::*;
pub use prometheus::*;

use std::path::PathBuf;
use std::process::Command;

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

/// A TCP port on 127.0.0.1 that was free a moment ago, for a listener a child opens;
/// never one this process was given before (tests name pairs and arbiter claims after
/// their port, and an earlier test's claim must not be found by a later one).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .unwrap_or_else(|err| panic!("cannot find a free port on 127.0.0.1: {err}"));
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return port;
        }
    }
}

/// A fresh directory under the system temp dir, named after `tag`, the pid and a counter.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ftvm-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
    dir
}

/// This test run's cluster CA (in a scratch directory, made on first use).
pub fn test_pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| Pki::new(&temp_dir("pki")))
}

/// The flags that put a replica's log and clone channels under mutual TLS with a host
/// certificate of this test run's cluster.
pub fn replica_tls() -> [String; 2] {
    [
        "--tls-dir".to_owned(),
        test_pki().host("test").display().to_string(),
    ]
}

/// Connects to a replica's log or clone port as a host of this test run's cluster (TLS
/// done, nothing of the protocol said yet).
pub fn connect_replica(addr: &str) -> ftvm_tls::Socket {
    let credentials = ftvm_tls::TlsFiles::in_dir(&test_pki().host("test"))
        .load()
        .expect("the test host credentials");
    let tcp = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|err| panic!("cannot connect to {addr}: {err}"));
    ftvm_tls::Socket::handshake(
        tcp,
        ftvm_tls::TlsSide::Client(credentials.client_config().expect("client config")),
        std::time::Duration::from_secs(5),
    )
    .unwrap_or_else(|err| panic!("TLS with {addr}: {err}"))
}

/// A zeroed 16 MiB disk image in a scratch directory of its own (the shared disk of a
/// pair), removed on drop.
pub struct Disk(PathBuf);

impl Disk {
    /// A fresh image for the test tagged `tag`.
    pub fn new(tag: &str) -> Disk {
        let dir = std::env::temp_dir().join(format!("ftvm-pair-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("kv.img");
        let file = std::fs::File::create(&path).expect("disk image");
        file.set_len(16 << 20).expect("size disk image");
        Disk(dir)
    }

    /// The image file.
    pub fn path(&self) -> PathBuf {
        self.0.join("kv.img")
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A scratch directory of this test process (`<tmp>/ftvm-<tag>-<pid>`), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Makes the directory for `tag`.
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ftvm-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// A file `name` in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}
