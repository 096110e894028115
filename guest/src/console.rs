//! Serial console on COM1 (port `0x3F8`), with the [`print!`](crate::print!) and
//! [`println!`](crate::println!) macros.
//!
//! Bytes are written to the transmit register without polling the line status
//! register: the VMM's UART is always ready. Each byte is one VM exit. `\n` is sent as
//! is (no `\r`).

use crate::io::outb;
use core::fmt;

/// COM1 transmit holding register.
pub const COM1: u16 = 0x3F8;

/// The serial console; zero-sized, so make one wherever it is needed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Console;

impl Console {
    /// Writes raw bytes.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            outb(COM1, b);
        }
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Implementation of [`print!`](crate::print!); not for direct use.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    // Console::write_str never fails.
    let _ = fmt::Write::write_fmt(&mut Console, args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints to the serial console, with a newline.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
