//! The block device's snapshot section: its requests in flight (with what a backup
//! re-issues at go-live) and its count of bytes written since the last flush.

use super::*;

/// Bytes of an in-flight request in a section, without re-issue data.
const IN_FLIGHT_RECORD: usize = 8 + 2 + 8 + 1;

/// The capacity (which must be this disk's), the next request number, the bytes written
/// since the last flush (version 2 on) and the requests in flight: number, head, status byte address and, on a backup, what to re-issue if it
/// goes live first. The backing file is the host's; completions the log channel reported
/// but no exit took yet stay with the process that performed them (they reach a new
/// replica as `DiskComplete` events in the log).
impl Snapshot for Block {
    fn tag(&self) -> Tag {
        *b"VBLK"
    }

    fn version(&self) -> u16 {
        2
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.capacity_sectors);
        out.u64(self.next_number);
        out.u64(self.since_flush);
        out.u32(self.in_flight.len() as u32);
        for request in &self.in_flight {
            out.u64(request.number);
            out.u16(request.head);
            out.u64(request.status_addr.0);
            match &request.reissue {
                None => out.u8(0),
                Some(DiskRequest::Write { offset, data, sync }) => {
                    out.u8(if *sync { 3 } else { 1 });
                    out.u64(*offset);
                    out.bytes(data)?;
                }
                Some(DiskRequest::Flush) => out.u8(2),
            }
        }
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, version: u16) -> Result<(), SnapshotError> {
        let capacity = input.u64("capacity")?;
        if capacity != self.capacity_sectors {
            return Err(input.invalid(format!(
                "a disk of {capacity} sectors, this machine's has {}",
                self.capacity_sectors
            )));
        }
        let next_number = input.u64("next request number")?;
        // Version 1 had no count (and no synced writes).
        let since_flush = if version >= 2 {
            input.u64("bytes written since the last flush")?
        } else {
            0
        };
        let count = input.count(
            "requests in flight",
            usize::from(QUEUE_SIZE),
            IN_FLIGHT_RECORD,
        )?;
        let mut in_flight = VecDeque::with_capacity(count);
        let mut previous: Option<u64> = None;
        for _ in 0..count {
            let number = input.u64("request number")?;
            let head = input.u16("request head")?;
            let status_addr = GuestAddress(input.u64("status byte address")?);
            // Numbers grow in submission order and were all handed out already.
            if number >= next_number || previous.is_some_and(|p| number <= p) || head >= QUEUE_SIZE
            {
                return Err(input.invalid(format!(
                    "request {number} at head {head} (next number {next_number}, queue size {QUEUE_SIZE})"
                )));
            }
            previous = Some(number);
            let reissue = match input.u8("re-issue kind")? {
                0 => None,
                kind @ (1 | 3) => {
                    let offset = input.u64("write offset")?;
                    let data = input.bytes("write data", MAX_CHAIN_BYTES as usize)?;
                    if self.checked_offset(offset / SECTOR_SIZE, data.len() as u64) != Some(offset)
                    {
                        return Err(input.invalid(format!(
                            "a write of {} bytes at byte {offset}, outside the disk or not whole sectors",
                            data.len()
                        )));
                    }
                    Some(DiskRequest::Write {
                        offset,
                        data: data.to_vec(),
                        sync: kind == 3,
                    })
                }
                2 => Some(DiskRequest::Flush),
                other => return Err(input.invalid(format!("re-issue kind {other}"))),
            };
            in_flight.push_back(InFlight {
                number,
                head,
                status_addr,
                reissue,
                // Not in the section: a flush restored in flight keeps every write it
                // might cover (the conservative way).
                completed_before: 0,
            });
        }
        self.next_number = next_number;
        self.since_flush = since_flush;
        self.in_flight = in_flight;
        Ok(())
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};

    fn disk() -> Block {
        Block::for_replay(64).unwrap()
    }

    #[test]
    fn in_flight_requests_round_trip_and_refuse_damage() {
        let mut block = disk();
        block.next_number = 10;
        block.since_flush = 12345;
        for (number, reissue) in [
            (5, None),
            (
                7,
                Some(DiskRequest::Write {
                    offset: 1024,
                    data: vec![0xAB; 512],
                    sync: false,
                }),
            ),
            (8, Some(DiskRequest::Flush)),
            (
                9,
                Some(DiskRequest::Write {
                    offset: 0,
                    data: vec![0xCD; 1024],
                    sync: true,
                }),
            ),
        ] {
            block.in_flight.push_back(InFlight {
                number,
                head: number as u16 * 3,
                status_addr: GuestAddress(0x5000 + number),
                reissue,
                completed_before: 0,
            });
        }
        let bytes = assert_round_trip(&block, &mut disk());
        assert_refuses_damage(&bytes, disk);
    }

    #[test]
    fn impossible_requests_are_refused() {
        let section = |write_offset: u64, capacity: u64| {
            let mut out = Encoder::new();
            out.u64(capacity);
            out.u64(2);
            out.u32(1);
            out.u64(1);
            out.u16(0);
            out.u64(0x5000);
            out.u8(1);
            out.u64(write_offset);
            out.bytes(&[0u8; 512]).unwrap();
            crate::snapshot::frame_section(*b"VBLK", 1, out.as_bytes()).unwrap()
        };
        assert!(crate::snapshot::restore_section(&mut disk(), &section(0, 64)).is_ok());
        // Past the end of the disk, not sector-aligned, another disk size.
        for (offset, capacity) in [(64 * 512, 64), (100, 64), (0, 65)] {
            let err = crate::snapshot::restore_section(&mut disk(), &section(offset, capacity))
                .unwrap_err();
            assert!(matches!(err, SnapshotError::Invalid { .. }), "{err}");
        }
    }
}
