//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`, which the compiler calls and
//! which no libc provides here.
//!
//! Simple byte loops. The accesses are volatile so that LLVM cannot recognise the loop
//! as a `memcpy` idiom and compile it into a call to itself. The guests copy little
//! data, so speed does not matter.

use core::ptr::{read_volatile, write_volatile};

/// Copies `n` bytes from `src` to `dest`; the regions must not overlap.
///
/// # Safety
/// `src` must be valid for `n` byte reads and `dest` for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller guarantees both ranges are valid for n bytes.
        unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
        i += 1;
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the regions may overlap.
///
/// # Safety
/// `src` must be valid for `n` byte reads and `dest` for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) {
        // Forward: every source byte is read before a write can reach it.
        let mut i = 0;
        while i < n {
            // SAFETY: i < n; the caller guarantees both ranges are valid for n bytes.
            unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
            i += 1;
        }
    } else {
        // Backward, for a destination above an overlapping source.
        let mut i = n;
        while i > 0 {
            i -= 1;
            // SAFETY: i < n; as above.
            unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
        }
    }
    dest
}

/// Sets `n` bytes at `dest` to the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n; the caller guarantees dest is valid for n bytes. The C ABI
        // passes the byte as an int: truncation is what memset specifies.
        unsafe { write_volatile(dest.add(i), c as u8) };
        i += 1;
    }
    dest
}

/// Compares `n` bytes; returns the difference of the first unequal pair, or 0.
///
/// # Safety
/// `a` and `b` must be valid for `n` byte reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n; the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// Compares `n` bytes; returns 0 if equal, non-zero otherwise.
///
/// # Safety
/// `a` and `b` must be valid for `n` byte reads.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
