//! The backup's end: the receiver thread that acknowledges and queues what arrives, the
//! reader the replay takes the log from, and what the machine sees of it ([`BackupLink`]).

use super::*;

/// A backup's link to its primary: the log channel, and the pair's go-live, which decides
/// whether this replica goes live when the log ends without an end frame.
pub struct Follower {
    channel: BackupChannel,
    golive: Arc<GoLive>,
}

impl Follower {
    /// Follows through `channel`; `golive` decides at the end of the log.
    pub fn new(channel: BackupChannel, golive: Arc<GoLive>) -> Follower {
        Follower { channel, golive }
    }

    /// The channel's counters.
    pub fn stats(&self) -> ChannelStats {
        self.channel.stats()
    }
}

impl BackupLink for Follower {
    fn replayed_to(&self, ordinal: u64) {
        self.channel.set_ordinal(ordinal);
    }

    fn log_ended(&mut self, last_ordinal: u64) -> Result<(), ReplayStop> {
        // A stop that ended the stream (the reader gives up waiting once one is pending)
        // reaches the go-live first: a stopping backup never claims.
        if ftvm_machine::signals::stop_requested().is_some() {
            let _ = self.golive.request(Request::Stop, Duration::ZERO);
        }
        let why = self
            .channel
            .stats()
            .lost
            .unwrap_or_else(|| "the log stream ended".into());
        match self
            .golive
            .peer_lost(&format!("primary lost ({why})"), false)
        {
            State::Live => Ok(()),
            state => Err(pair_end(&state)
                .and_then(|end| match end {
                    PairEnd::Halt(stop) => Some(stop),
                    PairEnd::Alone => None,
                })
                .unwrap_or(ReplayStop::LogEnded { last_ordinal })),
        }
    }

    fn close(&mut self) {
        self.channel.close();
    }
}

/// The backup's end of the channel: a receiver thread that queues what arrives and
/// acknowledges it.
pub struct BackupChannel {
    shared: Arc<Shared>,
    receiver: Option<JoinHandle<()>>,
}

/// What the backup's replay reads the log from: the receiver thread's queue. It blocks
/// until data arrives and ends (`Ok(0)`) when the stream does or a stop signal came.
pub struct StreamReader {
    rx: mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.chunk.len() {
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                // A SIGTERM must not wait for the primary's next frame.
                Err(RecvTimeoutError::Timeout)
                    if ftvm_machine::signals::stop_requested().is_some() =>
                {
                    return Ok(0)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let len = buf.len().min(self.chunk.len() - self.pos);
        buf[..len].copy_from_slice(&self.chunk[self.pos..self.pos + len]);
        self.pos += len;
        Ok(len)
    }
}

impl BackupChannel {
    /// Connects to the primary at `addr` (see [`connect`]), says hello as a new backup of
    /// `pair` and starts the receiver, which reconnects to `addr` if the connection
    /// breaks.
    ///
    /// A connection refused after the handshake started (another stream's primary still
    /// ending on that port, or a primary not ready yet) is tried again, within
    /// [`CONNECT_PATIENCE`] in all.
    pub fn connect(
        addr: &str,
        pair: &crate::arbiter::PairId,
    ) -> Result<(BackupChannel, StreamReader), ChannelError> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        loop {
            let socket = connect(addr)?;
            configure(&socket)?;
            // The answer may take a handshake's time (the primary's TLS and hello thread).
            socket
                .set_read_timeout(Some(HANDSHAKE_PATIENCE))
                .map_err(ChannelError::Socket)?;
            match handshake(&socket, Hello::new_backup(pair)) {
                Ok(session) => return Self::start(socket, session, Some(addr.to_owned())),
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!("log channel: {addr} refused the handshake ({err}); retrying");
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

    /// Starts the receiver thread on a connected socket past the handshake (`session`
    /// answered). Without `addr` a broken connection loses the primary at once.
    pub fn start(
        socket: Socket,
        session: u64,
        addr: Option<String>,
    ) -> Result<(BackupChannel, StreamReader), ChannelError> {
        configure(&socket)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            session,
            ..Shared::default()
        });
        shared.install(socket.try_clone().map_err(ChannelError::Socket)?);
        let receiver = {
            let shared = shared.clone();
            spawn("ftvmm-log-recv", move || {
                receive_loop(socket, addr.as_deref(), &tx, &shared);
            })?
        };
        Ok((
            BackupChannel {
                shared,
                receiver: Some(receiver),
            },
            StreamReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            },
        ))
    }

    /// The exit ordinal the replay has reached, reported with every acknowledgement.
    pub fn set_ordinal(&self, ordinal: u64) {
        self.shared.backup_ordinal.store(ordinal, Ordering::Relaxed);
    }

    /// The counters.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats()
    }

    /// Where the counters can be read from any thread.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource::of(self.shared.clone())
    }

    /// Tells the primary this backup goes away for good ([`Ack::LEAVING`]), best effort.
    fn leave(&self) {
        if let Some(socket) = &self.shared.link().socket {
            let mut writer = socket;
            let _ = writer.write_all(&Ack::LEAVING.encode());
        }
    }

    /// Closes the connection and stops the receiver.
    pub fn close(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.leave();
        self.shared.shutdown_link();
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
}

impl Drop for BackupChannel {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.leave();
        self.shared.shutdown_link();
    }
}

/// Reconnects to the primary at `addr` and resumes the stream of `session` at byte
/// `offset`, trying for [`RECONNECT_WINDOW`]; gives up at once when nothing listens there.
pub(super) fn reconnect_and_resume(
    addr: &str,
    session: u64,
    offset: u64,
) -> Result<Socket, String> {
    use std::net::ToSocketAddrs;
    let deadline = Instant::now() + RECONNECT_WINDOW;
    let target = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("cannot resolve {addr}"))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no reconnection within {} ms",
                RECONNECT_WINDOW.as_millis()
            ));
        }
        match crate::transport::connect_timeout(&target, left) {
            Ok(socket) => {
                let answered = configure(&socket)
                    .map_err(|err| std::io::Error::other(err.to_string()))
                    .and_then(|()| socket.set_read_timeout(Some(left)))
                    .and_then(|()| handshake(&socket, Hello::Resume { session, offset }));
                match answered {
                    Ok(answer) if answer == session => {
                        let _ = socket.set_read_timeout(Some(PEER_TIMEOUT));
                        return Ok(socket);
                    }
                    Ok(_) => return Err("the primary answered for another stream".into()),
                    // Refused (closed) or not answered yet: the primary may not have
                    // noticed the break; try again.
                    Err(err) => tracing::debug!("log channel: resuming at {addr}: {err}"),
                }
            }
            Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
                return Err(format!("nothing listens at {addr} any more"));
            }
            Err(err) => tracing::debug!("log channel: reconnecting to {addr}: {err}"),
        }
        // Short: a dying primary's listener refuses within moments, and every millisecond
        // here delays the go-live.
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub(super) fn receive_loop(
    mut socket: Socket,
    addr: Option<&str>,
    tx: &mpsc::Sender<Vec<u8>>,
    shared: &Shared,
) {
    let mut split = FrameSplitter::default();
    let mut buffer = vec![0u8; 64 * 1024];
    // Stream bytes received, whole frames or not (the log reader has them all): where a
    // resumed stream must continue.
    let mut received = 0u64;
    let mut last_read = Instant::now();
    loop {
        let (broken, silent) = match socket.read(&mut buffer) {
            Ok(0) => (
                "the primary closed the log channel without an end frame".to_owned(),
                false,
            ),
            Ok(len) => {
                let silent = last_read.elapsed();
                if silent > HEARTBEAT_MISS {
                    shared.heartbeat_misses.fetch_add(1, Ordering::Relaxed);
                }
                shared.heard_after(silent);
                last_read = Instant::now();
                received += len as u64;
                let before = split.frames;
                split.feed(&buffer[..len]);
                shared.count_frames(&split);
                if tx.send(buffer[..len].to_vec()).is_err() {
                    // The replay is over.
                    return;
                }
                if split.frames > before {
                    let ack = Ack {
                        frames: split.frames,
                        bytes: split.bytes,
                        ordinal: shared.backup_ordinal.load(Ordering::Relaxed),
                    };
                    // A primary that cannot take acks is noticed by the next read.
                    let _ = socket.write_all(&ack.encode());
                }
                continue;
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => (
                silence_or_error(&err, "nothing from the primary"),
                is_silence(&err),
            ),
        };
        if split.ended || shared.closing.load(Ordering::Acquire) {
            return;
        }
        let generation = shared.link_generation.load(Ordering::Acquire);
        // Shut down, so that the primary notices the break too and takes the resumption.
        shared.broken(generation, broken.clone(), silent);
        let resumed = match addr {
            // A primary silent for the whole peer timeout is not waited for any longer.
            Some(_) if silent => Err("not reconnecting to a silent primary".to_owned()),
            Some(addr) => reconnect_and_resume(addr, shared.session, received),
            None => Err("no address to reconnect to".to_owned()),
        };
        match resumed.and_then(|socket| {
            socket
                .try_clone()
                .map(|clone| (socket, clone))
                .map_err(|err| err.to_string())
        }) {
            Ok((resumed, clone)) => {
                shared.install(clone);
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "log channel: reconnected to the primary; resumed at byte {received}"
                );
                socket = resumed;
            }
            Err(why) => {
                shared.lose(format!("{broken}; {why}"));
                return;
            }
        }
    }
}
