//! `hello`: the reference FT-ready guest.
//!
//! Prints a greeting and the clock, waits for `ticks` timer ticks of `tick_us`
//! microseconds by halting, runs `work` iterations of a deterministic computation at
//! CPL3, prints its checksum and powers off with `exit`. It never reads the TSC or
//! RDRAND: every input it sees comes through a VM exit.
//!
//! Command line (all optional): `ticks=N` (5), `tick_us=P` (1000),
//! `work=W` (20000000), `exit=C` (0), and for a guest whose RAM is in use: `touch_mb=M`
//! (0) writes every page of the `M` MiB above the image before the ticks, and
//! `dirty_pages=D` (0) rewrites `D` of those pages after each tick, round robin (a
//! working set being written, for clone benchmarks).
//!
//! Console output:
//! ```text
//! hello from the ftvm guest
//! clock: <ns>
//! touched: <M> MiB          (only with touch_mb)
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
    let touch_mb: u64 = args.get_num("touch_mb", 0);
    let dirty_pages: u64 = args.get_num("dirty_pages", 0);

    println!("hello from the ftvm guest");
    println!("clock: {}", clock_ns());
    let mut working_set = WorkingSet::touch(boot.info.mem_size, touch_mb);
    if touch_mb > 0 {
        println!("touched: {} MiB", touch_mb);
    }

    set_timer_period_us(tick_us);
    let first = ticks();
    let start = clock_ns();
    // Each halt sleeps until an interrupt; with only the timer running that is a tick.
    while ticks() - first < want_ticks {
        halt();
        working_set.rewrite(dirty_pages);
    }
    let elapsed = clock_ns() - start;
    println!("ticks: {} elapsed_ns: {}", ticks() - first, elapsed);

    println!("checksum: {:#018x}", checksum(work));

    set_timer_period_us(0);
    println!("bye (exit {})", exit);
    exit
}

/// RAM above the image that this guest writes to.
struct WorkingSet {
    /// First page's address (identity-mapped).
    start: u64,
    pages: u64,
    /// The next page [`WorkingSet::rewrite`] writes, and how many rounds it went.
    next: u64,
    round: u64,
}

/// RAM left alone at the top, below `mem_size`.
const TOP_RESERVE: u64 = 64 * 1024;
const PAGE: u64 = 4096;

extern "C" {
    /// End of the loaded image (`.bss` included), defined by `link.ld`.
    static __image_end: u8;
}

impl WorkingSet {
    /// Writes every page of `mib` MiB above the image; powers off with
    /// [`ftvm_guest::EXIT_BAD_CMDLINE`] if RAM has no room for them.
    fn touch(mem_size: u64, mib: u64) -> WorkingSet {
        let start = (core::ptr::addr_of!(__image_end) as u64).next_multiple_of(PAGE);
        let room = mem_size.saturating_sub(TOP_RESERVE).saturating_sub(start) / PAGE;
        let pages = mib.saturating_mul(1 << 20) / PAGE;
        if pages > room {
            println!(
                "touch_mb={mib}: only {} MiB of RAM above the image",
                (room * PAGE) >> 20
            );
            ftvm_guest::platform::power_off(ftvm_guest::EXIT_BAD_CMDLINE);
        }
        let mut set = WorkingSet {
            start,
            pages,
            next: 0,
            round: 0,
        };
        set.rewrite(pages);
        set
    }

    /// Writes the next `count` pages (a word each: the page is dirty and not zero).
    fn rewrite(&mut self, count: u64) {
        if self.pages == 0 {
            return;
        }
        for _ in 0..count {
            let at = self.start + self.next * PAGE;
            // SAFETY: `at` is a page-aligned address in [start, start + pages * PAGE),
            // RAM above the image and below the top reserve (checked in `touch`),
            // identity-mapped and used by nothing else in this guest.
            unsafe { core::ptr::write_volatile(at as *mut u64, self.round ^ at) };
            self.next += 1;
            if self.next == self.pages {
                self.next = 0;
                self.round += 1;
            }
        }
    }
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
