//! What a backup's NIC sends when it goes live, besides announcing the guest's MAC: its
//! guest's latest TCP segments again, and a kick per connection.
//!
//! A client of the guest stalls across a failover for two reasons. The primary may have
//! died holding the guest's latest segments (the output rule kept them back until the
//! backup acknowledged the log): the backup's guest produced the same segments while it
//! replayed, and sending them again delivers those replies and acknowledgements at once.
//! And a client whose request went to the dead primary waits for its retransmission
//! timeout (200 ms at least, doubling) before it sends again: three duplicate
//! acknowledgements from the guest make it retransmit at once (fast retransmit).
//!
//! Both are things the backup's guest itself said or would say: the segments are its own,
//! and a pure acknowledgement carries the sequence, acknowledgement and window of its
//! latest segment on that connection. TCP absorbs the duplicates. Only TCP over IPv4 is
//! touched; other protocols might not absorb a duplicate.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How many of the latest TCP segments are sent again.
const RECENT_SEGMENTS: usize = 32;
/// How many connections get a kick (the ones with the latest segments).
const MAX_CONNECTIONS: usize = 1024;
/// Segments older than this are left alone: the primary released them long ago, or
/// their connection has moved on.
const WINDOW: Duration = Duration::from_secs(3);
/// Duplicate acknowledgements per connection: Linux's (and RFC 5681's) threshold.
const DUPLICATE_ACKS: usize = 3;

const ETHERNET_HEADER: usize = 14;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A replaying backup's record of its guest's latest TCP segments.
#[derive(Default)]
pub struct RecentTcp {
    segments: VecDeque<(Instant, Vec<u8>)>,
    /// The latest segment of each connection, by addresses and ports.
    latest: HashMap<[u8; 12], (Instant, Vec<u8>)>,
}

impl RecentTcp {
    /// Notes a frame the guest transmitted (and the replay dropped); frames other than
    /// IPv4 TCP segments are ignored.
    pub fn note(&mut self, frame: &[u8]) {
        let Some(segment) = Segment::parse(frame) else {
            return;
        };
        let now = Instant::now();
        if self.segments.len() == RECENT_SEGMENTS {
            self.segments.pop_front();
        }
        self.segments.push_back((now, frame.to_vec()));
        if self.latest.len() >= MAX_CONNECTIONS && !self.latest.contains_key(&segment.key) {
            if let Some(oldest) = self
                .latest
                .iter()
                .min_by_key(|(_, (made, _))| *made)
                .map(|(key, _)| *key)
            {
                self.latest.remove(&oldest);
            }
        }
        self.latest.insert(segment.key, (now, frame.to_vec()));
    }

    /// The frames to send at go-live, in order: the recent segments again, then three
    /// pure acknowledgements per recent connection. Empties the record.
    pub fn takeover_frames(&mut self) -> Vec<Vec<u8>> {
        let fresh = |made: &Instant| made.elapsed() < WINDOW;
        let mut frames: Vec<Vec<u8>> = self
            .segments
            .drain(..)
            .filter(|(made, _)| fresh(made))
            .map(|(_, frame)| frame)
            .collect();
        for (_, (made, frame)) in self.latest.drain() {
            if let Some(ack) = fresh(&made).then(|| pure_ack(&frame)).flatten() {
                frames.extend(std::iter::repeat_n(ack, DUPLICATE_ACKS));
            }
        }
        frames
    }
}

/// Where the parts of an IPv4 TCP frame are.
struct Segment {
    ip: usize,
    tcp: usize,
    payload: usize,
    end: usize,
    flags: u8,
    key: [u8; 12],
}

impl Segment {
    fn parse(frame: &[u8]) -> Option<Segment> {
        let ip = ETHERNET_HEADER;
        if frame.len() < ip + 20 || frame[12..14] != [0x08, 0x00] || frame[ip] >> 4 != 4 {
            return None;
        }
        let ip_header = usize::from(frame[ip] & 0x0F) * 4;
        let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
        // Not a fragment (flags MF or an offset), and TCP.
        let fragment = u16::from_be_bytes([frame[ip + 6], frame[ip + 7]]) & 0x3FFF;
        if ip_header < 20 || frame[ip + 9] != 6 || fragment != 0 {
            return None;
        }
        let tcp = ip + ip_header;
        let end = ip.checked_add(total)?;
        if end > frame.len() || tcp + 20 > end {
            return None;
        }
        let payload = tcp + usize::from(frame[tcp + 12] >> 4) * 4;
        if payload < tcp + 20 || payload > end {
            return None;
        }
        let mut key = [0u8; 12];
        key[..8].copy_from_slice(&frame[ip + 12..ip + 20]);
        key[8..].copy_from_slice(&frame[tcp..tcp + 4]);
        Some(Segment {
            ip,
            tcp,
            payload,
            end,
            flags: frame[tcp + 13],
            key,
        })
    }
}

/// A pure acknowledgement in the state `frame` (an IPv4 TCP segment) leaves its sender
/// in: the same addresses, ports, acknowledgement, window and options, the sequence
/// number after the segment's data, no data, only the ACK flag, checksums redone. `None`
/// for segments that open, reset or close a connection, or carry no acknowledgement.
pub fn pure_ack(frame: &[u8]) -> Option<Vec<u8>> {
    let segment = Segment::parse(frame)?;
    if segment.flags & TCP_ACK == 0 || segment.flags & (TCP_SYN | TCP_RST | TCP_FIN) != 0 {
        return None;
    }
    let (ip, tcp) = (segment.ip, segment.tcp);
    let data_len = u32::try_from(segment.end - segment.payload).ok()?;
    let mut ack = frame[..segment.payload].to_vec();
    let total = u16::try_from(segment.payload - ip).ok()?;
    ack[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
    ack[ip + 10..ip + 12].fill(0);
    let ip_sum = checksum(&[&ack[ip..tcp]]);
    ack[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let seq = u32::from_be_bytes([ack[tcp + 4], ack[tcp + 5], ack[tcp + 6], ack[tcp + 7]]);
    ack[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add(data_len).to_be_bytes());
    ack[tcp + 13] = TCP_ACK;
    ack[tcp + 16..tcp + 18].fill(0);
    // The pseudo-header: addresses, protocol, TCP length.
    let tcp_len = u16::try_from(ack.len() - tcp).ok()?;
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ack[ip + 12..ip + 20]);
    pseudo[9] = 6;
    pseudo[10..].copy_from_slice(&tcp_len.to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &ack[tcp..]]);
    ack[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    Some(ack)
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`, each of even
/// length but the last.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for word in &mut words {
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with correct checksums.
    fn segment(flags: u8, seq: u32, ack: u32, data: &[u8], options: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; ETHERNET_HEADER];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let tcp_len = 20 + options.len() + data.len();
        let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
        ip[2..4].copy_from_slice(&u16::try_from(20 + tcp_len).unwrap().to_be_bytes());
        ip.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&6379u16.to_be_bytes());
        tcp.extend_from_slice(&40000u16.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.push(u8::try_from((20 + options.len()) / 4).unwrap() << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&4096u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(options);
        tcp.extend_from_slice(data);
        let mut pseudo = vec![10, 0, 0, 2, 10, 0, 0, 1, 0, 6];
        pseudo.extend_from_slice(&u16::try_from(tcp_len).unwrap().to_be_bytes());
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&tcp);
        frame
    }

    #[test]
    fn checksum_matches_rfc_1071() {
        // RFC 1071's example: the one's complement sum of these words is 0xddf2.
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&bytes]), !0xddf2);
        assert_eq!(checksum(&[&bytes[..4], &bytes[4..]]), !0xddf2, "split");
    }

    #[test]
    fn a_reply_becomes_the_pure_ack_after_it() {
        let options = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
        let reply = segment(TCP_ACK | 0x08, 1000, 5000, b"+OK\r\n", &options);
        let ack = pure_ack(&reply).expect("an ack");
        // Exactly what the guest's TCP would send next with nothing to say.
        assert_eq!(ack, segment(TCP_ACK, 1005, 5000, b"", &options));
        // Odd payload lengths, and an ack of an ack is the same ack.
        let odd = segment(TCP_ACK, 7, 9, b"abc", &[]);
        assert_eq!(pure_ack(&odd), Some(segment(TCP_ACK, 10, 9, b"", &[])));
        let again = pure_ack(&ack).unwrap();
        assert_eq!(again, ack);
    }

    #[test]
    fn segments_that_change_the_connection_and_garbage_get_no_ack() {
        for flags in [
            TCP_SYN | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST | TCP_ACK,
            TCP_SYN,
            0,
        ] {
            assert_eq!(
                pure_ack(&segment(flags, 1, 2, b"x", &[])),
                None,
                "{flags:#x}"
            );
        }
        let good = segment(TCP_ACK, 1, 2, b"data", &[]);
        for len in 0..good.len() {
            // Truncated frames are refused, never a panic.
            let _ = pure_ack(&good[..len]);
        }
        let mut lying = good.clone();
        lying[ETHERNET_HEADER + 2] = 0xFF; // total length past the frame
        assert_eq!(pure_ack(&lying), None);
        let mut udp = good;
        udp[ETHERNET_HEADER + 9] = 17;
        assert_eq!(pure_ack(&udp), None);
    }

    #[test]
    fn the_record_sends_recent_segments_then_three_acks_per_connection() {
        let mut recent = RecentTcp::default();
        recent.note(b"not even ethernet");
        for seq in 0..40u32 {
            recent.note(&segment(TCP_ACK, seq * 10, 77, b"0123456789", &[]));
        }
        let frames = recent.takeover_frames();
        let kick = segment(TCP_ACK, 400, 77, b"", &[]);
        assert_eq!(frames.len(), RECENT_SEGMENTS + DUPLICATE_ACKS);
        assert_eq!(frames[0], segment(TCP_ACK, 80, 77, b"0123456789", &[]));
        assert!(frames[RECENT_SEGMENTS..].iter().all(|frame| *frame == kick));
        assert!(recent.takeover_frames().is_empty(), "emptied");
    }
}
