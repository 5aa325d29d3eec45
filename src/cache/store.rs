//! The response store: a moka cache shared by every worker, bounded in bytes (each entry weighs
//! its body, headers and key), with a TTL per entry (routes set it; clients may shorten it).

use super::key::CacheKey;
use crate::metrics::cache::StoreMetrics;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use moka::notification::RemovalCause;
use moka::sync::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A complete, successful response as the upstream sent it.
#[derive(Debug)]
pub struct Stored {
    pub route: Arc<str>,
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body as the chunks it arrived in: a Server-Sent Events stream replays event by event.
    pub chunks: Vec<Bytes>,
    pub stored_at: Instant,
    /// Fresh for this long.
    pub ttl: Duration,
    /// Then served stale for up to this long while one background request refreshes it.
    pub grace: Duration,
}

impl Stored {
    pub fn body_len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        // Fixed overhead for the key, the struct and moka's bookkeeping.
        u32::try_from(self.body_len() + headers + 256).unwrap_or(u32::MAX)
    }

    /// Seconds of freshness left, negative once stale (RFC 9211 `ttl`).
    pub fn ttl_left(&self) -> i64 {
        let age = self.stored_at.elapsed();
        if age <= self.ttl {
            i64::try_from((self.ttl - age).as_secs()).unwrap_or(i64::MAX)
        } else {
            -i64::try_from((age - self.ttl).as_secs()).unwrap_or(i64::MAX) - 1
        }
    }

    pub fn is_fresh(&self) -> bool {
        self.stored_at.elapsed() < self.ttl
    }
}

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Arc<Stored>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &Arc<Stored>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.ttl + value.grace)
    }
}

#[derive(Clone)]
pub struct Store {
    cache: Cache<CacheKey, Arc<Stored>>,
    metrics: Arc<StoreMetrics>,
}

impl Store {
    pub fn new(max_bytes: u64, metrics: StoreMetrics) -> Store {
        let metrics = Arc::new(metrics);
        let evictions = metrics.evictions.clone();
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, v: &Arc<Stored>| v.weight())
            .expire_after(PerEntryTtl)
            .support_invalidation_closures()
            .eviction_listener(move |_, _, cause| {
                let cause = match cause {
                    RemovalCause::Expired => 0,
                    RemovalCause::Size => 1,
                    RemovalCause::Explicit => 2,
                    RemovalCause::Replaced => 3,
                };
                evictions[cause].inc();
            })
            .build();
        Store { cache, metrics }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Stored>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: CacheKey, value: Stored) {
        self.cache.insert(key, Arc::new(value));
        self.refresh_gauges();
    }

    /// Drops every entry, or those of one route. Returns how many entries there were before.
    pub fn purge(&self, route: Option<&str>) -> u64 {
        self.cache.run_pending_tasks();
        let before = self.cache.entry_count();
        match route {
            None => self.cache.invalidate_all(),
            Some(route) => {
                let route: Arc<str> = Arc::from(route);
                // Only fails when invalidation closures are not enabled; they are.
                let _ = self
                    .cache
                    .invalidate_entries_if(move |_, v| v.route == route);
            }
        }
        self.cache.run_pending_tasks();
        self.refresh_gauges();
        before
    }

    /// Entry count and weighted size, after applying pending evictions.
    pub fn stats(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        self.refresh_gauges();
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    fn refresh_gauges(&self) {
        self.metrics
            .entries
            .set(i64::try_from(self.cache.entry_count()).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .set(i64::try_from(self.cache.weighted_size()).unwrap_or(i64::MAX));
    }
}
