//! Parsing of memory sizes such as `64M`.

use crate::layout::{MEM_MAX, MEM_MIN};

/// A memory size given on the command line is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional K, M or G suffix.
    #[error("'{0}' is not a size (examples: 64M, 1G, 131072K)")]
    Syntax(String),
    /// Outside what the machine supports.
    #[error(
        "{0} bytes is outside the supported guest memory range {MEM_MIN}..={MEM_MAX} (2M..3G)"
    )]
    OutOfRange(u64),
    /// Not a whole number of pages.
    #[error("{0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
}

/// Parses a guest memory size: digits with an optional `K`, `M` or `G` suffix (binary units).
pub fn parse_mem_size(text: &str) -> Result<u64, SizeError> {
    let syntax = || SizeError::Syntax(text.to_owned());
    let (digits, shift) = match text.trim().as_bytes().last() {
        Some(b'K' | b'k') => (&text.trim()[..text.trim().len() - 1], 10),
        Some(b'M' | b'm') => (&text.trim()[..text.trim().len() - 1], 20),
        Some(b'G' | b'g') => (&text.trim()[..text.trim().len() - 1], 30),
        Some(_) => (text.trim(), 0),
        None => return Err(syntax()),
    };
    let number: u64 = digits.parse().map_err(|_| syntax())?;
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or(SizeError::OutOfRange(u64::MAX))?;
    if !(MEM_MIN..=MEM_MAX).contains(&bytes) {
        return Err(SizeError::OutOfRange(bytes));
    }
    if bytes % 4096 != 0 {
        return Err(SizeError::Unaligned(bytes));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_mem_size("64M"), Ok(64 << 20));
        assert_eq!(parse_mem_size("1g"), Ok(1 << 30));
        assert_eq!(parse_mem_size("4096K"), Ok(4 << 20));
        assert_eq!(parse_mem_size("2097152"), Ok(2 << 20));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(parse_mem_size(""), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_mem_size("lots"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_mem_size("-1M"), Err(SizeError::Syntax(_))));
        assert_eq!(parse_mem_size("1M"), Err(SizeError::OutOfRange(1 << 20)));
        assert_eq!(parse_mem_size("4G"), Err(SizeError::OutOfRange(4 << 30)));
        assert!(matches!(
            parse_mem_size("99999999999999999G"),
            Err(SizeError::OutOfRange(_))
        ));
        assert_eq!(
            parse_mem_size("2097153"),
            Err(SizeError::Unaligned(2097153))
        );
    }
}
