//! Finding virtio-mmio devices (`docs/machine.md`: slot `n` at
//! `virtio_mmio_base + n * 0x1000`, interrupt vector `virtio_first_vector + n`) and the
//! common part of bringing one up.

use alloc::vec::Vec;
use core::ptr::NonNull;
use ftvm_guest::boot::BootInfo;
use ftvm_guest::io::mmio_read32;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, Transport};

/// Size of one virtio-mmio slot (registers and config space).
pub const SLOT_SIZE: u64 = 0x1000;
/// `MagicValue` of a virtio-mmio device: `virt` in little-endian.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// `DeviceID` of a network device.
pub const DEVICE_NET: u32 = 1;
/// `DeviceID` of a block device.
pub const DEVICE_BLK: u32 = 2;
/// `VIRTIO_F_VERSION_1`: the modern (virtio 1.x) interface; required.
pub const F_VERSION_1: u64 = 1 << 32;

/// A virtio-mmio slot holding a device.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Slot number.
    pub index: u32,
    /// Guest-physical address of its registers.
    pub base: u64,
    /// The virtio `DeviceID`.
    pub device_id: u32,
    /// Bit in `take_pending_irqs()` for its interrupt vector (0 if the vector is
    /// outside the range the runtime reports).
    pub irq_bit: u64,
}

/// Lists the slots of the boot info that hold a device (`DeviceID` not 0). Slots with
/// a bad magic value or a version other than 2 are reported and skipped.
pub fn probe(info: &BootInfo) -> Vec<Slot> {
    let mut slots = Vec::new();
    for index in 0..info.virtio_mmio_count.min(64) {
        let base = info.virtio_mmio_base + u64::from(index) * SLOT_SIZE;
        let magic = mmio_read32(base);
        if magic != MMIO_MAGIC {
            ftvm_guest::println!("kv: virtio slot {} has bad magic {:#x}", index, magic);
            continue;
        }
        let version = mmio_read32(base + 4);
        let device_id = mmio_read32(base + 8);
        if device_id == 0 {
            continue;
        }
        if version != 2 {
            ftvm_guest::println!(
                "kv: virtio slot {} has version {}, not 2: skipped",
                index,
                version
            );
            continue;
        }
        let vector = u64::from(info.virtio_first_vector) + u64::from(index);
        let irq_bit = if (33..96).contains(&vector) {
            1 << (vector - 32)
        } else {
            0
        };
        slots.push(Slot {
            index,
            base,
            device_id,
            irq_bit,
        });
    }
    slots
}

/// The transport for a slot [`probe`] returned.
pub fn transport(slot: &Slot) -> Result<MmioTransport<'static>, &'static str> {
    let header = NonNull::new(slot.base as *mut VirtIOHeader).ok_or("null slot address")?;
    // SAFETY: the slot lies in the MMIO hole (never RAM), identity-mapped and
    // user-accessible for the life of the guest, and only this transport uses it.
    unsafe { MmioTransport::new(header, SLOT_SIZE as usize) }.map_err(|_| "bad virtio-mmio header")
}

/// The first steps of device initialisation (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE,
/// DRIVER, feature negotiation, FEATURES_OK (checked). Returns the negotiated
/// features: the device's features that are in `wanted`. Fails if the device does
/// not offer [`F_VERSION_1`] or refuses the features. The caller then sets up its
/// queues and calls [`finish_init`].
pub fn begin_init(transport: &mut impl Transport, wanted: u64) -> Result<u64, &'static str> {
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE);
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = transport.read_device_features();
    if offered & F_VERSION_1 == 0 {
        fail(transport);
        return Err("device does not offer VIRTIO_F_VERSION_1");
    }
    let features = offered & (wanted | F_VERSION_1);
    transport.write_driver_features(features);
    let status = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    transport.set_status(status);
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        fail(transport);
        return Err("device refused the features");
    }
    Ok(features)
}

/// Sets DRIVER_OK: the device is live.
pub fn finish_init(transport: &mut impl Transport) {
    transport.finish_init();
}

/// Sets FAILED.
pub fn fail(transport: &mut impl Transport) {
    let status = transport.get_status();
    transport.set_status(status | DeviceStatus::FAILED);
}
