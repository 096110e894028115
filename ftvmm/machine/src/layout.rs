//! The guest physical memory map, ports and vectors of the ftvm machine (docs/machine.md).

use vm_memory::GuestAddress;

/// Where the boot GDT lives.
pub const BOOT_GDT: GuestAddress = GuestAddress(0x1000);
/// Where the boot info block lives; `RDI` points here at entry.
pub const BOOT_INFO: GuestAddress = GuestAddress(0x2000);
/// Where the command line is copied (NUL-terminated).
pub const CMDLINE: GuestAddress = GuestAddress(0x3000);
/// Longest command line, without its NUL.
pub const CMDLINE_MAX_LEN: usize = 4095;
/// Top of the small boot stack.
pub const BOOT_STACK_TOP: u64 = 0x8000;
/// The PML4 of the identity page tables; the PDPT and four PDs follow page by page.
pub const PAGE_TABLES: GuestAddress = GuestAddress(0x9000);
/// First byte an ELF segment may occupy.
pub const IMAGE_MIN_ADDR: u64 = 0x10_0000;
/// Span identity-mapped by the boot page tables.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;

/// Smallest guest RAM size.
pub const MEM_MIN: u64 = 2 << 20;
/// Largest guest RAM size: RAM must end below the MMIO window.
pub const MEM_MAX: u64 = 3 << 30;

/// The platform MMIO page (clock, scratch).
pub const PLATFORM_MMIO: u64 = 0xD000_0000;
/// Size of one MMIO device page.
pub const MMIO_PAGE_SIZE: u64 = 0x1000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_1000;

/// COM1 base port (a 16550A UART, eight ports).
pub const COM1_PORT: u16 = 0x3F8;
/// Power port: a write ends the VM with `value & 0xFF`.
pub const POWER_PORT: u16 = 0x600;
/// Timer period port, in microseconds; 0 stops the timer.
pub const TIMER_PORT: u16 = 0x604;
/// Guest fault report port.
pub const FAULT_PORT: u16 = 0x608;
/// Scratch port: reads return the last value written.
pub const SCRATCH_PORT: u16 = 0x610;

/// Timer interrupt vector.
pub const TIMER_VECTOR: u8 = 32;
/// COM1 interrupt vector.
pub const COM1_VECTOR: u8 = 36;
/// Vector of virtio slot 0; slot n uses `VIRTIO_FIRST_VECTOR + n`.
pub const VIRTIO_FIRST_VECTOR: u8 = 40;

/// `BootInfo.magic`: the bytes `FTVMBOOT`.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
/// `BootInfo.version`: the version of this machine model.
pub const BOOT_INFO_VERSION: u32 = 1;
