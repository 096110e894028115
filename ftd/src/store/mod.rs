//! The coordination store behind the control plane: a key-value store with leases and
//! watches ([`Store`]) and a leader election ([`Election`]). etcd implements both in
//! production ([`etcd`]); an in-process implementation ([`memory`]) serves single-host
//! development and unit tests. One test suite (`suite`) runs against both.
//!
//! The leader writes only while it leads: its writes are [`Store::commit`]s fenced by its
//! leadership key ([`Fence`]), one transaction that compares the key's create revision
//! before it changes anything, so the late writes of a deposed leader fail
//! ([`StoreError::Fenced`]). [`Fenced`] gives them the shape of plain writes.

use async_trait::async_trait;
use std::time::Duration;
use tokio::sync::mpsc;

pub mod etcd;
pub mod health;
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
    /// A fenced write was refused: the leadership key is gone or is another's (another
    /// term), so this ftd no longer leads. Nothing was written.
    #[error("write refused: leadership key {key} is gone or another's (this ftd no longer leads)")]
    Fenced {
        /// The leadership key the write was fenced by.
        key: String,
    },
}

/// What a fenced write ([`Store::commit`]) requires: the leader's election key, still
/// there with the create revision it had when this leadership began. Once the key is gone
/// (lease ended, resigned) or was made again (another term), the comparison fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leadership key.
    pub key: String,
    /// Its create revision.
    pub revision: i64,
}

/// One write of a fenced transaction ([`Store::commit`]). The leader's keys carry no
/// lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Sets `key`.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
    },
    /// Creates `key`; the transaction does nothing if it exists.
    Create {
        /// The key.
        key: String,
        /// Its value.
        value: Vec<u8>,
    },
    /// Deletes `key` if it is there.
    Delete {
        /// The key.
        key: String,
    },
    /// Deletes `key`; the transaction does nothing if it is not there.
    DeleteExisting {
        /// The key.
        key: String,
    },
    /// Deletes every key starting with `prefix`.
    DeletePrefix {
        /// The prefix.
        prefix: String,
    },
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
    /// Applies `writes` in one transaction, only while `fence` holds: `Ok(true)` when
    /// they were applied; `Ok(false)` when the fence held but a write's own condition
    /// did not ([`Write::Create`] of a key that exists, [`Write::DeleteExisting`] of one
    /// that does not); [`StoreError::Fenced`] when the fence did not hold. Nothing is
    /// changed unless `Ok(true)`.
    async fn commit(&self, fence: &Fence, writes: &[Write]) -> Result<bool, StoreError>;
}

/// The writes of a leader: each one a [`Store::commit`] fenced by its leadership.
#[derive(Clone, Copy)]
pub struct Fenced<'a> {
    store: &'a dyn Store,
    fence: &'a Fence,
}

impl std::fmt::Debug for Fenced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fenced")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl<'a> Fenced<'a> {
    /// Writes to `store` while `fence` holds.
    pub fn new(store: &'a dyn Store, fence: &'a Fence) -> Self {
        Self { store, fence }
    }

    /// The fence.
    pub fn fence(&self) -> &'a Fence {
        self.fence
    }

    /// Sets `key`.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.commit(&[Write::Put {
            key: key.to_owned(),
            value,
        }])
        .await
        .map(drop)
    }

    /// Creates `key` if it does not exist; `true` if this call created it.
    pub async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool, StoreError> {
        self.commit(&[Write::Create {
            key: key.to_owned(),
            value,
        }])
        .await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.commit(&[Write::Delete {
            key: key.to_owned(),
        }])
        .await
        .map(drop)
    }

    /// Deletes `key`; `true` if it existed.
    pub async fn delete_existing(&self, key: &str) -> Result<bool, StoreError> {
        self.commit(&[Write::DeleteExisting {
            key: key.to_owned(),
        }])
        .await
    }

    /// Deletes every key starting with `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        self.commit(&[Write::DeletePrefix {
            prefix: prefix.to_owned(),
        }])
        .await
        .map(drop)
    }

    /// Applies `writes` at once (see [`Store::commit`]).
    pub async fn commit(&self, writes: &[Write]) -> Result<bool, StoreError> {
        self.store.commit(self.fence, writes).await
    }
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

impl Leadership {
    /// What the writes of this leadership are fenced by: its key and create revision.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key.clone(),
            revision: self.revision,
        }
    }
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
