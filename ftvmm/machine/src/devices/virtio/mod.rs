//! Virtio 1.x devices: a transport-independent device interface, the MMIO transport, and
//! the block and network devices.
//!
//! The guest is untrusted. A descriptor chain that loops, points outside guest memory, puts
//! device-writable buffers before readable ones, uses an indirect table (not offered), lets
//! the device write onto the queue's own rings, or lacks the parts a request needs marks
//! the device broken (`DEVICE_NEEDS_RESET`), with one log line; the VMM and the other
//! devices keep working. Every write into guest memory happens while the vCPU is stopped
//! at an exit (the bounce-buffer rule the log of the next stage depends on).
//!
//! The work of one exit is bounded: a device takes the chains the driver had made
//! available when it looked ([`Available`]: the available index is read once), so nothing
//! it writes into guest memory can make more appear within the same exit.

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
    /// A descriptor uses an indirect table, a feature the device does not offer.
    #[error("descriptor chain at head {head} uses an indirect table, which was not offered")]
    Indirect {
        /// Head index.
        head: u16,
    },
    /// A device-writable buffer covers one of the queue's own rings: the device would
    /// rewrite the driver's requests while serving them.
    #[error("descriptor chain at head {head} lets the device write onto the queue's own rings ({addr:#x}+{len:#x})")]
    WritesOntoRings {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
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

/// The chains the driver had made available on a queue when the device looked: the
/// available index is read once, so a device write landing on the ring (a disk read into
/// it, say) cannot feed the same exit with new requests; those wait for the next look.
#[derive(Debug, Clone, Copy)]
pub struct Available {
    left: u16,
}

impl Available {
    /// What `queue` (number `index`, for errors) offers now.
    pub fn now(
        queue: &Queue,
        mem: &GuestMemoryMmap,
        index: usize,
    ) -> Result<Available, DeviceBroken> {
        use std::num::Wrapping;
        use virtio_queue::QueueT;
        let bad = |what: String| DeviceBroken::BadQueue { queue: index, what };
        let avail = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|err| bad(err.to_string()))?;
        let left = (avail - Wrapping(queue.next_avail())).0;
        if left > queue.size() {
            return Err(bad(format!(
                "the available index moved {left} entries ahead on a ring of {}",
                queue.size()
            )));
        }
        Ok(Available { left })
    }

    /// How many of those chains are left.
    pub fn left(&self) -> u16 {
        self.left
    }

    /// The next of those chains, if any is left.
    pub fn next<'a>(
        &mut self,
        queue: &mut Queue,
        mem: &'a GuestMemoryMmap,
        index: usize,
    ) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceBroken> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        next_chain(queue, mem, index)
    }
}

/// The next chain the driver made available on `queue` (number `index`, for errors).
fn next_chain<'a>(
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

/// Walks the chain at `chain`'s head in `queue`'s descriptor table and checks that it
/// terminates within the table, stays in guest memory, is not absurdly long, has all
/// readable buffers before the writable ones, uses no indirect table, and never lets the
/// device write onto the queue's own rings.
pub fn validate_chain<M>(
    chain: &DescriptorChain<M>,
    queue: &Queue,
    mem: &GuestMemoryMmap,
) -> Result<ChainShape, DeviceBroken>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    let head = chain.head_index();
    let size = u64::from(queue.size());
    let rings = [
        (queue.desc_table(), 16 * size),
        (queue.avail_ring(), 6 + 2 * size),
        (queue.used_ring(), 6 + 8 * size),
    ];
    let mut shape = ChainShape {
        readable: 0,
        writable: 0,
    };
    let mut index = head;
    // A proper chain ends with a descriptor without NEXT within `size` of them.
    for _ in 0..size {
        if u64::from(index) >= size {
            break;
        }
        let at = queue.desc_table() + 16 * u64::from(index);
        let Ok(desc) = mem.read_obj::<Descriptor>(GuestAddress(at)) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            return Err(DeviceBroken::Indirect { head });
        }
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            shape.writable += len;
            let (start, end) = (desc.addr().0, desc.addr().0.saturating_add(len));
            if len > 0
                && rings
                    .iter()
                    .any(|&(ring, ring_len)| start < ring.saturating_add(ring_len) && ring < end)
            {
                return Err(DeviceBroken::WritesOntoRings {
                    head,
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
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
        if !desc.has_next() {
            return Ok(shape);
        }
        index = desc.next();
    }
    Err(DeviceBroken::UnterminatedChain { head })
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
    /// A private disk, for a clone to copy (see [`block::copy`]).
    fn private_disk(&self) -> Option<block::copy::PrivateDisk> {
        None
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
