//! This ftd's two leases and its leadership.
//!
//! Two leases per ftd, both kept alive every third of the TTL:
//! - the **host lease** holds `/ft/hosts/<host>` and the replica reports. It is *not*
//!   revoked on a clean stop: a restarted ftd within the TTL looks like no failure at all,
//!   and its replicas never stopped.
//! - the **election lease** holds this ftd's candidate key. It is revoked on a clean stop
//!   so that another ftd takes over at once.
//!
//! When either lease is found expired (etcd unreachable for longer than the TTL), a new one
//! is granted: the host registers again, and the election starts over.
//!
//! **Leading only while it can prove it.** The election lease lives at least a TTL after
//! etcd answered a keep-alive: the time that keep-alive was *sent* plus the TTL (less a
//! margin) is how long this ftd can prove its candidate key still stands, hence that it
//! still leads ([`Renewal`]). [`elect`] steps down when that proof runs out (etcd errors
//! or silence for longer), when the election names another leader, or when the lease is
//! replaced; and every write it makes as the leader is fenced by its leadership key
//! ([`crate::store::Fence`]), so what a deposed leader still sends is refused anyway.
//! Winning again with the same key and create revision (the lease outlived an outage) is
//! the same term: it is not announced again.

use crate::cluster::Leadership;
use crate::events::EventLog;
use crate::keys;
use crate::model::HostRecord;
use crate::reconcile::Reconciler;
use crate::records::encode;
use crate::store::{Election, Fence, LeaseId, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How often the leader checks that the election still names it.
const CHECK: Duration = Duration::from_secs(1);

/// An election-lease keep-alive that etcd answered: the lease lives at least a TTL after
/// `sent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Renewal {
    /// The lease.
    pub lease: LeaseId,
    /// When the keep-alive (or the grant) was sent.
    pub sent: Instant,
}

/// The current leases, and the last renewal of the election lease.
pub(super) struct Leases {
    pub host: watch::Sender<LeaseId>,
    pub election: watch::Sender<LeaseId>,
    pub renewed: watch::Sender<Renewal>,
}

pub(super) async fn register(
    store: &dyn Store,
    record: &HostRecord,
    lease: LeaseId,
) -> Result<(), StoreError> {
    store
        .put(
            &keys::host(record.name.as_str()),
            encode(record),
            Some(lease),
        )
        .await
}

/// Keeps both leases alive; replaces one that expired. The two are refreshed side by
/// side, so that a slow answer about one does not hold back the proof of the other.
pub(super) async fn keep_leases(
    store: Arc<dyn Store>,
    leases: Leases,
    record: HostRecord,
    ttl: Duration,
) {
    let period = ttl / 3;
    loop {
        tokio::time::sleep(period).await;
        tokio::join!(
            keep_host_lease(&*store, &leases, &record, ttl),
            keep_election_lease(&*store, &leases, ttl)
        );
    }
}

async fn keep_host_lease(store: &dyn Store, leases: &Leases, record: &HostRecord, ttl: Duration) {
    let host = *leases.host.borrow();
    match store.keep_alive(host).await {
        Ok(()) => {}
        Err(StoreError::LeaseExpired(_)) => {
            tracing::warn!("host lease expired: registering again");
            match store.grant_lease(ttl).await {
                Ok(lease) => {
                    if let Err(err) = register(store, record, lease).await {
                        tracing::error!(error = %err, "cannot register the host");
                    }
                    let _ = leases.host.send(lease);
                }
                Err(err) => tracing::error!(error = %err, "cannot grant a host lease"),
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot refresh the host lease"),
    }
}

async fn keep_election_lease(store: &dyn Store, leases: &Leases, ttl: Duration) {
    let election = *leases.election.borrow();
    let sent = Instant::now();
    match store.keep_alive(election).await {
        Ok(()) => {
            let _ = leases.renewed.send(Renewal {
                lease: election,
                sent,
            });
        }
        Err(StoreError::LeaseExpired(_)) => {
            tracing::warn!("election lease expired: campaigning again");
            let sent = Instant::now();
            match store.grant_lease(ttl).await {
                Ok(lease) => {
                    let _ = leases.renewed.send(Renewal { lease, sent });
                    let _ = leases.election.send(lease);
                }
                Err(err) => tracing::error!(error = %err, "cannot grant an election lease"),
            }
        }
        Err(err) => tracing::warn!(error = %err, "cannot refresh the election lease"),
    }
}

/// What the election task needs.
pub(super) struct Elector {
    pub election: Arc<dyn Election>,
    pub leadership: Arc<Leadership>,
    pub lease: watch::Receiver<LeaseId>,
    pub renewed: watch::Receiver<Renewal>,
    pub ttl: Duration,
    pub value: Vec<u8>,
    pub events: Arc<EventLog>,
    pub reconciler: Arc<Reconciler>,
    pub wake: Arc<Notify>,
    pub me: String,
}

/// Until when the last renewal of `lease` proves that it lives: the keep-alive's send
/// time plus the TTL, less a tenth of it for the clocks and the request's own way.
fn proven_until(renewal: &Renewal, lease: LeaseId, ttl: Duration) -> Option<Instant> {
    (renewal.lease == lease).then(|| renewal.sent + ttl - ttl / 10)
}

/// Why a leadership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The election names another candidate, or none.
    Lost,
    /// The election lease was replaced (the old one expired).
    LeaseReplaced,
    /// Nothing proves the lease still lives (etcd unanswered for too long).
    Unproven,
}

/// Campaigns, leads while the candidate key stands and its lease is proven alive, and
/// campaigns again after losing.
pub(super) async fn elect(elector: Elector) {
    let Elector {
        election,
        leadership,
        mut lease,
        mut renewed,
        ttl,
        value,
        events,
        reconciler,
        wake,
        me,
    } = elector;
    // The term last led: winning it again (same key, same create revision) continues it.
    let mut last_term: Option<Fence> = None;
    loop {
        let current = *lease.borrow_and_update();
        let won = tokio::select! {
            won = election.campaign(value.clone(), current) => won,
            _ = lease.changed() => continue,
        };
        let won = match won {
            Ok(won) => won,
            Err(err) => {
                tracing::warn!(error = %err, "campaign failed; retrying");
                tokio::time::sleep(CHECK).await;
                continue;
            }
        };
        let fence = won.fence();
        let ended = lead(
            &*election,
            &leadership,
            &won.key,
            won.lease,
            &fence,
            (&mut lease, &mut renewed, ttl),
            || async {
                if last_term.as_ref() == Some(&fence) {
                    tracing::info!(
                        "this ftd leads again (the same term: its key outlived the interruption)"
                    );
                } else {
                    reconciler.reset().await;
                    tracing::info!("this ftd is the leader");
                    announce(&events, &fence, &me).await;
                }
                wake.notify_one();
            },
        )
        .await;
        if leadership.is_leader() {
            last_term = Some(fence);
        }
        leadership.step_down();
        match ended {
            Ended::Lost => tracing::warn!("this ftd lost the leadership"),
            Ended::LeaseReplaced => {
                tracing::warn!("this ftd lost the leadership: its election lease expired")
            }
            Ended::Unproven => {
                tracing::warn!("this ftd stops leading: etcd has not renewed its election lease for longer than the lease can prove it still leads");
                // Campaign again once a renewal comes (or a check later), not in a loop
                // meanwhile.
                if let Ok(Err(_)) = tokio::time::timeout(CHECK, renewed.changed()).await {
                    // Nothing renews the lease any more (ftd is stopping).
                    tokio::time::sleep(CHECK).await;
                }
            }
        }
    }
}

/// Records that `me` leads, unless the event log already says so last (this ftd led
/// before an interruption that ended its term, an etcd outage, and leads again: nothing
/// changed for the cluster).
async fn announce(events: &EventLog, fence: &Fence, me: &str) {
    let message = format!("{me} is the leader");
    match events.last_of_kind("leader").await {
        Ok(Some(last)) if last.message == message => {
            tracing::info!("{me} leads again: not announced twice");
            return;
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "cannot read the last leader event"),
    }
    if let Err(err) = events.append(fence, None, "leader", message).await {
        tracing::warn!(error = %err, "cannot record the leader event");
    }
}

/// Leads under `fence` (the candidate `key` on `lease`) while the lease is proven alive
/// and the election names `key`; `started` runs when leading begins. Returns why it
/// ended, still leading (the caller steps down).
async fn lead<F, Fut>(
    election: &dyn Election,
    leadership: &Leadership,
    key: &str,
    won_lease: LeaseId,
    fence: &Fence,
    (lease, renewed, ttl): (
        &mut watch::Receiver<LeaseId>,
        &mut watch::Receiver<Renewal>,
        Duration,
    ),
    started: F,
) -> Ended
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut started = Some(started);
    loop {
        let proof = proven_until(&renewed.borrow_and_update(), won_lease, ttl);
        let now = Instant::now();
        let until = match proof {
            Some(until) if until > now => until,
            _ => return Ended::Unproven,
        };
        if let Some(started) = started.take() {
            leadership.lead(fence.clone());
            started().await;
        }
        tokio::select! {
            () = tokio::time::sleep_until(until.min(now + CHECK)) => {}
            Ok(()) = lease.changed() => return Ended::LeaseReplaced,
            Ok(()) = renewed.changed() => continue,
        }
        if Instant::now() >= until {
            continue;
        }
        match tokio::time::timeout(CHECK, election.leader()).await {
            Ok(Ok(Some(leader))) if leader.key == key => {}
            Ok(Ok(_)) => return Ended::Lost,
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot check leadership"),
            Err(_) => {
                tracing::warn!("cannot check leadership: etcd did not answer within {CHECK:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemStore;
    use crate::store::{LeaderInfo, Leadership as Won};
    use async_trait::async_trait;

    /// An election this candidate wins at once (the same key each time), after which
    /// etcd only answers errors.
    struct Unreachable;

    #[async_trait]
    impl Election for Unreachable {
        async fn campaign(&self, _value: Vec<u8>, lease: LeaseId) -> Result<Won, StoreError> {
            Ok(Won {
                name: keys::LEADER.into(),
                key: format!("{}/{lease:x}", keys::LEADER),
                revision: 7,
                lease,
            })
        }

        async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
            Err(StoreError::NotUtf8)
        }

        async fn resign(&self, _leadership: &Won) -> Result<(), StoreError> {
            Err(StoreError::NotUtf8)
        }
    }

    #[tokio::test]
    async fn a_leader_that_cannot_reach_etcd_gives_up_leading_within_its_lease() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let election: Arc<dyn Election> = Arc::new(Unreachable);
        let leadership = Arc::new(Leadership::new(election.clone()));
        let events = Arc::new(EventLog::new(store.clone()));
        let (_lease_tx, lease) = watch::channel(1);
        let ttl = Duration::from_secs(3);
        // The last keep-alive etcd answered: just now.
        let (renewed_tx, renewed) = watch::channel(Renewal {
            lease: 1,
            sent: Instant::now(),
        });
        let task = tokio::spawn(elect(Elector {
            election,
            leadership: leadership.clone(),
            lease,
            renewed,
            ttl,
            value: Vec::new(),
            events: events.clone(),
            reconciler: Arc::new(Reconciler::new(store, events)),
            wake: Arc::new(Notify::new()),
            me: "a".into(),
        }));
        let started = Instant::now();
        while !leadership.is_leader() {
            assert!(started.elapsed() < Duration::from_secs(2), "never led");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // No keep-alive of the election lease succeeds from now on, and every leadership
        // check fails: after the lease TTL nothing proves this ftd still leads.
        let deadline = started + ttl + Duration::from_secs(1);
        while leadership.is_leader() {
            assert!(
                Instant::now() < deadline,
                "still leading {:?} after the last proof",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stepped_down = started.elapsed();
        assert!(stepped_down <= ttl, "{stepped_down:?}");
        // A renewal comes again: it leads again, in the same term.
        renewed_tx
            .send(Renewal {
                lease: 1,
                sent: Instant::now(),
            })
            .expect("send");
        let again = Instant::now();
        while !leadership.is_leader() {
            assert!(again.elapsed() < Duration::from_secs(3), "never led again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }
}
