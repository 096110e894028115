//! The leader's reconcile pass: compares the desired state (VM specs) with what the hosts
//! report, places replicas, records each VM's status and the failovers, and cleans up
//! after deleted VMs. Level-triggered: every pass reads everything and is idempotent, so
//! a new leader simply runs the next pass.
//!
//! What a pass decides for one VM:
//!
//! | primary | status |
//! |---|---|
//! | not placed, no host fits | Down: cannot place the primary (host a is down / no live host) |
//! | placed, no report yet | Down: primary starting on a |
//! | running | Not protected: need secondary (...) |
//! | host down | Down: primary lost, host a is down; no backup to take over |
//! | exited (signal, or ftvmm failure status 64+) | Down: primary exited on a (signal 9); no backup to take over |
//! | guest powered off (ftvmm exit status 0..=63) | Down: the guest powered off on a (code 0); not a failover |
//!
//! A change from "running" to "lost/exited" is a failover: it is recorded in the status
//! (`last_failover`), the event log and `ftd_failovers_total`. With a backup (once ftvmm
//! has the backup role), the backup's report of going live will move the primary
//! assignment to its host under the next generation, and a new backup is placed.

use crate::events::EventLog;
use crate::keys;
use crate::metrics;
use crate::model::{
    now_unix_ms, Assignment, Failover, HostName, HostRecord, ProcessState, Protection, Role,
    VmName, VmStatus,
};
use crate::placement::{self, Load};
use crate::records::{encode, load_hosts, load_vms, VmRecord};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Why the backup replica does not run, while ftvmm lacks the backup role.
pub const NO_BACKUP_ROLE: &str = "the backup role is not available in ftvmm yet";

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

/// The state of a primary as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PrimaryState {
    Unplaced(String),
    Starting(HostName),
    Running(HostName),
    /// The guest powered off (ftvmm exit status 0..=63): a clean stop, not a failover.
    PoweredOff(HostName, i32),
    Lost(HostName, String),
}

/// Highest ftvmm exit status that means "the guest powered off with this code".
const GUEST_EXIT_MAX: i32 = 63;

/// The leader's reconciler.
pub struct Reconciler {
    store: Arc<dyn Store>,
    events: Arc<EventLog>,
    /// Hosts seen live in the previous pass (for host-up/host-down events); `None` until
    /// the first pass of this leadership.
    last_hosts: Mutex<Option<BTreeSet<HostName>>>,
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
        }
    }

    /// Forgets the hosts seen, so that a new leadership starts without stale host events.
    pub async fn reset(&self) {
        *self.last_hosts.lock().await = None;
    }

    async fn event(
        &self,
        vm: Option<&VmName>,
        kind: &str,
        message: String,
    ) -> Result<(), StoreError> {
        self.events.append(vm, kind, message).await?;
        metrics::event(kind);
        Ok(())
    }

    /// One pass over every VM.
    pub async fn pass(&self) -> Result<PassSummary, ReconcileError> {
        let started = std::time::Instant::now();
        let hosts = load_hosts(&*self.store).await?;
        let vms = load_vms(&*self.store, None).await?;
        metrics::set_hosts(hosts.len());
        self.host_events(&hosts).await?;

        let mut load: Load = hosts.keys().map(|host| (host.clone(), 0)).collect();
        for record in vms.values() {
            for role in Role::ALL {
                if let Some(assignment) = record.current_assignment(role) {
                    if let Some(count) = load.get_mut(&assignment.host) {
                        *count += 1;
                    }
                }
            }
        }

        let mut summary = PassSummary::default();
        let mut counts: BTreeMap<Protection, usize> = BTreeMap::new();
        for (vm, record) in &vms {
            if record.spec.is_some() {
                let protection = self
                    .reconcile_vm(vm, record, &hosts, &mut load, &mut summary)
                    .await?;
                *counts.entry(protection).or_default() += 1;
            } else {
                self.clean_up(vm, record, &hosts, &mut summary).await?;
            }
        }
        metrics::set_vms(
            &Protection::ALL
                .iter()
                .map(|p| (*p, counts.get(p).copied().unwrap_or(0)))
                .collect::<Vec<_>>(),
        );
        metrics::reconcile_duration(started.elapsed().as_secs_f64());
        Ok(summary)
    }

    async fn host_events(&self, hosts: &BTreeMap<HostName, HostRecord>) -> Result<(), StoreError> {
        let now: BTreeSet<HostName> = hosts.keys().cloned().collect();
        let mut last = self.last_hosts.lock().await;
        if let Some(before) = last.as_ref() {
            for host in now.difference(before) {
                self.event(None, "host-up", format!("host {host} is up"))
                    .await?;
            }
            for host in before.difference(&now) {
                self.event(
                    None,
                    "host-down",
                    format!("host {host} is down (its ftd lease ended)"),
                )
                .await?;
            }
        }
        *last = Some(now);
        Ok(())
    }

    async fn reconcile_vm(
        &self,
        vm: &VmName,
        record: &VmRecord,
        hosts: &BTreeMap<HostName, HostRecord>,
        load: &mut Load,
        summary: &mut PassSummary,
    ) -> Result<Protection, StoreError> {
        let Some(spec) = &record.spec else {
            return Ok(Protection::Down);
        };
        // Assignments of an older incarnation of this name are dropped (their hosts stop
        // those replicas).
        for (role, assignment) in &record.assignments {
            if assignment.uid != spec.uid {
                self.store.delete(&keys::assignment(vm, *role)).await?;
            }
        }

        let primary = match record.current_assignment(Role::Primary) {
            Some(assignment) => self.primary_state(record, assignment, hosts),
            None => match placement::place_primary(&spec.hosts, load) {
                Ok(host) => {
                    let assignment = Assignment {
                        host: host.clone(),
                        generation: 1,
                        uid: spec.uid.clone(),
                    };
                    self.store
                        .put(
                            &keys::assignment(vm, Role::Primary),
                            encode(&assignment),
                            None,
                        )
                        .await?;
                    if let Some(count) = load.get_mut(&host) {
                        *count += 1;
                    }
                    summary.placed += 1;
                    self.event(
                        Some(vm),
                        "placed",
                        format!("primary of {vm} placed on {host}"),
                    )
                    .await?;
                    PrimaryState::Starting(host)
                }
                Err(err) => PrimaryState::Unplaced(format!("cannot place the primary: {err}")),
            },
        };

        let previous = record
            .status
            .as_ref()
            .filter(|status| status.uid == spec.uid);
        let was_running = previous.is_some_and(|status| status.primary_running);
        let mut last_failover = previous.and_then(|status| status.last_failover.clone());
        let mut planned_backup_host = None;
        let (protection, reason) = match &primary {
            PrimaryState::Unplaced(reason) => (Protection::Down, reason.clone()),
            PrimaryState::Starting(host) => {
                (Protection::Down, format!("primary starting on {host}"))
            }
            PrimaryState::Running(host) => {
                let reason = match placement::place_backup(&spec.hosts, load, host) {
                    Ok(backup) => {
                        planned_backup_host = Some(backup.clone());
                        format!("need secondary: {NO_BACKUP_ROLE} (backup host would be {backup})")
                    }
                    Err(err) => format!("need secondary: {err}"),
                };
                (Protection::NotProtected, reason)
            }
            PrimaryState::PoweredOff(host, code) => (
                Protection::Down,
                format!("the guest powered off on {host} (code {code})"),
            ),
            PrimaryState::Lost(host, how) => {
                let reason = format!("primary {how}; no backup to take over");
                if was_running {
                    last_failover = Some(Failover {
                        unix_ms: now_unix_ms(),
                        from_host: host.clone(),
                        to_host: None,
                        reason: reason.clone(),
                    });
                    summary.failovers += 1;
                    metrics::failover();
                    self.event(
                        Some(vm),
                        "failover",
                        format!("{vm}: primary {how}; no backup could go live, the VM is down"),
                    )
                    .await?;
                }
                (Protection::Down, reason)
            }
        };

        let status = VmStatus {
            uid: spec.uid.clone(),
            protection,
            reason,
            planned_backup_host,
            primary_running: matches!(primary, PrimaryState::Running(_)),
            last_failover,
            updated_unix_ms: 0,
        };
        let unchanged = previous.is_some_and(|previous| {
            VmStatus {
                updated_unix_ms: 0,
                ..previous.clone()
            } == status
        });
        if !unchanged {
            let status = VmStatus {
                updated_unix_ms: now_unix_ms(),
                ..status
            };
            self.store
                .put(&keys::status(vm), encode(&status), None)
                .await?;
        }
        Ok(protection)
    }

    fn primary_state(
        &self,
        record: &VmRecord,
        assignment: &Assignment,
        hosts: &BTreeMap<HostName, HostRecord>,
    ) -> PrimaryState {
        let host = assignment.host.clone();
        if !hosts.contains_key(&host) {
            return PrimaryState::Lost(host.clone(), format!("lost: host {host} is down"));
        }
        match record.report_for(Role::Primary, assignment) {
            None => PrimaryState::Starting(host),
            Some(report) if report.state == ProcessState::Running => PrimaryState::Running(host),
            Some(report)
                if report
                    .exit_code
                    .is_some_and(|code| (0..=GUEST_EXIT_MAX).contains(&code)) =>
            {
                PrimaryState::PoweredOff(host, report.exit_code.unwrap_or_default())
            }
            Some(report) => {
                let how = report.exit.as_deref().unwrap_or("ended");
                PrimaryState::Lost(host.clone(), format!("exited on {host} ({how})"))
            }
        }
    }

    /// A VM without a spec is being deleted: drop its assignments (the hosts then stop
    /// the replicas and withdraw their reports), and once no live host reports a replica,
    /// remove what is left.
    async fn clean_up(
        &self,
        vm: &VmName,
        record: &VmRecord,
        hosts: &BTreeMap<HostName, HostRecord>,
        summary: &mut PassSummary,
    ) -> Result<(), StoreError> {
        for role in record.assignments.keys() {
            self.store.delete(&keys::assignment(vm, *role)).await?;
        }
        let reported_live = record
            .reports
            .values()
            .any(|report| hosts.contains_key(&report.host));
        if !reported_live {
            // Key by key, never the whole prefix: a VM of the same name may be created
            // while this runs, and its spec must survive.
            self.store.delete(&keys::status(vm)).await?;
            for role in record.reports.keys() {
                self.store.delete(&keys::report(vm, *role)).await?;
            }
            summary.removed += 1;
        }
        Ok(())
    }
}
