//! Re-establishing a broken log connection without losing or repeating a byte.
//!
//! Every connection starts with the backup's [`Hello`]; the primary answers with the
//! stream's session number and then sends the stream from the offset the hello asks
//! for: 0 for a new backup, or, when a backup resumes after a broken connection, the
//! number of stream bytes it has received (whole frames or not: its log reader has them
//! all). The primary keeps every byte the backup has not acknowledged in a
//! [`Retransmit`] buffer, so it can serve any offset between the last acknowledgement and
//! what it sent; anything else, or another session, is refused.

use super::*;
use std::collections::VecDeque;

/// Length of a hello on the wire.
pub const HELLO_LEN: usize = 32;
const MAGIC: [u8; 4] = *b"FTLC";
/// Version of the connection protocol (hello, session answer, acknowledgements).
const VERSION: u16 = 2;

/// What a backup says first on every connection to its primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A backup that has nothing yet: the stream from its start, of the pair whose tag
    /// ([`PairId::tag`](crate::arbiter::PairId::tag): the VM and its uid) and generation
    /// it names; a primary of another pair refuses it.
    New {
        /// The pair's tag.
        pair: u64,
        /// The pair's generation.
        generation: u64,
    },
    /// A backup whose connection broke: the stream of `session` from byte `offset`.
    Resume {
        /// The session number the primary gave on the first connection.
        session: u64,
        /// Stream bytes received so far.
        offset: u64,
    },
}

impl Hello {
    /// The wire form: `magic "FTLC" | version u16 | kind u16 (0 new, 1 resume) | a u64 |
    /// b u64 | reserved u32 | crc32 u32` (little-endian; the CRC covers the first 28
    /// bytes), where a new backup's `a, b` are the pair's tag and generation and a
    /// resuming one's the session and offset.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let (kind, session, offset) = match *self {
            Hello::New { pair, generation } => (0u16, pair, generation),
            Hello::Resume { session, offset } => (1, session, offset),
        };
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&kind.to_le_bytes());
        out[8..16].copy_from_slice(&session.to_le_bytes());
        out[16..24].copy_from_slice(&offset.to_le_bytes());
        let crc = crc32fast::hash(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// A new backup's hello for `pair`.
    pub fn new_backup(pair: &crate::arbiter::PairId) -> Hello {
        Hello::New {
            pair: pair.tag(),
            generation: pair.generation,
        }
    }

    /// Whether this is a new backup's hello for `pair`; `Err` says what else it is.
    pub fn check_new(&self, pair: &crate::arbiter::PairId) -> Result<(), String> {
        match *self {
            Hello::New {
                pair: tag,
                generation,
            } if tag == pair.tag() && generation == pair.generation => Ok(()),
            Hello::New { pair: tag, .. } if tag != pair.tag() => {
                Err(format!("a backup of another VM (not {})", pair.vm))
            }
            Hello::New { generation, .. } => Err(format!(
                "a backup of generation {generation}, not {}",
                pair.generation
            )),
            Hello::Resume { .. } => Err("a resumption of a stream this primary never had".into()),
        }
    }

    /// Parses the wire form; says what is wrong with anything else.
    pub fn decode(bytes: &[u8; HELLO_LEN]) -> Result<Hello, &'static str> {
        let word = |at: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(le)
        };
        if bytes[0..4] != MAGIC {
            return Err("not an ftvm log channel hello");
        }
        let crc = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
        if crc32fast::hash(&bytes[..28]) != crc {
            return Err("corrupt hello");
        }
        if u16::from_le_bytes([bytes[4], bytes[5]]) != VERSION {
            return Err("another version of the log channel protocol");
        }
        match u16::from_le_bytes([bytes[6], bytes[7]]) {
            0 => Ok(Hello::New {
                pair: word(8),
                generation: word(16),
            }),
            1 => Ok(Hello::Resume {
                session: word(8),
                offset: word(16),
            }),
            _ => Err("unknown hello kind"),
        }
    }
}

/// The stream bytes a backup may still ask for again: from the last acknowledgement to
/// the end of what was sent.
#[derive(Debug, Default)]
pub struct Retransmit {
    /// Stream offset of `bytes[0]`.
    base: u64,
    bytes: VecDeque<u8>,
}

impl Retransmit {
    /// Appends what was just sent.
    pub fn sent(&mut self, batch: &[u8]) {
        self.bytes.extend(batch);
    }

    /// Forgets what the backup acknowledged (stream offset `acked`).
    pub fn acked(&mut self, acked: u64) {
        let drop = acked.saturating_sub(self.base).min(self.bytes.len() as u64);
        self.bytes.drain(..drop as usize);
        self.base += drop;
    }

    /// The bytes from stream offset `offset` on, if this buffer still has them all.
    pub fn from(&self, offset: u64) -> Option<Vec<u8>> {
        let skip = usize::try_from(offset.checked_sub(self.base)?).ok()?;
        (skip <= self.bytes.len()).then(|| self.bytes.range(skip..).copied().collect())
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Where a primary's backup reconnects after its connection broke.
pub enum Resumptions {
    /// The listener the pair started on: the channel accepts and reads the hellos.
    Listen(TcpListener),
    /// Connections someone else accepted and read the hello of (the clone listener of a
    /// cloned pair, which also takes new clone requests on the same address).
    Handed(mpsc::Receiver<Resumption>),
}

/// A connection that says it resumes a stream: the socket, its peer, its hello.
pub type Resumption = (Socket, std::net::SocketAddr, Hello);

impl Resumptions {
    /// The next connection whose hello was read, before `deadline` (`None`: none came).
    fn next(&self, deadline: Instant) -> Option<Resumption> {
        match self {
            Resumptions::Listen(listener) => loop {
                let (socket, peer) = accept_within(listener, deadline).ok().flatten()?;
                let patience = deadline.saturating_duration_since(Instant::now());
                let socket = match crate::transport::accept(socket, patience) {
                    Ok(socket) => socket,
                    Err(err) => {
                        tracing::warn!("log channel: {peer}: {err}: refused");
                        continue;
                    }
                };
                let patience = deadline.saturating_duration_since(Instant::now());
                match read_hello(&socket, patience) {
                    Ok(hello) => return Some((socket, peer, hello)),
                    // Another may still come before the deadline.
                    Err(err) => tracing::warn!("log channel: {peer}: {err}: refused"),
                }
            },
            Resumptions::Handed(handed) => {
                let patience = deadline.saturating_duration_since(Instant::now());
                handed.recv_timeout(patience).ok()
            }
        }
    }
}

/// Takes a reconnecting backup whenever the connection breaks; declares the backup lost
/// when none comes within [`RECONNECT_WINDOW`] (at once without a source of them).
pub(super) fn reconnect_loop(resumptions: Option<Resumptions>, shared: &Shared) {
    loop {
        let (since, reason, silent) = {
            let mut link = shared.link();
            loop {
                if shared.closing.load(Ordering::Acquire) || shared.is_lost() {
                    return;
                }
                if let Some(broken) = &link.broken {
                    break broken.clone();
                }
                link = shared
                    .link_changed
                    .wait_timeout(link, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        // A peer silent for the whole peer timeout is not waited for any longer: a new
        // connection would not get through where the old one stayed silent.
        let resumed = !silent
            && resumptions.as_ref().is_some_and(|resumptions| {
                accept_resumption(resumptions, shared, since + RECONNECT_WINDOW)
            });
        if !resumed {
            if resumptions.is_some() && !silent {
                shared.lose(format!(
                    "{reason}; the backup did not reconnect within {} ms",
                    RECONNECT_WINDOW.as_millis()
                ));
            } else {
                shared.lose(reason);
            }
            return;
        }
    }
}

/// Takes connections from `resumptions` until `deadline` for the backup of this stream to
/// resume it: checks its hello, sends the session number and the stream from the byte
/// the backup asks for, and installs the connection. Returns whether that happened.
pub(super) fn accept_resumption(
    resumptions: &Resumptions,
    shared: &Shared,
    deadline: Instant,
) -> bool {
    loop {
        if Instant::now() >= deadline || shared.closing.load(Ordering::Acquire) {
            return false;
        }
        let Some((socket, peer, hello)) = resumptions.next(deadline) else {
            return false;
        };
        if configure(&socket).is_err() {
            continue;
        }
        let offset = match hello {
            Hello::Resume { session, offset } if session == shared.session => offset,
            hello => {
                tracing::warn!(
                    "log channel: {peer} is not this stream's backup ({hello:?}): refused"
                );
                continue;
            }
        };
        let mut retransmit = shared.retransmit();
        // Nothing the backup acknowledged may be asked for again.
        retransmit.acked(shared.acked_bytes.load(Ordering::Acquire));
        let Some(resend) = retransmit.from(offset) else {
            tracing::warn!(
                "log channel: the backup resumes at byte {offset}, which this primary no longer has: refused"
            );
            continue;
        };
        let mut writer = &socket;
        if writer
            .write_all(&shared.session.to_le_bytes())
            .and_then(|()| writer.write_all(&resend))
            .is_err()
        {
            continue;
        }
        // Installed while the retransmit buffer is still locked: the sender's next batch
        // goes to this connection, after the resent bytes.
        shared.install(socket);
        drop(retransmit);
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "log channel: the backup reconnected from {peer}; the stream resumed at byte {offset} ({} bytes sent again)",
            resend.len()
        );
        return true;
    }
}

/// Accepts a connection on `listener` before `deadline` (`None` when none came).
pub(super) fn accept_within(
    listener: &TcpListener,
    deadline: Instant,
) -> Result<Option<(TcpStream, std::net::SocketAddr)>, ChannelError> {
    listener
        .set_nonblocking(true)
        .map_err(ChannelError::Accept)?;
    let accepted = loop {
        match listener.accept() {
            Ok(accepted) => break Ok(Some(accepted)),
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => break Err(ChannelError::Accept(err)),
        }
    };
    listener
        .set_nonblocking(false)
        .map_err(ChannelError::Accept)?;
    let accepted = accepted?;
    if let Some((socket, _)) = &accepted {
        socket
            .set_nonblocking(false)
            .map_err(ChannelError::Socket)?;
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_anything_else_is_refused() {
        for hello in [
            Hello::New {
                pair: 0xfeed,
                generation: 3,
            },
            Hello::Resume {
                session: u64::MAX,
                offset: 12345,
            },
        ] {
            assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        }
        let wire = Hello::Resume {
            session: 7,
            offset: 9,
        }
        .encode();
        for at in 0..HELLO_LEN {
            let mut bad = wire;
            bad[at] ^= 0x10;
            assert!(Hello::decode(&bad).is_err(), "flip at {at}");
        }
        assert!(Hello::decode(&[0u8; HELLO_LEN]).is_err());
    }

    #[test]
    fn retransmit_serves_exactly_the_unacknowledged_bytes() {
        let mut buffer = Retransmit::default();
        buffer.sent(b"hello ");
        buffer.sent(b"world");
        assert_eq!(buffer.from(0).as_deref(), Some(&b"hello world"[..]));
        buffer.acked(6);
        assert_eq!(buffer.from(6).as_deref(), Some(&b"world"[..]));
        assert_eq!(buffer.from(8).as_deref(), Some(&b"rld"[..]));
        assert_eq!(buffer.from(11).as_deref(), Some(&b""[..]));
        // Before the acknowledgement, or beyond what was sent: not served.
        assert_eq!(buffer.from(5), None);
        assert_eq!(buffer.from(12), None);
        // An old acknowledgement changes nothing; one past the end empties it.
        buffer.acked(3);
        assert_eq!(buffer.len(), 5);
        buffer.acked(100);
        assert!(buffer.is_empty());
        assert_eq!(buffer.from(11).as_deref(), Some(&b""[..]));
    }
}
