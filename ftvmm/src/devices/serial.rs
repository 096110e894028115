//! COM1: vm-superio's 16550A behind the port bus, writing to the console.

use super::{BusDevice, DeviceContext};
use crate::layout::COM1_VECTOR;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::{Serial, Trigger};

/// Where the guest's console output goes.
pub enum Console {
    /// A file or standard output, written unbuffered so output appears as the guest makes it.
    File(std::fs::File),
    /// Discarded.
    Sink,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Console::File(file) => file.write(buf),
            Console::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Console::File(file) => file.flush(),
            Console::Sink => Ok(()),
        }
    }
}

/// Records that the UART asserted its interrupt line; the device turns it into a vector.
#[derive(Clone, Default)]
struct InterruptLine(Arc<AtomicBool>);

impl Trigger for InterruptLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The COM1 UART.
pub struct SerialConsole {
    uart: Serial<InterruptLine, vm_superio::serial::NoEvents, Console>,
    line: InterruptLine,
    write_failed: bool,
}

impl SerialConsole {
    /// A UART whose transmitted bytes go to `console`.
    pub fn new(console: Console) -> Self {
        let line = InterruptLine::default();
        SerialConsole {
            uart: Serial::new(line.clone(), console),
            line,
            write_failed: false,
        }
    }

    fn forward_interrupt(&self, ctx: &mut DeviceContext<'_>) {
        if self.line.0.swap(false, Ordering::Relaxed) {
            ctx.pending.raise(COM1_VECTOR);
        }
    }
}

/// Number of UART registers.
pub const REGISTER_COUNT: u16 = 8;

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceContext<'_>) {
        // A wider access reads consecutive registers, as on an ISA bus.
        for (index, byte) in data.iter_mut().enumerate() {
            *byte = self.uart.read((offset as u8).wrapping_add(index as u8));
        }
        self.forward_interrupt(ctx);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceContext<'_>) {
        for (index, byte) in data.iter().enumerate() {
            let register = (offset as u8).wrapping_add(index as u8);
            if let Err(err) = self.uart.write(register, *byte) {
                // A closed console must not stop the guest; say so once.
                if !self.write_failed {
                    tracing::warn!("console output failed, later output is dropped: {err:?}");
                    self.write_failed = true;
                }
            }
        }
        self.forward_interrupt(ctx);
    }
}
