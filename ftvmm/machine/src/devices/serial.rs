//! COM1: vm-superio's 16550A behind the port bus, writing to the console.

use super::{BusDevice, DeviceContext};
use crate::layout::COM1_VECTOR;
use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

/// Where the guest's console output goes.
pub enum Console {
    /// A file or standard output, written unbuffered so output appears as the guest makes it.
    File(std::fs::File),
    /// A log file that never grows past a size: at the cap it becomes `<path>.1` (the one
    /// before is dropped) and a new one starts, so a guest that floods its console costs
    /// the host at most twice the cap.
    Rotating(RotatingFile),
    /// Discarded.
    Sink,
}

impl Console {
    /// A console log at `path`, rotated once `max` bytes were written to it.
    pub fn rotating(path: &std::path::Path, max: u64) -> std::io::Result<Console> {
        Ok(Console::Rotating(RotatingFile::create(path, max)?))
    }
}

/// A file that is rotated at a size (see [`Console::Rotating`]). Both files are opened at
/// the start, so rotating needs no right to the directory: a replica that dropped its
/// privileges (`--run-as`) and runs under a system call filter still rotates.
pub struct RotatingFile {
    file: std::fs::File,
    previous: std::fs::File,
    written: u64,
    max: u64,
}

impl RotatingFile {
    /// Creates (truncates) `path` and opens `<path>.1` (kept as it is until the first
    /// rotation); rotates once `max` bytes were written.
    pub fn create(path: &std::path::Path, max: u64) -> std::io::Result<RotatingFile> {
        let mut previous = path.to_owned().into_os_string();
        previous.push(".1");
        Ok(RotatingFile {
            file: crate::private_file::create(path)?,
            previous: crate::private_file::open_kept(std::path::Path::new(&previous))?,
            written: 0,
            max: max.max(1),
        })
    }

    /// The bytes written so far become `<path>.1` (the one before is dropped) and `path`
    /// starts empty: a copy, then a truncation, on the descriptors held.
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        self.previous.set_len(0)?;
        let mut chunk = vec![0u8; 64 << 10];
        let mut at = 0u64;
        loop {
            let read = self.file.read_at(&mut chunk, at)?;
            if read == 0 {
                break;
            }
            self.previous.write_all_at(&chunk[..read], at)?;
            at += read as u64;
        }
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.max {
            self.rotate()?;
        }
        let room = usize::try_from(self.max - self.written).unwrap_or(usize::MAX);
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Console::File(file) => file.write(buf),
            Console::Rotating(file) => file.write(buf),
            Console::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Console::File(file) => file.flush(),
            Console::Rotating(file) => file.flush(),
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

/// The UART's FIFO holds at most this many received bytes.
const FIFO_SIZE: usize = 64;

/// The UART registers, its receive FIFO and whether its interrupt line is raised. Where
/// the output goes is the host's business and stays as it is.
impl Snapshot for SerialConsole {
    fn tag(&self) -> Tag {
        *b"SERL"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        let state = self.uart.state();
        for register in [
            state.baud_divisor_low,
            state.baud_divisor_high,
            state.interrupt_enable,
            state.interrupt_identification,
            state.line_control,
            state.line_status,
            state.modem_control,
            state.modem_status,
            state.scratch,
        ] {
            out.u8(register);
        }
        out.bytes(&state.in_buffer)?;
        out.bool(self.line.0.load(Ordering::Relaxed));
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let registers: [u8; 9] = input.array("registers")?;
        let in_buffer = input.bytes("receive FIFO", FIFO_SIZE)?.to_vec();
        let raised = input.bool("interrupt line")?;
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            registers;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        };
        let placeholder = Serial::new(self.line.clone(), Console::Sink);
        let console = std::mem::replace(&mut self.uart, placeholder).into_writer();
        // Cannot fail: the FIFO length was checked and the trigger is infallible.
        match Serial::from_state(
            &state,
            self.line.clone(),
            vm_superio::serial::NoEvents,
            console,
        ) {
            Ok(uart) => self.uart = uart,
            Err(err) => return Err(input.invalid(format!("UART state refused: {err:?}"))),
        }
        // from_state re-raises what the registers imply; the saved line already says
        // whether the guest still has to be told.
        self.line.0.store(raised, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_console_log_never_grows_past_twice_its_cap() {
        let dir = std::env::temp_dir().join(format!("ftvm-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut file = RotatingFile::create(&path, 1000).unwrap();
        for _ in 0..100 {
            file.write_all(&[b'x'; 77]).unwrap();
        }
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(len(&path) <= 1000);
        assert_eq!(len(&dir.join("console.log.1")), 1000);
        std::fs::remove_dir_all(&dir).ok();
    }
    use super::*;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};

    #[test]
    fn uart_state_round_trips_and_refuses_damage() {
        let mut uart = SerialConsole::new(Console::Sink);
        // Enable the THR-empty interrupt, set the divisor latch, write the scratch.
        for (register, value) in [
            (3u8, 0x80u8),
            (0, 3),
            (1, 0),
            (3, 0x03),
            (1, 0x02),
            (7, 0x5A),
        ] {
            uart.uart.write(register, value).unwrap();
        }
        uart.uart.enqueue_raw_bytes(b"in").unwrap();
        let bytes = assert_round_trip(&uart, &mut SerialConsole::new(Console::Sink));
        assert_refuses_damage(&bytes, || SerialConsole::new(Console::Sink));
        let mut restored = SerialConsole::new(Console::Sink);
        crate::snapshot::restore_section(&mut restored, &bytes).unwrap();
        assert_eq!(restored.uart.read(7), 0x5A);
        assert_eq!(restored.uart.read(0), b'i');
    }
}
