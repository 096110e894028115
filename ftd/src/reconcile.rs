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
//! | running, alone | exited / host down / none | a clone is placed: need secondary: backup exited on b (...); backup starting on c (a clone of the primary on a) |
//! | running, not alone yet | exited / host down / none | Not protected: need secondary: ...; the primary on a has not noticed its backup is gone yet; backup host would be c |
//! | host down / exited, or the backup says role=live | running | Not protected: need secondary: primary exited on a (signal 9); the backup on b went live (then promoted) / takes over (claim pending) |
//! | host down | none or not running | Down: primary lost, host a is down; no backup to take over |
//! | exited (signal, or ftvmm failure status 64+) | none or not running | Down: primary exited on a (signal 9); no backup to take over |
//! | guest powered off (ftvmm exit status 0..=63) | | Down: the guest powered off on a (code 0); not a failover |
//!
//! Whether a primary is protected is its own word: its ftd samples the control socket
//! (`status`: `protected=1` while the backup is connected and following) and puts it in
//! the replica's report. Entering and leaving Protected are events (`protected`,
//! `unprotected`); so are `failover`, `promoted` and `backup-placed`.
//!
//! A change from "running" to "lost/exited" is a failover: it is recorded in the status
//! (`last_failover`), the event log and `ftd_failovers_total`.

use crate::events::EventLog;
use crate::keys;
use crate::metrics;
use crate::model::{
    now_unix_ms, Assignment, Failover, HostName, HostRecord, PairState, ProcessState, Protection,
    Role, VmName, VmSpec, VmStatus,
};
use crate::placement::{self, Load};
use crate::records::{encode, load_hosts, load_vms, VmRecord};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Highest offset tried above a host's `log_port_base`.
const LOG_PORT_SPAN: u16 = 1000;
/// How long after a backup ended (a clone refused or cut) the next one is placed.
const CLONE_RETRY_MS: u64 = 2000;

/// What one pass shares between VMs: the live hosts, their load, the listen addresses
/// taken, and what was done.
struct Pass<'a> {
    hosts: &'a BTreeMap<HostName, HostRecord>,
    load: Load,
    addresses: BTreeSet<String>,
    summary: PassSummary,
}

/// Why a VM has no backup following, and the host the next one would go to.
struct NextBackup {
    reason: String,
    planned: Option<HostName>,
}

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

/// The state of a backup as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BackupState {
    /// No backup assignment of the primary's generation.
    None,
    Starting(HostName),
    Running(HostName),
    Lost(String),
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

        let mut pass = Pass {
            hosts: &hosts,
            load: hosts.keys().map(|host| (host.clone(), 0)).collect(),
            addresses: BTreeSet::new(),
            summary: PassSummary::default(),
        };
        for record in vms.values() {
            for assignment in record.assignments.values() {
                let listens = [&assignment.log_address, &assignment.clone_listen];
                pass.addresses
                    .extend(listens.into_iter().flatten().cloned());
            }
            for role in Role::ALL {
                if let Some(assignment) = record.current_assignment(role) {
                    if let Some(count) = pass.load.get_mut(&assignment.host) {
                        *count += 1;
                    }
                }
            }
        }

        let mut counts: BTreeMap<Protection, usize> = BTreeMap::new();
        for (vm, record) in &vms {
            if record.spec.is_some() {
                let protection = self.reconcile_vm(vm, record, &mut pass).await?;
                *counts.entry(protection).or_default() += 1;
            } else {
                self.clean_up(vm, record, &hosts, &mut pass.summary).await?;
            }
        }
        let summary = pass.summary;
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
        pass: &mut Pass<'_>,
    ) -> Result<Protection, StoreError> {
        let Some(spec) = &record.spec else {
            return Ok(Protection::Down);
        };
        let hosts = pass.hosts;
        // Assignments of an older incarnation of this name are dropped (their hosts stop
        // those replicas).
        for (role, assignment) in &record.assignments {
            if assignment.uid != spec.uid {
                self.store.delete(&keys::assignment(vm, *role)).await?;
            }
        }

        let previous = record
            .status
            .as_ref()
            .filter(|status| status.uid == spec.uid);
        // Replica numbers are never reused within an incarnation: a number lives on in
        // the status after its assignment and report are gone.
        let mut numbered = previous
            .map_or(0, |status| status.last_replica)
            .max(record.last_replica());
        let primary_assignment = record.current_assignment(Role::Primary);
        let mut primary = match primary_assignment {
            Some(assignment) => self.primary_state(record, assignment, hosts),
            None => match placement::place_primary(&spec.hosts, &pass.load) {
                Ok(host) => {
                    self.place_pair(vm, spec, host.clone(), &mut numbered, pass)
                        .await?;
                    PrimaryState::Starting(host)
                }
                Err(err) => PrimaryState::Unplaced(format!("cannot place the primary: {err}")),
            },
        };
        let backup_assignment = primary_assignment.and_then(|primary| {
            record
                .current_assignment(Role::Backup)
                .filter(|backup| paired(primary, backup))
        });
        let backup = match backup_assignment {
            // None when the pair was placed in this pass: the backup is starting (if it
            // was placed) and does not count for the status yet.
            None => BackupState::None,
            Some(backup) => Self::backup_state(record, backup, hosts),
        };
        // What each replica last said on its control socket (through its ftd's report).
        let pair_state =
            |assignment: Option<&Assignment>| record.report_for(assignment?)?.pair.as_ref();
        let primary_pair = pair_state(primary_assignment);
        // A backup that went live is the VM now, even while the primary's host still
        // looks registered (its lease has not run out yet): the pair itself decided.
        let backup_live = matches!(backup, BackupState::Running(_))
            && pair_state(backup_assignment).is_some_and(|pair| pair.role == "live");
        if let (true, PrimaryState::Running(host)) = (backup_live, &primary) {
            primary = PrimaryState::Lost(
                host.clone(),
                format!("lost on {host} (silent to its backup)"),
            );
        }

        let was_running = previous.is_some_and(|status| status.primary_running);
        let mut last_failover = previous.and_then(|status| status.last_failover.clone());
        // A new backup avoids the host the last failover came from.
        let failed_host = last_failover.as_ref().map(|failover| &failover.from_host);
        let mut planned_backup_host = None;
        let (protection, reason) = match (&primary, primary_assignment) {
            (PrimaryState::Unplaced(reason), _) => (Protection::Down, reason.clone()),
            (PrimaryState::Starting(host), _) => {
                (Protection::Down, format!("primary starting on {host}"))
            }
            (PrimaryState::Running(host), Some(primary)) => {
                match (&backup, backup_assignment) {
                    // Both processes running is not enough: the primary says whether its
                    // backup is connected and following (`protected=1`).
                    (BackupState::Running(backup), Some(assignment)) if assignment.retiring => (
                        Protection::NotProtected,
                        format!("need secondary: restarting the backup: stopping it on {backup}"),
                    ),
                    (BackupState::Running(backup), Some(assignment)) => {
                        let cloning = assignment.clone_from.is_some()
                            && primary_pair.and_then(|pair| pair.generation)
                                < Some(assignment.generation);
                        match primary_pair {
                            Some(pair) if pair.protected => (Protection::Protected, String::new()),
                            _ if cloning => (
                                Protection::NotProtected,
                                format!("backup cloning: {backup} copies the running primary on {host}"),
                            ),
                            Some(pair) if pair.peer_lost => (
                                Protection::NotProtected,
                                format!("need secondary: the primary on {host} lost its backup on {backup}"),
                            ),
                            Some(pair) if pair.state == "booting" => (
                                Protection::NotProtected,
                                format!("backup connecting: the primary on {host} waits for its backup on {backup}"),
                            ),
                            Some(_) => (
                                Protection::NotProtected,
                                format!("backup connecting on {backup}"),
                            ),
                            None => (
                                Protection::NotProtected,
                                format!("backup connecting: the primary on {host} has not answered on its control socket yet"),
                            ),
                        }
                    }
                    (BackupState::Starting(backup), _) => (
                        Protection::NotProtected,
                        format!("need secondary: backup starting on {backup}"),
                    ),
                    (BackupState::Lost(how), _) => {
                        let lost = format!("backup {how}");
                        // A backup stopped on request is replaced at once; one that ended
                        // by itself (a clone refused or cut) after a pause.
                        let ended = backup_assignment
                            .filter(|backup| !backup.retiring)
                            .and_then(|backup| record.report_for(backup))
                            .filter(|report| report.state == ProcessState::Exited)
                            .map(|report| report.unix_ms);
                        let next = self
                            .clone_backup(
                                vm,
                                spec,
                                primary,
                                primary_pair,
                                ended,
                                failed_host,
                                &mut numbered,
                                pass,
                            )
                            .await?;
                        planned_backup_host = next.planned;
                        (
                            Protection::NotProtected,
                            format!("need secondary: {lost}; {}", next.reason),
                        )
                    }
                    (BackupState::None | BackupState::Running(_), _) => {
                        let next = self
                            .clone_backup(
                                vm,
                                spec,
                                primary,
                                primary_pair,
                                None,
                                failed_host,
                                &mut numbered,
                                pass,
                            )
                            .await?;
                        planned_backup_host = next.planned;
                        (
                            Protection::NotProtected,
                            format!("need secondary: {}", next.reason),
                        )
                    }
                }
            }
            (PrimaryState::Running(host), None) => {
                (Protection::Down, format!("primary starting on {host}"))
            }
            (PrimaryState::PoweredOff(host, code), _) => (
                Protection::Down,
                format!("the guest powered off on {host} (code {code})"),
            ),
            (PrimaryState::Lost(host, how), _) => {
                let survivor = match (&backup, backup_assignment) {
                    (BackupState::Running(_), Some(backup)) => Some(backup),
                    _ => None,
                };
                let live = match survivor {
                    Some(_) => backup_live || self.backup_went_live(vm, record).await?,
                    None => false,
                };
                let (protection, reason, event) = match survivor {
                    Some(backup) => {
                        let backup = &backup.host;
                        let outcome = if live {
                            format!("the backup on {backup} went live")
                        } else {
                            format!("the backup on {backup} takes over (go-live claim pending)")
                        };
                        (
                            Protection::NotProtected,
                            format!("primary {how}; {outcome}"),
                            format!("{vm}: primary {how}; {outcome}"),
                        )
                    }
                    None => (
                        Protection::Down,
                        format!("primary {how}; no backup to take over"),
                        format!("{vm}: primary {how}; no backup could go live, the VM is down"),
                    ),
                };
                if was_running {
                    last_failover = Some(Failover {
                        unix_ms: now_unix_ms(),
                        from_host: host.clone(),
                        to_host: survivor.map(|backup| backup.host.clone()),
                        reason: reason.clone(),
                    });
                    pass.summary.failovers += 1;
                    metrics::failover();
                    self.event(Some(vm), "failover", event).await?;
                }
                if let (true, Some(backup)) = (live, survivor) {
                    self.promote(vm, backup).await?;
                }
                match survivor {
                    Some(_) => (protection, format!("need secondary: {reason}")),
                    None => (protection, reason),
                }
            }
        };

        let status = VmStatus {
            uid: spec.uid.clone(),
            protection,
            reason,
            planned_backup_host,
            primary_running: matches!(primary, PrimaryState::Running(_)),
            last_failover,
            last_replica: numbered,
            updated_unix_ms: 0,
        };
        let was_protected =
            previous.is_some_and(|previous| previous.protection == Protection::Protected);
        if protection == Protection::Protected && !was_protected {
            self.event(Some(vm), "protected", format!("{vm} is protected"))
                .await?;
        } else if protection != Protection::Protected
            && was_protected
            && !matches!(primary, PrimaryState::Lost(..))
        {
            // (A failover has its own event.)
            self.event(
                Some(vm),
                "unprotected",
                format!("{vm} is not protected: {}", status.reason),
            )
            .await?;
        }
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

    /// Makes the backup that went live the primary: the same replica (its host keeps the
    /// process running) in the primary's place, so that the next pass clones a new backup
    /// from it. The old primary's host stops whatever is left of the old primary.
    async fn promote(&self, vm: &VmName, backup: &Assignment) -> Result<(), StoreError> {
        let promoted = Assignment {
            log_address: None,
            clone_from: None,
            retiring: false,
            ..backup.clone()
        };
        self.store
            .put(
                &keys::assignment(vm, Role::Primary),
                encode(&promoted),
                None,
            )
            .await?;
        self.store
            .delete(&keys::assignment(vm, Role::Backup))
            .await?;
        self.event(
            Some(vm),
            "promoted",
            format!(
                "{vm}: the replica on {} is the primary now (generation {})",
                backup.host, backup.generation
            ),
        )
        .await?;
        Ok(())
    }

    /// Places a new backup of the running `primary` that is made by cloning it, when it
    /// runs alone and a host can take the backup; otherwise says what the VM waits for.
    /// `ended`: when the previous backup was seen to end (a clone that failed is retried
    /// after [`CLONE_RETRY_MS`]); `avoid`: a host to use only when no other is left;
    /// `numbered`: the highest replica number used so far.
    #[allow(clippy::too_many_arguments)]
    async fn clone_backup(
        &self,
        vm: &VmName,
        spec: &VmSpec,
        primary: &Assignment,
        pair: Option<&PairState>,
        ended: Option<u64>,
        avoid: Option<&HostName>,
        numbered: &mut u64,
        pass: &mut Pass<'_>,
    ) -> Result<NextBackup, StoreError> {
        let source_host = &primary.host;
        let wait = |reason: String, planned: Option<&HostName>| NextBackup {
            reason,
            planned: planned.cloned(),
        };
        let Some(source) = &primary.clone_listen else {
            return Ok(wait(
                format!("the primary on {source_host} was started without a clone address, so no backup can join it"),
                None,
            ));
        };
        let capable = |host: &HostName| {
            pass.hosts
                .get(host)
                .is_some_and(|record| record.backup_capable)
        };
        if !capable(source_host) {
            return Ok(wait(
                format!("the ftvmm on {source_host} cannot run pairs"),
                None,
            ));
        }
        let candidates: Load = pass
            .load
            .iter()
            .filter(|(host, _)| capable(host))
            .map(|(host, count)| (host.clone(), *count))
            .collect();
        let target = match placement::place_new_backup(&spec.hosts, &candidates, source_host, avoid)
        {
            Ok(target) => target,
            Err(err) => return Ok(wait(err.to_string(), None)),
        };
        let Some(generation) = pair
            .filter(|pair| pair.runs_alone())
            .and_then(|pair| pair.generation)
        else {
            let why = match pair {
                Some(pair) if pair.state == "booting" => format!(
                    "the primary on {source_host} still waits for its first backup (it runs alone after its --backup-wait)"
                ),
                Some(pair) if pair.protected && pair.role == "primary" => format!(
                    "the primary on {source_host} has not noticed its backup is gone yet"
                ),
                _ => format!("waiting for the primary on {source_host} to run alone"),
            };
            return Ok(wait(
                format!("{why}; backup host would be {target}"),
                Some(&target),
            ));
        };
        if ended.is_some_and(|at| now_unix_ms().saturating_sub(at) < CLONE_RETRY_MS) {
            return Ok(wait(
                format!("a new backup will be cloned onto {target} shortly"),
                Some(&target),
            ));
        }
        let Some(clone_listen) = pass
            .hosts
            .get(&target)
            .and_then(|host| pick_address(host, &pass.addresses))
        else {
            return Ok(wait(
                format!("host {target} has no free port for a replica"),
                None,
            ));
        };
        // The pair the clone makes is the primary's next generation (ftvmm offers exactly
        // that one; a backup started for another refuses the clone).
        let generation = generation + 1;
        *numbered += 1;
        let replica = *numbered;
        let backup = Assignment {
            host: target.clone(),
            generation,
            uid: spec.uid.clone(),
            replica,
            log_address: None,
            clone_listen: Some(clone_listen.clone()),
            clone_from: Some(source.clone()),
            retiring: false,
        };
        let primary = Assignment {
            generation,
            ..primary.clone()
        };
        self.store
            .put(&keys::assignment(vm, Role::Primary), encode(&primary), None)
            .await?;
        self.store
            .put(&keys::assignment(vm, Role::Backup), encode(&backup), None)
            .await?;
        pass.addresses.insert(clone_listen);
        if let Some(count) = pass.load.get_mut(&target) {
            *count += 1;
        }
        pass.summary.placed += 1;
        self.event(
            Some(vm),
            "backup-placed",
            format!("{vm}: new backup on {target}, cloned from the running primary on {source_host} (generation {generation})"),
        )
        .await?;
        Ok(wait(
            format!("backup starting on {target} (a clone of the primary on {source_host})"),
            None,
        ))
    }

    /// Places the primary of `vm` on `host` and, when another live host can run the backup,
    /// the backup too, both under generation 1 with one log address. Each replica also
    /// gets a clone address, so that it can take a new backup whenever it runs alone.
    async fn place_pair(
        &self,
        vm: &VmName,
        spec: &VmSpec,
        host: HostName,
        numbered: &mut u64,
        pass: &mut Pass<'_>,
    ) -> Result<(), StoreError> {
        let hosts = pass.hosts;
        // Above any number an older incarnation of the name left in reports.
        let first_replica = *numbered + 1;
        *numbered += 2;
        let backup_host = placement::place_backup(&spec.hosts, &pass.load, &host)
            .ok()
            .filter(|backup| {
                [&host, backup]
                    .iter()
                    .all(|h| hosts.get(*h).is_some_and(|record| record.backup_capable))
            });
        let mut take_address = |on: &HostName| {
            let address = pick_address(hosts.get(on)?, &pass.addresses)?;
            pass.addresses.insert(address.clone());
            Some(address)
        };
        let log_address = backup_host.as_ref().and_then(|_| take_address(&host));
        let backup_host = backup_host.filter(|_| log_address.is_some());
        let capable = hosts.get(&host).is_some_and(|record| record.backup_capable);
        let primary_clone = capable.then(|| take_address(&host)).flatten();
        if let Some(backup) = &backup_host {
            let assignment = Assignment {
                host: backup.clone(),
                generation: 1,
                uid: spec.uid.clone(),
                replica: first_replica + 1,
                log_address: log_address.clone(),
                clone_listen: take_address(backup),
                clone_from: None,
                retiring: false,
            };
            self.store
                .put(
                    &keys::assignment(vm, Role::Backup),
                    encode(&assignment),
                    None,
                )
                .await?;
        }
        let assignment = Assignment {
            host: host.clone(),
            generation: 1,
            uid: spec.uid.clone(),
            replica: first_replica,
            log_address,
            clone_listen: primary_clone,
            clone_from: None,
            retiring: false,
        };
        self.store
            .put(
                &keys::assignment(vm, Role::Primary),
                encode(&assignment),
                None,
            )
            .await?;
        for placed in std::iter::once(&host).chain(backup_host.as_ref()) {
            if let Some(count) = pass.load.get_mut(placed) {
                *count += 1;
            }
            pass.summary.placed += 1;
        }
        let message = match &backup_host {
            Some(backup) => format!("primary of {vm} placed on {host}, backup on {backup}"),
            None => {
                format!(
                    "primary of {vm} placed on {host} (no backup yet: no second host can run one)"
                )
            }
        };
        self.event(Some(vm), "placed", message).await?;
        Ok(())
    }

    /// The state of the backup of `assignment`, as its host reports it.
    fn backup_state(
        record: &VmRecord,
        assignment: &Assignment,
        hosts: &BTreeMap<HostName, HostRecord>,
    ) -> BackupState {
        let host = assignment.host.clone();
        if !hosts.contains_key(&host) {
            return BackupState::Lost(format!("lost: host {host} is down"));
        }
        match record.report_for(assignment) {
            None => BackupState::Starting(host),
            Some(report) if report.state == ProcessState::Running => BackupState::Running(host),
            Some(report) => {
                let how = report.exit.as_deref().unwrap_or("ended");
                BackupState::Lost(format!("exited on {host} ({how})"))
            }
        }
    }

    /// Whether the backup holds the go-live claim of the primary's generation (the key
    /// ftvmm's etcd arbiter writes, the claimant `backup@<host>/<pid>`).
    async fn backup_went_live(&self, vm: &VmName, record: &VmRecord) -> Result<bool, StoreError> {
        let Some(primary) = record.current_assignment(Role::Primary) else {
            return Ok(false);
        };
        let key = keys::go_live_claim(vm, primary.generation);
        Ok(self
            .store
            .get(&key)
            .await?
            .is_some_and(|kv| kv.value.starts_with(b"backup@")))
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
        match record.report_for(assignment) {
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
            for replica in record.reports.keys() {
                self.store.delete(&keys::report(vm, *replica)).await?;
            }
            summary.removed += 1;
        }
        Ok(())
    }
}

/// Whether `backup` is the backup of `primary`'s pair: the same generation, and either
/// the same log channel or made by cloning.
fn paired(primary: &Assignment, backup: &Assignment) -> bool {
    backup.generation == primary.generation
        && (backup.clone_from.is_some()
            || (primary.log_address.is_some() && backup.log_address == primary.log_address))
}

/// The first free listen address on `host` (for a log channel or a clone): its
/// `log_listen_ip`, port `log_port_base + k` for the lowest `k` no assignment in `used`
/// has. `None` for an ftd that does not announce a log address, or when the span is full.
fn pick_address(host: &HostRecord, used: &BTreeSet<String>) -> Option<String> {
    let ip: std::net::IpAddr = host.log_listen_ip.as_deref()?.parse().ok()?;
    let base = host.log_port_base?;
    (0..LOG_PORT_SPAN)
        .filter_map(|offset| base.checked_add(offset))
        .map(|port| std::net::SocketAddr::new(ip, port).to_string())
        .find(|address| !used.contains(address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PairState, ReplicaReport};
    use crate::store::memory::MemStore;

    /// A leader's reconciler over an in-memory store with hosts a, b and c; replica
    /// reports are written by the test as the hosts' ftds would.
    struct Harness {
        store: Arc<dyn Store>,
        reconciler: Reconciler,
        vm: VmName,
        uid: String,
    }

    fn host_name(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    impl Harness {
        async fn new(hosts: &[&str]) -> Harness {
            let store: Arc<dyn Store> = Arc::new(MemStore::new());
            let events = Arc::new(EventLog::new(store.clone()));
            let harness = Harness {
                reconciler: Reconciler::new(store.clone(), events),
                store,
                vm: VmName::new("web1").expect("valid name"),
                uid: "u1".into(),
            };
            for (index, name) in hosts.iter().enumerate() {
                harness.host_up(name, index).await;
            }
            let spec = VmSpec {
                uid: harness.uid.clone(),
                ..VmSpec::validate(&crate::model::VmRequest {
                    name: "web1".into(),
                    image: "/img/kv.elf".into(),
                    mem_bytes: 64 << 20,
                    hosts: vec!["a".into(), "b".into()],
                    ..Default::default()
                })
                .expect("valid spec")
            };
            harness
                .store
                .put(&keys::spec(&harness.vm), encode(&spec), None)
                .await
                .expect("put spec");
            harness
        }

        async fn host_up(&self, name: &str, index: usize) {
            let record = HostRecord {
                name: host_name(name),
                grpc_address: String::new(),
                metrics_address: String::new(),
                version: String::new(),
                backup_capable: true,
                log_listen_ip: Some(format!("10.0.0.{}", 11 + index)),
                log_port_base: Some(7800),
                started_unix_ms: 0,
            };
            self.store
                .put(&keys::host(name), encode(&record), None)
                .await
                .expect("put host");
        }

        async fn host_down(&self, name: &str) {
            self.store
                .delete(&keys::host(name))
                .await
                .expect("delete host");
        }

        async fn record(&self) -> VmRecord {
            load_vms(&*self.store, Some(&self.vm))
                .await
                .expect("load")
                .remove(&self.vm)
                .expect("the vm")
        }

        async fn assignment(&self, role: Role) -> Option<Assignment> {
            self.record().await.assignments.get(&role).cloned()
        }

        async fn status(&self) -> VmStatus {
            self.record().await.status.expect("a status")
        }

        /// The report of a running replica whose control socket says `pair`: (role,
        /// state, protected, peer_lost, generation).
        async fn running(&self, role: Role, pair: (&str, &str, bool, bool, u64)) {
            self.report(role, Some(pair), None).await;
        }

        /// The report of a replica that ended (`how`: `exit status 75`, ...).
        async fn exited(&self, role: Role, how: &str) {
            self.report(role, None, Some(how)).await;
        }

        /// Both replicas running and following each other in `generation`.
        async fn both_protected(&self, generation: u64) {
            self.running(
                Role::Primary,
                ("primary", "running", true, false, generation),
            )
            .await;
            self.running(Role::Backup, ("backup", "running", true, false, generation))
                .await;
        }

        /// The report the ftd of the assignment's host would put: running with `pair`
        /// (role, state, protected, peer_lost, generation), or exited with `exit`.
        async fn report(
            &self,
            role: Role,
            pair: Option<(&str, &str, bool, bool, u64)>,
            exit: Option<&str>,
        ) {
            let assignment = self.assignment(role).await.expect("assigned");
            let report = ReplicaReport {
                host: assignment.host.clone(),
                uid: self.uid.clone(),
                replica: assignment.replica,
                generation: assignment.generation,
                state: if exit.is_some() {
                    ProcessState::Exited
                } else {
                    ProcessState::Running
                },
                pid: 100 + u32::try_from(assignment.replica).unwrap_or(0),
                exit: exit.map(str::to_owned),
                exit_code: None,
                pair: pair.map(
                    |(role, state, protected, peer_lost, generation)| PairState {
                        role: role.into(),
                        state: state.into(),
                        protected,
                        peer_lost,
                        generation: Some(generation),
                    },
                ),
                unix_ms: now_unix_ms(),
            };
            self.store
                .put(
                    &keys::report(&self.vm, assignment.replica),
                    encode(&report),
                    None,
                )
                .await
                .expect("put report");
        }

        async fn pass(&self) -> PassSummary {
            self.reconciler.pass().await.expect("a pass")
        }
    }

    /// A pair placed on a and b, both running, the primary protected.
    async fn protected_pair(hosts: &[&str]) -> Harness {
        let harness = Harness::new(hosts).await;
        harness.pass().await;
        harness.both_protected(1).await;
        harness.pass().await;
        assert_eq!(harness.status().await.protection, Protection::Protected);
        harness
    }

    #[tokio::test]
    async fn a_pair_gets_numbered_replicas_with_clone_addresses() {
        let harness = Harness::new(&["a", "b", "c"]).await;
        assert_eq!(harness.pass().await.placed, 2);
        let primary = harness.assignment(Role::Primary).await.expect("primary");
        let backup = harness.assignment(Role::Backup).await.expect("backup");
        assert_eq!((primary.host.as_str(), primary.replica), ("a", 1));
        assert_eq!((backup.host.as_str(), backup.replica), ("b", 2));
        assert_eq!(primary.log_address.as_deref(), Some("10.0.0.11:7800"));
        assert_eq!(backup.log_address, primary.log_address);
        assert_eq!(primary.clone_listen.as_deref(), Some("10.0.0.11:7801"));
        assert_eq!(backup.clone_listen.as_deref(), Some("10.0.0.12:7800"));
        assert_eq!(backup.clone_from, None);
    }

    #[tokio::test]
    async fn a_backup_that_went_live_is_made_primary_and_cloned_onto_a_third_host() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        let old_backup = harness.assignment(Role::Backup).await.expect("backup");

        // Host a dies; the backup went live (it says so on its control socket).
        harness.host_down("a").await;
        harness
            .running(Role::Backup, ("live", "running", false, true, 1))
            .await;
        assert_eq!(harness.pass().await.failovers, 1);
        let promoted = harness.assignment(Role::Primary).await.expect("primary");
        assert_eq!(
            (
                promoted.host.as_str(),
                promoted.replica,
                promoted.generation
            ),
            ("b", old_backup.replica, 1)
        );
        assert_eq!(harness.assignment(Role::Backup).await, None);
        let status = harness.status().await;
        assert_eq!(
            status.last_failover.expect("recorded").to_host,
            Some(host_name("b"))
        );

        // The next pass clones a new backup from it onto c (a is down), generation 2.
        let summary = harness.pass().await;
        assert_eq!((summary.placed, summary.failovers), (1, 0));
        let primary = harness.assignment(Role::Primary).await.expect("primary");
        let backup = harness.assignment(Role::Backup).await.expect("backup");
        assert_eq!(
            (primary.replica, primary.generation),
            (old_backup.replica, 2)
        );
        assert_eq!(
            (backup.host.as_str(), backup.generation, backup.replica),
            ("c", 2, 3)
        );
        assert_eq!(backup.clone_from, old_backup.clone_listen);
        assert_eq!(backup.log_address, None);
        assert!(harness
            .status()
            .await
            .reason
            .contains("backup starting on c"));

        // Cloning, then protected: the primary says generation 2, protected.
        harness
            .running(Role::Backup, ("backup", "booting", false, false, 2))
            .await;
        harness.pass().await;
        assert!(
            harness.status().await.reason.starts_with("backup cloning"),
            "{}",
            harness.status().await.reason
        );
        harness.both_protected(2).await;
        harness.pass().await;
        assert_eq!(harness.status().await.protection, Protection::Protected);
    }

    #[tokio::test]
    async fn no_backup_is_cloned_before_the_primary_runs_alone() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        harness.host_down("b").await;
        // The primary has not noticed yet: still protected=1 in its last report.
        harness.pass().await;
        assert_eq!(
            harness
                .assignment(Role::Backup)
                .await
                .expect("old backup")
                .host
                .as_str(),
            "b"
        );
        let status = harness.status().await;
        assert_eq!(status.protection, Protection::NotProtected);
        assert!(
            status.reason.contains("has not noticed"),
            "{}",
            status.reason
        );
        assert_eq!(status.planned_backup_host, Some(host_name("c")));
        // Now it runs alone: the clone goes to c with the primary's next generation.
        harness
            .running(Role::Primary, ("primary", "running", false, true, 1))
            .await;
        harness.pass().await;
        let backup = harness.assignment(Role::Backup).await.expect("new backup");
        assert_eq!(
            (backup.host.as_str(), backup.generation, backup.replica),
            ("c", 2, 3)
        );
    }

    #[tokio::test]
    async fn a_failed_clone_is_retried_later_under_a_new_replica_number() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        harness.host_down("b").await;
        harness
            .running(Role::Primary, ("primary", "running", false, true, 1))
            .await;
        harness.pass().await;
        let first = harness.assignment(Role::Backup).await.expect("clone");
        // The clone is refused (ftvmm exit 75): not retried at once.
        harness.exited(Role::Backup, "exit status 75").await;
        harness.pass().await;
        assert_eq!(harness.assignment(Role::Backup).await, Some(first.clone()));
        assert!(harness.status().await.reason.contains("shortly"));
        // Its report says it ended long ago: the next pass places another.
        let mut record = harness.record().await;
        let mut report = record.reports.remove(&first.replica).expect("report");
        report.unix_ms -= CLONE_RETRY_MS;
        harness
            .store
            .put(
                &keys::report(&harness.vm, first.replica),
                encode(&report),
                None,
            )
            .await
            .expect("put");
        harness.pass().await;
        let second = harness
            .assignment(Role::Backup)
            .await
            .expect("second clone");
        assert_eq!((second.generation, second.replica), (2, first.replica + 1));
    }

    #[tokio::test]
    async fn replica_numbers_are_not_reused_after_a_backup_assignment_is_withdrawn() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        let old = harness.assignment(Role::Backup).await.expect("backup");
        // The backup's assignment is gone and its host forgot the report.
        harness
            .store
            .delete(&keys::assignment(&harness.vm, Role::Backup))
            .await
            .expect("delete");
        harness
            .store
            .delete(&keys::report(&harness.vm, old.replica))
            .await
            .expect("delete");
        harness
            .running(Role::Primary, ("primary", "running", false, true, 1))
            .await;
        harness.pass().await;
        let new = harness.assignment(Role::Backup).await.expect("new backup");
        assert_eq!(new.replica, old.replica + 1);
        assert_eq!(
            new.host.as_str(),
            "b",
            "the named host is preferred when live"
        );
    }

    /// Marks the backup retiring, as `ftctl restart-backup` does.
    async fn restart_backup(harness: &Harness) -> Assignment {
        let backup = harness.assignment(Role::Backup).await.expect("backup");
        let retiring = Assignment {
            retiring: true,
            ..backup.clone()
        };
        harness
            .store
            .put(
                &keys::assignment(&harness.vm, Role::Backup),
                encode(&retiring),
                None,
            )
            .await
            .expect("put");
        backup
    }

    #[tokio::test]
    async fn a_backup_stopped_for_a_restart_is_replaced_by_a_clone_at_once() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        let old = restart_backup(&harness).await;
        harness.pass().await;
        let status = harness.status().await;
        assert_eq!(status.protection, Protection::NotProtected);
        assert!(
            status.reason.contains("restarting the backup"),
            "{}",
            status.reason
        );
        // Its host stopped it (exit 143) and the primary runs alone: no retry pause.
        harness.exited(Role::Backup, "exit status 143").await;
        harness
            .running(Role::Primary, ("primary", "running", false, true, 1))
            .await;
        harness.pass().await;
        let new = harness.assignment(Role::Backup).await.expect("new backup");
        assert_eq!((new.replica, new.generation), (old.replica + 1, 2));
        assert!(!new.retiring && new.clone_from.is_some(), "{new:?}");
    }

    #[tokio::test]
    async fn a_backup_that_went_live_while_being_restarted_is_promoted() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        let old = restart_backup(&harness).await;
        harness.pass().await;
        // The primary died meanwhile; the backup refused to stop and went live.
        harness.exited(Role::Primary, "signal 9").await;
        harness
            .running(Role::Backup, ("live", "running", false, true, 1))
            .await;
        harness.pass().await;
        let primary = harness.assignment(Role::Primary).await.expect("primary");
        assert_eq!((primary.host.as_str(), primary.replica), ("b", old.replica));
        assert!(!primary.retiring, "{primary:?}");
        assert_eq!(harness.status().await.protection, Protection::NotProtected);
    }

    #[tokio::test]
    async fn a_backup_whose_claim_is_pending_is_not_promoted() {
        let harness = protected_pair(&["a", "b", "c"]).await;
        harness.exited(Role::Primary, "signal 9").await;
        harness.pass().await;
        let primary = harness.assignment(Role::Primary).await.expect("primary");
        assert_eq!(primary.host.as_str(), "a", "no claim yet: nothing moves");
        assert!(harness.status().await.reason.contains("claim pending"));
        // The claim is the backup's: promoted.
        harness
            .store
            .put("/ft/vms/web1/gen/1/live", b"backup@b/1".to_vec(), None)
            .await
            .expect("put claim");
        harness.pass().await;
        assert_eq!(
            harness
                .assignment(Role::Primary)
                .await
                .expect("primary")
                .host
                .as_str(),
            "b"
        );
    }

    #[test]
    fn log_addresses_take_the_lowest_free_port_above_the_base() {
        let host = HostRecord {
            name: HostName::new("a").expect("valid host name"),
            grpc_address: String::new(),
            metrics_address: String::new(),
            version: String::new(),
            backup_capable: true,
            log_listen_ip: Some("10.0.0.11".into()),
            log_port_base: Some(7800),
            started_unix_ms: 0,
        };
        let mut used = BTreeSet::new();
        assert_eq!(
            pick_address(&host, &used).as_deref(),
            Some("10.0.0.11:7800")
        );
        used.insert("10.0.0.11:7800".to_owned());
        used.insert("10.0.0.12:7801".to_owned());
        assert_eq!(
            pick_address(&host, &used).as_deref(),
            Some("10.0.0.11:7801")
        );
        let old = HostRecord {
            log_listen_ip: None,
            ..host
        };
        assert_eq!(pick_address(&old, &used), None);
    }
}
