//! virtio-blk over a host file.
//!
//! Reads complete at the exit that notified the queue: the data moves from the file into
//! guest memory while the vCPU is stopped. Writes and flushes do too, except on the
//! primary of an FT pair, where they are outputs under the output rule: the log channel
//! holds them until the backup has acknowledged the log up to the exit that submitted
//! them, performs them on its own thread, and the device completes them at a later exit
//! (a `DiskComplete` event in the log). A backup keeps such requests in flight until the
//! log completes them; if it goes live first, it re-issues them (rewriting the same data
//! is harmless, and the primary never acknowledged them to the guest).
//!
//! A completed write is not durable until a flush: the primary's writes may sit in its
//! host's page cache, which dies with the host. So a backup also keeps the writes the log
//! completed since the last completed flush, and re-issues them too when it goes live,
//! before the requests still in flight: the guest was told they happened, and the flush
//! it issues next must cover them. A clone source syncs the disk before the final copy,
//! so a new backup starts from durable writes.
//!
//! A private disk (`--disk-private`) is each replica's own copy: writes and flushes are
//! internal state, done at once on every replica (a backup applies them in log order),
//! and a read is logged as the CRC of what was read; a backup reads its own copy and
//! compares. Nothing is held or re-issued, and [`copy`] lets a clone copy the disk.

use super::disk_file::DiskFile;
use super::{
    read_config_bytes, validate_chain, Available, DeviceBroken, QueueSet, VirtioDevice,
    MAX_CHAIN_BYTES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::inputs::{DiskOutput, Inputs};
use crate::memory::{GuestMemoryMmap, GuestSlice};
use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use copy::{DirtyBlocks, PrivateDisk};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Bytes of requests one look at the queue takes; what is left waits for the next exit
/// (each exit looks again), so the work of an exit and the log it writes stay bounded.
const LOOK_BUDGET: u64 = 64 << 20;
/// Bytes of writes without a flush after which a write also syncs the disk. Every replica
/// decides it alike from the guest's requests, so a backup knows which writes the primary
/// made durable: its list of writes to re-issue at go-live stays bounded by this (plus the
/// one write) even for a guest that never flushes.
const SYNC_EVERY_BYTES: u64 = 64 << 20;

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
    /// The completion notifier cannot be made.
    #[error("cannot create the disk's completion eventfd")]
    EventFd(#[source] std::io::Error),
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
    /// Writes and flushes that completed after the exit that submitted them (held for the
    /// output rule, or replayed from a primary that held them).
    pub held: u64,
    /// Requests a backup re-issued when it went live.
    pub reissued: u64,
}

/// A write or flush, which may complete after the exit that submitted it.
#[derive(Debug)]
enum DiskRequest {
    /// `sync`: made durable, with every write done before it, before it completes.
    Write {
        offset: u64,
        data: Vec<u8>,
        sync: bool,
    },
    Flush,
}

impl Submitted {
    fn now((code, written): (u8, u32)) -> Self {
        Submitted::Now(code, written)
    }
}

impl DiskRequest {
    fn what(&self) -> &'static str {
        match self {
            DiskRequest::Write { .. } => "write",
            DiskRequest::Flush => "flush",
        }
    }

    /// Does the request on `file`; returns the virtio-blk status.
    fn perform(&self, file: Option<&DiskFile>) -> u8 {
        let Some(file) = file else {
            return VIRTIO_BLK_S_IOERR;
        };
        let done = match self {
            DiskRequest::Write { offset, data, sync } => file
                .write_at(data, *offset)
                .and_then(|()| if *sync { file.sync() } else { Ok(()) }),
            DiskRequest::Flush => file.sync(),
        };
        if done.is_ok() {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// Completions of held requests, reported by the log channel's thread that performed them.
struct Completions {
    done: Mutex<VecDeque<(u64, u8)>>,
    /// Written once per completion: wakes a halted guest.
    wake: EventFd,
    /// Writes to `wake` so far, counted after each write: the vCPU thread reads the
    /// eventfd only when this passed what it drained, not at every exit.
    signaled: AtomicU64,
}

impl Completions {
    fn push(&self, request: u64, status: u8) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((request, status));
        // A full counter still wakes the vCPU thread; nothing else to do about it.
        let _ = self.wake.write(1);
        self.signaled.fetch_add(1, Ordering::Release);
    }

    fn pop(&self) -> Option<(u64, u8)> {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// A request submitted to the guest's view but not completed yet.
struct InFlight {
    /// Its number (see [`ftvm_log::Event::DiskComplete`]).
    number: u64,
    head: u16,
    /// The chain's status byte, written at completion.
    status_addr: GuestAddress,
    /// What a backup re-issues if it goes live before the log completes the request.
    reissue: Option<DiskRequest>,
    /// Completions the log had reported when this request was submitted (a flush covers
    /// the writes completed before it was submitted).
    completed_before: u64,
}

/// A write the log completed on a backup, kept until a flush covers it.
struct Unflushed {
    /// Its request number.
    number: u64,
    /// The write, to re-issue.
    request: DiskRequest,
    /// The count of completions, this one included.
    completion: u64,
}

/// A virtio-blk device backed by a file (or, in replay, by the log alone).
pub struct Block {
    file: Option<Arc<DiskFile>>,
    /// A private disk's marks of the blocks written (see [`copy`]); `None` for a shared
    /// disk.
    private: Option<Arc<DirtyBlocks>>,
    /// A backup's shared disk, used once the backup goes live.
    standby: Option<StandbyDisk>,
    capacity_sectors: u64,
    config: [u8; 24],
    /// Requests that complete after their exit, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The number the next such request gets.
    next_number: u64,
    /// Completion signals read from the eventfd so far.
    drained: u64,
    /// Held requests completed so far.
    completed: u64,
    /// A backup's writes completed since the last completed flush (or synced write),
    /// oldest first.
    unflushed: VecDeque<Unflushed>,
    /// Bytes written since the last flush or synced write ([`SYNC_EVERY_BYTES`]).
    since_flush: u64,
    completions: Arc<Completions>,
    /// Counters.
    pub stats: BlockStats,
}

/// What became of one request at the exit that submitted it.
enum Submitted {
    /// Completed: status byte and bytes written into the guest's buffers.
    Now(u8, u32),
    /// Completes later (held, or replayed from a primary that held it).
    Later(Option<DiskRequest>),
}

/// What GET_ID answers: the same on every replica, so it is not an input to log.
const DISK_ID: &[u8; 20] = b"ftvm-disk\0\0\0\0\0\0\0\0\0\0\0";

impl Block {
    /// Opens `path` read-write as the disk; `cache_in_process` keeps writes in this
    /// process until the guest flushes (a testing aid, see [`DiskFile`]).
    pub fn open(path: &Path, cache_in_process: bool) -> Result<Self, BlockError> {
        let (file, sectors) = open_sized(path, DiskFile::open(path, cache_in_process))?;
        Self::with_backend(Some(file), sectors)
    }

    /// Opens `path` as this replica's own copy of a private disk (see the module doc);
    /// `overlay` (a replay of a recording on a copy of the disk) keeps the writes in this
    /// process and never writes the file.
    pub fn private(path: &Path, overlay: bool) -> Result<Self, BlockError> {
        let opened = if overlay {
            DiskFile::open_overlay(path)
        } else {
            DiskFile::open(path, false)
        };
        let (file, sectors) = open_sized(path, opened)?;
        Ok(Block {
            private: Some(Arc::new(DirtyBlocks::new(sectors * SECTOR_SIZE))),
            ..Self::with_backend(Some(file), sectors)?
        })
    }

    /// What a clone needs of a private disk; `None` for a shared disk.
    pub fn private_disk(&self) -> Option<PrivateDisk> {
        let (file, dirty) = (self.file.as_ref()?, self.private.as_ref()?);
        Some(PrivateDisk::new(
            file.clone(),
            dirty.clone(),
            self.capacity_sectors * SECTOR_SIZE,
        ))
    }

    /// Whether the disk is this replica's own copy.
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// A disk of `capacity_sectors` without a file: every read and completion comes from
    /// the log being replayed, and writes are dropped.
    pub fn for_replay(capacity_sectors: u64) -> Result<Self, BlockError> {
        Self::with_backend(None, capacity_sectors)
    }

    /// A backup's disk: like [`Block::for_replay`] while replaying, and `standby` (the
    /// shared disk) is used from the first live input on, when the backup goes live. It
    /// is opened now: a missing disk is reported at start, and a replica that drops its
    /// privileges once set up (`--run-as`) needs no right to open it later.
    pub fn standby(capacity_sectors: u64, standby: PathBuf) -> Result<Self, BlockError> {
        let file = DiskFile::open(&standby, false).map_err(|source| BlockError::Open {
            path: standby.clone(),
            source,
        })?;
        Ok(Block {
            standby: Some(StandbyDisk {
                path: standby,
                file: Some(file),
            }),
            ..Self::with_backend(None, capacity_sectors)?
        })
    }

    fn with_backend(file: Option<DiskFile>, capacity_sectors: u64) -> Result<Self, BlockError> {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // seg_max at 12: the queue size bounds a chain anyway.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            file: file.map(Arc::new),
            private: None,
            standby: None,
            capacity_sectors,
            config,
            in_flight: VecDeque::new(),
            next_number: 0,
            drained: 0,
            completed: 0,
            unflushed: VecDeque::new(),
            since_flush: 0,
            completions: Arc::new(Completions {
                done: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
                signaled: AtomicU64::new(0),
            }),
            stats: BlockStats::default(),
        })
    }

    /// Capacity in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Makes every write completed so far durable (a clone source, before its final copy).
    pub fn sync(&self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync(),
            None => Ok(()),
        }
    }

    /// Executes one request, or submits it to complete later.
    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut Reader<'_, GuestSlice<'_>>,
        data: &mut Writer<'_, GuestSlice<'_>>,
        inputs: &mut Inputs,
    ) -> Submitted {
        let (code, written) = match header.kind {
            VIRTIO_BLK_T_IN => {
                self.stats.reads += 1;
                let len = data.available_bytes();
                let Some(offset) = self.checked_offset(header.sector, len as u64) else {
                    return Submitted::now(self.io_error("read", header.sector));
                };
                let (file, standby) = (&mut self.file, &mut self.standby);
                let read = || match read_file(backing(file, standby), offset, len) {
                    Ok(bytes) => (VIRTIO_BLK_S_OK, bytes),
                    Err(_) => (VIRTIO_BLK_S_IOERR, Vec::new()),
                };
                let (status, bytes) = if self.private.is_some() {
                    inputs.disk_read_own(read)
                } else {
                    inputs.disk_read(read)
                };
                if status != VIRTIO_BLK_S_OK
                    || bytes.len() != len
                    || data.write_all(&bytes).is_err()
                {
                    return Submitted::now(self.io_error("read", header.sector));
                }
                (VIRTIO_BLK_S_OK, len as u32)
            }
            VIRTIO_BLK_T_OUT => {
                self.stats.writes += 1;
                let len = reader.available_bytes();
                let Some(offset) = self.checked_offset(header.sector, len as u64) else {
                    return Submitted::now(self.io_error("write", header.sector));
                };
                let mut bytes = vec![0u8; len];
                if reader.read_exact(&mut bytes).is_err() {
                    return Submitted::now(self.io_error("write", header.sector));
                }
                self.since_flush += len as u64;
                let sync = self.since_flush >= SYNC_EVERY_BYTES;
                if sync {
                    self.since_flush = 0;
                }
                return self.submit(
                    DiskRequest::Write {
                        offset,
                        data: bytes,
                        sync,
                    },
                    inputs,
                );
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                self.since_flush = 0;
                return self.submit(DiskRequest::Flush, inputs);
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = data.available_bytes().min(DISK_ID.len());
                match data.write_all(&DISK_ID[..len]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(_) => self.io_error("get id", 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        Submitted::Now(code, written)
    }

    /// A write or flush: done now (live, recording to a file, replaying a primary that did
    /// it at this exit), or held by the log channel (a pair's primary), or left for the log
    /// to complete (a backup).
    fn submit(&mut self, request: DiskRequest, inputs: &mut Inputs) -> Submitted {
        let what = request.what();
        if let Some(dirty) = &self.private {
            let file = self.file.as_deref();
            let status = inputs.disk_write_own(|| {
                let status = request.perform(file);
                if let (VIRTIO_BLK_S_OK, DiskRequest::Write { offset, data, .. }) =
                    (status, &request)
                {
                    dirty.mark(*offset, data.len() as u64);
                }
                status
            });
            return Submitted::now(self.finish(what, 0, status));
        }
        let number = self.next_number;
        if !inputs.is_replay() {
            // A backup that went live opens its standby disk on first use: a request the
            // log channel holds must find it open (a live backup cloned into a new pair
            // before it touched its disk would otherwise fail every held write).
            backing(&mut self.file, &mut self.standby);
        }
        let (shared_file, completions) = (self.file.clone(), self.completions.clone());
        let (file, standby) = (&mut self.file, &mut self.standby);
        let output = inputs.disk_output(
            request,
            |request| request.perform(backing(file, standby)),
            move |request| {
                let bytes = match &request {
                    DiskRequest::Write { data, .. } => data.len() as u64,
                    DiskRequest::Flush => 0,
                };
                let action: crate::link::DiskAction = Box::new(move || {
                    completions.push(number, request.perform(shared_file.as_deref()))
                });
                (bytes, action)
            },
        );
        match output {
            DiskOutput::Done(status) => Submitted::now(self.finish(what, 0, status)),
            DiskOutput::Held => Submitted::Later(None),
            DiskOutput::Pending(request) => Submitted::Later(Some(request)),
        }
    }

    /// Completes in-flight request `number` with `status`: writes the status byte and puts
    /// the chain in the used ring. Returns whether the request was in flight.
    fn complete(
        &mut self,
        number: u64,
        status: u8,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        let Some(at) = self.in_flight.iter().position(|f| f.number == number) else {
            return Ok(false);
        };
        let Some(done) = self.in_flight.remove(at) else {
            return Ok(false);
        };
        self.stats.held += 1;
        self.completed += 1;
        // A backup remembers completed writes until a completed flush covers them.
        match done.reissue {
            // The primary synced the disk after this write: it and all before are durable.
            Some(DiskRequest::Write { sync: true, .. }) if status == VIRTIO_BLK_S_OK => {
                self.unflushed.clear();
            }
            Some(request @ DiskRequest::Write { .. }) if status == VIRTIO_BLK_S_OK => {
                self.unflushed.push_back(Unflushed {
                    number,
                    request,
                    completion: self.completed,
                });
            }
            Some(DiskRequest::Flush) if status == VIRTIO_BLK_S_OK => {
                self.unflushed
                    .retain(|write| write.completion > done.completed_before);
            }
            _ => {}
        }
        let code = if status == VIRTIO_BLK_S_OK {
            VIRTIO_BLK_S_OK
        } else {
            self.io_error("held write or flush", 0).0
        };
        // Checked inside RAM when the chain was validated.
        mem.write_obj(code, done.status_addr)
            .map_err(|_| DeviceBroken::MalformedRequest {
                head: done.head,
                what: "status byte not writable",
            })?;
        queue
            .add_used(mem, done.head, 1)
            .map_err(|err| DeviceBroken::BadQueue {
                queue: 0,
                what: err.to_string(),
            })?;
        Ok(true)
    }

    fn finish(&mut self, what: &'static str, sector: u64, status: u8) -> (u8, u32) {
        if status == VIRTIO_BLK_S_OK {
            (VIRTIO_BLK_S_OK, 0)
        } else {
            self.io_error(what, sector)
        }
    }

    fn io_error(&mut self, what: &'static str, sector: u64) -> (u8, u32) {
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

/// The disk `opened` from `path` and its size in sectors, if it is a whole number of them.
fn open_sized(
    path: &Path,
    opened: std::io::Result<DiskFile>,
) -> Result<(DiskFile, u64), BlockError> {
    let open_error = |source| BlockError::Open {
        path: path.to_owned(),
        source,
    };
    let file = opened.map_err(open_error)?;
    let len = file.size().map_err(open_error)?;
    if len % SECTOR_SIZE != 0 {
        return Err(BlockError::Size {
            path: path.to_owned(),
            len,
        });
    }
    Ok((file, len / SECTOR_SIZE))
}

/// A backup's shared disk, opened at start and taken into use when the backup goes live.
struct StandbyDisk {
    path: PathBuf,
    file: Option<DiskFile>,
}

/// The backing file; a backup's standby disk becomes it the first time a live request
/// needs it (when it has gone live).
fn backing<'a>(
    file: &'a mut Option<Arc<DiskFile>>,
    standby: &mut Option<StandbyDisk>,
) -> Option<&'a DiskFile> {
    if file.is_none() {
        if let Some(StandbyDisk {
            path,
            file: opened @ Some(_),
        }) = standby
        {
            tracing::warn!("virtio blk: live on the shared disk {}", path.display());
            *file = opened.take().map(Arc::new);
        }
    }
    file.as_deref()
}

fn read_file(file: Option<&DiskFile>, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = file.ok_or_else(|| std::io::Error::other("no backing file"))?;
    let mut bytes = vec![0u8; len];
    file.read_at(&mut bytes, offset)?;
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
        if !inputs.is_replay() {
            self.redo_after_going_live();
        }
        let mut available = Available::now(queue, mem, index)?;
        let mut taken = 0u64;
        while taken < LOOK_BUDGET {
            let Some(chain) = available.next(queue, mem, index)? else {
                break;
            };
            let head = chain.head_index();
            let shape = validate_chain(&chain, queue, mem)?;
            taken += shape.readable + shape.writable;
            let malformed = |what| DeviceBroken::MalformedRequest { head, what };
            if self.in_flight.iter().any(|request| request.head == head) {
                return Err(malformed("a head submitted again while still in flight"));
            }
            if shape.writable == 0 {
                return Err(malformed("no writable status byte"));
            }
            let mut reader =
                Reader::new(mem, chain.clone()).map_err(|_| malformed("unreadable buffers"))?;
            let chain_for_status = chain.clone();
            let mut writer =
                Writer::new(mem, chain).map_err(|_| malformed("unwritable buffers"))?;
            let header: RequestHeader = reader
                .read_obj()
                .map_err(|_| malformed("header shorter than 16 bytes"))?;
            let mut status = writer
                .split_at(writer.available_bytes() - 1)
                .map_err(|_| malformed("cannot split off the status byte"))?;
            match self.execute(header, &mut reader, &mut writer, inputs) {
                Submitted::Now(code, written) => {
                    status
                        .write_all(&[code])
                        .map_err(|_| malformed("status byte not writable"))?;
                    queue.add_used(mem, head, written + 1).map_err(bad_queue)?;
                    used |= 1 << index;
                }
                Submitted::Later(reissue) => {
                    let status_addr = status_byte(&chain_for_status)
                        .ok_or(malformed("no writable status byte"))?;
                    self.in_flight.push_back(InFlight {
                        number: self.next_number,
                        head,
                        status_addr,
                        reissue,
                        completed_before: self.completed,
                    });
                    self.next_number += 1;
                }
            }
        }
        Ok(used)
    }

    fn poll_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        // Requests a look left for later ([`LOOK_BUDGET`]), taken at this exit; the same
        // on a replay, which looks at the same exits.
        let mut used = 0;
        if let Some(queue) = queues.first() {
            if queue.ready() && Available::now(queue, mem, 0)?.left() > 0 {
                used |= self.process_queue(0, queues, mem, inputs)?;
            }
        }
        Ok(used | self.poll_completions(queues, mem, inputs)?)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.completions.wake.as_raw_fd())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        Block::sync(self)
    }

    fn private_disk(&self) -> Option<PrivateDisk> {
        Block::private_disk(self)
    }

    fn reset(&mut self) {
        self.reset_requests();
    }
}

impl Block {
    /// Completions of held requests, and a backup's re-issues once it went live.
    fn poll_completions(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        if !inputs.is_replay() {
            self.redo_after_going_live();
        }
        // The eventfd is drained before the queue: a completion pushed after this wakes
        // the vCPU thread again. Its count is what the writes added, so the eventfd never
        // stays readable with nothing left to drain (a halted guest would spin).
        let signaled = self.completions.signaled.load(Ordering::Acquire);
        if signaled > self.drained {
            if let Ok(count) = self.completions.wake.read() {
                self.drained += count;
            }
            if self.in_flight.is_empty() {
                // Completions of requests a reset forgot.
                while self.completions.pop().is_some() {}
            }
        }
        if self.in_flight.is_empty() {
            return Ok(0);
        }
        let Some(queue) = queues.get_mut(0) else {
            return Ok(0);
        };
        let mut used = 0;
        loop {
            let (in_flight, completions) = (&self.in_flight, &self.completions);
            // Completions of requests a reset forgot are not the guest's business.
            let next = inputs.disk_complete(|| loop {
                let (number, status) = completions.pop()?;
                if in_flight.iter().any(|f| f.number == number) {
                    return Some((number, status));
                }
            });
            let Some((number, status)) = next else {
                break;
            };
            if self.complete(number, status, queue, mem)? {
                used |= 1;
            } else {
                tracing::error!(
                    "virtio-blk: the log completes request {number}, which is not in flight"
                );
            }
        }
        Ok(used)
    }

    /// The driver reset the device: requests of the old driver never complete (held ones
    /// still reach the disk).
    fn reset_requests(&mut self) {
        self.in_flight.clear();
    }

    /// A backup that went live does again, before anything of its own touches the disk
    /// (a read, a write, a flush, a completion), what the dead primary may not have made
    /// durable, in the order the guest issued it: first the writes the guest was told
    /// completed since its last completed flush (they may have died in the primary's page
    /// cache), then the requests the log never completed. The latter complete like held
    /// requests do (through `completions`, logged as `DiskComplete` for a new backup).
    /// Done later, an old write would overwrite newer data the live guest wrote since.
    fn redo_after_going_live(&mut self) {
        if self.unflushed.is_empty() && !self.in_flight.iter().any(|f| f.reissue.is_some()) {
            return;
        }
        let file = backing(&mut self.file, &mut self.standby);
        for write in std::mem::take(&mut self.unflushed) {
            let status = write.request.perform(file);
            self.stats.reissued += 1;
            if status == VIRTIO_BLK_S_OK {
                tracing::warn!(
                    "virtio-blk: re-issued completed write request {}, which no flush had covered",
                    write.number
                );
            } else {
                tracing::error!(
                    "virtio-blk: re-issuing completed write request {} failed: the guest was told it completed",
                    write.number
                );
            }
        }
        for request in &mut self.in_flight {
            let Some(reissue) = request.reissue.take() else {
                continue;
            };
            let status = reissue.perform(file);
            self.stats.reissued += 1;
            tracing::warn!(
                "virtio-blk: re-issued {} request {}, which the log did not complete",
                reissue.what(),
                request.number
            );
            self.completions.push(request.number, status);
        }
    }
}

/// The address of a validated chain's status byte: the last byte of its last non-empty
/// descriptor (writable: validation put the writable ones last).
fn status_byte(chain: &DescriptorChain<&GuestMemoryMmap>) -> Option<GuestAddress> {
    chain
        .clone()
        .filter(|desc| desc.len() > 0 && desc.is_write_only())
        .last()
        .map(|desc| GuestAddress(desc.addr().0 + u64::from(desc.len()) - 1))
}

pub mod copy;
mod snapshot;

#[cfg(test)]
mod golive_tests;
