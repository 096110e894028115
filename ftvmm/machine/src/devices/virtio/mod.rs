//! Virtio 1.x devices: a transport-independent device interface, the MMIO transport, and
//! the block and network devices.
//!
//! The guest is untrusted. A descriptor chain that loops, points outside guest memory, puts
//! device-writable buffers before readable ones, or lacks the parts a request needs marks
//! the device broken (`DEVICE_NEEDS_RESET`), with one log line; the VMM and the other
//! devices keep working. Every write into guest memory happens while the vCPU is stopped
//! at an exit (the bounce-buffer rule the log of the next stage depends on).

pub mod block;
pub mod disk_file;
pub mod mmio;
pub mod net;
pub mod takeover;
pub mod tap;

use crate::inputs::Inputs;
use crate::snapshot::Snapshot;
use std::os::fd::RawFd;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// Feature bit: virtio 1.x (modern) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Largest total length of one descriptor chain a device accepts.
pub const MAX_CHAIN_BYTES: u64 = 1 << 24;

// A disk read of a whole chain, plus its status byte, must fit one log frame.
const _: () = assert!(MAX_CHAIN_BYTES < ftvm_log::MAX_PAYLOAD as u64);

/// A bit set of queue indices.
pub type QueueSet = u32;

/// The guest drove the device into a state it cannot continue from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceBroken {
    /// The chain does not end: a loop, a bad `next` index, or an unreadable descriptor.
    #[error("descriptor chain at head {head} does not terminate (loop, bad index, or unreadable descriptor)")]
    UnterminatedChain {
        /// Head index.
        head: u16,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor chain at head {head} puts a readable buffer after a writable one")]
    ReadableAfterWritable {
        /// Head index.
        head: u16,
    },
    /// A descriptor points outside guest RAM.
    #[error("descriptor chain at head {head} points outside guest memory ({addr:#x}+{len:#x})")]
    OutsideMemory {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The chain is longer than [`MAX_CHAIN_BYTES`].
    #[error("descriptor chain at head {head} is {len} bytes long, more than {MAX_CHAIN_BYTES}")]
    TooLong {
        /// Head index.
        head: u16,
        /// Total length.
        len: u64,
    },
    /// The request lacks a part the device needs (a header, a status byte).
    #[error("request at head {head} is malformed: {what}")]
    MalformedRequest {
        /// Head index.
        head: u16,
        /// What is wrong.
        what: &'static str,
    },
    /// The queue rings are not inside guest memory or the available index is impossible.
    #[error("queue {queue} is unusable: {what}")]
    BadQueue {
        /// Queue index.
        queue: usize,
        /// What is wrong.
        what: String,
    },
    /// The backend failed in a way the guest cannot be told about per request.
    #[error("backend failure: {0}")]
    Backend(String),
}

/// The shape of a validated descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainShape {
    /// Bytes the device may read (the leading readable descriptors).
    pub readable: u64,
    /// Bytes the device may write (the trailing writable descriptors).
    pub writable: u64,
}

/// The next chain the driver made available on `queue` (number `index`, for errors).
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    index: usize,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceBroken> {
    use virtio_queue::QueueOwnedT;
    let mut available = queue.iter(mem).map_err(|err| DeviceBroken::BadQueue {
        queue: index,
        what: err.to_string(),
    })?;
    Ok(available.next())
}

/// Walks a chain and checks that it terminates, stays in guest memory, is not absurdly
/// long, and has all readable buffers before the writable ones.
pub fn validate_chain<M>(
    chain: &DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Result<ChainShape, DeviceBroken>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut shape = ChainShape {
        readable: 0,
        writable: 0,
    };
    let mut last: Option<Descriptor> = None;
    for desc in chain.clone() {
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            shape.writable += len;
        } else if shape.writable > 0 {
            return Err(DeviceBroken::ReadableAfterWritable { head });
        } else {
            shape.readable += len;
        }
        let total = shape.readable + shape.writable;
        if total > MAX_CHAIN_BYTES {
            return Err(DeviceBroken::TooLong { head, len: total });
        }
        if len > 0 && !range_in_memory(mem, desc.addr().0, len) {
            return Err(DeviceBroken::OutsideMemory {
                head,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        last = Some(desc);
    }
    // The iterator stops early, silently, on loops and bad descriptors: a proper chain ends
    // with a descriptor that has no NEXT flag.
    match last {
        Some(desc) if !desc.has_next() => Ok(shape),
        _ => Err(DeviceBroken::UnterminatedChain { head }),
    }
}

fn range_in_memory(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let Some(last) = addr.checked_add(len - 1) else {
        return false;
    };
    // Guest RAM is one region starting at 0, so checking both ends covers the range.
    mem.address_in_range(GuestAddress(addr)) && mem.address_in_range(GuestAddress(last))
}

/// A virtio device behind any transport. Its [`Snapshot`] is its own state; the queues
/// are the transport's.
pub trait VirtioDevice: Snapshot {
    /// The virtio device ID (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`; returns the queues that got used buffers.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken>;
    /// Delivers backend work (a received packet) at a guest-caused exit; returns the
    /// queues that got used buffers.
    fn poll_backend(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
        _inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        Ok(0)
    }
    /// A file descriptor that becomes readable when the backend has work for the guest.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Makes what the device completed durable on its backend (a disk's writes).
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Fills `data` from the little-endian bytes of `config` at `offset`; bytes past the end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|offset| offset.checked_add(index))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests;
