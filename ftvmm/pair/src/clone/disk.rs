//! A private disk in a clone stream (docs/snapshot.md, "Private disks").
//!
//! ```text
//! pre-copy (guest running):  DSKC per block: round 1 every block of the file's data
//!                            extents that is not all zeros; then rounds of the blocks the
//!                            guest wrote since the round before (zeros sent as such)
//! after STOP (guest stopped): DSKC of the blocks written since the last round, DFIN
//!                            (the copy is complete: both sides digest their disk now, at
//!                            the same time), then DEND: blocks sent with the guest
//!                            stopped, the source's digest
//! ```
//!
//! A DSKC payload is the block's index (u64) and its bytes, or nothing more for a block of
//! zeros. DEND carries the count of blocks sent with the guest stopped and the source
//! disk's digest ([`PrivateDisk::digest`]); the new backup digests its own copy before it
//! confirms, so a block the dirty tracking missed fails the clone instead of waiting for
//! a read to diverge. The receiver starts from an empty (all holes) file and writes only
//! what arrives, so unwritten regions stay holes.

use super::CloneError;
use crate::view::DiskCopyCounter;
use ftvm_machine::devices::virtio::block::copy::{PrivateDisk, COPY_BLOCK};
use ftvm_machine::snapshot::{frame_section, Decoder, Encoder, Section, SnapshotError};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most dirty-block rounds after the first.
const MAX_DIRTY_ROUNDS: u32 = 8;
/// A dirty round that sent at most this many blocks (4 MiB) ends the disk's pre-copy.
const CONVERGED_BLOCKS: u64 = 64;

/// What the disk's part of a clone took.
#[derive(Debug, Clone, Default)]
pub struct DiskCopyStats {
    /// Blocks sent by each pre-copy round (the first: the data found on the disk).
    pub round_blocks: Vec<u64>,
    /// Blocks sent with the guest stopped.
    pub final_blocks: u64,
    /// Of the pause: sending those blocks.
    pub final_pass: Duration,
    /// Of the pause: the source disk's digest.
    pub digest: Duration,
    /// Bytes of disk data sent in all.
    pub bytes: u64,
}

/// The source's side: sends the disk's blocks and counts them for the status line.
pub struct DiskSender {
    disk: PrivateDisk,
    counter: Arc<DiskCopyCounter>,
    buffer: Vec<u8>,
    /// What was sent so far.
    pub stats: DiskCopyStats,
}

impl Drop for DiskSender {
    fn drop(&mut self) {
        // Made or abandoned: no copy under way any more.
        self.counter.over.store(true, Ordering::Release);
    }
}

impl DiskSender {
    /// A sender of `disk`, counting into `counter`.
    pub fn new(disk: PrivateDisk, counter: Arc<DiskCopyCounter>) -> DiskSender {
        DiskSender {
            disk,
            counter,
            buffer: Vec::with_capacity(COPY_BLOCK as usize),
            stats: DiskCopyStats::default(),
        }
    }

    /// Sends `blocks`; a block of zeros is skipped when `skip_zeros` (the first round: the
    /// receiver's copy is all holes) and sent as zeros otherwise. Returns the blocks sent.
    fn send(
        &mut self,
        blocks: &[u64],
        skip_zeros: bool,
        out: &mut dyn Write,
    ) -> Result<u64, CloneError> {
        let mut sent = 0;
        for &block in blocks {
            let zeros = self.disk.read_block(block, &mut self.buffer)?;
            if zeros && skip_zeros {
                continue;
            }
            let mut section = Encoder::new();
            section.u64(block);
            if !zeros {
                section.fixed(&self.buffer);
            }
            out.write_all(&frame_section(*b"DSKC", 1, section.as_bytes())?)?;
            let bytes = if zeros { 0 } else { self.buffer.len() as u64 };
            self.stats.bytes += bytes;
            self.counter.copied.fetch_add(bytes, Ordering::Relaxed);
            sent += 1;
        }
        Ok(sent)
    }

    /// The pre-copy, with the guest running: every block holding data, then rounds of the
    /// blocks written meanwhile until few are left.
    pub fn precopy(&mut self, out: &mut dyn Write) -> Result<(), CloneError> {
        // Marks from here on: any block written after this is sent again.
        self.disk.start_tracking();
        let blocks = self.disk.data_blocks()?;
        self.counter
            .data
            .store(blocks.len() as u64 * COPY_BLOCK, Ordering::Relaxed);
        let sent = self.send(&blocks, true, out)?;
        self.stats.round_blocks.push(sent);
        let mut previous = u64::MAX;
        for _ in 0..MAX_DIRTY_ROUNDS {
            let dirty = self.disk.take_dirty();
            let sent = self.send(&dirty, false, out)?;
            self.stats.round_blocks.push(sent);
            if sent <= CONVERGED_BLOCKS || sent >= previous {
                break;
            }
            previous = sent;
        }
        Ok(())
    }

    /// The final pass, with the guest stopped: the blocks written since the last round,
    /// then DEND with the digest of the whole disk.
    pub fn finish(&mut self, out: &mut dyn Write) -> Result<(), CloneError> {
        let started = Instant::now();
        let dirty = self.disk.take_dirty();
        self.stats.final_blocks = self.send(&dirty, false, out)?;
        // The new backup digests its copy while this side digests the original.
        out.write_all(&frame_section(*b"DFIN", 1, &[])?)?;
        out.flush()?;
        self.stats.final_pass = started.elapsed();
        let started = Instant::now();
        let (count, hash) = self.disk.digest()?;
        self.stats.digest = started.elapsed();
        let mut end = Encoder::new();
        end.u64(self.stats.final_blocks);
        end.u64(count);
        end.u64(hash);
        out.write_all(&frame_section(*b"DEND", 1, end.as_bytes())?)?;
        Ok(())
    }
}

/// The receiver's side: writes a DSKC section's block to `disk`.
pub fn receive_block(disk: &PrivateDisk, section: &Section) -> Result<(), CloneError> {
    if section.version != 1 {
        return Err(SnapshotError::UnsupportedVersion {
            section: "DSKC".into(),
            found: section.version,
            supported: 1,
        }
        .into());
    }
    let mut input = Decoder::new(section.tag, &section.payload);
    let block = input.u64("block")?;
    let data = input.take(input.remaining(), "block bytes")?;
    let zeros;
    let data = if data.is_empty() {
        let len = disk
            .size()
            .saturating_sub(block.saturating_mul(COPY_BLOCK))
            .min(COPY_BLOCK);
        zeros = vec![0u8; len as usize];
        &zeros[..]
    } else {
        data
    };
    disk.write_block(block, data)
        .map_err(|err| input.invalid(format!("block {block}: {err}")).into())
}

/// The receiver's side, at DFIN: the digest of this replica's own copy.
pub fn digest_copy(disk: &PrivateDisk, section: &Section) -> Result<(u64, u64), CloneError> {
    if section.version != 1 || !section.payload.is_empty() {
        return Err(SnapshotError::UnsupportedVersion {
            section: "DFIN".into(),
            found: section.version,
            supported: 1,
        }
        .into());
    }
    Ok(disk.digest()?)
}

/// The receiver's side: checks DEND against `own`, the digest of this replica's own copy.
/// Returns the blocks the source sent with its guest stopped.
pub fn check_end(own: (u64, u64), section: &Section) -> Result<u64, CloneError> {
    if section.version != 1 {
        return Err(SnapshotError::UnsupportedVersion {
            section: "DEND".into(),
            found: section.version,
            supported: 1,
        }
        .into());
    }
    let mut input = Decoder::new(section.tag, &section.payload);
    let final_blocks = input.u64("final blocks")?;
    let expected = (input.u64("blocks with data")?, input.u64("digest")?);
    input.finish()?;
    if own != expected {
        return Err(SnapshotError::Mismatch(format!(
            "the disk copy: {} blocks with data, digest {:#018x} here; {} blocks, digest {:#018x} on the primary",
            own.0, own.1, expected.0, expected.1
        ))
        .into());
    }
    Ok(final_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_machine::devices::virtio::block::Block;

    fn private_disk(tag: &str, size: u64) -> (std::path::PathBuf, Block) {
        let path =
            std::env::temp_dir().join(format!("ftvm-clonedisk-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        (path.clone(), Block::private(&path, false).unwrap())
    }

    fn apply(stream: &[u8], disk: &PrivateDisk) -> Result<Option<u64>, CloneError> {
        let mut input = stream;
        let (mut end, mut own) = (None, None);
        while let Some(section) = Section::read(&mut input)? {
            match &section.tag {
                b"DSKC" => receive_block(disk, &section)?,
                b"DFIN" => own = Some(digest_copy(disk, &section)?),
                b"DEND" => end = Some(check_end(own.expect("DFIN before DEND"), &section)?),
                _ => panic!("unexpected section"),
            }
        }
        Ok(end)
    }

    #[test]
    fn a_disk_copied_in_rounds_ends_equal_and_a_missed_block_fails_the_digest() {
        let size = 256 * COPY_BLOCK;
        let (source_path, source) = private_disk("source", size);
        let (copy_path, copy) = private_disk("copy", size);
        let (source, copy) = (source.private_disk().unwrap(), copy.private_disk().unwrap());
        let counter = Arc::new(DiskCopyCounter::default());
        source
            .write_block(5, &vec![1u8; COPY_BLOCK as usize])
            .unwrap();
        source
            .write_block(200, &vec![2u8; COPY_BLOCK as usize])
            .unwrap();
        let mut sender = DiskSender::new(source.clone(), counter.clone());
        let mut stream = Vec::new();
        sender.precopy(&mut stream).unwrap();
        // Round 1 sent the two blocks with data, no hole.
        assert_eq!(sender.stats.round_blocks[0], 2);
        assert_eq!(counter.copied.load(Ordering::Relaxed), 2 * COPY_BLOCK);
        copy.discard().unwrap();
        assert_eq!(apply(&stream, &copy).unwrap(), None);
        // Written while "the guest runs", as the device marks them: one rewritten, one
        // zeroed.
        source
            .write_block(7, &vec![3u8; COPY_BLOCK as usize])
            .unwrap();
        source
            .write_block(5, &vec![0u8; COPY_BLOCK as usize])
            .unwrap();
        source.mark_written(7 * COPY_BLOCK, COPY_BLOCK);
        source.mark_written(5 * COPY_BLOCK, COPY_BLOCK);
        stream.clear();
        sender.finish(&mut stream).unwrap();
        assert_eq!(sender.stats.final_blocks, 2);
        assert_eq!(apply(&stream, &copy).unwrap(), Some(2));
        assert_eq!(copy.digest().unwrap(), source.digest().unwrap());
        // A write nobody marked: the end's digest refuses the copy.
        source
            .write_block(9, &vec![4u8; COPY_BLOCK as usize])
            .unwrap();
        stream.clear();
        sender.finish(&mut stream).unwrap();
        let refused = apply(&stream, &copy).unwrap_err();
        assert!(
            crate::clone::one_line(&refused).contains("the disk copy"),
            "{refused:?}"
        );
        drop(sender);
        assert!(counter.over.load(Ordering::Acquire));
        std::fs::remove_file(source_path).ok();
        std::fs::remove_file(copy_path).ok();
    }
}
