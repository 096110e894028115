//! What a clone needs of a private disk (docs/snapshot.md, "Private disks"): the blocks
//! the guest wrote since a point, the blocks that hold data, reading and writing whole
//! blocks, and a digest of the contents that both sides compute from their own files.
//!
//! Dirty blocks are marked after the write reached the file: a copier that takes the
//! marks and then reads a block sees every write whose mark it took, and any write it
//! may have missed marks the block again for the next round.

use super::super::disk_file::DiskFile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of a block, the unit of dirty tracking and of the copy.
pub const COPY_BLOCK: u64 = 64 << 10;

/// FNV-1a's 64-bit prime, to fold block CRCs into a digest.
const FOLD_PRIME: u64 = 0x0000_0100_0000_01B3;
/// FNV-1a's 64-bit offset basis.
const FOLD_START: u64 = 0xcbf2_9ce4_8422_2325;

/// One bit per [`COPY_BLOCK`] of a disk: written since the bits were last taken.
#[derive(Debug)]
pub struct DirtyBlocks {
    words: Vec<AtomicU64>,
}

impl DirtyBlocks {
    /// No block dirty, for a disk of `size` bytes.
    pub fn new(size: u64) -> DirtyBlocks {
        let blocks = size.div_ceil(COPY_BLOCK);
        DirtyBlocks {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// `len` bytes at `offset` were written (call after the write reached the file).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / COPY_BLOCK, (offset + len - 1) / COPY_BLOCK);
        for block in first..=last {
            if let Some(word) = self.words.get((block / 64) as usize) {
                word.fetch_or(1 << (block % 64), Ordering::AcqRel);
            }
        }
    }

    /// The dirty blocks, in order, clearing them.
    pub fn take(&self) -> Vec<u64> {
        let mut blocks = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                blocks.push(index as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
        blocks
    }
}

/// A private disk as a clone sees it, on either side: shared with the device, usable from
/// any thread.
#[derive(Clone, Debug)]
pub struct PrivateDisk {
    file: Arc<DiskFile>,
    dirty: Arc<DirtyBlocks>,
    size: u64,
}

impl PrivateDisk {
    pub(super) fn new(file: Arc<DiskFile>, dirty: Arc<DirtyBlocks>, size: u64) -> PrivateDisk {
        PrivateDisk { file, dirty, size }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks on the disk.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(COPY_BLOCK)
    }

    /// Forgets the writes so far: [`PrivateDisk::take_dirty`] returns the blocks written
    /// after this.
    pub fn start_tracking(&self) {
        self.dirty.take();
    }

    /// Marks `len` bytes at `offset` written, as the device does after each write that
    /// reached the file.
    pub fn mark_written(&self, offset: u64, len: u64) {
        self.dirty.mark(offset, len);
    }

    /// The blocks written since the last call (or [`PrivateDisk::start_tracking`]).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty.take()
    }

    /// The blocks that may hold data: those touching the file's data extents.
    pub fn data_blocks(&self) -> std::io::Result<Vec<u64>> {
        let mut blocks: Vec<u64> = Vec::new();
        for (start, end) in self.file.data_extents()? {
            let (first, last) = (start / COPY_BLOCK, (end - 1) / COPY_BLOCK);
            for block in first..=last.min(self.blocks().saturating_sub(1)) {
                if blocks.last() != Some(&block) {
                    blocks.push(block);
                }
            }
        }
        Ok(blocks)
    }

    /// Bytes of block `index` (the last block may be shorter).
    fn block_len(&self, index: u64) -> Option<usize> {
        let start = index.checked_mul(COPY_BLOCK)?;
        (start < self.size).then(|| (self.size - start).min(COPY_BLOCK) as usize)
    }

    /// Reads block `index` into `buffer` (sized to the block); returns whether it is all
    /// zeros.
    pub fn read_block(&self, index: u64, buffer: &mut Vec<u8>) -> std::io::Result<bool> {
        let len = self.block_len(index).ok_or_else(|| beyond(index))?;
        buffer.resize(len, 0);
        self.file.read_at(buffer, index * COPY_BLOCK)?;
        Ok(buffer.iter().all(|byte| *byte == 0))
    }

    /// Writes block `index` (exactly its length).
    pub fn write_block(&self, index: u64, data: &[u8]) -> std::io::Result<()> {
        match self.block_len(index) {
            Some(len) if len == data.len() => self.file.write_at(data, index * COPY_BLOCK),
            _ => Err(beyond(index)),
        }
    }

    /// Drops the disk's contents: all holes (the receiver, before the copy).
    pub fn discard(&self) -> std::io::Result<()> {
        self.file.discard(self.size)
    }

    /// Makes the copy durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync()
    }

    /// A digest of the disk's contents: the number of blocks that are not all zeros, and
    /// a hash of their indices and CRCs. Holes and written zeros count alike, so a sparse
    /// copy digests like its source. Reads only the data extents.
    pub fn digest(&self) -> std::io::Result<(u64, u64)> {
        let mut buffer = Vec::with_capacity(COPY_BLOCK as usize);
        let (mut count, mut hash) = (0u64, FOLD_START);
        for block in self.data_blocks()? {
            if self.read_block(block, &mut buffer)? {
                continue;
            }
            count += 1;
            hash = (hash ^ block).wrapping_mul(FOLD_PRIME);
            hash = (hash ^ u64::from(crc32fast::hash(&buffer))).wrapping_mul(FOLD_PRIME);
        }
        Ok((count, hash))
    }
}

fn beyond(index: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("block {index} is not a whole block of the disk"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str, size: u64) -> (std::path::PathBuf, PrivateDisk) {
        let path = std::env::temp_dir().join(format!("ftvm-copy-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let file = Arc::new(DiskFile::open(&path, false).unwrap());
        let disk = PrivateDisk::new(file, Arc::new(DirtyBlocks::new(size)), size);
        (path, disk)
    }

    #[test]
    fn dirty_marks_cover_every_block_a_write_touches_and_are_taken_once() {
        let dirty = DirtyBlocks::new(10 * COPY_BLOCK);
        dirty.mark(COPY_BLOCK - 512, 1024);
        dirty.mark(9 * COPY_BLOCK, 512);
        dirty.mark(100 * COPY_BLOCK, 512);
        assert_eq!(dirty.take(), vec![0, 1, 9]);
        assert!(dirty.take().is_empty());
    }

    #[test]
    fn a_sparse_copy_of_written_blocks_digests_like_its_source() {
        let size = 64 * COPY_BLOCK + 4096;
        let (source_path, source) = scratch("source", size);
        let (copy_path, copy) = scratch("copy", size);
        source
            .write_block(3, &vec![7u8; COPY_BLOCK as usize])
            .unwrap();
        source.write_block(64, &[9u8; 4096]).unwrap();
        // Written zeros digest like a hole.
        source
            .write_block(10, &vec![0u8; COPY_BLOCK as usize])
            .unwrap();
        let mut buffer = Vec::new();
        for block in source.data_blocks().unwrap() {
            if !source.read_block(block, &mut buffer).unwrap() {
                copy.write_block(block, &buffer).unwrap();
            }
        }
        assert_eq!(source.digest().unwrap(), copy.digest().unwrap());
        assert_eq!(source.digest().unwrap().0, 2);
        // One byte differs: the digests differ.
        let mut block = vec![7u8; COPY_BLOCK as usize];
        block[100] = 8;
        copy.write_block(3, &block).unwrap();
        assert_ne!(source.digest().unwrap(), copy.digest().unwrap());
        assert!(copy.write_block(65, &[0u8; 512]).is_err());
        std::fs::remove_file(source_path).ok();
        std::fs::remove_file(copy_path).ok();
    }
}
