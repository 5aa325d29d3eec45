//! The cache family: lookups and stores per caching route, the store's size and evictions, and
//! upstream calls saved by the cache, coalescing and batching.

use super::{counter, int_gauge};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

/// Why an entry left the store: a closed set.
pub const EVICTION_CAUSES: [&str; 4] = ["expired", "size", "purged", "replaced"];

pub struct CacheFamily {
    lookups: IntCounterVec,
    stores: IntCounterVec,
    evictions: IntCounterVec,
    entries: IntGauge,
    bytes: IntGauge,
    coalesced: IntCounterVec,
    calls_saved: IntCounterVec,
}

impl CacheFamily {
    /// `calls_saved` is shared with embeddings batching, which saves calls too.
    pub(super) fn register(r: &Registry, calls_saved: IntCounterVec) -> CacheFamily {
        CacheFamily {
            lookups: counter(r, "sidelight_cache_lookups_total", "Cache lookups on caching routes, by result: hit, stale (served while refreshing), miss, bypass (not cacheable), refresh (client asked for a fresh answer).", &["route", "result"]),
            stores: counter(r, "sidelight_cache_stores_total", "Responses stored in the cache.", &["route"]),
            evictions: counter(r, "sidelight_cache_evictions_total", "Entries removed from the cache, by cause: expired, size, purged, replaced.", &["cause"]),
            entries: int_gauge(r, "sidelight_cache_entries", "Entries in the response cache."),
            bytes: int_gauge(r, "sidelight_cache_bytes", "Bytes held by the response cache (bodies, headers, keys), bounded by cache.max_bytes."),
            coalesced: counter(r, "sidelight_coalesced_requests_total", "Requests answered by joining an identical request already in flight.", &["route"]),
            calls_saved,
        }
    }

    /// The handles of a route with caching or coalescing on.
    pub fn route(&self, route: &str) -> CacheRouteMetrics {
        let lookup = |result: &str| self.lookups.with_label_values(&[route, result]);
        CacheRouteMetrics {
            hit: lookup("hit"),
            miss: lookup("miss"),
            bypass: lookup("bypass"),
            refresh: lookup("refresh"),
            stale: lookup("stale"),
            stores: self.stores.with_label_values(&[route]),
            coalesced: self.coalesced.with_label_values(&[route]),
            saved_cache: self.calls_saved.with_label_values(&[route, "cache"]),
            saved_dedup: self.calls_saved.with_label_values(&[route, "dedup"]),
        }
    }

    /// The store's gauges and eviction counters (one store per process).
    pub fn store(&self) -> StoreMetrics {
        StoreMetrics {
            evictions: EVICTION_CAUSES.map(|cause| self.evictions.with_label_values(&[cause])),
            entries: self.entries.clone(),
            bytes: self.bytes.clone(),
        }
    }
}

pub struct CacheRouteMetrics {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub bypass: IntCounter,
    pub refresh: IntCounter,
    pub stale: IntCounter,
    pub stores: IntCounter,
    pub coalesced: IntCounter,
    pub saved_cache: IntCounter,
    pub saved_dedup: IntCounter,
}

pub struct StoreMetrics {
    /// Indexed like [`EVICTION_CAUSES`].
    pub evictions: [IntCounter; 4],
    pub entries: IntGauge,
    pub bytes: IntGauge,
}
