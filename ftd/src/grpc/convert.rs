//! Conversions between the generated `ft.v1` types and the domain types.

use crate::cluster::{HostView, ReplicaView, VmView};
use crate::model::{DiskMode, Event, ModelError, Protection, Role, VmRequest};
use crate::replica_control::LiveStats;
use ftvm_contract::status::CloneDiskProgress;
use ftvm_proto::v1::{
    CloneDiskProgress as PbCloneDiskProgress, DiskMode as PbDiskMode, Event as PbEvent,
    Failover as PbFailover, Host as PbHost, NetSpec as PbNetSpec, Protection as PbProtection,
    Replica as PbReplica, ReplicaStatsResponse as PbReplicaStatsResponse, Role as PbRole,
    Vm as PbVm, VmSpec as PbVmSpec, VmStatus as PbVmStatus,
};

/// A create request's spec as an unvalidated domain request.
pub fn vm_request(spec: Option<PbVmSpec>) -> Result<VmRequest, ModelError> {
    let spec = spec.ok_or(ModelError::Missing("spec"))?;
    Ok(VmRequest {
        name: spec.name,
        image: spec.image,
        image_sha256: spec.image_sha256,
        mem_bytes: spec.mem_bytes,
        cmdline: spec.cmdline,
        disk: spec.disk,
        // Unspecified is what a client that predates private disks sends: shared.
        disk_mode: match PbDiskMode::try_from(spec.disk_mode) {
            Ok(PbDiskMode::Unspecified | PbDiskMode::Shared) => DiskMode::Shared,
            Ok(PbDiskMode::Private) => DiskMode::Private,
            Err(_) => return Err(ModelError::DiskMode(spec.disk_mode.to_string())),
        },
        disk_size_bytes: spec.disk_size_bytes,
        disk_image: spec.disk_image,
        net: spec.net.map(|net| (net.tap, net.mac, net.ip)),
        hosts: spec.hosts,
    })
}

fn pb_disk_mode(mode: DiskMode) -> PbDiskMode {
    match mode {
        DiskMode::Shared => PbDiskMode::Shared,
        DiskMode::Private => PbDiskMode::Private,
    }
}

/// A disk mode from the wire: `None` for unspecified or a value this version does not
/// know (a report, not a request: nothing to refuse).
fn disk_mode(value: i32) -> Option<DiskMode> {
    match PbDiskMode::try_from(value) {
        Ok(PbDiskMode::Shared) => Some(DiskMode::Shared),
        Ok(PbDiskMode::Private) => Some(DiskMode::Private),
        Ok(PbDiskMode::Unspecified) | Err(_) => None,
    }
}

fn pb_clone_disk(progress: CloneDiskProgress) -> PbCloneDiskProgress {
    PbCloneDiskProgress {
        copied_bytes: progress.copied_bytes,
        data_bytes: progress.data_bytes,
    }
}

/// What a replica says on its control socket, for the agent's answer.
pub fn replica_stats(stats: LiveStats) -> PbReplicaStatsResponse {
    PbReplicaStatsResponse {
        role: stats.role,
        backup_lag_exits: stats.backup_lag_exits,
        backup_lag_ms: stats.backup_lag_ms,
        log_bytes_total: stats.log_bytes_total,
        log_bytes_per_second: stats.log_bytes_per_second,
        disk_mode: stats
            .disk
            .map_or(PbDiskMode::Unspecified, pb_disk_mode)
            .into(),
        clone_disk: stats.clone_disk.map(pb_clone_disk),
    }
}

/// The agent's answer as live figures; `None` when the replica did not answer lately
/// (an empty role).
pub fn live_stats(stats: PbReplicaStatsResponse) -> Option<LiveStats> {
    (!stats.role.is_empty()).then(|| LiveStats {
        disk: disk_mode(stats.disk_mode),
        clone_disk: stats.clone_disk.map(|progress| CloneDiskProgress {
            copied_bytes: progress.copied_bytes,
            data_bytes: progress.data_bytes,
        }),
        role: stats.role,
        backup_lag_exits: stats.backup_lag_exits,
        backup_lag_ms: stats.backup_lag_ms,
        log_bytes_total: stats.log_bytes_total,
        log_bytes_per_second: stats.log_bytes_per_second,
    })
}

/// A role from the wire.
pub fn role(value: i32) -> Result<Role, ModelError> {
    match PbRole::try_from(value) {
        Ok(PbRole::Primary) => Ok(Role::Primary),
        Ok(PbRole::Backup) => Ok(Role::Backup),
        _ => Err(ModelError::Role(value.to_string())),
    }
}

fn pb_role(role: Role) -> PbRole {
    match role {
        Role::Primary => PbRole::Primary,
        Role::Backup => PbRole::Backup,
    }
}

fn pb_protection(protection: Protection) -> PbProtection {
    match protection {
        Protection::Protected => PbProtection::Protected,
        Protection::NotProtected => PbProtection::NotProtected,
        Protection::Down => PbProtection::Down,
    }
}

fn replica(replica: &ReplicaView) -> PbReplica {
    PbReplica {
        role: pb_role(replica.role).into(),
        host: replica.host.to_string(),
        generation: replica.generation,
        state: replica.state.to_owned(),
        pid: replica.pid,
        exit: replica.exit.clone().unwrap_or_default(),
        id: replica.id,
        cloned: replica.cloned,
    }
}

/// A VM for the wire.
pub fn vm(view: &VmView) -> PbVm {
    let spec = &view.spec;
    let status = match &view.status {
        Some(status) => PbVmStatus {
            protection: pb_protection(status.protection).into(),
            reason: status.reason.clone(),
            replicas: view.replicas.iter().map(replica).collect(),
            planned_backup_host: status
                .planned_backup_host
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            backup_lag_exits: view.live.as_ref().and_then(|live| live.backup_lag_exits),
            log_bytes_per_second: view
                .live
                .as_ref()
                .and_then(|live| live.log_bytes_per_second),
            backup_lag_ms: view.live.as_ref().and_then(|live| live.backup_lag_ms),
            log_bytes_total: view.live.as_ref().and_then(|live| live.log_bytes_total),
            last_failover: status.last_failover.as_ref().map(|failover| PbFailover {
                unix_ms: failover.unix_ms,
                from_host: failover.from_host.to_string(),
                to_host: failover
                    .to_host
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                reason: failover.reason.clone(),
            }),
            updated_unix_ms: status.updated_unix_ms,
            failovers: status.failovers,
            primary_disk_mode: view
                .live
                .as_ref()
                .and_then(|live| live.disk)
                .map_or(PbDiskMode::Unspecified, pb_disk_mode)
                .into(),
            clone_disk: view
                .live
                .as_ref()
                .and_then(|live| live.clone_disk)
                .map(pb_clone_disk),
        },
        None => PbVmStatus {
            protection: PbProtection::Down.into(),
            reason: "waiting for the leader to place it".to_owned(),
            replicas: view.replicas.iter().map(replica).collect(),
            ..PbVmStatus::default()
        },
    };
    PbVm {
        spec: Some(PbVmSpec {
            name: spec.name.to_string(),
            image: spec.image.clone(),
            mem_bytes: spec.mem_bytes,
            cmdline: spec.cmdline.clone(),
            disk: spec.disk.clone().unwrap_or_default(),
            net: spec.net.as_ref().map(|net| PbNetSpec {
                tap: net.tap.clone(),
                mac: net.mac.clone(),
                ip: net.ip.clone().unwrap_or_default(),
            }),
            hosts: spec.hosts.iter().map(ToString::to_string).collect(),
            image_sha256: spec.image_sha256.clone().unwrap_or_default(),
            disk_mode: pb_disk_mode(spec.disk_mode).into(),
            disk_size_bytes: spec.disk_size_bytes.unwrap_or(0),
            disk_image: spec.disk_image.clone().unwrap_or_default(),
        }),
        status: Some(status),
    }
}

/// A host for the wire.
pub fn host(view: &HostView) -> PbHost {
    PbHost {
        name: view.record.name.to_string(),
        grpc_address: view.record.grpc_address.clone(),
        metrics_address: view.record.metrics_address.clone(),
        leader: view.leader,
        replicas: view.replicas,
        version: view.record.version.clone(),
        backup_capable: view.record.backup_capable,
        drained: view.drained,
        warnings: view.warnings.clone(),
        cpu: view.record.cpu.clone().unwrap_or_default(),
        bridge: view.record.bridge.clone().unwrap_or_default(),
    }
}

/// An event for the wire.
pub fn event(event: &Event) -> PbEvent {
    PbEvent {
        seq: event.seq,
        unix_ms: event.unix_ms,
        vm: event
            .vm
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        kind: event.kind.clone(),
        message: event.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostName, VmName, VmSpec, VmStatus};

    fn private_spec() -> VmSpec {
        VmSpec::validate(&VmRequest {
            name: "web1".into(),
            image: "/img/kv.elf".into(),
            mem_bytes: 128 << 20,
            disk_mode: DiskMode::Private,
            disk_size_bytes: 64 << 20,
            ..VmRequest::default()
        })
        .expect("a valid spec")
    }

    #[test]
    fn a_create_request_carries_the_disk_mode_and_an_unknown_one_is_refused() {
        let pb = |disk_mode: i32| PbVmSpec {
            name: "web1".into(),
            disk_mode,
            disk_size_bytes: 64 << 20,
            ..PbVmSpec::default()
        };
        let request = vm_request(Some(pb(PbDiskMode::Private.into()))).expect("private");
        assert_eq!(
            (request.disk_mode, request.disk_size_bytes),
            (DiskMode::Private, 64 << 20)
        );
        for shared in [PbDiskMode::Unspecified, PbDiskMode::Shared] {
            let request = vm_request(Some(pb(shared.into()))).expect("shared");
            assert_eq!(request.disk_mode, DiskMode::Shared, "{shared:?}");
        }
        assert_eq!(
            vm_request(Some(pb(7))).map(|_| ()),
            Err(ModelError::DiskMode("7".into()))
        );
    }

    /// A primary's status line on another host reaches the VM's status: its host's ftd
    /// answers ReplicaStats with it, the ftd asked puts it in GetVm's answer.
    #[test]
    fn the_primarys_disk_mode_and_clone_copy_travel_to_the_vm_status() {
        let line = "pid=9 role=primary state=running generation=2 disk=private \
                    clone_disk_copied_bytes=4096 clone_disk_data_bytes=65536";
        let status = ftvm_contract::status::ReplicaStatus::parse(line).expect("a status line");
        let sampled = LiveStats::from_status(&status, None);
        let over_the_wire = live_stats(replica_stats(sampled.clone())).expect("answered");
        assert_eq!(over_the_wire, sampled);
        let view = VmView {
            spec: private_spec(),
            status: Some(VmStatus {
                uid: String::new(),
                protection: Protection::NotProtected,
                reason: "backup cloning".into(),
                planned_backup_host: Some(HostName::new("c").expect("a host name")),
                primary_running: true,
                last_failover: None,
                failovers: 0,
                last_replica: 3,
                updated_unix_ms: 0,
            }),
            replicas: Vec::new(),
            live: Some(over_the_wire),
        };
        let pb = vm(&view);
        let spec = pb.spec.expect("a spec");
        assert_eq!(
            (spec.disk_mode, spec.disk_size_bytes, spec.disk.as_str()),
            (PbDiskMode::Private.into(), 64 << 20, "")
        );
        let status = pb.status.expect("a status");
        assert_eq!(status.primary_disk_mode, i32::from(PbDiskMode::Private));
        assert_eq!(
            status.clone_disk,
            Some(PbCloneDiskProgress {
                copied_bytes: 4096,
                data_bytes: 65536
            })
        );
        // A primary that does not answer: nothing is known.
        let unknown = vm(&VmView { live: None, ..view });
        let status = unknown.status.expect("a status");
        assert_eq!(
            (status.primary_disk_mode, status.clone_disk),
            (i32::from(PbDiskMode::Unspecified), None)
        );
        assert_eq!(
            unknown.spec.map(|spec| spec.name),
            Some(VmName::new("web1").expect("a name").to_string())
        );
        // A replica that has not answered lately: no figures at all.
        assert_eq!(live_stats(PbReplicaStatsResponse::default()), None);
    }
}
