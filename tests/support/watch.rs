//! A detector of two live replicas that does not trust ftvmm's word: it watches every
//! host's guest TAP for frames the guest side sent (written by a replica into the TAP)
//! with the guest's MAC, stamped by the kernel, and says when two hosts took turns at it
//! where only one handover may be.
//!
//! One AF_PACKET socket per host, opened inside the host's network namespace, either on
//! the guest's TAP ([`Watched::GuestTap`]: frames the host sends *to* the guest, flooded
//! from the LAN, `PACKET_OUTGOING`, are not counted, only frames coming *from* the
//! replica) or on the host's uplink to the LAN ([`Watched::Uplink`]: only frames leaving
//! the host; the guest's frames that other hosts flood in are not this host's). The
//! uplink is for TAPs whose names are not known in advance (ftd makes them).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A frame of the guest seen leaving `host`'s TAP, at `at_ns` (CLOCK_REALTIME, kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The host whose replica sent it.
    pub host: String,
    /// When the kernel received it, nanoseconds since the epoch.
    pub at_ns: u128,
}

/// Where the frames are watched on each host.
#[derive(Debug, Clone)]
pub enum Watched {
    /// The guest's TAP of this name (the same on every host).
    GuestTap(String),
    /// The host's link to the LAN of this name (the same on every host).
    Uplink(String),
}

/// Watches the TAPs of some hosts until dropped.
pub struct FrameWatch {
    seen: Arc<Mutex<Vec<Sighting>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FrameWatch {
    /// Watches `watched` in each of `hosts` (`(host name, network namespace)`) for frames
    /// with source MAC `mac` (`52:54:00:12:34:56`) sent by a replica on that host.
    pub fn start(hosts: &[(&str, &str)], watched: &Watched, mac: &str) -> FrameWatch {
        let (interface, outgoing) = match watched {
            Watched::GuestTap(tap) => (tap.clone(), false),
            Watched::Uplink(link) => (link.clone(), true),
        };
        let mac = parse_mac(mac);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = hosts
            .iter()
            .map(|(host, ns)| {
                let (host, ns, tap) = (host.to_string(), ns.to_string(), interface.clone());
                let (seen, stop) = (seen.clone(), stop.clone());
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let thread = std::thread::spawn(move || {
                    crate::enter_netns(&ns);
                    let socket = PacketSocket::open(&tap)
                        .unwrap_or_else(|err| panic!("cannot watch {tap} in {ns}: {err}"));
                    let _ = ready_tx.send(());
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(at_ns) = socket.next_from(&mac, outgoing) {
                            seen.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(Sighting {
                                    host: host.clone(),
                                    at_ns,
                                });
                        }
                    }
                });
                ready_rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("the watcher thread did not open its socket");
                thread
            })
            .collect();
        FrameWatch {
            seen,
            stop,
            threads,
        }
    }

    /// Everything seen so far, oldest first, and forgets it.
    pub fn take(&self) -> Vec<Sighting> {
        let mut seen =
            std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner));
        seen.sort_by_key(|sighting| sighting.at_ns);
        seen
    }
}

impl Drop for FrameWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The hosts that sent the guest's frames, in time order, each run of one host counted
/// once: `[a]` one live replica throughout, `[a, b]` one handover, `[a, b, a]` two live
/// replicas taking turns.
pub fn emitters(sightings: &[Sighting]) -> Vec<String> {
    let mut runs: Vec<String> = Vec::new();
    for sighting in sightings {
        if runs.last() != Some(&sighting.host) {
            runs.push(sighting.host.clone());
        }
    }
    runs
}

/// Whether `sightings` show two replicas live at once: more than one handover between
/// hosts within what should hold at most one.
pub fn double_live(sightings: &[Sighting]) -> bool {
    emitters(sightings).len() > 2
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap_or_else(|err| panic!("MAC {text}: {err}"));
    }
    mac
}

/// An AF_PACKET socket on one interface, with kernel receive timestamps.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    fn open(interface: &str) -> std::io::Result<PacketSocket> {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(interface).map_err(std::io::Error::other)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        use std::os::fd::AsRawFd;
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain integers.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a pointer to a live sockaddr_ll and its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt(2) with pointers to live values of the sizes passed.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) | libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    /// The kernel timestamp of the next frame from the replica with source MAC `mac`;
    /// `None` for anything else, or when nothing came within the receive timeout.
    /// The next frame from `mac` leaving the watched interface's host side (`outgoing`:
    /// sent out of it by the host; else received on it from the guest).
    fn next_from(&self, mac: &[u8; 6], outgoing: bool) -> Option<u128> {
        use std::os::fd::AsRawFd;
        let mut frame = [0u8; 64];
        let mut control = [0u64; 16];
        // SAFETY: zeroed sockaddr_ll and msghdr are valid starting values.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: frame.as_mut_ptr().cast(),
            iov_len: frame.len(),
        };
        // SAFETY: as above.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        message.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: recvmsg(2) with a msghdr whose buffers all live until it returns.
        let len = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut message, 0) };
        // Truncated frames are fine: only the header is read.
        if len < 12
            || (from.sll_pkttype == libc::PACKET_OUTGOING) != outgoing
            || frame[6..12] != *mac
        {
            return None;
        }
        // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer recvmsg filled, within
        // msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&message) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` points into `control`, checked non-null.
            let header = unsafe { &*cmsg };
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_TIMESTAMPNS {
                // SAFETY: an SCM_TIMESTAMPNS message carries one timespec; read unaligned.
                let stamp: libc::timespec =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                return Some(stamp.tv_sec as u128 * 1_000_000_000 + stamp.tv_nsec as u128);
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&message, cmsg) };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: &str, at_ns: u128) -> Sighting {
        Sighting {
            host: host.into(),
            at_ns,
        }
    }

    #[test]
    fn one_handover_is_fine_and_taking_turns_is_two_live() {
        assert!(!double_live(&[at("a", 1), at("a", 2)]));
        assert!(!double_live(&[
            at("a", 1),
            at("a", 2),
            at("b", 3),
            at("b", 4)
        ]));
        assert!(double_live(&[at("a", 1), at("b", 2), at("a", 3)]));
        assert_eq!(emitters(&[at("a", 1), at("b", 2), at("b", 3)]), ["a", "b"]);
    }
}
