//! What the leader sees in a pass: the live hosts and every VM's record (spec, status,
//! assignments, reports), read from the store, and for each VM the state of its primary
//! and backup as the reports and the live hosts show it. The go-live claim of the pair's
//! generation is read only when it decides something: the primary looks lost and its
//! backup runs without having said that it went live.

use crate::keys;
use crate::model::{Assignment, HostName, HostRecord, PairState, ProcessState, Role, VmName};
use crate::records::{load_drained, load_hosts, load_vms, VmRecord};
use crate::store::{Store, StoreError};
use std::collections::{BTreeMap, BTreeSet};

/// The live hosts, by name.
pub(super) type Hosts = BTreeMap<HostName, HostRecord>;

/// The cluster as one pass reads it.
#[derive(Debug, Clone, Default)]
pub(super) struct Observed {
    /// The live hosts (those whose ftd holds its lease).
    pub hosts: Hosts,
    /// Every VM under `/ft/vms/`.
    pub vms: BTreeMap<VmName, VmRecord>,
    /// The drained hosts.
    pub drained: BTreeSet<HostName>,
}

/// Reads the live hosts, every VM and the drained hosts.
pub(super) async fn cluster(store: &dyn Store) -> Result<Observed, StoreError> {
    Ok(Observed {
        hosts: load_hosts(store).await?,
        vms: load_vms(store, None).await?,
        drained: load_drained(store).await?,
    })
}

/// What the leader sees of one VM.
#[derive(Debug, Clone, Copy)]
pub(super) struct ObservedVm<'a> {
    /// The VM.
    pub name: &'a VmName,
    /// Its spec, status, assignments and reports.
    pub record: &'a VmRecord,
    /// Who holds the go-live claim of the primary's generation (`backup@<host>/<pid>`
    /// when the backup won it); `None` when there is no claim or it was not read.
    pub claimant: Option<&'a str>,
}

/// Reads what decides `vm` beyond its record: the go-live claim, when
/// [`Replicas::needs_claim`].
/// Returns the claimant (to be borrowed by an [`ObservedVm`]).
pub(super) async fn claimant(
    store: &dyn Store,
    vm: &VmName,
    record: &VmRecord,
    hosts: &Hosts,
) -> Result<Option<String>, StoreError> {
    let Some(primary) = record.current_assignment(Role::Primary) else {
        return Ok(None);
    };
    if !replicas(record, hosts).needs_claim() {
        return Ok(None);
    }
    let key = keys::go_live_claim(vm, &primary.uid, primary.generation);
    Ok(store
        .get(&key)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Whether every replica `record` assigns is accounted for: its host is registered and
/// reports it.
pub(super) fn accounted(record: &VmRecord, hosts: &Hosts) -> bool {
    Role::ALL
        .iter()
        .filter_map(|role| record.current_assignment(*role))
        .all(|assignment| {
            hosts.contains_key(&assignment.host) && record.report_for(assignment).is_some()
        })
}

/// The state of a primary as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PrimaryState {
    /// Not placed, and no host fits: why.
    Unplaced(String),
    /// No report yet (or placed in this pass).
    Starting(HostName),
    /// Its host reports it running.
    Running(HostName),
    /// The guest powered off (ftvmm exit status 0..=63): a clean stop, not a failover.
    PoweredOff(HostName, i32),
    /// Its host is down, it exited, or its backup went live: the host and how.
    Lost(HostName, String),
}

/// The state of a backup as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BackupState {
    /// No backup assignment of the primary's generation.
    None,
    /// No report yet.
    Starting(HostName),
    /// Its host reports it running.
    Running(HostName),
    /// Its host is down or it exited: how.
    Lost(String),
}

/// The pair of one VM as the reports show it.
#[derive(Debug, Clone)]
pub(super) struct Replicas<'a> {
    /// The primary's assignment of the current incarnation.
    pub primary_assignment: Option<&'a Assignment>,
    /// The primary's state; `None` while it is not placed.
    pub primary: Option<PrimaryState>,
    /// The backup's assignment, when it is of the primary's pair.
    pub backup_assignment: Option<&'a Assignment>,
    /// The backup's state.
    pub backup: BackupState,
    /// What the primary last said on its control socket.
    pub primary_pair: Option<&'a PairState>,
    /// The running backup says it went live (`role=live`).
    pub backup_live: bool,
}

impl Replicas<'_> {
    /// Whether the go-live claim decides what happens: the primary looks lost and its
    /// backup runs without having said that it went live.
    pub fn needs_claim(&self) -> bool {
        !self.backup_live
            && matches!(self.primary, Some(PrimaryState::Lost(..)))
            && matches!(self.backup, BackupState::Running(_))
    }
}

/// Classifies the primary and the backup of `record` from its reports and `hosts`.
pub(super) fn replicas<'a>(record: &'a VmRecord, hosts: &Hosts) -> Replicas<'a> {
    let primary_assignment = record.current_assignment(Role::Primary);
    let mut primary = primary_assignment.map(|assignment| primary_state(record, assignment, hosts));
    let backup_assignment = primary_assignment.and_then(|primary| {
        record
            .current_assignment(Role::Backup)
            .filter(|backup| paired(primary, backup))
    });
    let backup = match backup_assignment {
        None => BackupState::None,
        Some(backup) => backup_state(record, backup, hosts),
    };
    // What each replica last said on its control socket (through its ftd's report).
    let pair_state =
        |assignment: Option<&Assignment>| record.report_for(assignment?)?.pair.as_ref();
    let primary_pair = pair_state(primary_assignment);
    // A backup that went live is the VM now, even while the primary's host still
    // looks registered (its lease has not run out yet): the pair itself decided.
    let backup_live = matches!(backup, BackupState::Running(_))
        && pair_state(backup_assignment).is_some_and(|pair| pair.role == "live");
    if let (true, Some(PrimaryState::Running(host))) = (backup_live, &primary) {
        primary = Some(PrimaryState::Lost(
            host.clone(),
            format!("lost on {host} (silent to its backup)"),
        ));
    }
    Replicas {
        primary_assignment,
        primary,
        backup_assignment,
        backup,
        primary_pair,
        backup_live,
    }
}

fn primary_state(record: &VmRecord, assignment: &Assignment, hosts: &Hosts) -> PrimaryState {
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
                .is_some_and(ftvm_contract::exit::is_guest_power_off) =>
        {
            PrimaryState::PoweredOff(host, report.exit_code.unwrap_or_default())
        }
        Some(report) => {
            let how = report.exit.as_deref().unwrap_or("ended");
            PrimaryState::Lost(host.clone(), format!("exited on {host} ({how})"))
        }
    }
}

/// The state of the backup of `assignment`, as its host reports it.
fn backup_state(record: &VmRecord, assignment: &Assignment, hosts: &Hosts) -> BackupState {
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

/// Whether `backup` is the backup of `primary`'s pair: the same generation, and either
/// the same log channel or made by cloning.
fn paired(primary: &Assignment, backup: &Assignment) -> bool {
    backup.generation == primary.generation
        && (backup.clone_from.is_some()
            || (primary.log_address.is_some() && backup.log_address == primary.log_address))
}
