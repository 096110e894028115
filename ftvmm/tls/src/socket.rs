//! [`Socket`]: a TCP connection of the replicas' log and clone channels, in plaintext or
//! under mutual TLS, used like a `TcpStream` by threads that share it.
//!
//! The channels read on one thread and write on others through clones of one socket. One
//! TLS connection state serves all of them: a reader takes its lock only to hand rustls
//! the bytes it read and to take out plaintext, never while it waits on the socket; a
//! writer encrypts under the lock and sends the records after releasing it, under a
//! second lock that keeps records in order. So a reader blocked on a silent peer never
//! holds up a writer, and a writer blocked on a full socket never holds up the reader
//! that would take in the acknowledgements that unblock it.

use crate::{Identity, Role, TlsError, SERVER_NAME};
use rustls::pki_types::ServerName;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Raw bytes read from the socket at once.
const RAW_READ: usize = 16 * 1024;

/// Which end of a TLS handshake this side is.
#[derive(Clone)]
pub enum TlsSide {
    /// Connects: verifies the server as [`SERVER_NAME`].
    Client(Arc<rustls::ClientConfig>),
    /// Accepts: requires a client certificate.
    Server(Arc<rustls::ServerConfig>),
}

/// What the threads of one TLS socket share under its lock.
struct Shared {
    connection: rustls::Connection,
    /// TLS bytes read from the socket that rustls has not taken yet: it is given them a
    /// little at a time, and only while no plaintext waits (it refuses input once more
    /// than 16 KiB of plaintext wait unread).
    unread: Vec<u8>,
}

struct TlsState {
    shared: Mutex<Shared>,
    /// Held while encrypted records go out, so that records leave in the order they were
    /// made.
    sending: Mutex<()>,
    peer: Identity,
}

/// A channel connection; clones share it (as `TcpStream::try_clone` does).
pub struct Socket {
    tcp: TcpStream,
    tls: Option<Arc<TlsState>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid(err: rustls::Error) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, err)
}

impl Socket {
    /// A plaintext link (development only: anyone who reaches the port is trusted).
    pub fn plain(tcp: TcpStream) -> Socket {
        Socket { tcp, tls: None }
    }

    /// Runs the TLS handshake on `tcp` within `patience` and checks that the peer holds a
    /// host certificate of the cluster CA. The socket's timeouts are restored afterwards.
    pub fn handshake(
        tcp: TcpStream,
        side: TlsSide,
        patience: Duration,
    ) -> Result<Socket, TlsError> {
        let saved = (
            tcp.read_timeout().map_err(TlsError::Handshake)?,
            tcp.write_timeout().map_err(TlsError::Handshake)?,
        );
        let mut connection: rustls::Connection = match side {
            TlsSide::Client(config) => {
                let name = ServerName::try_from(SERVER_NAME).map_err(|err| {
                    TlsError::Handshake(std::io::Error::new(ErrorKind::InvalidInput, err))
                })?;
                rustls::ClientConnection::new(config, name)?.into()
            }
            TlsSide::Server(config) => rustls::ServerConnection::new(config)?.into(),
        };
        let deadline = Instant::now() + patience;
        let mut io = &tcp;
        while connection.is_handshaking() || connection.wants_write() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TlsError::Handshake(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("not done within {} ms", patience.as_millis()),
                )));
            }
            tcp.set_read_timeout(Some(left))
                .and_then(|()| tcp.set_write_timeout(Some(left)))
                .map_err(TlsError::Handshake)?;
            match connection.complete_io(&mut io) {
                Ok(_) => {}
                Err(err) => {
                    // A certificate the verifier refused surfaces as InvalidData wrapping
                    // the rustls error: say that rather than "invalid data".
                    return Err(match err.get_ref().and_then(|e| e.downcast_ref()) {
                        Some(rustls_err) => TlsError::Rustls(rustls::Error::clone(rustls_err)),
                        None => TlsError::Handshake(err),
                    });
                }
            }
        }
        let peer = crate::peer_identity(connection.peer_certificates())?;
        if peer.role != Role::Host {
            return Err(TlsError::Forbidden {
                peer,
                expected: Role::Host,
            });
        }
        tcp.set_read_timeout(saved.0)
            .and_then(|()| tcp.set_write_timeout(saved.1))
            .map_err(TlsError::Handshake)?;
        Ok(Socket {
            tcp,
            tls: Some(Arc::new(TlsState {
                shared: Mutex::new(Shared {
                    connection,
                    unread: Vec::new(),
                }),
                sending: Mutex::new(()),
                peer,
            })),
        })
    }

    /// The peer's verified identity (`None` in plaintext).
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.tls.as_ref().map(|tls| &tls.peer)
    }

    /// Whether the link runs under TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(Socket {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The TCP socket underneath (for socket options; never read or write it directly).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// `TcpStream::set_read_timeout`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }

    /// `TcpStream::set_write_timeout`.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.tcp.set_write_timeout(timeout)
    }

    /// `TcpStream::set_nodelay`.
    pub fn set_nodelay(&self, nodelay: bool) -> std::io::Result<()> {
        self.tcp.set_nodelay(nodelay)
    }

    /// `TcpStream::shutdown`: wakes every thread blocked on the connection.
    pub fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        self.tcp.shutdown(how)
    }

    /// `TcpStream::peer_addr`.
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    fn read_tls(tls: &TlsState, tcp: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut raw = [0u8; RAW_READ];
        loop {
            {
                let mut shared = lock(&tls.shared);
                let Shared { connection, unread } = &mut *shared;
                loop {
                    match connection.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                        // The TCP stream ended without close_notify: an end like a
                        // TcpStream's (the channels never take an end for a clean finish).
                        Err(err) if err.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                        Err(err) => return Err(err),
                    }
                    if unread.is_empty() {
                        break;
                    }
                    // No plaintext waits: rustls takes what it can of the bytes read.
                    let mut rest = &unread[..];
                    let taken = connection.read_tls(&mut rest)?;
                    if taken == 0 {
                        // close_notify came: nothing more is taken.
                        return Ok(0);
                    }
                    unread.drain(..taken);
                    connection.process_new_packets().map_err(invalid)?;
                }
            }
            // Waits for the peer without the lock: writers go on meanwhile.
            let n = loop {
                match (&*tcp).read(&mut raw) {
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                return Ok(0);
            }
            lock(&tls.shared).unread.extend_from_slice(&raw[..n]);
        }
    }

    fn write_tls(tls: &TlsState, tcp: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
        let _sending = lock(&tls.sending);
        let mut records = Vec::with_capacity(buf.len() + 64);
        let written = {
            let mut shared = lock(&tls.shared);
            let connection = &mut shared.connection;
            let written = connection.writer().write(buf)?;
            while connection.wants_write() {
                connection.write_tls(&mut records)?;
            }
            written
        };
        (&*tcp).write_all(&records)?;
        Ok(written)
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.tls {
            None => (&self.tcp).read(buf),
            Some(tls) => Socket::read_tls(tls, &self.tcp, buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.tls {
            None => (&self.tcp).write(buf),
            Some(tls) => Socket::write_tls(tls, &self.tcp, buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Records leave in write itself.
        Ok(())
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&*self).flush()
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("tcp", &self.tcp)
            .field("peer", &self.peer_identity())
            .finish()
    }
}
