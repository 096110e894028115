//! Boot info (`docs/machine.md`, "Boot info") and the command line.

use crate::platform::power_off;
use crate::{println, EXIT_BAD_BOOT_INFO, EXIT_BAD_CMDLINE};

/// `BootInfo::magic`: the bytes `FTVMBOOT`.
pub const BOOT_MAGIC: u64 = 0x544F_4F42_4D56_5446;
/// The machine-model version these guests are written for.
pub const BOOT_VERSION: u32 = 1;
/// End of the low memory the VMM fills (boot GDT, boot info, command line, page
/// tables); the guest image starts here.
pub const LOW_MEM_END: u64 = 0x10_0000;
/// Longest command line the VMM passes (bytes, without the NUL).
pub const CMDLINE_MAX: u64 = 4095;

/// The boot info block the VMM writes at `0x2000` (little-endian, `repr(C)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// RAM size in bytes; RAM is `[0, mem_size)`.
    pub mem_size: u64,
    /// Guest-physical address of the command line (`0x3000`).
    pub cmdline_addr: u64,
    /// Command-line length in bytes, without the terminating NUL.
    pub cmdline_len: u64,
    /// Guest-physical address of the platform MMIO page (`0xD000_0000`).
    pub platform_mmio: u64,
    /// Guest-physical address of virtio-mmio slot 0 (`0xD000_1000`).
    pub virtio_mmio_base: u64,
    /// Number of virtio-mmio devices present, slot 0 first.
    pub virtio_mmio_count: u32,
    /// Interrupt vector of virtio slot 0; slot `n` uses `+ n`.
    pub virtio_first_vector: u32,
}

/// What the runtime hands to a guest's main function.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// A copy of the boot info, checked for magic and version.
    pub info: BootInfo,
    /// The command line.
    pub cmdline: Cmdline,
}

/// Why the boot info was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// The boot info address in `RDI` is null, unaligned or not in low memory.
    BadAddress(u64),
    /// `magic` is not [`BOOT_MAGIC`].
    BadMagic(u64),
    /// `version` is not [`BOOT_VERSION`].
    BadVersion(u32),
    /// The command line lies outside RAM, is too long, or is not UTF-8.
    BadCmdline,
}

/// Reads and checks the boot info at `addr` (the `RDI` the VMM entered with).
pub fn read_boot(addr: u64) -> Result<Boot, BootError> {
    let size = core::mem::size_of::<BootInfo>() as u64;
    // The VMM puts it at 0x2000; anything in the first MiB, 8-aligned, is accepted.
    if addr == 0
        || !addr.is_multiple_of(8)
        || addr.checked_add(size).is_none_or(|end| end > LOW_MEM_END)
    {
        return Err(BootError::BadAddress(addr));
    }
    // SAFETY: the address is non-null, aligned and in the identity-mapped low MiB,
    // which is RAM the guest image does not use (it is loaded at 1 MiB and up).
    // `read_volatile` copies the bytes without assuming anything else about them, and
    // every bit pattern is a valid `BootInfo`.
    let info = unsafe { core::ptr::read_volatile(addr as *const BootInfo) };
    if info.magic != BOOT_MAGIC {
        return Err(BootError::BadMagic(info.magic));
    }
    if info.version != BOOT_VERSION {
        return Err(BootError::BadVersion(info.version));
    }
    let cmdline = Cmdline::from_boot_info(&info).ok_or(BootError::BadCmdline)?;
    Ok(Boot { info, cmdline })
}

/// Implementation of [`crate::entry!`]: checks the boot info, runs `main` and powers
/// off with its result. Powers off with [`EXIT_BAD_BOOT_INFO`] if the boot info is bad.
pub fn run(boot_info_addr: u64, main: fn(&Boot) -> u8) -> ! {
    match read_boot(boot_info_addr) {
        Ok(boot) => power_off(main(&boot)),
        Err(e) => {
            println!("bad boot info at {:#x}: {:?}", boot_info_addr, e);
            power_off(EXIT_BAD_BOOT_INFO)
        }
    }
}

/// The command line: words separated by ASCII whitespace, usually `key=value`.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline {
    text: &'static str,
}

impl Cmdline {
    /// A command line over `text` (for tests and for guests that build their own).
    pub const fn new(text: &'static str) -> Self {
        Cmdline { text }
    }

    /// The command line the boot info points at, if it lies inside RAM below
    /// [`LOW_MEM_END`], is at most [`CMDLINE_MAX`] bytes and is UTF-8.
    fn from_boot_info(info: &BootInfo) -> Option<Self> {
        let end = info.cmdline_addr.checked_add(info.cmdline_len)?;
        if info.cmdline_len > CMDLINE_MAX
            || info.cmdline_addr == 0
            || end > info.mem_size
            || end > LOW_MEM_END
        {
            return None;
        }
        let len = usize::try_from(info.cmdline_len).ok()?;
        // SAFETY: the bytes lie in RAM below 1 MiB (checked above), identity-mapped. The
        // VMM wrote them before boot and nothing in the guest writes there (the image,
        // its stacks and its data are above 1 MiB), so a shared 'static slice is sound.
        let bytes = unsafe { core::slice::from_raw_parts(info.cmdline_addr as *const u8, len) };
        core::str::from_utf8(bytes).ok().map(Cmdline::new)
    }

    /// The whole command line.
    pub fn as_str(&self) -> &'static str {
        self.text
    }

    /// The whitespace-separated words.
    pub fn words(&self) -> impl Iterator<Item = &'static str> {
        self.text.split_ascii_whitespace()
    }

    /// The `key=value` words, split at the first `=`; other words are skipped.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        self.words().filter_map(|w| w.split_once('='))
    }

    /// The value of `key`; the last occurrence wins.
    pub fn get(&self, key: &str) -> Option<&'static str> {
        self.pairs()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
    }

    /// The value of `key` as a decimal number of type `T`, or `default` if absent.
    /// Prints a message and powers off with [`EXIT_BAD_CMDLINE`] if the value is not a
    /// decimal number or does not fit `T`.
    pub fn get_num<T: TryFrom<u64>>(&self, key: &str, default: T) -> T {
        match self.get(key) {
            None => default,
            Some(v) => match parse_u64(v).and_then(|n| T::try_from(n).ok()) {
                Some(n) => n,
                None => usage_error(format_args!("bad value for {}: {:?}", key, v)),
            },
        }
    }
}

/// Parses a decimal `u64` (digits only, no sign, no overflow).
pub fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.bytes().try_fold(0u64, |acc, b| {
        let digit = match b {
            b'0'..=b'9' => u64::from(b - b'0'),
            _ => return None,
        };
        acc.checked_mul(10)?.checked_add(digit)
    })
}

/// Prints `msg` and powers off with [`EXIT_BAD_CMDLINE`].
pub fn usage_error(msg: core::fmt::Arguments<'_>) -> ! {
    println!("usage error: {}", msg);
    power_off(EXIT_BAD_CMDLINE)
}
