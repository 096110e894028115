//! Telling an etcd outage from host deaths. When etcd stops answering for longer than the
//! lease TTL, every lease lapses together: every host's registration and replica reports
//! vanish, though every host and replica ran on. Taken at face value that is every host
//! down and every VM lost.
//!
//! So the leader settles after an outage before it concludes anything: an outage is what
//! this ftd's own store calls saw ([`StoreHealth`]: calls that failed or hung, until etcd
//! answered again; half a lease TTL or more, [`OutageRules`]), or registrations that
//! lapsed together (this ftd's own, which cannot mean its host died, or most hosts' at
//! once). For the grace after it ended:
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

/// How the leader settles after an etcd outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutageRules {
    /// How long after an outage hosts and replicas have to report again.
    pub grace: Duration,
    /// The shortest outage of this ftd's own calls that is settled after: a shorter one
    /// cannot have made a lease lapse that is kept alive every third of its TTL (and a
    /// loaded etcd that answers slowly now and then must not hold the cluster back).
    pub shortest: Duration,
}

impl OutageRules {
    /// The rules for leases of `ttl`: a grace of two TTLs (at least 5 s), after outages
    /// of half a TTL or more.
    pub fn for_lease_ttl(ttl: Duration) -> Self {
        Self {
            grace: (ttl * 2).max(Duration::from_secs(5)),
            shortest: ttl / 2,
        }
    }
}

/// The outage a pass settles after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settling {
    /// When it started and ended.
    pub outage: Outage,
    /// Whether this ftd's own calls saw it (and measured it); otherwise only the
    /// registrations that lapsed together show it.
    pub measured: bool,
}

/// What the leader needs to tell an etcd outage from host deaths.
pub(super) struct Outages {
    health: Arc<StoreHealth>,
    /// This host (its own registration vanishing is the store's doing).
    me: HostName,
    rules: OutageRules,
    /// The registrations that lapsed together, as an outage: from the first pass that
    /// saw them to the last.
    lapse: std::sync::Mutex<Option<Outage>>,
    /// The start of the last outage this reconciler recorded in the event log.
    recorded: Mutex<Option<Instant>>,
}

impl Outages {
    pub fn new(health: Arc<StoreHealth>, me: HostName, rules: OutageRules) -> Self {
        Self {
            health,
            me,
            rules,
            lapse: std::sync::Mutex::new(None),
            recorded: Mutex::new(None),
        }
    }

    /// The outage to settle after, in a pass that sees the hosts `now` (`before`: those
    /// the previous pass saw, if any): the last outage of this ftd's calls that lasted
    /// [`OutageRules::shortest`] or more, or a lapse of this host's own registration or
    /// of most hosts' at once, that ended less than the grace ago.
    pub fn settling(
        &self,
        before: Option<&BTreeSet<HostName>>,
        now: &BTreeSet<HostName>,
    ) -> Option<Settling> {
        let grace = self.rules.grace;
        let mine_lapsed = !now.contains(&self.me);
        let most_lapsed = before.is_some_and(|before| {
            let gone = before.difference(now).count();
            gone >= 2 && gone * 2 > before.len()
        });
        let lapse = {
            let mut lapse = self
                .lapse
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if mine_lapsed || most_lapsed {
                tracing::warn!(
                    mine_lapsed,
                    most_lapsed,
                    "host registrations lapsed together: taken for an etcd outage"
                );
                let at = Instant::now();
                *lapse = Some(match *lapse {
                    Some(going) if going.ended.elapsed() < grace => Outage { ended: at, ..going },
                    _ => Outage {
                        started: at,
                        ended: at,
                        started_unix_ms: crate::model::now_unix_ms(),
                    },
                });
            }
            lapse.filter(|lapse| lapse.ended.elapsed() < grace)
        };
        let measured = self.health.last_outage().filter(|outage| {
            outage.duration() >= self.rules.shortest && outage.ended.elapsed() < grace
        });
        match (measured, lapse) {
            (Some(outage), _) => Some(Settling {
                outage,
                measured: true,
            }),
            (None, Some(outage)) => Some(Settling {
                outage,
                measured: false,
            }),
            (None, None) => None,
        }
    }

    /// Records `settling`'s outage in the event log, once (not if this reconciler, or
    /// another leader since, recorded it).
    pub async fn record(
        &self,
        writes: &Fenced<'_>,
        events: &EventLog,
        settling: &Settling,
    ) -> Result<(), StoreError> {
        let outage = &settling.outage;
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
            let grace = self.rules.grace.as_secs();
            let message = if settling.measured {
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
