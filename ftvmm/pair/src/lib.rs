//! The FT pair: what makes two replicas of a VM one fault-tolerant VM.
//!
//! - [`channel`]: the log channel from primary to backup, with the output rule (the
//!   primary's outputs wait for the backup's acknowledgement) and reconnection;
//! - [`golive`]: the one owner of the go-live decision when a peer is lost, through an
//!   [`arbiter`] (a local file or etcd);
//! - [`clone`]: cloning a running replica into a new backup;
//! - [`transport`]: mutual TLS (or plaintext) on the channels' connections;
//! - [`setup`]: starting a primary or a backup; [`view`]: what the control socket reads.
//!
//! The machine ([`ftvm_machine`]) knows none of this: the channel implements its
//! `PrimaryLink`/`BackupLink` traits and the clone source its `VcpuHook`.

pub mod arbiter;
pub mod channel;
pub mod clone;
pub mod fuzz;
pub mod golive;
pub mod setup;
pub mod transport;
pub mod view;
