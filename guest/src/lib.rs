//! Runtime for the ftvm sample guests.
//!
//! The guests are freestanding x86-64 ELF images for the machine described in
//! `docs/machine.md`. This crate is everything they share:
//!
//! - the CPL0 part ([`cpl0`], assembly only): descriptor tables, interrupt and fault
//!   stubs, the `int3` system call, and the drop to CPL3;
//! - the CPL3 API: port and MMIO access ([`io`]), the platform clock, timer and power
//!   port ([`platform`]), the serial console ([`console`], [`print!`](crate::print!),
//!   [`println!`](crate::println!)),
//!   the boot info and command line ([`boot`]), and the system calls ([`sys`]);
//! - what a freestanding Rust binary needs: `memcpy` and friends ([`mem`]) and the
//!   panic handler.
//!
//! A guest binary is `#![no_std]`, `#![no_main]` and names its main function with
//! [`entry!`](crate::entry!):
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use ftvm_guest::{boot::Boot, println};
//! ftvm_guest::entry!(main);
//! fn main(boot: &Boot) -> u8 {
//!     println!("cmdline: {}", boot.cmdline.as_str());
//!     0 // the power-off code
//! }
//! ```

#![no_std]

pub mod boot;
pub mod console;
pub mod cpl0;
pub mod io;
pub mod mem;
pub mod platform;
pub mod sys;

pub use sys::{SYS_HALT, SYS_HANG, SYS_NOP, SYS_TRIPLE_FAULT};

/// Power-off code when a command-line value is missing or invalid.
pub const EXIT_BAD_CMDLINE: u8 = 61;
/// Power-off code after a panic.
pub const EXIT_PANIC: u8 = 62;
/// Power-off code when the boot info is missing or has the wrong magic or version.
pub const EXIT_BAD_BOOT_INFO: u8 = 63;

/// Names the guest's main function, `fn(&boot::Boot) -> u8`.
///
/// Defines `ftvm_user_entry`, the CPL3 function that `_start` drops into. It reads
/// and checks the boot info, calls `main`, and powers off with the code `main` returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// CPL3 entry point, reached by `_start`'s `iretq` with the boot info address.
        #[no_mangle]
        pub extern "C" fn ftvm_user_entry(boot_info: u64) -> ! {
            $crate::boot::run(boot_info, $main)
        }
    };
}

/// Prints the panic message on the console and powers off with [`EXIT_PANIC`].
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest panic: {}", info);
    platform::power_off(EXIT_PANIC)
}

/// Unwinding symbols that the prebuilt `core` (compiled with `panic = "unwind"`)
/// references in unoptimized builds. With `panic = "abort"` nothing ever unwinds, so
/// they are never called.
mod unwind_stubs {
    /// Personality routine referenced by `core`'s landing pads; never called.
    #[no_mangle]
    extern "C" fn rust_eh_personality() {}

    /// Resumes unwinding after a landing pad; never called.
    #[no_mangle]
    extern "C" fn _Unwind_Resume() -> ! {
        crate::platform::power_off(crate::EXIT_PANIC)
    }
}
