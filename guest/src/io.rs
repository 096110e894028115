//! Port I/O and MMIO, usable at CPL3.
//!
//! Port I/O works at CPL3 because the TSS carries an all-zero I/O permission bitmap;
//! MMIO works because the VMM's page tables map the low 4 GiB user-accessible.
//! Every access is one VM exit (about 100 us on the development host), so keep them
//! out of hot loops unless exits are the point.
//!
//! These functions are safe: the machine has no device whose port or MMIO access
//! could break the guest's memory safety (no DMA engine today), and the MMIO functions
//! only accept addresses in [`MMIO_HOLE`], where RAM never is (RAM is at most 3 GiB).
//! They panic on an address outside it or not naturally aligned.

use core::arch::asm;
use core::ops::Range;

/// Guest-physical range that never holds RAM (`--mem` is at most 3 GiB): the platform
/// page and the virtio-mmio slots live here. Identity-mapped and user-accessible.
pub const MMIO_HOLE: Range<u64> = 0xC000_0000..0x1_0000_0000;

/// Panics unless `[addr, addr + size)` is naturally aligned and inside [`MMIO_HOLE`].
#[inline(always)]
fn check_mmio(addr: u64, size: u64) {
    assert!(
        addr.is_multiple_of(size) && MMIO_HOLE.contains(&addr) && size <= MMIO_HOLE.end - addr,
        "bad MMIO address"
    );
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no guest memory; port I/O is allowed at CPL3 by the TSS
    // I/O bitmap, and no port of this machine can break memory safety.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 16-bit word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 32-bit word to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only writes the named register; see `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads a 32-bit word from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads a 64-bit MMIO register with one access. `addr` must be 8-byte aligned.
#[inline(always)]
pub fn mmio_read64(addr: u64) -> u64 {
    check_mmio(addr, 8);
    // SAFETY: checked above: aligned, identity-mapped, and not RAM, so the volatile
    // read does not touch Rust-visible memory.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Reads a 32-bit MMIO register with one access. `addr` must be 4-byte aligned.
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    check_mmio(addr, 4);
    // SAFETY: as for `mmio_read64`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a byte to MMIO with one access.
#[inline(always)]
pub fn mmio_write8(addr: u64, value: u8) {
    check_mmio(addr, 1);
    // SAFETY: checked above: identity-mapped and not RAM, so the write does not alias
    // Rust-visible memory.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Writes a 16-bit word to MMIO with one access. `addr` must be 2-byte aligned.
#[inline(always)]
pub fn mmio_write16(addr: u64, value: u16) {
    check_mmio(addr, 2);
    // SAFETY: as for `mmio_write8`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// Writes a 32-bit word to MMIO with one access. `addr` must be 4-byte aligned.
#[inline(always)]
pub fn mmio_write32(addr: u64, value: u32) {
    check_mmio(addr, 4);
    // SAFETY: as for `mmio_write8`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Writes a 64-bit word to MMIO with one access. `addr` must be 8-byte aligned.
#[inline(always)]
pub fn mmio_write64(addr: u64, value: u64) {
    check_mmio(addr, 8);
    // SAFETY: as for `mmio_write8`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}
