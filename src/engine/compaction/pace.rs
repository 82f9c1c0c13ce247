//! How fast compaction writes: at most `compaction_bytes_per_sec`, less while the commit
//! log's fsyncs are slower than usual ([`crate::engine::sync_latency`]), but never less than
//! its debt calls for: the floor rises from [`MIN_SHARE`] of the limit while level 0 holds at
//! most its merge trigger to the whole limit at twice the trigger (a deep level 0 slows every
//! read, and its merge only grows).
//!
//! The rate halves for every [`HALVING`] the pressure stays above [`YIELD_ABOVE`], never below
//! the floor, and climbs back linearly to the limit over [`RECOVERY`] once the pressure falls.
//! Compaction then only spreads its writes over time: what it has to write does not change,
//! and flushes (their own thread) never wait for it.
//!
//! Invariants: the rate stays within [floor, limit], and floor >= limit x MIN_SHARE; bytes
//! written never run ahead of the rates in force by more than [`SLACK`]'s worth (no catch-up
//! burst after a slow stretch).

use std::time::{Duration, Instant};

/// Pressure (recent fsync time over its baseline) above which compaction slows down.
pub const YIELD_ABOVE: f64 = 2.0;
/// Under pressure, the rate halves this often.
pub const HALVING: Duration = Duration::from_secs(1);
/// Without pressure, the rate climbs from nothing to the limit in this long.
pub const RECOVERY: Duration = Duration::from_secs(4);
/// The lowest rate, as a share of the limit: compaction always makes progress.
pub const MIN_SHARE: f64 = 1.0 / 8.0;
/// How far behind its schedule a compaction may fall before the schedule moves on.
pub const SLACK: Duration = Duration::from_millis(100);

/// Compaction debt in [0, 1]: 0 while level 0 holds at most `trigger` tables, 1 from twice
/// that.
pub fn debt(l0_tables: usize, trigger: usize) -> f64 {
    let trigger = trigger.max(1) as f64;
    ((l0_tables as f64 - trigger) / trigger).clamp(0.0, 1.0)
}

/// The rate after `elapsed` at `rate`, under `pressure`, with `debt` (see [`debt`]).
pub fn next_rate(rate: f64, limit: f64, elapsed: Duration, pressure: f64, debt: f64) -> f64 {
    let floor = limit * (MIN_SHARE + (1.0 - MIN_SHARE) * debt.clamp(0.0, 1.0));
    let next = if pressure > YIELD_ABOVE {
        rate * 0.5f64.powf(elapsed.as_secs_f64() / HALVING.as_secs_f64())
    } else {
        rate + limit * elapsed.as_secs_f64() / RECOVERY.as_secs_f64()
    };
    next.clamp(floor, limit)
}

/// The pace of compaction writes, kept across compactions (one runs at a time).
#[derive(Debug)]
pub struct Pacer {
    limit: f64,
    rate: f64,
    /// When the bytes written so far are due at the rates in force.
    due: Instant,
    adjusted: Instant,
}

impl Pacer {
    /// A pacer for `limit` bytes/s; `None` for no limit (or 0).
    pub fn new(limit: Option<u64>) -> Option<Self> {
        let limit = limit.filter(|l| *l > 0)? as f64;
        let now = Instant::now();
        Some(Self {
            limit,
            rate: limit,
            due: now,
            adjusted: now,
        })
    }

    /// The rate in force, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Accounts for `bytes` more written; returns how long to sleep to keep the pace.
    pub fn wrote(&mut self, bytes: u64, pressure: f64, debt: f64) -> Duration {
        let now = Instant::now();
        // A pacer idle between compactions saw nothing meanwhile: at most one halving or a
        // quarter of the recovery per call.
        let elapsed = now.saturating_duration_since(self.adjusted).min(HALVING);
        self.rate = next_rate(self.rate, self.limit, elapsed, pressure, debt);
        self.adjusted = now;
        let earliest = now.checked_sub(SLACK).unwrap_or(now);
        self.due = self.due.max(earliest) + Duration::from_secs_f64(bytes as f64 / self.rate);
        self.due.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: f64 = 64.0 * 1024.0 * 1024.0;

    #[test]
    fn pressure_halves_the_rate_each_second_down_to_the_floor() {
        let second = Duration::from_secs(1);
        let r = next_rate(LIMIT, LIMIT, second, 3.0, 0.0);
        assert!((r - LIMIT / 2.0).abs() < 1.0, "{r}");
        let r = next_rate(r, LIMIT, second * 10, 3.0, 0.0);
        assert_eq!(r, LIMIT * MIN_SHARE);
    }

    #[test]
    fn without_pressure_the_rate_climbs_back_to_the_limit() {
        let r = next_rate(LIMIT * MIN_SHARE, LIMIT, Duration::from_secs(1), 1.2, 0.0);
        assert!((r - LIMIT * (MIN_SHARE + 0.25)).abs() < 1.0, "{r}");
        assert_eq!(next_rate(r, LIMIT, RECOVERY, 1.0, 0.0), LIMIT);
    }

    #[test]
    fn debt_raises_the_floor_up_to_the_limit() {
        assert_eq!(debt(10, 16), 0.0);
        assert_eq!(debt(16, 16), 0.0);
        assert_eq!(debt(24, 16), 0.5);
        assert_eq!(debt(40, 16), 1.0);
        let half = next_rate(LIMIT * MIN_SHARE, LIMIT, Duration::ZERO, 50.0, 0.5);
        assert!((half - LIMIT * (MIN_SHARE + (1.0 - MIN_SHARE) / 2.0)).abs() < 1.0);
        assert_eq!(
            next_rate(LIMIT * MIN_SHARE, LIMIT, Duration::ZERO, 50.0, 1.0),
            LIMIT
        );
    }

    #[test]
    fn no_limit_no_pacer() {
        assert!(Pacer::new(None).is_none());
        assert!(Pacer::new(Some(0)).is_none());
    }

    #[test]
    fn the_sleep_keeps_the_bytes_at_the_rate() {
        let mut p = Pacer::new(Some(1 << 20)).expect("limit");
        // 1 MiB at 1 MiB/s: about a second to wait (less what the call itself took).
        let wait = p.wrote(1 << 20, 1.0, 0.0);
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
    }

    proptest! {
        /// Whatever the sequence of pressures, debts and gaps, the rate stays within
        /// [limit x MIN_SHARE, limit] and at or above what the debt calls for; more pressure
        /// never gives a higher rate, more debt never a lower one.
        #[test]
        fn the_rate_stays_within_its_bounds(
            steps in proptest::collection::vec((0u64..5_000, 1.0f64..20.0, 0usize..40), 1..200)
        ) {
            let mut rate = LIMIT;
            for (ms, pressure, l0) in steps {
                let elapsed = Duration::from_millis(ms);
                let owed = debt(l0, 16);
                let next = next_rate(rate, LIMIT, elapsed, pressure, owed);
                prop_assert!((LIMIT * MIN_SHARE..=LIMIT).contains(&next));
                prop_assert!(next >= LIMIT * (MIN_SHARE + (1.0 - MIN_SHARE) * owed) - 1e-6);
                prop_assert!(next_rate(rate, LIMIT, elapsed, 1.0, owed) >= next);
                prop_assert!(next_rate(rate, LIMIT, elapsed, pressure, debt(l0 + 1, 16)) >= next);
                rate = next;
            }
        }
    }
}
