//! virtio-blk over `virtio-drivers`' MMIO transport and split virtqueue, with
//! non-blocking requests (read, write, FLUSH) so that the main loop never spins:
//! one request is in flight at a time, and its completion is seen by [`Blk::poll`]
//! after the device's interrupt (or any other wake-up).
//!
//! Negotiated features: `VIRTIO_F_VERSION_1` (required), `VIRTIO_BLK_F_FLUSH` and
//! `VIRTIO_BLK_F_RO` when offered; no indirect descriptors, no event index. A request
//! is a chain of three descriptors (header, data, status; two for FLUSH) on queue 0.

use crate::hal::KvHal;
use crate::virtio::{self, Slot};
use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use ftvm_guest::platform::{halt, take_pending_irqs};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::Transport;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Descriptors in the queue (the device's `QueueNumMax` must be at least this).
const QUEUE_SIZE: usize = 8;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read sectors.
    Read,
    /// Wrote sectors.
    Write,
    /// Flushed the device's write cache.
    Flush,
}

/// A failed request: its kind and the status byte the device wrote (0xFF if none).
#[derive(Clone, Copy, Debug)]
pub struct IoError {
    /// The request.
    pub kind: Kind,
    /// `VIRTIO_BLK_S_*` (1 I/O error, 2 unsupported).
    pub status: u8,
}

/// A request the device owns until it shows up in the used ring.
struct Request {
    token: u16,
    kind: Kind,
    header: Box<[u8; 16]>,
    data: Vec<u8>,
    status: Box<[u8; 1]>,
}

/// A virtio-blk device.
pub struct Blk {
    transport: MmioTransport<'static>,
    queue: VirtQueue<KvHal, QUEUE_SIZE>,
    sectors: u64,
    flush: bool,
    read_only: bool,
    inflight: Option<Request>,
    /// This device's bit in `take_pending_irqs()`.
    pub irq_bit: u64,
}

impl Blk {
    /// Brings up the device in `slot`.
    pub fn new(slot: &Slot) -> Result<Blk, &'static str> {
        let mut transport = virtio::transport(slot)?;
        let features = virtio::begin_init(&mut transport, F_FLUSH | F_RO)?;
        let low = transport.read_config_space::<u32>(0);
        let high = transport.read_config_space::<u32>(4);
        let (Ok(low), Ok(high)) = (low, high) else {
            virtio::fail(&mut transport);
            return Err("cannot read the capacity");
        };
        let queue = VirtQueue::new(&mut transport, 0, false, false)
            .map_err(|_| "cannot set up the request queue (QueueNumMax < 8?)")?;
        virtio::finish_init(&mut transport);
        Ok(Blk {
            transport,
            queue,
            sectors: u64::from(low) | (u64::from(high) << 32),
            flush: features & F_FLUSH != 0,
            read_only: features & F_RO != 0,
            inflight: None,
            irq_bit: slot.irq_bit,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.sectors * SECTOR
    }

    /// Whether the device offered `VIRTIO_BLK_F_FLUSH` (so writes must be flushed).
    pub fn has_flush(&self) -> bool {
        self.flush
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Acknowledges the device's interrupt.
    pub fn ack_interrupt(&mut self) {
        self.transport.ack_interrupt();
    }

    /// Starts reading `len` bytes (a multiple of 512, not 0) from `sector`.
    pub fn start_read(&mut self, sector: u64, len: usize) {
        self.start(Kind::Read, T_IN, sector, vec![0; len]);
    }

    /// Starts writing `data` (a multiple of 512 bytes, not empty) at `sector`.
    pub fn start_write(&mut self, sector: u64, data: Vec<u8>) {
        self.start(Kind::Write, T_OUT, sector, data);
    }

    /// Starts a FLUSH (only if the device offered it).
    pub fn start_flush(&mut self) {
        self.start(Kind::Flush, T_FLUSH, 0, Vec::new());
    }

    fn start(&mut self, kind: Kind, type_: u32, sector: u64, data: Vec<u8>) {
        assert!(
            self.inflight.is_none(),
            "virtio-blk request already in flight"
        );
        assert!(
            (data.len() as u64).is_multiple_of(SECTOR),
            "unaligned virtio-blk request"
        );
        let mut header = Box::new([0u8; 16]);
        header[..4].copy_from_slice(&type_.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let mut req = Request {
            token: 0,
            kind,
            header,
            data,
            status: Box::new([0xFF]),
        };
        let header: &[u8] = &req.header[..];
        let status: &mut [u8] = &mut req.status[..];
        // SAFETY: the header, data and status buffers are heap blocks owned by `req`,
        // which is kept in `self.inflight` unchanged until `poll` has popped the
        // chain; moving `req` does not move the heap blocks.
        let token = unsafe {
            match kind {
                Kind::Read => self.queue.add(&[header], &mut [&mut req.data[..], status]),
                Kind::Write => self.queue.add(&[header, &req.data[..]], &mut [status]),
                Kind::Flush => self.queue.add(&[header], &mut [status]),
            }
        }
        .expect("virtio-blk queue full with no request in flight");
        req.token = token;
        self.inflight = Some(req);
        if self.queue.should_notify() {
            self.transport.notify(0);
        }
    }

    /// The in-flight request's result, once the device has completed it: the kind
    /// and the data (read into, or written). `None` while it is still in flight or if
    /// there is none.
    pub fn poll(&mut self) -> Option<Result<(Kind, Vec<u8>), IoError>> {
        let token = self.queue.peek_used()?;
        let mut req = self.inflight.take()?;
        if token != req.token {
            self.inflight = Some(req);
            return Some(Err(IoError {
                kind: Kind::Read,
                status: 0xFE,
            }));
        }
        let header: &[u8] = &req.header[..];
        let status: &mut [u8] = &mut req.status[..];
        // SAFETY: the same buffers, in the same order, as were added in `start`.
        let popped = unsafe {
            match req.kind {
                Kind::Read => {
                    self.queue
                        .pop_used(token, &[header], &mut [&mut req.data[..], status])
                }
                Kind::Write => self
                    .queue
                    .pop_used(token, &[header, &req.data[..]], &mut [status]),
                Kind::Flush => self.queue.pop_used(token, &[header], &mut [status]),
            }
        };
        let status = req.status[0];
        if popped.is_err() || status != S_OK {
            return Some(Err(IoError {
                kind: req.kind,
                status,
            }));
        }
        Some(Ok((req.kind, req.data)))
    }

    /// Waits for the in-flight request, halting between looks (for boot-time I/O,
    /// before any other device is live: it takes all pending interrupt bits; the
    /// timer and the device interrupt wake the guest).
    pub fn wait(&mut self) -> Result<(Kind, Vec<u8>), IoError> {
        loop {
            if take_pending_irqs() & self.irq_bit != 0 {
                self.ack_interrupt();
            }
            if let Some(result) = self.poll() {
                return result;
            }
            halt();
        }
    }

    /// Reads `len` bytes from `sector`, waiting.
    pub fn read(&mut self, sector: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.start_read(sector, len);
        self.wait().map(|(_, data)| data)
    }

    /// Writes `data` at `sector` and flushes, waiting.
    pub fn write_durably(&mut self, sector: u64, data: Vec<u8>) -> Result<(), IoError> {
        self.start_write(sector, data);
        self.wait()?;
        if self.flush {
            self.start_flush();
            self.wait()?;
        }
        Ok(())
    }
}
