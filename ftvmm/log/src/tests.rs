//! Unit tests of `crate::ftlog`.
use super::*;

fn header() -> LogHeader {
    LogHeader {
        version: LOG_VERSION,
        mem_size: 64 << 20,
        image_crc: 0xDEAD_BEEF,
        image_len: 4096,
        machine: "net=52:54:00:12:34:56 disk_sectors=8".into(),
        cmdline: "ticks=3".into(),
    }
}

fn sample() -> Vec<Frame> {
    vec![
        Frame {
            ordinal: 3,
            event: Event::ClockRead {
                register: 0,
                value: 123_456,
            },
        },
        Frame {
            ordinal: 7,
            event: Event::TimerTick,
        },
        Frame {
            ordinal: 7,
            event: Event::Injected { vector: 32 },
        },
        Frame {
            ordinal: 9,
            event: Event::NetRx {
                frame: vec![1, 2, 3],
            },
        },
        Frame {
            ordinal: 9,
            event: Event::DiskRead {
                status: 0,
                data: vec![9; 512],
            },
        },
        Frame {
            ordinal: 10,
            event: Event::DiskDone { status: 1 },
        },
        Frame {
            ordinal: 10,
            event: Event::DiskReadCrc {
                status: 0,
                len: 4096,
                crc: 0xDEAD_BEEF,
            },
        },
        Frame {
            ordinal: 11,
            event: Event::DiskComplete {
                request: u64::MAX - 1,
                status: 0,
            },
        },
        Frame {
            ordinal: 12,
            event: Event::RegsDigest {
                rip: 0x10_0000,
                hash: 42,
            },
        },
        Frame {
            ordinal: 12,
            event: Event::MemDigest { pages: 3, hash: 7 },
        },
        Frame {
            ordinal: 13,
            event: Event::Heartbeat,
        },
        Frame {
            ordinal: 20,
            event: Event::End(EndState {
                outcome: 0,
                code: 3,
                regs_hash: 1,
                mem_hash: 2,
            }),
        },
    ]
}

fn encoded() -> Vec<u8> {
    let mut writer = LogWriter::new(Vec::new(), header()).unwrap();
    for frame in sample() {
        writer.write(&frame).unwrap();
    }
    writer.output
}

fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, LogError> {
    let mut reader = LogReader::new(bytes)?;
    let mut frames = Vec::new();
    while let Some(frame) = reader.next_frame()? {
        frames.push(frame);
    }
    Ok(frames)
}

#[test]
fn frames_round_trip() {
    let bytes = encoded();
    let reader = LogReader::new(&bytes[..]).unwrap();
    assert_eq!(reader.header(), &header());
    assert_eq!(read_all(&bytes).unwrap(), sample());
}

#[test]
fn truncation_at_any_byte_is_reported_as_truncation() {
    let bytes = encoded();
    let header_len = {
        let mut only_header = Vec::new();
        LogWriter::new(&mut only_header, header()).unwrap();
        only_header.len()
    };
    let boundaries: Vec<usize> = {
        let mut at = header_len;
        let mut list = vec![at];
        for frame in sample() {
            let mut one = Vec::new();
            frame.encode(&mut one);
            at += one.len();
            list.push(at);
        }
        list
    };
    for cut in 1..bytes.len() {
        let result = read_all(&bytes[..cut]);
        if boundaries.contains(&cut) {
            assert!(result.is_ok(), "cut at frame boundary {cut}");
        } else {
            assert!(
                matches!(result, Err(LogError::Truncated { .. })),
                "cut at {cut}: {result:?}"
            );
        }
    }
}

#[test]
fn any_flipped_bit_is_reported_as_corruption() {
    let bytes = encoded();
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let result = read_all(&bad);
        assert!(
            matches!(
                result,
                Err(LogError::BadChecksum { .. }
                    | LogError::BadFrame { .. }
                    | LogError::Truncated { .. }
                    | LogError::Version { .. })
            ),
            "flip at byte {at}: {result:?}"
        );
    }
}

#[test]
fn unknown_version_and_decreasing_ordinals_are_refused() {
    let mut old = header();
    old.version = 99;
    let mut bytes = Vec::new();
    LogWriter::new(&mut bytes, old).unwrap();
    assert_eq!(
        LogReader::new(&bytes[..]).err(),
        Some(LogError::Version { found: 99 })
    );

    let mut writer = LogWriter::new(Vec::new(), header()).unwrap();
    writer
        .write(&Frame {
            ordinal: 5,
            event: Event::TimerTick,
        })
        .unwrap();
    writer
        .write(&Frame {
            ordinal: 4,
            event: Event::TimerTick,
        })
        .unwrap();
    assert!(matches!(
        read_all(&writer.output),
        Err(LogError::BadFrame { .. })
    ));
}

#[test]
fn splitter_finds_every_frame_boundary_whatever_the_chunking() {
    let bytes = encoded();
    let mut boundaries = Vec::new();
    let mut whole = FrameSplitter::default();
    for (at, byte) in bytes.iter().enumerate() {
        let before = whole.frames;
        whole.feed(std::slice::from_ref(byte));
        if whole.frames > before {
            boundaries.push(at + 1);
        }
    }
    assert_eq!(whole.frames, sample().len() as u64 + 1);
    assert_eq!(whole.bytes, bytes.len() as u64);
    assert_eq!(whole.last, Some((END_KIND, 20)));
    assert!(whole.ended);
    assert_eq!(whole.heartbeats, 1);
    assert_eq!(boundaries.last(), Some(&bytes.len()));
    for chunk in [2, 7, 13, 64, 1000] {
        let mut split = FrameSplitter::default();
        for (index, piece) in bytes.chunks(chunk).enumerate() {
            split.feed(piece);
            let fed = ((index + 1) * chunk).min(bytes.len());
            let expected = boundaries.iter().rev().find(|b| **b <= fed).copied();
            assert_eq!(split.bytes, expected.unwrap_or(0) as u64, "chunk {chunk}");
        }
        assert_eq!(split.frames, whole.frames);
    }
}

#[test]
fn absurd_lengths_are_refused_before_allocating() {
    let mut bytes = encoded();
    let mut frame = Vec::new();
    Frame {
        ordinal: 30,
        event: Event::TimerTick,
    }
    .encode(&mut frame);
    frame[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&frame);
    assert!(matches!(read_all(&bytes), Err(LogError::BadFrame { .. })));
}

mod fuzz_targets {
    use super::encoded;
    use crate::fuzz;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Arbitrary bytes, or a good log with a few bytes changed and maybe cut short: what
    /// a fuzzer would reach from a good seed.
    fn damaged_logs() -> impl Strategy<Value = Vec<u8>> {
        let good = encoded();
        prop_oneof![
            vec(any::<u8>(), 0..512),
            (vec((any::<usize>(), any::<u8>()), 0..4), any::<usize>()).prop_map(
                move |(edits, cut)| {
                    let mut bytes = good.clone();
                    let len = bytes.len();
                    for (at, value) in edits {
                        bytes[at % len] = value;
                    }
                    bytes.truncate(cut % (len + 1));
                    bytes
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn log_stream(data in damaged_logs()) {
            fuzz::log_stream(&data);
        }

        #[test]
        fn log_events(data in vec(any::<u8>(), 0..1024)) {
            fuzz::log_events(&data);
        }
    }
}
