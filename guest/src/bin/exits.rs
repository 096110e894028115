//! `exits`: a VM-exit benchmark guest.
//!
//! Command line: `op=pio|mmio|hlt|idle` (required) and `n=N` (default 10000).
//! - `pio`: N 32-bit `out` to the scratch port `0x610`;
//! - `mmio`: N 32-bit reads of the MMIO scratch register `0xD000_0010`;
//! - `hlt`: timer period 1 us, then N halts (each woken by a tick that is already due);
//! - `idle`: N `SYS_NOP` system calls (an `int3` round trip through CPL0, no exit).
//!
//! Prints exactly one line, `op=<op> n=<N> ns=<ns>`, where `ns` is the platform clock
//! difference around the loop, and powers off with 0.

#![no_std]
#![no_main]

use ftvm_guest::boot::{usage_error, Boot};
use ftvm_guest::io::{mmio_read32, outl};
use ftvm_guest::platform::{clock_ns, halt, set_timer_period_us, MMIO_SCRATCH, PORT_SCRATCH};
use ftvm_guest::println;
use ftvm_guest::sys::{syscall, SYS_NOP};

ftvm_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
    let args = &boot.cmdline;
    let n: u64 = args.get_num("n", 10_000);
    let op = args.get("op").unwrap_or("");
    let loop_fn: fn(u64) = match op {
        "pio" => pio,
        "mmio" => mmio,
        "hlt" => {
            set_timer_period_us(1);
            hlt
        }
        "idle" => idle,
        _ => usage_error(format_args!(
            "op must be pio, mmio, hlt or idle, not {:?}",
            op
        )),
    };
    let start = clock_ns();
    loop_fn(n);
    let ns = clock_ns() - start;
    set_timer_period_us(0);
    println!("op={} n={} ns={}", op, n, ns);
    0
}

fn pio(n: u64) {
    for i in 0..n {
        outl(PORT_SCRATCH, i as u32);
    }
}

fn mmio(n: u64) {
    for _ in 0..n {
        mmio_read32(MMIO_SCRATCH);
    }
}

fn hlt(n: u64) {
    for _ in 0..n {
        halt();
    }
}

fn idle(n: u64) {
    for _ in 0..n {
        syscall(SYS_NOP);
    }
}
