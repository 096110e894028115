//! Telling an etcd outage from host deaths. When etcd stops answering for longer than the
//! lease TTL, every lease lapses together: every host's registration and replica reports
//! vanish, though every host and replica ran on. Taken at face value that is every host
//! down and every VM lost.
//!
//! So the leader settles after an outage before it concludes anything: an outage is what
//! this ftd's own store calls saw ([`StoreHealth`]: calls that failed or hung, until etcd
//! answered again), or registrations that lapsed together (this ftd's own, which cannot
//! mean its host died, or most hosts' at once). For [`Outages::grace`] after it ended:
//! - a host whose registration vanished is not declared down (it is kept among the hosts
//!   seen; declared down only if it is still gone when the grace ends), and one that
//!   registers again after it had been up before the outage is not announced as up;
//! - a VM any of whose replicas is not accounted for (its host not registered again, or
//!   no report of it yet) is left as it is: no failover, no promotion, no new backup, no
//!   status change. Except when its replicas say what happened: a backup that reports it
//!   went live is the pair's own decision, and is followed at once;
//! - the outage is recorded once in the event log (`store-outage`: "etcd unavailable for
//!   N s").

use crate::events::EventLog;
use crate::model::{Event, HostName};
use crate::store::health::{Outage, StoreHealth};
use crate::store::{Fenced, StoreError};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// The event kind of an outage.
pub(super) const KIND: &str = "store-outage";

/// What the leader needs to tell an etcd outage from host deaths.
pub(super) struct Outages {
    health: Arc<StoreHealth>,
    /// This host (its own registration vanishing is the store's doing).
    me: HostName,
    /// How long after an outage hosts and replicas have to report again.
    grace: Duration,
    /// The start of the last outage this reconciler recorded in the event log.
    recorded: Mutex<Option<Instant>>,
}

impl Outages {
    pub fn new(health: Arc<StoreHealth>, me: HostName, grace: Duration) -> Self {
        Self {
            health,
            me,
            grace,
            recorded: Mutex::new(None),
        }
    }

    /// The outage to settle after, in a pass that started at `started` and sees the
    /// hosts `now` (`before`: those the previous pass saw, if any): the last outage that
    /// ended less than the grace ago, counting as one a lapse of this host's own
    /// registration or of most hosts' at once.
    pub fn settling(
        &self,
        started: Instant,
        before: Option<&BTreeSet<HostName>>,
        now: &BTreeSet<HostName>,
    ) -> Option<Outage> {
        let mine_lapsed = !now.contains(&self.me);
        let most_lapsed = before.is_some_and(|before| {
            let gone = before.difference(now).count();
            gone >= 2 && gone * 2 > before.len()
        });
        if mine_lapsed || most_lapsed {
            tracing::warn!(
                mine_lapsed,
                most_lapsed,
                "host registrations lapsed together: taken for an etcd outage"
            );
            self.health
                .lapsed(started.checked_sub(self.grace).unwrap_or(started));
        }
        self.health
            .last_outage()
            .filter(|outage| outage.ended.elapsed() < self.grace)
    }

    /// Records `outage` in the event log, once (not if this reconciler, or another leader
    /// since, recorded it).
    pub async fn record(
        &self,
        writes: &Fenced<'_>,
        events: &EventLog,
        outage: &Outage,
    ) -> Result<(), StoreError> {
        let mut recorded = self.recorded.lock().await;
        if *recorded == Some(outage.started) {
            return Ok(());
        }
        let known = events
            .recent(100)
            .await?
            .iter()
            .any(|event: &Event| event.kind == KIND && event.unix_ms >= outage.started_unix_ms);
        if !known {
            let seconds = outage.duration().as_secs_f64().round();
            let grace = self.grace.as_secs();
            let message = if outage.duration() >= crate::store::health::SLOW {
                format!("etcd unavailable for {seconds} s: leases that lapsed meanwhile are not taken for host deaths (hosts and replicas have {grace} s to report again)")
            } else {
                format!("host leases lapsed together, as in an etcd outage: not taken for host deaths (hosts and replicas have {grace} s to report again)")
            };
            super::apply::event(writes, events, None, KIND, message).await?;
        }
        *recorded = Some(outage.started);
        Ok(())
    }
}
