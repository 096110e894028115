//! The pure logic of the ftvm `kv` guest, kept apart from the guest so that it can be
//! tested on the host (`cargo test --manifest-path guest/kvcore/Cargo.toml`, run from
//! outside `guest/`):
//!
//! - [`resp`]: parsing client commands (multibulk and inline, pipelined, split across
//!   reads) and encoding replies;
//! - [`db`]: the map and the command executor, which returns a write's change as an
//!   [`db::Op`] to log before applying it;
//! - [`log`]: the append-only log record format, replay with torn-tail detection, and
//!   the sector-aligned group-commit writer.
//!
//! `no_std` with `alloc`, no dependencies, no `unsafe`.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod db;
pub mod log;
pub mod resp;
