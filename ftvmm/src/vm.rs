//! A booted machine and the vCPU loop.
//!
//! The loop is a small state machine (`VcpuState`): `Running` enters the guest and
//! handles one exit, `Halted` waits in the VMM for something to inject, `Stopped` ends the
//! run. Exit handling returns an `ExitOutcome` and never blocks.
//!
//! Determinism rule: only guest-caused exits (port I/O, MMIO, HLT, interrupt window) are
//! counted in the exit ordinal, and interrupts are injected only at those exits.

use crate::channel::resume::Hello;
use crate::channel::{
    BackupChannel, ChannelError, ChannelStats, PrimaryChannel, Resumption, Resumptions,
};
use crate::clock::VmClock;
use crate::control::{Publisher, RunState, Snapshot};
use crate::devices::platform::{PlatformMmio, PlatformPorts, PORT_BASE, PORT_COUNT};
use crate::devices::serial::{Console, SerialConsole, REGISTER_COUNT};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{EmptySlot, MmioTransport};
use crate::devices::virtio::net::{MacAddress, Net, Standby};
use crate::devices::virtio::tap::{Tap, TapError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, BusDevice, BusOverlap, DeviceContext, StopRequest};
use crate::ftlog::{EndState, LogHeader};
use crate::inputs::{Inputs, LogSource, Mode, Recorder, ReplayStats, Replayer};
use crate::interrupts::{PendingVectors, Timer};
use crate::layout::{
    COM1_PORT, MMIO_PAGE_SIZE, PLATFORM_MMIO, TIMER_VECTOR, VIRTIO_FIRST_VECTOR, VIRTIO_MMIO_BASE,
};
use crate::loader::{load_elf, LoadError, LoadedImage};
use crate::memory::{create_guest_memory, write_boot_structures, MemoryError};
pub use crate::outcome::{CrashReason, CrashReport, ExitStats, VmOutcome};
use crate::vcpu::{self, VcpuError};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

/// How a primary waits for its backup.
pub struct PrimaryInputs {
    /// Where the backup connects.
    pub listener: TcpListener,
    /// How long to wait for it; `None`: for ever.
    pub backup_wait: Option<Duration>,
    /// The go-live claim made when no backup came in time: won, the primary runs alone
    /// (unprotected) rather than never starting its guest; lost or unanswered, it halts.
    pub alone: Option<crate::arbiter::Failover>,
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
    /// No file: reads and completions come from the log being replayed.
    Replay {
        /// Capacity in sectors, from the log header.
        sectors: u64,
    },
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
    /// The host, logged and streamed to the backup that connects: the primary of an FT
    /// pair. [`Vm::new`] waits for the backup once the machine is built.
    Primary(PrimaryInputs),
    /// The log a primary streams through `channel`: the backup of an FT pair. The caller
    /// has read the header from `reader` and matched it to this configuration.
    Backup {
        /// Reads the stream.
        reader: LogSource,
        /// The connection to the primary.
        channel: BackupChannel,
    },
}

/// The devices of a machine as `key=value` words, the form the log header carries.
pub fn describe_machine(net_mac: Option<MacAddress>, disk_sectors: Option<u64>) -> String {
    let mut words = Vec::new();
    if let Some(mac) = net_mac {
        words.push(format!("net={mac}"));
    }
    if let Some(sectors) = disk_sectors {
        words.push(format!("disk_sectors={sectors}"));
    }
    words.join(" ")
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
    /// The log channel to the backup could not be set up.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// No backup connected in time and another replica holds the pair's go-live claim.
    #[error("no backup connected, and {winner} won the go-live claim: halting")]
    AloneLost {
        /// Who holds the claim.
        winner: String,
    },
    /// No backup connected in time and the arbiter could not be asked.
    #[error("no backup connected, and the arbiter cannot be reached ({0}): halting")]
    AloneNoArbiter(String),
    /// A snapshot could not be saved or restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Receiving a clone failed.
    #[error(transparent)]
    Clone(crate::clone::CloneError),
    /// A snapshot was asked for where the machine cannot take one.
    #[error("{0}")]
    SnapshotRefused(&'static str),
}

/// A VM with memory, image and vCPU ready to run, but no devices yet.
pub struct BootedMachine {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub vm: VmFd,
    /// Its single vCPU.
    pub vcpu: VcpuFd,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Where the image was loaded.
    pub image: LoadedImage,
}

/// Creates the KVM VM, loads the image, writes the boot structures and sets up the vCPU.
/// With `dirty_log`, KVM tracks the pages the guest writes (for memory digests).
pub fn boot(
    image: &std::path::Path,
    mem_size: u64,
    cmdline: &str,
    virtio_slots: u32,
    dirty_log: bool,
) -> Result<BootedMachine, VmError> {
    // Load before touching KVM, so a bad image is reported as such even without /dev/kvm.
    let mem = create_guest_memory(mem_size)?;
    let loaded = load_elf(&mem, image)?;
    write_boot_structures(&mem, cmdline, virtio_slots)?;

    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the returned
        // BootedMachine keeps alive as long as the VM fd; slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(VmError::RegisterMemory)?;
    }
    let vcpu = vm.create_vcpu(0).map_err(VmError::CreateVcpu)?;
    vcpu::configure_vcpu(&kvm, &vcpu, loaded.entry)?;
    Ok(BootedMachine {
        kvm,
        vm,
        vcpu,
        mem,
        image: loaded,
    })
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

/// Where the vCPU loop stands.
#[derive(Debug)]
enum VcpuState {
    Running,
    Halted,
    Stopped(VmOutcome),
}

/// What handling one KVM_RUN return produced.
enum ExitOutcome {
    /// A guest-caused exit was handled; go on.
    GuestExit,
    /// The guest executed HLT.
    Halt,
    /// The host interrupted KVM_RUN; not a guest event.
    HostCaused,
    /// The run is over.
    Stop(VmOutcome),
}

/// Where the clone listener hands reconnecting backups: the sender of the log channel of
/// the last clone made (none before).
type HandOff = std::sync::Arc<std::sync::Mutex<Option<std::sync::mpsc::Sender<Resumption>>>>;

/// How long a stop request waits for a computing guest to reach its next exit (where the
/// recorded run can end with a state its replay can check).
const STOP_PATIENCE: Duration = Duration::from_secs(2);

/// How long the clone listener waits for a connection's hello.
const HELLO_PATIENCE: Duration = Duration::from_secs(1);

/// Makes the go-live claim of this replica as the primary of a generation.
pub type ClaimFor = Box<dyn Fn(u64) -> Option<crate::arbiter::Failover>>;

/// A machine that can be cloned into a new backup: requests from the clone listener, and
/// the clone in progress.
struct CloneSource {
    /// A new backup's connection, left by the listener thread.
    request: std::sync::Arc<std::sync::Mutex<Option<std::net::TcpStream>>>,
    /// Where the listener thread hands a cloned backup's reconnections (the log channel
    /// of the last clone made takes them).
    resumptions: HandOff,
    /// The pair's generation once cloned (one more after each clone made).
    generation: u64,
    /// The claim this replica makes as the primary of a generation.
    failover: ClaimFor,
    /// The pre-copy running, and when the request was taken.
    precopy: Option<(crate::clone::Precopy, Instant)>,
}

/// Interrupt, timer and clock state the devices share.
struct DeviceState {
    pending: PendingVectors,
    timer: Timer,
    clock: VmClock,
    stop: Option<StopRequest>,
    inputs: Inputs,
}

impl DeviceState {
    fn context<'a>(&'a mut self, mem: &'a GuestMemoryMmap) -> DeviceContext<'a> {
        DeviceContext {
            pending: &mut self.pending,
            timer: &mut self.timer,
            clock: &mut self.clock,
            mem,
            stop: &mut self.stop,
            inputs: &mut self.inputs,
        }
    }
}

/// The machine's devices and interrupt state, apart from the vCPU.
struct Devices {
    pio: Bus,
    mmio: Bus,
    state: DeviceState,
}

/// A runnable VM: a booted machine plus its devices.
pub struct Vm {
    machine: BootedMachine,
    devices: Devices,
    exit_ordinal: u64,
    /// The last ordinal whose end-of-exit checks ran.
    finished_ordinal: u64,
    /// Image, memory, devices and command line: what a log header or snapshot names.
    identity: LogHeader,
    /// Pages the guest wrote that the next memory digest must cover, read from KVM's
    /// dirty log by someone else first (a snapshot).
    dirty: crate::memory::DirtyPages,
    /// Whether KVM logs the pages the guest writes.
    dirty_log: bool,
    /// Where clone requests arrive, and the clone in progress.
    clone_source: Option<CloneSource>,
    /// A descriptor of the NIC's TAP for a clone's log channel (held transmits).
    spare_tap: Option<Tap>,
    /// How the last clone went.
    clone_stats: Option<crate::clone::CloneStats>,
    /// The generation of the pair the last clone made.
    cloned_generation: Option<u64>,
    digests: DigestConfig,
    stats: ExitStats,
    /// Snapshots for the control socket, if there is one.
    publisher: Option<Publisher>,
    /// A backup that may go live: each vCPU step is timed until it does.
    go_live_armed: bool,
    /// The guest may have run since its last guest-caused exit (KVM_RUN returned for the
    /// host): its state is not at a point a replay can reach.
    ran_past_exit: bool,
    /// When a stop request was first seen while the guest was past its last exit.
    stop_waiting_since: Option<Instant>,
    /// The run stops where a replay cannot: its log gets no end frame.
    stop_unlogged: bool,
    /// How long going live took (the step in which the go-live claim was made).
    go_live: Option<Duration>,
}

impl Vm {
    /// Boots the machine described by `config` and attaches the stage-one devices.
    pub fn new(mut config: VmConfig) -> Result<Vm, VmError> {
        // Open the backends first: a missing disk or TAP is reported before any guest runs.
        let disk = match &config.disk {
            Some(DiskConfig::File(path)) => Some(Block::open(path)?),
            Some(DiskConfig::Replay { sectors }) => Some(Block::for_replay(*sectors)?),
            Some(DiskConfig::Standby { sectors, path }) => {
                Some(Block::standby(*sectors, path.clone())?)
            }
            None => None,
        };
        let tap = match &config.net {
            Some(NetConfig { tap: Some(tap), .. }) => Some(Tap::open(tap)?),
            _ => None,
        };
        // A primary's held transmits leave from the log channel's thread, on its own
        // descriptor of the TAP.
        let output_tap = match (&config.inputs, &tap) {
            (InputsConfig::Primary(_), Some(tap)) => {
                Some(tap.try_clone().map_err(|source| TapError::Clone {
                    name: tap.name().to_owned(),
                    source,
                })?)
            }
            _ => None,
        };
        // A backup opens its TAP now, though it sends nothing until it goes live: the
        // carrier is then up long before a failover (the kernel may take up to a second to
        // let a bridge forward from a TAP that just came up), and a TAP that cannot be
        // opened is reported at start, not when the backup is needed.
        // A machine that may run alone one day (live, or a backup that goes live) keeps a
        // descriptor of its TAP for the log channel of a clone made then.
        let mut spare_tap = None;
        let net = match config.net.as_ref() {
            Some(net) => Some(match &net.standby {
                Some(standby) => {
                    let tap = Tap::open(&standby.tap)?;
                    spare_tap = tap.try_clone().ok();
                    Net::standby(net.mac, standby.clone(), tap)
                }
                None => {
                    if matches!(config.inputs, InputsConfig::Live) {
                        spare_tap = tap.as_ref().and_then(|tap| tap.try_clone().ok());
                    }
                    Net::new(tap, net.mac)
                }
            }),
            None => None,
        };
        let description = describe_machine(
            config.net.as_ref().map(|net| net.mac),
            disk.as_ref().map(Block::capacity_sectors),
        );
        let dirty_log =
            !matches!(config.inputs, InputsConfig::Live) && config.digests.mem_every_exits > 0;
        let machine = boot(
            &config.image,
            config.mem_size,
            &config.cmdline,
            VIRTIO_SLOTS,
            dirty_log,
        )?;
        // The log starts once the machine is built, so a bad image never leaves a log or
        // keeps a backup waiting. The same identity goes into snapshots.
        let identity = {
            let image = std::fs::read(&config.image).map_err(|source| LoadError::Open {
                path: config.image.clone(),
                source,
            })?;
            LogHeader::for_machine(&image, config.mem_size, description, &config.cmdline)
        };
        let header = || -> Result<LogHeader, VmError> { Ok(identity.clone()) };
        let inputs = match config.inputs {
            InputsConfig::Live => Inputs::new(Mode::Live),
            InputsConfig::Replay(reader) => {
                Inputs::new(Mode::Replay(Box::new(Replayer::new(reader))))
            }
            InputsConfig::Backup { reader, channel } => {
                Inputs::new(Mode::Replay(Box::new(Replayer::following(reader, channel))))
            }
            InputsConfig::Record(ref path) => {
                let header = header()?;
                let file = File::create(path).map_err(|source| VmError::CreateLog {
                    path: path.clone(),
                    source,
                })?;
                let recorder = Recorder::new(Box::new(BufWriter::new(file)), header)
                    .map_err(VmError::Record)?;
                Inputs::new(Mode::Record(Box::new(recorder)))
            }
            InputsConfig::Primary(ref mut primary) => {
                let header = header()?;
                match PrimaryChannel::accept(&primary.listener, output_tap, primary.backup_wait) {
                    Ok((channel, writer)) => {
                        let recorder = Recorder::streaming(channel, writer, header)
                            .map_err(VmError::Record)?;
                        Inputs::new(Mode::Record(Box::new(recorder)))
                    }
                    Err(ChannelError::NoBackup { waited }) => {
                        let mut alone = primary
                            .alone
                            .take()
                            .ok_or(ChannelError::NoBackup { waited })?;
                        match alone.claim(crate::inputs::CLAIM_PATIENCE) {
                            Ok(crate::arbiter::Verdict::Won) => {
                                tracing::warn!(
                                    "no backup connected within {} s: won the go-live claim for {}: running unprotected",
                                    waited.as_secs(),
                                    alone.pair
                                );
                                Inputs::new(Mode::Live)
                            }
                            Ok(crate::arbiter::Verdict::Lost { winner }) => {
                                return Err(VmError::AloneLost { winner })
                            }
                            Err(err) => return Err(VmError::AloneNoArbiter(err.to_string())),
                        }
                    }
                    Err(err) => return Err(err.into()),
                }
            }
        };
        let mut pio = Bus::default();
        pio.insert(
            u64::from(COM1_PORT),
            u64::from(REGISTER_COUNT),
            Box::new(SerialConsole::new(config.console)),
        )?;
        pio.insert(
            u64::from(PORT_BASE),
            u64::from(PORT_COUNT),
            Box::<PlatformPorts>::default(),
        )?;
        let mut mmio = Bus::default();
        mmio.insert(
            PLATFORM_MMIO,
            MMIO_PAGE_SIZE,
            Box::<PlatformMmio>::default(),
        )?;
        let slots: [Option<(Box<dyn VirtioDevice>, &str)>; VIRTIO_SLOTS as usize] = [
            net.map(|net| (Box::new(net) as Box<dyn VirtioDevice>, "net")),
            disk.map(|disk| (Box::new(disk) as Box<dyn VirtioDevice>, "blk")),
        ];
        for (slot, device) in slots.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + slot as u64 * MMIO_PAGE_SIZE;
            let transport: Box<dyn BusDevice> = match device {
                Some((device, name)) => Box::new(MmioTransport::new(
                    device,
                    name,
                    VIRTIO_FIRST_VECTOR + slot as u8,
                )),
                None => Box::<EmptySlot>::default(),
            };
            mmio.insert(base, MMIO_PAGE_SIZE, transport)?;
        }
        Ok(Vm {
            machine,
            devices: Devices {
                pio,
                mmio,
                state: DeviceState {
                    pending: PendingVectors::default(),
                    timer: Timer::default(),
                    clock: VmClock::new(),
                    stop: None,
                    inputs,
                },
            },
            exit_ordinal: 0,
            finished_ordinal: 0,
            identity,
            dirty: crate::memory::DirtyPages::default(),
            dirty_log,
            clone_source: None,
            spare_tap,
            clone_stats: None,
            cloned_generation: None,
            digests: config.digests,
            stats: ExitStats::default(),
            publisher: None,
            go_live_armed: false,
            go_live: None,
            ran_past_exit: false,
            stop_waiting_since: None,
            stop_unlogged: false,
        })
    }

    /// Guest-caused exits so far: the position of the guest in its execution.
    pub fn exit_ordinal(&self) -> u64 {
        self.exit_ordinal
    }

    /// Counters of the run so far.
    pub fn stats(&self) -> ExitStats {
        let mut stats = self.stats.clone();
        stats.unhandled = self.devices.pio.unhandled + self.devices.mmio.unhandled;
        stats
    }

    /// What this process uses of memory, guest RAM apart.
    pub fn memory_use(&self) -> crate::memory::MemoryUse {
        crate::memory::memory_use(&self.machine.mem)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.machine.mem
    }

    /// Runs the guest until it powers off or crashes.
    pub fn run(&mut self) -> Result<VmOutcome, VmError> {
        match self.run_loop(None)? {
            Some(outcome) => Ok(outcome),
            // Without a pause ordinal the loop only returns with an outcome.
            None => Err(VmError::SnapshotRefused(
                "the run paused without being asked to",
            )),
        }
    }

    /// Runs the guest until the first point between exits at or after exit `ordinal`
    /// where it is running (not halted), and returns `None` there with every event of the
    /// exit handled: a point to take a snapshot at. Returns the outcome if the run ends
    /// first. [`Vm::run`] or `run_until` continue from the pause.
    pub fn run_until(&mut self, ordinal: u64) -> Result<Option<VmOutcome>, VmError> {
        self.run_loop(Some(ordinal))
    }

    fn run_loop(&mut self, pause_at: Option<u64>) -> Result<Option<VmOutcome>, VmError> {
        let mut state = VcpuState::Running;
        self.publish(RunState::Running, true);
        loop {
            // The clock is read per step only on a backup that may still go live.
            let step_started = (self.go_live_armed && self.publisher.is_some()).then(Instant::now);
            state = match state {
                VcpuState::Running if self.finished_ordinal < self.exit_ordinal => {
                    let next = match self.finish_exit()? {
                        Some(outcome) => VcpuState::Stopped(outcome),
                        None if pause_at.is_some_and(|at| self.exit_ordinal >= at) => {
                            return Ok(None);
                        }
                        None => {
                            if self.clone_source.is_some() {
                                self.step_clone();
                            }
                            VcpuState::Running
                        }
                    };
                    if self
                        .publisher
                        .as_mut()
                        .is_some_and(Publisher::due_after_exit)
                    {
                        self.publish(RunState::Running, false);
                    }
                    next
                }
                // Where a recorder stops on a signal (below), a replay of its log stops too.
                VcpuState::Running | VcpuState::Halted
                    if self.devices.state.inputs.logged_stop_now().is_some() =>
                {
                    let signal = self.devices.state.inputs.logged_stop_now().unwrap_or(0);
                    VcpuState::Stopped(VmOutcome::StoppedAsRecorded(signal))
                }
                VcpuState::Running | VcpuState::Halted
                    if crate::signals::stop_requested().is_some()
                        && self.may_stop_now(matches!(state, VcpuState::Halted)) =>
                {
                    let signal = crate::signals::stop_requested().unwrap_or(0);
                    VcpuState::Stopped(VmOutcome::Signalled(signal))
                }
                VcpuState::Running => match self.run_once()? {
                    ExitOutcome::GuestExit => {
                        self.deliver_interrupts()?;
                        VcpuState::Running
                    }
                    ExitOutcome::Halt => {
                        if self.deliver_interrupts()? {
                            VcpuState::Running
                        } else {
                            VcpuState::Halted
                        }
                    }
                    ExitOutcome::HostCaused => {
                        self.ran_past_exit = true;
                        VcpuState::Running
                    }
                    ExitOutcome::Stop(outcome) => VcpuState::Stopped(outcome),
                },
                VcpuState::Halted => {
                    if self.publisher.as_ref().is_some_and(Publisher::due) {
                        self.publish(RunState::Halted, false);
                    }
                    self.wait_while_halted()?
                }
                VcpuState::Stopped(outcome) => {
                    self.publish(RunState::Stopping, true);
                    return self.end_run(outcome).map(Some);
                }
            };
            if let Some(started) = step_started {
                if self.went_live_at().is_some() {
                    self.go_live = Some(started.elapsed());
                    self.go_live_armed = false;
                    self.publish(RunState::Running, true);
                }
            }
        }
    }

    /// Whether a requested stop may happen now. A recording to a file ends with the stop
    /// (its end frame), so the guest must be where a replay can stop too: halted, or just
    /// past a handled exit. A guest interrupted mid-computation runs on to its next exit,
    /// for at most [`STOP_PATIENCE`]; after that the log ends without an end frame.
    fn may_stop_now(&mut self, halted: bool) -> bool {
        if halted || !self.ran_past_exit || !self.devices.state.inputs.is_recording_to_file() {
            return true;
        }
        let since = *self.stop_waiting_since.get_or_insert_with(Instant::now);
        if since.elapsed() < STOP_PATIENCE {
            return false;
        }
        tracing::warn!(
            "the guest reached no exit within {} ms of the stop request: the log ends without an end frame",
            STOP_PATIENCE.as_millis()
        );
        self.stop_unlogged = true;
        true
    }

    /// What identifies this machine in a log header or a snapshot.
    pub fn identity(&self) -> &LogHeader {
        &self.identity
    }

    /// Makes KVM log the pages the guest writes from now on (for memory digests of a log
    /// that starts later, and for copying memory while the guest runs).
    pub fn enable_dirty_log(&mut self) -> Result<(), VmError> {
        if self.dirty_log {
            return Ok(());
        }
        self.dirty_log = true;
        self.register_memory(true)
    }

    /// Registers guest RAM with KVM again, with the current dirty-log flag. With `fresh`,
    /// each slot is deleted first, which makes KVM drop every mapping it built for the
    /// guest (and the slot's dirty log: harvest it before).
    ///
    /// Why a snapshot needs this: KVM's dirty log is a superset of the pages written (it
    /// marks a page dirty when it maps it writable, which it may do on a read of a page
    /// whose guest PTE is dirty), so the set depends on which mappings KVM already has. A
    /// restored copy starts with none; the original must too, or their memory digests
    /// differ at the first page one of them maps again.
    fn register_memory(&mut self, fresh: bool) -> Result<(), VmError> {
        let flags = if self.dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in self.machine.mem.iter().enumerate() {
            let mut region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: 0,
                userspace_addr: region.as_ptr() as u64,
            };
            if fresh {
                // SAFETY: a zero size deletes the slot; the vCPU is stopped (not in
                // KVM_RUN), so the guest cannot touch memory while it is absent.
                unsafe { self.machine.vm.set_user_memory_region(region_desc) }
                    .map_err(VmError::RegisterMemory)?;
            }
            region_desc.memory_size = region.len();
            // SAFETY: the same live mapping `boot` registered in this slot, owned by the
            // machine as long as the VM fd; slots do not overlap.
            unsafe { self.machine.vm.set_user_memory_region(region_desc) }
                .map_err(VmError::RegisterMemory)?;
        }
        Ok(())
    }

    fn snapshot_parts(&mut self) -> crate::snapshot::machine::MachineParts<'_> {
        let Devices { pio, mmio, state } = &mut self.devices;
        crate::snapshot::machine::MachineParts {
            kvm: &self.machine.kvm,
            vm: &self.machine.vm,
            vcpu: &mut self.machine.vcpu,
            mem: &self.machine.mem,
            pio,
            mmio,
            pending: &mut state.pending,
            timer: &mut state.timer,
            clock: &mut state.clock,
            dirty: &mut self.dirty,
            dirty_log: self.dirty_log,
        }
    }

    /// Writes a snapshot of the machine to `out`. Only at a pause of [`Vm::run_until`]
    /// (between exits, every event of the last one handled); the guest can continue after.
    pub fn save_snapshot(
        &mut self,
        out: &mut dyn std::io::Write,
    ) -> Result<crate::snapshot::machine::SnapshotReport, VmError> {
        if self.finished_ordinal != self.exit_ordinal {
            return Err(VmError::SnapshotRefused(
                "a snapshot is taken only between exits, after the last one was handled",
            ));
        }
        crate::snapshot::vcpu::complete_pending_exit(&mut self.machine.vcpu)?;
        let resume = self.devices.state.inputs.resume_point();
        let machine = self.identity.clone();
        let parts = self.snapshot_parts();
        let report = crate::snapshot::machine::save(parts, &machine, resume, out)?;
        // The dirty log was harvested by the save: start from no mappings, as the copy.
        self.register_memory(true)?;
        Ok(report)
    }

    /// Restores a snapshot from `input` into this machine, which must be freshly built
    /// (not run) with the snapshot's configuration; it then continues from the
    /// snapshot's exit ordinal. If this fails the machine is half restored: drop it.
    pub fn restore_snapshot(
        &mut self,
        input: &mut dyn std::io::Read,
    ) -> Result<crate::snapshot::machine::SnapshotReport, VmError> {
        if self.exit_ordinal != 0 {
            return Err(VmError::SnapshotRefused(
                "a snapshot is restored only into a machine that has not run",
            ));
        }
        let machine = self.identity.clone();
        let parts = self.snapshot_parts();
        let (report, resume) = crate::snapshot::machine::restore(parts, &machine, input)?;
        self.exit_ordinal = resume.ordinal;
        self.finished_ordinal = resume.ordinal;
        self.devices.state.inputs.resume_at(resume);
        Ok(report)
    }

    /// Starts recording every input to the log file `path` from here on: a live machine
    /// just snapshotted, whose log then continues the snapshot (`ftvmm replay
    /// --snapshot`). Enables the dirty log for memory digests if needed.
    pub fn start_recording(&mut self, path: &std::path::Path) -> Result<(), VmError> {
        if !self.devices.state.inputs.is_live() {
            return Err(VmError::SnapshotRefused(
                "only a live machine can start recording mid-run",
            ));
        }
        if self.digests.mem_every_exits > 0 {
            self.enable_dirty_log()?;
        }
        let file = File::create(path).map_err(|source| VmError::CreateLog {
            path: path.to_owned(),
            source,
        })?;
        let recorder = Recorder::new(Box::new(BufWriter::new(file)), self.identity.clone())
            .map_err(VmError::Record)?;
        self.devices.state.inputs.start_recording(recorder);
        Ok(())
    }

    /// Accepts clone requests on `listener` from now on: while this machine runs alone
    /// (live inputs), a new backup that connects gets its state (docs/snapshot.md, clone)
    /// and the log, and the pair is `generation`, claimed through `failover`.
    pub fn accept_clones(
        &mut self,
        listener: std::net::TcpListener,
        generation: u64,
        failover: ClaimFor,
    ) -> Result<(), VmError> {
        let request = std::sync::Arc::new(std::sync::Mutex::new(None));
        let resumptions: HandOff = std::sync::Arc::default();
        let (slot, handoff) = (request.clone(), resumptions.clone());
        std::thread::Builder::new()
            .name("ftvmm-clone-listen".into())
            .spawn(move || {
                for socket in listener.incoming() {
                    let Ok(socket) = socket else { continue };
                    let Ok(peer) = socket.peer_addr() else { continue };
                    // Every connection says hello: a new backup asking for a clone, or
                    // the backup of the last clone resuming its broken log connection.
                    match crate::channel::read_hello(&socket, HELLO_PATIENCE) {
                        Ok(Hello::New) => {}
                        Ok(hello) => {
                            let handoff = handoff
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .clone();
                            match handoff {
                                Some(handoff) => {
                                    let _ = handoff.send((socket, peer, hello));
                                }
                                None => tracing::warn!(
                                    "clone: {peer} resumes a log stream while no clone was made: refused"
                                ),
                            }
                            continue;
                        }
                        Err(err) => {
                            tracing::warn!("clone: {peer}: {err}: refused");
                            continue;
                        }
                    }
                    let mut slot = slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if slot.is_some() {
                        // One clone at a time; this one is closed at once.
                        tracing::warn!("clone: a request from {peer} while another waits: refused");
                        continue;
                    }
                    tracing::warn!("clone: new backup connected from {peer}");
                    *slot = Some(socket);
                }
            })
            .map_err(|_| VmError::SnapshotRefused("cannot start the clone listener thread"))?;
        self.clone_source = Some(CloneSource {
            request,
            resumptions,
            generation,
            failover,
            precopy: None,
        });
        Ok(())
    }

    /// At a pause between exits: starts a requested clone, or finishes the one whose
    /// pre-copy is over. A clone that fails leaves this machine running alone.
    fn step_clone(&mut self) {
        let Some(source) = self.clone_source.as_mut() else {
            return;
        };
        if let Some((precopy, _)) = &source.precopy {
            if !precopy.is_finished() {
                return;
            }
            let Some((precopy, requested)) = source.precopy.take() else {
                return;
            };
            match precopy.join() {
                Ok(precopied) => self.finish_clone(precopied, requested),
                Err(err) => tracing::error!(
                    "clone: aborted during the pre-copy ({}); running alone",
                    crate::clone::one_line(&err)
                ),
            }
            return;
        }
        let socket = source
            .request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(socket) = socket else { return };
        if !self.devices.state.inputs.is_live() {
            // In a pair (a primary with its backup, or a backup not live yet): closing
            // tells the requester at once.
            tracing::warn!("clone: refused, this replica is not running alone");
            return;
        }
        let header = crate::clone::CloneHeader {
            generation: source.generation,
            machine: self.identity.clone(),
        };
        match crate::clone::Precopy::start(socket, self.machine.mem.clone(), header) {
            Ok(precopy) => source.precopy = Some((precopy, Instant::now())),
            Err(err) => tracing::error!(
                "clone: cannot start ({}); running alone",
                crate::clone::one_line(&err)
            ),
        }
    }

    /// The stop-and-copy, then the log channel to the new backup on the same socket.
    fn finish_clone(&mut self, mut precopied: crate::clone::Precopied, requested: Instant) {
        let paused = Instant::now();
        let result = (|| -> Result<_, crate::clone::CloneError> {
            crate::snapshot::vcpu::complete_pending_exit(&mut self.machine.vcpu)?;
            let resume = self.devices.state.inputs.resume_point();
            let machine = self.identity.clone();
            let parts = self.snapshot_parts();
            crate::clone::finish(parts, &machine, resume, &mut precopied)
        })();
        let report = match result {
            Ok(report) => report,
            Err(err) => {
                tracing::error!(
                    "clone: aborted in the final copy ({}); running alone",
                    crate::clone::one_line(&err)
                );
                return;
            }
        };
        // Both sides start the log with no KVM mappings and the same carried dirty pages.
        if self.digests.mem_every_exits > 0 {
            self.dirty_log = true;
        }
        if let Err(err) = self.register_memory(true) {
            tracing::error!("clone: cannot re-register guest memory: {err}; running alone");
            return;
        }
        let tap = self.spare_tap.as_ref().and_then(|tap| tap.try_clone().ok());
        // The new backup reconnects to the clone listener, which hands its connections
        // to this channel (and no longer to the channel of an earlier clone).
        let (handoff, resumptions) = std::sync::mpsc::channel();
        if let Some(source) = &self.clone_source {
            *source
                .resumptions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handoff);
        }
        let started = PrimaryChannel::start(
            precopied.socket,
            Some(Resumptions::Handed(resumptions)),
            tap,
        )
        .map_err(|err| err.to_string())
        .and_then(|(channel, writer)| {
            Recorder::streaming(channel, writer, self.identity.clone())
                .map_err(|err| err.to_string())
        });
        let recorder = match started {
            Ok(recorder) => recorder,
            Err(err) => {
                tracing::error!("clone: cannot start the log channel ({err}); running alone");
                return;
            }
        };
        let inputs = &mut self.devices.state.inputs;
        inputs.start_recording(recorder);
        let mut generation = 0;
        if let Some(source) = self.clone_source.as_mut() {
            generation = source.generation;
            // A later clone (this backup lost, the primary alone again) is the next pair.
            source.generation += 1;
            if let Some(failover) = (source.failover)(generation) {
                inputs.set_failover(failover);
            }
            self.cloned_generation = Some(generation);
        }
        let mut stats = precopied.stats;
        stats.pause = paused.elapsed();
        tracing::warn!(
            "clone: backup cloned at exit ordinal {} as generation {generation}: pause {:.1} ms (state {:.1}, final pass {:.1}, confirmation {:.1}), clone {:.1} ms, pre-copy {} rounds {:?} pages, final {} pages, {} bytes",
            report.identity.exit_ordinal,
            stats.pause.as_secs_f64() * 1000.0,
            stats.state.as_secs_f64() * 1000.0,
            stats.final_pass.as_secs_f64() * 1000.0,
            stats.confirm.as_secs_f64() * 1000.0,
            requested.elapsed().as_secs_f64() * 1000.0,
            stats.rounds,
            stats.round_pages,
            stats.final_pages,
            stats.bytes
        );
        self.clone_stats = Some(stats);
        // The control socket tells at once that this replica is a pair's primary again.
        self.publish(RunState::Running, true);
    }

    /// How the last clone of this machine went, if one was made.
    pub fn clone_stats(&self) -> Option<&crate::clone::CloneStats> {
        self.clone_stats.as_ref()
    }

    /// This machine, just built (not run) from a backup's flags, becomes the clone of the
    /// primary at `addr` (`--clone-from`): receives its state, then follows its log as
    /// the backup of `generation`.
    pub fn receive_clone(
        &mut self,
        addr: &str,
        generation: u64,
    ) -> Result<crate::snapshot::machine::SnapshotReport, VmError> {
        if self.exit_ordinal != 0 || !self.devices.state.inputs.is_live() {
            return Err(VmError::SnapshotRefused(
                "a clone is received only by a machine built for it that has not run",
            ));
        }
        let mut socket = crate::channel::connect(addr)?;
        socket
            .write_all(&Hello::New.encode())
            .map_err(|source| ChannelError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        if self.digests.mem_every_exits > 0 {
            self.enable_dirty_log()?;
        }
        let machine = self.identity.clone();
        let parts = self.snapshot_parts();
        let (report, resume) = crate::clone::receive(parts, &machine, generation, &mut socket)
            .map_err(VmError::Clone)?;
        let session =
            crate::channel::read_session(&socket).map_err(|source| ChannelError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        // A broken connection is re-established at the clone listener, which hands it to
        // the primary's log channel.
        let (channel, stream) = BackupChannel::start(socket, session, Some(addr.to_owned()))?;
        let reader =
            crate::ftlog::LogReader::new(Box::new(stream) as Box<dyn std::io::Read + Send>)
                .map_err(|err| {
                    VmError::Clone(crate::clone::CloneError::Snapshot(
                        crate::snapshot::SnapshotError::Mismatch(format!(
                            "the log after the clone: {err}"
                        )),
                    ))
                })?;
        if let Some(what) = crate::snapshot::machine::machine_mismatch(reader.header(), &machine) {
            return Err(VmError::Clone(crate::clone::CloneError::Snapshot(
                crate::snapshot::SnapshotError::Mismatch(what),
            )));
        }
        self.devices.state.inputs =
            Inputs::new(Mode::Replay(Box::new(Replayer::following(reader, channel))));
        self.exit_ordinal = resume.ordinal;
        self.finished_ordinal = resume.ordinal;
        self.devices.state.inputs.resume_at(resume);
        Ok(report)
    }

    /// Publishes this run's counters to the control socket from now on.
    pub fn set_publisher(&mut self, publisher: Publisher) {
        self.publisher = Some(publisher);
    }

    /// Hands the publisher a snapshot (`force`: wait for the lock; a state change).
    fn publish(&mut self, state: RunState, force: bool) {
        if self.publisher.is_none() {
            return;
        }
        let snapshot = Snapshot {
            state,
            exit_ordinal: self.exit_ordinal,
            exits: self.stats(),
            channel: self.channel_stats(),
            went_live_at: self.went_live_at(),
            go_live: self.go_live,
            cloned_generation: self.cloned_generation,
        };
        if let Some(publisher) = &mut self.publisher {
            publisher.publish(snapshot, force);
        }
    }

    /// After the last input of an exit was taken (just before the next entry): digests, and
    /// in replay the check that every logged event of the exit was consumed.
    fn finish_exit(&mut self) -> Result<Option<VmOutcome>, VmError> {
        self.finished_ordinal = self.exit_ordinal;
        let every = self.digests.regs_every_exits;
        if every > 0 && self.exit_ordinal.is_multiple_of(every) {
            let (rip, hash) = vcpu::state_digest(&self.machine.vcpu)?;
            self.devices.state.inputs.regs_digest(rip, hash);
        }
        let every = self.digests.mem_every_exits;
        if every > 0
            && self.exit_ordinal.is_multiple_of(every)
            && !self.devices.state.inputs.is_live()
        {
            let (pages, hash) =
                crate::memory::dirty_digest(&self.machine.vm, &self.machine.mem, &mut self.dirty)
                    .map_err(VmError::DirtyLog)?;
            self.devices.state.inputs.mem_digest(pages, hash);
        }
        let inputs = &mut self.devices.state.inputs;
        inputs.finish_exit();
        if let Some(err) = inputs.take_record_error() {
            return Err(VmError::Record(err));
        }
        Ok(inputs.replay_stop().cloned().map(VmOutcome::ReplayStopped))
    }

    /// Logs (or, in replay, checks) how the run ended, with final digests, and closes the
    /// log channel if there is one (a primary waits a bounded time for the backup's
    /// acknowledgement of the whole log).
    fn end_run(&mut self, outcome: VmOutcome) -> Result<VmOutcome, VmError> {
        let ended = self.log_end(outcome);
        self.devices.state.inputs.close_channel();
        ended
    }

    fn log_end(&mut self, outcome: VmOutcome) -> Result<VmOutcome, VmError> {
        // A recording to a file ends with the stop, so that its replay stops at the same
        // point and checks the final state. A pair's primary does not: its backup goes
        // live when the stream ends without an end frame. A replay stopped by a signal of
        // its own has nothing to check.
        let ends_log_here = self.devices.state.inputs.is_recording_to_file() && !self.stop_unlogged;
        if matches!(outcome, VmOutcome::Signalled(_)) && !ends_log_here {
            let inputs = &mut self.devices.state.inputs;
            inputs.flush();
            return match inputs.take_record_error() {
                Some(err) => Err(VmError::Record(err)),
                None => Ok(outcome),
            };
        }
        let inputs = &self.devices.state.inputs;
        if matches!(outcome, VmOutcome::ReplayStopped(_))
            || !(inputs.is_recording() || inputs.is_replay())
        {
            return Ok(outcome);
        }
        let (outcome_kind, code) = match &outcome {
            VmOutcome::PowerOff(code) => (crate::ftlog::END_POWER_OFF, *code),
            VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal) => (
                crate::ftlog::END_STOPPED,
                u8::try_from(*signal).unwrap_or(u8::MAX),
            ),
            _ => (crate::ftlog::END_CRASH, 0),
        };
        let (_, regs_hash) = vcpu::state_digest(&self.machine.vcpu)?;
        let end = EndState {
            outcome: outcome_kind,
            code,
            regs_hash,
            mem_hash: crate::memory::memory_digest(&self.machine.mem),
        };
        let inputs = &mut self.devices.state.inputs;
        inputs.end(end);
        inputs.flush();
        if let Some(err) = inputs.take_record_error() {
            return Err(VmError::Record(err));
        }
        Ok(match inputs.replay_stop() {
            Some(stop) => VmOutcome::ReplayStopped(stop.clone()),
            None => outcome,
        })
    }

    /// Lets this backup go live through `failover` when its primary is lost.
    pub fn set_failover(&mut self, failover: crate::arbiter::Failover) {
        self.go_live_armed = self.devices.state.inputs.is_replay();
        self.devices.state.inputs.set_failover(failover);
    }

    /// The exit ordinal at which this backup went live, if it did.
    pub fn went_live_at(&self) -> Option<u64> {
        self.devices.state.inputs.went_live_at()
    }

    /// Replay counters.
    pub fn replay_stats(&self) -> ReplayStats {
        self.devices.state.inputs.replay_stats()
    }

    /// The log channel's counters (primary or backup of a pair; `None` otherwise).
    pub fn channel_stats(&self) -> Option<ChannelStats> {
        self.devices.state.inputs.channel_stats()
    }

    /// Bytes of log written so far, by frame kind (empty unless recording).
    pub fn log_bytes_by_kind(&self) -> Vec<(&'static str, u64, u64)> {
        match self.devices.state.inputs.recorder() {
            Some(writer) => (0..writer.frames_by_kind.len())
                .filter(|kind| writer.frames_by_kind[*kind] > 0)
                .map(|kind| {
                    (
                        crate::ftlog::kind_name(kind as u8),
                        writer.frames_by_kind[kind],
                        writer.bytes_by_kind[kind],
                    )
                })
                .collect(),
            None => Vec::new(),
        }
    }

    /// Enters the guest once and handles the exit.
    fn run_once(&mut self) -> Result<ExitOutcome, VmError> {
        let Devices { pio, mmio, state } = &mut self.devices;
        let mut ctx = state.context(&self.machine.mem);
        let stats = &mut self.stats;
        let exit = match self.machine.vcpu.run() {
            Ok(exit) => exit,
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                stats.host_caused += 1;
                return Ok(ExitOutcome::HostCaused);
            }
            Err(err) => return Err(VmError::Run(err)),
        };
        let guest_caused = matches!(
            exit,
            VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..)
                | VcpuExit::Hlt
                | VcpuExit::IrqWindowOpen
        );
        if guest_caused {
            // Ordinals are 1-based: every input this exit consumes is stamped with it.
            self.exit_ordinal += 1;
            self.ran_past_exit = false;
            ctx.inputs.set_ordinal(self.exit_ordinal);
        }
        let outcome = match exit {
            VcpuExit::IoOut(port, data) => {
                stats.pio_out += 1;
                if !pio.write(u64::from(port), data, &mut ctx) {
                    tracing::debug!(port, ?data, "write to unassigned port");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::IoIn(port, data) => {
                stats.pio_in += 1;
                if !pio.read(u64::from(port), data, 0xFF, &mut ctx) {
                    tracing::debug!(port, "read from unassigned port");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::MmioRead(addr, data) => {
                stats.mmio_read += 1;
                if !mmio.read(addr, data, 0xFF, &mut ctx) {
                    tracing::debug!(addr, "read from unassigned MMIO");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::MmioWrite(addr, data) => {
                stats.mmio_write += 1;
                if !mmio.write(addr, data, &mut ctx) {
                    tracing::debug!(addr, ?data, "write to unassigned MMIO");
                }
                ExitOutcome::GuestExit
            }
            VcpuExit::Hlt => {
                stats.hlt += 1;
                ExitOutcome::Halt
            }
            VcpuExit::IrqWindowOpen => {
                stats.irq_window += 1;
                ExitOutcome::GuestExit
            }
            VcpuExit::Intr => {
                stats.host_caused += 1;
                return Ok(ExitOutcome::HostCaused);
            }
            VcpuExit::Shutdown => ExitOutcome::Stop(self.crash(CrashReason::TripleFault)),
            VcpuExit::InternalError => {
                let suberror = vcpu::internal_error_suberror(&mut self.machine.vcpu);
                ExitOutcome::Stop(self.crash(CrashReason::InternalError { suberror }))
            }
            VcpuExit::FailEntry(reason, _) => {
                ExitOutcome::Stop(self.crash(CrashReason::FailEntry { reason }))
            }
            other => {
                let kind = format!("{other:?}");
                ExitOutcome::Stop(self.crash(CrashReason::UnexpectedExit(kind)))
            }
        };
        match self.devices.state.stop.take() {
            Some(StopRequest::PowerOff(code)) => Ok(ExitOutcome::Stop(VmOutcome::PowerOff(code))),
            Some(StopRequest::GuestFault(vector)) => {
                let regs = self.machine.vcpu.get_regs().unwrap_or_default();
                let reason = CrashReason::GuestFault {
                    vector,
                    error_code: regs.rdi,
                    fault_rip: regs.rsi,
                    cr2: regs.rcx,
                };
                Ok(ExitOutcome::Stop(self.crash(reason)))
            }
            None => Ok(outcome),
        }
    }

    /// A crash report at the current RIP and exit ordinal.
    fn crash(&self, reason: CrashReason) -> VmOutcome {
        VmOutcome::Crashed(CrashReport {
            reason,
            rip: vcpu::current_rip(&self.machine.vcpu),
            exit_ordinal: self.exit_ordinal,
        })
    }

    /// At a guest-caused exit: samples the timer, injects the lowest pending vector if the
    /// guest can take it, and asks for an interrupt window if more remain. Returns whether
    /// a vector was injected.
    fn deliver_interrupts(&mut self) -> Result<bool, VmError> {
        let Devices { mmio, state, .. } = &mut self.devices;
        let (timer, clock) = (&mut state.timer, &mut state.clock);
        if state
            .inputs
            .timer_tick(|| timer.take_due_tick(clock.monotonic_ns()))
        {
            state.pending.raise(TIMER_VECTOR);
        }
        mmio.poll_all(&mut state.context(&self.machine.mem));
        let vcpu = &mut self.machine.vcpu;
        let mut injected = false;
        if let Some(vector) = state.pending.lowest() {
            if vcpu::ready_for_interrupt(vcpu) {
                vcpu::inject_interrupt(vcpu, vector)?;
                state.inputs.injected(vector);
                state.pending.clear(vector);
                self.stats.injected += 1;
                injected = true;
            }
        }
        // No interrupt-window exit is requested for what stays pending: on this platform
        // the STI shadow may not survive a host-caused exit between `sti` and `hlt`, so a
        // window exit could come before the HLT on one replica and after it on the other.
        // What stays pending is injected at the next guest-caused exit that can take it.
        Ok(injected)
    }

    /// The guest is in HLT with nothing injected: wait for the next timer deadline or a
    /// device backend, or report a hang if nothing can ever wake it.
    fn wait_while_halted(&mut self) -> Result<VcpuState, VmError> {
        if !vcpu::interrupts_enabled(&mut self.machine.vcpu) {
            return Ok(VcpuState::Stopped(
                self.crash(CrashReason::HaltedWithInterruptsDisabled),
            ));
        }
        if !self.devices.state.pending.is_empty() {
            // Pending but not injectable (interrupt shadow): the guest goes on and takes it
            // at its next exit (an idle guest halts again at once).
            self.stats.halt_not_ready += 1;
            return Ok(VcpuState::Running);
        }
        if self.devices.state.inputs.is_replay() {
            // What woke the recorded guest is in the log, at this same ordinal. Each round
            // must take at least one event, or the replay would wait forever.
            let before = self.devices.state.inputs.replay_stats().events;
            if self.devices.state.inputs.has_event_now() && self.deliver_interrupts()? {
                return Ok(VcpuState::Running);
            }
            if self.devices.state.inputs.replay_stats().events == before {
                if self.devices.state.inputs.halted_without_input() {
                    // The log ended and this backup went live: wait like a live VM.
                    return Ok(VcpuState::Halted);
                }
                return Ok(VcpuState::Running);
            }
            return Ok(VcpuState::Halted);
        }
        let deadline = self.devices.state.timer.next_deadline_ns();
        let mut fds: Vec<libc::pollfd> = self
            .devices
            .mmio
            .wake_fds()
            .into_iter()
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if deadline.is_none() && fds.is_empty() {
            return Ok(VcpuState::Stopped(
                self.crash(CrashReason::HaltedWithNoWakeSource),
            ));
        }
        let now = self.devices.state.clock.monotonic_ns();
        // Sleep unless the deadline already passed.
        if deadline.is_none_or(|deadline| deadline > now) {
            // An idle guest is the moment to push recorded frames out of the buffer.
            self.devices.state.inputs.flush();
            let started = std::time::Instant::now();
            let wait = deadline.map(|deadline| {
                let ns = deadline.saturating_sub(now);
                libc::timespec {
                    tv_sec: (ns / 1_000_000_000) as libc::time_t,
                    tv_nsec: (ns % 1_000_000_000) as libc::c_long,
                }
            });
            let timeout = wait
                .as_ref()
                .map_or(std::ptr::null(), |wait| wait as *const libc::timespec);
            // SAFETY: `fds` is a live array of `fds.len()` pollfd (possibly empty), `timeout`
            // is null or points to `wait`, which outlives the call; no signal mask change.
            let ret = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout,
                    std::ptr::null(),
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(VmError::Poll(err));
                }
            }
            self.stats.halted += started.elapsed();
        }
        // Still the same HLT exit: what arrived takes effect at its ordinal.
        if self.deliver_interrupts()? {
            Ok(VcpuState::Running)
        } else {
            Ok(VcpuState::Halted)
        }
    }
}
