//! The control socket (`ftvmm run --control PATH`, docs/contract.md): a Unix stream
//! socket served by a thread of its own. A client sends one request line and gets one
//! response, then the connection is closed:
//!
//! - `status`: one line of `key=value` words (see `status_line`);
//! - `metrics`: the `ftvmm_` metrics in the Prometheus text format (see `metrics_text`);
//! - `stop`: `ok: stopping`, then the same graceful stop as SIGTERM (exit status 143);
//! - anything else: `error: ...` on one line.
//!
//! The vCPU thread never waits for this: it publishes a [`Snapshot`] of its counters now
//! and then through a [`Publisher`] (a `try_lock`, skipped if a reader holds the lock),
//! and the server thread answers from the last snapshot. What needs no vCPU state (the
//! process's memory use, uptime) is computed here, on request.

use crate::channel::{ChannelStats, HOLD_BUCKET_BOUNDS_US};
use crate::outcome::ExitStats;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryMmap;

/// The longest request line accepted (the commands are a few bytes).
pub const MAX_REQUEST: usize = 256;
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

/// What a replica is, as the status line and the `ftvmm_role` gauge name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not part of a pair (no `--role`).
    None,
    /// The primary of a pair (also after its backup was lost: see `protected`).
    Primary,
    /// The backup of a pair, following its primary's log.
    Backup,
    /// A backup that went live after its primary was lost: it is now the VM.
    Live,
}

impl Role {
    /// Every role, in the order the metrics list them.
    pub const ALL: [Role; 4] = [Role::None, Role::Primary, Role::Backup, Role::Live];

    /// The name in the status line and the `role` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Live => "live",
        }
    }
}

/// Where the run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunState {
    /// Building the machine (a primary also waits here for its backup to connect).
    #[default]
    Booting,
    /// The vCPU runs the guest.
    Running,
    /// The guest waits in HLT.
    Halted,
    /// The run ended; ftvmm is closing the log channel and exiting.
    Stopping,
}

impl RunState {
    /// The name in the status line.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Booting => "booting",
            RunState::Running => "running",
            RunState::Halted => "halted",
            RunState::Stopping => "stopping",
        }
    }
}

/// Who this replica is: fixed at start.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `--vm`, if given.
    pub vm: Option<String>,
    /// `--generation`.
    pub generation: u64,
    /// The role it was started in ([`Role::None`], [`Role::Primary`] or [`Role::Backup`]).
    pub role: Role,
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
    /// The log channel's counters (a replica of a pair).
    pub channel: Option<ChannelStats>,
    /// The exit ordinal at which this backup went live.
    pub went_live_at: Option<u64>,
    /// How long going live took: from the end of the lost primary's log to running live
    /// (the go-live claim).
    pub go_live: Option<Duration>,
    /// The generation of the pair the last clone made: this replica then sends the log
    /// to that new backup, whatever role it started in.
    pub cloned_generation: Option<u64>,
}

struct Shared {
    identity: Identity,
    started: Instant,
    snapshot: Mutex<Snapshot>,
    memory: Mutex<Option<GuestMemoryMmap>>,
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
    /// Binds `path` (replacing a stale socket) and starts serving it. Must be called on
    /// the thread that will run the vCPU (`stop` interrupts that thread).
    pub fn start(path: &Path, identity: Identity) -> Result<ControlServer, ControlError> {
        clear_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared {
            identity,
            started: Instant::now(),
            snapshot: Mutex::default(),
            memory: Mutex::default(),
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
    /// Whether a snapshot is due. Counts down exits and reads the clock (vDSO, no
    /// syscall) only every `PUBLISH_CHECK_EXITS` of them.
    pub fn due_after_exit(&mut self) -> bool {
        self.countdown -= 1;
        if self.countdown > 0 {
            return false;
        }
        self.countdown = PUBLISH_CHECK_EXITS;
        self.due()
    }

    /// Whether [`PUBLISH_EVERY`] passed since the last snapshot.
    pub fn due(&self) -> bool {
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

    /// The snapshot published last (the vCPU thread keeps what only it knows, such as the
    /// go-live duration, from one snapshot to the next).
    pub fn last(&self) -> Snapshot {
        self.shared.snapshot()
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
fn read_request(stream: &mut UnixStream) -> Result<String, String> {
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
    if buffer.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    let text = String::from_utf8_lossy(&buffer);
    Ok(text.trim().to_owned())
}

/// `text` cut short and with control characters replaced, for an error line.
fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(40)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > 40 {
        out.push_str("...");
    }
    out
}

fn handle(mut stream: UnixStream, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let response = match read_request(&mut stream) {
        Err(why) => format!("error: {why}\n"),
        Ok(request) => match request.as_str() {
            "status" => status_line(shared) + "\n",
            "metrics" => metrics_text(shared),
            "stop" => {
                let _ = stream.write_all(b"ok: stopping\n");
                drop(stream);
                stop(shared);
                return;
            }
            // A backup being replaced is stopped only while it still follows its
            // primary: one that went live is the VM now and must run on.
            "stop-backup" => match current_role(&shared.identity, &shared.snapshot()) {
                Role::Backup => {
                    let _ = stream.write_all(b"ok: stopping\n");
                    drop(stream);
                    stop(shared);
                    return;
                }
                role => format!(
                    "error: not stopping: this replica is not a following backup (role={})\n",
                    role.as_str()
                ),
            },
            other => format!(
                "error: unknown command '{}' (expected status, metrics, stop or stop-backup)\n",
                printable(other)
            ),
        },
    };
    let _ = stream.write_all(response.as_bytes());
}

/// The graceful stop of SIGTERM. Once ftvmm handles SIGTERM, the request is recorded as
/// that signal and the vCPU thread is interrupted with it; before (while booting, when
/// SIGTERM still ends the process at once), ftvmm sends itself SIGTERM after removing the
/// socket, which ends it the same way a SIGTERM from outside would.
fn stop(shared: &Shared) {
    if crate::signals::request_stop(libc::SIGTERM) {
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

/// A `--vm` name made safe for a `key=value` word.
fn word(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The role now: a replica that cloned a new backup is that pair's primary; a backup
/// that went live (and has not cloned one) is live.
fn current_role(identity: &Identity, snapshot: &Snapshot) -> Role {
    if snapshot.cloned_generation.is_some() {
        Role::Primary
    } else if identity.role == Role::Backup && snapshot.went_live_at.is_some() {
        Role::Live
    } else {
        identity.role
    }
}

/// The pair's generation now: `--generation`, or the one the last clone made.
fn current_generation(identity: &Identity, snapshot: &Snapshot) -> u64 {
    snapshot.cloned_generation.unwrap_or(identity.generation)
}

/// The `status` response: `key=value` words on one line (docs/contract.md lists them;
/// readers ignore keys they do not know).
fn status_line(shared: &Shared) -> String {
    let snapshot = shared.snapshot();
    let identity = &shared.identity;
    let role = current_role(identity, &snapshot);
    let mut line = format!(
        "vm={} pid={} role={} state={} generation={} exit_ordinal={} uptime_ms={} host_exits={} injected={}",
        identity.vm.as_deref().map_or_else(|| "-".to_owned(), word),
        std::process::id(),
        role.as_str(),
        snapshot.state.as_str(),
        current_generation(identity, &snapshot),
        snapshot.exit_ordinal,
        shared.started.elapsed().as_millis(),
        snapshot.exits.host_caused,
        snapshot.exits.injected,
    );
    if let Some(channel) = &snapshot.channel {
        let protected =
            u8::from(channel.lost.is_none() && matches!(role, Role::Primary | Role::Backup));
        let _ = write!(
            line,
            " protected={protected} peer_lost={} log_bytes_total={} log_frames_total={} log_reconnects={}",
            u8::from(channel.lost.is_some()),
            channel.bytes,
            channel.frames,
            channel.reconnects,
        );
        if role == Role::Primary {
            let _ = write!(
                line,
                " log_acked_bytes={} backup_exit_ordinal={} backup_lag_exits={} backup_lag_ms={} output_held={} output_released={} output_dropped={} log_rtt_us={} log_rtt_min_us={} throttled_ms={}",
                channel.acked_bytes,
                channel.backup_ordinal,
                channel.backup_lag_exits,
                channel.backup_lag_us / 1000,
                channel.outputs.held,
                channel.outputs.released,
                channel.outputs.dropped,
                channel.ack_rtt_us,
                channel.ack_rtt_min_us,
                channel.throttled_us / 1000,
            );
        } else {
            let _ = write!(line, " heartbeat_misses={}", channel.heartbeat_misses);
        }
    }
    if let Some(ordinal) = snapshot.went_live_at {
        let _ = write!(line, " went_live_at={ordinal}");
    }
    if let Some(go_live) = snapshot.go_live {
        let _ = write!(line, " go_live_ms={}", go_live.as_millis());
    }
    line
}

/// Appends one metric family: `# HELP`, `# TYPE` and its samples (`labels` without
/// braces, or empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn one(value: f64) -> [(String, f64); 1] {
    [(String::new(), value)]
}

/// The `metrics` response: the Prometheus text exposition format (version 0.0.4).
///
/// Written by hand rather than through `metrics-exporter-prometheus`: that crate renders
/// what a global recorder accumulated from increments and raw observations, while here
/// every value is an absolute figure read from a snapshot, and the output-hold histogram
/// arrives already bucketed (`HoldStats::hold_buckets`), which its histograms cannot take.
fn metrics_text(shared: &Shared) -> String {
    let snapshot = shared.snapshot();
    let identity = &shared.identity;
    let mut out = String::with_capacity(4096);
    let exits = &snapshot.exits;
    let by_kind = [
        ("pio_in", exits.pio_in),
        ("pio_out", exits.pio_out),
        ("mmio_read", exits.mmio_read),
        ("mmio_write", exits.mmio_write),
        ("hlt", exits.hlt),
        ("irq_window", exits.irq_window),
    ];
    let samples: Vec<(String, f64)> = by_kind
        .iter()
        .map(|(kind, count)| (format!("kind=\"{kind}\""), *count as f64))
        .collect();
    family(
        &mut out,
        "ftvmm_exits_total",
        "counter",
        "Guest-caused exits by kind.",
        &samples,
    );
    family(
        &mut out,
        "ftvmm_host_exits_total",
        "counter",
        "KVM_RUN returns caused by the host (not in the exit ordinal).",
        &one(exits.host_caused as f64),
    );
    family(
        &mut out,
        "ftvmm_exit_ordinal",
        "gauge",
        "Guest-caused exits since boot.",
        &one(snapshot.exit_ordinal as f64),
    );
    family(
        &mut out,
        "ftvmm_interrupts_injected_total",
        "counter",
        "Interrupt vectors injected into the guest.",
        &one(exits.injected as f64),
    );
    let memory = shared
        .memory
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(memory) = memory {
        let usage = crate::memory::memory_use(&memory);
        family(
            &mut out,
            "ftvmm_resident_memory_bytes",
            "gauge",
            "Resident memory of the VMM itself and of guest RAM.",
            &[
                ("part=\"vmm\"".into(), usage.vmm_rss_bytes as f64),
                ("part=\"guest\"".into(), usage.guest_resident_bytes as f64),
            ],
        );
    }
    let role = current_role(identity, &snapshot);
    let samples: Vec<(String, f64)> = Role::ALL
        .iter()
        .map(|r| {
            (
                format!("role=\"{}\"", r.as_str()),
                f64::from(u8::from(*r == role)),
            )
        })
        .collect();
    family(
        &mut out,
        "ftvmm_role",
        "gauge",
        "1 for the replica's current role (none, primary, backup, live).",
        &samples,
    );
    family(
        &mut out,
        "ftvmm_uptime_seconds",
        "gauge",
        "Time since ftvmm started.",
        &one(shared.started.elapsed().as_secs_f64()),
    );
    if let Some(channel) = &snapshot.channel {
        family(
            &mut out,
            "ftvmm_log_bytes_total",
            "counter",
            "Log channel bytes sent (primary) or received (backup).",
            &one(channel.bytes as f64),
        );
        family(
            &mut out,
            "ftvmm_log_frames_total",
            "counter",
            "Log channel frames sent (primary) or received (backup).",
            &one(channel.frames as f64),
        );
        family(
            &mut out,
            "ftvmm_log_reconnects_total",
            "counter",
            "Log connections re-established after a break (the stream resumed where it broke).",
            &one(channel.reconnects as f64),
        );
        family(
            &mut out,
            "ftvmm_peer_lost",
            "gauge",
            "1 once the other replica of the pair was declared lost.",
            &one(f64::from(u8::from(channel.lost.is_some()))),
        );
        if role == Role::Primary {
            family(
                &mut out,
                "ftvmm_backup_lag_exits",
                "gauge",
                "Guest exits between the primary and the backup's replay.",
                &one(channel.backup_lag_exits as f64),
            );
            family(
                &mut out,
                "ftvmm_backup_lag_seconds",
                "gauge",
                "How long ago the primary was where the backup's replay is now.",
                &one(channel.backup_lag_us as f64 / 1e6),
            );
            family(
                &mut out,
                "ftvmm_log_rtt_seconds",
                "gauge",
                "Smoothed log channel round trip: a batch written to its acknowledgement.",
                &one(channel.ack_rtt_us as f64 / 1e6),
            );
            family(
                &mut out,
                "ftvmm_backup_throttle_seconds_total",
                "counter",
                "Time the primary's vCPU was held back for a lagging backup.",
                &one(channel.throttled_us as f64 / 1e6),
            );
            hold_histogram(&mut out, channel);
        } else {
            family(
                &mut out,
                "ftvmm_heartbeat_misses_total",
                "counter",
                "Times the log stream from the primary was silent for more than 30 ms.",
                &one(channel.heartbeat_misses as f64),
            );
        }
    }
    if let Some(go_live) = snapshot.go_live {
        family(
            &mut out,
            "ftvmm_go_live_seconds",
            "gauge",
            "Duration of the go-live: end of the lost primary's log to running live.",
            &one(go_live.as_secs_f64()),
        );
    }
    out
}

/// `ftvmm_output_hold_seconds`: cumulative `le` buckets from the channel's per-bucket
/// counts, `_sum` from the total hold time, `_count` the released outputs.
fn hold_histogram(out: &mut String, channel: &ChannelStats) {
    let name = "ftvmm_output_hold_seconds";
    let hold = &channel.outputs;
    let _ = writeln!(
        out,
        "# HELP {name} Time guest outputs waited for the backup's acknowledgement."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (bound, count) in HOLD_BUCKET_BOUNDS_US.iter().zip(hold.hold_buckets.iter()) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let total: u64 = hold.hold_buckets.iter().sum();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {}", hold.hold_us_total as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {total}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(role: Role, snapshot: Snapshot) -> Shared {
        Shared {
            identity: Identity {
                vm: Some("web 1".into()),
                generation: 2,
                role,
            },
            started: Instant::now(),
            snapshot: Mutex::new(snapshot),
            memory: Mutex::default(),
            clients: AtomicUsize::new(0),
            // SAFETY: pthread_self has no preconditions.
            vcpu_thread: unsafe { libc::pthread_self() },
            path: PathBuf::new(),
        }
    }

    #[test]
    fn status_names_a_backup_that_went_live_live() {
        let snapshot = Snapshot {
            went_live_at: Some(7),
            go_live: Some(Duration::from_millis(12)),
            channel: Some(ChannelStats::default()),
            ..Snapshot::default()
        };
        let line = status_line(&shared(Role::Backup, snapshot));
        assert!(line.starts_with("vm=web_1 pid="), "{line}");
        assert!(line.contains(" role=live "), "{line}");
        assert!(line.contains(" went_live_at=7 go_live_ms=12"), "{line}");
        assert!(!line.contains("backup_lag"), "a backup has no lag: {line}");
    }

    #[test]
    fn a_live_backup_that_cloned_a_new_backup_is_that_pairs_protected_primary() {
        let snapshot = Snapshot {
            went_live_at: Some(7),
            channel: Some(ChannelStats::default()),
            cloned_generation: Some(3),
            ..Snapshot::default()
        };
        let line = status_line(&shared(Role::Backup, snapshot));
        assert!(line.contains(" role=primary "), "{line}");
        assert!(line.contains(" generation=3 "), "{line}");
        assert!(line.contains(" protected=1 peer_lost=0 "), "{line}");
        assert!(line.contains(" backup_lag_exits="), "{line}");
    }

    #[test]
    fn stop_backup_is_refused_by_a_backup_that_went_live() {
        let snapshot = Snapshot {
            went_live_at: Some(7),
            channel: Some(ChannelStats::default()),
            ..Snapshot::default()
        };
        let shared = shared(Role::Backup, snapshot);
        let (mut client, server) = UnixStream::pair().expect("a socket pair");
        client.write_all(b"stop-backup\n").expect("request");
        handle(server, &shared);
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("answer");
        assert_eq!(
            answer,
            "error: not stopping: this replica is not a following backup (role=live)\n"
        );
    }

    #[test]
    fn the_hold_histogram_is_cumulative_and_counts_every_release() {
        let mut channel = ChannelStats::default();
        channel.outputs.hold_buckets[0] = 2;
        channel.outputs.hold_buckets[3] = 1;
        channel.outputs.hold_buckets[HOLD_BUCKET_BOUNDS_US.len()] = 4;
        channel.outputs.hold_us_total = 1_500_000;
        let mut text = String::new();
        hold_histogram(&mut text, &channel);
        assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.00005\"} 2\n"));
        assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.0005\"} 3\n"));
        assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"0.25\"} 3\n"));
        assert!(text.contains("ftvmm_output_hold_seconds_bucket{le=\"+Inf\"} 7\n"));
        assert!(text.contains("ftvmm_output_hold_seconds_sum 1.5\n"));
        assert!(text.contains("ftvmm_output_hold_seconds_count 7\n"));
    }

    #[test]
    fn unknown_requests_are_quoted_printably_and_cut_short() {
        assert_eq!(printable("st\u{1b}tus"), "st?tus");
        assert_eq!(printable(&"x".repeat(50)), format!("{}...", "x".repeat(40)));
    }
}
