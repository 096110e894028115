//! Clients of the kv guest: redis-cli from a namespace, a RESP client, and the
//! acknowledged-writes checker that reads every acknowledged write back.

use super::*;

/// `ftvmm run` of the kv guest alone in `ns` on TAP `tap` with the disk image `disk`
/// (128 MiB, the test MAC and address, no console): a cold start from a disk. Callers add
/// flags and start it.
pub fn kv_alone(ns: &NetNs, tap: &str, disk: &std::path::Path) -> std::process::Command {
    let mut command = ns.command(binary("ftvmm"));
    command
        .args(["run", "--mem", "128M", "--mac", GUEST_MAC, "--tap", tap])
        .args(["--ip", &format!("{GUEST_IP}/24"), "--console", "none"])
        .arg("--disk")
        .arg(disk)
        .arg("--image")
        .arg(guest("kv"));
    command
}

/// Runs `redis-cli` in `ns` against the guest and returns its trimmed output; fails the test
/// if redis-cli is missing or fails.
pub fn redis_cli(ns: &NetNs, args: &[&str]) -> String {
    redis_cli_at(ns, GUEST_IP, args)
}

/// Polls `redis-cli PING` until the guest answers PONG or `timeout` passes.
pub fn wait_for_pong(ns: &NetNs, timeout: std::time::Duration) -> bool {
    wait_for_pong_at(ns, GUEST_IP, timeout)
}

/// A minimal RESP (Redis protocol) client for checkers that must know exactly which
/// writes were acknowledged.
pub struct RespClient {
    stream: std::io::BufReader<std::net::TcpStream>,
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Status(String),
    /// `-...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n ...` (`None` for a null bulk string)
    Bulk(Option<Vec<u8>>),
    /// `*n ...`
    Array(Vec<Reply>),
}

impl RespClient {
    /// Connects to `addr` (in the calling thread's network namespace).
    pub fn connect(addr: &str, timeout: std::time::Duration) -> std::io::Result<RespClient> {
        let addr: std::net::SocketAddr = addr.parse().map_err(|err| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {err}"))
        })?;
        let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(RespClient {
            stream: std::io::BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        use std::io::Write;
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&out)?;
        self.read_reply()
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        use std::io::Read;
        let bad = |line: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad reply line {line:?}"),
            )
        };
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || rest.parse::<i64>().map_err(|_| bad(&line));
        Ok(match kind {
            "+" => Reply::Status(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Integer(number()?),
            "$" => match number()? {
                -1 => Reply::Bulk(None),
                len if len >= 0 => {
                    let mut data = vec![0u8; len as usize + 2];
                    self.stream.read_exact(&mut data)?;
                    data.truncate(len as usize);
                    Reply::Bulk(Some(data))
                }
                _ => return Err(bad(&line)),
            },
            "*" => {
                let count = number()?;
                let mut items = Vec::new();
                for _ in 0..count.max(0) {
                    items.push(self.read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(bad(&line)),
        })
    }
}

impl RespClient {
    /// Changes how long a read or a write may block (a checker expecting *no* reply
    /// shortens it).
    pub fn set_timeout(&mut self, timeout: std::time::Duration) -> std::io::Result<()> {
        let stream = self.stream.get_ref();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }
}

/// The acknowledged-writes checker: distinct `SET <prefix>:<i> v<i>` over ONE connection to
/// a kv guest, remembering every write acknowledged with `+OK`, so that a test can read
/// them all back after a failure and count the lost ones (there must be none).
pub struct AckedWrites {
    client: RespClient,
    prefix: String,
    next: u32,
    acked: Vec<(String, String)>,
    /// Values are padded to at least this many bytes.
    value_len: usize,
}

/// A thread doing [`AckedWrites::spawn`]'s writes; joined, it hands the checker back
/// with the outcome.
pub type Writer = std::thread::JoinHandle<(AckedWrites, Result<(), String>)>;

impl AckedWrites {
    /// Connects from network namespace `ns` to the kv guest at `addr` (`IP:PORT`); fails
    /// the test if it cannot. The socket stays in `ns` whichever thread uses it later.
    pub fn connect(ns: &str, addr: &str, prefix: &str) -> AckedWrites {
        let target = addr.to_owned();
        let client = in_netns(ns, move || {
            RespClient::connect(&target, std::time::Duration::from_secs(20))
        })
        .unwrap_or_else(|err| panic!("cannot connect to the kv guest at {addr} from {ns}: {err}"));
        AckedWrites {
            client,
            prefix: prefix.to_owned(),
            next: 0,
            acked: Vec::new(),
            value_len: 0,
        }
    }

    /// Pads every value to `len` bytes from now on (large records span disk sectors).
    pub fn with_value_len(mut self, len: usize) -> AckedWrites {
        self.value_len = len;
        self
    }

    /// The value write `i` stores: `v<i>`, padded with `x` to the value length.
    pub fn value(&self, i: u32) -> String {
        let mut value = format!("v{i}");
        while value.len() < self.value_len {
            value.push('x');
        }
        value
    }

    /// The acknowledged writes, key and value.
    pub fn acked_writes(&self) -> &[(String, String)] {
        &self.acked
    }

    /// SETs the next key and records it if the reply is `+OK`; anything else (an error
    /// reply, a timeout, a closed connection) is returned as the reason.
    pub fn write(&mut self) -> Result<(), String> {
        let i = self.next;
        self.next += 1;
        let (key, value) = (format!("{}:{i}", self.prefix), self.value(i));
        match self
            .client
            .call(&[b"SET", key.as_bytes(), value.as_bytes()])
        {
            Ok(Reply::Status(ok)) if ok == "OK" => {
                self.acked.push((key, value));
                Ok(())
            }
            other => Err(format!("write {i} ({key}) not acknowledged: {other:?}")),
        }
    }

    /// `count` writes, calling `before(n)` before the n-th of them (from 0); stops at the
    /// first one not acknowledged.
    pub fn write_many(&mut self, count: u32, mut before: impl FnMut(u32)) -> Result<(), String> {
        for n in 0..count {
            before(n);
            self.write()?;
        }
        Ok(())
    }

    /// `count` writes on a thread of their own; the receiver gets a message just before
    /// write `signal_at` goes out, so a test can inject a failure while writes are in
    /// flight. The thread hands the checker back with the outcome.
    pub fn spawn(mut self, count: u32, signal_at: u32) -> (std::sync::mpsc::Receiver<()>, Writer) {
        let (signal, signalled) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let result = self.write_many(count, |n| {
                if n == signal_at {
                    let _ = signal.send(());
                }
            });
            (self, result)
        });
        (signalled, writer)
    }

    /// How many writes were acknowledged.
    pub fn acked(&self) -> usize {
        self.acked.len()
    }

    /// The connection, e.g. to change its timeout.
    pub fn client(&mut self) -> &mut RespClient {
        &mut self.client
    }

    /// Reads every acknowledged key back over the same connection (from whichever
    /// replica serves the guest's address now) and returns those missing or changed.
    pub fn lost(&mut self) -> Vec<String> {
        let mut lost = Vec::new();
        for (key, value) in &self.acked {
            let reply = self.client.call(&[b"GET", key.as_bytes()]);
            if reply.as_ref().ok() != Some(&Reply::Bulk(Some(value.as_bytes().to_vec()))) {
                lost.push(format!("{key}: {reply:?}"));
            }
        }
        lost
    }
}

/// Runs `redis-cli` in `ns` against a kv guest at `ip` and returns its trimmed output;
/// fails the test if redis-cli is missing or fails.
pub fn redis_cli_at(ns: &NetNs, ip: &str, args: &[&str]) -> String {
    let ran = run(ns
        .command("redis-cli")
        .args(["-h", ip, "-p", "6379"])
        .args(args));
    assert_eq!(
        ran.code,
        Some(0),
        "redis-cli {args:?} failed (is redis-tools installed?): {ran:?}"
    );
    ran.stdout.trim_end().to_owned()
}

/// Polls `redis-cli PING` against `ip` until the guest answers PONG or `timeout` passes.
pub fn wait_for_pong_at(ns: &NetNs, ip: &str, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let ran = run(ns
            .command("redis-cli")
            .args(["-h", ip, "-p", "6379", "PING"]));
        if ran.stdout.trim() == "PONG" {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}
