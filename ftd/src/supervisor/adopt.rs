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
//! A process is re-adopted only if `/proc/<pid>` still shows the same start time and its
//! command line names the replica's control socket, so a recycled pid is never mistaken
//! for a replica.

use super::{cmdline_has, start_time, Ended, Local, ReplicaKey, Supervisor, SupervisorError};
use crate::model::{Role, VmName};
use crate::records::{decode, encode};
use serde::{Deserialize, Serialize};
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

impl Supervisor {
    /// Re-adopts the replicas recorded in the state directory (after an ftd restart).
    /// Returns how many still run.
    pub async fn adopt(&self) -> Result<usize, SupervisorError> {
        let state_dir = &self.config.state_dir;
        let dir_error = |source| SupervisorError::StateDir {
            path: state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(dir_error)?;
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
                let numbered = file
                    .file_name()
                    .to_str()
                    .and_then(|name| name.strip_prefix("replica-")?.strip_suffix(".json"))
                    .and_then(|number| number.parse::<u64>().ok());
                let Some(replica) = numbered else { continue };
                let Ok(raw) = std::fs::read(&path) else {
                    continue;
                };
                let Some(file) = decode::<LocalFile>(&path.display().to_string(), &raw)
                    .filter(|file| file.replica == replica)
                else {
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
        Ok(running)
    }

    /// Writes the files a restarted ftd re-adopts `local` from; failing to is logged, not
    /// fatal (the replica itself runs on).
    pub(super) fn record_local(&self, key: &ReplicaKey, local: &Local) {
        let (vm, replica) = key;
        if let Err(err) = std::fs::write(
            self.local_path(vm, *replica, "pid"),
            format!("{}\n", local.pid),
        )
        .and_then(|()| {
            std::fs::write(
                self.local_path(vm, *replica, "json"),
                encode(&local.file(*replica)),
            )
        }) {
            tracing::error!(vm = %vm, replica, pid = local.pid, error = %err, "cannot record the replica's pid");
        }
    }
}
