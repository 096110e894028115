//! The virtio-mmio transport (virtio 1.x, register layout version 2).

use super::{DeviceBroken, QueueSet, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::{fill_le, le_value, BusDevice, DeviceContext};
use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use std::os::fd::RawFd;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const VENDOR_ID: u64 = 0x0C;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
pub(crate) const DRIVER_FEATURES: u64 = 0x20;
pub(crate) const DRIVER_FEATURES_SEL: u64 = 0x24;
pub(crate) const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
pub(crate) const QUEUE_NUM: u64 = 0x38;
pub(crate) const QUEUE_READY: u64 = 0x44;
pub(crate) const QUEUE_NOTIFY: u64 = 0x50;
const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;
pub(crate) const STATUS: u64 = 0x70;
pub(crate) const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DESC_HIGH: u64 = 0x84;
pub(crate) const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DRIVER_HIGH: u64 = 0x94;
pub(crate) const QUEUE_DEVICE_LOW: u64 = 0xA0;
const QUEUE_DEVICE_HIGH: u64 = 0xA4;
const CONFIG_GENERATION: u64 = 0xFC;
const CONFIG: u64 = 0x100;

/// "virt", little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// Vendor ID the device reports ("FTVM" is not registered; any value is allowed).
const VENDOR: u32 = 0x4D56_5446;

/// Device status bits.
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bits.
const INT_USED_BUFFER: u32 = 1;
const INT_CONFIG_CHANGE: u32 = 2;

/// Queue addresses as the driver writes them, applied when the queue is made ready.
#[derive(Debug, Default, Clone, Copy)]
struct QueueAddresses {
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    name: String,
    vector: u8,
    queues: Vec<Queue>,
    addresses: Vec<QueueAddresses>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    /// Log lines about this device the guest can cause, rate-limited.
    reports: Reports,
}

/// Reports of broken devices a guest may provoke in a loop (break, reset, break...): at
/// most [`REPORTS_PER_WINDOW`] lines per [`REPORT_WINDOW`], then one line saying how many
/// were left out. Host time only decides what is logged, never what the guest sees.
#[derive(Debug, Default)]
struct Reports {
    window: Option<std::time::Instant>,
    in_window: u32,
    suppressed: u64,
}

/// How many device reports are logged per window.
const REPORTS_PER_WINDOW: u32 = 5;
/// The window of the rate limit.
const REPORT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl Reports {
    /// Whether to log the next report (and logs what the last window left out).
    fn allow(&mut self, device: &str) -> bool {
        let now = std::time::Instant::now();
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= REPORT_WINDOW)
        {
            if self.suppressed > 0 {
                tracing::warn!(
                    "virtio {device}: {} more reports of the guest breaking the device were left out",
                    self.suppressed
                );
            }
            *self = Reports {
                window: Some(now),
                in_window: 0,
                suppressed: 0,
            };
        }
        self.in_window += 1;
        if self.in_window > REPORTS_PER_WINDOW {
            if self.suppressed == 0 {
                tracing::warn!(
                    "virtio {device}: the guest keeps breaking the device; further reports are left out for up to {} s",
                    REPORT_WINDOW.as_secs()
                );
            }
            self.suppressed += 1;
            return false;
        }
        true
    }
}

impl MmioTransport {
    /// Puts `device` behind an MMIO transport that raises `vector`; `name` is for logs.
    pub fn new(device: Box<dyn VirtioDevice>, name: impl Into<String>, vector: u8) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect();
        let addresses = vec![QueueAddresses::default(); queues.len()];
        MmioTransport {
            device,
            name: name.into(),
            vector,
            queues,
            addresses,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            reports: Reports::default(),
        }
    }

    /// Whether the driver has set the device up and it is not broken.
    fn active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
    }

    /// Whether the guest broke the device and must reset it.
    pub fn needs_reset(&self) -> bool {
        self.status & STATUS_NEEDS_RESET != 0
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.addresses.fill(QueueAddresses::default());
        self.device.reset();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// Marks the device broken: one log line, NEEDS_RESET, a config-change interrupt.
    fn mark_broken(&mut self, why: &DeviceBroken, ctx: &mut DeviceContext<'_>) {
        if self.reports.allow(&self.name) {
            tracing::warn!("virtio {}: device needs reset: {why}", self.name);
        }
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt_status |= INT_CONFIG_CHANGE;
        ctx.pending.raise(self.vector);
    }

    /// Raises the used-buffer interrupt for the queues that want one (EVENT_IDX aware).
    fn signal_used(
        &mut self,
        used: QueueSet,
        ctx: &mut DeviceContext<'_>,
    ) -> Result<(), DeviceBroken> {
        let mut notify = false;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            if used & (1 << index) != 0 {
                notify |=
                    queue
                        .needs_notification(ctx.mem)
                        .map_err(|err| DeviceBroken::BadQueue {
                            queue: index,
                            what: err.to_string(),
                        })?;
            }
        }
        if notify {
            self.interrupt_status |= INT_USED_BUFFER;
            ctx.pending.raise(self.vector);
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<(&mut Queue, &mut QueueAddresses)> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues
            .get_mut(index)
            .zip(self.addresses.get_mut(index))
    }

    /// The driver set QueueReady: apply the addresses and check the rings are in memory.
    fn make_queue_ready(&mut self, mem: &GuestMemoryMmap) -> Result<(), DeviceBroken> {
        let index = self.queue_select as usize;
        let Some((queue, addresses)) = self.selected_queue() else {
            return Ok(());
        };
        let addresses = *addresses;
        let bad = |what: String| DeviceBroken::BadQueue { queue: index, what };
        queue
            .try_set_desc_table_address(GuestAddress(addresses.desc))
            .map_err(|err| bad(format!("descriptor table {:#x}: {err}", addresses.desc)))?;
        queue
            .try_set_avail_ring_address(GuestAddress(addresses.driver))
            .map_err(|err| bad(format!("available ring {:#x}: {err}", addresses.driver)))?;
        queue
            .try_set_used_ring_address(GuestAddress(addresses.device))
            .map_err(|err| bad(format!("used ring {:#x}: {err}", addresses.device)))?;
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            queue.set_ready(false);
            return Err(bad("rings are not inside guest memory".into()));
        }
        Ok(())
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads status back and gives up, as the spec asks.
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 {
            let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
            for queue in &mut self.queues {
                queue.set_event_idx(event_idx);
            }
        }
        // NEEDS_RESET is the device's to set; the driver cannot clear it except by reset.
        self.status = value | (self.status & STATUS_NEEDS_RESET);
    }

    fn notify(&mut self, index: u64, ctx: &mut DeviceContext<'_>) {
        if !self.active() {
            return;
        }
        let Some(index) = usize::try_from(index)
            .ok()
            .filter(|index| *index < self.queues.len())
        else {
            tracing::debug!(
                "virtio {}: notify of queue {index} that does not exist",
                self.name
            );
            return;
        };
        if !self.queues[index].ready() {
            return;
        }
        let result = self
            .device
            .process_queue(index, &mut self.queues, ctx.mem, ctx.inputs)
            .and_then(|used| self.signal_used(used, ctx));
        if let Err(why) = result {
            self.mark_broken(&why, ctx);
        }
    }
}

impl BusDevice for MmioTransport {
    fn sync(&mut self) -> std::io::Result<()> {
        self.device.sync()
    }

    fn private_disk(&self) -> Option<super::block::copy::PrivateDisk> {
        self.device.private_disk()
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut DeviceContext<'_>) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        let value: u32 = match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |(queue, _)| u32::from(queue.max_size())),
            QUEUE_READY => self
                .selected_queue()
                .map_or(0, |(queue, _)| u32::from(queue.ready())),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            CONFIG_GENERATION => 0,
            _ => 0,
        };
        fill_le(data, u64::from(value));
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceContext<'_>) {
        if offset >= CONFIG {
            // No device has writable configuration fields.
            return;
        }
        let value = le_value(data) as u32;
        let set_low = |slot: &mut u64| *slot = (*slot & !0xFFFF_FFFF) | u64::from(value);
        let set_high = |slot: &mut u64| *slot = (*slot & 0xFFFF_FFFF) | (u64::from(value) << 32);
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_select = value,
            DRIVER_FEATURES_SEL => self.driver_features_select = value,
            DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self
                .driver_features_select
            {
                0 => {
                    self.driver_features = (self.driver_features & !0xFFFF_FFFF) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xFFFF_FFFF) | (u64::from(value) << 32)
                }
                _ => {}
            },
            QUEUE_SEL => self.queue_select = value,
            QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if let Some((queue, _)) = self.selected_queue() {
                    if queue.ready() {
                        let why = DeviceBroken::BadQueue {
                            queue: self.queue_select as usize,
                            what: format!("size {value} set while the queue is ready"),
                        };
                        self.mark_broken(&why, ctx);
                    } else if let Err(err) = queue.try_set_size(size) {
                        let why = DeviceBroken::BadQueue {
                            queue: self.queue_select as usize,
                            what: format!("size {value}: {err}"),
                        };
                        self.mark_broken(&why, ctx);
                    }
                }
            }
            QUEUE_READY => {
                if value == 1 {
                    if let Err(why) = self.make_queue_ready(ctx.mem) {
                        self.mark_broken(&why, ctx);
                    }
                } else if let Some((queue, _)) = self.selected_queue() {
                    queue.set_ready(false);
                }
            }
            QUEUE_DESC_LOW => self
                .selected_queue()
                .map_or((), |(_, a)| set_low(&mut a.desc)),
            QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or((), |(_, a)| set_high(&mut a.desc)),
            QUEUE_DRIVER_LOW => self
                .selected_queue()
                .map_or((), |(_, a)| set_low(&mut a.driver)),
            QUEUE_DRIVER_HIGH => self
                .selected_queue()
                .map_or((), |(_, a)| set_high(&mut a.driver)),
            QUEUE_DEVICE_LOW => self
                .selected_queue()
                .map_or((), |(_, a)| set_low(&mut a.device)),
            QUEUE_DEVICE_HIGH => self
                .selected_queue()
                .map_or((), |(_, a)| set_high(&mut a.device)),
            QUEUE_NOTIFY => self.notify(u64::from(value), ctx),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.write_status(value),
            _ => {}
        }
    }

    fn poll(&mut self, ctx: &mut DeviceContext<'_>) {
        if !self.active() {
            return;
        }
        let result = self
            .device
            .poll_backend(&mut self.queues, ctx.mem, ctx.inputs)
            .and_then(|used| self.signal_used(used, ctx));
        if let Err(why) = result {
            self.mark_broken(&why, ctx);
        }
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.active().then(|| self.device.wake_fd()).flatten()
    }
}

/// Bytes of one queue in a transport section: its state and the driver's staged addresses.
const QUEUE_RECORD: usize = 2 * 3 + 1 + 2 + 1 + 8 * 3 + 8 * 3;

/// The transport registers, each queue (size, readiness, ring addresses, the next
/// available and used indices, event-index mode, and the addresses the driver staged),
/// then the device's own section. The vector and device type must match this machine.
///
/// Between exits no used buffer waits for a notification decision (`signal_used` ran),
/// so the queues' count of buffers added since the last one is zero and is not saved.
impl Snapshot for MmioTransport {
    fn tag(&self) -> Tag {
        *b"VMIO"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u8(self.vector);
        out.u32(self.device.device_type());
        out.u32(self.queue_select);
        out.u32(self.device_features_select);
        out.u32(self.driver_features_select);
        out.u64(self.driver_features);
        out.u32(self.status);
        out.u32(self.interrupt_status);
        out.u32(self.queues.len() as u32);
        for (queue, staged) in self.queues.iter().zip(&self.addresses) {
            let state = queue.state();
            out.u16(state.max_size);
            out.u16(state.next_avail);
            out.u16(state.next_used);
            out.bool(state.event_idx_enabled);
            out.u16(state.size);
            out.bool(state.ready);
            out.u64(state.desc_table);
            out.u64(state.avail_ring);
            out.u64(state.used_ring);
            out.u64(staged.desc);
            out.u64(staged.driver);
            out.u64(staged.device);
        }
        out.section(self.device.as_ref())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let vector = input.u8("vector")?;
        let device_type = input.u32("device type")?;
        if vector != self.vector || device_type != self.device.device_type() {
            return Err(input.invalid(format!(
                "device type {device_type} on vector {vector}, this slot has type {} on vector {}",
                self.device.device_type(),
                self.vector
            )));
        }
        let queue_select = input.u32("queue select")?;
        let device_features_select = input.u32("device features select")?;
        let driver_features_select = input.u32("driver features select")?;
        let driver_features = input.u64("driver features")?;
        let status = input.u32("status")?;
        let interrupt_status = input.u32("interrupt status")?;
        let count = input.count("queues", self.queues.len(), QUEUE_RECORD)?;
        if count != self.queues.len() {
            return Err(input.invalid(format!(
                "{count} queues, this device has {}",
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(count);
        let mut addresses = Vec::with_capacity(count);
        for index in 0..count {
            let state = QueueState {
                max_size: input.u16("queue max size")?,
                next_avail: input.u16("next available index")?,
                next_used: input.u16("next used index")?,
                event_idx_enabled: input.bool("event index")?,
                size: input.u16("queue size")?,
                ready: input.bool("queue ready")?,
                desc_table: input.u64("descriptor table")?,
                avail_ring: input.u64("available ring")?,
                used_ring: input.u64("used ring")?,
            };
            if state.max_size != self.queues[index].max_size() {
                return Err(input.invalid(format!(
                    "queue {index} has max size {}, this device {}",
                    state.max_size,
                    self.queues[index].max_size()
                )));
            }
            // Sizes and ring alignment are checked as the driver's writes would be; rings
            // outside guest memory break the device at its next use, as they would live.
            let queue = Queue::try_from(state)
                .map_err(|err| input.invalid(format!("queue {index}: {err}")))?;
            queues.push(queue);
            addresses.push(QueueAddresses {
                desc: input.u64("staged descriptor table")?,
                driver: input.u64("staged driver area")?,
                device: input.u64("staged device area")?,
            });
        }
        input.nested("device", self.device.as_mut())?;
        self.queues = queues;
        self.addresses = addresses;
        self.queue_select = queue_select;
        self.device_features_select = device_features_select;
        self.driver_features_select = driver_features_select;
        self.driver_features = driver_features;
        self.status = status;
        self.interrupt_status = interrupt_status;
        Ok(())
    }
}

/// An empty virtio-mmio slot: device ID 0, as the spec describes a placeholder.
#[derive(Debug, Default)]
pub struct EmptySlot;

impl BusDevice for EmptySlot {
    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut DeviceContext<'_>) {
        let value = match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => 2,
            VENDOR_ID => VENDOR,
            _ => 0,
        };
        fill_le(data, u64::from(value));
    }

    fn write(&mut self, _offset: u64, _data: &[u8], _ctx: &mut DeviceContext<'_>) {}
}

/// No state; the section says "an empty slot is here".
impl Snapshot for EmptySlot {
    fn tag(&self) -> Tag {
        *b"VEMP"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, _out: &mut Encoder) -> Result<(), SnapshotError> {
        Ok(())
    }

    fn restore(&mut self, _input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        Ok(())
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};
    use crate::snapshot::{restore_section, save_section};

    fn disk_slot() -> MmioTransport {
        MmioTransport::new(Box::new(Block::for_replay(64).unwrap()), "blk", 41)
    }

    /// A transport the driver set up: features, status, one ready queue part-way used.
    fn driven() -> MmioTransport {
        let mut transport = disk_slot();
        transport.driver_features = VIRTIO_F_VERSION_1;
        transport.status = 0xF;
        transport.interrupt_status = INT_USED_BUFFER;
        transport.queue_select = 0;
        transport.addresses[0] = QueueAddresses {
            desc: 0x10_000,
            driver: 0x11_000,
            device: 0x12_000,
        };
        let queue = &mut transport.queues[0];
        queue.try_set_size(8).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(0x10_000))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(0x11_000))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(0x12_000))
            .unwrap();
        queue.set_ready(true);
        queue.set_next_avail(5);
        queue.set_next_used(4);
        transport
    }

    #[test]
    fn queues_and_registers_round_trip_with_the_device_nested() {
        let transport = driven();
        let bytes = assert_round_trip(&transport, &mut disk_slot());
        let mut restored = disk_slot();
        restore_section(&mut restored, &bytes).unwrap();
        let queue = &restored.queues[0];
        assert_eq!(
            (queue.next_avail(), queue.next_used(), queue.size()),
            (5, 4, 8)
        );
        assert!(queue.ready());
        assert_eq!(queue.desc_table(), 0x10_000);
        assert_eq!(restored.status, 0xF);
        assert_refuses_damage(&bytes, disk_slot);
    }

    #[test]
    fn another_slot_or_device_is_refused() {
        let bytes = save_section(&driven()).unwrap();
        let mut other_vector =
            MmioTransport::new(Box::new(Block::for_replay(64).unwrap()), "blk", 40);
        let err = restore_section(&mut other_vector, &bytes).unwrap_err();
        assert!(err.to_string().contains("vector 41"), "{err}");
        let mut other_disk =
            MmioTransport::new(Box::new(Block::for_replay(65).unwrap()), "blk", 41);
        let err = restore_section(&mut other_disk, &bytes).unwrap_err();
        assert!(err.to_string().contains("64 sectors"), "{err}");
        // The refused device section left the transport as it was.
        assert_eq!(
            save_section(&other_disk).unwrap(),
            save_section(&MmioTransport::new(
                Box::new(Block::for_replay(65).unwrap()),
                "blk",
                41
            ))
            .unwrap()
        );
    }

    #[test]
    fn an_impossible_queue_size_is_refused() {
        let mut transport = driven();
        transport.queues[0].try_set_size(8).unwrap();
        let mut bytes = Encoder::new();
        transport.save(&mut bytes).unwrap();
        let mut payload = bytes.into_bytes();
        // vector, type, 3 selects, features, status, interrupt status, count; then the
        // queue: max size, next avail, next used, event idx, size.
        let size_at = 1 + 4 + 4 * 3 + 8 + 4 + 4 + 4 + 2 + 2 + 2 + 1;
        payload[size_at..size_at + 2].copy_from_slice(&3u16.to_le_bytes());
        let framed = crate::snapshot::frame_section(*b"VMIO", 1, &payload).unwrap();
        let err = restore_section(&mut disk_slot(), &framed).unwrap_err();
        assert!(err.to_string().contains("queue 0"), "{err}");
    }
}
