//! Tests of chain validation against hostile descriptor tables.

use super::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x3800;
const QUEUE_SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memory() -> GuestMemoryMmap {
    crate::memory::create_guest_memory(crate::layout::MEM_MIN).unwrap()
}

/// A ready queue whose descriptor table holds `descs` and whose available ring offers
/// the chains starting at `heads`.
pub(super) fn queue_with(
    mem: &GuestMemoryMmap,
    descs: &[(u64, u32, u16, u16)],
    heads: &[u16],
) -> Queue {
    use virtio_queue::QueueT;
    for (index, (addr, len, flags, next)) in descs.iter().enumerate() {
        let desc = SplitDescriptor::new(*addr, *len, *flags, *next);
        mem.write_obj(desc, GuestAddress(DESC_TABLE + 16 * index as u64))
            .unwrap();
    }
    for (slot, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL_RING + 4 + 2 * slot as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(AVAIL_RING + 2))
        .unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    queue
}

fn chain_of<'a>(
    mem: &'a GuestMemoryMmap,
    descs: &[(u64, u32, u16, u16)],
    head: u16,
) -> DescriptorChain<&'a GuestMemoryMmap> {
    use virtio_queue::QueueT;
    let mut queue = queue_with(mem, descs, &[head]);
    queue.pop_descriptor_chain(mem).unwrap()
}

#[test]
fn well_formed_chain_reports_its_shape() {
    let mem = memory();
    let chain = chain_of(
        &mem,
        &[
            (0x4000, 16, F_NEXT, 1),
            (0x5000, 512, F_NEXT | F_WRITE, 2),
            (0x6000, 1, F_WRITE, 0),
        ],
        0,
    );
    assert_eq!(
        validate_chain(&chain, &mem),
        Ok(ChainShape {
            readable: 16,
            writable: 513
        })
    );
}

#[test]
fn looping_chain_is_refused() {
    let mem = memory();
    let chain = chain_of(&mem, &[(0x4000, 16, F_NEXT, 1), (0x5000, 16, F_NEXT, 0)], 0);
    assert_eq!(
        validate_chain(&chain, &mem),
        Err(DeviceBroken::UnterminatedChain { head: 0 })
    );
}

#[test]
fn next_index_outside_the_table_is_refused() {
    let mem = memory();
    let chain = chain_of(&mem, &[(0x4000, 16, F_NEXT, QUEUE_SIZE + 3)], 0);
    assert_eq!(
        validate_chain(&chain, &mem),
        Err(DeviceBroken::UnterminatedChain { head: 0 })
    );
}

#[test]
fn buffer_outside_guest_memory_is_refused() {
    let mem = memory();
    for addr in [crate::layout::MEM_MIN - 8, u64::MAX - 4, 0xD000_0000] {
        let chain = chain_of(&mem, &[(addr, 16, 0, 0)], 0);
        assert!(
            matches!(
                validate_chain(&chain, &mem),
                Err(DeviceBroken::OutsideMemory { .. })
            ),
            "{addr:#x}"
        );
    }
}

#[test]
fn readable_after_writable_is_refused() {
    let mem = memory();
    let chain = chain_of(
        &mem,
        &[(0x4000, 16, F_NEXT | F_WRITE, 1), (0x5000, 16, 0, 0)],
        0,
    );
    assert_eq!(
        validate_chain(&chain, &mem),
        Err(DeviceBroken::ReadableAfterWritable { head: 0 })
    );
}

#[test]
fn absurd_total_length_is_refused() {
    let mem = memory();
    let chain = chain_of(
        &mem,
        &[(0x4000, u32::MAX, F_NEXT, 1), (0x5000, u32::MAX, 0, 0)],
        0,
    );
    assert!(matches!(
        validate_chain(&chain, &mem),
        Err(DeviceBroken::TooLong { .. })
    ));
}
