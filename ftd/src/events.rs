//! The cluster event log: `/ft/events/<seq>`, bounded to the last [`KEEP`] entries.
//! Sequence numbers are claimed with create-if-absent, so several ftds may append. Only
//! the leader appends, each write fenced by its leadership ([`Fence`]): a deposed
//! leader's late events are refused.

use crate::keys;
use crate::model::{now_unix_ms, Event, VmName};
use crate::records::{decode, encode};
use crate::store::{Fence, Fenced, Store, StoreError, Watch, WatchEvent, Write};
use std::sync::Arc;
use tokio::sync::Mutex;

/// How many events are kept.
pub const KEEP: usize = 1000;
/// Most events a reader may ask for at once.
pub const BACKLOG_MAX: usize = KEEP;

/// Appends to and reads the event log.
pub struct EventLog {
    store: Arc<dyn Store>,
    next: Mutex<u64>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    /// The log kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            next: Mutex::new(0),
        }
    }

    async fn last_seq(&self) -> Result<u64, StoreError> {
        let events = self.store.list_prefix(keys::EVENTS).await?;
        Ok(events
            .last()
            .and_then(|kv| kv.key.strip_prefix(keys::EVENTS)?.parse().ok())
            .unwrap_or(0))
    }

    /// Records an event, while `fence` holds, and returns it.
    pub async fn append(
        &self,
        fence: &Fence,
        vm: Option<&VmName>,
        kind: &str,
        message: String,
    ) -> Result<Event, StoreError> {
        let writes = Fenced::new(&*self.store, fence);
        let mut next = self.next.lock().await;
        if *next == 0 {
            *next = self.last_seq().await? + 1;
        }
        loop {
            let event = Event {
                seq: *next,
                unix_ms: now_unix_ms(),
                vm: vm.cloned(),
                kind: kind.to_owned(),
                message: message.clone(),
            };
            if writes
                .create(&keys::event(event.seq), encode(&event))
                .await?
            {
                *next += 1;
                tracing::info!(seq = event.seq, vm = ?event.vm.as_ref().map(VmName::as_str), kind, "{}", event.message);
                if event.seq.is_multiple_of(100) {
                    self.trim(&writes).await?;
                }
                return Ok(event);
            }
            // Another ftd took this number: continue after the newest.
            *next = self.last_seq().await? + 1;
        }
    }

    async fn trim(&self, writes: &Fenced<'_>) -> Result<(), StoreError> {
        let events = self.store.list_prefix(keys::EVENTS).await?;
        let excess = events.len().saturating_sub(KEEP);
        let deletes: Vec<Write> = events
            .iter()
            .take(excess)
            .map(|kv| Write::Delete {
                key: kv.key.clone(),
            })
            .collect();
        // A few at a time: etcd bounds the operations of one transaction (128).
        for chunk in deletes.chunks(64) {
            writes.commit(chunk).await?;
        }
        Ok(())
    }

    /// The last `count` events, oldest first.
    pub async fn recent(&self, count: usize) -> Result<Vec<Event>, StoreError> {
        let events = self.store.list_prefix(keys::EVENTS).await?;
        let skip = events.len().saturating_sub(count.min(BACKLOG_MAX));
        Ok(events
            .iter()
            .skip(skip)
            .filter_map(|kv| decode(&kv.key, &kv.value))
            .collect())
    }

    /// The newest kept event of `kind`, if any.
    pub async fn last_of_kind(&self, kind: &str) -> Result<Option<Event>, StoreError> {
        Ok(self
            .recent(KEEP)
            .await?
            .into_iter()
            .rev()
            .find(|event| event.kind == kind))
    }

    /// New events from now on.
    pub async fn watch(&self) -> Result<EventWatch, StoreError> {
        Ok(EventWatch {
            watch: self.store.watch_prefix(keys::EVENTS).await?,
        })
    }
}

/// A stream of new events.
#[derive(Debug)]
pub struct EventWatch {
    watch: Watch,
}

impl EventWatch {
    /// The next new event; `None` when the watch ended.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.watch.next().await? {
                WatchEvent::Put(kv) => {
                    if let Some(event) = decode(&kv.key, &kv.value) {
                        return Some(event);
                    }
                }
                WatchEvent::Delete(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;

    /// A leadership key in `store` and the fence it gives.
    async fn leading(store: &dyn Store) -> Fence {
        store
            .put("/ft/leader/1", Vec::new(), None)
            .await
            .expect("put");
        let kv = store
            .get("/ft/leader/1")
            .await
            .expect("get")
            .expect("there");
        Fence {
            key: kv.key,
            revision: kv.create_revision,
        }
    }

    #[tokio::test]
    async fn appended_events_get_increasing_sequence_numbers_across_writers() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let fence = leading(&*store).await;
        let one = EventLog::new(store.clone());
        let two = EventLog::new(store.clone());
        let mut watch = one.watch().await.expect("watch");
        one.append(&fence, None, "a", "first".into())
            .await
            .expect("append");
        two.append(&fence, None, "b", "second".into())
            .await
            .expect("append");
        one.append(&fence, None, "c", "third".into())
            .await
            .expect("append");
        let seqs: Vec<u64> = one
            .recent(10)
            .await
            .expect("recent")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(watch.next().await.map(|e| e.kind), Some("a".into()));
        assert_eq!(one.recent(1).await.expect("recent")[0].message, "third");
        // Deposed: refused, and nothing recorded.
        store.delete(&fence.key).await.expect("delete");
        let late = one.append(&fence, None, "d", "late".into()).await;
        assert!(matches!(late, Err(StoreError::Fenced { .. })), "{late:?}");
        assert_eq!(one.recent(10).await.expect("recent").len(), 3);
    }
}
