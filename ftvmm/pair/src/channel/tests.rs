//! Unit tests of `crate::channel`.
use super::*;
use ftvm_log::{LogHeader, LogReader, LogWriter, LOG_VERSION};

/// A primary's go-live with a local arbiter of its own (a fresh directory per call).
fn golive() -> Arc<GoLive> {
    golive_with(Box::new(fresh_arbiter()))
}

fn fresh_arbiter() -> crate::arbiter::local::LocalArbiter {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ftvm-channel-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    crate::arbiter::local::LocalArbiter::new(&dir).expect("arbiter dir")
}

/// The pair every test channel belongs to.
fn pair() -> crate::arbiter::PairId {
    crate::arbiter::PairId {
        vm: "test".into(),
        uid: Some("life-1".into()),
        generation: 1,
    }
}

fn golive_with(arbiter: Box<dyn crate::arbiter::Arbiter>) -> Arc<GoLive> {
    Arc::new(GoLive::new(
        crate::golive::Role::Primary,
        crate::arbiter::Failover {
            arbiter,
            pair: pair(),
            me: "primary@test".into(),
        },
    ))
}

fn header() -> LogHeader {
    LogHeader {
        version: LOG_VERSION,
        mem_size: 2 << 20,
        image_crc: 1,
        image_len: 2,
        machine: String::new(),
        cmdline: "x".into(),
    }
}

/// A backup on `addr` reading every frame until the stream ends: the header, the frames
/// other than heartbeats, and its channel's counters.
fn backup_reading_all(
    addr: String,
) -> std::thread::JoinHandle<(LogHeader, Vec<Frame>, ChannelStats)> {
    std::thread::spawn(move || {
        let (mut channel, reader) = BackupChannel::connect(&addr, &pair()).unwrap();
        let mut log = LogReader::new(reader).unwrap();
        let mut events = Vec::new();
        while let Some(frame) = log.next_frame().unwrap() {
            if frame.event != Event::Heartbeat {
                events.push(frame);
            }
        }
        let stats = channel.stats();
        channel.close();
        (log.header().clone(), events, stats)
    })
}

/// Ends the stream with an End frame at `ordinal` (also noted in `sent`) and closes the
/// primary's side, waiting for the backup's acknowledgement.
fn end_stream<W: Write>(
    log: &mut LogWriter<W>,
    sent: &mut Vec<Frame>,
    ordinal: u64,
    primary: &mut PrimaryChannel,
) {
    let end = Frame {
        ordinal,
        event: Event::End(ftvm_log::EndState {
            outcome: 0,
            code: 0,
            regs_hash: 1,
            mem_hash: 2,
        }),
    };
    log.write(&end).unwrap();
    sent.push(end);
    log.flush().unwrap();
    primary.close(PEER_TIMEOUT);
}

#[test]
fn acks_round_trip_and_reject_corruption() {
    let ack = Ack {
        frames: 7,
        bytes: 1 << 40,
        ordinal: 99,
    };
    let wire = ack.encode();
    assert_eq!(Ack::decode(&wire), Some(ack));
    for at in 0..ACK_LEN {
        let mut bad = wire;
        bad[at] ^= 4;
        assert_eq!(Ack::decode(&bad), None, "flip at {at}");
    }
}

/// Frames written on the primary side arrive in order on the backup side, the quiet
/// primary sends keepalive heartbeats, and the acknowledgements catch up with what was
/// sent.
#[test]
fn frames_cross_the_channel_and_are_acknowledged() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let backup = backup_reading_all(addr);
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    let mut sent = Vec::new();
    for ordinal in 1..=300u64 {
        let frame = Frame {
            ordinal,
            event: Event::Injected {
                vector: ordinal as u8,
            },
        };
        log.write(&frame).unwrap();
        sent.push(frame);
        if ordinal % 50 == 0 {
            log.write(&Frame {
                ordinal: ordinal + 1,
                event: Event::Heartbeat,
            })
            .unwrap();
            log.flush().unwrap();
            std::thread::sleep(KEEPALIVE_EVERY * 3);
        }
    }
    end_stream(&mut log, &mut sent, 400, &mut primary);
    let stats = primary.stats();
    let (received_header, received, _) = backup.join().unwrap();
    assert_eq!(received_header, header());
    assert_eq!(received, sent);
    assert_eq!(stats.acked_bytes, stats.bytes, "{stats:?}");
    assert_eq!(stats.acked_frames, stats.frames, "{stats:?}");
    // 6 flushed heartbeats plus keepalives while the writer slept.
    assert!(stats.heartbeats > 6, "{stats:?}");
    assert_eq!(stats.lost, None);
}

#[test]
fn a_vanished_primary_is_reported_lost() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let primary = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut hello = [0u8; HELLO_LEN];
        socket.read_exact(&mut hello).unwrap();
        assert_eq!(Hello::decode(&hello), Ok(Hello::new_backup(&pair())));
        socket.write_all(&42u64.to_le_bytes()).unwrap();
        let mut log = LogWriter::new(&socket, header()).unwrap();
        log.write(&Frame {
            ordinal: 3,
            event: Event::TimerTick,
        })
        .unwrap();
        // Dropped without an end frame.
    });
    let (channel, reader) = BackupChannel::connect(&addr, &pair()).unwrap();
    let mut log = LogReader::new(reader).unwrap();
    assert_eq!(log.next_frame().unwrap().map(|f| f.ordinal), Some(3));
    assert_eq!(log.next_frame().unwrap(), None);
    primary.join().unwrap();
    // EOF, or a reset if our acknowledgement hit the closed socket first.
    assert!(channel.stats().lost.is_some(), "{:?}", channel.stats());
}

/// The output rule counts in log positions: the keepalive heartbeats the sender puts into
/// the stream while the guest is quiet must not make an acknowledgement look further along
/// the log than it is. A held disk action runs only once the frame before it is
/// acknowledged.
#[test]
fn keepalives_do_not_release_held_outputs_early() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        handshake(&socket, Hello::new_backup(&pair())).unwrap();
        socket
    });
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let mut backup = backup.join().unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.flush().unwrap();
    // Quiet: the sender repeats the header's promise as keepalives.
    std::thread::sleep(KEEPALIVE_EVERY * 8);
    let event = Frame {
        ordinal: 1,
        event: Event::TimerTick,
    };
    log.write(&event).unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(0, Box::new(move || flag.store(true, Ordering::Release))),
    );
    log.flush().unwrap();

    let mut event_bytes = Vec::new();
    event.encode(&mut event_bytes);
    let mut split = FrameSplitter::default();
    let mut buffer = [0u8; 4096];
    backup.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    while split.last.map(|(kind, _)| kind) != Some(3) {
        let len = backup.read(&mut buffer).unwrap();
        assert!(len > 0, "the primary hung up");
        split.feed(&buffer[..len]);
    }
    assert!(
        split.heartbeats >= 2,
        "no keepalives were sent: {}",
        split.heartbeats
    );
    let before_event = split.bytes - event_bytes.len() as u64;
    assert!(
        before_event >= log.bytes_total(),
        "the keepalives must outweigh the event for this test to mean anything"
    );
    let ack = |frames, bytes| Ack {
        frames,
        bytes,
        ordinal: 0,
    };
    backup
        .write_all(&ack(split.frames - 1, before_event).encode())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !ran.load(Ordering::Acquire),
        "released before its frame was acknowledged"
    );
    backup
        .write_all(&ack(split.frames, split.bytes).encode())
        .unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    while !ran.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        ran.load(Ordering::Acquire),
        "not released by the acknowledgement"
    );
    primary.close(Duration::ZERO);
}

/// A TCP relay between backup and primary whose connections the test can cut, as a
/// network fault would (both ends see the connection break; the processes live on).
struct Relay {
    addr: String,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn to(target: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let live = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let sockets = live.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let (mut from, mut to) = (from, to);
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                sockets.lock().unwrap().extend([client, server]);
            }
        });
        Relay { addr, live }
    }

    fn cut(&self) {
        for socket in self.live.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Connections cut three times while frames flow: each time the backup reconnects and
/// the stream resumes at the byte where it broke, so the backup reads every frame exactly
/// once, in order, and nobody declares the other lost.
#[test]
fn a_cut_connection_resumes_without_losing_or_repeating_a_frame() {
    let listener = listen("127.0.0.1:0").unwrap();
    let relay = Relay::to(listener.local_addr().unwrap());
    let addr = relay.addr.clone();
    let backup = backup_reading_all(addr);
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    let mut sent = Vec::new();
    for ordinal in 1..=400u64 {
        let frame = Frame {
            ordinal,
            event: Event::NetRx {
                frame: vec![ordinal as u8; 700 + (ordinal as usize % 300)],
            },
        };
        log.write(&frame).unwrap();
        sent.push(frame);
        if ordinal % 20 == 0 {
            log.flush().unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        if ordinal % 100 == 50 {
            relay.cut();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    end_stream(&mut log, &mut sent, 500, &mut primary);
    let stats = primary.stats();
    let (_, received, backup_stats) = backup.join().unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "frames lost, repeated or reordered");
    assert_eq!(stats.lost, None, "{stats:?}");
    assert_eq!(backup_stats.lost, None, "{backup_stats:?}");
    assert_eq!(stats.reconnects, 4, "{stats:?}");
    assert_eq!(backup_stats.reconnects, 4, "{backup_stats:?}");
    assert_eq!(stats.acked_bytes, stats.bytes, "{stats:?}");
}

/// A connection that does not resume this stream (another session, or an offset the
/// primary no longer has) is refused, and the backup is declared lost when no proper
/// resumption comes.
#[test]
fn a_resumption_of_another_stream_is_refused() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        let session = handshake(&socket, Hello::new_backup(&pair())).unwrap();
        (socket, session)
    });
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let (socket, session) = backup.join().unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.flush().unwrap();
    socket.shutdown(Shutdown::Both).unwrap();
    for hello in [
        Hello::Resume {
            session: session ^ 1,
            offset: 0,
        },
        Hello::Resume {
            session,
            offset: 1 << 40,
        },
        Hello::new_backup(&pair()),
    ] {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        socket.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
        assert!(handshake(&socket, hello).is_err(), "{hello:?} was answered");
    }
    // Lost once the reconnection window has passed without a valid resumption.
    let deadline = Instant::now() + RECONNECT_WINDOW + PEER_TIMEOUT;
    while primary.stats().lost.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lost = primary.stats().lost.expect("the backup is lost");
    assert!(lost.contains("did not reconnect"), "{lost}");
    assert_eq!(primary.stats().reconnects, 0);
    primary.close(Duration::ZERO);
}

/// A log port still held by an ending process (another VM's replica the control plane
/// just stopped) is waited for, not a failure.
#[test]
fn a_log_port_still_in_use_is_waited_for() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(busy);
    });
    let started = Instant::now();
    let listener = listen(&addr).expect("bound once the port was free");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(listener.local_addr().unwrap().to_string(), addr);
    releaser.join().unwrap();
}

/// A backup that goes away for good (its channel dropped: it stopped, ended or went live)
/// says so: the primary declares it lost without waiting for a reconnection, and the
/// leaving message acknowledges nothing.
#[test]
fn a_backup_that_leaves_is_lost_without_a_reconnection_wait() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let backup = std::thread::spawn(move || BackupChannel::connect(&addr, &pair()).unwrap());
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let (channel, reader) = backup.join().unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.flush().unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    while primary.stats().acked_bytes == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let acked = primary.stats().acked_bytes;
    assert!(acked > 0, "the header was acknowledged");
    drop(channel);
    drop(reader);
    while primary.stats().lost.is_none() && Instant::now() < deadline + PEER_TIMEOUT {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = primary.stats();
    assert_eq!(
        stats.lost.as_deref(),
        Some("the backup left the pair (it stopped)"),
        "{stats:?}"
    );
    assert_eq!(stats.acked_bytes, acked, "{stats:?}");
    primary.close(Duration::ZERO);
}

/// A backup of another VM (or of another life of the same name), or of another
/// generation, is refused before any byte of the log: the primary waits on for its own.
#[test]
fn a_backup_of_another_pair_is_refused_at_the_hello() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let strangers = [
        crate::arbiter::PairId {
            vm: "other".into(),
            ..pair()
        },
        crate::arbiter::PairId {
            uid: Some("life-2".into()),
            ..pair()
        },
        pair().with_generation(2),
    ];
    let knocking = std::thread::spawn(move || {
        for stranger in strangers {
            let socket = Socket::plain(TcpStream::connect(addr).unwrap());
            configure(&socket).unwrap();
            let answer = handshake(&socket, Hello::new_backup(&stranger));
            assert!(answer.is_err(), "{stranger:?} got a session: {answer:?}");
        }
    });
    let accepted = PrimaryChannel::accept(&listener, None, Some(Duration::from_secs(2)), golive());
    knocking.join().unwrap();
    assert!(
        matches!(accepted, Err(ChannelError::NoBackup { .. })),
        "a stranger was taken for the backup"
    );
}

/// An arbiter that never answers.
struct Unreachable;

impl crate::arbiter::Arbiter for Unreachable {
    fn claim(
        &mut self,
        _: &crate::arbiter::PairId,
        _: &str,
    ) -> Result<crate::arbiter::Verdict, crate::arbiter::ArbiterError> {
        Err(crate::arbiter::ArbiterError::Etcd {
            endpoint: "nowhere".into(),
            message: "unreachable".into(),
        })
    }

    fn winner(
        &mut self,
        _: &crate::arbiter::PairId,
    ) -> Result<Option<String>, crate::arbiter::ArbiterError> {
        Ok(None)
    }
}

/// A primary whose backup is gone while the arbiter cannot be asked keeps its held
/// output held; closing it (the run ends, or it is stopped) during that claim performs
/// nothing that was held: the output is discarded, never released without a verdict.
#[test]
fn closing_during_a_claim_the_arbiter_cannot_answer_releases_nothing() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let backup = std::thread::spawn(move || BackupChannel::connect(&addr, &pair()).unwrap());
    let golive = golive_with(Box::new(Unreachable));
    let (mut primary, writer) =
        PrimaryChannel::accept(&listener, None, None, golive.clone()).unwrap();
    let (channel, reader) = backup.join().unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.write(&Frame {
        ordinal: 1,
        event: Event::TimerTick,
    })
    .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    // Held at a position the backup never acknowledges: it leaves first.
    drop(channel);
    drop(reader);
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(0, Box::new(move || flag.store(true, Ordering::Release))),
    );
    log.flush().unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT * 2;
    while !matches!(golive.state(), State::Claiming { .. }) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        matches!(golive.state(), State::Claiming { .. }),
        "{:?}",
        golive.state()
    );
    primary.close(Duration::ZERO);
    assert!(
        matches!(golive.state(), State::Halted(Halt::Unreachable(_))),
        "{:?}",
        golive.state()
    );
    assert!(!ran.load(Ordering::Acquire), "held output was performed");
    let stats = primary.stats();
    assert_eq!(stats.outputs.released, 0, "{stats:?}");
    assert_eq!(stats.outputs.discarded, 1, "{stats:?}");
}

/// An acknowledgement the primary reads only after its lease (it was frozen, or starved
/// of CPU, while the backup may have taken over) releases nothing held; a fresh one,
/// covering a batch written within the lease, does.
#[test]
fn an_acknowledgement_read_after_its_lease_releases_nothing() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        handshake(&socket, Hello::new_backup(&pair())).unwrap();
        socket
    });
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let mut backup = backup.join().unwrap();
    backup.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.write(&Frame {
        ordinal: 1,
        event: Event::TimerTick,
    })
    .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(0, Box::new(move || flag.store(true, Ordering::Release))),
    );
    // As the recorder flushes: the batch ends with a heartbeat, which the sender then
    // repeats as keepalives while the guest is quiet.
    log.write(&Frame {
        ordinal: 2,
        event: Event::Heartbeat,
    })
    .unwrap();
    log.flush().unwrap();
    let mut split = FrameSplitter::default();
    let mut buffer = [0u8; 4096];
    while split.frames < 3 {
        let len = backup.read(&mut buffer).unwrap();
        assert!(len > 0, "the primary hung up");
        split.feed(&buffer[..len]);
    }
    let ack = |split: &FrameSplitter| Ack {
        frames: split.frames,
        bytes: split.bytes,
        ordinal: 1,
    };
    // Sent after the lease of the batch it covers (stale when read), but before the
    // peer timeout would give the backup up.
    std::thread::sleep(ACK_LEASE + (PEER_TIMEOUT - ACK_LEASE) / 3);
    backup.write_all(&ack(&split).encode()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !ran.load(Ordering::Acquire),
        "released on a stale acknowledgement"
    );
    assert!(primary.stats().stale_acks >= 1, "{:?}", primary.stats());
    // The keepalives written meanwhile are recent: acknowledging them is fresh.
    backup.tcp().set_nonblocking(true).unwrap();
    while let Ok(len) = backup.read(&mut buffer) {
        if len == 0 {
            break;
        }
        split.feed(&buffer[..len]);
    }
    backup.tcp().set_nonblocking(false).unwrap();
    backup.write_all(&ack(&split).encode()).unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    while !ran.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        ran.load(Ordering::Acquire),
        "a fresh acknowledgement released nothing"
    );
    primary.close(Duration::ZERO);
}

/// An acknowledgement of more than was sent is a backup that does not follow this stream:
/// the primary drops it as lost (a forged count must not release held output for good).
#[test]
fn an_acknowledgement_beyond_what_was_sent_loses_the_backup_and_releases_nothing() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        handshake(&socket, Hello::new_backup(&pair())).unwrap();
        socket
    });
    let golive = golive_with(Box::new(Unreachable));
    let (mut primary, writer) =
        PrimaryChannel::accept(&listener, None, None, golive.clone()).unwrap();
    let mut backup = backup.join().unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.write(&Frame {
        ordinal: 1,
        event: Event::TimerTick,
    })
    .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(0, Box::new(move || flag.store(true, Ordering::Release))),
    );
    log.flush().unwrap();
    let forged = Ack {
        frames: 1 << 40,
        bytes: 1 << 50,
        ordinal: 1,
    };
    backup.write_all(&forged.encode()).unwrap();
    let deadline = Instant::now() + PEER_TIMEOUT;
    while primary.stats().lost.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let lost = primary.stats().lost;
    assert!(
        lost.as_deref().is_some_and(|why| why.contains("more than")),
        "{lost:?}"
    );
    assert!(
        !ran.load(Ordering::Acquire),
        "released on a forged acknowledgement"
    );
    primary.close(Duration::ZERO);
    assert!(
        !ran.load(Ordering::Acquire),
        "released at close without a verdict"
    );
}

/// Connections that say nothing do not keep the real backup waiting: hellos are read side
/// by side (before, each silent one cost it [`PEER_TIMEOUT`]).
#[test]
fn silent_connections_do_not_delay_the_backup() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let backup = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        handshake(&socket, Hello::new_backup(&pair())).unwrap();
        (socket, started.elapsed())
    });
    let (mut primary, _writer) = PrimaryChannel::accept(&listener, None, None, golive()).unwrap();
    let (_socket, took) = backup.join().unwrap();
    assert!(
        took < PEER_TIMEOUT / 2,
        "the backup waited {took:?} behind {} silent connections",
        silent.len()
    );
    primary.close(Duration::ZERO);
}

/// A release takes time (disk writes, one after the other): a primary stopped in the
/// middle of one (here the first write itself takes longer than the lease) performs
/// nothing more once its lease is over; the rest waits for the go-live's verdict.
#[test]
fn a_release_interrupted_past_its_lease_performs_nothing_more() {
    let listener = listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let backup = std::thread::spawn(move || {
        let socket = Socket::plain(TcpStream::connect(addr).unwrap());
        handshake(&socket, Hello::new_backup(&pair())).unwrap();
        socket
    });
    let golive = golive_with(Box::new(Unreachable));
    let (mut primary, writer) =
        PrimaryChannel::accept(&listener, None, None, golive.clone()).unwrap();
    let mut backup = backup.join().unwrap();
    backup.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    let mut log = LogWriter::new(writer, header()).unwrap();
    log.write(&Frame {
        ordinal: 1,
        event: Event::TimerTick,
    })
    .unwrap();
    let first_done = Arc::new(AtomicBool::new(false));
    let second_done = Arc::new(AtomicBool::new(false));
    let (first, second) = (first_done.clone(), second_done.clone());
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(
            0,
            Box::new(move || {
                // As if the process were stopped in the middle of the release.
                std::thread::sleep(ACK_LEASE + Duration::from_millis(300));
                first.store(true, Ordering::Release);
            }),
        ),
    );
    PrimaryLink::hold(
        &primary,
        log.bytes_total(),
        Output::Disk(0, Box::new(move || second.store(true, Ordering::Release))),
    );
    log.flush().unwrap();
    let mut split = FrameSplitter::default();
    let mut buffer = [0u8; 4096];
    while split.frames < 2 {
        let len = backup.read(&mut buffer).unwrap();
        assert!(len > 0, "the primary hung up");
        split.feed(&buffer[..len]);
    }
    backup
        .write_all(
            &Ack {
                frames: split.frames,
                bytes: split.bytes,
                ordinal: 1,
            }
            .encode(),
        )
        .unwrap();
    let deadline = Instant::now() + ACK_LEASE * 3;
    while !first_done.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        first_done.load(Ordering::Acquire),
        "the first write was released"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !second_done.load(Ordering::Acquire),
        "the second write went out after the lease was over"
    );
    primary.close(Duration::ZERO);
    assert!(
        !second_done.load(Ordering::Acquire),
        "released at close without a verdict"
    );
}
