//! `hello`: the reference FT-ready guest.
//!
//! Prints a greeting and the clock, waits for `ticks` timer ticks of `tick_us`
//! microseconds by halting, runs `work` iterations of a deterministic computation at
//! CPL3, prints its checksum and powers off with `exit`. It never reads the TSC or
//! RDRAND: every input it sees comes through a VM exit.
//!
//! Command line (all optional): `ticks=N` (5), `tick_us=P` (1000),
//! `work=W` (20000000), `exit=C` (0).
//!
//! Console output:
//! ```text
//! hello from the ftvm guest
//! clock: <ns>
//! ticks: <N> elapsed_ns: <ns>
//! checksum: 0x<16 hex digits>
//! bye (exit <C>)
//! ```

#![no_std]
#![no_main]

use core::hint::black_box;
use ftvm_guest::boot::Boot;
use ftvm_guest::platform::{clock_ns, halt, set_timer_period_us, ticks};
use ftvm_guest::println;

ftvm_guest::entry!(main);

fn main(boot: &Boot) -> u8 {
    let args = &boot.cmdline;
    let want_ticks: u64 = args.get_num("ticks", 5);
    let tick_us: u32 = args.get_num("tick_us", 1000);
    let work: u64 = args.get_num("work", 20_000_000);
    let exit: u8 = args.get_num("exit", 0);

    println!("hello from the ftvm guest");
    println!("clock: {}", clock_ns());

    set_timer_period_us(tick_us);
    let first = ticks();
    let start = clock_ns();
    // Each halt sleeps until an interrupt; with only the timer running that is a tick.
    while ticks() - first < want_ticks {
        halt();
    }
    let elapsed = clock_ns() - start;
    println!("ticks: {} elapsed_ns: {}", ticks() - first, elapsed);

    println!("checksum: {:#018x}", checksum(work));

    set_timer_period_us(0);
    println!("bye (exit {})", exit);
    exit
}

/// `iterations` rounds of xorshift64* folded into an FNV-1a style accumulator: the
/// result depends on every round, and `black_box` keeps the optimizer from computing
/// it at build time.
fn checksum(iterations: u64) -> u64 {
    let mut x: u64 = black_box(0x9E37_79B9_7F4A_7C15);
    let mut acc: u64 = 0xCBF2_9CE4_8422_2325;
    for _ in 0..black_box(iterations) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        acc = (acc ^ x.wrapping_mul(0x2545_F491_4F6C_DD1D)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    acc
}
