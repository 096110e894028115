//! Guest memory sizes such as `64M`: what `ftctl create --mem`, ftd and `ftvmm run --mem`
//! accept.

/// The smallest guest RAM the machine supports.
pub const MEM_MIN: u64 = 2 << 20;
/// The largest guest RAM the machine supports (it must fit below the MMIO hole).
pub const MEM_MAX: u64 = 3 << 30;

/// A memory size is not usable.
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

/// Parses a size: digits with an optional `K`, `M` or `G` suffix (binary units).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let syntax = || SizeError::Syntax(text.chars().take(40).collect());
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.as_bytes().last() {
        Some(b'K' | b'k') => (&trimmed[..trimmed.len() - 1], 10),
        Some(b'M' | b'm') => (&trimmed[..trimmed.len() - 1], 20),
        Some(b'G' | b'g') => (&trimmed[..trimmed.len() - 1], 30),
        Some(_) => (trimmed, 0),
        None => return Err(syntax()),
    };
    let number: u64 = digits.parse().map_err(|_| syntax())?;
    number
        .checked_mul(1 << shift)
        .ok_or(SizeError::OutOfRange(u64::MAX))
}

/// Parses a guest memory size and checks that the machine supports it.
pub fn parse_mem_size(text: &str) -> Result<u64, SizeError> {
    check_mem_size(parse_size(text)?)
}

/// Checks that the machine supports `bytes` of guest memory.
pub fn check_mem_size(bytes: u64) -> Result<u64, SizeError> {
    if !(MEM_MIN..=MEM_MAX).contains(&bytes) {
        return Err(SizeError::OutOfRange(bytes));
    }
    if !bytes.is_multiple_of(4096) {
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
        assert_eq!(parse_size("8G"), Ok(8 << 30));
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
