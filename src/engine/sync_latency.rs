//! How slow the commit log's fsyncs are now, against how slow they usually are: the signal
//! compaction yields to ([`super::compaction::pace`]). Every acknowledged write waits for an
//! fsync, so when fsyncs slow down (the disk is busy, or the CPU the syncing thread needs),
//! the foreground is what pays.
//!
//! `recent` is a mean of the fsync times weighted by age, with a time constant of
//! [`RECENT`]. The baseline is the calmest [`BUCKET`] of the last [`BASE_WINDOW`]: the lowest
//! of the buckets' mean `recent` (LEDBAT's base delay, over means rather than minima, so that
//! the usual fsync time under load is the baseline, not the quietest half second). A burst of
//! slow fsyncs raises `recent` and its own bucket, not the calmer ones, so the pressure
//! (`recent / baseline`) stays high for as long as the burst lasts, and the baseline still
//! follows a disk that became slower for good within the window.
//!
//! Invariants: the pressure is >= 1; it is exactly 1 before the first fsync and when the last
//! one is older than [`QUIET`] (nothing waits on the log then).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Time constant of the recent mean.
pub const RECENT: Duration = Duration::from_millis(500);
/// How far back the baseline looks.
pub const BASE_WINDOW: Duration = Duration::from_secs(60);
/// One bucket of the baseline's window.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Without an fsync for this long, there is no pressure.
pub const QUIET: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct SyncLatency {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Recent mean fsync time, microseconds.
    recent: f64,
    last: Option<Instant>,
    /// The baseline's window, oldest first.
    buckets: VecDeque<Bucket>,
}

/// One [`BUCKET`] of the window: the `recent` value after each fsync in it, summed.
struct Bucket {
    start: Instant,
    recent_sum: f64,
    fsyncs: u64,
}

impl Bucket {
    fn mean(&self) -> f64 {
        self.recent_sum / self.fsyncs.max(1) as f64
    }
}

impl SyncLatency {
    /// Records one fsync that took `took`.
    pub fn record(&self, took: Duration) {
        self.record_at(Instant::now(), took);
    }

    /// `recent / baseline`, at least 1.
    pub fn pressure(&self) -> f64 {
        self.pressure_at(Instant::now())
    }

    fn record_at(&self, now: Instant, took: Duration) {
        let sample = took.as_secs_f64() * 1e6;
        let mut g = self.inner.lock();
        g.recent = match g.last {
            None => sample,
            Some(last) => {
                let age = now.saturating_duration_since(last).as_secs_f64();
                let weight = 1.0 - (-age / RECENT.as_secs_f64()).exp();
                g.recent + weight * (sample - g.recent)
            }
        };
        g.last = Some(now);
        let recent = g.recent;
        match g.buckets.back_mut() {
            Some(b) if now.saturating_duration_since(b.start) < BUCKET => {
                b.recent_sum += recent;
                b.fsyncs += 1;
            }
            _ => g.buckets.push_back(Bucket {
                start: now,
                recent_sum: recent,
                fsyncs: 1,
            }),
        }
        while g
            .buckets
            .front()
            .is_some_and(|b| now.saturating_duration_since(b.start) > BASE_WINDOW)
        {
            g.buckets.pop_front();
        }
    }

    fn pressure_at(&self, now: Instant) -> f64 {
        let g = self.inner.lock();
        let Some(last) = g.last else {
            return 1.0;
        };
        if now.saturating_duration_since(last) > QUIET {
            return 1.0;
        }
        let base = g
            .buckets
            .iter()
            .map(Bucket::mean)
            .fold(f64::INFINITY, f64::min);
        if !(base.is_finite() && base > 0.0) {
            return 1.0;
        }
        (g.recent / base).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn no_fsync_no_pressure() {
        let s = SyncLatency::default();
        assert_eq!(s.pressure(), 1.0);
    }

    #[test]
    fn a_burst_of_slow_fsyncs_raises_the_pressure_until_it_ends() {
        let s = SyncLatency::default();
        let t0 = Instant::now();
        // A minute of 1 ms fsyncs, one every 10 ms.
        for i in 0..6_000 {
            s.record_at(t0 + ms(10 * i), ms(1));
        }
        let mut now = t0 + ms(60_000);
        assert!(
            (s.pressure_at(now) - 1.0).abs() < 0.01,
            "{}",
            s.pressure_at(now)
        );
        // Two seconds of 5 ms fsyncs: the recent mean goes to 5 ms, the baseline stays 1 ms.
        for _ in 0..400 {
            now += ms(5);
            s.record_at(now, ms(5));
        }
        let during = s.pressure_at(now);
        assert!(during > 4.0, "{during}");
        // Two seconds of 1 ms fsyncs again: back near 1.
        for _ in 0..200 {
            now += ms(10);
            s.record_at(now, ms(1));
        }
        let after = s.pressure_at(now);
        assert!(after < 1.1, "{after}");
    }

    #[test]
    fn an_idle_log_has_no_pressure() {
        let s = SyncLatency::default();
        let t0 = Instant::now();
        s.record_at(t0, ms(1));
        s.record_at(t0 + ms(100), ms(50));
        assert!(s.pressure_at(t0 + ms(100)) > 1.0);
        assert_eq!(s.pressure_at(t0 + ms(100) + QUIET + ms(1)), 1.0);
    }

    #[test]
    fn the_baseline_follows_a_disk_that_stays_slower() {
        let s = SyncLatency::default();
        let t0 = Instant::now();
        s.record_at(t0, ms(1));
        // Slower for good: 4 ms fsyncs for longer than the window.
        let mut now = t0;
        while now < t0 + BASE_WINDOW + BUCKET * 2 {
            now += ms(50);
            s.record_at(now, ms(4));
        }
        let p = s.pressure_at(now);
        assert!(p < 1.1, "{p}");
    }
}
