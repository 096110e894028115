//! The coordination store behind the control plane: a key-value store with leases and
//! watches ([`Store`]) and a leader election ([`Election`]). etcd implements both in
//! production ([`etcd`]); an in-process implementation ([`memory`]) serves single-host
//! development and unit tests. One test suite (`suite`) runs against both.

use async_trait::async_trait;
use std::time::Duration;
use tokio::sync::mpsc;

pub mod etcd;
pub mod memory;
#[cfg(test)]
mod suite;

/// A lease id (etcd's). Keys put with a lease are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// A stored key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The lease it is attached to (0 for none).
    pub lease: LeaseId,
    /// Store revision at which the key was created.
    pub create_revision: i64,
    /// Store revision of its last change.
    pub mod_revision: i64,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or changed.
    Put(KeyValue),
    /// A key was deleted (or its lease expired).
    Delete(String),
}

/// The receiving end of a watch; dropping it cancels the watch.
#[derive(Debug)]
pub struct Watch {
    events: mpsc::UnboundedReceiver<WatchEvent>,
}

impl Watch {
    /// Wraps a channel fed by a store implementation.
    pub fn new(events: mpsc::UnboundedReceiver<WatchEvent>) -> Self {
        Self { events }
    }

    /// The next change, or `None` once the watch has ended (the store went away or the
    /// connection broke: the caller re-reads and watches again).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }
}

/// An operation on the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Connecting to etcd failed.
    #[error("cannot connect to etcd at {endpoints}")]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request failed.
    #[error("etcd {operation} failed")]
    Etcd {
        /// Which request.
        operation: &'static str,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The lease expired or was never granted.
    #[error("lease {0:x} expired or is unknown")]
    LeaseExpired(LeaseId),
    /// A key or value is not UTF-8 where text is required.
    #[error("key is not UTF-8")]
    NotUtf8,
}

/// A key-value store with leases, compare-and-create and prefix watches (etcd's model).
#[async_trait]
pub trait Store: Send + Sync {
    /// The value at `key`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Sets `key`, attached to `lease` if given.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError>;
    /// Creates `key` only if it does not exist; `true` if this call created it.
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError>;
    /// Replaces `key` only if its last change was at `mod_revision`; `true` if replaced.
    async fn put_if_unchanged(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
    ) -> Result<bool, StoreError>;
    /// Deletes `key`; `true` if it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Deletes every key starting with `prefix`; how many there were.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError>;
    /// Every key starting with `prefix`, sorted by key.
    async fn list_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;
    /// Changes to keys starting with `prefix` from now on.
    async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError>;
    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Refreshes `lease`; [`StoreError::LeaseExpired`] if it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Ends `lease` now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
}

/// Proof of leadership returned by [`Election::campaign`]: the candidate's key, which
/// exists as long as the leadership does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election name.
    pub name: String,
    /// The candidate key (deleting it ends the leadership).
    pub key: String,
    /// Its create revision.
    pub revision: i64,
    /// The lease it is attached to.
    pub lease: LeaseId,
}

/// The current leader of an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's candidate key (compare with [`Leadership::key`]).
    pub key: String,
    /// The value the leader published.
    pub value: Vec<u8>,
}

/// A leader election among candidates holding leases (etcd's v3election model): the
/// candidate whose key was created first leads until its key goes (resign or lease end).
#[async_trait]
pub trait Election: Send + Sync {
    /// Waits until this candidate (identified by `lease`) leads, publishing `value`.
    async fn campaign(&self, value: Vec<u8>, lease: LeaseId) -> Result<Leadership, StoreError>;
    /// The current leader, if any.
    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError>;
    /// Gives up leadership.
    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError>;
}
