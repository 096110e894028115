//! The platform devices: power, timer, fault report and scratch ports, and the MMIO page
//! with the clocks (docs/machine.md).

use super::{fill_le, le_value, BusDevice, DeviceContext, StopRequest};
use crate::layout::{FAULT_PORT, POWER_PORT, SCRATCH_PORT, TIMER_PORT};
use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};

/// First platform port.
pub const PORT_BASE: u16 = POWER_PORT;
/// Number of platform ports.
pub const PORT_COUNT: u16 = SCRATCH_PORT - POWER_PORT + 4;

/// The platform ports at `0x600..0x614`.
#[derive(Debug, Default)]
pub struct PlatformPorts {
    scratch: u32,
}

impl BusDevice for PlatformPorts {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceContext<'_>) {
        let value = match port_at(offset) {
            TIMER_PORT => u64::from(ctx.timer.period_us()),
            SCRATCH_PORT => u64::from(self.scratch),
            _ => u64::MAX,
        };
        fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceContext<'_>) {
        let value = le_value(data);
        match port_at(offset) {
            POWER_PORT => *ctx.stop = Some(StopRequest::PowerOff(value as u8)),
            TIMER_PORT => {
                let now = ctx.clock.monotonic_ns();
                ctx.timer.set_period_us(value as u32, now);
            }
            FAULT_PORT => *ctx.stop = Some(StopRequest::GuestFault(value as u32)),
            SCRATCH_PORT => self.scratch = value as u32,
            _ => {}
        }
    }
}

fn port_at(offset: u64) -> u16 {
    // Offsets are below PORT_COUNT: the bus only routes accesses inside the range.
    PORT_BASE.wrapping_add(offset as u16)
}

/// Offset of the monotonic clock register in the platform MMIO page.
pub const MMIO_MONOTONIC: u64 = 0x00;
/// Offset of the wall clock register.
pub const MMIO_WALL_CLOCK: u64 = 0x08;
/// Offset of the scratch register.
pub const MMIO_SCRATCH: u64 = 0x10;

/// The platform MMIO page: clocks and a scratch register.
#[derive(Debug, Default)]
pub struct PlatformMmio {
    scratch: u32,
}

impl BusDevice for PlatformMmio {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceContext<'_>) {
        let clock = &mut *ctx.clock;
        let value = match offset {
            MMIO_MONOTONIC => ctx
                .inputs
                .clock_read(MMIO_MONOTONIC as u8, || clock.monotonic_ns()),
            MMIO_WALL_CLOCK => ctx
                .inputs
                .clock_read(MMIO_WALL_CLOCK as u8, || clock.wall_clock_ns()),
            MMIO_SCRATCH => u64::from(self.scratch),
            _ => 0,
        };
        fill_le(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut DeviceContext<'_>) {
        if offset == MMIO_SCRATCH {
            self.scratch = le_value(data) as u32;
        }
    }
}

/// The scratch register (the timer's state is the [`crate::interrupts::Timer`]'s).
impl Snapshot for PlatformPorts {
    fn tag(&self) -> Tag {
        *b"PPRT"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u32(self.scratch);
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        self.scratch = input.u32("scratch")?;
        Ok(())
    }
}

/// The scratch register (the clocks are the [`crate::clock::VmClock`]'s).
impl Snapshot for PlatformMmio {
    fn tag(&self) -> Tag {
        *b"PMMI"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u32(self.scratch);
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        self.scratch = input.u32("scratch")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};

    #[test]
    fn scratch_registers_round_trip() {
        let bytes = assert_round_trip(
            &PlatformPorts {
                scratch: 0xDEAD_BEEF,
            },
            &mut PlatformPorts::default(),
        );
        assert_refuses_damage(&bytes, PlatformPorts::default);
        let bytes = assert_round_trip(&PlatformMmio { scratch: 7 }, &mut PlatformMmio::default());
        assert_refuses_damage(&bytes, PlatformMmio::default);
    }
}
