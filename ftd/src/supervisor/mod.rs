//! This host's replicas: starts the ftvmm processes the leader assigns here, notices when
//! they end, stops the ones no longer assigned, and reports their state to the store.
//!
//! ftd is not in a replica's data path: ftvmm runs in a session of its own (`setsid`), so
//! it survives ftd's death, and a restarted ftd re-adopts it from the files it keeps in
//! `<state_dir>/<vm>/`.
//!
//! A VM with private disks has one disk file per replica on the replica's host,
//! `<state_dir>/disks/<vm>-<uid>-r<n>.img`, made empty before the replica starts and
//! deleted once the replica is gone from this host for good (`sync`).
//!
//! Files and processes are keyed by the replica number of the assignment, not by its role:
//! when a backup goes live the leader makes it the primary under the same number, and
//! this host keeps the process running (only its role and generation change). A replica
//! that ended is not restarted: without a backup that would be a cold reboot of the
//! guest, not fault tolerance (see docs/control-plane.md).
//!
//! The parts: `launch` builds the ftvmm command line and starts the process; `adopt`
//! keeps the files a restarted ftd re-adopts replicas from, and re-adopts them; `sync` is
//! the pass that starts and stops replicas to match the assignments and reports them;
//! `sampling` asks the replicas' control sockets for their status and metrics.

mod adopt;
mod launch;
mod marker;
mod sampling;
pub mod steer;
mod sync;
pub mod taps;
#[cfg(test)]
mod testing;

pub use launch::{probe_backup_capable, probe_cpu, run_args, ReplicaFiles};
pub use sync::SyncSummary;

use crate::model::{Assignment, HostName, Role, VmName};
use crate::store::{LeaseId, Store, StoreError};
use sampling::Samples;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use sync::Reported;
use tokio::sync::{watch, Mutex, Notify};

/// How long ftd waits for a replica's control socket to answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_millis(500);

/// A supervisor operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The state directory cannot be used.
    #[error("cannot use state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[from] StoreError),
    /// No running replica to stop.
    #[error("no running {role} of vm {vm} on this host")]
    NotRunning {
        /// The VM.
        vm: VmName,
        /// The role.
        role: Role,
    },
    /// Sending the signal failed.
    #[error("cannot kill pid {pid}")]
    Kill {
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where and how this host runs replicas.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This host.
    pub host: HostName,
    /// Root of the per-VM directories.
    pub state_dir: PathBuf,
    /// The ftvmm binary.
    pub ftvmm: PathBuf,
    /// The go-live arbiter passed to paired replicas (`--arbiter`): `etcd://HOST:PORT,...`
    /// or `local:DIR`.
    pub arbiter: String,
    /// Where the id of the cluster this host belongs to is remembered
    /// (`<state_dir>/cluster-id`); `None` to remember it only in memory (the in-process
    /// store lives no longer than ftd).
    pub cluster_id_file: Option<PathBuf>,
    /// The user replicas run as once set up (`--run-as`), if any.
    pub replica_user: Option<String>,
    /// The replicas' system call filter (`--seccomp`).
    pub replica_seccomp: ftvm_contract::flags::SeccompMode,
    /// The host credentials the replicas secure their log and clone channels with
    /// (`--tls-dir`); `None`: plaintext (`--insecure`).
    pub replica_tls_dir: Option<PathBuf>,
    /// How the replicas' etcd arbiter reaches etcd (`--etcd-tls-dir`, `--etcd-user`,
    /// `--etcd-password-file`).
    pub replica_etcd: crate::config::EtcdSetting,
    /// Where the TAPs this ftd makes go (`None`: it makes none).
    pub bridge: Option<taps::Bridge>,
    /// Where images and disks may come from on this host: a private disk's starting
    /// image is checked here too (the leader checked its own view).
    pub paths: crate::paths::PathPolicy,
}

/// A replica process this ftd started or re-adopted.
#[derive(Debug)]
struct Local {
    uid: String,
    /// The role of the assignment it serves now (a backup made primary changes).
    role: Role,
    /// The generation of that assignment.
    generation: u64,
    pid: u32,
    start_time: u64,
    /// Set when the process ended (by the waiter of a child, or by polling /proc for an
    /// adopted process).
    exit: Arc<std::sync::Mutex<Option<Ended>>>,
    child: bool,
    /// Whether a backup being replaced was asked to stop (or refused: it went live), or
    /// a primary handing over was asked to stop; reset when the role changes.
    retire_settled: bool,
}

/// How a replica ended: a description, and the exit status if it exited normally.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ended {
    how: String,
    code: Option<i32>,
}

impl Ended {
    fn unknown(how: &str) -> Self {
        Self {
            how: how.to_owned(),
            code: None,
        }
    }
}

impl Local {
    fn exit(&self) -> Option<Ended> {
        self.exit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_exit(&self, how: Ended) {
        *self
            .exit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(how);
    }

    /// Whether this is the process `assignment` names (its role and generation may have
    /// changed since it started).
    fn matches(&self, key: &ReplicaKey, assignment: &Assignment) -> bool {
        self.uid == assignment.uid && key.1 == assignment.replica
    }
}

/// A replica process: its VM and replica number.
type ReplicaKey = (VmName, u64);

/// Supervises this host's replicas.
pub struct Supervisor {
    config: SupervisorConfig,
    store: Arc<dyn Store>,
    lease: watch::Receiver<LeaseId>,
    locals: Mutex<BTreeMap<ReplicaKey, Local>>,
    /// The last report put for each replica (without its stamp), under which lease, and
    /// when.
    reported: Mutex<BTreeMap<ReplicaKey, Reported>>,
    samples: std::sync::Mutex<BTreeMap<ReplicaKey, Samples>>,
    /// Primaries here whose backup assignment is gone, retiring or not of their
    /// generation (a restart-backup, a backup lost): their status is about to change
    /// (they notice and run alone), so it is sampled at every pass.
    unpaired: std::sync::Mutex<BTreeSet<ReplicaKey>>,
    /// The cluster this host belongs to (`None` until [`Supervisor::join_cluster`]).
    cluster_id: std::sync::Mutex<Option<String>>,
    /// Whether the store answered as another cluster's (or as none) at the last pass.
    foreign_store: std::sync::atomic::AtomicBool,
    /// Running replicas whose VM vanished from the store without the traces a deletion
    /// leaves (this host's own report of it gone though its lease lives on): left as
    /// they are until the store says something about their VM again.
    vanished: std::sync::Mutex<BTreeSet<ReplicaKey>>,
    /// Replicas asked to stop (or killed) that may not have ended yet, by the file name
    /// of their private disk: the pid and start time of the process. Their disks stay
    /// until the process is gone.
    ending: std::sync::Mutex<BTreeMap<String, (u32, u64)>>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The file name of a private disk (see [`Supervisor::private_disk_path`]).
fn disk_file_name(vm: &VmName, uid: &str, replica: u64) -> String {
    format!("{vm}-{uid}-r{replica}.img")
}

/// The start time (clock ticks since boot) of `pid` if it is alive and not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn cmdline_has(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| raw.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
        .unwrap_or(false)
}

impl Supervisor {
    /// A supervisor writing reports under the lease currently in `lease`; `wake` is
    /// notified when a replica ends.
    pub fn new(
        config: SupervisorConfig,
        store: Arc<dyn Store>,
        lease: watch::Receiver<LeaseId>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            config,
            store,
            lease,
            locals: Mutex::new(BTreeMap::new()),
            reported: Mutex::new(BTreeMap::new()),
            samples: std::sync::Mutex::default(),
            unpaired: std::sync::Mutex::default(),
            cluster_id: std::sync::Mutex::default(),
            foreign_store: std::sync::atomic::AtomicBool::new(false),
            vanished: std::sync::Mutex::default(),
            ending: std::sync::Mutex::default(),
            wake,
        }
    }

    fn vm_dir(&self, vm: &VmName) -> PathBuf {
        self.config.state_dir.join(vm.as_str())
    }

    fn console_path(&self, vm: &VmName) -> PathBuf {
        self.vm_dir(vm).join("console.log")
    }

    /// Where replica number `replica` of `vm` serves its control socket.
    pub fn control_path(&self, vm: &VmName, replica: u64) -> PathBuf {
        self.vm_dir(vm).join(format!("replica-{replica}.sock"))
    }

    /// Where this host keeps the private disks of its replicas.
    fn disks_dir(&self) -> PathBuf {
        self.config.state_dir.join("disks")
    }

    /// The private disk of replica number `replica` of the life `uid` of `vm`: a file of
    /// that replica alone (a replica's number is never reused within a life; a VM made
    /// again under its name is another life).
    pub fn private_disk_path(&self, vm: &VmName, uid: &str, replica: u64) -> PathBuf {
        self.disks_dir().join(disk_file_name(vm, uid, replica))
    }

    /// Where the local files of replica number `replica` of `vm` go (`ext`: pid, json).
    fn local_path(&self, vm: &VmName, replica: u64, ext: &str) -> PathBuf {
        self.vm_dir(vm).join(format!("replica-{replica}.{ext}"))
    }

    /// The replicas running here now, with the role each serves.
    async fn running(&self) -> Vec<(ReplicaKey, Role)> {
        self.locals
            .lock()
            .await
            .iter()
            .filter(|(_, local)| local.pid != 0 && local.exit().is_none())
            .map(|(key, local)| (key.clone(), local.role))
            .collect()
    }

    /// Kills (SIGKILL) the running replica of `vm` assigned `role` here; returns its pid.
    pub async fn stop(&self, vm: &VmName, role: Role) -> Result<u32, SupervisorError> {
        let locals = self.locals.lock().await;
        let local = locals
            .iter()
            .find(|((local_vm, _), local)| {
                local_vm == vm && local.role == role && local.exit().is_none() && local.pid != 0
            })
            .map(|(_, local)| local)
            .ok_or_else(|| SupervisorError::NotRunning {
                vm: vm.clone(),
                role,
            })?;
        // A child too: once its waiter has reaped it, its pid may be another process's.
        let killed =
            kill_checked(local.pid, local.start_time).map_err(|source| SupervisorError::Kill {
                pid: local.pid,
                source,
            })?;
        if !killed {
            if !local.child {
                local.set_exit(Ended::unknown("ended (status unknown: adopted process)"));
            }
            return Err(SupervisorError::NotRunning {
                vm: vm.clone(),
                role,
            });
        }
        if !local.child {
            local.set_exit(Ended::unknown("signal 9"));
        }
        self.wake.notify_one();
        Ok(local.pid)
    }

    /// The pid of the running replica of `vm` assigned `role` here, if any.
    pub async fn running_pid(&self, vm: &VmName, role: Role) -> Option<u32> {
        self.locals
            .lock()
            .await
            .iter()
            .find(|((local_vm, _), local)| {
                local_vm == vm && local.role == role && local.exit().is_none()
            })
            .map(|(_, local)| local.pid)
    }
}

/// Sends SIGKILL to `pid` only while it is the process that started at `started` (clock
/// ticks since boot, field 22 of `/proc/<pid>/stat`), so that a pid the kernel has given
/// to another process since is never signalled. The process is first pinned with a pidfd
/// (`pidfd_open`, Linux 5.3+), then its start time is checked, then the signal goes
/// through the pidfd: a pid recycled between the check and the signal cannot be hit.
/// Without pidfds, the check is made just before kill(2). Returns whether the signal was
/// sent (`false`: that process is gone, or the pid is another's).
fn kill_checked(pid: u32, started: u64) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let raw = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new file descriptor or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
    if fd == -1 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            Some(libc::ENOSYS) => {
                if start_time(pid) != Some(started) {
                    return Ok(false);
                }
                // SAFETY: kill(2) takes plain integers and has no memory-safety
                // preconditions; the pid showed the recorded start time just now.
                if unsafe { libc::kill(raw, libc::SIGKILL) } == -1 {
                    let err = std::io::Error::last_os_error();
                    return match err.raw_os_error() {
                        Some(libc::ESRCH) => Ok(false),
                        _ => Err(err),
                    };
                }
                Ok(true)
            }
            _ => Err(err),
        };
    }
    let fd =
        i32::try_from(fd).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: pidfd_open just returned this descriptor, and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The pidfd names one process for good: if the pid was recycled before it was opened,
    // this check sees the newcomer's start time and nothing is sent.
    if start_time(pid) != Some(started) {
        return Ok(false);
    }
    // SAFETY: pidfd_send_signal(2) takes the pidfd we own, a signal number, a null siginfo
    // (allowed: the kernel fills in the default) and flags 0.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent == -1 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            _ => Err(err),
        };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_known_for_a_live_process_and_not_for_a_dead_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(start_time(pid).is_some());
        // Until the child has called exec, /proc shows the parent's command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !cmdline_has(pid, "30") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(cmdline_has(pid, "30"));
        assert!(!cmdline_has(pid, "31"));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(start_time(pid), None);
    }

    fn supervisor(state_dir: &std::path::Path) -> Supervisor {
        let (_, lease) = watch::channel(0);
        Supervisor::new(
            SupervisorConfig {
                host: HostName::new("a").expect("valid host name"),
                state_dir: state_dir.to_path_buf(),
                ftvmm: "/bin/false".into(),
                arbiter: "local:/nowhere".into(),
                cluster_id_file: None,
                replica_user: None,
                replica_seccomp: ftvm_contract::flags::SeccompMode::Enforce,
                replica_tls_dir: None,
                replica_etcd: Default::default(),
                bridge: None,
                paths: crate::paths::PathPolicy {
                    image_dirs: vec![state_dir.to_path_buf()],
                    disk_dirs: vec![state_dir.to_path_buf()],
                },
            },
            Arc::new(crate::store::memory::MemStore::new()),
            lease,
            Arc::new(Notify::new()),
        )
    }

    /// A child recorded with `start_time`, serving as the primary of web1.
    fn local(pid: u32, start_time: u64) -> Local {
        Local {
            uid: "u1".into(),
            role: Role::Primary,
            generation: 1,
            pid,
            start_time,
            exit: Arc::default(),
            child: true,
            retire_settled: false,
        }
    }

    #[tokio::test]
    async fn a_child_whose_start_time_does_not_match_the_recorded_one_is_not_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let started = start_time(pid).expect("a start time");
        let dir = ftvm_tests::temp_dir("ftd-kill");
        let supervisor = supervisor(&dir);
        let vm = VmName::new("web1").expect("valid name");
        // The pid is taken by a process that started at another time than the replica.
        supervisor
            .locals
            .lock()
            .await
            .insert((vm.clone(), 1), local(pid, started + 1));
        let stopped = supervisor.stop(&vm, Role::Primary).await;
        assert!(
            matches!(stopped, Err(SupervisorError::NotRunning { .. })),
            "{stopped:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(child.try_wait().expect("try_wait"), None, "it must live on");
        // The same pid with its own start time is the replica: killed.
        supervisor
            .locals
            .lock()
            .await
            .insert((vm.clone(), 1), local(pid, started));
        assert_eq!(supervisor.stop(&vm, Role::Primary).await.ok(), Some(pid));
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(!kill_checked(pid, started).expect("a dead pid is not an error"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
