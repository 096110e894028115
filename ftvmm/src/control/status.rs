//! The `status` response, as the contract's [`ReplicaStatus`]: the vCPU thread's last
//! snapshot, and the pair as its view tells it now.

use super::Shared;
use ftvm_contract::status::{PairFigures, PrimaryFigures, ReplicaRole, ReplicaStatus};
use ftvm_pair::golive::{Role, State};

/// The role now: a replica that cloned a new backup is that pair's primary; a backup that
/// went live (and has not cloned one) is live; before it joins its pair, the role it was
/// started in.
pub(super) fn current_role(shared: &Shared) -> ReplicaRole {
    match shared.view.summary() {
        Some(pair) if pair.cloned => ReplicaRole::Primary,
        Some(pair) if pair.role == Role::Backup && pair.state == State::Live => ReplicaRole::Live,
        Some(pair) if pair.role == Role::Backup => ReplicaRole::Backup,
        Some(_) => ReplicaRole::Primary,
        None => shared.identity.role,
    }
}

/// The `status` answer.
pub(super) fn report(shared: &Shared) -> ReplicaStatus {
    let snapshot = shared.snapshot();
    let role = current_role(shared);
    let pair = shared.view.summary();
    let whole = pair
        .as_ref()
        .is_some_and(|pair| pair.state == State::Paired);
    let figures = shared.view.channel_stats().map(|channel| PairFigures {
        protected: whole
            && channel.lost.is_none()
            && matches!(role, ReplicaRole::Primary | ReplicaRole::Backup),
        peer_lost: channel.lost.is_some(),
        log_bytes_total: channel.bytes,
        log_frames_total: channel.frames,
        log_reconnects: channel.reconnects,
        primary: (role == ReplicaRole::Primary).then_some(PrimaryFigures {
            log_acked_bytes: channel.acked_bytes,
            backup_exit_ordinal: channel.backup_ordinal,
            backup_lag_exits: channel.backup_lag_exits,
            backup_lag_ms: channel.backup_lag_us / 1000,
            output_held: channel.outputs.held,
            output_released: channel.outputs.released,
            output_dropped: channel.outputs.dropped,
            log_rtt_us: channel.ack_rtt_us,
            log_rtt_min_us: channel.ack_rtt_min_us,
            throttled_ms: channel.throttled_us / 1000,
        }),
        heartbeat_misses: (role != ReplicaRole::Primary).then_some(channel.heartbeat_misses),
        peer_silence_max_us: channel.peer_silence_max_us,
    });
    let go_live_ms = shared
        .view
        .went_live_after()
        .map(|took| u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
    ReplicaStatus {
        vm: shared.identity.vm.clone(),
        pid: std::process::id(),
        role,
        state: snapshot.state,
        generation: pair.map_or(shared.identity.generation, |pair| pair.generation),
        exit_ordinal: snapshot.exit_ordinal,
        uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        host_exits: snapshot.exits.host_caused,
        injected: snapshot.exits.injected,
        pair: figures,
        went_live_at: snapshot.went_live_at,
        go_live_ms,
        disk: shared.identity.disk,
        clone_disk: shared.view.clone_disk_progress(),
    }
}
