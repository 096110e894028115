//! Device models and the port/MMIO buses that route exits to them.
//!
//! A device sees one access at a time through [`BusDevice`], with a [`DeviceContext`] that
//! lets it raise interrupts, program the timer, read the VM clock, touch guest memory and
//! ask the VM to stop. Devices never call back into the vCPU loop; everything they do
//! happens while the vCPU is stopped at the exit that caused the access.

pub mod platform;
pub mod serial;
pub mod virtio;

use crate::clock::VmClock;
use crate::inputs::Inputs;
use crate::interrupts::{PendingVectors, Timer};
use crate::snapshot::Snapshot;
use vm_memory::GuestMemoryMmap;

/// Why a device asked the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The guest wrote this exit code to the power port.
    PowerOff(u8),
    /// The guest reported an exception it could not handle (vector number).
    GuestFault(u32),
}

/// What a device may touch while it handles one access.
pub struct DeviceContext<'a> {
    /// Vectors waiting for injection.
    pub pending: &'a mut PendingVectors,
    /// The periodic timer.
    pub timer: &'a mut Timer,
    /// The VM's clocks.
    pub clock: &'a mut VmClock,
    /// Guest RAM, for devices that move data (virtio).
    pub mem: &'a GuestMemoryMmap,
    /// Set by a device that wants the VM to stop after this exit.
    pub stop: &'a mut Option<StopRequest>,
    /// The source of every nondeterministic value (live, recorded or replayed).
    pub inputs: &'a mut Inputs,
}

/// A device on the port bus or the MMIO bus. Offsets are relative to the device's base.
/// Every device can save and restore its state ([`Snapshot`]).
pub trait BusDevice: Snapshot {
    /// Handles a read of `data.len()` bytes at `offset`; must fill all of `data`.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceContext<'_>);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceContext<'_>);
    /// Delivers work that arrived from outside (a received packet), at a guest-caused exit.
    fn poll(&mut self, _ctx: &mut DeviceContext<'_>) {}
    /// A file descriptor that becomes readable when [`BusDevice::poll`] would have work.
    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Makes what the device completed durable on its backend (a disk's writes).
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// A private disk behind the device, for a clone to copy.
    fn private_disk(&self) -> Option<virtio::block::copy::PrivateDisk> {
        None
    }
}

struct Mapping {
    base: u64,
    len: u64,
    device: Box<dyn BusDevice>,
}

/// Routes accesses by address to the device whose range holds it.
#[derive(Default)]
pub struct Bus {
    mappings: Vec<Mapping>,
    /// Accesses that hit no device.
    pub unhandled: u64,
}

/// Adding a device failed.
#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device or is empty")]
pub struct BusOverlap {
    /// Base of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

impl Bus {
    /// Maps `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusOverlap> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusOverlap { base, len })?;
        if self
            .mappings
            .iter()
            .any(|m| base < m.base + m.len && m.base < end)
        {
            return Err(BusOverlap { base, len });
        }
        self.mappings.push(Mapping { base, len, device });
        Ok(())
    }

    fn find(&mut self, addr: u64, len: usize) -> Option<(&mut Mapping, u64)> {
        let end = addr.checked_add(len as u64)?;
        self.mappings
            .iter_mut()
            .find(|m| addr >= m.base && end <= m.base + m.len)
            .map(|m| {
                let offset = addr - m.base;
                (m, offset)
            })
    }

    /// Reads from the device at `addr`; returns false (and fills `data` with `fill`) when
    /// no device holds the whole access.
    pub fn read(
        &mut self,
        addr: u64,
        data: &mut [u8],
        fill: u8,
        ctx: &mut DeviceContext<'_>,
    ) -> bool {
        match self.find(addr, data.len()) {
            Some((mapping, offset)) => {
                mapping.device.read(offset, data, ctx);
                true
            }
            None => {
                data.fill(fill);
                self.unhandled += 1;
                false
            }
        }
    }

    /// Lets every device deliver work that arrived from outside.
    pub fn poll_all(&mut self, ctx: &mut DeviceContext<'_>) {
        for mapping in &mut self.mappings {
            mapping.device.poll(ctx);
        }
    }

    /// The file descriptors that can wake a halted guest.
    pub fn wake_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.mappings
            .iter()
            .filter_map(|m| m.device.wake_fd())
            .collect()
    }

    /// The devices in the order they were inserted, with their base addresses: the order
    /// of their sections in a machine snapshot.
    pub fn devices_mut(&mut self) -> impl Iterator<Item = (u64, &mut dyn BusDevice)> {
        self.mappings
            .iter_mut()
            .map(|m| (m.base, m.device.as_mut() as &mut dyn BusDevice))
    }

    /// Writes to the device at `addr`; returns false when no device holds the whole access.
    pub fn write(&mut self, addr: u64, data: &[u8], ctx: &mut DeviceContext<'_>) -> bool {
        match self.find(addr, data.len()) {
            Some((mapping, offset)) => {
                mapping.device.write(offset, data, ctx);
                true
            }
            None => {
                self.unhandled += 1;
                false
            }
        }
    }
}

/// The little-endian value of an access of up to 8 bytes (longer accesses are truncated).
pub fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let len = data.len().min(8);
    bytes[..len].copy_from_slice(&data[..len]);
    u64::from_le_bytes(bytes)
}

/// Fills a read of up to 8 bytes with the low bytes of `value`, zero beyond.
pub fn fill_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = bytes.get(index).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u64);
    impl Snapshot for Echo {
        fn tag(&self) -> crate::snapshot::Tag {
            *b"ECHO"
        }
        fn version(&self) -> u16 {
            1
        }
        fn save(
            &self,
            out: &mut crate::snapshot::Encoder,
        ) -> Result<(), crate::snapshot::SnapshotError> {
            out.u64(self.0);
            Ok(())
        }
        fn restore(
            &mut self,
            input: &mut crate::snapshot::Decoder<'_>,
            _: u16,
        ) -> Result<(), crate::snapshot::SnapshotError> {
            self.0 = input.u64("value")?;
            Ok(())
        }
    }
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8], _: &mut DeviceContext<'_>) {
            fill_le(data, self.0 + offset);
        }
        fn write(&mut self, _: u64, data: &[u8], _: &mut DeviceContext<'_>) {
            self.0 = le_value(data);
        }
    }

    #[test]
    fn bus_routes_by_range_and_counts_misses() {
        let mem = crate::memory::create_guest_memory(crate::layout::MEM_MIN).unwrap();
        let (mut pending, mut timer, mut clock, mut stop) = (
            PendingVectors::default(),
            Timer::default(),
            VmClock::new(),
            None,
        );
        let mut inputs = Inputs::new(crate::inputs::Mode::Live);
        let mut ctx = DeviceContext {
            pending: &mut pending,
            timer: &mut timer,
            clock: &mut clock,
            mem: &mem,
            stop: &mut stop,
            inputs: &mut inputs,
        };
        let mut bus = Bus::default();
        bus.insert(0x100, 8, Box::new(Echo(0))).unwrap();
        assert!(bus.insert(0x104, 8, Box::new(Echo(0))).is_err());
        assert!(bus.insert(u64::MAX, 2, Box::new(Echo(0))).is_err());
        assert!(bus.write(0x100, &[7, 0, 0, 0], &mut ctx));
        let mut data = [0u8; 2];
        assert!(bus.read(0x102, &mut data, 0xFF, &mut ctx));
        assert_eq!(data, [9, 0]);
        // Straddling the end of the device is a miss, not a partial access.
        assert!(!bus.read(0x106, &mut [0u8; 4], 0xFF, &mut ctx));
        assert!(!bus.write(0x200, &[1], &mut ctx));
        assert_eq!(bus.unhandled, 2);
    }
}
