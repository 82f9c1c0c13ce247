//! Watching a value that should keep changing, on this process's monotonic clock (tokio's, so
//! tests drive it with a paused clock): a migration's streaming progress (rolled back after
//! `topology_timeout` without progress) and another coordinator's lease beat (taken over once
//! it stood still for the takeover delay). Never a comparison of two machines' wall clocks.

use std::time::Duration;

use tokio::time::Instant;

/// The last value seen and since when it has not changed.
#[derive(Debug, Clone)]
pub struct StallWatch<P> {
    last: P,
    since: Instant,
}

impl<P: PartialEq> StallWatch<P> {
    /// Starts watching at `now`'s value; the still time starts now.
    pub fn new(now: P) -> Self {
        Self {
            last: now,
            since: Instant::now(),
        }
    }

    /// Records the value as it is now; true when it changed (the still time starts again).
    pub fn observe(&mut self, now: P) -> bool {
        if now == self.last {
            return false;
        }
        self.last = now;
        self.since = Instant::now();
        true
    }

    /// How long the value has stood still.
    pub fn still_for(&self) -> Duration {
        self.since.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Progress restarts the still time; only time without a change counts.
    #[tokio::test(start_paused = true)]
    async fn only_time_without_a_change_counts() {
        let mut watch = StallWatch::new(0u64);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(watch.still_for(), Duration::from_secs(2));
        assert!(!watch.observe(0), "the same value is no progress");
        assert_eq!(watch.still_for(), Duration::from_secs(2));
        assert!(watch.observe(1));
        assert_eq!(watch.still_for(), Duration::ZERO);
        // Steady progress never stalls, however long it runs.
        for step in 2..100u64 {
            tokio::time::advance(Duration::from_millis(900)).await;
            assert!(watch.observe(step));
            assert!(watch.still_for() < Duration::from_secs(1));
        }
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!watch.observe(99));
        assert_eq!(watch.still_for(), Duration::from_secs(3));
    }

    /// A value that goes back to an earlier one still counts as a change (a lease beat reset by
    /// a takeover is a new owner at work).
    #[tokio::test(start_paused = true)]
    async fn any_change_counts() {
        let mut watch = StallWatch::new(5i64);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(watch.observe(1));
        assert_eq!(watch.still_for(), Duration::ZERO);
    }
}
