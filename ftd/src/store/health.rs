//! How the store has been answering this ftd. Every call through [`Monitored`] tells
//! [`StoreHealth`] whether it failed for want of the store (a connection or etcd error;
//! an expired lease or a refused fenced write is an answer) or took longer than
//! [`SLOW`]. A run of such calls, from the last quick answer before the first of them
//! (or its start) to the end of the first answer after them, is an [`Outage`].
//!
//! The leader reads it to tell an etcd outage from host deaths: when etcd stops
//! answering for longer than the lease TTL, every host's lease lapses together, though
//! every host and replica ran on.

use super::{Fence, KeyValue, LeaseId, Store, StoreError, Watch, Write};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A call that takes longer than this counts as the store being unavailable meanwhile.
pub const SLOW: Duration = Duration::from_secs(1);

/// A time the store did not answer this ftd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    /// When the first call that failed (or was slow) was made.
    pub started: Instant,
    /// When the store answered again.
    pub ended: Instant,
    /// `started` in ms since the Unix epoch.
    pub started_unix_ms: u64,
}

impl Outage {
    /// How long it lasted.
    pub fn duration(&self) -> Duration {
        self.ended.saturating_duration_since(self.started)
    }
}

#[derive(Debug, Default)]
struct State {
    /// When the store last answered a call quickly.
    last_answer: Option<Instant>,
    /// Since when calls fail (or are slow), while they do: (when, Unix ms).
    trouble_since: Option<(Instant, u64)>,
    /// The last outage that ended.
    last: Option<Outage>,
}

/// What this ftd has seen of the store's availability.
#[derive(Debug, Default)]
pub struct StoreHealth {
    state: Mutex<State>,
}

fn unix_ms_at(at: Instant) -> u64 {
    let ago = at.elapsed();
    crate::model::now_unix_ms().saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(0))
}

impl StoreHealth {
    /// No outage seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a call made at `started` that has just ended: `answered` if the store
    /// answered it (successfully or not).
    pub fn record(&self, started: Instant, answered: bool) {
        let now = Instant::now();
        let slow = now.saturating_duration_since(started) > SLOW;
        let mut state = self.state();
        if !answered || slow {
            // The store was last seen answering at its last quick answer before this
            // call, if that was just before (ftd calls it every second).
            let from = state
                .last_answer
                .filter(|at| *at <= started && started.saturating_duration_since(*at) < SLOW)
                .unwrap_or(started);
            let since = match state.trouble_since {
                Some((since, unix_ms)) if since <= from => (since, unix_ms),
                _ => (from, unix_ms_at(from)),
            };
            state.trouble_since = Some(since);
        } else {
            state.last_answer = Some(now);
        }
        if answered {
            if let Some((mut started, mut started_unix_ms)) = state.trouble_since.take() {
                // A call made during the outage just recorded, answered late: the same
                // outage.
                if let Some(last) = state.last.filter(|last| started <= last.ended) {
                    if last.started < started {
                        (started, started_unix_ms) = (last.started, last.started_unix_ms);
                    }
                }
                let outage = Outage {
                    started,
                    ended: now,
                    started_unix_ms,
                };
                tracing::warn!(
                    seconds = outage.duration().as_secs_f64(),
                    "etcd answers again after {:.1} s",
                    outage.duration().as_secs_f64()
                );
                state.last = Some(outage);
            }
        }
    }

    /// Whether calls fail (or are slow) now.
    pub fn troubled(&self) -> bool {
        self.state().trouble_since.is_some()
    }

    /// The last outage that ended.
    pub fn last_outage(&self) -> Option<Outage> {
        self.state().last
    }
}

/// A [`Store`] whose calls are recorded in a [`StoreHealth`].
pub struct Monitored {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl std::fmt::Debug for Monitored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitored").finish_non_exhaustive()
    }
}

impl Monitored {
    /// `inner`, its calls recorded in `health`.
    pub fn new(inner: Arc<dyn Store>, health: Arc<StoreHealth>) -> Self {
        Self { inner, health }
    }

    fn note<T>(
        &self,
        call: &'static str,
        started: Instant,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let answered = match &result {
            Ok(_) => true,
            Err(StoreError::Connect { .. } | StoreError::Etcd { .. }) => false,
            Err(StoreError::LeaseExpired(_) | StoreError::NotUtf8 | StoreError::Fenced { .. }) => {
                true
            }
        };
        self.health.record(started, answered);
        if !answered {
            crate::metrics::etcd_error(call);
        }
        result
    }
}

#[async_trait]
impl Store for Monitored {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let started = Instant::now();
        self.note("get", started, self.inner.get(key).await)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        self.note("put", started, self.inner.put(key, value, lease).await)
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        self.note(
            "create",
            started,
            self.inner.create(key, value, lease).await,
        )
    }

    async fn put_if_unchanged(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        self.note(
            "put_if_unchanged",
            started,
            self.inner.put_if_unchanged(key, value, mod_revision).await,
        )
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let started = Instant::now();
        self.note("delete", started, self.inner.delete(key).await)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let started = Instant::now();
        self.note(
            "delete_prefix",
            started,
            self.inner.delete_prefix(prefix).await,
        )
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let started = Instant::now();
        self.note("list_prefix", started, self.inner.list_prefix(prefix).await)
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError> {
        let started = Instant::now();
        self.note(
            "watch_prefix",
            started,
            self.inner.watch_prefix(prefix).await,
        )
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let started = Instant::now();
        self.note("grant_lease", started, self.inner.grant_lease(ttl).await)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let started = Instant::now();
        self.note("keep_alive", started, self.inner.keep_alive(lease).await)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let started = Instant::now();
        self.note(
            "revoke_lease",
            started,
            self.inner.revoke_lease(lease).await,
        )
    }

    async fn commit(&self, fence: &Fence, writes: &[Write]) -> Result<bool, StoreError> {
        let started = Instant::now();
        self.note("commit", started, self.inner.commit(fence, writes).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_calls_then_an_answer_make_one_outage() {
        let health = StoreHealth::new();
        let start = Instant::now();
        health.record(start, true);
        assert_eq!(health.last_outage(), None);
        let first = Instant::now();
        health.record(first, false);
        health.record(Instant::now(), false);
        assert!(health.troubled());
        health.record(Instant::now(), true);
        let outage = health.last_outage().expect("an outage");
        assert!(!health.troubled());
        // From the last answer before the first failed call.
        assert!(
            start <= outage.started && outage.started <= first,
            "{outage:?}"
        );
        // A call that answered, but slowly: the store was away meanwhile.
        let slow = Instant::now()
            .checked_sub(SLOW * 3)
            .expect("the clock is past three seconds");
        health.record(slow, true);
        let outage = health.last_outage().expect("an outage");
        assert_eq!(outage.started, slow);
        assert!(outage.duration() >= SLOW * 3);
        // Calls made during it, answered late, do not make it shorter.
        let during = slow + SLOW;
        health.record(during, true);
        let merged = health.last_outage().expect("an outage");
        assert_eq!(merged.started, slow);
        assert!(merged.ended >= outage.ended);
    }
}
