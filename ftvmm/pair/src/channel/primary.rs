//! The primary's end: the stream writer (on the vCPU thread), the sender thread, the
//! acknowledgement thread, and what the machine sees of it ([`PrimaryLink`]).

use super::*;

pub(super) enum ToSender {
    Batch(Vec<u8>),
    Close,
}

/// The primary's end of the channel: a sender thread, an acknowledgement thread and a
/// thread that takes a backup's reconnection.
pub struct PrimaryChannel {
    tx: mpsc::Sender<ToSender>,
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
    acker: Option<JoinHandle<()>>,
    reconnector: Option<JoinHandle<()>>,
}

/// Where the primary's recorder writes frames: memory on the vCPU thread; `flush` writes
/// what collected as one batch, on this thread when the sender thread has nothing queued
/// (and is not writing a keepalive), else through that thread's queue, so batches stay in
/// order. It never fails: a lost backup is the channel's business, not the guest's.
pub struct StreamWriter {
    pending: Vec<u8>,
    tx: mpsc::Sender<ToSender>,
    shared: Arc<Shared>,
}

impl Write for StreamWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Nothing queued (checked under the writing lock, which the sender thread holds
        // until a batch is written and uncounted): every earlier batch is out, so this
        // one may go now, from here.
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            if let Ok(mut writing) = self.shared.writing.try_lock() {
                if self.shared.queued.load(Ordering::Acquire) == 0 {
                    write_batch(&self.shared, &mut writing, &self.pending, false);
                    self.pending.clear();
                    return Ok(());
                }
            }
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(4096));
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        // The sender thread is gone only after `close`: nothing more is sent then.
        let _ = self.tx.send(ToSender::Batch(batch));
        Ok(())
    }
}

impl PrimaryChannel {
    /// Waits for the backup on `listener`, then starts the channel's threads. Held
    /// transmits go out on `tap`. Connections that do not start with a new backup's hello
    /// are refused and the wait goes on. The listener stays open for a backup that
    /// reconnects.
    ///
    /// With `patience`, gives up after that long ([`ChannelError::NoBackup`]). `golive`
    /// decides what held output does when the backup is lost.
    pub fn accept(
        listener: &TcpListener,
        tap: Option<Tap>,
        patience: Option<Duration>,
        golive: Arc<GoLive>,
    ) -> Result<(PrimaryChannel, StreamWriter), ChannelError> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("log channel: waiting for the backup on {addr}");
        }
        let started = Instant::now();
        // Hellos are read side by side, each on a thread of its own: a connection that
        // says nothing (or says it slowly) cannot keep the real backup waiting behind it.
        let (hellos, said) = mpsc::channel();
        let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let socket = 'waiting: loop {
            while let Ok((socket, peer, checked)) = said.try_recv() {
                match checked {
                    Ok(()) => {
                        tracing::info!("log channel: backup connected from {peer}");
                        break 'waiting socket;
                    }
                    Err(err) => tracing::warn!("log channel: {peer}: {err}: refused"),
                }
            }
            let soon = Instant::now() + Duration::from_millis(20);
            let deadline = patience.map_or(soon, |patience| (started + patience).min(soon));
            let Some((socket, peer)) = accept_within(listener, deadline)? else {
                if patience.is_some_and(|patience| started.elapsed() >= patience) {
                    return Err(ChannelError::NoBackup {
                        waited: started.elapsed(),
                    });
                }
                continue;
            };
            if reading.load(Ordering::Acquire) >= MAX_HELLOS_READ {
                tracing::warn!(
                    "log channel: {peer}: too many connections saying nothing yet: refused"
                );
                continue;
            }
            reading.fetch_add(1, Ordering::AcqRel);
            let (hellos, reading, pair) = (hellos.clone(), reading.clone(), golive.pair().clone());
            let read = std::thread::Builder::new()
                .name("ftvmm-log-hello".into())
                .spawn(move || {
                    let secured = crate::transport::accept(socket, HANDSHAKE_PATIENCE);
                    reading.fetch_sub(1, Ordering::AcqRel);
                    match secured {
                        Ok(socket) => {
                            let checked = read_hello(&socket, HANDSHAKE_PATIENCE)
                                .and_then(|hello| hello.check_new(&pair));
                            let _ = hellos.send((socket, peer, checked));
                        }
                        Err(err) => tracing::warn!("log channel: {peer}: {err}: refused"),
                    }
                });
            if read.is_err() {
                tracing::warn!("log channel: {peer}: cannot start a thread to read its hello");
            }
        };
        let listener = listener.try_clone().map_err(ChannelError::Socket)?;
        Self::start(socket, Some(Resumptions::Listen(listener)), tap, golive)
    }

    /// Starts the channel's threads on a connected socket whose hello was read: answers
    /// with the session number, then streams. Held transmits go out on `tap`; a backup
    /// that reconnects comes from `resumptions` (without, a broken connection loses the
    /// backup at once); `golive` decides what held output does when the backup is lost.
    pub fn start(
        socket: Socket,
        resumptions: Option<Resumptions>,
        tap: Option<Tap>,
        golive: Arc<GoLive>,
    ) -> Result<(PrimaryChannel, StreamWriter), ChannelError> {
        configure(&socket)?;
        let session = new_session();
        (&socket)
            .write_all(&session.to_le_bytes())
            .map_err(ChannelError::Socket)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            session,
            golive: Some(golive),
            ..Shared::default()
        });
        shared.hold().tap = tap;
        shared.install(socket);
        let sender = {
            let shared = shared.clone();
            spawn("ftvmm-log-send", move || send_loop(&rx, &shared))?
        };
        let acker = {
            let shared = shared.clone();
            spawn("ftvmm-log-ack", move || ack_loop(&shared))?
        };
        let reconnector = {
            let shared = shared.clone();
            spawn("ftvmm-log-resume", move || {
                reconnect_loop(resumptions, &shared)
            })?
        };
        let writer = StreamWriter {
            pending: Vec::with_capacity(4096),
            tx: tx.clone(),
            shared: shared.clone(),
        };
        Ok((
            PrimaryChannel {
                tx,
                shared,
                sender: Some(sender),
                acker: Some(acker),
                reconnector: Some(reconnector),
            },
            writer,
        ))
    }

    /// The counters.
    pub fn stats(&self) -> ChannelStats {
        self.shared.stats()
    }

    /// The primary's guest has reached exit `ordinal` (for the backup lag figures).
    pub fn progress(&self, ordinal: u64) {
        self.shared.progress(ordinal);
    }

    /// Back-pressure: when the backup trails by more than [`MAX_BACKUP_LAG`], waits (the
    /// caller is the vCPU thread between two exits, so the guest stays stopped) until the
    /// backup is within half of it again, or is lost, or [`PEER_TIMEOUT`] passed.
    pub fn hold_back_for_backup(&self) {
        let behind = || self.shared.lag().1 > MAX_BACKUP_LAG;
        let heavy = || self.shared.hold().bytes > MAX_HELD_BYTES;
        if !(behind() || heavy()) || self.shared.is_lost() {
            return;
        }
        let started = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(1));
            let lagging =
                self.shared.lag().1 > MAX_BACKUP_LAG / 2 && started.elapsed() < PEER_TIMEOUT;
            // Memory is never traded for progress: the vCPU waits as long as the held
            // outputs weigh too much, until they are released or the pair ends.
            let holding = heavy() && !self.pair_ended();
            if !holding && (self.shared.is_lost() || !lagging) {
                break;
            }
        }
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared
            .throttled_us
            .fetch_add(waited, Ordering::Relaxed);
        self.shared.throttles.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the pair's go-live decided: held output is then released or discarded.
    fn pair_ended(&self) -> bool {
        self.shared
            .golive
            .as_ref()
            .is_none_or(|golive| matches!(golive.state(), State::Live | State::Halted(_)))
    }

    /// The output rule: `output`, produced by the guest when the log was `position` bytes
    /// long (a frame for the TAP, or a disk write or flush run on the ack thread in order
    /// with the frames), is performed once the backup has acknowledged that much of the
    /// log, or as the pair's go-live decides once the backup is lost. The caller never
    /// waits.
    fn hold_output(&self, position: u64, output: Output) {
        let releases = self.shared.releases_on_ack();
        let mut hold = self.shared.hold();
        if hold.unprotected {
            hold.stats.unprotected += 1;
            hold.emit(output);
            return;
        }
        hold.stats.held += 1;
        hold.bytes += output.bytes();
        hold.queue.push_back(Held {
            position,
            output,
            since: Instant::now(),
        });
        // The frames before it may be acknowledged already (nothing logged since).
        if releases {
            let shared = &self.shared;
            hold.release(
                Some(shared.acked_log_bytes.load(Ordering::Acquire)),
                &|| shared.releases_on_ack(),
            );
        }
    }

    /// Sends what is queued, waits up to `patience` for the backup to acknowledge all of it
    /// (unless it is lost), then closes the connection. Held output is released as the
    /// acknowledgements come; the pair then stops ([`Request::Stop`]): a claim still open
    /// decides the rest (released if won), and whatever is still held after that is
    /// discarded, never performed without a verdict.
    pub fn close(&mut self, patience: Duration) {
        let _ = self.tx.send(ToSender::Close);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let deadline = Instant::now() + patience;
        while !self.shared.is_lost()
            && self.shared.acked_bytes.load(Ordering::Acquire)
                < self.shared.bytes.load(Ordering::Acquire)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(golive) = &self.shared.golive {
            // Waits for a claim in progress (a thread of this channel asks the arbiter).
            let _ = golive.request(Request::Stop, CLAIM_PATIENCE + Duration::from_secs(1));
        }
        self.shared.closing.store(true, Ordering::Release);
        self.shared.shutdown_link();
        for thread in [self.acker.take(), self.reconnector.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
        match self.shared.golive.as_ref().map(|golive| golive.state()) {
            Some(State::Live) | None => self.shared.release_all(),
            Some(_) => self.shared.hold().discard(),
        }
    }

    /// Where the counters can be read from any thread.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource::of(self.shared.clone())
    }
}

impl PrimaryLink for PrimaryChannel {
    fn hold(&self, position: u64, output: Output) {
        self.hold_output(position, output);
    }

    fn progress(&self, ordinal: u64) {
        self.shared.progress(ordinal);
    }

    fn hold_back(&self) {
        self.hold_back_for_backup();
    }

    fn pair_end(&self) -> Option<PairEnd> {
        pair_end(&self.shared.golive.as_ref()?.state())
    }

    fn close(&mut self) {
        PrimaryChannel::close(self, FINAL_ACK_PATIENCE);
    }
}

/// What a go-live `state` means to the vCPU thread.
pub(super) fn pair_end(state: &State) -> Option<PairEnd> {
    match state {
        State::Live => Some(PairEnd::Alone),
        State::Halted(Halt::LostTo(winner)) => Some(PairEnd::Halt(ReplayStop::LostGoLive {
            winner: winner.clone(),
        })),
        State::Halted(Halt::Unreachable(why)) => {
            Some(PairEnd::Halt(ReplayStop::ArbiterUnreachable(why.clone())))
        }
        State::Paired | State::Claiming { .. } | State::Stopping => None,
    }
}

/// How long a primary waits at the end of the run for the backup to acknowledge the
/// whole log: long enough for a connection that breaks then to be resumed and the rest
/// acknowledged, or for the backup to be declared lost (the reconnection window).
pub(super) const FINAL_ACK_PATIENCE: Duration = RECONNECT_WINDOW.saturating_add(PEER_TIMEOUT);

impl Drop for PrimaryChannel {
    fn drop(&mut self) {
        // Without `close` (an error path): stop the threads without waiting for them.
        self.shared.closing.store(true, Ordering::Release);
        let _ = self.tx.send(ToSender::Close);
        self.shared.shutdown_link();
    }
}

pub(super) fn send_loop(rx: &mpsc::Receiver<ToSender>, shared: &Shared) {
    loop {
        match rx.recv_timeout(KEEPALIVE_EVERY) {
            Ok(ToSender::Batch(batch)) => {
                let mut writing = shared.writing();
                write_batch(shared, &mut writing, &batch, false);
                // Uncounted under the lock: a flush that then sees nothing queued knows
                // this batch is out.
                shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            Ok(ToSender::Close) | Err(RecvTimeoutError::Disconnected) => return,
            // Quiet vCPU thread: repeat the last promise, which stays true (a repeat after
            // anything but a heartbeat or the header could break ordinal order).
            Err(RecvTimeoutError::Timeout) => {
                let mut writing = shared.writing();
                if shared.queued.load(Ordering::Acquire) != 0 {
                    continue;
                }
                let Some((kind, ordinal)) = writing.split.last else {
                    continue;
                };
                if writing.split.ended || (kind != HEARTBEAT_KIND && kind != HEADER_KIND) {
                    continue;
                }
                let mut frame = Vec::with_capacity(32);
                Frame {
                    ordinal,
                    event: Event::Heartbeat,
                }
                .encode(&mut frame);
                write_batch(shared, &mut writing, &frame, true);
            }
        }
    }
}

/// Writes one batch of the stream (`keepalive`: a heartbeat the sender made up, not
/// from the recorder): counts it, keeps it for a resumption, and writes it to the
/// current connection, noting a broken one.
pub(super) fn write_batch(shared: &Shared, writing: &mut Writing, batch: &[u8], keepalive: bool) {
    if shared.is_lost() {
        // Nobody to send to; batches still go through so the vCPU thread never notices.
        return;
    }
    let Writing { split, link } = writing;
    if keepalive {
        shared.keepalive_sent(split.bytes, batch.len() as u64);
    }
    // Counted before the write: an acknowledgement (or a backup that hangs up after the
    // end frame) may come back before `write_all` returns.
    split.feed(batch);
    shared.count_frames(split);
    if split.ended {
        shared.end_sent.store(true, Ordering::Release);
    }
    // Kept for a backup that reconnects, and written under the same lock, so that a
    // resumption (which holds it) never interleaves with a batch. What the backup
    // acknowledged is forgotten here, not by the ack thread: taking this lock for every
    // acknowledgement while a batch is being written under it cost a futex wait and a
    // wake-up per request.
    let mut retransmit = shared.retransmit();
    retransmit.acked(shared.acked_bytes.load(Ordering::Acquire));
    retransmit.sent(batch);
    if link.0 != shared.link_generation.load(Ordering::Acquire) {
        *link = shared.current();
    }
    let (generation, Some(socket)) = link else {
        // Broken: the batch waits in the retransmit buffer.
        return;
    };
    // Noted before the write: the acknowledgement may come back before it returns.
    shared.batch_sent(split.bytes);
    if let Err(err) = socket.write_all(batch) {
        let generation = *generation;
        link.1 = None;
        drop(retransmit);
        shared.broken(
            generation,
            format!(
                "cannot send the log: {}",
                silence_or_error(&err, "the backup took nothing")
            ),
            is_silence(&err),
        );
    }
}

pub(super) fn ack_loop(shared: &Shared) {
    let mut buffer = [0u8; ACK_LEN];
    // The backup has the whole log, its end included: its going away is normal.
    let done = || {
        shared.end_sent.load(Ordering::Acquire)
            && shared.acked_bytes.load(Ordering::Acquire) >= shared.bytes.load(Ordering::Acquire)
    };
    while let Some((generation, mut socket)) = shared.wait_for_link() {
        let mut last_ack = Instant::now();
        loop {
            if let Err(err) = socket.read_exact(&mut buffer) {
                if done() {
                    return;
                }
                shared.broken(
                    generation,
                    match err.kind() {
                        ErrorKind::UnexpectedEof => "the backup closed the log channel".to_owned(),
                        _ => silence_or_error(&err, "no acknowledgement from the backup"),
                    },
                    is_silence(&err),
                );
                break;
            }
            shared.heard_after(last_ack.elapsed());
            last_ack = Instant::now();
            let Some(ack) = Ack::decode(&buffer) else {
                shared.broken(
                    generation,
                    "the backup sent a corrupt acknowledgement".to_owned(),
                    false,
                );
                break;
            };
            if ack == Ack::LEAVING {
                if done() {
                    return;
                }
                // Releases nothing: the loss path releases held outputs after the claim.
                // No reconnection will come (as after silence: lost at once).
                shared.broken(
                    generation,
                    "the backup left the pair (it stopped)".to_owned(),
                    true,
                );
                break;
            }
            // Counted before they are written: a backup cannot have more. One that says so
            // is not following this stream; believing it would release held output that
            // no backup has.
            let (sent_bytes, sent_frames) = (
                shared.bytes.load(Ordering::Acquire),
                shared.frames.load(Ordering::Acquire),
            );
            if ack.bytes > sent_bytes || ack.frames > sent_frames {
                shared.broken(
                    generation,
                    format!(
                        "the backup acknowledged {} bytes ({} frames), more than the {sent_bytes} bytes ({sent_frames} frames) sent",
                        ack.bytes, ack.frames
                    ),
                    true,
                );
                break;
            }
            let acked = shared
                .acked_bytes
                .fetch_max(ack.bytes, Ordering::AcqRel)
                .max(ack.bytes);
            shared.batch_acked(acked);
            let acked = shared.log_position(acked);
            shared.acked_log_bytes.fetch_max(acked, Ordering::AcqRel);
            shared.acked_frames.fetch_max(ack.frames, Ordering::AcqRel);
            shared.backup_ordinal.store(ack.ordinal, Ordering::Relaxed);
            shared.acks.fetch_add(1, Ordering::Relaxed);
            if shared.releases_on_ack() {
                shared
                    .hold()
                    .release(Some(acked), &|| shared.releases_on_ack());
            } else if !shared.ack_is_fresh() {
                shared.stale_acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
