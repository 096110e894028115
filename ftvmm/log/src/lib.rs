//! The ftvm log: the nondeterministic inputs of a run, stamped with exit ordinals.
//!
//! The same frames go to a file (`--record`) and over the primary -> backup log channel
//! (`crate::channel`), so the format is a self-delimiting stream of checksummed frames.
//!
//! ```text
//! stream  := Header frame, then event frames, ending with an End frame if the run ended
//! frame   := len: u32 LE | kind: u8 | ordinal: u64 LE | payload (len bytes) | crc32: u32 LE
//!            crc32 (IEEE) covers len, kind, ordinal and payload
//! ```
//!
//! The ordinal of an event is the exit ordinal (1-based count of guest-caused exits) of
//! the exit at which it took effect; ordinals never decrease along the stream. The Header
//! carries the format version and identifies the run (image checksum, memory size, command
//! line) so that a log is never replayed against another machine.
//!
//! | kind | event | payload |
//! |---|---|---|
//! | 1 | Header | version u16, mem_size u64, image_crc u32, image_len u64, machine length u16, machine, cmdline (rest) |
//! | 2 | ClockRead | register offset u8, value u64 |
//! | 3 | TimerTick | (none) |
//! | 4 | Injected | vector u8 |
//! | 5 | NetRx | frame bytes |
//! | 6 | DiskRead | status u8, data bytes (empty unless status is OK) |
//! | 7 | DiskDone | status u8 (writes and flushes) |
//! | 8 | RegsDigest | rip u64, hash u64 |
//! | 9 | MemDigest | pages u32, hash u64 |
//! | 10 | End | outcome u8 (0 power-off, 1 crash, 2 stopped by a signal), code u8 (power-off code, or the signal), regs hash u64, memory hash u64 |
//! | 11 | Heartbeat | (none; its ordinal is the frame's) |
//! | 12 | DiskComplete | request u64, status u8 (a held write or flush completed) |
//! | 13 | DiskReadCrc | status u8, len u32, crc32 u32 (a read of a private disk: what it read, not the data) |
//!
//! A Heartbeat is not an event: only a live stream carries them (a file never does). Its
//! ordinal `h` promises that every event with an ordinal below `h` is already in the stream,
//! so a backup may execute exits up to `h - 1` without waiting for the next frame.

use std::io::{Read, Write};

/// Version of the frame format and event set (4 added DiskReadCrc; a version 3 log is a
/// version 4 log without it, so both are read).
pub const LOG_VERSION: u16 = 4;
/// The oldest version this build reads.
pub const LOG_VERSION_MIN: u16 = 3;
/// Largest payload a frame may carry: the largest disk read (a whole descriptor chain) plus
/// its status byte, with slack.
pub const MAX_PAYLOAD: u32 = (16 << 20) + 64;
const FRAME_HEAD: usize = 13;
const FRAME_TAIL: usize = 4;
/// Frame kinds are `1..KIND_COUNT`; arrays indexed by kind have this length.
pub const KIND_COUNT: usize = 14;
/// The kind byte of a Heartbeat frame.
pub const HEARTBEAT_KIND: u8 = 11;
/// The kind byte of an End frame.
pub const END_KIND: u8 = 10;

/// Identifies the run a log belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    /// Format version.
    pub version: u16,
    /// Guest RAM size.
    pub mem_size: u64,
    /// CRC32 of the guest image.
    pub image_crc: u32,
    /// Length of the guest image.
    pub image_len: u64,
    /// The devices, as `key=value` words (`net=<mac> disk_sectors=<n>`), so a replay
    /// builds the same machine.
    pub machine: String,
    /// The guest command line.
    pub cmdline: String,
}

impl LogHeader {
    /// The header of a run of `image` (its bytes) with `mem_size` bytes of RAM, the
    /// devices `machine` (see `crate::vm::describe_machine`) and `cmdline`: what a
    /// recorder writes and what a backup expects from its primary.
    pub fn for_machine(image: &[u8], mem_size: u64, machine: String, cmdline: &str) -> Self {
        LogHeader {
            version: LOG_VERSION,
            mem_size,
            image_crc: crc32fast::hash(image),
            image_len: image.len() as u64,
            machine,
            cmdline: cmdline.to_owned(),
        }
    }
}

/// [`EndState::outcome`]: the guest powered off.
pub const END_POWER_OFF: u8 = 0;
/// [`EndState::outcome`]: the guest crashed.
pub const END_CRASH: u8 = 1;
/// [`EndState::outcome`]: the VMM was stopped by a signal (SIGTERM, SIGINT) between two
/// exits; a replay stops at the same point and checks the final state there.
pub const END_STOPPED: u8 = 2;

/// How a recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndState {
    /// [`END_POWER_OFF`], [`END_CRASH`] or [`END_STOPPED`].
    pub outcome: u8,
    /// Power-off code, or the signal that stopped the run (0 for a crash).
    pub code: u8,
    /// Digest of the final registers.
    pub regs_hash: u64,
    /// Digest of all guest memory.
    pub mem_hash: u64,
}

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Identifies the run; always the first frame.
    Header(LogHeader),
    /// The guest read a platform clock register and got `value`.
    ClockRead {
        /// Register offset in the platform MMIO page.
        register: u8,
        /// The value returned.
        value: u64,
    },
    /// The timer raised its vector at this exit.
    TimerTick,
    /// This vector was injected at this exit.
    Injected {
        /// The vector.
        vector: u8,
    },
    /// The NIC backend produced this frame at this exit.
    NetRx {
        /// Frame bytes (no virtio header).
        frame: Vec<u8>,
    },
    /// A disk read completed with `status` and `data`.
    DiskRead {
        /// virtio-blk status byte.
        status: u8,
        /// The bytes read (empty unless `status` is OK).
        data: Vec<u8>,
    },
    /// A disk write or flush completed with `status`.
    DiskDone {
        /// virtio-blk status byte.
        status: u8,
    },
    /// Digest of the registers after this exit.
    RegsDigest {
        /// Guest RIP.
        rip: u64,
        /// Hash of general and control registers.
        hash: u64,
    },
    /// Digest of the guest pages dirtied since the previous memory digest.
    MemDigest {
        /// How many pages were dirty.
        pages: u32,
        /// Hash of their numbers and contents.
        hash: u64,
    },
    /// The run ended at this exit.
    End(EndState),
    /// Stream progress, not an event: every event with an ordinal below this frame's
    /// ordinal has been sent already.
    Heartbeat,
    /// A disk write or flush that a pair's primary held for the output rule completed, and
    /// its completion reached the guest at this exit.
    DiskComplete {
        /// The request's number: the count of held requests the device submitted before it.
        request: u64,
        /// virtio-blk status byte.
        status: u8,
    },
    /// A read of a private disk (each replica has its own copy): a replay reads its own
    /// copy and compares, instead of taking the data from the log.
    DiskReadCrc {
        /// virtio-blk status byte.
        status: u8,
        /// Bytes read.
        len: u32,
        /// CRC32 (IEEE) of the bytes read (0 unless status is OK).
        crc: u32,
    },
}

impl Event {
    /// The frame kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Event::Header(_) => 1,
            Event::ClockRead { .. } => 2,
            Event::TimerTick => 3,
            Event::Injected { .. } => 4,
            Event::NetRx { .. } => 5,
            Event::DiskRead { .. } => 6,
            Event::DiskDone { .. } => 7,
            Event::RegsDigest { .. } => 8,
            Event::MemDigest { .. } => 9,
            Event::End(_) => END_KIND,
            Event::Heartbeat => HEARTBEAT_KIND,
            Event::DiskComplete { .. } => 12,
            Event::DiskReadCrc { .. } => 13,
        }
    }

    /// A short name for summaries and messages.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Event::Header(header) => {
                out.extend_from_slice(&header.version.to_le_bytes());
                out.extend_from_slice(&header.mem_size.to_le_bytes());
                out.extend_from_slice(&header.image_crc.to_le_bytes());
                out.extend_from_slice(&header.image_len.to_le_bytes());
                let machine =
                    &header.machine.as_bytes()[..header.machine.len().min(u16::MAX as usize)];
                out.extend_from_slice(&(machine.len() as u16).to_le_bytes());
                out.extend_from_slice(machine);
                out.extend_from_slice(header.cmdline.as_bytes());
            }
            Event::ClockRead { register, value } => {
                out.push(*register);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Event::TimerTick | Event::Heartbeat => {}
            Event::Injected { vector } => out.push(*vector),
            Event::NetRx { frame } => out.extend_from_slice(frame),
            Event::DiskRead { status, data } => {
                out.push(*status);
                out.extend_from_slice(data);
            }
            Event::DiskDone { status } => out.push(*status),
            Event::DiskComplete { request, status } => {
                out.extend_from_slice(&request.to_le_bytes());
                out.push(*status);
            }
            Event::DiskReadCrc { status, len, crc } => {
                out.push(*status);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&crc.to_le_bytes());
            }
            Event::RegsDigest { rip, hash } => {
                out.extend_from_slice(&rip.to_le_bytes());
                out.extend_from_slice(&hash.to_le_bytes());
            }
            Event::MemDigest { pages, hash } => {
                out.extend_from_slice(&pages.to_le_bytes());
                out.extend_from_slice(&hash.to_le_bytes());
            }
            Event::End(end) => {
                out.push(end.outcome);
                out.push(end.code);
                out.extend_from_slice(&end.regs_hash.to_le_bytes());
                out.extend_from_slice(&end.mem_hash.to_le_bytes());
            }
        }
    }

    fn decode(kind: u8, payload: &[u8]) -> Result<Event, &'static str> {
        let mut at = Cursor {
            bytes: payload,
            pos: 0,
        };
        let event = match kind {
            1 => Event::Header(LogHeader {
                version: at.u16()?,
                mem_size: at.u64()?,
                image_crc: at.u32()?,
                image_len: at.u64()?,
                machine: {
                    let len = at.u16()?;
                    let bytes = at.slice(usize::from(len))?;
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| "machine description is not UTF-8")?
                },
                cmdline: String::from_utf8(at.rest().to_vec())
                    .map_err(|_| "command line is not UTF-8")?,
            }),
            2 => Event::ClockRead {
                register: at.u8()?,
                value: at.u64()?,
            },
            3 => Event::TimerTick,
            4 => Event::Injected { vector: at.u8()? },
            5 => Event::NetRx {
                frame: at.rest().to_vec(),
            },
            6 => Event::DiskRead {
                status: at.u8()?,
                data: at.rest().to_vec(),
            },
            7 => Event::DiskDone { status: at.u8()? },
            8 => Event::RegsDigest {
                rip: at.u64()?,
                hash: at.u64()?,
            },
            9 => Event::MemDigest {
                pages: at.u32()?,
                hash: at.u64()?,
            },
            10 => Event::End(EndState {
                outcome: at.u8()?,
                code: at.u8()?,
                regs_hash: at.u64()?,
                mem_hash: at.u64()?,
            }),
            HEARTBEAT_KIND => Event::Heartbeat,
            12 => Event::DiskComplete {
                request: at.u64()?,
                status: at.u8()?,
            },
            13 => Event::DiskReadCrc {
                status: at.u8()?,
                len: at.u32()?,
                crc: at.u32()?,
            },
            _ => return Err("unknown frame kind"),
        };
        if at.pos != payload.len() && !matches!(kind, 1 | 5 | 6) {
            return Err("payload longer than its kind");
        }
        Ok(event)
    }
}

/// The name of frame kind `kind`.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "header",
        2 => "clock-read",
        3 => "timer-tick",
        4 => "injected",
        5 => "net-rx",
        6 => "disk-read",
        7 => "disk-done",
        8 => "regs-digest",
        9 => "mem-digest",
        10 => "end",
        11 => "heartbeat",
        12 => "disk-complete",
        13 => "disk-read-crc",
        _ => "unknown",
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let end = self
            .pos
            .checked_add(N)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("payload too short")?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        self.take().map(u64::from_le_bytes)
    }
    fn slice(&mut self, len: usize) -> Result<&[u8], &'static str> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or("payload too short")?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn rest(&mut self) -> &[u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }
}

/// An event with the exit ordinal it took effect at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Exit ordinal.
    pub ordinal: u64,
    /// The event.
    pub event: Event,
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEAD]);
        self.event.encode_payload(out);
        let len = (out.len() - start - FRAME_HEAD) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4] = self.event.kind();
        out[start + 5..start + 13].copy_from_slice(&self.ordinal.to_le_bytes());
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// A log stream is unusable (as opposed to a replay that diverged).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// Reading the underlying file or socket failed.
    #[error("cannot read the log: {0}")]
    Io(String),
    /// The stream ends inside a frame.
    #[error("log is truncated: frame {index} at byte {offset} is incomplete")]
    Truncated {
        /// Frame index.
        index: u64,
        /// Byte offset of the frame.
        offset: u64,
    },
    /// A frame's checksum does not match.
    #[error("log is corrupt: frame {index} at byte {offset} fails its checksum")]
    BadChecksum {
        /// Frame index.
        index: u64,
        /// Byte offset of the frame.
        offset: u64,
    },
    /// A frame is well-formed but makes no sense.
    #[error("log is corrupt: frame {index} at byte {offset}: {what}")]
    BadFrame {
        /// Frame index.
        index: u64,
        /// Byte offset of the frame.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The first frame is not a header, or its version is not ours.
    #[error("log version {found} is not supported (this ftvmm reads versions {LOG_VERSION_MIN} to {LOG_VERSION})")]
    Version {
        /// The version found.
        found: u16,
    },
}

/// Reads frames from a stream, checking checksums, kinds and ordinal order.
pub struct LogReader<R> {
    input: R,
    index: u64,
    offset: u64,
    last_ordinal: u64,
    header: Option<LogHeader>,
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the header frame.
    pub fn new(input: R) -> Result<Self, LogError> {
        let mut reader = LogReader {
            input,
            index: 0,
            offset: 0,
            last_ordinal: 0,
            header: None,
        };
        match reader.next_frame()? {
            Some(Frame {
                event: Event::Header(header),
                ..
            }) => {
                if !(LOG_VERSION_MIN..=LOG_VERSION).contains(&header.version) {
                    return Err(LogError::Version {
                        found: header.version,
                    });
                }
                reader.header = Some(header);
                Ok(reader)
            }
            Some(_) => Err(LogError::BadFrame {
                index: 0,
                offset: 0,
                what: "the first frame is not a header".into(),
            }),
            None => Err(LogError::Truncated {
                index: 0,
                offset: 0,
            }),
        }
    }

    /// The run the log belongs to.
    pub fn header(&self) -> &LogHeader {
        // Set by `new`, which is the only constructor.
        self.header
            .as_ref()
            .unwrap_or_else(|| unreachable!("header read in new"))
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, or `None` at a clean end of the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, LogError> {
        let (index, offset) = (self.index, self.offset);
        let mut head = [0u8; FRAME_HEAD];
        match read_full(&mut self.input, &mut head) {
            Ok(0) => return Ok(None),
            Ok(n) if n < FRAME_HEAD => return Err(LogError::Truncated { index, offset }),
            Ok(_) => {}
            Err(err) => return Err(LogError::Io(err.to_string())),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let kind = head[4];
        let ordinal = u64::from_le_bytes(head[5..13].try_into().unwrap_or_default());
        let bad = |what: String| LogError::BadFrame {
            index,
            offset,
            what,
        };
        if len > MAX_PAYLOAD {
            // Checked before allocating: a corrupt length must not make us allocate 4 GiB.
            return Err(bad(format!("payload length {len} exceeds {MAX_PAYLOAD}")));
        }
        let mut rest = vec![0u8; len as usize + FRAME_TAIL];
        match read_full(&mut self.input, &mut rest) {
            Ok(n) if n < rest.len() => return Err(LogError::Truncated { index, offset }),
            Ok(_) => {}
            Err(err) => return Err(LogError::Io(err.to_string())),
        }
        let (payload, crc_bytes) = rest.split_at(len as usize);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&head);
        hasher.update(payload);
        if hasher.finalize().to_le_bytes() != crc_bytes {
            return Err(LogError::BadChecksum { index, offset });
        }
        let event = Event::decode(kind, payload)
            .map_err(|what| bad(format!("{} frame: {what}", kind_name(kind))))?;
        if index > 0 && matches!(event, Event::Header(_)) {
            return Err(bad("a second header".into()));
        }
        if ordinal < self.last_ordinal {
            return Err(bad(format!(
                "ordinal {ordinal} after {}",
                self.last_ordinal
            )));
        }
        self.last_ordinal = ordinal;
        self.index += 1;
        self.offset += (FRAME_HEAD + rest.len()) as u64;
        Ok(Some(Frame { ordinal, event }))
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// Writes frames to a stream.
pub struct LogWriter<W: Write> {
    output: W,
    buffer: Vec<u8>,
    /// Frames written, by kind.
    pub frames_by_kind: [u64; KIND_COUNT],
    /// Bytes written, by kind.
    pub bytes_by_kind: [u64; KIND_COUNT],
    /// The highest ordinal written (a reader refuses a frame below it).
    last_ordinal: u64,
}

impl<W: Write> LogWriter<W> {
    /// A writer that starts the stream with `header`.
    pub fn new(output: W, header: LogHeader) -> std::io::Result<Self> {
        let mut writer = LogWriter {
            output,
            buffer: Vec::with_capacity(4096),
            frames_by_kind: [0; KIND_COUNT],
            bytes_by_kind: [0; KIND_COUNT],
            last_ordinal: 0,
        };
        writer.write(&Frame {
            ordinal: 0,
            event: Event::Header(header),
        })?;
        Ok(writer)
    }

    /// Appends one frame.
    pub fn write(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.buffer.clear();
        frame.encode(&mut self.buffer);
        let kind = usize::from(frame.event.kind());
        self.frames_by_kind[kind] += 1;
        self.bytes_by_kind[kind] += self.buffer.len() as u64;
        self.last_ordinal = self.last_ordinal.max(frame.ordinal);
        self.output.write_all(&self.buffer)
    }

    /// The highest ordinal written so far: no later frame may go below it.
    pub fn last_ordinal(&self) -> u64 {
        self.last_ordinal
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.output
    }

    /// Flushes buffered frames to the stream.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.output.flush()
    }

    /// Total bytes written.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_by_kind.iter().sum()
    }

    /// Total frames written (the header included).
    pub fn frames_total(&self) -> u64 {
        self.frames_by_kind.iter().sum()
    }
}

/// Finds frame boundaries in a raw byte stream without decoding or checking the frames
/// (the reader does that): the log channel counts, acknowledges and follows whole frames
/// with it on both sides.
#[derive(Debug, Default, Clone)]
pub struct FrameSplitter {
    head: [u8; FRAME_HEAD],
    head_len: usize,
    /// Payload and checksum bytes of the current frame not seen yet.
    remaining: u64,
    /// Complete frames seen.
    pub frames: u64,
    /// Bytes up to the end of the last complete frame.
    pub bytes: u64,
    /// Complete Heartbeat frames seen.
    pub heartbeats: u64,
    /// Kind and ordinal of the last complete frame.
    pub last: Option<(u8, u64)>,
    /// Whether an End frame went by.
    pub ended: bool,
}

impl FrameSplitter {
    /// Accounts for the next `data` of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.head_len < FRAME_HEAD {
                let take = (FRAME_HEAD - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + take].copy_from_slice(&data[..take]);
                self.head_len += take;
                data = &data[take..];
                if self.head_len == FRAME_HEAD {
                    let len = u32::from_le_bytes([
                        self.head[0],
                        self.head[1],
                        self.head[2],
                        self.head[3],
                    ]);
                    self.remaining = u64::from(len) + FRAME_TAIL as u64;
                }
                continue;
            }
            let take = usize::try_from(self.remaining)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.remaining -= take as u64;
            data = &data[take..];
            if self.remaining == 0 {
                let len =
                    u32::from_le_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
                let kind = self.head[4];
                let ordinal = u64::from_le_bytes([
                    self.head[5],
                    self.head[6],
                    self.head[7],
                    self.head[8],
                    self.head[9],
                    self.head[10],
                    self.head[11],
                    self.head[12],
                ]);
                self.frames += 1;
                self.bytes += (FRAME_HEAD + FRAME_TAIL) as u64 + u64::from(len);
                self.last = Some((kind, ordinal));
                self.ended |= kind == END_KIND;
                self.heartbeats += u64::from(kind == HEARTBEAT_KIND);
                self.head_len = 0;
            }
        }
    }
}

pub mod fuzz;
pub mod summary;

#[cfg(test)]
mod tests;
