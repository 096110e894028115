//! Which pages the guest and the VMM wrote during a pre-copy: KVM's dirty log (the guest's
//! writes) and guest memory's own bitmap (the devices' writes), which only the vCPU thread
//! reads, between exits. The pre-copy thread asks for a harvest before each round after
//! the first and copies only the pages written since the one before; the final pass
//! harvests the rest with the guest stopped. So no round after the first, and not the
//! pause, reads all of RAM.
//!
//! A page written after a harvest is in the next one: KVM write-protects a page again when
//! its mark is read, and marks it at the first write after that (before the write is
//! done); the devices write and the harvests run on the same thread. So a page a round
//! read is either unchanged since or in the next harvest. The sets over-report (KVM marks
//! pages it maps writable); each page is compared with what was sent before it goes.

use ftvm_machine::memory::DirtyPages;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The written pages of a pre-copy, harvested by the vCPU thread on request.
#[derive(Debug, Default)]
pub struct Tracking {
    state: Mutex<State>,
    harvested: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The pre-copy thread waits for a harvest.
    wanted: bool,
    /// Pages harvested and not taken yet.
    pages: DirtyPages,
    /// A harvest failed: marks may be missing from then on, so nothing more is taken.
    broken: bool,
}

/// How long a round waits for the vCPU thread to harvest: a guest halted without a
/// timer may reach no exit for longer; the round then reads all of RAM instead.
pub const HARVEST_PATIENCE: Duration = Duration::from_millis(100);

impl Tracking {
    /// The vCPU thread, between exits: harvests with `harvest` if the pre-copy thread asked.
    pub fn serve<E: std::fmt::Display>(
        &self,
        harvest: impl FnOnce(&mut DirtyPages) -> Result<(), E>,
    ) {
        let mut state = self.lock();
        if !state.wanted || state.broken {
            return;
        }
        if let Err(err) = harvest(&mut state.pages) {
            tracing::warn!(
                "clone: cannot read the written pages ({err}): every round reads all of RAM"
            );
            state.broken = true;
        }
        state.wanted = false;
        self.harvested.notify_all();
    }

    /// The pre-copy thread: the pages written since the previous take (or since tracking
    /// started), or `None` when the vCPU thread did not harvest within
    /// [`HARVEST_PATIENCE`] or a harvest failed: the round must then read all of RAM. A
    /// harvest that comes late is kept for the next take.
    pub fn take(&self) -> Option<DirtyPages> {
        let deadline = Instant::now() + HARVEST_PATIENCE;
        let mut state = self.lock();
        state.wanted = true;
        while state.wanted && !state.broken {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = self
                .harvested
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        (!state.broken).then(|| std::mem::take(&mut state.pages))
    }

    /// With the guest stopped, on the vCPU thread: every page written since the previous
    /// take, or `None` if tracking broke (the final pass must read all of RAM).
    pub fn take_final<E: std::fmt::Display>(
        &self,
        harvest: impl FnOnce(&mut DirtyPages) -> Result<(), E>,
    ) -> Option<DirtyPages> {
        let mut state = self.lock();
        state.wanted = true;
        drop(state);
        self.serve(harvest);
        let mut state = self.lock();
        (!state.broken).then(|| std::mem::take(&mut state.pages))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn mark(pages: &[u64]) -> impl FnOnce(&mut DirtyPages) -> Result<(), String> + '_ {
        move |set: &mut DirtyPages| {
            for page in pages {
                set.insert(*page);
            }
            Ok(())
        }
    }

    #[test]
    fn a_take_gets_what_the_vcpu_thread_harvested_and_a_late_harvest_is_not_lost() {
        let tracking = Arc::new(Tracking::default());
        let vcpu = {
            let tracking = tracking.clone();
            std::thread::spawn(move || {
                // Serves until one harvest was made.
                loop {
                    if tracking.lock().wanted {
                        tracking.serve(mark(&[3, 70]));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let taken = tracking.take().expect("harvested in time");
        assert_eq!(taken.pages().collect::<Vec<_>>(), [3, 70]);
        vcpu.join().unwrap();
        // Nobody serves: the round falls back to reading all of RAM ...
        assert!(tracking.take().is_none());
        // ... and what the vCPU thread harvests later goes to the next take.
        tracking.serve(mark(&[9]));
        let last = tracking.take_final(mark(&[12])).expect("not broken");
        assert_eq!(last.pages().collect::<Vec<_>>(), [9, 12]);
    }

    #[test]
    fn a_failed_harvest_ends_tracking_for_the_rest_of_the_clone() {
        let tracking = Tracking::default();
        tracking.lock().wanted = true;
        tracking.serve(|_: &mut DirtyPages| Err("KVM_GET_DIRTY_LOG failed"));
        assert!(tracking.take().is_none());
        assert!(tracking.take_final(mark(&[1])).is_none());
    }
}
