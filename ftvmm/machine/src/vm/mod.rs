//! A booted machine and its devices: [`Vm`]. The vCPU loop is in `run`; what a machine is
//! built from in `config`; creating the KVM VM in `boot`.
//!
//! The machine knows nothing of the other replica of a pair: a primary's recording goes
//! to a [`PrimaryLink`](crate::link::PrimaryLink) and a backup replays through a
//! [`BackupLink`](crate::link::BackupLink), both given to it from outside; work that must
//! happen with the guest stopped between two exits (a clone's final copy, publishing
//! counters) is a [`VcpuHook`].

mod boot;
mod config;
mod run;

pub use boot::{boot, BootedMachine};
pub use config::{
    describe_machine, host_cpu, DigestConfig, DiskConfig, DiskShape, InputsConfig, NetConfig,
    VmConfig, VmError, VIRTIO_SLOTS,
};
pub use run::{NoHook, RunState, VcpuHook};

use crate::clock::VmClock;
use crate::devices::platform::{PlatformMmio, PlatformPorts, PORT_BASE, PORT_COUNT};
use crate::devices::serial::{SerialConsole, REGISTER_COUNT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{EmptySlot, MmioTransport};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, BusDevice, DeviceContext, StopRequest};
use crate::inputs::{Inputs, LogSource, Mode, Recorder, ReplayStats, Replayer, ResumePoint};
use crate::interrupts::{PendingVectors, Timer};
use crate::layout::{MMIO_PAGE_SIZE, PLATFORM_MMIO, VIRTIO_FIRST_VECTOR, VIRTIO_MMIO_BASE};
use crate::link::BackupLink;
use crate::loader::LoadError;
use crate::memory::GuestMemoryMmap;
pub use crate::outcome::{CrashReason, CrashReport, ExitStats, VmOutcome};
use crate::snapshot::machine::{MachineParts, SnapshotReport};
use ftvm_log::LogHeader;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use std::io::BufWriter;
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
    /// A descriptor of the NIC's TAP for a pair's log channel (held transmits leave from
    /// its thread), on a machine that runs live or may go live.
    spare_tap: Option<Tap>,
    digests: DigestConfig,
    stats: ExitStats,
    /// The guest may have run since its last guest-caused exit (KVM_RUN returned for the
    /// host): its state is not at a point a replay can reach.
    ran_past_exit: bool,
    /// When a stop request was first seen while the guest was past its last exit.
    stop_waiting_since: Option<Instant>,
    /// The run stops where a replay cannot: its log gets no end frame.
    stop_unlogged: bool,
}

impl Vm {
    /// Boots the machine described by `config` and attaches its devices.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        // Open the backends first: a missing disk or TAP is reported before any guest runs.
        let disk = match &config.disk {
            Some(DiskConfig::File(path)) => Some(Block::open(path, false)?),
            Some(DiskConfig::CachedFile(path)) => Some(Block::open(path, true)?),
            Some(DiskConfig::Private(path)) => Some(Block::private(path, false)?),
            Some(DiskConfig::Overlay(path)) => Some(Block::private(path, true)?),
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
        // A backup opens its TAP now, though it sends nothing until it goes live: the
        // carrier is then up long before a failover (the kernel may take up to a second to
        // let a bridge forward from a TAP that just came up), and a TAP that cannot be
        // opened is reported at start, not when the backup is needed.
        // A machine that runs live, or may go live one day, keeps a descriptor of its TAP
        // for the log channel of a pair it leads (its own, or a clone's).
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
            disk.as_ref().map(|disk| DiskShape {
                sectors: disk.capacity_sectors(),
                private: disk.is_private(),
            }),
            Some(&host_cpu()?.word()),
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
        let inputs = match config.inputs {
            InputsConfig::Live => Inputs::new(Mode::Live),
            InputsConfig::Replay(reader) => {
                Inputs::new(Mode::Replay(Box::new(Replayer::new(reader))))
            }
            InputsConfig::Backup { reader, link } => {
                Inputs::new(Mode::Replay(Box::new(Replayer::following(reader, link))))
            }
            InputsConfig::Record(ref path) => {
                let file =
                    crate::private_file::create(path).map_err(|source| VmError::CreateLog {
                        path: path.clone(),
                        source,
                    })?;
                let recorder = Recorder::new(Box::new(BufWriter::new(file)), identity.clone())
                    .map_err(VmError::Record)?;
                Inputs::new(Mode::Record(Box::new(recorder)))
            }
        };
        let mut pio = Bus::default();
        pio.insert(
            u64::from(crate::layout::COM1_PORT),
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
            spare_tap,
            digests: config.digests,
            stats: ExitStats::default(),
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

    /// What identifies this machine in a log header or a snapshot.
    pub fn identity(&self) -> &LogHeader {
        &self.identity
    }

    /// How often digests are logged.
    pub fn digests(&self) -> DigestConfig {
        self.digests
    }

    /// Whether inputs come from the host unlogged (the machine runs alone).
    pub fn is_live(&self) -> bool {
        self.devices.state.inputs.is_live()
    }

    /// A new descriptor of the NIC's TAP, for a pair this machine leads (held transmits
    /// leave from the log channel's thread); `None` without a TAP.
    pub fn tap_for_pair(&self) -> Option<Tap> {
        self.spare_tap.as_ref().and_then(|tap| tap.try_clone().ok())
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

    /// The parts a snapshot saves or restores.
    pub fn snapshot_parts(&mut self) -> MachineParts<'_> {
        let Devices { pio, mmio, state } = &mut self.devices;
        MachineParts {
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

    /// Readies the machine, paused between exits (every event of the last one handled),
    /// for a copy of its state: completes an exit KVM has not finished, and returns where
    /// the inputs stand. Refused anywhere else.
    pub fn pause_for_copy(&mut self) -> Result<ResumePoint, VmError> {
        if self.finished_ordinal != self.exit_ordinal {
            return Err(VmError::SnapshotRefused(
                "a snapshot is taken only between exits, after the last one was handled",
            ));
        }
        crate::snapshot::vcpu::complete_pending_exit(&mut self.machine.vcpu)?;
        Ok(self.devices.state.inputs.resume_point())
    }

    /// Makes every disk write completed so far durable (before a copy of this machine
    /// becomes a backup, which must not count on this host's page cache).
    pub fn sync_disks(&mut self) -> std::io::Result<()> {
        for (_, device) in self.devices.mmio.devices_mut() {
            device.sync()?;
        }
        Ok(())
    }

    /// Moves the pages written since the last harvest (the guest's, per KVM's dirty log,
    /// and the VMM's devices') into `into`: for copying memory while the guest runs. Only
    /// with the dirty log on ([`Vm::enable_dirty_log`]). The marks taken are no longer owed
    /// to a memory digest, so only a machine that owes none (a live one: nothing is
    /// recorded) may take them.
    pub fn harvest_written_pages(
        &mut self,
        into: &mut crate::memory::DirtyPages,
    ) -> Result<(), VmError> {
        if !self.dirty_log || !self.is_live() {
            return Err(VmError::SnapshotRefused(
                "written pages are harvested only from a live machine with the dirty log on",
            ));
        }
        into.harvest(&self.machine.vm, &self.machine.mem)
            .map_err(VmError::DirtyLog)
    }

    /// The machine's private disk, if its disk is one (`--disk-private`): what a clone
    /// copies with the memory.
    pub fn private_disk(&mut self) -> Option<crate::devices::virtio::block::copy::PrivateDisk> {
        self.devices
            .mmio
            .devices_mut()
            .find_map(|(_, device)| device.private_disk())
    }

    /// After a copy of this machine was taken: both it and the copy start from no KVM
    /// mappings and the same carried dirty pages (and log dirty pages if digests are).
    pub fn restart_memory_tracking(&mut self) -> Result<(), VmError> {
        // Digests need the log; a clone's copy, which may have turned it on, is over.
        self.dirty_log = self.digests.mem_every_exits > 0;
        // The devices' marks too: the copy starts without any (its restore wrote all of
        // RAM), and a source that ran live without digests has marks of its whole run.
        crate::memory::forget_vmm_writes(&self.machine.mem);
        self.register_memory(true)
    }

    /// Writes a snapshot of the machine to `out`. Only at a pause of [`Vm::run_until`]
    /// (between exits, every event of the last one handled); the guest can continue after.
    pub fn save_snapshot(
        &mut self,
        out: &mut dyn std::io::Write,
    ) -> Result<SnapshotReport, VmError> {
        let resume = self.pause_for_copy()?;
        let machine = self.identity.clone();
        let parts = self.snapshot_parts();
        let report = crate::snapshot::machine::save(parts, &machine, resume, out)?;
        // The dirty log was harvested by the save: start from no mappings, as the copy.
        self.register_memory(true)?;
        Ok(report)
    }

    /// Whether this machine was built and not run yet (a snapshot or clone goes into it).
    pub fn is_fresh(&self) -> bool {
        self.exit_ordinal == 0
    }

    /// Restores a snapshot from `input` into this machine, which must be freshly built
    /// (not run) with the snapshot's configuration; it then continues from the
    /// snapshot's exit ordinal. If this fails the machine is half restored: drop it.
    pub fn restore_snapshot(
        &mut self,
        input: &mut dyn std::io::Read,
    ) -> Result<SnapshotReport, VmError> {
        if !self.is_fresh() {
            return Err(VmError::SnapshotRefused(
                "a snapshot is restored only into a machine that has not run",
            ));
        }
        let machine = self.identity.clone();
        let parts = self.snapshot_parts();
        let (report, resume) = crate::snapshot::machine::restore(parts, &machine, input)?;
        // The restore wrote all of RAM; the original's marks were harvested into the
        // snapshot's carried pages.
        crate::memory::forget_vmm_writes(&self.machine.mem);
        self.resume_at(resume);
        Ok(report)
    }

    /// Continues from `resume` (the point of a restored state).
    fn resume_at(&mut self, resume: ResumePoint) {
        self.exit_ordinal = resume.ordinal;
        self.finished_ordinal = resume.ordinal;
        self.devices.state.inputs.resume_at(resume);
    }

    /// Starts recording every input to the log file `path` from here on: a live machine
    /// just snapshotted, whose log then continues the snapshot (`ftvmm replay
    /// --snapshot`). Enables the dirty log for memory digests if needed.
    pub fn start_recording(&mut self, path: &std::path::Path) -> Result<(), VmError> {
        let file = crate::private_file::create(path).map_err(|source| VmError::CreateLog {
            path: path.to_owned(),
            source,
        })?;
        let recorder = Recorder::new(Box::new(BufWriter::new(file)), self.identity.clone())
            .map_err(VmError::Record)?;
        self.record_to(recorder)
    }

    /// Makes `recorder` (a stream to a backup, or a file) take every input from here on:
    /// a live machine that starts leading a pair, or continues a snapshot. Enables the
    /// dirty log for memory digests if needed.
    pub fn record_to(&mut self, recorder: Recorder) -> Result<(), VmError> {
        if !self.is_live() {
            return Err(VmError::SnapshotRefused(
                "only a live machine can start recording mid-run",
            ));
        }
        if self.digests.mem_every_exits > 0 {
            self.enable_dirty_log()?;
        }
        self.devices.state.inputs.start_recording(recorder);
        Ok(())
    }

    /// This machine, freshly built and just given a copy of a running machine's state
    /// (restored up to `resume`), follows that machine's log from `reader` through `link`
    /// as its backup.
    pub fn follow(&mut self, reader: LogSource, link: Box<dyn BackupLink>, resume: ResumePoint) {
        self.devices.state.inputs =
            Inputs::new(Mode::Replay(Box::new(Replayer::following(reader, link))));
        self.resume_at(resume);
    }

    /// The exit ordinal at which this backup went live, if it did.
    pub fn went_live_at(&self) -> Option<u64> {
        self.devices.state.inputs.went_live_at()
    }

    /// Replay counters.
    pub fn replay_stats(&self) -> ReplayStats {
        self.devices.state.inputs.replay_stats()
    }

    /// Bytes of log written so far, by frame kind (empty unless recording).
    pub fn log_bytes_by_kind(&self) -> Vec<(&'static str, u64, u64)> {
        match self.devices.state.inputs.recorder() {
            Some(writer) => (0..writer.frames_by_kind.len())
                .filter(|kind| writer.frames_by_kind[*kind] > 0)
                .map(|kind| {
                    (
                        ftvm_log::kind_name(kind as u8),
                        writer.frames_by_kind[kind],
                        writer.bytes_by_kind[kind],
                    )
                })
                .collect(),
            None => Vec::new(),
        }
    }
}
