//! The domain types of the control plane and their validation. Everything that arrives
//! over gRPC is untrusted: it becomes one of these types only through the checks here.
//!
//! These types are stored in etcd as JSON (see [`crate::keys`] for where).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest guest command line.
pub const CMDLINE_MAX: usize = 1024;
/// Longest file path (image, disk).
pub const PATH_MAX: usize = 4096;
/// Most hosts a spec may name (primary, backup).
pub const HOSTS_MAX: usize = 2;
/// A private disk's sizes are whole sectors of this many bytes (virtio-blk's).
pub const DISK_SECTOR: u64 = 512;
/// The largest private disk: 16 TiB, the largest file ext4 keeps with 4 KiB blocks.
pub const DISK_SIZE_MAX: u64 = 16 << 40;

/// A value failed validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// A VM name outside `[a-z0-9][a-z0-9-]{0,62}`.
    #[error(
        "invalid VM name '{0}': use 1-63 of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    VmName(String),
    /// A host name outside `[a-z0-9][a-z0-9.-]{0,62}`.
    #[error("invalid host name '{0}': use 1-63 of a-z, 0-9, '.' and '-', starting with a letter or digit")]
    HostName(String),
    /// Guest RAM outside 2M..3G or not a multiple of 4 KiB.
    #[error("guest memory {0} bytes must be a multiple of 4 KiB within 2M..3G")]
    Mem(u64),
    /// A memory size that does not parse.
    #[error("'{0}' is not a size (examples: 64M, 1G, 131072K)")]
    Size(String),
    /// The guest command line is too long or has control characters.
    #[error("the guest command line must be at most {CMDLINE_MAX} printable bytes")]
    Cmdline,
    /// A path that is empty, relative, too long or has control characters.
    #[error("{what} path '{path}' must be absolute, printable and at most {PATH_MAX} bytes")]
    Path {
        /// Which path (image, disk).
        what: &'static str,
        /// The offending path (truncated).
        path: String,
    },
    /// Too many hosts, or the same host twice.
    #[error("--hosts takes at most {HOSTS_MAX} distinct hosts (primary, backup), got {0:?}")]
    Hosts(Vec<String>),
    /// A TAP name that Linux would refuse.
    #[error("invalid TAP name '{0}': 1-15 of A-Z, a-z, 0-9, '-', '_', '.'")]
    Tap(String),
    /// A MAC address that does not parse.
    #[error("invalid MAC address '{0}': expected six hex bytes like 52:54:00:12:34:56")]
    Mac(String),
    /// An IPv4 address with prefix that does not parse.
    #[error("invalid guest address '{0}': expected IPv4 with prefix like 10.77.0.2/24")]
    Ip(String),
    /// A required field is absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A role name that is neither primary nor backup.
    #[error("invalid role '{0}': primary or backup")]
    Role(String),
    /// An image hash that is not a SHA-256, or given with an image path too.
    #[error("invalid image: {0}")]
    Image(String),
    /// A disk mode this version does not know.
    #[error("invalid disk mode {0}: shared or private")]
    DiskMode(String),
    /// A private disk size of no sector, not whole sectors, or too large.
    #[error("disk size {0} bytes must be a multiple of {DISK_SECTOR} within 512..16T")]
    DiskSize(u64),
    /// A disk path, size and mode that do not go together.
    #[error("{0}")]
    DiskCombination(&'static str),
}

/// Whether `text` is a SHA-256 in lowercase hex (an uploaded image's name).
pub fn valid_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn shorten(text: &str) -> String {
    text.chars().take(80).collect()
}

fn valid_label(text: &str, extra: &[u8]) -> bool {
    let bytes = text.as_bytes();
    (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || extra.contains(b)
        })
}

/// A validated VM name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Validates `text` as a VM name.
    pub fn new(text: &str) -> Result<Self, ModelError> {
        if valid_label(text, b"") {
            Ok(Self(text.to_owned()))
        } else {
            Err(ModelError::VmName(shorten(text)))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = ModelError;
    fn try_from(text: String) -> Result<Self, ModelError> {
        Self::new(&text)
    }
}

impl From<VmName> for String {
    fn from(name: VmName) -> String {
        name.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated host name: `[a-z0-9][a-z0-9.-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    /// Validates `text` as a host name.
    pub fn new(text: &str) -> Result<Self, ModelError> {
        if valid_label(text, b".") {
            Ok(Self(text.to_owned()))
        } else {
            Err(ModelError::HostName(shorten(text)))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostName {
    type Error = ModelError;
    fn try_from(text: String) -> Result<Self, ModelError> {
        Self::new(&text)
    }
}

impl From<HostName> for String {
    fn from(name: HostName) -> String {
        name.0
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The role of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the VM and produces the log.
    Primary,
    /// Replays the primary's log; goes live when the primary dies.
    Backup,
}

impl Role {
    /// Both roles, primary first.
    pub const ALL: [Role; 2] = [Role::Primary, Role::Backup];

    /// `primary` or `backup`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }

    /// Parses `primary` or `backup`.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        match text {
            "primary" => Ok(Role::Primary),
            "backup" => Ok(Role::Backup),
            other => Err(ModelError::Role(shorten(other))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a size such as `128M`, `1G`, `4096K` or plain bytes (binary units).
pub fn parse_size(text: &str) -> Result<u64, ModelError> {
    ftvm_contract::size::parse_size(text).map_err(|_| ModelError::Size(shorten(text)))
}

fn check_mem(bytes: u64) -> Result<u64, ModelError> {
    ftvm_contract::size::check_mem_size(bytes).map_err(|_| ModelError::Mem(bytes))
}

fn check_path(what: &'static str, path: &str) -> Result<String, ModelError> {
    if path.starts_with('/') && path.len() <= PATH_MAX && !path.chars().any(char::is_control) {
        Ok(path.to_owned())
    } else {
        Err(ModelError::Path {
            what,
            path: shorten(path),
        })
    }
}

/// A guest NIC on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// TAP device name made by the operator on every host; empty: each host's ftd makes
    /// one per replica on its bridge ([`NetSpec::managed`]).
    pub tap: String,
    /// MAC address, `52:54:00:12:34:56`.
    pub mac: String,
    /// IPv4 address with prefix, if the guest is told one.
    pub ip: Option<String>,
}

impl NetSpec {
    /// Whether ftd makes the TAP (on the host's bridge) rather than the operator.
    pub fn managed(&self) -> bool {
        self.tap.is_empty()
    }

    /// The IPv4 address without its prefix, if one is given.
    pub fn address(&self) -> Option<&str> {
        self.ip
            .as_deref()
            .map(|ip| ip.split('/').next().unwrap_or(ip))
    }

    /// Validates the three parts (an empty `tap`: made by ftd).
    pub fn new(tap: &str, mac: &str, ip: Option<&str>) -> Result<Self, ModelError> {
        let tap_ok = tap.is_empty()
            || (1..=15).contains(&tap.len())
                && tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !tap_ok {
            return Err(ModelError::Tap(shorten(tap)));
        }
        let parts: Vec<&str> = mac.split(':').collect();
        let mac_ok = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
        if !mac_ok {
            return Err(ModelError::Mac(shorten(mac)));
        }
        if let Some(ip) = ip {
            let ok = ip.split_once('/').is_some_and(|(addr, prefix)| {
                addr.parse::<std::net::Ipv4Addr>().is_ok()
                    && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
            });
            if !ok {
                return Err(ModelError::Ip(shorten(ip)));
            }
        }
        Ok(Self {
            tap: tap.to_owned(),
            mac: mac.to_ascii_lowercase(),
            ip: ip.map(str::to_owned),
        })
    }
}

/// Where a VM's disk lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// One file both replicas open at the same path ([`VmSpec::disk`], shared storage);
    /// also a VM without a disk, and every spec stored before private disks existed.
    #[default]
    Shared,
    /// Each replica has its own file on its own host, made by that host's ftd
    /// ([`VmSpec::disk_size_bytes`]); a backup made by cloning gets its content from the
    /// clone.
    Private,
}

impl DiskMode {
    /// `shared` or `private`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::Shared => "shared",
            DiskMode::Private => "private",
        }
    }

    /// Whether this is [`DiskMode::Shared`] (what a spec that says nothing means).
    pub fn is_shared(&self) -> bool {
        *self == DiskMode::Shared
    }
}

impl From<ftvm_contract::status::DiskMode> for DiskMode {
    fn from(mode: ftvm_contract::status::DiskMode) -> Self {
        match mode {
            ftvm_contract::status::DiskMode::Shared => DiskMode::Shared,
            ftvm_contract::status::DiskMode::Private => DiskMode::Private,
        }
    }
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asks for when creating a VM, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmRequest {
    /// VM name.
    pub name: String,
    /// Guest ELF path (empty with `image_sha256`).
    pub image: String,
    /// Guest ELF by content: the SHA-256 of an uploaded image, empty for a path.
    pub image_sha256: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Disk image path, empty for none.
    pub disk: String,
    /// Shared (the default) or private.
    pub disk_mode: DiskMode,
    /// A private disk's size in bytes, 0 for none.
    pub disk_size_bytes: u64,
    /// The image private disks start as a copy of, empty for none.
    pub disk_image: String,
    /// NIC as (tap, mac, ip), all empty for none.
    pub net: Option<(String, String, String)>,
    /// Hosts in order (primary, backup); empty lets the leader pick.
    pub hosts: Vec<String>,
}

/// The desired state of a VM, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM name.
    pub name: VmName,
    /// Guest ELF path (the same on every host); empty when the image is uploaded.
    pub image: String,
    /// The uploaded image's SHA-256 ([`crate::images`]): each host runs its verified
    /// copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Guest command line.
    pub cmdline: String,
    /// Shared disk image (shared mode only).
    pub disk: Option<String>,
    /// Shared or private; specs stored before private disks existed read as shared.
    #[serde(default, skip_serializing_if = "DiskMode::is_shared")]
    pub disk_mode: DiskMode,
    /// The size of each replica's own disk (private mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_bytes: Option<u64>,
    /// The image each replica's private disk starts as a copy of (private mode only;
    /// none: empty disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    /// Guest NIC.
    pub net: Option<NetSpec>,
    /// Hosts in order (primary, backup); empty lets the leader pick.
    pub hosts: Vec<HostName>,
    /// Unique id of this incarnation of the VM (a VM deleted and created again under the
    /// same name gets a new one, so stale assignments are recognised).
    pub uid: String,
    /// When the VM was created.
    pub created_unix_ms: u64,
}

impl VmSpec {
    /// The size of each replica's own disk, if the VM has private disks.
    pub fn private_disk_size(&self) -> Option<u64> {
        match self.disk_mode {
            DiskMode::Private => self.disk_size_bytes,
            DiskMode::Shared => None,
        }
    }

    /// Validates a request. `uid` and `created_unix_ms` are set by the caller.
    pub fn validate(request: &VmRequest) -> Result<Self, ModelError> {
        let name = VmName::new(&request.name)?;
        let (image, image_sha256) = match (request.image.as_str(), request.image_sha256.as_str()) {
            (path, "") => (check_path("image", path)?, None),
            ("", sha256) if valid_sha256(sha256) => (String::new(), Some(sha256.to_owned())),
            ("", sha256) => {
                return Err(ModelError::Image(format!(
                    "'{}' is not a SHA-256 in lowercase hex",
                    shorten(sha256)
                )))
            }
            (_, _) => {
                return Err(ModelError::Image(
                    "a path and an uploaded image's hash cannot both be given".into(),
                ))
            }
        };
        let mem_bytes = check_mem(request.mem_bytes)?;
        if request.cmdline.len() > CMDLINE_MAX || request.cmdline.chars().any(char::is_control) {
            return Err(ModelError::Cmdline);
        }
        let (disk, disk_size_bytes) = check_disk(request)?;
        let disk_image = match (request.disk_mode, request.disk_image.as_str()) {
            (_, "") => None,
            (DiskMode::Private, path) => Some(check_path("disk image", path)?),
            (DiskMode::Shared, _) => return Err(ModelError::DiskCombination(
                "--disk-image is for --disk-mode private: a shared disk is the file --disk names",
            )),
        };
        let net = match &request.net {
            None => None,
            Some((tap, mac, ip)) => Some(NetSpec::new(
                tap,
                mac,
                Some(ip.as_str()).filter(|ip| !ip.is_empty()),
            )?),
        };
        let too_many = || ModelError::Hosts(request.hosts.iter().map(|h| shorten(h)).collect());
        if request.hosts.len() > HOSTS_MAX {
            return Err(too_many());
        }
        let hosts = request
            .hosts
            .iter()
            .map(|h| HostName::new(h))
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.len() == 2 && hosts[0] == hosts[1] {
            return Err(too_many());
        }
        Ok(Self {
            name,
            image,
            image_sha256,
            mem_bytes,
            cmdline: request.cmdline.clone(),
            disk,
            disk_mode: request.disk_mode,
            disk_size_bytes,
            disk_image,
            net,
            hosts,
            uid: String::new(),
            created_unix_ms: 0,
        })
    }
}

/// The disk of a request: a shared disk's path, or a private disk's size, never both.
fn check_disk(request: &VmRequest) -> Result<(Option<String>, Option<u64>), ModelError> {
    match (request.disk_mode, request.disk.as_str(), request.disk_size_bytes) {
        (DiskMode::Shared, _, size) if size != 0 => Err(ModelError::DiskCombination(
            "--disk-size is for --disk-mode private: a shared disk is the file --disk names",
        )),
        (DiskMode::Shared, "", _) => Ok((None, None)),
        (DiskMode::Shared, path, _) => Ok((Some(check_path("disk", path)?), None)),
        (DiskMode::Private, path, _) if !path.is_empty() => Err(ModelError::DiskCombination(
            "--disk is for --disk-mode shared: each host makes the private disks of its replicas (give --disk-size)",
        )),
        (DiskMode::Private, _, 0) => Err(ModelError::DiskCombination(
            "--disk-mode private needs --disk-size (each replica's disk is made empty at that size)",
        )),
        (DiskMode::Private, _, size) => {
            if size % DISK_SECTOR != 0 || size > DISK_SIZE_MAX {
                return Err(ModelError::DiskSize(size));
            }
            Ok((None, Some(size)))
        }
    }
}

/// Where the leader placed a replica (`/ft/vms/<vm>/replicas/<role>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The host that runs it.
    pub host: HostName,
    /// Pair generation.
    pub generation: u64,
    /// The [`VmSpec::uid`] it belongs to.
    pub uid: String,
    /// Which replica process this is: numbered from 1 within the VM's incarnation, never
    /// reused. A backup that went live keeps its number when the leader makes it the
    /// primary, so its host keeps the process running.
    #[serde(default)]
    pub replica: u64,
    /// The pair's log channel, `IP:PORT` on the primary's host, the same in the primary's
    /// and the backup's assignment: the primary listens on it (`--log-listen`), the backup
    /// connects to it (`--log-connect`). `None`: a replica that was not started as half
    /// of a new pair (a primary placed alone, a backup made by cloning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_address: Option<String>,
    /// Where this replica accepts a new backup while it runs alone (`--clone-listen`,
    /// `IP:PORT` on its own host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_listen: Option<String>,
    /// A backup made by cloning the running primary whose `clone_listen` this is
    /// (`--clone-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<String>,
    /// A backup being replaced (`ftctl restart-backup`): its host stops it only while it
    /// still follows its primary (`stop-backup` on its control socket); one that went
    /// live meanwhile runs on and is promoted like any backup that went live.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retiring: bool,
    /// A primary handing over to its backup (`ftctl switchover`): its host stops it
    /// gracefully (`stop` on its control socket: the vCPU stops, every held output is
    /// released as the backup acknowledges it, the log ends without an end frame), so
    /// the backup replays to the end and goes live through the arbiter; the leader then
    /// promotes it and clones a new backup. Not a failover.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handing_over: bool,
    /// On a primary: where its next backup goes (`ftctl restart-backup --to HOST`), if
    /// that host can take it when the backup is placed; cleared once placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup_host: Option<HostName>,
}

/// The state of a replica process as its ftd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// The ftvmm process runs.
    Running,
    /// It ended (or could not be started).
    Exited,
}

/// A replica's state reported by the ftd of its host (`/ft/vms/<vm>/reports/<replica>`,
/// under that host's lease: it vanishes with the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// The reporting host.
    pub host: HostName,
    /// The [`VmSpec::uid`] of the replica.
    pub uid: String,
    /// The [`Assignment::replica`] number.
    #[serde(default)]
    pub replica: u64,
    /// Its generation (the assignment's).
    pub generation: u64,
    /// Running or exited.
    pub state: ProcessState,
    /// ftvmm's pid (0 if it never started).
    pub pid: u32,
    /// How it ended: `exit status N`, `signal N`, `cannot start: ...`.
    pub exit: Option<String>,
    /// The exit status if ftvmm exited normally: 0..=63 means the guest powered off with
    /// this code (docs/contract.md), which is a clean stop, not a failure.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// What a running replica of a pair last said on its control socket; `None` when it
    /// has not answered yet (or is not half of a pair).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<PairState>,
    /// When this was observed.
    pub unix_ms: u64,
}

/// A pair replica's own view of the pair, from the `status` line of its control socket
/// (docs/contract.md): what protection means is decided by the primary, which knows
/// whether its backup is connected and following.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairState {
    /// ftvmm's `role=`: `primary`, `backup`, `live` (a backup that went live).
    pub role: String,
    /// `state=`: `booting` (a primary waiting for its backup), `running`, ...
    pub state: String,
    /// `protected=1`: the other replica is there.
    pub protected: bool,
    /// `peer_lost=1`: the other replica was declared lost.
    pub peer_lost: bool,
    /// `generation=`: the pair generation the replica is in now (one more after each
    /// backup it cloned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

impl PairState {
    /// Whether the replica runs its guest alone, so that a new backup can be cloned from
    /// it: not paired (or its peer lost) and past booting (a primary still waiting for
    /// its first backup has not started its guest).
    pub fn runs_alone(&self) -> bool {
        !self.protected
            && matches!(self.role.as_str(), "primary" | "live" | "none")
            && matches!(self.state.as_str(), "running" | "halted")
    }
}

/// Protection state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protection {
    /// Primary and backup run.
    Protected,
    /// Only the primary runs.
    NotProtected,
    /// Nothing runs the VM.
    Down,
}

impl Protection {
    /// All states, for metrics.
    pub const ALL: [Protection; 3] = [
        Protection::Protected,
        Protection::NotProtected,
        Protection::Down,
    ];

    /// The metric label / JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protection::Protected => "protected",
            Protection::NotProtected => "not_protected",
            Protection::Down => "down",
        }
    }
}

/// A failover the leader recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// When it was noticed.
    pub unix_ms: u64,
    /// The host of the replica lost.
    pub from_host: HostName,
    /// The host that went live, if any.
    pub to_host: Option<HostName>,
    /// What happened.
    pub reason: String,
}

/// The status the leader records (`/ft/vms/<vm>/status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The [`VmSpec::uid`] this status is about.
    pub uid: String,
    /// Protection state.
    pub protection: Protection,
    /// Why not protected (empty when protected).
    pub reason: String,
    /// Host chosen for the next backup while none can be placed yet.
    pub planned_backup_host: Option<HostName>,
    /// Whether the primary was seen running at the last reconcile (a change from true to
    /// false is a failover).
    pub primary_running: bool,
    /// The last failover.
    pub last_failover: Option<Failover>,
    /// Failovers of this VM's life so far (kept here so the count survives a new leader).
    #[serde(default)]
    pub failovers: u64,
    /// The highest replica number given out for this VM (numbers are never reused).
    #[serde(default)]
    pub last_replica: u64,
    /// When recorded.
    pub updated_unix_ms: u64,
}

/// A host's registration (`/ft/hosts/<host>`, under the host's lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host name.
    pub name: HostName,
    /// Where its ftd serves gRPC (`host:port`).
    pub grpc_address: String,
    /// Where its ftd serves /metrics.
    pub metrics_address: String,
    /// ftd version.
    pub version: String,
    /// Whether its ftvmm can run a backup (`--role backup`).
    pub backup_capable: bool,
    /// The IP its primaries listen on for their backups' log channels (`None`: an ftd too
    /// old to run pairs).
    #[serde(default)]
    pub log_listen_ip: Option<String>,
    /// The first port of those log channels.
    #[serde(default)]
    pub log_port_base: Option<u16>,
    /// The CPU a guest of this host sees, as `ftvmm cpu` prints it (`cpu=<hash> vendor=
    /// family= model= xsave=`); both replicas of a VM need the same `cpu=` word. `None`:
    /// an ftvmm too old to say (then any host will do, as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// The bridge its ftd puts the TAPs it makes on (`None`: it makes none, and a VM
    /// whose NIC names no TAP is not placed there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// When the ftd started.
    pub started_unix_ms: u64,
}

/// The cluster marker (`/ft/cluster`): written once, by the first ftd that finds the store
/// without one, and remembered by every ftd, so that an emptied or foreign store is told
/// from one whose VMs were deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The cluster's id.
    pub id: String,
    /// When it was written.
    pub created_unix_ms: u64,
}

/// The value a leader publishes in the election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The leader's host.
    pub host: HostName,
    /// Where it serves gRPC.
    pub grpc_address: String,
}

/// An entry of the cluster event log (`/ft/events/<seq>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number.
    pub seq: u64,
    /// When.
    pub unix_ms: u64,
    /// The VM concerned, if any.
    pub vm: Option<VmName>,
    /// Short kind (`vm-created`, `failover`, ...).
    pub kind: String,
    /// One line for humans.
    pub message: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> VmRequest {
        VmRequest {
            name: "web1".into(),
            image: "/img/kv.elf".into(),
            mem_bytes: 128 << 20,
            ..VmRequest::default()
        }
    }

    #[test]
    fn vm_names_follow_the_dns_label_rule() {
        for good in ["a", "web1", "0-x", &"a".repeat(63)] {
            assert!(VmName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "Web", "a_b", "a.b", &"a".repeat(64), "a/b", "é"] {
            assert_eq!(
                VmName::new(bad),
                Err(ModelError::VmName(shorten(bad))),
                "{bad}"
            );
        }
    }

    #[test]
    fn spec_validation_refuses_bad_sizes_paths_and_hosts() {
        assert!(VmSpec::validate(&request()).is_ok());
        let bad = [
            VmRequest {
                mem_bytes: 1 << 20,
                ..request()
            },
            VmRequest {
                mem_bytes: (128 << 20) + 1,
                ..request()
            },
            VmRequest {
                image: "kv.elf".into(),
                ..request()
            },
            VmRequest {
                cmdline: "x".repeat(CMDLINE_MAX + 1),
                ..request()
            },
            VmRequest {
                hosts: vec!["a".into(), "a".into()],
                ..request()
            },
            VmRequest {
                hosts: vec!["a".into(), "b".into(), "c".into()],
                ..request()
            },
            VmRequest {
                net: Some(("tap0".into(), "52:54:00:12:34".into(), String::new())),
                ..request()
            },
            VmRequest {
                net: Some(("tap0".into(), "52:54:00:12:34:56".into(), "10.0.0.1".into())),
                ..request()
            },
        ];
        for request in bad {
            assert!(VmSpec::validate(&request).is_err(), "{request:?}");
        }
    }

    #[test]
    fn private_disks_may_start_from_an_image_and_a_shared_disk_may_not() {
        let seeded = VmSpec::validate(&VmRequest {
            disk_mode: DiskMode::Private,
            disk_size_bytes: 8 << 30,
            disk_image: "/disks/base.img".into(),
            ..request()
        })
        .expect("private disks from an image");
        assert_eq!(seeded.disk_image.as_deref(), Some("/disks/base.img"));
        let refused = VmSpec::validate(&VmRequest {
            disk: "/disks/web1.img".into(),
            disk_image: "/disks/base.img".into(),
            ..request()
        })
        .expect_err("an image for a shared disk");
        assert!(
            refused
                .to_string()
                .contains("--disk-image is for --disk-mode private"),
            "{refused}"
        );
        let relative = VmSpec::validate(&VmRequest {
            disk_mode: DiskMode::Private,
            disk_size_bytes: 8 << 30,
            disk_image: "base.img".into(),
            ..request()
        });
        assert!(relative.is_err(), "{relative:?}");
    }

    #[test]
    fn a_private_disk_has_a_size_and_no_path_and_a_shared_one_no_size() {
        let private = VmSpec::validate(&VmRequest {
            disk_mode: DiskMode::Private,
            disk_size_bytes: 8 << 30,
            ..request()
        })
        .expect("a private disk of 8 GiB");
        assert_eq!(
            (private.disk_mode, private.private_disk_size(), private.disk),
            (DiskMode::Private, Some(8 << 30), None)
        );
        let shared = VmSpec::validate(&VmRequest {
            disk: "/disks/web1.img".into(),
            ..request()
        })
        .expect("a shared disk");
        assert_eq!(
            (shared.disk_mode, shared.private_disk_size()),
            (DiskMode::Shared, None)
        );
        let refused = |disk: &str, disk_mode, disk_size_bytes| {
            VmSpec::validate(&VmRequest {
                disk: disk.into(),
                disk_mode,
                disk_size_bytes,
                ..request()
            })
            .expect_err("refused")
            .to_string()
        };
        let cases = [
            (
                "",
                DiskMode::Shared,
                64 << 20,
                "--disk-size is for --disk-mode private",
            ),
            (
                "/disks/web1.img",
                DiskMode::Shared,
                64 << 20,
                "--disk-size is for --disk-mode private",
            ),
            (
                "/disks/web1.img",
                DiskMode::Private,
                64 << 20,
                "--disk is for --disk-mode shared",
            ),
            (
                "",
                DiskMode::Private,
                0,
                "--disk-mode private needs --disk-size",
            ),
            (
                "",
                DiskMode::Private,
                (64 << 20) + 1,
                "must be a multiple of 512",
            ),
            ("", DiskMode::Private, 100, "must be a multiple of 512"),
            (
                "",
                DiskMode::Private,
                DISK_SIZE_MAX + 512,
                "within 512..16T",
            ),
            (
                "disk.img",
                DiskMode::Shared,
                0,
                "disk path 'disk.img' must be absolute",
            ),
        ];
        for (disk, mode, size, why) in cases {
            let text = refused(disk, mode, size);
            assert!(text.contains(why), "{disk:?} {mode} {size}: {text}");
        }
    }

    #[test]
    fn specs_stored_before_private_disks_read_as_shared_and_shared_ones_are_written_as_before() {
        let old = r#"{"name":"web1","image":"/img/kv.elf","mem_bytes":134217728,"cmdline":"",
            "disk":"/disks/web1.img","net":null,"hosts":["a","b"],"uid":"u1","created_unix_ms":1}"#;
        let spec: VmSpec = serde_json::from_str(old).expect("an old spec reads");
        assert_eq!(
            (
                spec.disk_mode,
                spec.disk.as_deref(),
                spec.private_disk_size()
            ),
            (DiskMode::Shared, Some("/disks/web1.img"), None)
        );
        let written = serde_json::to_string(&spec).expect("encode");
        assert!(!written.contains("disk_mode"), "{written}");
        let private = VmSpec {
            disk: None,
            disk_mode: DiskMode::Private,
            disk_size_bytes: Some(64 << 20),
            ..spec
        };
        let written = serde_json::to_string(&private).expect("encode");
        assert!(
            written.contains(r#""disk_mode":"private","disk_size_bytes":67108864"#),
            "{written}"
        );
        assert_eq!(serde_json::from_str::<VmSpec>(&written).ok(), Some(private));
    }

    #[test]
    fn a_nic_without_a_tap_is_one_ftd_makes() {
        let spec = VmSpec::validate(&VmRequest {
            net: Some((
                String::new(),
                "52:54:00:AB:34:56".into(),
                "10.0.0.2/24".into(),
            )),
            ..request()
        })
        .expect("a NIC without a TAP name is valid");
        let net = spec.net.expect("a NIC");
        assert!(net.managed());
        assert_eq!(net.mac, "52:54:00:ab:34:56", "MACs compare in one case");
        assert_eq!(net.address(), Some("10.0.0.2"));
        let named = NetSpec::new("tap0", "52:54:00:ab:34:56", None).expect("valid");
        assert!(!named.managed());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn stored_names_are_validated_when_read_back() {
        let bad: Result<VmName, _> = serde_json::from_str("\"Bad Name\"");
        assert!(bad.is_err());
    }
}
