//! What the supervisor's tests share: a state directory, an in-memory store holding a VM
//! assigned to host `a`, and a stand-in for ftvmm (a shell loop that keeps its command
//! line, so `/proc/<pid>/cmdline` names its control socket as a real replica's does).

use super::{Supervisor, SupervisorConfig};
use crate::keys;
use crate::model::{Assignment, HostName, Role, VmName, VmSpec};
use crate::records::encode;
use crate::store::memory::MemStore;
use crate::store::Store;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// A state directory, a store and a fake ftvmm.
pub(super) struct Bench {
    pub dir: PathBuf,
    pub store: Arc<dyn Store>,
    pub ftvmm: PathBuf,
    pub vm: VmName,
}

impl Bench {
    pub fn new(tag: &str) -> Bench {
        let dir = ftvm_tests::temp_dir(tag);
        let ftvmm = dir.join("fake-ftvmm");
        std::fs::write(&ftvmm, "#!/bin/sh\nwhile :; do sleep 1; done\n").expect("write");
        let mut permissions = std::fs::metadata(&ftvmm).expect("stat").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&ftvmm, permissions).expect("chmod");
        Bench {
            store: Arc::new(MemStore::new()),
            ftvmm,
            vm: VmName::new("web1").expect("valid name"),
            dir,
        }
        .ready()
    }

    fn ready(self) -> Bench {
        std::fs::create_dir_all(self.state_dir()).expect("state dir");
        self
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A supervisor of host `a` on this bench (as a new ftd process would make it).
    pub fn supervisor(&self) -> Supervisor {
        let (_, lease) = watch::channel(0);
        Supervisor::new(
            SupervisorConfig {
                host: HostName::new("a").expect("valid host name"),
                state_dir: self.state_dir(),
                ftvmm: self.ftvmm.clone(),
                arbiter: "local:/nowhere".into(),
                cluster_id_file: Some(self.state_dir().join("cluster-id")),
                replica_user: None,
                replica_seccomp: ftvm_contract::flags::SeccompMode::Enforce,
                replica_tls_dir: None,
                replica_etcd: Default::default(),
                bridge: None,
                paths: crate::paths::PathPolicy {
                    image_dirs: vec![self.dir.clone()],
                    disk_dirs: vec![self.dir.clone()],
                },
            },
            self.store.clone(),
            lease,
            Arc::new(Notify::new()),
        )
    }

    /// Stores the spec of web1 (life `uid`) and its primary, replica `replica` on a.
    pub async fn assign(&self, uid: &str, replica: u64) {
        self.assign_spec(self.spec(uid), Role::Primary, replica)
            .await;
    }

    /// Stores the spec of web1 (life `uid`) with private disks of `size` bytes and its
    /// primary, replica `replica` on a.
    pub async fn assign_private(&self, uid: &str, replica: u64, size: u64) {
        let spec = VmSpec {
            disk_mode: crate::model::DiskMode::Private,
            disk_size_bytes: Some(size),
            disk_image: None,
            ..self.spec(uid)
        };
        self.assign_spec(spec, Role::Primary, replica).await;
    }

    /// The spec of web1's life `uid`: the hello guest, no disk.
    pub fn spec(&self, uid: &str) -> VmSpec {
        VmSpec {
            name: self.vm.clone(),
            image: "/img/hello.elf".into(),
            image_sha256: None,
            mem_bytes: 64 << 20,
            cmdline: String::new(),
            disk: None,
            disk_mode: crate::model::DiskMode::Shared,
            disk_size_bytes: None,
            disk_image: None,
            net: None,
            hosts: Vec::new(),
            uid: uid.into(),
            created_unix_ms: 0,
        }
    }

    /// Stores `spec` and its `role` assignment, replica `replica` on a.
    pub async fn assign_spec(&self, spec: VmSpec, role: Role, replica: u64) {
        let assignment = Assignment {
            host: HostName::new("a").expect("valid host name"),
            generation: 1,
            uid: spec.uid.clone(),
            replica,
            log_address: None,
            clone_listen: Some("127.0.0.1:7801".into()),
            // A backup needs somewhere to come from: a clone.
            clone_from: (role == Role::Backup).then(|| "127.0.0.1:7802".into()),
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        self.store
            .put(&keys::spec(&self.vm), encode(&spec), None)
            .await
            .expect("put spec");
        self.store
            .put(&keys::assignment(&self.vm, role), encode(&assignment), None)
            .await
            .expect("put assignment");
    }

    /// The local file `replica-<n>.<ext>` of web1.
    pub fn file(&self, replica: u64, ext: &str) -> PathBuf {
        self.state_dir()
            .join(self.vm.as_str())
            .join(format!("replica-{replica}.{ext}"))
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        // The fake replicas run in sessions of their own: kill what is left of them.
        let dir = self.dir.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let mine = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|raw| String::from_utf8_lossy(&raw).contains(&dir));
            if mine {
                // SAFETY: kill(2) on a process whose command line names this bench's
                // directory (a fake replica of this test).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits up to 5 s for `check` (letting the runtime run the supervisor's tasks).
pub(super) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` runs (not a zombie).
pub(super) fn runs(pid: u32) -> bool {
    super::start_time(pid).is_some()
}

/// Whether the command line of `pid` names `path`.
pub(super) fn names(pid: u32, path: &Path) -> bool {
    super::cmdline_has(pid, &path.display().to_string())
}
