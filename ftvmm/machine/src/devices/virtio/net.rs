//! virtio-net on a TAP device.
//!
//! Received frames are copied into the guest only at guest-caused exits (from
//! [`VirtioDevice::poll_backend`] or a notify of the receive queue), so the position of each
//! arrival is an exit ordinal.

use super::takeover::RecentTcp;
use super::tap::Tap;
use super::{
    read_config_bytes, validate_chain, Available, DeviceBroken, QueueSet, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::inputs::Inputs;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT, Reader, Writer};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Size of `virtio_net_hdr_v1` (modern devices always use the 12-byte header).
pub const NET_HEADER_SIZE: usize = 12;
/// Largest frame the device moves (an Ethernet frame with a VLAN tag is 1522).
pub const MAX_FRAME: usize = 65_536;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl std::str::FromStr for MacAddress {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .ok_or_else(|| format!("'{text}' is not a MAC address like 52:54:00:12:34:56"))?;
            *byte = u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
                .ok_or_else(|| format!("'{text}' is not a MAC address like 52:54:00:12:34:56"))?;
        }
        if parts.next().is_some() {
            return Err(format!(
                "'{text}' is not a MAC address like 52:54:00:12:34:56"
            ));
        }
        if bytes[0] & 1 != 0 {
            return Err(format!(
                "'{text}' is a multicast address, not usable for a NIC"
            ));
        }
        Ok(MacAddress(bytes))
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Counters of a network device.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes the guest sent.
    pub tx_bytes: u64,
    /// Frames dropped (too big for the guest's buffer, TAP queue full).
    pub dropped: u64,
    /// Frames a replaying backup took off its standby TAP and dropped (older than
    /// [`Standby::keep`], or beyond what it keeps).
    pub standby_swept: u64,
    /// Frames that had arrived on a backup's standby TAP and were handed to its guest
    /// when it went live.
    pub standby_delivered: u64,
}

/// How often a replaying backup empties its standby TAP.
const STANDBY_SWEEP: Duration = Duration::from_millis(20);
/// At most this many frames from the standby TAP are kept for going live (the oldest go).
const STANDBY_KEPT_FRAMES: usize = 512;
/// And at most this many bytes.
const STANDBY_KEPT_BYTES: usize = 2 << 20;

/// A virtio-net device on a TAP interface.
pub struct Net {
    /// The backend; `None` in replay, where frames come from the log and sends are dropped.
    tap: Option<Tap>,
    /// A TAP error was logged already (later ones are only counted).
    tap_error_logged: bool,
    /// A backup's TAP, open but unused until the backup goes live (then the MAC is
    /// announced on it).
    standby: Option<(Standby, Tap)>,
    /// A replaying backup's latest TCP transmits (dropped in replay), for go-live.
    recent_tcp: RecentTcp,
    /// Frames taken off the standby TAP while replaying, with when they arrived (at
    /// most [`Standby::keep`] old), and their bytes.
    standby_arrived: VecDeque<(Instant, Vec<u8>)>,
    standby_arrived_bytes: usize,
    /// Frames for the guest before anything the TAP has: what arrived on the standby
    /// TAP shortly before the backup went live.
    pending_rx: VecDeque<Vec<u8>>,
    /// When the standby TAP was last emptied, and polls since the clock was read.
    swept: Instant,
    polls_since_sweep: u32,
    config: [u8; 8],
    /// A frame read from the TAP that waits for a receive buffer.
    stashed: Option<Vec<u8>>,
    buffer: Vec<u8>,
    /// Counters.
    pub stats: NetStats,
}

/// What a backup's NIC needs to take over the network when it goes live.
#[derive(Debug, Clone)]
pub struct Standby {
    /// The TAP to open.
    pub tap: String,
    /// The guest's IPv4 address, for the gratuitous ARP (a RARP is sent either way).
    pub ip: Option<std::net::Ipv4Addr>,
    /// How long before going live a frame may have arrived on the standby TAP and still
    /// be handed to the guest: from about when the primary was last heard from. After
    /// the primary's host died, switches flood the guest's traffic (its port is gone)
    /// and a client's retransmissions reach this TAP before the backup is live; handed
    /// over at go-live they are answered at once instead of at the client's next
    /// retransmission (200 ms and more later, doubling).
    pub keep: Duration,
}

/// A broadcast frame announcing `mac` (and `ip`, if known) so switches and neighbours
/// send the guest's traffic to this host: a gratuitous ARP request, or a RARP request
/// without an address (as QEMU's announce does).
pub fn announcement(mac: MacAddress, ip: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xFF; 6]);
    frame.extend_from_slice(&mac.0);
    let (ethertype, operation, sender_ip, target_mac) = match ip {
        Some(ip) => (0x0806u16, 1u16, ip.octets(), [0u8; 6]),
        None => (0x8035, 3, [0; 4], mac.0),
    };
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&operation.to_be_bytes());
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&sender_ip);
    frame.extend_from_slice(&target_mac);
    frame.extend_from_slice(&sender_ip);
    frame.resize(60, 0);
    frame
}

impl Net {
    /// A backup's NIC: replaying (TAP unused) until the backup goes live, then on `tap`.
    pub fn standby(mac: MacAddress, standby: Standby, tap: Tap) -> Self {
        Net {
            standby: Some((standby, tap)),
            ..Self::new(None, mac)
        }
    }

    /// While replaying: empties the standby TAP every [`STANDBY_SWEEP`] into the frames
    /// kept for going live, and forgets those older than [`Standby::keep`].
    fn sweep_standby(&mut self) {
        // The clock is read every 64 exits, not at each (it may be a syscall here).
        self.polls_since_sweep += 1;
        if self.standby.is_none()
            || self.polls_since_sweep < 64
            || self.swept.elapsed() < STANDBY_SWEEP
        {
            return;
        }
        self.polls_since_sweep = 0;
        self.swept = Instant::now();
        self.take_standby_arrivals();
    }

    /// Moves what waits on the standby TAP into `standby_arrived`, keeping only the
    /// frames within [`Standby::keep`] and the bounds.
    fn take_standby_arrivals(&mut self) {
        let Some((standby, tap)) = self.standby.as_mut() else {
            return;
        };
        let now = Instant::now();
        while let Ok(Some(len)) = tap.receive(&mut self.buffer) {
            self.standby_arrived_bytes += len;
            self.standby_arrived
                .push_back((now, self.buffer[..len].to_vec()));
        }
        while let Some((arrived, frame)) = self.standby_arrived.front() {
            let too_many = self.standby_arrived.len() > STANDBY_KEPT_FRAMES
                || self.standby_arrived_bytes > STANDBY_KEPT_BYTES;
            if !too_many && now.duration_since(*arrived) <= standby.keep {
                break;
            }
            self.standby_arrived_bytes -= frame.len();
            self.standby_arrived.pop_front();
            self.stats.standby_swept += 1;
        }
    }

    /// Once inputs are live (a backup that went live), opens the standby TAP and announces
    /// the guest's MAC on it, so the network follows the guest to this host.
    fn go_live_if_due(&mut self, inputs: &Inputs) {
        if inputs.is_replay() || self.tap.is_some() {
            return;
        }
        // What arrived on the standby TAP since about when the primary was last heard
        // from goes to the guest first (see `Standby::keep`). Duplicates of what the
        // primary also got are absorbed like network duplicates.
        self.take_standby_arrivals();
        self.stats.standby_delivered += self.standby_arrived.len() as u64;
        self.pending_rx
            .extend(self.standby_arrived.drain(..).map(|(_, frame)| frame));
        self.standby_arrived_bytes = 0;
        let Some((standby, mut tap)) = self.standby.take() else {
            return;
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        let mac = MacAddress(mac);
        for frame in [announcement(mac, standby.ip), announcement(mac, None)] {
            if let Err(err) = tap.send(&frame) {
                tracing::warn!(
                    "virtio net: cannot announce {mac} on {}: {err}",
                    standby.tap
                );
            }
        }
        // See `takeover`: the guest's latest TCP segments again, and a kick that makes
        // each client retransmit now rather than after its timeout.
        let mut sent = 0;
        for frame in self.recent_tcp.takeover_frames() {
            if matches!(tap.send(&frame), Ok(true)) {
                sent += 1;
            }
        }
        tracing::warn!(
            "virtio net: live on TAP {}, announced {mac}, {sent} TCP frames sent for the takeover, {} frames that arrived before handed to the guest",
            standby.tap,
            self.pending_rx.len()
        );
        self.tap = Some(tap);
    }

    /// A NIC with address `mac` on `tap` (no TAP in replay).
    pub fn new(tap: Option<Tap>, mac: MacAddress) -> Self {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        Net {
            tap,
            tap_error_logged: false,
            standby: None,
            recent_tcp: RecentTcp::default(),
            standby_arrived: VecDeque::new(),
            standby_arrived_bytes: 0,
            pending_rx: VecDeque::new(),
            swept: Instant::now(),
            polls_since_sweep: 0,
            config,
            stashed: None,
            buffer: vec![0u8; MAX_FRAME],
            stats: NetStats::default(),
        }
    }

    /// Counts a TAP failure and logs the first one. The guest never learns of it: what
    /// the host's network does must not change guest-visible state, or replay would differ.
    fn tap_failed(&mut self, what: &str, err: &std::io::Error) {
        self.stats.dropped += 1;
        if !self.tap_error_logged {
            tracing::warn!("virtio net: TAP {what} failed, frames are dropped: {err}");
            self.tap_error_logged = true;
        }
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<bool, DeviceBroken> {
        self.go_live_if_due(inputs);
        let mut used = false;
        let mut available = Available::now(queue, mem, TX_QUEUE)?;
        while let Some(chain) = available.next(queue, mem, TX_QUEUE)? {
            let head = chain.head_index();
            let shape = validate_chain(&chain, queue, mem)?;
            let malformed = |what| DeviceBroken::MalformedRequest { head, what };
            if shape.readable < NET_HEADER_SIZE as u64 {
                return Err(malformed("transmit buffer shorter than the 12-byte header"));
            }
            let mut reader =
                Reader::new(mem, chain).map_err(|_| malformed("unreadable buffers"))?;
            let frame_len = reader.available_bytes() - NET_HEADER_SIZE;
            if frame_len > MAX_FRAME {
                self.stats.dropped += 1;
            } else {
                let mut header = [0u8; NET_HEADER_SIZE];
                reader
                    .read_exact(&mut header)
                    .map_err(|_| malformed("unreadable header"))?;
                reader
                    .read_exact(&mut self.buffer[..frame_len])
                    .map_err(|_| malformed("unreadable frame"))?;
                let sent = match self.tap.as_mut() {
                    // Sent now, held for the backup's acknowledgement, or (replaying)
                    // dropped: the output rule is the Inputs' business.
                    Some(tap) => {
                        inputs.transmit(&self.buffer[..frame_len], |frame| tap.send(frame))
                    }
                    None => {
                        if self.standby.is_some() {
                            self.recent_tcp.note(&self.buffer[..frame_len]);
                        }
                        Ok(true)
                    }
                };
                match sent {
                    Ok(true) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame_len as u64;
                    }
                    Ok(false) => self.stats.dropped += 1,
                    Err(err) => self.tap_failed("write", &err),
                }
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|err| bad_queue(TX_QUEUE, err))?;
            used = true;
        }
        Ok(used)
    }

    /// Moves frames from the TAP into receive buffers while both are available.
    fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<bool, DeviceBroken> {
        let mut used = false;
        // Looked at once a frame waits for a buffer, not before (the queue may not be set
        // up yet while nothing arrives).
        let mut available: Option<Available> = None;
        loop {
            if self.stashed.is_none() {
                let (tap, buffer, pending) =
                    (&mut self.tap, &mut self.buffer, &mut self.pending_rx);
                let received = inputs.net_rx(|| match tap {
                    Some(_) if !pending.is_empty() => Ok(pending.pop_front()),
                    Some(tap) => Ok(tap.receive(buffer)?.map(|len| buffer[..len].to_vec())),
                    None => Ok(None),
                });
                match received {
                    Ok(Some(frame)) => self.stashed = Some(frame),
                    Ok(None) => break,
                    Err(err) => {
                        self.tap_failed("read", &err);
                        break;
                    }
                }
            }
            let available = match &mut available {
                Some(available) => available,
                None => available.insert(Available::now(queue, mem, RX_QUEUE)?),
            };
            let Some(chain) = available.next(queue, mem, RX_QUEUE)? else {
                // No buffer (or none left of those offered when this look began): the
                // frame waits for the next one.
                break;
            };
            let head = chain.head_index();
            let shape = validate_chain(&chain, queue, mem)?;
            let malformed = |what| DeviceBroken::MalformedRequest { head, what };
            if shape.readable != 0 {
                return Err(malformed("receive buffer is not device-writable"));
            }
            let frame = self.stashed.take().unwrap_or_default();
            let needed = NET_HEADER_SIZE + frame.len();
            if (shape.writable as usize) < needed {
                // Without mergeable buffers a frame must fit one chain: drop it, return the
                // buffer empty.
                self.stats.dropped += 1;
                queue
                    .add_used(mem, head, 0)
                    .map_err(|err| bad_queue(RX_QUEUE, err))?;
                used = true;
                continue;
            }
            let mut writer =
                Writer::new(mem, chain).map_err(|_| malformed("unwritable buffers"))?;
            let mut header = [0u8; NET_HEADER_SIZE];
            header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            writer
                .write_all(&header)
                .and_then(|()| writer.write_all(&frame))
                .map_err(|_| malformed("unwritable buffers"))?;
            queue
                .add_used(mem, head, needed as u32)
                .map_err(|err| bad_queue(RX_QUEUE, err))?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += frame.len() as u64;
            used = true;
        }
        Ok(used)
    }
}

fn bad_queue(queue: usize, err: virtio_queue::Error) -> DeviceBroken {
    DeviceBroken::BadQueue {
        queue,
        what: err.to_string(),
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        match index {
            RX_QUEUE => self.poll_backend(queues, mem, inputs),
            TX_QUEUE => {
                let queue = &mut queues[TX_QUEUE];
                Ok(if self.transmit(queue, mem, inputs)? {
                    1 << TX_QUEUE
                } else {
                    0
                })
            }
            _ => Ok(0),
        }
    }

    fn poll_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        inputs: &mut Inputs,
    ) -> Result<QueueSet, DeviceBroken> {
        if inputs.is_replay() {
            self.sweep_standby();
        }
        self.go_live_if_due(inputs);
        let queue = &mut queues[RX_QUEUE];
        if !queue.ready() {
            return Ok(0);
        }
        Ok(if self.receive(queue, mem, inputs)? {
            1 << RX_QUEUE
        } else {
            0
        })
    }

    fn wake_fd(&self) -> Option<RawFd> {
        // With a frame already waiting for a buffer, more TAP input cannot be taken: polling
        // the fd would only spin.
        self.tap
            .as_ref()
            .filter(|_| self.stashed.is_none())
            .map(Tap::raw_fd)
    }

    fn reset(&mut self) {
        self.stashed = None;
        self.pending_rx.clear();
    }
}

/// The MAC (which must be this NIC's) and the received frame waiting for a buffer. The
/// TAP is the host's; a backup's record of recent TCP segments is rebuilt as it replays.
impl Snapshot for Net {
    fn tag(&self) -> Tag {
        *b"VNET"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.fixed(&self.config[..6]);
        out.bool(self.stashed.is_some());
        out.bytes(self.stashed.as_deref().unwrap_or_default())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let mac: [u8; 6] = input.array("MAC address")?;
        if mac != self.config[..6] {
            return Err(input.invalid(format!(
                "the NIC of MAC {}, this machine's is {}",
                MacAddress(mac),
                MacAddress(self.config[..6].try_into().unwrap_or_default())
            )));
        }
        let stashed = input.bool("stashed frame present")?;
        let frame = input.bytes("stashed frame", MAX_FRAME)?;
        if !stashed && !frame.is_empty() {
            return Err(input.invalid("a stashed frame marked absent"));
        }
        self.stashed = stashed.then(|| frame.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod snapshot_tests {
    use super::*;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};

    fn nic() -> Net {
        Net::new(None, MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
    }

    #[test]
    fn stashed_frame_round_trips_and_other_macs_are_refused() {
        let mut net = nic();
        assert_round_trip(&net, &mut nic());
        net.stashed = Some(vec![0xEE; 60]);
        let bytes = assert_round_trip(&net, &mut nic());
        assert_refuses_damage(&bytes, nic);
        let mut other = Net::new(None, MacAddress([0x52, 0x54, 0, 0, 0, 1]));
        let err = crate::snapshot::restore_section(&mut other, &bytes).unwrap_err();
        assert!(err.to_string().contains("52:54:00:12:34:56"), "{err}");
    }
}
