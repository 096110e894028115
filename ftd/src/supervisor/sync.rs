//! The supervisor pass: makes this host's replicas match the assignments in the store
//! (stops what is no longer assigned here, relabels a replica given another role or
//! generation, stops a backup being replaced, starts what is new), removes the private
//! disks of replicas gone for good, then reports every replica under the host lease.
//!
//! A replica's private disk is its own internal state, like its memory: once the
//! replica is gone from this host for good, nothing will open it again (a backup that
//! goes live runs on its own disk; a new backup is cloned from the live replica, disk
//! included), so it is deleted. Gone for good: no assignment of its life wants it on
//! this host and its process is not running (ended, or asked to stop and ended since).
//! A disk is never deleted while its replica is assigned here (an ended primary keeps
//! its disk until the leader has moved on) or while its process runs.

use super::marker::Membership;
use super::{
    disk_file_name, kill_checked, start_time, Ended, Local, ReplicaKey, Supervisor,
    SupervisorError, CONTROL_TIMEOUT,
};
use crate::keys;
use crate::metrics;
use crate::model::{now_unix_ms, Assignment, ProcessState, ReplicaReport, Role, VmName, VmSpec};
use crate::records::{decode, encode, load_vms, VmRecord};
use crate::replica_control;
use crate::store::LeaseId;
use ftvm_contract::control::ControlRequest;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// How long a replica asked to `stop` has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// An unchanged report is put again after this long.
const REPORT_REFRESH: Duration = Duration::from_secs(10);

/// The replicas wanted on this host: for each, the role it serves, its assignment and its
/// VM's spec.
pub(super) type Desired = BTreeMap<ReplicaKey, (Role, Assignment, VmSpec)>;

/// What one [`Supervisor::sync`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncSummary {
    /// Replicas started.
    pub started: usize,
    /// Replicas stopped because they are no longer assigned here.
    pub stopped: usize,
    /// Replicas running now.
    pub running: usize,
}

/// The last report put for a replica.
#[derive(Debug)]
pub(super) struct Reported {
    lease: LeaseId,
    /// The report with `unix_ms` zero.
    report: ReplicaReport,
    /// Its `unix_ms` when first put: a refresh keeps it (it says when the state began).
    unix_ms: u64,
    put_at: Instant,
}

impl Supervisor {
    /// Makes this host's replicas match the assignments in the store, then reports them.
    /// Nothing is started or stopped while the store does not hold this host's cluster
    /// id (see `marker`), and a running replica whose VM vanished without the traces of
    /// a deletion is left as it is (its own report, put under a lease that still lives,
    /// gone: see `vanished`).
    pub async fn sync(&self) -> Result<SyncSummary, SupervisorError> {
        let vms = load_vms(&*self.store, None).await?;
        // Read after the VMs: a store emptied before or while they were read has lost
        // the marker too.
        if self.membership().await? != Membership::Ours {
            let running = self.running().await.len();
            metrics::set_replicas_running(running);
            return Ok(SyncSummary {
                running,
                ..SyncSummary::default()
            });
        }
        let desired = self.desired(&vms);

        let unpaired: BTreeSet<ReplicaKey> = desired
            .iter()
            .filter(|(key, (role, primary, _))| {
                *role == Role::Primary
                    && vms
                        .get(&key.0)
                        .and_then(|record| record.current_assignment(Role::Backup))
                        .is_none_or(|backup| {
                            backup.retiring || backup.generation != primary.generation
                        })
            })
            .map(|(key, _)| key.clone())
            .collect();
        *self
            .unpaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = unpaired;

        let mut summary = SyncSummary::default();
        let mut locals = self.locals.lock().await;
        for local in locals.values() {
            if !local.child
                && local.exit().is_none()
                && start_time(local.pid) != Some(local.start_time)
            {
                local.set_exit(Ended::unknown("ended (status unknown: adopted process)"));
            }
        }

        // Stop what is no longer assigned here (or belongs to an older incarnation),
        // when the store says so and did not merely lose it.
        let lease = *self.lease.borrow();
        let vanished = self.vanished(&vms, &locals, lease).await;
        let stale: Vec<ReplicaKey> = locals
            .iter()
            .filter(|(key, local)| {
                desired
                    .get(*key)
                    .is_none_or(|(_, assignment, _)| !local.matches(key, assignment))
                    && !vanished.contains(*key)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(local) = locals.remove(&key) {
                if local.exit().is_none() {
                    self.retire(&key, &local).await;
                }
                summary.stopped += 1;
                self.forget(&key).await?;
                // The replica's TAP, if this ftd made one (retire waited for it to end).
                let tap = super::taps::name(&local.uid, key.1);
                if let Err(err) = super::taps::remove(&tap) {
                    tracing::warn!(vm = %key.0, replica = key.1, "cannot remove its TAP {tap}: {err}");
                }
            }
        }

        // A running replica given another role or generation (a backup made primary, a
        // primary whose new backup is cloned) goes on as it is; only the record changes.
        for (key, local) in locals.iter_mut() {
            let Some((role, assignment, _)) = desired.get(key) else {
                continue;
            };
            if (local.role, local.generation) != (*role, assignment.generation) {
                tracing::info!(vm = %key.0, replica = key.1, from = %local.role, to = %role, generation = assignment.generation, "replica reassigned");
                local.role = *role;
                local.generation = assignment.generation;
                // What was settled for the old role (a backup's stop-backup) says nothing
                // about the new one (a primary's switchover).
                local.retire_settled = false;
                if local.pid != 0 {
                    self.record_local(key, local);
                }
            }
        }

        // A backup being replaced stops, unless it went live meanwhile; a primary handing
        // over stops gracefully (its backup then goes live).
        for (key, local) in locals.iter_mut() {
            let Some((role, assignment, _)) = desired.get(key) else {
                continue;
            };
            if local.retire_settled || local.pid == 0 || local.exit().is_some() {
                continue;
            }
            if assignment.retiring {
                local.retire_settled = self.stop_backup(key, local).await;
            } else if assignment.handing_over && *role == Role::Primary {
                local.retire_settled = self.hand_over(key, local).await;
            }
        }

        // Start what is assigned here and was never started (a backup being replaced
        // never is).
        for (key, (role, assignment, spec)) in &desired {
            if locals.contains_key(key) || assignment.retiring {
                continue;
            }
            let local = match self.local_image(spec).await {
                // Private disks made from an image read all of it: off the workers the
                // other tasks (the host lease above all) run on, where the runtime can.
                Ok(spec)
                    if spec.disk_image.is_some()
                        && tokio::runtime::Handle::current().runtime_flavor()
                            == tokio::runtime::RuntimeFlavor::MultiThread =>
                {
                    tokio::task::block_in_place(|| self.spawn(&key.0, *role, assignment, &spec))
                }
                Ok(spec) => self.spawn(&key.0, *role, assignment, &spec),
                Err(why) => self.not_started(&key.0, *role, assignment, why),
            };
            summary.started += 1;
            locals.insert(key.clone(), local);
        }

        self.remove_unused_disks(&desired, &locals);

        // Report (not a replica whose VM vanished: its missing report is the evidence).
        let mut reported = self.reported.lock().await;
        for (key, local) in locals.iter() {
            if vanished.contains(key) {
                if local.exit().is_none() {
                    summary.running += 1;
                }
                continue;
            }
            let exit = local.exit();
            if exit.is_none() {
                summary.running += 1;
            }
            let report = ReplicaReport {
                host: self.config.host.clone(),
                uid: local.uid.clone(),
                replica: key.1,
                generation: local.generation,
                state: if exit.is_none() {
                    ProcessState::Running
                } else {
                    ProcessState::Exited
                },
                pid: local.pid,
                exit_code: exit.as_ref().and_then(|ended| ended.code),
                pair: exit.is_none().then(|| self.pair_state(key)).flatten(),
                exit: exit.map(|ended| ended.how),
                unix_ms: 0,
            };
            // Unchanged reports are put again now and then (with their first stamp): a
            // put that raced with the leader's clean-up of an older incarnation must not
            // leave a stale value for good.
            let last = reported.get(key).filter(|last| last.report == report);
            if last
                .is_some_and(|last| last.lease == lease && last.put_at.elapsed() < REPORT_REFRESH)
            {
                continue;
            }
            let unix_ms = last.map_or_else(now_unix_ms, |last| last.unix_ms);
            let stamped = ReplicaReport {
                unix_ms,
                ..report.clone()
            };
            self.store
                .put(&keys::report(&key.0, key.1), encode(&stamped), Some(lease))
                .await?;
            reported.insert(
                key.clone(),
                Reported {
                    lease,
                    report,
                    unix_ms,
                    put_at: Instant::now(),
                },
            );
        }
        metrics::set_replicas_running(summary.running);
        Ok(summary)
    }

    /// The running replicas whose VM vanished from the store without the traces a
    /// deletion leaves: the VM has no spec, and this host's report of the replica, put
    /// under the host lease `lease` that still lives, is gone (nobody but this host
    /// removes it while the lease lives; a deleted VM keeps it until its replica is
    /// stopped). Such a replica stays in the set, neither stopped nor reported, until
    /// the store holds a spec of its VM again; each one is logged when it enters.
    async fn vanished(
        &self,
        vms: &BTreeMap<VmName, VmRecord>,
        locals: &BTreeMap<ReplicaKey, Local>,
        lease: LeaseId,
    ) -> BTreeSet<ReplicaKey> {
        let reported = self.reported.lock().await;
        let mut vanished = self
            .vanished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        vanished.retain(|key| locals.contains_key(key));
        for (key, local) in locals {
            let record = vms.get(&key.0);
            if record.is_some_and(|record| record.spec.is_some()) {
                vanished.remove(key);
                continue;
            }
            let running = local.pid != 0 && local.exit().is_none();
            let ours_lost = reported.get(key).is_some_and(|last| last.lease == lease)
                && record
                    .and_then(|record| record.reports.get(&key.1))
                    .is_none_or(|report| report.host != self.config.host);
            if running && ours_lost && vanished.insert(key.clone()) {
                tracing::error!(vm = %key.0, replica = key.1, pid = local.pid, "the store lost this replica's VM without a trace of its deletion (this host's report is gone though its lease lives): leaving the replica running until the store holds the VM again");
            }
        }
        vanished.clone()
    }

    /// The replicas the assignments in `vms` want on this host, with the role each
    /// serves, its assignment and its VM's spec.
    pub(super) fn desired(&self, vms: &BTreeMap<VmName, VmRecord>) -> Desired {
        let mut desired = Desired::new();
        for (vm, record) in vms {
            let Some(spec) = &record.spec else { continue };
            // Primary first: while the leader makes a backup that went live the primary,
            // both assignments may name the same replica for a moment.
            for role in Role::ALL {
                if let Some(assignment) = record.current_assignment(role) {
                    if assignment.host == self.config.host {
                        desired
                            .entry((vm.clone(), assignment.replica))
                            .or_insert_with(|| (role, assignment.clone(), spec.clone()));
                    }
                }
            }
        }
        desired
    }

    /// Deletes the private disks (and leftover temporary files) in the disks directory
    /// that no replica needs: not one an assignment in `desired` wants here, nor one of
    /// a process in `locals` that runs, nor one of a process asked to stop that has not
    /// ended yet (see the module doc).
    fn remove_unused_disks(&self, desired: &Desired, locals: &BTreeMap<ReplicaKey, Local>) {
        // Forgotten once ended, private disk or not.
        let ending: Vec<String> = {
            let mut ending = self
                .ending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            ending.retain(|_, (pid, start)| start_time(*pid) == Some(*start));
            ending.keys().cloned().collect()
        };
        // No directory: no private disk was ever made here.
        let Ok(entries) = std::fs::read_dir(self.disks_dir()) else {
            return;
        };
        let mut needed: BTreeSet<String> = desired
            .iter()
            .map(|((vm, replica), (_, assignment, _))| {
                disk_file_name(vm, &assignment.uid, *replica)
            })
            .collect();
        needed.extend(
            locals
                .iter()
                .filter(|(_, local)| local.pid != 0 && local.exit().is_none())
                .map(|((vm, replica), local)| disk_file_name(vm, &local.uid, *replica)),
        );
        needed.extend(ending);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let disk = name.ends_with(".img") || crate::files::is_temporary(&name);
            if !disk || needed.contains(&name) {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "private disk removed: its replica is gone from this host")
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove a private disk no replica needs")
                }
            }
        }
    }

    /// Stops a replica no longer assigned here gracefully: `stop` on its control socket
    /// (the log ends cleanly, ftvmm exits 143), then SIGKILL if it is still there after
    /// [`STOP_GRACE`] or did not take the request. Failure drills keep using SIGKILL
    /// ([`Supervisor::stop`]).
    pub(super) async fn retire(&self, key: &ReplicaKey, local: &Local) {
        // Its disk, if it has one, stays until the process has ended.
        self.ending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                disk_file_name(&key.0, &local.uid, key.1),
                (local.pid, local.start_time),
            );
        let path = self.control_path(&key.0, key.1);
        // Asked now, before the socket file is forgotten with the replica.
        let asked = replica_control::request(&path, ControlRequest::Stop, CONTROL_TIMEOUT).await;
        let (vm, replica, role, pid) = (&key.0, key.1, local.role, local.pid);
        match &asked {
            Ok(_) => {
                tracing::info!(vm = %vm, replica, %role, pid, "stopping replica no longer assigned here")
            }
            Err(err) => {
                tracing::info!(vm = %vm, replica, %role, pid, error = %err, "killing replica no longer assigned here (no graceful stop)")
            }
        }
        reap(key, local, asked.is_ok());
    }

    /// Stops a primary handing over to its backup: `stop` on its control socket (the
    /// vCPU stops, held output is released as the backup acknowledges it, the log ends
    /// without an end frame, so the backup goes live). Returns whether that is settled
    /// (asked); `false` to ask again at the next pass. Never SIGKILLed for it: a
    /// primary that cannot be asked keeps running, protected.
    async fn hand_over(&self, key: &ReplicaKey, local: &Local) -> bool {
        let path = self.control_path(&key.0, key.1);
        let (vm, replica, pid) = (&key.0, key.1, local.pid);
        match replica_control::request(&path, ControlRequest::Stop, CONTROL_TIMEOUT).await {
            Ok(_) => {
                tracing::info!(vm = %vm, replica, pid, "switchover: the primary stops, its backup takes over");
                true
            }
            Err(err) => {
                tracing::warn!(vm = %vm, replica, pid, error = %err, "switchover: the primary cannot be asked to stop; asking again");
                false
            }
        }
    }

    /// Stops a backup being replaced, but only while it still follows its primary
    /// (`stop-backup`): one that went live is the VM now and runs on. Returns whether
    /// that is settled (asked, or refused because it is live); `false` to ask again at
    /// the next pass (another answer, or no answer from a replica whose last status was
    /// not a following backup's).
    async fn stop_backup(&self, key: &ReplicaKey, local: &Local) -> bool {
        let path = self.control_path(&key.0, key.1);
        let (vm, replica, pid) = (&key.0, key.1, local.pid);
        match replica_control::request(&path, ControlRequest::StopBackup, CONTROL_TIMEOUT).await {
            Ok(answer) if answer.starts_with("ok") => {
                tracing::info!(vm = %vm, replica, pid, "stopping the backup being replaced");
                reap(key, local, true);
                true
            }
            Ok(answer) if answer.starts_with("error: not stopping") => {
                tracing::warn!(vm = %vm, replica, pid, "the backup being replaced runs on: {}", answer.trim());
                true
            }
            // Busy, or an ftvmm that does not know the request: asked again next pass.
            Ok(answer) => {
                tracing::warn!(vm = %vm, replica, pid, "stop-backup not taken: {}", answer.trim());
                false
            }
            Err(err) => {
                let following = self
                    .pair_state(key)
                    .is_some_and(|pair| pair.role == "backup");
                if following {
                    tracing::info!(vm = %vm, replica, pid, error = %err, "killing the backup being replaced (no graceful stop)");
                    reap(key, local, false);
                }
                following
            }
        }
    }

    /// Removes the local files and the store report of a replica that is gone.
    async fn forget(&self, key: &ReplicaKey) -> Result<(), SupervisorError> {
        let _ = std::fs::remove_file(self.local_path(&key.0, key.1, "pid"));
        let _ = std::fs::remove_file(self.local_path(&key.0, key.1, "json"));
        // ftvmm removes its socket at exit, but not when it is killed.
        let _ = std::fs::remove_file(self.control_path(&key.0, key.1));
        self.reported.lock().await.remove(key);
        let report_key = keys::report(&key.0, key.1);
        if let Some(kv) = self.store.get(&report_key).await? {
            let ours = decode::<ReplicaReport>(&report_key, &kv.value)
                .is_some_and(|report| report.host == self.config.host && report.replica == key.1);
            if ours {
                self.store.delete(&report_key).await?;
            }
        }
        Ok(())
    }
}

/// Ends a replica in the background: after a graceful stop was asked (`asked`), waits
/// up to [`STOP_GRACE`] for it to go; then (or at once) SIGKILL if it is still there.
fn reap(key: &ReplicaKey, local: &Local, asked: bool) {
    let (pid, start) = (local.pid, local.start_time);
    let (vm, role) = (key.0.clone(), local.role);
    tokio::spawn(async move {
        if asked {
            let deadline = Instant::now() + STOP_GRACE;
            while start_time(pid) == Some(start) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if start_time(pid) == Some(start) && asked {
            tracing::warn!(vm = %vm, %role, pid, "replica did not stop within {STOP_GRACE:?}: SIGKILL");
        }
        if let Err(err) = kill_checked(pid, start) {
            tracing::warn!(vm = %vm, %role, pid, error = %err, "cannot kill the replica");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::{eventually, runs, Bench};
    use crate::model::Role;
    use crate::store::Store;

    async fn wipe(store: &dyn Store) {
        for kv in store.list_prefix("/ft/").await.expect("list") {
            store.delete(&kv.key).await.expect("delete");
        }
    }

    #[tokio::test]
    async fn replicas_are_not_retired_when_the_store_suddenly_knows_nothing() {
        let bench = Bench::new("ftd-empty-store");
        bench.assign("u1", 1).await;
        let supervisor = bench.supervisor();
        supervisor.join_cluster().await.expect("join");
        assert_eq!(supervisor.sync().await.expect("sync").started, 1);
        let pid = supervisor
            .running_pid(&bench.vm, Role::Primary)
            .await
            .expect("a replica");
        supervisor.sync().await.expect("sync");
        let marker = bench.store.get("/ft/cluster").await.expect("get");
        assert!(marker.is_some(), "the cluster marker is written once");

        // The store answers, but empty: no cluster marker, no VM.
        wipe(&*bench.store).await;
        let summary = supervisor.sync().await.expect("sync");
        assert_eq!((summary.stopped, summary.started), (0, 0));
        // The marker is back (another ftd's restart would not recreate it; a restore
        // might) but the VM is gone without a trace of a deletion: no report of ours,
        // though nobody but this host removes it while its lease lives.
        let marker = marker.expect("the marker");
        bench
            .store
            .put(&marker.key, marker.value, None)
            .await
            .expect("put marker");
        let summary = supervisor.sync().await.expect("sync");
        assert_eq!((summary.stopped, summary.started), (0, 0));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(runs(pid), "the replica must run on");

        // Positive evidence: web1 is there again, and its assignment is not.
        bench.assign("u1", 1).await;
        bench
            .store
            .delete(&crate::keys::assignment(&bench.vm, Role::Primary))
            .await
            .expect("delete");
        assert_eq!(supervisor.sync().await.expect("sync").stopped, 1);
        eventually("the replica no assignment wants to end", || !runs(pid)).await;
    }

    /// Until `check` holds, runs supervisor passes (up to 10 s).
    async fn passes_until(supervisor: &super::Supervisor, what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            supervisor.sync().await.expect("sync");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_private_disk_goes_once_its_replica_has_ended_and_is_no_longer_assigned_here() {
        let bench = Bench::new("ftd-disk-cleanup");
        bench.assign_private("u1", 1, 64 << 20).await;
        let supervisor = bench.supervisor();
        supervisor.join_cluster().await.expect("join");
        assert_eq!(supervisor.sync().await.expect("sync").started, 1);
        let disk = bench.state_dir().join("disks/web1-u1-r1.img");
        let pid = supervisor
            .running_pid(&bench.vm, Role::Primary)
            .await
            .expect("a replica");
        supervisor.sync().await.expect("sync");
        assert!(disk.exists(), "assigned and running: kept");

        // The process dies (a failover): still assigned here until the leader moves on,
        // so the disk stays, however many passes go by.
        supervisor
            .stop(&bench.vm, Role::Primary)
            .await
            .expect("killed");
        eventually("the replica to end", || !runs(pid)).await;
        for _ in 0..3 {
            supervisor.sync().await.expect("sync");
        }
        assert!(disk.exists(), "ended but still assigned: kept");

        // The leader moves on (the backup promoted elsewhere): gone for good.
        bench
            .store
            .delete(&crate::keys::assignment(&bench.vm, Role::Primary))
            .await
            .expect("delete");
        assert_eq!(supervisor.sync().await.expect("sync").stopped, 1);
        assert!(!disk.exists(), "ended and not assigned: removed");
    }

    #[tokio::test]
    async fn a_private_disk_stays_while_its_process_runs_though_its_vm_was_deleted() {
        let bench = Bench::new("ftd-disk-running");
        bench.assign_private("u1", 1, 64 << 20).await;
        let supervisor = bench.supervisor();
        supervisor.join_cluster().await.expect("join");
        supervisor.sync().await.expect("sync");
        let disk = bench.state_dir().join("disks/web1-u1-r1.img");
        assert!(disk.exists());

        // A process of replica 2 of that life, no longer assigned here and asked to stop,
        // but not ended yet: its disk stays until it has.
        let mut ending = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let started = super::start_time(ending.id()).expect("a start time");
        let second = bench.state_dir().join("disks/web1-u1-r2.img");
        std::fs::write(&second, b"").expect("write");
        supervisor
            .ending
            .lock()
            .expect("lock")
            .insert("web1-u1-r2.img".into(), (ending.id(), started));
        // Not disks of ours, or left by a crash in the middle of making one.
        let notes = bench.state_dir().join("disks/notes.txt");
        std::fs::write(&notes, b"mine").expect("write");
        let half_made = bench.state_dir().join("disks/.web1-u1-r9.img.1.2.tmp");
        std::fs::write(&half_made, b"").expect("write");
        supervisor.sync().await.expect("sync");
        assert!(second.exists(), "its process runs: kept");
        assert!(notes.exists() && !half_made.exists());
        ending.kill().expect("kill");
        ending.wait().expect("wait");
        supervisor.sync().await.expect("sync");
        assert!(!second.exists(), "its process ended: removed");

        // The VM is deleted: its running replica is asked to stop, and its disk goes
        // only once the process has ended.
        let pid = supervisor
            .running_pid(&bench.vm, Role::Primary)
            .await
            .expect("a replica");
        bench
            .store
            .delete(&crate::keys::spec(&bench.vm))
            .await
            .expect("delete");
        supervisor.sync().await.expect("sync");
        if runs(pid) {
            assert!(disk.exists(), "removed while its process ran");
        }
        passes_until(&supervisor, "the deleted VM's disk to go", || {
            !disk.exists()
        })
        .await;
        assert!(!runs(pid), "removed while its process ran");
    }
}
