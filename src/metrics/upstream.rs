//! The upstream family: connections to upstreams, their answers, timeouts and failures, retries
//! and concurrency limits, per configured upstream name.

use super::{counter, gauge, histogram, CONNECT_ERROR_KINDS, LATENCY_BUCKETS};
use super::{TIMEOUT_KINDS, UPSTREAM_FAILURE_KINDS};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use std::sync::Arc;

pub struct UpstreamFamily {
    response: HistogramVec,
    opened: IntCounterVec,
    closed: IntCounterVec,
    open: IntGaugeVec,
    connect_errors: IntCounterVec,
    timeouts: IntCounterVec,
    failures: IntCounterVec,
    retries: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    in_flight: IntGaugeVec,
    queue_length: IntGaugeVec,
    queue_wait: HistogramVec,
    concurrency_decisions: IntCounterVec,
}

impl UpstreamFamily {
    pub(super) fn register(r: &Registry) -> UpstreamFamily {
        UpstreamFamily {
            response: histogram(r, "sidelight_upstream_response_seconds", "Time from sending a request upstream to receiving its response headers.", &["upstream"], LATENCY_BUCKETS),
            opened: counter(r, "sidelight_upstream_connections_opened_total", "Connections opened to upstream endpoints.", &["upstream"]),
            closed: counter(r, "sidelight_upstream_connections_closed_total", "Upstream connections closed.", &["upstream"]),
            open: gauge(r, "sidelight_upstream_connections_open", "Upstream connections currently open (idle in the pool or busy).", &["upstream"]),
            connect_errors: counter(r, "sidelight_upstream_connect_errors_total", "Failed attempts to connect to an upstream, by kind (refused, dns, tls, other).", &["upstream", "kind"]),
            timeouts: counter(r, "sidelight_upstream_timeouts_total", "Upstream timeouts, by kind (connect, first_byte, idle, total).", &["upstream", "kind"]),
            failures: counter(r, "sidelight_upstream_failures_total", "Upstream exchanges that broke: reset before headers, an invalid response head (protocol), or body error after.", &["upstream", "kind"]),
            retries: counter(r, "sidelight_retries_total", "Requests sent again, by reason: connect_failure, reset, first_token_timeout, or the upstream status (429, 502, ...).", &["upstream", "reason"]),
            retry_budget_exhausted: counter(r, "sidelight_retry_budget_exhausted_total", "Retries not made because the upstream's retry budget was spent.", &["upstream"]),
            in_flight: gauge(r, "sidelight_upstream_requests_in_flight", "Requests holding a concurrency slot of an upstream (with upstreams[].concurrency).", &["upstream"]),
            queue_length: gauge(r, "sidelight_upstream_queue_length", "Requests waiting for a concurrency slot of an upstream.", &["upstream"]),
            queue_wait: histogram(r, "sidelight_upstream_queue_wait_seconds", "Time requests waited for a concurrency slot of an upstream.", &["upstream"], LATENCY_BUCKETS),
            concurrency_decisions: counter(r, "sidelight_upstream_concurrency_decisions_total", "Concurrency-limit decisions per upstream: allowed, queued, rejected (503 upstream_busy).", &["upstream", "result"]),
        }
    }

    /// What each request to `upstream` touches; every timeout and failure kind starts at zero.
    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        for kind in TIMEOUT_KINDS {
            self.timeouts.with_label_values(&[upstream, kind]);
        }
        for kind in UPSTREAM_FAILURE_KINDS {
            self.failures.with_label_values(&[upstream, kind]);
        }
        let timeout = |kind: &str| self.timeouts.with_label_values(&[upstream, kind]);
        UpstreamMetrics {
            response_time: self.response.with_label_values(&[upstream]),
            reset: self.failures.with_label_values(&[upstream, "reset"]),
            protocol_errors: self.failures.with_label_values(&[upstream, "protocol"]),
            body_errors: self.failures.with_label_values(&[upstream, "body"]),
            first_byte_timeouts: timeout("first_byte"),
            idle_timeouts: timeout("idle"),
            total_timeouts: timeout("total"),
        }
    }

    /// The connection counters of `upstream`'s pool.
    pub fn connections(&self, upstream: &str) -> ConnMetrics {
        ConnMetrics {
            opened: self.opened.with_label_values(&[upstream]),
            closed: self.closed.with_label_values(&[upstream]),
            open: self.open.with_label_values(&[upstream]),
            errors: CONNECT_ERROR_KINDS
                .map(|kind| self.connect_errors.with_label_values(&[upstream, kind])),
            timeouts: self.timeouts.with_label_values(&[upstream, "connect"]),
        }
    }

    /// Retries of `upstream`; `reasons` (the ones its routes can retry for) start at zero.
    pub fn retries<'a>(
        &self,
        upstream: &str,
        reasons: impl IntoIterator<Item = &'a str>,
    ) -> RetryMetrics {
        for reason in reasons {
            self.retries.with_label_values(&[upstream, reason]);
        }
        RetryMetrics {
            upstream: Arc::from(upstream),
            retries: self.retries.clone(),
            exhausted: self.retry_budget_exhausted.with_label_values(&[upstream]),
        }
    }

    /// `upstreams[].concurrency` of `upstream`.
    pub fn concurrency(&self, upstream: &str) -> ConcurrencyMetrics {
        let decision = |result: &str| {
            self.concurrency_decisions
                .with_label_values(&[upstream, result])
        };
        ConcurrencyMetrics {
            in_flight: self.in_flight.with_label_values(&[upstream]),
            queue_length: self.queue_length.with_label_values(&[upstream]),
            queue_wait: self.queue_wait.with_label_values(&[upstream]),
            allowed: decision("allowed"),
            queued: decision("queued"),
            rejected: decision("rejected"),
        }
    }
}

/// Metrics an upstream touches per request, resolved once.
#[derive(Clone)]
pub struct UpstreamMetrics {
    pub response_time: Histogram,
    pub reset: IntCounter,
    /// A response head that is not valid HTTP.
    pub protocol_errors: IntCounter,
    pub body_errors: IntCounter,
    pub first_byte_timeouts: IntCounter,
    pub idle_timeouts: IntCounter,
    pub total_timeouts: IntCounter,
}

/// Per-upstream connection counters, resolved once.
#[derive(Clone)]
pub struct ConnMetrics {
    pub opened: IntCounter,
    pub closed: IntCounter,
    pub open: IntGauge,
    /// Indexed like [`super::CONNECT_ERROR_KINDS`].
    pub errors: [IntCounter; 4],
    pub timeouts: IntCounter,
}

pub struct RetryMetrics {
    upstream: Arc<str>,
    retries: IntCounterVec,
    pub exhausted: IntCounter,
}

impl RetryMetrics {
    /// A retry for `reason` (a closed set: a few kinds and the configured statuses).
    pub fn retried(&self, reason: &str) {
        self.retries
            .with_label_values(&[&self.upstream, reason])
            .inc();
    }
}

pub struct ConcurrencyMetrics {
    pub in_flight: IntGauge,
    pub queue_length: IntGauge,
    pub queue_wait: Histogram,
    pub allowed: IntCounter,
    pub queued: IntCounter,
    pub rejected: IntCounter,
}
