//! What the control socket and the final report read of a replica's pair, from any
//! thread: the current pair's go-live and its log channel's counters. A replica may lead
//! several pairs in its life (a clone after each lost backup makes the next generation);
//! the view follows the latest.

use crate::channel::{ChannelStats, StatsSource};
use crate::golive::{GoLive, Role, State};
use ftvm_contract::status::CloneDiskProgress;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long `golive`'s claim took if it made a backup live.
fn went_live_after(golive: &GoLive) -> Option<Duration> {
    (golive.role() == Role::Backup && golive.state() == State::Live)
        .then(|| golive.claim_took())
        .flatten()
}

/// The latest pair of this replica (see the module doc).
#[derive(Default)]
pub struct PairView {
    inner: Mutex<Latest>,
    /// The disk copy of the clone under way or last made, as its threads count it.
    clone_disk: Mutex<Option<Arc<DiskCopyCounter>>>,
}

/// A clone's disk copy as it goes, counted by the threads that send it.
#[derive(Debug, Default)]
pub struct DiskCopyCounter {
    /// Bytes of disk data sent so far.
    pub copied: AtomicU64,
    /// Bytes of data the first round found on the disk.
    pub data: AtomicU64,
    /// The copy ended (made or abandoned).
    pub over: AtomicBool,
}

#[derive(Default, Clone)]
struct Latest {
    golive: Option<Arc<GoLive>>,
    channel: Option<StatsSource>,
    /// The latest pair was made by cloning this replica.
    cloned: bool,
    /// How long this replica's go-live claim took, once it went live as a backup (kept
    /// when it leads a new pair after that).
    went_live_after: Option<Duration>,
}

/// The pair as the control socket tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSummary {
    /// Whose role this replica has in the latest pair.
    pub role: Role,
    /// The latest pair's generation.
    pub generation: u64,
    /// Where its go-live stands.
    pub state: State,
    /// The latest pair was made by cloning this replica.
    pub cloned: bool,
}

impl std::fmt::Debug for PairView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairView")
            .field("pair", &self.summary())
            .finish()
    }
}

impl PairView {
    fn latest(&self) -> Latest {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This replica is in a new pair: `golive` and `channel`'s counters from now on;
    /// `cloned` if the pair was made by cloning this replica.
    pub fn join(&self, golive: Arc<GoLive>, channel: StatsSource, cloned: bool) {
        let mut latest = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let went_live_after = latest.went_live_after.or_else(|| {
            latest
                .golive
                .as_ref()
                .and_then(|golive| went_live_after(golive))
        });
        *latest = Latest {
            golive: Some(golive),
            channel: Some(channel),
            cloned,
            went_live_after,
        };
    }

    /// How long this replica's go-live claim took, if it went live as a backup.
    pub fn went_live_after(&self) -> Option<Duration> {
        let latest = self.latest();
        latest
            .went_live_after
            .or_else(|| went_live_after(latest.golive.as_ref()?))
    }

    /// The latest pair's go-live, if this replica is in one.
    pub fn golive(&self) -> Option<Arc<GoLive>> {
        self.latest().golive
    }

    /// The latest log channel's counters, if there was one.
    pub fn channel_stats(&self) -> Option<ChannelStats> {
        self.latest().channel.map(|channel| channel.stats())
    }

    /// Counts the disk copy of a clone starting now (replacing the last one's).
    pub fn start_disk_copy(&self) -> Arc<DiskCopyCounter> {
        let counter = Arc::new(DiskCopyCounter::default());
        *self
            .clone_disk
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(counter.clone());
        counter
    }

    /// The disk copy of a clone under way, if there is one.
    pub fn clone_disk_progress(&self) -> Option<CloneDiskProgress> {
        let counter = self
            .clone_disk
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        (!counter.over.load(Ordering::Acquire)).then(|| CloneDiskProgress {
            copied_bytes: counter.copied.load(Ordering::Relaxed),
            data_bytes: counter.data.load(Ordering::Relaxed),
        })
    }

    /// The latest pair, if there is one.
    pub fn summary(&self) -> Option<PairSummary> {
        let latest = self.latest();
        let golive = latest.golive?;
        Some(PairSummary {
            role: golive.role(),
            generation: golive.pair().generation,
            state: golive.state(),
            cloned: latest.cloned,
        })
    }
}
