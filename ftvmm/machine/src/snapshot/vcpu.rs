//! The vCPU's state: registers, special registers, FPU and XSAVE area, XCRs, the MSRs
//! that matter, debug registers, multiprocessing state and pending events (an interrupt
//! queued with KVM_INTERRUPT but not delivered yet is one of them).
//!
//! Save only when the vCPU is stopped between exits with [`complete_pending_exit`] done:
//! KVM finishes a port or MMIO read (writes the value into the register) on the next
//! KVM_RUN, so the registers are only consistent after that.

use super::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// The MSRs a snapshot carries, when KVM reports them: SYSENTER, PAT, the SYSCALL MSRs,
/// FS/GS bases and TSC_AUX. Not the TSC itself: an FT-ready guest never reads it, and a
/// restored TSC would make the section differ from one save to the next. Not EFER: it is
/// in the special registers. Not KVM's paravirtual MSRs (some are refused by KVM_SET_MSRS
/// on this host, and the guest does not use them).
pub const SAVED_MSRS: [u32; 12] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0100, // FS_BASE
    0xC000_0101, // GS_BASE
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX
];

/// Size of KVM's legacy XSAVE area.
const XSAVE_BYTES: usize = 4096;
/// Event flags KVM_SET_VCPU_EVENTS knows (NMI pending, SIPI, shadow, SMM, payload,
/// triple fault).
const KNOWN_EVENT_FLAGS: u32 = 0x3F;

/// Lets KVM finish the exit the vCPU stopped at (the register write of a port or MMIO
/// read, the instruction skip), without running guest code: KVM_RUN with `immediate_exit`
/// returns EINTR once the exit is complete. Invisible to the guest and not an exit.
pub fn complete_pending_exit(vcpu: &mut VcpuFd) -> Result<(), SnapshotError> {
    vcpu.set_kvm_immediate_exit(1);
    let result = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match result {
        Err(err) if err.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(SnapshotError::Kvm {
            what: "complete the pending exit (KVM_RUN with immediate_exit)",
            source,
        }),
        // KVM checks immediate_exit before entering the guest: no exit can come back.
        Ok(()) => Err(SnapshotError::Invalid {
            section: "VCPU".into(),
            what: "KVM_RUN with immediate_exit entered the guest".into(),
        }),
    }
}

/// Everything the VCPU section holds, decoded.
#[derive(Clone)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xsave: Option<Box<[u32; XSAVE_BYTES / 4]>>,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<(u32, u64)>,
    debugregs: kvm_debugregs,
    mp_state: u32,
    events: kvm_vcpu_events,
}

/// The vCPU of a machine, as a [`Snapshot`] component.
pub struct KvmVcpu<'a> {
    fd: &'a VcpuFd,
    /// Of [`SAVED_MSRS`], those KVM reports as saveable on this host.
    msrs: Vec<u32>,
    xsave: bool,
    xcrs: bool,
}

impl<'a> KvmVcpu<'a> {
    /// The vCPU `fd` of a VM made by `kvm`.
    pub fn new(kvm: &Kvm, fd: &'a VcpuFd) -> Result<Self, SnapshotError> {
        let reported = kvm
            .get_msr_index_list()
            .map_err(|source| SnapshotError::Kvm {
                what: "get the MSR index list",
                source,
            })?;
        let reported = reported.as_slice();
        Ok(KvmVcpu {
            fd,
            msrs: SAVED_MSRS
                .iter()
                .copied()
                .filter(|index| reported.contains(index))
                .collect(),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
        })
    }

    fn capture(&self) -> Result<VcpuState, SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        let fd = self.fd;
        let msrs = if self.msrs.is_empty() {
            Vec::new()
        } else {
            let entries: Vec<kvm_msr_entry> = self
                .msrs
                .iter()
                .map(|index| kvm_msr_entry {
                    index: *index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|err| SnapshotError::Invalid {
                section: "VCPU".into(),
                what: format!("MSR list: {err:?}"),
            })?;
            let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
            msrs.as_slice()[..read]
                .iter()
                .map(|entry| (entry.index, entry.data))
                .collect()
        };
        Ok(VcpuState {
            regs: fd.get_regs().map_err(kvm("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read the special registers"))?,
            fpu: fd.get_fpu().map_err(kvm("read the FPU state"))?,
            xsave: if self.xsave {
                let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area"))?;
                Some(Box::new(xsave.region))
            } else {
                None
            },
            xcrs: if self.xcrs {
                Some(fd.get_xcrs().map_err(kvm("read the XCRs"))?)
            } else {
                None
            },
            msrs,
            debugregs: fd
                .get_debug_regs()
                .map_err(kvm("read the debug registers"))?,
            mp_state: fd
                .get_mp_state()
                .map_err(kvm("read the MP state"))?
                .mp_state,
            events: fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?,
        })
    }

    fn apply(&self, state: &VcpuState) -> Result<(), SnapshotError> {
        let kvm = |what| move |source| SnapshotError::Kvm { what, source };
        let fd = self.fd;
        // Modes first (special registers), XCR0 before the XSAVE area it governs, events
        // last: a queued interrupt must survive everything else being set.
        fd.set_sregs(&state.sregs)
            .map_err(kvm("set the special registers"))?;
        fd.set_regs(&state.regs).map_err(kvm("set the registers"))?;
        if let Some(xcrs) = &state.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("set the XCRs"))?;
        }
        fd.set_fpu(&state.fpu).map_err(kvm("set the FPU state"))?;
        if let Some(region) = &state.xsave {
            let xsave = kvm_xsave {
                region: **region,
                ..Default::default()
            };
            // SAFETY: `xsave` is a live kvm_xsave of the legacy 4096-byte size. KVM copies
            // the guest FPU's uABI size, which exceeds 4096 only for a process that asked
            // for dynamic XSAVE features (ARCH_REQ_XCOMP_GUEST_PERM); ftvmm never does.
            unsafe { fd.set_xsave(&xsave) }.map_err(kvm("set the XSAVE area"))?;
        }
        if !state.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> = state
                .msrs
                .iter()
                .map(|(index, data)| kvm_msr_entry {
                    index: *index,
                    data: *data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|err| SnapshotError::Invalid {
                section: "VCPU".into(),
                what: format!("MSR list: {err:?}"),
            })?;
            let written = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
            // KVM stops at the first MSR it refuses.
            if written != entries.len() {
                return Err(SnapshotError::Invalid {
                    section: "VCPU".into(),
                    what: format!(
                        "KVM refused MSR {:#x} = {:#x}",
                        entries[written].index, entries[written].data
                    ),
                });
            }
        }
        fd.set_debug_regs(&state.debugregs)
            .map_err(kvm("set the debug registers"))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: state.mp_state,
        })
        .map_err(kvm("set the MP state"))?;
        fd.set_vcpu_events(&state.events)
            .map_err(kvm("set the vCPU events"))?;
        Ok(())
    }

    fn decode(&self, input: &mut Decoder<'_>) -> Result<VcpuState, SnapshotError> {
        let mut regs = kvm_regs::default();
        for slot in [
            &mut regs.rax,
            &mut regs.rbx,
            &mut regs.rcx,
            &mut regs.rdx,
            &mut regs.rsi,
            &mut regs.rdi,
            &mut regs.rsp,
            &mut regs.rbp,
            &mut regs.r8,
            &mut regs.r9,
            &mut regs.r10,
            &mut regs.r11,
            &mut regs.r12,
            &mut regs.r13,
            &mut regs.r14,
            &mut regs.r15,
            &mut regs.rip,
            &mut regs.rflags,
        ] {
            *slot = input.u64("general registers")?;
        }
        let mut sregs = kvm_sregs::default();
        for segment in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
            &mut sregs.tr,
            &mut sregs.ldt,
        ] {
            *segment = decode_segment(input)?;
        }
        for table in [&mut sregs.gdt, &mut sregs.idt] {
            table.base = input.u64("descriptor table base")?;
            table.limit = input.u16("descriptor table limit")?;
        }
        for slot in [
            &mut sregs.cr0,
            &mut sregs.cr2,
            &mut sregs.cr3,
            &mut sregs.cr4,
            &mut sregs.cr8,
            &mut sregs.efer,
            &mut sregs.apic_base,
        ] {
            *slot = input.u64("control registers")?;
        }
        for word in &mut sregs.interrupt_bitmap {
            *word = input.u64("interrupt bitmap")?;
        }
        let mut fpu = kvm_fpu::default();
        for register in &mut fpu.fpr {
            *register = input.array("x87 registers")?;
        }
        fpu.fcw = input.u16("fcw")?;
        fpu.fsw = input.u16("fsw")?;
        fpu.ftwx = input.u8("ftwx")?;
        fpu.last_opcode = input.u16("last opcode")?;
        fpu.last_ip = input.u64("last ip")?;
        fpu.last_dp = input.u64("last dp")?;
        for register in &mut fpu.xmm {
            *register = input.array("xmm registers")?;
        }
        fpu.mxcsr = input.u32("mxcsr")?;

        let xsave = if input.bool("XSAVE present")? {
            let bytes = input.take(XSAVE_BYTES, "XSAVE area")?;
            let mut region = Box::new([0u32; XSAVE_BYTES / 4]);
            for (word, chunk) in region.iter_mut().zip(bytes.chunks_exact(4)) {
                *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            Some(region)
        } else {
            None
        };
        if xsave.is_some() && !self.xsave {
            return Err(input.invalid("an XSAVE area, and this host's KVM has no KVM_CAP_XSAVE"));
        }
        let xcrs = if input.bool("XCRs present")? {
            let mut xcrs = kvm_xcrs::default();
            let count = input.count("XCRs", xcrs.xcrs.len(), 12)?;
            xcrs.nr_xcrs = count as u32;
            xcrs.flags = input.u32("XCR flags")?;
            for xcr in xcrs.xcrs.iter_mut().take(count) {
                xcr.xcr = input.u32("XCR index")?;
                xcr.value = input.u64("XCR value")?;
            }
            Some(xcrs)
        } else {
            None
        };
        if xcrs.is_some() && !self.xcrs {
            return Err(input.invalid("XCRs, and this host's KVM has no KVM_CAP_XCRS"));
        }
        let count = input.count("MSRs", SAVED_MSRS.len(), 12)?;
        let mut msrs = Vec::with_capacity(count);
        for _ in 0..count {
            let index = input.u32("MSR index")?;
            let data = input.u64("MSR value")?;
            if !self.msrs.contains(&index) || msrs.iter().any(|(i, _)| *i == index) {
                return Err(input.invalid(format!(
                    "MSR {index:#x} is not one a snapshot carries on this host (or appears twice)"
                )));
            }
            msrs.push((index, data));
        }
        let mut debugregs = kvm_debugregs::default();
        for slot in debugregs.db.iter_mut() {
            *slot = input.u64("debug registers")?;
        }
        debugregs.dr6 = input.u64("dr6")?;
        debugregs.dr7 = input.u64("dr7")?;
        debugregs.flags = input.u64("debug register flags")?;
        let mp_state = input.u32("MP state")?;

        let mut events = kvm_vcpu_events::default();
        let [injected, nr, has_error_code, pending] = input.array("exception")?;
        events.exception.injected = injected;
        events.exception.nr = nr;
        events.exception.has_error_code = has_error_code;
        events.exception.pending = pending;
        events.exception.error_code = input.u32("exception error code")?;
        let [injected, nr, soft, shadow] = input.array("interrupt")?;
        events.interrupt.injected = injected;
        events.interrupt.nr = nr;
        events.interrupt.soft = soft;
        events.interrupt.shadow = shadow;
        let [injected, pending, masked] = input.array("NMI")?;
        events.nmi.injected = injected;
        events.nmi.pending = pending;
        events.nmi.masked = masked;
        events.sipi_vector = input.u32("SIPI vector")?;
        events.flags = input.u32("event flags")?;
        if events.flags & !KNOWN_EVENT_FLAGS != 0 {
            return Err(input.invalid(format!("unknown vCPU event flags {:#x}", events.flags)));
        }
        let [smm, pending, smm_inside_nmi, latched_init] = input.array("SMI")?;
        events.smi.smm = smm;
        events.smi.pending = pending;
        events.smi.smm_inside_nmi = smm_inside_nmi;
        events.smi.latched_init = latched_init;
        events.triple_fault.pending = input.u8("triple fault")?;
        events.exception_has_payload = input.u8("exception payload present")?;
        events.exception_payload = input.u64("exception payload")?;
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            debugregs,
            mp_state,
            events,
        })
    }
}

fn encode_segment(out: &mut Encoder, segment: &kvm_segment) {
    out.u64(segment.base);
    out.u32(segment.limit);
    out.u16(segment.selector);
    for byte in [
        segment.type_,
        segment.present,
        segment.dpl,
        segment.db,
        segment.s,
        segment.l,
        segment.g,
        segment.avl,
        segment.unusable,
    ] {
        out.u8(byte);
    }
}

fn decode_segment(input: &mut Decoder<'_>) -> Result<kvm_segment, SnapshotError> {
    let base = input.u64("segment base")?;
    let limit = input.u32("segment limit")?;
    let selector = input.u16("segment selector")?;
    let [type_, present, dpl, db, s, l, g, avl, unusable] = input.array("segment attributes")?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_,
        present,
        dpl,
        db,
        s,
        l,
        g,
        avl,
        unusable,
        padding: 0,
    })
}

impl Snapshot for KvmVcpu<'_> {
    fn tag(&self) -> Tag {
        *b"VCPU"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        let state = self.capture()?;
        for value in crate::vcpu::general_registers(&state.regs) {
            out.u64(value);
        }
        let sregs = &state.sregs;
        for segment in [
            &sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss, &sregs.tr, &sregs.ldt,
        ] {
            encode_segment(out, segment);
        }
        for table in [&sregs.gdt, &sregs.idt] {
            out.u64(table.base);
            out.u16(table.limit);
        }
        for value in [
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.cr8,
            sregs.efer,
            sregs.apic_base,
        ] {
            out.u64(value);
        }
        for word in sregs.interrupt_bitmap {
            out.u64(word);
        }
        let fpu = &state.fpu;
        for register in &fpu.fpr {
            out.fixed(register);
        }
        out.u16(fpu.fcw);
        out.u16(fpu.fsw);
        out.u8(fpu.ftwx);
        out.u16(fpu.last_opcode);
        out.u64(fpu.last_ip);
        out.u64(fpu.last_dp);
        for register in &fpu.xmm {
            out.fixed(register);
        }
        out.u32(fpu.mxcsr);
        out.bool(state.xsave.is_some());
        if let Some(region) = &state.xsave {
            for word in region.iter() {
                out.u32(*word);
            }
        }
        out.bool(state.xcrs.is_some());
        if let Some(xcrs) = &state.xcrs {
            let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
            out.u32(count as u32);
            out.u32(xcrs.flags);
            for xcr in &xcrs.xcrs[..count] {
                out.u32(xcr.xcr);
                out.u64(xcr.value);
            }
        }
        out.u32(state.msrs.len() as u32);
        for (index, data) in &state.msrs {
            out.u32(*index);
            out.u64(*data);
        }
        let debug = &state.debugregs;
        for value in debug.db {
            out.u64(value);
        }
        out.u64(debug.dr6);
        out.u64(debug.dr7);
        out.u64(debug.flags);
        out.u32(state.mp_state);
        let events = &state.events;
        out.fixed(&[
            events.exception.injected,
            events.exception.nr,
            events.exception.has_error_code,
            events.exception.pending,
        ]);
        out.u32(events.exception.error_code);
        out.fixed(&[
            events.interrupt.injected,
            events.interrupt.nr,
            events.interrupt.soft,
            events.interrupt.shadow,
        ]);
        out.fixed(&[events.nmi.injected, events.nmi.pending, events.nmi.masked]);
        out.u32(events.sipi_vector);
        out.u32(events.flags);
        out.fixed(&[
            events.smi.smm,
            events.smi.pending,
            events.smi.smm_inside_nmi,
            events.smi.latched_init,
        ]);
        out.u8(events.triple_fault.pending);
        out.u8(events.exception_has_payload);
        out.u64(events.exception_payload);
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let state = self.decode(input)?;
        // Every byte must be accounted for before KVM is touched.
        input.finish()?;
        self.apply(&state)
    }
}

/// Whether the vCPU has an interrupt queued (KVM_INTERRUPT) that the guest has not taken.
pub fn interrupt_queued(fd: &VcpuFd) -> Result<Option<u8>, SnapshotError> {
    let events = fd.get_vcpu_events().map_err(|source| SnapshotError::Kvm {
        what: "read the vCPU events",
        source,
    })?;
    Ok((events.interrupt.injected != 0).then_some(events.interrupt.nr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{restore_section, save_section};

    fn machine() -> crate::vm::BootedMachine {
        let image = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/guest/hello.elf");
        assert!(
            std::path::Path::new(image).is_file(),
            "{image} is missing: build the guests first (`cargo xtask guest`)"
        );
        crate::vm::boot(image.as_ref(), crate::layout::MEM_MIN, "", 2, false)
            .expect("this test needs /dev/kvm")
    }

    #[test]
    fn vcpu_state_round_trips_into_a_fresh_vm() {
        let source = machine();
        let mut regs = source.vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678_9ABC_DEF0;
        regs.r15 = 42;
        source.vcpu.set_regs(&regs).unwrap();
        let lstar = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xC000_0082,
            data: 0xFFFF_8000_0010_0000,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(source.vcpu.set_msrs(&lstar).unwrap(), 1);
        let component = KvmVcpu::new(&source.kvm, &source.vcpu).unwrap();
        assert!(
            component.msrs.contains(&0xC000_0082),
            "{:#x?}",
            component.msrs
        );
        let saved = save_section(&component).unwrap();

        let target = machine();
        let mut restored = KvmVcpu::new(&target.kvm, &target.vcpu).unwrap();
        restore_section(&mut restored, &saved).unwrap();
        assert_eq!(save_section(&restored).unwrap(), saved);
        assert_eq!(
            crate::vcpu::state_digest(&target.vcpu).unwrap(),
            crate::vcpu::state_digest(&source.vcpu).unwrap()
        );
        let mut read = Msrs::from_entries(&[kvm_msr_entry {
            index: 0xC000_0082,
            ..Default::default()
        }])
        .unwrap();
        target.vcpu.get_msrs(&mut read).unwrap();
        assert_eq!(read.as_slice()[0].data, 0xFFFF_8000_0010_0000);
    }

    #[test]
    fn damaged_or_foreign_vcpu_sections_are_refused_before_kvm_is_touched() {
        let source = machine();
        let saved = save_section(&KvmVcpu::new(&source.kvm, &source.vcpu).unwrap()).unwrap();
        let target = machine();
        let mut component = KvmVcpu::new(&target.kvm, &target.vcpu).unwrap();
        let before = save_section(&component).unwrap();
        for len in (0..saved.len()).step_by(97).chain([saved.len() - 1]) {
            assert!(restore_section(&mut component, &saved[..len]).is_err());
        }
        for at in (0..saved.len()).step_by(41) {
            let mut damaged = saved.clone();
            damaged[at] ^= 0x10;
            assert!(restore_section(&mut component, &damaged).is_err());
        }
        // Well framed, but an MSR a snapshot never carries (the TSC).
        let mut foreign = Encoder::new();
        component.save(&mut foreign).unwrap();
        let mut bytes = foreign.into_bytes();
        let msr_at = bytes
            .windows(4)
            .position(|w| w == 0xC000_0082u32.to_le_bytes())
            .expect("LSTAR in the section");
        bytes[msr_at..msr_at + 4].copy_from_slice(&0x10u32.to_le_bytes());
        let framed = crate::snapshot::frame_section(*b"VCPU", 1, &bytes).unwrap();
        let err = restore_section(&mut component, &framed).unwrap_err();
        assert!(err.to_string().contains("MSR 0x10"), "{err}");
        assert_eq!(save_section(&component).unwrap(), before);
    }
}
