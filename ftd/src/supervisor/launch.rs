//! Starting a replica: the `ftvmm run` command line for an assignment, and the process
//! itself, in a session of its own (`setsid`) with its output appended to
//! `<state_dir>/<vm>/ftvmm.log`. A waiter task notes how it ends and wakes the
//! supervisor loop.
//!
//! An assignment with a log address is one half of a pair: the primary is started with
//! `--role primary --vm V --generation N --log-listen ADDR --arbiter SPEC`, the backup with
//! the same flags but `--role backup --log-connect ADDR`; a backup made by cloning gets
//! `--role backup --clone-from ADDR` instead. A replica with a clone address also gets
//! `--clone-listen ADDR`: it accepts a new backup there whenever it runs alone
//! (docs/contract.md). Every replica gets `--control <state_dir>/<vm>/replica-<n>.sock`.
//!
//! A replica of a VM with private disks gets `--disk <state_dir>/disks/<vm>-<uid>-r<n>.img
//! --disk-private`: its own file, made here before it starts, empty (sparse) at the
//! spec's size. The two replicas of a new pair thus start from identical disks (all
//! zeros); a backup made by cloning gets its content from the clone. Like the console
//! and the control socket, it is ftd's (0600): ftvmm opens it before it drops to
//! `--run-as`.

use super::{start_time, Ended, Local, Supervisor};
use crate::model::{Assignment, NetSpec, Role, VmName, VmSpec};
use ftvm_contract::flags::{PairRole, RunArgs};
use std::ffi::OsString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

/// How a process ended, from its exit status.
fn describe(status: std::process::ExitStatus) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "ended".to_owned(),
    };
    Ended {
        how,
        code: status.code(),
    }
}

/// Whether `ftvmm` can run a backup replica (its `run --help` lists `--role`).
pub fn probe_backup_capable(ftvmm: &Path) -> bool {
    std::process::Command::new(ftvmm)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("--role"))
        .unwrap_or(false)
}

/// The CPU a guest of this host sees, as `ftvmm cpu` prints it, if it says.
pub fn probe_cpu(ftvmm: &Path) -> Option<String> {
    let out = std::process::Command::new(ftvmm)
        .arg("cpu")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && line.starts_with("cpu=")).then_some(line)
}

impl Supervisor {
    /// A replica that could not be started, and why (it counts as started and ended,
    /// so the leader sees the reason).
    pub(super) fn not_started(
        &self,
        vm: &VmName,
        role: Role,
        assignment: &Assignment,
        how: String,
    ) -> Local {
        tracing::error!(vm = %vm, %role, "{how}");
        let local = Local {
            uid: assignment.uid.clone(),
            role,
            generation: assignment.generation,
            pid: 0,
            start_time: 0,
            exit: Arc::default(),
            child: false,
            retire_settled: false,
        };
        local.set_exit(Ended::unknown(&how));
        local
    }

    /// The spec with its uploaded image (if any) replaced by this host's verified copy.
    pub(super) async fn local_image(&self, spec: &VmSpec) -> Result<VmSpec, String> {
        let Some(sha256) = &spec.image_sha256 else {
            return Ok(spec.clone());
        };
        let local = crate::images::LocalImages::new(&self.config.state_dir);
        match local.ensure(&*self.store, sha256).await {
            Ok((path, how)) => {
                match how {
                    crate::images::Ensured::Present => {}
                    crate::images::Ensured::Fetched => {
                        tracing::info!(%sha256, path = %path.display(), "image fetched from the store")
                    }
                    crate::images::Ensured::Replaced => tracing::warn!(
                        %sha256,
                        path = %path.display(),
                        "this host's copy of the image did not have its hash (changed on disk): not used, fetched again from the store"
                    ),
                }
                Ok(VmSpec {
                    image: path.display().to_string(),
                    ..spec.clone()
                })
            }
            Err(err) => Err(format!("cannot start: {err}")),
        }
    }

    pub(super) fn spawn(
        &self,
        vm: &VmName,
        role: Role,
        assignment: &Assignment,
        spec: &VmSpec,
    ) -> Local {
        // Every attempt counts: a replica that cannot start loops just the same.
        crate::metrics::replica_started(vm.as_str(), role.as_str());
        let failed = |how: String| self.not_started(vm, role, assignment, how);
        if role == Role::Backup
            && assignment.log_address.is_none()
            && assignment.clone_from.is_none()
        {
            return failed(
                "cannot start: the backup assignment has neither a log nor a clone address".into(),
            );
        }
        let replica = assignment.replica;
        if let Some(net) = spec.net.as_ref().filter(|net| net.managed()) {
            let Some(bridge) = &self.config.bridge else {
                return failed(
                    "cannot start: the VM's NIC needs a TAP made by ftd, and this host has no bridge configured".into(),
                );
            };
            let tap = super::taps::name(&assignment.uid, replica);
            if let Err(err) = super::taps::create(&tap, bridge, &net.mac) {
                return failed(format!("cannot start: cannot make its TAP {tap}: {err}"));
            }
            tracing::info!(vm = %vm, replica, %tap, bridge = %bridge.name, "TAP made");
        }
        let dir = self.vm_dir(vm);
        if let Err(err) = crate::files::private_dir(&dir) {
            return failed(format!(
                "cannot start: cannot create {}: {err}",
                dir.display()
            ));
        }
        if let Some(size) = spec.private_disk_size() {
            // A clone's disk comes from the clone: the image is for the first pair.
            let image = spec
                .disk_image
                .as_deref()
                .filter(|_| assignment.clone_from.is_none());
            if let Err(why) = self.make_private_disk(vm, assignment, size, image) {
                return failed(format!("cannot start: {why}"));
            }
        }
        let log = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join("ftvmm.log"))
        {
            Ok(log) => log,
            Err(err) => return failed(format!("cannot start: cannot open ftvmm.log: {err}")),
        };
        let log_out = match log.try_clone() {
            Ok(log) => log,
            Err(err) => return failed(format!("cannot start: cannot open ftvmm.log: {err}")),
        };
        let mut command = tokio::process::Command::new(&self.config.ftvmm);
        command.args(self.ftvmm_run_args(vm, role, assignment, spec));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log));
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                return failed(format!(
                    "cannot start {}: {err}",
                    self.config.ftvmm.display()
                ))
            }
        };
        let Some(pid) = child.id() else {
            return failed("cannot start: ftvmm ended at once".into());
        };
        let start = start_time(pid).unwrap_or(0);
        let local = Local {
            uid: assignment.uid.clone(),
            role,
            generation: assignment.generation,
            pid,
            start_time: start,
            exit: Arc::default(),
            child: true,
            retire_settled: false,
        };
        // Without these files a restarted ftd could not re-adopt the replica.
        self.record_local(&(vm.clone(), replica), &local);
        let exit = local.exit.clone();
        let wake = self.wake.clone();
        let (vm_name, role_name) = (vm.clone(), role);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => describe(status),
                Err(err) => Ended::unknown(&format!("ended (cannot wait: {err})")),
            };
            tracing::warn!(vm = %vm_name, replica, role = %role_name, pid, "replica ended: {}", how.how);
            *exit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(how);
            wake.notify_one();
        });
        tracing::info!(vm = %vm, replica, %role, pid, "started replica");
        local
    }

    /// Makes the private disk of the replica `assignment` places here, `size` bytes,
    /// empty or a copy of `image`, unless it is there already (ftd stopped between making
    /// it and starting the replica): never replaced, as it may hold what the replica wrote.
    fn make_private_disk(
        &self,
        vm: &VmName,
        assignment: &Assignment,
        size: u64,
        image: Option<&str>,
    ) -> Result<(), String> {
        // The life's id is part of the file name.
        if !ftvm_contract::claims::valid_uid(&assignment.uid) {
            return Err(format!(
                "the VM's life id {:?} cannot name its private disk",
                assignment.uid
            ));
        }
        let path = self.private_disk_path(vm, &assignment.uid, assignment.replica);
        let cannot =
            |err: std::io::Error| format!("cannot make its private disk {}: {err}", path.display());
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == size => return Ok(()),
            Ok(meta) => {
                let what = if meta.is_file() {
                    "a file"
                } else {
                    "not a file"
                };
                let found = format!("{what} of {} bytes", meta.len());
                return Err(format!(
                    "its private disk {} is there already as {found}, not {size} bytes",
                    path.display()
                ));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(cannot(err)),
        }
        crate::files::private_dir(&self.disks_dir()).map_err(cannot)?;
        match image {
            Some(image) => {
                let real = self
                    .config
                    .paths
                    .check("disk", image, self.config.host.as_str())
                    .map_err(|err| format!("its private disk's image: {err}"))?;
                crate::files::create_copy(&path, size, &real).map_err(|err| {
                    format!(
                        "cannot make its private disk {} from {}: {err}",
                        path.display(),
                        real.display()
                    )
                })?;
                tracing::info!(vm = %vm, replica = assignment.replica, path = %path.display(), size, image = %real.display(), "private disk made from its image");
            }
            None => {
                crate::files::create_sparse(&path, size).map_err(cannot)?;
                tracing::info!(vm = %vm, replica = assignment.replica, path = %path.display(), size, "private disk made");
            }
        }
        Ok(())
    }

    /// Where the replica `assignment` places here keeps its console, control socket and
    /// (a VM with private disks) disk.
    fn replica_files(&self, vm: &VmName, assignment: &Assignment, spec: &VmSpec) -> ReplicaFiles {
        ReplicaFiles {
            console: self.console_path(vm),
            control: self.control_path(vm, assignment.replica),
            disk: spec
                .private_disk_size()
                .map(|_| self.private_disk_path(vm, &assignment.uid, assignment.replica)),
        }
    }

    /// The command line of `ftvmm` for the replica of `vm` that `assignment` places here
    /// as `role`: `run` and the flags [`run_args`] builds.
    fn ftvmm_run_args(
        &self,
        vm: &VmName,
        role: Role,
        assignment: &Assignment,
        spec: &VmSpec,
    ) -> Vec<OsString> {
        let mut flags = run_args(
            self.replica_files(vm, assignment, spec),
            &self.config.arbiter,
            vm,
            role,
            assignment,
            spec,
        );
        // A NIC without a TAP name gets the one this ftd makes for the replica.
        if spec.net.as_ref().is_some_and(NetSpec::managed) {
            flags.tap = Some(super::taps::name(&assignment.uid, assignment.replica));
        }
        // The sandbox is this host's choice, not the VM's.
        flags.run_as = self.config.replica_user.clone();
        flags.seccomp = self.config.replica_seccomp;
        flags.tls_dir = self.config.replica_tls_dir.clone();
        flags.insecure = flags.tls_dir.is_none();
        flags.etcd_tls_dir = self.config.replica_etcd.tls_dir.clone();
        flags.etcd_user = self.config.replica_etcd.user.clone();
        flags.etcd_password_file = self.config.replica_etcd.password_file.clone();
        let mut args: Vec<OsString> = vec!["run".into()];
        args.extend(flags.to_args());
        args
    }
}

/// Where a replica's console, control socket and own disk go.
#[derive(Debug, Clone)]
pub struct ReplicaFiles {
    /// `--console`.
    pub console: PathBuf,
    /// `--control`.
    pub control: PathBuf,
    /// `--disk` of a VM with private disks: this replica's own (`None` otherwise).
    pub disk: Option<PathBuf>,
}

/// The flags of `ftvmm run` (the contract's [`RunArgs`]) for the replica of `vm` that
/// `assignment` places as `role`: the VM's spec, its console, control socket and (private
/// disks: `files.disk`, which must then be given) own disk, and for
/// half of a pair the pair's flags with the go-live arbiter `arbiter` (the module doc
/// lists them; docs/contract.md defines them).
pub fn run_args(
    files: ReplicaFiles,
    arbiter: &str,
    vm: &VmName,
    role: Role,
    assignment: &Assignment,
    spec: &VmSpec,
) -> RunArgs {
    let mut flags = RunArgs::for_image(&spec.image);
    flags.mem = spec.mem_bytes;
    flags.console = files.console.display().to_string();
    flags.control = Some(files.control);
    flags.cmdline = spec.cmdline.clone();
    match spec.private_disk_size() {
        Some(_) => {
            flags.disk = files.disk;
            flags.disk_private = true;
        }
        None => flags.disk = spec.disk.clone().map(PathBuf::from),
    }
    if let Some(net) = &spec.net {
        flags.tap = Some(net.tap.clone());
        flags.mac = Some(net.mac.clone());
        flags.ip = net.ip.clone();
    }
    // A pair: the primary listens for its backup's log channel, the backup connects to it
    // (or clones the running primary); both claim generation N of this VM at the arbiter
    // when they lose the other. A backup gets the same --tap as its primary: ftvmm opens
    // it at start and sends on it only once live.
    let pair_role = match role {
        Role::Primary => PairRole::Primary,
        Role::Backup => PairRole::Backup,
    };
    match (role, &assignment.log_address, &assignment.clone_from) {
        (Role::Primary, Some(address), _) => flags.log_listen = Some(address.clone()),
        (Role::Backup, Some(address), _) => flags.log_connect = Some(address.clone()),
        (Role::Backup, None, Some(address)) => flags.clone_from = Some(address.clone()),
        (Role::Primary, None, _) | (Role::Backup, None, None) => {}
    }
    let in_pair =
        flags.log_listen.is_some() || flags.log_connect.is_some() || flags.clone_from.is_some();
    if in_pair {
        flags.role = Some(pair_role);
    }
    if in_pair || assignment.clone_listen.is_some() {
        flags.vm = Some(vm.as_str().to_owned());
        // The life of the VM: a VM deleted and created again under its name claims
        // afresh, and its replicas never take another life's stream.
        flags.vm_uid =
            ftvm_contract::claims::valid_uid(&assignment.uid).then(|| assignment.uid.clone());
        flags.generation = assignment.generation;
        flags.arbiter = Some(arbiter.to_owned());
    }
    // Any replica may have to serve a clone later (a primary that lost its backup, a
    // backup that went live); ftvmm listens from the start.
    flags.clone_listen = assignment.clone_listen.clone();
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HostName;
    use crate::store::memory::MemStore;
    use crate::supervisor::testing::{names, Bench};
    use crate::supervisor::SupervisorConfig;
    use tokio::sync::{watch, Notify};

    #[test]
    fn exit_statuses_are_described_as_code_or_signal() {
        use std::os::unix::process::ExitStatusExt;
        let exited = describe(std::process::ExitStatus::from_raw(3 << 8));
        assert_eq!(
            (exited.how.as_str(), exited.code),
            ("exit status 3", Some(3))
        );
        let killed = describe(std::process::ExitStatus::from_raw(9));
        assert_eq!((killed.how.as_str(), killed.code), ("signal 9", None));
    }

    fn supervisor() -> Supervisor {
        let (_, lease) = watch::channel(0);
        Supervisor::new(
            SupervisorConfig {
                host: HostName::new("a").expect("valid host name"),
                state_dir: "/var/lib/ftd".into(),
                ftvmm: "/usr/bin/ftvmm".into(),
                arbiter: "etcd://10.0.0.1:2379".into(),
                cluster_id_file: None,
                replica_user: Some("ftvm".into()),
                replica_seccomp: ftvm_contract::flags::SeccompMode::Enforce,
                replica_tls_dir: Some("/etc/ftd/tls".into()),
                replica_etcd: Default::default(),
                bridge: None,
                paths: crate::paths::PathPolicy {
                    image_dirs: vec!["/srv".into()],
                    disk_dirs: vec!["/srv".into()],
                },
            },
            Arc::new(MemStore::new()),
            lease,
            Arc::new(Notify::new()),
        )
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: VmName::new("web1").expect("valid name"),
            image: "/img/kv.elf".into(),
            image_sha256: None,
            mem_bytes: 64 << 20,
            cmdline: "quiet".into(),
            disk: None,
            disk_mode: crate::model::DiskMode::Shared,
            disk_size_bytes: None,
            disk_image: None,
            net: None,
            hosts: Vec::new(),
            uid: "u1".into(),
            created_unix_ms: 0,
        }
    }

    /// The flags of a replica, secured as the supervisor does.
    fn flags(role: Role, assignment: &Assignment) -> RunArgs {
        let vm = VmName::new("web1").expect("valid name");
        let mut flags = run_args(
            ReplicaFiles {
                console: supervisor().console_path(&vm),
                control: supervisor().control_path(&vm, assignment.replica),
                disk: None,
            },
            "etcd://10.0.0.1:2379",
            &vm,
            role,
            assignment,
            &spec(),
        );
        flags.tls_dir = Some("/etc/ftd/tls".into());
        flags
    }

    #[test]
    fn the_halves_of_a_new_pair_listen_and_connect_on_the_log_address() {
        let primary = Assignment {
            host: HostName::new("a").expect("valid host name"),
            generation: 1,
            uid: "u1".into(),
            replica: 1,
            log_address: Some("10.0.0.11:7800".into()),
            clone_listen: Some("10.0.0.11:7801".into()),
            clone_from: None,
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        let mut want = RunArgs::for_image("/img/kv.elf");
        want.mem = 64 << 20;
        want.console = "/var/lib/ftd/web1/console.log".into();
        want.control = Some("/var/lib/ftd/web1/replica-1.sock".into());
        want.cmdline = "quiet".into();
        want.vm = Some("web1".into());
        want.vm_uid = Some("u1".into());
        want.generation = 1;
        want.arbiter = Some("etcd://10.0.0.1:2379".into());
        want.role = Some(PairRole::Primary);
        want.log_listen = Some("10.0.0.11:7800".into());
        want.clone_listen = Some("10.0.0.11:7801".into());
        want.tls_dir = Some("/etc/ftd/tls".into());
        assert_eq!(flags(Role::Primary, &primary), want);
        assert_eq!(want.check(), Ok(()));
        let backup = Assignment {
            replica: 2,
            clone_listen: None,
            ..primary
        };
        want.control = Some("/var/lib/ftd/web1/replica-2.sock".into());
        want.role = Some(PairRole::Backup);
        want.log_listen = None;
        want.log_connect = Some("10.0.0.11:7800".into());
        want.clone_listen = None;
        assert_eq!(flags(Role::Backup, &backup), want);
        assert_eq!(want.check(), Ok(()));
    }

    #[test]
    fn every_replica_gets_this_hosts_sandbox() {
        let assignment = Assignment {
            host: HostName::new("a").expect("valid host name"),
            generation: 1,
            uid: "u1".into(),
            replica: 1,
            log_address: Some("10.0.0.11:7800".into()),
            clone_listen: None,
            clone_from: None,
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        let vm = VmName::new("web1").expect("valid name");
        let args = supervisor().ftvmm_run_args(&vm, Role::Primary, &assignment, &spec());
        let flags = RunArgs::parse_args(&args[1..]).expect("ftvmm's flags");
        assert_eq!(flags.run_as.as_deref(), Some("ftvm"));
        assert_eq!(flags.seccomp, ftvm_contract::flags::SeccompMode::Enforce);
        assert_eq!(flags.tls_dir.as_deref(), Some("/etc/ftd/tls".as_ref()));
        assert!(!flags.insecure);
    }

    #[test]
    fn a_clone_connects_to_its_source_and_a_lone_replica_gets_no_pair_flags() {
        let clone = Assignment {
            host: HostName::new("b").expect("valid host name"),
            generation: 2,
            uid: "u1".into(),
            replica: 3,
            log_address: None,
            clone_listen: Some("10.0.0.12:7800".into()),
            clone_from: Some("10.0.0.11:7801".into()),
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        let cloned = flags(Role::Backup, &clone);
        assert_eq!(cloned.role, Some(PairRole::Backup));
        assert_eq!(cloned.clone_from.as_deref(), Some("10.0.0.11:7801"));
        assert_eq!(cloned.clone_listen.as_deref(), Some("10.0.0.12:7800"));
        assert_eq!(cloned.generation, 2);
        assert_eq!(cloned.check(), Ok(()));
        let alone = Assignment {
            clone_listen: None,
            clone_from: None,
            ..clone
        };
        let alone = flags(Role::Primary, &alone);
        assert_eq!(alone.check(), Ok(()));
        assert_eq!(
            (alone.role, alone.vm, alone.arbiter, alone.clone_listen),
            (None, None, None, None)
        );
    }

    #[test]
    fn a_replica_of_a_vm_with_private_disks_gets_its_own_disk_file() {
        let vm = VmName::new("web1").expect("valid name");
        let private = VmSpec {
            disk_mode: crate::model::DiskMode::Private,
            disk_size_bytes: Some(64 << 20),
            disk_image: None,
            ..spec()
        };
        let clone = Assignment {
            host: HostName::new("b").expect("valid host name"),
            generation: 2,
            uid: "u1".into(),
            replica: 3,
            log_address: None,
            clone_listen: Some("10.0.0.12:7800".into()),
            clone_from: Some("10.0.0.11:7801".into()),
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        let args = supervisor().ftvmm_run_args(&vm, Role::Backup, &clone, &private);
        let flags = RunArgs::parse_args(&args[1..]).expect("ftvmm's flags");
        assert_eq!(
            flags.disk.as_deref(),
            Some("/var/lib/ftd/disks/web1-u1-r3.img".as_ref())
        );
        assert!(flags.disk_private);
        assert_eq!(flags.check(), Ok(()));
        let words: Vec<String> = args
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        assert!(
            words
                .windows(2)
                .any(|pair| pair == ["--disk", "/var/lib/ftd/disks/web1-u1-r3.img"])
                && words.iter().any(|word| word == "--disk-private"),
            "{words:?}"
        );
        // Each replica its own file: the other half of the pair, another life.
        let supervisor = supervisor();
        assert_ne!(
            supervisor.private_disk_path(&vm, "u1", 3),
            supervisor.private_disk_path(&vm, "u1", 4)
        );
        assert_ne!(
            supervisor.private_disk_path(&vm, "u1", 3),
            supervisor.private_disk_path(&vm, "u2", 3)
        );
        // A shared disk is the spec's, without --disk-private.
        let shared = VmSpec {
            disk: Some("/srv/web1.img".into()),
            ..spec()
        };
        let args = supervisor.ftvmm_run_args(&vm, Role::Backup, &clone, &shared);
        let flags = RunArgs::parse_args(&args[1..]).expect("ftvmm's flags");
        assert_eq!(flags.disk.as_deref(), Some("/srv/web1.img".as_ref()));
        assert!(!flags.disk_private);
    }

    #[tokio::test]
    async fn a_private_disk_is_made_sparse_at_its_size_before_the_replica_starts() {
        use std::os::unix::fs::MetadataExt;
        let bench = Bench::new("ftd-private-disk");
        bench.assign_private("u1", 1, 64 << 20).await;
        let supervisor = bench.supervisor();
        supervisor.join_cluster().await.expect("join");
        assert_eq!(supervisor.sync().await.expect("sync").started, 1);
        let disk = bench.state_dir().join("disks/web1-u1-r1.img");
        let meta = std::fs::metadata(&disk).expect("the disk is made");
        assert_eq!(meta.len(), 64 << 20);
        // No data: at most a block of metadata (st_blocks counts 512-byte units).
        assert!(meta.blocks() * 512 <= 4096, "{} blocks", meta.blocks());
        assert_eq!(
            meta.mode() & 0o777,
            0o600,
            "ftd's, as its other replica files"
        );
        let pid = supervisor
            .running_pid(&bench.vm, Role::Primary)
            .await
            .expect("the replica runs");
        assert!(names(pid, &disk), "--disk names it");
        assert!(
            super::super::cmdline_has(pid, "--disk-private"),
            "and says it is private"
        );
        // A disk there already is the replica's (ftd stopped before it started it): kept.
        let written = bench.state_dir().join("disks/web1-u1-r2.img");
        std::fs::write(&written, vec![7u8; 64 << 20]).expect("write");
        let assignment = Assignment {
            host: HostName::new("a").expect("valid host name"),
            generation: 1,
            uid: "u1".into(),
            replica: 2,
            log_address: None,
            clone_listen: None,
            clone_from: None,
            retiring: false,
            handing_over: false,
            next_backup_host: None,
        };
        supervisor
            .make_private_disk(&bench.vm, &assignment, 64 << 20, None)
            .expect("kept");
        assert_eq!(std::fs::read(&written).expect("read")[..4], [7u8; 4]);
        // One of another size is not the replica's disk: not started on it.
        let refused = supervisor.make_private_disk(&bench.vm, &assignment, 128 << 20, None);
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("is there already")),
            "{refused:?}"
        );
        // A life id that cannot be part of a file name.
        let odd = Assignment {
            uid: "../u1".into(),
            ..assignment.clone()
        };
        assert!(supervisor
            .make_private_disk(&bench.vm, &odd, 64 << 20, None)
            .is_err());

        // A disk that starts from an image: a copy of it, at the disk's size.
        let image = bench.dir.join("base.img");
        std::fs::write(&image, b"records of the kv log").expect("image");
        let seeded = Assignment {
            replica: 3,
            ..assignment.clone()
        };
        supervisor
            .make_private_disk(&bench.vm, &seeded, 64 << 20, image.to_str())
            .expect("made from the image");
        let disk = std::fs::read(bench.state_dir().join("disks/web1-u1-r3.img")).expect("read");
        assert_eq!(disk.len(), 64 << 20);
        assert_eq!(&disk[..21], b"records of the kv log");
        // An image outside the host's disk directories is not read.
        let outside = Assignment {
            replica: 4,
            ..assignment
        };
        let refused =
            supervisor.make_private_disk(&bench.vm, &outside, 64 << 20, Some("/etc/hostname"));
        assert!(
            refused
                .as_ref()
                .is_err_and(|why| why.contains("its private disk's image")),
            "{refused:?}"
        );
        assert!(!bench.state_dir().join("disks/web1-u1-r4.img").exists());
    }
}
