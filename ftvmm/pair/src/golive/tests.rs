use super::*;
use crate::arbiter::{Arbiter, ArbiterError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const P: Role = Role::Primary;
const B: Role = Role::Backup;

fn claiming(pending: Option<Request>, retry: bool) -> State {
    State::Claiming { pending, retry }
}
fn lost_to() -> State {
    State::Halted(Halt::LostTo("x".into()))
}
fn unreachable() -> State {
    State::Halted(Halt::Unreachable("down".into()))
}
fn won() -> Event {
    Event::Verdict(Answer::Won)
}
fn lost() -> Event {
    Event::Verdict(Answer::LostTo("x".into()))
}
fn down() -> Event {
    Event::Verdict(Answer::Unreachable("down".into()))
}
fn stop() -> Event {
    Event::Request(Request::Stop)
}
fn stop_backup() -> Event {
    Event::Request(Request::StopBackup)
}
fn loss(retry: bool) -> Event {
    Event::PeerLost { retry }
}

/// Every (role, state, event) with the state and effect the module doc's table gives.
#[test]
fn every_state_and_event_goes_where_the_table_says() {
    use Effect::*;
    let stop_pending = Some(Request::Stop);
    let sb_pending = Some(Request::StopBackup);
    #[rustfmt::skip]
    let table: Vec<(Role, State, Event, State, Effect)> = vec![
        // Paired
        (P, State::Paired, loss(true), claiming(None, true), Claim),
        (B, State::Paired, loss(false), claiming(None, false), Claim),
        (P, State::Paired, won(), State::Paired, Nothing),
        (B, State::Paired, lost(), State::Paired, Nothing),
        (P, State::Paired, down(), State::Paired, Nothing),
        (P, State::Paired, stop(), State::Stopping, Stop),
        (B, State::Paired, stop(), State::Stopping, Stop),
        (B, State::Paired, stop_backup(), State::Stopping, Stop),
        (P, State::Paired, stop_backup(), State::Paired, Refuse(NOT_A_BACKUP)),
        // Claiming: a second loss changes nothing.
        (P, claiming(None, true), loss(true), claiming(None, true), Nothing),
        (B, claiming(None, false), loss(false), claiming(None, false), Nothing),
        (B, claiming(stop_pending, false), loss(false), claiming(stop_pending, false), Nothing),
        // Claiming: requests wait for the verdict.
        (P, claiming(None, true), stop(), claiming(stop_pending, true), Wait),
        (B, claiming(None, false), stop(), claiming(stop_pending, false), Wait),
        (B, claiming(sb_pending, false), stop(), claiming(stop_pending, false), Wait),
        (B, claiming(None, false), stop_backup(), claiming(sb_pending, false), Wait),
        (B, claiming(stop_pending, false), stop_backup(), claiming(stop_pending, false), Wait),
        (P, claiming(None, true), stop_backup(), claiming(None, true), Refuse(NOT_A_BACKUP)),
        // Claiming: the verdict.
        (P, claiming(None, true), won(), State::Live, Release),
        (B, claiming(None, false), won(), State::Live, Release),
        (B, claiming(stop_pending, false), won(), State::Live, Release),
        (B, claiming(sb_pending, false), won(), State::Live, Release),
        (P, claiming(None, true), lost(), lost_to(), Discard),
        (B, claiming(sb_pending, false), lost(), lost_to(), Discard),
        (P, claiming(None, true), down(), claiming(None, true), Claim),
        (P, claiming(None, false), down(), unreachable(), Discard),
        (P, claiming(stop_pending, true), down(), unreachable(), Discard),
        (B, claiming(None, false), down(), unreachable(), Discard),
        (B, claiming(None, true), down(), unreachable(), Discard),
        (B, claiming(sb_pending, false), down(), unreachable(), Discard),
        // Live
        (P, State::Live, loss(true), State::Live, Nothing),
        (B, State::Live, loss(false), State::Live, Nothing),
        (B, State::Live, won(), State::Live, Nothing),
        (B, State::Live, lost(), State::Live, Nothing),
        (B, State::Live, down(), State::Live, Nothing),
        (P, State::Live, stop(), State::Live, Stop),
        (B, State::Live, stop(), State::Live, Stop),
        (B, State::Live, stop_backup(), State::Live, Refuse(WENT_LIVE)),
        (P, State::Live, stop_backup(), State::Live, Refuse(WENT_LIVE)),
        // Halted
        (P, lost_to(), loss(true), lost_to(), Nothing),
        (B, unreachable(), won(), unreachable(), Nothing),
        (B, lost_to(), down(), lost_to(), Nothing),
        (P, lost_to(), stop(), lost_to(), Stop),
        (B, unreachable(), stop_backup(), unreachable(), Stop),
        // Stopping: never claims.
        (B, State::Stopping, loss(false), State::Stopping, Nothing),
        (P, State::Stopping, loss(true), State::Stopping, Nothing),
        (B, State::Stopping, won(), State::Stopping, Nothing),
        (P, State::Stopping, lost(), State::Stopping, Nothing),
        (B, State::Stopping, down(), State::Stopping, Nothing),
        (B, State::Stopping, stop(), State::Stopping, Stop),
        (B, State::Stopping, stop_backup(), State::Stopping, Stop),
    ];
    for (role, state, event, want_state, want_effect) in table {
        let (got_state, got_effect) = next(role, &state, &event);
        assert_eq!(
            (&got_state, &got_effect),
            (&want_state, &want_effect),
            "{role:?} in {state:?} on {event:?}"
        );
    }
}

/// Only a paired or stopping replica releases on acknowledgements; only Live releases
/// without one (through the Release effect).
#[test]
fn output_is_released_on_acks_only_while_paired_or_stopping() {
    for (state, releases) in [
        (State::Paired, true),
        (State::Stopping, true),
        (claiming(None, true), false),
        (claiming(Some(Request::Stop), true), false),
        (State::Live, false),
        (lost_to(), false),
        (unreachable(), false),
    ] {
        assert_eq!(state.releases_on_ack(), releases, "{state:?}");
    }
}

/// An arbiter whose answers the test sets: `Ok(None)` means unreachable.
struct Scripted {
    answer: Arc<Mutex<Option<Verdict>>>,
    /// Held while asking: a test blocks the claim here to deliver events meanwhile.
    gate: Arc<Mutex<()>>,
    asked: Arc<AtomicUsize>,
}

impl Arbiter for Scripted {
    fn claim(&mut self, _: &PairId, _: &str) -> Result<Verdict, ArbiterError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let _gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        match self
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            Some(verdict) => Ok(verdict),
            None => Err(ArbiterError::Etcd {
                endpoint: "test".into(),
                message: "unreachable".into(),
            }),
        }
    }

    fn winner(&mut self, _: &PairId) -> Result<Option<String>, ArbiterError> {
        Ok(None)
    }
}

struct Fixture {
    golive: Arc<GoLive>,
    answer: Arc<Mutex<Option<Verdict>>>,
    gate: Arc<Mutex<()>>,
    asked: Arc<AtomicUsize>,
}

fn fixture(role: Role, answer: Option<Verdict>) -> Fixture {
    let answer = Arc::new(Mutex::new(answer));
    let gate = Arc::new(Mutex::new(()));
    let asked = Arc::new(AtomicUsize::new(0));
    let failover = Failover {
        arbiter: Box::new(Scripted {
            answer: answer.clone(),
            gate: gate.clone(),
            asked: asked.clone(),
        }),
        pair: PairId {
            vm: "web1".into(),
            uid: None,
            generation: 1,
        },
        me: "me".into(),
    };
    Fixture {
        golive: Arc::new(GoLive::new(role, failover)),
        answer,
        gate,
        asked,
    }
}

/// Waits until the claim in progress is asking the arbiter.
fn wait_asked(asked: &AtomicUsize, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while asked.load(Ordering::SeqCst) < count {
        assert!(
            Instant::now() < deadline,
            "the claim never asked the arbiter"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_stop_backup_during_a_won_claim_is_refused_and_the_backup_is_live() {
    let f = fixture(B, Some(Verdict::Won));
    let gate = f.gate.lock().unwrap();
    let claimer = {
        let golive = f.golive.clone();
        std::thread::spawn(move || golive.peer_lost("log ended", false))
    };
    wait_asked(&f.asked, 1);
    let requester = {
        let golive = f.golive.clone();
        std::thread::spawn(move || golive.request(Request::StopBackup, Duration::from_secs(10)))
    };
    // The request waits for the verdict.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!requester.is_finished());
    drop(gate);
    assert_eq!(claimer.join().unwrap(), State::Live);
    assert_eq!(requester.join().unwrap(), Err(WENT_LIVE.to_owned()));
    assert!(f.golive.claim_took().is_some());
}

#[test]
fn a_second_loss_during_a_claim_neither_claims_again_nor_decides() {
    let f = fixture(P, Some(Verdict::Won));
    let gate = f.gate.lock().unwrap();
    let claimer = {
        let golive = f.golive.clone();
        std::thread::spawn(move || golive.peer_lost("backup silent", true))
    };
    wait_asked(&f.asked, 1);
    // Another thread (a close, the ack thread) loses the peer too: the claim is open.
    assert_eq!(
        f.golive.peer_lost("closing", true),
        claiming(None, true),
        "a second loss must not take a decision"
    );
    drop(gate);
    assert_eq!(claimer.join().unwrap(), State::Live);
    assert_eq!(f.asked.load(Ordering::SeqCst), 1);
}

#[test]
fn a_stop_during_a_claim_with_the_arbiter_unreachable_halts_without_releasing() {
    let f = fixture(P, None);
    let claimer = {
        let golive = f.golive.clone();
        std::thread::spawn(move || golive.peer_lost("backup silent", true))
    };
    wait_asked(&f.asked, 1);
    // The primary keeps asking while it holds output; nothing is ever released.
    assert!(!f.golive.state().releases_on_ack());
    assert_eq!(
        f.golive.request(Request::Stop, Duration::from_secs(20)),
        Ok(())
    );
    let end = claimer.join().unwrap();
    assert!(
        matches!(end, State::Halted(Halt::Unreachable(_))),
        "{end:?}"
    );
    assert!(!f.golive.state().releases_on_ack());
    assert_eq!(f.golive.claim_took(), None);
}

#[test]
fn a_stopping_backup_whose_log_ends_never_claims() {
    let f = fixture(B, Some(Verdict::Won));
    assert_eq!(
        f.golive
            .request(Request::StopBackup, Duration::from_secs(1)),
        Ok(())
    );
    assert_eq!(f.golive.peer_lost("log ended", false), State::Stopping);
    assert_eq!(f.asked.load(Ordering::SeqCst), 0);
}

#[test]
fn a_lost_claim_halts_and_later_requests_are_obeyed() {
    let f = fixture(
        B,
        Some(Verdict::Lost {
            winner: "primary@a/1".into(),
        }),
    );
    assert_eq!(
        f.golive.peer_lost("log ended", false),
        State::Halted(Halt::LostTo("primary@a/1".into()))
    );
    assert_eq!(
        f.golive
            .request(Request::StopBackup, Duration::from_secs(1)),
        Ok(())
    );
    *f.answer.lock().unwrap() = Some(Verdict::Won);
    // Decided once: a later loss does not ask again.
    assert!(matches!(
        f.golive.peer_lost("again", false),
        State::Halted(_)
    ));
    assert_eq!(f.asked.load(Ordering::SeqCst), 1);
}

#[test]
fn a_backup_halts_when_the_arbiter_stays_unreachable() {
    let f = fixture(B, None);
    let started = Instant::now();
    assert!(matches!(
        f.golive.peer_lost("log ended", false),
        State::Halted(Halt::Unreachable(_))
    ));
    assert!(started.elapsed() >= CLAIM_PATIENCE);
}
