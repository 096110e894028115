//! Setting up a replay from a log file or from a live primary, and summarizing logs.

use crate::channel::{BackupChannel, ChannelError};
use crate::devices::serial::Console;
use crate::devices::virtio::block::SECTOR_SIZE;
use crate::devices::virtio::net::MacAddress;
use crate::devices::virtio::net::Standby;
use crate::ftlog::{kind_name, Frame, LogError, LogHeader, LogReader, KIND_COUNT};
use crate::vm::{describe_machine, DigestConfig, DiskConfig, InputsConfig, NetConfig, VmConfig};
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
    /// The primary cannot be reached.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The primary's stream does not start with a usable header.
    #[error("the log from the primary at {addr}: {source}")]
    Stream {
        /// The primary's address.
        addr: String,
        /// What is wrong.
        #[source]
        source: LogError,
    },
    /// The primary runs another image or machine than this backup was given.
    #[error("the primary at {addr} runs {what}")]
    PrimaryMismatch {
        /// The primary's address.
        addr: String,
        /// What differs.
        what: String,
    },
}

/// Whether `image` is the image the log header names; `Some(what differs)` if not.
fn image_mismatch(image: &Path, header: &LogHeader) -> Result<Option<String>, ReplaySetupError> {
    let bytes = std::fs::read(image).map_err(|source| ReplaySetupError::Open {
        path: image.to_owned(),
        source,
    })?;
    let expected = LogHeader::for_machine(&bytes, header.mem_size, String::new(), "");
    if expected.image_len == header.image_len && expected.image_crc == header.image_crc {
        return Ok(None);
    }
    Ok(Some(format!(
        "another image (crc {:#010x}, {} bytes), not {}",
        header.image_crc,
        header.image_len,
        image.display()
    )))
}

fn describe_mem(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
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
    let file: Box<dyn std::io::Read + Send> = Box::new(BufReader::new(open(log)?));
    let reader = LogReader::new(file).map_err(|source| ReplaySetupError::Log {
        path: log.to_owned(),
        source,
    })?;
    let header = reader.header().clone();
    let mismatch = |what: String| ReplaySetupError::Mismatch {
        path: log.to_owned(),
        what,
    };
    if let Some(what) = image_mismatch(image, &header)? {
        return Err(mismatch(what));
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
        net: net.map(|mac| NetConfig {
            tap: None,
            mac,
            standby: None,
        }),
        inputs: InputsConfig::Replay(reader),
        digests: DigestConfig::default(),
    })
}

/// Turns `config` (the machine a replica was asked to run, as for a primary) into the
/// backup of the primary at `addr`: connects, reads the stream's header and checks that
/// it describes the same machine (image, memory, command line, devices); then the devices
/// replay (the disk is never opened, the NIC has no TAP) and inputs come from the stream.
pub fn backup_config(mut config: VmConfig, addr: &str) -> Result<VmConfig, ReplaySetupError> {
    let (channel, stream) = BackupChannel::connect(addr)?;
    let stream: Box<dyn std::io::Read + Send> = Box::new(stream);
    let reader = LogReader::new(stream).map_err(|source| ReplaySetupError::Stream {
        addr: addr.to_owned(),
        source,
    })?;
    let header = reader.header().clone();
    let mismatch = |what: String| ReplaySetupError::PrimaryMismatch {
        addr: addr.to_owned(),
        what,
    };
    if let Some(what) = image_mismatch(&config.image, &header)? {
        return Err(mismatch(what));
    }
    if header.mem_size != config.mem_size {
        return Err(mismatch(format!(
            "with {} of memory, not {}",
            describe_mem(header.mem_size),
            describe_mem(config.mem_size)
        )));
    }
    if header.cmdline != config.cmdline {
        return Err(mismatch(format!(
            "the command line [{}], not [{}]",
            header.cmdline, config.cmdline
        )));
    }
    let sectors = match &config.disk {
        Some(DiskConfig::File(path)) => {
            let len = std::fs::metadata(path)
                .map_err(|source| ReplaySetupError::Open {
                    path: path.clone(),
                    source,
                })?
                .len();
            Some(len / SECTOR_SIZE)
        }
        Some(DiskConfig::Replay { sectors } | DiskConfig::Standby { sectors, .. }) => {
            Some(*sectors)
        }
        None => None,
    };
    let machine = describe_machine(config.net.as_ref().map(|net| net.mac), sectors);
    if header.machine != machine {
        return Err(mismatch(format!(
            "the devices [{}], not [{machine}]",
            header.machine
        )));
    }
    // The backup replays without the disk and the TAP, and takes them over if it goes live.
    config.disk = match (sectors, config.disk.take()) {
        (Some(sectors), Some(DiskConfig::File(path))) => {
            Some(DiskConfig::Standby { sectors, path })
        }
        (Some(sectors), _) => Some(DiskConfig::Replay { sectors }),
        (None, _) => None,
    };
    let ip = guest_ip(&config.cmdline);
    config.net = config.net.map(|net| NetConfig {
        tap: None,
        mac: net.mac,
        standby: net.tap.map(|tap| Standby { tap, ip }),
    });
    config.inputs = InputsConfig::Backup { reader, channel };
    Ok(config)
}

/// Turns `config` (the machine a replica was asked to run) into a machine ready to
/// receive a clone (`--clone-from`): devices as on a backup (the disk and the TAP taken
/// over only if it goes live), inputs live until the clone's log replaces them.
pub fn clone_backup_config(mut config: VmConfig) -> VmConfig {
    config.disk = match config.disk.take() {
        Some(DiskConfig::File(path)) => {
            let sectors = std::fs::metadata(&path).map_or(0, |meta| meta.len() / SECTOR_SIZE);
            Some(DiskConfig::Standby { sectors, path })
        }
        other => other,
    };
    let ip = guest_ip(&config.cmdline);
    config.net = config.net.map(|net| NetConfig {
        tap: None,
        mac: net.mac,
        standby: net.tap.map(|tap| Standby { tap, ip }),
    });
    config.inputs = InputsConfig::Live;
    config
}

/// The guest's IPv4 address from an `ip=A.B.C.D/N` word of its command line.
fn guest_ip(cmdline: &str) -> Option<std::net::Ipv4Addr> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("ip="))
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|addr| addr.parse().ok())
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
