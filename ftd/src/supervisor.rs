//! This host's replicas: starts the ftvmm processes the leader assigns here, notices when
//! they end, stops the ones no longer assigned, and reports their state to the store.
//!
//! ftd is not in a replica's data path: ftvmm runs in a session of its own (`setsid`), so
//! it survives ftd's death, and a restarted ftd re-adopts it from the files it keeps in
//! `<state_dir>/<vm>/`:
//!
//! | file | content |
//! |---|---|
//! | `replica-<n>.pid` | the ftvmm pid of replica number `n` |
//! | `replica-<n>.json` | which incarnation it runs (VM uid, replica number, generation, role), pid and start time |
//! | `console.log` | the guest console (`--console`) |
//! | `ftvmm.log` | ftvmm's stderr and stdout, appended |
//! | `replica-<n>.sock` | ftvmm's control socket (`--control`), removed by ftvmm at exit |
//!
//! Files and processes are keyed by the replica number of the assignment, not by its role:
//! when a backup goes live the leader makes it the primary under the same number, and
//! this host keeps the process running (only its role and generation change).
//!
//! A process is re-adopted only if `/proc/<pid>` still shows the same start time and its
//! command line names this VM's console file, so a recycled pid is never mistaken for a
//! replica. A replica that ended is not restarted: without a backup that would be a cold
//! reboot of the guest, not fault tolerance (see docs/control-plane.md).
//!
//! An assignment with a log address is one half of a pair: the primary is started with
//! `--role primary --vm V --generation N --log-listen ADDR --arbiter SPEC`, the backup with
//! the same flags but `--role backup --log-connect ADDR`; a backup made by cloning gets
//! `--role backup --clone-from ADDR` instead. A replica with a clone address also gets
//! `--clone-listen ADDR`: it accepts a new backup there whenever it runs alone
//! (docs/contract.md).
//!
//! Every replica gets `--control <state_dir>/<vm>/replica-<n>.sock`. Each pass samples the
//! `status` of the running replicas there (the last two samples give the log bandwidth),
//! and `/metrics` asks them for their `metrics` when it is scraped. Both are bounded by
//! [`CONTROL_TIMEOUT`]: a stuck ftvmm only leaves its figures out. The socket path follows
//! from the VM and replica number, so a re-adopted replica answers there as well.

use crate::keys;
use crate::metrics;
use crate::model::{
    now_unix_ms, Assignment, HostName, PairState, ProcessState, ReplicaReport, Role, VmName, VmSpec,
};
use crate::records::{decode, encode, load_vms};
use crate::replica_control::{self, Families, LiveStats, StatusLine};
use crate::store::{LeaseId, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Mutex, Notify};

/// How long ftd waits for a replica's control socket to answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a replica asked to `stop` has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A status sample older than this is not shown (the replica stopped answering).
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(5);
/// Status samples are taken at most this often per replica.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// An unchanged report is put again after this long.
const REPORT_REFRESH: Duration = Duration::from_secs(10);

/// The last two `status` samples of a replica: (when, the line), and the role it was
/// assigned when sampled.
#[derive(Debug)]
struct Samples {
    role: Role,
    previous: Option<(Instant, StatusLine)>,
    last: Option<(Instant, StatusLine)>,
}

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
}

/// What `replica-<n>.json` records about a started replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LocalFile {
    uid: String,
    replica: u64,
    generation: u64,
    role: Role,
    pid: u32,
    start_time: u64,
}

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
    /// Whether a backup being replaced was asked to stop (or refused: it went live).
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

    fn file(&self, replica: u64) -> LocalFile {
        LocalFile {
            uid: self.uid.clone(),
            replica,
            generation: self.generation,
            role: self.role,
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

/// What one [`Supervisor::sync`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncSummary {
    /// Replicas started.
    pub started: usize,
    /// Replicas stopped because they are no longer assigned here.
    pub stopped: usize,
    /// Replicas running now.
    pub running: usize,
}

/// The last report put for a replica.
#[derive(Debug)]
struct Reported {
    lease: LeaseId,
    /// The report with `unix_ms` zero.
    report: ReplicaReport,
    /// Its `unix_ms` when first put: a refresh keeps it (it says when the state began).
    unix_ms: u64,
    put_at: Instant,
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
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn describe(status: std::process::ExitStatus) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "ended".to_owned(),
    };
    Ended {
        how,
        code: status.code(),
    }
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

/// Whether `ftvmm` can run a backup replica (its `run --help` lists `--role`).
pub fn probe_backup_capable(ftvmm: &Path) -> bool {
    std::process::Command::new(ftvmm)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("--role"))
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

    /// Asks every running replica for its `status` (concurrently, each within
    /// [`CONTROL_TIMEOUT`]) and keeps the last two answers.
    pub async fn sample_controls(&self) {
        let running = self.running().await;
        // Samples less than half a second apart would make a noisy bandwidth; a replica
        // not protected, or given another role since its last answer (a backup made
        // primary), is asked anyway, so that a change (a backup connecting, a clone made,
        // a backup gone live) shows without delay.
        let fresh: Vec<ReplicaKey> = {
            let unpaired = self.unpaired_now();
            let samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            running
                .iter()
                .filter(|(key, role)| {
                    !unpaired.contains(key)
                        && samples.get(key).is_some_and(|entry| {
                            entry.role == *role
                                && entry.last.as_ref().is_some_and(|(at, line)| {
                                    at.elapsed() < MIN_SAMPLE_INTERVAL && !unprotected(line)
                                })
                        })
                })
                .map(|(key, _)| key.clone())
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for (key, role) in running.iter().filter(|(key, _)| !fresh.contains(key)) {
            let path = self.control_path(&key.0, key.1);
            let (key, role) = (key.clone(), *role);
            asks.spawn(async move {
                let answer = replica_control::request(&path, "status", CONTROL_TIMEOUT).await;
                (key, role, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok(answer)) = asks.join_next().await {
            answers.push(answer);
        }
        let now = Instant::now();
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.retain(|key, _| running.iter().any(|(running, _)| running == key));
        for (key, role, answer) in answers {
            match answer {
                Ok(line) => {
                    let entry = samples.entry(key).or_insert(Samples {
                        role,
                        previous: None,
                        last: None,
                    });
                    entry.role = role;
                    entry.previous = entry.last.take();
                    entry.last = Some((now, StatusLine::parse(&line)));
                }
                Err(err) => {
                    tracing::debug!(vm = %key.0, replica = key.1, error = %err, "no status")
                }
            }
        }
    }

    /// Whether a running replica has not said yet how its pair is (no answer yet, or
    /// none since it was given another role), or is not protected (a pair connecting, a
    /// replica alone waiting for its new backup): the supervisor loop then comes back
    /// sooner.
    pub async fn settling(&self) -> bool {
        let running = self.running().await;
        let unpaired = self.unpaired_now();
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.iter().any(|(key, role)| {
            unpaired.contains(key)
                || samples.get(key).is_none_or(|entry| {
                    entry.role != *role
                        || entry
                            .last
                            .as_ref()
                            .is_none_or(|(_, line)| unprotected(line))
                })
        })
    }

    fn unpaired_now(&self) -> BTreeSet<ReplicaKey> {
        self.unpaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The pair state the last fresh sample of a replica shows (`None`: not a pair, or
    /// its control socket has not answered lately; a stale "protected" must not count).
    fn pair_state(&self, key: &ReplicaKey) -> Option<PairState> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, line) = samples.get(key)?.last.as_ref()?;
        (at.elapsed() <= SAMPLE_MAX_AGE)
            .then(|| line.pair_state())
            .flatten()
    }

    /// What the last samples say about the replica of `vm` assigned `role` here (`None`
    /// if none runs here or its control socket has not answered lately).
    pub fn live_stats(&self, vm: &VmName, role: Role) -> Option<LiveStats> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = samples
            .iter()
            .filter(|((sampled, _), entry)| sampled == vm && entry.role == role)
            .map(|(_, entry)| entry)
            .max_by_key(|entry| entry.last.as_ref().map(|(at, _)| *at))?;
        let (at, last) = entry.last.as_ref()?;
        if at.elapsed() > SAMPLE_MAX_AGE {
            return None;
        }
        let rate = entry.previous.as_ref().and_then(|(before, previous)| {
            let seconds = at.duration_since(*before).as_secs_f64();
            let bytes = last
                .number("log_bytes_total")?
                .checked_sub(previous.number("log_bytes_total")?)?;
            (seconds > 0.0).then(|| (bytes as f64 / seconds).round() as u64)
        });
        Some(LiveStats::from_status(last, rate))
    }

    /// The `metrics` of every running replica, merged, with `vm` and `replica` labels
    /// (each replica within [`CONTROL_TIMEOUT`]; one that does not answer is left out).
    /// The label is `replica` (primary or backup, the assignment) because ftvmm's own
    /// `ftvmm_role` already has a `role` label (the current role, e.g. `live`).
    pub async fn replica_metrics(&self) -> String {
        let mut asks = tokio::task::JoinSet::new();
        for (key, role) in self.running().await {
            let path = self.control_path(&key.0, key.1);
            asks.spawn(async move {
                let answer = replica_control::request(&path, "metrics", CONTROL_TIMEOUT).await;
                ((key.0, role), answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok(answer)) = asks.join_next().await {
            answers.push(answer);
        }
        // Stable order: by VM, then role.
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut families = Families::default();
        for ((vm, role), answer) in answers {
            match answer {
                Ok(text) => families.add(&text, &[("vm", vm.as_str()), ("replica", role.as_str())]),
                Err(err) => tracing::debug!(vm = %vm, %role, error = %err, "no metrics"),
            }
        }
        families.render()
    }

    /// Re-adopts the replicas recorded in the state directory (after an ftd restart).
    /// Returns how many still run.
    pub async fn adopt(&self) -> Result<usize, SupervisorError> {
        let state_dir = &self.config.state_dir;
        let dir_error = |source| SupervisorError::StateDir {
            path: state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(dir_error)?;
        let mut locals = self.locals.lock().await;
        let mut running = 0;
        for entry in std::fs::read_dir(state_dir).map_err(dir_error)? {
            let Ok(entry) = entry else { continue };
            let Some(vm) = entry
                .file_name()
                .to_str()
                .and_then(|name| VmName::new(name).ok())
            else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(self.vm_dir(&vm)) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let numbered = file
                    .file_name()
                    .to_str()
                    .and_then(|name| name.strip_prefix("replica-")?.strip_suffix(".json"))
                    .and_then(|number| number.parse::<u64>().ok());
                let Some(replica) = numbered else { continue };
                let Ok(raw) = std::fs::read(&path) else {
                    continue;
                };
                let Some(file) = decode::<LocalFile>(&path.display().to_string(), &raw)
                    .filter(|file| file.replica == replica)
                else {
                    continue;
                };
                // The command line must name this replica's control socket: a recycled pid
                // is never mistaken for it.
                let control = self.control_path(&vm, replica).display().to_string();
                let alive = start_time(file.pid) == Some(file.start_time)
                    && cmdline_has(file.pid, &control);
                let local = Local {
                    uid: file.uid,
                    role: file.role,
                    generation: file.generation,
                    pid: file.pid,
                    start_time: file.start_time,
                    exit: Arc::default(),
                    child: false,
                    retire_settled: false,
                };
                let role = local.role;
                if alive {
                    running += 1;
                    tracing::info!(vm = %vm, replica, %role, pid = file.pid, "re-adopted running replica");
                } else {
                    local.set_exit(Ended::unknown(
                        "ended while ftd was not running (status unknown)",
                    ));
                    tracing::warn!(vm = %vm, replica, %role, pid = file.pid, "recorded replica is gone");
                }
                locals.insert((vm.clone(), replica), local);
            }
        }
        Ok(running)
    }

    /// Makes this host's replicas match the assignments in the store, then reports them.
    pub async fn sync(&self) -> Result<SyncSummary, SupervisorError> {
        let vms = load_vms(&*self.store, None).await?;
        let mut desired: BTreeMap<ReplicaKey, (Role, Assignment, VmSpec)> = BTreeMap::new();
        for (vm, record) in &vms {
            let Some(spec) = &record.spec else { continue };
            // Primary first: while the leader makes a backup that went live the primary,
            // both assignments may name the same replica for a moment.
            for role in Role::ALL {
                if let Some(assignment) = record.current_assignment(role) {
                    if assignment.host == self.config.host {
                        desired
                            .entry((vm.clone(), assignment.replica))
                            .or_insert_with(|| (role, assignment.clone(), spec.clone()));
                    }
                }
            }
        }

        let unpaired: BTreeSet<ReplicaKey> = desired
            .iter()
            .filter(|(key, (role, primary, _))| {
                *role == Role::Primary
                    && vms
                        .get(&key.0)
                        .and_then(|record| record.current_assignment(Role::Backup))
                        .is_none_or(|backup| {
                            backup.retiring || backup.generation != primary.generation
                        })
            })
            .map(|(key, _)| key.clone())
            .collect();
        *self
            .unpaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = unpaired;

        let mut summary = SyncSummary::default();
        let mut locals = self.locals.lock().await;
        for local in locals.values() {
            if !local.child
                && local.exit().is_none()
                && start_time(local.pid) != Some(local.start_time)
            {
                local.set_exit(Ended::unknown("ended (status unknown: adopted process)"));
            }
        }

        // Stop what is no longer assigned here (or belongs to an older incarnation).
        let stale: Vec<ReplicaKey> = locals
            .iter()
            .filter(|(key, local)| {
                desired
                    .get(*key)
                    .is_none_or(|(_, assignment, _)| !local.matches(key, assignment))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(local) = locals.remove(&key) {
                if local.exit().is_none() {
                    self.retire(&key, &local).await;
                }
                summary.stopped += 1;
                self.forget(&key).await?;
            }
        }

        // A running replica given another role or generation (a backup made primary, a
        // primary whose new backup is cloned) goes on as it is; only the record changes.
        for (key, local) in locals.iter_mut() {
            let Some((role, assignment, _)) = desired.get(key) else {
                continue;
            };
            if (local.role, local.generation) != (*role, assignment.generation) {
                tracing::info!(vm = %key.0, replica = key.1, from = %local.role, to = %role, generation = assignment.generation, "replica reassigned");
                local.role = *role;
                local.generation = assignment.generation;
                if local.pid != 0 {
                    self.record_local(key, local);
                }
            }
        }

        // A backup being replaced stops, unless it went live meanwhile.
        for (key, local) in locals.iter_mut() {
            let retiring = desired
                .get(key)
                .is_some_and(|(_, assignment, _)| assignment.retiring);
            if retiring && !local.retire_settled && local.pid != 0 && local.exit().is_none() {
                local.retire_settled = self.stop_backup(key, local).await;
            }
        }

        // Start what is assigned here and was never started (a backup being replaced
        // never is).
        for (key, (role, assignment, spec)) in &desired {
            if locals.contains_key(key) || assignment.retiring {
                continue;
            }
            let local = self.spawn(&key.0, *role, assignment, spec);
            summary.started += 1;
            locals.insert(key.clone(), local);
        }

        // Report.
        let lease = *self.lease.borrow();
        let mut reported = self.reported.lock().await;
        for (key, local) in locals.iter() {
            let exit = local.exit();
            if exit.is_none() {
                summary.running += 1;
            }
            let report = ReplicaReport {
                host: self.config.host.clone(),
                uid: local.uid.clone(),
                replica: key.1,
                generation: local.generation,
                state: if exit.is_none() {
                    ProcessState::Running
                } else {
                    ProcessState::Exited
                },
                pid: local.pid,
                exit_code: exit.as_ref().and_then(|ended| ended.code),
                pair: exit.is_none().then(|| self.pair_state(key)).flatten(),
                exit: exit.map(|ended| ended.how),
                unix_ms: 0,
            };
            // Unchanged reports are put again now and then (with their first stamp): a
            // put that raced with the leader's clean-up of an older incarnation must not
            // leave a stale value for good.
            let last = reported.get(key).filter(|last| last.report == report);
            if last
                .is_some_and(|last| last.lease == lease && last.put_at.elapsed() < REPORT_REFRESH)
            {
                continue;
            }
            let unix_ms = last.map_or_else(now_unix_ms, |last| last.unix_ms);
            let stamped = ReplicaReport {
                unix_ms,
                ..report.clone()
            };
            self.store
                .put(&keys::report(&key.0, key.1), encode(&stamped), Some(lease))
                .await?;
            reported.insert(
                key.clone(),
                Reported {
                    lease,
                    report,
                    unix_ms,
                    put_at: Instant::now(),
                },
            );
        }
        metrics::set_replicas_running(summary.running);
        Ok(summary)
    }

    /// Stops a replica no longer assigned here gracefully: `stop` on its control socket
    /// (the log ends cleanly, ftvmm exits 143), then SIGKILL if it is still there after
    /// [`STOP_GRACE`] or did not take the request. Failure drills keep using SIGKILL
    /// ([`Supervisor::stop`]).
    async fn retire(&self, key: &ReplicaKey, local: &Local) {
        let path = self.control_path(&key.0, key.1);
        // Asked now, before the socket file is forgotten with the replica.
        let asked = replica_control::request(&path, "stop", CONTROL_TIMEOUT).await;
        let (vm, replica, role, pid) = (&key.0, key.1, local.role, local.pid);
        match &asked {
            Ok(_) => {
                tracing::info!(vm = %vm, replica, %role, pid, "stopping replica no longer assigned here")
            }
            Err(err) => {
                tracing::info!(vm = %vm, replica, %role, pid, error = %err, "killing replica no longer assigned here (no graceful stop)")
            }
        }
        reap(key, local, asked.is_ok());
    }

    /// Stops a backup being replaced, but only while it still follows its primary
    /// (`stop-backup`): one that went live is the VM now and runs on. Returns whether
    /// that is settled (asked, or refused because it is live); `false` to ask again at
    /// the next pass (another answer, or no answer from a replica whose last status was
    /// not a following backup's).
    async fn stop_backup(&self, key: &ReplicaKey, local: &Local) -> bool {
        let path = self.control_path(&key.0, key.1);
        let (vm, replica, pid) = (&key.0, key.1, local.pid);
        match replica_control::request(&path, "stop-backup", CONTROL_TIMEOUT).await {
            Ok(answer) if answer.starts_with("ok") => {
                tracing::info!(vm = %vm, replica, pid, "stopping the backup being replaced");
                reap(key, local, true);
                true
            }
            Ok(answer) if answer.starts_with("error: not stopping") => {
                tracing::warn!(vm = %vm, replica, pid, "the backup being replaced runs on: {}", answer.trim());
                true
            }
            // Busy, or an ftvmm that does not know the request: asked again next pass.
            Ok(answer) => {
                tracing::warn!(vm = %vm, replica, pid, "stop-backup not taken: {}", answer.trim());
                false
            }
            Err(err) => {
                let following = self
                    .pair_state(key)
                    .is_some_and(|pair| pair.role == "backup");
                if following {
                    tracing::info!(vm = %vm, replica, pid, error = %err, "killing the backup being replaced (no graceful stop)");
                    reap(key, local, false);
                }
                following
            }
        }
    }

    /// Writes the files a restarted ftd re-adopts `local` from; failing to is logged, not
    /// fatal (the replica itself runs on).
    fn record_local(&self, key: &ReplicaKey, local: &Local) {
        let (vm, replica) = key;
        if let Err(err) = std::fs::write(
            self.local_path(vm, *replica, "pid"),
            format!("{}\n", local.pid),
        )
        .and_then(|()| {
            std::fs::write(
                self.local_path(vm, *replica, "json"),
                encode(&local.file(*replica)),
            )
        }) {
            tracing::error!(vm = %vm, replica, pid = local.pid, error = %err, "cannot record the replica's pid");
        }
    }

    /// Removes the local files and the store report of a replica that is gone.
    async fn forget(&self, key: &ReplicaKey) -> Result<(), SupervisorError> {
        let _ = std::fs::remove_file(self.local_path(&key.0, key.1, "pid"));
        let _ = std::fs::remove_file(self.local_path(&key.0, key.1, "json"));
        // ftvmm removes its socket at exit, but not when it is killed.
        let _ = std::fs::remove_file(self.control_path(&key.0, key.1));
        self.reported.lock().await.remove(key);
        let report_key = keys::report(&key.0, key.1);
        if let Some(kv) = self.store.get(&report_key).await? {
            let ours = decode::<ReplicaReport>(&report_key, &kv.value)
                .is_some_and(|report| report.host == self.config.host && report.replica == key.1);
            if ours {
                self.store.delete(&report_key).await?;
            }
        }
        Ok(())
    }

    fn spawn(&self, vm: &VmName, role: Role, assignment: &Assignment, spec: &VmSpec) -> Local {
        let failed = |how: String| {
            tracing::error!(vm = %vm, %role, "{how}");
            let local = Local {
                uid: assignment.uid.clone(),
                role,
                generation: assignment.generation,
                pid: 0,
                start_time: 0,
                exit: Arc::default(),
                child: false,
                retire_settled: false,
            };
            local.set_exit(Ended::unknown(&how));
            local
        };
        if role == Role::Backup
            && assignment.log_address.is_none()
            && assignment.clone_from.is_none()
        {
            return failed(
                "cannot start: the backup assignment has neither a log nor a clone address".into(),
            );
        }
        let replica = assignment.replica;
        let dir = self.vm_dir(vm);
        if let Err(err) = std::fs::create_dir_all(&dir) {
            return failed(format!(
                "cannot start: cannot create {}: {err}",
                dir.display()
            ));
        }
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("ftvmm.log"))
        {
            Ok(log) => log,
            Err(err) => return failed(format!("cannot start: cannot open ftvmm.log: {err}")),
        };
        let log_out = match log.try_clone() {
            Ok(log) => log,
            Err(err) => return failed(format!("cannot start: cannot open ftvmm.log: {err}")),
        };
        let mut command = tokio::process::Command::new(&self.config.ftvmm);
        command
            .arg("run")
            .arg("--image")
            .arg(&spec.image)
            .arg("--mem")
            .arg(spec.mem_bytes.to_string())
            .arg("--console")
            .arg(self.console_path(vm))
            .arg("--control")
            .arg(self.control_path(vm, replica));
        if !spec.cmdline.is_empty() {
            command.arg("--cmdline").arg(&spec.cmdline);
        }
        if let Some(disk) = &spec.disk {
            command.arg("--disk").arg(disk);
        }
        if let Some(net) = &spec.net {
            command
                .arg("--tap")
                .arg(&net.tap)
                .arg("--mac")
                .arg(&net.mac);
            if let Some(ip) = &net.ip {
                command.arg("--ip").arg(ip);
            }
        }
        // A pair: the primary listens for its backup's log channel, the backup connects
        // to it (or clones the running primary); both claim generation N of this VM at
        // the arbiter when they lose the other. A backup gets the same --tap as its
        // primary: ftvmm opens it at start and sends on it only once live.
        let endpoint = match (role, &assignment.log_address, &assignment.clone_from) {
            (Role::Primary, Some(address), _) => Some(("--log-listen", address)),
            (Role::Backup, Some(address), _) => Some(("--log-connect", address)),
            (Role::Backup, None, Some(address)) => Some(("--clone-from", address)),
            (Role::Primary, None, _) | (Role::Backup, None, None) => None,
        };
        if endpoint.is_some() || assignment.clone_listen.is_some() {
            command
                .arg("--vm")
                .arg(vm.as_str())
                .arg("--generation")
                .arg(assignment.generation.to_string())
                .arg("--arbiter")
                .arg(&self.config.arbiter);
        }
        if let Some((flag, address)) = endpoint {
            command
                .arg("--role")
                .arg(role.as_str())
                .arg(flag)
                .arg(address);
        }
        // Any replica may have to serve a clone later (a primary that lost its backup, a
        // backup that went live); ftvmm listens from the start.
        if let Some(address) = &assignment.clone_listen {
            command.arg("--clone-listen").arg(address);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log));
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                return failed(format!(
                    "cannot start {}: {err}",
                    self.config.ftvmm.display()
                ))
            }
        };
        let Some(pid) = child.id() else {
            return failed("cannot start: ftvmm ended at once".into());
        };
        let start = start_time(pid).unwrap_or(0);
        let local = Local {
            uid: assignment.uid.clone(),
            role,
            generation: assignment.generation,
            pid,
            start_time: start,
            exit: Arc::default(),
            child: true,
            retire_settled: false,
        };
        // Without these files a restarted ftd could not re-adopt the replica.
        self.record_local(&(vm.clone(), replica), &local);
        let exit = local.exit.clone();
        let wake = self.wake.clone();
        let (vm_name, role_name) = (vm.clone(), role);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => describe(status),
                Err(err) => Ended::unknown(&format!("ended (cannot wait: {err})")),
            };
            tracing::warn!(vm = %vm_name, replica, role = %role_name, pid, "replica ended: {}", how.how);
            *exit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(how);
            wake.notify_one();
        });
        tracing::info!(vm = %vm, replica, %role, pid, "started replica");
        local
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
        if !local.child && start_time(local.pid) != Some(local.start_time) {
            local.set_exit(Ended::unknown("ended (status unknown: adopted process)"));
            return Err(SupervisorError::NotRunning {
                vm: vm.clone(),
                role,
            });
        }
        kill(local.pid).map_err(|source| SupervisorError::Kill {
            pid: local.pid,
            source,
        })?;
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

/// Whether a status line is of a replica whose protection may come any moment: not
/// protected (a primary waiting for its backup or alone until a clone is made, a backup
/// connecting or being cloned). A backup that lost its primary is not waiting for
/// anything.
fn unprotected(line: &StatusLine) -> bool {
    line.pair_state()
        .is_some_and(|pair| !(pair.protected || pair.role == "backup" && pair.peer_lost))
}

/// Ends a replica in the background: after a graceful stop was asked (`asked`), waits
/// up to [`STOP_GRACE`] for it to go; then (or at once) SIGKILL if it is still there.
fn reap(key: &ReplicaKey, local: &Local, asked: bool) {
    let (pid, start) = (local.pid, local.start_time);
    let (vm, role) = (key.0.clone(), local.role);
    tokio::spawn(async move {
        if asked {
            let deadline = Instant::now() + STOP_GRACE;
            while start_time(pid) == Some(start) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if start_time(pid) == Some(start) {
            if asked {
                tracing::warn!(vm = %vm, %role, pid, "replica did not stop within {STOP_GRACE:?}: SIGKILL");
            }
            let _ = kill(pid);
        }
    });
}

fn kill(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions; the pid
    // is one this supervisor started or verified (start time and command line).
    if unsafe { libc::kill(pid, libc::SIGKILL) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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

    #[test]
    fn exit_statuses_are_described_as_code_or_signal() {
        use std::os::unix::process::ExitStatusExt;
        let exited = describe(std::process::ExitStatus::from_raw(3 << 8));
        assert_eq!(
            (exited.how.as_str(), exited.code),
            ("exit status 3", Some(3))
        );
        let killed = describe(std::process::ExitStatus::from_raw(9));
        assert_eq!((killed.how.as_str(), killed.code), ("signal 9", None));
    }
}
