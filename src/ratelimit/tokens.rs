//! Token buckets for LLM token limits (tokens per minute).
//!
//! Unlike request limits these need two things governor's GCRA does not offer: a charge is
//! corrected after the fact (the estimate made before sending becomes the usage the upstream
//! reports), and a correction may push a bucket into debt (a long answer used more than
//! estimated), which later requests then wait out. So this is a plain token bucket whose level
//! may go below zero; keys live in a bounded moka cache, as request limits' do.

use super::Decision;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

struct Level {
    /// Tokens available now; negative while in debt.
    tokens: f64,
    at: Instant,
}

/// One key's bucket.
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    level: Mutex<Level>,
}

impl TokenBucket {
    fn new(capacity: f64, per_second: f64) -> Self {
        TokenBucket {
            capacity,
            per_second,
            level: Mutex::new(Level {
                tokens: capacity,
                at: Instant::now(),
            }),
        }
    }

    fn with_level<T>(&self, f: impl FnOnce(&mut f64) -> T) -> T {
        // A poisoned lock only means another request panicked mid-update; the level is a
        // number, still usable.
        let mut level = self.level.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(level.at).as_secs_f64() * self.per_second;
        level.tokens = (level.tokens + refill).min(self.capacity);
        level.at = now;
        f(&mut level.tokens)
    }

    /// Takes `cost` tokens if they are there. A cost above the whole capacity passes when the
    /// bucket is full (it could never pass otherwise) and leaves it in debt.
    pub fn charge(&self, cost: u64) -> Decision {
        let cost = cost as f64;
        let (capacity, rate) = (self.capacity, self.per_second);
        self.with_level(|tokens| {
            if *tokens >= cost || *tokens >= capacity {
                *tokens -= cost;
                Decision::Allowed {
                    remaining: tokens.max(0.0) as u32,
                }
            } else {
                let missing = cost.min(capacity) - *tokens;
                Decision::Limited {
                    wait: Duration::from_secs_f64((missing / rate).max(0.001)),
                }
            }
        })
    }

    /// Corrects an earlier charge: `delta` more tokens were used than charged (negative: fewer,
    /// given back, never above the capacity).
    pub fn adjust(&self, delta: i64) {
        let capacity = self.capacity;
        self.with_level(|tokens| *tokens = (*tokens - delta as f64).min(capacity));
    }
}

/// One token limit's per-key buckets.
pub struct TokenBuckets {
    capacity: f64,
    per_second: f64,
    keys: moka::sync::Cache<String, Arc<TokenBucket>>,
    /// The empty key's bucket (a route-wide limit's only one), held without a cache lookup.
    unkeyed: Arc<TokenBucket>,
}

impl TokenBuckets {
    /// `count` tokens per `per`, with `burst` tokens of capacity (default `count`).
    pub fn new(count: u32, per: Duration, burst: Option<u32>, max_keys: u64) -> Self {
        let capacity = f64::from(burst.unwrap_or(count).max(1));
        let per_second = f64::from(count) / per.as_secs_f64().max(f64::MIN_POSITIVE);
        // An idle key's bucket is full again after this long, so forgetting it changes nothing.
        let refill = Duration::from_secs_f64((capacity / per_second).clamp(1.0, 86_400.0));
        TokenBuckets {
            capacity,
            per_second,
            unkeyed: Arc::new(TokenBucket::new(capacity, per_second)),
            keys: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(refill)
                .build(),
        }
    }

    pub fn bucket(&self, key: &str) -> Arc<TokenBucket> {
        if key.is_empty() {
            return self.unkeyed.clone();
        }
        self.keys.get_with_by_ref(key, || {
            Arc::new(TokenBucket::new(self.capacity, self.per_second))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allowed { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn charges_refill_and_corrections() {
        // 6000 tokens per minute: 100 per second, 6000 at once.
        let buckets = TokenBuckets::new(6000, Duration::from_secs(60), None, 10);
        let b = buckets.bucket("k");
        assert!(allowed(b.charge(5000)));
        match b.charge(2000) {
            Decision::Limited { wait } => assert_eq!(wait, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
        // The request used 1000 tokens less than estimated: they come back.
        b.adjust(-1000);
        assert!(allowed(b.charge(2000)));
        // One that used 3000 more than charged puts the bucket in debt...
        b.adjust(3000);
        match b.charge(100) {
            Decision::Limited { wait } => assert_eq!(wait, Duration::from_secs(31)),
            other => panic!("{other:?}"),
        }
        // ...which time pays back.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(allowed(b.charge(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_over_a_window_within_five_percent() {
        let buckets = TokenBuckets::new(60_000, Duration::from_secs(60), Some(1000), 10);
        let b = buckets.bucket("k");
        let mut admitted = 0u64;
        // 60 s of requests of 100 tokens every 10 ms (10x the rate).
        for _ in 0..6000 {
            if allowed(b.charge(100)) {
                admitted += 100;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let expected = 60_000.0 + 1000.0;
        assert!(
            (admitted as f64 - expected).abs() <= expected * 0.05,
            "admitted {admitted}, expected ~{expected}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_bucket_passes_when_it_is_full() {
        let buckets = TokenBuckets::new(1000, Duration::from_secs(60), None, 10);
        let b = buckets.bucket("k");
        assert!(allowed(b.charge(5000)));
        assert!(!allowed(b.charge(1)));
        assert!(!allowed(buckets.bucket("k").charge(5000)));
        assert!(allowed(buckets.bucket("other").charge(10)));
    }
}
