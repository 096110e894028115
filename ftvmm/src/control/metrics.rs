//! The `metrics` response: the Prometheus text exposition format (version 0.0.4).

use super::status::current_role;
use super::Shared;
use ftvm_contract::status::ReplicaRole;
use ftvm_pair::channel::{ChannelStats, HOLD_BUCKET_BOUNDS_US};
use std::fmt::Write as _;
use std::sync::PoisonError;

/// Appends one metric family: `# HELP`, `# TYPE` and its samples (`labels` without
/// braces, or empty).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn one(value: f64) -> [(String, f64); 1] {
    [(String::new(), value)]
}

/// The `metrics` response: the Prometheus text exposition format (version 0.0.4).
///
/// Written by hand rather than through `metrics-exporter-prometheus`: that crate renders
/// what a global recorder accumulated from increments and raw observations, while here
/// every value is an absolute figure read from a snapshot, and the output-hold histogram
/// arrives already bucketed (`HoldStats::hold_buckets`), which its histograms cannot take.
pub(super) fn text(shared: &Shared) -> String {
    let snapshot = shared.snapshot();
    let mut out = String::with_capacity(4096);
    let exits = &snapshot.exits;
    let by_kind = [
        ("pio_in", exits.pio_in),
        ("pio_out", exits.pio_out),
        ("mmio_read", exits.mmio_read),
        ("mmio_write", exits.mmio_write),
        ("hlt", exits.hlt),
        ("irq_window", exits.irq_window),
    ];
    let samples: Vec<(String, f64)> = by_kind
        .iter()
        .map(|(kind, count)| (format!("kind=\"{kind}\""), *count as f64))
        .collect();
    family(
        &mut out,
        "ftvmm_exits_total",
        "counter",
        "Guest-caused exits by kind.",
        &samples,
    );
    family(
        &mut out,
        "ftvmm_host_exits_total",
        "counter",
        "KVM_RUN returns caused by the host (not in the exit ordinal).",
        &one(exits.host_caused as f64),
    );
    family(
        &mut out,
        "ftvmm_exit_ordinal",
        "gauge",
        "Guest-caused exits since boot.",
        &one(snapshot.exit_ordinal as f64),
    );
    family(
        &mut out,
        "ftvmm_interrupts_injected_total",
        "counter",
        "Interrupt vectors injected into the guest.",
        &one(exits.injected as f64),
    );
    let memory = shared
        .memory
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Some(memory) = memory {
        let usage = ftvm_machine::memory::memory_use(&memory);
        family(
            &mut out,
            "ftvmm_resident_memory_bytes",
            "gauge",
            "Resident memory of the VMM itself and of guest RAM.",
            &[
                ("part=\"vmm\"".into(), usage.vmm_rss_bytes as f64),
                ("part=\"guest\"".into(), usage.guest_resident_bytes as f64),
            ],
        );
    }
    let role = current_role(shared);
    let samples: Vec<(String, f64)> = ReplicaRole::ALL
        .iter()
        .map(|r| {
            (
                format!("role=\"{}\"", r.as_str()),
                f64::from(u8::from(*r == role)),
            )
        })
        .collect();
    family(
        &mut out,
        "ftvmm_role",
        "gauge",
        "1 for the replica's current role (none, primary, backup, live).",
        &samples,
    );
    family(
        &mut out,
        "ftvmm_uptime_seconds",
        "gauge",
        "Time since ftvmm started.",
        &one(shared.started.elapsed().as_secs_f64()),
    );
    if let Some(channel) = &shared.view.channel_stats() {
        family(
            &mut out,
            "ftvmm_log_bytes_total",
            "counter",
            "Log channel bytes sent (primary) or received (backup).",
            &one(channel.bytes as f64),
        );
        family(
            &mut out,
            "ftvmm_log_frames_total",
            "counter",
            "Log channel frames sent (primary) or received (backup).",
            &one(channel.frames as f64),
        );
        family(
            &mut out,
            "ftvmm_log_reconnects_total",
            "counter",
            "Log connections re-established after a break (the stream resumed where it broke).",
            &one(channel.reconnects as f64),
        );
        family(
            &mut out,
            "ftvmm_peer_lost",
            "gauge",
            "1 once the other replica of the pair was declared lost.",
            &one(f64::from(u8::from(channel.lost.is_some()))),
        );
        family(
            &mut out,
            "ftvmm_peer_silence_max_seconds",
            "gauge",
            "Longest silence of the other replica on the log channel so far (the peer timeout must stay above it).",
            &one(channel.peer_silence_max_us as f64 / 1e6),
        );
        if role == ReplicaRole::Primary {
            family(
                &mut out,
                "ftvmm_backup_lag_exits",
                "gauge",
                "Guest exits between the primary and the backup's replay.",
                &one(channel.backup_lag_exits as f64),
            );
            family(
                &mut out,
                "ftvmm_backup_lag_seconds",
                "gauge",
                "How long ago the primary was where the backup's replay is now.",
                &one(channel.backup_lag_us as f64 / 1e6),
            );
            family(
                &mut out,
                "ftvmm_log_rtt_seconds",
                "gauge",
                "Smoothed log channel round trip: a batch written to its acknowledgement.",
                &one(channel.ack_rtt_us as f64 / 1e6),
            );
            family(
                &mut out,
                "ftvmm_backup_throttle_seconds_total",
                "counter",
                "Time the primary's vCPU was held back for a lagging backup.",
                &one(channel.throttled_us as f64 / 1e6),
            );
            hold_histogram(&mut out, channel);
        } else {
            family(
                &mut out,
                "ftvmm_heartbeat_misses_total",
                "counter",
                "Times the log stream from the primary was silent for more than 30 ms.",
                &one(channel.heartbeat_misses as f64),
            );
        }
    }
    let go_live = shared.view.went_live_after();
    if let Some(go_live) = go_live {
        family(
            &mut out,
            "ftvmm_go_live_seconds",
            "gauge",
            "Duration of the go-live: end of the lost primary's log to running live.",
            &one(go_live.as_secs_f64()),
        );
    }
    out
}

/// `ftvmm_output_hold_seconds`: cumulative `le` buckets from the channel's per-bucket
/// counts, `_sum` from the total hold time, `_count` the released outputs.
pub(super) fn hold_histogram(out: &mut String, channel: &ChannelStats) {
    let name = "ftvmm_output_hold_seconds";
    let hold = &channel.outputs;
    let _ = writeln!(
        out,
        "# HELP {name} Time guest outputs waited for the backup's acknowledgement."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (bound, count) in HOLD_BUCKET_BOUNDS_US.iter().zip(hold.hold_buckets.iter()) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let total: u64 = hold.hold_buckets.iter().sum();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {}", hold.hold_us_total as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {total}");
}
