//! The log channel of an FT pair: the primary streams its log (`ftvm_log` frames) to
//! the backup over one TCP connection, and the backup acknowledges what it received on the
//! same connection.
//!
//! ```text
//!  primary                                           backup
//!  -------                                           ------
//!  vCPU thread: frames -> StreamWriter (memory)
//!    outputs (TAP frames, disk writes) -> hold queue (log position)
//!    flush (HLT wait, output produced, >= 1 ms):
//!    + Heartbeat(h), batch -> socket when nothing is queued, else -> queue;
//!      back-pressure
//!  sender thread: queue -> socket (TCP_NODELAY) ---> receiver thread: socket -> queue,
//!    idle 10 ms: repeats the last Heartbeat            counts whole frames (FrameSplitter)
//!    keeps unacknowledged bytes (Retransmit)
//!  ack thread: acked := ack.bytes  <---------------    ack {frames, bytes, ordinal} after
//!    held outputs with position <= acked -> done       every read that completed a frame
//!  resume thread: takes a reconnecting backup        vCPU thread: queue -> LogReader -> replay
//! ```
//!
//! The vCPU thread of the primary appends encoded frames to a buffer and, at a flush,
//! writes the batch to the socket itself when the sender thread has none queued (one
//! thread wake less for every held output), else queues it for that thread; one lock and
//! a queue counter keep batches in order. The backup's receiver acknowledges
//! on receipt, not after replay, so an acknowledgement means "the backup holds these frames
//! and can replay them without the primary".
//!
//! The output rule: an output the primary's guest produces (a frame for the TAP, a disk
//! write or flush) is queued with the log's length at that moment and is done by the ack
//! thread once an acknowledgement covers that length, in the order the guest produced
//! them. Acknowledgements count stream bytes, keepalives included; positions count the log
//! the recorder wrote, so keepalives are subtracted before comparing. Whether anything is
//! released is the pair's go-live's decision ([`crate::golive`]): on acknowledgements only
//! while paired (or stopping), everything once the claim after a lost backup was won,
//! nothing while the claim is open or after it was lost.
//!
//! An acknowledgement is [`ACK_LEN`] bytes, little-endian:
//! `frames u64 | bytes u64 | backup exit ordinal u64 | crc32 u32` where `frames` and `bytes`
//! count the whole frames received since the start of the stream (the header included) and
//! the crc32 (IEEE) covers the first 24 bytes. [`Ack::LEAVING`] (every field `u64::MAX`)
//! is not an acknowledgement: the backup goes away for good.
//!
//! A connection that fails is re-established within [`RECONNECT_WINDOW`] when it can be,
//! the stream resuming at the byte where it broke (see [`resume`]); either side declares
//! the other lost when that fails or the connection stays silent for [`PEER_TIMEOUT`] (the
//! primary's heartbeats and the backup's acks keep it busy).

use self::hold::{Held, OutputHold};
use self::primary::pair_end;
use self::resume::{accept_within, reconnect_loop, Hello, Retransmit, HELLO_LEN};
use self::shared::{Shared, Writing};
use crate::golive::{GoLive, Halt, Request, State, CLAIM_PATIENCE};
use crate::transport::HANDSHAKE_PATIENCE;
use ftvm_log::{Event, Frame, FrameSplitter, HEARTBEAT_KIND};
use ftvm_machine::devices::virtio::tap::Tap;
use ftvm_machine::link::{BackupLink, Output, PairEnd, PrimaryLink};
use ftvm_machine::outcome::ReplayStop;
use ftvm_tls::Socket;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The sender repeats the last heartbeat after this much silence (a halted or computing
/// guest), so the backup can tell a quiet primary from a dead one.
pub const KEEPALIVE_EVERY: Duration = Duration::from_millis(10);

/// Silence after which the peer is declared lost. The primary sends at least a keepalive
/// every [`KEEPALIVE_EVERY`] and the backup acknowledges every read, from threads of their
/// own (a guest that computes or halts does not delay them): what stretches a silence is
/// the hosts' scheduling and the network. The longest silence `bench ft` measured under
/// every load on a 2-core host with both replicas, the client and redis-benchmark
/// competing (`peer_silence_max_us`) was 33 ms; 300 ms is nine times that, and it is
/// also above a lost segment's recovery on the log connection (fast retransmission after
/// three more keepalives; TCP's 200 ms minimum timeout otherwise). Shorter would cost
/// false failovers for a few hundred milliseconds less of failover.
pub const PEER_TIMEOUT: Duration = Duration::from_millis(300);
/// Connections whose hello a primary reads at once while it waits for its backup; more
/// are closed at once (each gets [`HANDSHAKE_PATIENCE`] for its handshake and hello: a
/// handshake costs more CPU than a keepalive, and a slow one only delays a start).
const MAX_HELLOS_READ: usize = 16;

/// How long a broken connection may take to be re-established (the backup reconnects
/// and the stream resumes at the byte where it broke) before the peer is declared lost.
/// A backup stops trying early when nothing listens at the primary's address any more
/// (the primary process is gone).
pub const RECONNECT_WINDOW: Duration = Duration::from_millis(500);

/// How long a backup keeps trying to reach its primary.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// How far (in time) the backup's replay may trail the primary's guest before the
/// primary's vCPU is held back for it to catch up: this bounds how much log a backup
/// still has to replay when it goes live, and so the failover time.
pub const MAX_BACKUP_LAG: Duration = Duration::from_millis(100);

/// How many bytes the primary's held outputs may keep in memory before its vCPU waits
/// for them to be released (back-pressure instead of growth).
pub const MAX_HELD_BYTES: u64 = 64 << 20;
/// How long an acknowledgement lets the primary release output, counted from when the
/// newest batch it covers was written. The backup declares the primary lost only after
/// [`PEER_TIMEOUT`] without receiving anything, and it received that batch after it was
/// written: until then it cannot have gone live, so output released within the lease
/// never lands after the backup took over. An acknowledgement read later than that (the
/// primary was frozen, or starved of CPU) releases nothing; a fresher one, or the
/// go-live claim, decides instead. Half the peer timeout leaves room for the release
/// itself and for clocks that tick at slightly different rates.
pub const ACK_LEASE: Duration = Duration::from_millis(PEER_TIMEOUT.as_millis() as u64 / 2);
/// A backup counts a heartbeat miss when nothing arrived for this long (the primary
/// sends at least a keepalive every [`KEEPALIVE_EVERY`]).
pub const HEARTBEAT_MISS: Duration = Duration::from_millis(30);

/// Length of an acknowledgement on the wire.
pub const ACK_LEN: usize = 28;

/// The kind byte of a Header frame.
pub(super) const HEADER_KIND: u8 = 1;

/// Setting up the log channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The listening socket cannot be made.
    #[error("cannot listen for the backup on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Accepting the backup's connection failed.
    #[error("cannot accept the backup's log connection")]
    Accept(#[source] std::io::Error),
    /// The primary cannot be reached.
    #[error("cannot connect to the primary at {addr} (tried for {} s)", CONNECT_PATIENCE.as_secs())]
    Connect {
        /// The address.
        addr: String,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// No backup connected in time.
    #[error("no backup connected within {} s", .waited.as_secs())]
    NoBackup {
        /// How long the primary waited.
        waited: Duration,
    },
    /// Socket options or a clone of the socket failed.
    #[error("cannot set up the log channel socket")]
    Socket(#[source] std::io::Error),
    /// A channel thread could not be started.
    #[error("cannot start a log channel thread")]
    Spawn(#[source] std::io::Error),
}

/// Binds the address the backup will connect to.
///
/// An address still in use is tried again for [`CONNECT_PATIENCE`]: a control plane that
/// just stopped another VM's replica may hand its port on while that process is still
/// ending.
pub fn listen(addr: &str) -> Result<TcpListener, ChannelError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if err.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                tracing::debug!("log channel: {addr} is still in use; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(ChannelError::Listen {
                    addr: addr.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Connects to the primary at `addr` and secures the connection ([`crate::transport`]),
/// retrying for [`CONNECT_PATIENCE`] (the primary may not listen yet).
pub fn connect(addr: &str) -> Result<Socket, ChannelError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        let connected = TcpStream::connect(addr).and_then(|tcp| {
            crate::transport::secure_connected(tcp, crate::transport::HANDSHAKE_PATIENCE)
        });
        match connected {
            Ok(socket) => return Ok(socket),
            // A malformed address, or a peer whose certificate is refused (or who
            // refuses ours), will not get better.
            Err(err)
                if !matches!(
                    err.kind(),
                    ErrorKind::InvalidInput | ErrorKind::PermissionDenied
                ) && Instant::now() < deadline =>
            {
                tracing::debug!("log channel: {addr}: {err}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(ChannelError::Connect {
                    addr: addr.to_owned(),
                    source,
                })
            }
        }
    }
}

pub(super) fn spawn(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, ChannelError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(work)
        .map_err(ChannelError::Spawn)
}

pub(super) fn configure(socket: &Socket) -> Result<(), ChannelError> {
    socket.set_nodelay(true).map_err(ChannelError::Socket)?;
    socket
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(ChannelError::Socket)?;
    socket
        .set_write_timeout(Some(PEER_TIMEOUT))
        .map_err(ChannelError::Socket)
}

/// Whether `err` is a read or write that timed out: the peer stayed silent.
pub(super) fn is_silence(err: &std::io::Error) -> bool {
    matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

pub(super) fn silence_or_error(err: &std::io::Error, silent: &str) -> String {
    match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{silent} for {} ms", PEER_TIMEOUT.as_millis())
        }
        _ => err.to_string(),
    }
}

/// Reads a connection's hello, waiting at most `patience`.
pub fn read_hello(socket: &Socket, patience: Duration) -> Result<Hello, String> {
    let mut bytes = [0u8; HELLO_LEN];
    socket
        .set_read_timeout(Some(patience.max(Duration::from_millis(1))))
        .map_err(|err| err.to_string())?;
    let mut reader = socket;
    reader
        .read_exact(&mut bytes)
        .map_err(|err| format!("no hello: {err}"))?;
    socket
        .set_read_timeout(Some(PEER_TIMEOUT))
        .map_err(|err| err.to_string())?;
    Hello::decode(&bytes).map_err(str::to_owned)
}

/// A session number no other stream is likely to have: the OS-seeded hash keys std
/// makes for every `RandomState`.
pub(super) fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(std::process::id()));
    hasher.finish()
}

/// Says `hello` on a fresh connection and reads the primary's answer, the session number.
pub(super) fn handshake(socket: &Socket, hello: Hello) -> std::io::Result<u64> {
    let mut stream = socket;
    stream.write_all(&hello.encode())?;
    read_session(socket)
}

/// Reads the session number a primary sends before its stream ([`PrimaryChannel::start`]),
/// for a backup whose connection began some other way (a clone).
pub fn read_session(socket: &Socket) -> std::io::Result<u64> {
    let mut stream = socket;
    let mut session = [0u8; 8];
    stream.read_exact(&mut session)?;
    Ok(u64::from_le_bytes(session))
}

mod backup;
mod hold;
mod primary;
pub mod resume;
mod shared;
mod stats;
mod wire;

pub use backup::{BackupChannel, Follower, StreamReader};
pub use hold::{HoldStats, HOLD_BUCKET_BOUNDS_US};
pub use primary::{PrimaryChannel, StreamWriter};
pub use resume::{Resumption, Resumptions};
pub use stats::{ChannelStats, StatsSource};
pub use wire::Ack;

#[cfg(test)]
mod tests;
