//! virtio-blk over a host file.
//!
//! Requests complete synchronously, at the exit that notified the queue: the data moves
//! between the file and guest memory while the vCPU is stopped.

use super::{
    next_chain, read_config_bytes, validate_chain, DeviceBroken, QueueSet, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::inputs::Inputs;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Opening the backing file failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file cannot be opened read-write.
    #[error("cannot open disk image {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a whole number of sectors.
    #[error("disk image {path} is {len} bytes, not a multiple of {SECTOR_SIZE}")]
    Size {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
}

/// The request header at the start of every chain.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct RequestHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

// SAFETY: RequestHeader is repr(C), plain integers, no padding (4 + 4 + 8 bytes), so every
// byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// Counters of a block device.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockStats {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Requests that failed with an I/O error status.
    pub errors: u64,
}

/// A virtio-blk device backed by a file (or, in replay, by the log alone).
pub struct Block {
    file: Option<File>,
    /// A backup's shared disk, opened when the backup goes live.
    standby: Option<PathBuf>,
    capacity_sectors: u64,
    config: [u8; 24],
    /// Counters.
    pub stats: BlockStats,
}

/// What GET_ID answers: the same on every replica, so it is not an input to log.
const DISK_ID: &[u8; 20] = b"ftvm-disk\0\0\0\0\0\0\0\0\0\0\0";

impl Block {
    /// Opens `path` read-write as the disk.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let open_error = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_error)?;
        let len = file.metadata().map_err(open_error)?.len();
        if len % SECTOR_SIZE != 0 {
            return Err(BlockError::Size {
                path: path.to_owned(),
                len,
            });
        }
        Ok(Self::with_backend(Some(file), len / SECTOR_SIZE))
    }

    /// A disk of `capacity_sectors` without a file: every read and completion comes from
    /// the log being replayed, and writes are dropped.
    pub fn for_replay(capacity_sectors: u64) -> Self {
        Self::with_backend(None, capacity_sectors)
    }

    /// A backup's disk: like [`Block::for_replay`] while replaying, and `standby` (the
    /// shared disk) is opened the first time a live input needs it, when the backup goes
    /// live.
    pub fn standby(capacity_sectors: u64, standby: PathBuf) -> Self {
        Block {
            standby: Some(standby),
            ..Self::with_backend(None, capacity_sectors)
        }
    }

    fn with_backend(file: Option<File>, capacity_sectors: u64) -> Self {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // seg_max at 12: the queue size bounds a chain anyway.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block {
            file,
            standby: None,
            capacity_sectors,
            config,
            stats: BlockStats::default(),
        }
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Executes one request; returns the status byte and the bytes written into the guest.
    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut Reader<'_>,
        data: &mut Writer<'_>,
        inputs: &mut Inputs,
    ) -> (u8, u32) {
        match header.kind {
            VIRTIO_BLK_T_IN => {
                self.stats.reads += 1;
                let len = data.available_bytes();
                let Some(offset) = self.checked_offset(header.sector, len as u64) else {
                    return self.io_error("read", header.sector);
                };
                let (file, standby) = (&mut self.file, &self.standby);
                let (status, bytes) =
                    inputs.disk_read(|| match read_file(backing(file, standby), offset, len) {
                        Ok(bytes) => (VIRTIO_BLK_S_OK, bytes),
                        Err(_) => (VIRTIO_BLK_S_IOERR, Vec::new()),
                    });
                if status != VIRTIO_BLK_S_OK
                    || bytes.len() != len
                    || data.write_all(&bytes).is_err()
                {
                    return self.io_error("read", header.sector);
                }
                (VIRTIO_BLK_S_OK, len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                self.stats.writes += 1;
                let len = reader.available_bytes();
                let Some(offset) = self.checked_offset(header.sector, len as u64) else {
                    return self.io_error("write", header.sector);
                };
                let mut bytes = vec![0u8; len];
                if reader.read_exact(&mut bytes).is_err() {
                    return self.io_error("write", header.sector);
                }
                let (file, standby) = (&mut self.file, &self.standby);
                let status = inputs.disk_done(|| {
                    match backing(file, standby).map(|file| file.write_all_at(&bytes, offset)) {
                        Some(Ok(())) => VIRTIO_BLK_S_OK,
                        _ => VIRTIO_BLK_S_IOERR,
                    }
                });
                self.finish("write", header.sector, status)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                let (file, standby) = (&mut self.file, &self.standby);
                let status =
                    inputs.disk_done(|| match backing(file, standby).map(File::sync_data) {
                        Some(Ok(())) => VIRTIO_BLK_S_OK,
                        _ => VIRTIO_BLK_S_IOERR,
                    });
                self.finish("flush", 0, status)
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = data.available_bytes().min(DISK_ID.len());
                match data.write_all(&DISK_ID[..len]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(_) => self.io_error("get id", 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn finish(&mut self, what: &str, sector: u64, status: u8) -> (u8, u32) {
        if status == VIRTIO_BLK_S_OK {
            (VIRTIO_BLK_S_OK, 0)
        } else {
            self.io_error(what, sector)
        }
    }

    fn io_error(&mut self, what: &str, sector: u64) -> (u8, u32) {
        self.stats.errors += 1;
        tracing::debug!("virtio-blk: {what} at sector {sector} failed");
        (VIRTIO_BLK_S_IOERR, 0)
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors on the disk.
    fn checked_offset(&self, sector: u64, len: u64) -> Option<u64> {
        let sectors = len
            .is_multiple_of(SECTOR_SIZE)
            .then_some(len / SECTOR_SIZE)?;
        let end = sector.checked_add(sectors)?;
        (end <= self.capacity_sectors).then_some(sector * SECTOR_SIZE)
    }
}

/// The backing file; a backup's standby disk is opened the first time a live request
/// needs it (when it has gone live).
fn backing<'a>(file: &'a mut Option<File>, standby: &Option<PathBuf>) -> Option<&'a File> {
    if file.is_none() {
        if let Some(path) = standby {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                Ok(opened) => {
                    tracing::warn!("virtio blk: live on the shared disk {}", path.display());
                    *file = Some(opened);
                }
                Err(err) => tracing::error!(
                    "virtio blk: cannot open the shared disk {}: {err}",
                    path.display()
                ),
            }
        }
    }
    file.as_ref()
}

fn read_file(file: Option<&File>, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = file.ok_or_else(|| std::io::Error::other("no backing file"))?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_SEG_MAX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        let queue = queues
            .get_mut(index)
            .ok_or_else(|| DeviceBroken::BadQueue {
                queue: index,
                what: "no such queue".into(),
            })?;
        let mut used = 0;
        let bad_queue = |err: virtio_queue::Error| DeviceBroken::BadQueue {
            queue: index,
            what: err.to_string(),
        };
        while let Some(chain) = next_chain(queue, mem, index)? {
            let head = chain.head_index();
            let shape = validate_chain(&chain, mem)?;
            let malformed = |what| DeviceBroken::MalformedRequest { head, what };
            if shape.writable == 0 {
                return Err(malformed("no writable status byte"));
            }
            let mut reader =
                Reader::new(mem, chain.clone()).map_err(|_| malformed("unreadable buffers"))?;
            let mut writer =
                Writer::new(mem, chain).map_err(|_| malformed("unwritable buffers"))?;
            let header: RequestHeader = reader
                .read_obj()
                .map_err(|_| malformed("header shorter than 16 bytes"))?;
            let mut status = writer
                .split_at(writer.available_bytes() - 1)
                .map_err(|_| malformed("cannot split off the status byte"))?;
            let (code, written) = self.execute(header, &mut reader, &mut writer, inputs);
            status
                .write_all(&[code])
                .map_err(|_| malformed("status byte not writable"))?;
            queue.add_used(mem, head, written + 1).map_err(bad_queue)?;
            used |= 1 << index;
        }
        Ok(used)
    }
}
