//! Setting up a replay from a log file, and the checks that a log belongs to a machine.

use crate::devices::serial::Console;
use crate::devices::virtio::net::MacAddress;
use crate::vm::{DigestConfig, DiskConfig, InputsConfig, NetConfig, VmConfig};
use ftvm_log::{LogError, LogHeader, LogReader};
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

/// Whether `image` is the image the log header names; `Some(what differs)` if not.
pub fn image_mismatch(
    image: &Path,
    header: &LogHeader,
) -> Result<Option<String>, ReplaySetupError> {
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

/// `bytes` of memory, in MiB when whole.
pub fn describe_mem(bytes: u64) -> String {
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

/// The guest's IPv4 address from an `ip=A.B.C.D/N` word of its command line.
pub fn guest_ip(cmdline: &str) -> Option<std::net::Ipv4Addr> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix("ip="))
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|addr| addr.parse().ok())
}

/// The NIC's MAC and the disk's sectors a log header's machine words name.
pub fn parse_machine(header: &LogHeader) -> Result<(Option<MacAddress>, Option<u64>), String> {
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
