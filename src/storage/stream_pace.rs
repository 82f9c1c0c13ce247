//! How much of the throttle a node's range streams take while its own commit log is under
//! pressure: the bulk copy yields the way compaction does (docs/engine.md, "Compaction
//! pace"). A sender is an old owner that serves clients; when its log's recent fsyncs are
//! over twice their baseline (the machine or the disk is short, [`crate::engine::Engine::
//! sync_pressure`]), the share of `stream_rate_limit` its streams take halves every second,
//! down to an eighth, and climbs back to the whole within 4 s once the pressure is gone
//! (the same curve as compaction's pacer, [`crate::engine::compaction::pace::next_rate`]).
//!
//! Invariants: the share stays within [`pace::MIN_SHARE`, 1], so a stream always makes
//! progress and never goes faster than the throttle; unthrottled streams (an operator's
//! `stream_rate_limit = 0`) are not paced.

use std::time::Instant;

use crate::engine::compaction::pace;

/// The share of the throttle a stream takes now.
#[derive(Debug)]
pub struct StreamPace {
    share: f64,
    adjusted: Instant,
}

impl Default for StreamPace {
    fn default() -> Self {
        Self {
            share: 1.0,
            adjusted: Instant::now(),
        }
    }
}

impl StreamPace {
    /// The share after the time since the last call under `pressure` (recent fsync time over
    /// its baseline).
    pub fn observe(&mut self, pressure: f64) -> f64 {
        self.observe_at(Instant::now(), pressure)
    }

    fn observe_at(&mut self, now: Instant, pressure: f64) -> f64 {
        // A stream that waited long saw nothing meanwhile: at most one halving per call.
        let elapsed = now
            .saturating_duration_since(self.adjusted)
            .min(pace::HALVING);
        self.adjusted = now;
        self.share = pace::next_rate(self.share, 1.0, elapsed, pressure, 0.0);
        self.share
    }

    /// The bytes to take from the throttle for a batch of `bytes`: more than it holds while
    /// the share is under 1, so the batch waits longer.
    pub fn charge(share: f64, bytes: u64) -> u64 {
        (bytes as f64 / share.clamp(pace::MIN_SHARE, 1.0)).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_share_halves_each_second_under_pressure_and_recovers_without_it() {
        let mut p = StreamPace::default();
        let t0 = p.adjusted;
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        assert_eq!(p.observe_at(at(0.5), 1.0), 1.0, "no pressure: the whole throttle");
        assert!((p.observe_at(at(1.5), 3.0) - 0.5).abs() < 1e-9);
        assert!((p.observe_at(at(2.5), 3.0) - 0.25).abs() < 1e-9);
        // A long wait counts as one second, not ten halvings.
        assert!((p.observe_at(at(12.5), 3.0) - 0.125).abs() < 1e-9);
        assert_eq!(p.observe_at(at(13.5), 5.0), pace::MIN_SHARE, "never below the floor");
        // Pressure gone: back by a quarter of the whole per second.
        assert!((p.observe_at(at(14.5), 1.0) - 0.375).abs() < 1e-9);
        assert!((p.observe_at(at(15.5), 1.0) - 0.625).abs() < 1e-9);
        assert!((p.observe_at(at(16.5), 1.0) - 0.875).abs() < 1e-9);
        assert_eq!(p.observe_at(at(17.5), 1.0), 1.0);
    }

    #[test]
    fn a_batch_takes_its_bytes_over_the_share() {
        assert_eq!(StreamPace::charge(1.0, 4 << 20), 4 << 20);
        assert_eq!(StreamPace::charge(0.5, 4 << 20), 8 << 20);
        assert_eq!(StreamPace::charge(0.0, 1000), 8000, "never beyond the floor");
    }
}
