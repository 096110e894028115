//! vCPU set-up for 64-bit entry, and the ioctls kvm-ioctls does not wrap.
//!
//! All `unsafe` that touches KVM beyond kvm-ioctls lives here.

use crate::layout::{BOOT_GDT, BOOT_INFO, BOOT_INFO_MAGIC, BOOT_STACK_TOP, PAGE_TABLES};
use crate::memory::{BOOT_CODE_SELECTOR, BOOT_DATA_SELECTOR, BOOT_GDT_ENTRIES};
use kvm_bindings::{kvm_fpu, kvm_interrupt, kvm_regs, kvm_segment, KVMIO, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::ioctl::ioctl_with_ref;

mod raw {
    #![allow(missing_docs)]
    use super::{kvm_interrupt, KVMIO};
    vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use raw::KVM_INTERRUPT;

/// A KVM call on the vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Reading the supported CPUID failed.
    #[error("cannot get the supported CPUID")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// Setting CPUID failed.
    #[error("cannot set CPUID")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// Reading or writing special registers failed.
    #[error("cannot access the special registers")]
    Sregs(#[source] kvm_ioctls::Error),
    /// Writing general registers failed.
    #[error("cannot set the registers")]
    Regs(#[source] kvm_ioctls::Error),
    /// Writing FPU state failed.
    #[error("cannot set the FPU state")]
    Fpu(#[source] kvm_ioctls::Error),
    /// KVM_INTERRUPT failed.
    #[error("cannot inject vector {vector}")]
    Interrupt {
        /// The vector.
        vector: u8,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Sets CPUID, long mode, the boot segments, the entry registers and a clean FPU.
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetCpuid)?;
    for leaf in cpuid.as_mut_slice() {
        // An FT-ready guest must not use the hardware random number generators: their values
        // cannot be replayed. (Hosts that ignore KVM_SET_CPUID2 still show them.)
        match leaf.function {
            1 => leaf.ecx &= !(1 << 30),
            7 if leaf.index == 0 => leaf.ebx &= !(1 << 18),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;

    let mut sregs = vcpu.get_sregs().map_err(VcpuError::Sregs)?;
    let code = segment(BOOT_CODE_SELECTOR, BOOT_GDT_ENTRIES[1]);
    let data = segment(BOOT_DATA_SELECTOR, BOOT_GDT_ENTRIES[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT.0;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PAGE_TABLES.0;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    vcpu.set_sregs(&sregs).map_err(VcpuError::Sregs)?;

    let regs = kvm_regs {
        rip: entry.0,
        rsp: BOOT_STACK_TOP,
        rdi: BOOT_INFO.0,
        rsi: BOOT_INFO_MAGIC,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuError::Regs)?;

    let fpu = kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(VcpuError::Fpu)?;
    Ok(())
}

/// A KVM segment for `selector` described by the GDT `descriptor`.
fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flags = descriptor >> 40;
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: (flags & 0xF) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Queues `vector` for injection at the next entry (KVM_INTERRUPT; no in-kernel irqchip).
/// The caller must have checked that the vCPU is ready for injection.
pub fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), VcpuError> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `vcpu` is an open vCPU fd, KVM_INTERRUPT reads exactly one `kvm_interrupt`
    // from the pointer we pass, and `irq` outlives the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret < 0 {
        return Err(VcpuError::Interrupt {
            vector,
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// Whether the vCPU, stopped at an exit, can take an interrupt now (IF=1, no shadow).
pub fn ready_for_interrupt(vcpu: &mut VcpuFd) -> bool {
    let run = vcpu.get_kvm_run();
    run.ready_for_interrupt_injection != 0 && run.if_flag != 0
}

/// Whether RFLAGS.IF was set at the last exit.
pub fn interrupts_enabled(vcpu: &mut VcpuFd) -> bool {
    vcpu.get_kvm_run().if_flag != 0
}

/// Asks KVM for an exit as soon as the guest can take an interrupt (or stops asking).
pub fn request_interrupt_window(vcpu: &mut VcpuFd, request: bool) {
    vcpu.get_kvm_run().request_interrupt_window = u8::from(request);
}

/// The suberror of the last `KVM_EXIT_INTERNAL_ERROR`.
pub fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the
    // `internal` member is the one KVM filled in; it is plain old data.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// The hardware reason of the last `KVM_EXIT_FAIL_ENTRY` is returned by kvm-ioctls; this
/// is the RIP for reports, or 0 when the registers cannot be read.
pub fn current_rip(vcpu: &VcpuFd) -> u64 {
    vcpu.get_regs().map(|regs| regs.rip).unwrap_or(0)
}

/// The general registers, RIP and RFLAGS in one fixed order (digests and snapshots).
pub fn general_registers(regs: &kvm_regs) -> [u64; 18] {
    [
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rsp,
        regs.rbp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rip,
        regs.rflags,
    ]
}

/// The guest RIP and a hash of the registers that determine its execution: general
/// registers, flags, and the control, segment and descriptor-table registers.
pub fn state_digest(vcpu: &VcpuFd) -> Result<(u64, u64), VcpuError> {
    let regs = vcpu.get_regs().map_err(VcpuError::Regs)?;
    let sregs = vcpu.get_sregs().map_err(VcpuError::Sregs)?;
    let mut bytes = Vec::with_capacity(256);
    for value in general_registers(&regs).into_iter().chain([
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.gdt.base,
        sregs.idt.base,
        sregs.tr.base,
        sregs.fs.base,
        sregs.gs.base,
    ]) {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    for segment in [sregs.cs, sregs.ss, sregs.ds, sregs.es, sregs.tr] {
        bytes.extend_from_slice(&segment.selector.to_le_bytes());
    }
    let low = crc32fast::hash(&bytes);
    bytes.reverse();
    let high = crc32fast::hash(&bytes);
    Ok((regs.rip, (u64::from(high) << 32) | u64::from(low)))
}
