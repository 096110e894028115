//! The key-value map and the command executor.
//!
//! Executing a command is split in two so that a write can be logged before it takes
//! effect: [`Db::execute`] computes the reply (appended to the caller's buffer) and,
//! for a command that changes the map, the [`Op`] that describes the change, without
//! changing anything. The caller logs the op and then calls [`Db::apply`] (or, if the
//! op cannot be logged, discards the reply and sends an error instead). Replaying the
//! log is calling [`Db::apply`] on every logged op.
//!
//! Ops are idempotent descriptions of the result, not of the command: `INCR` is logged
//! as a `SET` of the new value, `DEL` lists only the keys that existed.

use crate::resp;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A change to the map, as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Set {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove these keys (each present when the op was made).
    Del {
        /// The keys.
        keys: Vec<Vec<u8>>,
    },
    /// Remove every key.
    FlushAll,
}

/// What the caller must do after [`Db::execute`], besides sending the reply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// A change to log and then [`Db::apply`]; the reply must not be sent before the
    /// change is durable.
    pub op: Option<Op>,
    /// Close the connection once the reply has been sent (`QUIT`).
    pub close: bool,
    /// Stop the server once pending writes are durable (`SHUTDOWN`).
    pub shutdown: bool,
}

/// Per-connection facts some commands report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Client {
    /// Connection id (`CLIENT ID`).
    pub id: u64,
}

/// The map from keys to values.
#[derive(Debug, Default)]
pub struct Db {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Server version reported by `HELLO` and `INFO`.
pub const REDIS_VERSION: &str = "7.0.0";

impl Db {
    /// An empty map.
    pub fn new() -> Self {
        Db::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// Applies a change (a logged one, or one [`Db::execute`] returned).
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Set { key, value } => {
                self.map.insert(key, value);
            }
            Op::Del { keys } => {
                for key in keys {
                    self.map.remove(&key);
                }
            }
            Op::FlushAll => self.map.clear(),
        }
    }

    /// Executes one command (`args[0]` is its name, any case) against the map as it is
    /// now, appending the RESP reply to `out`. The map is not changed: a write returns
    /// its change in [`Outcome::op`]. `args` must not be empty.
    pub fn execute(&self, args: &[&[u8]], client: Client, out: &mut Vec<u8>) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(&name) = args.first() else {
            return outcome;
        };
        let mut upper = [0u8; 16];
        let cmd: &[u8] = if name.len() <= upper.len() {
            for (u, c) in upper.iter_mut().zip(name) {
                *u = c.to_ascii_uppercase();
            }
            &upper[..name.len()]
        } else {
            b""
        };
        let argc = args.len();
        let arity_ok = match cmd {
            b"PING" => argc <= 2,
            b"ECHO" | b"GET" | b"INCR" | b"DECR" | b"SELECT" => argc == 2,
            b"INCRBY" | b"DECRBY" => argc == 3,
            b"SET" => argc >= 3,
            b"DEL" | b"EXISTS" | b"MGET" | b"CONFIG" | b"CLIENT" => argc >= 2,
            b"DBSIZE" => argc == 1,
            b"FLUSHALL" | b"FLUSHDB" => argc <= 2,
            b"QUIT" | b"COMMAND" | b"HELLO" | b"INFO" | b"SHUTDOWN" => true,
            _ => {
                unknown_command(out, name);
                return outcome;
            }
        };
        if !arity_ok {
            wrong_arity(out, cmd);
            return outcome;
        }
        match cmd {
            b"PING" => match args.get(1) {
                Some(msg) => resp::bulk(out, msg),
                None => resp::simple(out, "PONG"),
            },
            b"ECHO" => resp::bulk(out, args[1]),
            b"GET" => match self.get(args[1]) {
                Some(v) => resp::bulk(out, v),
                None => resp::null(out),
            },
            b"MGET" => {
                resp::array(out, argc - 1);
                for key in &args[1..] {
                    match self.get(key) {
                        Some(v) => resp::bulk(out, v),
                        None => resp::null(out),
                    }
                }
            }
            b"SET" => outcome.op = self.set(args, out),
            b"INCR" => outcome.op = self.incr_by(args[1], 1, out),
            b"DECR" => outcome.op = self.incr_by(args[1], -1, out),
            b"INCRBY" | b"DECRBY" => match resp::parse_i64(args[2]) {
                None => resp::error(out, "ERR value is not an integer or out of range"),
                Some(n) if cmd == b"INCRBY" => outcome.op = self.incr_by(args[1], n, out),
                Some(n) => match n.checked_neg() {
                    Some(neg) => outcome.op = self.incr_by(args[1], neg, out),
                    None => resp::error(out, "ERR decrement would overflow"),
                },
            },
            b"DEL" => {
                let mut keys: Vec<Vec<u8>> = Vec::new();
                for key in &args[1..] {
                    if self.map.contains_key(*key) && !keys.iter().any(|k| k.as_slice() == *key) {
                        keys.push(key.to_vec());
                    }
                }
                resp::integer(out, keys.len() as i64);
                if !keys.is_empty() {
                    outcome.op = Some(Op::Del { keys });
                }
            }
            b"EXISTS" => {
                let n = args[1..]
                    .iter()
                    .filter(|k| self.map.contains_key(**k))
                    .count();
                resp::integer(out, n as i64);
            }
            b"DBSIZE" => resp::integer(out, self.map.len() as i64),
            b"FLUSHALL" | b"FLUSHDB" => match args.get(1).map(|a| a.to_ascii_uppercase()) {
                None => outcome.op = self.flush_all(out),
                Some(mode) if mode == b"ASYNC" || mode == b"SYNC" => {
                    outcome.op = self.flush_all(out)
                }
                Some(_) => resp::error(out, "ERR syntax error"),
            },
            b"SELECT" => match resp::parse_i64(args[1]) {
                Some(0) => resp::simple(out, "OK"),
                Some(_) => resp::error(out, "ERR DB index is out of range"),
                None => resp::error(out, "ERR value is not an integer or out of range"),
            },
            b"QUIT" => {
                resp::simple(out, "OK");
                outcome.close = true;
            }
            b"SHUTDOWN" => {
                // Like Redis: no reply; the connection closes when the server stops.
                outcome.shutdown = true;
            }
            b"CONFIG" => config(args, out),
            b"CLIENT" => client_cmd(args, client, out),
            b"COMMAND" => match args.get(1).map(|a| a.to_ascii_uppercase()) {
                Some(sub) if sub == b"COUNT" => resp::integer(out, 0),
                _ => resp::array(out, 0),
            },
            b"HELLO" => hello(args, client, out),
            b"INFO" => {
                let mut text = Vec::new();
                text.extend_from_slice(b"# Server\r\nredis_version:");
                text.extend_from_slice(REDIS_VERSION.as_bytes());
                text.extend_from_slice(b"\r\nredis_mode:standalone\r\nserver_name:ftvm-kv\r\n");
                text.extend_from_slice(b"# Keyspace\r\n");
                if !self.map.is_empty() {
                    text.extend_from_slice(b"db0:keys=");
                    resp::push_i64(&mut text, self.map.len() as i64);
                    text.extend_from_slice(b",expires=0,avg_ttl=0\r\n");
                }
                resp::bulk(out, &text);
            }
            _ => unreachable!("every command with an arity is handled"),
        }
        outcome
    }

    /// `SET key value [NX|XX]`.
    fn set(&self, args: &[&[u8]], out: &mut Vec<u8>) -> Option<Op> {
        let (key, value) = (args[1], args[2]);
        let (mut nx, mut xx) = (false, false);
        for opt in &args[3..] {
            match opt.to_ascii_uppercase().as_slice() {
                b"NX" => nx = true,
                b"XX" => xx = true,
                _ => {
                    resp::error(out, "ERR syntax error");
                    return None;
                }
            }
        }
        if nx && xx {
            resp::error(out, "ERR syntax error");
            return None;
        }
        let exists = self.map.contains_key(key);
        if (nx && exists) || (xx && !exists) {
            resp::null(out);
            return None;
        }
        resp::simple(out, "OK");
        Some(Op::Set {
            key: key.to_vec(),
            value: value.to_vec(),
        })
    }

    /// `INCR`, `DECR`, `INCRBY`, `DECRBY`: logged as a `SET` of the result.
    fn incr_by(&self, key: &[u8], by: i64, out: &mut Vec<u8>) -> Option<Op> {
        let current = match self.map.get(key) {
            None => 0,
            Some(v) => match resp::parse_i64(v) {
                Some(n) => n,
                None => {
                    resp::error(out, "ERR value is not an integer or out of range");
                    return None;
                }
            },
        };
        let Some(new) = current.checked_add(by) else {
            resp::error(out, "ERR increment or decrement would overflow");
            return None;
        };
        resp::integer(out, new);
        let mut value = Vec::new();
        resp::push_i64(&mut value, new);
        Some(Op::Set {
            key: key.to_vec(),
            value,
        })
    }

    fn flush_all(&self, out: &mut Vec<u8>) -> Option<Op> {
        resp::simple(out, "OK");
        (!self.map.is_empty()).then_some(Op::FlushAll)
    }
}

/// `-ERR unknown command '<name>'`, with the name cut to 128 bytes and anything that
/// is not printable ASCII (which could break the reply line) replaced by `?`.
fn unknown_command(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR unknown command '");
    push_sanitized(out, name);
    out.extend_from_slice(b"'\r\n");
}

fn push_sanitized(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s.iter().take(128) {
        out.push(if (0x20..0x7f).contains(&b) { b } else { b'?' });
    }
}

fn wrong_arity(out: &mut Vec<u8>, cmd: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    for &b in cmd {
        out.push(b.to_ascii_lowercase());
    }
    out.extend_from_slice(b"' command\r\n");
}

/// `CONFIG GET <parameter>...` answers a few parameters that clients ask for at
/// start-up (`redis-benchmark` asks for `save` and `appendonly`) as `[name, value]`
/// pairs, and nothing for others (an empty array, as Redis does for unknown ones).
/// `CONFIG SET` is refused; `CONFIG RESETSTAT` is accepted and does nothing.
fn config(args: &[&[u8]], out: &mut Vec<u8>) {
    const KNOWN: &[(&[u8], &[u8])] = &[
        (b"save", b""),
        (b"appendonly", b"yes"),
        (b"appendfsync", b"always"),
        (b"databases", b"1"),
        (b"maxmemory", b"0"),
    ];
    match args[1].to_ascii_uppercase().as_slice() {
        b"GET" if args.len() >= 3 => {
            let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
            for param in &args[2..] {
                let lower = param.to_ascii_lowercase();
                if let Some(&(name, value)) = KNOWN.iter().find(|(n, _)| *n == lower.as_slice()) {
                    if !pairs.iter().any(|(n, _)| *n == name) {
                        pairs.push((name, value));
                    }
                }
            }
            resp::array(out, pairs.len() * 2);
            for (name, value) in pairs {
                resp::bulk(out, name);
                resp::bulk(out, value);
            }
        }
        b"GET" => wrong_arity(out, b"config|get"),
        b"RESETSTAT" => resp::simple(out, "OK"),
        b"SET" => resp::error(out, "ERR CONFIG SET is not supported"),
        _ => {
            out.extend_from_slice(b"-ERR unknown subcommand '");
            push_sanitized(out, args[1]);
            out.extend_from_slice(b"'\r\n");
        }
    }
}

/// `CLIENT ID|GETNAME|SETNAME|SETINFO|...`: accepted and mostly ignored.
fn client_cmd(args: &[&[u8]], client: Client, out: &mut Vec<u8>) {
    match args[1].to_ascii_uppercase().as_slice() {
        b"ID" => resp::integer(out, client.id as i64),
        b"GETNAME" => resp::null(out),
        b"SETNAME" | b"SETINFO" | b"REPLY" | b"NO-EVICT" | b"NO-TOUCH" => resp::simple(out, "OK"),
        _ => {
            out.extend_from_slice(b"-ERR unknown subcommand '");
            push_sanitized(out, args[1]);
            out.extend_from_slice(b"'\r\n");
        }
    }
}

/// `HELLO [2 ...]`: the RESP2 server description; RESP3 is refused.
fn hello(args: &[&[u8]], client: Client, out: &mut Vec<u8>) {
    if let Some(version) = args.get(1) {
        match resp::parse_i64(version) {
            Some(2) => {}
            Some(_) => {
                resp::error(out, "NOPROTO unsupported protocol version");
                return;
            }
            None => {
                resp::error(
                    out,
                    "ERR Protocol version is not an integer or out of range",
                );
                return;
            }
        }
    }
    resp::array(out, 14);
    resp::bulk(out, b"server");
    resp::bulk(out, b"redis");
    resp::bulk(out, b"version");
    resp::bulk(out, REDIS_VERSION.as_bytes());
    resp::bulk(out, b"proto");
    resp::integer(out, 2);
    resp::bulk(out, b"id");
    resp::integer(out, client.id as i64);
    resp::bulk(out, b"mode");
    resp::bulk(out, b"standalone");
    resp::bulk(out, b"role");
    resp::bulk(out, b"master");
    resp::bulk(out, b"modules");
    resp::array(out, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    /// Runs a command, applies its op, returns the reply as text and the outcome.
    fn run(db: &mut Db, cmd: &str) -> (String, Outcome) {
        let args: Vec<&[u8]> = cmd.split(' ').map(str::as_bytes).collect();
        let mut out = Vec::new();
        let mut outcome = db.execute(&args, Client { id: 7 }, &mut out);
        if let Some(op) = outcome.op.clone() {
            db.apply(op);
        }
        outcome.op.take();
        (String::from_utf8(out).unwrap(), outcome)
    }

    fn reply(db: &mut Db, cmd: &str) -> String {
        run(db, cmd).0
    }

    #[test]
    fn basic_commands() {
        let mut db = Db::new();
        assert_eq!(reply(&mut db, "PING"), "+PONG\r\n");
        assert_eq!(reply(&mut db, "ping hi"), "$2\r\nhi\r\n");
        assert_eq!(reply(&mut db, "ECHO x"), "$1\r\nx\r\n");
        assert_eq!(reply(&mut db, "GET k"), "$-1\r\n");
        assert_eq!(reply(&mut db, "SET k v"), "+OK\r\n");
        assert_eq!(reply(&mut db, "get k"), "$1\r\nv\r\n");
        assert_eq!(reply(&mut db, "EXISTS k k nope"), ":2\r\n");
        assert_eq!(reply(&mut db, "DBSIZE"), ":1\r\n");
        assert_eq!(reply(&mut db, "SET k2 v2"), "+OK\r\n");
        assert_eq!(
            reply(&mut db, "MGET k nope k2"),
            "*3\r\n$1\r\nv\r\n$-1\r\n$2\r\nv2\r\n"
        );
        assert_eq!(reply(&mut db, "DEL k k nope"), ":1\r\n");
        assert_eq!(reply(&mut db, "DBSIZE"), ":1\r\n");
        assert_eq!(reply(&mut db, "FLUSHALL"), "+OK\r\n");
        assert_eq!(reply(&mut db, "DBSIZE"), ":0\r\n");
        assert_eq!(reply(&mut db, "SELECT 0"), "+OK\r\n");
        assert_eq!(
            reply(&mut db, "SELECT 1"),
            "-ERR DB index is out of range\r\n"
        );
        assert_eq!(reply(&mut db, "CLIENT ID"), ":7\r\n");
        assert_eq!(reply(&mut db, "CLIENT SETNAME x"), "+OK\r\n");
        assert_eq!(reply(&mut db, "COMMAND DOCS"), "*0\r\n");
        assert_eq!(reply(&mut db, "COMMAND"), "*0\r\n");
        assert!(reply(&mut db, "HELLO 2").starts_with("*14\r\n$6\r\nserver\r\n"));
        assert_eq!(
            reply(&mut db, "HELLO 3"),
            "-NOPROTO unsupported protocol version\r\n"
        );
        assert!(reply(&mut db, "INFO").starts_with("$"));
    }

    #[test]
    fn writes_return_ops_and_do_not_change_the_map() {
        let db = Db::new();
        let mut out = Vec::new();
        let args: [&[u8]; 3] = [b"SET", b"a", b"1"];
        let outcome = db.execute(&args, Client::default(), &mut out);
        assert_eq!(
            outcome.op,
            Some(Op::Set {
                key: b"a".to_vec(),
                value: b"1".to_vec()
            })
        );
        assert!(db.is_empty());
        // Reads and no-op writes return no op.
        let mut db = Db::new();
        for cmd in ["GET a", "DEL a", "FLUSHALL", "EXISTS a", "PING"] {
            let args: Vec<&[u8]> = cmd.split(' ').map(str::as_bytes).collect();
            assert_eq!(
                db.execute(&args, Client::default(), &mut out).op,
                None,
                "{cmd}"
            );
        }
        db.apply(Op::Set {
            key: b"a".to_vec(),
            value: b"x".to_vec(),
        });
        let args: [&[u8]; 2] = [b"INCR", b"a"];
        assert_eq!(db.execute(&args, Client::default(), &mut out).op, None);
    }

    #[test]
    fn incr() {
        let mut db = Db::new();
        assert_eq!(reply(&mut db, "INCR n"), ":1\r\n");
        assert_eq!(reply(&mut db, "INCR n"), ":2\r\n");
        assert_eq!(reply(&mut db, "INCRBY n 10"), ":12\r\n");
        assert_eq!(reply(&mut db, "DECR n"), ":11\r\n");
        assert_eq!(reply(&mut db, "DECRBY n 20"), ":-9\r\n");
        assert_eq!(reply(&mut db, "GET n"), "$2\r\n-9\r\n");
        // INCR of a value that is not an integer is an error and changes nothing.
        reply(&mut db, "SET s hello");
        assert_eq!(
            reply(&mut db, "INCR s"),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(reply(&mut db, "GET s"), "$5\r\nhello\r\n");
        reply(&mut db, "SET s 007");
        assert_eq!(
            reply(&mut db, "INCR s"),
            "-ERR value is not an integer or out of range\r\n"
        );
        assert_eq!(
            reply(&mut db, "INCRBY n x"),
            "-ERR value is not an integer or out of range\r\n"
        );
        reply(&mut db, "SET m 9223372036854775807");
        assert_eq!(
            reply(&mut db, "INCR m"),
            "-ERR increment or decrement would overflow\r\n"
        );
    }

    #[test]
    fn set_options() {
        let mut db = Db::new();
        assert_eq!(reply(&mut db, "SET k v XX"), "$-1\r\n");
        assert_eq!(reply(&mut db, "SET k v NX"), "+OK\r\n");
        assert_eq!(reply(&mut db, "SET k w NX"), "$-1\r\n");
        assert_eq!(reply(&mut db, "SET k w xx"), "+OK\r\n");
        assert_eq!(reply(&mut db, "GET k"), "$1\r\nw\r\n");
        assert_eq!(reply(&mut db, "SET k v EX 10"), "-ERR syntax error\r\n");
        assert_eq!(reply(&mut db, "SET k v NX XX"), "-ERR syntax error\r\n");
    }

    #[test]
    fn errors() {
        let mut db = Db::new();
        assert_eq!(reply(&mut db, "FOO bar"), "-ERR unknown command 'FOO'\r\n");
        let args: [&[u8]; 1] = [b"BAD\r\nCMD\x00"];
        let mut out = Vec::new();
        db.execute(&args, Client::default(), &mut out);
        assert_eq!(out, b"-ERR unknown command 'BAD??CMD?'\r\n".to_vec());
        assert_eq!(
            reply(&mut db, "GET"),
            "-ERR wrong number of arguments for 'get' command\r\n"
        );
        assert_eq!(
            reply(&mut db, "SET k"),
            "-ERR wrong number of arguments for 'set' command\r\n"
        );
        assert_eq!(
            reply(&mut db, "DBSIZE x"),
            "-ERR wrong number of arguments for 'dbsize' command\r\n"
        );
    }

    #[test]
    fn config_get() {
        let mut db = Db::new();
        assert_eq!(
            reply(&mut db, "CONFIG GET save"),
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
        );
        assert_eq!(
            reply(&mut db, "config get appendonly"),
            "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n"
        );
        assert_eq!(reply(&mut db, "CONFIG GET nope"), "*0\r\n");
        assert_eq!(
            reply(&mut db, "CONFIG SET save x"),
            "-ERR CONFIG SET is not supported\r\n"
        );
    }

    #[test]
    fn quit_and_shutdown() {
        let mut db = Db::new();
        let (r, o) = run(&mut db, "QUIT");
        assert_eq!(r, "+OK\r\n");
        assert!(o.close);
        let (r, o) = run(&mut db, "SHUTDOWN");
        assert_eq!(r, "");
        assert!(o.shutdown);
    }
}
