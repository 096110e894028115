//! Pending interrupt vectors and the periodic timer.
//!
//! There is no in-kernel irqchip: the VMM holds the pending set and injects from it only at
//! guest-caused exits (docs/machine.md, "Interrupt delivery").

use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use std::time::Duration;

/// A set of pending vectors (32..=255); the lowest is delivered first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingVectors {
    bits: [u64; 4],
}

impl PendingVectors {
    /// Marks `vector` pending. Raising a vector already pending has no further effect.
    pub fn raise(&mut self, vector: u8) {
        self.bits[usize::from(vector / 64)] |= 1 << (vector % 64);
    }

    /// The lowest pending vector, without removing it.
    pub fn lowest(&self) -> Option<u8> {
        self.bits.iter().enumerate().find_map(|(word, bits)| {
            (*bits != 0).then(|| (word as u8) * 64 + bits.trailing_zeros() as u8)
        })
    }

    /// Removes `vector` from the set.
    pub fn clear(&mut self, vector: u8) {
        self.bits[usize::from(vector / 64)] &= !(1 << (vector % 64));
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|bits| *bits == 0)
    }
}

/// Shortest timer period the guest may ask for.
pub const TIMER_MIN_PERIOD: Duration = Duration::from_micros(1);
/// Longest timer period the guest may ask for.
pub const TIMER_MAX_PERIOD: Duration = Duration::from_secs(10);

/// A periodic timer on the VM's monotonic clock (nanoseconds since VM start).
#[derive(Debug, Default, Clone)]
pub struct Timer {
    period_ns: u64,
    next_deadline_ns: Option<u64>,
}

impl Timer {
    /// Sets the period in microseconds from `now_ns`; 0 stops the timer. Values outside
    /// [`TIMER_MIN_PERIOD`, `TIMER_MAX_PERIOD`] are clamped.
    pub fn set_period_us(&mut self, period_us: u32, now_ns: u64) {
        if period_us == 0 {
            self.period_ns = 0;
            self.next_deadline_ns = None;
            return;
        }
        let period =
            Duration::from_micros(u64::from(period_us)).clamp(TIMER_MIN_PERIOD, TIMER_MAX_PERIOD);
        self.period_ns = period.as_nanos() as u64;
        self.next_deadline_ns = Some(now_ns.saturating_add(self.period_ns));
    }

    /// The period in microseconds, as the guest reads it back; 0 when stopped.
    pub fn period_us(&self) -> u32 {
        u32::try_from(self.period_ns / 1000).unwrap_or(u32::MAX)
    }

    /// The next deadline, if the timer runs.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.next_deadline_ns
    }

    /// Whether a tick is due at `now_ns`; if so it is consumed and the next deadline set.
    /// Ticks missed while the guest did not exit are dropped, not queued.
    pub fn take_due_tick(&mut self, now_ns: u64) -> bool {
        let Some(deadline) = self.next_deadline_ns else {
            return false;
        };
        if now_ns < deadline {
            return false;
        }
        let mut next = deadline.saturating_add(self.period_ns);
        if next <= now_ns {
            next = now_ns.saturating_add(self.period_ns);
        }
        self.next_deadline_ns = Some(next);
        true
    }
}

impl Snapshot for PendingVectors {
    fn tag(&self) -> Tag {
        *b"PEND"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        for word in self.bits {
            out.u64(word);
        }
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let mut bits = [0u64; 4];
        for word in &mut bits {
            *word = input.u64("pending vectors")?;
        }
        // Vectors 0..=31 are exceptions: the VMM never raises them.
        if bits[0] & 0xFFFF_FFFF != 0 {
            return Err(input.invalid(format!(
                "exception vectors pending ({:#x})",
                bits[0] & 0xFFFF_FFFF
            )));
        }
        self.bits = bits;
        Ok(())
    }
}

impl Snapshot for Timer {
    fn tag(&self) -> Tag {
        *b"TIMR"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.period_ns);
        out.bool(self.next_deadline_ns.is_some());
        out.u64(self.next_deadline_ns.unwrap_or(0));
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let period_ns = input.u64("period")?;
        let running = input.bool("running")?;
        let deadline = input.u64("next deadline")?;
        let range = TIMER_MIN_PERIOD.as_nanos() as u64..=TIMER_MAX_PERIOD.as_nanos() as u64;
        match (running, period_ns) {
            (false, 0) if deadline == 0 => {}
            (true, period) if range.contains(&period) => {}
            _ => {
                return Err(input.invalid(format!(
                    "timer period {period_ns} ns with running={running} deadline={deadline}"
                )))
            }
        }
        self.period_ns = period_ns;
        self.next_deadline_ns = running.then_some(deadline);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testing::{assert_refuses_damage, assert_round_trip};

    #[test]
    fn pending_vectors_round_trip_and_refuse_damage() {
        let mut pending = PendingVectors::default();
        pending.raise(32);
        pending.raise(41);
        pending.raise(255);
        let bytes = assert_round_trip(&pending, &mut PendingVectors::default());
        assert_refuses_damage(&bytes, PendingVectors::default);
        // Well framed but impossible: an exception vector pending.
        let mut bad = crate::snapshot::Encoder::new();
        for word in [1u64 << 3, 0, 0, 0] {
            bad.u64(word);
        }
        let framed = crate::snapshot::frame_section(*b"PEND", 1, bad.as_bytes()).unwrap();
        let mut target = PendingVectors::default();
        let err = crate::snapshot::restore_section(&mut target, &framed).unwrap_err();
        assert!(err.to_string().contains("exception vectors"), "{err}");
        assert!(
            target.is_empty(),
            "a refused section must not change the component"
        );
    }

    #[test]
    fn timer_round_trips_running_and_stopped() {
        let mut timer = Timer::default();
        assert_round_trip(&timer, &mut Timer::default());
        timer.set_period_us(1000, 5_000);
        let bytes = assert_round_trip(&timer, &mut Timer::default());
        assert_refuses_damage(&bytes, Timer::default);
        let mut restored = Timer::default();
        crate::snapshot::restore_section(&mut restored, &bytes).unwrap();
        assert_eq!(restored.next_deadline_ns(), Some(1_005_000));
        assert_eq!(restored.period_us(), 1000);
        // A running timer with a zero period would spin: refused.
        let mut bad = crate::snapshot::Encoder::new();
        bad.u64(0);
        bad.bool(true);
        bad.u64(7);
        let framed = crate::snapshot::frame_section(*b"TIMR", 1, bad.as_bytes()).unwrap();
        assert!(crate::snapshot::restore_section(&mut Timer::default(), &framed).is_err());
    }

    #[test]
    fn lowest_vector_is_delivered_first() {
        let mut pending = PendingVectors::default();
        assert_eq!(pending.lowest(), None);
        pending.raise(200);
        pending.raise(36);
        pending.raise(32);
        assert_eq!(pending.lowest(), Some(32));
        pending.clear(32);
        assert_eq!(pending.lowest(), Some(36));
        pending.clear(36);
        assert_eq!(pending.lowest(), Some(200));
        pending.clear(200);
        assert!(pending.is_empty());
    }

    #[test]
    fn timer_drops_missed_ticks_instead_of_queueing_them() {
        let mut timer = Timer::default();
        assert!(!timer.take_due_tick(u64::MAX));
        timer.set_period_us(1000, 0);
        assert!(!timer.take_due_tick(999_999));
        assert!(timer.take_due_tick(1_000_000));
        assert!(!timer.take_due_tick(1_000_001));
        // Ten periods late: one tick, and the next deadline is a period from now.
        assert!(timer.take_due_tick(12_000_000));
        assert!(!timer.take_due_tick(12_500_000));
        assert_eq!(timer.next_deadline_ns(), Some(13_000_000));
        timer.set_period_us(0, 0);
        assert_eq!(timer.next_deadline_ns(), None);
    }

    #[test]
    fn absurd_periods_are_clamped() {
        let mut timer = Timer::default();
        timer.set_period_us(u32::MAX, 0);
        assert_eq!(timer.period_us(), 10_000_000);
    }
}
