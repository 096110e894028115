//! The go-live arbiter: an atomic test-and-set that lets exactly one replica of a pair go
//! live when the other seems dead.
//!
//! A claim is scoped to the pair's **generation**: a pair rebuilt after a failover (a new
//! backup cloned from the survivor) gets generation n+1, so a stale claim of generation n
//! can never decide the new pair. A claim is never released: the generation is the
//! pair's lifetime.
//!
//! Two implementations share one test suite (`tests::suite`): `local:DIR`, a file
//! created with O_EXCL (one machine, the embedded default), and `etcd://HOST:PORT`, a
//! create-if-absent transaction on `/ft/vms/<vm>/gen/<n>/live`
//! (`etcd://HOST:PORT,HOST:PORT` for a cluster).

pub mod etcd;
pub mod local;

use std::fmt;

/// The pair a claim is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairId {
    /// The VM's name (`[a-z0-9][a-z0-9-]{0,62}`).
    pub vm: String,
    /// The VM's unique id, one life of the name (claims of another life never count).
    pub uid: Option<String>,
    /// The pair's generation.
    pub generation: u64,
}

impl PairId {
    /// This pair's number on the wire (the log and clone hellos check it).
    pub fn tag(&self) -> u64 {
        ftvm_contract::claims::pair_tag(&self.vm, self.uid.as_deref())
    }

    /// The same VM's pair of `generation`.
    pub fn with_generation(&self, generation: u64) -> PairId {
        PairId {
            generation,
            ..self.clone()
        }
    }
}

impl fmt::Display for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} generation {}", self.vm, self.generation)
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This claimant may go live (it won now, or it had won before).
    Won,
    /// Another claimant won; this one must halt without output.
    Lost {
        /// Who won.
        winner: String,
    },
}

/// The arbiter could not answer; the caller must not go live (and must retry or halt).
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The `--arbiter` value is not understood.
    #[error("'{0}' is not an arbiter (use local:DIR or etcd://HOST:PORT)")]
    BadSpec(String),
    /// The VM name or claimant is not usable in a key.
    #[error("'{0}' is not a valid VM name ([a-z0-9][a-z0-9-]{{0,62}})")]
    BadName(String),
    /// The local arbiter's directory or file failed.
    #[error("local arbiter {path}")]
    Local {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The etcd arbiter could not be reached or answered an error.
    #[error("etcd arbiter at {endpoint}: {message}")]
    Etcd {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
}

/// An atomic, per-generation test-and-set.
pub trait Arbiter: Send {
    /// Claims the right to go live for `pair` as `me`. Exactly one claimant of a pair ever
    /// gets [`Verdict::Won`]; the same claimant asking again gets `Won` again.
    fn claim(&mut self, pair: &PairId, me: &str) -> Result<Verdict, ArbiterError>;

    /// Who has won `pair`, if anyone (for status and tests).
    fn winner(&mut self, pair: &PairId) -> Result<Option<String>, ArbiterError>;
}

/// What a replica of a pair needs to go live when its peer is lost.
pub struct Failover {
    /// The arbiter to ask.
    pub arbiter: Box<dyn Arbiter>,
    /// The pair.
    pub pair: PairId,
    /// This replica's name in the claim (e.g. `backup@host-b`).
    pub me: String,
}

impl Failover {
    /// Claims, retrying an arbiter that cannot answer for up to `patience`. An error means
    /// the arbiter stayed unreachable: the caller must not go live.
    pub fn claim(&mut self, patience: std::time::Duration) -> Result<Verdict, ArbiterError> {
        let deadline = std::time::Instant::now() + patience;
        let mut failures = 0u32;
        loop {
            match self.arbiter.claim(&self.pair, &self.me) {
                Ok(verdict) => return Ok(verdict),
                Err(err) if std::time::Instant::now() >= deadline => return Err(err),
                Err(err) => {
                    // One line per outage, not one per retry.
                    if failures == 0 {
                        tracing::warn!(
                            "go-live claim for {} failed, retrying for up to {} ms: {err}",
                            self.pair,
                            patience.as_millis()
                        );
                    } else {
                        tracing::debug!("go-live claim for {} failed again: {err}", self.pair);
                    }
                    failures += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
    }
}

/// The arbiter named by an `--arbiter` value: `local:DIR` or
/// `etcd://HOST:PORT[,HOST:PORT...]` (reached with `etcd_access`).
pub fn from_spec(
    spec: &str,
    etcd_access: &ftvm_tls::EtcdAccess,
) -> Result<Box<dyn Arbiter>, ArbiterError> {
    if let Some(dir) = spec.strip_prefix("local:") {
        return Ok(Box::new(local::LocalArbiter::new(dir)?));
    }
    if let Some(endpoints) = spec.strip_prefix("etcd://") {
        return Ok(Box::new(etcd::EtcdArbiter::new(
            endpoints,
            etcd_access.clone(),
        )?));
    }
    Err(ArbiterError::BadSpec(spec.to_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The behaviour every arbiter must have; `make` gives a fresh client of one shared
    /// arbiter each time it is called.
    pub(crate) fn suite(make: &(dyn Fn() -> Box<dyn Arbiter> + Sync)) {
        let pair = PairId {
            vm: "web1".into(),
            uid: None,
            generation: 1,
        };
        let (mut a, mut b) = (make(), make());
        assert_eq!(a.winner(&pair).unwrap(), None);
        assert_eq!(a.claim(&pair, "host-a").unwrap(), Verdict::Won);
        assert_eq!(
            b.claim(&pair, "host-b").unwrap(),
            Verdict::Lost {
                winner: "host-a".into()
            }
        );
        // A winner asking again (after a restart, say) is still the winner.
        assert_eq!(make().claim(&pair, "host-a").unwrap(), Verdict::Won);
        // A VM deleted and created again under its name is another life: the claims of
        // the first life (never removed by a crashed cleanup, say) do not decide it.
        let first_life = PairId {
            vm: "again".into(),
            uid: Some("life-1".into()),
            generation: 1,
        };
        let second_life = PairId {
            uid: Some("life-2".into()),
            ..first_life.clone()
        };
        assert_eq!(a.claim(&first_life, "backup@a/1").unwrap(), Verdict::Won);
        assert_eq!(b.claim(&second_life, "backup@b/2").unwrap(), Verdict::Won);
        assert_eq!(
            a.claim(&second_life, "primary@a/3").unwrap(),
            Verdict::Lost {
                winner: "backup@b/2".into()
            }
        );
        assert_eq!(b.winner(&pair).unwrap(), Some("host-a".into()));
        // The next generation is a new question.
        let next = PairId {
            generation: 2,
            ..pair.clone()
        };
        assert_eq!(b.claim(&next, "host-b").unwrap(), Verdict::Won);
        assert_eq!(
            a.claim(&next, "host-a").unwrap(),
            Verdict::Lost {
                winner: "host-b".into()
            }
        );
        assert!(matches!(
            a.claim(
                &PairId {
                    vm: "Bad/Name".into(),
                    uid: None,
                    generation: 1
                },
                "host-a"
            ),
            Err(ArbiterError::BadName(_))
        ));

        // Racing claimants: exactly one winner, every loser names it.
        for round in 0..20u64 {
            let race = PairId {
                vm: "race".into(),
                uid: None,
                generation: 100 + round,
            };
            let verdicts: Vec<(String, Verdict)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..6)
                    .map(|i| {
                        let race = race.clone();
                        let mut arbiter = make();
                        scope.spawn(move || {
                            let me = format!("host-{i}");
                            let verdict = arbiter.claim(&race, &me).unwrap();
                            (me, verdict)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<&String> = verdicts
                .iter()
                .filter(|(_, v)| *v == Verdict::Won)
                .map(|(me, _)| me)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {verdicts:?}");
            for (_, verdict) in &verdicts {
                if let Verdict::Lost { winner } = verdict {
                    assert_eq!(winner, winners[0]);
                }
            }
        }
    }

    #[test]
    fn unknown_arbiters_are_refused() {
        assert!(matches!(
            from_spec("zookeeper://x", &ftvm_tls::EtcdAccess::default()),
            Err(ArbiterError::BadSpec(_))
        ));
    }
}
