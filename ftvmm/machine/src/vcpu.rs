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

/// The CPUID the guest sees: what KVM supports on this host, without the hardware random
/// number generators (an FT-ready guest must not use them: their values cannot be
/// replayed; hosts that ignore KVM_SET_CPUID2 still show them), and with the APIC IDs of
/// its one vCPU (0) where KVM reports those of the host CPU the query ran on: otherwise
/// the primary's and the backup's guests could read different values.
fn guest_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetCpuid)?;
    for leaf in cpuid.as_mut_slice() {
        match leaf.function {
            1 => {
                leaf.ecx &= !(1 << 30);
                // EBX[31:24]: the initial APIC ID.
                leaf.ebx &= 0x00ff_ffff;
            }
            7 if leaf.index == 0 => leaf.ebx &= !(1 << 18),
            // Extended topology: EDX is the x2APIC ID.
            0xb | 0x1f => leaf.edx = 0,
            // AMD: extended APIC ID, compute unit and node IDs.
            0x8000_001e => {
                leaf.eax = 0;
                leaf.ebx &= !0xff;
                leaf.ecx &= !0xff;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The CPU a guest of this host sees, for telling whether two hosts can run the two
/// replicas of one VM: a pair (or a clone) across different CPUs could diverge or fail
/// late, so the replicas compare [`CpuIdentity::hash`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuIdentity {
    /// CRC32 of every CPUID leaf the guest sees (function, index, flags, registers).
    pub hash: u32,
    /// The vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// Display family and model (leaf 1).
    pub family: u32,
    /// Display model.
    pub model: u32,
    /// The XSAVE area size for the features the guest may enable (leaf 0xD, ECX).
    pub xsave_bytes: u32,
}

impl CpuIdentity {
    /// Reads this host's guest CPUID through `kvm`.
    pub fn of(kvm: &Kvm) -> Result<CpuIdentity, VcpuError> {
        let cpuid = guest_cpuid(kvm)?;
        let mut leaves: Vec<_> = cpuid.as_slice().to_vec();
        leaves.sort_by_key(|leaf| (leaf.function, leaf.index));
        let mut hasher = crc32fast::Hasher::new();
        for leaf in &leaves {
            for word in [
                leaf.function,
                leaf.index,
                leaf.flags,
                leaf.eax,
                leaf.ebx,
                leaf.ecx,
                leaf.edx,
            ] {
                hasher.update(&word.to_le_bytes());
            }
        }
        let leaf = |function: u32, index: u32| {
            leaves
                .iter()
                .find(|leaf| leaf.function == function && leaf.index == index)
        };
        let vendor = leaf(0, 0)
            .map(|leaf| {
                let bytes: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
                    .iter()
                    .flat_map(|word| word.to_le_bytes())
                    .collect();
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches('\0')
                    .to_owned()
            })
            .unwrap_or_default();
        let (family, model) = leaf(1, 0).map_or((0, 0), |leaf| {
            let base_family = (leaf.eax >> 8) & 0xf;
            let base_model = (leaf.eax >> 4) & 0xf;
            let family = if base_family == 0xf {
                base_family + ((leaf.eax >> 20) & 0xff)
            } else {
                base_family
            };
            let model = if base_family == 0x6 || base_family == 0xf {
                base_model | (((leaf.eax >> 16) & 0xf) << 4)
            } else {
                base_model
            };
            (family, model)
        });
        let xsave_bytes = leaf(0xd, 0).map_or(0, |leaf| leaf.ecx);
        Ok(CpuIdentity {
            hash: hasher.finalize(),
            vendor,
            family,
            model,
            xsave_bytes,
        })
    }

    /// The machine word the log header and the clone stream carry: `cpu=<8 hex digits>`.
    pub fn word(&self) -> String {
        format!("cpu={:08x}", self.hash)
    }
}

impl std::fmt::Display for CpuIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cpu={:08x} vendor={} family={} model={} xsave={}",
            self.hash, self.vendor, self.family, self.model, self.xsave_bytes
        )
    }
}

/// Sets CPUID, long mode, the boot segments, the entry registers and a clean FPU.
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), VcpuError> {
    let cpuid = guest_cpuid(kvm)?;
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
