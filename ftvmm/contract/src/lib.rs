//! What ftd and ftvmm agree on, written once: ftd builds a replica's command line with
//! [`flags::RunArgs`] and ftvmm parses it with the same type; ftvmm writes its control
//! socket's `status` line as a [`status::ReplicaStatus`] and ftd parses it back; the exit
//! statuses ([`exit`]), the go-live claim key and claimant names ([`claims`]) and guest
//! memory sizes ([`size`]) are defined here for both. docs/contract.md describes the
//! contract for people.

#![deny(missing_docs)]

pub mod claims;
pub mod control;
pub mod exit;
pub mod flags;
pub mod fuzz;
pub mod manual;
pub mod size;
pub mod status;
