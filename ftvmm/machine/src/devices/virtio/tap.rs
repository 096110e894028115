//! A TAP device opened through /dev/net/tun, read and written by the VMM itself (there is
//! no vhost-net here).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

/// Opening the TAP device failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is not a valid Linux interface name.
    #[error("'{0}' is not a valid interface name (1 to 15 bytes, no '/', no whitespace)")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to TAP device {name} (does it exist in this network namespace, and may this process use it?)")]
    Attach {
        /// The interface name.
        name: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// A second descriptor of the interface could not be made.
    #[error("cannot duplicate the descriptor of TAP device {name}")]
    Clone {
        /// The interface name.
        name: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54CA;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface in non-blocking mode, frames without packet information.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads and writes one `ifreq`,
        // which `IfReq` matches in size and layout (16-byte name, flags, union padding), and
        // `request` outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReq) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }

    /// A stand-in for a TAP: one end of a nonblocking datagram socket pair, each
    /// datagram a frame (what the fuzz targets drive the device with).
    pub(crate) fn datagram(file: File) -> Tap {
        Tap {
            file,
            name: "datagram".into(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `Ok(None)` when none is waiting.
    pub fn receive(&mut self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.file.read(buffer) {
            Ok(len) => Ok(Some(len)),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Sends one frame; returns false if the interface queue was full and it was dropped.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        match self.file.write(frame) {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// The fd to poll for received frames.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Another descriptor of the same interface (non-blocking too), for a thread that
    /// sends frames while this one keeps receiving.
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

use std::os::unix::fs::OpenOptionsExt;
