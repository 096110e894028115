//! Cloning a running machine into a new backup over TCP.
//!
//! ```text
//! primary (running alone)                         new backup (--clone-from ADDR)
//! clone listener thread accepts ------------------ connects, says Hello::New
//! at the next pause between exits (guest running):
//!   pre-copy thread: "FTVMCLON" | version | CLON (generation n+1, machine)
//!     round 1: every non-zero page (reads all of RAM); round k: of the pages written
//!     since round k-1 (tracking, below), those whose content differs from what was
//!     sent (a CRC32 per page); the guest runs meanwhile. Stops after a round that sent
//!     <= 64 pages, or did not send fewer than the round before, or after 8. Then SYNC
//!                                                   writes each MEMC into its RAM;
//!                                                   answers SYNC once all is applied
//!   vCPU thread, at the next pause (guest stopped):
//!     STOP, the pages written since the last round that changed, MACH VCPU ... DRTY
//!     (snapshot::machine), MEND (the page digest)  ---> restores, checks the digest
//!   the log stream starts on the same socket at this exit ordinal (PrimaryChannel) and the
//!   pair is generation n+1                  ---> follows it (BackupChannel), acks
//!   a broken log connection: the clone listener hands the new connection (Hello::Resume)
//!   to the channel, which resumes the stream <--- reconnects to ADDR within 500 ms
//! ```
//!
//! A private disk (`--disk-private`) goes with the memory: its blocks in the pre-copy
//! before the memory rounds, the blocks written since in the stop-and-copy right after
//! STOP, and a digest the new backup checks against its own copy (see [`disk`]).
//!
//! Which pages were written comes from KVM's dirty log (the guest's writes) and guest
//! memory's own bitmap (the VMM's devices' writes, which KVM does not see), harvested by
//! the vCPU thread between exits ([`tracking`]). So neither the rounds after the first
//! nor the pause read all of RAM: the pause is the pages written during the last round,
//! the machine state and the new backup's confirmation. SYNC makes the guest stop only
//! once the new backup applied the pre-copy, so the pause does not drain the sockets.
//! The sets over-report (KVM marks pages it maps writable); a page goes only if its CRC
//! differs from what was sent. Where KVM cannot log dirty pages, every round and the
//! final pass read all of RAM (the final pass split across the cores); pages the
//! process never touched (`memory::UntouchedPages`) are skipped without being read.
//!
//! The page digest folds the index and CRC32 of every page ever sent: the source's CRCs
//! are those of the bytes it sent, the new backup's those of the bytes it wrote as they
//! arrived, and every page it was not sent is zeroed. The digest proves the transfer;
//! that a page not marked since it was sent is unchanged rests on the tracking, as in
//! every live migration (docs/snapshot.md says what catches a gap).
//!
//! A clone that fails anywhere (the socket, the backup refusing the machine) leaves the
//! primary as it was: live, alone, its guest never stopped for more than the final pass.

use ftvm_log::LogHeader;
use ftvm_machine::devices::virtio::block::copy::PrivateDisk;
use ftvm_machine::inputs::ResumePoint;
use ftvm_machine::memory::{DirtyPages, GuestMemoryMmap, PAGE_SIZE};
use ftvm_machine::snapshot::machine::{
    apply_chunk, machine_mismatch, next_section, restore_machine, restore_state, save_machine,
    save_state, touched_pages, write_end, zero_unwritten, MachineParts, PageChunks, SnapshotReport,
};
use ftvm_machine::snapshot::{
    frame_section, save_section, Decoder, Encoder, Section, Snapshot, SnapshotError, Tag,
};
use ftvm_tls::Socket;
use std::io::{BufWriter, Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// The first bytes of a clone stream.
pub const CLONE_MAGIC: [u8; 8] = *b"FTVMCLON";
/// The clone stream version this build speaks (2: the new backup says hello first, and
/// reconnects to the clone listener when its log connection breaks; 3: the final pages
/// before the machine state, and a digest of the pages sent instead of all RAM; 4: SYNC,
/// which the new backup answers once it applied everything before it).
pub const CLONE_VERSION: u16 = 4;
/// Most pre-copy rounds.
const MAX_ROUNDS: u32 = 8;
/// A round that sent at most this many pages ends the pre-copy.
const CONVERGED_PAGES: u64 = 64;
/// The new backup's answer: it takes the machine (after the header), it restored it
/// (after the end). Anything else, or silence, aborts the clone.
const ACCEPT: u8 = b'Y';
/// How long the primary waits for the header's answer (a real backup answers at once:
/// it only compares the machine with its own).
const ACCEPT_PATIENCE: Duration = Duration::from_secs(5);
/// How long the pre-copy waits for the new backup to answer SYNC: it only has to apply
/// what the two sockets still hold (a few MB).
const SYNC_PATIENCE: Duration = Duration::from_secs(5);
/// The longest the primary's guest stays stopped for the final copy, the new backup's
/// confirmation included: a peer that stalls then costs the guest this pause, no more.
pub const FINISH_PATIENCE: Duration = Duration::from_secs(2);
/// How long one write to the new backup may block during the pre-copy.
const WRITE_PATIENCE: Duration = Duration::from_secs(5);
/// The longest a pre-copy may take: a peer that reads a trickle frees the clone slot.
const PRECOPY_PATIENCE: Duration = Duration::from_secs(300);
/// How long the new backup waits for any read of the clone stream.
const RECEIVE_PATIENCE: Duration = Duration::from_secs(60);

/// Cloning failed; the primary goes on alone, a backup exits.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The socket failed.
    #[error("clone transfer")]
    Io(#[from] std::io::Error),
    /// The stream or the state in it is unusable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The stream does not start like a clone stream.
    #[error("not an ftvm clone stream (bad magic)")]
    BadMagic,
    /// Another version of the clone stream.
    #[error("clone stream version {found} is not supported (this ftvmm speaks {supported})")]
    Version {
        /// The version found.
        found: u16,
        /// The version spoken here.
        supported: u16,
    },
    /// The clone would join another generation than this backup was started for.
    #[error(
        "the primary makes this clone generation {theirs}, but it was started as generation {ours}"
    )]
    Generation {
        /// The primary's new generation.
        theirs: u64,
        /// This backup's `--generation`.
        ours: u64,
    },
    /// The pre-copy thread could not be started or died.
    #[error("the pre-copy thread failed")]
    Thread,
    /// The running replica closed the connection before sending anything: it is not
    /// running alone (still in a pair), or another clone is under way. Try again later.
    #[error("refused: the replica is not running alone or is busy with another clone")]
    Refused,
    /// The new backup did not accept the machine, did not say it applied the pre-copy
    /// (SYNC) or did not confirm the restore.
    #[error("the new backup {0} (see its log)")]
    NotConfirmed(&'static str),
}

/// Waits up to `patience` for the new backup's [`ACCEPT`].
fn await_accept(socket: &Socket, patience: Duration, what: &'static str) -> Result<(), CloneError> {
    socket.set_read_timeout(Some(patience))?;
    let mut answer = [0u8; 1];
    let got = (&*socket).read(&mut answer);
    socket.set_read_timeout(None)?;
    match got {
        Ok(1) if answer[0] == ACCEPT => Ok(()),
        _ => Err(CloneError::NotConfirmed(what)),
    }
}

/// The first section of a clone stream: which machine, and the pair's new generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneHeader {
    /// The generation the pair will have once the clone is made.
    pub generation: u64,
    /// The machine (as a log header names it).
    pub machine: LogHeader,
}

impl Snapshot for CloneHeader {
    fn tag(&self) -> Tag {
        *b"CLON"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.generation);
        save_machine(out, &self.machine)
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let generation = input.u64("generation")?;
        *self = CloneHeader {
            generation,
            machine: restore_machine(input, self.machine.version)?,
        };
        Ok(())
    }
}

/// A page of zeros, to compare with.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// What the pre-copy sent: the CRC32 of each page as sent, and which pages were.
pub struct Sent {
    crcs: Vec<u32>,
    sent: DirtyPages,
}

impl Sent {
    fn new(mem: &GuestMemoryMmap) -> Self {
        let pages = ftvm_machine::memory::mem_size(mem) / PAGE_SIZE;
        Sent {
            crcs: vec![0; pages as usize],
            sent: DirtyPages {
                bits: vec![0; pages.div_ceil(64) as usize],
            },
        }
    }

    fn was_sent(&self, page: u64) -> bool {
        self.sent.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// The page digest (see the module doc) of what was sent.
    fn digest(&self) -> u64 {
        page_digest(&self.sent, &self.crcs)
    }
}

/// FNV-1a's 64-bit prime, to fold page CRCs.
const FOLD_PRIME: u64 = 0x0000_0100_0000_01B3;

/// Folds the index and CRC of every page in `pages`, ascending.
fn page_digest(pages: &DirtyPages, crcs: &[u32]) -> u64 {
    let mut digest = 0xCBF2_9CE4_8422_2325u64;
    for page in pages.pages() {
        let crc = crcs.get(page as usize).copied().unwrap_or(0);
        digest = (digest ^ page).wrapping_mul(FOLD_PRIME);
        digest = (digest ^ u64::from(crc)).wrapping_mul(FOLD_PRIME);
    }
    digest
}

/// What the new backup received: every page written, and the CRC32 of each as written.
struct Received {
    written: DirtyPages,
    crcs: Vec<u32>,
}

impl Received {
    fn new(mem: &GuestMemoryMmap) -> Received {
        let total = ftvm_machine::memory::mem_size(mem) / PAGE_SIZE;
        Received {
            written: DirtyPages {
                bits: vec![0; total.div_ceil(64) as usize],
            },
            crcs: vec![0; total as usize],
        }
    }

    /// Writes a MEMC section into `mem` and notes the CRC of each of its pages; returns
    /// the pages.
    fn apply(&mut self, mem: &GuestMemoryMmap, section: &Section) -> Result<u64, CloneError> {
        let pages = apply_chunk(mem, section, &mut self.written)?;
        // apply_chunk checked the shape: an address, then whole pages inside RAM.
        let (addr, data) = section.payload.split_at(8);
        let first = u64::from_le_bytes(addr.try_into().unwrap_or_default()) / PAGE_SIZE;
        for (index, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            if let Some(crc) = self.crcs.get_mut((first + index as u64) as usize) {
                *crc = crc32fast::hash(page);
            }
        }
        Ok(pages)
    }
}

/// How the transfer went.
#[derive(Debug, Clone, Default)]
pub struct CloneStats {
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages sent by each round.
    pub round_pages: Vec<u64>,
    /// Pages sent with the guest stopped.
    pub final_pages: u64,
    /// Bytes of the whole clone stream.
    pub bytes: u64,
    /// From the request to the end of the pre-copy.
    pub precopy: Duration,
    /// Of the pre-copy: waiting for the new backup to apply what was sent.
    pub catch_up: Duration,
    /// How long the guest was stopped.
    pub pause: Duration,
    /// Of the pause: the machine state (with the whole-RAM digest).
    pub state: Duration,
    /// Of the pause: the last pass over RAM for changed pages.
    pub final_pass: Duration,
    /// Rounds that read only the pages written since the round before.
    pub tracked_rounds: u32,
    /// Whether the final pass read only the pages written since the last round (else
    /// all of RAM).
    pub final_tracked: bool,
    /// Of the pause: waiting for the new backup to confirm its restore.
    pub confirm: Duration,
    /// A private disk's copy.
    pub disk: Option<disk::DiskCopyStats>,
}

/// Reads page `index` of `mem` into `page`.
fn read_page(mem: &GuestMemoryMmap, index: u64, page: &mut [u8]) -> Result<(), CloneError> {
    let addr = index * PAGE_SIZE;
    mem.read_slice(page, GuestAddress(addr))
        .map_err(|err| SnapshotError::Memory {
            addr,
            why: err.to_string(),
        })?;
    Ok(())
}

/// Reads page `index` into `page`; returns its CRC if it must be sent: its content
/// differs from what was sent, or, never sent, it is not zero.
fn changed(
    mem: &GuestMemoryMmap,
    sent: &Sent,
    untouched: Option<&ftvm_machine::memory::UntouchedPages>,
    index: u64,
    page: &mut [u8],
) -> Result<Option<u32>, CloneError> {
    let was_sent = sent.was_sent(index);
    // Never touched, so zero (and never sent: a page once sent was not zero, and stays
    // touched): not even read.
    if untouched.is_some_and(|untouched| untouched.contains(index)) && !was_sent {
        return Ok(None);
    }
    read_page(mem, index, page)?;
    // Most of RAM is zero and was never sent: a memcmp, no checksum, skips it.
    if !was_sent && page[..] == ZERO_PAGE[..] {
        return Ok(None);
    }
    let crc = crc32fast::hash(page);
    Ok((!was_sent || sent.crcs[index as usize] != crc).then_some(crc))
}

/// Sends every page whose content differs from what was sent (or, never sent, is not
/// zero) as MEMC sections, reading each page once: a pre-copy round that reads all of
/// RAM, while the guest runs. Returns the pages and chunks sent.
fn send_changed(
    mem: &GuestMemoryMmap,
    sent: &mut Sent,
    out: &mut dyn Write,
) -> Result<(u64, u64), CloneError> {
    let all = 0..sent.crcs.len() as u64;
    let untouched = ftvm_machine::memory::UntouchedPages::of(mem);
    send_changed_among(mem, sent, all, Some(&untouched), out)
}

/// [`send_changed`] of the pages in `candidates` (ascending) only: a round, or the final
/// pass, that knows which pages were written since the one before ([`tracking`]).
/// `untouched`, if known, are pages not even read.
fn send_changed_among(
    mem: &GuestMemoryMmap,
    sent: &mut Sent,
    candidates: impl Iterator<Item = u64>,
    untouched: Option<&ftvm_machine::memory::UntouchedPages>,
    out: &mut dyn Write,
) -> Result<(u64, u64), CloneError> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut runs = PageChunks::new(out);
    let total = sent.crcs.len() as u64;
    for index in candidates.take_while(|index| *index < total) {
        // The CRC kept is that of the very bytes sent (the guest may write the page
        // again right after it was read).
        if let Some(crc) = changed(mem, sent, untouched, index, &mut page)? {
            runs.push(index, &page)?;
            sent.crcs[index as usize] = crc;
            sent.sent.insert(index);
        }
    }
    Ok(runs.finish()?)
}

/// Threads that look for changed pages in the final pass (the vCPU's among them).
const FINAL_PASS_THREADS: usize = 4;

/// [`send_changed`] with the guest stopped: the search for changed pages, which reads
/// every page the guest may have touched, is split across the host's cores (up to
/// [`FINAL_PASS_THREADS`]); then the pages found are sent in order.
fn send_changed_stopped(
    mem: &GuestMemoryMmap,
    sent: &mut Sent,
    out: &mut dyn Write,
) -> Result<(u64, u64), CloneError> {
    let total = sent.crcs.len() as u64;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, FINAL_PASS_THREADS) as u64;
    let untouched = ftvm_machine::memory::UntouchedPages::of(mem);
    let share = total.div_ceil(threads);
    let search = |first: u64| -> Result<Vec<u64>, CloneError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut found = Vec::new();
        for index in first..(first + share).min(total) {
            if changed(mem, sent, Some(&untouched), index, &mut page)?.is_some() {
                found.push(index);
            }
        }
        Ok(found)
    };
    let found: Vec<Result<Vec<u64>, CloneError>> = std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads)
            .map(|part| scope.spawn(move || search(part * share)))
            .collect();
        let mut found = vec![search(0)];
        found.extend(
            others
                .into_iter()
                .map(|other| other.join().unwrap_or(Err(CloneError::Thread))),
        );
        found
    });
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut runs = PageChunks::new(out);
    for index in found
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
    {
        read_page(mem, index, &mut page)?;
        runs.push(index, &page)?;
        sent.crcs[index as usize] = crc32fast::hash(&page);
        sent.sent.insert(index);
    }
    Ok(runs.finish()?)
}

/// Counts what goes through a writer.
struct Counting<W: Write> {
    inner: W,
    bytes: u64,
    /// After this, writing fails: the peer takes too long.
    deadline: Instant,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the new backup takes too long to read the clone",
            ));
        }
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Counts what comes through a reader.
struct CountingReader<'a> {
    inner: &'a mut Socket,
    bytes: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// What the pre-copy thread hands back.
pub struct Precopied {
    /// The socket to the new backup.
    pub socket: Socket,
    /// What was sent.
    pub sent: Sent,
    /// Rounds and bytes so far.
    pub stats: CloneStats,
    /// A private disk's sender, for the final pass.
    pub disk: Option<disk::DiskSender>,
    /// The pages written since the last round, if they are tracked.
    pub tracking: Option<Arc<Tracking>>,
}

/// A pre-copy running on its own thread while the guest runs.
pub struct Precopy {
    handle: JoinHandle<Result<Precopied, CloneError>>,
    tracking: Option<Arc<Tracking>>,
}

impl Precopy {
    /// Starts sending `mem` to the new backup on `socket`: the header, then a private
    /// disk's rounds (`disk`), then rounds of changed pages until they converge. With
    /// `tracking` (started just before, at a pause), rounds after the first read only the
    /// pages written since the round before; without, each reads all of RAM.
    pub fn start(
        socket: Socket,
        mem: GuestMemoryMmap,
        header: CloneHeader,
        mut disk: Option<disk::DiskSender>,
        tracking: Option<Arc<Tracking>>,
    ) -> Result<Precopy, CloneError> {
        let started = Instant::now();
        let shared = tracking.clone();
        let handle = std::thread::Builder::new()
            .name("ftvmm-precopy".into())
            .spawn(move || {
                socket.set_write_timeout(Some(WRITE_PATIENCE))?;
                // The stream's last segment before each wait for an answer (the end of
                // the final copy above all) must not sit in Nagle's buffer until the
                // peer's delayed ACK: that was 40 ms of some pauses.
                socket.set_nodelay(true)?;
                let mut out = Counting {
                    inner: BufWriter::with_capacity(1 << 20, socket.try_clone()?),
                    bytes: 0,
                    deadline: started + PRECOPY_PATIENCE,
                };
                out.write_all(&CLONE_MAGIC)?;
                out.write_all(&CLONE_VERSION.to_le_bytes())?;
                out.write_all(&0u16.to_le_bytes())?;
                out.write_all(&save_section(&header)?)?;
                out.flush()?;
                await_accept(&socket, ACCEPT_PATIENCE, "refused the machine")?;
                if let Some(disk) = &mut disk {
                    disk.precopy(&mut out)?;
                }
                let mut sent = Sent::new(&mem);
                let mut stats = CloneStats::default();
                let mut previous = u64::MAX;
                while stats.rounds < MAX_ROUNDS {
                    let written = match &tracking {
                        Some(tracking) if stats.rounds > 0 => tracking.take(),
                        _ => None,
                    };
                    let (pages, _) = match written {
                        Some(written) => {
                            stats.tracked_rounds += 1;
                            send_changed_among(&mem, &mut sent, written.pages(), None, &mut out)?
                        }
                        None => send_changed(&mem, &mut sent, &mut out)?,
                    };
                    stats.rounds += 1;
                    stats.round_pages.push(pages);
                    if pages <= CONVERGED_PAGES || pages >= previous {
                        break;
                    }
                    previous = pages;
                }
                // The guest stops only once the new backup has applied all of it: what
                // still sat in the sockets would otherwise be drained during the pause.
                out.write_all(&frame_section(*b"SYNC", 1, &[])?)?;
                out.flush()?;
                let caught_up = Instant::now();
                await_accept(&socket, SYNC_PATIENCE, "did not keep up with the pre-copy")?;
                stats.catch_up = caught_up.elapsed();
                stats.bytes = out.bytes;
                stats.precopy = started.elapsed();
                Ok(Precopied {
                    socket,
                    sent,
                    stats,
                    disk,
                    tracking,
                })
            })
            .map_err(|_| CloneError::Thread)?;
        Ok(Precopy {
            handle,
            tracking: shared,
        })
    }

    /// The written pages it asks the vCPU thread for, if they are tracked.
    pub fn tracking(&self) -> Option<&Tracking> {
        self.tracking.as_deref()
    }

    /// Whether the pre-copy is over (then [`Precopy::join`] does not block).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Its outcome.
    pub fn join(self) -> Result<Precopied, CloneError> {
        self.handle.join().map_err(|_| CloneError::Thread)?
    }
}

/// The stop-and-copy, with the guest stopped between exits at `resume.ordinal` (the last
/// exit completed by KVM): the machine state, the pages changed since they were sent, and
/// the end. Returns the machine's identity and digests at this point.
pub fn finish(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    resume: ResumePoint,
    precopied: &mut Precopied,
) -> Result<SnapshotReport, CloneError> {
    let mem = parts.mem;
    let deadline = Instant::now() + FINISH_PATIENCE;
    precopied.socket.set_write_timeout(Some(FINISH_PATIENCE))?;
    let mut out = Counting {
        inner: BufWriter::with_capacity(1 << 20, precopied.socket.try_clone()?),
        bytes: 0,
        deadline,
    };
    out.write_all(&frame_section(*b"STOP", 1, &[])?)?;
    if let Some(disk) = &mut precopied.disk {
        disk.finish(&mut out)?;
    }
    let started = Instant::now();
    // Marks a snapshot took meanwhile (`--snapshot-at`) wait in the carried pages.
    let written = precopied.tracking.as_ref().and_then(|tracking| {
        let mut written = tracking.take_final(|pages| pages.harvest(parts.vm, mem))?;
        written.merge(parts.dirty);
        Some(written)
    });
    precopied.stats.final_tracked = written.is_some();
    let (pages, chunks) = match written {
        Some(written) => {
            send_changed_among(mem, &mut precopied.sent, written.pages(), None, &mut out)?
        }
        None => send_changed_stopped(mem, &mut precopied.sent, &mut out)?,
    };
    let digest = precopied.sent.digest();
    precopied.stats.final_pass = started.elapsed();
    let started = Instant::now();
    let (identity, interrupt_queued) = save_state(parts, machine, resume, Some(digest), &mut out)?;
    write_end(&mut out, pages, chunks, digest)?;
    out.flush()?;
    precopied.stats.state = started.elapsed();
    // Nothing is claimed and no log flows before the copy is known to be good.
    let started = Instant::now();
    let left = deadline.saturating_duration_since(Instant::now());
    await_accept(
        &precopied.socket,
        left.max(Duration::from_millis(1)),
        "did not confirm the restore in time",
    )?;
    // The log channel that follows on this socket sets its own.
    precopied.socket.set_write_timeout(None)?;
    precopied.stats.confirm = started.elapsed();
    precopied.stats.final_pages = pages;
    precopied.stats.bytes += out.bytes;
    precopied.stats.disk = precopied.disk.take().map(|disk| disk.stats.clone());
    Ok(SnapshotReport {
        identity,
        bytes: precopied.stats.bytes,
        pages,
        interrupt_queued,
    })
}

/// The backup's side: reads a clone stream from `socket` into `parts` (a machine built
/// from this backup's flags, not run) and into `disk` (its own copy of a private disk),
/// checking the machine and the generation first. Reads exactly the clone stream: the
/// log that follows on the socket stays unread.
pub fn receive(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    generation: u64,
    socket: &mut Socket,
    disk: Option<&PrivateDisk>,
) -> Result<(SnapshotReport, ResumePoint), CloneError> {
    // A primary that never reaches a pause (its guest idle in HLT) must not hang us.
    socket.set_read_timeout(Some(RECEIVE_PATIENCE))?;
    // Its one-byte answers go out at once.
    socket.set_nodelay(true)?;
    let received = receive_stream(parts, machine, generation, socket, disk);
    socket.set_read_timeout(None)?;
    received
}

fn receive_stream(
    parts: MachineParts<'_>,
    machine: &LogHeader,
    generation: u64,
    socket: &mut Socket,
    disk: Option<&PrivateDisk>,
) -> Result<(SnapshotReport, ResumePoint), CloneError> {
    let mut socket = CountingReader {
        inner: socket,
        bytes: 0,
    };
    let socket = &mut socket;
    let mut head = [0u8; 12];
    socket.read_exact(&mut head).map_err(|err| {
        if err.kind() == std::io::ErrorKind::UnexpectedEof && socket.bytes == 0 {
            CloneError::Refused
        } else {
            CloneError::BadMagic
        }
    })?;
    if head[..8] != CLONE_MAGIC {
        return Err(CloneError::BadMagic);
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if version != CLONE_VERSION || head[10..12] != [0, 0] {
        return Err(CloneError::Version {
            found: version,
            supported: CLONE_VERSION,
        });
    }
    let mut header = CloneHeader {
        generation: 0,
        machine: machine.clone(),
    };
    next_section(socket, "CLON")?.apply(&mut header)?;
    if let Some(what) = machine_mismatch(&header.machine, machine) {
        return Err(SnapshotError::Mismatch(what).into());
    }
    if header.generation != generation {
        return Err(CloneError::Generation {
            theirs: header.generation,
            ours: generation,
        });
    }
    // The copy replaces whatever the disk held: it starts as holes.
    if let Some(disk) = disk {
        disk.discard()?;
    }
    socket.inner.write_all(&[ACCEPT])?;
    let mem = parts.mem;
    // What the machine built from our flags wrote (its image, boot structures) is what
    // may need zeroing at the end; taken before any page arrives.
    let touched_before = touched_pages(mem);
    let mut received = Received::new(mem);
    loop {
        let section = next_section(socket, "STOP")?;
        match &section.tag {
            b"MEMC" if section.version == 1 => {
                received.apply(mem, &section)?;
            }
            b"DSKC" if disk.is_some() => {
                if let Some(disk) = disk {
                    disk::receive_block(disk, &section)?;
                }
            }
            b"SYNC" if section.version == 1 && section.payload.is_empty() => {
                socket.inner.write_all(&[ACCEPT])?;
            }
            b"STOP" if section.version == 1 && section.payload.is_empty() => break,
            other => {
                return Err(SnapshotError::WrongSection {
                    expected: "MEMC, DSKC, SYNC or STOP".into(),
                    found: ftvm_machine::snapshot::tag_name(other),
                }
                .into())
            }
        }
    }
    if let Some(disk) = disk {
        let mut own = None;
        loop {
            let section = next_section(socket, "DEND")?;
            match (&section.tag, own) {
                (b"DSKC", None) => disk::receive_block(disk, &section)?,
                (b"DFIN", None) => own = Some(disk::digest_copy(disk, &section)?),
                (b"DEND", Some(own)) => {
                    disk::check_end(own, &section)?;
                    break;
                }
                (other, _) => {
                    return Err(SnapshotError::WrongSection {
                        expected: if own.is_some() {
                            "DEND"
                        } else {
                            "DSKC or DFIN"
                        }
                        .into(),
                        found: ftvm_machine::snapshot::tag_name(other),
                    }
                    .into())
                }
            }
        }
    }
    // The pages changed since they were sent, then the machine state.
    let (mut pages, mut chunks) = (0u64, 0u64);
    let machine_section = loop {
        let section = next_section(socket, "MACH")?;
        match &section.tag {
            b"MEMC" if section.version == 1 => {
                pages += received.apply(mem, &section)?;
                chunks += 1;
            }
            _ => break section,
        }
    };
    let (identity, interrupt_queued, resume) = {
        let first = frame_section(
            machine_section.tag,
            machine_section.version,
            &machine_section.payload,
        )?;
        let mut state = (&first[..]).chain(&mut *socket);
        restore_state(parts, machine, &mut state)?
    };
    let end = next_section(socket, "MEND")?;
    if &end.tag != b"MEND" || end.version != 1 {
        return Err(SnapshotError::WrongSection {
            expected: "MEND".into(),
            found: ftvm_machine::snapshot::tag_name(&end.tag),
        }
        .into());
    }
    let mut summary = Decoder::new(end.tag, &end.payload);
    let announced = (
        summary.u64("pages")?,
        summary.u64("chunks")?,
        summary.u64("page digest")?,
    );
    summary.finish()?;
    zero_unwritten(mem, &received.written, &touched_before)?;
    // The restore's own writes are no guest activity (the source starts without marks).
    ftvm_machine::memory::forget_vmm_writes(mem);
    let digest = page_digest(&received.written, &received.crcs);
    if announced != (pages, chunks, identity.mem_digest) {
        return Err(summary
            .invalid(format!(
                "{} pages in {} chunks and digest {:#018x} announced, {pages} in {chunks} received and {:#018x} in the machine section",
                announced.0, announced.1, announced.2, identity.mem_digest
            ))
            .into());
    }
    if digest != identity.mem_digest {
        return Err(SnapshotError::MemoryDigest {
            expected: identity.mem_digest,
            restored: digest,
        }
        .into());
    }
    socket.inner.write_all(&[ACCEPT])?;
    Ok((
        SnapshotReport {
            identity,
            bytes: socket.bytes,
            pages,
            interrupt_queued,
        },
        resume,
    ))
}

/// An error and its causes on one line.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

pub mod disk;
pub mod tracking;
pub use tracking::Tracking;
pub mod receive;
pub mod source;

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_machine::snapshot::testing::{assert_refuses_damage, assert_round_trip};
    use ftvm_machine::snapshot::Section;

    fn blank() -> CloneHeader {
        CloneHeader {
            generation: 0,
            machine: LogHeader::for_machine(b"", 0, String::new(), ""),
        }
    }

    #[test]
    fn the_clone_header_round_trips_and_refuses_damage() {
        let header = CloneHeader {
            generation: 7,
            machine: LogHeader::for_machine(
                b"kv",
                128 << 20,
                "disk_sectors=32768".into(),
                "ip=10.0.0.2/24",
            ),
        };
        let bytes = assert_round_trip(&header, &mut blank());
        assert_refuses_damage(&bytes, blank);
    }

    /// Applies every MEMC section in `stream` to `mem`.
    fn apply_all(mut stream: &[u8], mem: &GuestMemoryMmap) -> u64 {
        let mut written = DirtyPages::default();
        let mut pages = 0;
        while let Some(section) = Section::read(&mut stream).unwrap() {
            pages += apply_chunk(mem, &section, &mut written).unwrap();
        }
        pages
    }

    #[test]
    fn rounds_send_exactly_the_pages_that_changed_whoever_wrote_them() {
        let source =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        let copy =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        // What a fresh copy holds that the source does not (its own boot image).
        copy.write_slice(&[0xEE; 16], GuestAddress(0x9000)).unwrap();
        source
            .write_slice(&[1; 5000], GuestAddress(0x3000))
            .unwrap();
        source
            .write_slice(&[2; 8], GuestAddress(0x10_0000))
            .unwrap();
        let mut sent = Sent::new(&source);
        let mut stream = Vec::new();
        // Round 1: the non-zero pages only (0x3000, 0x4000 and 0x10_0000).
        assert_eq!(
            send_changed(&source, &mut sent, &mut stream).unwrap(),
            (3, 2)
        );
        assert_eq!(apply_all(&stream, &copy), 3);
        // Nothing changed: nothing sent.
        stream.clear();
        assert_eq!(
            send_changed(&source, &mut sent, &mut stream).unwrap(),
            (0, 0)
        );
        // One page rewritten (as a device's DMA would: no KVM involved), one zeroed.
        source
            .write_slice(&[3; 4], GuestAddress(0x10_0010))
            .unwrap();
        source
            .write_slice(&[0; 4096], GuestAddress(0x3000))
            .unwrap();
        stream.clear();
        assert_eq!(
            send_changed(&source, &mut sent, &mut stream).unwrap(),
            (2, 2)
        );
        assert_eq!(apply_all(&stream, &copy), 2);
        // The copy's own page that the source never had stays to be zeroed by the end
        // of the restore: everything else is equal now.
        copy.write_slice(&[0; 16], GuestAddress(0x9000)).unwrap();
        assert_eq!(
            ftvm_machine::memory::memory_digest(&copy),
            ftvm_machine::memory::memory_digest(&source)
        );
    }

    #[test]
    fn the_final_pass_split_across_threads_sends_what_one_thread_would() {
        let source =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        for (addr, byte) in [
            (0x3000, 1u8),
            (0x1F_F000, 2),
            (0x10_0000, 3),
            (0x18_0000, 4),
        ] {
            source
                .write_slice(&[byte; 4096], GuestAddress(addr))
                .unwrap();
        }
        let (mut one, mut split) = (Sent::new(&source), Sent::new(&source));
        let mut stream = Vec::new();
        send_changed(&source, &mut one, &mut stream).unwrap();
        send_changed(&source, &mut split, &mut Vec::new()).unwrap();
        // Changed after the pre-copy: rewritten, zeroed, written for the first time.
        source
            .write_slice(&[9; 8], GuestAddress(0x1F_F100))
            .unwrap();
        source
            .write_slice(&[0; 4096], GuestAddress(0x3000))
            .unwrap();
        source
            .write_slice(&[5; 4096], GuestAddress(0x1C_0000))
            .unwrap();
        let (mut by_one, mut by_split) = (Vec::new(), Vec::new());
        assert_eq!(
            send_changed(&source, &mut one, &mut by_one).unwrap(),
            (3, 3)
        );
        assert_eq!(
            send_changed_stopped(&source, &mut split, &mut by_split).unwrap(),
            (3, 3)
        );
        assert_eq!(by_one, by_split);
        assert_eq!(one.digest(), split.digest());
    }

    #[test]
    fn a_pass_over_the_written_pages_sends_what_a_pass_over_all_ram_would() {
        let source =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        for (addr, byte) in [(0x3000, 1u8), (0x10_0000, 3), (0x18_0000, 4)] {
            source
                .write_slice(&[byte; 4096], GuestAddress(addr))
                .unwrap();
        }
        let (mut all, mut tracked) = (Sent::new(&source), Sent::new(&source));
        send_changed(&source, &mut all, &mut Vec::new()).unwrap();
        send_changed(&source, &mut tracked, &mut Vec::new()).unwrap();
        // Written since: rewritten, zeroed, written for the first time; and a page
        // written with the bytes it had (a mark, no change), which is not sent.
        let mut written = DirtyPages::default();
        for (addr, bytes) in [
            (0x10_0100, &[9u8; 8][..]),
            (0x3000, &[0; 4096][..]),
            (0x1C_0000, &[5; 4096][..]),
            (0x18_0000, &[4; 16][..]),
        ] {
            source.write_slice(bytes, GuestAddress(addr)).unwrap();
            written.insert(addr / PAGE_SIZE);
        }
        let (mut by_all, mut by_tracked) = (Vec::new(), Vec::new());
        assert_eq!(
            send_changed(&source, &mut all, &mut by_all).unwrap(),
            (3, 3)
        );
        assert_eq!(
            send_changed_among(
                &source,
                &mut tracked,
                written.pages(),
                None,
                &mut by_tracked
            )
            .unwrap(),
            (3, 3)
        );
        assert_eq!(by_all, by_tracked);
        assert_eq!(all.digest(), tracked.digest());
    }

    #[test]
    fn the_page_digest_of_what_was_received_is_that_of_what_was_sent() {
        let source =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        let copy =
            ftvm_machine::memory::create_guest_memory(ftvm_machine::layout::MEM_MIN).unwrap();
        // The machine the new backup built wrote here before the clone arrived.
        copy.write_slice(&[0xEE; 16], GuestAddress(0x9000)).unwrap();
        let touched_before = touched_pages(&copy);
        source
            .write_slice(&[1; 9000], GuestAddress(0x3000))
            .unwrap();
        let (mut sent, mut received) = (Sent::new(&source), Received::new(&copy));
        let send_and_apply = |sent: &mut Sent, received: &mut Received| {
            let mut stream = Vec::new();
            send_changed(&source, sent, &mut stream).unwrap();
            let mut input = &stream[..];
            while let Some(section) = Section::read(&mut input).unwrap() {
                received.apply(&copy, &section).unwrap();
            }
        };
        send_and_apply(&mut sent, &mut received);
        // Rewritten and zeroed after they were sent (the final pass sends them again).
        source.write_slice(&[2; 10], GuestAddress(0x4000)).unwrap();
        source
            .write_slice(&[0; 4096], GuestAddress(0x3000))
            .unwrap();
        send_and_apply(&mut sent, &mut received);
        zero_unwritten(&copy, &received.written, &touched_before).unwrap();
        assert_eq!(
            page_digest(&received.written, &received.crcs),
            sent.digest()
        );
        assert_eq!(
            ftvm_machine::memory::memory_digest(&copy),
            ftvm_machine::memory::memory_digest(&source)
        );
        // A page that arrived different does not digest the same.
        received.crcs[4] ^= 1;
        assert_ne!(
            page_digest(&received.written, &received.crcs),
            sent.digest()
        );
    }
}
