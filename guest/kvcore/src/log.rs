//! The append-only log: record format, encoder, incremental decoder (replay), and the
//! sector-aligned batch writer.
//!
//! # Record layout
//!
//! The log starts at byte 0 of the disk. Records follow each other with no padding;
//! all integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic [`MAGIC`] (the bytes `KVL1`) |
//! | 4 | 4 | payload length `P` (at most [`MAX_RECORD`] − [`HEADER_LEN`]) |
//! | 8 | 8 | sequence number: 1 for the first record, then +1 per record |
//! | 16 | 4 | CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`) of bytes 0..16 and the payload |
//! | 20 | `P` | payload |
//!
//! Payload, by its first byte (the op):
//! - `1` SET: key length `u32`, key, value length `u32`, value;
//! - `2` DEL: key count `u32`, then per key: length `u32`, key;
//! - `3` FLUSHALL: nothing more.
//!
//! # End of the log and torn tails
//!
//! Replay reads records from byte 0 and stops at the first one whose magic, length,
//! sequence number, checksum or payload is wrong, or that runs past the end of the
//! disk. Where it stops is the log end `B`; everything after is not part of the log.
//! The disk starts as all zeros, so a clean log is followed by zeros. Non-zero bytes
//! after `B` are a *torn tail*: the last batch was written only partly (a crash before
//! its FLUSH completed). Such a batch was never acknowledged to any client.
//!
//! At most [`MAX_BATCH`] bytes of records are written between two FLUSHes, so a torn
//! batch lies inside [`TAIL_WINDOW`] bytes from the sector holding `B`. Before new
//! records are appended, the writer of the log (the guest) zeroes that window if it
//! is not already zero: otherwise a stale record of the torn batch could, by
//! chance, line up after new records with the right sequence number and come back to
//! life at the next replay.
//!
//! # Writing
//!
//! The disk is written in whole 512-byte sectors. [`LogWriter`] keeps the last,
//! partial sector of the log in memory and writes it again with the next records
//! appended ([`LogWriter::take_batch`]). This relies on a single-sector write being
//! atomic (it either happens or not), as disks guarantee.

use crate::db::Op;
use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Record magic: the bytes `KVL1` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"KVL1");
/// Bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Largest record (header and payload), in bytes.
pub const MAX_RECORD: usize = 1024 * 1024;
/// Most bytes of records in one write (one batch); a single record may be up to
/// [`MAX_RECORD`], which is not more.
pub const MAX_BATCH: usize = 1024 * 1024;
/// The disk's sector size.
pub const SECTOR: usize = 512;
/// Bytes after the sector holding the log end that a torn batch can have touched:
/// a batch is at most [`MAX_BATCH`] bytes of records plus the rewritten partial
/// sector and padding.
pub const TAIL_WINDOW: usize = MAX_BATCH + 2 * SECTOR;

const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;
const OP_FLUSHALL: u8 = 3;

/// CRC-32 lookup table (IEEE polynomial, reflected: `0xEDB88320`).
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// Running CRC-32 (IEEE): start with [`Crc32::new`], [`Crc32::update`] with the
/// bytes, then [`Crc32::finish`].
#[derive(Clone, Copy, Debug)]
pub struct Crc32(u32);

impl Crc32 {
    /// A fresh checksum.
    pub const fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for &b in bytes {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The checksum of the bytes added so far.
    pub fn finish(self) -> u32 {
        !self.0
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Crc32::new()
    }
}

/// CRC-32 (IEEE) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

fn payload_len(op: &Op) -> usize {
    match op {
        Op::Set { key, value } => 1 + 4 + key.len() + 4 + value.len(),
        Op::Del { keys } => 1 + 4 + keys.iter().map(|k| 4 + k.len()).sum::<usize>(),
        Op::FlushAll => 1,
    }
}

/// Size of the record for `op`, header included.
pub fn record_len(op: &Op) -> usize {
    HEADER_LEN + payload_len(op)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends the record for `op` with sequence number `seq` to `out`. The caller
/// checks that [`record_len`] is at most [`MAX_RECORD`].
pub fn encode_record(seq: u64, op: &Op, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload_len(op) as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    match op {
        Op::Set { key, value } => {
            out.push(OP_SET);
            put_bytes(out, key);
            put_bytes(out, value);
        }
        Op::Del { keys } => {
            out.push(OP_DEL);
            out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
            for key in keys {
                put_bytes(out, key);
            }
        }
        Op::FlushAll => out.push(OP_FLUSHALL),
    }
    let mut crc = Crc32::new();
    crc.update(&out[start..start + 16]);
    crc.update(&out[start + HEADER_LEN..]);
    let crc = crc.finish();
    out[start + 16..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// Why a record was rejected: where replay stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The magic is wrong (all zeros at the clean end of a log).
    Magic,
    /// The payload length is larger than a record may be.
    Length,
    /// The sequence number is not the next one.
    Sequence,
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the payload does not decode.
    Payload,
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes the record at the front of `buf`, which must have sequence number
/// `expect_seq`. Returns the op and the record's length, `Ok(None)` if `buf` ends
/// before the record does (read more, or at the end of the disk: the record is torn),
/// or why the record is invalid.
pub fn decode_record(buf: &[u8], expect_seq: u64) -> Result<Option<(Op, usize)>, Invalid> {
    if buf.len() >= 4 && le_u32(buf) != MAGIC {
        return Err(Invalid::Magic);
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = le_u32(&buf[4..]) as usize;
    if len == 0 || len > MAX_RECORD - HEADER_LEN {
        return Err(Invalid::Length);
    }
    let seq = u64::from_le_bytes([
        buf[8], buf[9], buf[10], buf[11], buf[12], buf[13], buf[14], buf[15],
    ]);
    if seq != expect_seq {
        return Err(Invalid::Sequence);
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let mut crc = Crc32::new();
    crc.update(&buf[..16]);
    crc.update(payload);
    if crc.finish() != le_u32(&buf[16..]) {
        return Err(Invalid::Checksum);
    }
    let op = decode_payload(payload).ok_or(Invalid::Payload)?;
    Ok(Some((op, HEADER_LEN + len)))
}

/// Reads length-prefixed fields from a payload.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*head))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

fn decode_payload(payload: &[u8]) -> Option<Op> {
    let (&kind, rest) = payload.split_first()?;
    let mut f = Fields(rest);
    let op = match kind {
        OP_SET => {
            let key = f.bytes()?.to_vec();
            let value = f.bytes()?.to_vec();
            Op::Set { key, value }
        }
        OP_DEL => {
            let count = f.u32()? as usize;
            // Each key takes at least 4 bytes: a bound that keeps a corrupt count
            // from asking for a huge allocation.
            if count > f.0.len() / 4 {
                return None;
            }
            let mut keys = Vec::with_capacity(count);
            for _ in 0..count {
                keys.push(f.bytes()?.to_vec());
            }
            Op::Del { keys }
        }
        OP_FLUSHALL => Op::FlushAll,
        _ => return None,
    };
    f.0.is_empty().then_some(op)
}

/// One step of [`Scanner::next`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next record's op: apply it.
    Record(Op),
    /// The buffered bytes end inside a record: [`Scanner::feed`] the bytes that follow
    /// on the disk, or, at the end of the disk, stop (the record is torn).
    NeedMore,
    /// An invalid record: the log ends at [`Scanner::end`].
    End(Invalid),
}

/// Incremental log reader for replay: feed it the disk from byte 0 on, in pieces of
/// any size, and take records until it says [`Step::End`] (or the disk ends).
#[derive(Debug)]
pub struct Scanner {
    buf: Vec<u8>,
    /// Disk offset of `buf[0]`.
    start: u64,
    /// Bytes of `buf` consumed by good records.
    pos: usize,
    next_seq: u64,
    records: u64,
}

impl Scanner {
    /// A scanner at the start of the log.
    pub fn new() -> Self {
        Scanner {
            buf: Vec::new(),
            start: 0,
            pos: 0,
            next_seq: 1,
            records: 0,
        }
    }

    /// Adds the disk bytes that follow those fed so far.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.start += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Decodes the next record.
    pub fn next_step(&mut self) -> Step {
        match decode_record(&self.buf[self.pos..], self.next_seq) {
            Ok(Some((op, len))) => {
                self.pos += len;
                self.next_seq += 1;
                self.records += 1;
                Step::Record(op)
            }
            Ok(None) => Step::NeedMore,
            Err(why) => Step::End(why),
        }
    }

    /// Disk offset just past the last good record: the log end.
    pub fn end(&self) -> u64 {
        self.start + self.pos as u64
    }

    /// Sequence number for the next record to append.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Good records decoded so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes fed (from the disk offset [`Scanner::end`] on) that are not part of a
    /// good record.
    pub fn unconsumed(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new()
    }
}

/// Whether the bytes after the log end show a torn tail (are not all zero).
pub fn is_torn(after_end: &[u8]) -> bool {
    after_end.iter().any(|&b| b != 0)
}

/// The result of [`replay_image`].
#[derive(Debug, PartialEq, Eq)]
pub struct Replayed {
    /// The ops of the good records, in order.
    pub ops: Vec<Op>,
    /// The log end (bytes).
    pub end: u64,
    /// Sequence number of the next record.
    pub next_seq: u64,
    /// Whether non-zero bytes follow the log end within [`TAIL_WINDOW`].
    pub torn: bool,
}

/// Replays a whole disk image held in memory (tests and tools; the guest feeds a
/// [`Scanner`] piece by piece).
pub fn replay_image(disk: &[u8]) -> Replayed {
    let mut scanner = Scanner::new();
    scanner.feed(disk);
    let mut ops = Vec::new();
    while let Step::Record(op) = scanner.next_step() {
        ops.push(op);
    }
    let end = scanner.end() as usize;
    let window_end = disk.len().min(end / SECTOR * SECTOR + TAIL_WINDOW);
    Replayed {
        ops,
        end: end as u64,
        next_seq: scanner.next_seq(),
        torn: is_torn(&disk[end..window_end]),
    }
}

/// Why [`LogWriter::append`] refused a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendError {
    /// The record would be larger than [`MAX_RECORD`].
    TooLarge,
    /// The disk has no room for it.
    Full,
}

/// One write request: sector-aligned, a whole number of sectors.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// First sector to write.
    pub sector: u64,
    /// The bytes: the log's partial last sector, the new records, zero padding.
    pub data: Vec<u8>,
    /// Sequence number of the last record in the batch: once the write and a FLUSH
    /// have completed, every record up to this one is durable.
    pub last_seq: u64,
    /// The log end after this batch.
    pub end: u64,
}

/// Appends records to the log: collects them in memory and hands them out as
/// sector-aligned [`Batch`]es (group commit: every record appended since the last
/// batch goes into the next, up to [`MAX_BATCH`] bytes).
#[derive(Debug)]
pub struct LogWriter {
    /// Log end after every batch handed out so far.
    end: u64,
    /// The log's bytes from the start of the sector holding `end` up to `end`.
    tail: Vec<u8>,
    next_seq: u64,
    capacity: u64,
    /// Encoded records not yet in a batch.
    pending: Vec<u8>,
    /// Per pending record: its end offset in `pending` and its sequence number.
    pending_ends: VecDeque<(usize, u64)>,
}

impl LogWriter {
    /// A writer for a log that ends at byte `end` of a disk of `capacity` bytes, whose
    /// partial last sector holds `tail` (`end % 512` bytes), and whose next record has
    /// sequence number `next_seq`.
    pub fn new(end: u64, tail: Vec<u8>, next_seq: u64, capacity: u64) -> Self {
        assert_eq!(
            tail.len() as u64,
            end % SECTOR as u64,
            "tail must be end % 512 bytes"
        );
        LogWriter {
            end,
            tail,
            next_seq,
            capacity,
            pending: Vec::new(),
            pending_ends: VecDeque::new(),
        }
    }

    /// Sequence number of the last record appended (0 if none ever was).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Log end after every batch handed out so far.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether records wait for [`LogWriter::take_batch`].
    pub fn has_pending(&self) -> bool {
        !self.pending_ends.is_empty()
    }

    /// Encodes a record for `op` and queues it; returns its sequence number. Fails,
    /// queuing nothing, if the record is too large or does not fit the disk.
    pub fn append(&mut self, op: &Op) -> Result<u64, AppendError> {
        let len = record_len(op);
        if len > MAX_RECORD {
            return Err(AppendError::TooLarge);
        }
        let needed = self.end + self.pending.len() as u64 + len as u64;
        // The last sector is written whole, so the record must fit in whole sectors.
        if needed.div_ceil(SECTOR as u64) * SECTOR as u64 > self.capacity {
            return Err(AppendError::Full);
        }
        let seq = self.next_seq;
        encode_record(seq, op, &mut self.pending);
        self.next_seq += 1;
        self.pending_ends.push_back((self.pending.len(), seq));
        Ok(seq)
    }

    /// Hands out the next write: the pending records (at most [`MAX_BATCH`] bytes of
    /// them, but at least one record) after the partial last sector, padded with
    /// zeros to whole sectors. The writer assumes the batch will be written: the next
    /// batch starts where this one ends.
    pub fn take_batch(&mut self) -> Option<Batch> {
        let mut take = 0;
        let mut last_seq = 0;
        while let Some(&(end, seq)) = self.pending_ends.front() {
            if take > 0 && end > MAX_BATCH {
                break;
            }
            take = end;
            last_seq = seq;
            self.pending_ends.pop_front();
            if end >= MAX_BATCH {
                break;
            }
        }
        if take == 0 {
            return None;
        }
        let sector = self.end / SECTOR as u64;
        let mut data = Vec::with_capacity((self.tail.len() + take).next_multiple_of(SECTOR));
        data.extend_from_slice(&self.tail);
        data.extend_from_slice(&self.pending[..take]);
        let used = data.len();
        data.resize(used.next_multiple_of(SECTOR), 0);
        self.pending.drain(..take);
        for (end, _) in self.pending_ends.iter_mut() {
            *end -= take;
        }
        self.end += take as u64;
        self.tail.clear();
        self.tail
            .extend_from_slice(&data[used / SECTOR * SECTOR..used]);
        Some(Batch {
            sector,
            data,
            last_seq,
            end: self.end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use alloc::vec;

    fn set(k: &str, v: &str) -> Op {
        Op::Set {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    /// Writes a batch to an in-memory disk the way the guest does.
    fn write(disk: &mut [u8], batch: &Batch) {
        assert_eq!(batch.data.len() % SECTOR, 0);
        let at = batch.sector as usize * SECTOR;
        disk[at..at + batch.data.len()].copy_from_slice(&batch.data);
    }

    fn db_of(ops: &[Op]) -> Db {
        let mut db = Db::new();
        for op in ops {
            db.apply(op.clone());
        }
        db
    }

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
        let mut c = Crc32::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn record_round_trip() {
        let ops = [
            set("key", "value"),
            set("", ""),
            Op::Set {
                key: vec![0, 1, 2, 255],
                value: vec![7; 10_000],
            },
            Op::Del {
                keys: vec![b"a".to_vec(), b"".to_vec(), b"ccc".to_vec()],
            },
            Op::Del { keys: vec![] },
            Op::FlushAll,
        ];
        for (i, op) in ops.iter().enumerate() {
            let seq = 1000 + i as u64;
            let mut buf = Vec::new();
            encode_record(seq, op, &mut buf);
            assert_eq!(buf.len(), record_len(op));
            assert_eq!(&buf[..4], b"KVL1");
            assert_eq!(decode_record(&buf, seq), Ok(Some((op.clone(), buf.len()))));
            // Every prefix is "need more", never a wrong op.
            for cut in [0, 3, 4, 19, 20, buf.len() - 1] {
                assert_eq!(decode_record(&buf[..cut], seq), Ok(None), "cut {cut}");
            }
            // Every flipped byte is caught (with the zeros that follow the record on
            // a disk, so that a grown length field finds bytes to check, not the end).
            for at in 0..buf.len().min(64) {
                let mut bad = buf.clone();
                bad[at] ^= 0x40;
                bad.resize(buf.len() + 64 * 1024, 0);
                assert!(decode_record(&bad, seq).is_err(), "flip at {at}");
            }
            assert_eq!(decode_record(&buf, seq + 1), Err(Invalid::Sequence));
        }
        assert_eq!(decode_record(&[0; 64], 1), Err(Invalid::Magic));
    }

    #[test]
    fn batches_are_sector_aligned_and_replay() {
        let disk_len = 64 * 1024;
        let mut disk = vec![0u8; disk_len];
        let mut w = LogWriter::new(0, Vec::new(), 1, disk_len as u64);
        let mut all = Vec::new();
        for round in 0..20 {
            for i in 0..round % 4 + 1 {
                let op = set(&alloc::format!("k{round}-{i}"), &"x".repeat(round * 7));
                w.append(&op).unwrap();
                all.push(op);
            }
            let batch = w.take_batch().unwrap();
            assert_eq!(batch.last_seq, all.len() as u64);
            assert_eq!(batch.end, w.end());
            write(&mut disk, &batch);
            assert!(w.take_batch().is_none());
            let r = replay_image(&disk);
            assert_eq!(r.ops, all);
            assert_eq!(r.end, w.end());
            assert_eq!(r.next_seq, all.len() as u64 + 1);
            assert!(!r.torn);
        }
        let del = Op::Del {
            keys: vec![b"k0-0".to_vec()],
        };
        w.append(&del).unwrap();
        w.append(&Op::FlushAll).unwrap();
        w.append(&set("after", "flush")).unwrap();
        write(&mut disk, &w.take_batch().unwrap());
        all.push(del);
        all.push(Op::FlushAll);
        all.push(set("after", "flush"));
        let r = replay_image(&disk);
        assert_eq!(r.ops, all);
        let db = db_of(&r.ops);
        assert_eq!(db.len(), 1);
        assert_eq!(db.get(b"after"), Some(&b"flush"[..]));
    }

    #[test]
    fn torn_tail_replays_only_the_good_prefix() {
        let disk_len = 32 * 1024;
        let mut disk = vec![0u8; disk_len];
        let mut w = LogWriter::new(0, Vec::new(), 1, disk_len as u64);
        for i in 0..5 {
            w.append(&set(&alloc::format!("a{i}"), "1")).unwrap();
        }
        write(&mut disk, &w.take_batch().unwrap());
        let good_end = w.end() as usize;
        // The next batch is torn in three different ways.
        for i in 0..40 {
            w.append(&set(&alloc::format!("b{i}"), "value-of-b"))
                .unwrap();
        }
        let batch = w.take_batch().unwrap();
        assert!(batch.data.len() > 3 * SECTOR);
        type Tear<'a> = &'a dyn Fn(&mut Vec<u8>);
        let tears: [Tear<'_>; 3] = [
            // Only the first sector made it.
            &|d: &mut Vec<u8>| {
                for b in &mut d[SECTOR..] {
                    *b = 0;
                }
            },
            // The first sector was lost, later ones made it.
            &|d: &mut Vec<u8>| {
                let keep = good_end % SECTOR;
                for b in &mut d[keep..SECTOR] {
                    *b = 0;
                }
            },
            // A byte in the middle is corrupt.
            &|d: &mut Vec<u8>| d[1000] ^= 1,
        ];
        for (n, tear) in tears.iter().enumerate() {
            let mut torn_disk = disk.clone();
            let mut data = batch.data.clone();
            tear(&mut data);
            let at = batch.sector as usize * SECTOR;
            torn_disk[at..at + data.len()].copy_from_slice(&data);
            let r = replay_image(&torn_disk);
            assert!(r.torn, "tear {n}");
            assert!(r.ops.len() >= 5 && r.ops.len() < 45, "tear {n}");
            assert_eq!(r.ops[..5], replay_image(&disk).ops[..], "tear {n}");
            assert!(r.end >= good_end as u64, "tear {n}");

            // Restart: zero the window after the end (as the guest does), then append
            // from the end, overwriting the torn bytes.
            let end = r.end as usize;
            let window_end = torn_disk.len().min(end / SECTOR * SECTOR + TAIL_WINDOW);
            torn_disk[end..window_end].fill(0);
            let tail = torn_disk[end / SECTOR * SECTOR..end].to_vec();
            let mut w2 = LogWriter::new(r.end, tail, r.next_seq, disk_len as u64);
            w2.append(&set("new", "after-restart")).unwrap();
            write(&mut torn_disk, &w2.take_batch().unwrap());
            let r2 = replay_image(&torn_disk);
            assert!(!r2.torn);
            assert_eq!(r2.ops.len(), r.ops.len() + 1);
            assert_eq!(r2.ops[..r.ops.len()], r.ops[..]);
            assert_eq!(r2.ops.last(), Some(&set("new", "after-restart")));
        }
    }

    #[test]
    fn stale_record_with_wrong_sequence_is_not_replayed() {
        let mut disk = vec![0u8; 4096];
        let mut buf = Vec::new();
        encode_record(1, &set("a", "1"), &mut buf);
        encode_record(3, &set("b", "2"), &mut buf); // seq 2 missing
        disk[..buf.len()].copy_from_slice(&buf);
        let r = replay_image(&disk);
        assert_eq!(r.ops, vec![set("a", "1")]);
        assert_eq!(r.next_seq, 2);
        assert!(r.torn);
    }

    #[test]
    fn scanner_fed_in_pieces() {
        let mut disk = vec![0u8; 16 * 1024];
        let mut w = LogWriter::new(0, Vec::new(), 1, disk.len() as u64);
        let ops: Vec<Op> = (0..50)
            .map(|i| set(&alloc::format!("key{i}"), &"v".repeat(i * 3)))
            .collect();
        for op in &ops {
            w.append(op).unwrap();
        }
        write(&mut disk, &w.take_batch().unwrap());
        for piece in [1, 7, 512, 4096] {
            let mut s = Scanner::new();
            let mut got = Vec::new();
            let mut fed = 0;
            loop {
                match s.next_step() {
                    Step::Record(op) => got.push(op),
                    Step::NeedMore if fed < disk.len() => {
                        let n = piece.min(disk.len() - fed);
                        s.feed(&disk[fed..fed + n]);
                        fed += n;
                    }
                    Step::NeedMore => break,
                    Step::End(why) => {
                        assert_eq!(why, Invalid::Magic);
                        break;
                    }
                }
            }
            assert_eq!(got, ops, "piece {piece}");
            assert_eq!(s.end(), w.end());
            assert_eq!(s.records(), 50);
        }
    }

    #[test]
    fn writer_limits() {
        let mut w = LogWriter::new(0, Vec::new(), 1, 1024);
        assert_eq!(w.append(&set("k", &"v".repeat(600))), Ok(1));
        assert_eq!(
            w.append(&set("k", &"v".repeat(600))),
            Err(AppendError::Full)
        );
        assert_eq!(
            w.append(&Op::Set {
                key: vec![],
                value: vec![0; MAX_RECORD]
            }),
            Err(AppendError::TooLarge)
        );
        assert_eq!(w.last_seq(), 1);
        assert!(w.has_pending());
        let b = w.take_batch().unwrap();
        assert_eq!(b.data.len(), 2 * SECTOR);
        assert!(!w.has_pending());
    }

    #[test]
    fn large_backlog_is_split_into_batches() {
        let mut w = LogWriter::new(0, Vec::new(), 1, 64 * 1024 * 1024);
        let big = "v".repeat(300 * 1024);
        for i in 0..7 {
            w.append(&set(&alloc::format!("k{i}"), &big)).unwrap();
        }
        let mut disk = vec![0u8; 4 * 1024 * 1024];
        let mut batches = 0;
        let mut last = 0;
        while let Some(b) = w.take_batch() {
            assert!(b.data.len() <= MAX_BATCH + 2 * SECTOR);
            assert!(b.last_seq > last);
            last = b.last_seq;
            write(&mut disk, &b);
            batches += 1;
        }
        assert_eq!(last, 7);
        assert_eq!(batches, 3);
        assert_eq!(replay_image(&disk).ops.len(), 7);
    }

    #[test]
    fn empty_disk_is_an_empty_log() {
        let r = replay_image(&[0u8; 8192]);
        assert_eq!(r.ops, vec![]);
        assert_eq!(r.end, 0);
        assert_eq!(r.next_seq, 1);
        assert!(!r.torn);
    }
}
