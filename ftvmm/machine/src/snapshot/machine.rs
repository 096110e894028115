//! A whole machine as one snapshot stream: identity, vCPU, interrupt state, clock, the
//! inputs' bookkeeping, every device, and guest RAM.
//!
//! ```text
//! stream := "FTVMSNAP" | format: u16 (1) | reserved: u16 (0) | sections
//! sections, in this order:
//!   MACH  identity (memory size, image crc and length, devices, command line), the exit
//!         ordinal, and the registers and memory digests of the source at the save
//!   VCPU  the vCPU (snapshot::vcpu)
//!   PEND TIMR CLCK INPT   pending vectors, timer, clock, inputs' bookkeeping
//!   the devices in bus order: SERL PPRT (ports), PMMI, then VMIO (nesting VNET or VBLK)
//!         or VEMP for each virtio slot
//!   DRTY  pages written since the last memory digest (so the next one matches)
//!   MEMC* runs of non-zero pages: guest address u64, then the pages (at most 1 MiB)
//!   MEND  pages and chunks sent, and the digest of all of RAM
//! ```
//!
//! A restore goes into a freshly built machine of the same configuration; the identity is
//! checked first. A restore that fails leaves that machine half restored: the caller
//! discards it (a clone that fails is aborted, and the source is never touched by it).

use super::vcpu::KvmVcpu;
use super::{
    frame_section, save_section, write_section, Decoder, Encoder, Section, Snapshot, SnapshotError,
    Tag,
};
use crate::clock::VmClock;
use crate::devices::Bus;
use crate::inputs::ResumePoint;
use crate::interrupts::{PendingVectors, Timer};
use crate::memory::GuestMemoryMmap;
use crate::memory::{DirtyPages, PAGE_SIZE};
use ftvm_log::LogHeader;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::io::{Read, Write};
use vm_memory::{Bytes, GuestAddress};

/// The stream's first bytes.
pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// The stream format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Largest run of pages in one MEMC section.
const CHUNK_PAGES: u64 = 256;
/// Longest device description or command line in the identity.
const MAX_TEXT: usize = 8192;

/// What identifies the machine a snapshot belongs to, and where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Memory size, image, devices and command line, as the log header has them.
    pub machine: LogHeader,
    /// The exit ordinal of the snapshot.
    pub exit_ordinal: u64,
    /// The registers digest (`vcpu::state_digest`) at the save.
    pub regs_digest: u64,
    /// The digest of all guest RAM at the save.
    pub mem_digest: u64,
}

impl Snapshot for Identity {
    fn tag(&self) -> Tag {
        *b"MACH"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        save_machine(out, &self.machine)?;
        out.u64(self.exit_ordinal);
        out.u64(self.regs_digest);
        out.u64(self.mem_digest);
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        *self = Identity {
            machine: restore_machine(input, self.machine.version)?,
            exit_ordinal: input.u64("exit ordinal")?,
            regs_digest: input.u64("registers digest")?,
            mem_digest: input.u64("memory digest")?,
        };
        Ok(())
    }
}

/// Writes the machine `header` describes (memory, image, devices, command line): the
/// part of a snapshot's and a clone's first section that says which machine it is.
pub fn save_machine(out: &mut Encoder, header: &LogHeader) -> Result<(), SnapshotError> {
    out.u64(header.mem_size);
    out.u32(header.image_crc);
    out.u64(header.image_len);
    out.bytes(header.machine.as_bytes())?;
    out.bytes(header.cmdline.as_bytes())
}

/// Reads what [`save_machine`] wrote, as a log header of format `version`.
pub fn restore_machine(input: &mut Decoder<'_>, version: u16) -> Result<LogHeader, SnapshotError> {
    let mem_size = input.u64("memory size")?;
    let image_crc = input.u32("image crc")?;
    let image_len = input.u64("image length")?;
    let text = |input: &mut Decoder<'_>, what| {
        let bytes = input.bytes(what, MAX_TEXT)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| input.invalid(format!("{what} is not UTF-8")))
    };
    let machine = text(input, "devices")?;
    let cmdline = text(input, "command line")?;
    Ok(LogHeader {
        version,
        mem_size,
        image_crc,
        image_len,
        machine,
        cmdline,
    })
}

impl Identity {
    /// `Some(what differs)` when the snapshot's machine is not `ours`.
    fn mismatch(&self, ours: &LogHeader) -> Option<String> {
        machine_mismatch(&self.machine, ours)
    }
}

/// `Some(what differs)` when the machine `theirs` (from a snapshot or clone stream) is not
/// `ours`: image, memory size, devices, command line.
pub fn machine_mismatch(theirs: &LogHeader, ours: &LogHeader) -> Option<String> {
    if theirs.image_crc != ours.image_crc || theirs.image_len != ours.image_len {
        return Some(format!(
            "another image (crc {:#010x}, {} bytes; this machine's is crc {:#010x}, {} bytes)",
            theirs.image_crc, theirs.image_len, ours.image_crc, ours.image_len
        ));
    }
    if theirs.mem_size != ours.mem_size {
        return Some(format!(
            "{} MiB of memory, not {} MiB",
            theirs.mem_size >> 20,
            ours.mem_size >> 20
        ));
    }
    let cpu = |machine: &str| {
        machine
            .split_whitespace()
            .find(|word| word.starts_with("cpu="))
            .map(str::to_owned)
    };
    if let (Some(their_cpu), Some(our_cpu)) = (cpu(&theirs.machine), cpu(&ours.machine)) {
        if their_cpu != our_cpu {
            return Some(format!(
                "another CPU ({their_cpu}; this machine's guest sees {our_cpu})"
            ));
        }
    }
    if theirs.machine != ours.machine {
        return Some(format!(
            "the devices [{}], not [{}]",
            theirs.machine, ours.machine
        ));
    }
    if theirs.cmdline != ours.cmdline {
        return Some(format!(
            "the command line [{}], not [{}]",
            theirs.cmdline, ours.cmdline
        ));
    }
    None
}

impl Snapshot for ResumePoint {
    fn tag(&self) -> Tag {
        *b"INPT"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.ordinal);
        for value in self.clock_floor.iter().chain(&self.clock_shift) {
            out.u64(*value);
        }
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let ordinal = input.u64("exit ordinal")?;
        let mut values = [0u64; 4];
        for value in &mut values {
            *value = input.u64("clock floor and shift")?;
        }
        *self = ResumePoint {
            ordinal,
            clock_floor: [values[0], values[1]],
            clock_shift: [values[2], values[3]],
        };
        Ok(())
    }
}

/// The dirty-page set as a section.
struct DirtySection<'a> {
    pages: &'a mut DirtyPages,
    /// Pages of guest RAM: no bit may lie beyond.
    limit: u64,
}

impl Snapshot for DirtySection<'_> {
    fn tag(&self) -> Tag {
        *b"DRTY"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        let words = self.limit.div_ceil(64) as usize;
        out.u32(words as u32);
        for index in 0..words {
            out.u64(self.pages.bits.get(index).copied().unwrap_or(0));
        }
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let words = self.limit.div_ceil(64) as usize;
        let count = input.count("dirty page words", words, 8)?;
        if count != words {
            return Err(input.invalid(format!("{count} words of dirty bits, not {words}")));
        }
        let mut bits = Vec::with_capacity(words);
        for _ in 0..words {
            bits.push(input.u64("dirty page bits")?);
        }
        if !self.limit.is_multiple_of(64)
            && bits
                .last()
                .is_some_and(|last| last >> (self.limit % 64) != 0)
        {
            return Err(input.invalid("dirty pages beyond the end of guest memory"));
        }
        self.pages.bits = bits;
        Ok(())
    }
}

/// The parts of a machine a snapshot covers.
pub struct MachineParts<'a> {
    /// The KVM system handle (for the MSR list).
    pub kvm: &'a Kvm,
    /// The VM (for the dirty log).
    pub vm: &'a VmFd,
    /// The vCPU.
    pub vcpu: &'a mut VcpuFd,
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// The port bus.
    pub pio: &'a mut Bus,
    /// The MMIO bus.
    pub mmio: &'a mut Bus,
    /// Pending vectors.
    pub pending: &'a mut PendingVectors,
    /// The timer.
    pub timer: &'a mut Timer,
    /// The clock.
    pub clock: &'a mut VmClock,
    /// Pages written since the last memory digest.
    pub dirty: &'a mut DirtyPages,
    /// Whether KVM logs dirty pages for this machine.
    pub dirty_log: bool,
}

/// What a save or restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The machine and where it stopped.
    pub identity: Identity,
    /// Bytes of the stream.
    pub bytes: u64,
    /// Non-zero pages sent.
    pub pages: u64,
    /// The interrupt KVM had queued for the guest (injected, not taken yet), if any.
    pub interrupt_queued: Option<u8>,
}

/// Counts what goes through a writer.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Counts what comes through a reader.
struct CountingReader<'a> {
    inner: &'a mut dyn Read,
    bytes: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes a snapshot of the machine, stopped between exits at `resume.ordinal`, to `out`.
/// The caller has let KVM complete the last exit (`vcpu::complete_pending_exit`).
pub fn save(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    resume: ResumePoint,
    out: &mut dyn Write,
) -> Result<SnapshotReport, SnapshotError> {
    let mut out = Counting {
        inner: out,
        bytes: 0,
    };
    out.write_all(&MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&0u16.to_le_bytes())?;
    let mem = parts.mem;
    let (identity, interrupt_queued) = save_state(parts, machine, resume, None, &mut out)?;
    let (pages, chunks) = save_memory(mem, &mut out)?;
    write_end(&mut out, pages, chunks, identity.mem_digest)?;
    Ok(SnapshotReport {
        identity,
        bytes: out.bytes,
        pages,
        interrupt_queued,
    })
}

/// Writes the MEND section.
pub fn write_end(
    out: &mut dyn Write,
    pages: u64,
    chunks: u64,
    mem_digest: u64,
) -> Result<(), SnapshotError> {
    let mut end = Encoder::new();
    end.u64(pages);
    end.u64(chunks);
    end.u64(mem_digest);
    out.write_all(&frame_section(*b"MEND", 1, end.as_bytes())?)?;
    out.flush()?;
    Ok(())
}

/// Writes every section but guest memory (MACH to DRTY); returns the identity and the
/// interrupt KVM has queued. The identity's memory digest is `mem_digest`, or, without
/// one, [`crate::memory::memory_digest`] of all RAM.
pub fn save_state(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    resume: ResumePoint,
    mem_digest: Option<u64>,
    out: &mut dyn Write,
) -> Result<(Identity, Option<u8>), SnapshotError> {
    // What the guest wrote since the last digest stays owed to the next one, here and in
    // the restored copy. Without a dirty log no digest is owed: the devices' marks of a
    // run without digests go (the copy starts without any).
    if parts.dirty_log {
        parts
            .dirty
            .harvest(parts.vm, parts.mem)
            .map_err(|source| SnapshotError::Kvm {
                what: "read the dirty page log",
                source,
            })?;
    } else {
        crate::memory::forget_vmm_writes(parts.mem);
    }
    let (_, regs_digest) =
        crate::vcpu::state_digest(parts.vcpu).map_err(|err| SnapshotError::Invalid {
            section: "MACH".into(),
            what: format!("cannot read the registers: {err}"),
        })?;
    let identity = Identity {
        machine: machine.clone(),
        exit_ordinal: resume.ordinal,
        regs_digest,
        mem_digest: mem_digest.unwrap_or_else(|| crate::memory::memory_digest(parts.mem)),
    };
    out.write_all(&save_section(&identity)?)?;
    let vcpu = KvmVcpu::new(parts.kvm, parts.vcpu)?;
    out.write_all(&save_section(&vcpu)?)?;
    let interrupt_queued = super::vcpu::interrupt_queued(parts.vcpu)?;
    out.write_all(&save_section(&*parts.pending)?)?;
    out.write_all(&save_section(&*parts.timer)?)?;
    out.write_all(&save_section(&*parts.clock)?)?;
    out.write_all(&save_section(&resume)?)?;
    for bus in [&mut *parts.pio, &mut *parts.mmio] {
        for (_, device) in bus.devices_mut() {
            out.write_all(&save_section(&*device)?)?;
        }
    }
    let limit = crate::memory::mem_size(parts.mem) / PAGE_SIZE;
    let dirty = DirtySection {
        pages: parts.dirty,
        limit,
    };
    out.write_all(&save_section(&dirty)?)?;
    Ok((identity, interrupt_queued))
}

/// Pages written as MEMC sections of runs of consecutive pages, one chunk buffer reused
/// for every section (a chunk is a MiB: allocating and copying it again per section
/// was a large part of what a clone's source spent).
pub struct PageChunks<'a> {
    out: &'a mut dyn Write,
    chunk: Encoder,
    /// Pages in the current run, and the page that would extend it.
    run: u64,
    next: u64,
    pages: u64,
    chunks: u64,
}

impl<'a> PageChunks<'a> {
    /// Writes to `out`.
    pub fn new(out: &'a mut dyn Write) -> PageChunks<'a> {
        PageChunks {
            out,
            chunk: Encoder::with_capacity((8 + CHUNK_PAGES * PAGE_SIZE) as usize),
            run: 0,
            next: u64::MAX,
            pages: 0,
            chunks: 0,
        }
    }

    fn flush(&mut self) -> Result<(), SnapshotError> {
        if self.run > 0 {
            write_section(self.out, *b"MEMC", 1, self.chunk.as_bytes())?;
            self.chunk.clear();
            self.run = 0;
            self.chunks += 1;
        }
        Ok(())
    }

    /// Adds page `index` with its bytes.
    pub fn push(&mut self, index: u64, page: &[u8]) -> Result<(), SnapshotError> {
        if index != self.next || self.run == CHUNK_PAGES {
            self.flush()?;
        }
        if self.run == 0 {
            self.chunk.u64(index * PAGE_SIZE);
        }
        self.chunk.fixed(page);
        self.run += 1;
        self.pages += 1;
        self.next = index + 1;
        Ok(())
    }

    /// Writes what is left; returns the pages and chunks written.
    pub fn finish(mut self) -> Result<(u64, u64), SnapshotError> {
        self.flush()?;
        Ok((self.pages, self.chunks))
    }
}

/// Writes `pages` (page numbers, ascending), zero or not, as MEMC sections of runs of
/// consecutive pages; returns (pages, chunks).
pub fn write_pages(
    mem: &GuestMemoryMmap,
    pages: impl IntoIterator<Item = u64>,
    out: &mut dyn Write,
) -> Result<(u64, u64), SnapshotError> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut chunks = PageChunks::new(out);
    for index in pages {
        let addr = index * PAGE_SIZE;
        mem.read_slice(&mut page, GuestAddress(addr))
            .map_err(|err| SnapshotError::Memory {
                addr,
                why: err.to_string(),
            })?;
        chunks.push(index, &page)?;
    }
    chunks.finish()
}

/// Writes the non-zero pages as MEMC sections; returns (pages, chunks).
fn save_memory(mem: &GuestMemoryMmap, out: &mut dyn Write) -> Result<(u64, u64), SnapshotError> {
    let total = crate::memory::mem_size(mem) / PAGE_SIZE;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let zero = vec![0u8; PAGE_SIZE as usize];
    let mut failed = None;
    let non_zero = (0..total).filter(|index| {
        let addr = index * PAGE_SIZE;
        match mem.read_slice(&mut page, GuestAddress(addr)) {
            Ok(()) => page != zero,
            Err(err) => {
                failed.get_or_insert(SnapshotError::Memory {
                    addr,
                    why: err.to_string(),
                });
                false
            }
        }
    });
    let written = write_pages(mem, non_zero.collect::<Vec<_>>(), out)?;
    match failed {
        Some(err) => Err(err),
        None => Ok(written),
    }
}

/// Writes one MEMC section into guest RAM and notes its pages in `written`; returns how
/// many pages it held.
pub fn apply_chunk(
    mem: &GuestMemoryMmap,
    section: &Section,
    written: &mut DirtyPages,
) -> Result<u64, SnapshotError> {
    let total = crate::memory::mem_size(mem) / PAGE_SIZE;
    let mut chunk = Decoder::new(section.tag, &section.payload);
    let addr = chunk.u64("chunk address")?;
    let data = chunk.take(chunk.remaining(), "chunk pages")?;
    let count = data.len() as u64 / PAGE_SIZE;
    let fits = addr.is_multiple_of(PAGE_SIZE)
        && !data.is_empty()
        && (data.len() as u64).is_multiple_of(PAGE_SIZE)
        && count <= CHUNK_PAGES
        && addr / PAGE_SIZE + count <= total;
    if !fits {
        return Err(chunk.invalid(format!(
            "a chunk of {} bytes at {addr:#x} (whole pages, at most {CHUNK_PAGES}, inside {} MiB of RAM)",
            data.len(),
            crate::memory::mem_size(mem) >> 20
        )));
    }
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|err| SnapshotError::Memory {
            addr,
            why: err.to_string(),
        })?;
    for page in addr / PAGE_SIZE..addr / PAGE_SIZE + count {
        written.insert(page);
    }
    Ok(count)
}

/// The next section, which must exist.
pub fn next_section(input: &mut impl Read, expected: &str) -> Result<Section, SnapshotError> {
    Section::read(input)?.ok_or_else(|| SnapshotError::Truncated {
        section: expected.into(),
        what: "the stream (it ends before this section)",
    })
}

/// Restores the machine from `input` into `parts`, a freshly built machine described by
/// `machine`. Returns the snapshot's identity and inputs' bookkeeping.
pub fn restore(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    input: &mut dyn Read,
) -> Result<(SnapshotReport, ResumePoint), SnapshotError> {
    let mut input = CountingReader {
        inner: input,
        bytes: 0,
    };
    let mut head = [0u8; 12];
    input
        .read_exact(&mut head)
        .map_err(|_| SnapshotError::BadMagic)?;
    if head[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let format = u16::from_le_bytes([head[8], head[9]]);
    if format != FORMAT_VERSION || head[10..12] != [0, 0] {
        return Err(SnapshotError::UnsupportedFormat {
            found: format,
            supported: FORMAT_VERSION,
        });
    }
    let mem = parts.mem;
    let touched_before = touched_pages(mem);
    let (identity, interrupt_queued, resume) = restore_state(parts, machine, &mut input)?;
    let total = crate::memory::mem_size(mem) / PAGE_SIZE;
    let written = DirtyPages {
        bits: vec![0; total.div_ceil(64) as usize],
    };
    let pages = restore_memory(
        mem,
        &mut input,
        identity.mem_digest,
        written,
        &touched_before,
    )?;
    Ok((
        SnapshotReport {
            identity,
            bytes: input.bytes,
            pages,
            interrupt_queued,
        },
        resume,
    ))
}

/// Restores every section but guest memory (MACH to DRTY) from `input` into `parts`.
pub fn restore_state(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    mut input: &mut dyn Read,
) -> Result<(Identity, Option<u8>, ResumePoint), SnapshotError> {
    let mut identity = Identity {
        machine: machine.clone(),
        exit_ordinal: 0,
        regs_digest: 0,
        mem_digest: 0,
    };
    next_section(&mut input, "MACH")?.apply(&mut identity)?;
    if let Some(what) = identity.mismatch(machine) {
        return Err(SnapshotError::Mismatch(what));
    }
    let mut vcpu = KvmVcpu::new(parts.kvm, parts.vcpu)?;
    next_section(&mut input, "VCPU")?.apply(&mut vcpu)?;
    let interrupt_queued = super::vcpu::interrupt_queued(parts.vcpu)?;
    let (_, regs_digest) =
        crate::vcpu::state_digest(parts.vcpu).map_err(|err| SnapshotError::Invalid {
            section: "VCPU".into(),
            what: format!("cannot read the restored registers: {err}"),
        })?;
    if regs_digest != identity.regs_digest {
        return Err(SnapshotError::Invalid {
            section: "VCPU".into(),
            what: format!(
                "restored registers digest {regs_digest:#018x} differs from the snapshot's {:#018x}",
                identity.regs_digest
            ),
        });
    }
    next_section(&mut input, "PEND")?.apply(parts.pending)?;
    next_section(&mut input, "TIMR")?.apply(parts.timer)?;
    next_section(&mut input, "CLCK")?.apply(parts.clock)?;
    let mut resume = ResumePoint::default();
    next_section(&mut input, "INPT")?.apply(&mut resume)?;
    if resume.ordinal != identity.exit_ordinal {
        return Err(SnapshotError::Invalid {
            section: "INPT".into(),
            what: format!(
                "exit ordinal {} where the machine section says {}",
                resume.ordinal, identity.exit_ordinal
            ),
        });
    }
    for bus in [&mut *parts.pio, &mut *parts.mmio] {
        for (_, device) in bus.devices_mut() {
            let expected = super::tag_name(&device.tag());
            next_section(&mut input, &expected)?.apply(device)?;
        }
    }
    // The copy's own log holds only what restoring wrote (nothing the guest did): drop it.
    if parts.dirty_log {
        parts
            .dirty
            .harvest(parts.vm, parts.mem)
            .map_err(|source| SnapshotError::Kvm {
                what: "read the dirty page log",
                source,
            })?;
    }
    let limit = crate::memory::mem_size(parts.mem) / PAGE_SIZE;
    let mut dirty = DirtySection {
        pages: parts.dirty,
        limit,
    };
    next_section(&mut input, "DRTY")?.apply(&mut dirty)?;
    Ok((identity, interrupt_queued, resume))
}

/// Reads MEMC sections up to MEND into guest RAM, zeroes every page neither they nor an
/// earlier pass (`written`) carried (of those touched before the restore began:
/// `touched_before`, see [`zero_unwritten`]), and checks the digest of the whole.
/// Returns the pages written.
pub fn restore_memory(
    mem: &GuestMemoryMmap,
    input: &mut dyn Read,
    expected_digest: u64,
    mut written: DirtyPages,
    touched_before: &DirtyPages,
) -> Result<u64, SnapshotError> {
    let total = crate::memory::mem_size(mem) / PAGE_SIZE;
    written.bits.resize(total.div_ceil(64) as usize, 0);
    let (mut pages, mut chunks) = (0u64, 0u64);
    let end = loop {
        let mut input = &mut *input;
        let section = next_section(&mut input, "MEND")?;
        match &section.tag {
            b"MEMC" if section.version == 1 => {
                pages += apply_chunk(mem, &section, &mut written)?;
                chunks += 1;
            }
            b"MEND" if section.version == 1 => break section,
            b"MEMC" | b"MEND" => {
                return Err(SnapshotError::UnsupportedVersion {
                    section: super::tag_name(&section.tag),
                    found: section.version,
                    supported: 1,
                })
            }
            other => {
                return Err(SnapshotError::WrongSection {
                    expected: "MEMC or MEND".into(),
                    found: super::tag_name(other),
                })
            }
        }
    };
    let mut summary = Decoder::new(end.tag, &end.payload);
    let (sent_pages, sent_chunks, digest) = (
        summary.u64("pages")?,
        summary.u64("chunks")?,
        summary.u64("memory digest")?,
    );
    summary.finish()?;
    if (sent_pages, sent_chunks) != (pages, chunks) || digest != expected_digest {
        return Err(summary.invalid(format!(
            "{sent_pages} pages in {sent_chunks} chunks announced, {pages} in {chunks} received"
        )));
    }
    zero_unwritten(mem, &written, touched_before)?;
    let restored = crate::memory::memory_digest(mem);
    if restored != expected_digest {
        return Err(SnapshotError::MemoryDigest {
            expected: expected_digest,
            restored,
        });
    }
    Ok(pages)
}

/// Zeroes the pages of `mem` that a restore did not write (`written`) but the fresh
/// machine had touched before the restore began (`touched_before`: its image, boot
/// structures): the snapshot's RAM has zeros there. A page first touched by the restore
/// itself is zero unless written (fresh anonymous memory, a huge page included), so it is
/// not even read: with huge pages, a written page makes its 511 neighbours present.
pub fn zero_unwritten(
    mem: &GuestMemoryMmap,
    written: &DirtyPages,
    touched_before: &DirtyPages,
) -> Result<(), SnapshotError> {
    let zero = vec![0u8; PAGE_SIZE as usize];
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut maybe = touched_before.clone();
    maybe.remove_all(written);
    for index in maybe.pages() {
        let addr = GuestAddress(index * PAGE_SIZE);
        let fail = |err: vm_memory::GuestMemoryError| SnapshotError::Memory {
            addr: addr.0,
            why: err.to_string(),
        };
        mem.read_slice(&mut page, addr).map_err(fail)?;
        if page != zero {
            mem.write_slice(&zero, addr).map_err(fail)?;
        }
    }
    Ok(())
}

/// The pages of `mem` touched so far, which [`zero_unwritten`] checks after a restore.
pub fn touched_pages(mem: &GuestMemoryMmap) -> DirtyPages {
    crate::memory::UntouchedPages::of(mem).touched(crate::memory::mem_size(mem) / PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::Console;
    use crate::vm::{DigestConfig, InputsConfig, Vm, VmConfig};

    const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/guest/hello.elf");

    fn hello(cmdline: &str) -> Vm {
        assert!(
            std::path::Path::new(HELLO).is_file(),
            "{HELLO} is missing: build the guests first (`cargo xtask guest`)"
        );
        Vm::new(VmConfig {
            image: HELLO.into(),
            mem_size: 16 << 20,
            cmdline: cmdline.into(),
            console: Console::Sink,
            disk: None,
            net: None,
            inputs: InputsConfig::Live,
            digests: DigestConfig::default(),
        })
        .expect("this test needs /dev/kvm")
    }

    const CMDLINE: &str = "ticks=200 tick_us=200 work=1000";

    /// A snapshot of hello at exit 120 or a little after.
    fn snapshot() -> (Vec<u8>, SnapshotReport) {
        let mut vm = hello(CMDLINE);
        assert!(
            vm.run_until(120, &mut crate::vm::NoHook).unwrap().is_none(),
            "hello ended before exit 120"
        );
        let mut bytes = Vec::new();
        let report = vm.save_snapshot(&mut bytes).unwrap();
        assert_eq!(report.bytes, bytes.len() as u64);
        (bytes, report)
    }

    fn sections(mut bytes: &[u8]) -> Vec<Section> {
        bytes = &bytes[12..];
        std::iter::from_fn(|| Section::read(&mut bytes).unwrap()).collect()
    }

    #[test]
    fn a_machine_round_trips_into_a_fresh_vm() {
        let (bytes, saved) = snapshot();
        let mut copy = hello(CMDLINE);
        let restored = copy.restore_snapshot(&mut bytes.as_slice()).unwrap();
        assert_eq!(restored, saved);
        assert_eq!(copy.exit_ordinal(), saved.identity.exit_ordinal);
        assert_eq!(
            crate::memory::memory_digest(copy.memory()),
            saved.identity.mem_digest
        );
        // Saved again, the copy gives the same sections (but the clock, which ran on).
        let mut again = Vec::new();
        copy.save_snapshot(&mut again).unwrap();
        let (first, second) = (sections(&bytes), sections(&again));
        assert_eq!(first.len(), second.len());
        let tags: Vec<String> = first
            .iter()
            .map(|s| super::super::tag_name(&s.tag))
            .collect();
        assert_eq!(
            tags[..9],
            ["MACH", "VCPU", "PEND", "TIMR", "CLCK", "INPT", "SERL", "PPRT", "PMMI"]
        );
        for (a, b) in first.iter().zip(&second) {
            if &a.tag != b"CLCK" {
                assert_eq!(a, b, "section {} differs", super::super::tag_name(&a.tag));
            }
        }
        // The copy runs on to the end like the original would.
        assert!(matches!(
            copy.run(&mut crate::vm::NoHook).unwrap(),
            crate::vm::VmOutcome::PowerOff(0)
        ));
    }

    #[test]
    fn a_machine_of_another_cpu_is_named_as_such() {
        let ours = LogHeader::for_machine(
            b"img",
            2 << 20,
            "net=52:54:00:00:00:01 cpu=0000abcd".into(),
            "",
        );
        let theirs = LogHeader {
            machine: "net=52:54:00:00:00:01 cpu=0000abce".into(),
            ..ours.clone()
        };
        let what = machine_mismatch(&theirs, &ours).expect("a mismatch");
        assert!(what.contains("another CPU (cpu=0000abce"), "{what}");
        assert_eq!(machine_mismatch(&ours, &ours), None);
    }

    #[test]
    fn damaged_foreign_or_short_snapshots_are_refused() {
        let (bytes, _) = snapshot();
        let refuse = |bytes: &[u8], cmdline: &str| -> SnapshotError {
            match hello(cmdline).restore_snapshot(&mut &bytes[..]) {
                Err(crate::vm::VmError::Snapshot(err)) => err,
                other => panic!("expected a snapshot error, got {other:?}"),
            }
        };
        assert!(matches!(
            refuse(b"NOTASNAPSHOT", CMDLINE),
            SnapshotError::BadMagic
        ));
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert!(matches!(
            refuse(&newer, CMDLINE),
            SnapshotError::UnsupportedFormat { found: 2, .. }
        ));
        let err = refuse(&bytes, "ticks=201 tick_us=200 work=1000");
        assert!(err.to_string().contains("command line [ticks=200"), "{err}");
        for len in [12, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(
                    refuse(&bytes[..len], CMDLINE),
                    SnapshotError::Truncated { .. }
                ),
                "cut at {len}"
            );
        }
        // A bit flipped in guest memory (the last chunk) and in the vCPU section.
        for at in [bytes.len() - 200, 12 + 150] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 4;
            assert!(
                matches!(refuse(&damaged, CMDLINE), SnapshotError::Checksum { .. }),
                "byte {at}"
            );
        }
    }

    #[test]
    fn identity_inputs_and_dirty_sections_round_trip_and_refuse_damage() {
        use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};
        let blank = || Identity {
            machine: LogHeader::for_machine(b"", 0, String::new(), ""),
            exit_ordinal: 0,
            regs_digest: 0,
            mem_digest: 0,
        };
        let identity = Identity {
            machine: LogHeader::for_machine(
                b"image",
                64 << 20,
                "net=52:54:00:12:34:56".into(),
                "ticks=3",
            ),
            exit_ordinal: 77,
            regs_digest: 1,
            mem_digest: 2,
        };
        let bytes = assert_round_trip(&identity, &mut blank());
        assert_refuses_damage(&bytes, blank);
        let point = ResumePoint {
            ordinal: 9,
            clock_floor: [1, 2],
            clock_shift: [3, 4],
        };
        let bytes = assert_round_trip(&point, &mut ResumePoint::default());
        assert_refuses_damage(&bytes, ResumePoint::default);

        let mut pages = DirtyPages::default();
        pages.insert(3);
        pages.insert(99);
        let mut target = DirtyPages::default();
        let bytes = assert_round_trip(
            &DirtySection {
                pages: &mut pages,
                limit: 100,
            },
            &mut DirtySection {
                pages: &mut target,
                limit: 100,
            },
        );
        assert_eq!(target.pages().collect::<Vec<_>>(), [3, 99]);
        // The same bits, for a machine with less memory: page 99 lies beyond it.
        let mut small = DirtyPages::default();
        let err = crate::snapshot::restore_section(
            &mut DirtySection {
                pages: &mut small,
                limit: 98,
            },
            &bytes,
        )
        .unwrap_err();
        assert!(matches!(err, SnapshotError::Invalid { .. }), "{err}");
    }
}
