//! The backup's acknowledgement on the wire (see the channel's module doc).

use super::*;

/// The backup's acknowledgement of what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Whole frames received, the header included.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// The exit ordinal the backup's replay has reached.
    pub ordinal: u64,
}

impl Ack {
    /// What a backup sends last when it goes away for good (it stopped, ended, went
    /// live): its primary then declares it lost at once instead of waiting
    /// [`RECONNECT_WINDOW`] for a reconnection that will not come. Never an
    /// acknowledgement of anything.
    pub const LEAVING: Ack = Ack {
        frames: u64::MAX,
        bytes: u64::MAX,
        ordinal: u64::MAX,
    };

    /// The wire form.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut out = [0u8; ACK_LEN];
        out[0..8].copy_from_slice(&self.frames.to_le_bytes());
        out[8..16].copy_from_slice(&self.bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.ordinal.to_le_bytes());
        let crc = crc32fast::hash(&out[..24]);
        out[24..28].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the wire form; `None` if the checksum does not match.
    pub fn decode(bytes: &[u8; ACK_LEN]) -> Option<Ack> {
        let word = |at: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(le)
        };
        let crc = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
        (crc32fast::hash(&bytes[..24]) == crc).then(|| Ack {
            frames: word(0),
            bytes: word(8),
            ordinal: word(16),
        })
    }
}
