//! The RESP server: a pool of TCP sockets on one port, one connection each.
//!
//! smoltcp answers a SYN with a RST when no socket listens, and a client's burst of
//! connects (`redis-benchmark -c 64` opens 64 at once, while the previous test's 64
//! are still closing) arrives within one poll. So the pool keeps [`SPARE_LISTENERS`]
//! sockets listening at all times, adding sockets (up to the `max_sockets` given to
//! [`Server::new`]) as connections take them; sockets whose connection ended listen
//! again.
//!
//! Per connection, input is buffered until it holds complete commands, which are
//! executed in order; each reply is tagged with the log sequence number it depends
//! on (a write's own record, or for any other command the last write applied so
//! far, whose effect it may have seen) and is held back until that number is durable.
//! Replies leave in command order. Input is read and parsed only while the
//! connection's unsent output is small (back-pressure).

use crate::store::Store;
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;
use kvcore::db::Client;
use kvcore::log::AppendError;
use kvcore::resp::{self, parse_command, MAX_COMMAND};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};

/// Receive buffer of each TCP socket.
const TCP_RX: usize = 16 * 1024;
/// Transmit buffer of each TCP socket.
const TCP_TX: usize = 16 * 1024;
/// Most input buffered per connection: a command larger than this is rejected.
const IN_CAP: usize = MAX_COMMAND + 1;
/// Stop executing a connection's commands while this much output waits.
const OUT_LIMIT: usize = 256 * 1024;
/// Sockets kept listening (while the pool may grow).
pub const SPARE_LISTENERS: usize = 64;

#[derive(Default)]
struct Conn {
    handle: Option<SocketHandle>,
    id: u64,
    /// A connection is established on the socket and being served.
    active: bool,
    input: Vec<u8>,
    /// Replies that may be sent; `out[out_pos..]` is not yet in the socket.
    out: Vec<u8>,
    out_pos: usize,
    /// Replies waiting for durability, in order.
    held: Vec<u8>,
    /// `(sequence number, end offset in held)`: `held[..end]` may go once the
    /// number is durable (numbers and offsets increase).
    marks: VecDeque<(u64, usize)>,
    /// Close once everything is sent (`QUIT`, protocol error).
    close_after: bool,
}

impl Conn {
    fn reset(&mut self) {
        self.active = false;
        self.input = Vec::new();
        self.out = Vec::new();
        self.out_pos = 0;
        self.held = Vec::new();
        self.marks.clear();
        self.close_after = false;
    }

    fn backlog(&self) -> usize {
        self.out.len() - self.out_pos + self.held.len()
    }

    fn push_reply(&mut self, reply: &[u8], seq: u64, durable: u64) {
        if seq <= durable && self.marks.is_empty() {
            self.out.extend_from_slice(reply);
            return;
        }
        self.held.extend_from_slice(reply);
        match self.marks.back_mut() {
            Some((s, end)) if *s == seq => *end = self.held.len(),
            _ => self.marks.push_back((seq, self.held.len())),
        }
    }

    /// Moves the replies whose writes are durable to `out`.
    fn release(&mut self, durable: u64) -> bool {
        let mut upto = 0;
        while let Some(&(seq, end)) = self.marks.front() {
            if seq > durable {
                break;
            }
            upto = end;
            self.marks.pop_front();
        }
        if upto == 0 {
            return false;
        }
        self.out.extend_from_slice(&self.held[..upto]);
        self.held.drain(..upto);
        for (_, end) in self.marks.iter_mut() {
            *end -= upto;
        }
        true
    }
}

/// The server: its sockets and connections.
pub struct Server {
    port: u16,
    max_sockets: usize,
    conns: Vec<Conn>,
    next_id: u64,
    args: Vec<Range<usize>>,
    reply: Vec<u8>,
    shutdown: bool,
}

impl Server {
    /// A server on `port` with at most `max_sockets` sockets (so as many
    /// concurrent connections); starts with [`SPARE_LISTENERS`] listening.
    pub fn new(sockets: &mut SocketSet<'_>, port: u16, max_sockets: usize) -> Server {
        let mut server = Server {
            port,
            max_sockets,
            conns: Vec::new(),
            next_id: 1,
            args: Vec::new(),
            reply: Vec::new(),
            shutdown: false,
        };
        server.add_listeners(sockets);
        server
    }

    /// Adds listening sockets until [`SPARE_LISTENERS`] listen or the pool is full.
    fn add_listeners(&mut self, sockets: &mut SocketSet<'_>) {
        let mut listening = self
            .conns
            .iter()
            .filter_map(|c| c.handle)
            .filter(|h| sockets.get::<tcp::Socket>(*h).state() == State::Listen)
            .count();
        while listening < SPARE_LISTENERS && self.conns.len() < self.max_sockets {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; TCP_RX]),
                tcp::SocketBuffer::new(vec![0; TCP_TX]),
            );
            socket.set_nagle_enabled(false);
            let _ = socket.listen(self.port);
            self.conns.push(Conn {
                handle: Some(sockets.add(socket)),
                ..Conn::default()
            });
            listening += 1;
        }
    }

    /// Whether a client asked for `SHUTDOWN`.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Whether every reply that may be sent has been handed to its socket.
    pub fn all_sent(&self) -> bool {
        self.conns.iter().all(|c| !c.active || c.backlog() == 0)
    }

    /// Resets every connection (RST), for shutdown: clients see the server go away.
    pub fn abort_all(&mut self, sockets: &mut SocketSet<'_>) {
        for conn in &mut self.conns {
            if let Some(handle) = conn.handle {
                sockets.get_mut::<tcp::Socket>(handle).abort();
            }
            conn.reset();
        }
    }

    /// Serves every connection once: accepts, reads, executes, sends, closes, and
    /// puts closed sockets back to listening. Returns whether anything happened.
    pub fn service(&mut self, sockets: &mut SocketSet<'_>, store: &mut Store) -> bool {
        let mut progress = false;
        for i in 0..self.conns.len() {
            progress |= self.service_one(i, sockets, store);
        }
        self.add_listeners(sockets);
        progress
    }

    fn service_one(&mut self, i: usize, sockets: &mut SocketSet<'_>, store: &mut Store) -> bool {
        let port = self.port;
        let conn = &mut self.conns[i];
        let Some(handle) = conn.handle else {
            return false;
        };
        let sock = sockets.get_mut::<tcp::Socket>(handle);
        let mut progress = false;

        if !sock.is_open() {
            // Closed, or in TIME-WAIT: the connection is over; listen again.
            if conn.active {
                conn.reset();
                progress = true;
            }
            let _ = sock.listen(port);
            return progress;
        }
        if !sock.is_active() {
            return false; // listening
        }
        if !conn.active {
            conn.reset();
            conn.active = true;
            conn.id = self.next_id;
            self.next_id += 1;
            progress = true;
        }

        progress |= conn.release(store.durable_seq());

        // Read what fits.
        while sock.can_recv() && conn.input.len() < IN_CAP {
            let room = IN_CAP - conn.input.len();
            let input = &mut conn.input;
            let got = sock.recv(|data| {
                let n = data.len().min(room);
                if input.try_reserve(n).is_err() {
                    return (0, None);
                }
                input.extend_from_slice(&data[..n]);
                (n, Some(n))
            });
            match got {
                Ok(Some(n)) if n > 0 => progress = true,
                Ok(Some(_)) => break,
                Ok(None) | Err(_) => {
                    // Out of memory for this connection's input (or the socket
                    // broke): drop the connection rather than the guest.
                    sock.abort();
                    conn.reset();
                    return true;
                }
            }
        }

        // Execute complete commands, in order.
        let mut pos = 0;
        while !conn.close_after && !self.shutdown && conn.backlog() < OUT_LIMIT {
            match parse_command(&conn.input[pos..], &mut self.args) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    let base = pos;
                    pos += n;
                    progress = true;
                    if self.args.is_empty() {
                        continue;
                    }
                    self.reply.clear();
                    let outcome = {
                        let argv: Vec<&[u8]> = self
                            .args
                            .iter()
                            .map(|r| &conn.input[base + r.start..base + r.end])
                            .collect();
                        store
                            .db
                            .execute(&argv, Client { id: conn.id }, &mut self.reply)
                    };
                    let mut seq = store.applied_seq();
                    if let Some(op) = outcome.op {
                        match store.write(op) {
                            Ok(s) => seq = s,
                            Err(err) => {
                                self.reply.clear();
                                resp::error(
                                    &mut self.reply,
                                    match err {
                                        AppendError::Full => "ERR disk full, write refused",
                                        AppendError::TooLarge => "ERR write too large for the log",
                                    },
                                );
                            }
                        }
                    }
                    conn.push_reply(&self.reply, seq, store.durable_seq());
                    conn.close_after |= outcome.close;
                    self.shutdown |= outcome.shutdown;
                }
                Err(err) => {
                    self.reply.clear();
                    self.reply.extend_from_slice(b"-ERR Protocol error: ");
                    self.reply.extend_from_slice(err.message().as_bytes());
                    self.reply.extend_from_slice(b"\r\n");
                    conn.push_reply(&self.reply, store.applied_seq(), store.durable_seq());
                    conn.close_after = true;
                    pos = conn.input.len();
                    progress = true;
                }
            }
        }
        if pos > 0 {
            conn.input.drain(..pos);
        }
        if conn.input.is_empty() && conn.input.capacity() > 64 * 1024 {
            conn.input = Vec::new();
        }

        // Send what may be sent.
        while conn.out_pos < conn.out.len() && sock.can_send() {
            match sock.send_slice(&conn.out[conn.out_pos..]) {
                Ok(n) if n > 0 => {
                    conn.out_pos += n;
                    progress = true;
                }
                _ => break,
            }
        }
        if conn.out_pos == conn.out.len() {
            conn.out.clear();
            conn.out_pos = 0;
            if conn.out.capacity() > 64 * 1024 {
                conn.out = Vec::new();
            }
        }

        // Close: after QUIT or an error once all is sent, or when the client has
        // closed its side and nothing it sent is left to answer.
        let all_sent = conn.backlog() == 0;
        let peer_done = sock.state() == State::CloseWait
            && !sock.may_recv()
            && parse_command(&conn.input, &mut self.args) == Ok(None);
        if all_sent
            && (conn.close_after || peer_done)
            && matches!(
                sock.state(),
                State::Established | State::CloseWait | State::SynReceived
            )
        {
            sock.close();
            progress = true;
        }
        progress
    }
}
