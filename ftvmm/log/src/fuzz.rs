//! Fuzz targets: functions that take arbitrary bytes, as a peer or a damaged file would
//! hand them over, and check what must hold for every input. They panic only when a check
//! fails; the tests run them on generated inputs with a fixed budget and `cargo xtask
//! fuzz` under a coverage-guided engine for long runs.

use crate::{Event, Frame, FrameSplitter, LogReader, FRAME_HEAD, FRAME_TAIL, KIND_COUNT};

/// `data` read as a log stream: it is accepted or refused without a panic, the frames
/// accepted re-encode to exactly the bytes they came from, and the splitter (which does
/// not check frames) never counts past the bytes it was given, however they are cut.
pub fn log_stream(data: &[u8]) {
    let mut whole = FrameSplitter::default();
    whole.feed(data);
    assert!(whole.bytes <= data.len() as u64);
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut in_two = FrameSplitter::default();
    in_two.feed(&data[..cut]);
    in_two.feed(&data[cut..]);
    assert_eq!(
        (whole.frames, whole.bytes),
        (in_two.frames, in_two.bytes),
        "the splitter depends on how the stream is cut"
    );
    let Ok(mut reader) = LogReader::new(data) else {
        return;
    };
    let mut from = reader.offset();
    while let Ok(Some(frame)) = reader.next_frame() {
        let to = reader.offset();
        let mut again = Vec::new();
        frame.encode(&mut again);
        let read_from = usize::try_from(from).unwrap_or(usize::MAX);
        let read_to = usize::try_from(to).unwrap_or(usize::MAX);
        assert_eq!(
            again.as_slice(),
            &data[read_from..read_to],
            "an accepted frame re-encodes differently"
        );
        from = to;
    }
}

/// `data` cut into frames with valid lengths and checksums around the fuzzer's kinds,
/// ordinals and payloads, so that inputs get past the checksum to the event decoders:
/// every payload an event decoder accepts re-encodes to itself.
pub fn log_events(data: &[u8]) {
    let mut rest = data;
    while let [kind, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (payload, after) = tail.split_at(len);
        rest = after;
        let kind = kind % (KIND_COUNT as u8 + 1);
        let Ok(event) = Event::decode(kind, payload) else {
            continue;
        };
        assert_eq!(event.kind(), kind);
        let mut again = Vec::new();
        event.encode_payload(&mut again);
        assert_eq!(
            again,
            payload,
            "a {} payload re-encodes differently",
            event.name()
        );
        let frame = Frame { ordinal: 7, event };
        let mut framed = Vec::new();
        frame.encode(&mut framed);
        assert_eq!(framed.len(), FRAME_HEAD + payload.len() + FRAME_TAIL);
    }
}
