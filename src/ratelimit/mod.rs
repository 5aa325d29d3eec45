//! Request rate limits (GCRA, via governor) and LLM token limits ([`tokens`]), per route, keyed
//! by the whole route, the client's credential, a header or the client IP.
//!
//! Each key gets its own governor limiter. Keys live in a bounded moka cache: idle keys are
//! evicted, and its frequency-based admission keeps a flood of one-off random keys from pushing
//! out the clients that are actually busy, so memory stays bounded whatever clients send.

pub mod concurrency;
pub mod layer;
pub mod tokens;

use crate::config::{Rate, RatePeriod};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// GCRA quota: one cell every `period / count`, with `burst` cells of headroom (default: one
/// period's worth, so `600/min` may come as 600 at once).
pub fn quota(rate: &Rate, burst: Option<NonZeroU32>) -> Quota {
    let base = match rate.per {
        RatePeriod::Second => Quota::per_second(rate.count),
        RatePeriod::Minute => Quota::per_minute(rate.count),
        RatePeriod::Hour => Quota::per_hour(rate.count),
    };
    base.allow_burst(burst.unwrap_or(rate.count))
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        remaining: u32,
    },
    /// Over the limit: the request would fit after `wait`.
    Limited {
        wait: Duration,
    },
}

/// One limit's per-key buckets.
pub struct Buckets<C: Clock = DefaultClock> {
    quota: Quota,
    clock: C,
    keys: moka::sync::Cache<String, Arc<Limiter<C>>>,
    /// The bucket of the empty key: a route-wide limit's only one (and that of requests a
    /// per-header limit finds no header on). Held directly, it costs no cache lookup.
    unkeyed: Limiter<C>,
}

impl<C> Buckets<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    pub fn new(quota: Quota, clock: C, max_keys: u64) -> Self {
        // A key idle this long has a full bucket again, so forgetting it changes nothing.
        let refill = quota.replenish_interval() * quota.burst_size().get();
        Buckets {
            quota,
            unkeyed: RateLimiter::direct_with_clock(quota, clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
            keys: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(refill.max(Duration::from_secs(1)))
                .build(),
        }
    }

    pub fn check(&self, key: &str) -> Decision {
        let keyed;
        let limiter = if key.is_empty() {
            &self.unkeyed
        } else {
            keyed = self.keys.get_with_by_ref(key, || {
                Arc::new(
                    RateLimiter::direct_with_clock(self.quota, self.clock.clone())
                        .with_middleware::<StateInformationMiddleware>(),
                )
            });
            &*keyed
        };
        match limiter.check() {
            Ok(snapshot) => Decision::Allowed {
                remaining: snapshot.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Limited {
                wait: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Keys currently tracked (after pending evictions).
    pub fn tracked_keys(&self) -> u64 {
        self.keys.run_pending_tasks();
        self.keys.entry_count()
    }
}

/// Whole seconds to wait, never 0 (`Retry-After: 0` invites an immediate retry storm).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// Over a measured window the limit admits its rate, within 5%, plus the burst.
    #[test]
    fn enforces_the_rate_over_a_window() {
        let clock = FakeRelativeClock::default();
        let rate = Rate::parse("100/s").unwrap();
        let buckets = Buckets::new(quota(&rate, NonZeroU32::new(10)), clock.clone(), 100);
        let mut allowed = 0;
        // 10 s of a client trying every millisecond.
        for _ in 0..10_000 {
            if matches!(buckets.check("k"), Decision::Allowed { .. }) {
                allowed += 1;
            }
            clock.advance(Duration::from_millis(1));
        }
        let expected = 100.0 * 10.0 + 10.0;
        assert!(
            (allowed as f64 - expected).abs() <= expected * 0.05,
            "allowed {allowed}, expected ~{expected}"
        );
    }

    #[test]
    fn keys_are_independent_and_limited_requests_learn_when_to_come_back() {
        let clock = FakeRelativeClock::default();
        let buckets = Buckets::new(
            quota(&Rate::parse("1/s").unwrap(), NonZeroU32::new(1)),
            clock.clone(),
            100,
        );
        assert_eq!(buckets.check("a"), Decision::Allowed { remaining: 0 });
        assert!(matches!(buckets.check("b"), Decision::Allowed { .. }));
        match buckets.check("a") {
            Decision::Limited { wait } => assert_eq!(wait, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::from_secs(1));
        assert!(matches!(buckets.check("a"), Decision::Allowed { .. }));
    }

    #[test]
    fn tracked_keys_are_bounded() {
        let buckets = Buckets::new(
            quota(&Rate::parse("1/s").unwrap(), None),
            FakeRelativeClock::default(),
            50,
        );
        for i in 0..5_000 {
            buckets.check(&format!("random-{i}"));
        }
        assert!(buckets.tracked_keys() <= 50, "{}", buckets.tracked_keys());
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
