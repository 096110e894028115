//! Loads a static x86-64 ELF executable into guest RAM.
//!
//! The image is untrusted input: every header field is bounds-checked before use, and each
//! `PT_LOAD` segment must lie inside RAM above the boot area without overlapping another.

use crate::layout::IMAGE_MIN_ADDR;
use crate::memory::GuestMemoryMmap;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF64 little-endian x86-64 executable.
    #[error("image {path} is not a 64-bit x86-64 ELF executable: {reason}")]
    NotElf {
        /// The image path.
        path: PathBuf,
        /// What was wrong.
        reason: &'static str,
    },
    /// A header points outside the file or is malformed.
    #[error("image {path} is malformed: {reason}")]
    Malformed {
        /// The image path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A loadable segment does not fit the machine.
    #[error("image {path}: segment {index} at {start:#x}..{end:#x} {reason}")]
    BadSegment {
        /// The image path.
        path: PathBuf,
        /// Program header index.
        index: usize,
        /// First guest physical byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Why it does not fit.
        reason: &'static str,
    },
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// A loaded image: where the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImage {
    /// The ELF entry point.
    pub entry: GuestAddress,
    /// One past the highest byte any segment occupies.
    pub end: GuestAddress,
}

/// Reads the ELF at `path` and copies its loadable segments into `mem`.
pub fn load_elf(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedImage, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    load_elf_bytes(mem, &bytes).map_err(|err| err.with_path(path))
}

/// Internal error before the path is attached.
enum Bad {
    NotElf(&'static str),
    Malformed(String),
    Segment {
        index: usize,
        start: u64,
        end: u64,
        reason: &'static str,
    },
}

impl Bad {
    fn with_path(self, path: &Path) -> LoadError {
        let path = path.to_owned();
        match self {
            Bad::NotElf(reason) => LoadError::NotElf { path, reason },
            Bad::Malformed(reason) => LoadError::Malformed { path, reason },
            Bad::Segment {
                index,
                start,
                end,
                reason,
            } => LoadError::BadSegment {
                path,
                index,
                start,
                end,
                reason,
            },
        }
    }
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N], Bad> {
    offset
        .checked_add(N)
        .and_then(|end| bytes.get(offset..end))
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| Bad::Malformed(format!("header field at byte {offset} is past the end")))
}
fn u16_at(bytes: &[u8], offset: usize) -> Result<u16, Bad> {
    field::<2>(bytes, offset).map(u16::from_le_bytes)
}
fn u32_at(bytes: &[u8], offset: usize) -> Result<u32, Bad> {
    field::<4>(bytes, offset).map(u32::from_le_bytes)
}
fn u64_at(bytes: &[u8], offset: usize) -> Result<u64, Bad> {
    field::<8>(bytes, offset).map(u64::from_le_bytes)
}

struct Segment {
    index: usize,
    file_range: std::ops::Range<usize>,
    start: u64,
    end: u64,
}

fn load_elf_bytes(mem: &GuestMemoryMmap, bytes: &[u8]) -> Result<LoadedImage, Bad> {
    if bytes.len() < EHDR_SIZE || &bytes[0..4] != b"\x7fELF" {
        return Err(Bad::NotElf("no ELF magic"));
    }
    if bytes[4] != 2 {
        return Err(Bad::NotElf("not ELFCLASS64"));
    }
    if bytes[5] != 1 {
        return Err(Bad::NotElf("not little-endian"));
    }
    if u16_at(bytes, 18)? != EM_X86_64 {
        return Err(Bad::NotElf("machine is not x86-64"));
    }
    if u16_at(bytes, 16)? != ET_EXEC {
        return Err(Bad::NotElf("not a static executable (ET_EXEC)"));
    }
    let entry = u64_at(bytes, 24)?;
    let phoff = usize::try_from(u64_at(bytes, 32)?)
        .map_err(|_| Bad::Malformed("program header offset overflows".into()))?;
    let phentsize = usize::from(u16_at(bytes, 54)?);
    let phnum = usize::from(u16_at(bytes, 56)?);
    if phentsize != PHDR_SIZE {
        return Err(Bad::Malformed(format!(
            "program header size is {phentsize}, expected {PHDR_SIZE}"
        )));
    }

    let ram_end = crate::memory::mem_size(mem);
    let mut segments: Vec<Segment> = Vec::new();
    for index in 0..phnum {
        let base = index
            .checked_mul(PHDR_SIZE)
            .and_then(|offset| offset.checked_add(phoff))
            .ok_or_else(|| Bad::Malformed("program header table overflows".into()))?;
        let kind = u32_at(bytes, base)?;
        if kind == PT_INTERP {
            return Err(Bad::NotElf("dynamically linked (PT_INTERP)"));
        }
        if kind != PT_LOAD {
            continue;
        }
        let file_offset = u64_at(bytes, base + 8)?;
        let paddr = u64_at(bytes, base + 24)?;
        let file_size = u64_at(bytes, base + 32)?;
        let mem_size = u64_at(bytes, base + 40)?;
        let end = paddr.saturating_add(mem_size);
        let bad = |reason| Bad::Segment {
            index,
            start: paddr,
            end,
            reason,
        };
        if mem_size == 0 {
            continue;
        }
        if file_size > mem_size {
            return Err(bad("has more file bytes than memory bytes"));
        }
        if paddr < IMAGE_MIN_ADDR {
            return Err(bad("overlaps the boot area below 1 MiB"));
        }
        if end > ram_end {
            return Err(bad("does not fit in guest RAM"));
        }
        let file_range = usize::try_from(file_offset)
            .ok()
            .zip(usize::try_from(file_size).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?))
            .filter(|range| range.end <= bytes.len())
            .ok_or_else(|| bad("points past the end of the file"))?;
        if segments
            .iter()
            .any(|other| paddr < other.end && other.start < end)
        {
            return Err(bad("overlaps another segment"));
        }
        segments.push(Segment {
            index,
            file_range,
            start: paddr,
            end,
        });
    }
    if segments.is_empty() {
        return Err(Bad::Malformed("no loadable segment".into()));
    }
    if !segments.iter().any(|s| (s.start..s.end).contains(&entry)) {
        return Err(Bad::Malformed(format!(
            "entry point {entry:#x} is outside every segment"
        )));
    }
    for segment in &segments {
        // RAM starts zeroed, so the part beyond the file bytes (.bss) needs no writing.
        mem.write_slice(
            &bytes[segment.file_range.clone()],
            GuestAddress(segment.start),
        )
        .map_err(|_| Bad::Segment {
            index: segment.index,
            start: segment.start,
            end: segment.end,
            reason: "cannot be written to guest RAM",
        })?;
    }
    let end = segments
        .iter()
        .map(|s| s.end)
        .max()
        .unwrap_or(IMAGE_MIN_ADDR);
    Ok(LoadedImage {
        entry: GuestAddress(entry),
        end: GuestAddress(end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// A minimal ELF header plus one PT_LOAD header and `payload`.
    fn elf(paddr: u64, payload: &[u8], mem_size: u64, entry: u64) -> Vec<u8> {
        let mut out = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        out[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        let offset = (EHDR_SIZE + PHDR_SIZE) as u64;
        out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        out[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        out[ph + 32..ph + 40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        out[ph + 40..ph + 48].copy_from_slice(&mem_size.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn loads_a_segment_at_its_physical_address() {
        let mem = create_guest_memory(4 << 20).unwrap();
        let image = load_elf_bytes(&mem, &elf(0x10_0000, b"\xf4\xeb\xfd", 0x2000, 0x10_0000))
            .ok()
            .unwrap();
        assert_eq!(image.entry, GuestAddress(0x10_0000));
        let mut read = [0u8; 3];
        mem.read_slice(&mut read, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&read, b"\xf4\xeb\xfd");
    }

    fn reason(result: Result<LoadedImage, Bad>) -> String {
        match result {
            Ok(_) => "loaded".into(),
            Err(bad) => bad.with_path(Path::new("x")).to_string(),
        }
    }

    #[test]
    fn refuses_images_that_do_not_fit() {
        let mem = create_guest_memory(4 << 20).unwrap();
        assert!(reason(load_elf_bytes(&mem, b"not an elf at all")).contains("no ELF magic"));
        assert!(reason(load_elf_bytes(&mem, &elf(0x9000, b"x", 1, 0x9000))).contains("boot area"));
        assert!(reason(load_elf_bytes(
            &mem,
            &elf(0x3F_F000, b"x", 0x2000, 0x3F_F000)
        ))
        .contains("does not fit"));
        assert!(
            reason(load_elf_bytes(&mem, &elf(u64::MAX - 1, b"x", 8, 0))).contains("does not fit")
        );
        assert!(
            reason(load_elf_bytes(&mem, &elf(0x10_0000, b"x", 1, 0x50_0000)))
                .contains("entry point")
        );
        let mut truncated = elf(0x10_0000, b"payload", 7, 0x10_0000);
        truncated.truncate(truncated.len() - 3);
        assert!(reason(load_elf_bytes(&mem, &truncated)).contains("past the end"));
        let mut many_headers = elf(0x10_0000, b"x", 1, 0x10_0000);
        many_headers[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(reason(load_elf_bytes(&mem, &many_headers)).contains("past the end"));
    }
}
