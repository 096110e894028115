//! What the replicas say on their control sockets. Each supervisor pass samples the
//! `status` of the running replicas (the last two samples give the log bandwidth), and
//! `/metrics` asks them for their `metrics` when it is scraped. Both are bounded by
//! [`CONTROL_TIMEOUT`]: a stuck ftvmm only leaves its figures out. The socket path follows
//! from the VM and replica number, so a re-adopted replica answers there as well.

use super::{ReplicaKey, Supervisor, CONTROL_TIMEOUT};
use crate::model::{PairState, Role, VmName};
use crate::replica_control::{self, Families, LiveStats};
use ftvm_contract::control::ControlRequest;
use ftvm_contract::status::ReplicaStatus;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A status sample older than this is not shown (the replica stopped answering).
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(5);
/// Status samples are taken at most this often per replica.
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// The last two `status` samples of a replica: (when, the line), and the role it was
/// assigned when sampled.
#[derive(Debug)]
pub(super) struct Samples {
    role: Role,
    previous: Option<(Instant, ReplicaStatus)>,
    last: Option<(Instant, ReplicaStatus)>,
}

impl Supervisor {
    /// Asks every running replica for its `status` (concurrently, each within
    /// [`CONTROL_TIMEOUT`]) and keeps the last two answers.
    pub async fn sample_controls(&self) {
        let running = self.running().await;
        // Samples less than half a second apart would make a noisy bandwidth; a replica
        // not protected, or given another role since its last answer (a backup made
        // primary), is asked anyway, so that a change (a backup connecting, a clone made,
        // a backup gone live) shows without delay.
        let fresh: Vec<ReplicaKey> = {
            let unpaired = self.unpaired_now();
            let samples = self
                .samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            running
                .iter()
                .filter(|(key, role)| {
                    !unpaired.contains(key)
                        && samples.get(key).is_some_and(|entry| {
                            entry.role == *role
                                && entry.last.as_ref().is_some_and(|(at, line)| {
                                    at.elapsed() < MIN_SAMPLE_INTERVAL && !unprotected(line)
                                })
                        })
                })
                .map(|(key, _)| key.clone())
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for (key, role) in running.iter().filter(|(key, _)| !fresh.contains(key)) {
            let path = self.control_path(&key.0, key.1);
            let (key, role) = (key.clone(), *role);
            asks.spawn(async move {
                let answer =
                    replica_control::request(&path, ControlRequest::Status, CONTROL_TIMEOUT).await;
                (key, role, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok(answer)) = asks.join_next().await {
            answers.push(answer);
        }
        let now = Instant::now();
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.retain(|key, _| running.iter().any(|(running, _)| running == key));
        for (key, role, answer) in answers {
            match answer {
                Ok(line) => {
                    let Some(status) = ReplicaStatus::parse(&line) else {
                        tracing::debug!(vm = %key.0, replica = key.1, "not a status line: {}", line.trim());
                        continue;
                    };
                    let entry = samples.entry(key).or_insert(Samples {
                        role,
                        previous: None,
                        last: None,
                    });
                    entry.role = role;
                    entry.previous = entry.last.take();
                    entry.last = Some((now, status));
                }
                Err(err) => {
                    tracing::debug!(vm = %key.0, replica = key.1, error = %err, "no status")
                }
            }
        }
    }

    /// Whether a running replica has not said yet how its pair is (no answer yet, or
    /// none since it was given another role), or is not protected (a pair connecting, a
    /// replica alone waiting for its new backup): the supervisor loop then comes back
    /// sooner.
    pub async fn settling(&self) -> bool {
        let running = self.running().await;
        let unpaired = self.unpaired_now();
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        running.iter().any(|(key, role)| {
            unpaired.contains(key)
                || samples.get(key).is_none_or(|entry| {
                    entry.role != *role
                        || entry
                            .last
                            .as_ref()
                            .is_none_or(|(_, line)| unprotected(line))
                })
        })
    }

    fn unpaired_now(&self) -> BTreeSet<ReplicaKey> {
        self.unpaired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The pair state the last fresh sample of a replica shows (`None`: not a pair, or
    /// its control socket has not answered lately; a stale "protected" must not count).
    pub(super) fn pair_state(&self, key: &ReplicaKey) -> Option<PairState> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, line) = samples.get(key)?.last.as_ref()?;
        (at.elapsed() <= SAMPLE_MAX_AGE).then(|| replica_control::pair_state(line))
    }

    /// What the last samples say about the replica of `vm` assigned `role` here (`None`
    /// if none runs here or its control socket has not answered lately).
    pub fn live_stats(&self, vm: &VmName, role: Role) -> Option<LiveStats> {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = samples
            .iter()
            .filter(|((sampled, _), entry)| sampled == vm && entry.role == role)
            .map(|(_, entry)| entry)
            .max_by_key(|entry| entry.last.as_ref().map(|(at, _)| *at))?;
        let (at, last) = entry.last.as_ref()?;
        if at.elapsed() > SAMPLE_MAX_AGE {
            return None;
        }
        let rate = entry.previous.as_ref().and_then(|(before, previous)| {
            let seconds = at.duration_since(*before).as_secs_f64();
            let total =
                |status: &ReplicaStatus| status.pair.as_ref().map(|pair| pair.log_bytes_total);
            let bytes = total(last)?.checked_sub(total(previous)?)?;
            (seconds > 0.0).then(|| (bytes as f64 / seconds).round() as u64)
        });
        Some(LiveStats::from_status(last, rate))
    }

    /// The `metrics` of every running replica, merged, with `vm` and `replica` labels
    /// (each replica within [`CONTROL_TIMEOUT`]; one that does not answer is left out).
    /// The label is `replica` (primary or backup, the assignment) because ftvmm's own
    /// `ftvmm_role` already has a `role` label (the current role, e.g. `live`).
    pub async fn replica_metrics(&self) -> String {
        let mut asks = tokio::task::JoinSet::new();
        for (key, role) in self.running().await {
            let path = self.control_path(&key.0, key.1);
            asks.spawn(async move {
                let answer =
                    replica_control::request(&path, ControlRequest::Metrics, CONTROL_TIMEOUT).await;
                ((key.0, role), answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok(answer)) = asks.join_next().await {
            answers.push(answer);
        }
        // Stable order: by VM, then role.
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut families = Families::default();
        for ((vm, role), answer) in answers {
            match answer {
                Ok(text) => families.add(&text, &[("vm", vm.as_str()), ("replica", role.as_str())]),
                Err(err) => tracing::debug!(vm = %vm, %role, error = %err, "no metrics"),
            }
        }
        families.render()
    }
}

/// Whether a status line is of a replica whose protection may come any moment: not
/// protected (a primary waiting for its backup or alone until a clone is made, a backup
/// connecting or being cloned). A backup that lost its primary is not waiting for
/// anything.
fn unprotected(status: &ReplicaStatus) -> bool {
    let pair = replica_control::pair_state(status);
    !(pair.protected || pair.role == "backup" && pair.peer_lost)
}
