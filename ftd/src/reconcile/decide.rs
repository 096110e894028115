//! What a pass does for one VM, decided from what the leader sees and nothing else: no
//! store, no clock, no await. [`decide`] turns an [`ObservedVm`] and the [`Room`] left on
//! the hosts into the [`Action`]s to take, in order, and the status to record; the
//! module doc of [`super`] has the decision table.

use super::observe::{self, BackupState, Hosts, ObservedVm, PrimaryState, Replicas};
use crate::model::{
    Assignment, Failover, HostName, PairState, ProcessState, Protection, Role, VmName, VmSpec,
    VmStatus,
};
use crate::placement::{self, Load};
use crate::records::VmRecord;
use ftvm_contract::claims::{claimant_role, ClaimantRole};
use std::collections::{BTreeMap, BTreeSet};

/// Highest offset tried above a host's `log_port_base`.
const LOG_PORT_SPAN: u16 = 1000;
/// How long after a backup ended (a clone refused or cut) the next one is placed.
pub(super) const CLONE_RETRY_MS: u64 = 2000;

/// One thing a pass does for a VM. [`super::apply`] carries them out in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Delete the assignment of `role` (of an older incarnation, or of a deleted VM):
    /// its host stops that replica.
    DropAssignment {
        /// The role whose assignment goes.
        role: Role,
    },
    /// Place a new pair: the backup's assignment (if any), then the primary's.
    Place {
        /// The primary's assignment.
        primary: Assignment,
        /// The backup's, when a second host can run it.
        backup: Option<Assignment>,
    },
    /// Place a new backup made by cloning the running primary: the primary's assignment
    /// moves to the clone's generation, then the backup's is written.
    PlaceClone {
        /// The primary's assignment, at the new generation.
        primary: Assignment,
        /// The new backup's.
        backup: Assignment,
    },
    /// Count a failover (`ftd_failovers_total`, the pass summary).
    RecordFailover,
    /// Make the backup that went live the primary: `assignment` (the backup's, without
    /// its log and clone source) becomes the primary's, and the backup's is deleted.
    Promote {
        /// The new primary assignment.
        assignment: Assignment,
    },
    /// Append an event about the VM.
    Event {
        /// Event kind (`placed`, `failover`, ...).
        kind: &'static str,
        /// What happened.
        message: String,
    },
    /// Remove what is left of a deleted VM: its status and the reports of `replicas`,
    /// key by key.
    CleanUp {
        /// The replica numbers whose reports go.
        replicas: Vec<u64>,
    },
    /// Remove the go-live claims of a finished life of the VM: everything under
    /// `/ft/vms/<vm>/uid/<uid>/` (`ftvm_contract::claims::go_live_prefix`), which can
    /// never hold a spec, status, assignment or report, nor a claim of another life.
    RemoveClaims {
        /// The life ([`VmSpec::uid`]) whose claims go.
        uid: String,
    },
}

/// What a pass does for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decision {
    /// What to do, in this order.
    pub actions: Vec<Action>,
    /// The VM's protection after this pass; `None` for a VM being deleted.
    pub protection: Option<Protection>,
    /// The status to record, when it differs from the recorded one.
    pub status: Option<VmStatus>,
}

/// What one pass shares between VMs: the live hosts, how many replicas each is assigned,
/// and the listen addresses taken. Each decision's placements are taken from it (see
/// [`Room::take`]) before the next VM is decided.
#[derive(Debug, Clone)]
pub(super) struct Room<'a> {
    /// The live hosts.
    pub hosts: &'a Hosts,
    /// Replicas assigned to each live host.
    pub load: Load,
    /// Log and clone addresses of every assignment.
    pub addresses: BTreeSet<String>,
    /// This pass settles after an etcd outage (see `outage`): a VM whose replicas are
    /// not all accounted for is left as it is.
    pub settling: bool,
    /// Hosts drained by the operator: no new replica is placed there (those running
    /// there go on).
    pub drained: BTreeSet<HostName>,
}

impl<'a> Room<'a> {
    /// The room on `hosts` left by the assignments of `vms`.
    pub fn new(hosts: &'a Hosts, vms: &BTreeMap<VmName, VmRecord>) -> Self {
        let mut room = Room {
            hosts,
            load: hosts.keys().map(|host| (host.clone(), 0)).collect(),
            addresses: BTreeSet::new(),
            settling: false,
            drained: BTreeSet::new(),
        };
        for record in vms.values() {
            for assignment in record.assignments.values() {
                let listens = [&assignment.log_address, &assignment.clone_listen];
                room.addresses
                    .extend(listens.into_iter().flatten().cloned());
            }
            for role in Role::ALL {
                if let Some(assignment) = record.current_assignment(role) {
                    room.count(&assignment.host);
                }
            }
        }
        room
    }

    /// The `cpu=` word of `host`'s CPU, if its ftd said.
    fn cpu_word(&self, host: &HostName) -> Option<&str> {
        self.hosts
            .get(host)?
            .cpu
            .as_deref()?
            .split_whitespace()
            .next()
    }

    /// Whether a guest sees the same CPU on `a` and on `b` (the replicas of one VM must):
    /// true when either host does not say (an older ftvmm).
    fn same_cpu(&self, a: &HostName, b: &HostName) -> bool {
        match (self.cpu_word(a), self.cpu_word(b)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }

    /// The live hosts that may take a new replica of `spec`, with their load: not
    /// drained, and making TAPs (a bridge) when its NIC names no TAP.
    fn eligible(&self, spec: &VmSpec) -> Load {
        let needs_bridge = spec
            .net
            .as_ref()
            .is_some_and(crate::model::NetSpec::managed);
        let bridged = |host: &HostName| {
            self.hosts
                .get(host)
                .is_some_and(|record| record.bridge.is_some())
        };
        self.load
            .iter()
            .filter(|(host, _)| !self.drained.contains(*host))
            .filter(|(host, _)| !needs_bridge || bridged(host))
            .map(|(host, count)| (host.clone(), *count))
            .collect()
    }

    /// Why placement failed, in words: a named host that is drained is not "down".
    fn placement_failed(&self, err: &placement::PlacementError) -> String {
        match err {
            placement::PlacementError::HostDown(host) if self.drained.contains(host) => {
                format!("host {host} is drained (ftctl host undrain {host})")
            }
            _ => err.to_string(),
        }
    }

    /// Takes what `actions` place: their hosts' load and their listen addresses.
    pub fn take(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Place { primary, backup } => {
                    for placed in std::iter::once(primary).chain(backup) {
                        let listens = [&placed.log_address, &placed.clone_listen];
                        self.addresses
                            .extend(listens.into_iter().flatten().cloned());
                        self.count(&placed.host);
                    }
                }
                Action::PlaceClone { backup, .. } => {
                    self.addresses.extend(backup.clone_listen.iter().cloned());
                    self.count(&backup.host);
                }
                _ => {}
            }
        }
    }

    fn count(&mut self, host: &HostName) {
        if let Some(count) = self.load.get_mut(host) {
            *count += 1;
        }
    }

    fn backup_capable(&self, host: &HostName) -> bool {
        self.hosts
            .get(host)
            .is_some_and(|record| record.backup_capable)
    }
}

/// Why a VM has no backup following, the host the next one would go to, and what places
/// it when it can be placed now.
struct NextBackup {
    reason: String,
    planned: Option<HostName>,
    actions: Vec<Action>,
}

impl NextBackup {
    fn wait(reason: String, planned: Option<&HostName>) -> Self {
        Self {
            reason,
            planned: planned.cloned(),
            actions: Vec::new(),
        }
    }
}

/// What the parts of [`decide`] share about the VM being decided.
struct Deciding<'a> {
    name: &'a VmName,
    spec: &'a VmSpec,
    record: &'a VmRecord,
    claimant: Option<&'a str>,
    room: &'a Room<'a>,
    now_ms: u64,
}

/// What to do for `vm` in this pass, at `now_ms` (Unix ms): see the decision table in
/// [`super`]. A VM without a spec is being deleted: see [`removal`].
pub(super) fn decide(vm: &ObservedVm<'_>, room: &Room<'_>, now_ms: u64) -> Decision {
    let record = vm.record;
    let Some(spec) = &record.spec else {
        return removal(vm, room.hosts, room.settling);
    };
    let name = vm.name;
    let mut actions = Vec::new();
    // Assignments of an older incarnation of this name are dropped (their hosts stop
    // those replicas).
    for (role, assignment) in &record.assignments {
        if assignment.uid != spec.uid {
            actions.push(Action::DropAssignment { role: *role });
        }
    }
    // The claims of an older life go once none of its replicas is reported any more.
    actions.extend(remove_claims(record, room.hosts));

    let previous = record
        .status
        .as_ref()
        .filter(|status| status.uid == spec.uid);
    // Replica numbers are never reused within an incarnation: a number lives on in
    // the status after its assignment and report are gone.
    let mut numbered = previous
        .map_or(0, |status| status.last_replica)
        .max(record.last_replica());
    let cx = Deciding {
        name,
        spec,
        record,
        claimant: vm.claimant,
        room,
        now_ms,
    };
    let replicas = observe::replicas(record, room.hosts);
    // Right after an etcd outage, a replica not registered or reported again yet is no
    // evidence of anything, unless the pair says what happened (a backup went live).
    if room.settling
        && replicas.primary_assignment.is_some()
        && !replicas.backup_live
        && !observe::accounted(record, room.hosts)
    {
        return Decision {
            actions: Vec::new(),
            protection: previous.map(|status| status.protection),
            status: None,
        };
    }
    let primary = match &replicas.primary {
        Some(state) => state.clone(),
        None => match placement::place_primary(&spec.hosts, &room.eligible(spec)) {
            Ok(host) => {
                actions.extend(place_pair(&cx, host.clone(), &mut numbered));
                PrimaryState::Starting(host)
            }
            Err(err) => PrimaryState::Unplaced(format!(
                "cannot place the primary: {}",
                room.placement_failed(&err)
            )),
        },
    };
    let was_running = previous.is_some_and(|status| status.primary_running);
    let mut last_failover = previous.and_then(|status| status.last_failover.clone());
    let mut failovers = previous.map_or(0, |status| status.failovers);
    let mut planned_backup_host = None;
    let (protection, reason) = match (&primary, replicas.primary_assignment) {
        (PrimaryState::Unplaced(reason), _) => (Protection::Down, reason.clone()),
        // (A running primary always comes with its assignment.)
        (PrimaryState::Starting(host), _) | (PrimaryState::Running(host), None) => {
            (Protection::Down, format!("primary starting on {host}"))
        }
        (PrimaryState::Running(host), Some(primary)) => {
            // A new backup avoids the host the last failover came from.
            let avoid = last_failover.as_ref().map(|failover| &failover.from_host);
            let (protection, reason, next) =
                with_running_primary(&cx, &replicas, host, primary, avoid, &mut numbered);
            if let Some(next) = next {
                planned_backup_host = next.planned;
                actions.extend(next.actions);
            }
            (protection, reason)
        }
        (PrimaryState::PoweredOff(host, code), _) => (
            Protection::Down,
            format!("the guest powered off on {host} (code {code})"),
        ),
        (PrimaryState::Lost(host, how), primary_assignment) => {
            let lost = with_lost_primary(&cx, &replicas, how);
            // A primary stopped for a switchover (its report: still stopping, or ended
            // with the graceful stop's 143), with a backup to take over: a planned role
            // swap, not a failover. Killed, crashed or its host gone: a failover.
            let switchover = lost.survivor.is_some()
                && primary_assignment
                    .filter(|primary| primary.handing_over)
                    .and_then(|primary| record.report_for(primary))
                    .is_some_and(|report| match report.state {
                        ProcessState::Running => true,
                        ProcessState::Exited => report.exit_code == Some(GRACEFUL_STOP_EXIT),
                    });
            if switchover {
                if was_running {
                    actions.push(Action::Event {
                        kind: "switchover",
                        message: lost.switchover_event(name, host),
                    });
                }
            } else if was_running {
                last_failover = Some(Failover {
                    unix_ms: now_ms,
                    from_host: host.clone(),
                    to_host: lost.survivor.map(|backup| backup.host.clone()),
                    reason: lost.reason.clone(),
                });
                failovers += 1;
                actions.push(Action::RecordFailover);
                actions.push(Action::Event {
                    kind: "failover",
                    message: lost.event,
                });
            }
            if let (true, Some(backup)) = (lost.live, lost.survivor) {
                actions.extend(promote(name, backup));
            }
            match lost.survivor {
                Some(_) if switchover => (
                    lost.protection,
                    format!(
                        "need secondary: switched over from {host}; {}",
                        lost.outcome
                    ),
                ),
                Some(_) => (lost.protection, format!("need secondary: {}", lost.reason)),
                None => (lost.protection, lost.reason),
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
        failovers,
        last_replica: numbered,
        updated_unix_ms: 0,
    };
    let was_protected =
        previous.is_some_and(|previous| previous.protection == Protection::Protected);
    if protection == Protection::Protected && !was_protected {
        actions.push(Action::Event {
            kind: "protected",
            message: format!("{name} is protected"),
        });
    } else if protection != Protection::Protected
        && was_protected
        && !matches!(primary, PrimaryState::Lost(..))
    {
        // (A failover has its own event.)
        actions.push(Action::Event {
            kind: "unprotected",
            message: format!("{name} is not protected: {}", status.reason),
        });
    }
    let unchanged = previous.is_some_and(|previous| {
        VmStatus {
            updated_unix_ms: 0,
            ..previous.clone()
        } == status
    });
    Decision {
        actions,
        protection: Some(protection),
        status: (!unchanged).then_some(VmStatus {
            updated_unix_ms: now_ms,
            ..status
        }),
    }
}

/// The protection of a VM whose `primary` runs on `host`, and what places its next
/// backup when it needs one. `avoid`: a host for the next backup only when no other
/// is left; `numbered`: the highest replica number used so far.
fn with_running_primary(
    cx: &Deciding<'_>,
    replicas: &Replicas<'_>,
    host: &HostName,
    primary: &Assignment,
    avoid: Option<&HostName>,
    numbered: &mut u64,
) -> (Protection, String, Option<NextBackup>) {
    let primary_pair = replicas.primary_pair;
    let backup_assignment = replicas.backup_assignment;
    match (&replicas.backup, backup_assignment) {
        // Both processes running is not enough: the primary says whether its backup is
        // connected and following (`protected=1`).
        (BackupState::Running(backup), Some(assignment)) if assignment.retiring => (
            Protection::NotProtected,
            format!("need secondary: restarting the backup: stopping it on {backup}"),
            None,
        ),
        (BackupState::Running(backup), Some(assignment)) => {
            let cloning = assignment.clone_from.is_some()
                && primary_pair.and_then(|pair| pair.generation) < Some(assignment.generation);
            // A primary's `protected=1` from a generation below its backup's assignment
            // is about the pair before (a backup that went live and still says it
            // followed, or a clone not yet made): not this backup.
            let stale = |pair: &PairState| {
                pair.generation
                    .is_some_and(|generation| generation < assignment.generation)
            };
            let (protection, reason) = match primary_pair {
                Some(pair) if pair.protected && !stale(pair) => {
                    (Protection::Protected, String::new())
                }
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
            };
            (protection, reason, None)
        }
        (BackupState::Starting(backup), _) => (
            Protection::NotProtected,
            format!("need secondary: backup starting on {backup}"),
            None,
        ),
        (BackupState::Lost(how), _) => {
            // A backup stopped on request is replaced at once; one that ended by itself
            // (a clone refused or cut) after a pause.
            let ended = backup_assignment
                .filter(|backup| !backup.retiring)
                .and_then(|backup| cx.record.report_for(backup))
                .filter(|report| report.state == ProcessState::Exited)
                .map(|report| report.unix_ms);
            let next = next_backup(cx, primary, primary_pair, ended, avoid, numbered);
            let reason = format!("need secondary: backup {how}; {}", next.reason);
            (Protection::NotProtected, reason, Some(next))
        }
        (BackupState::None | BackupState::Running(_), _) => {
            let next = next_backup(cx, primary, primary_pair, None, avoid, numbered);
            let reason = format!("need secondary: {}", next.reason);
            (Protection::NotProtected, reason, Some(next))
        }
    }
}

/// What a lost primary leaves: the backup that takes over (if one runs), whether it went
/// live, the protection, the reason and the failover event's message.
struct LostPrimary<'a> {
    survivor: Option<&'a Assignment>,
    live: bool,
    protection: Protection,
    reason: String,
    event: String,
    /// What the survivor does ("the backup on b went live"); empty without one.
    outcome: String,
}

impl LostPrimary<'_> {
    /// The event of a switchover from `host` (there is a survivor).
    fn switchover_event(&self, name: &VmName, host: &HostName) -> String {
        format!(
            "{name}: switched over: the primary on {host} stopped; {}",
            self.outcome
        )
    }
}

/// ftvmm's exit status after a graceful stop (SIGTERM or `stop`: 128 + 15).
const GRACEFUL_STOP_EXIT: i32 = 143;

/// What is left of a VM whose primary was lost (`how`).
fn with_lost_primary<'a>(cx: &Deciding<'_>, replicas: &Replicas<'a>, how: &str) -> LostPrimary<'a> {
    let name = cx.name;
    let survivor = match (&replicas.backup, replicas.backup_assignment) {
        (BackupState::Running(_), Some(backup)) => Some(backup),
        _ => None,
    };
    let live = survivor.is_some()
        && (replicas.backup_live
            || cx
                .claimant
                .is_some_and(|claimant| claimant_role(claimant) == Some(ClaimantRole::Backup)));
    let (protection, reason, event, outcome) = match survivor {
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
                format!("{name}: primary {how}; {outcome}"),
                outcome,
            )
        }
        None => (
            Protection::Down,
            format!("primary {how}; no backup to take over"),
            format!("{name}: primary {how}; no backup could go live, the VM is down"),
            String::new(),
        ),
    };
    LostPrimary {
        survivor,
        live,
        protection,
        reason,
        event,
        outcome,
    }
}

/// A VM without a spec is being deleted: drop its assignments (the hosts then stop
/// the replicas and withdraw their reports), and once no live host reports a replica,
/// remove what is left.
pub(super) fn removal(vm: &ObservedVm<'_>, hosts: &Hosts, settling: bool) -> Decision {
    let record = vm.record;
    let mut actions: Vec<Action> = record
        .assignments
        .keys()
        .map(|role| Action::DropAssignment { role: *role })
        .collect();
    let reported_live = record
        .reports
        .values()
        .any(|report| hosts.contains_key(&report.host));
    // Right after an etcd outage the reports are not back yet: no clean-up then.
    if !reported_live && !settling {
        // The claims go with the life, before its status (the last record of the life
        // besides them).
        actions.extend(remove_claims(record, hosts));
        actions.push(Action::CleanUp {
            replicas: record.reports.keys().copied().collect(),
        });
    }
    Decision {
        actions,
        protection: None,
        status: None,
    }
}

/// Removes the go-live claims of every life of the VM that is over: not the current
/// spec's (every life once the VM is deleted), with no replica a live host still reports
/// (a replica of it that still ran could claim again).
fn remove_claims(record: &VmRecord, hosts: &Hosts) -> Vec<Action> {
    let current = record.spec.as_ref().map(|spec| spec.uid.as_str());
    record
        .claimed_lives
        .iter()
        .filter(|uid| Some(uid.as_str()) != current)
        .filter(|uid| {
            !record
                .reports
                .values()
                .any(|report| &report.uid == *uid && hosts.contains_key(&report.host))
        })
        .map(|uid| Action::RemoveClaims { uid: uid.clone() })
        .collect()
}

/// Makes the backup that went live the primary: the same replica (its host keeps the
/// process running) in the primary's place, so that the next pass clones a new backup
/// from it. The old primary's host stops whatever is left of the old primary.
fn promote(vm: &VmName, backup: &Assignment) -> [Action; 2] {
    let promoted = Assignment {
        log_address: None,
        clone_from: None,
        retiring: false,
        handing_over: false,
        next_backup_host: None,
        ..backup.clone()
    };
    [
        Action::Promote {
            assignment: promoted,
        },
        Action::Event {
            kind: "promoted",
            message: format!(
                "{vm}: the replica on {} is the primary now (generation {})",
                backup.host, backup.generation
            ),
        },
    ]
}

/// Places a new backup of the running `primary` that is made by cloning it, when it
/// runs alone and a host can take the backup; otherwise says what the VM waits for.
/// `ended`: when the previous backup was seen to end (a clone that failed is retried
/// after [`CLONE_RETRY_MS`]); `avoid`: a host to use only when no other is left;
/// `numbered`: the highest replica number used so far.
fn next_backup(
    cx: &Deciding<'_>,
    primary: &Assignment,
    pair: Option<&PairState>,
    ended: Option<u64>,
    avoid: Option<&HostName>,
    numbered: &mut u64,
) -> NextBackup {
    let (vm, spec, room, now_ms) = (cx.name, cx.spec, cx.room, cx.now_ms);
    let source_host = &primary.host;
    let Some(source) = &primary.clone_listen else {
        return NextBackup::wait(
            format!("the primary on {source_host} was started without a clone address, so no backup can join it"),
            None,
        );
    };
    if !room.backup_capable(source_host) {
        return NextBackup::wait(format!("the ftvmm on {source_host} cannot run pairs"), None);
    }
    let capable: Load = room
        .eligible(spec)
        .into_iter()
        .filter(|(host, _)| room.backup_capable(host) && host != source_host)
        .collect();
    let candidates: Load = capable
        .iter()
        .filter(|(host, _)| room.same_cpu(host, source_host))
        .map(|(host, count)| (host.clone(), *count))
        .collect();
    if candidates.is_empty() && !capable.is_empty() {
        return NextBackup::wait(
            format!(
                "no other host's guests see the same CPU as on {source_host} ({})",
                room.cpu_word(source_host).unwrap_or("?")
            ),
            None,
        );
    }
    // The operator's choice (restart-backup --to) if that host can take it now.
    let chosen = primary
        .next_backup_host
        .clone()
        .filter(|host| host != source_host && candidates.contains_key(host));
    let target = match chosen.map_or_else(
        || placement::place_new_backup(&spec.hosts, &candidates, source_host, avoid),
        Ok,
    ) {
        Ok(target) => target,
        Err(err) => return NextBackup::wait(room.placement_failed(&err), None),
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
        return NextBackup::wait(
            format!("{why}; backup host would be {target}"),
            Some(&target),
        );
    };
    if ended.is_some_and(|at| now_ms.saturating_sub(at) < CLONE_RETRY_MS) {
        return NextBackup::wait(
            format!("a new backup will be cloned onto {target} shortly"),
            Some(&target),
        );
    }
    let Some(clone_listen) = room
        .hosts
        .get(&target)
        .and_then(|host| pick_address(host, &room.addresses))
    else {
        return NextBackup::wait(
            format!("host {target} has no free port for a replica"),
            None,
        );
    };
    // The pair the clone makes is the primary's next generation (ftvmm offers exactly
    // that one; a backup started for another refuses the clone).
    let generation = generation + 1;
    *numbered += 1;
    let backup = Assignment {
        host: target.clone(),
        generation,
        uid: spec.uid.clone(),
        replica: *numbered,
        log_address: None,
        clone_listen: Some(clone_listen),
        clone_from: Some(source.clone()),
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    };
    let primary = Assignment {
        generation,
        next_backup_host: None,
        ..primary.clone()
    };
    NextBackup {
        reason: format!("backup starting on {target} (a clone of the primary on {source_host})"),
        planned: None,
        actions: vec![
            Action::PlaceClone { primary, backup },
            Action::Event {
                kind: "backup-placed",
                message: format!("{vm}: new backup on {target}, cloned from the running primary on {source_host} (generation {generation})"),
            },
        ],
    }
}

/// Places the primary of `vm` on `host` and, when another live host can run the backup,
/// the backup too, both under generation 1 with one log address. Each replica also
/// gets a clone address, so that it can take a new backup whenever it runs alone.
fn place_pair(cx: &Deciding<'_>, host: HostName, numbered: &mut u64) -> [Action; 2] {
    let (vm, spec, room) = (cx.name, cx.spec, cx.room);
    let hosts = room.hosts;
    // Above any number an older incarnation of the name left in reports.
    let first_replica = *numbered + 1;
    *numbered += 2;
    let backup_host = placement::place_backup(&spec.hosts, &room.eligible(spec), &host)
        .ok()
        .filter(|backup| [&host, backup].iter().all(|h| room.backup_capable(h)))
        .filter(|backup| room.same_cpu(&host, backup));
    let mut used = room.addresses.clone();
    let mut take_address = |on: &HostName| {
        let address = pick_address(hosts.get(on)?, &used)?;
        used.insert(address.clone());
        Some(address)
    };
    let log_address = backup_host.as_ref().and_then(|_| take_address(&host));
    let backup_host = backup_host.filter(|_| log_address.is_some());
    let primary_clone = room
        .backup_capable(&host)
        .then(|| take_address(&host))
        .flatten();
    let backup = backup_host.as_ref().map(|backup| Assignment {
        host: backup.clone(),
        generation: 1,
        uid: spec.uid.clone(),
        replica: first_replica + 1,
        log_address: log_address.clone(),
        clone_listen: take_address(backup),
        clone_from: None,
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    });
    let primary = Assignment {
        host: host.clone(),
        generation: 1,
        uid: spec.uid.clone(),
        replica: first_replica,
        log_address,
        clone_listen: primary_clone,
        clone_from: None,
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    };
    let message = match &backup_host {
        Some(backup) => format!("primary of {vm} placed on {host}, backup on {backup}"),
        None => {
            format!("primary of {vm} placed on {host} (no backup yet: no second host can run one)")
        }
    };
    [
        Action::Place { primary, backup },
        Action::Event {
            kind: "placed",
            message,
        },
    ]
}

/// The first free listen address on `host` (for a log channel or a clone): its
/// `log_listen_ip`, port `log_port_base + k` for the lowest `k` no assignment in `used`
/// has. `None` for an ftd that does not announce a log address, or when the span is full.
pub(super) fn pick_address(
    host: &crate::model::HostRecord,
    used: &BTreeSet<String>,
) -> Option<String> {
    let ip: std::net::IpAddr = host.log_listen_ip.as_deref()?.parse().ok()?;
    let base = host.log_port_base?;
    (0..LOG_PORT_SPAN)
        .filter_map(|offset| base.checked_add(offset))
        .map(|port| std::net::SocketAddr::new(ip, port).to_string())
        .find(|address| !used.contains(address))
}

#[cfg(test)]
mod tests;
