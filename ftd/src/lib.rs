//! ftd, the ftvm host daemon. One runs on every host: it registers the host in etcd under
//! a lease, campaigns for leadership, and supervises the ftvmm processes (replicas) that the
//! leader assigns to its host. The leader reconciles the desired state (VM specs) with
//! reality: it places replicas (never both of a pair on one host), records each VM's
//! protection status and failovers, and keeps the event log.
//!
//! Layers, outermost first: [`grpc`] (tonic; validates, converts, delegates),
//! [`cluster`] (the domain API), [`reconcile`] (the leader's loop), [`supervisor`] (this
//! host's replicas), [`store`] (etcd or in-memory behind traits). Only [`grpc`] knows
//! about tonic and the generated types. See docs/control-plane.md.

pub mod cluster;
pub mod config;
pub mod daemon;
pub mod events;
pub mod files;
pub mod fuzz;
pub mod grpc;
pub mod images;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod placement;
pub mod reconcile;
pub mod records;
pub mod replica_control;
pub mod store;
pub mod supervisor;

/// An error and its causes on one line, `a: b: c` (a cause already in the text is left
/// out: some errors repeat their source).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
