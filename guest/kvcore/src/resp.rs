//! RESP (the Redis serialization protocol, version 2): parsing client commands and
//! encoding replies.
//!
//! A client sends either a *multibulk* command (`*<n>\r\n` then `n` bulk strings
//! `$<len>\r\n<bytes>\r\n`), which is what `redis-cli` and `redis-benchmark` send, or
//! an *inline* command (one line of words separated by spaces or tabs, ended by `\n`
//! or `\r\n`), which `redis-benchmark`'s `PING_INLINE` test and `telnet` users send.
//!
//! [`parse_command`] looks at the front of a connection's input buffer and either
//! finds one complete command, asks for more bytes, or rejects the input. It never
//! copies: the arguments are byte ranges into the buffer. Pipelining falls out of
//! this: call it again on the rest of the buffer.

use alloc::vec::Vec;
use core::ops::Range;

/// Longest bulk string accepted (a key or a value), in bytes.
pub const MAX_BULK: usize = 512 * 1024;
/// Longest inline command line accepted, in bytes.
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments accepted in one command (the command name included).
pub const MAX_ARGS: usize = 4096;
/// Largest encoded command accepted, in bytes. A connection whose buffered,
/// still incomplete command is larger than this is rejected: so one connection never
/// buffers more than this much input.
pub const MAX_COMMAND: usize = MAX_BULK + 64 * 1024;
/// Longest `*<n>` or `$<len>` header line (without `\r\n`) accepted.
const MAX_HEADER_LINE: usize = 20;

/// Why input was rejected. The connection it came from should be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A `*` or `$` header is not a decimal number, or a line does not end in `\r\n`.
    BadHeader,
    /// A bulk string is not followed by `\r\n`.
    BadBulkEnd,
    /// Something other than `$` where a bulk string should start.
    ExpectedBulk,
    /// A bulk string is longer than [`MAX_BULK`] or negative.
    BulkTooLong,
    /// More than [`MAX_ARGS`] arguments.
    TooManyArgs,
    /// An inline line longer than [`MAX_INLINE`], or a command longer than
    /// [`MAX_COMMAND`].
    TooLarge,
}

impl ProtoError {
    /// The text for the `-ERR Protocol error: ...` reply sent before closing.
    pub fn message(self) -> &'static str {
        match self {
            ProtoError::BadHeader => "invalid multibulk or bulk length",
            ProtoError::BadBulkEnd => "expected CRLF after bulk string",
            ProtoError::ExpectedBulk => "expected '$'",
            ProtoError::BulkTooLong => "invalid bulk length",
            ProtoError::TooManyArgs => "invalid multibulk length",
            ProtoError::TooLarge => "too big request",
        }
    }
}

/// Parses one command from the front of `buf`.
///
/// Returns `Ok(Some(n))` when the first `n` bytes of `buf` hold a complete command;
/// `args` then holds the ranges of its arguments in `buf` (the command name first). A
/// command with no arguments (an empty inline line, `*0\r\n`, `*-1\r\n`) gives
/// `Ok(Some(n))` with `args` empty: skip it. Returns `Ok(None)` when more bytes are
/// needed, and `Err` when the input can never become a valid command.
pub fn parse_command(
    buf: &[u8],
    args: &mut Vec<Range<usize>>,
) -> Result<Option<usize>, ProtoError> {
    args.clear();
    let result = match buf.first() {
        None => return Ok(None),
        Some(b'*') => parse_multibulk(buf, args),
        Some(_) => parse_inline(buf, args),
    };
    match result {
        Ok(None) if buf.len() > MAX_COMMAND => Err(ProtoError::TooLarge),
        other => other,
    }
}

/// Finds the `\r\n` ending the header line that starts at `start` and parses the
/// signed decimal number between `start + 1` (after the type byte) and it. Returns the
/// number and the index just past `\n`, `Ok(None)` if the line is incomplete.
fn header_number(buf: &[u8], start: usize) -> Result<Option<(i64, usize)>, ProtoError> {
    let digits_start = start + 1;
    let limit = buf.len().min(digits_start + MAX_HEADER_LINE + 1);
    let Some(cr) = buf[digits_start..limit].iter().position(|&b| b == b'\r') else {
        if buf.len() > digits_start + MAX_HEADER_LINE {
            return Err(ProtoError::BadHeader);
        }
        return Ok(None);
    };
    let cr = digits_start + cr;
    match buf.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProtoError::BadHeader),
    }
    let n = parse_i64(&buf[digits_start..cr]).ok_or(ProtoError::BadHeader)?;
    Ok(Some((n, cr + 2)))
}

fn parse_multibulk(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtoError> {
    let Some((count, mut pos)) = header_number(buf, 0)? else {
        return Ok(None);
    };
    if count <= 0 {
        // `*0` and `*-1` are empty commands; Redis skips them too.
        return Ok(Some(pos));
    }
    if count > MAX_ARGS as i64 {
        return Err(ProtoError::TooManyArgs);
    }
    for _ in 0..count {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(_) => return Err(ProtoError::ExpectedBulk),
        }
        let Some((len, data)) = header_number(buf, pos)? else {
            return Ok(None);
        };
        if !(0..=MAX_BULK as i64).contains(&len) {
            return Err(ProtoError::BulkTooLong);
        }
        let end = data + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtoError::BadBulkEnd);
        }
        args.push(data..end);
        pos = end + 2;
    }
    Ok(Some(pos))
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Result<Option<usize>, ProtoError> {
    let limit = buf.len().min(MAX_INLINE + 2);
    let Some(nl) = buf[..limit].iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtoError::TooLarge);
        }
        return Ok(None);
    };
    let mut end = nl;
    if end > 0 && buf[end - 1] == b'\r' {
        end -= 1;
    }
    let mut i = 0;
    while i < end {
        while i < end && is_space(buf[i]) {
            i += 1;
        }
        let start = i;
        while i < end && !is_space(buf[i]) {
            i += 1;
        }
        if i > start {
            if args.len() == MAX_ARGS {
                return Err(ProtoError::TooManyArgs);
            }
            args.push(start..i);
        }
    }
    Ok(Some(nl + 1))
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// Parses a signed decimal integer the way Redis does for values (`string2ll`): an
/// optional `-`, digits, no `+`, no spaces, no leading zeros (except `0` itself), no
/// `-0`, and no overflow.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    if digits[0] == b'0' && (digits.len() > 1 || neg) {
        return None;
    }
    // Accumulate negatively so that i64::MIN parses.
    let mut acc: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        acc = acc.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if neg {
        Some(acc)
    } else {
        acc.checked_neg()
    }
}

/// Appends the decimal form of `n`.
pub fn push_i64(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends a simple string reply: `+<s>\r\n`. `s` must not hold `\r` or `\n`.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an error reply: `-<msg>\r\n` (msg usually starts with `ERR `). `msg` must
/// not hold `\r` or `\n`.
pub fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an integer reply: `:<n>\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    push_i64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string reply: `$<len>\r\n<bytes>\r\n`.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    push_i64(out, bytes.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends the null bulk string reply: `$-1\r\n`.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Appends an array header: `*<n>\r\n`; the `n` elements follow.
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_i64(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A parsed command: its arguments.
    type Command = Vec<Vec<u8>>;

    fn parse_all(buf: &[u8]) -> Result<(Vec<Command>, usize), ProtoError> {
        let mut cmds = Vec::new();
        let mut pos = 0;
        let mut args = Vec::new();
        while let Some(n) = parse_command(&buf[pos..], &mut args)? {
            let base = pos;
            cmds.push(
                args.iter()
                    .map(|r| buf[base + r.start..base + r.end].to_vec())
                    .collect(),
            );
            pos += n;
        }
        Ok((cmds, pos))
    }

    fn words(ws: &[&str]) -> Vec<Vec<u8>> {
        ws.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multibulk() {
        let (cmds, used) = parse_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n").unwrap();
        assert_eq!(cmds, vec![words(&["SET", "k", "hello"])]);
        assert_eq!(used, 31);
    }

    #[test]
    fn binary_safe_bulk() {
        let (cmds, _) = parse_all(b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n").unwrap();
        assert_eq!(cmds, vec![vec![b"GET".to_vec(), b"a\r\nb".to_vec()]]);
    }

    #[test]
    fn inline() {
        let (cmds, used) = parse_all(b"PING\r\nset  a\tb\n\r\nGET a\r\n").unwrap();
        assert_eq!(
            cmds,
            vec![
                words(&["PING"]),
                words(&["set", "a", "b"]),
                vec![],
                words(&["GET", "a"])
            ]
        );
        assert_eq!(used, 24);
    }

    #[test]
    fn pipelined_in_one_segment() {
        let mut buf = Vec::new();
        for _ in 0..16 {
            buf.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$3\r\nxxx\r\n");
        }
        buf.extend_from_slice(
            b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n",
        );
        let (cmds, used) = parse_all(&buf).unwrap();
        assert_eq!(cmds.len(), 18);
        assert_eq!(used, buf.len());
        assert_eq!(cmds[16], words(&["PING"]));
        assert_eq!(cmds[17], words(&["GET", "key:__rand_int__"]));
    }

    #[test]
    fn split_across_reads_at_every_byte() {
        let full: &[u8] =
            b"*2\r\n$4\r\nECHO\r\n$10\r\n0123456789\r\nPING\r\n*1\r\n$6\r\nDBSIZE\r\n";
        let (want, _) = parse_all(full).unwrap();
        assert_eq!(want.len(), 3);
        // Feed the bytes in two pieces, split at every position, the way a connection
        // buffer fills up: parse what is complete, keep the rest.
        for split in 0..=full.len() {
            let mut buf = Vec::new();
            let mut got = Vec::new();
            for piece in [&full[..split], &full[split..]] {
                buf.extend_from_slice(piece);
                let (cmds, used) = parse_all(&buf).unwrap();
                got.extend(cmds);
                buf.drain(..used);
            }
            assert_eq!(got, want, "split at {split}");
            assert!(buf.is_empty());
        }
        // And one byte at a time.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for &b in full {
            buf.push(b);
            let (cmds, used) = parse_all(&buf).unwrap();
            got.extend(cmds);
            buf.drain(..used);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn incomplete_needs_more() {
        let mut args = Vec::new();
        for partial in [
            &b"*"[..],
            b"*2",
            b"*2\r",
            b"*2\r\n",
            b"*2\r\n$3",
            b"*2\r\n$3\r\nGET",
            b"*2\r\n$3\r\nGET\r",
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r",
            b"PING",
            b"PING\r",
        ] {
            assert_eq!(parse_command(partial, &mut args), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn empty_commands_are_skipped() {
        let mut args = Vec::new();
        assert_eq!(parse_command(b"*0\r\n", &mut args), Ok(Some(4)));
        assert!(args.is_empty());
        assert_eq!(parse_command(b"*-1\r\n", &mut args), Ok(Some(5)));
        assert_eq!(parse_command(b"\r\n", &mut args), Ok(Some(2)));
        assert!(args.is_empty());
    }

    #[test]
    fn malformed_input_is_rejected() {
        let mut args = Vec::new();
        let cases: &[(&[u8], ProtoError)] = &[
            (b"*x\r\n", ProtoError::BadHeader),
            (b"*1x\r\n", ProtoError::BadHeader),
            (b"*1\rX", ProtoError::BadHeader),
            (b"*+1\r\n", ProtoError::BadHeader),
            (b"*\r\n", ProtoError::BadHeader),
            (b"*99999999999999999999999\r\n", ProtoError::BadHeader),
            (b"*1\r\n:1\r\n", ProtoError::ExpectedBulk),
            (b"*1\r\nPING\r\n", ProtoError::ExpectedBulk),
            (b"*1\r\n$-1\r\n", ProtoError::BulkTooLong),
            (b"*1\r\n$99999999\r\n", ProtoError::BulkTooLong),
            (b"*1\r\n$4\r\nPINGxx", ProtoError::BadBulkEnd),
            (b"*1\r\n$1\r\nab\r\n", ProtoError::BadBulkEnd),
            (b"*100000\r\n", ProtoError::TooManyArgs),
        ];
        for (input, want) in cases {
            assert_eq!(parse_command(input, &mut args), Err(*want), "{input:?}");
        }
        // A header that never ends.
        assert_eq!(
            parse_command(b"*111111111111111111111111111111", &mut args),
            Err(ProtoError::BadHeader)
        );
        // An inline line that never ends.
        let long = vec![b'a'; MAX_INLINE + 1];
        assert_eq!(parse_command(&long, &mut args), Err(ProtoError::TooLarge));
        // A command that would not fit the connection buffer.
        let mut big = Vec::new();
        big.extend_from_slice(b"*3\r\n");
        for _ in 0..2 {
            big.extend_from_slice(b"$524288\r\n");
            big.extend_from_slice(&vec![b'v'; MAX_BULK]);
            big.extend_from_slice(b"\r\n");
        }
        assert_eq!(parse_command(&big, &mut args), Err(ProtoError::TooLarge));
    }

    #[test]
    fn integers() {
        for (s, want) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("42", Some(42)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-0", None),
            ("01", None),
            ("+1", None),
            (" 1", None),
            ("1 ", None),
            ("", None),
            ("-", None),
            ("1.5", None),
            ("abc", None),
        ] {
            assert_eq!(parse_i64(s.as_bytes()), want, "{s:?}");
        }
        let mut out = Vec::new();
        for n in [0, 7, -7, 1234567890, i64::MAX, i64::MIN] {
            out.clear();
            push_i64(&mut out, n);
            assert_eq!(parse_i64(&out), Some(n));
        }
    }

    #[test]
    fn encoders() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR x");
        integer(&mut out, -3);
        bulk(&mut out, b"hi");
        bulk(&mut out, b"");
        null(&mut out);
        array(&mut out, 2);
        assert_eq!(
            out,
            b"+OK\r\n-ERR x\r\n:-3\r\n$2\r\nhi\r\n$0\r\n\r\n$-1\r\n*2\r\n".to_vec()
        );
    }
}
