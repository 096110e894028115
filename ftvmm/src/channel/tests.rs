//! Unit tests of `crate::channel`.
use super::*;
use crate::ftlog::{LogHeader, LogReader, LogWriter, LOG_VERSION};

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
    let backup = std::thread::spawn(move || {
        let (mut channel, reader) = BackupChannel::connect(&addr).unwrap();
        let mut log = LogReader::new(reader).unwrap();
        let mut events = Vec::new();
        while let Some(frame) = log.next_frame().unwrap() {
            if frame.event != Event::Heartbeat {
                events.push(frame);
            }
        }
        channel.close();
        (log.header().clone(), events)
    });
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None).unwrap();
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
    let end = Frame {
        ordinal: 400,
        event: Event::End(crate::ftlog::EndState {
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
    let stats = primary.stats();
    let (received_header, received) = backup.join().unwrap();
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
        let (socket, _) = listener.accept().unwrap();
        let mut log = LogWriter::new(&socket, header()).unwrap();
        log.write(&Frame {
            ordinal: 3,
            event: Event::TimerTick,
        })
        .unwrap();
        // Dropped without an end frame.
    });
    let (channel, reader) = BackupChannel::connect(&addr).unwrap();
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
    let backup = std::thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (mut primary, writer) = PrimaryChannel::accept(&listener, None).unwrap();
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
    primary.hold_disk(
        log.bytes_total(),
        Box::new(move || flag.store(true, Ordering::Release)),
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
