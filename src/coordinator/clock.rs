//! A coordinator's clock: [`HybridClock`] whose high-water mark lives in the metadata store, so
//! a restarted coordinator (even with its wall clock behind) never issues a counter it issued
//! before. The mark is reserved [`DEFAULT_RESERVE_MS`] ahead, so the store is written about
//! every 10 s under load.
//!
//! Invariants:
//! - The clock moves only after its high-water mark was stored: a failed reservation (store
//!   down, a mark out of the store's range) fails that one request and leaves the clock as it
//!   was, so later requests and other tenants are not affected.
//! - Nothing from outside moves it further ahead of the wall clock than its source may honestly
//!   lead (a client's context `max_clock_skew`, a replica's version twice that plus one
//!   reservation: [`CoordinatorClock::bound_for`]); a counter beyond is never observed; it is
//!   logged and counted in `pairdb_clock_far_ahead_total{source}`.
//! - Every trusted version the coordinator sees (read answers, versions replicas kept instead
//!   of a write) is observed (the HLC receive rule), so the next counter is above it.
//! - A restarted coordinator issues counters at most one reservation ahead of its wall clock:
//!   each restart resumes above the mark, and the first reservation after it lies another
//!   reservation further, so a crash loop would push the clock ahead by a reservation per
//!   restart, beyond what peers trust. [`resume_wait`] makes the restart wait until the mark is
//!   within one reservation of the wall clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;

use crate::meta::{MetaError, MetadataStore};
use crate::vclock::{
    CLOCK_EPOCH_MS, DEFAULT_RESERVE_MS, HybridClock, LOGICAL_BITS, VectorClock, counter_bound,
};

pub struct CoordinatorClock {
    id: String,
    store: Arc<dyn MetadataStore>,
    clock: Mutex<HybridClock>,
    /// The highest trusted counter seen outside a write's own context (HLC receive rule).
    observed: AtomicU64,
    max_skew_ms: u64,
}

/// Where a counter the clock looked at came from (the label of the far-ahead metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's causal context.
    Context,
    /// A version a replica answered with (a read, or a write it ignored).
    Replica,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Context => "context",
            Source::Replica => "replica",
        }
    }
}

impl CoordinatorClock {
    /// Resumes `coordinator_id`'s clock from its durable high-water mark.
    pub async fn resume(
        coordinator_id: &str,
        store: Arc<dyn MetadataStore>,
        max_skew_ms: u64,
    ) -> Result<Self, MetaError> {
        let high_water = store.load_clock(coordinator_id).await?;
        let wait = resume_wait(high_water, crate::wallclock::now_ms(), max_skew_ms);
        if !wait.is_zero() {
            tracing::warn!(
                coordinator = coordinator_id,
                wait_ms = wait.as_millis() as u64,
                "the clock's high-water mark lies more than one reservation ahead (restarts in \
                 quick succession); waiting for the wall clock before issuing counters"
            );
            tokio::time::sleep(wait).await;
        }
        let clock = Self {
            id: coordinator_id.to_owned(),
            store,
            clock: Mutex::new(HybridClock::resume(high_water)),
            observed: AtomicU64::new(0),
            max_skew_ms,
        };
        if high_water > counter_bound(crate::wallclock::now_ms(), 2 * max_skew_ms.max(60_000)) {
            tracing::warn!(
                coordinator = coordinator_id,
                high_water,
                ahead_ms = millis_ahead(high_water),
                "the clock's high-water mark lies far ahead of the wall clock (moved by a bad \
                 counter before max_clock_skew was enforced); counters stay above it"
            );
        }
        Ok(clock)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The highest counter accepted in a client's context now.
    pub fn bound(&self) -> u64 {
        self.bound_for(Source::Context)
    }

    /// The highest counter accepted from `source` now. A client's context: `max_clock_skew`
    /// ahead. A replica's version: twice that plus one reservation, since an honest version can
    /// lead this clock by that much: a peer whose clock ran `max_clock_skew` fast keeps issuing
    /// counters that far ahead after its clock is corrected (the HLC keeps the highest), a
    /// restart adds a reservation, and this clock may run `max_clock_skew` slow. With the
    /// tighter bound, such versions were not re-minted over, and blind writes through this
    /// coordinator were acknowledged without being applied (the fault suite's finding 5).
    pub fn bound_for(&self, source: Source) -> u64 {
        let ahead = match source {
            Source::Context => self.max_skew_ms,
            Source::Replica => 2 * self.max_skew_ms + DEFAULT_RESERVE_MS,
        };
        counter_bound(crate::wallclock::now_ms(), ahead)
    }

    /// Whether `counter` lies within the skew allowed for `source`; a counter beyond it is
    /// logged and counted (never adopted).
    pub fn trusts(&self, counter: u64, source: Source) -> bool {
        if counter <= self.bound_for(source) {
            return true;
        }
        metrics::counter!("pairdb_clock_far_ahead_total", "source" => source.as_str()).increment(1);
        tracing::warn!(
            counter,
            ahead_ms = millis_ahead(counter),
            source = source.as_str(),
            "a counter lies further ahead than max_clock_skew; not adopted"
        );
        false
    }

    /// The HLC receive rule: the next counter issued will be above `counter` (the highest
    /// counter of a version seen), unless it lies beyond the allowed skew.
    pub fn observe(&self, counter: u64, source: Source) {
        if counter > self.observed.load(Ordering::Relaxed) && self.trusts(counter, source) {
            self.observed.fetch_max(counter, Ordering::Relaxed);
        }
    }

    /// The highest counter of `clock` within the allowed skew (0 if none); counters beyond it
    /// are counted as far ahead.
    pub fn trusted_max(&self, clock: &VectorClock, source: Source) -> u64 {
        let bound = self.bound_for(source);
        let mut highest = 0;
        for (_, counter) in clock.iter() {
            if counter <= bound {
                highest = highest.max(counter);
            } else {
                self.trusts(counter, source);
            }
        }
        highest
    }

    /// The next counter, above `observed` (the causal context's highest trusted counter) and
    /// above every version observed so far. Fails rather than hand out a counter whose
    /// reservation could not be made durable; the clock then stays where it was.
    pub async fn next(&self, observed: u64) -> Result<u64, MetaError> {
        self.next_at(crate::wallclock::now_ms(), observed).await
    }

    /// [`CoordinatorClock::next`] at a given wall time (tests move it backwards).
    pub async fn next_at(&self, now_ms: u64, observed: u64) -> Result<u64, MetaError> {
        let observed = observed.max(self.observed.load(Ordering::Relaxed));
        let mut clock = self.clock.lock().await;
        let tick = clock.tick(now_ms, observed);
        if let Some(high_water) = tick.persist_high_water {
            self.store.store_clock(&self.id, high_water).await?;
        }
        clock.persisted(tick);
        Ok(tick.counter)
    }

    /// The last counter issued (or resumed from).
    pub async fn last(&self) -> u64 {
        self.clock.lock().await.last()
    }
}

/// How long a restarting coordinator waits before it issues counters: until its high-water
/// mark lies at most one reservation ahead of the wall clock. Nothing for a mark further ahead
/// than twice the allowed skew: that mark was moved by a bad counter long ago (see `resume`),
/// and waiting for it could take years.
pub fn resume_wait(high_water: u64, now_ms: u64, max_skew_ms: u64) -> std::time::Duration {
    let ahead = ((high_water >> LOGICAL_BITS) + CLOCK_EPOCH_MS).saturating_sub(now_ms);
    if ahead <= DEFAULT_RESERVE_MS || ahead > 2 * max_skew_ms.max(60_000) {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_millis(ahead - DEFAULT_RESERVE_MS)
}

/// How far a counter's physical part lies ahead of the wall clock, in milliseconds.
fn millis_ahead(counter: u64) -> u64 {
    ((counter >> LOGICAL_BITS) + CLOCK_EPOCH_MS).saturating_sub(crate::wallclock::now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vclock::physical_counter;

    /// How far `counter` lies ahead of `now_ms`.
    fn ahead_of(counter: u64, now_ms: u64) -> u64 {
        ((counter >> LOGICAL_BITS) + CLOCK_EPOCH_MS).saturating_sub(now_ms)
    }

    /// A coordinator that crashes right after its first write, restarts at once, and again:
    /// without the wait each restart moved its counters one more reservation ahead (ten
    /// restarts: 100 s, beyond the 60 s its peers trust); with it they stay within one.
    #[test]
    fn a_crash_loop_does_not_push_the_clock_ahead() {
        let skew = 60_000;
        let mut now = CLOCK_EPOCH_MS + 1_000_000_000;
        let mut mark = 0;
        let mut waited = 0;
        for restart in 0..10 {
            let wait = resume_wait(mark, now, skew);
            waited += wait.as_millis() as u64;
            now += wait.as_millis() as u64;
            let mut clock = HybridClock::resume(mark);
            let tick = clock.tick(now, 0);
            if let Some(m) = tick.persist_high_water {
                mark = m;
            }
            clock.persisted(tick);
            assert!(
                ahead_of(tick.counter, now) <= DEFAULT_RESERVE_MS,
                "restart {restart}: counters {} ms ahead",
                ahead_of(tick.counter, now)
            );
            now += 100;
        }
        assert!(waited > 0, "the loop must have made restarts wait");
    }

    #[test]
    fn a_mark_far_in_the_future_is_not_waited_for() {
        let now = CLOCK_EPOCH_MS + 1_000_000_000;
        let far = physical_counter(now + 3_600_000);
        assert_eq!(resume_wait(far, now, 60_000), std::time::Duration::ZERO);
        let near = physical_counter(now + DEFAULT_RESERVE_MS);
        assert_eq!(resume_wait(near, now, 60_000), std::time::Duration::ZERO);
        let between = physical_counter(now + 25_000);
        assert_eq!(
            resume_wait(between, now, 60_000),
            std::time::Duration::from_millis(15_000)
        );
    }
}
