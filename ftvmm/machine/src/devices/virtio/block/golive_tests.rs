//! What a backup that went live does with the requests the dead primary left behind.

use super::*;
use crate::devices::virtio::tests::{live, memory, queue_with};
use vm_memory::Bytes;

const HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn sector(file: &[u8], number: usize) -> &[u8] {
    &file[number * 512..(number + 1) * 512]
}

/// A backup goes live with a write the guest was told completed that no flush covered
/// (the dead primary's page cache may have lost it) and a flush the log never completed.
/// Both are done again before the guest's first request of its own, which rewrites the
/// same sector: the disk ends with the newest data. (They used to be redone at the first
/// completion pass with requests in flight, after the new write: the old data then
/// overwrote it, and the chaos soak found acknowledged writes missing from the disk.)
#[test]
fn a_backup_gone_live_redoes_what_the_primary_left_before_its_own_requests() {
    let path = std::env::temp_dir().join(format!("ftvmm-golive-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 16 * 512]).expect("disk image");
    let mut block = Block::open(&path, false).expect("open the disk");
    for (number, at, byte) in [(1u64, 0u64, 0x0Au8), (2, 5, 0x0B)] {
        block.unflushed.push_back(Unflushed {
            number,
            request: DiskRequest::Write {
                offset: at * 512,
                data: vec![byte; 512],
                sync: false,
            },
            completion: number,
        });
    }
    block.in_flight.push_back(InFlight {
        number: 3,
        head: 1,
        status_addr: GuestAddress(0x7000),
        reissue: Some(DiskRequest::Flush),
        completed_before: 2,
    });
    block.next_number = 4;

    // The live guest's first request: sector 0, newer than the unflushed write.
    let mem = memory();
    mem.write_slice(&[0x0C; 512], GuestAddress(DATA))
        .expect("data");
    mem.write_obj(1u32, GuestAddress(HEADER)).expect("type");
    mem.write_obj(0u32, GuestAddress(HEADER + 4))
        .expect("reserved");
    mem.write_obj(0u64, GuestAddress(HEADER + 8))
        .expect("sector");
    let chain = [
        (HEADER, 16, F_NEXT, 1),
        (DATA, 512, F_NEXT, 2),
        (STATUS, 1, F_WRITE, 0),
    ];
    let mut queues = [queue_with(&mem, &chain, &[0])];
    assert_eq!(
        block.process_queue(0, &mut queues, &mem, &mut live()),
        Ok(1)
    );
    // Later looks at the device (completions, requests in flight).
    block
        .poll_backend(&mut queues, &mem, &mut live())
        .expect("poll");
    block
        .poll_backend(&mut queues, &mem, &mut live())
        .expect("poll");

    let file = std::fs::read(&path).expect("read the disk");
    std::fs::remove_file(&path).ok();
    assert!(
        sector(&file, 0).iter().all(|b| *b == 0x0C),
        "the guest's newest write of sector 0 was overwritten by an older one"
    );
    assert!(
        sector(&file, 5).iter().all(|b| *b == 0x0B),
        "the unflushed completed write was not redone"
    );
    assert_eq!(block.stats.reissued, 3, "two writes and the flush redone");
    assert!(block.in_flight.is_empty(), "the redone flush completed");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000)).expect("status"), 0);
}
