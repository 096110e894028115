//! The domain API of the control plane, independent of the transport: what `ftctl`'s
//! commands do. The gRPC layer converts requests into calls here and results back.
//!
//! Calls that change desired state must run on the leader ([`ClusterError::NotLeader`]
//! otherwise; the transport forwards them). Reads run anywhere.

use crate::config::Config;
use crate::events::{EventLog, EventWatch};
use crate::keys;
use crate::model::{
    now_unix_ms, Assignment, Event, HostName, HostRecord, LeaderRecord, ModelError, ProcessState,
    Protection, Role, VmName, VmRequest, VmSpec, VmStatus,
};
use crate::paths::{PathError, PathPolicy};
use crate::records::{decode, encode, load_drained, load_hosts, load_vms, VmRecord};
use crate::replica_control::LiveStats;
use crate::store::{Election, Fence, Fenced, Store, StoreError, Write};
use crate::supervisor::{Supervisor, SupervisorError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;

/// A control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request is invalid.
    #[error(transparent)]
    Invalid(#[from] ModelError),
    /// No such VM.
    #[error("vm {0} not found")]
    NotFound(VmName),
    /// The VM exists already.
    #[error("vm {0} already exists")]
    AlreadyExists(VmName),
    /// A host named in the request has no live ftd.
    #[error("host {0} is not registered (its ftd is down, or the name is unknown)")]
    HostDown(HostName),
    /// No host at all.
    #[error("no live host to run the VM")]
    NoLiveHost,
    /// An image or disk is missing or not allowed ([`PathPolicy`]).
    #[error(transparent)]
    Path(#[from] PathError),
    /// Another VM uses the disk.
    #[error("the disk {disk} is in use by vm {vm} (two VMs never share a disk)")]
    DiskInUse {
        /// As the request named it.
        disk: String,
        /// The VM that has it.
        vm: VmName,
    },
    /// Another VM has the NIC's MAC or IP address.
    #[error("the {what} {value} is in use by vm {vm} (two VMs never share one)")]
    NetInUse {
        /// "MAC" or "IP address".
        what: &'static str,
        /// The address.
        value: String,
        /// The VM that has it.
        vm: VmName,
    },
    /// The NIC needs a TAP made by ftd and a named host has no bridge for it.
    #[error("host {0} makes no TAPs (no bridge in its ftd config): name a tap= in --net, or set bridge on that host")]
    NoBridge(HostName),
    /// The NIC needs a TAP made by ftd and no live host has a bridge for it.
    #[error("the NIC {0} names no TAP and no live host makes one (no bridge in any ftd config): name a tap= in --net, or set bridge")]
    NoBridgeAnywhere(String),
    /// An uploaded image cannot be stored or found.
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    /// This ftd is not the leader.
    #[error("this ftd is not the leader")]
    NotLeader,
    /// No leader is elected.
    #[error("no leader is elected yet")]
    NoLeader,
    /// The VM has no running primary.
    #[error("vm {0} has no running primary")]
    NoPrimary(VmName),
    /// The host asked for cannot take the replica.
    #[error("{0}")]
    BadTarget(String),
    /// A switchover of the VM was asked for already and is not over.
    #[error("a switchover of vm {0} is under way")]
    SwitchoverUnderWay(VmName),
    /// A drill or switchover of a VM that is not protected would take it down.
    #[error("vm {vm} is not protected ({reason}): {what}")]
    NotProtected {
        /// The VM.
        vm: VmName,
        /// Why it is not protected.
        reason: String,
        /// What was refused, and why.
        what: &'static str,
    },
    /// The VMM lacks a feature the call needs.
    #[error("{0}")]
    Unsupported(String),
    /// The store failed.
    #[error("etcd unavailable")]
    Store(#[from] StoreError),
    /// Asking another host's ftd failed.
    #[error("cannot reach the ftd of host {host}")]
    Agent {
        /// The host.
        host: HostName,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// A registered ftd address is not usable.
    #[error("invalid ftd address {0}")]
    BadAddress(String),
    /// The event watch ended (etcd connection lost).
    #[error("the event watch ended; reconnect")]
    WatchEnded,
    /// The local supervisor failed.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// A call to another host's ftd failed (the transport puts its error here as text).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// What went wrong.
    pub message: String,
    /// Whether the remote said the replica does not run (rather than being unreachable).
    pub not_running: bool,
}

/// A leader's write refused because it no longer leads is [`ClusterError::NotLeader`]
/// (the client retries with the new leader); any other store failure stays one.
fn deposed(err: StoreError) -> ClusterError {
    match err {
        StoreError::Fenced { .. } => ClusterError::NotLeader,
        err => ClusterError::Store(err),
    }
}

/// Host-local operations on other hosts' ftds (implemented by the transport).
#[async_trait]
pub trait Agents: Send + Sync {
    /// Kills the replica `role` of `vm` supervised by the ftd at `address`; its pid.
    async fn stop_replica(&self, address: &str, vm: &VmName, role: Role)
        -> Result<u32, AgentError>;
    /// What the replica `role` of `vm` supervised by the ftd at `address` says on its
    /// control socket (`None`: it does not answer).
    async fn replica_stats(
        &self,
        address: &str,
        vm: &VmName,
        role: Role,
    ) -> Result<Option<LiveStats>, AgentError>;
}

/// How long a status read waits for another host's ftd to say how its replica does.
const LIVE_STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a replica is and what state it is in, as shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    /// Role.
    pub role: Role,
    /// The replica's number within the VM ([`crate::model::Assignment::replica`]).
    pub id: u64,
    /// Whether it was made by cloning the running primary.
    pub cloned: bool,
    /// Host.
    pub host: HostName,
    /// Generation.
    pub generation: u64,
    /// `pending`, `running`, `exited`, `lost`.
    pub state: &'static str,
    /// ftvmm pid on the host (0 if none).
    pub pid: u32,
    /// How it ended.
    pub exit: Option<String>,
}

/// A VM as shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    /// Desired state.
    pub spec: VmSpec,
    /// Recorded status (`None` until the leader's first pass over it).
    pub status: Option<VmStatus>,
    /// Its replicas.
    pub replicas: Vec<ReplicaView>,
    /// What the running primary says on its control socket (lag, log traffic), if it
    /// answered.
    pub live: Option<LiveStats>,
}

impl VmView {
    /// `Ok` if the VM is Protected; else why not, and `what` that refuses.
    fn require_protected(&self, what: &'static str) -> Result<(), ClusterError> {
        match &self.status {
            Some(status) if status.protection == Protection::Protected => Ok(()),
            status => Err(ClusterError::NotProtected {
                vm: self.spec.name.clone(),
                reason: status.as_ref().map_or_else(
                    || "the leader has not looked at it yet".to_owned(),
                    |status| status.reason.clone(),
                ),
                what,
            }),
        }
    }
}

/// A host as shown to users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// Its registration.
    pub record: HostRecord,
    /// Whether it leads.
    pub leader: bool,
    /// Replicas it runs.
    pub replicas: u32,
    /// Drained: no new replica is placed there.
    pub drained: bool,
    /// What looks wrong with its registration (e.g. a loopback address other hosts
    /// cannot reach).
    pub warnings: Vec<String>,
}

/// Whether `address` (`host:port` or an IP) is a loopback address.
fn is_loopback(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_matches(['[', ']']);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn grpc_address(record: &HostRecord) -> Option<&str> {
    Some(record.grpc_address.as_str())
}

fn log_ip(record: &HostRecord) -> Option<&str> {
    record.log_listen_ip.as_deref()
}

/// Warnings about `host` among `hosts`: a loopback gRPC or log address while some other
/// host has a real one (a multi-host cluster whose ftds run with the defaults).
pub fn host_warnings(host: &HostRecord, hosts: &BTreeMap<HostName, HostRecord>) -> Vec<String> {
    let others_real = |address: fn(&HostRecord) -> Option<&str>| {
        hosts
            .values()
            .filter(|other| other.name != host.name)
            .filter_map(address)
            .any(|other| !is_loopback(other))
    };
    let mut warnings = Vec::new();
    if is_loopback(&host.grpc_address) && others_real(grpc_address) {
        warnings.push(format!(
            "advertises {} (loopback) while other hosts do not: they cannot reach its ftd (set advertise)",
            host.grpc_address
        ));
    }
    if let Some(ip) = log_ip(host).filter(|ip| is_loopback(ip)) {
        if others_real(log_ip) {
            warnings.push(format!(
                "its primaries listen for backups on {ip} (loopback) while other hosts do not: backups elsewhere cannot connect (set log_listen_ip)"
            ));
        }
    }
    warnings
}

/// Whether this ftd leads (and the [`Fence`] its writes as the leader carry), and a way
/// to find the leader.
pub struct Leadership {
    fence: std::sync::Mutex<Option<Fence>>,
    election: Arc<dyn Election>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("fence", &self.fence())
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// Not leading yet; `election` finds the current leader.
    pub fn new(election: Arc<dyn Election>) -> Self {
        Self {
            fence: std::sync::Mutex::new(None),
            election,
        }
    }

    /// Whether this ftd leads.
    pub fn is_leader(&self) -> bool {
        self.fence().is_some()
    }

    /// What this ftd's writes as the leader are fenced by, while it leads.
    pub fn fence(&self) -> Option<Fence> {
        self.fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records that this ftd leads under `fence`.
    pub fn lead(&self, fence: Fence) {
        self.set(Some(fence));
    }

    /// Records that this ftd does not lead (any more).
    pub fn step_down(&self) {
        self.set(None);
    }

    fn set(&self, fence: Option<Fence>) {
        let leader = fence.is_some();
        *self
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fence;
        crate::metrics::set_leader(leader);
        if !leader {
            // Only the leader's VM counts are meaningful; a follower exports zeros and
            // no per-VM series.
            crate::metrics::clear_vm_view();
            crate::metrics::set_vms(
                &crate::model::Protection::ALL
                    .iter()
                    .map(|protection| (*protection, 0))
                    .collect::<Vec<_>>(),
            );
        }
    }

    /// The current leader's record, if one is elected.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>, StoreError> {
        Ok(self
            .election
            .leader()
            .await?
            .and_then(|info| decode(&info.key, &info.value)))
    }
}

/// The control plane as seen from one ftd.
pub struct Cluster {
    store: Arc<dyn Store>,
    /// Where images and disks may come from.
    paths: PathPolicy,
    events: Arc<EventLog>,
    me: HostName,
    leadership: Arc<Leadership>,
    supervisor: Arc<Supervisor>,
    agents: Arc<dyn Agents>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn unique_id(host: &HostName) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}-{host}-{:x}", std::process::id())
}

impl Cluster {
    /// The control plane of the host `config` describes. `wake` is notified when desired
    /// state changes.
    pub fn new(
        store: Arc<dyn Store>,
        events: Arc<EventLog>,
        config: &Config,
        leadership: Arc<Leadership>,
        supervisor: Arc<Supervisor>,
        agents: Arc<dyn Agents>,
        wake: Arc<Notify>,
    ) -> Self {
        Self {
            store,
            paths: config.paths.clone(),
            events,
            me: config.host_name.clone(),
            leadership,
            supervisor,
            agents,
            wake,
        }
    }

    /// Whether this ftd leads.
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<LeaderRecord>, ClusterError> {
        Ok(self.leadership.leader().await?)
    }

    /// The fence of this ftd's leadership; [`ClusterError::NotLeader`] when it does not
    /// lead.
    fn require_leader(&self) -> Result<Fence, ClusterError> {
        self.leadership.fence().ok_or(ClusterError::NotLeader)
    }

    async fn event(
        &self,
        fence: &Fence,
        vm: Option<&VmName>,
        kind: &str,
        message: String,
    ) -> Result<(), ClusterError> {
        self.events
            .append(fence, vm, kind, message)
            .await
            .map_err(deposed)?;
        crate::metrics::event(kind);
        Ok(())
    }

    /// Keeps an uploaded guest image in the store ([`crate::images`]); its SHA-256.
    pub async fn upload_image(&self, bytes: &[u8]) -> Result<String, ClusterError> {
        let sha256 = crate::images::upload(&*self.store, bytes).await?;
        tracing::info!(%sha256, bytes = bytes.len(), "image uploaded");
        Ok(sha256)
    }

    /// Records a new VM (leader only). Its replicas are placed by the next reconcile pass.
    pub async fn create_vm(&self, request: &VmRequest) -> Result<VmView, ClusterError> {
        let fence = self.require_leader()?;
        let mut spec = VmSpec::validate(request)?;
        let hosts = load_hosts(&*self.store).await?;
        if hosts.is_empty() {
            return Err(ClusterError::NoLiveHost);
        }
        if let Some(down) = spec.hosts.iter().find(|host| !hosts.contains_key(*host)) {
            return Err(ClusterError::HostDown(down.clone()));
        }
        // Images and disks live at the same path on every host (shared storage); the
        // leader checks its own view so that a typo, or a file outside the allowed
        // directories, fails here rather than on a host.
        match &spec.image_sha256 {
            // Uploaded: it must be whole in the store (each host verifies its copy).
            Some(sha256) => {
                if crate::images::meta(&*self.store, sha256).await?.is_none() {
                    return Err(crate::images::ImageError::Unknown(sha256.clone()).into());
                }
            }
            None => {
                self.paths.check("image", &spec.image, self.me.as_str())?;
            }
        }
        if let Some(net) = spec.net.as_ref().filter(|net| net.managed()) {
            // The hosts the request names must make TAPs; without names, placement
            // keeps to the hosts that do.
            let no_bridge = |host: &&HostName| hosts.get(*host).is_none_or(|h| h.bridge.is_none());
            if let Some(host) = spec.hosts.iter().find(no_bridge) {
                return Err(ClusterError::NoBridge(host.clone()));
            }
            if hosts.values().all(|host| host.bridge.is_none()) {
                return Err(ClusterError::NoBridgeAnywhere(net.mac.clone()));
            }
        }
        let others = if spec.disk.is_some() || spec.net.is_some() {
            load_vms(&*self.store, None).await?
        } else {
            Default::default()
        };
        if let Some(net) = &spec.net {
            for (name, other) in &others {
                let Some(theirs) = other.spec.as_ref().and_then(|spec| spec.net.as_ref()) else {
                    continue;
                };
                let clash = if theirs.mac == net.mac {
                    Some(("MAC", net.mac.clone()))
                } else {
                    net.address()
                        .filter(|address| theirs.address() == Some(*address))
                        .map(|address| ("IP address", address.to_owned()))
                };
                if let Some((what, value)) = clash {
                    return Err(ClusterError::NetInUse {
                        what,
                        value,
                        vm: name.clone(),
                    });
                }
            }
        }
        // A private disk's image is read once by each host of the first pair: it must be
        // a disk file this host may read (another VM may use it too; it is never written).
        if let Some(image) = &spec.disk_image {
            self.paths.check("disk", image, self.me.as_str())?;
        }
        if let Some(disk) = &spec.disk {
            let real = self.paths.check("disk", disk, self.me.as_str())?;
            for (name, other) in others {
                let theirs = other
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.disk.as_deref())
                    .map(std::fs::canonicalize);
                if matches!(theirs, Some(Ok(ref path)) if *path == real) {
                    return Err(ClusterError::DiskInUse {
                        disk: disk.clone(),
                        vm: name,
                    });
                }
            }
        }
        spec.uid = unique_id(&self.me);
        spec.created_unix_ms = now_unix_ms();
        if !Fenced::new(&*self.store, &fence)
            .create(&keys::spec(&spec.name), encode(&spec))
            .await
            .map_err(deposed)?
        {
            return Err(ClusterError::AlreadyExists(spec.name));
        }
        let hosts_text = if spec.hosts.is_empty() {
            "hosts chosen by the leader".to_owned()
        } else {
            format!(
                "hosts {}",
                spec.hosts
                    .iter()
                    .map(HostName::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        self.event(
            &fence,
            Some(&spec.name),
            "vm-created",
            format!(
                "vm {} created ({} MiB{}, {hosts_text})",
                spec.name,
                spec.mem_bytes >> 20,
                spec.private_disk_size()
                    .map(|size| format!(", private disks of {} MiB", size >> 20))
                    .unwrap_or_default()
            ),
        )
        .await?;
        self.wake.notify_one();
        Ok(VmView {
            spec,
            status: None,
            replicas: Vec::new(),
            live: None,
        })
    }

    /// Deletes a VM (leader only): its replicas are stopped by their hosts.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ClusterError> {
        let fence = self.require_leader()?;
        let vm = VmName::new(name)?;
        if !Fenced::new(&*self.store, &fence)
            .delete_existing(&keys::spec(&vm))
            .await
            .map_err(deposed)?
        {
            return Err(ClusterError::NotFound(vm));
        }
        self.event(&fence, Some(&vm), "vm-deleted", format!("vm {vm} deleted"))
            .await?;
        self.wake.notify_one();
        Ok(())
    }

    fn view(spec: &VmSpec, record: &VmRecord, hosts: &BTreeMap<HostName, HostRecord>) -> VmView {
        let mut replicas = Vec::new();
        for role in Role::ALL {
            let Some(assignment) = record.current_assignment(role) else {
                continue;
            };
            let report = record.report_for(assignment);
            let (state, pid, exit) = match report {
                _ if !hosts.contains_key(&assignment.host) => ("lost", 0, None),
                None => ("pending", 0, None),
                Some(report) if report.state == ProcessState::Running => {
                    ("running", report.pid, None)
                }
                Some(report) => ("exited", report.pid, report.exit.clone()),
            };
            replicas.push(ReplicaView {
                role,
                id: assignment.replica,
                cloned: assignment.clone_from.is_some(),
                host: assignment.host.clone(),
                generation: assignment.generation,
                state,
                pid,
                exit,
            });
        }
        VmView {
            spec: spec.clone(),
            status: record
                .status
                .clone()
                .filter(|status| status.uid == spec.uid),
            replicas,
            live: None,
        }
    }

    /// What the running primary of `view` says on its control socket: asked of the local
    /// supervisor or of its host's ftd, within [`LIVE_STATS_TIMEOUT`]; `None` if it does
    /// not answer (the figures are then shown as unknown).
    async fn live_stats(&self, view: &VmView) -> Option<LiveStats> {
        let primary = view
            .replicas
            .iter()
            .find(|replica| replica.role == Role::Primary && replica.state == "running")?;
        let vm = &view.spec.name;
        if primary.host == self.me {
            return self.supervisor.live_stats(vm, Role::Primary);
        }
        let hosts = load_hosts(&*self.store).await.ok()?;
        let address = &hosts.get(&primary.host)?.grpc_address;
        let asked = self.agents.replica_stats(address, vm, Role::Primary);
        match tokio::time::timeout(LIVE_STATS_TIMEOUT, asked).await {
            Ok(Ok(stats)) => stats,
            Ok(Err(err)) => {
                tracing::debug!(vm = %vm, host = %primary.host, error = %err, "no replica stats");
                None
            }
            Err(_) => {
                tracing::debug!(vm = %vm, host = %primary.host, "replica stats timed out");
                None
            }
        }
    }

    /// What a replica this host supervises says on its control socket (the agent side
    /// of [`Cluster::get_vm`]'s live figures).
    pub fn local_replica_stats(
        &self,
        vm: &str,
        role: Role,
    ) -> Result<Option<LiveStats>, ClusterError> {
        let vm = VmName::new(vm)?;
        Ok(self.supervisor.live_stats(&vm, role))
    }

    /// One VM, with the live figures of its primary.
    pub async fn get_vm(&self, name: &str) -> Result<VmView, ClusterError> {
        let mut view = self.load_vm(name).await?;
        view.live = self.live_stats(&view).await;
        Ok(view)
    }

    /// One VM as recorded in the store.
    async fn load_vm(&self, name: &str) -> Result<VmView, ClusterError> {
        let vm = VmName::new(name)?;
        let vms = load_vms(&*self.store, Some(&vm)).await?;
        let hosts = load_hosts(&*self.store).await?;
        let record = vms.get(&vm);
        match record.and_then(|record| Some((record.spec.as_ref()?, record))) {
            Some((spec, record)) => Ok(Self::view(spec, record, &hosts)),
            None => Err(ClusterError::NotFound(vm)),
        }
    }

    /// `vm`'s record as stored (spec, status, assignments, reports).
    async fn load_record(&self, vm: &VmName) -> Result<VmRecord, ClusterError> {
        load_vms(&*self.store, Some(vm))
            .await?
            .remove(vm)
            .ok_or_else(|| ClusterError::NotFound(vm.clone()))
    }

    /// Every VM, by name.
    pub async fn list_vms(&self) -> Result<Vec<VmView>, ClusterError> {
        let vms = load_vms(&*self.store, None).await?;
        let hosts = load_hosts(&*self.store).await?;
        let mut views: Vec<VmView> = vms
            .values()
            .filter_map(|record| Some(Self::view(record.spec.as_ref()?, record, &hosts)))
            .collect();
        for view in &mut views {
            view.live = self.live_stats(view).await;
        }
        Ok(views)
    }

    /// The live hosts, by name.
    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ClusterError> {
        let hosts = load_hosts(&*self.store).await?;
        let vms = load_vms(&*self.store, None).await?;
        let leader = self.leadership.leader().await?.map(|leader| leader.host);
        let drained = load_drained(&*self.store).await?;
        let mut running: BTreeMap<&HostName, u32> = BTreeMap::new();
        for record in vms.values() {
            for report in record.reports.values() {
                if report.state == ProcessState::Running {
                    *running.entry(&report.host).or_default() += 1;
                }
            }
        }
        Ok(hosts
            .values()
            .map(|record| HostView {
                leader: leader.as_ref() == Some(&record.name),
                replicas: running.get(&record.name).copied().unwrap_or(0),
                drained: drained.contains(&record.name),
                warnings: host_warnings(record, &hosts),
                record: record.clone(),
            })
            .collect())
    }

    /// Kills the primary of a VM on purpose (leader only); returns its host and pid.
    pub async fn test_failover(&self, name: &str) -> Result<(HostName, u32), ClusterError> {
        let fence = self.require_leader()?;
        let view = self.load_vm(name).await?;
        let primary = view
            .replicas
            .iter()
            .find(|replica| replica.role == Role::Primary && replica.state == "running")
            .ok_or_else(|| ClusterError::NoPrimary(view.spec.name.clone()))?;
        let vm = &view.spec.name;
        // Only a backup that follows can take over: without one the drill is an outage.
        view.require_protected("a test failover would take it down")?;
        self.event(
            &fence,
            Some(vm),
            "failover-test",
            format!(
                "failover test: killing the primary of {vm} (pid {} on {})",
                primary.pid, primary.host
            ),
        )
        .await?;
        let pid = if primary.host == self.me {
            self.supervisor.stop(vm, Role::Primary).await?
        } else {
            let hosts = load_hosts(&*self.store).await?;
            let record = hosts
                .get(&primary.host)
                .ok_or_else(|| ClusterError::HostDown(primary.host.clone()))?;
            self.agents
                .stop_replica(&record.grpc_address, vm, Role::Primary)
                .await
                .map_err(|source| {
                    if source.not_running {
                        ClusterError::NoPrimary(vm.clone())
                    } else {
                        ClusterError::Agent {
                            host: primary.host.clone(),
                            source,
                        }
                    }
                })?
        };
        self.wake.notify_one();
        Ok((primary.host.clone(), pid))
    }

    /// Replaces the backup of a VM (leader only): the backup's assignment is marked
    /// retiring, so its host stops it (only while it still follows its primary: a backup
    /// that went live meanwhile is the VM and runs on); the primary runs alone once it
    /// notices, and the next reconcile passes clone a new backup from it onto a host that
    /// can take one. Works as well when there is no backup (the clone is then placed as
    /// soon as the primary can serve it). Returns the host whose backup is stopped.
    pub async fn restart_backup(
        &self,
        name: &str,
        to: Option<&str>,
    ) -> Result<Option<HostName>, ClusterError> {
        let fence = self.require_leader()?;
        let view = self.load_vm(name).await?;
        let vm = &view.spec.name;
        view.replicas
            .iter()
            .find(|replica| replica.role == Role::Primary && replica.state == "running")
            .ok_or_else(|| ClusterError::NoPrimary(vm.clone()))?;
        let record = self.load_record(vm).await?;
        let primary = record
            .current_assignment(Role::Primary)
            .ok_or_else(|| ClusterError::NoPrimary(vm.clone()))?;
        if primary.clone_listen.is_none() {
            return Err(ClusterError::Unsupported(format!(
                "the primary of {vm} on {} was started without a clone address (by an older ftd), so no new backup can join it",
                primary.host
            )));
        }
        let target = match to {
            Some(to) => Some(self.backup_target(to, &primary.host).await?),
            None => None,
        };
        let backup = record.current_assignment(Role::Backup);
        // One transaction: the primary says where its next backup goes before the old
        // backup is stopped.
        let mut writes = Vec::new();
        if let Some(target) = &target {
            let primary = Assignment {
                next_backup_host: Some(target.clone()),
                ..primary.clone()
            };
            writes.push(Write::Put {
                key: keys::assignment(vm, Role::Primary),
                value: encode(&primary),
            });
        }
        if let Some(backup) = backup {
            let retiring = Assignment {
                retiring: true,
                ..backup.clone()
            };
            writes.push(Write::Put {
                key: keys::assignment(vm, Role::Backup),
                value: encode(&retiring),
            });
        }
        if !writes.is_empty() {
            Fenced::new(&*self.store, &fence)
                .commit(&writes)
                .await
                .map_err(deposed)?;
        }
        let stopped = backup.map(|backup| backup.host.clone());
        let onto = target
            .as_ref()
            .map(|target| format!(" onto {target}"))
            .unwrap_or_default();
        let message = match &stopped {
            Some(host) => format!(
                "restarting the backup of {vm}: stopping it on {host}, a new one will be cloned{onto} from the primary on {}",
                primary.host
            ),
            None => format!(
                "restarting the backup of {vm}: a new one will be cloned{onto} from the primary on {}",
                primary.host
            ),
        };
        self.event(&fence, Some(vm), "backup-restart", message)
            .await?;
        self.wake.notify_one();
        Ok(stopped)
    }

    /// Drains `host` (no new replica is placed there) or lets it take replicas again
    /// (leader only). The host need not be up.
    pub async fn set_host_drain(&self, host: &str, drained: bool) -> Result<(), ClusterError> {
        let fence = self.require_leader()?;
        let host = HostName::new(host)?;
        let writes = Fenced::new(&*self.store, &fence);
        let key = keys::drained(host.as_str());
        let (kind, message) = if drained {
            writes
                .put(&key, now_unix_ms().to_string().into_bytes())
                .await
                .map_err(deposed)?;
            (
                "host-drained",
                format!("host {host} is drained: no new replica goes there"),
            )
        } else {
            writes.delete(&key).await.map_err(deposed)?;
            (
                "host-undrained",
                format!("host {host} takes replicas again"),
            )
        };
        self.event(&fence, None, kind, message).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Starts a planned role swap of the protected VM `name` (`ftctl switchover`): marks
    /// the primary's assignment `handing_over`, which makes its host stop it gracefully;
    /// its backup replays to the end of the log and goes live through the arbiter; the
    /// next passes promote it and clone a new backup. Returns (from host, to host).
    pub async fn switchover(&self, name: &str) -> Result<(HostName, HostName), ClusterError> {
        let fence = self.require_leader()?;
        let view = self.load_vm(name).await?;
        let vm = &view.spec.name;
        view.require_protected("a switchover needs a backup that follows")?;
        let record = self.load_record(vm).await?;
        let primary = record
            .current_assignment(Role::Primary)
            .ok_or_else(|| ClusterError::NoPrimary(vm.clone()))?;
        let backup = record
            .current_assignment(Role::Backup)
            .filter(|backup| !backup.retiring)
            .ok_or_else(|| ClusterError::NotProtected {
                vm: vm.clone(),
                reason: "no backup assigned".into(),
                what: "a switchover needs a backup that follows",
            })?;
        if backup.clone_listen.is_none() {
            return Err(ClusterError::Unsupported(format!(
                "the backup of {vm} on {} was started without a clone address (by an older ftd): once primary, no new backup could join it",
                backup.host
            )));
        }
        if primary.handing_over {
            return Err(ClusterError::SwitchoverUnderWay(vm.clone()));
        }
        let handing_over = Assignment {
            handing_over: true,
            ..primary.clone()
        };
        Fenced::new(&*self.store, &fence)
            .put(&keys::assignment(vm, Role::Primary), encode(&handing_over))
            .await
            .map_err(deposed)?;
        let (from, to) = (primary.host.clone(), backup.host.clone());
        self.event(
            &fence,
            Some(vm),
            "switchover-requested",
            format!("switchover of {vm}: the primary on {from} hands over to the backup on {to}"),
        )
        .await?;
        self.wake.notify_one();
        Ok((from, to))
    }

    /// `to` as the host of a new backup of a primary on `primary_host`: live, able to run
    /// backups, not drained, not the primary's.
    async fn backup_target(
        &self,
        to: &str,
        primary_host: &HostName,
    ) -> Result<HostName, ClusterError> {
        let to = HostName::new(to)?;
        let refuse = |why: &str| Err(ClusterError::BadTarget(format!("host {to} {why}")));
        let hosts = load_hosts(&*self.store).await?;
        match hosts.get(&to) {
            None => return Err(ClusterError::HostDown(to)),
            Some(record) if !record.backup_capable => return refuse("cannot run backups"),
            Some(_) => {}
        }
        if &to == primary_host {
            return refuse("runs the primary");
        }
        if load_drained(&*self.store).await?.contains(&to) {
            return refuse("is drained");
        }
        Ok(to)
    }

    /// Kills a replica this host supervises (the agent side of [`Cluster::test_failover`]).
    pub async fn stop_local_replica(&self, vm: &str, role: Role) -> Result<u32, ClusterError> {
        let vm = VmName::new(vm)?;
        Ok(self.supervisor.stop(&vm, role).await?)
    }

    /// The last `count` events, oldest first.
    pub async fn recent_events(&self, count: usize) -> Result<Vec<Event>, ClusterError> {
        Ok(self.events.recent(count).await?)
    }

    /// New events from now on.
    pub async fn watch_events(&self) -> Result<EventWatch, ClusterError> {
        Ok(self.events.watch().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, grpc: &str, log_ip: &str) -> HostRecord {
        HostRecord {
            name: HostName::new(name).expect("valid"),
            grpc_address: grpc.into(),
            metrics_address: String::new(),
            version: String::new(),
            backup_capable: true,
            log_listen_ip: Some(log_ip.into()),
            log_port_base: Some(7800),
            started_unix_ms: 0,
            cpu: None,
            bridge: None,
        }
    }

    #[test]
    fn a_loopback_host_among_real_ones_is_warned_about() {
        let a = host("a", "127.0.0.1:7700", "127.0.0.1");
        let b = host("b", "10.0.0.2:7700", "10.0.0.2");
        let hosts: BTreeMap<HostName, HostRecord> = [a.clone(), b.clone()]
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        let warnings = host_warnings(&a, &hosts);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("127.0.0.1:7700 (loopback)"),
            "{warnings:?}"
        );
        assert!(host_warnings(&b, &hosts).is_empty());
        // All on one machine (the tests, a laptop): nothing to say.
        let c = host("c", "[::1]:7700", "127.0.0.1");
        let local: BTreeMap<HostName, HostRecord> = [a.clone(), c]
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        assert!(host_warnings(&a, &local).is_empty());
        assert!(is_loopback("localhost:7700") && !is_loopback("10.1.2.3"));
    }
}
