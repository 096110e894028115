//! The leader's reconcile pass: compares the desired state (VM specs) with what the hosts
//! report, places replicas, records each VM's status and the failovers, brings protection
//! back after one, and cleans up after deleted VMs. Level-triggered: every pass reads
//! everything and is idempotent, so a new leader simply runs the next pass.
//!
//! Placing a VM places its pair at once: the primary, and the backup on another host
//! (anti-affinity) when one is live and both hosts' ftvmm can run a backup. Both
//! assignments carry generation 1 and the same log address (`IP:PORT` on the primary's
//! host: its `log_listen_ip` and `log_port_base` plus the lowest offset no other
//! assignment's address uses), so the primary listens where its backup connects. Each
//! replica also gets a clone address from the same range on its own host
//! (`--clone-listen`) and a replica number (never reused within the VM).
//!
//! After a failover the pair heals itself in two steps, each a pass:
//! 1. the backup that went live (its control socket says `role=live`, or it holds the
//!    generation's go-live claim) is made the primary: the same replica number on the
//!    same host, so its ftd keeps the process and only relabels it;
//! 2. a primary that runs alone (peer lost, or never paired) gets a new backup made by
//!    cloning it: `--clone-from` its clone address, generation = the primary's own
//!    generation (from its status) + 1, on a host named in the spec if one is live and
//!    free, else the least loaded other host. A clone that fails (the backup exits) is
//!    tried again after `CLONE_RETRY_MS` (2 s) under a new replica number.
//!
//! `ftctl restart-backup` withdraws the backup's assignment and lets step 2 do the rest.
//! Nothing here ever starts a second live replica: only the pair's go-live claim decides
//! which replica is the VM, and a promotion only follows that decision.
//!
//! What a pass decides for one VM:
//!
//! | primary | backup | status |
//! |---|---|---|
//! | not placed, no host fits | | Down: cannot place the primary (host a is down / no live host) |
//! | placed, no report yet | | Down: primary starting on a |
//! | running, says protected=1 | running | Protected |
//! | running, generation below the clone's | running, made by cloning | Not protected: backup cloning: c copies the running primary on b |
//! | running, not protected=1 yet | running | Not protected: backup connecting (...) |
//! | running, peer_lost=1 | running | Not protected: need secondary: the primary on a lost its backup on b |
//! | running | no report yet | Not protected: need secondary: backup starting on b |
//! | running | being replaced (`restart-backup`), still running | Not protected: need secondary: restarting the backup: stopping it on b |
//! | running, alone | exited / host down / none | a clone is placed: need secondary: backup exited on b (...); backup starting on c (a clone of the primary on a) |
//! | running, not alone yet | exited / host down / none | Not protected: need secondary: ...; the primary on a has not noticed its backup is gone yet; backup host would be c |
//! | host down / exited, or the backup says role=live | running | Not protected: need secondary: primary exited on a (signal 9); the backup on b went live (then promoted) / takes over (claim pending) |
//! | host down | none or not running | Down: primary lost, host a is down; no backup to take over |
//! | exited (signal, or ftvmm failure status 64+) | none or not running | Down: primary exited on a (signal 9); no backup to take over |
//! | guest powered off (ftvmm exit status 0..=63) | | Down: the guest powered off on a (code 0); not a failover |
//! | within the grace after an etcd outage: host not registered again, or no report yet (either replica) | not `role=live` | left as it is: no action, status unchanged |
//!
//! Whether a primary is protected is its own word: its ftd samples the control socket
//! (`status`: `protected=1` while the backup is connected and following) and puts it in
//! the replica's report. Entering and leaving Protected are events (`protected`,
//! `unprotected`); so are `failover`, `promoted` and `backup-placed`.
//!
//! A change from "running" to "lost/exited" is a failover: it is recorded in the status
//! (`last_failover`), the event log and `ftd_failovers_total`.
//!
//! A deleted VM loses its assignments; once no live host reports one of its replicas, its
//! go-live claims (the prefix of its life, `/ft/vms/<vm>/uid/<uid>/`), status and reports
//! go. The claims of an older life of a name created again go once none of that life's
//! replicas is reported.
//!
//! Right after an etcd outage (every lease lapsed together, though hosts and replicas ran
//! on), a pass settles before it concludes anything: see `outage`.
//!
//! A pass reads the cluster (`observe`), decides each VM from what it read alone
//! (`decide`, a pure function), and carries the decision out against the store and the
//! event log (`apply`).

mod apply;
mod decide;
mod observe;
mod outage;
#[cfg(test)]
mod tests;

use crate::events::EventLog;
use crate::metrics;
use crate::model::{now_unix_ms, HostName, Protection};
use crate::store::health::StoreHealth;
use crate::store::{Fence, Fenced, Store, StoreError};
use decide::Room;
use observe::{Hosts, ObservedVm};
pub use outage::OutageRules;
use outage::Outages;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// A reconcile pass failed (it is retried on the next tick).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading or writing the store failed.
    #[error("store access failed")]
    Store(#[from] StoreError),
}

/// What a pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassSummary {
    /// Replicas placed.
    pub placed: usize,
    /// Failovers recorded.
    pub failovers: usize,
    /// VMs whose records were removed after deletion.
    pub removed: usize,
}

/// The leader's reconciler.
pub struct Reconciler {
    store: Arc<dyn Store>,
    events: Arc<EventLog>,
    /// Hosts seen live in the previous pass (for host-up/host-down events); `None` until
    /// the first pass of this leadership.
    last_hosts: Mutex<Option<BTreeSet<HostName>>>,
    /// How etcd outages are told from host deaths (`None`: never settles).
    outages: Option<Outages>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler over `store`, recording events in `events`.
    pub fn new(store: Arc<dyn Store>, events: Arc<EventLog>) -> Self {
        Self {
            store,
            events,
            last_hosts: Mutex::new(None),
            outages: None,
        }
    }

    /// Tells etcd outages from host deaths (see `outage`): the outages this ftd's store
    /// calls saw are in `health`, this ftd runs on host `me`, and `rules` say how long
    /// the leader settles after which outages.
    pub fn settling_after_outages(
        mut self,
        health: Arc<StoreHealth>,
        me: HostName,
        rules: OutageRules,
    ) -> Self {
        self.outages = Some(Outages::new(health, me, rules));
        self
    }

    /// Forgets the hosts seen, so that a new leadership starts without stale host events.
    pub async fn reset(&self) {
        *self.last_hosts.lock().await = None;
    }

    /// One pass over every VM, for the leadership `fence` proves: every write of the pass
    /// is fenced by it, so a pass that runs on after the leadership ended changes nothing
    /// (its first write fails with [`StoreError::Fenced`]).
    pub async fn pass(&self, fence: &Fence) -> Result<PassSummary, ReconcileError> {
        let started = std::time::Instant::now();
        let writes = Fenced::new(&*self.store, fence);
        let observed = observe::cluster(&*self.store).await?;
        let hosts = &observed.hosts;
        metrics::set_hosts(hosts.len());
        let settling = self.host_events(&writes, hosts).await?;

        let mut room = Room::new(hosts, &observed.vms);
        room.settling = settling;
        room.drained = observed.drained.clone();
        let mut summary = PassSummary::default();
        let mut counts: BTreeMap<Protection, usize> = BTreeMap::new();
        let mut view = BTreeMap::new();
        for (name, record) in &observed.vms {
            let claimant = observe::claimant(&*self.store, name, record, hosts).await?;
            let vm = ObservedVm {
                name,
                record,
                claimant: claimant.as_deref(),
            };
            let decision = decide::decide(&vm, &room, now_unix_ms());
            room.take(&decision.actions);
            apply::apply(&writes, &self.events, name, &decision, &mut summary).await?;
            if let Some(protection) = decision.protection {
                *counts.entry(protection).or_default() += 1;
                let failovers = decision
                    .status
                    .as_ref()
                    .or(record.status.as_ref())
                    .map_or(0, |status| status.failovers);
                view.insert(
                    name.to_string(),
                    metrics::VmGauges {
                        protected: protection == Protection::Protected,
                        failovers,
                    },
                );
            }
        }
        metrics::set_vm_view(view);
        metrics::set_vms(
            &Protection::ALL
                .iter()
                .map(|p| (*p, counts.get(p).copied().unwrap_or(0)))
                .collect::<Vec<_>>(),
        );
        metrics::reconcile_duration(started.elapsed().as_secs_f64());
        Ok(summary)
    }

    /// Records hosts that came up or went down since the previous pass, and the etcd
    /// outage this pass settles after, if any (see `outage`): then a host that vanished
    /// is kept among those seen rather than declared down, and one that was up before
    /// the outage and registers again is not announced. Returns whether this pass
    /// settles after an outage.
    async fn host_events(&self, writes: &Fenced<'_>, hosts: &Hosts) -> Result<bool, StoreError> {
        let now: BTreeSet<HostName> = hosts.keys().cloned().collect();
        let mut last = self.last_hosts.lock().await;
        let settling = match &self.outages {
            Some(outages) => outages.settling(last.as_ref(), &now),
            None => None,
        };
        if let (Some(outages), Some(outage)) = (&self.outages, &settling) {
            outages.record(writes, &self.events, outage).await?;
        }
        let mut seen = now.clone();
        if let Some(before) = last.as_ref() {
            for host in now.difference(before) {
                let registered_again = settling.as_ref().is_some_and(|settling| {
                    hosts.get(host).is_some_and(|record| {
                        record.started_unix_ms < settling.outage.started_unix_ms
                    })
                });
                if !registered_again {
                    apply::event(
                        writes,
                        &self.events,
                        None,
                        "host-up",
                        format!("host {host} is up"),
                    )
                    .await?;
                }
            }
            for host in before.difference(&now) {
                if settling.is_some() {
                    seen.insert(host.clone());
                    continue;
                }
                apply::event(
                    writes,
                    &self.events,
                    None,
                    "host-down",
                    format!("host {host} is down (its ftd lease ended)"),
                )
                .await?;
            }
        }
        *last = Some(seen);
        Ok(settling.is_some())
    }
}
