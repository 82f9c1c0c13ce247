//! The sender-side limit on streaming bandwidth (`stream_rate_limit`, bytes per second): one
//! GCRA limiter (governor) shared by every stream this node sends, so range streaming cannot
//! take the disk and network from foreground requests. 8 MiB/s by default (`config::storage`);
//! 0 turns it off (no limiter).
//!
//! Invariant: over any interval, the bytes let through are at most one second's worth (the
//! burst) plus the rate times the interval. A batch larger than the burst waits in burst-sized
//! pieces.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub struct Throttle {
    limiter: DefaultDirectRateLimiter,
    /// One second's worth of bytes: the rate.
    burst: NonZeroU32,
}

impl Throttle {
    /// A limiter for `bytes_per_second` (capped at 4 GiB/s); `None` for 0 (off).
    pub fn new(bytes_per_second: u64) -> Option<Throttle> {
        let rate = NonZeroU32::new(u32::try_from(bytes_per_second).unwrap_or(u32::MAX))?;
        Some(Throttle {
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            burst: rate,
        })
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        u64::from(self.burst.get())
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: u64) {
        let mut left = bytes;
        while let Some(piece) = NonZeroU32::new(left.min(u64::from(self.burst.get())) as u32) {
            // A piece is never above the burst, so the limiter always admits it eventually.
            if self.limiter.until_n_ready(piece).await.is_err() {
                return;
            }
            left -= u64::from(piece.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn zero_is_off() {
        assert!(Throttle::new(0).is_none());
    }

    /// A lower bound only: the throttle promises never to go faster than its rate; how much
    /// slower a loaded machine makes it is not its business.
    #[tokio::test]
    async fn bytes_beyond_the_burst_wait_for_the_rate() {
        let throttle = Throttle::new(1_000_000).expect("on");
        let started = Instant::now();
        // One second's burst at once, then 1.5 MB more at 1 MB/s, in pieces of any size.
        for _ in 0..5 {
            throttle.take(500_000).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1_400), "{elapsed:?}");
    }
}
