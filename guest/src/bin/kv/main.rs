//! `kv`: a key-value server speaking RESP (the Redis protocol) over virtio-net, with
//! an append-only log on virtio-blk.
//!
//! It serves `redis-cli` and `redis-benchmark` (PING, ECHO, SET [NX|XX], GET, MGET,
//! DEL, EXISTS, INCR, DECR, INCRBY, DECRBY, DBSIZE, FLUSHALL/FLUSHDB, SELECT 0, QUIT,
//! SHUTDOWN, and the start-up chatter: CONFIG GET, COMMAND, HELLO 2, CLIENT, INFO);
//! see `kvcore::db`. Every write is appended to the log (`kvcore::log` has the
//! record format) and is answered only after its write request and a FLUSH have
//! completed; writes arriving together are committed together. At boot the log is
//! replayed from sector 0, up to the first bad record.
//!
//! Command line: `ip=A.B.C.D/N` (required), `gw=A.B.C.D`, `port=P` (6379),
//! `conns=N` (256: most concurrent connections, i.e. TCP sockets; 64 of them are
//! kept listening), `seed=S` (TCP's random seed; default from the clocks).
//!
//! Devices: the first virtio-net and the first virtio-blk device among the
//! virtio-mmio slots of the boot info (`docs/machine.md`).
//!
//! Console output at boot:
//! ```text
//! kv: disk <bytes> bytes, flush yes|no                     (or: kv: no disk, writes are not persistent)
//! kv: dropped torn tail at byte <B>                         (only if there was one)
//! kv: replayed <N> records, <K> keys, log end at byte <B>
//! kv: listening on <ip>:<port>, mac <mac>, up to <conns> connections
//! ```
//!
//! Power-off codes: 0 after `SHUTDOWN`, 57 disk I/O error, 60 no (usable) network
//! device, 61 `ip=` missing or a bad command-line value, 62 panic, 63 bad boot info.

#![no_std]
#![no_main]

extern crate alloc;

mod blk;
mod hal;
mod heap;
mod net;
mod server;
mod store;
mod virtio;

use core::str::FromStr;
use ftvm_guest::boot::Boot;
use ftvm_guest::platform::{clock_ns, halt, set_timer_period_us, take_pending_irqs, wall_clock_ns};
use ftvm_guest::{println, EXIT_BAD_CMDLINE};
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::phy::{Device, TxToken};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr,
};

#[global_allocator]
static HEAP: heap::GuestHeap = heap::GuestHeap::empty();

ftvm_guest::entry!(main);

/// Power-off code when there is no usable network device.
const EXIT_NO_NET: u8 = 60;
/// Timer period: TCP timers run while the guest idles.
const TICK_US: u32 = 10_000;

fn main(boot: &Boot) -> u8 {
    set_timer_period_us(TICK_US);
    // SAFETY: first and only call, before any allocation; mem_size is the RAM size.
    unsafe { HEAP.init(boot.info.mem_size) };

    let args = &boot.cmdline;
    let Some(ip) = args.get("ip") else {
        println!("kv: ip=<address>/<prefix> is required on the command line");
        return EXIT_BAD_CMDLINE;
    };
    let Ok(cidr) = Ipv4Cidr::from_str(ip) else {
        println!("kv: bad ip={} (want e.g. ip=10.77.0.2/24)", ip);
        return EXIT_BAD_CMDLINE;
    };
    let gateway = match args.get("gw").map(Ipv4Address::from_str) {
        None => None,
        Some(Ok(gw)) => Some(gw),
        Some(Err(_)) => {
            println!("kv: bad gw={}", args.get("gw").unwrap_or(""));
            return EXIT_BAD_CMDLINE;
        }
    };
    let port: u16 = args.get_num("port", 6379);
    let conns: usize = args.get_num("conns", 256);
    if port == 0 || !(1..=4096).contains(&conns) {
        println!("kv: port must be 1..=65535 and conns 1..=4096");
        return EXIT_BAD_CMDLINE;
    }
    let seed: u64 = match args.get("seed") {
        Some(_) => args.get_num("seed", 0),
        None => wall_clock_ns() ^ clock_ns().rotate_left(32),
    };

    let slots = virtio::probe(&boot.info);
    let blk = slots
        .iter()
        .find(|s| s.device_id == virtio::DEVICE_BLK)
        .and_then(|slot| match blk::Blk::new(slot) {
            Ok(blk) => Some(blk),
            Err(e) => {
                println!("kv: virtio-blk in slot {}: {}", slot.index, e);
                None
            }
        });
    let mut store = store::Store::open(blk);

    let Some(net_slot) = slots.iter().find(|s| s.device_id == virtio::DEVICE_NET) else {
        println!("kv: no network device");
        return EXIT_NO_NET;
    };
    let mut net = match net::Net::new(net_slot) {
        Ok(net) => net,
        Err(e) => {
            println!("kv: virtio-net in slot {}: {}", net_slot.index, e);
            return EXIT_NO_NET;
        }
    };
    let mac = EthernetAddress(net.mac());

    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    config.random_seed = seed;
    let mut iface = Interface::new(config, &mut net, now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::Ipv4(cidr));
    });
    if let Some(gw) = gateway {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let mut server = server::Server::new(&mut sockets, port, conns);
    gratuitous_arp(&mut net, mac, cidr.address());
    net.kick();
    let m = mac.0;
    println!(
        "kv: listening on {}:{}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, up to {} connections",
        cidr.address(),
        port,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        conns
    );

    let net_irq = net.irq_bit;
    let mut irqs = 0u64;
    let mut idle_rounds = 0u32;
    let mut shutdown_deadline: Option<Instant> = None;
    loop {
        irqs |= take_pending_irqs();
        // One clock read (one VM exit) per round, not per packet.
        let now = now();
        if irqs & net_irq != 0 {
            net.ack_interrupt();
        }
        let mut progress = store.poll(irqs);
        irqs = 0;
        progress |= iface.poll(now, &mut net, &mut sockets) == PollResult::SocketStateChanged;
        progress |= server.service(&mut sockets, &mut store);
        // Start the batch the commands above appended, then send the replies and
        // ACKs the service produced.
        progress |= store.poll(0);
        progress |= iface.poll(now, &mut net, &mut sockets) == PollResult::SocketStateChanged;
        net.kick();

        if server.shutdown_requested() {
            // Stop once every write is durable and its reply sent (or after a second,
            // for clients that do not read); reset the connections on the way out.
            let deadline = *shutdown_deadline.get_or_insert(now + Duration::from_secs(1));
            if store.idle() && (server.all_sent() || now >= deadline) {
                server.abort_all(&mut sockets);
                iface.poll(now, &mut net, &mut sockets);
                net.kick();
                println!(
                    "kv: shutdown: {} keys, every write durable (seq {})",
                    store.db.len(),
                    store.durable_seq()
                );
                set_timer_period_us(0);
                return 0;
            }
        }

        if progress || net.rx_pending() {
            idle_rounds = 0;
            continue;
        }
        // smoltcp wants to be polled again right away (a timer is due): do so, but
        // never more than a few rounds in a row without sleeping.
        if iface.poll_delay(now, &sockets) == Some(Duration::ZERO) && idle_rounds < 3 {
            idle_rounds += 1;
            continue;
        }
        idle_rounds = 0;
        // An interrupt taken during this round (at one of its exits) would not wake
        // the halt below: look again first. Between this look and the halt there is
        // no exit, so nothing can be injected in between.
        irqs |= take_pending_irqs();
        if irqs != 0 {
            continue;
        }
        halt();
    }
}

/// The platform clock as a smoltcp instant (one VM exit).
fn now() -> Instant {
    Instant::from_micros((clock_ns() / 1000) as i64)
}

/// Announces `ip` at `mac`: a broadcast ARP request for our own address, so that
/// neighbours update their caches (smoltcp does not send one by itself).
fn gratuitous_arp(net: &mut net::Net, mac: EthernetAddress, ip: Ipv4Address) {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: ip,
    };
    let eth = EthernetRepr {
        src_addr: mac,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    if let Some(token) = net.transmit(now()) {
        token.consume(eth.buffer_len() + arp.buffer_len(), |buf| {
            let mut frame = EthernetFrame::new_unchecked(buf);
            eth.emit(&mut frame);
            arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
    }
}
