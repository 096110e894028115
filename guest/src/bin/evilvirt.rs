//! `evilvirt`: a guest that attacks its virtio devices on purpose.
//!
//! It sets a device up by hand through the virtio-mmio registers, then hands it something a
//! correct driver never would, and checks that the device answered with
//! `DEVICE_NEEDS_RESET` instead of crashing the VMM. Then it proves the machine still
//! works: a read of sector 0 through the block device (after resetting it if it was the
//! victim).
//!
//! Command line: `case=<attack>` and `dev=blk|net` (the victim; default blk). Attacks a
//! device must refuse with NEEDS_RESET: `chain-loop`, `wild-address`, `huge-length`,
//! `bad-queue-size`, `rings-outside-ram`, `readonly-status`, `dma-onto-rings` (a disk read
//! onto the avail ring), `endless-read` (reads laid out on the disk so that each one
//! offers the next, for ever, if the device writes onto its rings; needs a disk of at
//! least 33 MiB), `indirect`, `head-reuse` (a write offered twice at once: refused where writes are
//! held, as on an FT primary),
//! `rx-onto-rings` (`dev=net`: a receive buffer over the avail ring; needs a frame to
//! arrive within 20 s), `reset-loop` (`rounds=N` chain loops, resetting the device in
//! between). Floods the VMM must absorb without growing: `console-flood` (`bytes=N` of
//! console output) and `write-flood` (`rounds=R` of `chains=C` 16 MiB disk writes offered
//! at once, all from one buffer; needs a disk of at least 17 MiB). Console output:
//! ```text
//! evilvirt: <case> on <dev>
//! status after attack: 0x<status> needs_reset=<yes|no>     (attacks)
//! flood done: <what>                                        (floods)
//! blk read: status=<s> data=<first 8 bytes of sector 0, as text>
//! ```
//! Exit 0 when the attack was refused with NEEDS_RESET (or the flood completed) and the
//! block read worked, else 1.

#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};
use ftvm_guest::boot::{usage_error, Boot};
use ftvm_guest::io::{mmio_read32, mmio_write32};
use ftvm_guest::platform::clock_ns;
use ftvm_guest::{print, println};

ftvm_guest::entry!(main);

const VIRTIO_BASE: u64 = 0xD000_1000;
const NET_SLOT: u64 = 0;
const BLK_SLOT: u64 = 1;

const STATUS: u64 = 0x70;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_DRIVER_LOW: u64 = 0x90;
const QUEUE_DEVICE_LOW: u64 = 0xA0;
const NEEDS_RESET: u32 = 0x40;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const QUEUE_SIZE: u32 = 16;
/// The size of the queue set up last (what `submit` wraps the avail ring at).
static QUEUE_LEN: AtomicU32 = AtomicU32::new(QUEUE_SIZE);
/// The block device's queue size, used by the write flood for as many chains as fit.
const BLK_QUEUE_MAX: u32 = 256;
/// Where the write flood's one data buffer starts (8 MiB, above this guest's image).
const FLOOD_BUFFER: u64 = 0x80_0000;
/// Bytes of data per flood write: a chain stays under the device's 16 MiB limit.
const FLOOD_WRITE: u32 = (16 << 20) - 4096;
/// The first sector the flood writes (sector 0 keeps its signature for the final read).
const FLOOD_SECTOR: u64 = 8;
/// Sectors of the endless read's chain of sector images: one per value of the avail
/// ring's 16-bit index, so the chain closes on itself.
const ENDLESS_SECTORS: u64 = 1 << 16;
/// Where, in the avail ring's page, the endless read keeps its request header.
const ENDLESS_HEADER: usize = 256;

/// One page of guest memory, identity-mapped, for rings and buffers.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut DESCS: Page = Page([0; 4096]);
static mut AVAIL: Page = Page([0; 4096]);
static mut USED: Page = Page([0; 4096]);
static mut BUFFERS: Page = Page([0; 4096]);

fn page_addr(page: *mut Page) -> u64 {
    page as u64
}

fn reg(slot: u64, offset: u64) -> u64 {
    VIRTIO_BASE + slot * 0x1000 + offset
}

/// Writes `value` at byte `offset` of `page`.
fn poke<T>(page: *mut Page, offset: usize, value: T) {
    // SAFETY: callers pass offsets that keep the write inside the 4 KiB page, the page is a
    // static only this single-threaded guest touches, and write_volatile tolerates any
    // alignment of T that the offsets below respect (they are naturally aligned).
    unsafe { write_volatile((page as *mut u8).add(offset) as *mut T, value) }
}

fn peek<T: Copy>(page: *mut Page, offset: usize) -> T {
    // SAFETY: as in `poke`: inside the page, naturally aligned, single-threaded.
    unsafe { read_volatile((page as *const u8).add(offset) as *const T) }
}

fn descriptor(index: usize, addr: u64, len: u32, flags: u16, next: u16) {
    let descs = addr_of_mut!(DESCS);
    poke(descs, index * 16, addr);
    poke(descs, index * 16 + 8, len);
    poke(descs, index * 16 + 12, flags);
    poke(descs, index * 16 + 14, next);
}

/// Resets the device in `slot`, negotiates VERSION_1 only, and sets up queue `queue` with
/// rings in the static pages (or at `desc_table` if given). Returns false if the device
/// refused.
fn setup(slot: u64, queue: u32, size: u32, desc_table: Option<u64>) -> bool {
    mmio_write32(reg(slot, STATUS), 0);
    mmio_write32(reg(slot, STATUS), 1);
    mmio_write32(reg(slot, STATUS), 1 | 2);
    mmio_write32(reg(slot, DRIVER_FEATURES_SEL), 1);
    mmio_write32(reg(slot, DRIVER_FEATURES), 1);
    mmio_write32(reg(slot, DRIVER_FEATURES_SEL), 0);
    mmio_write32(reg(slot, DRIVER_FEATURES), 0);
    mmio_write32(reg(slot, STATUS), 1 | 2 | 8);
    if mmio_read32(reg(slot, STATUS)) & 8 == 0 {
        return false;
    }
    // Clean rings for every attempt.
    for page in [addr_of_mut!(DESCS), addr_of_mut!(AVAIL), addr_of_mut!(USED)] {
        for offset in (0..4096).step_by(8) {
            poke(page, offset, 0u64);
        }
    }
    mmio_write32(reg(slot, QUEUE_SEL), queue);
    mmio_write32(reg(slot, QUEUE_NUM), size);
    QUEUE_LEN.store(size, Ordering::Relaxed);
    let desc = desc_table.unwrap_or(page_addr(addr_of_mut!(DESCS)));
    for (offset, addr) in [
        (QUEUE_DESC_LOW, desc),
        (QUEUE_DRIVER_LOW, page_addr(addr_of_mut!(AVAIL))),
        (QUEUE_DEVICE_LOW, page_addr(addr_of_mut!(USED))),
    ] {
        mmio_write32(reg(slot, offset), addr as u32);
        mmio_write32(reg(slot, offset + 4), (addr >> 32) as u32);
    }
    mmio_write32(reg(slot, QUEUE_READY), 1);
    mmio_write32(reg(slot, STATUS), 1 | 2 | 8 | 4);
    true
}

/// Offers the chain at `head` on `queue` and notifies the device.
fn submit(slot: u64, queue: u32, head: u16) {
    offer(&[head]);
    mmio_write32(reg(slot, QUEUE_NOTIFY), queue);
}

/// Puts `heads` on the avail ring of the queue set up last, without notifying.
fn offer(heads: &[u16]) {
    let avail = addr_of_mut!(AVAIL);
    let size = QUEUE_LEN.load(Ordering::Relaxed) as u16;
    let mut idx: u16 = peek(avail, 2);
    for &head in heads {
        poke(avail, 4 + 2 * usize::from(idx % size), head);
        idx = idx.wrapping_add(1);
    }
    poke(avail, 2, idx);
}

/// Waits up to `seconds` (guest clock) for `done`; whether it came.
fn wait_until(seconds: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = clock_ns() + seconds * 1_000_000_000;
    while clock_ns() < deadline {
        if done() {
            return true;
        }
    }
    done()
}

/// One block request with its data at `addr` (`len` bytes) and the header and status in
/// the buffer page; waits for it to complete. Returns the status byte (0xFE: no answer).
fn blk_request(kind: u32, sector: u64, addr: u64, len: u32) -> u8 {
    let buffers = addr_of_mut!(BUFFERS);
    let base = page_addr(buffers);
    poke(buffers, 0, kind);
    poke(buffers, 4, 0u32);
    poke(buffers, 8, sector);
    poke(buffers, 1024, 0xFFu8);
    let data_flags = if kind == 0 { F_NEXT | F_WRITE } else { F_NEXT };
    descriptor(0, base, 16, F_NEXT, 1);
    descriptor(1, addr, len, data_flags, 2);
    descriptor(2, base + 1024, 1, F_WRITE, 0);
    let used = addr_of_mut!(USED);
    let before: u16 = peek(used, 2);
    submit(BLK_SLOT, 0, 0);
    if !wait_until(30, || peek::<u16>(used, 2) != before) {
        return 0xFE;
    }
    peek(buffers, 1024)
}

/// Lays out the endless read on the disk: sector `FLOOD_SECTOR + i` holds the image of
/// the avail page a read of it leaves behind, offering one more chain (index `i + 2`)
/// whose header, in the same page, asks for sector `i + 1`. Once started, each read
/// offers the next, for ever, unless the device refuses to write onto its rings.
fn lay_out_endless_read() -> bool {
    if !setup(BLK_SLOT, 0, QUEUE_SIZE, None) {
        return false;
    }
    let images = FLOOD_BUFFER as *mut u8;
    for i in 0..ENDLESS_SECTORS {
        // SAFETY: RAM from FLOOD_BUFFER on (8 MiB up, 32 MiB here) is identity-mapped and
        // used by nothing else in this guest (its image and stack end below 8 MiB);
        // `main` checked that the machine has the RAM.
        unsafe {
            let image = images.add(512 * i as usize);
            core::ptr::write_bytes(image, 0, 512);
            write_volatile(image.add(2) as *mut u16, (i as u16).wrapping_add(2));
            let header = image.add(ENDLESS_HEADER);
            write_volatile(header as *mut u32, 0); // VIRTIO_BLK_T_IN
            let next = FLOOD_SECTOR + (i + 1) % ENDLESS_SECTORS;
            write_volatile(header.add(8) as *mut u64, next);
        }
    }
    const CHUNK: u64 = 8 << 20;
    let total = 512 * ENDLESS_SECTORS;
    (0..total / CHUNK).all(|chunk| {
        let sector = FLOOD_SECTOR + chunk * CHUNK / 512;
        blk_request(1, sector, FLOOD_BUFFER + chunk * CHUNK, CHUNK as u32) == 0
    })
}

/// `bytes` of console output in 64-byte lines.
fn console_flood(bytes: u64) -> bool {
    const LINE: &str = "evilvirt console flood ................................... line\n";
    let mut written = 0;
    while written < bytes {
        print!("{}", LINE);
        written += LINE.len() as u64;
    }
    println!("flood done: {} console bytes", written);
    true
}

/// `rounds` times, `chains` 16 MiB writes offered with one notify, all reading one buffer;
/// waits for each round to complete (for an FT primary: until its backup acknowledged).
fn write_flood(rounds: u32, chains: u32) -> bool {
    let chains = chains.clamp(1, BLK_QUEUE_MAX / 3);
    if !setup(BLK_SLOT, 0, BLK_QUEUE_MAX, None) {
        println!("flood failed: the block device refused the set-up");
        return false;
    }
    let buffers = addr_of_mut!(BUFFERS);
    let base = page_addr(buffers);
    let mut heads = [0u16; (BLK_QUEUE_MAX / 3) as usize];
    for (chain, head) in heads.iter_mut().enumerate().take(chains as usize) {
        let header = 16 * chain;
        poke(buffers, header, 1u32); // VIRTIO_BLK_T_OUT
        poke(buffers, header + 4, 0u32);
        poke(buffers, header + 8, FLOOD_SECTOR);
        let status = 2048 + chain;
        let first = (3 * chain) as u16;
        descriptor(first.into(), base + header as u64, 16, F_NEXT, first + 1);
        descriptor(
            usize::from(first + 1),
            FLOOD_BUFFER,
            FLOOD_WRITE,
            F_NEXT,
            first + 2,
        );
        descriptor(usize::from(first + 2), base + status as u64, 1, F_WRITE, 0);
        *head = first;
    }
    let used = addr_of_mut!(USED);
    let mut expected: u16 = 0;
    for round in 0..rounds {
        for chain in 0..chains as usize {
            poke(buffers, 2048 + chain, 0xFFu8);
        }
        offer(&heads[..chains as usize]);
        mmio_write32(reg(BLK_SLOT, QUEUE_NOTIFY), 0);
        expected = expected.wrapping_add(chains as u16);
        if !wait_until(60, || peek::<u16>(used, 2) == expected) {
            println!("flood failed: round {} did not complete", round);
            return false;
        }
        for chain in 0..chains as usize {
            let status: u8 = peek(buffers, 2048 + chain);
            if status != 0 {
                println!(
                    "flood failed: round {} write {} status {}",
                    round, chain, status
                );
                return false;
            }
        }
    }
    println!(
        "flood done: {} rounds of {} writes of {} bytes",
        rounds, chains, FLOOD_WRITE
    );
    true
}

/// Reads sector 0 of the disk; returns the status byte and the first 8 bytes.
fn read_sector_zero() -> (u8, [u8; 8]) {
    if !setup(BLK_SLOT, 0, QUEUE_SIZE, None) {
        return (0xFF, [0; 8]);
    }
    let buffers = addr_of_mut!(BUFFERS);
    let base = page_addr(buffers);
    poke(buffers, 0, 0u32); // VIRTIO_BLK_T_IN
    poke(buffers, 4, 0u32);
    poke(buffers, 8, 0u64); // sector 0
    poke(buffers, 1024, 0xFFu8);
    descriptor(0, base, 16, F_NEXT, 1);
    descriptor(1, base + 512, 512, F_NEXT | F_WRITE, 2);
    descriptor(2, base + 1024, 1, F_WRITE, 0);
    submit(BLK_SLOT, 0, 0);
    let used_idx: u16 = peek(addr_of_mut!(USED), 2);
    let mut data = [0u8; 8];
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = peek(buffers, 512 + index);
    }
    let status = if used_idx == 1 {
        peek(buffers, 1024)
    } else {
        0xFE
    };
    (status, data)
}

fn main(boot: &Boot) -> u8 {
    let case = boot.cmdline.get("case").unwrap_or("");
    let dev = boot.cmdline.get("dev").unwrap_or("blk");
    let (slot, queue) = match dev {
        "blk" => (BLK_SLOT, 0),
        "net" if case == "rx-onto-rings" => (NET_SLOT, 0),
        // The transmit queue: its chains are device-readable, like a block write.
        "net" => (NET_SLOT, 1),
        _ => usage_error(format_args!("dev must be blk or net, not {:?}", dev)),
    };
    println!("evilvirt: {} on {}", case, dev);
    let needs_ram = FLOOD_BUFFER + 512 * ENDLESS_SECTORS;
    if matches!(case, "endless-read" | "write-flood") && boot.info.mem_size < needs_ram {
        usage_error(format_args!("{} needs {} bytes of RAM", case, needs_ram));
    }
    if case == "endless-read" && !lay_out_endless_read() {
        println!("could not lay the endless read out on the disk");
        return 1;
    }
    let flooded = match case {
        "console-flood" => Some(console_flood(boot.cmdline.get_num("bytes", 1u64 << 20))),
        "write-flood" => Some(write_flood(
            boot.cmdline.get_num("rounds", 4),
            boot.cmdline.get_num("chains", 16),
        )),
        _ => None,
    };
    if let Some(flooded) = flooded {
        let (blk_status, data) = read_sector_zero();
        let text = core::str::from_utf8(&data).unwrap_or("<binary>");
        println!("blk read: status={} data={}", blk_status, text);
        return if flooded && blk_status == 0 { 0 } else { 1 };
    }
    let base = page_addr(addr_of_mut!(BUFFERS));
    let ready = match case {
        "bad-queue-size" => setup(slot, queue, 3, None),
        "rings-outside-ram" => setup(slot, queue, QUEUE_SIZE, Some(0xC000_0000)),
        _ => setup(slot, queue, QUEUE_SIZE, None),
    };
    if !ready {
        println!("device refused the set-up");
        return 1;
    }
    match case {
        "chain-loop" => {
            descriptor(0, base, 16, F_NEXT, 1);
            descriptor(1, base + 16, 16, F_NEXT, 0);
            submit(slot, queue, 0);
        }
        "wild-address" => {
            descriptor(0, 0x40_0000_0000, 16, F_NEXT, 1);
            descriptor(1, base, 1, F_WRITE, 0);
            submit(slot, queue, 0);
        }
        "huge-length" => {
            descriptor(0, 0x20_0000, 0xFFFF_F000, F_NEXT, 1);
            descriptor(1, base, 1, F_WRITE, 0);
            submit(slot, queue, 0);
        }
        "readonly-status" => {
            descriptor(0, base, 16, F_NEXT, 1);
            descriptor(1, base + 512, 1, 0, 0);
            submit(slot, queue, 0);
        }
        // A block read whose data lands on the available ring: each read could rewrite
        // the ring's index and the next request, and keep the device busy for ever.
        "dma-onto-rings" => {
            poke(addr_of_mut!(BUFFERS), 0, 0u32); // VIRTIO_BLK_T_IN
            poke(addr_of_mut!(BUFFERS), 8, 0u64);
            descriptor(0, base, 16, F_NEXT, 1);
            descriptor(1, page_addr(addr_of_mut!(AVAIL)), 512, F_NEXT | F_WRITE, 2);
            descriptor(2, base + 1024, 1, F_WRITE, 0);
            submit(slot, queue, 0);
        }
        // The endless exit: a read onto the avail ring and the next request's header.
        "endless-read" => {
            let avail = addr_of_mut!(AVAIL);
            poke(avail, ENDLESS_HEADER, 0u32); // VIRTIO_BLK_T_IN
            poke(avail, ENDLESS_HEADER + 8, FLOOD_SECTOR);
            let avail_page = page_addr(avail);
            descriptor(0, avail_page + ENDLESS_HEADER as u64, 16, F_NEXT, 1);
            descriptor(1, avail_page, 512, F_NEXT | F_WRITE, 2);
            descriptor(2, base + 1024, 1, F_WRITE, 0);
            submit(slot, queue, 0);
        }
        // An indirect table, a feature the device never offered.
        "indirect" => {
            descriptor(0, base + 2048, 32, F_INDIRECT, 0);
            submit(slot, queue, 0);
        }
        // One write offered twice in one notification: where writes complete later (an
        // FT primary holds them for its backup) the second would reuse a request still in
        // flight. Alone, writes complete at once and both are served.
        "head-reuse" => {
            poke(addr_of_mut!(BUFFERS), 0, 1u32); // VIRTIO_BLK_T_OUT
            poke(addr_of_mut!(BUFFERS), 8, 1u64);
            descriptor(0, base, 16, F_NEXT, 1);
            descriptor(1, base + 512, 512, F_NEXT, 2);
            descriptor(2, base + 1024, 1, F_WRITE, 0);
            offer(&[0, 0]);
            mmio_write32(reg(slot, QUEUE_NOTIFY), queue);
        }
        // A receive buffer over the avail ring: a frame would rewrite the ring.
        "rx-onto-rings" => {
            descriptor(0, page_addr(addr_of_mut!(AVAIL)), 1600, F_WRITE, 0);
            submit(slot, queue, 0);
            if !wait_until(20, || mmio_read32(reg(slot, STATUS)) & NEEDS_RESET != 0) {
                println!("no frame arrived within 20 s");
            }
        }
        // Break the device, reset it, again and again: each break is one report the VMM
        // could log.
        "reset-loop" => {
            let rounds: u32 = boot.cmdline.get_num("rounds", 100);
            let mut refused = 0;
            for round in 0..rounds {
                if round > 0 && !setup(slot, queue, QUEUE_SIZE, None) {
                    break;
                }
                descriptor(0, base, 16, F_NEXT, 1);
                descriptor(1, base + 16, 16, F_NEXT, 0);
                submit(slot, queue, 0);
                if mmio_read32(reg(slot, STATUS)) & NEEDS_RESET != 0 {
                    refused += 1;
                }
            }
            println!("reset loop: {} of {} breaks refused", refused, rounds);
        }
        "bad-queue-size" | "rings-outside-ram" => {}
        _ => usage_error(format_args!("unknown case {:?}", case)),
    }
    let status = mmio_read32(reg(slot, STATUS));
    let refused = status & NEEDS_RESET != 0;
    println!(
        "status after attack: {:#x} needs_reset={}",
        status,
        if refused { "yes" } else { "no" }
    );
    let (blk_status, data) = read_sector_zero();
    let text = core::str::from_utf8(&data).unwrap_or("<binary>");
    println!("blk read: status={} data={}", blk_status, text);
    if refused && blk_status == 0 {
        0
    } else {
        1
    }
}
