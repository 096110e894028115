//! The public gRPC API of the ftvm control plane: package `ft.v1` from
//! `proto/ft/v1/ftvm.proto`, with the tonic client and server it generates.
//!
//! `FtControl` is what `ftctl` (and any other client) calls on any `ftd`; `FtAgent` is the
//! host-local part one `ftd` calls on another (the leader asks the ftd of a host to stop a
//! replica it supervises). Callers import the message types with a `Pb` prefix so that
//! they never mix with the domain types of the same name.

/// Package `ft.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("ft.v1");
}
