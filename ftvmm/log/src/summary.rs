//! A log's summary: frame counts and bytes by kind, the ordinal range, and a dump of a
//! range of frames (`ftvmm log inspect`).

use super::{kind_name, Frame, LogError, LogHeader, LogReader, KIND_COUNT};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// Counts and sizes of a log's frames.
#[derive(Debug, Default)]
pub struct LogSummary {
    /// The header.
    pub header: Option<LogHeader>,
    /// Frames by kind (index = kind byte).
    pub frames: [u64; KIND_COUNT],
    /// Encoded bytes by kind (headers and checksums included).
    pub frame_bytes: [u64; KIND_COUNT],
    /// First and last event ordinal.
    pub ordinals: Option<(u64, u64)>,
    /// Total bytes read.
    pub bytes: u64,
    /// Events in the requested range, for a dump.
    pub dumped: Vec<Frame>,
    /// Why reading stopped early, if it did.
    pub error: Option<LogError>,
}

impl LogSummary {
    /// Frame counts by kind name, for kinds that occur.
    pub fn by_kind(&self) -> Vec<(&'static str, u64, u64)> {
        (0..self.frames.len())
            .filter(|kind| self.frames[*kind] > 0)
            .map(|kind| {
                (
                    kind_name(kind as u8),
                    self.frames[kind],
                    self.frame_bytes[kind],
                )
            })
            .collect()
    }
}

/// Reads the whole log at `path`, keeping the frames with ordinals in `dump` (if any).
pub fn summarize(path: &Path, dump: Option<(u64, u64)>) -> std::io::Result<LogSummary> {
    let file = File::open(path)?;
    let mut summary = LogSummary::default();
    let mut reader = match LogReader::new(BufReader::new(file)) {
        Ok(reader) => reader,
        Err(err) => {
            summary.error = Some(err);
            return Ok(summary);
        }
    };
    summary.header = Some(reader.header().clone());
    loop {
        match reader.next_frame() {
            Ok(Some(frame)) => {
                let kind = usize::from(frame.event.kind());
                let mut payload = Vec::new();
                frame.encode(&mut payload);
                summary.frames[kind] += 1;
                summary.frame_bytes[kind] += payload.len() as u64;
                summary.ordinals = Some(match summary.ordinals {
                    None => (frame.ordinal, frame.ordinal),
                    Some((first, _)) => (first, frame.ordinal),
                });
                if dump.is_some_and(|(from, to)| (from..=to).contains(&frame.ordinal)) {
                    summary.dumped.push(frame);
                }
            }
            Ok(None) => break,
            Err(err) => {
                summary.error = Some(err);
                break;
            }
        }
    }
    summary.bytes = reader.offset();
    Ok(summary)
}
