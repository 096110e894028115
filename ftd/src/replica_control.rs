//! The client side of ftvmm's control socket (docs/contract.md, "Control socket"): one
//! request line, one response, each bounded in time and size so that a stuck ftvmm never
//! stalls ftd; the parsing of the `status` line; and the merging of several replicas'
//! `metrics` into one exposition with `vm` and `replica` labels.

use crate::model::{DiskMode, PairState};
use ftvm_contract::control::ControlRequest;
use ftvm_contract::status::{CloneDiskProgress, ReplicaStatus};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest response read (a `metrics` answer is a few KiB).
pub const MAX_RESPONSE: u64 = 1 << 20;

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// Connecting, writing or reading failed.
    #[error("control socket {path}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("control socket {path}: no answer within {timeout:?}")]
    Timeout {
        /// The socket.
        path: String,
        /// The limit.
        timeout: Duration,
    },
    /// ftvmm answered `error: ...`.
    #[error("control socket {path}: {message}")]
    Refused {
        /// The socket.
        path: String,
        /// ftvmm's error line.
        message: String,
    },
}

/// Sends `command` to the control socket at `path` and returns the whole answer, within
/// `timeout` for everything.
pub async fn request(
    path: &Path,
    command: ControlRequest,
    timeout: Duration,
) -> Result<String, ControlClientError> {
    let name = path.display().to_string();
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(path).await?;
        stream
            .write_all(format!("{}\n", command.as_str()).as_bytes())
            .await?;
        stream.shutdown().await?;
        let mut answer = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlClientError::Timeout {
            path: name.clone(),
            timeout,
        })?
        .map_err(|source| ControlClientError::Io {
            path: name.clone(),
            source,
        })?;
    if let Some(message) = answer.strip_prefix("error: ") {
        return Err(ControlClientError::Refused {
            path: name,
            message: message.trim_end().to_owned(),
        });
    }
    Ok(answer)
}

/// The replica's view of its pair, from its `status` line. A replica not in a pair
/// (`role=none`, a primary placed alone) and a booting primary have no channel, hence no
/// `protected=`: that is not protected.
pub fn pair_state(status: &ReplicaStatus) -> PairState {
    let pair = status.pair.as_ref();
    PairState {
        role: status.role.as_str().to_owned(),
        state: status.state.as_str().to_owned(),
        protected: pair.is_some_and(|pair| pair.protected),
        peer_lost: pair.is_some_and(|pair| pair.peer_lost),
        generation: Some(status.generation),
    }
}

/// What a VM's status shows of a running replica, from its control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// `role=` as ftvmm names it (`primary`, `backup`, `live`, `none`).
    pub role: String,
    /// How far the backup trails, in guest exits (primary only).
    pub backup_lag_exits: Option<u64>,
    /// How far the backup trails, in milliseconds (primary only).
    pub backup_lag_ms: Option<u64>,
    /// Log channel bytes sent (primary) or received (backup) so far.
    pub log_bytes_total: Option<u64>,
    /// Log channel bandwidth over the last two samples.
    pub log_bytes_per_second: Option<u64>,
    /// `disk=`: the mode of its disk (`None`: no disk, or an ftvmm that does not say).
    pub disk: Option<DiskMode>,
    /// The disk copy of a clone under way from it (`clone_disk_copied_bytes=`,
    /// `clone_disk_data_bytes=`).
    pub clone_disk: Option<CloneDiskProgress>,
}

impl LiveStats {
    /// The figures of a status line, with the bandwidth computed by the caller.
    pub fn from_status(status: &ReplicaStatus, log_bytes_per_second: Option<u64>) -> LiveStats {
        let primary = status.pair.as_ref().and_then(|pair| pair.primary.as_ref());
        LiveStats {
            role: status.role.as_str().to_owned(),
            backup_lag_exits: primary.map(|primary| primary.backup_lag_exits),
            backup_lag_ms: primary.map(|primary| primary.backup_lag_ms),
            log_bytes_total: status.pair.as_ref().map(|pair| pair.log_bytes_total),
            log_bytes_per_second,
            disk: status.disk.map(DiskMode::from),
            clone_disk: status.clone_disk,
        }
    }
}

/// Metric families in the order first seen: name, its `# HELP`/`# TYPE` lines, samples.
#[derive(Debug, Default)]
pub struct Families {
    order: Vec<String>,
    families: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

/// The family a sample line belongs to: its name without a histogram or summary suffix
/// when the family was declared under the shorter name.
fn family_of<'a>(
    name: &'a str,
    declared: &BTreeMap<String, (Vec<String>, Vec<String>)>,
) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if declared.contains_key(base) {
                return base;
            }
        }
    }
    name
}

/// `labels` (`a="b",...` or empty) inserted first into the sample line `line`.
fn with_labels(line: &str, labels: &str) -> Option<String> {
    let (series, value) = line.rsplit_once(' ')?;
    Some(match series.split_once('{') {
        Some((name, "}")) => format!("{name}{{{labels}}} {value}"),
        Some((name, rest)) => format!("{name}{{{labels},{rest} {value}"),
        None => format!("{series}{{{labels}}} {value}"),
    })
}

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Families {
    /// Adds the samples of one exposition (`text`), each given `labels` (`name=value`
    /// pairs) in front of its own. Families from several texts merge: one `# HELP` and
    /// `# TYPE` each, as the format requires.
    pub fn add(&mut self, text: &str, labels: &[(&str, &str)]) {
        let labels = labels
            .iter()
            .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
            .collect::<Vec<_>>()
            .join(",");
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                let (Some(kind @ ("HELP" | "TYPE")), Some(name)) = (words.next(), words.next())
                else {
                    continue;
                };
                let family = self.entry(name);
                if !family
                    .0
                    .iter()
                    .any(|seen| seen.starts_with(&format!("# {kind} ")))
                {
                    family.0.push(line.to_owned());
                }
                continue;
            }
            let Some(name) = line.split(['{', ' ']).next() else {
                continue;
            };
            let family = family_of(name, &self.families).to_owned();
            if let Some(sample) = with_labels(line, &labels) {
                self.entry(&family).1.push(sample);
            }
        }
    }

    fn entry(&mut self, name: &str) -> &mut (Vec<String>, Vec<String>) {
        if !self.families.contains_key(name) {
            self.order.push(name.to_owned());
        }
        self.families.entry(name.to_owned()).or_default()
    }

    /// The merged exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for name in &self.order {
            if let Some((comments, samples)) = self.families.get(name) {
                for line in comments.iter().chain(samples) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_two_replicas_merge_under_one_type_line_with_labels() {
        let text = "# HELP ftvmm_exit_ordinal Exits.\n# TYPE ftvmm_exit_ordinal gauge\nftvmm_exit_ordinal 5\n\
                    # HELP h Hold.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
        let mut families = Families::default();
        families.add(text, &[("vm", "web1"), ("role", "primary")]);
        families.add(text, &[("vm", "db\"2"), ("role", "backup")]);
        let merged = families.render();
        assert_eq!(merged.matches("# TYPE ftvmm_exit_ordinal gauge").count(), 1);
        assert!(merged.contains("ftvmm_exit_ordinal{vm=\"web1\",role=\"primary\"} 5\n"));
        assert!(merged.contains("ftvmm_exit_ordinal{vm=\"db\\\"2\",role=\"backup\"} 5\n"));
        assert!(merged.contains("h_bucket{vm=\"web1\",role=\"primary\",le=\"0.1\"} 1\n"));
        // Histogram series stay in their family, after its single TYPE line.
        let type_at = merged.find("# TYPE h histogram").unwrap_or(usize::MAX);
        let last_sample = merged.rfind("h_count{").unwrap_or(0);
        assert!(type_at < last_sample);
        assert_eq!(merged.matches("# TYPE h ").count(), 1);
    }

    fn parsed(line: &str) -> ReplicaStatus {
        ReplicaStatus::parse(line).expect("a status line")
    }

    #[test]
    fn a_status_line_gives_the_pair_state() {
        let alone = pair_state(&parsed("pid=1 role=none state=running generation=1"));
        assert!(alone.runs_alone() && alone.generation == Some(1));
        let pair = pair_state(&parsed("pid=1 role=primary state=booting"));
        assert!(!pair.protected && !pair.peer_lost && pair.state == "booting");
        assert!(
            !pair.runs_alone(),
            "a booting primary has not started its guest"
        );
        let protected = pair_state(&parsed(
            "pid=1 role=primary state=running protected=1 peer_lost=0 log_bytes_total=5",
        ));
        assert!(protected.protected && !protected.runs_alone());
        let stats = LiveStats::from_status(
            &parsed("pid=1 role=primary state=running protected=1 log_bytes_total=5 log_acked_bytes=4 backup_lag_exits=12 backup_lag_ms=3"),
            Some(7),
        );
        assert_eq!(stats.backup_lag_exits, Some(12));
        assert_eq!(stats.log_bytes_total, Some(5));
        assert_eq!(
            (stats.disk, stats.clone_disk),
            (None, None),
            "no disk words"
        );
    }

    #[test]
    fn the_disk_mode_and_a_clones_disk_copy_come_from_the_status_line() {
        let copying = LiveStats::from_status(
            &parsed("pid=1 role=primary state=running generation=2 disk=private clone_disk_copied_bytes=1048576 clone_disk_data_bytes=8388608"),
            None,
        );
        assert_eq!(copying.disk, Some(DiskMode::Private));
        assert_eq!(
            copying.clone_disk,
            Some(CloneDiskProgress {
                copied_bytes: 1 << 20,
                data_bytes: 8 << 20
            })
        );
        let shared = LiveStats::from_status(
            &parsed("pid=1 role=primary state=running disk=shared"),
            None,
        );
        assert_eq!(
            (shared.disk, shared.clone_disk),
            (Some(DiskMode::Shared), None)
        );
    }
}
