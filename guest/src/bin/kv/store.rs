//! The map and its durability: replay of the log at boot, and group commit of new
//! records (write, then FLUSH) while the server runs.
//!
//! Every write gets the log sequence number of its record; a reply that depends on
//! it may be sent once [`Store::durable_seq`] has reached that number. With no disk,
//! every write is "durable" at once.

use crate::blk::{Blk, IoError, Kind, SECTOR};
use alloc::vec::Vec;
use ftvm_guest::platform::power_off;
use ftvm_guest::println;
use kvcore::db::{Db, Op};
use kvcore::log::{is_torn, AppendError, LogWriter, Scanner, Step, TAIL_WINDOW};

/// Power-off code after a disk I/O error (durability can no longer be promised).
pub const EXIT_DISK_ERROR: u8 = 57;
/// Bytes read per request during replay.
const REPLAY_CHUNK: u64 = 256 * 1024;

/// What the disk is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DiskState {
    Idle,
    /// A batch whose last record has this sequence number is being written.
    Writing(u64),
    /// ... and is being flushed.
    Flushing(u64),
}

struct Disk {
    blk: Blk,
    writer: LogWriter,
    state: DiskState,
}

/// The map, and the log that makes it durable.
pub struct Store {
    /// The map.
    pub db: Db,
    disk: Option<Disk>,
    applied_seq: u64,
    durable_seq: u64,
}

fn fatal(err: IoError) -> ! {
    println!(
        "kv: disk I/O error ({:?} request, status {}), stopping",
        err.kind, err.status
    );
    power_off(EXIT_DISK_ERROR)
}

impl Store {
    /// A store on `blk` (the log is replayed; a torn tail is zeroed) or, with no
    /// disk, an empty store whose writes are not persistent.
    pub fn open(blk: Option<Blk>) -> Store {
        let Some(mut blk) = blk else {
            println!("kv: no disk, writes are not persistent");
            return Store {
                db: Db::new(),
                disk: None,
                applied_seq: 0,
                durable_seq: 0,
            };
        };
        let capacity = blk.capacity();
        println!(
            "kv: disk {} bytes, flush {}{}",
            capacity,
            if blk.has_flush() { "yes" } else { "no" },
            if blk.read_only() { ", read-only" } else { "" }
        );
        let mut db = Db::new();
        let mut scanner = Scanner::new();
        let mut offset = 0u64;
        loop {
            match scanner.next_step() {
                Step::Record(op) => db.apply(op),
                Step::NeedMore if offset < capacity => {
                    let len = REPLAY_CHUNK.min(capacity - offset);
                    let data = blk
                        .read(offset / SECTOR, len as usize)
                        .unwrap_or_else(|e| fatal(e));
                    scanner.feed(&data);
                    offset += len;
                }
                Step::NeedMore | Step::End(_) => break,
            }
        }
        let end = scanner.end();
        let next_seq = scanner.next_seq();
        drop(scanner);

        // The sector holding the end and the window a torn batch can have touched.
        let floor = end / SECTOR * SECTOR;
        let window_end = capacity.min(floor + TAIL_WINDOW as u64);
        let mut window = if window_end > floor {
            blk.read(floor / SECTOR, (window_end - floor) as usize)
                .unwrap_or_else(|e| fatal(e))
        } else {
            Vec::new()
        };
        let rel = (end - floor) as usize;
        if is_torn(&window[rel..]) {
            println!("kv: dropped torn tail at byte {}", end);
            if !blk.read_only() {
                window[rel..].fill(0);
                blk.write_durably(floor / SECTOR, window.clone())
                    .unwrap_or_else(|e| fatal(e));
            }
        }
        window.truncate(rel);
        println!(
            "kv: replayed {} records, {} keys, log end at byte {}",
            next_seq - 1,
            db.len(),
            end
        );
        let last = next_seq - 1;
        let disk = if blk.read_only() {
            println!("kv: disk is read-only, writes are not persistent");
            None
        } else {
            Some(Disk {
                blk,
                writer: LogWriter::new(end, window, next_seq, capacity),
                state: DiskState::Idle,
            })
        };
        Store {
            db,
            disk,
            applied_seq: last,
            durable_seq: last,
        }
    }

    /// Sequence number of the last write applied to the map.
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Sequence number up to which writes are durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Whether every applied write is durable and the disk is idle.
    pub fn idle(&self) -> bool {
        self.durable_seq == self.applied_seq
            && self
                .disk
                .as_ref()
                .is_none_or(|d| d.state == DiskState::Idle)
    }

    /// Logs `op` (queues its record for the next batch) and applies it to the map.
    /// Returns its sequence number; the write is durable once
    /// [`Store::durable_seq`] reaches it. Nothing changes if the record is refused.
    pub fn write(&mut self, op: Op) -> Result<u64, AppendError> {
        match &mut self.disk {
            None => {
                self.db.apply(op);
                self.applied_seq += 1;
                self.durable_seq = self.applied_seq;
            }
            Some(disk) => {
                let seq = disk.writer.append(&op)?;
                self.db.apply(op);
                self.applied_seq = seq;
            }
        }
        Ok(self.applied_seq)
    }

    /// Moves the disk along: acknowledges its interrupt if `irqs` has its bit, takes
    /// a completed request (a write is followed by a FLUSH if the device has FLUSH;
    /// when that completes the batch is durable), and starts the next batch if the
    /// disk is idle. Returns whether anything happened. Powers off on an I/O error.
    pub fn poll(&mut self, irqs: u64) -> bool {
        let Some(disk) = &mut self.disk else {
            return false;
        };
        let mut progress = false;
        if irqs & disk.blk.irq_bit != 0 {
            disk.blk.ack_interrupt();
        }
        if let Some(result) = disk.blk.poll() {
            progress = true;
            let kind = result.unwrap_or_else(|e| fatal(e)).0;
            disk.state = match (disk.state, kind) {
                (DiskState::Writing(seq), Kind::Write) if disk.blk.has_flush() => {
                    disk.blk.start_flush();
                    DiskState::Flushing(seq)
                }
                (DiskState::Writing(seq), Kind::Write)
                | (DiskState::Flushing(seq), Kind::Flush) => {
                    self.durable_seq = seq;
                    DiskState::Idle
                }
                (state, kind) => {
                    println!("kv: unexpected {:?} completion in state {:?}", kind, state);
                    power_off(EXIT_DISK_ERROR)
                }
            };
        }
        if disk.state == DiskState::Idle {
            if let Some(batch) = disk.writer.take_batch() {
                disk.blk.start_write(batch.sector, batch.data);
                disk.state = DiskState::Writing(batch.last_seq);
                progress = true;
            }
        }
        progress
    }
}
