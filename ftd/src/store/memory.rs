//! The in-process [`Store`] and [`Election`]: etcd's semantics (revisions, leases,
//! create-if-absent, prefix watches, first-created-key-leads elections) in a map, for a
//! single-host ftd (`--etcd memory`) and for tests. Leases expire on a background task.

use super::{
    Election, Fence, KeyValue, LeaderInfo, Leadership, LeaseId, Store, StoreError, Watch,
    WatchEvent, Write,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug)]
struct Entry {
    value: Vec<u8>,
    lease: LeaseId,
    create_revision: i64,
    mod_revision: i64,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    revision: i64,
    next_lease: LeaseId,
    kvs: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
    reaper_started: bool,
}

impl Inner {
    fn notify(&mut self, event: &WatchEvent) {
        let key = match event {
            WatchEvent::Put(kv) => kv.key.as_str(),
            WatchEvent::Delete(key) => key.as_str(),
        };
        self.watchers.retain(|(prefix, sender)| {
            !key.starts_with(prefix.as_str()) || sender.send(event.clone()).is_ok()
        });
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: LeaseId) {
        self.revision += 1;
        let revision = self.revision;
        let create_revision = self
            .kvs
            .get(key)
            .map_or(revision, |entry| entry.create_revision);
        self.kvs.insert(
            key.to_owned(),
            Entry {
                value: value.clone(),
                lease,
                create_revision,
                mod_revision: revision,
            },
        );
        self.notify(&WatchEvent::Put(KeyValue {
            key: key.to_owned(),
            value,
            lease,
            create_revision,
            mod_revision: revision,
        }));
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.kvs.remove(key).is_some() {
            self.revision += 1;
            self.notify(&WatchEvent::Delete(key.to_owned()));
            true
        } else {
            false
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<LeaseId, StoreError> {
        match lease {
            None | Some(0) => Ok(0),
            Some(id) if self.leases.contains_key(&id) => Ok(id),
            Some(id) => Err(StoreError::LeaseExpired(id)),
        }
    }

    fn end_lease(&mut self, id: LeaseId) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, entry)| entry.lease == id)
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            self.delete(&key);
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.end_lease(id);
        }
    }
}

fn to_kv(key: &str, entry: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: entry.value.clone(),
        lease: entry.lease,
        create_revision: entry.create_revision,
        mod_revision: entry.mod_revision,
    }
}

/// The in-process store. Clones share the same data.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every mutation is a
        // single insert/remove), so a poisoned lock is still usable.
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.expire(Instant::now());
        inner
    }

    /// Expires leases in the background so that watchers see lease ends without waiting
    /// for the next call. Runs while any clone of the store lives.
    fn start_reaper(&self) {
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Some(inner) = weak.upgrade() else { break };
                inner
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .expire(Instant::now());
            }
        });
    }
}

#[async_trait]
impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).map(|entry| to_kv(key, entry)))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let lease = inner.check_lease(lease)?;
        inner.put(key, value, lease);
        Ok(())
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let lease = inner.check_lease(lease)?;
        if inner.kvs.contains_key(key) {
            return Ok(false);
        }
        inner.put(key, value, lease);
        Ok(true)
    }

    async fn put_if_unchanged(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let current = inner.kvs.get(key).map_or(0, |entry| entry.mod_revision);
        if current != mod_revision {
            return Ok(false);
        }
        let lease = inner.kvs.get(key).map_or(0, |entry| entry.lease);
        inner.put(key, value, lease);
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.lock().delete(key))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            inner.delete(key);
        }
        Ok(keys.len() as u64)
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        Ok(self
            .lock()
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, entry)| to_kv(key, entry))
            .collect())
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lock().watchers.push((prefix.to_owned(), sender));
        Ok(Watch::new(receiver))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let start_reaper = {
            let mut inner = self.lock();
            inner.next_lease += 1;
            let id = inner.next_lease;
            inner.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            let first = !inner.reaper_started;
            inner.reaper_started = true;
            (id, first)
        };
        if start_reaper.1 {
            self.start_reaper();
        }
        Ok(start_reaper.0)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let entry = inner
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseExpired(lease))?;
        entry.deadline = Instant::now() + entry.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.leases.contains_key(&lease) {
            return Err(StoreError::LeaseExpired(lease));
        }
        inner.end_lease(lease);
        Ok(())
    }

    async fn commit(&self, fence: &Fence, writes: &[Write]) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let fenced = inner
            .kvs
            .get(&fence.key)
            .is_some_and(|entry| entry.create_revision == fence.revision);
        if !fenced {
            return Err(StoreError::Fenced {
                key: fence.key.clone(),
            });
        }
        let conditions_hold = writes.iter().all(|write| match write {
            Write::Create { key, .. } => !inner.kvs.contains_key(key),
            Write::DeleteExisting { key } => inner.kvs.contains_key(key),
            Write::Put { .. } | Write::Delete { .. } | Write::DeletePrefix { .. } => true,
        });
        if !conditions_hold {
            return Ok(false);
        }
        for write in writes {
            match write {
                Write::Put { key, value } | Write::Create { key, value } => {
                    inner.put(key, value.clone(), 0);
                }
                Write::Delete { key } | Write::DeleteExisting { key } => {
                    inner.delete(key);
                }
                Write::DeletePrefix { prefix } => {
                    let keys: Vec<String> = inner
                        .kvs
                        .range(prefix.clone()..)
                        .take_while(|(key, _)| key.starts_with(prefix.as_str()))
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in keys {
                        inner.delete(&key);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// The in-process election over a [`MemStore`], with etcd's algorithm: each candidate
/// creates `<name>/<lease>` under its lease; the oldest key leads.
#[derive(Debug, Clone)]
pub struct MemElection {
    store: MemStore,
    name: String,
}

impl MemElection {
    /// An election called `name` kept in `store`.
    pub fn new(store: MemStore, name: &str) -> Self {
        Self {
            store,
            name: name.to_owned(),
        }
    }

    fn oldest(&self) -> Option<KeyValue> {
        let prefix = format!("{}/", self.name);
        let inner = self.store.lock();
        inner
            .kvs
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .min_by_key(|(_, entry)| entry.create_revision)
            .map(|(key, entry)| to_kv(key, entry))
    }
}

#[async_trait]
impl Election for MemElection {
    async fn campaign(&self, value: Vec<u8>, lease: LeaseId) -> Result<Leadership, StoreError> {
        let key = format!("{}/{lease:x}", self.name);
        self.store.put(&key, value, Some(lease)).await?;
        let mut watch = self.store.watch_prefix(&format!("{}/", self.name)).await?;
        loop {
            let Some(mine) = self.store.get(&key).await? else {
                return Err(StoreError::LeaseExpired(lease));
            };
            if self.oldest().is_some_and(|oldest| oldest.key == key) {
                return Ok(Leadership {
                    name: self.name.clone(),
                    key,
                    revision: mine.create_revision,
                    lease,
                });
            }
            // Wake on any change of the candidates (a deletion may make us the oldest).
            let _ = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
        }
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        Ok(self.oldest().map(|kv| LeaderInfo {
            key: kv.key,
            value: kv.value,
        }))
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        self.store.delete(&leadership.key).await?;
        Ok(())
    }
}
