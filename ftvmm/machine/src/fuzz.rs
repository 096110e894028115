//! Fuzz targets: functions that take arbitrary bytes, as a hostile guest driver or a
//! damaged snapshot would hand them over, and check what must hold for every input. They
//! panic only when a check fails; the tests run them on generated inputs with a fixed
//! budget and `cargo xtask fuzz` under a coverage-guided engine for long runs.

use crate::clock::VmClock;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net::{MacAddress, Net};
use crate::devices::virtio::tap::Tap;
use crate::devices::{BusDevice, DeviceContext};
use crate::inputs::{Inputs, Mode, Recorder, Replayer};
use crate::interrupts::{PendingVectors, Timer};
use crate::snapshot::{restore_section, save_section, Section, Snapshot};
use ftvm_log::{LogHeader, LogReader};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of the device targets: the machine's smallest.
const RAM: u64 = crate::layout::MEM_MIN;
/// Sectors of the block target's disk.
const DISK_SECTORS: u64 = 128;
/// Operations one input may ask for (each is one exit).
const MAX_OPS: usize = 256;

/// Which device the driver program talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// virtio-blk on a disk whose sectors hold a pattern.
    Block,
    /// virtio-net on a datagram socket standing in for the TAP.
    Net,
}

/// `data` as a driver program for `device`: register reads and writes, pokes of guest
/// memory (descriptor tables, rings, requests), notifications, polls and, for the NIC,
/// frames arriving. Run recorded, then again replayed from that recording on a fresh
/// device and memory, as a backup would: neither run panics, the replay never diverges,
/// and both leave guest memory and the transport in the same state.
pub fn virtio_driver(device: Device, data: &[u8]) {
    let log = SharedBytes::default();
    let recorded = {
        let header = LogHeader::for_machine(b"fuzz", RAM, "fuzz".into(), "");
        let recorder = Recorder::new(Box::new(log.clone()), header).expect("record to memory");
        let mut inputs = Inputs::new(Mode::Record(Box::new(recorder)));
        let (transport, peer) = match device {
            Device::Block => (block_transport(true), None),
            Device::Net => {
                let (tap, peer) = datagram_pair();
                let net = Net::new(Some(tap), MAC);
                (MmioTransport::new(Box::new(net), "net", 0x30), Some(peer))
            }
        };
        let outcome = drive(transport, data, &mut inputs, peer.as_ref());
        inputs.flush();
        assert!(
            inputs.take_record_error().is_none(),
            "recording to memory failed"
        );
        outcome
    };
    let bytes = log.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let reader = LogReader::new(Box::new(std::io::Cursor::new(bytes)) as Box<_>)
        .expect("the recording reads back");
    let mut inputs = Inputs::new(Mode::Replay(Box::new(Replayer::new(reader))));
    let transport = match device {
        Device::Block => block_transport(false),
        Device::Net => MmioTransport::new(Box::new(Net::new(None, MAC)), "net", 0x30),
    };
    let replayed = drive(transport, data, &mut inputs, None);
    assert!(
        inputs.replay_stop().is_none(),
        "the replay diverged: {:?}",
        inputs.replay_stop()
    );
    assert_eq!(
        recorded.status, replayed.status,
        "the device ended differently"
    );
    assert!(
        recorded.memory == replayed.memory,
        "the replay left guest memory different"
    );
}

const MAC: MacAddress = MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

/// What a run of a driver program left behind.
struct Outcome {
    status: u32,
    memory: Vec<u8>,
}

/// A transport over a block device: on a disk file with a pattern (`with_disk`), or for
/// replay (reads come from the log).
fn block_transport(with_disk: bool) -> MmioTransport {
    let block = if with_disk {
        // SAFETY: memfd_create with a NUL-terminated name and no flags; the result is
        // checked before use.
        let fd = unsafe { libc::memfd_create(c"ftvm-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let pattern: Vec<u8> = (0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect();
        (&file).write_all(&pattern).expect("fill the disk");
        let path = format!("/proc/self/fd/{fd}");
        let block = Block::open(std::path::Path::new(&path), false).expect("open the disk");
        drop(file);
        block
    } else {
        Block::for_replay(DISK_SECTORS).expect("a replay disk")
    };
    MmioTransport::new(Box::new(block), "blk", 0x31)
}

/// A nonblocking datagram socket pair: the device's end and the peer the program sends
/// frames from.
fn datagram_pair() -> (Tap, std::os::unix::net::UnixDatagram) {
    let (device, peer) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
    device.set_nonblocking(true).expect("nonblocking");
    let fd: OwnedFd = device.into();
    (Tap::datagram(std::fs::File::from(fd)), peer)
}

/// The bytes of a driver program, consumed as it runs; zeros once they run out.
struct Program<'a>(&'a [u8]);

impl Program<'_> {
    fn u8(&mut self) -> u8 {
        let Some((first, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *first
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, len: usize) -> &[u8] {
        let (taken, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

/// Runs `data` as a driver program against `transport` with fresh guest memory; one
/// operation per exit.
fn drive(
    mut transport: MmioTransport,
    data: &[u8],
    inputs: &mut Inputs,
    peer: Option<&std::os::unix::net::UnixDatagram>,
) -> Outcome {
    let mem = crate::memory::create_guest_memory(RAM).expect("guest memory");
    let (mut pending, mut timer, mut clock, mut stop) = (
        PendingVectors::default(),
        Timer::default(),
        VmClock::new(),
        None,
    );
    let mut program = Program(data);
    // Where the last queue set up by the program keeps its rings.
    let mut rings = (0x1000u64, 0x2000u64, 0x3000u64, 16u16);
    for ordinal in 1..=MAX_OPS as u64 {
        if program.0.is_empty() {
            break;
        }
        inputs.set_ordinal(ordinal);
        let mut ctx = DeviceContext {
            pending: &mut pending,
            timer: &mut timer,
            clock: &mut clock,
            mem: &mem,
            stop: &mut stop,
            inputs,
        };
        match program.u8() % 8 {
            0 => {
                let offset = u64::from(program.u8() % 0x40) * 4;
                let value = program.u32();
                transport.write(offset, &value.to_le_bytes(), &mut ctx);
            }
            1 => {
                let offset = u64::from(program.u8() % 0x48) * 4;
                transport.read(offset, &mut [0u8; 4], &mut ctx);
            }
            2 => {
                let addr = u64::from(program.u16()) * 8 % RAM;
                let len = usize::from(program.u8() % 64);
                let bytes = program.bytes(len).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            3 => {
                let queue = u32::from(program.u8() % 3);
                transport.write(mmio::QUEUE_NOTIFY, &queue.to_le_bytes(), &mut ctx);
            }
            4 => transport.poll(&mut ctx),
            5 => {
                let queue = u32::from(program.u8() % 2);
                let size = 1u16 << (program.u8() % 9);
                let place = |p: &mut Program| u64::from(p.u16()) * 16 % RAM;
                rings = (
                    place(&mut program),
                    place(&mut program),
                    place(&mut program),
                    size,
                );
                set_up_queue(&mut transport, queue, rings, &mut ctx);
            }
            6 => {
                // A descriptor at a program-chosen index, offered at once.
                let (desc, avail, _, size) = rings;
                let index = program.u16() % size.max(1);
                let addr = u64::from(program.u16()) * 8 % RAM;
                let len = u32::from(program.u16());
                let flags = u16::from(program.u8() % 8);
                let next = program.u16() % (size.max(1) + 1);
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..].copy_from_slice(&next.to_le_bytes());
                let _ = mem.write_slice(&raw, GuestAddress(desc + 16 * u64::from(index)));
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
                let slot = avail + 4 + 2 * u64::from(idx % size.max(1));
                let _ = mem.write_obj(index, GuestAddress(slot));
                let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
            }
            _ => {
                let len = 14 + usize::from(program.u8() % 128);
                let frame = program.bytes(len).to_vec();
                if let Some(peer) = peer {
                    let _ = peer.send(&frame);
                }
            }
        }
        inputs.finish_exit();
    }
    // The run ends at the next exit, with an End frame: the replay checks it was there
    // and nothing before it was left unused.
    inputs.set_ordinal(MAX_OPS as u64 + 1);
    inputs.end(ftvm_log::EndState {
        outcome: 0,
        code: 0,
        regs_hash: 0,
        mem_hash: 0,
    });
    let mut status = [0u8; 4];
    let mut ctx = DeviceContext {
        pending: &mut pending,
        timer: &mut timer,
        clock: &mut clock,
        mem: &mem,
        stop: &mut stop,
        inputs,
    };
    transport.read(mmio::STATUS, &mut status, &mut ctx);
    let mut memory = vec![0u8; RAM as usize];
    mem.read_slice(&mut memory, GuestAddress(0))
        .expect("read guest memory");
    Outcome {
        status: u32::from_le_bytes(status),
        memory,
    }
}

/// What a driver does to bring queue `queue` up with its rings at `rings`: reset,
/// acknowledge, features (VERSION_1), queue set-up, DRIVER_OK.
fn set_up_queue(
    transport: &mut MmioTransport,
    queue: u32,
    (desc, avail, used, size): (u64, u64, u64, u16),
    ctx: &mut DeviceContext<'_>,
) {
    let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes(), ctx);
    write(mmio::STATUS, 0);
    write(mmio::STATUS, 1);
    write(mmio::STATUS, 1 | 2);
    write(mmio::DRIVER_FEATURES_SEL, 1);
    write(mmio::DRIVER_FEATURES, 1);
    write(mmio::STATUS, 1 | 2 | 8);
    write(mmio::QUEUE_SEL, queue);
    write(mmio::QUEUE_NUM, u32::from(size));
    for (low, addr) in [
        (mmio::QUEUE_DESC_LOW, desc),
        (mmio::QUEUE_DRIVER_LOW, avail),
        (mmio::QUEUE_DEVICE_LOW, used),
    ] {
        write(low, addr as u32);
        write(low + 4, (addr >> 32) as u32);
    }
    write(mmio::QUEUE_READY, 1);
    write(mmio::STATUS, 1 | 2 | 8 | 4);
}

/// A `Write` into shared memory, for a recording the target reads back.
#[derive(Clone, Default)]
struct SharedBytes(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `data` as snapshot sections, each offered to every component that can be built without
/// a VM: a section is restored or refused, never a panic; a refused one leaves the
/// component as it was; a restored one saves back to a section that restores the same
/// state into a fresh component. An even first byte reads `data` as a raw stream of
/// sections (checksums and all); an odd one frames the rest, cut into payloads, as
/// sections of each component's own tag and version, so inputs reach the decoders.
pub fn snapshot_sections(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let mut input = rest;
        while let Ok(Some(section)) = Section::read(&mut input) {
            let bytes =
                crate::snapshot::frame_section(section.tag, section.version, &section.payload)
                    .expect("a section read from a stream frames again");
            offer_section(&bytes);
        }
        return;
    }
    let mut program = Program(rest);
    while !program.0.is_empty() {
        let (make, _) = COMPONENTS[usize::from(program.u8()) % COMPONENTS.len()];
        let component = make();
        let version = component
            .version()
            .saturating_sub(u16::from(program.u8() % 2));
        let len = usize::from(program.u16() % 512);
        let payload = program.bytes(len).to_vec();
        if let Ok(bytes) = crate::snapshot::frame_section(component.tag(), version, &payload) {
            offer_section(&bytes);
        }
    }
}

/// Offers the framed section `bytes` to a fresh instance of every component.
fn offer_section(bytes: &[u8]) {
    for (make, stable) in COMPONENTS {
        let mut component = make();
        let before = save_section(component.as_ref()).expect("save a fresh component");
        let restored = restore_section(component.as_mut(), bytes);
        if !stable {
            continue;
        }
        match restored {
            Err(_) => assert_eq!(
                save_section(component.as_ref()).expect("save"),
                before,
                "a refused section changed the component"
            ),
            Ok(()) => {
                let saved = save_section(component.as_ref()).expect("save");
                let mut fresh = make();
                restore_section(fresh.as_mut(), &saved).expect("a saved section restores");
                assert_eq!(save_section(fresh.as_ref()).expect("save"), saved);
            }
        }
    }
}

/// `data` as the memory part of a snapshot or clone stream (MEMC chunks, then MEND) into
/// fresh guest memory: read to the end or refused, never a panic, never a write outside
/// RAM. An even first byte reads `data` raw; an odd one frames the rest as chunks at the
/// fuzzer's addresses and lengths, checksums right, and a MEND.
pub fn memory_stream(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let mem = crate::memory::create_guest_memory(RAM).expect("guest memory");
    let stream = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut program = Program(rest);
        let mut stream = Vec::new();
        let mut chunks = 0u64;
        while !program.0.is_empty() {
            let addr = u64::from(program.u16()) * 512;
            let pages = usize::from(program.u8() % 4);
            let fill = program.u8();
            let mut payload = addr.to_le_bytes().to_vec();
            payload.resize(8 + pages * crate::memory::PAGE_SIZE as usize, fill);
            let tag = if program.u8() % 8 == 0 {
                *b"MEND"
            } else {
                *b"MEMC"
            };
            if let Ok(section) = crate::snapshot::frame_section(tag, 1, &payload) {
                stream.extend_from_slice(&section);
                chunks += 1;
            }
        }
        let mut end = Vec::new();
        for value in [chunks, chunks, 0] {
            end.extend_from_slice(&value.to_le_bytes());
        }
        if let Ok(section) = crate::snapshot::frame_section(*b"MEND", 1, &end) {
            stream.extend_from_slice(&section);
        }
        stream
    };
    let written = crate::memory::DirtyPages::default();
    let touched_before = crate::snapshot::machine::touched_pages(&mem);
    let _ = crate::snapshot::machine::restore_memory(
        &mem,
        &mut stream.as_slice(),
        0,
        written,
        &touched_before,
    );
}

type Make = fn() -> Box<dyn Snapshot>;

/// The components [`snapshot_sections`] offers sections to, and whether saving one twice
/// gives the same bytes (a clock's state moves with time: its sections are only checked
/// for being restored or refused without a panic).
const COMPONENTS: [(Make, bool); 6] = [
    (|| Box::new(VmClock::new()), false),
    (|| Box::new(PendingVectors::default()), true),
    (|| Box::new(Timer::default()), true),
    (|| Box::new(crate::inputs::ResumePoint::default()), true),
    (|| Box::new(block_transport(false)), true),
    (
        || {
            Box::new(MmioTransport::new(
                Box::new(Net::new(None, MAC)),
                "net",
                0x30,
            ))
        },
        true,
    ),
];

#[cfg(test)]
mod tests {
    use super::Device;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn virtio_block_driver(data in vec(any::<u8>(), 0..2048)) {
            super::virtio_driver(Device::Block, &data);
        }

        #[test]
        fn virtio_net_driver(data in vec(any::<u8>(), 0..2048)) {
            super::virtio_driver(Device::Net, &data);
        }

        #[test]
        fn snapshot_sections(data in vec(any::<u8>(), 0..2048)) {
            super::snapshot_sections(&data);
        }

        #[test]
        fn memory_stream(data in vec(any::<u8>(), 0..512)) {
            super::memory_stream(&data);
        }
    }
}
