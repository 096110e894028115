//! Go-live: the one owner of the decision that makes a replica the VM when its peer is
//! lost, and of what a replica of a pair may do with its held output meanwhile.
//!
//! Every replica of a pair has one [`GoLive`]. Peer loss (a primary's backup gone, a
//! backup's log ending without an end frame), the arbiter's answer, `stop` and
//! `stop-backup` are events to it; [`next`] is the whole transition table, a pure
//! function, and every thread that has something to say goes through it. Whoever turns
//! `Paired` into `Claiming` asks the arbiter (outside the lock) and delivers the answer;
//! everyone else waits for that answer or acts on the state it left.
//!
//! | state \ event | PeerLost | Won | LostTo(w) | Unreachable | Stop | StopBackup |
//! |---|---|---|---|---|---|---|
//! | Paired | Claiming, **claim** | - | - | - | Stopping, stop | backup: Stopping, stop; primary: refuse |
//! | Claiming{p} | - (one claim) | Live, **release** | Halted, discard | backup, or a stop pending, or no retry: Halted, discard; else **claim** again | p := Stop (decided by the verdict) | backup: p := p or StopBackup (answered by the verdict); primary: refuse |
//! | Live | - | - | - | - | stop | refuse: it is the VM now |
//! | Halted | - | - | - | - | stop | stop |
//! | Stopping | - (never claims) | - | - | - | stop | stop |
//!
//! (`-`: the state stays, nothing to do.) What the states allow:
//! - **Paired**: held output is released only as the backup acknowledges it (the output
//!   rule); a backup follows its primary's log.
//! - **Claiming**: nothing held is released, whatever arrives; a stop waits for the
//!   verdict (a stop-backup that arrives while the backup claims is refused if it won).
//! - **Live** (a won verdict): a primary releases everything held and runs on alone; a
//!   backup goes live. This is the only state that releases output without an
//!   acknowledgement.
//! - **Halted** (lost, or the arbiter could not be asked): held output is discarded and
//!   the replica halts without ever emitting more.
//! - **Stopping**: stopped on request while paired; it never claims (a backup whose log
//!   ends because it is stopping does not go live), and a primary still releases what its
//!   backup acknowledges.

use crate::arbiter::{Failover, PairId, Verdict};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a replica keeps asking an arbiter that does not answer before the claim
/// counts as unreachable (a backup then halts instead of going live).
pub const CLAIM_PATIENCE: Duration = Duration::from_secs(5);

/// Which replica of the pair this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the guest live and streams its log; holds output for the output rule.
    Primary,
    /// Follows the primary's log; emits nothing until it goes live.
    Backup,
}

/// A request from outside the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Stop the replica (SIGTERM, the control socket's `stop`, the end of the run).
    Stop,
    /// Stop a backup that still follows its primary (the control plane replaces it).
    StopBackup,
}

/// Why a replica halts without output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// Another replica won the claim.
    LostTo(String),
    /// The arbiter could not be asked.
    Unreachable(String),
}

/// Where a replica's go-live stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// In a pair with its peer.
    Paired,
    /// The peer was lost and the arbiter is being asked; `pending` is a request that
    /// arrived meanwhile (decided by the verdict); `retry`: ask again while unreachable.
    Claiming {
        /// A request waiting for the verdict.
        pending: Option<Request>,
        /// Whether an unreachable arbiter is asked again (a primary holding output).
        retry: bool,
    },
    /// Won: this replica is the VM.
    Live,
    /// Must never emit output again.
    Halted(Halt),
    /// Stopped on request while paired; never claims.
    Stopping,
}

/// Something that happened to the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer is gone. `retry`: if the arbiter cannot be reached, keep asking (a primary
    /// whose held output waits for the answer) rather than halting.
    PeerLost {
        /// Ask again while the arbiter is unreachable.
        retry: bool,
    },
    /// The arbiter's answer to the claim.
    Verdict(Answer),
    /// A request from outside.
    Request(Request),
}

/// The arbiter's answer, or that it gave none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This replica won.
    Won,
    /// Another replica won.
    LostTo(String),
    /// The arbiter could not be asked.
    Unreachable(String),
}

/// What the one who delivered an event must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    Nothing,
    /// Ask the arbiter and deliver its answer.
    Claim,
    /// The claim was won: a primary releases what it holds, a backup goes live.
    Release,
    /// The replica halts: held output is discarded.
    Discard,
    /// The request is obeyed: the run stops.
    Stop,
    /// The request is refused, for this reason.
    Refuse(&'static str),
    /// The request waits for the verdict.
    Wait,
}

/// The transition table (module doc): the state after `event` in `state`, and what the
/// deliverer must do. Pure.
pub fn next(role: Role, state: &State, event: &Event) -> (State, Effect) {
    use Effect::*;
    match (state, event) {
        (State::Paired, Event::PeerLost { retry }) => (
            State::Claiming {
                pending: None,
                retry: *retry,
            },
            Claim,
        ),
        (State::Paired, Event::Request(Request::Stop)) => (State::Stopping, Stop),
        (State::Paired, Event::Request(Request::StopBackup)) => match role {
            Role::Backup => (State::Stopping, Stop),
            Role::Primary => (state.clone(), Refuse(NOT_A_BACKUP)),
        },
        (State::Claiming { pending, retry }, event) => match event {
            Event::PeerLost { .. } => (state.clone(), Nothing),
            Event::Request(Request::Stop) => (
                State::Claiming {
                    pending: Some(Request::Stop),
                    retry: *retry,
                },
                Wait,
            ),
            Event::Request(Request::StopBackup) => match role {
                Role::Backup => (
                    State::Claiming {
                        pending: Some(pending.unwrap_or(Request::StopBackup)),
                        retry: *retry,
                    },
                    Wait,
                ),
                Role::Primary => (state.clone(), Refuse(NOT_A_BACKUP)),
            },
            Event::Verdict(Answer::Won) => (State::Live, Release),
            Event::Verdict(Answer::LostTo(winner)) => {
                (State::Halted(Halt::LostTo(winner.clone())), Discard)
            }
            Event::Verdict(Answer::Unreachable(why)) => {
                if role == Role::Primary && *retry && pending.is_none() {
                    (state.clone(), Claim)
                } else {
                    (State::Halted(Halt::Unreachable(why.clone())), Discard)
                }
            }
        },
        (State::Live, Event::Request(Request::Stop)) => (State::Live, Stop),
        (State::Live, Event::Request(Request::StopBackup)) => (State::Live, Refuse(WENT_LIVE)),
        (State::Halted(_) | State::Stopping, Event::Request(_)) => (state.clone(), Stop),
        // Verdicts nobody asked for, losses after the decision, a stopping replica's
        // loss: nothing changes.
        (State::Paired, Event::Verdict(_))
        | (State::Live | State::Halted(_) | State::Stopping, _) => (state.clone(), Nothing),
    }
}

const NOT_A_BACKUP: &str = "this replica is not a following backup";
const WENT_LIVE: &str = "this replica went live: it is the VM now";

impl State {
    /// Whether held output may be released as the backup acknowledges it: while paired,
    /// and while a primary stops (its backup still has every acknowledged frame). Never
    /// while a claim is open or after a loss.
    pub fn releases_on_ack(&self) -> bool {
        matches!(self, State::Paired | State::Stopping)
    }

    /// The name in messages and the control socket.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Paired => "paired",
            State::Claiming { .. } => "claiming",
            State::Live => "live",
            State::Halted(_) => "halted",
            State::Stopping => "stopping",
        }
    }
}

struct Inner {
    state: State,
    /// The arbiter; taken by the thread that claims, put back after.
    failover: Option<Failover>,
    /// How long the claim took, once it was won.
    claim_took: Option<Duration>,
}

/// A replica's go-live, shared by every thread of the pair (see the module doc).
pub struct GoLive {
    role: Role,
    pair: PairId,
    me: String,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl std::fmt::Debug for GoLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoLive")
            .field("role", &self.role)
            .field("pair", &self.pair)
            .field("state", &self.state())
            .finish()
    }
}

impl GoLive {
    /// The go-live of `role` in the pair `failover` claims for, paired.
    pub fn new(role: Role, failover: Failover) -> GoLive {
        GoLive {
            role,
            pair: failover.pair.clone(),
            me: failover.me.clone(),
            inner: Mutex::new(Inner {
                state: State::Paired,
                failover: Some(failover),
                claim_took: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pair this replica belongs to.
    pub fn pair(&self) -> &PairId {
        &self.pair
    }

    /// This replica's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The state now.
    pub fn state(&self) -> State {
        self.lock().state.clone()
    }

    /// How long the won claim took (from the loss to the verdict), once won.
    pub fn claim_took(&self) -> Option<Duration> {
        self.lock().claim_took
    }

    /// Applies `event` under the lock; the effect for the caller.
    fn deliver(&self, inner: &mut Inner, event: &Event) -> Effect {
        let (state, effect) = next(self.role, &inner.state, event);
        if state != inner.state {
            tracing::debug!(
                "go-live {}: {} -> {} on {event:?}",
                self.pair,
                inner.state.as_str(),
                state.as_str()
            );
            inner.state = state;
            self.changed.notify_all();
        }
        effect
    }

    /// The peer was lost for `reason`. If this turns the pair into a claim, this thread
    /// asks the arbiter (retrying an unreachable one for [`CLAIM_PATIENCE`], and then
    /// again if `retry` and nothing stops it) and returns the decided state; if another
    /// thread claims already, or the decision was made, returns the state at once.
    pub fn peer_lost(&self, reason: &str, retry: bool) -> State {
        let started = Instant::now();
        let mut inner = self.lock();
        if self.deliver(&mut inner, &Event::PeerLost { retry }) != Effect::Claim {
            return inner.state.clone();
        }
        tracing::warn!(
            "{reason}: claiming go-live for {} as {}",
            self.pair,
            self.me
        );
        let Some(mut failover) = inner.failover.take() else {
            // Cannot happen: only the one thread that opened the claim takes it.
            self.deliver(
                &mut inner,
                &Event::Verdict(Answer::Unreachable("no arbiter".into())),
            );
            return inner.state.clone();
        };
        loop {
            drop(inner);
            let answer = match failover.claim(CLAIM_PATIENCE) {
                Ok(Verdict::Won) => Answer::Won,
                Ok(Verdict::Lost { winner }) => Answer::LostTo(winner),
                Err(err) => Answer::Unreachable(err.to_string()),
            };
            inner = self.lock();
            match self.deliver(&mut inner, &Event::Verdict(answer.clone())) {
                Effect::Claim => {
                    tracing::error!(
                        "the arbiter cannot be reached ({answer:?}); held output stays held, asking again"
                    );
                }
                _ => break,
            }
        }
        if inner.state == State::Live {
            inner.claim_took = Some(started.elapsed());
        }
        inner.failover = Some(failover);
        let pair = &self.pair;
        match (&inner.state, self.role) {
            (State::Live, Role::Primary) => {
                tracing::warn!("{reason}: won the go-live claim for {pair}: running unprotected")
            }
            (State::Live, Role::Backup) => {
                tracing::warn!("{reason}: won the go-live claim for {pair}: going live")
            }
            (State::Halted(Halt::LostTo(winner)), _) => {
                tracing::warn!("{reason}: {winner} won the go-live claim for {pair}: halting")
            }
            (State::Halted(Halt::Unreachable(why)), _) => tracing::error!(
                "{reason}: the arbiter cannot be reached ({why}): halting without output"
            ),
            _ => {}
        }
        inner.state.clone()
    }

    /// A request from outside. Obeyed at once while paired; during a claim it waits (at
    /// most `patience`) for the verdict, which decides: `Err` says why it is refused.
    pub fn request(&self, request: Request, patience: Duration) -> Result<(), String> {
        let mut inner = self.lock();
        match self.deliver(&mut inner, &Event::Request(request)) {
            Effect::Stop | Effect::Nothing => return Ok(()),
            Effect::Refuse(why) => return Err(why.to_owned()),
            _ => {}
        }
        let deadline = Instant::now() + patience;
        while matches!(inner.state, State::Claiming { .. }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the go-live claim is still undecided".into());
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        match (&inner.state, request) {
            (State::Live, Request::StopBackup) => Err(WENT_LIVE.to_owned()),
            _ => Ok(()),
        }
    }

    /// Waits (at most `patience`) until no claim is open; the state then.
    pub fn settled(&self, patience: Duration) -> State {
        let deadline = Instant::now() + patience;
        let mut inner = self.lock();
        while matches!(inner.state, State::Claiming { .. }) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inner = self
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        inner.state.clone()
    }
}

#[cfg(test)]
mod tests;
