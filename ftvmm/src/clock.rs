//! The VM's clocks: the only time the guest can see.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Monotonic time since the VM started and wall-clock time, both in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct VmClock {
    start: Instant,
}

impl VmClock {
    /// A clock whose monotonic time starts now.
    pub fn new() -> Self {
        VmClock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the VM started.
    pub fn monotonic_ns(&mut self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
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
