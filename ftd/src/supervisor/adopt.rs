//! The files a restarted ftd re-adopts its replicas from, in `<state_dir>/<vm>/`:
//!
//! | file | content |
//! |---|---|
//! | `replica-<n>.pid` | the ftvmm pid of replica number `n` |
//! | `replica-<n>.json` | which incarnation it runs (VM uid, replica number, generation, role), pid and start time |
//! | `console.log` | the guest console (`--console`) |
//! | `ftvmm.log` | ftvmm's stderr and stdout, appended |
//! | `replica-<n>.sock` | ftvmm's control socket (`--control`), removed by ftvmm at exit |
//!
//! ftd writes the pid and json files whole ([`crate::files::write_atomic`]): a crash in
//! the middle leaves the old file or the new one.
//!
//! A process is re-adopted only if `/proc/<pid>` still shows the same start time and its
//! command line names the replica's control socket, so a recycled pid is never mistaken
//! for a replica.
//!
//! Then the orphan scan: an ftvmm whose command line names a control socket of this state
//! directory (so this host's ftd started it) but that no readable json file accounts for
//! is never left running unknown. Its command line (the contract's `RunArgs`) says which
//! VM, life, replica and generation it runs: it is adopted if an assignment still wants
//! that replica here, and stopped otherwise.

use super::marker::Membership;
use super::sync::Desired;
use super::{cmdline_has, start_time, Ended, Local, ReplicaKey, Supervisor, SupervisorError};
use crate::model::{Role, VmName};
use crate::records::{decode, encode, load_vms};
use ftvm_contract::flags::{PairRole, RunArgs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// What `replica-<n>.json` records about a started replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LocalFile {
    uid: String,
    replica: u64,
    generation: u64,
    role: Role,
    pid: u32,
    start_time: u64,
}

impl Local {
    /// What `replica-<n>.json` records about this replica.
    fn file(&self, replica: u64) -> LocalFile {
        LocalFile {
            uid: self.uid.clone(),
            replica,
            generation: self.generation,
            role: self.role,
            pid: self.pid,
            start_time: self.start_time,
        }
    }
}

/// An ftvmm process of this state directory that no state file accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Orphan {
    key: ReplicaKey,
    pid: u32,
    start_time: u64,
    /// Its flags, when its command line parses as `ftvmm run`.
    flags: Option<RunArgs>,
}

/// The flags of an `ftvmm run` command line (`args` from `/proc/<pid>/cmdline`).
fn run_flags(args: &[String]) -> Option<RunArgs> {
    let run = args.iter().position(|arg| arg == "run")?;
    RunArgs::parse_args(&args[run + 1..]).ok()
}

/// The arguments of `pid`'s command line.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // Every argument ends with a NUL (an empty one too, as `--cmdline ""` is).
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    Some(
        raw.split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// Removes the TAPs this ftd made for replicas it no longer tracks (they ended while it
/// was down, or a crash came between a replica's end and its TAP's removal).
fn remove_stale_taps(locals: &std::collections::BTreeMap<super::ReplicaKey, Local>) {
    let in_use = locals
        .iter()
        .map(|((_, replica), local)| super::taps::name(&local.uid, *replica))
        .collect();
    for tap in super::taps::remove_stale(&in_use) {
        tracing::info!("removed the TAP {tap}: no replica here needs it any more");
    }
}

impl Supervisor {
    /// Re-adopts the replicas recorded in the state directory (after an ftd restart),
    /// then adopts or stops the ftvmm processes of this state directory that no state
    /// file accounts for (the orphan scan; it reads the assignments from the store).
    /// Returns how many still run.
    pub async fn adopt(&self) -> Result<usize, SupervisorError> {
        let state_dir = &self.config.state_dir;
        let dir_error = |source| SupervisorError::StateDir {
            path: state_dir.clone(),
            source,
        };
        crate::files::private_dir(state_dir).map_err(dir_error)?;
        let mut locals = self.locals.lock().await;
        let mut running = 0;
        for entry in std::fs::read_dir(state_dir).map_err(dir_error)? {
            let Ok(entry) = entry else { continue };
            let Some(vm) = entry
                .file_name()
                .to_str()
                .and_then(|name| VmName::new(name).ok())
            else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(self.vm_dir(&vm)) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let name = file.file_name().to_string_lossy().into_owned();
                if crate::files::is_temporary(&name) {
                    // A write cut short by a crash: the file it was for is whole.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let numbered = name
                    .strip_prefix("replica-")
                    .and_then(|rest| rest.strip_suffix(".json"))
                    .and_then(|number| number.parse::<u64>().ok());
                let Some(replica) = numbered else { continue };
                let file = match std::fs::read(&path) {
                    Ok(raw) => decode::<LocalFile>(&path.display().to_string(), &raw)
                        .filter(|file| file.replica == replica),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "cannot read a replica's state file");
                        None
                    }
                };
                let Some(file) = file else {
                    tracing::warn!(vm = %vm, replica, path = %path.display(), "unreadable replica state file: its process, if it runs, is found by the orphan scan");
                    continue;
                };
                // The command line must name this replica's control socket: a recycled pid
                // is never mistaken for it.
                let control = self.control_path(&vm, replica).display().to_string();
                let alive = start_time(file.pid) == Some(file.start_time)
                    && cmdline_has(file.pid, &control);
                let local = Local {
                    uid: file.uid,
                    role: file.role,
                    generation: file.generation,
                    pid: file.pid,
                    start_time: file.start_time,
                    exit: Arc::default(),
                    child: false,
                    retire_settled: false,
                };
                let role = local.role;
                if alive {
                    running += 1;
                    tracing::info!(vm = %vm, replica, %role, pid = file.pid, "re-adopted running replica");
                } else {
                    local.set_exit(Ended::unknown(
                        "ended while ftd was not running (status unknown)",
                    ));
                    tracing::warn!(vm = %vm, replica, %role, pid = file.pid, "recorded replica is gone");
                }
                locals.insert((vm.clone(), replica), local);
            }
        }

        let orphans = self.orphans(&locals);
        if orphans.is_empty() {
            tracing::info!("orphan scan: every ftvmm of this state directory is accounted for");
            remove_stale_taps(&locals);
            return Ok(running);
        }
        let vms = load_vms(&*self.store, None).await?;
        if self.membership().await? != Membership::Ours {
            // Not this cluster's store: no evidence either way. Tracked (and recorded)
            // as what their command lines say; the supervisor's passes decide once the
            // store is this cluster's again.
            for orphan in orphans {
                tracing::warn!(vm = %orphan.key.0, replica = orphan.key.1, pid = orphan.pid, "orphan scan: found an ftvmm of this state directory without a readable state file; kept as it is for now: the store is not this cluster's");
                let local = self.stray(&orphan);
                running += 1;
                self.record_local(&orphan.key, &local);
                locals.insert(orphan.key, local);
            }
            return Ok(running);
        }
        let desired = self.desired(&vms);
        for orphan in orphans {
            if let Some(local) = self.adopt_orphan(&orphan, &desired) {
                running += 1;
                self.record_local(&orphan.key, &local);
                locals.insert(orphan.key, local);
            } else {
                let local = self.stray(&orphan);
                self.retire(&orphan.key, &local).await;
            }
        }
        remove_stale_taps(&locals);
        Ok(running)
    }

    /// The live ftvmm processes whose command line names a control socket of this state
    /// directory (`--control <state_dir>/<vm>/replica-<n>.sock`) and that are not the
    /// running replica recorded for that socket in `locals`.
    fn orphans(&self, locals: &BTreeMap<ReplicaKey, Local>) -> Vec<Orphan> {
        let Ok(proc) = std::fs::read_dir("/proc") else {
            tracing::warn!("orphan scan: cannot read /proc");
            return Vec::new();
        };
        let me = std::process::id();
        let mut found = Vec::new();
        for entry in proc.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
                .filter(|pid| *pid != me)
            else {
                continue;
            };
            let Some(args) = cmdline(pid) else { continue };
            let Some(key) = args
                .windows(2)
                .filter(|pair| pair[0] == "--control")
                .find_map(|pair| self.replica_of_control(Path::new(&pair[1])))
            else {
                continue;
            };
            let Some(started) = start_time(pid) else {
                continue;
            };
            let recorded = locals.get(&key).is_some_and(|local| {
                local.pid == pid && local.start_time == started && local.exit().is_none()
            });
            if !recorded {
                found.push(Orphan {
                    key,
                    pid,
                    start_time: started,
                    flags: run_flags(&args),
                });
            }
        }
        found
    }

    /// The replica whose control socket `path` is, if it is one of this state directory.
    fn replica_of_control(&self, path: &Path) -> Option<ReplicaKey> {
        let replica = path
            .file_name()?
            .to_str()?
            .strip_prefix("replica-")?
            .strip_suffix(".sock")?
            .parse()
            .ok()?;
        let vm = VmName::new(path.parent()?.file_name()?.to_str()?).ok()?;
        (self.control_path(&vm, replica) == path).then_some((vm, replica))
    }

    /// The replica `orphan` is, if an assignment in `desired` still wants it here: the
    /// same VM, replica number and life (the `--vm-uid` of its command line).
    fn adopt_orphan(&self, orphan: &Orphan, desired: &Desired) -> Option<Local> {
        let (vm, replica) = (&orphan.key.0, orphan.key.1);
        let uid = orphan.flags.as_ref().and_then(|flags| flags.vm_uid.clone());
        let named_vm = orphan.flags.as_ref().and_then(|flags| flags.vm.as_deref());
        let wanted = desired.get(&orphan.key).filter(|(_, assignment, _)| {
            uid.as_deref() == Some(assignment.uid.as_str())
                && named_vm.is_none_or(|named| named == vm.as_str())
        });
        let Some((role, assignment, _)) = wanted else {
            let why = match (&orphan.flags, &uid) {
                (None, _) => "its command line is not one of ftvmm run",
                (Some(_), None) => "its command line does not say which life of the VM it runs",
                (Some(_), Some(_)) => "no assignment wants it here",
            };
            tracing::warn!(vm = %vm, replica, pid = orphan.pid, life = ?uid, "orphan scan: found an ftvmm of this state directory without a readable state file; stopping it: {why}");
            return None;
        };
        tracing::warn!(vm = %vm, replica, pid = orphan.pid, life = %assignment.uid, %role, "orphan scan: found an ftvmm of this state directory without a readable state file; re-adopted: its assignment still wants it here");
        Some(Local {
            uid: assignment.uid.clone(),
            role: *role,
            generation: assignment.generation,
            pid: orphan.pid,
            start_time: orphan.start_time,
            exit: Arc::default(),
            child: false,
            retire_settled: false,
        })
    }

    /// `orphan` as its command line describes it (to stop, or to keep until the store
    /// can say whether anything wants it).
    fn stray(&self, orphan: &Orphan) -> Local {
        let flags = orphan.flags.as_ref();
        Local {
            uid: flags
                .and_then(|flags| flags.vm_uid.clone())
                .unwrap_or_default(),
            role: match flags.and_then(|flags| flags.role) {
                Some(PairRole::Backup) => Role::Backup,
                _ => Role::Primary,
            },
            generation: flags.map_or(0, |flags| flags.generation),
            pid: orphan.pid,
            start_time: orphan.start_time,
            exit: Arc::default(),
            child: false,
            retire_settled: false,
        }
    }

    /// Writes the files a restarted ftd re-adopts `local` from, each whole
    /// ([`crate::files::write_atomic`]); failing to is logged, not fatal (the replica
    /// itself runs on).
    pub(super) fn record_local(&self, key: &ReplicaKey, local: &Local) {
        let (vm, replica) = key;
        let written = crate::files::write_atomic(
            &self.local_path(vm, *replica, "pid"),
            format!("{}\n", local.pid).as_bytes(),
        )
        .and_then(|()| {
            crate::files::write_atomic(
                &self.local_path(vm, *replica, "json"),
                &encode(&local.file(*replica)),
            )
        });
        if let Err(err) = written {
            tracing::error!(vm = %vm, replica, pid = local.pid, error = %err, "cannot record the replica's pid");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{eventually, names, runs, Bench};
    use super::*;
    use std::io::Read;

    fn local(pid: u32) -> Local {
        Local {
            uid: "u1".into(),
            role: Role::Primary,
            generation: 1,
            pid,
            start_time: 1,
            exit: Arc::default(),
            child: false,
            retire_settled: false,
        }
    }

    #[tokio::test]
    async fn a_state_file_is_replaced_whole_and_never_rewritten_in_place() {
        let bench = Bench::new("ftd-atomic");
        let supervisor = bench.supervisor();
        std::fs::create_dir_all(bench.state_dir().join("web1")).expect("mkdir");
        let key = (bench.vm.clone(), 1);
        supervisor.record_local(&key, &local(10));
        // A reader that opened the file before the next write keeps reading a whole
        // file: the old one.
        let mut before = std::fs::File::open(bench.file(1, "json")).expect("open");
        supervisor.record_local(&key, &local(20));
        let mut seen = Vec::new();
        before.read_to_end(&mut seen).expect("read");
        let old = decode::<LocalFile>("old", &seen).expect("the old file, whole");
        assert_eq!(old.pid, 10);
        let now = std::fs::read(bench.file(1, "json")).expect("read");
        assert_eq!(
            decode::<LocalFile>("new", &now).map(|file| file.pid),
            Some(20)
        );
        assert_eq!(
            std::fs::read_to_string(bench.file(1, "pid")).expect("read"),
            "20\n"
        );
        let mut names: Vec<String> = std::fs::read_dir(bench.state_dir().join("web1"))
            .expect("list")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["replica-1.json", "replica-1.pid"],
            "no temporary left"
        );
    }

    /// Starts web1's replica 1 (life u1) with a first supervisor, then loses its state
    /// file as `lose` says; returns the replica's pid and start time.
    async fn started_then_file_lost(bench: &Bench, lose: impl Fn(&std::path::Path)) -> (u32, u64) {
        bench.assign("u1", 1).await;
        let first = bench.supervisor();
        first.join_cluster().await.expect("join");
        assert_eq!(first.adopt().await.expect("adopt"), 0);
        assert_eq!(first.sync().await.expect("sync").started, 1);
        let pid = first
            .running_pid(&bench.vm, Role::Primary)
            .await
            .expect("a replica");
        let control = first.control_path(&bench.vm, 1);
        eventually("the replica's command line", || names(pid, &control)).await;
        lose(&bench.file(1, "json"));
        (pid, start_time(pid).expect("a start time"))
    }

    #[tokio::test]
    async fn a_replica_whose_state_file_is_gone_is_readopted_when_still_assigned() {
        let bench = Bench::new("ftd-orphan-kept");
        let (pid, started) = started_then_file_lost(&bench, |path| {
            std::fs::remove_file(path).expect("remove");
        })
        .await;
        // ftd restarts: the replica ran on, its json is gone.
        let second = bench.supervisor();
        second.join_cluster().await.expect("join");
        assert_eq!(second.adopt().await.expect("adopt"), 1);
        assert_eq!(
            second.running_pid(&bench.vm, Role::Primary).await,
            Some(pid)
        );
        let file = std::fs::read(bench.file(1, "json")).expect("its file again");
        let file = decode::<LocalFile>("json", &file).expect("a state file");
        assert_eq!((file.uid.as_str(), file.pid), ("u1", pid));
        assert_eq!(
            second.sync().await.expect("sync").started,
            0,
            "no second copy"
        );
        assert!(runs(pid));
        assert!(super::super::kill_checked(pid, started).expect("kill"));
    }

    #[tokio::test]
    async fn a_replica_whose_state_file_is_unreadable_is_stopped_when_not_assigned() {
        let bench = Bench::new("ftd-orphan-stopped");
        let (pid, _) = started_then_file_lost(&bench, |path| {
            std::fs::write(path, "{\"uid\": \"u1\", \"repl").expect("write");
        })
        .await;
        // Meanwhile web1 was deleted and created again: another life.
        bench.assign("u2", 1).await;
        let second = bench.supervisor();
        second.join_cluster().await.expect("join");
        assert_eq!(second.adopt().await.expect("adopt"), 0);
        eventually("the replica no assignment wants to end", || !runs(pid)).await;
    }
}
