//! The control socket (`ftvmm run --control PATH`, docs/contract.md): a Unix stream
//! socket served by a thread of its own. A client sends one request line and gets one
//! response, then the connection is closed:
//!
//! - `status`: one line of `key=value` words (`ftvm_contract::status::ReplicaStatus`);
//! - `metrics`: the `ftvmm_` metrics in the Prometheus text format (`metrics`);
//! - `stop`: `ok: stopping`, then the same graceful stop as SIGTERM (exit status 143);
//! - `stop-backup`: the same, but only for a backup that still follows its primary (the
//!   pair's go-live decides, also during a claim);
//! - anything else: `error: ...` on one line.
//!
//! The vCPU thread never waits for this: it publishes a [`Snapshot`] of its counters now
//! and then through a [`Publisher`] (a `try_lock`, skipped if a reader holds the lock),
//! and the server thread answers from the last snapshot. The pair's figures come from
//! the pair's view, readable from any thread; what needs no vCPU state (the process's
//! memory use, uptime) is computed here, on request.

mod metrics;
mod status;

use ftvm_contract::control::{ControlRequest, MAX_REQUEST};
use ftvm_contract::status::{DiskMode, ReplicaRole, RunState};
use ftvm_machine::memory::GuestMemoryMmap;
use ftvm_machine::outcome::ExitStats;
use ftvm_machine::vm::{VcpuHook, Vm};
use ftvm_pair::golive::{Request, CLAIM_PATIENCE};
use ftvm_pair::view::PairView;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a client has to send its request, and to read the response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections served at once; more are refused with an error line.
pub const MAX_CLIENTS: usize = 8;
/// The vCPU thread publishes a snapshot at most this often (and at state changes).
pub const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// The vCPU thread looks at the clock only every this many guest exits.
const PUBLISH_CHECK_EXITS: u32 = 32;

/// The control socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// bind(2) failed (no such directory, path too long, permissions...).
    #[error("cannot bind the control socket {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something that is not a socket is in the way (it is never removed).
    #[error("cannot use {path} as the control socket: a file that is not a socket is there")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another process answers on the socket: it is not stale.
    #[error("the control socket {path} is in use by a running process")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The server thread could not be started.
    #[error("cannot start the control socket thread")]
    Spawn(#[source] std::io::Error),
}

/// Who this replica is: fixed at start.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `--vm`, if given.
    pub vm: Option<String>,
    /// `--generation`.
    pub generation: u64,
    /// The role it was started in ([`ReplicaRole::None`], `Primary` or `Backup`).
    pub role: ReplicaRole,
    /// The disk's mode, if the machine has a disk.
    pub disk: Option<DiskMode>,
}

/// What the vCPU thread publishes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Where the run stands.
    pub state: RunState,
    /// Guest-caused exits so far.
    pub exit_ordinal: u64,
    /// Exit counters.
    pub exits: ExitStats,
    /// The exit ordinal at which this backup went live.
    pub went_live_at: Option<u64>,
}

struct Shared {
    identity: Identity,
    started: Instant,
    snapshot: Mutex<Snapshot>,
    memory: Mutex<Option<GuestMemoryMmap>>,
    /// The replica's pair, if it joins one.
    view: Arc<PairView>,
    clients: AtomicUsize,
    /// The thread that runs the vCPU (the one that started the server): `stop` signals it
    /// so that KVM_RUN or the halt wait returns at once.
    vcpu_thread: libc::pthread_t,
    path: PathBuf,
}

impl Shared {
    fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The running control socket. Dropping it removes the socket file (the thread stays
/// blocked in accept until the process exits; it holds nothing that needs cleaning up).
pub struct ControlServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Removes a stale socket at `path` (one nobody answers on); refuses to touch anything
/// else.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket) and starts serving it, with the pair's
    /// figures from `view`. Must be called on the thread that will run the vCPU (`stop`
    /// interrupts that thread).
    pub fn start(
        path: &Path,
        identity: Identity,
        view: Arc<PairView>,
    ) -> Result<ControlServer, ControlError> {
        clear_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
        // Only the owner (ftd's user) may ask a replica to stop or read its state.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| ControlError::Bind {
                    path: path.to_owned(),
                    source,
                },
            )?;
        }
        let shared = Arc::new(Shared {
            identity,
            started: Instant::now(),
            snapshot: Mutex::default(),
            memory: Mutex::default(),
            view,
            clients: AtomicUsize::new(0),
            // SAFETY: pthread_self has no preconditions and always succeeds.
            vcpu_thread: unsafe { libc::pthread_self() },
            path: path.to_owned(),
        });
        let server = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(&listener, &server));
        if let Err(err) = spawned {
            let _ = std::fs::remove_file(path);
            return Err(ControlError::Spawn(err));
        }
        Ok(ControlServer { shared })
    }

    /// Guest RAM, for the resident memory figures (known once the machine is built).
    pub fn set_memory(&self, memory: GuestMemoryMmap) {
        *self
            .shared
            .memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(memory);
    }

    /// The vCPU thread's handle for publishing snapshots.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            shared: self.shared.clone(),
            countdown: PUBLISH_CHECK_EXITS,
            next: Instant::now(),
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.shared.path);
    }
}

/// Publishes the vCPU thread's snapshots; cheap to call at every exit.
pub struct Publisher {
    shared: Arc<Shared>,
    countdown: u32,
    next: Instant,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Whether a snapshot is due after an exit. Counts down exits and reads the clock
    /// (vDSO, no syscall) only every `PUBLISH_CHECK_EXITS` of them.
    fn due_after_exit(&mut self) -> bool {
        self.countdown -= 1;
        if self.countdown > 0 {
            return false;
        }
        self.countdown = PUBLISH_CHECK_EXITS;
        self.due()
    }

    /// Whether [`PUBLISH_EVERY`] passed since the last snapshot.
    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Publishes `snapshot` unless a reader holds the lock right now (then the next one
    /// will do); with `force` (a state change that must be seen), waits for the lock.
    pub fn publish(&mut self, snapshot: Snapshot, force: bool) {
        let guard = if force {
            Some(
                self.shared
                    .snapshot
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            )
        } else {
            self.shared.snapshot.try_lock().ok()
        };
        if let Some(mut guard) = guard {
            *guard = snapshot;
            self.next = Instant::now() + PUBLISH_EVERY;
        }
    }
}

impl VcpuHook for Publisher {
    fn run_state(&mut self, vm: &Vm, state: ftvm_machine::vm::RunState, changed: bool) {
        use ftvm_machine::vm::RunState as Machine;
        let due = changed
            || match state {
                Machine::Running => self.due_after_exit(),
                Machine::Halted => self.due(),
                Machine::Stopping => true,
            };
        if !due {
            return;
        }
        let snapshot = Snapshot {
            state: match state {
                Machine::Running => RunState::Running,
                Machine::Halted => RunState::Halted,
                Machine::Stopping => RunState::Stopping,
            },
            exit_ordinal: vm.exit_ordinal(),
            exits: vm.stats(),
            went_live_at: vm.went_live_at(),
        };
        self.publish(snapshot, changed);
    }
}

fn serve(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            let _ = stream.write_all(b"error: busy, try again\n");
            continue;
        }
        let client = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                handle(stream, &client);
                client.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("control socket: cannot start a client thread");
        }
    }
}

/// Reads one request line: at most [`MAX_REQUEST`] bytes, within [`CLIENT_TIMEOUT`]. A
/// request may end with a newline or with the client's end of writing.
fn read_request(stream: &mut UnixStream) -> Result<ControlRequest, String> {
    let mut buffer = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    loop {
        if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            buffer.truncate(end);
            break;
        }
        if buffer.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(format!("no request line within {CLIENT_TIMEOUT:?}"));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no request line within {CLIENT_TIMEOUT:?}"));
            }
            Err(err) => return Err(format!("cannot read the request: {err}")),
        }
    }
    ControlRequest::parse(&buffer)
}

fn handle(mut stream: UnixStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let response = match read_request(&mut stream) {
        Err(why) => format!("error: {why}\n"),
        Ok(request) => match request {
            ControlRequest::Status => status::report(shared).to_string() + "\n",
            ControlRequest::Metrics => metrics::text(shared),
            ControlRequest::Stop => {
                // A following backup stops following before the stream ends: it never
                // claims (a claim in progress decides by itself).
                if let Some(golive) = shared.view.golive() {
                    let _ = golive.request(Request::Stop, Duration::ZERO);
                }
                let _ = stream.write_all(b"ok: stopping\n");
                drop(stream);
                stop(shared);
                return;
            }
            // A backup being replaced is stopped only while it still follows its
            // primary: one that went live is the VM now and must run on. During a claim
            // the verdict decides.
            ControlRequest::StopBackup => match stop_backup(shared) {
                Ok(()) => {
                    let _ = stream.write_all(b"ok: stopping\n");
                    drop(stream);
                    stop(shared);
                    return;
                }
                Err(why) => format!(
                    "error: not stopping: {why} (role={})\n",
                    status::current_role(shared).as_str()
                ),
            },
        },
    };
    let _ = stream.write_all(response.as_bytes());
}

/// Whether `stop-backup` is obeyed: by a backup whose go-live says so, and by a backup
/// still booting (it has not joined its pair, so it cannot have claimed).
fn stop_backup(shared: &Shared) -> Result<(), String> {
    match shared.view.golive() {
        Some(golive) => {
            golive.request(Request::StopBackup, CLAIM_PATIENCE + Duration::from_secs(1))
        }
        None if shared.identity.role == ReplicaRole::Backup => Ok(()),
        None => Err("this replica is not a following backup".into()),
    }
}

/// The graceful stop of SIGTERM. Once ftvmm handles SIGTERM, the request is recorded as
/// that signal and the vCPU thread is interrupted with it; before (while booting, when
/// SIGTERM still ends the process at once), ftvmm sends itself SIGTERM after removing the
/// socket, which ends it the same way a SIGTERM from outside would.
fn stop(shared: &Shared) {
    if ftvm_machine::signals::request_stop(libc::SIGTERM) {
        // SAFETY: the thread handle was taken from the thread that runs the vCPU, which
        // lives as long as the process (it is the one that returns from main); the
        // handler installed for SIGTERM only stores to an atomic.
        unsafe { libc::pthread_kill(shared.vcpu_thread, libc::SIGTERM) };
        return;
    }
    let _ = std::fs::remove_file(&shared.path);
    // SAFETY: kill(2) on our own pid with a plain signal number has no memory-safety
    // preconditions.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

#[cfg(test)]
mod tests;
