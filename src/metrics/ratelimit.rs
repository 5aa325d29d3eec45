//! The rate-limit family: decisions and queues of each route's configured limits.

use super::{counter, gauge, histogram, LATENCY_BUCKETS};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

pub struct RateLimitFamily {
    decisions: IntCounterVec,
    queue_wait: HistogramVec,
    queue_length: IntGaugeVec,
}

impl RateLimitFamily {
    pub(super) fn register(r: &Registry) -> RateLimitFamily {
        RateLimitFamily {
            decisions: counter(r, "sidelight_ratelimit_decisions_total", "Rate-limit decisions, by route, limit and result: allowed, queued, rejected, shadow_rejected (a shadow limit only counts).", &["route", "limit", "result"]),
            queue_wait: histogram(r, "sidelight_ratelimit_queue_wait_seconds", "Time queued requests waited for a rate-limit slot.", &["route", "limit"], LATENCY_BUCKETS),
            queue_length: gauge(r, "sidelight_ratelimit_queue_length", "Requests waiting for a rate-limit slot.", &["route", "limit"]),
        }
    }

    /// The handles of `route`'s limit named `limit`.
    pub fn limit(&self, route: &str, limit: &str) -> LimitMetrics {
        let decision = |result: &str| self.decisions.with_label_values(&[route, limit, result]);
        LimitMetrics {
            allowed: decision("allowed"),
            queued: decision("queued"),
            rejected: decision("rejected"),
            shadow_rejected: decision("shadow_rejected"),
            queue_wait: self.queue_wait.with_label_values(&[route, limit]),
            queue_length: self.queue_length.with_label_values(&[route, limit]),
        }
    }
}

pub struct LimitMetrics {
    pub allowed: IntCounter,
    pub queued: IntCounter,
    pub rejected: IntCounter,
    pub shadow_rejected: IntCounter,
    pub queue_wait: Histogram,
    pub queue_length: IntGauge,
}
