//! What a VM is built from: its configuration, and what can go wrong building or
//! running it.

use crate::devices::serial::Console;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::net::{MacAddress, Standby};
use crate::devices::virtio::tap::TapError;
use crate::devices::BusOverlap;
use crate::inputs::LogSource;
use crate::link::BackupLink;
use crate::loader::LoadError;
use crate::memory::MemoryError;
use crate::vcpu::{CpuIdentity, VcpuError};
use std::path::PathBuf;

/// Everything needed to build a VM.
pub struct VmConfig {
    /// The guest ELF.
    pub image: PathBuf,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// The guest's command line.
    pub cmdline: String,
    /// Where COM1 output goes.
    pub console: Console,
    /// The virtio-blk disk.
    pub disk: Option<DiskConfig>,
    /// The virtio-net NIC.
    pub net: Option<NetConfig>,
    /// Where nondeterministic inputs come from.
    pub inputs: InputsConfig,
    /// How often digests are logged.
    pub digests: DigestConfig,
}

/// A NIC.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// TAP interface name; `None` in replay and on a backup.
    pub tap: Option<String>,
    /// The guest's MAC address.
    pub mac: MacAddress,
    /// A backup's TAP: opened at start, used once the backup goes live.
    pub standby: Option<Standby>,
}

/// A disk.
#[derive(Debug, Clone)]
pub enum DiskConfig {
    /// A file, read and written.
    File(PathBuf),
    /// A file whose writes stay in this process until the guest flushes: what a host's
    /// page cache loses when the host dies, for tests of what a backup re-issues.
    CachedFile(PathBuf),
    /// No file: reads and completions come from the log being replayed.
    Replay {
        /// Capacity in sectors, from the log header.
        sectors: u64,
    },
    /// This replica's own copy of a private disk (`--disk-private`), read and written on
    /// every replica, a backup's included.
    Private(PathBuf),
    /// A copy of a private disk as it was when a recording started, for replaying it:
    /// read, and written only in this process (the file is never written).
    Overlay(PathBuf),
    /// A backup's view of the shared disk: replayed from the log, opened when the backup
    /// goes live.
    Standby {
        /// Capacity in sectors.
        sectors: u64,
        /// The shared disk.
        path: PathBuf,
    },
}

/// Where nondeterministic inputs come from.
pub enum InputsConfig {
    /// The host.
    Live,
    /// The host, logged to this file.
    Record(PathBuf),
    /// A log whose header the caller has read and matched to this configuration.
    Replay(LogSource),
    /// The log a primary streams: the backup of an FT pair. The caller has read the
    /// header from `reader` and matched it to this configuration.
    Backup {
        /// Reads the stream.
        reader: LogSource,
        /// The pair's link to the primary.
        link: Box<dyn BackupLink>,
    },
}

/// A disk as a log header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShape {
    /// Capacity in sectors.
    pub sectors: u64,
    /// Each replica has its own copy (`--disk-private`).
    pub private: bool,
}

/// The devices of a machine, and the CPU its guest sees (`cpu`: a
/// [`CpuIdentity::word`]), as `key=value` words, the form the log header carries.
pub fn describe_machine(
    net_mac: Option<MacAddress>,
    disk: Option<DiskShape>,
    cpu: Option<&str>,
) -> String {
    let mut words = Vec::new();
    if let Some(mac) = net_mac {
        words.push(format!("net={mac}"));
    }
    if let Some(disk) = disk {
        words.push(format!("disk_sectors={}", disk.sectors));
        if disk.private {
            // Reads are logged as CRCs: a replay needs a copy of the disk.
            words.push("disk=private".into());
        }
    }
    words.extend(cpu.map(str::to_owned));
    words.join(" ")
}

/// The CPU a guest of this host sees (opens /dev/kvm).
pub fn host_cpu() -> Result<CpuIdentity, VmError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(VmError::OpenKvm)?;
    Ok(CpuIdentity::of(&kvm)?)
}

/// Virtio-mmio slots every VM has: slot 0 is the NIC, slot 1 the disk; absent devices leave
/// an empty slot (device ID 0) so the guest sees a fixed layout.
pub const VIRTIO_SLOTS: u32 = 2;

/// Building or running the VM failed (the VMM's fault or the host's, not the guest's).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("cannot create a KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create the vCPU")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory with KVM")]
    RegisterMemory(#[source] kvm_ioctls::Error),
    /// Guest memory set-up failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The image could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A vCPU ioctl failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Two devices claim one range (a VMM bug).
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// The TAP device could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The log file cannot be created.
    #[error("cannot create log {path}")]
    CreateLog {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// KVM_GET_DIRTY_LOG failed.
    #[error("cannot read the dirty page log")]
    DirtyLog(#[source] kvm_ioctls::Error),
    /// Writing the log failed.
    #[error("cannot write the log")]
    Record(#[source] std::io::Error),
    /// Waiting for a wake-up failed.
    #[error("poll while the guest is halted failed")]
    Poll(#[source] std::io::Error),
    /// A snapshot could not be saved or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A snapshot was asked for where the machine cannot take one.
    #[error("{0}")]
    SnapshotRefused(&'static str),
}

/// How often digests go into the log.
#[derive(Debug, Clone, Copy)]
pub struct DigestConfig {
    /// A registers digest every this many exits (0: only at the end).
    pub regs_every_exits: u64,
    /// A digest of the pages the guest dirtied, every this many exits (0: only the full
    /// memory digest at the end).
    pub mem_every_exits: u64,
}

impl Default for DigestConfig {
    fn default() -> Self {
        DigestConfig {
            regs_every_exits: 256,
            mem_every_exits: 1024,
        }
    }
}
