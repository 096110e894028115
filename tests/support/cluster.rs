//! A throwaway ftvm cluster on one machine, for the demo (`cargo xtask demo` and its test)
//! and `cargo xtask bench control`:
//! the hosts of a [`Lan`] (network namespaces on one bridge, etcd inside the lan
//! namespace), one `ftd` per host with a config file of its own, and `ftctl` run from
//! the client namespace. Dropping it kills the ftds and every ftvmm they started, then
//! the LAN (etcd, namespaces) goes; a SIGINT or SIGTERM makes the waits fail, so that
//! this happens on Ctrl-C too.

use crate::{alive, in_netns, pid_files, run, Lan, Ran, GUEST_MAC};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A cluster task failed; the message says what was waited for or what broke.
#[derive(Debug)]
pub struct Failure(String);

impl Failure {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Failure(message.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where every ftd serves gRPC and /metrics on its host's LAN address.
const GRPC_PORT: u16 = 7700;
const METRICS_PORT: u16 = 9700;

/// The release binaries a cluster runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The VMM.
    pub ftvmm: PathBuf,
    /// The host agent.
    pub ftd: PathBuf,
    /// The operator CLI.
    pub ftctl: PathBuf,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag that [`check_interrupted`] turns into a failure,
/// so a Ctrl-C unwinds through the drops that clean up instead of leaving namespaces.
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once SIGINT or SIGTERM arrived.
pub fn check_interrupted() -> Result<(), Failure> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Failure::new("interrupted: cleaning up"))
    } else {
        Ok(())
    }
}

/// The replica of `role` (`primary`, `backup`) in an `ftctl status --json` answer.
pub fn replica_of<'a>(status: &'a serde_json::Value, role: &str) -> Option<&'a serde_json::Value> {
    status["replicas"]
        .as_array()?
        .iter()
        .find(|replica| replica["role"] == role)
}

/// Milliseconds since the Unix epoch (event times are in these).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Polls `check` every `every` until it gives a value, failing after `timeout` (with
/// `what` in the message) or on an interrupt.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(Failure::new(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        std::thread::sleep(every);
    }
}

/// One host's ftd.
struct Ftd {
    host: String,
    config: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
    pid: Option<u32>,
}

/// etcd, the hosts and their ftds. Fields drop after [`Drop::drop`] has killed the
/// processes that live outside the LAN's bookkeeping (the ftvmm replicas run in sessions
/// of their own, on purpose).
pub struct Cluster {
    ftds: Vec<Ftd>,
    bins: Binaries,
    dir: PathBuf,
    /// The LAN: hosts, client namespace, etcd.
    pub lan: Lan,
}

impl Cluster {
    /// Builds the LAN `tag` with `hosts`, writes a config per host into `dir` and starts
    /// every ftd (lease TTL `lease_ttl` seconds); returns once `ftctl hosts` lists them
    /// all with a leader.
    pub fn start(
        tag: &str,
        hosts: &[&str],
        bins: Binaries,
        dir: &Path,
        lease_ttl: u64,
    ) -> Result<Cluster, Failure> {
        let lan = Lan::without_taps(tag, hosts);
        let mut cluster = Cluster {
            ftds: Vec::new(),
            bins,
            dir: dir.to_path_buf(),
            lan,
        };
        cluster.make_credentials(hosts)?;
        for host in hosts {
            let ip = cluster.lan.ip(host);
            let state_dir = dir.join(format!("state-{host}"));
            let config = dir.join(format!("ftd-{host}.toml"));
            let text = format!(
                "host_name = \"{host}\"\nlisten = \"{ip}:{GRPC_PORT}\"\n\
                 metrics_listen = \"{ip}:{METRICS_PORT}\"\netcd = [\"http://{etcd}\"]\n\
                 state_dir = \"{state}\"\nftvmm = \"{ftvmm}\"\nlease_ttl = {lease_ttl}\n\
                 log_listen_ip = \"{ip}\"\nimage_dirs = [\"{images}\"]\n\
                 disk_dirs = [\"{disks}\"]\nreplica_user = \"nobody\"\n\
                 tls_dir = \"{tls}\"\nbridge = \"br0\"\n",
                etcd = cluster.lan.etcd(),
                state = state_dir.display(),
                ftvmm = cluster.bins.ftvmm.display(),
                images = crate::project_root().join("target/guest").display(),
                disks = dir.display(),
                tls = cluster.credentials(&format!("host-{host}")).display(),
            );
            std::fs::write(&config, text)
                .map_err(|err| Failure::new(format!("{}: {err}", config.display())))?;
            cluster.ftds.push(Ftd {
                host: (*host).to_owned(),
                config,
                log: dir.join(format!("ftd-{host}.log")),
                state_dir,
                pid: None,
            });
        }
        for host in hosts {
            cluster.start_ftd(host)?;
        }
        cluster.wait_for_hosts(hosts.len())?;
        Ok(cluster)
    }

    /// A cluster CA and credentials for every host, an operator (what [`Cluster::ftctl`]
    /// uses) and a viewer, made with `ftctl certs` as an administrator would.
    fn make_credentials(&self, hosts: &[&str]) -> Result<(), Failure> {
        let pki = self.dir.join("pki");
        let ca = pki.join("ca");
        let certs = |args: &[&std::ffi::OsStr]| {
            let ran = run(Command::new(&self.bins.ftctl).arg("certs").args(args));
            if ran.code == Some(0) {
                Ok(())
            } else {
                Err(Failure::new(format!(
                    "ftctl certs {args:?}: {}",
                    ran.stderr
                )))
            }
        };
        certs(&["init".as_ref(), "--dir".as_ref(), ca.as_os_str()])?;
        let mut people = vec![
            ("--operator", "ops".to_owned(), "operator".to_owned()),
            ("--viewer", "watcher".to_owned(), "viewer".to_owned()),
        ];
        people.extend(
            hosts
                .iter()
                .map(|host| ("--host", (*host).to_owned(), format!("host-{host}"))),
        );
        for (role, name, out) in people {
            let out = pki.join(out);
            certs(&[
                "issue".as_ref(),
                "--dir".as_ref(),
                ca.as_os_str(),
                role.as_ref(),
                name.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ])?;
        }
        Ok(())
    }

    /// The credentials directory of `who`: "operator", "viewer" or "host-<name>".
    pub fn credentials(&self, who: &str) -> PathBuf {
        self.dir.join("pki").join(who)
    }

    fn ftd(&self, host: &str) -> Result<&Ftd, Failure> {
        self.ftds
            .iter()
            .find(|ftd| ftd.host == host)
            .ok_or_else(|| Failure::new(format!("no host {host}")))
    }

    /// Starts (again) the ftd of `host` in its namespace, its log appended to
    /// `ftd-<host>.log`.
    pub fn start_ftd(&mut self, host: &str) -> Result<(), Failure> {
        let (config, log) = {
            let ftd = self.ftd(host)?;
            (ftd.config.clone(), ftd.log.clone())
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|err| Failure::new(format!("{}: {err}", log.display())))?;
        let mut command = self.lan.host(host).command(&self.bins.ftd);
        command
            .arg("--config")
            .arg(&config)
            .env_remove("FTD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let pid = self.lan.spawn_on(host, &mut command);
        if let Some(ftd) = self.ftds.iter_mut().find(|ftd| ftd.host == host) {
            ftd.pid = Some(pid);
        }
        Ok(())
    }

    /// Waits until `ftctl hosts` lists `count` hosts and one of them leads; its name.
    pub fn wait_for_hosts(&self, count: usize) -> Result<String, Failure> {
        let any = self
            .ftds
            .iter()
            .map(|ftd| ftd.host.clone())
            .collect::<Vec<_>>();
        wait_for(
            Duration::from_secs(30),
            Duration::from_millis(100),
            &format!("{count} ftds registered with a leader"),
            || {
                any.iter().find_map(|host| {
                    let hosts = self.ftctl_json(host, &["hosts"])?;
                    let hosts = hosts.as_array()?;
                    (hosts.len() == count).then(|| leader_of(hosts))?
                })
            },
        )
        .map_err(|err| Failure::new(format!("{err}\n{}", self.logs())))
    }

    /// The ftd process of `host`, if it runs.
    pub fn ftd_pid(&self, host: &str) -> Option<u32> {
        self.ftd(host).ok()?.pid
    }

    /// Kills (SIGKILL) the ftd of `host`, as a crash would.
    pub fn kill_ftd(&mut self, host: &str) {
        let pid = self
            .ftds
            .iter_mut()
            .find(|ftd| ftd.host == host)
            .and_then(|ftd| ftd.pid.take());
        if let Some(pid) = pid {
            self.lan.kill_on(host, pid);
        }
    }

    /// Kills (SIGKILL) every ftvmm that `host`'s ftd started (their pid files).
    pub fn kill_replicas(&self, host: &str) -> Vec<u32> {
        let Ok(ftd) = self.ftd(host) else {
            return Vec::new();
        };
        let pids: Vec<u32> = pid_files(&ftd.state_dir)
            .into_iter()
            .filter(|pid| alive(*pid))
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) on a pid read from the ftd's pid file, checked alive above.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        pids
    }

    /// `ftctl --endpoint <host's ftd> args...`, run from the client namespace.
    pub fn ftctl(&self, host: &str, args: &[&str]) -> Ran {
        let mut command = Command::new(&self.bins.ftctl);
        command
            .args(["--endpoint", &format!("{}:{GRPC_PORT}", self.lan.ip(host))])
            .arg("--tls-dir")
            .arg(self.credentials("operator"))
            .args(args)
            .env_remove("FTCTL_ENDPOINT")
            .env_remove("FTCTL_TLS_DIR")
            .env_remove("FTCTL_INSECURE");
        // A thread in the client namespace: the ftctl it starts lives there too, without
        // the cost of `ip netns exec` in what the bench measures.
        in_netns(&self.lan.client.name, move || run(&mut command))
    }

    /// `ftctl --json args...` against `host`'s ftd; `None` unless it succeeds.
    pub fn ftctl_json(&self, host: &str, args: &[&str]) -> Option<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let ran = self.ftctl(host, &with_json);
        if ran.code != Some(0) {
            return None;
        }
        serde_json::from_str(&ran.stdout).ok()
    }

    /// `ftctl` against `host`'s ftd, failing unless it exits 0; its stdout.
    pub fn ftctl_ok(&self, host: &str, args: &[&str]) -> Result<String, Failure> {
        let ran = self.ftctl(host, args);
        if ran.code == Some(0) {
            Ok(ran.stdout)
        } else {
            Err(Failure::new(format!(
                "ftctl {} failed ({:?}): {}",
                args.join(" "),
                ran.code,
                ran.stderr.trim()
            )))
        }
    }

    /// The resident set of `host`'s ftd in KiB (`VmRSS` in /proc).
    pub fn ftd_rss_kib(&self, host: &str) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.ftd_pid(host)?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The log (stderr) of the ftvmm replicas of `vm` that `host`'s ftd ran.
    pub fn replica_log(&self, host: &str, vm: &str) -> Result<PathBuf, Failure> {
        Ok(self.ftd(host)?.state_dir.join(vm).join("ftvmm.log"))
    }

    /// Every ftd's log, for a failure message.
    pub fn logs(&self) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(15).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        let mut out = String::new();
        for ftd in &self.ftds {
            out.push_str(&format!(
                "--- ftd {} ({}) ---\n{}\n",
                ftd.host,
                ftd.log.display(),
                tail(&ftd.log)
            ));
            let vms = std::fs::read_dir(&ftd.state_dir)
                .into_iter()
                .flatten()
                .flatten();
            for vm in vms {
                let log = vm.path().join("ftvmm.log");
                if log.is_file() {
                    out.push_str(&format!(
                        "--- ftvmm on {} ({}) ---\n{}\n",
                        ftd.host,
                        log.display(),
                        tail(&log)
                    ));
                }
            }
        }
        out
    }

    /// The `ftctl create` arguments of VM `vm`: the kv guest `kv` as a pair with its
    /// primary on a and its backup on b, 128 MiB, a fresh 64 MiB shared disk in the
    /// scratch directory and its NIC at the LAN's guest address, on a TAP each host's ftd
    /// makes on its bridge.
    pub fn kv_create_args(&self, vm: &str, kv: &Path) -> Result<Vec<String>, Failure> {
        let disk = self.dir.join(format!("{vm}.img"));
        std::fs::File::create(&disk)
            .and_then(|file| file.set_len(64 << 20))
            .map_err(|err| Failure::new(format!("disk image {}: {err}", disk.display())))?;
        Ok(self.kv_args(vm, kv, &["--disk", &disk.display().to_string()]))
    }

    /// [`Cluster::kv_create_args`] with private disks of `size` (e.g. `64M`) instead of
    /// a shared one: each host's ftd makes its replica's.
    pub fn kv_private_create_args(&self, vm: &str, kv: &Path, size: &str) -> Vec<String> {
        self.kv_args(vm, kv, &["--disk-mode", "private", "--disk-size", size])
    }

    /// `ftctl create` of the kv guest as `vm` on a and b, with its NIC at the LAN's
    /// guest address and the disk flags `disk`.
    fn kv_args(&self, vm: &str, kv: &Path, disk: &[&str]) -> Vec<String> {
        let net = format!("mac={GUEST_MAC},ip={}/24", self.lan.guest_ip());
        let mut args: Vec<String> = [
            "create",
            "--vm",
            vm,
            "--hosts",
            "a,b",
            "--image",
            &kv.display().to_string(),
            "--mem",
            "128M",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(disk.iter().map(|arg| (*arg).to_owned()));
        args.extend(["--net".to_owned(), net]);
        args
    }

    /// The state directory of `host`'s ftd.
    pub fn state_dir(&self, host: &str) -> Result<PathBuf, Failure> {
        Ok(self.ftd(host)?.state_dir.clone())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let hosts: Vec<String> = self.ftds.iter().map(|ftd| ftd.host.clone()).collect();
        for host in &hosts {
            self.kill_ftd(host);
        }
        // The replicas outlive their ftd on purpose: kill them before their namespaces go.
        for host in &hosts {
            self.kill_replicas(host);
        }
    }
}

/// The host whose `leader` is true in `ftctl hosts --json`.
pub fn leader_of(hosts: &[Value]) -> Option<String> {
    hosts
        .iter()
        .find(|host| host["leader"] == true)
        .and_then(|host| host["name"].as_str().map(str::to_owned))
}
