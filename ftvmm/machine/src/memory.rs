//! Guest RAM and the boot structures the VMM writes into it before the first instruction.

use crate::layout::*;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: anonymous memory with a bitmap of the pages the VMM wrote through it
/// (device DMA), which KVM's dirty log does not see (see [`DirtyPages::harvest`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// The bitmap slice of a piece of [`GuestMemoryMmap`] (what virtio buffers carry).
pub type GuestSlice<'a> = vm_memory::bitmap::BS<'a, AtomicBitmap>;

/// Errors while creating guest memory or writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot allocate {size} bytes of guest memory")]
    Allocate {
        /// Requested size.
        size: u64,
        /// Why mmap failed.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Writing a boot structure failed (guest memory too small for the layout).
    #[error("cannot write the {what} at {addr:#x}")]
    WriteBoot {
        /// Which structure.
        what: &'static str,
        /// Where it goes.
        addr: u64,
        /// The write error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line does not fit its page.
    #[error("command line is {len} bytes; at most {CMDLINE_MAX_LEN} fit")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
    },
}

/// Allocates `size` bytes of zeroed guest RAM at guest physical address 0, backed by
/// transparent huge pages where the host has them.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::Allocate {
        size,
        source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
    })?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
        .map_err(|source| MemoryError::Allocate { size, source })?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Asks for transparent huge pages under guest RAM (hosts set THP to `madvise` by
/// default): one fault and one TLB entry per 2 MiB instead of 512. A new backup writes a
/// clone's whole working set into fresh memory, and faulting it in 4 KiB at a time was
/// the largest part of what it spent. Without THP the call fails and nothing changes.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        // SAFETY: the range is exactly this region's own anonymous mapping, alive as long
        // as `mem`; MADV_HUGEPAGE changes how it is backed, never what it holds.
        let advised = unsafe {
            libc::madvise(
                region.as_ptr().cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if advised != 0 {
            tracing::debug!(
                "guest RAM: no transparent huge pages ({})",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// What the guest learns from the boot info block.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootInfo {
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Command line length in bytes, without the NUL.
    pub cmdline_len: u64,
    /// How many virtio-mmio slots hold a device.
    pub virtio_mmio_count: u32,
}

impl BootInfo {
    /// The little-endian bytes of the block, laid out as docs/machine.md says.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        let fields: [(usize, &[u8]); 9] = [
            (0, &BOOT_INFO_MAGIC.to_le_bytes()),
            (8, &BOOT_INFO_VERSION.to_le_bytes()),
            (16, &self.mem_size.to_le_bytes()),
            (24, &CMDLINE.0.to_le_bytes()),
            (32, &self.cmdline_len.to_le_bytes()),
            (40, &PLATFORM_MMIO.to_le_bytes()),
            (48, &VIRTIO_MMIO_BASE.to_le_bytes()),
            (56, &self.virtio_mmio_count.to_le_bytes()),
            (60, &u32::from(VIRTIO_FIRST_VECTOR).to_le_bytes()),
        ];
        for (offset, bytes) in fields {
            out[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        out
    }
}

/// Writes the boot GDT, boot info, command line and identity page tables.
pub fn write_boot_structures(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    virtio_mmio_count: u32,
) -> Result<(), MemoryError> {
    let write = |what: &'static str, addr: GuestAddress, bytes: &[u8]| {
        mem.write_slice(bytes, addr)
            .map_err(|source| MemoryError::WriteBoot {
                what,
                addr: addr.0,
                source,
            })
    };
    if cmdline.len() > CMDLINE_MAX_LEN {
        return Err(MemoryError::CmdlineTooLong { len: cmdline.len() });
    }
    let mut gdt = Vec::with_capacity(24);
    for entry in BOOT_GDT_ENTRIES {
        gdt.extend_from_slice(&entry.to_le_bytes());
    }
    write("boot GDT", BOOT_GDT, &gdt)?;

    let info = BootInfo {
        mem_size: mem_size(mem),
        cmdline_len: cmdline.len() as u64,
        virtio_mmio_count,
    };
    write("boot info", BOOT_INFO, &info.to_bytes())?;

    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    write("command line", CMDLINE, &line)?;

    write("page tables", PAGE_TABLES, &identity_page_tables())?;
    Ok(())
}

/// Total guest RAM in bytes.
pub fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|region| region.len()).sum()
}

/// A hash of all guest RAM (64 bits: the CRC32 of each 1 MiB chunk, folded).
pub fn memory_digest(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: usize = 1 << 20;
    let mut buffer = vec![0u8; CHUNK];
    // Most of a guest's RAM is zero: a chunk never touched is not even read, and a
    // memcmp finds one that was; its CRC is known.
    let zeros = vec![0u8; CHUNK];
    let zero_crc = crc32fast::hash(&zeros);
    let untouched = UntouchedPages::of(mem);
    let mut digest = 0xCBF2_9CE4_8422_2325u64;
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let len = CHUNK.min((region.len() - offset) as usize);
            let addr = GuestAddress(region.start_addr().0 + offset);
            if len == CHUNK && untouched.all(addr.0 / PAGE_SIZE, CHUNK as u64 / PAGE_SIZE) {
                digest = (digest ^ u64::from(zero_crc)).wrapping_mul(0x0000_0100_0000_01B3);
                offset += len as u64;
                continue;
            }
            // The region holds [offset, offset + len), so the read cannot fail.
            if mem.read_slice(&mut buffer[..len], addr).is_ok() {
                let crc = if len == CHUNK && buffer == zeros {
                    zero_crc
                } else {
                    crc32fast::hash(&buffer[..len])
                };
                digest = (digest ^ u64::from(crc)).wrapping_mul(0x0000_0100_0000_01B3);
            }
            offset += len as u64;
        }
    }
    digest
}

/// Forgets the VMM's marks of written pages (after a restore wrote all of RAM: the copy
/// starts from the original's set, which travels in the snapshot).
pub fn forget_vmm_writes(mem: &GuestMemoryMmap) {
    use vm_memory::GuestMemoryBackend;
    for region in mem.iter() {
        // The region's own bitmap (MmapRegion::bitmap), not the trait's slice of it.
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

/// Pages of guest RAM this process never touched: neither present nor swapped out, per
/// `/proc/self/pagemap`. Guest RAM is private anonymous memory, so such a page reads as
/// zero; passes over all of RAM (digests, a clone's copy rounds) skip it instead of
/// faulting in a zero page for every one, which for a large idle guest is most of the
/// time such a pass takes. One bit per page, by guest frame number.
#[derive(Debug, Default)]
pub struct UntouchedPages {
    bits: Vec<u64>,
}

impl UntouchedPages {
    /// The pages of `mem` untouched right now. Empty (nothing is skipped) when the page
    /// map cannot be read.
    pub fn of(mem: &GuestMemoryMmap) -> UntouchedPages {
        use std::os::unix::fs::FileExt;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        /// Page-map entries read at once (64 KiB).
        const BATCH: u64 = 8192;
        /// Bit 63: present; bit 62: swapped out.
        const PRESENT_OR_SWAPPED: u64 = 0b11 << 62;
        let mut set = UntouchedPages::default();
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return set;
        };
        set.bits = vec![0; mem_size(mem).div_ceil(PAGE_SIZE * 64) as usize];
        let mut raw = vec![0u8; (BATCH * 8) as usize];
        for region in mem.iter() {
            let host_page = region.as_ptr() as u64 / PAGE_SIZE;
            let first = region.start_addr().0 / PAGE_SIZE;
            let pages = region.len() / PAGE_SIZE;
            let mut done = 0;
            while done < pages {
                let count = BATCH.min(pages - done);
                let bytes = &mut raw[..(count * 8) as usize];
                if pagemap
                    .read_exact_at(bytes, (host_page + done) * 8)
                    .is_err()
                {
                    return UntouchedPages::default();
                }
                for (index, entry) in bytes.chunks_exact(8).enumerate() {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(entry);
                    if u64::from_le_bytes(le) & PRESENT_OR_SWAPPED == 0 {
                        let page = first + done + index as u64;
                        set.bits[(page / 64) as usize] |= 1 << (page % 64);
                    }
                }
                done += count;
            }
        }
        set
    }

    /// Whether page `page` is untouched.
    pub fn contains(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|word| word & (1 << (page % 64)) != 0)
    }

    /// Whether the `count` pages from `first` are all untouched.
    pub fn all(&self, first: u64, count: u64) -> bool {
        (first..first + count).all(|page| self.contains(page))
    }

    /// The pages below `total` that were touched when this was taken, as a set: all of
    /// them when the page map could not be read.
    pub fn touched(&self, total: u64) -> DirtyPages {
        let mut bits: Vec<u64> = (0..total.div_ceil(64) as usize)
            .map(|word| !self.bits.get(word).copied().unwrap_or(0))
            .collect();
        if let Some(last) = bits.last_mut().filter(|_| !total.is_multiple_of(64)) {
            *last &= (1 << (total % 64)) - 1;
        }
        DirtyPages { bits }
    }
}

/// Pages the guest wrote that no memory digest covered yet: KVM's dirty log (which a
/// read clears) is moved here whenever something else needs it too (a snapshot), so that
/// the next digest still covers every page written since the previous one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// One bit per 4 KiB page of guest RAM, by guest frame number.
    pub bits: Vec<u64>,
}

impl DirtyPages {
    /// Moves the pages written since the last harvest into this set, clearing their
    /// marks: KVM's dirty log (the guest's writes) and the bitmap of the pages the VMM
    /// wrote through `mem` (device DMA: received frames, disk reads, used rings), which
    /// KVM does not see. Both replicas' devices write the same pages at the same exits, so
    /// a digest of the set compares like the guest's own writes.
    pub fn harvest(
        &mut self,
        vm: &kvm_ioctls::VmFd,
        mem: &GuestMemoryMmap,
    ) -> Result<(), kvm_ioctls::Error> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let words = mem_size(mem).div_ceil(PAGE_SIZE * 64) as usize;
        self.bits.resize(words, 0);
        for (slot, region) in mem.iter().enumerate() {
            let first_page = region.start_addr().0 / PAGE_SIZE;
            let kvm = vm.get_dirty_log(slot as u32, region.len() as usize)?;
            let vmm = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for bitmap in [kvm, vmm] {
                for (word_index, word) in bitmap.iter().enumerate() {
                    let mut bits = *word;
                    while bits != 0 {
                        let bit = u64::from(bits.trailing_zeros());
                        bits &= bits - 1;
                        self.insert(first_page + word_index as u64 * 64 + bit);
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds page number `page`.
    pub fn insert(&mut self, page: u64) {
        let word = (page / 64) as usize;
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << (page % 64);
    }

    /// The page numbers in the set, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(word, bits)| {
            let mut bits = *bits;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    word as u64 * 64 + bit
                })
            })
        })
    }

    /// Takes every page of `other` out.
    pub fn remove_all(&mut self, other: &DirtyPages) {
        for (bits, gone) in self.bits.iter_mut().zip(&other.bits) {
            *bits &= !gone;
        }
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyPages) {
        if self.bits.len() < other.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        for (bits, more) in self.bits.iter_mut().zip(&other.bits) {
            *bits |= more;
        }
    }

    /// How many pages are in the set.
    pub fn len(&self) -> u64 {
        self.bits
            .iter()
            .map(|bits| u64::from(bits.count_ones()))
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|bits| *bits == 0)
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Hashes the pages written since the previous call (by the guest, KVM's dirty log, and by
/// the VMM's devices, the memory's own bitmap; the call clears both, see
/// [`DirtyPages::harvest`]), plus the pages `carried` over from earlier reads of them,
/// which it empties: returns how many there were and a hash of their numbers and
/// contents.
pub fn dirty_digest(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    carried: &mut DirtyPages,
) -> Result<(u32, u64), kvm_ioctls::Error> {
    carried.harvest(vm, mem)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut pages = 0u32;
    let mut digest = 0xCBF2_9CE4_8422_2325u64;
    for page_index in carried.pages() {
        let addr = GuestAddress(page_index * PAGE_SIZE);
        if mem.read_slice(&mut page, addr).is_ok() {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&page_index.to_le_bytes());
            hasher.update(&page);
            digest = (digest ^ u64::from(hasher.finalize())).wrapping_mul(0x0000_0100_0000_01B3);
            pages += 1;
        }
    }
    carried.clear();
    Ok((pages, digest))
}

/// Boot GDT: null, 64-bit code DPL0 (selector 0x08), data DPL0 (0x10).
pub const BOOT_GDT_ENTRIES: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
/// Selector of the boot code segment.
pub const BOOT_CODE_SELECTOR: u16 = 0x08;
/// Selector of the boot data segment.
pub const BOOT_DATA_SELECTOR: u16 = 0x10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// PML4, PDPT and four page directories identity-mapping 4 GiB with 2 MiB pages, all
/// user-accessible so CPL3 code can reach RAM and MMIO directly.
fn identity_page_tables() -> Vec<u8> {
    const PAGE: u64 = 0x1000;
    const FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    let pml4 = PAGE_TABLES.0;
    let pdpt = pml4 + PAGE;
    let first_pd = pdpt + PAGE;
    let directories = IDENTITY_MAP_SIZE >> 30;
    let mut entries = vec![0u64; (512 * (2 + directories)) as usize];
    entries[0] = pdpt | FLAGS;
    for gib in 0..directories {
        entries[512 + gib as usize] = (first_pd + gib * PAGE) | FLAGS;
        for slot in 0..512u64 {
            let addr = (gib << 30) | (slot << 21);
            entries[(512 * (2 + gib) + slot) as usize] = addr | FLAGS | PTE_HUGE;
        }
    }
    entries
        .iter()
        .flat_map(|entry| entry.to_le_bytes())
        .collect()
}

/// Memory the VMM process uses, split into guest RAM and everything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryUse {
    /// Resident set of the process minus the resident part of guest RAM.
    pub vmm_rss_bytes: u64,
    /// Resident part of guest RAM.
    pub guest_resident_bytes: u64,
    /// The process's peak resident set so far, guest RAM included (VmHWM).
    pub peak_rss_bytes: u64,
}

/// Reads this process's memory use from /proc (zeros where /proc cannot be read).
pub fn memory_use(mem: &GuestMemoryMmap) -> MemoryUse {
    use vm_memory::GuestMemoryBackend;
    let guest_starts: Vec<u64> = mem.iter().map(|region| region.as_ptr() as u64).collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut total_kib = 0u64;
    let mut guest_kib = 0u64;
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, _)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            in_guest =
                u64::from_str_radix(start, 16).is_ok_and(|start| guest_starts.contains(&start));
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            total_kib += kib;
            if in_guest {
                guest_kib += kib;
            }
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0u64);
    MemoryUse {
        vmm_rss_bytes: (total_kib - guest_kib) * 1024,
        guest_resident_bytes: guest_kib * 1024,
        peak_rss_bytes: peak_kib * 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_map_the_mmio_window_user_accessible() {
        let tables = identity_page_tables();
        let entry =
            |index: usize| u64::from_le_bytes(tables[index * 8..index * 8 + 8].try_into().unwrap());
        // 0xD000_0000 is GiB 3, slot 0x80 of its directory.
        let pd3 = 512 * (2 + 3);
        assert_eq!(
            entry(pd3 + 0x80),
            0xD000_0000 | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_HUGE
        );
        assert_eq!(entry(0) & !0xFFF, PAGE_TABLES.0 + 0x1000);
    }

    #[test]
    fn boot_info_starts_with_magic_and_version() {
        let bytes = BootInfo {
            mem_size: 64 << 20,
            cmdline_len: 5,
            virtio_mmio_count: 0,
        }
        .to_bytes();
        assert_eq!(&bytes[0..8], b"FTVMBOOT");
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(bytes[16..24].try_into().unwrap()),
            64 << 20
        );
    }

    #[test]
    fn the_memory_digest_is_the_same_with_or_without_its_zero_shortcut() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_slice(&[7; 3], GuestAddress(0x10_0005)).unwrap();
        // By definition: the CRC of each 1 MiB chunk, folded.
        let mut expected = 0xCBF2_9CE4_8422_2325u64;
        let mut chunk = vec![0u8; 1 << 20];
        for index in 0..4u64 {
            mem.read_slice(&mut chunk, GuestAddress(index << 20))
                .unwrap();
            expected =
                (expected ^ u64::from(crc32fast::hash(&chunk))).wrapping_mul(0x0000_0100_0000_01B3);
        }
        assert_eq!(memory_digest(&mem), expected);
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = create_guest_memory(MEM_MIN).unwrap();
        let err = write_boot_structures(&mem, &"x".repeat(5000), 0).unwrap_err();
        assert!(matches!(err, MemoryError::CmdlineTooLong { len: 5000 }));
    }

    #[test]
    fn untouched_pages_are_skipped_as_zero_and_touched_ones_are_not() {
        let mem = create_guest_memory(4 << 20).unwrap();
        let fresh = memory_digest(&mem);
        let untouched = UntouchedPages::of(&mem);
        assert!(untouched.all(0, 1024), "a fresh mapping is untouched");
        // Zeros written make pages present: read, and the digest is the same.
        mem.write_slice(&[0u8; 4096], GuestAddress(0x20_0000))
            .unwrap();
        let untouched = UntouchedPages::of(&mem);
        assert!(!untouched.contains(0x200));
        // A touched page brings in at most the huge page around it (guest RAM asks for
        // transparent huge pages), so at least half of these 4 MiB stay untouched.
        let still = (0..1024).filter(|page| untouched.contains(*page)).count();
        assert!(still >= 512, "{still} of 1024 pages untouched");
        assert!(!untouched.all(0x100, 0x200));
        assert_eq!(memory_digest(&mem), fresh);
        mem.write_slice(&[1u8], GuestAddress(0x20_0000)).unwrap();
        assert_ne!(memory_digest(&mem), fresh);
    }
}
