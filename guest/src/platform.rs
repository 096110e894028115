//! The platform devices of the ftvm machine: clock, timer, power, fault report ports.

use crate::io::{mmio_read64, outb, outl};
use crate::sys;
use core::sync::atomic::{AtomicU64, Ordering};

/// Base of the platform MMIO page.
pub const PLATFORM_MMIO: u64 = 0xD000_0000;
/// Platform MMIO: monotonic clock, nanoseconds since the VM started (64-bit, read).
pub const CLOCK_MONOTONIC: u64 = PLATFORM_MMIO;
/// Platform MMIO: wall clock, nanoseconds since the Unix epoch (64-bit, read).
pub const CLOCK_WALL: u64 = PLATFORM_MMIO + 0x08;
/// Platform MMIO: 32-bit scratch register.
pub const MMIO_SCRATCH: u64 = PLATFORM_MMIO + 0x10;

/// Power port: writing powers the guest off; the VMM exits with `value & 0xFF`.
pub const PORT_POWER: u16 = 0x600;
/// Timer period in microseconds (32-bit); 0 stops the timer.
pub const PORT_TIMER: u16 = 0x604;
/// Fault report port, written by the CPL0 fault stub only.
pub const PORT_FAULT: u16 = 0x608;
/// 32-bit scratch port: reads return the last value written.
pub const PORT_SCRATCH: u16 = 0x610;

/// Timer ticks counted by the vector-32 stub (`incq FTVM_TICKS` at CPL0).
#[no_mangle]
static FTVM_TICKS: AtomicU64 = AtomicU64::new(0);

/// Vectors 33..=95 seen since the last [`take_pending_irqs`]: bit `vector - 32`,
/// set by the CPL0 stubs with `btsq`.
#[no_mangle]
static FTVM_PENDING_IRQS: AtomicU64 = AtomicU64::new(0);

/// Monotonic time in nanoseconds since the VM started (one MMIO exit).
pub fn clock_ns() -> u64 {
    mmio_read64(CLOCK_MONOTONIC)
}

/// Wall-clock time in nanoseconds since the Unix epoch (one MMIO exit).
pub fn wall_clock_ns() -> u64 {
    mmio_read64(CLOCK_WALL)
}

/// Sets the timer period in microseconds (vector 32); 0 stops the timer.
pub fn set_timer_period_us(period_us: u32) {
    outl(PORT_TIMER, period_us);
}

/// Number of timer interrupts taken since boot.
pub fn ticks() -> u64 {
    // A plain load: the CPL0 stub increments the counter between instructions of this
    // single vCPU, so no stronger ordering is needed.
    FTVM_TICKS.load(Ordering::Relaxed)
}

/// Returns and clears the set of device vectors (33..=95) taken since the last call:
/// bit `n` stands for vector `32 + n`.
pub fn take_pending_irqs() -> u64 {
    // `swap` is one `xchg`: an interrupt cannot fall between the read and the clear.
    FTVM_PENDING_IRQS.swap(0, Ordering::SeqCst)
}

/// Sleeps until the next interrupt has been handled (the `SYS_HALT` system call).
pub fn halt() {
    sys::syscall(sys::SYS_HALT);
}

/// Powers the guest off; the VMM exits with `code`.
pub fn power_off(code: u8) -> ! {
    outb(PORT_POWER, code);
    // The VMM stops at the write above. Should it not, halting (rather than spinning)
    // makes a guest hang the VMM can see.
    loop {
        halt();
    }
}
