//! What each outcome means: the exit status, and the one-line reports on stderr.

use ftvm_contract::exit;
use ftvm_contract::flags::PairRole;
use ftvm_log::LogError;
use ftvm_machine::devices::virtio::block::BlockError;
use ftvm_machine::devices::virtio::tap::TapError;
use ftvm_machine::loader::LoadError;
use ftvm_machine::outcome::ReplayStop;
use ftvm_machine::snapshot::machine::SnapshotReport;
use ftvm_machine::vm::{Vm, VmError, VmOutcome};
use ftvm_pair::channel::ChannelStats;
use ftvm_pair::setup::SetupError;
use ftvm_pair::view::PairView;
use std::process::ExitCode;

/// What a replay did, for the one-line verdicts of `replay` and of a backup.
pub fn replay_summary(vm: &Vm, started: std::time::Instant) -> String {
    let stats = vm.replay_stats();
    format!(
        "{} exits replayed, {} events applied, {} digests matched, {:.3} s",
        vm.exit_ordinal(),
        stats.events,
        stats.digests_matched,
        started.elapsed().as_secs_f64()
    )
}

/// A backup's verdict: the guest's outcome if it ended as on the primary, 73 if the
/// primary was lost (everything it sent was replayed), 71 on divergence.
pub fn report_backup(
    vm: &Vm,
    view: &PairView,
    outcome: Result<VmOutcome, VmError>,
    started: std::time::Instant,
) -> ExitCode {
    let summary = replay_summary(vm, started);
    let outcome = match outcome {
        Ok(VmOutcome::ReplayStopped(_)) if ftvm_machine::signals::stop_requested().is_some() => Ok(
            VmOutcome::Signalled(ftvm_machine::signals::stop_requested().unwrap_or(0)),
        ),
        other => other,
    };
    if let Some(ordinal) = vm.went_live_at() {
        // After go-live this replica is the VM: report like a live run.
        let how = match &outcome {
            Ok(VmOutcome::PowerOff(code)) => format!("the guest powered off with code {code}"),
            Ok(other) => format!("{other:?}"),
            Err(err) => one_line(err),
        };
        eprintln!("ftvmm backup: WENT LIVE at exit ordinal {ordinal} after the primary was lost; then {how} ({summary})");
        return match outcome {
            Ok(VmOutcome::PowerOff(code)) => ExitCode::from(code),
            Ok(VmOutcome::Crashed(_)) => ExitCode::from(exit::GUEST_CRASHED),
            Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
                ExitCode::from(exit::signalled(signal))
            }
            Ok(VmOutcome::ReplayStopped(_)) | Err(_) => ExitCode::from(exit::VMM_FAILED),
        };
    }
    match outcome {
        Ok(VmOutcome::PowerOff(code)) => {
            eprintln!("ftvmm backup: IDENTICAL: guest powered off with code {code} at the primary's exit, final state digest equal ({summary})");
            ExitCode::from(code)
        }
        Ok(VmOutcome::Crashed(report)) => {
            eprintln!("ftvmm backup: IDENTICAL: the guest crashed as on the primary: {report}, final state digest equal ({summary})");
            ExitCode::from(exit::GUEST_CRASHED)
        }
        Ok(VmOutcome::ReplayStopped(
            ReplayStop::LogEnded { .. }
            | ReplayStop::BadLog(LogError::Truncated { .. } | LogError::Io(_)),
        )) => {
            let why = view
                .channel_stats()
                .and_then(|stats| stats.lost)
                .unwrap_or_else(|| "the log stream ended".into());
            eprintln!(
                "ftvmm backup: primary lost at exit ordinal {}: everything up to there replayed ({why}; {summary})",
                vm.exit_ordinal()
            );
            ExitCode::from(exit::PRIMARY_LOST)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::LostGoLive { .. })) => {
            eprintln!("ftvmm backup: {stop} ({summary})");
            ExitCode::from(exit::LOST_GO_LIVE)
        }
        Ok(VmOutcome::ReplayStopped(stop @ ReplayStop::ArbiterUnreachable(_))) => {
            eprintln!("ftvmm backup: {stop} ({summary})");
            ExitCode::from(exit::PRIMARY_LOST)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::Diverged(divergence))) => {
            eprintln!("ftvmm backup: DIVERGED: {divergence} ({summary})");
            ExitCode::from(exit::VMM_FAILED)
        }
        Ok(VmOutcome::ReplayStopped(ReplayStop::BadLog(err))) => {
            eprintln!("ftvmm backup: the primary's log: {err} ({summary})");
            ExitCode::from(exit::BAD_IMAGE)
        }
        Ok(VmOutcome::Signalled(signal) | VmOutcome::StoppedAsRecorded(signal)) => {
            eprintln!("ftvmm backup: stopped by signal {signal} ({summary})");
            ExitCode::from(exit::signalled(signal))
        }
        Err(err) => report_vmm_error(&err),
    }
}

/// One line describing a snapshot saved or restored.
pub fn snapshot_line(what: &str, report: &SnapshotReport, took: std::time::Duration) -> String {
    let queued = report
        .interrupt_queued
        .map_or("none".to_owned(), |vector| vector.to_string());
    format!(
        "ftvmm snapshot: {what} exit_ordinal={} regs_digest={:#018x} mem_digest={:#018x} bytes={} pages={} interrupt_queued={queued} ms={:.3}",
        report.identity.exit_ordinal,
        report.identity.regs_digest,
        report.identity.mem_digest,
        report.bytes,
        report.pages,
        took.as_secs_f64() * 1000.0
    )
}

/// At a pause of the run: writes the snapshot to `path` and, with `record`, starts
/// recording the continuation there.
pub fn save_snapshot(
    vm: &mut Vm,
    path: &std::path::Path,
    record: Option<&std::path::Path>,
) -> Result<(), ExitCode> {
    let started = std::time::Instant::now();
    let file = ftvm_machine::private_file::create(path).map_err(|err| {
        eprintln!("ftvmm: cannot create snapshot {}: {err}", path.display());
        ExitCode::from(exit::NO_INPUT)
    })?;
    let mut out = std::io::BufWriter::new(file);
    let report = vm
        .save_snapshot(&mut out)
        .map_err(|err| report_vmm_error(&err))?;
    eprintln!("{}", snapshot_line("saved", &report, started.elapsed()));
    if let Some(log) = record {
        vm.start_recording(log)
            .map_err(|err| report_vmm_error(&err))?;
    }
    Ok(())
}

/// Restores the snapshot at `path` into the freshly built `vm`.
pub fn restore_snapshot(vm: &mut Vm, path: &std::path::Path) -> Result<(), ExitCode> {
    let started = std::time::Instant::now();
    let file = std::fs::File::open(path).map_err(|err| {
        eprintln!("ftvmm: cannot open snapshot {}: {err}", path.display());
        ExitCode::from(exit::NO_INPUT)
    })?;
    let mut input = std::io::BufReader::new(file);
    let report = vm.restore_snapshot(&mut input).map_err(|err| {
        eprintln!("ftvmm: {}: {}", path.display(), one_line(&err));
        ExitCode::from(match err {
            VmError::Snapshot(
                ftvm_machine::snapshot::SnapshotError::Kvm { .. }
                | ftvm_machine::snapshot::SnapshotError::Io(_),
            ) => exit::VMM_FAILED,
            _ => exit::BAD_IMAGE,
        })
    })?;
    eprintln!("{}", snapshot_line("restored", &report, started.elapsed()));
    Ok(())
}

/// An error and its causes on one line.
pub fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Prints the error and its causes on one line and picks the exit status.
pub fn report_vmm_error(err: &VmError) -> ExitCode {
    eprintln!("ftvmm: {}", one_line(err));
    let status = match err {
        VmError::Load(LoadError::Open { .. }) | VmError::Disk(BlockError::Open { .. }) => {
            exit::NO_INPUT
        }
        VmError::Disk(BlockError::Size { .. }) => exit::BAD_IMAGE,
        VmError::Tap(TapError::BadName(_)) => exit::USAGE,
        VmError::Load(_) => exit::BAD_IMAGE,
        VmError::Memory(ftvm_machine::memory::MemoryError::CmdlineTooLong { .. }) => exit::USAGE,
        _ => exit::VMM_FAILED,
    };
    ExitCode::from(status)
}

/// Prints why a replica of a pair could not start, on one line, and picks the exit
/// status: `connect_status` when the peer cannot be reached (a backup's primary: no
/// input; a clone source: the primary is lost).
pub fn report_setup_error(err: &SetupError) -> ExitCode {
    use ftvm_machine::replay::ReplaySetupError;
    use ftvm_pair::channel::ChannelError;
    use ftvm_pair::clone::CloneError;
    let status = match err {
        SetupError::Vm(err) => return report_vmm_error(err),
        SetupError::Channel(ChannelError::Listen { source, .. })
            if source.kind() == std::io::ErrorKind::InvalidInput =>
        {
            exit::USAGE
        }
        SetupError::Channel(ChannelError::Connect { .. })
        | SetupError::Replay(ReplaySetupError::Open { .. }) => exit::NO_INPUT,
        SetupError::Channel(_) => exit::VMM_FAILED,
        SetupError::Clone(CloneError::Io(_)) => exit::PRIMARY_LOST,
        SetupError::Clone(CloneError::Refused) => exit::CLONE_REFUSED,
        SetupError::AloneLost { .. } => exit::LOST_GO_LIVE,
        SetupError::AloneNoArbiter(_) => exit::PRIMARY_LOST,
        SetupError::Clone(_)
        | SetupError::Replay(_)
        | SetupError::Stream { .. }
        | SetupError::PrimaryMismatch { .. } => exit::BAD_IMAGE,
    };
    eprintln!("ftvmm: {}", one_line(err));
    ExitCode::from(status)
}

/// The `--stats` line: exit counters, memory use, and the log channel's counters.
pub fn print_stats(vm: &Vm, view: &PairView, role: Option<PairRole>) {
    let stats = vm.stats();
    let memory = vm.memory_use();
    let channel = view
        .channel_stats()
        .map(|channel| format!(" {}", channel_words(vm, &channel, role)))
        .unwrap_or_default();
    eprintln!(
        "ftvmm stats: exit_ordinal={} pio_out={} pio_in={} mmio_read={} mmio_write={} hlt={} irq_window={} halt_not_ready={} host_caused={} injected={} unhandled={} halted_ms={} vmm_rss_bytes={} guest_resident_bytes={} peak_rss_bytes={}{channel}",
        vm.exit_ordinal(),
        stats.pio_out,
        stats.pio_in,
        stats.mmio_read,
        stats.mmio_write,
        stats.hlt,
        stats.irq_window,
        stats.halt_not_ready,
        stats.host_caused,
        stats.injected,
        stats.unhandled,
        stats.halted.as_millis(),
        memory.vmm_rss_bytes,
        memory.guest_resident_bytes,
        memory.peak_rss_bytes,
    );
}

/// The log channel's counters as `key=value` words: a primary's traffic and how far the
/// backup trails (bytes and frames sent but not acknowledged, exits as of the last
/// acknowledgement), or a backup's traffic.
fn channel_words(vm: &Vm, channel: &ChannelStats, role: Option<PairRole>) -> String {
    let lost = u8::from(channel.lost.is_some());
    if role == Some(PairRole::Backup) {
        return format!(
            "role=backup log_bytes_received={} log_frames_received={} log_heartbeats_received={} log_reconnects={} heartbeat_misses={} peer_silence_max_us={} primary_lost={lost}",
            channel.bytes, channel.frames, channel.heartbeats, channel.reconnects, channel.heartbeat_misses, channel.peer_silence_max_us
        );
    }
    format!(
        "role=primary log_bytes_sent={} log_frames_sent={} log_heartbeats_sent={} log_acked={} log_acked_frames={} log_acks={} backup_lag_bytes={} backup_lag_frames={} backup_exit_ordinal={} backup_lag_exits={} backup_lost={lost} output_held={} output_released={} output_unprotected={} output_dropped={} output_hold_us_max={} output_hold_us_avg={} backup_lag_ms={} throttled_ms={} throttles={} log_reconnects={} log_rtt_us={} log_rtt_min_us={} log_stale_acks={} output_discarded={} peer_silence_max_us={}",
        channel.bytes,
        channel.frames,
        channel.heartbeats,
        channel.acked_bytes,
        channel.acked_frames,
        channel.acks,
        channel.bytes.saturating_sub(channel.acked_bytes),
        channel.frames.saturating_sub(channel.acked_frames),
        channel.backup_ordinal,
        vm.exit_ordinal().saturating_sub(channel.backup_ordinal),
        channel.outputs.held,
        channel.outputs.released,
        channel.outputs.unprotected,
        channel.outputs.dropped,
        channel.outputs.hold_us_max,
        channel
            .outputs
            .hold_us_total
            .checked_div(channel.outputs.released)
            .unwrap_or(0),
        channel.backup_lag_us / 1000,
        channel.throttled_us / 1000,
        channel.throttles,
        channel.reconnects,
        channel.ack_rtt_us,
        channel.ack_rtt_min_us,
        channel.stale_acks,
        channel.outputs.discarded,
        channel.peer_silence_max_us,
    )
}
