//! Tests of the section format.

use super::testing::*;
use super::*;

/// A component with a little of everything, for the format's own tests.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    value: u64,
    name: Vec<u8>,
}

impl Snapshot for Sample {
    fn tag(&self) -> Tag {
        *b"SMPL"
    }
    fn version(&self) -> u16 {
        2
    }
    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.value);
        out.bytes(&self.name)
    }
    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let value = input.u64("value")?;
        let name = input.bytes("name", 16)?.to_vec();
        *self = Sample { value, name };
        Ok(())
    }
}

#[test]
fn sections_round_trip_and_refuse_damage() {
    let sample = Sample {
        value: 0x1122_3344_5566_7788,
        name: b"disk".to_vec(),
    };
    let bytes = assert_round_trip(&sample, &mut Sample::default());
    assert_eq!(&bytes[..4], b"SMPL");
    assert_refuses_damage(&bytes, Sample::default);
}

#[test]
fn a_section_written_in_place_is_the_framed_section_and_reads_back() {
    let payload: Vec<u8> = (0..70_000u32).map(|n| (n % 251) as u8).collect();
    let mut written = Vec::new();
    write_section(&mut written, *b"MEMC", 1, &payload).unwrap();
    assert_eq!(written, frame_section(*b"MEMC", 1, &payload).unwrap());
    let read = Section::parse(&written).unwrap();
    assert_eq!((read.tag, read.version), (*b"MEMC", 1));
    assert_eq!(read.payload, payload);
}

#[test]
fn newer_versions_other_tags_and_long_fields_are_refused_with_clear_errors() {
    let mut payload = Encoder::new();
    payload.u64(1);
    payload.bytes(b"x").unwrap();
    let newer = frame_section(*b"SMPL", 3, payload.as_bytes()).unwrap();
    let err = restore_section(&mut Sample::default(), &newer).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );

    let other = frame_section(*b"VCPU", 1, payload.as_bytes()).unwrap();
    let err = restore_section(&mut Sample::default(), &other).unwrap_err();
    assert_eq!(
        err.to_string(),
        "snapshot: expected section SMPL, found VCPU"
    );

    let mut long = Encoder::new();
    long.u64(1);
    long.bytes(&[7u8; 17]).unwrap();
    let long = frame_section(*b"SMPL", 2, long.as_bytes()).unwrap();
    let err = restore_section(&mut Sample::default(), &long).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::TooLong {
                len: 17,
                max: 16,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_huge_length_field_is_refused_before_anything_is_allocated() {
    let mut head = Vec::new();
    head.extend_from_slice(b"MEMC");
    head.extend_from_slice(&1u16.to_le_bytes());
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = Section::read(&mut head.as_slice()).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLong { .. }), "{err}");
    // Within the limit but longer than the stream: truncated, having read what was there.
    let mut head = Vec::new();
    head.extend_from_slice(b"MEMC");
    head.extend_from_slice(&1u16.to_le_bytes());
    head.extend_from_slice(&MAX_SECTION_LEN.to_le_bytes());
    head.extend_from_slice(&[0u8; 100]);
    let err = Section::read(&mut head.as_slice()).unwrap_err();
    assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
}

#[test]
fn a_lying_count_cannot_reserve_memory() {
    let mut payload = Encoder::new();
    payload.u32(1_000);
    payload.fixed(&[0u8; 16]);
    let mut input = Decoder::new(*b"TEST", payload.as_bytes());
    assert!(matches!(
        input.count("items", 10_000, 8),
        Err(SnapshotError::Truncated { .. })
    ));
    let mut input = Decoder::new(*b"TEST", payload.as_bytes());
    assert!(matches!(
        input.count("items", 100, 8),
        Err(SnapshotError::TooLong { .. })
    ));
}

#[test]
fn tags_print_safely() {
    assert_eq!(tag_name(b"VCPU"), "VCPU");
    assert_eq!(tag_name(&[0, b'A', 0xFF, b'\n']), "\\x00A\\xff\\n");
}

/// Found by the snapshot fuzz target: a section with bytes after what its component reads
/// was refused, but only after the component had taken the state.
#[test]
fn a_section_with_bytes_left_over_is_refused_and_changes_nothing() {
    let point = crate::inputs::ResumePoint::default();
    let mut out = Encoder::new();
    for value in [7u64, 1, 2, 3, 4, 0xEE] {
        out.u64(value);
    }
    let section = frame_section(point.tag(), point.version(), out.as_bytes()).unwrap();
    let mut target = crate::inputs::ResumePoint::default();
    assert!(matches!(
        restore_section(&mut target, &section),
        Err(SnapshotError::Trailing { .. })
    ));
    assert_eq!(target, crate::inputs::ResumePoint::default());
}
