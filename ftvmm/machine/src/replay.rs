//! Setting up a replay from a log file, and the checks that a log belongs to a machine.

use crate::devices::serial::Console;
use crate::devices::virtio::net::MacAddress;
use crate::vm::{DigestConfig, DiskConfig, DiskShape, InputsConfig, NetConfig, VmConfig};
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
    /// The log is of a private disk and no copy of the disk was given.
    #[error("{path} is the log of a private disk: its reads are checksums, so the replay needs --disk with a copy of the disk as it was when the recording started")]
    NeedsDisk {
        /// The log path.
        path: PathBuf,
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
/// `image`. The disk, if given, must have the recorded size; it is never written. Its
/// contents are not needed (disk reads are in the log), except for a private disk's log,
/// whose reads are CRCs: that replay needs the disk as it was when the recording started,
/// reads it and keeps the replayed writes in memory.
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
    let MachineWords {
        net,
        disk: disk_shape,
        cpu,
    } = parse_machine(&header).map_err(mismatch)?;
    let disk_sectors = disk_shape.map(|shape| shape.sectors);
    // A replay on another CPU could diverge: refused, as a backup refuses such a primary.
    let here = crate::vm::host_cpu()
        .map_err(|err| mismatch(format!("cannot read this host's CPU: {err}")))?;
    if let Some(cpu) = cpu.filter(|cpu| *cpu != here.word()) {
        return Err(mismatch(format!(
            "recorded on another CPU ({cpu}); this host's guests see {here}"
        )));
    }
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
    let disk = match (disk_shape, disk) {
        (Some(DiskShape { private: true, .. }), Some(path)) => {
            Some(DiskConfig::Overlay(path.to_owned()))
        }
        (Some(DiskShape { private: true, .. }), None) => {
            return Err(ReplaySetupError::NeedsDisk {
                path: log.to_owned(),
            })
        }
        (Some(DiskShape { sectors, .. }), _) => Some(DiskConfig::Replay { sectors }),
        (None, _) => None,
    };
    Ok(VmConfig {
        image: image.to_owned(),
        mem_size: header.mem_size,
        cmdline: header.cmdline,
        console,
        disk,
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

/// The machine a log header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineWords {
    /// The NIC's MAC.
    pub net: Option<MacAddress>,
    /// The disk.
    pub disk: Option<DiskShape>,
    /// The guest CPU's identity word (`cpu=<hash>`; logs from before it have none).
    pub cpu: Option<String>,
}

/// The NIC, the disk and the CPU word a log header's machine words name.
pub fn parse_machine(header: &LogHeader) -> Result<MachineWords, String> {
    let mut net = None;
    let mut disk = None;
    let mut private = false;
    let mut cpu = None;
    for word in header.machine.split_whitespace() {
        match word.split_once('=') {
            Some(("cpu", hash))
                if hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                cpu = Some(word.to_owned())
            }
            Some(("net", mac)) => net = Some(mac.parse::<MacAddress>()?),
            Some(("disk_sectors", sectors)) => {
                disk = Some(
                    sectors
                        .parse::<u64>()
                        .map_err(|_| format!("a bad disk size '{sectors}'"))?,
                )
            }
            Some(("disk", "private")) => private = true,
            _ => return Err(format!("an unknown device '{word}'")),
        }
    }
    if private && disk.is_none() {
        return Err("a private disk without a size".into());
    }
    Ok(MachineWords {
        net,
        disk: disk.map(|sectors| DiskShape { sectors, private }),
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::Console;
    use ftvm_log::LogWriter;

    /// A log of `image` whose header names `machine`, and the image, in a scratch dir.
    fn log_with_machine(tag: &str, machine: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ftvm-replay-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("guest.elf");
        std::fs::write(&image, b"not really an ELF: only its CRC is checked here").unwrap();
        let header = LogHeader::for_machine(
            &std::fs::read(&image).unwrap(),
            2 << 20,
            machine.to_owned(),
            "",
        );
        let log = dir.join("run.log");
        let mut writer = LogWriter::new(std::fs::File::create(&log).unwrap(), header).unwrap();
        writer.flush().unwrap();
        (image, log)
    }

    #[test]
    fn a_log_recorded_on_another_cpu_is_refused_and_one_of_this_cpu_is_not() {
        let here = crate::vm::host_cpu().expect("/dev/kvm (the replay tests need KVM)");
        let other = format!("cpu={:08x}", here.hash ^ 1);
        let (image, log) = log_with_machine("othercpu", &other);
        let refused = replay_config(&image, &log, None, Console::Sink)
            .err()
            .expect("refused");
        let text = refused.to_string();
        assert!(
            text.contains(&format!("recorded on another CPU ({other})"))
                && text.contains(&here.word()),
            "{text}"
        );
        let (image, log) = log_with_machine("samecpu", &here.word());
        assert!(replay_config(&image, &log, None, Console::Sink).is_ok());
        // A log from before the CPU word: no CPU to compare.
        let (image, log) = log_with_machine("nocpu", "");
        assert!(replay_config(&image, &log, None, Console::Sink).is_ok());
        // A malformed CPU word is no device either.
        let (image, log) = log_with_machine("badcpu", "cpu=xyz");
        assert!(replay_config(&image, &log, None, Console::Sink).is_err());
    }

    /// Pins this thread to host CPU `cpu`; false if that CPU cannot be used.
    fn pin(cpu: usize) -> bool {
        // SAFETY: cpu_set_t is plain data, zeroed is the empty set; the calls only read it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }

    #[test]
    fn the_cpu_identity_is_the_same_on_every_host_cpu_and_named() {
        // KVM reports the APIC ID of the CPU the query runs on: the guest's view must not.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let identities: Vec<_> = std::thread::spawn(move || {
            (0..cpus)
                .filter(|cpu| pin(*cpu))
                .map(|_| crate::vm::host_cpu().expect("/dev/kvm"))
                .collect()
        })
        .join()
        .expect("the pinned thread");
        assert!(!identities.is_empty());
        assert!(
            identities.windows(2).all(|pair| pair[0] == pair[1]),
            "{identities:?}"
        );
        let first = identities[0].clone();
        assert!(first.word().starts_with("cpu=") && first.word().len() == 12);
        assert!(!first.vendor.is_empty(), "{first}");
    }
}
