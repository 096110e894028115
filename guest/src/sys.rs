//! System calls into the CPL0 stub.
//!
//! The entry is `int3` (vector 3, a DPL3 gate): on this KVM (PVM) `int N` from CPL3
//! raises #UD for every other `N`, and `syscall` never reaches CPL0. The number goes
//! in `RAX`, the result comes back in `RAX`; every other register and RFLAGS are
//! preserved. See `cpl0.rs` for the stub.

use core::arch::asm;

/// Sleep until the next interrupt has been handled (`sti; hlt; cli`); returns 0.
pub const SYS_HALT: u64 = 0;
/// Return 0 at once; a round trip through CPL0 without a VM exit.
pub const SYS_NOP: u64 = 1;
/// Load an empty IDT and execute `ud2`: a triple fault (for VMM tests).
pub const SYS_TRIPLE_FAULT: u64 = 0xdead;
/// `cli; hlt` forever: a hang the VMM must report (for VMM tests).
pub const SYS_HANG: u64 = 0xdeaf;

/// Value returned for an unknown system-call number.
pub const SYS_UNKNOWN: u64 = u64::MAX;

/// Makes system call `nr` and returns `RAX`.
#[inline(always)]
pub fn syscall(nr: u64) -> u64 {
    let ret: u64;
    // SAFETY: the int3 stub changes only RAX (and restores RFLAGS with iretq). It runs
    // on the kernel stack (TSS.RSP0), so the user stack and its red zone are untouched.
    // Memory may change meanwhile (interrupt handlers run during SYS_HALT), hence no
    // `nomem`.
    unsafe { asm!("int3", inlateout("rax") nr => ret, options(nostack, preserves_flags)) };
    ret
}
