//! Conversions between the generated `ft.v1` types and the domain types.

use crate::cluster::{HostView, ReplicaView, VmView};
use crate::model::{Event, ModelError, Protection, Role, VmRequest};
use ftvm_proto::v1::{
    Event as PbEvent, Failover as PbFailover, Host as PbHost, NetSpec as PbNetSpec,
    Protection as PbProtection, Replica as PbReplica, Role as PbRole, Vm as PbVm,
    VmSpec as PbVmSpec, VmStatus as PbVmStatus,
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
        net: spec.net.map(|net| (net.tap, net.mac, net.ip)),
        hosts: spec.hosts,
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
