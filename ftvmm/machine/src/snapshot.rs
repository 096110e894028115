//! Saving and restoring the state of a machine, one component at a time.
//!
//! Every stateful component (the vCPU, the interrupt state, the clock, each device, the
//! log bookkeeping) implements [`Snapshot`]: it writes its state into a [`Encoder`] and
//! reads it back from a [`Decoder`]. The bytes are framed as a *section*, versioned and
//! checksummed on its own, so that a whole-machine snapshot (`machine`) is a sequence of
//! self-describing sections, and a later checkpoint mode can reuse the same components.
//!
//! ```text
//! section := tag: [u8; 4] | version: u16 | len: u32 | payload (len bytes) | crc32: u32
//!            crc32 (IEEE) covers tag, version, len and payload; little-endian throughout
//! ```
//!
//! The input may come over the network: every read is bounds-checked, every length is
//! checked against a fixed limit before anything is allocated, and a malformed section is
//! a [`SnapshotError`], never a panic. A component decodes its whole section before it
//! changes anything, so a refused section leaves it as it was.

pub mod machine;
pub mod vcpu;

use std::io::{Read, Write};

/// Four ASCII bytes naming a component in the stream (`b"VCPU"`).
pub type Tag = [u8; 4];

/// Largest section payload. The largest real section is a memory chunk (1 MiB) or a disk
/// with held writes; anything longer is refused before it is read.
pub const MAX_SECTION_LEN: u32 = 64 << 20;

/// Bytes before a section's payload: tag, version, length.
const SECTION_HEAD: usize = 10;
/// The most a section's read sets aside before its bytes arrive: a lying length on a
/// short stream costs no more.
const READ_RESERVE: usize = 2 << 20;

/// A snapshot could not be made or applied.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The input ends inside a section or a field.
    #[error("snapshot section {section}: truncated while reading {what}")]
    Truncated {
        /// The section.
        section: String,
        /// The field or part being read.
        what: &'static str,
    },
    /// A length field is larger than its limit.
    #[error("snapshot section {section}: {what} is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// The section.
        section: String,
        /// The field.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The section's checksum does not match its bytes.
    #[error("snapshot section {section}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The section.
        section: String,
        /// The checksum in the stream.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// The section was written by a newer version of its component.
    #[error("snapshot section {section}: version {found} is not supported (this ftvmm reads up to {supported})")]
    UnsupportedVersion {
        /// The section.
        section: String,
        /// The version in the stream.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// Another component's section is where this one was expected.
    #[error("snapshot: expected section {expected}, found {found}")]
    WrongSection {
        /// The section this machine needs next.
        expected: String,
        /// The section in the stream.
        found: String,
    },
    /// A section has bytes its component did not read.
    #[error("snapshot section {section}: {extra} unexpected bytes after the last field")]
    Trailing {
        /// The section.
        section: String,
        /// How many.
        extra: usize,
    },
    /// A field holds a value the component cannot take.
    #[error("snapshot section {section}: {what}")]
    Invalid {
        /// The section.
        section: String,
        /// What is wrong.
        what: String,
    },
    /// The snapshot is of another machine (image, memory, devices, command line).
    #[error("the snapshot is of another machine: {0}")]
    Mismatch(String),
    /// The stream does not start like a snapshot.
    #[error("not an ftvm snapshot (bad magic)")]
    BadMagic,
    /// The stream's format version is not this build's.
    #[error(
        "snapshot format version {found} is not supported (this ftvmm reads version {supported})"
    )]
    UnsupportedFormat {
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The restored memory does not hash to what the snapshot says.
    #[error(
        "restored memory digest {restored:#018x} differs from the snapshot's {expected:#018x}"
    )]
    MemoryDigest {
        /// What the snapshot says.
        expected: u64,
        /// What the restored memory hashes to.
        restored: u64,
    },
    /// A KVM call failed while saving or restoring.
    #[error("cannot {what}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory at {addr:#x}: {why}")]
    Memory {
        /// The guest physical address.
        addr: u64,
        /// What failed.
        why: String,
    },
    /// Reading or writing the stream failed.
    #[error("snapshot I/O")]
    Io(#[from] std::io::Error),
}

/// A tag as text, for messages (`"VCPU"`; bytes that are not printable ASCII as `\xNN`).
pub fn tag_name(tag: &Tag) -> String {
    tag.iter()
        .flat_map(|byte| std::ascii::escape_default(*byte))
        .map(char::from)
        .collect()
}

/// A component whose state can be saved and restored.
///
/// `restore` must check every value it takes (the bytes may come from the network) and
/// must leave the component unchanged when it returns an error.
pub trait Snapshot {
    /// The section tag of this component.
    fn tag(&self) -> Tag;
    /// The version of the section this build writes (and the newest it reads).
    fn version(&self) -> u16;
    /// Appends the component's state to `out`.
    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError>;
    /// Replaces the component's state with what `input` holds, written by `version`
    /// (never newer than [`Snapshot::version`]).
    fn restore(&mut self, input: &mut Decoder<'_>, version: u16) -> Result<(), SnapshotError>;
}

/// A little-endian writer of section payloads.
#[derive(Debug, Default)]
pub struct Encoder {
    bytes: Vec<u8>,
}

impl Encoder {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty payload with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        Encoder {
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Empties it, keeping its buffer.
    pub fn clear(&mut self) {
        self.bytes.clear();
    }

    /// Appends a byte.
    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    /// Appends a `u16`.
    pub fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// Appends a boolean as one byte, 0 or 1.
    pub fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    /// Appends bytes whose length the reader knows (no length prefix).
    pub fn fixed(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Appends a `u32` length and the bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let len = u32::try_from(bytes.len()).map_err(|_| SnapshotError::TooLong {
            section: "(writing)".into(),
            what: "a byte string",
            len: bytes.len() as u64,
            max: u64::from(u32::MAX),
        })?;
        self.u32(len);
        self.fixed(bytes);
        Ok(())
    }

    /// Appends `component` as a nested section (a `u32` length, then the section).
    pub fn section(&mut self, component: &dyn Snapshot) -> Result<(), SnapshotError> {
        let section = save_section(component)?;
        self.bytes(&section)
    }

    /// The payload so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// A bounds-checked little-endian reader of one section's payload.
#[derive(Debug)]
pub struct Decoder<'a> {
    data: &'a [u8],
    at: usize,
    section: Tag,
}

impl<'a> Decoder<'a> {
    /// Reads the payload `data` of section `section`.
    pub fn new(section: Tag, data: &'a [u8]) -> Self {
        Decoder {
            data,
            at: 0,
            section,
        }
    }

    /// The section's name, for errors.
    pub fn section_name(&self) -> String {
        tag_name(&self.section)
    }

    /// An [`SnapshotError::Invalid`] in this section.
    pub fn invalid(&self, what: impl Into<String>) -> SnapshotError {
        SnapshotError::Invalid {
            section: self.section_name(),
            what: what.into(),
        }
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.data.len())
            .ok_or_else(|| SnapshotError::Truncated {
                section: self.section_name(),
                what,
            })?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SnapshotError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// A byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, SnapshotError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// A `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A boolean: 0 or 1, anything else is refused.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, SnapshotError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.invalid(format!("{what} is {other}, not 0 or 1"))),
        }
    }

    /// A `u32` length and that many bytes, at most `max`.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], SnapshotError> {
        let len = self.u32(what)?;
        if len as usize > max {
            return Err(SnapshotError::TooLong {
                section: self.section_name(),
                what,
                len: u64::from(len),
                max: max as u64,
            });
        }
        self.take(len as usize, what)
    }

    /// A count of items that each take at least `item_size` bytes, at most `max`: checked
    /// against the bytes left too, so a lying count cannot make the caller reserve memory.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        item_size: usize,
    ) -> Result<usize, SnapshotError> {
        let count = self.u32(what)? as usize;
        if count > max {
            return Err(SnapshotError::TooLong {
                section: self.section_name(),
                what,
                len: count as u64,
                max: max as u64,
            });
        }
        if count.saturating_mul(item_size.max(1)) > self.remaining() {
            return Err(SnapshotError::Truncated {
                section: self.section_name(),
                what,
            });
        }
        Ok(count)
    }

    /// Restores `component` from a nested section written by [`Encoder::section`].
    pub fn nested(
        &mut self,
        what: &'static str,
        component: &mut dyn Snapshot,
    ) -> Result<(), SnapshotError> {
        let bytes = self.bytes(what, MAX_SECTION_LEN as usize + SECTION_HEAD + 4)?;
        restore_section(component, bytes)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    /// Checks that every byte was read.
    pub fn finish(&self) -> Result<(), SnapshotError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(SnapshotError::Trailing {
                section: self.section_name(),
                extra,
            }),
        }
    }
}

/// The head of a section carrying `payload`: tag, version, payload length.
fn section_head(
    tag: Tag,
    version: u16,
    payload: &[u8],
) -> Result<[u8; SECTION_HEAD], SnapshotError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_SECTION_LEN)
        .ok_or_else(|| SnapshotError::TooLong {
            section: tag_name(&tag),
            what: "the section",
            len: payload.len() as u64,
            max: u64::from(MAX_SECTION_LEN),
        })?;
    let mut head = [0u8; SECTION_HEAD];
    head[..4].copy_from_slice(&tag);
    head[4..6].copy_from_slice(&version.to_le_bytes());
    head[6..].copy_from_slice(&len.to_le_bytes());
    Ok(head)
}

/// Frames `payload` as a section.
pub fn frame_section(tag: Tag, version: u16, payload: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let head = section_head(tag, version, payload)?;
    let mut out = Vec::with_capacity(SECTION_HEAD + payload.len() + 4);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Writes `payload` framed as a section to `out`, the same bytes as [`frame_section`]
/// without copying the payload (a clone's memory chunks are a MiB each).
pub fn write_section(
    out: &mut dyn Write,
    tag: Tag,
    version: u16,
    payload: &[u8],
) -> Result<(), SnapshotError> {
    let head = section_head(tag, version, payload)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(payload);
    out.write_all(&head)?;
    out.write_all(payload)?;
    out.write_all(&crc.finalize().to_le_bytes())?;
    Ok(())
}

/// `component`'s state as one framed section.
pub fn save_section(component: &dyn Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Encoder::new();
    component.save(&mut out)?;
    frame_section(component.tag(), component.version(), out.as_bytes())
}

/// A section read from a stream, checksum verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Its tag.
    pub tag: Tag,
    /// The version of its component that wrote it.
    pub version: u16,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Section {
    /// Parses one whole section from `bytes` (nothing may follow it).
    pub fn parse(bytes: &[u8]) -> Result<Section, SnapshotError> {
        let mut reader = bytes;
        let section = Section::read(&mut reader)?.ok_or_else(|| SnapshotError::Truncated {
            section: "(none)".into(),
            what: "the section head",
        })?;
        if !reader.is_empty() {
            return Err(SnapshotError::Trailing {
                section: tag_name(&section.tag),
                extra: reader.len(),
            });
        }
        Ok(section)
    }

    /// Reads the next section from `input`; `None` at a clean end of the stream. The
    /// payload buffer grows as bytes arrive, so a lying length on a short stream costs
    /// no more memory than the stream holds.
    pub fn read(input: &mut impl Read) -> Result<Option<Section>, SnapshotError> {
        let mut head = [0u8; SECTION_HEAD];
        let got = read_full(input, &mut head)?;
        if got == 0 {
            return Ok(None);
        }
        let mut tag = [0u8; 4];
        tag.copy_from_slice(&head[..4]);
        let section = tag_name(&tag);
        if got < SECTION_HEAD {
            return Err(SnapshotError::Truncated {
                section,
                what: "the section head",
            });
        }
        let version = u16::from_le_bytes([head[4], head[5]]);
        let len = u32::from_le_bytes([head[6], head[7], head[8], head[9]]);
        if len > MAX_SECTION_LEN {
            return Err(SnapshotError::TooLong {
                section,
                what: "the section",
                len: u64::from(len),
                max: u64::from(MAX_SECTION_LEN),
            });
        }
        // Room for what a section usually holds (a clone's memory chunk is a MiB), so
        // the payload is not copied as it grows; a longer one grows as it arrives.
        let mut payload = Vec::with_capacity((len as usize).min(READ_RESERVE));
        input
            .by_ref()
            .take(u64::from(len))
            .read_to_end(&mut payload)?;
        let mut crc = [0u8; 4];
        if payload.len() < len as usize || read_full(input, &mut crc)? < 4 {
            return Err(SnapshotError::Truncated {
                section,
                what: "the section payload",
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&head);
        hasher.update(&payload);
        let computed = hasher.finalize();
        let stored = u32::from_le_bytes(crc);
        if computed != stored {
            return Err(SnapshotError::Checksum {
                section,
                stored,
                computed,
            });
        }
        Ok(Some(Section {
            tag,
            version,
            payload,
        }))
    }

    /// Applies this section to `component`: the tag must be the component's, the version
    /// not newer than it reads, and the component must read every byte.
    pub fn apply(&self, component: &mut dyn Snapshot) -> Result<(), SnapshotError> {
        if self.tag != component.tag() {
            return Err(SnapshotError::WrongSection {
                expected: tag_name(&component.tag()),
                found: tag_name(&self.tag),
            });
        }
        if self.version == 0 || self.version > component.version() {
            return Err(SnapshotError::UnsupportedVersion {
                section: tag_name(&self.tag),
                found: self.version,
                supported: component.version(),
            });
        }
        // Components check what they read before they take it, but bytes left over are
        // found only after: the state before is put back then, so that a refused section
        // changes nothing.
        let mut before = Encoder::new();
        component.save(&mut before)?;
        let mut input = Decoder::new(self.tag, &self.payload);
        component.restore(&mut input, self.version)?;
        if let Err(err) = input.finish() {
            let mut undo = Decoder::new(self.tag, before.as_bytes());
            component.restore(&mut undo, component.version())?;
            return Err(err);
        }
        Ok(())
    }
}

/// Restores `component` from one whole framed section.
pub fn restore_section(component: &mut dyn Snapshot, bytes: &[u8]) -> Result<(), SnapshotError> {
    Section::parse(bytes)?.apply(component)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(got)
}

#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
