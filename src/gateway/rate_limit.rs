//! Per-tenant rate limits (API.md, "Rate limits"): one GCRA limiter (governor) per tenant and
//! kind (write or read), allowing `limit` requests per minute with bursts up to `limit`.
//! Defaults come from `[gateway] write_rate_limit` / `read_rate_limit`, overrides per tenant
//! from `[gateway.tenant_limits.<tenant>]`. Limits are per gateway process.
//!
//! Every decision reports what the `X-RateLimit-*` headers need: the limit, the requests left
//! now, and when the bucket is full again (unix seconds); a refusal adds how long to wait.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::RwLock;

use crate::config::TenantLimits;

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
/// A tenant's limit per minute and its limiter.
type Budget<C> = (u32, Arc<Limiter<C>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Write,
    Read,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the tenant's bucket is full again.
    pub reset_unix: u64,
    /// For a refusal: how long until one request is allowed.
    pub retry_after: Duration,
}

/// The limits of every tenant. `C` is the clock the buckets refill by: the real one, or in
/// tests governor's `FakeRelativeClock`, advanced by hand.
pub struct RateLimits<C: Clock = DefaultClock> {
    default_write: u32,
    default_read: u32,
    per_tenant: BTreeMap<String, TenantLimits>,
    limiters: RwLock<HashMap<(String, Kind), Budget<C>>>,
    clock: C,
}

impl RateLimits {
    pub fn new(write: u32, read: u32, per_tenant: BTreeMap<String, TenantLimits>) -> Self {
        Self::with_clock(write, read, per_tenant, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(
        write: u32,
        read: u32,
        per_tenant: BTreeMap<String, TenantLimits>,
        clock: C,
    ) -> Self {
        Self {
            default_write: write,
            default_read: read,
            per_tenant,
            limiters: RwLock::new(HashMap::new()),
            clock,
        }
    }

    /// Requests per minute allowed to `tenant` for (writes, reads).
    pub fn limits_of(&self, tenant: &str) -> (u32, u32) {
        (
            self.limit_of(tenant, Kind::Write),
            self.limit_of(tenant, Kind::Read),
        )
    }

    /// The tenants with limits of their own, in id order.
    pub fn configured_tenants(&self) -> impl Iterator<Item = &str> {
        self.per_tenant.keys().map(String::as_str)
    }

    fn limit_of(&self, tenant: &str, kind: Kind) -> u32 {
        let custom = self.per_tenant.get(tenant).and_then(|l| match kind {
            Kind::Write => l.write,
            Kind::Read => l.read,
        });
        custom.unwrap_or(match kind {
            Kind::Write => self.default_write,
            Kind::Read => self.default_read,
        })
    }

    fn limiter(&self, tenant: &str, kind: Kind) -> Budget<C> {
        let key = (tenant.to_owned(), kind);
        if let Some(found) = self.limiters.read().get(&key) {
            return found.clone();
        }
        let limit = self.limit_of(tenant, kind).max(1);
        let per_minute = NonZeroU32::new(limit).unwrap_or(NonZeroU32::MIN);
        let limiter = Arc::new(
            RateLimiter::direct_with_clock(Quota::per_minute(per_minute), self.clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
        );
        self.limiters
            .write()
            .entry(key)
            .or_insert((limit, limiter))
            .clone()
    }

    /// Takes one request of `kind` from `tenant`'s budget, if there is one.
    pub fn check(&self, tenant: &str, kind: Kind) -> Decision {
        self.check_n(tenant, kind, 1)
    }

    /// Takes `n` requests of `kind` from `tenant`'s budget at once (a batch of `n` items), or
    /// none. More than the whole budget (the limit per minute) is refused, with the wait for a
    /// full bucket.
    pub fn check_n(&self, tenant: &str, kind: Kind, n: u32) -> Decision {
        let (limit, limiter) = self.limiter(tenant, kind);
        let per_request = Duration::from_secs(60) / limit;
        let now_unix = crate::wallclock::now_secs();
        let refused = |wait: Duration| Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_unix: now_unix + (per_request * limit).as_secs(),
            retry_after: wait,
        };
        let Some(cells) = NonZeroU32::new(n.max(1)) else {
            return refused(per_request);
        };
        match limiter.check_n(cells) {
            Ok(Ok(snapshot)) => {
                let remaining = snapshot.remaining_burst_capacity();
                let refill = per_request * (limit - remaining.min(limit));
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    reset_unix: now_unix + refill.as_secs_f64().ceil() as u64,
                    retry_after: Duration::ZERO,
                }
            }
            Ok(Err(not_until)) => refused(not_until.wait_time_from(self.clock.now())),
            // More than the bucket holds: it never fits.
            Err(_) => refused(Duration::from_secs(60)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_runs_out_and_reports_it() {
        let mut per_tenant = BTreeMap::new();
        per_tenant.insert(
            "big".to_owned(),
            TenantLimits {
                write: Some(100),
                read: None,
            },
        );
        let clock = governor::clock::FakeRelativeClock::default();
        let limits = RateLimits::with_clock(3, 10, per_tenant, clock);
        let first = limits.check("acme", Kind::Write);
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (3, 2));
        assert!(limits.check("acme", Kind::Write).allowed);
        assert!(limits.check("acme", Kind::Write).allowed);
        let refused = limits.check("acme", Kind::Write);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        // Other tenants and the other kind have their own budgets.
        assert!(limits.check("other", Kind::Write).allowed);
        assert_eq!(limits.check("acme", Kind::Read).limit, 10);
        assert_eq!(limits.check("big", Kind::Write).limit, 100);
    }

    #[test]
    fn an_empty_bucket_refills_one_request_per_share_of_the_minute() {
        // 3 per minute: one request back every 20 s, the whole burst after a minute.
        let clock = governor::clock::FakeRelativeClock::default();
        let limits = RateLimits::with_clock(3, 10, BTreeMap::new(), clock.clone());
        for _ in 0..3 {
            assert!(limits.check("acme", Kind::Write).allowed);
        }
        let refused = limits.check("acme", Kind::Write);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        clock.advance(Duration::from_secs(19));
        let early = limits.check("acme", Kind::Write);
        assert!(!early.allowed);
        assert_eq!(early.retry_after, Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        assert!(limits.check("acme", Kind::Write).allowed);
        assert!(!limits.check("acme", Kind::Write).allowed);
        clock.advance(Duration::from_secs(60));
        let full = limits.check("acme", Kind::Write);
        assert!(full.allowed);
        assert_eq!(full.remaining, 2);
        assert!(limits.check("acme", Kind::Write).allowed);
        assert!(limits.check("acme", Kind::Write).allowed);
        assert!(!limits.check("acme", Kind::Write).allowed);
    }

    #[test]
    fn a_batch_takes_its_items_from_the_budget_or_nothing() {
        let clock = governor::clock::FakeRelativeClock::default();
        let limits = RateLimits::with_clock(10, 10, BTreeMap::new(), clock);
        let batch = limits.check_n("acme", Kind::Write, 7);
        assert!(batch.allowed);
        assert_eq!(batch.remaining, 3);
        assert!(
            !limits.check_n("acme", Kind::Write, 4).allowed,
            "4 > 3 left"
        );
        assert_eq!(
            limits.check("acme", Kind::Write).remaining,
            2,
            "a refusal takes nothing"
        );
        assert!(
            !limits.check_n("other", Kind::Write, 11).allowed,
            "more than the limit"
        );
        assert!(limits.check_n("other", Kind::Write, 10).allowed);
    }
}
