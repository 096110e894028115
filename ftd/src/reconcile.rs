//! The leader's reconcile pass: compares the desired state (VM specs) with what the hosts
//! report, places replicas, records each VM's status and the failovers, and cleans up
//! after deleted VMs. Level-triggered: every pass reads everything and is idempotent, so
//! a new leader simply runs the next pass.
//!
//! Placing a VM places its pair at once: the primary, and the backup on another host
//! (anti-affinity) when one is live and both hosts' ftvmm can run a backup. Both
//! assignments carry generation 1 and the same log address (`IP:PORT` on the primary's
//! host: its `log_listen_ip` and `log_port_base` plus the lowest offset no other
//! assignment's address uses), so the primary listens where its backup connects. A primary
//! placed without a backup stays alone: a backup can only join a pair at its start
//! (cloning a running primary is planned).
//!
//! What a pass decides for one VM:
//!
//! | primary | backup | status |
//! |---|---|---|
//! | not placed, no host fits | | Down: cannot place the primary (host a is down / no live host) |
//! | placed, no report yet | | Down: primary starting on a |
//! | running, says protected=1 | running | Protected |
//! | running, not protected=1 yet | running | Not protected: backup connecting (...) |
//! | running, peer_lost=1 | running | Not protected: need secondary: the primary on a lost its backup on b |
//! | running | no report yet / exited / host down | Not protected: need secondary: backup starting on b / backup exited on b (...) / backup lost: host b is down |
//! | running | none | Not protected: need secondary: ... (backup host would be b) |
//! | host down / exited, or the backup says role=live | running | Not protected: need secondary: primary exited on a (signal 9); the backup on b went live / takes over |
//! | host down | none or not running | Down: primary lost, host a is down; no backup to take over |
//! | exited (signal, or ftvmm failure status 64+) | none or not running | Down: primary exited on a (signal 9); no backup to take over |
//! | guest powered off (ftvmm exit status 0..=63) | | Down: the guest powered off on a (code 0); not a failover |
//!
//! Whether a primary is protected is its own word: its ftd samples the control socket
//! (`status`: `protected=1` while the backup is connected and following) and puts it in
//! the replica's report. Entering and leaving Protected are events (`protected`,
//! `unprotected`).
//!
//! A change from "running" to "lost/exited" is a failover: it is recorded in the status
//! (`last_failover`), the event log and `ftd_failovers_total`. Whether the backup went
//! live is read from the pair's arbiter key (`/ft/vms/<vm>/gen/<n>/live`). Not done yet:
//! moving the primary assignment to the backup's host under the next generation and
//! placing a new backup.

use crate::events::EventLog;
use crate::keys;
use crate::metrics;
use crate::model::{
    now_unix_ms, Assignment, Failover, HostName, HostRecord, ProcessState, Protection, Role,
    VmName, VmSpec, VmStatus,
};
use crate::placement::{self, Load};
use crate::records::{encode, load_hosts, load_vms, VmRecord};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Why a primary that runs alone gets no backup later.
pub const NO_LATE_BACKUP: &str =
    "a backup can only join a pair at its start (cloning a running primary is planned)";

/// Highest offset tried above a host's `log_port_base`.
const LOG_PORT_SPAN: u16 = 1000;

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

        let mut load: Load = hosts.keys().map(|host| (host.clone(), 0)).collect();
        let mut log_addresses = BTreeSet::new();
        for record in vms.values() {
            for assignment in record.assignments.values() {
                if let Some(address) = &assignment.log_address {
                    log_addresses.insert(address.clone());
                }
            }
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
                    .reconcile_vm(
                        vm,
                        record,
                        &hosts,
                        &mut load,
                        &mut log_addresses,
                        &mut summary,
                    )
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
        log_addresses: &mut BTreeSet<String>,
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

        let mut primary = match record.current_assignment(Role::Primary) {
            Some(assignment) => self.primary_state(record, assignment, hosts),
            None => match placement::place_primary(&spec.hosts, load) {
                Ok(host) => {
                    self.place_pair(vm, spec, host.clone(), hosts, load, log_addresses, summary)
                        .await?;
                    PrimaryState::Starting(host)
                }
                Err(err) => PrimaryState::Unplaced(format!("cannot place the primary: {err}")),
            },
        };
        let backup = match record.current_assignment(Role::Primary) {
            // Placed in this pass: the backup is starting (if it was placed) and does not
            // count for the status yet.
            None => BackupState::None,
            Some(primary) => Self::backup_state(record, primary, hosts),
        };
        // What each replica last said on its control socket (through its ftd's report).
        let pair_state = |role| {
            let assignment = record.current_assignment(role)?;
            record.report_for(role, assignment)?.pair.as_ref()
        };
        let primary_pair = pair_state(Role::Primary);
        // A backup that went live is the VM now, even while the primary's host still
        // looks registered (its lease has not run out yet): the pair itself decided.
        let backup_live = matches!(backup, BackupState::Running(_))
            && pair_state(Role::Backup).is_some_and(|pair| pair.role == "live");
        if let (true, PrimaryState::Running(host)) = (backup_live, &primary) {
            primary = PrimaryState::Lost(
                host.clone(),
                format!("lost on {host} (silent to its backup)"),
            );
        }

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
                match &backup {
                    // Both processes running is not enough: the primary says whether its
                    // backup is connected and following (`protected=1`).
                    BackupState::Running(backup) => match primary_pair {
                        Some(pair) if pair.protected => (Protection::Protected, String::new()),
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
                    },
                    BackupState::Starting(backup) => (
                        Protection::NotProtected,
                        format!("need secondary: backup starting on {backup}"),
                    ),
                    BackupState::Lost(how) => (
                        Protection::NotProtected,
                        format!("need secondary: backup {how}"),
                    ),
                    BackupState::None => {
                        let reason = match placement::place_backup(&spec.hosts, load, host) {
                            Ok(backup) => {
                                planned_backup_host = Some(backup.clone());
                                format!("need secondary: {NO_LATE_BACKUP} (backup host would be {backup})")
                            }
                            Err(err) => format!("need secondary: {err}"),
                        };
                        (Protection::NotProtected, reason)
                    }
                }
            }
            PrimaryState::PoweredOff(host, code) => (
                Protection::Down,
                format!("the guest powered off on {host} (code {code})"),
            ),
            PrimaryState::Lost(host, how) => {
                let survivor = match &backup {
                    BackupState::Running(backup) => Some(backup.clone()),
                    _ => None,
                };
                let (protection, reason, event) = match &survivor {
                    Some(backup) => {
                        let live = backup_live || self.backup_went_live(vm, record).await?;
                        let outcome = if live {
                            format!("the backup on {backup} went live")
                        } else {
                            format!("the backup on {backup} takes over (go-live claim pending)")
                        };
                        // A new backup would need cloning the running one (not built).
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
                        to_host: survivor.clone(),
                        reason: reason.clone(),
                    });
                    summary.failovers += 1;
                    metrics::failover();
                    self.event(Some(vm), "failover", event).await?;
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

    /// Places the primary of `vm` on `host` and, when another live host can run the backup,
    /// the backup too, both under generation 1 with one log address.
    #[allow(clippy::too_many_arguments)]
    async fn place_pair(
        &self,
        vm: &VmName,
        spec: &VmSpec,
        host: HostName,
        hosts: &BTreeMap<HostName, HostRecord>,
        load: &mut Load,
        log_addresses: &mut BTreeSet<String>,
        summary: &mut PassSummary,
    ) -> Result<(), StoreError> {
        let backup_host = placement::place_backup(&spec.hosts, load, &host)
            .ok()
            .filter(|backup| {
                [&host, backup]
                    .iter()
                    .all(|h| hosts.get(*h).is_some_and(|record| record.backup_capable))
            });
        let log_address = backup_host
            .as_ref()
            .and_then(|_| pick_log_address(hosts.get(&host)?, log_addresses));
        let backup_host = backup_host.filter(|_| log_address.is_some());
        if let Some(backup) = &backup_host {
            let assignment = Assignment {
                host: backup.clone(),
                generation: 1,
                uid: spec.uid.clone(),
                log_address: log_address.clone(),
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
            log_address: log_address.clone(),
        };
        self.store
            .put(
                &keys::assignment(vm, Role::Primary),
                encode(&assignment),
                None,
            )
            .await?;
        if let Some(address) = log_address {
            log_addresses.insert(address);
        }
        for placed in std::iter::once(&host).chain(backup_host.as_ref()) {
            if let Some(count) = load.get_mut(placed) {
                *count += 1;
            }
            summary.placed += 1;
        }
        let message = match &backup_host {
            Some(backup) => format!("primary of {vm} placed on {host}, backup on {backup}"),
            None => {
                format!("primary of {vm} placed on {host} (no backup: no second host can run one)")
            }
        };
        self.event(Some(vm), "placed", message).await?;
        Ok(())
    }

    /// The backup paired with `primary` (same generation and log address), as reported.
    fn backup_state(
        record: &VmRecord,
        primary: &Assignment,
        hosts: &BTreeMap<HostName, HostRecord>,
    ) -> BackupState {
        let Some(assignment) = record.current_assignment(Role::Backup).filter(|backup| {
            primary.log_address.is_some()
                && backup.generation == primary.generation
                && backup.log_address == primary.log_address
        }) else {
            return BackupState::None;
        };
        let host = assignment.host.clone();
        if !hosts.contains_key(&host) {
            return BackupState::Lost(format!("lost: host {host} is down"));
        }
        match record.report_for(Role::Backup, assignment) {
            None => BackupState::Starting(host),
            Some(report) if report.state == ProcessState::Running => BackupState::Running(host),
            Some(report) => {
                let how = report.exit.as_deref().unwrap_or("ended");
                BackupState::Lost(format!("exited on {host} ({how})"))
            }
        }
    }

    /// Whether the backup holds the go-live claim of the primary's generation (the key
    /// ftvmm's etcd arbiter writes, the claimant `backup@<host>`).
    async fn backup_went_live(&self, vm: &VmName, record: &VmRecord) -> Result<bool, StoreError> {
        let Some(primary) = record.current_assignment(Role::Primary) else {
            return Ok(false);
        };
        let key = format!("{}gen/{}/live", keys::vm_prefix(vm), primary.generation);
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

/// The first free log address on `host`: its `log_listen_ip`, port `log_port_base + k`
/// for the lowest `k` no assignment in `used` has. `None` for an ftd that does not
/// announce a log address, or when the span is full.
fn pick_log_address(host: &HostRecord, used: &BTreeSet<String>) -> Option<String> {
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
            pick_log_address(&host, &used).as_deref(),
            Some("10.0.0.11:7800")
        );
        used.insert("10.0.0.11:7800".to_owned());
        used.insert("10.0.0.12:7801".to_owned());
        assert_eq!(
            pick_log_address(&host, &used).as_deref(),
            Some("10.0.0.11:7801")
        );
        let old = HostRecord {
            log_listen_ip: None,
            ..host
        };
        assert_eq!(pick_log_address(&old, &used), None);
    }
}
