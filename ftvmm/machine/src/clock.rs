//! The VM's clocks: the only time the guest can see.

use crate::snapshot::{Decoder, Encoder, Snapshot, SnapshotError, Tag};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic time since the VM started and wall-clock time, both in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct VmClock {
    start: Instant,
    /// Monotonic time the VM had at `start` (non-zero once restored from a snapshot, which
    /// may come from a host that has been up longer than this one).
    base_ns: u64,
}

impl VmClock {
    /// A clock whose monotonic time starts now.
    pub fn new() -> Self {
        VmClock {
            start: Instant::now(),
            base_ns: 0,
        }
    }

    /// Nanoseconds since the VM started.
    pub fn monotonic_ns(&mut self) -> u64 {
        self.now_ns()
    }

    fn now_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.base_ns.saturating_add(elapsed)
    }

    /// Nanoseconds since the Unix epoch (0 if the host clock is before it).
    pub fn wall_clock_ns(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

impl Default for VmClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The monotonic time at the save; a restored clock continues from it (the time the
/// transfer took is not seen by the guest). The wall clock is the host's and not saved.
impl Snapshot for VmClock {
    fn tag(&self) -> Tag {
        *b"CLCK"
    }

    fn version(&self) -> u16 {
        1
    }

    fn save(&self, out: &mut Encoder) -> Result<(), SnapshotError> {
        out.u64(self.now_ns());
        Ok(())
    }

    fn restore(&mut self, input: &mut Decoder<'_>, _version: u16) -> Result<(), SnapshotError> {
        let monotonic_ns = input.u64("monotonic time")?;
        self.start = Instant::now();
        self.base_ns = monotonic_ns;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_clock_continues_from_the_saved_time() {
        let mut clock = VmClock::new();
        // An hour of VM time: more than a freshly booted host's Instant could subtract.
        clock.base_ns = 3_600_000_000_000;
        let bytes = crate::snapshot::save_section(&clock).unwrap();
        let mut restored = VmClock::new();
        crate::snapshot::restore_section(&mut restored, &bytes).unwrap();
        let now = restored.monotonic_ns();
        assert!(
            (3_600_000_000_000..3_610_000_000_000).contains(&now),
            "{now}"
        );
        crate::snapshot::testing::assert_refuses_damage_of_moving(&bytes, VmClock::new);
    }
}
