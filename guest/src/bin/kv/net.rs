//! virtio-net over `virtio-drivers`' MMIO transport and split virtqueues, as a
//! `smoltcp` device.
//!
//! The driver is thin on purpose so that it costs few VM exits: each queue is
//! notified at most once per main-loop round ([`Net::kick`]), only if the device has
//! not suppressed notifications (`VIRTQ_USED_F_NO_NOTIFY`). The transmit queue is
//! notified in every round that queued a frame. The receive queue is notified only
//! once half of its buffers have been given back since the last notification: a
//! device can only be starved of receive buffers after using all of them, and then
//! the guest takes and gives back every one of them and notifies. Transmit
//! completions need no interrupt (the transmit queue's available ring carries
//! `VIRTQ_AVAIL_F_NO_INTERRUPT`): used transmit buffers are reclaimed whenever a
//! buffer is needed.
//!
//! Negotiated features: `VIRTIO_F_VERSION_1` (required) and `VIRTIO_NET_F_MAC`; no
//! checksum or segmentation offload, no mergeable buffers, no indirect descriptors,
//! no event index. Every buffer is one descriptor: receive buffers are 2048 bytes
//! (a 12-byte `virtio_net_hdr` and a frame of up to 1514 bytes), transmit buffers a
//! zeroed 12-byte header and the frame.

use crate::hal::KvHal;
use crate::virtio::{self, Slot};
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::Transport;

/// Descriptors per queue (the device's `QueueNumMax` must be at least this).
pub const QUEUE_SIZE: usize = 64;
/// Receive and transmit buffer size.
const BUF_LEN: usize = 2048;
/// `struct virtio_net_hdr` with `num_buffers` (VIRTIO_F_VERSION_1).
const HDR_LEN: usize = 12;
/// Largest Ethernet frame (no FCS) sent or expected.
pub const MTU: usize = 1514;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its config space.
const F_MAC: u64 = 1 << 5;

/// Why the device could not be set up.
pub type Error = &'static str;

/// A virtio-net device.
pub struct Net {
    transport: MmioTransport<'static>,
    rx: VirtQueue<KvHal, QUEUE_SIZE>,
    rx_bufs: Vec<[u8; BUF_LEN]>,
    /// Receive buffer index per descriptor token.
    rx_slot: [u16; QUEUE_SIZE],
    /// Receive buffers taken from the used ring, to give back to the device.
    rx_done: Vec<u16>,
    /// Receive buffers given back since the last notification of the receive queue.
    rx_unnotified: usize,
    tx: TxRing,
    mac: [u8; 6],
    /// This device's bit in `take_pending_irqs()`.
    pub irq_bit: u64,
}

/// The transmit side, borrowed by a [`TxTok`] while a receive token is alive.
pub struct TxRing {
    queue: VirtQueue<KvHal, QUEUE_SIZE>,
    bufs: Vec<[u8; BUF_LEN]>,
    /// Bytes handed to the device per buffer (to give the same slice back).
    lens: [usize; QUEUE_SIZE],
    /// Transmit buffer index per descriptor token.
    slot: [u16; QUEUE_SIZE],
    free: Vec<u16>,
    kick: bool,
}

impl Net {
    /// Brings up the device in `slot`.
    pub fn new(slot: &Slot) -> Result<Net, Error> {
        let mut transport = virtio::transport(slot)?;
        let features = virtio::begin_init(&mut transport, F_MAC)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = transport
                    .read_config_space::<u8>(i)
                    .map_err(|_| "cannot read the MAC address")?;
            }
        } else {
            // No MAC from the device: a fixed locally administered one.
            mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        }
        let rx = VirtQueue::new(&mut transport, RX_QUEUE, false, false)
            .map_err(|_| "cannot set up the receive queue (QueueNumMax < 64?)")?;
        let mut tx_queue = VirtQueue::new(&mut transport, TX_QUEUE, false, false)
            .map_err(|_| "cannot set up the transmit queue (QueueNumMax < 64?)")?;
        tx_queue.set_dev_notify(false);
        let mut net = Net {
            transport,
            rx,
            rx_bufs: vec![[0u8; BUF_LEN]; QUEUE_SIZE],
            rx_slot: [0; QUEUE_SIZE],
            rx_done: (0..QUEUE_SIZE as u16).collect(),
            rx_unnotified: 0,
            tx: TxRing {
                queue: tx_queue,
                bufs: vec![[0u8; BUF_LEN]; QUEUE_SIZE],
                lens: [0; QUEUE_SIZE],
                slot: [0; QUEUE_SIZE],
                free: (0..QUEUE_SIZE as u16).rev().collect(),
                kick: false,
            },
            mac,
            irq_bit: slot.irq_bit,
        };
        net.refill_rx();
        virtio::finish_init(&mut net.transport);
        net.kick();
        Ok(net)
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Acknowledges the device's interrupt (reads `InterruptStatus`, writes
    /// `InterruptACK`).
    pub fn ack_interrupt(&mut self) {
        self.transport.ack_interrupt();
    }

    /// Whether received frames wait in the used ring.
    pub fn rx_pending(&self) -> bool {
        self.rx.can_pop()
    }

    /// Gives consumed receive buffers back to the device (no notification).
    fn refill_rx(&mut self) {
        while let Some(idx) = self.rx_done.pop() {
            let buf = &mut self.rx_bufs[usize::from(idx)][..];
            // SAFETY: the buffer belongs to `self.rx_bufs`, which lives as long as the
            // queue and is never resized; it is not touched again until the device
            // returns it through the used ring and `receive` pops it.
            match unsafe { self.rx.add(&[], &mut [buf]) } {
                Ok(token) => {
                    self.rx_slot[usize::from(token)] = idx;
                    self.rx_unnotified += 1;
                }
                Err(_) => {
                    // Cannot happen (one descriptor per buffer, as many as buffers);
                    // keep the buffer for the next try.
                    self.rx_done.push(idx);
                    break;
                }
            }
        }
    }

    /// Gives back receive buffers and notifies the queues (see the module
    /// documentation for when). Call once per main-loop round, after the last `poll`
    /// of the interface.
    pub fn kick(&mut self) {
        self.refill_rx();
        if self.rx_unnotified >= QUEUE_SIZE / 2 {
            self.rx_unnotified = 0;
            if self.rx.should_notify() {
                self.transport.notify(RX_QUEUE);
            }
        }
        if self.tx.kick {
            self.tx.kick = false;
            if self.tx.queue.should_notify() {
                self.transport.notify(TX_QUEUE);
            }
        }
    }
}

impl TxRing {
    /// Takes back the buffers the device has sent.
    fn reclaim(&mut self) {
        while let Some(token) = self.queue.peek_used() {
            let idx = self.slot[usize::from(token) % QUEUE_SIZE];
            let buf = &self.bufs[usize::from(idx)][..self.lens[usize::from(idx)]];
            // SAFETY: `token` is the next used chain, which is the one-descriptor chain
            // added in `TxTok::consume` for exactly this buffer slice.
            match unsafe { self.queue.pop_used(token, &[buf], &mut []) } {
                Ok(_) => self.free.push(idx),
                Err(_) => break,
            }
        }
    }
}

/// A received frame (borrowed from its receive buffer).
pub struct RxTok<'a> {
    frame: &'a [u8],
}

/// Permission to send one frame.
pub struct TxTok<'a> {
    tx: &'a mut TxRing,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        let total = HDR_LEN + len;
        let Some(idx) = tx.free.pop().filter(|_| total <= BUF_LEN) else {
            // No buffer (the token was checked for one, so only for an oversized
            // frame): build the frame into scratch memory and drop it.
            let mut scratch = vec![0u8; len];
            return f(&mut scratch);
        };
        let buf = &mut tx.bufs[usize::from(idx)];
        buf[..HDR_LEN].fill(0);
        let result = f(&mut buf[HDR_LEN..total]);
        // SAFETY: the buffer belongs to `tx.bufs` (lives as long as the queue, never
        // resized) and is not written again until `reclaim` has popped it.
        match unsafe { tx.queue.add(&[&buf[..total]], &mut []) } {
            Ok(token) => {
                tx.slot[usize::from(token)] = idx;
                tx.lens[usize::from(idx)] = total;
                tx.kick = true;
            }
            Err(_) => tx.free.push(idx),
        }
        result
    }
}

impl phy::Device for Net {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        // The previous frame's token is gone (it borrowed `self`): recycle its buffer.
        self.refill_rx();
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        let token = self.rx.peek_used()?;
        let idx = self.rx_slot[usize::from(token) % QUEUE_SIZE];
        let buf = &mut self.rx_bufs[usize::from(idx)][..];
        // SAFETY: `token` is the next used chain: the one-descriptor chain added in
        // `refill_rx` for exactly this buffer.
        let used = unsafe { self.rx.pop_used(token, &[], &mut [buf]) }.ok()? as usize;
        self.rx_done.push(idx);
        let end = used.clamp(HDR_LEN, BUF_LEN);
        Some((
            RxTok {
                frame: &self.rx_bufs[usize::from(idx)][HDR_LEN..end],
            },
            TxTok { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxTok<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            None
        } else {
            Some(TxTok { tx: &mut self.tx })
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}
