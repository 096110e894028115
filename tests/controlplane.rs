//! End-to-end tests of the control plane: a real etcd, three `ftd` processes on 127.0.0.1
//! (hosts a, b, c with their own ports and state directories), the real `ftvmm` running the
//! `hello` guest, and `ftctl` as a user would run it.
//!
//! They fail loudly when etcd (package etcd-server), KVM or a binary is missing. Each test
//! builds its own cluster; a lock runs them one at a time so that lease timings are not
//! disturbed by the other tests on a 2-core machine.

use ftvm_tests::{
    alive, binary, free_port, guest, parse_prometheus, pid_files, require_kvm, run, sample,
    temp_dir, unix_request, LocalEtcd, Ran,
};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lease TTL the test ftds use (seconds).
const LEASE_TTL: u64 = 3;
/// A guest that runs until killed: a 10 ms tick, a hundred million ticks.
const FOREVER: &str = "ticks=100000000 tick_us=10000";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Ftd {
    name: &'static str,
    port: u16,
    metrics_port: u16,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Starts retried on other ports because the chosen one was taken.
    port_retries: u32,
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
            .args(["--listen", &self.endpoint()])
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

/// Hosts a, b and c, not started, in a fresh directory.
fn three_ftds() -> Vec<Ftd> {
    let dir = temp_dir("controlplane");
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
        })
        .collect()
}

impl TestCluster {
    fn start() -> TestCluster {
        let lock = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        require_kvm();
        let etcd = LocalEtcd::start();
        let mut ftds = three_ftds();
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

    /// `ftctl --endpoint <ftd #index> args...`.
    fn ftctl_at(&self, index: usize, args: &[&str]) -> Ran {
        run(Command::new(binary("ftctl"))
            .args(["--endpoint", &self.ftds[index].endpoint()])
            .args(args)
            .env_remove("FTCTL_ENDPOINT"))
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

    /// Creates `vm` (the hello guest for ever) with its primary on a and its backup on
    /// b, and waits until the primary runs; returns its pid.
    fn create_vm(&self, vm: &str) -> u32 {
        let image = guest("hello");
        let ran = self.ftctl_at(
            1,
            &[
                "create",
                "--vm",
                vm,
                "--hosts",
                "a,b",
                "--image",
                image.to_str().expect("utf-8 path"),
                "--mem",
                "64M",
                "--cmdline",
                FOREVER,
            ],
        );
        assert_eq!(ran.code, Some(0), "ftctl create failed: {ran:?}");
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

#[test]
fn create_runs_the_primary_on_the_first_host_and_the_backup_on_the_second() {
    let cluster = TestCluster::start();
    let pid = cluster.create_web1();

    assert!(alive(pid));
    let a_state = cluster.ftd("a").state_dir.display().to_string();
    assert!(
        cmdline(pid).contains(&format!("--console {a_state}/web1/console.log")),
        "the primary must be host a's ftvmm: {}",
        cmdline(pid)
    );
    let pid_file = std::fs::read_to_string(cluster.ftd("a").state_dir.join("web1/replica-1.pid"))
        .expect("host a records the primary's pid (replica 1)");
    assert_eq!(pid_file.trim(), pid.to_string());
    assert!(
        pid_files(&cluster.ftd("c").state_dir).is_empty(),
        "no replica may run on c"
    );

    // Any ftd answers, in words and in JSON.
    let status = cluster.wait_for(Duration::from_secs(20), "web1 protected", || {
        let status = cluster.ftctl_at(2, &["status", "web1"]);
        status
            .stdout
            .contains("protection:     Protected")
            .then_some(status)
    });
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(
        status.stdout.contains(&format!("a running, pid {pid}")),
        "{}",
        status.stdout
    );
    let vm = cluster
        .ftctl_json(2, &["status", "web1"])
        .expect("status --json");
    assert_eq!(vm["protection"], "protected");
    assert_eq!(replica(&vm, "backup").expect("a backup")["host"], "b");

    let list = cluster.ftctl_at(0, &["list"]);
    assert!(
        list.stdout.contains("web1") && list.stdout.contains("a (running)"),
        "{list:?}"
    );

    // The console shows the guest booted.
    let console = cluster.wait_for(Duration::from_secs(10), "guest console output", || {
        std::fs::read_to_string(cluster.ftd("a").state_dir.join("web1/console.log"))
            .ok()
            .filter(|text| !text.is_empty())
    });
    assert!(!console.is_empty());
}

#[test]
fn killing_the_leader_elects_another_within_the_lease_ttl() {
    let mut cluster = TestCluster::start();
    let hosts = cluster.hosts(0).expect("hosts");
    let old = leader_of(&hosts).expect("a leader");
    let survivor = cluster
        .ftds
        .iter()
        .position(|ftd| ftd.name != old)
        .expect("another ftd");

    cluster.ftd_mut(&old).kill();
    let killed = Instant::now();
    let new = cluster.wait_for(Duration::from_secs(LEASE_TTL + 10), "a new leader", || {
        leader_of(&cluster.hosts(survivor)?).filter(|leader| *leader != old)
    });
    let took = killed.elapsed();
    eprintln!("leader {old} killed; {new} leads after {took:?} (lease TTL {LEASE_TTL} s)");
    assert!(
        took <= Duration::from_millis(LEASE_TTL * 1000 + 1000),
        "a new leader took {took:?}, more than the {LEASE_TTL} s lease TTL (+1 s polling)"
    );

    // The new leader takes changes; the dead host disappears from the host list.
    let image = guest("hello");
    let ran = cluster.ftctl_at(
        survivor,
        &[
            "create",
            "--vm",
            "after",
            "--image",
            image.to_str().expect("utf-8"),
            "--mem",
            "8M",
            "--cmdline",
            "ticks=1",
        ],
    );
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let hosts = cluster.hosts(survivor).expect("hosts");
    assert!(
        hosts.iter().all(|host| host["name"] != old.as_str()),
        "{hosts:?}"
    );
}

#[test]
fn a_restarted_ftd_readopts_its_running_replica() {
    let mut cluster = TestCluster::start();
    let pid = cluster.create_web1();
    let etcd = cluster.etcd.endpoint.clone();

    // Crash host a's ftd and bring it back: the guest must not notice.
    cluster.ftd_mut("a").kill();
    assert!(alive(pid), "ftvmm must survive its ftd");
    cluster.ftd_mut("a").start(&etcd);
    cluster.wait_for(Duration::from_secs(20), "host a to re-adopt web1", || {
        cluster
            .ftd("a")
            .log_text()
            .contains("re-adopted running replica")
            .then_some(())
    });

    assert!(alive(pid), "ftvmm must keep running across the ftd restart");
    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "web1 running with the same pid",
        || {
            let vm = cluster.ftctl_json(0, &["status", "web1"])?;
            let primary = replica(&vm, "primary")?;
            (primary["state"] == "running" && primary["pid"].as_u64() == Some(u64::from(pid)))
                .then_some(vm)
        },
    );
    assert!(
        vm["last_failover"].is_null(),
        "an ftd restart is not a failover: {vm}"
    );
    let a_console = format!("{}/web1/console.log", cluster.ftd("a").state_dir.display());
    let copies = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid) && cmdline(*pid).contains(&a_console))
        .count();
    assert_eq!(copies, 1, "the restarted ftd must not start a second ftvmm");
    // The re-adopted replica answers the restarted ftd on its control socket.
    let metrics = cluster.wait_for(
        Duration::from_secs(10),
        "the re-adopted replica's metrics",
        || {
            let text = http_get(cluster.ftd("a").metrics_port, "/metrics")?;
            text.contains("ftvmm_exit_ordinal{vm=\"web1\",replica=\"primary\"}")
                .then_some(text)
        },
    );
    parse_prometheus(&metrics).unwrap_or_else(|err| panic!("{err}\n{metrics}"));
}

#[test]
fn a_test_failover_kills_the_primary_and_is_recorded() {
    let cluster = TestCluster::start();
    let pid = cluster.create_web1();

    // Asked of host c, which forwards to the leader, which asks host a.
    let ran = cluster.ftctl_at(2, &["failover", "web1", "--test"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains(&format!("pid {pid} on a")),
        "{}",
        ran.stdout
    );
    cluster.wait_for(Duration::from_secs(10), "the primary to die", || {
        (!alive(pid)).then_some(())
    });

    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "the failover to be recorded",
        || {
            let vm = cluster.ftctl_json(1, &["status", "web1"])?;
            (!vm["last_failover"].is_null()).then_some(vm)
        },
    );
    assert_eq!(vm["last_failover"]["from_host"], "a");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    assert!(
        vm["last_failover"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signal 9")),
        "{vm}"
    );
    let events = cluster.ftctl_at(0, &["events", "--backlog", "50"]);
    assert!(events.stdout.contains("failover-test"), "{}", events.stdout);
    assert!(
        events.stdout.contains("the backup on b"),
        "{}",
        events.stdout
    );

    let metrics = cluster.wait_for(
        Duration::from_secs(10),
        "the failover in a leader's metrics",
        || {
            cluster.ftds.iter().find_map(|ftd| {
                let text = http_get(ftd.metrics_port, "/metrics")?;
                (text.contains("ftd_is_leader 1") && text.contains("ftd_failovers_total 1"))
                    .then_some(text)
            })
        },
    );
    assert!(
        metrics.contains("ftd_vms{protection=\"down\"} 0"),
        "the backup runs on as the VM: {metrics}"
    );

    // Deleting the VM removes it everywhere.
    let ran = cluster.ftctl_at(0, &["delete", "web1"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    cluster.wait_for(Duration::from_secs(10), "web1 to be gone", || {
        (cluster.ftctl_at(1, &["status", "web1"]).code == Some(1)).then_some(())
    });
}

#[test]
fn bad_requests_fail_with_one_line_errors_and_nonzero_exits() {
    let cluster = TestCluster::start();
    let image = guest("hello");
    let image = image.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 7] = [
        (&["status", "nope"], "vm nope not found"),
        (&["delete", "nope"], "vm nope not found"),
        (&["status", "Bad_Name"], "invalid VM name 'Bad_Name'"),
        (
            &["create", "--vm", "x", "--image", "/no/such.elf"],
            "image /no/such.elf not found",
        ),
        (
            &["create", "--vm", "x", "--hosts", "a,zz", "--image", image],
            "host zz is not registered",
        ),
        (
            &["create", "--vm", "x", "--hosts", "a,a", "--image", image],
            "at most 2 distinct hosts",
        ),
        (
            &["create", "--vm", "x", "--mem", "1M", "--image", image],
            "guest memory 1048576 bytes",
        ),
    ];
    for (args, expected) in cases {
        let ran = cluster.ftctl_at(1, args);
        assert_eq!(ran.code, Some(1), "ftctl {args:?}: {ran:?}");
        assert!(
            ran.stderr.starts_with("ftctl: ") && ran.stderr.contains(expected),
            "ftctl {args:?}: {ran:?}"
        );
        assert_eq!(
            ran.stderr.trim_end().lines().count(),
            1,
            "one line: {ran:?}"
        );
    }

    // Nothing listens on this port: exit 69 (unavailable).
    let ran = run(Command::new(binary("ftctl")).args([
        "--endpoint",
        &format!("127.0.0.1:{}", free_port()),
        "list",
    ]));
    assert_eq!(ran.code, Some(69), "{ran:?}");
    assert!(
        ran.stderr.starts_with("ftctl: cannot reach ftd at"),
        "{ran:?}"
    );

    // Concurrent creates of one name: exactly one wins.
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let endpoint = cluster.ftds[i].endpoint();
            let image = image.to_owned();
            std::thread::spawn(move || {
                run(Command::new(binary("ftctl")).args([
                    "--endpoint",
                    &endpoint,
                    "create",
                    "--vm",
                    "race",
                    "--image",
                    &image,
                    "--mem",
                    "8M",
                    "--cmdline",
                    "ticks=1",
                ]))
            })
        })
        .collect();
    let results: Vec<Ran> = handles
        .into_iter()
        .map(|h| h.join().expect("join"))
        .collect();
    let winners = results.iter().filter(|ran| ran.code == Some(0)).count();
    assert_eq!(winners, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|ran| ran.code != Some(0))
            .all(|ran| ran.stderr.contains("vm race already exists")),
        "{results:?}"
    );

    // That guest (ticks=1) powers off at once: a clean stop, not a failover.
    let vm = cluster.wait_for(Duration::from_secs(20), "race to power off", || {
        let vm = cluster.ftctl_json(0, &["status", "race"])?;
        vm["reason"]
            .as_str()?
            .contains("the guest powered off")
            .then_some(vm)
    });
    assert!(
        vm["last_failover"].is_null(),
        "a power-off is not a failover: {vm}"
    );
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

#[test]
fn a_pair_is_protected_and_its_backup_goes_live_when_the_primary_dies() {
    let cluster = TestCluster::start();
    let primary = cluster.create_web1();

    let vm = cluster.wait_protected();
    // Protected is the primary's own word: its control socket says protected=1.
    let primary_status = unix_request(&control_socket(&cluster, "a", 1), b"status\n")
        .expect("the primary answers on its control socket");
    assert!(
        primary_status.contains(" role=primary ") && primary_status.contains(" protected=1 "),
        "{primary_status}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events.stdout.contains("web1 is protected"),
        "{}",
        events.stdout
    );
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup process on b");
    assert_eq!(
        replica(&vm, "backup").expect("a backup replica")["pid"].as_u64(),
        Some(u64::from(backup)),
        "{vm}"
    );
    let primary_cmdline = cmdline(primary);
    let backup_cmdline = cmdline(backup);
    for (text, role, endpoint) in [
        (&primary_cmdline, "primary", "--log-listen"),
        (&backup_cmdline, "backup", "--log-connect"),
    ] {
        assert!(
            flag(text, "--vm") == Some("web1")
                && flag(text, "--generation") == Some("1")
                && flag(text, "--arbiter")
                    .is_some_and(|spec| spec.starts_with("etcd://127.0.0.1:"))
                && flag(text, "--role") == Some(role)
                && flag(text, endpoint).is_some_and(|addr| addr.starts_with("127.0.0.1:"))
                && flag(text, "--clone-listen").is_some_and(|addr| addr.starts_with("127.0.0.1:")),
            "{text}"
        );
    }
    assert!(replica_pid(&cluster, "c", "primary").is_none());

    // The primary's control socket says how far the backup trails and how fast the log
    // flows; ftd c runs neither replica, so it asks host a's ftd.
    let live = cluster.wait_for(Duration::from_secs(15), "lag and bandwidth", || {
        let vm = cluster.ftctl_json(2, &["status", "web1"])?;
        (vm["log_bytes_per_second"].as_u64()? > 0).then_some(vm)
    });
    assert!(live["backup_lag_exits"].is_u64(), "{live}");
    assert!(live["backup_lag_ms"].is_u64(), "{live}");
    assert!(live["log_bytes_total"].as_u64() > Some(0), "{live}");
    let human = cluster.ftctl_at(0, &["status", "web1"]);
    assert!(human.stdout.contains(" B/s ("), "{human:?}");
    // Each host's /metrics re-exports its replica's ftvmm_ metrics with vm and replica
    // labels, as valid Prometheus text next to ftd's own.
    for (host, role) in [("a", "primary"), ("b", "backup")] {
        let text = http_get(cluster.ftd(host).metrics_port, "/metrics").expect("/metrics");
        let samples = parse_prometheus(&text).unwrap_or_else(|err| panic!("{err}\n{text}"));
        let labels = format!("vm=\"web1\",replica=\"{role}\",role=\"{role}\"");
        assert_eq!(sample(&samples, "ftvmm_role", &labels), Some(1.0), "{text}");
        let bytes = format!("vm=\"web1\",replica=\"{role}\"");
        assert!(
            sample(&samples, "ftvmm_log_bytes_total", &bytes).is_some_and(|n| n > 0.0),
            "{text}"
        );
        assert!(
            sample(&samples, "ftd_replicas_running", "") == Some(1.0),
            "{text}"
        );
        assert_eq!(text.matches("# TYPE ftvmm_role ").count(), 1, "{text}");
    }
    let a_metrics = http_get(cluster.ftd("a").metrics_port, "/metrics").expect("/metrics");
    assert!(
        a_metrics.contains(
            "ftvmm_output_hold_seconds_bucket{vm=\"web1\",replica=\"primary\",le=\"+Inf\"}"
        ),
        "{a_metrics}"
    );
    // Kill the primary's ftvmm (not its ftd): the backup wins the claim and runs on.
    let _ = Command::new("kill")
        .args(["-9", &primary.to_string()])
        .status();
    let b_log = cluster.ftd("b").state_dir.join("web1/ftvmm.log");
    cluster.wait_for(Duration::from_secs(20), "the backup to go live", || {
        std::fs::read_to_string(&b_log)
            .ok()?
            .contains("won the go-live claim")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(backup), "the backup must run on as the VM");
    let vm = cluster.wait_for(
        Duration::from_secs(10),
        "the failover to be recorded",
        || {
            let vm = cluster.ftctl_json(1, &["status", "web1"])?;
            (vm["last_failover"]["to_host"] == "b").then_some(vm)
        },
    );
    assert!(
        vm["last_failover"]["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("the backup on b went live")),
        "{vm}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events
            .stdout
            .contains("web1: primary exited on a (signal 9); the backup on b went live"),
        "{}",
        events.stdout
    );
    // The replica that went live is the primary now (the same process), and goes on
    // serving: the leader clones a new backup from it next (see the test below).
    let b_metrics = cluster.wait_for(
        Duration::from_secs(10),
        "b's replica relabelled primary",
        || {
            let text = http_get(cluster.ftd("b").metrics_port, "/metrics")?;
            text.contains("ftvmm_go_live_seconds{vm=\"web1\",replica=\"primary\"}")
                .then_some(text)
        },
    );
    assert!(alive(backup), "{b_metrics}");
}

#[test]
fn a_stalled_backup_is_not_protection_though_both_processes_run() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup process on b");
    // Frozen, the backup still runs as far as its ftd can see, but it follows nothing:
    // the primary declares it lost after 2 s of silence and runs on alone.
    let stopped = run(Command::new("kill").args(["-STOP", &backup.to_string()]));
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    let vm = cluster.wait_for(Duration::from_secs(15), "web1 not protected", || {
        let vm = cluster.ftctl_json(1, &["status", "web1"])?;
        (vm["protection"] == "not_protected").then_some(vm)
    });
    let _ = run(Command::new("kill").args(["-KILL", &backup.to_string()]));
    assert_eq!(
        vm["reason"], "need secondary: the primary on a lost its backup on b",
        "{vm}"
    );
    assert_eq!(
        replica(&vm, "backup").expect("a backup replica")["state"],
        "running",
        "the backup process was still there: {vm}"
    );
    let human = cluster.ftctl_at(0, &["status", "web1"]);
    assert!(
        human
            .stdout
            .contains("protection:     Not protected: need secondary"),
        "{human:?}"
    );
    let events = cluster.ftctl_at(2, &["events", "--backlog", "50"]);
    assert!(
        events
            .stdout
            .contains("web1 is not protected: need secondary"),
        "{}",
        events.stdout
    );
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

#[test]
fn after_each_failover_a_new_backup_is_cloned_from_the_survivor() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();

    // First failover: the primary on a is killed; b's replica goes live, the leader makes
    // it the primary (the same process, replica 2) and clones a new backup from it as
    // generation 2 onto c (a new backup avoids the host the failover came from).
    let killed = cluster.ftctl_at(2, &["failover", "web1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    let vm = protected_by_a_clone(&cluster, "b", "c");
    let primary = replica(&vm, "primary").expect("primary");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (primary["id"].as_u64(), primary["generation"].as_u64()),
        (Some(2), Some(2)),
        "{vm}"
    );
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(3), Some(2)),
        "{vm}"
    );
    assert_eq!(vm["last_failover"]["from_host"], "a", "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    let clone = replica_pid(&cluster, "c", "backup").expect("the clone runs on c");
    let clone_cmdline = cmdline(clone);
    assert!(
        flag(&clone_cmdline, "--generation") == Some("2")
            && flag(&clone_cmdline, "--role") == Some("backup")
            && flag(&clone_cmdline, "--clone-from")
                .is_some_and(|addr| addr.starts_with("127.0.0.1:"))
            && flag(&clone_cmdline, "--clone-listen")
                .is_some_and(|addr| addr.starts_with("127.0.0.1:")),
        "{clone_cmdline}"
    );
    // The primary on b says so itself: generation 2, protected.
    let b_socket = control_socket(&cluster, "b", 2);
    let b_status = unix_request(&b_socket, b"status\n").expect("b's replica answers");
    assert!(
        b_status.contains(" role=primary ")
            && b_status.contains(" generation=2 ")
            && b_status.contains(" protected=1 "),
        "{b_status}"
    );
    let events = cluster.ftctl_at(1, &["events", "--backlog", "100"]);
    for kind in ["failover", "promoted", "backup-placed", "protected"] {
        assert!(
            events.stdout.contains(&format!(" {kind} ")),
            "{kind}: {}",
            events.stdout
        );
    }

    // Second failover: the clone on c takes over (claim of generation 2) and a new backup
    // is cloned from it onto a (named in --hosts; b is where the failover came from),
    // generation 3. The guest never stopped running.
    let before = exit_ordinal(&b_socket).expect("b's exit ordinal");
    let killed = cluster.ftctl_at(0, &["failover", "web1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    assert!(killed.stdout.contains(" on b)"), "{killed:?}");
    let vm = protected_by_a_clone(&cluster, "c", "a");
    let primary = replica(&vm, "primary").expect("primary");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (primary["id"].as_u64(), primary["generation"].as_u64()),
        (Some(3), Some(3)),
        "{vm}"
    );
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(4), Some(3)),
        "{vm}"
    );
    assert_eq!(vm["last_failover"]["from_host"], "b", "{vm}");
    let after = exit_ordinal(&control_socket(&cluster, "c", 3)).expect("c's exit ordinal");
    assert!(after > before, "the guest ran on: {before} -> {after}");
    // b runs only the new backup: the killed replica's files are gone.
    assert!(
        !cluster
            .ftd("b")
            .state_dir
            .join("web1/replica-2.pid")
            .exists(),
        "the dead replica 2 is forgotten on b"
    );
}

#[test]
fn restart_backup_clones_a_fresh_backup_from_the_running_primary() {
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let old_backup = replica_pid(&cluster, "b", "backup").expect("a backup on b");

    let ran = cluster.ftctl_at(2, &["restart-backup", "web1", "--wait", "60"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("web1 is protected again after")
            && ran.stdout.contains("backup on b (replica 3, generation 2)"),
        "{ran:?}"
    );
    let vm = protected_by_a_clone(&cluster, "a", "b");
    assert_eq!(replica(&vm, "primary").expect("primary")["id"], 1, "{vm}");
    assert!(
        vm["last_failover"].is_null(),
        "a restart is not a failover: {vm}"
    );
    cluster.wait_for(Duration::from_secs(10), "the old backup to end", || {
        (!alive(old_backup)).then_some(())
    });
    let events = cluster.ftctl_at(0, &["events", "--backlog", "100"]);
    assert!(
        events.stdout.contains(" backup-restart "),
        "{}",
        events.stdout
    );

    // An unknown VM is a one-line error.
    let unknown = cluster.ftctl_at(1, &["restart-backup", "nope"]);
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(unknown.stderr.contains("nope"), "{unknown:?}");
}

#[test]
fn when_the_backups_host_dies_a_new_backup_is_cloned_onto_another_host() {
    let mut cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let backup = replica_pid(&cluster, "b", "backup").expect("a backup on b");

    // Host b dies: its ftd and its replica, nothing cleaned up. The primary loses its
    // backup at once; the leader sees host b down when its lease ends, and clones a new
    // backup from the running primary onto c, the only other live host.
    cluster.ftd_mut("b").kill();
    let _ = run(Command::new("kill").args(["-KILL", &backup.to_string()]));
    let vm = protected_by_a_clone(&cluster, "a", "c");
    let backup = replica(&vm, "backup").expect("backup");
    assert_eq!(
        (backup["id"].as_u64(), backup["generation"].as_u64()),
        (Some(3), Some(2)),
        "{vm}"
    );
    assert!(
        vm["last_failover"].is_null(),
        "a lost backup is not a failover: {vm}"
    );
    let events = cluster.ftctl_at(0, &["events", "--backlog", "100"]);
    assert!(
        events
            .stdout
            .contains("web1: new backup on c, cloned from the running primary on a"),
        "{}",
        events.stdout
    );
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

#[test]
fn a_vm_deleted_after_a_failover_and_created_again_fails_over_as_a_new_life() {
    let cluster = TestCluster::start();
    cluster.create_vm("w1");
    cluster.wait_vm_protected("w1");
    let old_uid = spec_uid(&cluster, "w1");
    let old_claims = format!("/ft/vms/w1/uid/{old_uid}/");

    // One failover: the backup on b wins generation 1's claim and a clone on c follows it.
    let killed = cluster.ftctl_at(2, &["failover", "w1", "--test"]);
    assert_eq!(killed.code, Some(0), "{killed:?}");
    vm_protected_by_a_clone(&cluster, "w1", "b", "c");
    assert!(
        !cluster.keys_under(&old_claims).is_empty(),
        "the first life's go-live claim is stored"
    );

    // Deleted: gone from the API, then everything of that life, its claims included.
    let ran = cluster.ftctl_at(0, &["delete", "w1"]);
    assert_eq!(ran.code, Some(0), "{ran:?}");
    cluster.wait_for(Duration::from_secs(20), "w1 to be gone", || {
        (cluster.ftctl_at(1, &["status", "w1"]).code == Some(1)).then_some(())
    });
    cluster.wait_for(
        Duration::from_secs(20),
        "every key of the deleted w1 to be removed",
        || cluster.keys_under("/ft/vms/w1/").is_empty().then_some(()),
    );
    let deleted_at = cluster
        .events()
        .iter()
        .rev()
        .find(|event| event["kind"] == "vm-deleted" && event["vm"] == "w1")
        .and_then(|event| event["seq"].as_u64())
        .expect("a vm-deleted event");

    // Created again: a new life, whose pair claims afresh.
    let primary = cluster.create_vm("w1");
    cluster.wait_vm_protected("w1");
    let new_uid = spec_uid(&cluster, "w1");
    assert_ne!(new_uid, old_uid);
    let before_kill = events_of_after(&cluster.events(), "w1", deleted_at);
    for event in &before_kill {
        assert!(
            !["failover", "promoted", "backup-placed"]
                .contains(&event["kind"].as_str().unwrap_or("")),
            "nothing of the old life may act on the new one: {before_kill:?}"
        );
    }

    // kill -9 of the new primary: the backup on b goes live, is promoted and gets a clone.
    let _ = Command::new("kill")
        .args(["-9", &primary.to_string()])
        .status();
    let vm = vm_protected_by_a_clone(&cluster, "w1", "b", "c");
    assert_eq!(vm["last_failover"]["from_host"], "a", "{vm}");
    assert_eq!(vm["last_failover"]["to_host"], "b", "{vm}");
    let after = events_of_after(&cluster.events(), "w1", deleted_at);
    let failovers: Vec<&Value> = after
        .iter()
        .filter(|event| event["kind"] == "failover")
        .collect();
    assert_eq!(failovers.len(), 1, "{after:?}");
    assert!(
        failovers[0]["message"].as_str().is_some_and(
            |text| text.contains("primary exited on a (signal 9); the backup on b went live")
        ),
        "{after:?}"
    );
    let promoted: Vec<&Value> = after
        .iter()
        .filter(|event| event["kind"] == "promoted")
        .collect();
    assert_eq!(promoted.len(), 1, "{after:?}");
    assert!(
        promoted[0]["message"]
            .as_str()
            .is_some_and(|text| text.ends_with("(generation 1)")),
        "the new life's pair starts at generation 1: {after:?}"
    );
    assert!(
        cluster.keys_under(&old_claims).is_empty(),
        "no claim of the old life is back"
    );
    assert!(
        !cluster
            .keys_under(&format!("/ft/vms/w1/uid/{new_uid}/"))
            .is_empty(),
        "the new life's claim is stored"
    );
}

/// What etcd holds under `key` (empty if nothing).
fn stored(cluster: &TestCluster, key: &str) -> String {
    cluster
        .etcdctl(&["get", "--print-value-only", key])
        .trim()
        .to_owned()
}

#[test]
fn an_etcd_outage_is_not_taken_for_host_deaths() {
    const FREEZE: Duration = Duration::from_secs(15);
    let cluster = TestCluster::start();
    cluster.create_web1();
    cluster.wait_protected();
    let primary = replica_pid(&cluster, "a", "primary").expect("the primary on a");
    let backup = replica_pid(&cluster, "b", "backup").expect("the backup on b");
    let assignments = ["primary", "backup"]
        .map(|role| stored(&cluster, &format!("/ft/vms/web1/replicas/{role}")));
    let last_before = cluster
        .events()
        .last()
        .and_then(|event| event["seq"].as_u64())
        .expect("events");

    // etcd freezes for 15 s: every lease (TTL 3 s) runs out meanwhile.
    let etcd = cluster.etcd.pid().to_string();
    let stopped = run(Command::new("kill").args(["-STOP", &etcd]));
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    let frozen = Instant::now();
    std::thread::sleep(FREEZE);
    let resumed = run(Command::new("kill").args(["-CONT", &etcd]));
    assert_eq!(resumed.code, Some(0), "{resumed:?}");
    let back = Instant::now();

    // The cluster answers again with its three hosts and a leader.
    cluster.wait_for(
        Duration::from_secs(30),
        "three hosts and a leader again",
        || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 3 && leader_of(&hosts).is_some()).then_some(())
        },
    );
    let settled = back.elapsed();
    // Time for a wrong conclusion to show: three lease TTLs more.
    std::thread::sleep(Duration::from_secs(3 * LEASE_TTL));
    let events: Vec<Value> = cluster
        .events()
        .into_iter()
        .filter(|event| event["seq"].as_u64() > Some(last_before))
        .collect();
    eprintln!(
        "etcd frozen {:?}; cluster answering {settled:?} after SIGCONT; events since the freeze:",
        back - frozen
    );
    for event in &events {
        eprintln!(
            "  {} {:<12} {}",
            event["seq"],
            event["kind"].as_str().unwrap_or(""),
            event["message"].as_str().unwrap_or("")
        );
    }
    let named: Vec<&Value> = events
        .iter()
        .filter(|event| {
            event["message"]
                .as_str()
                .is_some_and(|text| text.contains("etcd unavailable for"))
        })
        .collect();
    assert!(
        named.len() == 1 && named[0]["kind"] == "store-outage",
        "the outage has one event of its own: {events:#?}"
    );
    for event in &events {
        let kind = event["kind"].as_str().unwrap_or("");
        assert!(
            ![
                "host-down",
                "failover",
                "promoted",
                "backup-placed",
                "unprotected"
            ]
            .contains(&kind),
            "an etcd outage is no host death: {event}\n{events:#?}"
        );
    }
    let vm = cluster.ftctl_json(0, &["status", "web1"]).expect("status");
    assert_eq!(vm["protection"], "protected", "{vm}");
    assert!(vm["last_failover"].is_null(), "{vm}");
    assert_eq!(
        ["primary", "backup"]
            .map(|role| stored(&cluster, &format!("/ft/vms/web1/replicas/{role}"))),
        assignments,
        "the assignments (hosts, replica numbers, generation) are unchanged"
    );
    assert_eq!(replica_pid(&cluster, "a", "primary"), Some(primary));
    assert_eq!(replica_pid(&cluster, "b", "backup"), Some(backup));
    assert!(alive(primary) && alive(backup));
}

#[test]
fn ftds_started_before_etcd_wait_for_it_and_then_form_the_cluster() {
    let lock = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Where etcd will be, once it is started: nothing answers there yet.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut ftds = three_ftds();
    for ftd in &mut ftds {
        ftd.start(&endpoint);
    }
    std::thread::sleep(Duration::from_secs(2));
    for ftd in &mut ftds {
        let running = ftd
            .child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        assert!(
            running,
            "ftd {} gave up without etcd:\n{}",
            ftd.name,
            ftd.log_text()
        );
        assert!(
            ftd.log_text().contains("trying again"),
            "{}",
            ftd.log_text()
        );
    }
    let cluster = TestCluster {
        etcd: LocalEtcd::start_on(port),
        ftds,
        _lock: lock,
    };
    cluster.wait_for(
        Duration::from_secs(20),
        "three hosts and a leader once etcd is up",
        || {
            let hosts = cluster.hosts(0)?;
            (hosts.len() == 3 && leader_of(&hosts).is_some()).then_some(())
        },
    );
}
