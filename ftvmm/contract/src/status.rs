//! The `status` line of a replica's control socket (docs/contract.md): `key=value` words on
//! one line, written by ftvmm, read by ftd. Readers ignore keys they do not know, and a
//! missing key reads as absent, so either side may be newer.

use std::collections::BTreeMap;
use std::fmt::{self, Write};

/// What a replica is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaRole {
    /// Not part of a pair (no `--role`).
    #[default]
    None,
    /// The primary of a pair (also after its backup was lost: see `protected`).
    Primary,
    /// The backup of a pair, following its primary's log.
    Backup,
    /// A backup that went live after its primary was lost: it is now the VM.
    Live,
}

impl ReplicaRole {
    /// Every role, in the order metrics list them.
    pub const ALL: [ReplicaRole; 4] = [
        ReplicaRole::None,
        ReplicaRole::Primary,
        ReplicaRole::Backup,
        ReplicaRole::Live,
    ];

    /// The name in the status line and the `role` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaRole::None => "none",
            ReplicaRole::Primary => "primary",
            ReplicaRole::Backup => "backup",
            ReplicaRole::Live => "live",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<ReplicaRole> {
        ReplicaRole::ALL
            .into_iter()
            .find(|role| role.as_str() == name)
    }
}

/// Where a replica's run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunState {
    /// Building the machine (a primary also waits here for its backup to connect).
    #[default]
    Booting,
    /// The vCPU runs the guest.
    Running,
    /// The guest waits in HLT.
    Halted,
    /// The run ended; ftvmm is closing the log channel and exiting.
    Stopping,
}

impl RunState {
    /// Every state.
    pub const ALL: [RunState; 4] = [
        RunState::Booting,
        RunState::Running,
        RunState::Halted,
        RunState::Stopping,
    ];

    /// The name in the status line.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Booting => "booting",
            RunState::Running => "running",
            RunState::Halted => "halted",
            RunState::Stopping => "stopping",
        }
    }

    /// The state named `name`.
    pub fn parse(name: &str) -> Option<RunState> {
        RunState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}

/// A replica's `status` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// `--vm`, if given.
    pub vm: Option<String>,
    /// The ftvmm process.
    pub pid: u32,
    /// Its role now.
    pub role: ReplicaRole,
    /// Where the run stands.
    pub state: RunState,
    /// The pair's generation now (one more after each backup it cloned).
    pub generation: u64,
    /// Guest-caused exits so far.
    pub exit_ordinal: u64,
    /// Milliseconds since ftvmm started.
    pub uptime_ms: u64,
    /// Returns from KVM_RUN the host caused.
    pub host_exits: u64,
    /// Interrupts injected.
    pub injected: u64,
    /// The log channel's figures, for a replica of a pair.
    pub pair: Option<PairFigures>,
    /// The exit ordinal at which a backup went live.
    pub went_live_at: Option<u64>,
    /// How long its go-live claim took.
    pub go_live_ms: Option<u64>,
    /// The disk's mode, if the machine has a disk.
    pub disk: Option<DiskMode>,
    /// A clone under way from this replica: the disk bytes copied so far and the bytes
    /// of data the disk holds (a private disk only; holes are not copied).
    pub clone_disk: Option<CloneDiskProgress>,
}

/// Whether a replica's disk is shared with its peer or its own (`--disk-private`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    /// One disk both replicas can open; the primary's writes are outputs.
    Shared,
    /// Each replica has its own copy; a clone copies it.
    Private,
}

impl DiskMode {
    /// The name in the status line.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::Shared => "shared",
            DiskMode::Private => "private",
        }
    }

    /// The mode named `name`.
    pub fn parse(name: &str) -> Option<DiskMode> {
        [DiskMode::Shared, DiskMode::Private]
            .into_iter()
            .find(|mode| mode.as_str() == name)
    }
}

/// How far the disk copy of a clone has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CloneDiskProgress {
    /// Bytes of disk data sent so far (all rounds).
    pub copied_bytes: u64,
    /// Bytes of data the first round found on the disk (holes excluded).
    pub data_bytes: u64,
}

/// The log channel as a replica of a pair sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairFigures {
    /// The other replica is there and the pair is whole (for a primary: Protected).
    pub protected: bool,
    /// The other replica was declared lost.
    pub peer_lost: bool,
    /// Log bytes sent (primary) or received (backup).
    pub log_bytes_total: u64,
    /// Log frames sent or received.
    pub log_frames_total: u64,
    /// Connections re-established after a break.
    pub log_reconnects: u64,
    /// A primary's figures about its backup.
    pub primary: Option<PrimaryFigures>,
    /// A backup's count of silences longer than a heartbeat.
    pub heartbeat_misses: Option<u64>,
    /// The longest the other replica was silent on the log channel so far (a backup:
    /// between two reads of the log; a primary: between two acknowledgements), in
    /// microseconds: what the peer timeout must stay above.
    pub peer_silence_max_us: u64,
}

/// What a primary knows of its backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrimaryFigures {
    /// Log bytes the backup acknowledged.
    pub log_acked_bytes: u64,
    /// The backup's exit ordinal as of its last acknowledgement.
    pub backup_exit_ordinal: u64,
    /// Exits between the primary's guest and the backup's replay.
    pub backup_lag_exits: u64,
    /// How long ago the primary was where the backup is, in milliseconds.
    pub backup_lag_ms: u64,
    /// Outputs held for the output rule.
    pub output_held: u64,
    /// Held outputs released.
    pub output_released: u64,
    /// Frames the TAP refused.
    pub output_dropped: u64,
    /// Smoothed log round trip, microseconds.
    pub log_rtt_us: u64,
    /// Shortest log round trip, microseconds.
    pub log_rtt_min_us: u64,
    /// Milliseconds the vCPU was held back for a lagging backup.
    pub throttled_ms: u64,
}

/// A `--vm` name made safe for a `key=value` word.
fn word(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl fmt::Display for ReplicaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = format!(
            "vm={} pid={} role={} state={} generation={} exit_ordinal={} uptime_ms={} host_exits={} injected={}",
            self.vm.as_deref().map_or_else(|| "-".to_owned(), word),
            self.pid,
            self.role.as_str(),
            self.state.as_str(),
            self.generation,
            self.exit_ordinal,
            self.uptime_ms,
            self.host_exits,
            self.injected,
        );
        if let Some(pair) = &self.pair {
            let _ = write!(
                line,
                " protected={} peer_lost={} log_bytes_total={} log_frames_total={} log_reconnects={}",
                u8::from(pair.protected),
                u8::from(pair.peer_lost),
                pair.log_bytes_total,
                pair.log_frames_total,
                pair.log_reconnects,
            );
            if let Some(p) = &pair.primary {
                let _ = write!(
                    line,
                    " log_acked_bytes={} backup_exit_ordinal={} backup_lag_exits={} backup_lag_ms={} output_held={} output_released={} output_dropped={} log_rtt_us={} log_rtt_min_us={} throttled_ms={}",
                    p.log_acked_bytes,
                    p.backup_exit_ordinal,
                    p.backup_lag_exits,
                    p.backup_lag_ms,
                    p.output_held,
                    p.output_released,
                    p.output_dropped,
                    p.log_rtt_us,
                    p.log_rtt_min_us,
                    p.throttled_ms,
                );
            }
            if let Some(misses) = pair.heartbeat_misses {
                let _ = write!(line, " heartbeat_misses={misses}");
            }
            let _ = write!(line, " peer_silence_max_us={}", pair.peer_silence_max_us);
        }
        if let Some(ordinal) = self.went_live_at {
            let _ = write!(line, " went_live_at={ordinal}");
        }
        if let Some(ms) = self.go_live_ms {
            let _ = write!(line, " go_live_ms={ms}");
        }
        if let Some(disk) = self.disk {
            let _ = write!(line, " disk={}", disk.as_str());
        }
        if let Some(progress) = self.clone_disk {
            let _ = write!(
                line,
                " clone_disk_copied_bytes={} clone_disk_data_bytes={}",
                progress.copied_bytes, progress.data_bytes
            );
        }
        f.write_str(&line)
    }
}

impl ReplicaStatus {
    /// Parses a status line; `None` unless it names a known role and state (an error
    /// answer, or another program's).
    pub fn parse(line: &str) -> Option<ReplicaStatus> {
        let words: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .collect();
        let number = |key: &str| words.get(key).and_then(|value| value.parse::<u64>().ok());
        let flag = |key: &str| number(key) == Some(1);
        let pair = number("log_bytes_total").map(|log_bytes_total| PairFigures {
            protected: flag("protected"),
            peer_lost: flag("peer_lost"),
            log_bytes_total,
            log_frames_total: number("log_frames_total").unwrap_or(0),
            log_reconnects: number("log_reconnects").unwrap_or(0),
            primary: number("log_acked_bytes").map(|log_acked_bytes| PrimaryFigures {
                log_acked_bytes,
                backup_exit_ordinal: number("backup_exit_ordinal").unwrap_or(0),
                backup_lag_exits: number("backup_lag_exits").unwrap_or(0),
                backup_lag_ms: number("backup_lag_ms").unwrap_or(0),
                output_held: number("output_held").unwrap_or(0),
                output_released: number("output_released").unwrap_or(0),
                output_dropped: number("output_dropped").unwrap_or(0),
                log_rtt_us: number("log_rtt_us").unwrap_or(0),
                log_rtt_min_us: number("log_rtt_min_us").unwrap_or(0),
                throttled_ms: number("throttled_ms").unwrap_or(0),
            }),
            heartbeat_misses: number("heartbeat_misses"),
            peer_silence_max_us: number("peer_silence_max_us").unwrap_or(0),
        });
        Some(ReplicaStatus {
            vm: words
                .get("vm")
                .filter(|vm| **vm != "-")
                .map(|vm| (*vm).to_owned()),
            pid: number("pid").and_then(|pid| u32::try_from(pid).ok())?,
            role: ReplicaRole::parse(words.get("role")?)?,
            state: RunState::parse(words.get("state")?)?,
            generation: number("generation").unwrap_or(0),
            exit_ordinal: number("exit_ordinal").unwrap_or(0),
            uptime_ms: number("uptime_ms").unwrap_or(0),
            host_exits: number("host_exits").unwrap_or(0),
            injected: number("injected").unwrap_or(0),
            pair,
            went_live_at: number("went_live_at"),
            go_live_ms: number("go_live_ms"),
            disk: words.get("disk").and_then(|mode| DiskMode::parse(mode)),
            clone_disk: number("clone_disk_copied_bytes").map(|copied_bytes| CloneDiskProgress {
                copied_bytes,
                data_bytes: number("clone_disk_data_bytes").unwrap_or(0),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_back_as_written() {
        let primary = ReplicaStatus {
            vm: Some("web1".into()),
            pid: 42,
            role: ReplicaRole::Primary,
            state: RunState::Running,
            generation: 2,
            exit_ordinal: 1234,
            uptime_ms: 99,
            host_exits: 7,
            injected: 8,
            pair: Some(PairFigures {
                protected: true,
                peer_lost: false,
                log_bytes_total: 1000,
                log_frames_total: 10,
                log_reconnects: 1,
                primary: Some(PrimaryFigures {
                    log_acked_bytes: 900,
                    backup_exit_ordinal: 1200,
                    backup_lag_exits: 34,
                    backup_lag_ms: 3,
                    output_held: 5,
                    output_released: 4,
                    output_dropped: 0,
                    log_rtt_us: 50,
                    log_rtt_min_us: 20,
                    throttled_ms: 0,
                }),
                heartbeat_misses: None,
                peer_silence_max_us: 12_345,
            }),
            went_live_at: None,
            go_live_ms: None,
            disk: Some(DiskMode::Private),
            clone_disk: Some(CloneDiskProgress {
                copied_bytes: 4096,
                data_bytes: 1 << 20,
            }),
        };
        let line = primary.to_string();
        assert_eq!(ReplicaStatus::parse(&line), Some(primary));
        let live = ReplicaStatus {
            vm: None,
            pid: 1,
            role: ReplicaRole::Live,
            state: RunState::Halted,
            went_live_at: Some(77),
            go_live_ms: Some(3),
            pair: Some(PairFigures {
                peer_lost: true,
                log_bytes_total: 5,
                heartbeat_misses: Some(2),
                ..PairFigures::default()
            }),
            ..ReplicaStatus::default()
        };
        assert_eq!(ReplicaStatus::parse(&live.to_string()), Some(live));
    }

    #[test]
    fn unknown_keys_are_ignored_and_garbage_is_refused() {
        let status =
            ReplicaStatus::parse("pid=3 role=backup state=booting future_key=1 generation=4")
                .expect("a status");
        assert_eq!(status.role, ReplicaRole::Backup);
        assert_eq!(status.generation, 4);
        assert_eq!(status.pair, None);
        assert_eq!(ReplicaStatus::parse("error: busy, try again"), None);
        assert_eq!(
            ReplicaStatus::parse("pid=3 role=captain state=running"),
            None
        );
    }
}
