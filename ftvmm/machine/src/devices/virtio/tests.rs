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

pub(super) fn live() -> crate::inputs::Inputs {
    crate::inputs::Inputs::new(crate::inputs::Mode::Live)
}

pub(super) fn memory() -> GuestMemoryMmap {
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

/// Validates the chain at `head` of a queue whose table holds `descs`.
fn validated(
    mem: &GuestMemoryMmap,
    descs: &[(u64, u32, u16, u16)],
    head: u16,
) -> Result<ChainShape, DeviceBroken> {
    use virtio_queue::QueueT;
    let mut queue = queue_with(mem, descs, &[head]);
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    validate_chain(&chain, &queue, mem)
}

#[test]
fn well_formed_chain_reports_its_shape() {
    let mem = memory();
    let checked = validated(
        &mem,
        &[
            (0x4000, 16, F_NEXT, 1),
            (0x5000, 512, F_NEXT | F_WRITE, 2),
            (0x6000, 1, F_WRITE, 0),
        ],
        0,
    );
    assert_eq!(
        checked,
        Ok(ChainShape {
            readable: 16,
            writable: 513
        })
    );
}

#[test]
fn looping_chain_is_refused() {
    let mem = memory();
    let checked = validated(&mem, &[(0x4000, 16, F_NEXT, 1), (0x5000, 16, F_NEXT, 0)], 0);
    assert_eq!(checked, Err(DeviceBroken::UnterminatedChain { head: 0 }));
}

#[test]
fn next_index_outside_the_table_is_refused() {
    let mem = memory();
    let checked = validated(&mem, &[(0x4000, 16, F_NEXT, QUEUE_SIZE + 3)], 0);
    assert_eq!(checked, Err(DeviceBroken::UnterminatedChain { head: 0 }));
}

#[test]
fn buffer_outside_guest_memory_is_refused() {
    let mem = memory();
    for addr in [crate::layout::MEM_MIN - 8, u64::MAX - 4, 0xD000_0000] {
        let checked = validated(&mem, &[(addr, 16, 0, 0)], 0);
        assert!(
            matches!(checked, Err(DeviceBroken::OutsideMemory { .. })),
            "{addr:#x}"
        );
    }
}

#[test]
fn readable_after_writable_is_refused() {
    let mem = memory();
    let checked = validated(
        &mem,
        &[(0x4000, 16, F_NEXT | F_WRITE, 1), (0x5000, 16, 0, 0)],
        0,
    );
    assert_eq!(
        checked,
        Err(DeviceBroken::ReadableAfterWritable { head: 0 })
    );
}

#[test]
fn absurd_total_length_is_refused() {
    let mem = memory();
    let checked = validated(
        &mem,
        &[(0x4000, u32::MAX, F_NEXT, 1), (0x5000, u32::MAX, 0, 0)],
        0,
    );
    assert!(matches!(checked, Err(DeviceBroken::TooLong { .. })));
}

mod block_requests {
    use super::*;
    use crate::devices::virtio::block::Block;
    use virtio_queue::QueueT;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;

    struct Disk {
        path: std::path::PathBuf,
        block: Block,
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            std::fs::remove_file(&self.path).ok();
        }
    }

    fn disk(sectors: u64) -> Disk {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ftvmm-blk-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, vec![0u8; (sectors * 512) as usize]).unwrap();
        let block = Block::open(&path, false).unwrap();
        Disk { path, block }
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
    }

    fn used_len(mem: &GuestMemoryMmap, slot: u64) -> u32 {
        mem.read_obj(GuestAddress(USED_RING + 4 + 8 * slot + 4))
            .unwrap()
    }

    #[test]
    fn write_then_read_moves_data_through_the_file() {
        let mem = memory();
        let mut disk = disk(16);
        mem.write_slice(&[0xAB; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, 1, 3);
        let chain = [
            (HEADER, 16, F_NEXT, 1),
            (DATA, 1024, F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        let mut queues = [queue_with(&mem, &chain, &[0])];
        assert_eq!(
            disk.block.process_queue(0, &mut queues, &mem, &mut live()),
            Ok(1)
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let file = std::fs::read(&disk.path).unwrap();
        assert!(file[3 * 512..5 * 512].iter().all(|b| *b == 0xAB));
        assert!(file[..3 * 512]
            .iter()
            .chain(&file[5 * 512..])
            .all(|b| *b == 0));

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, 0, 3);
        let chain = [
            (HEADER, 16, F_NEXT, 1),
            (DATA, 1024, F_NEXT | F_WRITE, 2),
            (STATUS, 1, F_WRITE, 0),
        ];
        let mut queues = [queue_with(&mem, &chain, &[0])];
        assert_eq!(
            disk.block.process_queue(0, &mut queues, &mem, &mut live()),
            Ok(1)
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let mut read = [0u8; 1024];
        mem.read_slice(&mut read, GuestAddress(DATA)).unwrap();
        assert!(read.iter().all(|b| *b == 0xAB));
        assert_eq!(used_len(&mem, 0), 1025);
        assert_eq!(queues[0].next_used(), 1);
    }

    #[test]
    fn requests_past_the_end_fail_with_an_io_error_not_a_broken_device() {
        let mem = memory();
        let mut disk = disk(4);
        for (sector, len) in [(4u64, 512u32), (3, 1024), (u64::MAX, 512), (0, 100)] {
            header(&mem, 1, sector);
            mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
            let chain = [
                (HEADER, 16, F_NEXT, 1),
                (DATA, len, F_NEXT, 2),
                (STATUS, 1, F_WRITE, 0),
            ];
            let mut queues = [queue_with(&mem, &chain, &[0])];
            assert_eq!(
                disk.block.process_queue(0, &mut queues, &mem, &mut live()),
                Ok(1)
            );
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
                1,
                "sector {sector} len {len}"
            );
        }
        assert_eq!(disk.block.stats.errors, 4);
    }

    #[test]
    fn malformed_requests_break_the_device() {
        let mem = memory();
        let mut disk = disk(4);
        header(&mem, 0, 0);
        let cases: [&[(u64, u32, u16, u16)]; 3] = [
            // No writable status byte.
            &[(HEADER, 16, F_NEXT, 1), (DATA, 512, 0, 0)],
            // Header shorter than 16 bytes.
            &[(HEADER, 8, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)],
            // A loop.
            &[(HEADER, 16, F_NEXT, 1), (STATUS, 1, F_WRITE | F_NEXT, 0)],
        ];
        for chain in cases {
            let mut queues = [queue_with(&mem, chain, &[0])];
            assert!(
                disk.block
                    .process_queue(0, &mut queues, &mem, &mut live())
                    .is_err(),
                "{chain:?}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, ..Default::default() })]

        /// Arbitrary descriptor tables and available rings never panic the block device, and
        /// every chain it completes is accounted for in the used ring.
        #[test]
        fn arbitrary_descriptor_tables_never_panic_the_block_device(
            descs in proptest::collection::vec(
                (
                    proptest::prop_oneof![0u64..0x20_0000, proptest::num::u64::ANY],
                    proptest::prop_oneof![0u32..2048, proptest::num::u32::ANY],
                    0u16..8,
                    0u16..(QUEUE_SIZE + 2),
                ),
                1..(QUEUE_SIZE as usize),
            ),
            heads in proptest::collection::vec(0u16..(QUEUE_SIZE + 2), 0..8),
            kinds in proptest::collection::vec(proptest::num::u32::ANY, 1..3),
        ) {
            let mem = memory();
            let mut disk = disk(8);
            header(&mem, kinds[0] % 10, u64::from(kinds[kinds.len() - 1]) % 12);
            let mut queues = [queue_with(&mem, &descs, &heads)];
            let before = queues[0].next_used();
            let outcome = disk.block.process_queue(0, &mut queues, &mem, &mut live());
            let completed = queues[0].next_used().wrapping_sub(before);
            proptest::prop_assert!(usize::from(completed) <= heads.len());
            if outcome.is_ok() {
                proptest::prop_assert_eq!(usize::from(completed), heads.len());
            }
        }
    }
}

#[test]
fn an_indirect_table_is_refused_as_not_offered() {
    const F_INDIRECT: u16 = 4;
    let mem = memory();
    let checked = validated(&mem, &[(0x4000, 32, F_INDIRECT, 0)], 0);
    assert_eq!(checked, Err(DeviceBroken::Indirect { head: 0 }));
}

#[test]
fn device_writes_onto_the_queues_own_rings_are_refused() {
    let mem = memory();
    for ring in [DESC_TABLE, AVAIL_RING, USED_RING + 8] {
        let checked = validated(&mem, &[(0x4000, 16, F_NEXT, 1), (ring, 8, F_WRITE, 0)], 0);
        assert!(
            matches!(checked, Err(DeviceBroken::WritesOntoRings { .. })),
            "{ring:#x}: {checked:?}"
        );
    }
    // Reading from a ring does the device no harm.
    assert!(validated(&mem, &[(AVAIL_RING, 16, 0, 0)], 0).is_ok());
}

/// The chains offered are read once: what the device writes into guest memory while it
/// serves them (here, the available index itself) cannot make more appear.
#[test]
fn the_chains_available_are_counted_once_per_look() {
    use virtio_queue::QueueT;
    let mem = memory();
    let descs = [(0x4000, 16, 0, 0), (0x5000, 16, 0, 0)];
    let mut queue = queue_with(&mem, &descs, &[0, 1]);
    let mut available = Available::now(&queue, &mem, 0).unwrap();
    assert!(available.next(&mut queue, &mem, 0).unwrap().is_some());
    // A write lands on the avail ring: two more entries, and the index moves on.
    mem.write_obj(0u16, GuestAddress(AVAIL_RING + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL_RING + 10)).unwrap();
    mem.write_obj(4u16, GuestAddress(AVAIL_RING + 2)).unwrap();
    assert!(available.next(&mut queue, &mem, 0).unwrap().is_some());
    assert!(available.next(&mut queue, &mem, 0).unwrap().is_none());
    assert_eq!(queue.next_avail(), 2);
    // The next look sees them.
    let mut later = Available::now(&queue, &mem, 0).unwrap();
    assert!(later.next(&mut queue, &mem, 0).unwrap().is_some());
}
