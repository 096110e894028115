//! End-to-end tests of the control plane: a real etcd, three `ftd` processes on 127.0.0.1
//! (hosts a, b, c with their own ports and state directories), the real `ftvmm` running the
//! `hello` guest, and `ftctl` as a user would run it.
//!
//! They fail loudly when etcd (package etcd-server), KVM or a binary is missing. Each test
//! builds its own cluster; a lock runs them one at a time so that lease timings are not
//! disturbed by the other tests on a 2-core machine.

use ftvm_tests::{
    alive, binary, deploy_metric_names, free_port, guest, parse_prometheus, pid_files, require_kvm,
    run, sample, temp_dir, unix_request, LocalEtcd, Ran,
};

use serde_json::Value;

use std::collections::BTreeSet;
use std::path::PathBuf;

use std::process::{Child, Command, Stdio};

use std::sync::Mutex;

use std::time::{Duration, Instant};

/// The lease TTL the test ftds use (seconds).
const LEASE_TTL: u64 = 3;

/// A guest that runs until killed: a 10 ms tick, a hundred million ticks.
const FOREVER: &str = "ticks=100000000 tick_us=10000";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The user the replicas of these tests run as (uid and gid 65534 on Debian).
const REPLICA_USER: &str = "nobody";

struct Ftd {
    name: &'static str,
    port: u16,
    metrics_port: u16,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Starts retried on other ports because the chosen one was taken.
    port_retries: u32,
    /// Where `ftctl certs` put this cluster's credentials: `ca/`, `host-<name>/`,
    /// `operator/`, `viewer/`.
    pki: PathBuf,
    /// More flags for this ftd.
    extra: Vec<std::ffi::OsString>,
    /// The cluster's first log channel port (`--log-port-base`).
    log_port_base: u16,
}

impl Ftd {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self, etcd: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", self.log.display()));
        let child = Command::new(binary("ftd"))
            .args(["--host-name", self.name])
            .arg("--tls-dir")
            .arg(self.pki.join(format!("host-{}", self.name)))
            .args(&self.extra)
            .args(["--listen", &self.endpoint()])
            .args(["--log-port-base", &self.log_port_base.to_string()])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(["--etcd", etcd])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--ftvmm")
            .arg(binary("ftvmm"))
            .args(["--lease-ttl", &LEASE_TTL.to_string()])
            // Every replica of these tests drops to nobody once set up (and runs under
            // the system call filter, which is on by default).
            .args(["--replica-user", REPLICA_USER])
            .arg("--image-dirs")
            .arg(ftvm_tests::project_root().join("target/guest"))
            .arg("--disk-dirs")
            .arg(self.state_dir.parent().unwrap_or(&self.state_dir))
            .env_remove("FTD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start ftd {}: {err}", self.name));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = self.log_text();
                    // free_port() cannot reserve: a test running beside this one may have
                    // taken the port meanwhile. Other ports, then.
                    if log.contains("in use") && self.port_retries < 3 {
                        self.port_retries += 1;
                        self.port = free_port();
                        self.metrics_port = free_port();
                        return self.start(etcd);
                    }
                    panic!("ftd {} exited with {status} at start:\n{log}", self.name);
                }
            }
            assert!(
                Instant::now() < deadline,
                "ftd {} did not listen within 20 s:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, like a crash: the ftd gets no chance to clean up.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// etcd plus three ftds; everything (including the ftvmm processes the ftds started) is
/// killed on drop.
struct TestCluster {
    etcd: LocalEtcd,
    ftds: Vec<Ftd>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

/// `ftctl certs ...` as an administrator runs it (no ftd involved), expecting success.
fn certs(args: &[&str]) {
    let ran = run(Command::new(binary("ftctl")).arg("certs").args(args));
    assert_eq!(ran.code, Some(0), "ftctl certs {args:?}: {ran:?}");
}

/// A cluster CA and credentials for hosts a, b, c, an operator and a viewer, made with
/// `ftctl certs` in `dir`.
fn make_credentials(dir: &std::path::Path) {
    let ca = dir.join("ca");
    let ca = ca.to_str().expect("utf-8 path");
    certs(&["init", "--dir", ca]);
    for (role, name, out) in [
        ("--host", "a", "host-a"),
        ("--host", "b", "host-b"),
        ("--host", "c", "host-c"),
        ("--operator", "ops", "operator"),
        ("--viewer", "watcher", "viewer"),
    ] {
        let out = dir.join(out);
        certs(&[
            "issue",
            "--dir",
            ca,
            role,
            name,
            "--out",
            out.to_str().expect("utf-8 path"),
        ]);
    }
}

/// Hosts a, b and c, not started, in a fresh directory with their credentials. Each
/// cluster gets log ports of its own: a replica of the cluster before it that is still
/// ending on a shared port would refuse this cluster's certificates (exit 66).
fn three_ftds() -> Vec<Ftd> {
    static CLUSTERS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let cluster = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Below the ephemeral ports, 1000 apart (the leader offsets pairs by up to 1000).
    let log_port_base = 10_000 + 1000 * (cluster % 20);
    let dir = temp_dir("controlplane");
    let pki = dir.join("pki");
    make_credentials(&pki);
    ["a", "b", "c"]
        .into_iter()
        .map(|name| Ftd {
            name,
            port: free_port(),
            metrics_port: free_port(),
            state_dir: dir.join(format!("state-{name}")),
            log: dir.join(format!("ftd-{name}.log")),
            child: None,
            port_retries: 0,
            pki: pki.clone(),
            extra: Vec::new(),
            log_port_base,
        })
        .collect()
}

impl TestCluster {
    fn start() -> TestCluster {
        require_kvm();
        TestCluster::start_with(three_ftds(), LocalEtcd::start)
    }

    /// Starts `ftds` (with their own credentials and flags) on the etcd `etcd` starts.
    fn start_with(mut ftds: Vec<Ftd>, etcd: impl FnOnce() -> LocalEtcd) -> TestCluster {
        let lock = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let etcd = etcd();
        // Made before the ftds start, so that a failed start still kills those that run.
        let mut cluster = TestCluster {
            etcd,
            ftds: Vec::new(),
            _lock: lock,
        };
        for ftd in ftds.drain(..) {
            cluster.ftds.push(ftd);
            let endpoint = cluster.etcd.endpoint.clone();
            if let Some(ftd) = cluster.ftds.last_mut() {
                ftd.start(&endpoint);
            }
        }
        cluster.wait_for(Duration::from_secs(20), "three hosts and a leader", || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 3 && leader_of(&hosts).is_some()).then_some(())
        });
        cluster
    }

    fn ftd(&self, name: &str) -> &Ftd {
        self.ftds
            .iter()
            .find(|ftd| ftd.name == name)
            .unwrap_or_else(|| panic!("no ftd {name}"))
    }

    fn ftd_mut(&mut self, name: &str) -> &mut Ftd {
        self.ftds
            .iter_mut()
            .find(|ftd| ftd.name == name)
            .unwrap_or_else(|| panic!("no ftd {name}"))
    }

    /// `ftctl --endpoint <ftd #index> args...`, as the operator.
    fn ftctl_at(&self, index: usize, args: &[&str]) -> Ran {
        self.ftctl_as("operator", index, args)
    }

    /// `ftctl --endpoint <ftd #index> --tls-dir <credentials> args...`: `who` is
    /// "operator", "viewer" or "host-<name>".
    fn ftctl_as(&self, who: &str, index: usize, args: &[&str]) -> Ran {
        run(Command::new(binary("ftctl"))
            .args(["--endpoint", &self.ftds[index].endpoint()])
            .arg("--tls-dir")
            .arg(self.credentials(who))
            .args(args)
            .env_remove("FTCTL_ENDPOINT")
            .env_remove("FTCTL_TLS_DIR")
            .env_remove("FTCTL_INSECURE"))
    }

    /// The credentials directory of `who` (see [`Ftd::pki`]).
    fn credentials(&self, who: &str) -> PathBuf {
        self.ftds[0].pki.join(who)
    }

    /// `ftctl` against any live ftd, expecting success and JSON output.
    fn ftctl_json(&self, index: usize, args: &[&str]) -> Option<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let ran = self.ftctl_at(index, &with_json);
        if ran.code != Some(0) {
            return None;
        }
        serde_json::from_str(&ran.stdout).ok()
    }

    fn hosts(&self, index: usize) -> Option<Vec<Value>> {
        self.ftctl_json(index, &["hosts"])?.as_array().cloned()
    }

    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            if Instant::now() > deadline {
                let logs: String = self
                    .ftds
                    .iter()
                    .map(|ftd| format!("--- ftd {} ---\n{}", ftd.name, ftd.log_text()))
                    .collect();
                panic!("timed out after {timeout:?} waiting for {what}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `ftctl status web1` says protected; returns that status.
    fn wait_protected(&self) -> Value {
        self.wait_vm_protected("web1")
    }

    /// Waits until `ftctl status <vm>` says protected; returns that status.
    fn wait_vm_protected(&self, vm: &str) -> Value {
        self.wait_for(Duration::from_secs(30), &format!("{vm} protected"), || {
            let status = self.ftctl_json(0, &["status", vm])?;
            (status["protection"] == "protected").then_some(status)
        })
    }

    /// Creates `web1` with its primary on a and its backup on b, and waits until the
    /// primary runs; returns its pid.
    fn create_web1(&self) -> u32 {
        self.create_vm("web1")
    }

    /// `ftctl create` (asked of ftd number `index`) of `vm` running the hello guest for
    /// ever, on `hosts` (`None`: where the leader puts it); fails the test unless it is
    /// accepted.
    fn create_hello(&self, index: usize, vm: &str, hosts: Option<&str>) {
        let image = guest("hello");
        let mut args = vec![
            "create",
            "--vm",
            vm,
            "--image",
            image.to_str().expect("utf-8 path"),
            "--mem",
            "64M",
            "--cmdline",
            FOREVER,
        ];
        if let Some(hosts) = hosts {
            args.extend(["--hosts", hosts]);
        }
        let ran = self.ftctl_at(index, &args);
        assert_eq!(ran.code, Some(0), "ftctl create failed: {ran:?}");
    }

    /// Creates `vm` (the hello guest for ever) with its primary on a and its backup on
    /// b, and waits until the primary runs; returns its pid.
    fn create_vm(&self, vm: &str) -> u32 {
        self.create_hello(1, vm, Some("a,b"));
        self.wait_for(
            Duration::from_secs(20),
            &format!("the primary of {vm} to run"),
            || {
                let status = self.ftctl_json(0, &["status", vm])?;
                let primary = replica(&status, "primary")?;
                (primary["state"] == "running").then(|| primary["pid"].as_u64())?
            },
        )
        .try_into()
        .expect("a pid fits u32")
    }

    /// `etcdctl --endpoints <the test etcd> args...`, expecting success.
    fn etcdctl(&self, args: &[&str]) -> String {
        let ran = run(Command::new("etcdctl")
            .args(["--endpoints", &self.etcd.endpoint])
            .args(args)
            .env("ETCDCTL_API", "3"));
        assert_eq!(ran.code, Some(0), "etcdctl {args:?}: {ran:?}");
        ran.stdout
    }

    /// The keys stored under `prefix`.
    fn keys_under(&self, prefix: &str) -> Vec<String> {
        self.etcdctl(&["get", "--prefix", "--keys-only", prefix])
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The last 1000 events (`ftctl --json events`), oldest first.
    fn events(&self) -> Vec<Value> {
        let ran = self.ftctl_at(0, &["--json", "events", "--backlog", "1000"]);
        assert_eq!(ran.code, Some(0), "ftctl events: {ran:?}");
        ran.stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for ftd in &mut self.ftds {
            ftd.kill();
        }
        // Kill the replicas the ftds left running (they outlive ftd on purpose).
        for ftd in &self.ftds {
            for pid in pid_files(&ftd.state_dir) {
                if alive(pid) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        let _ = &self.etcd;
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// The value after flag `name` in a command line (`/proc/<pid>/cmdline` joined by spaces).
fn flag<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    let mut words = cmdline.split(' ');
    words.find(|word| *word == name)?;
    words.next()
}

fn leader_of(hosts: &[Value]) -> Option<String> {
    hosts
        .iter()
        .find(|host| host["leader"] == true)
        .and_then(|host| host["name"].as_str().map(str::to_owned))
}

fn replica<'a>(vm: &'a Value, role: &str) -> Option<&'a Value> {
    vm["replicas"]
        .as_array()?
        .iter()
        .find(|replica| replica["role"] == role)
}

/// A plain HTTP/1.0 GET on 127.0.0.1; the body on a 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_owned())
}

/// The pid of host `host`'s running `role` replica of web1, per its pid file (named by
/// the replica number `ftctl status` shows).
fn replica_pid(cluster: &TestCluster, host: &str, role: &str) -> Option<u32> {
    let vm = cluster.ftctl_json(0, &["status", "web1"])?;
    let replica = replica(&vm, role).filter(|replica| replica["host"] == host)?;
    let id = replica["id"].as_u64()?;
    let path = cluster
        .ftd(host)
        .state_dir
        .join(format!("web1/replica-{id}.pid"));
    let pid = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// The control socket of web1's replica number `id` on `host`.
fn control_socket(cluster: &TestCluster, host: &str, id: u64) -> PathBuf {
    cluster
        .ftd(host)
        .state_dir
        .join(format!("web1/replica-{id}.sock"))
}

/// Waits until web1 is protected by a backup made by cloning, on `backup_host`, with the
/// primary on `primary_host`; returns the status.
fn protected_by_a_clone(cluster: &TestCluster, primary_host: &str, backup_host: &str) -> Value {
    vm_protected_by_a_clone(cluster, "web1", primary_host, backup_host)
}

/// Waits until `name` is protected by a backup made by cloning, on `backup_host`, with
/// the primary on `primary_host`; returns the status.
fn vm_protected_by_a_clone(
    cluster: &TestCluster,
    name: &str,
    primary_host: &str,
    backup_host: &str,
) -> Value {
    cluster.wait_for(
        Duration::from_secs(60),
        &format!("{name} protected by a clone on {backup_host} of the primary on {primary_host}"),
        || {
            let vm = cluster.ftctl_json(0, &["status", name])?;
            let primary = replica(&vm, "primary")?;
            let backup = replica(&vm, "backup")?;
            (vm["protection"] == "protected"
                && primary["host"] == primary_host
                && backup["host"] == backup_host
                && backup["cloned"] == true)
                .then_some(vm)
        },
    )
}

/// The `exit_ordinal=` of a replica's control socket status.
fn exit_ordinal(socket: &std::path::Path) -> Option<u64> {
    let line = unix_request(socket, b"status\n").ok()?;
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("exit_ordinal="))?
        .parse()
        .ok()
}

/// The events about `vm` after the one numbered `after`.
fn events_of_after(events: &[Value], vm: &str, after: u64) -> Vec<Value> {
    events
        .iter()
        .filter(|event| event["vm"] == vm && event["seq"].as_u64() > Some(after))
        .cloned()
        .collect()
}

/// The uid of `vm`'s spec, as stored.
fn spec_uid(cluster: &TestCluster, vm: &str) -> String {
    let spec = cluster.etcdctl(&["get", "--print-value-only", &format!("/ft/vms/{vm}/spec")]);
    let spec: Value = serde_json::from_str(spec.trim()).expect("the spec is JSON");
    spec["uid"].as_str().expect("a uid").to_owned()
}

/// What etcd holds under `key` (empty if nothing).
fn stored(cluster: &TestCluster, key: &str) -> String {
    cluster
        .etcdctl(&["get", "--print-value-only", key])
        .trim()
        .to_owned()
}

mod basics;
mod failover;
