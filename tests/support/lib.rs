//! Helpers for the end-to-end tests: where the binaries and guests are, and loud failures
//! when something a test needs is missing (a test that cannot run must never pass). The
//! unit tests of ftd and ftvmm use it too, for a throwaway etcd ([`LocalEtcd`]), free
//! ports and scratch directories; it depends on neither crate.

pub mod cluster;
pub mod demo;
pub mod etcd;
pub mod relay;
pub mod watch;

pub use etcd::LocalEtcd;

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

/// How long a test waits for a process it expects to exit (a guest told to power off, a
/// client run) before it kills it and fails.
pub const EXIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits at most `timeout` for `child` to exit; kills it and fails the test, naming
/// `what`, if it is still running then.
pub fn wait_child(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {timeout:?}: killed");
            }
            Err(err) => panic!("cannot wait for {what}: {err}"),
        }
    }
}

/// A network namespace made by a test, with a TAP device for a guest NIC; removed on drop
/// together with every process started in it through [`NetNs::spawn`].
pub struct NetNs {
    /// The namespace name.
    pub name: String,
    children: Vec<std::process::Child>,
}

/// The host side of the test network: 10.77.0.1/24 on the TAP.
pub const HOST_IP: &str = "10.77.0.1";
/// The guest's address on the test network.
pub const GUEST_IP: &str = "10.77.0.2";
/// The guest's MAC address on the test network.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

impl NetNs {
    /// Creates namespace `ftvm-<tag>-<pid>` with loopback up and a TAP `tap0` carrying
    /// 10.77.0.1/24. Fails the test loudly if namespaces cannot be made (needs root and
    /// iproute2).
    pub fn with_tap(tag: &str) -> NetNs {
        let ns = NetNs::fresh(tag);
        ns.exec_ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
        ns.exec_ok(&["ip", "link", "set", "tap0", "up"]);
        ns
    }

    /// Namespace `ftvm-<tag>-<pid>`, made anew, with loopback up.
    fn fresh(tag: &str) -> NetNs {
        let name = format!("ftvm-{tag}-{}", std::process::id());
        // A leftover from a crashed earlier run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = NetNs {
            name,
            children: Vec::new(),
        };
        ns.ip(&["netns", "add", &ns.name]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let ran = run(Command::new("ip").args(args));
        assert_eq!(
            ran.code,
            Some(0),
            "`ip {}` failed (these tests need root and iproute2): {}",
            args.join(" "),
            ran.stderr
        );
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `args` in the namespace and fails the test unless it exits 0.
    pub fn exec_ok(&self, args: &[&str]) -> Ran {
        let ran = run(self.command(args[0]).args(&args[1..]));
        assert_eq!(
            ran.code,
            Some(0),
            "`{}` in {} failed: {ran:?}",
            args.join(" "),
            self.name
        );
        ran
    }

    /// Starts `command` (made by [`NetNs::command`]); it is killed when the namespace goes.
    pub fn spawn(&mut self, command: &mut Command) -> u32 {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills (SIGKILL) and reaps the child with `pid`.
    pub fn kill(&mut self, pid: u32) {
        if let Some(index) = self.children.iter().position(|child| child.id() == pid) {
            let mut child = self.children.remove(index);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (at most [`EXIT_PATIENCE`]) for the child with `pid` and returns its exit
    /// code; kills it and fails the test if it did not exit by then.
    pub fn wait(&mut self, pid: u32) -> Option<i32> {
        let index = self.children.iter().position(|child| child.id() == pid)?;
        let mut child = self.children.remove(index);
        wait_child(
            &mut child,
            EXIT_PATIENCE,
            &format!("process {pid} in namespace {}", self.name),
        )
        .code()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `redis-cli` in `ns` against the guest and returns its trimmed output; fails the test
/// if redis-cli is missing or fails.
pub fn redis_cli(ns: &NetNs, args: &[&str]) -> String {
    redis_cli_at(ns, GUEST_IP, args)
}

/// Polls `redis-cli PING` until the guest answers PONG or `timeout` passes.
pub fn wait_for_pong(ns: &NetNs, timeout: std::time::Duration) -> bool {
    wait_for_pong_at(ns, GUEST_IP, timeout)
}

/// Runs `work` on a thread that has joined network namespace `ns` (sockets it creates live
/// there), so a test can be a real client of a guest without leaving its namespaces.
pub fn in_netns<T: Send + 'static>(ns: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&name);
        work()
    })
    .join()
    .unwrap_or_else(|_| panic!("the client thread in {ns} panicked"))
}

/// Moves the calling thread into network namespace `ns`: sockets it creates, and threads
/// it starts, live there.
pub fn enter_netns(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) on an open namespace fd, affecting only this thread.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "setns into {path}: {}",
        std::io::Error::last_os_error()
    );
}

/// A minimal RESP (Redis protocol) client for checkers that must know exactly which
/// writes were acknowledged.
pub struct RespClient {
    stream: std::io::BufReader<std::net::TcpStream>,
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Status(String),
    /// `-...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n ...` (`None` for a null bulk string)
    Bulk(Option<Vec<u8>>),
    /// `*n ...`
    Array(Vec<Reply>),
}

impl RespClient {
    /// Connects to `addr` (in the calling thread's network namespace).
    pub fn connect(addr: &str, timeout: std::time::Duration) -> std::io::Result<RespClient> {
        let addr: std::net::SocketAddr = addr.parse().map_err(|err| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {err}"))
        })?;
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(RespClient {
            stream: std::io::BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        use std::io::Write;
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&out)?;
        self.read_reply()
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        use std::io::Read;
        let bad = |line: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad reply line {line:?}"),
            )
        };
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || rest.parse::<i64>().map_err(|_| bad(&line));
        Ok(match kind {
            "+" => Reply::Status(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Integer(number()?),
            "$" => match number()? {
                -1 => Reply::Bulk(None),
                len if len >= 0 => {
                    let mut data = vec![0u8; len as usize + 2];
                    self.stream.read_exact(&mut data)?;
                    data.truncate(len as usize);
                    Reply::Bulk(Some(data))
                }
                _ => return Err(bad(&line)),
            },
            "*" => {
                let count = number()?;
                let mut items = Vec::new();
                for _ in 0..count.max(0) {
                    items.push(self.read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(bad(&line)),
        })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a listener a child opens.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot find a free port on 127.0.0.1: {err}"))
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

/// A child process whose stdout and stderr are collected by threads (a chatty child never
/// blocks on a full pipe); killed on drop if it is still running.
pub struct Spawned {
    child: std::process::Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Spawned {
    /// Starts `command` with its stdout and stderr captured.
    pub fn start(command: &mut Command) -> Spawned {
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        fn collect(
            stream: Option<impl std::io::Read + Send + 'static>,
        ) -> Option<std::thread::JoinHandle<String>> {
            let mut stream = stream?;
            Some(std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes);
                String::from_utf8_lossy(&bytes).into_owned()
            }))
        }
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Spawned {
            child,
            stdout,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the child to exit and returns what it printed; kills it and fails the
    /// test if it is still running after `timeout`.
    pub fn wait(mut self, timeout: std::time::Duration) -> Ran {
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Ok(None) => {
                    self.kill();
                    let _ = self.child.wait();
                    let ran = self.collect(None);
                    panic!("the child did not exit within {timeout:?}: {ran:?}");
                }
                Err(err) => panic!("cannot wait for the child: {err}"),
            }
        };
        self.collect(status.code())
    }

    fn collect(&mut self, code: Option<i32>) -> Ran {
        let text = |handle: Option<std::thread::JoinHandle<String>>| {
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Ran {
            code,
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl NetNs {
    /// Creates namespace `ftvm-<tag>-<pid>` with a bridge `br0` carrying 10.77.0.1/24 and
    /// the TAP devices `taps` enslaved to it: the two replicas of a pair on one L2
    /// segment, with clients on the bridge's address.
    pub fn with_bridged_taps(tag: &str, taps: &[&str]) -> NetNs {
        let ns = NetNs::fresh(tag);
        ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "br0"]);
        ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
        for tap in taps {
            ns.exec_ok(&["ip", "tuntap", "add", "dev", tap, "mode", "tap"]);
            ns.exec_ok(&["ip", "link", "set", tap, "master", "br0"]);
            ns.exec_ok(&["ip", "link", "set", tap, "up"]);
        }
        ns
    }
}

impl Spawned {
    /// Whether the child has not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl RespClient {
    /// Changes how long a read or a write may block (a checker expecting *no* reply
    /// shortens it).
    pub fn set_timeout(&mut self, timeout: std::time::Duration) -> std::io::Result<()> {
        let stream = self.stream.get_ref();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }
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

/// The acknowledged-writes checker: distinct `SET <prefix>:<i> v<i>` over ONE connection to
/// a kv guest, remembering every write acknowledged with `+OK`, so that a test can read
/// them all back after a failure and count the lost ones (there must be none).
pub struct AckedWrites {
    client: RespClient,
    prefix: String,
    next: u32,
    acked: Vec<(String, String)>,
    /// Values are padded to at least this many bytes.
    value_len: usize,
}

/// A thread doing [`AckedWrites::spawn`]'s writes; joined, it hands the checker back
/// with the outcome.
pub type Writer = std::thread::JoinHandle<(AckedWrites, Result<(), String>)>;

impl AckedWrites {
    /// Connects from network namespace `ns` to the kv guest at `addr` (`IP:PORT`); fails
    /// the test if it cannot. The socket stays in `ns` whichever thread uses it later.
    pub fn connect(ns: &str, addr: &str, prefix: &str) -> AckedWrites {
        let target = addr.to_owned();
        let client = in_netns(ns, move || {
            RespClient::connect(&target, std::time::Duration::from_secs(20))
        })
        .unwrap_or_else(|err| panic!("cannot connect to the kv guest at {addr} from {ns}: {err}"));
        AckedWrites {
            client,
            prefix: prefix.to_owned(),
            next: 0,
            acked: Vec::new(),
            value_len: 0,
        }
    }

    /// Pads every value to `len` bytes from now on (large records span disk sectors).
    pub fn with_value_len(mut self, len: usize) -> AckedWrites {
        self.value_len = len;
        self
    }

    /// The value write `i` stores: `v<i>`, padded with `x` to the value length.
    pub fn value(&self, i: u32) -> String {
        let mut value = format!("v{i}");
        while value.len() < self.value_len {
            value.push('x');
        }
        value
    }

    /// The acknowledged writes, key and value.
    pub fn acked_writes(&self) -> &[(String, String)] {
        &self.acked
    }

    /// SETs the next key and records it if the reply is `+OK`; anything else (an error
    /// reply, a timeout, a closed connection) is returned as the reason.
    pub fn write(&mut self) -> Result<(), String> {
        let i = self.next;
        self.next += 1;
        let (key, value) = (format!("{}:{i}", self.prefix), self.value(i));
        match self
            .client
            .call(&[b"SET", key.as_bytes(), value.as_bytes()])
        {
            Ok(Reply::Status(ok)) if ok == "OK" => {
                self.acked.push((key, value));
                Ok(())
            }
            other => Err(format!("write {i} ({key}) not acknowledged: {other:?}")),
        }
    }

    /// `count` writes, calling `before(n)` before the n-th of them (from 0); stops at the
    /// first one not acknowledged.
    pub fn write_many(&mut self, count: u32, mut before: impl FnMut(u32)) -> Result<(), String> {
        for n in 0..count {
            before(n);
            self.write()?;
        }
        Ok(())
    }

    /// `count` writes on a thread of their own; the receiver gets a message just before
    /// write `signal_at` goes out, so a test can inject a failure while writes are in
    /// flight. The thread hands the checker back with the outcome.
    pub fn spawn(mut self, count: u32, signal_at: u32) -> (std::sync::mpsc::Receiver<()>, Writer) {
        let (signal, signalled) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let result = self.write_many(count, |n| {
                if n == signal_at {
                    let _ = signal.send(());
                }
            });
            (self, result)
        });
        (signalled, writer)
    }

    /// How many writes were acknowledged.
    pub fn acked(&self) -> usize {
        self.acked.len()
    }

    /// The connection, e.g. to change its timeout.
    pub fn client(&mut self) -> &mut RespClient {
        &mut self.client
    }

    /// Reads every acknowledged key back over the same connection (from whichever
    /// replica serves the guest's address now) and returns those missing or changed.
    pub fn lost(&mut self) -> Vec<String> {
        let mut lost = Vec::new();
        for (key, value) in &self.acked {
            let reply = self.client.call(&[b"GET", key.as_bytes()]);
            if reply.as_ref().ok() != Some(&Reply::Bulk(Some(value.as_bytes().to_vec()))) {
                lost.push(format!("{key}: {reply:?}"));
            }
        }
        lost
    }
}

/// Runs `redis-cli` in `ns` against a kv guest at `ip` and returns its trimmed output;
/// fails the test if redis-cli is missing or fails.
pub fn redis_cli_at(ns: &NetNs, ip: &str, args: &[&str]) -> String {
    let ran = run(ns
        .command("redis-cli")
        .args(["-h", ip, "-p", "6379"])
        .args(args));
    assert_eq!(
        ran.code,
        Some(0),
        "redis-cli {args:?} failed (is redis-tools installed?): {ran:?}"
    );
    ran.stdout.trim_end().to_owned()
}

/// Polls `redis-cli PING` against `ip` until the guest answers PONG or `timeout` passes.
pub fn wait_for_pong_at(ns: &NetNs, ip: &str, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let ran = run(ns
            .command("redis-cli")
            .args(["-h", ip, "-p", "6379", "PING"]));
        if ran.stdout.trim() == "PONG" {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// Hosts on a LAN, each its own network namespace: a `lan` namespace holding the bridge
/// `lan0` (and etcd, on `<subnet>.1:2379`), one namespace per host and one for the
/// client, each joined to `lan0` by a veth pair. A host bridges its uplink and a TAP
/// `tap0` on `br0`, so a guest's NIC sits on the LAN. Everything (processes, namespaces,
/// the etcd data directory) goes on drop, also when the test panics.
pub struct Lan {
    // Dropped first: etcd is killed before its namespace goes.
    etcd: Option<Spawned>,
    etcd_dir: PathBuf,
    hosts: Vec<(String, NetNs)>,
    /// The client's namespace (`<subnet>.100`).
    pub client: NetNs,
    /// The namespace of the bridge and of etcd.
    pub lan: NetNs,
    subnet: String,
}

/// Where a lan's etcd listens for clients.
const LAN_ETCD_PORT: u16 = 2379;

impl Lan {
    /// Builds the LAN for the test tagged `tag` (short: namespace names are global on
    /// the machine) with the hosts `hosts` (e.g. `["a", "b"]`, at `<subnet>.11`, `.12`,
    /// ...), and starts etcd in it. The /24 is unique within this test process; it needs
    /// no more, since every test's LAN is a separate set of namespaces. Fails the test
    /// loudly if namespaces, bridges, veths or etcd cannot be made.
    pub fn new(tag: &str, hosts: &[&str]) -> Lan {
        static NEXT_SUBNET: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT_SUBNET.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 250;
        let subnet = format!("10.78.{n}");
        let lan = NetNs::fresh(&format!("{tag}-lan"));
        lan.exec_ok(&["ip", "link", "add", "lan0", "type", "bridge"]);
        lan.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            "lan0",
        ]);
        lan.exec_ok(&["ip", "link", "set", "lan0", "up"]);
        // Joins `ns` to lan0 by a veth: `v-<name>` on the lan side, `uplink` in `ns`.
        let join = |ns: &NetNs, name: &str| {
            let lan_end = format!("v-{name}");
            lan.exec_ok(&[
                "ip", "link", "add", &lan_end, "type", "veth", "peer", "name", "uplink", "netns",
                &ns.name,
            ]);
            lan.exec_ok(&["ip", "link", "set", &lan_end, "master", "lan0"]);
            lan.exec_ok(&["ip", "link", "set", &lan_end, "up"]);
        };
        // Host names share the namespace and veth names: none may be the client's or
        // the LAN's (a host `c` once took over a client namespace named `c`).
        for host in hosts {
            assert!(
                !["client", "lan"].contains(host),
                "a host may not be called {host}"
            );
        }
        let client = NetNs::fresh(&format!("{tag}-client"));
        join(&client, "client");
        client.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.100/24"),
            "dev",
            "uplink",
        ]);
        client.exec_ok(&["ip", "link", "set", "uplink", "up"]);
        let mut named = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let ns = NetNs::fresh(&format!("{tag}-{host}"));
            join(&ns, host);
            ns.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
            let ip = format!("{subnet}.{}/24", 11 + i);
            ns.exec_ok(&["ip", "addr", "add", &ip, "dev", "br0"]);
            ns.exec_ok(&["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"]);
            for port in ["uplink", "tap0"] {
                ns.exec_ok(&["ip", "link", "set", port, "master", "br0"]);
                ns.exec_ok(&["ip", "link", "set", port, "up"]);
            }
            ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
            named.push((host.to_string(), ns));
        }
        let etcd_dir = std::env::temp_dir().join(format!("{}-etcd", lan.name));
        let _ = std::fs::remove_dir_all(&etcd_dir);
        let mut built = Lan {
            etcd: None,
            etcd_dir,
            hosts: named,
            client,
            lan,
            subnet,
        };
        built.start_etcd();
        built
    }

    /// Starts etcd in the lan namespace on `<subnet>.1` (again, after [`Lan::stop_etcd`],
    /// on the same data directory), answering within 20 s or failing the test.
    pub fn start_etcd(&mut self) {
        let client_url = format!("http://{}", self.etcd());
        let peer_url = "http://127.0.0.1:2380";
        let etcd = Spawned::start(
            self.lan
                .command(std::env::var("FTVM_ETCD").unwrap_or_else(|_| "etcd".to_owned()))
                .arg("--name=lan")
                .arg(format!("--data-dir={}", self.etcd_dir.display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=lan={peer_url}"))
                .arg("--log-level=warn"),
        );
        self.etcd = Some(etcd);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let health = self.etcdctl(&["endpoint", "health"]);
            if health.code == Some(0) {
                return;
            }
            let etcd = self.etcd.as_mut().expect("etcd started");
            if !etcd.running() || std::time::Instant::now() > deadline {
                let etcd = self.etcd.take().expect("etcd started");
                panic!(
                    "this test needs etcd (etcd-server, etcd-client) and it did not come up \
                     in {}: {health:?}; etcd: {:?}",
                    self.lan.name,
                    etcd.wait(std::time::Duration::from_secs(5))
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// `etcdctl --endpoints <etcd> args...` in the lan namespace.
    fn etcdctl(&self, args: &[&str]) -> Ran {
        run(self
            .lan
            .command("etcdctl")
            .args(["--dial-timeout=2s", "--command-timeout=3s", "--endpoints"])
            .arg(self.etcd())
            .args(args))
    }

    /// etcd's client address, `<subnet>.1:2379` (for `--arbiter etcd://...`).
    pub fn etcd(&self) -> String {
        format!("{}.1:{LAN_ETCD_PORT}", self.subnet)
    }

    /// The value of `key` in etcd (`None` if absent); fails the test if etcd cannot be
    /// asked.
    pub fn etcd_get(&self, key: &str) -> Option<String> {
        let ran = self.etcdctl(&["get", "--print-value-only", key]);
        assert_eq!(ran.code, Some(0), "etcdctl get {key}: {ran:?}");
        let value = ran.stdout.trim_end();
        (!value.is_empty()).then(|| value.to_owned())
    }

    /// Kills etcd (SIGKILL): the arbiter is gone for everyone.
    pub fn stop_etcd(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill();
            let _ = etcd.wait(std::time::Duration::from_secs(10));
        }
    }

    /// The namespace of `host`.
    pub fn host(&self, host: &str) -> &NetNs {
        self.hosts
            .iter()
            .find(|(name, _)| name == host)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("no host {host} on this lan"))
    }

    /// Starts `command` (made with [`NetNs::command`] of `host`'s namespace) as a child
    /// of that host: it is killed when the LAN goes. Returns its pid.
    pub fn spawn_on(&mut self, host: &str, command: &mut Command) -> u32 {
        self.hosts
            .iter_mut()
            .find(|(name, _)| name == host)
            .map(|(_, ns)| ns.spawn(command))
            .unwrap_or_else(|| panic!("no host {host} on this lan"))
    }

    /// Kills (SIGKILL) and reaps the child `pid` started by [`Lan::spawn_on`] on `host`.
    pub fn kill_on(&mut self, host: &str, pid: u32) {
        if let Some((_, ns)) = self.hosts.iter_mut().find(|(name, _)| name == host) {
            ns.kill(pid);
        }
    }

    /// The LAN address of `host`.
    pub fn ip(&self, host: &str) -> String {
        let index = self
            .hosts
            .iter()
            .position(|(name, _)| name == host)
            .unwrap_or_else(|| panic!("no host {host} on this lan"));
        format!("{}.{}", self.subnet, 11 + index)
    }

    /// The guest's address on the LAN (`<subnet>.50`).
    pub fn guest_ip(&self) -> String {
        format!("{}.50", self.subnet)
    }

    /// The LAN's router address (the lan bridge, `<subnet>.1`), for `--gateway`.
    pub fn gateway(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Cuts `host` off the LAN entirely: its uplink goes down.
    pub fn cut_off(&self, host: &str) {
        self.host(host)
            .exec_ok(&["ip", "link", "set", "uplink", "down"]);
    }

    /// Drops every TCP segment from or to `port` in `host`, both directions, with
    /// iptables (fails the test loudly if iptables is missing or refuses).
    pub fn drop_tcp_port(&self, host: &str, port: u16) {
        let port = port.to_string();
        for (chain, direction) in [
            ("INPUT", "--dport"),
            ("INPUT", "--sport"),
            ("OUTPUT", "--dport"),
            ("OUTPUT", "--sport"),
        ] {
            let ran = run(self
                .host(host)
                .command("iptables")
                .args(["-A", chain, "-p", "tcp", direction, &port, "-j", "DROP"]));
            assert_eq!(
                ran.code,
                Some(0),
                "iptables in {host} failed (install iptables): {ran:?}"
            );
        }
    }

    /// Packets the guest side wrote to `host`'s TAP (its `rx_packets`): nonzero once a
    /// replica on `host` emitted anything on the LAN.
    pub fn tap_packets_from_guest(&self, host: &str) -> u64 {
        let ran = self
            .host(host)
            .exec_ok(&["cat", "/sys/class/net/tap0/statistics/rx_packets"]);
        ran.stdout
            .trim()
            .parse()
            .unwrap_or_else(|err| panic!("rx_packets of tap0 in {host}: {err}: {ran:?}"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.stop_etcd();
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` for histogram series).
    pub name: String,
    /// The labels as written between the braces (empty if none).
    pub labels: String,
    /// The value.
    pub value: f64,
}

/// Parses the Prometheus text format strictly enough to catch a broken exposition:
/// every line is a `# HELP`/`# TYPE` comment or `name[{labels}] value` with a number.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.split_whitespace();
            let kind = words.next();
            let name = words.next();
            if !matches!(kind, Some("HELP" | "TYPE")) || name.is_none() {
                return Err(format!("bad comment line: {line}"));
            }
            if kind == Some("TYPE")
                && !matches!(
                    words.next(),
                    Some("counter" | "gauge" | "histogram" | "summary" | "untyped")
                )
            {
                return Err(format!("bad TYPE line: {line}"));
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels: {line}"))?,
            ),
            None => (series, ""),
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(format!("bad metric name: {line}"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: labels.to_owned(),
            value,
        });
    }
    Ok(samples)
}

/// The value of the sample `name` with exactly `labels`, if there is one.
pub fn sample(samples: &[Sample], name: &str, labels: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}

/// Sends `request` on the Unix socket at `path` (then ends writing) and reads the whole
/// response.
pub fn unix_request(path: &std::path::Path, request: &[u8]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(request)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Whether process `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        !matches!(state, Some("Z") | Some("X"))
    })
}

/// The pids in the `<vm>/replica-<n>.pid` files an ftd keeps under its state directory.
pub fn pid_files(state_dir: &std::path::Path) -> Vec<u32> {
    let Ok(vms) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    vms.flatten()
        .flat_map(|vm| std::fs::read_dir(vm.path()).into_iter().flatten().flatten())
        .filter(|file| file.path().extension().is_some_and(|ext| ext == "pid"))
        .filter_map(|file| {
            std::fs::read_to_string(file.path())
                .ok()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

/// Stops process `pid` with SIGSTOP and waits until every one of its threads is stopped
/// (state `T` in /proc), so that nothing it does afterwards can be mistaken for what it did
/// while running. Fails the test if that takes more than 5 s.
pub fn stop_process(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|stat| {
                            let (_, rest) = stat.rsplit_once(')')?;
                            rest.split_whitespace().next().map(|state| state == "T")
                        })
                        .unwrap_or(true)
                })
            })
            .unwrap_or(false);
        if stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not stop within 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
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
