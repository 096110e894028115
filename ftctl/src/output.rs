//! What ftctl prints: the JSON shapes of VMs, hosts and events, and the human tables.

use super::CtlError;
use ftvm_proto::v1::{
    DiskMode as PbDiskMode, Event as PbEvent, Host as PbHost, Protection as PbProtection,
    Role as PbRole, Vm as PbVm,
};
use serde::Serialize;
use std::io::Write;

/// A replica as printed.
#[derive(Debug, Serialize)]
pub struct ReplicaOut {
    /// primary or backup.
    pub role: &'static str,
    /// Host.
    pub host: String,
    /// pending, running, exited, lost.
    pub state: String,
    /// ftvmm pid.
    pub pid: u32,
    /// Pair generation.
    pub generation: u64,
    /// The replica's number within the VM (a new one for each process started).
    pub id: u64,
    /// Whether this backup was made by cloning the running primary.
    pub cloned: bool,
    /// How it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
}

/// A failover as printed.
#[derive(Debug, Serialize)]
pub struct FailoverOut {
    /// When (ms since the epoch).
    pub unix_ms: u64,
    /// Host lost.
    pub from_host: String,
    /// Host that went live.
    pub to_host: Option<String>,
    /// What happened.
    pub reason: String,
}

/// How far the disk copy of a clone has come, as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CloneDiskOut {
    /// Bytes of disk data sent so far.
    pub copied_bytes: u64,
    /// Bytes of data the disk held when the copy began.
    pub data_bytes: u64,
}

/// A VM as printed.
#[derive(Debug, Serialize)]
pub struct VmOut {
    /// Name.
    pub name: String,
    /// protected, not_protected, down.
    pub protection: &'static str,
    /// Why not protected.
    pub reason: String,
    /// Guest image: its path on the hosts, or `sha256:<hex>` for an uploaded one.
    pub image: String,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// The shared disk's path.
    pub disk: Option<String>,
    /// shared (also a VM without a disk) or private.
    pub disk_mode: &'static str,
    /// A private disk's size (each replica's).
    pub disk_size_bytes: Option<u64>,
    /// The image private disks started as a copy of (none: null).
    pub disk_image: Option<String>,
    /// The disk mode the running primary reports (unknown: null).
    pub primary_disk_mode: Option<&'static str>,
    /// The disk copy of a clone the primary is making now (none: null).
    pub clone_disk: Option<CloneDiskOut>,
    /// Hosts requested.
    pub hosts: Vec<String>,
    /// Replicas.
    pub replicas: Vec<ReplicaOut>,
    /// Where the backup would go.
    pub planned_backup_host: Option<String>,
    /// Backup lag in exits (unknown: null).
    pub backup_lag_exits: Option<u64>,
    /// Backup lag in milliseconds (unknown: null).
    pub backup_lag_ms: Option<u64>,
    /// Log bytes the primary sent so far (unknown: null).
    pub log_bytes_total: Option<u64>,
    /// Log bandwidth (unknown: null).
    pub log_bytes_per_second: Option<u64>,
    /// Last failover.
    pub last_failover: Option<FailoverOut>,
    /// Failovers so far.
    pub failovers: u64,
}

pub(crate) fn non_empty(text: String) -> Option<String> {
    Some(text).filter(|text| !text.is_empty())
}

/// A disk mode's name; `None` for unspecified (or one this version does not know).
fn disk_mode_name(value: i32) -> Option<&'static str> {
    match PbDiskMode::try_from(value) {
        Ok(PbDiskMode::Shared) => Some("shared"),
        Ok(PbDiskMode::Private) => Some("private"),
        _ => None,
    }
}

/// `bytes` in binary units with one decimal: `512 B`, `64.0 MiB`, `1.2 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl VmOut {
    pub(crate) fn from_pb(vm: PbVm) -> VmOut {
        let spec = vm.spec.unwrap_or_default();
        let status = vm.status.unwrap_or_default();
        let protection = match PbProtection::try_from(status.protection) {
            Ok(PbProtection::Protected) => "protected",
            Ok(PbProtection::NotProtected) => "not_protected",
            _ => "down",
        };
        VmOut {
            name: spec.name,
            protection,
            reason: status.reason,
            image: if spec.image_sha256.is_empty() {
                spec.image
            } else {
                format!("sha256:{}", spec.image_sha256)
            },
            mem_bytes: spec.mem_bytes,
            disk: non_empty(spec.disk),
            // Unspecified: an ftd that predates private disks, whose disks are shared.
            disk_mode: disk_mode_name(spec.disk_mode).unwrap_or("shared"),
            disk_size_bytes: Some(spec.disk_size_bytes).filter(|size| *size != 0),
            disk_image: Some(spec.disk_image.clone()).filter(|image| !image.is_empty()),
            primary_disk_mode: disk_mode_name(status.primary_disk_mode),
            clone_disk: status.clone_disk.map(|progress| CloneDiskOut {
                copied_bytes: progress.copied_bytes,
                data_bytes: progress.data_bytes,
            }),
            hosts: spec.hosts,
            replicas: status
                .replicas
                .into_iter()
                .map(|replica| ReplicaOut {
                    role: match PbRole::try_from(replica.role) {
                        Ok(PbRole::Backup) => "backup",
                        _ => "primary",
                    },
                    host: replica.host,
                    state: replica.state,
                    pid: replica.pid,
                    generation: replica.generation,
                    id: replica.id,
                    cloned: replica.cloned,
                    exit: non_empty(replica.exit),
                })
                .collect(),
            planned_backup_host: non_empty(status.planned_backup_host),
            backup_lag_exits: status.backup_lag_exits,
            backup_lag_ms: status.backup_lag_ms,
            log_bytes_total: status.log_bytes_total,
            log_bytes_per_second: status.log_bytes_per_second,
            last_failover: status.last_failover.map(|failover| FailoverOut {
                unix_ms: failover.unix_ms,
                from_host: failover.from_host,
                to_host: non_empty(failover.to_host),
                reason: failover.reason,
            }),
            failovers: status.failovers,
        }
    }

    pub(crate) fn protection_text(&self) -> String {
        match self.protection {
            "protected" => "Protected".to_owned(),
            "not_protected" => format!("Not protected: {}", self.reason),
            _ => format!("Down: {}", self.reason),
        }
    }

    pub(crate) fn replica(&self, role: &str) -> Option<&ReplicaOut> {
        self.replicas.iter().find(|replica| replica.role == role)
    }
}

/// A host as printed.
#[derive(Debug, Serialize)]
pub struct HostOut {
    /// Name.
    pub name: String,
    /// gRPC address.
    pub grpc_address: String,
    /// /metrics address.
    pub metrics_address: String,
    /// Whether it leads.
    pub leader: bool,
    /// Replicas running there.
    pub replicas: u32,
    /// Whether its ftvmm can run a backup.
    pub backup_capable: bool,
    /// ftd version.
    pub version: String,
    /// Drained: no new replica is placed there.
    pub drained: bool,
    /// What looks wrong with its registration.
    pub warnings: Vec<String>,
    /// The CPU its guests see (`cpu=<hash> vendor= family= model= xsave=`), if known.
    pub cpu: Option<String>,
    /// The bridge its ftd makes TAPs on, if any.
    pub bridge: Option<String>,
}

impl HostOut {
    /// The CPU in a table cell: vendor family/model and the hash replicas must share.
    pub(crate) fn cpu_cell(&self) -> String {
        let Some(cpu) = &self.cpu else {
            return "?".to_owned();
        };
        let word = |key: &str| {
            cpu.split_whitespace()
                .find_map(|word| word.strip_prefix(key))
                .unwrap_or("?")
                .to_owned()
        };
        format!(
            "{} {}/{} ({})",
            word("vendor="),
            word("family="),
            word("model="),
            word("cpu=")
        )
    }
}

impl From<PbHost> for HostOut {
    fn from(host: PbHost) -> Self {
        HostOut {
            name: host.name,
            grpc_address: host.grpc_address,
            metrics_address: host.metrics_address,
            leader: host.leader,
            replicas: host.replicas,
            backup_capable: host.backup_capable,
            version: host.version,
            drained: host.drained,
            warnings: host.warnings,
            cpu: non_empty(host.cpu),
            bridge: non_empty(host.bridge),
        }
    }
}

/// An event as printed.
#[derive(Debug, Serialize)]
pub struct EventOut {
    /// Sequence number.
    pub seq: u64,
    /// When (ms since the epoch).
    pub unix_ms: u64,
    /// The VM, if any.
    pub vm: Option<String>,
    /// Kind.
    pub kind: String,
    /// Text.
    pub message: String,
}

impl From<PbEvent> for EventOut {
    fn from(event: PbEvent) -> Self {
        EventOut {
            seq: event.seq,
            unix_ms: event.unix_ms,
            vm: non_empty(event.vm),
            kind: event.kind,
            message: event.message,
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for milliseconds since the epoch.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Prints rows as columns separated by two spaces.
pub(crate) fn table(
    out: &mut impl Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

pub(crate) fn json(out: &mut impl Write, value: &impl Serialize) -> Result<(), CtlError> {
    serde_json::to_writer_pretty(&mut *out, value).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

pub(crate) fn replica_cell(replica: Option<&ReplicaOut>) -> String {
    match replica {
        Some(replica) => format!("{} ({})", replica.host, replica.state),
        None => "-".to_owned(),
    }
}

pub(crate) fn print_status(out: &mut impl Write, vm: &VmOut) -> std::io::Result<()> {
    writeln!(out, "vm:             {}", vm.name)?;
    writeln!(out, "protection:     {}", vm.protection_text())?;
    for role in ["primary", "backup"] {
        let text = match vm.replica(role) {
            Some(r) => {
                let mut text = format!("{} {}", r.host, r.state);
                if r.pid != 0 {
                    text.push_str(&format!(", pid {}", r.pid));
                }
                text.push_str(&format!(", generation {}, replica {}", r.generation, r.id));
                if r.cloned {
                    text.push_str(", cloned");
                }
                if let Some(exit) = &r.exit {
                    text.push_str(&format!(", {exit}"));
                }
                text
            }
            None if role == "backup" => match &vm.planned_backup_host {
                Some(host) => format!("none (would run on {host})"),
                None => "none".to_owned(),
            },
            None => "none".to_owned(),
        };
        writeln!(out, "{role}:{:width$}{text}", "", width = 15 - role.len())?;
    }
    let primary_runs = vm
        .replica("primary")
        .is_some_and(|primary| primary.state == "running");
    let unknown = if vm.replica("backup").is_none() {
        "n/a (no backup)"
    } else if !primary_runs {
        "n/a (no running primary)"
    } else {
        "unknown (the primary's control socket did not answer)"
    };
    match (vm.backup_lag_exits, vm.backup_lag_ms) {
        (Some(lag), Some(ms)) => writeln!(out, "backup lag:     {lag} exits, {ms} ms")?,
        (Some(lag), None) => writeln!(out, "backup lag:     {lag} exits")?,
        _ => writeln!(out, "backup lag:     {unknown}")?,
    }
    match (vm.log_bytes_per_second, vm.log_bytes_total) {
        (Some(rate), Some(total)) => {
            writeln!(out, "log bandwidth:  {rate} B/s ({total} bytes sent)")?
        }
        (Some(rate), None) => writeln!(out, "log bandwidth:  {rate} B/s")?,
        _ => writeln!(out, "log bandwidth:  {unknown}")?,
    }
    match &vm.last_failover {
        Some(f) => writeln!(
            out,
            "last failover:  {} UTC from {}{}: {} ({} in all)",
            format_utc(f.unix_ms),
            f.from_host,
            f.to_host
                .as_ref()
                .map(|to| format!(" to {to}"))
                .unwrap_or_default(),
            f.reason,
            vm.failovers
        )?,
        None => writeln!(out, "last failover:  none")?,
    }
    writeln!(out, "image:          {}", vm.image)?;
    writeln!(out, "memory:         {} MiB", vm.mem_bytes >> 20)?;
    let mut disk = match (vm.disk_mode, &vm.disk, vm.disk_size_bytes) {
        ("private", _, size) => format!(
            "private, {} per replica (each on its own host)",
            size.map_or_else(|| "?".to_owned(), format_bytes)
        ),
        (_, Some(path), _) => format!("shared, {path}"),
        (_, None, _) => "none".to_owned(),
    };
    if let Some(image) = &vm.disk_image {
        disk.push_str(&format!(", from {image}"));
    }
    // Only a replica started with another mode than the spec's says otherwise.
    if let Some(reported) = vm.primary_disk_mode.filter(|mode| *mode != vm.disk_mode) {
        disk.push_str(&format!(" (the primary says {reported})"));
    }
    writeln!(out, "disk:           {disk}")?;
    if let Some(copy) = vm.clone_disk {
        // Blocks the guest writes during the copy are sent again, so the bytes sent can
        // pass the data the copy began with.
        let again = if copy.copied_bytes > copy.data_bytes {
            " (blocks written since are sent again)"
        } else {
            ""
        };
        writeln!(
            out,
            "clone:          disk copy {} / {}{again}",
            format_bytes(copy.copied_bytes),
            format_bytes(copy.data_bytes)
        )?;
    }
    Ok(())
}

pub(crate) fn print_event(
    out: &mut impl Write,
    json_output: bool,
    event: PbEvent,
) -> Result<(), CtlError> {
    let event = EventOut::from(event);
    if json_output {
        serde_json::to_writer(&mut *out, &event).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "{} UTC  #{:<5} {:<14} {:<12} {}",
            format_utc(event.unix_ms),
            event.seq,
            event.kind,
            event.vm.as_deref().unwrap_or("-"),
            event.message
        )?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_proto::v1::{CloneDiskProgress, VmSpec, VmStatus};

    fn private_vm(clone_disk: Option<CloneDiskProgress>) -> PbVm {
        PbVm {
            spec: Some(VmSpec {
                name: "web1".into(),
                mem_bytes: 128 << 20,
                disk_mode: PbDiskMode::Private.into(),
                disk_size_bytes: 8 << 30,
                ..VmSpec::default()
            }),
            status: Some(VmStatus {
                protection: PbProtection::NotProtected.into(),
                primary_disk_mode: PbDiskMode::Private.into(),
                clone_disk,
                ..VmStatus::default()
            }),
        }
    }

    fn printed(vm: &VmOut) -> String {
        let mut out = Vec::new();
        print_status(&mut out, vm).expect("write");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(64 << 20), "64.0 MiB");
        assert_eq!(format_bytes(1_288_490_189), "1.2 GiB");
        assert_eq!(format_bytes(8 << 30), "8.0 GiB");
        assert_eq!(format_bytes(16 << 40), "16.0 TiB");
    }

    #[test]
    fn the_status_shows_the_disk_mode_and_a_clones_disk_copy() {
        let copying = VmOut::from_pb(private_vm(Some(CloneDiskProgress {
            copied_bytes: 1_288_490_189,
            data_bytes: 8 << 30,
        })));
        let text = printed(&copying);
        assert!(
            text.contains("disk:           private, 8.0 GiB per replica"),
            "{text}"
        );
        assert!(
            text.contains("clone:          disk copy 1.2 GiB / 8.0 GiB"),
            "{text}"
        );
        let json = serde_json::to_value(&copying).expect("json");
        assert_eq!(json["disk_mode"], "private");
        assert_eq!(json["disk_size_bytes"], 8u64 << 30);
        assert_eq!(json["primary_disk_mode"], "private");
        assert_eq!(json["clone_disk"]["copied_bytes"], 1_288_490_189u64);

        let again = VmOut::from_pb(private_vm(Some(CloneDiskProgress {
            copied_bytes: 9 << 30,
            data_bytes: 8 << 30,
        })));
        assert!(
            printed(&again)
                .contains("disk copy 9.0 GiB / 8.0 GiB (blocks written since are sent again)"),
            "{}",
            printed(&again)
        );

        let idle = VmOut::from_pb(private_vm(None));
        assert!(!printed(&idle).contains("disk copy"));
        assert!(serde_json::to_value(&idle).expect("json")["clone_disk"].is_null());
    }

    #[test]
    fn an_answer_without_a_disk_mode_is_a_shared_disk() {
        // An ftd that predates private disks leaves the mode unspecified.
        let old = VmOut::from_pb(PbVm {
            spec: Some(VmSpec {
                name: "web1".into(),
                disk: "/disks/web1.img".into(),
                ..VmSpec::default()
            }),
            status: Some(VmStatus::default()),
        });
        assert_eq!((old.disk_mode, old.primary_disk_mode), ("shared", None));
        assert!(printed(&old).contains("disk:           shared, /disks/web1.img"));
        let mut mismatch = VmOut::from_pb(private_vm(None));
        mismatch.primary_disk_mode = Some("shared");
        assert!(printed(&mismatch).contains("(the primary says shared)"));
    }
}
