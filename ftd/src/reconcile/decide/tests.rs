//! One test per row of the decision table in `reconcile`, each from plain observed values:
//! hosts a, b and c (log addresses 10.0.0.11-13, ports from 7800), VM `web1` naming
//! hosts a and b, and a pair placed as a pass places it (primary replica 1 on a, backup
//! replica 2 on b, generation 1).

use super::*;
use crate::model::{HostRecord, ReplicaReport};

const NOW: u64 = 1_000_000;

fn name(host: &str) -> HostName {
    HostName::new(host).expect("valid host name")
}

fn live(names: &[&str]) -> Hosts {
    names
        .iter()
        .map(|host| {
            let index = match *host {
                "a" => 11,
                "b" => 12,
                _ => 13,
            };
            let record = HostRecord {
                name: name(host),
                grpc_address: String::new(),
                metrics_address: String::new(),
                version: String::new(),
                backup_capable: true,
                log_listen_ip: Some(format!("10.0.0.{index}")),
                log_port_base: Some(7800),
                started_unix_ms: 0,
                cpu: None,
                bridge: None,
            };
            (name(host), record)
        })
        .collect()
}

fn vm() -> VmName {
    VmName::new("web1").expect("valid name")
}

fn spec(hosts: &[&str]) -> VmSpec {
    VmSpec {
        name: vm(),
        image: "/img/kv.elf".into(),
        image_sha256: None,
        mem_bytes: 64 << 20,
        cmdline: String::new(),
        disk: None,
        disk_mode: crate::model::DiskMode::Shared,
        disk_size_bytes: None,
        disk_image: None,
        net: None,
        hosts: hosts.iter().map(|host| name(host)).collect(),
        uid: "u1".into(),
        created_unix_ms: 0,
    }
}

fn primary() -> Assignment {
    Assignment {
        host: name("a"),
        generation: 1,
        uid: "u1".into(),
        replica: 1,
        log_address: Some("10.0.0.11:7800".into()),
        clone_listen: Some("10.0.0.11:7801".into()),
        clone_from: None,
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    }
}

fn backup() -> Assignment {
    Assignment {
        host: name("b"),
        replica: 2,
        clone_listen: Some("10.0.0.12:7800".into()),
        ..primary()
    }
}

/// A replica's control socket answer: role, state, protected, peer_lost, generation.
fn pair(role: &str, state: &str, protected: bool, peer_lost: bool, generation: u64) -> PairState {
    PairState {
        role: role.into(),
        state: state.into(),
        protected,
        peer_lost,
        generation: Some(generation),
    }
}

fn running(assignment: &Assignment, pair: Option<PairState>) -> ReplicaReport {
    ReplicaReport {
        host: assignment.host.clone(),
        uid: assignment.uid.clone(),
        replica: assignment.replica,
        generation: assignment.generation,
        state: ProcessState::Running,
        pid: 100,
        exit: None,
        exit_code: None,
        pair,
        unix_ms: NOW - 10_000,
    }
}

/// `how`: `signal 9`, `exit status 75`...; `code`: the exit status, if any.
fn exited(assignment: &Assignment, how: &str, code: Option<i32>, at: u64) -> ReplicaReport {
    ReplicaReport {
        state: ProcessState::Exited,
        exit: Some(how.into()),
        exit_code: code,
        unix_ms: at,
        ..running(assignment, None)
    }
}

/// The status a previous pass recorded with the primary running.
fn was(protection: Protection) -> VmStatus {
    VmStatus {
        uid: "u1".into(),
        protection,
        reason: String::new(),
        planned_backup_host: None,
        primary_running: true,
        last_failover: None,
        failovers: 0,
        last_replica: 2,
        updated_unix_ms: NOW - 1000,
    }
}

fn record(
    assignments: &[(Role, Assignment)],
    reports: &[ReplicaReport],
    status: Option<VmStatus>,
) -> VmRecord {
    VmRecord {
        spec: Some(spec(&["a", "b"])),
        status,
        assignments: assignments.iter().cloned().collect(),
        reports: reports
            .iter()
            .map(|report| (report.replica, report.clone()))
            .collect(),
        claimed_lives: BTreeSet::new(),
    }
}

/// The pair placed, with these reports and a previous status.
fn placed(reports: &[ReplicaReport], status: Option<VmStatus>) -> VmRecord {
    record(
        &[(Role::Primary, primary()), (Role::Backup, backup())],
        reports,
        status,
    )
}

fn decide_with(record: &VmRecord, hosts: &Hosts, claimant: Option<&str>) -> Decision {
    let name = vm();
    let vms = BTreeMap::from([(name.clone(), record.clone())]);
    let room = Room::new(hosts, &vms);
    let observed = ObservedVm {
        name: &name,
        record,
        claimant,
    };
    decide(&observed, &room, NOW)
}

/// The status decided (it differs from the recorded one in every case here).
fn status(decision: &Decision) -> &VmStatus {
    decision.status.as_ref().expect("a new status")
}

fn kinds(decision: &Decision) -> Vec<&'static str> {
    decision
        .actions
        .iter()
        .map(|action| match action {
            Action::DropAssignment { .. } => "drop",
            Action::Place { .. } => "place",
            Action::PlaceClone { .. } => "place-clone",
            Action::RecordFailover => "record-failover",
            Action::Promote { .. } => "promote",
            Action::Event { kind, .. } => kind,
            Action::CleanUp { .. } => "clean-up",
            Action::RemoveClaims { .. } => "remove-claims",
        })
        .collect()
}

fn assert_status(decision: &Decision, protection: Protection, reason: &str) {
    let status = status(decision);
    assert_eq!(
        (status.protection, status.reason.as_str()),
        (protection, reason)
    );
    assert_eq!(decision.protection, Some(protection));
}

#[test]
fn a_primary_no_host_fits_leaves_the_vm_down() {
    let decision = decide_with(&record(&[], &[], None), &live(&["c"]), None);
    assert_status(
        &decision,
        Protection::Down,
        "cannot place the primary: host a is down",
    );
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);

    let anywhere = VmRecord {
        spec: Some(spec(&[])),
        ..record(&[], &[], None)
    };
    let decision = decide_with(&anywhere, &live(&[]), None);
    assert_status(
        &decision,
        Protection::Down,
        "cannot place the primary: no live host",
    );
}

#[test]
fn an_unplaced_vm_is_placed_as_a_pair_and_is_down_while_it_starts() {
    let decision = decide_with(&record(&[], &[], None), &live(&["a", "b", "c"]), None);
    assert_eq!(
        decision.actions[0],
        Action::Place {
            primary: primary(),
            backup: Some(backup()),
        }
    );
    assert_eq!(kinds(&decision), ["place", "placed"]);
    assert_status(&decision, Protection::Down, "primary starting on a");
    assert_eq!(status(&decision).last_replica, 2);
}

#[test]
fn a_placed_primary_without_a_report_is_starting() {
    let decision = decide_with(&placed(&[], None), &live(&["a", "b"]), None);
    assert_status(&decision, Protection::Down, "primary starting on a");
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
}

#[test]
fn a_running_primary_that_says_protected_with_its_backup_running_is_protected() {
    let reports = [
        running(&primary(), Some(pair("primary", "running", true, false, 1))),
        running(&backup(), Some(pair("backup", "running", true, false, 1))),
    ];
    let decision = decide_with(&placed(&reports, None), &live(&["a", "b"]), None);
    assert_status(&decision, Protection::Protected, "");
    assert_eq!(kinds(&decision), ["protected"]);

    // Recorded as protected already: nothing to do, nothing to write.
    let decision = decide_with(
        &placed(&reports, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!((decision.actions.len(), decision.status), (0, None));
    assert_eq!(decision.protection, Some(Protection::Protected));
}

#[test]
fn a_running_primary_below_its_clones_generation_has_a_backup_cloning() {
    let primary = Assignment {
        generation: 2,
        ..primary()
    };
    let clone = Assignment {
        host: name("c"),
        generation: 2,
        replica: 3,
        log_address: None,
        clone_listen: Some("10.0.0.13:7800".into()),
        clone_from: primary.clone_listen.clone(),
        ..primary.clone()
    };
    let reports = [
        running(&primary, Some(pair("primary", "running", false, true, 1))),
        running(&clone, Some(pair("backup", "booting", false, false, 2))),
    ];
    let record = record(
        &[(Role::Primary, primary), (Role::Backup, clone)],
        &reports,
        None,
    );
    let decision = decide_with(&record, &live(&["a", "b", "c"]), None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "backup cloning: c copies the running primary on a",
    );
}

/// Found by the switchover test: right after a switchover the promoted replica still
/// said `protected=1` (of the pair it had been the backup of) while its new backup was
/// being cloned, and the VM was reported Protected before the clone existed.
#[test]
fn a_primary_protected_in_an_older_generation_is_not_protected_by_a_new_backup() {
    let primary = Assignment {
        generation: 2,
        ..primary()
    };
    let clone = Assignment {
        host: name("c"),
        generation: 2,
        replica: 3,
        log_address: None,
        clone_listen: Some("10.0.0.13:7800".into()),
        clone_from: primary.clone_listen.clone(),
        ..primary.clone()
    };
    let stale = [
        running(&primary, Some(pair("primary", "running", true, false, 1))),
        running(&clone, Some(pair("backup", "booting", false, false, 2))),
    ];
    let record_of = |reports: &[ReplicaReport]| {
        record(
            &[
                (Role::Primary, primary.clone()),
                (Role::Backup, clone.clone()),
            ],
            reports,
            None,
        )
    };
    let decision = decide_with(&record_of(&stale), &live(&["a", "b", "c"]), None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "backup cloning: c copies the running primary on a",
    );
    // Once the primary says so in the clone's generation, it is.
    let cloned = [
        running(&primary, Some(pair("primary", "running", true, false, 2))),
        running(&clone, Some(pair("backup", "running", true, false, 2))),
    ];
    let decision = decide_with(&record_of(&cloned), &live(&["a", "b", "c"]), None);
    assert_status(&decision, Protection::Protected, "");
}

#[test]
fn a_running_primary_not_yet_protected_has_its_backup_connecting() {
    let backup_running = running(&backup(), None);
    for (said, reason) in [
        (
            Some(pair("primary", "booting", false, false, 1)),
            "backup connecting: the primary on a waits for its backup on b",
        ),
        (
            Some(pair("primary", "running", false, false, 1)),
            "backup connecting on b",
        ),
        (
            None,
            "backup connecting: the primary on a has not answered on its control socket yet",
        ),
    ] {
        let reports = [running(&primary(), said), backup_running.clone()];
        let decision = decide_with(&placed(&reports, None), &live(&["a", "b"]), None);
        assert_status(&decision, Protection::NotProtected, reason);
    }
}

#[test]
fn a_running_primary_that_lost_its_running_backup_needs_a_secondary() {
    let reports = [
        running(&primary(), Some(pair("primary", "running", false, true, 1))),
        running(&backup(), Some(pair("backup", "running", false, false, 1))),
    ];
    let decision = decide_with(&placed(&reports, None), &live(&["a", "b"]), None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: the primary on a lost its backup on b",
    );
}

#[test]
fn a_running_primary_whose_backup_has_not_reported_waits_for_it() {
    let reports = [running(
        &primary(),
        Some(pair("primary", "booting", false, false, 1)),
    )];
    let decision = decide_with(&placed(&reports, None), &live(&["a", "b"]), None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup starting on b",
    );
}

#[test]
fn a_running_primary_whose_backup_is_being_replaced_needs_a_secondary() {
    let retiring = Assignment {
        retiring: true,
        ..backup()
    };
    let reports = [
        running(&primary(), Some(pair("primary", "running", true, false, 1))),
        running(&retiring, Some(pair("backup", "running", true, false, 1))),
    ];
    let record = record(
        &[(Role::Primary, primary()), (Role::Backup, retiring)],
        &reports,
        None,
    );
    let decision = decide_with(&record, &live(&["a", "b"]), None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: restarting the backup: stopping it on b",
    );
}

#[test]
fn a_primary_running_alone_gets_a_clone_as_its_new_backup() {
    let alone = running(&primary(), Some(pair("primary", "running", false, true, 1)));
    // Its backup's host is down: the clone goes to c.
    let decision = decide_with(
        &placed(std::slice::from_ref(&alone), None),
        &live(&["a", "c"]),
        None,
    );
    let clone = Assignment {
        host: name("c"),
        generation: 2,
        uid: "u1".into(),
        replica: 3,
        log_address: None,
        clone_listen: Some("10.0.0.13:7800".into()),
        clone_from: Some("10.0.0.11:7801".into()),
        retiring: false,
        handing_over: false,
        next_backup_host: None,
    };
    assert_eq!(
        decision.actions[0],
        Action::PlaceClone {
            primary: Assignment {
                generation: 2,
                ..primary()
            },
            backup: clone,
        }
    );
    assert_eq!(kinds(&decision), ["place-clone", "backup-placed"]);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup lost: host b is down; backup starting on c (a clone of the primary on a)",
    );
    assert_eq!(status(&decision).last_replica, 3);

    // Its backup exited a while ago: the clone goes to b, the spec's backup host.
    let ended = exited(&backup(), "exit status 75", Some(75), NOW - CLONE_RETRY_MS);
    let decision = decide_with(
        &placed(&[alone.clone(), ended], None),
        &live(&["a", "b", "c"]),
        None,
    );
    assert_eq!(kinds(&decision), ["place-clone", "backup-placed"]);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup exited on b (exit status 75); backup starting on b (a clone of the primary on a)",
    );

    // Without a backup assignment at all.
    let decision = decide_with(
        &record(
            &[(Role::Primary, primary())],
            std::slice::from_ref(&alone),
            None,
        ),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["place-clone", "backup-placed"]);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup starting on b (a clone of the primary on a)",
    );

    // The operator chose c (restart-backup --to c): c, not b; the choice is used up.
    let choosing = Assignment {
        next_backup_host: Some(name("c")),
        ..primary()
    };
    let decision = decide_with(
        &record(
            &[(Role::Primary, choosing.clone())],
            std::slice::from_ref(&alone),
            None,
        ),
        &live(&["a", "b", "c"]),
        None,
    );
    match &decision.actions[0] {
        Action::PlaceClone { primary, backup } => {
            assert_eq!(
                (&backup.host, &primary.next_backup_host),
                (&name("c"), &None)
            );
        }
        other => panic!("{other:?}"),
    }
    // A choice that cannot be had (c is not up) falls back to placement.
    let decision = decide_with(
        &record(&[(Role::Primary, choosing)], &[alone], None),
        &live(&["a", "b"]),
        None,
    );
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup starting on b (a clone of the primary on a)",
    );
}

#[test]
fn a_new_backup_goes_only_to_a_host_whose_guests_see_the_same_cpu() {
    let alone = running(&primary(), Some(pair("primary", "running", false, true, 1)));
    let with_cpus = |cpus: &[(&str, &str)]| {
        let mut hosts = live(&cpus.iter().map(|(host, _)| *host).collect::<Vec<_>>());
        for (host, cpu) in cpus {
            if let Some(record) = hosts.get_mut(&name(host)) {
                record.cpu = Some(format!(
                    "{cpu} vendor=AuthenticAMD family=25 model=17 xsave=2432"
                ));
            }
        }
        hosts
    };
    let only_primary = record(
        &[(Role::Primary, primary())],
        std::slice::from_ref(&alone),
        None,
    );
    // b, the host the spec names, has another CPU: c instead.
    let hosts = with_cpus(&[
        ("a", "cpu=0000000a"),
        ("b", "cpu=0000000b"),
        ("c", "cpu=0000000a"),
    ]);
    let decision = decide_with(&only_primary, &hosts, None);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup starting on c (a clone of the primary on a)",
    );
    // No host with the same CPU: it waits, saying why.
    let hosts = with_cpus(&[("a", "cpu=0000000a"), ("b", "cpu=0000000b")]);
    let decision = decide_with(&only_primary, &hosts, None);
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: no other host's guests see the same CPU as on a (cpu=0000000a)",
    );
}

#[test]
fn a_backup_that_just_ended_is_replaced_only_after_a_pause() {
    let reports = [
        running(&primary(), Some(pair("primary", "running", false, true, 1))),
        exited(&backup(), "exit status 75", Some(75), NOW - 100),
    ];
    let decision = decide_with(&placed(&reports, None), &live(&["a", "b"]), None);
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup exited on b (exit status 75); a new backup will be cloned onto b shortly",
    );
    assert_eq!(status(&decision).planned_backup_host, Some(name("b")));
}

#[test]
fn a_primary_that_has_not_noticed_its_backup_is_gone_gets_no_clone_yet() {
    let reports = [running(
        &primary(),
        Some(pair("primary", "running", true, false, 1)),
    )];
    let decision = decide_with(
        &placed(&reports, Some(was(Protection::Protected))),
        &live(&["a", "c"]),
        None,
    );
    assert_eq!(kinds(&decision), ["unprotected"]);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: backup lost: host b is down; the primary on a has not noticed its backup is gone yet; backup host would be c",
    );
    assert_eq!(status(&decision).planned_backup_host, Some(name("c")));
}

#[test]
fn a_lost_primary_with_a_running_backup_is_a_failover_and_the_live_backup_is_promoted() {
    let promoted = Assignment {
        log_address: None,
        ..backup()
    };
    // The primary was killed; the backup says it went live.
    let reports = [
        exited(&primary(), "signal 9", None, NOW),
        running(&backup(), Some(pair("live", "running", false, true, 1))),
    ];
    let decision = decide_with(
        &placed(&reports, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(
        kinds(&decision),
        ["record-failover", "failover", "promote", "promoted"]
    );
    assert_eq!(
        decision.actions[2],
        Action::Promote {
            assignment: promoted.clone()
        }
    );
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: primary exited on a (signal 9); the backup on b went live",
    );
    let failover = status(&decision).last_failover.clone().expect("recorded");
    assert_eq!(
        (failover.from_host, failover.to_host, failover.unix_ms),
        (name("a"), Some(name("b")), NOW)
    );
    assert!(!status(&decision).primary_running);
    // The count goes on from the stored status (a new leader reads it from there).
    assert_eq!(status(&decision).failovers, 1);
    let twice_before = VmStatus {
        failovers: 2,
        ..was(Protection::Protected)
    };
    let decision = decide_with(
        &placed(&reports, Some(twice_before)),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(status(&decision).failovers, 3);

    // The primary still runs on a live host, but its backup went live: it is lost.
    let reports = [
        running(&primary(), Some(pair("primary", "running", true, false, 1))),
        running(&backup(), Some(pair("live", "running", false, true, 1))),
    ];
    let decision = decide_with(
        &placed(&reports, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(
        kinds(&decision),
        ["record-failover", "failover", "promote", "promoted"]
    );
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: primary lost on a (silent to its backup); the backup on b went live",
    );
}

#[test]
fn a_primary_stopped_for_a_switchover_is_no_failover_and_its_live_backup_is_promoted() {
    let handing_over = Assignment {
        handing_over: true,
        ..primary()
    };
    let assignments = [(Role::Primary, handing_over), (Role::Backup, backup())];
    // The primary stopped gracefully (143); the backup went live through the claim.
    let reports = [
        exited(&primary(), "exit status 143", Some(143), NOW),
        running(&backup(), Some(pair("live", "running", false, true, 1))),
    ];
    let previous = VmStatus {
        failovers: 2,
        ..was(Protection::Protected)
    };
    let decision = decide_with(
        &record(&assignments, &reports, Some(previous.clone())),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["switchover", "promote", "promoted"]);
    assert_status(
        &decision,
        Protection::NotProtected,
        "need secondary: switched over from a; the backup on b went live",
    );
    let after = status(&decision);
    assert_eq!((after.failovers, &after.last_failover), (2, &None));
    assert!(!after.primary_running);

    // The same loss without the switchover mark is a failover.
    let decision = decide_with(&placed(&reports, Some(previous)), &live(&["a", "b"]), None);
    assert_eq!(
        kinds(&decision),
        ["record-failover", "failover", "promote", "promoted"]
    );
    assert_eq!(status(&decision).failovers, 3);

    // Killed while handing over (not the graceful stop's 143): a failover.
    let killed = [
        exited(&primary(), "signal 9", None, NOW),
        running(&backup(), Some(pair("live", "running", false, true, 1))),
    ];
    let decision = decide_with(
        &record(&assignments, &killed, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision)[..2], ["record-failover", "failover"]);
    // Its host gone (no report any more): a failover too.
    let decision = decide_with(
        &record(&assignments, &killed[1..], Some(was(Protection::Protected))),
        &live(&["b"]),
        None,
    );
    assert_eq!(kinds(&decision)[..2], ["record-failover", "failover"]);
    // Still stopping (it waits for the last acknowledgements) while its backup is live:
    // the switchover.
    let stopping = [
        running(&primary(), Some(pair("primary", "running", true, false, 1))),
        running(&backup(), Some(pair("live", "running", false, true, 1))),
    ];
    let decision = decide_with(
        &record(&assignments, &stopping, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["switchover", "promote", "promoted"]);

    // A switchover whose backup is gone meanwhile is an outage like any other.
    let reports = [exited(&primary(), "exit status 143", Some(143), NOW)];
    let lone = record(
        &assignments[..1],
        &reports,
        Some(was(Protection::Protected)),
    );
    let decision = decide_with(&lone, &live(&["a", "b"]), None);
    assert_eq!(kinds(&decision)[..2], ["record-failover", "failover"]);
}

#[test]
fn a_lost_primary_whose_backup_has_not_won_the_claim_is_not_replaced_yet() {
    let reports = [
        exited(&primary(), "signal 9", None, NOW),
        running(&backup(), Some(pair("backup", "running", false, true, 1))),
    ];
    let record = placed(&reports, Some(was(Protection::Protected)));
    let hosts = live(&["a", "b"]);
    for claimant in [None, Some("primary@a/7")] {
        let decision = decide_with(&record, &hosts, claimant);
        assert_eq!(kinds(&decision), ["record-failover", "failover"]);
        assert_status(
            &decision,
            Protection::NotProtected,
            "need secondary: primary exited on a (signal 9); the backup on b takes over (go-live claim pending)",
        );
    }
    // The backup holds the claim: promoted.
    let decision = decide_with(&record, &hosts, Some("backup@b/100"));
    assert_eq!(
        kinds(&decision),
        ["record-failover", "failover", "promote", "promoted"]
    );
    // A pass that already recorded the failover only promotes.
    let after = VmStatus {
        primary_running: false,
        failovers: 1,
        ..was(Protection::NotProtected)
    };
    let decision = decide_with(&placed(&reports, Some(after)), &hosts, Some("backup@b/100"));
    assert_eq!(kinds(&decision), ["promote", "promoted"]);
    // Counted once, not again by the pass that promotes.
    assert!(
        decision
            .status
            .as_ref()
            .is_none_or(|status| status.failovers == 1),
        "{decision:?}"
    );
}

#[test]
fn a_primary_lost_with_its_host_and_no_backup_leaves_the_vm_down() {
    let reports = [running(
        &primary(),
        Some(pair("primary", "running", false, true, 1)),
    )];
    let decision = decide_with(
        &record(
            &[(Role::Primary, primary())],
            &reports,
            Some(was(Protection::NotProtected)),
        ),
        &live(&["b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["record-failover", "failover"]);
    assert_status(
        &decision,
        Protection::Down,
        "primary lost: host a is down; no backup to take over",
    );
    assert!(
        matches!(&decision.actions[1], Action::Event { message, .. } if message.ends_with("no backup could go live, the VM is down")),
        "{:?}",
        decision.actions
    );
}

#[test]
fn a_primary_that_exited_without_a_running_backup_leaves_the_vm_down() {
    for (how, code) in [("signal 9", None), ("exit status 70", Some(70))] {
        let reports = [
            exited(&primary(), how, code, NOW),
            exited(&backup(), "signal 9", None, NOW),
        ];
        let decision = decide_with(
            &placed(&reports, Some(was(Protection::Protected))),
            &live(&["a", "b"]),
            None,
        );
        assert_eq!(kinds(&decision), ["record-failover", "failover"]);
        assert_status(
            &decision,
            Protection::Down,
            &format!("primary exited on a ({how}); no backup to take over"),
        );
    }
}

#[test]
fn a_guest_that_powered_off_leaves_the_vm_down_without_a_failover() {
    let reports = [
        exited(&primary(), "exit status 0", Some(0), NOW),
        running(&backup(), Some(pair("backup", "running", false, true, 1))),
    ];
    let decision = decide_with(
        &placed(&reports, Some(was(Protection::Protected))),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["unprotected"]);
    assert_status(
        &decision,
        Protection::Down,
        "the guest powered off on a (code 0)",
    );
    assert_eq!(status(&decision).last_failover, None);
}

#[test]
fn assignments_of_an_older_incarnation_are_dropped_and_the_pair_placed_anew() {
    let old = Assignment {
        uid: "u0".into(),
        ..primary()
    };
    let decision = decide_with(
        &record(&[(Role::Primary, old)], &[], None),
        &live(&["a", "b"]),
        None,
    );
    assert_eq!(kinds(&decision), ["drop", "place", "placed"]);
}

#[test]
fn a_deleted_vm_loses_its_assignments_and_then_its_records() {
    let reported = VmRecord {
        spec: None,
        claimed_lives: BTreeSet::from(["u1".to_owned()]),
        ..placed(
            &[running(&primary(), None)],
            Some(was(Protection::Protected)),
        )
    };
    let name = vm();
    let observed = ObservedVm {
        name: &name,
        record: &reported,
        claimant: None,
    };
    let decision = removal(&observed, &live(&["a", "b"]), false);
    assert_eq!(kinds(&decision), ["drop", "drop"]);
    assert_eq!((decision.protection, decision.status), (None, None));
    // No live host reports a replica any more.
    let decision = removal(&observed, &live(&["b"]), false);
    assert_eq!(
        kinds(&decision),
        ["drop", "drop", "remove-claims", "clean-up"]
    );
    assert_eq!(
        decision.actions[2],
        Action::RemoveClaims { uid: "u1".into() }
    );
    assert_eq!(decision.actions[3], Action::CleanUp { replicas: vec![1] });
}

#[test]
fn the_claims_of_an_older_life_go_once_none_of_its_replicas_is_reported() {
    let old_report = ReplicaReport {
        uid: "u0".into(),
        ..running(&backup(), None)
    };
    let mut record = placed(
        &[
            running(&primary(), Some(pair("primary", "running", true, false, 1))),
            running(&backup(), None),
        ],
        Some(was(Protection::Protected)),
    );
    record.claimed_lives = BTreeSet::from(["u0".to_owned(), "u1".to_owned()]);
    record.reports.insert(
        7,
        ReplicaReport {
            replica: 7,
            ..old_report
        },
    );
    // A replica of life u0 still runs on b: its claims stay.
    let decision = decide_with(&record, &live(&["a", "b"]), None);
    assert!(!kinds(&decision).contains(&"remove-claims"), "{decision:?}");
    // Host b is gone: u0 is over, u1 (the current life) keeps its claims.
    let decision = decide_with(&record, &live(&["a"]), None);
    assert!(decision
        .actions
        .contains(&Action::RemoveClaims { uid: "u0".into() }));
    assert!(!decision
        .actions
        .contains(&Action::RemoveClaims { uid: "u1".into() }));
}

#[test]
fn log_addresses_take_the_lowest_free_port_above_the_base() {
    let hosts = live(&["a"]);
    let host = &hosts[&name("a")];
    let mut used = BTreeSet::new();
    assert_eq!(pick_address(host, &used).as_deref(), Some("10.0.0.11:7800"));
    used.insert("10.0.0.11:7800".to_owned());
    used.insert("10.0.0.12:7801".to_owned());
    assert_eq!(pick_address(host, &used).as_deref(), Some("10.0.0.11:7801"));
    let old = HostRecord {
        log_listen_ip: None,
        ..host.clone()
    };
    assert_eq!(pick_address(&old, &used), None);
}

#[test]
fn right_after_an_etcd_outage_a_vm_with_replicas_unaccounted_for_is_left_as_it_is() {
    let settled = |record: &VmRecord, hosts: &Hosts| {
        let name = vm();
        let vms = BTreeMap::from([(name.clone(), record.clone())]);
        let mut room = Room::new(hosts, &vms);
        room.settling = true;
        let observed = ObservedVm {
            name: &name,
            record,
            claimant: None,
        };
        decide(&observed, &room, NOW)
    };
    let protected = pair("primary", "running", true, false, 1);
    // Host b has not registered again; a's report is back.
    let record = placed(
        &[running(&primary(), Some(protected.clone()))],
        Some(was(Protection::Protected)),
    );
    let decision = settled(&record, &live(&["a", "c"]));
    assert_eq!(
        (decision.actions.len(), decision.status, decision.protection),
        (0, None, Some(Protection::Protected))
    );
    // Both hosts back, b's report not yet.
    let decision = settled(&record, &live(&["a", "b", "c"]));
    assert!(decision.actions.is_empty() && decision.status.is_none());
    // Everything accounted for: decided as always (unchanged here).
    let record = placed(
        &[
            running(&primary(), Some(protected)),
            running(&backup(), Some(pair("backup", "running", true, false, 1))),
        ],
        Some(was(Protection::Protected)),
    );
    let decision = settled(&record, &live(&["a", "b", "c"]));
    assert_eq!(decision.protection, Some(Protection::Protected));
    // The backup says it went live while a has not registered again: followed at once.
    let record = placed(
        &[running(
            &backup(),
            Some(pair("live", "running", false, true, 1)),
        )],
        Some(was(Protection::Protected)),
    );
    let decision = settled(&record, &live(&["b", "c"]));
    assert_eq!(
        kinds(&decision),
        ["record-failover", "failover", "promote", "promoted"]
    );
}
