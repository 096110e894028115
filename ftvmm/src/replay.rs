//! Setting up a replay from a log, and summarizing logs.

use crate::devices::serial::Console;
use crate::devices::virtio::net::MacAddress;
use crate::ftlog::{kind_name, Frame, LogError, LogHeader, LogReader};
use crate::vm::{DigestConfig, DiskConfig, InputsConfig, NetConfig, VmConfig};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// A replay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplaySetupError {
    /// A file cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The log's header is unreadable.
    #[error("{path}: {source}")]
    Log {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LogError,
    },
    /// The log belongs to another image or machine.
    #[error("{path} was recorded with {what}")]
    Mismatch {
        /// The log path.
        path: PathBuf,
        /// What differs.
        what: String,
    },
}

/// Reads the header of the log at `log` and builds the configuration that replays it on
/// `image`. The disk, if given, must have the recorded size; its contents are not needed
/// (disk reads are in the log) and it is never written.
pub fn replay_config(
    image: &Path,
    log: &Path,
    disk: Option<&Path>,
    console: Console,
) -> Result<VmConfig, ReplaySetupError> {
    let open = |path: &Path| {
        File::open(path).map_err(|source| ReplaySetupError::Open {
            path: path.to_owned(),
            source,
        })
    };
    let reader =
        LogReader::new(BufReader::new(open(log)?)).map_err(|source| ReplaySetupError::Log {
            path: log.to_owned(),
            source,
        })?;
    let header = reader.header().clone();
    let mismatch = |what: String| ReplaySetupError::Mismatch {
        path: log.to_owned(),
        what,
    };
    let image_bytes = std::fs::read(image).map_err(|source| ReplaySetupError::Open {
        path: image.to_owned(),
        source,
    })?;
    if image_bytes.len() as u64 != header.image_len
        || crc32fast::hash(&image_bytes) != header.image_crc
    {
        return Err(mismatch(format!(
            "another image (crc {:#010x}, {} bytes), not {}",
            header.image_crc,
            header.image_len,
            image.display()
        )));
    }
    let (net, disk_sectors) = parse_machine(&header).map_err(mismatch)?;
    if let (Some(path), Some(sectors)) = (disk, disk_sectors) {
        let len = open(path)?
            .metadata()
            .map_err(|source| ReplaySetupError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if len != sectors * 512 {
            return Err(mismatch(format!(
                "a disk of {} bytes, not {len}",
                sectors * 512
            )));
        }
    }
    Ok(VmConfig {
        image: image.to_owned(),
        mem_size: header.mem_size,
        cmdline: header.cmdline,
        console,
        disk: disk_sectors.map(|sectors| DiskConfig::Replay { sectors }),
        net: net.map(|mac| NetConfig { tap: None, mac }),
        inputs: InputsConfig::Replay(reader),
        digests: DigestConfig::default(),
    })
}

fn parse_machine(header: &LogHeader) -> Result<(Option<MacAddress>, Option<u64>), String> {
    let mut net = None;
    let mut disk = None;
    for word in header.machine.split_whitespace() {
        match word.split_once('=') {
            Some(("net", mac)) => net = Some(mac.parse::<MacAddress>()?),
            Some(("disk_sectors", sectors)) => {
                disk = Some(
                    sectors
                        .parse::<u64>()
                        .map_err(|_| format!("a bad disk size '{sectors}'"))?,
                )
            }
            _ => return Err(format!("an unknown device '{word}'")),
        }
    }
    Ok((net, disk))
}

/// Counts and sizes of a log's frames.
#[derive(Debug, Default)]
pub struct LogSummary {
    /// The header.
    pub header: Option<LogHeader>,
    /// Frames by kind (index = kind byte).
    pub frames: [u64; 11],
    /// Encoded bytes by kind (headers and checksums included).
    pub frame_bytes: [u64; 11],
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
pub fn summarize(path: &Path, dump: Option<(u64, u64)>) -> Result<LogSummary, ReplaySetupError> {
    let file = File::open(path).map_err(|source| ReplaySetupError::Open {
        path: path.to_owned(),
        source,
    })?;
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
