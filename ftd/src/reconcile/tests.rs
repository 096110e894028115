//! The reconciler over an in-memory store: whole passes, as the hosts' reports change.

use super::decide::CLONE_RETRY_MS;
use super::{OutageRules, PassSummary, Reconciler};
use crate::events::EventLog;
use crate::keys;
use crate::model::{
    now_unix_ms, Assignment, HostName, HostRecord, PairState, ProcessState, Protection,
    ReplicaReport, Role, VmName, VmSpec, VmStatus,
};
use crate::records::{encode, load_vms, VmRecord};
use crate::store::health::StoreHealth;
use crate::store::memory::MemStore;
use crate::store::{Fence, Store, StoreError};
use std::sync::Arc;

/// A leader's reconciler over an in-memory store with hosts a, b and c; replica
/// reports are written by the test as the hosts' ftds would.
struct Harness {
    store: Arc<dyn Store>,
    reconciler: Reconciler,
    /// The leadership the passes run under.
    fence: Fence,
    vm: VmName,
    uid: String,
}

fn host_name(name: &str) -> HostName {
    HostName::new(name).expect("valid host name")
}

impl Harness {
    async fn new(hosts: &[&str]) -> Harness {
        Self::build(hosts, None).await
    }

    /// A harness whose leader runs on host a and settles for `grace` after the outages
    /// recorded in the health it returns.
    async fn settling(hosts: &[&str], grace: std::time::Duration) -> (Harness, Arc<StoreHealth>) {
        let rules = OutageRules {
            grace,
            shortest: std::time::Duration::ZERO,
        };
        Self::settling_by(hosts, rules).await
    }

    /// A harness whose leader runs on host a and settles by `rules` after the outages
    /// recorded in the health it returns.
    async fn settling_by(hosts: &[&str], rules: OutageRules) -> (Harness, Arc<StoreHealth>) {
        let health = Arc::new(StoreHealth::new());
        let harness = Self::build(hosts, Some((health.clone(), rules))).await;
        (harness, health)
    }

    async fn build(hosts: &[&str], outages: Option<(Arc<StoreHealth>, OutageRules)>) -> Harness {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let events = Arc::new(EventLog::new(store.clone()));
        let mut reconciler = Reconciler::new(store.clone(), events);
        if let Some((health, rules)) = outages {
            reconciler = reconciler.settling_after_outages(health, host_name("a"), rules);
        }
        store
            .put("/ft/leader/1", b"{}".to_vec(), None)
            .await
            .expect("put the leader key");
        let leader = store
            .get("/ft/leader/1")
            .await
            .expect("get")
            .expect("the leader key");
        let harness = Harness {
            reconciler,
            store,
            fence: Fence {
                key: leader.key,
                revision: leader.create_revision,
            },
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
            cpu: None,
            bridge: None,
        };
        self.store
            .put(&keys::host(name), encode(&record), None)
            .await
            .expect("put host");
    }

    /// The leader this reconciler works for loses its election key.
    async fn depose(&self) {
        self.store
            .delete("/ft/leader/1")
            .await
            .expect("delete the leader key");
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

    /// The kinds of the events recorded after the one numbered `after`.
    async fn kinds_after(&self, after: u64) -> Vec<String> {
        self.events_after(after)
            .await
            .into_iter()
            .map(|event| event.kind)
            .collect()
    }

    async fn events_after(&self, after: u64) -> Vec<crate::model::Event> {
        EventLog::new(self.store.clone())
            .recent(1000)
            .await
            .expect("events")
            .into_iter()
            .filter(|event| event.seq > after)
            .collect()
    }

    async fn last_seq(&self) -> u64 {
        self.events_after(0)
            .await
            .last()
            .map_or(0, |event| event.seq)
    }

    /// etcd lost the leases of `hosts`: their registrations and their replicas' reports.
    async fn leases_lapse(&self, hosts: &[&str]) {
        for host in hosts {
            self.host_down(host).await;
        }
        for (replica, report) in self.record().await.reports {
            if hosts.contains(&report.host.as_str()) {
                self.store
                    .delete(&keys::report(&self.vm, replica))
                    .await
                    .expect("delete");
            }
        }
    }

    async fn pass(&self) -> PassSummary {
        self.reconciler.pass(&self.fence).await.expect("a pass")
    }
}

/// A pair placed on a and b, both running, the primary protected.
async fn protected_pair(hosts: &[&str]) -> Harness {
    let harness = Harness::new(hosts).await;
    protect(harness).await
}

/// Places the pair and makes it protected.
async fn protect(harness: Harness) -> Harness {
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
        .put(
            &crate::keys::go_live_claim(&VmName::new("web1").expect("valid name"), &primary.uid, 1),
            b"backup@b/1".to_vec(),
            None,
        )
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

/// The go-live claims stored under `/ft/vms/web1/uid/<uid>/`.
async fn claims_of(harness: &Harness, uid: &str) -> Vec<String> {
    let prefix = ftvm_contract::claims::go_live_prefix(harness.vm.as_str(), uid);
    harness
        .store
        .list_prefix(&prefix)
        .await
        .expect("list")
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// The backup of the pair won generation 1's claim, then the VM is deleted and both
/// hosts stop their replicas (their reports go).
async fn failed_over_then_deleted(harness: &Harness) {
    for generation in [1, 2] {
        harness
            .store
            .put(
                &keys::go_live_claim(&harness.vm, &harness.uid, generation),
                b"backup@b/1".to_vec(),
                None,
            )
            .await
            .expect("put claim");
    }
    harness
        .store
        .delete(&keys::spec(&harness.vm))
        .await
        .expect("delete spec");
    harness.pass().await;
    for replica in [1, 2] {
        harness
            .store
            .delete(&keys::report(&harness.vm, replica))
            .await
            .expect("delete report");
    }
}

#[tokio::test]
async fn deleting_a_vm_removes_the_go_live_claims_of_its_life() {
    let harness = protected_pair(&["a", "b", "c"]).await;
    failed_over_then_deleted(&harness).await;
    assert_eq!(claims_of(&harness, "u1").await.len(), 2);
    assert_eq!(harness.pass().await.removed, 1);
    assert_eq!(claims_of(&harness, "u1").await, Vec::<String>::new());
    let left = harness
        .store
        .list_prefix(&keys::vm_prefix(&harness.vm))
        .await
        .expect("list");
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_vm_created_again_keeps_its_spec_and_claims_while_the_old_lifes_go() {
    let harness = protected_pair(&["a", "b", "c"]).await;
    failed_over_then_deleted(&harness).await;
    // Created again under the same name before the clean-up ran; its pair already
    // claimed generation 1 of its own life.
    let record = harness.record().await;
    assert!(record.spec.is_none() && record.status.is_some());
    let spec = VmSpec {
        uid: "u2".into(),
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
    let new_claim = keys::go_live_claim(&harness.vm, "u2", 1);
    harness
        .store
        .put(&new_claim, b"backup@b/9".to_vec(), None)
        .await
        .expect("put claim");
    harness.pass().await;
    assert_eq!(claims_of(&harness, "u1").await, Vec::<String>::new());
    assert_eq!(claims_of(&harness, "u2").await, [new_claim]);
    let record = harness.record().await;
    assert_eq!(record.spec.map(|spec| spec.uid).as_deref(), Some("u2"));
}

#[tokio::test]
async fn a_deposed_leaders_pass_writes_nothing() {
    let harness = Harness::new(&["a", "b", "c"]).await;
    harness.depose().await;
    let pass = harness.reconciler.pass(&harness.fence).await;
    assert!(
        matches!(
            pass,
            Err(super::ReconcileError::Store(StoreError::Fenced { .. }))
        ),
        "{pass:?}"
    );
    let record = harness.record().await;
    assert!(
        record.assignments.is_empty() && record.status.is_none(),
        "{record:?}"
    );
    let events = harness.store.list_prefix(keys::EVENTS).await.expect("list");
    assert!(events.is_empty(), "{events:?}");
}

/// The kinds of event an etcd outage must not cause.
const NOT_FOR_AN_OUTAGE: [&str; 5] = [
    "host-down",
    "failover",
    "promoted",
    "backup-placed",
    "unprotected",
];

#[tokio::test]
async fn host_leases_that_lapse_together_are_not_taken_for_host_deaths() {
    let grace = std::time::Duration::from_millis(400);
    let (harness, _health) = Harness::settling(&["a", "b", "c"], grace).await;
    let harness = protect(harness).await;
    let assignments = harness.record().await.assignments;
    let before = harness.last_seq().await;

    // etcd froze longer than the lease TTL: every lease lapsed, this leader's own too.
    harness.leases_lapse(&["a", "b", "c"]).await;
    let summary = harness.pass().await;
    assert_eq!((summary.failovers, summary.placed), (0, 0));
    // The hosts register again one by one, and their replicas report again.
    for (index, host) in ["a", "b"].iter().enumerate() {
        harness.host_up(host, index).await;
        harness.pass().await;
    }
    harness.both_protected(1).await;
    harness.pass().await;
    let record = harness.record().await;
    assert_eq!(record.assignments, assignments);
    let status = record.status.expect("a status");
    assert_eq!(status.protection, Protection::Protected);
    assert_eq!(status.last_failover, None);
    let kinds = harness.kinds_after(before).await;
    assert_eq!(
        kinds,
        ["store-outage"],
        "{:?}",
        harness.events_after(before).await
    );

    // Host c never comes back: declared down once the grace has passed, and only then.
    tokio::time::sleep(grace).await;
    harness.pass().await;
    assert_eq!(
        harness.kinds_after(before).await,
        ["store-outage", "host-down"]
    );
}

#[tokio::test]
async fn after_an_outage_its_calls_saw_a_leader_waits_for_hosts_and_replicas_to_report() {
    let grace = std::time::Duration::from_secs(30);
    let (harness, health) = Harness::settling(&["a", "b", "c"], grace).await;
    let harness = protect(harness).await;
    let before = harness.last_seq().await;
    // This ftd's calls failed for a while (its own lease survived); host b's lapsed.
    let failed_at = std::time::Instant::now();
    health.record(failed_at, false);
    health.record(std::time::Instant::now(), true);
    harness.leases_lapse(&["b"]).await;
    harness.pass().await;
    let status = harness.status().await;
    assert_eq!(status.protection, Protection::Protected, "{status:?}");
    let kinds = harness.kinds_after(before).await;
    assert!(
        kinds
            .iter()
            .all(|kind| !NOT_FOR_AN_OUTAGE.contains(&kind.as_str())),
        "{kinds:?}"
    );
    assert_eq!(kinds, ["store-outage"]);

    // But a backup that says it went live is the pair's own word: followed at once.
    harness.host_up("b", 1).await;
    harness
        .running(Role::Backup, ("live", "running", false, true, 1))
        .await;
    assert_eq!(harness.pass().await.failovers, 1);
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

#[tokio::test]
async fn a_slow_answer_now_and_then_does_not_hold_back_a_host_death() {
    let rules = OutageRules::for_lease_ttl(std::time::Duration::from_secs(10));
    let (harness, health) = Harness::settling_by(&["a", "b", "c"], rules).await;
    let harness = protect(harness).await;
    let before = harness.last_seq().await;
    // A call took a little over a second (a loaded etcd): shorter than half a TTL.
    let slow = std::time::Instant::now()
        .checked_sub(std::time::Duration::from_millis(1500))
        .expect("the clock is past 1.5 s");
    health.record(slow, true);
    assert!(health.last_outage().is_some());
    // Host b really died: it is down at once, and the VM needs a new backup.
    harness.leases_lapse(&["b"]).await;
    harness.pass().await;
    assert_eq!(
        harness.kinds_after(before).await,
        ["host-down", "unprotected"]
    );
    assert_eq!(harness.status().await.protection, Protection::NotProtected);
}
