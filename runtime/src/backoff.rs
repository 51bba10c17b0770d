//! Per-object exponential backoff for the controllers' error policies.

use std::time::Duration;

/// Per-object exponential backoff: 1 s doubling up to 5 min.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The cap.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based), at least `floor` (a cloud's
    /// retry-after).
    pub fn delay(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
        let d = self.initial.saturating_mul(factor).min(self.max);
        floor.map_or(d, |f| d.max(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..12).map(|a| b.delay(a, None).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.delay(u32::MAX, None), b.max);
    }
}
