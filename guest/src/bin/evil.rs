//! `evil`: a misbehaving guest for VMM robustness tests.
//!
//! Command line: `case=<case>` (required), and `seed=S` for `garbage-ports`.
//! Prints `evil: <case>` first, then:
//! - `triple-fault`: system call `0xdead` (empty IDT + `ud2` at CPL0): a triple fault.
//! - `wild-jump`: jumps to `0xC800_0000`, mapped and user-accessible but neither RAM
//!   nor a device.
//! - `unmapped-jump`: jumps to `0x10_0000_0000`, beyond the page tables: a #PF
//!   reported on port `0x608` (vector 14, RIP = CR2 = that address).
//! - `garbage-ports`: pseudo-random writes to every 16th port (except the power/fault
//!   ports `0x600..=0x60F`), to all of COM1 `0x3F8..=0x3FF`, to 64 offsets of the
//!   platform MMIO page and to 64 addresses in `0xD000_1000..0xD010_0000`; then resets
//!   the UART and the timer, prints a newline (the bytes written to `0x3F8` appear on
//!   the console), then `survived garbage`, and powers off with 0.
//! - `rdtsc`: prints `tsc: <value>` and powers off with 0 (NOT an FT-ready guest).
//! - `halt-no-irq`: system call `0xdeaf` (`cli; hlt` at CPL0): a hang.
//! - `bad-exit`: writes 300 to the power port with a 32-bit `out`: exit status 44.

#![no_std]
#![no_main]

use core::arch::asm;
use ftvm_guest::boot::{usage_error, Boot};
use ftvm_guest::io::{mmio_write16, mmio_write32, mmio_write64, mmio_write8, outb, outl, outw};
use ftvm_guest::platform::{set_timer_period_us, PLATFORM_MMIO, PORT_POWER};
use ftvm_guest::println;
use ftvm_guest::sys::{syscall, SYS_HANG, SYS_TRIPLE_FAULT};

ftvm_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
    let args = &boot.cmdline;
    let case = args.get("case").unwrap_or("");
    let seed: u64 = args.get_num("seed", 0x5EED_5EED_5EED_5EED);
    println!("evil: {}", case);
    match case {
        "triple-fault" => {
            syscall(SYS_TRIPLE_FAULT);
        }
        "wild-jump" => jump(0xC800_0000),
        "unmapped-jump" => jump(0x10_0000_0000),
        "garbage-ports" => {
            garbage(seed);
            // The garbage written to COM1's data register went to the console: start a
            // fresh line so that the verdict is a line of its own.
            println!();
            println!("survived garbage");
            return 0;
        }
        "rdtsc" => {
            // SAFETY: rdtsc has no memory effects; it is the point of this case.
            let tsc = unsafe { core::arch::x86_64::_rdtsc() };
            println!("tsc: {}", tsc);
            return 0;
        }
        "halt-no-irq" => {
            syscall(SYS_HANG);
        }
        "bad-exit" => outl(PORT_POWER, 300),
        _ => usage_error(format_args!(
            "case must be triple-fault, wild-jump, unmapped-jump, garbage-ports, rdtsc, \
             halt-no-irq or bad-exit, not {:?}",
            case
        )),
    }
    println!("evil: still running after {}", case);
    1
}

/// Jumps to `addr` and never comes back (the VMM is expected to stop the guest).
fn jump(addr: u64) -> ! {
    // SAFETY: not safe at all, on purpose: this case tests how the VMM handles a guest
    // executing from a bad address. Nothing after the jump runs in this guest.
    unsafe { asm!("jmp {0}", in(reg) addr, options(noreturn)) }
}

/// xorshift64: a deterministic stream of garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes a random byte, word or dword to `port`, never reaching `0x600..=0x60F`.
fn garbage_out(rng: &mut Rng, port: u16) {
    let r = rng.next();
    let value = (r >> 32) as u32;
    let width = match r % 3 {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    let last = u32::from(port) + width - 1;
    if last >= 0x600 && u32::from(port) <= 0x60F {
        return;
    }
    match width {
        1 => outb(port, value as u8),
        2 => outw(port, value as u16),
        _ => outl(port, value),
    }
}

/// Writes a random naturally-aligned value of random width at a random offset of the
/// MMIO page range `[base, base + pages * 4096)`.
fn garbage_mmio(rng: &mut Rng, base: u64, pages: u64) {
    let r = rng.next();
    let value = rng.next();
    let width = 1u64 << (r % 4);
    let addr = base + (r >> 8) % (pages * 4096) / width * width;
    match width {
        1 => mmio_write8(addr, value as u8),
        2 => mmio_write16(addr, value as u16),
        4 => mmio_write32(addr, value as u32),
        _ => mmio_write64(addr, value),
    }
}

/// About 4200 writes to ports and MMIO that nobody should be writing.
fn garbage(seed: u64) {
    // xorshift must not start at 0.
    let mut rng = Rng(seed | 1);
    for port in (0..=0xFFFFu16).step_by(16) {
        garbage_out(&mut rng, port);
    }
    for port in 0x3F8..=0x3FFu16 {
        garbage_out(&mut rng, port);
    }
    for _ in 0..64 {
        garbage_mmio(&mut rng, PLATFORM_MMIO, 1);
    }
    for _ in 0..64 {
        // 0xD000_1000 .. 0xD010_0000: the virtio slots and unassigned MMIO.
        garbage_mmio(&mut rng, PLATFORM_MMIO + 0x1000, 0xFF);
    }
    // Undo what could silence the console or keep interrupts coming: the timer
    // (port 0x604 got garbage) and COM1's LCR (DLAB), IER, MCR (loopback).
    set_timer_period_us(0);
    outb(0x3FB, 0x03); // LCR: 8N1, DLAB off
    outb(0x3F9, 0x00); // IER: no interrupts
    outb(0x3FC, 0x03); // MCR: DTR|RTS, loopback off
}
