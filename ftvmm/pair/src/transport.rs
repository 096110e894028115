//! How the replicas' log and clone connections are secured: under mutual TLS with the
//! host certificate ftd gives the replica (`ftvmm run --tls-dir`), or in plaintext when
//! the replica was started with `--insecure` (one machine, development).
//!
//! A process has one setting, chosen once at start-up ([`secure_with`]) before the
//! sandbox closes the files: every connection the channels and the clone make or accept
//! goes through [`connect_timeout`] and [`accept`]. Nothing set means plaintext, which is
//! what the unit tests of this crate use; the ftvmm binary always chooses.

use ftvm_tls::{Credentials, Socket, TlsError, TlsSide};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How long a peer has to finish the TLS handshake once connected.
pub const HANDSHAKE_PATIENCE: Duration = Duration::from_secs(2);

struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

static TLS: OnceLock<Option<Tls>> = OnceLock::new();

/// Secures every connection of this process with `credentials` (a host certificate of
/// the cluster CA), or none (`None`: plaintext). Only the first call counts.
pub fn secure_with(credentials: Option<&Credentials>) -> Result<(), TlsError> {
    let tls = match credentials {
        Some(credentials) => Some(Tls {
            client: credentials.client_config()?,
            server: credentials.server_config()?,
        }),
        None => None,
    };
    let _ = TLS.set(tls);
    Ok(())
}

/// Whether connections run under TLS.
pub fn is_secured() -> bool {
    matches!(TLS.get(), Some(Some(_)))
}

fn tls_failed(err: TlsError) -> std::io::Error {
    match err {
        TlsError::Handshake(err) => err,
        other => std::io::Error::new(std::io::ErrorKind::PermissionDenied, other.to_string()),
    }
}

/// Secures a connection this side made.
pub fn secure_connected(tcp: TcpStream, patience: Duration) -> std::io::Result<Socket> {
    match TLS.get() {
        Some(Some(tls)) => Socket::handshake(tcp, TlsSide::Client(tls.client.clone()), patience)
            .map_err(tls_failed),
        _ => Ok(Socket::plain(tcp)),
    }
}

/// Connects to `target` and secures the connection, all within `timeout` (and the
/// handshake within [`HANDSHAKE_PATIENCE`]): a reconnection keeps to its window. A
/// refused TCP connection stays `ConnectionRefused`; a peer without a valid host
/// certificate is `PermissionDenied`.
pub fn connect_timeout(target: &SocketAddr, timeout: Duration) -> std::io::Result<Socket> {
    let deadline = std::time::Instant::now() + timeout;
    let tcp = TcpStream::connect_timeout(target, timeout)?;
    let left = deadline
        .saturating_duration_since(std::time::Instant::now())
        .max(Duration::from_millis(1));
    secure_connected(tcp, left.min(HANDSHAKE_PATIENCE))
}

/// Secures a connection this side accepted, within `patience`: a peer without a host
/// certificate of the cluster CA is refused before any byte of the protocol.
pub fn accept(tcp: TcpStream, patience: Duration) -> Result<Socket, String> {
    match TLS.get() {
        Some(Some(tls)) => Socket::handshake(tcp, TlsSide::Server(tls.server.clone()), patience)
            .map_err(|err| err.to_string()),
        _ => Ok(Socket::plain(tcp)),
    }
}
