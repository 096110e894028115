//! A TCP relay for a pair's log channel, inside a test's network namespace, that can hold
//! back what the backup sends (its acknowledgements) and deliver it all at once later: what
//! a primary frozen with acknowledgements in flight finds in its socket when it wakes up.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The relay: backups connect to [`AckGate::addr`], it connects each to the primary.
pub struct AckGate {
    /// Where the backup connects (`--log-connect`).
    pub addr: String,
    holding: Arc<AtomicBool>,
}

impl AckGate {
    /// A relay in network namespace `ns` to the primary's log address `primary`.
    pub fn start(ns: &str, primary: &str) -> AckGate {
        let holding = Arc::new(AtomicBool::new(false));
        let (gate, primary) = (holding.clone(), primary.to_owned());
        let addr = crate::in_netns(ns, move || {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
            let addr = listener.local_addr().expect("relay address").to_string();
            // Threads started here stay in the namespace.
            std::thread::spawn(move || {
                for backup in listener.incoming().flatten() {
                    let Ok(upstream) = TcpStream::connect(&primary) else {
                        continue;
                    };
                    let _ = backup.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (Ok(backup_in), Ok(upstream_out)) =
                        (backup.try_clone(), upstream.try_clone())
                    else {
                        continue;
                    };
                    std::thread::spawn(move || copy(upstream, backup));
                    let gate = gate.clone();
                    std::thread::spawn(move || copy_gated(backup_in, upstream_out, &gate));
                }
            });
            addr
        });
        AckGate { addr, holding }
    }

    /// From now on what the backup sends is kept, not delivered.
    pub fn hold(&self) {
        self.holding.store(true, Ordering::SeqCst);
    }

    /// Delivers what was kept and forwards again.
    pub fn release(&self) {
        self.holding.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either side closes.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 64 * 1024];
    while let Ok(len) = from.read(&mut buffer) {
        if len == 0 || to.write_all(&buffer[..len]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Copies `from` to `to`, keeping what arrives while `holding` and delivering it once
/// released.
fn copy_gated(mut from: TcpStream, mut to: TcpStream, holding: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(5)));
    let mut kept = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(len) => kept.extend_from_slice(&buffer[..len]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if !holding.load(Ordering::SeqCst) && !kept.is_empty() {
            if to.write_all(&kept).is_err() {
                break;
            }
            kept.clear();
        }
    }
    if !holding.load(Ordering::SeqCst) {
        let _ = to.write_all(&kept);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
