//! Every metric sidelight exports, in one place: names, help texts, labels and buckets.
//!
//! Conventions: names start with `sidelight_`, values are in base units (seconds, bytes), and
//! every label comes from a closed set (configured route/upstream/listener names, status classes,
//! a fixed list of methods and error kinds) so cardinality stays bounded.

pub mod model_labels;
pub mod postgres;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// From 1 ms to 5 minutes: fast database calls and slow LLM generations in one histogram.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
];

/// What the sidecar itself costs is measured in microseconds.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

/// Time to the first token of an LLM stream: tens of milliseconds to minutes.
pub const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    60.0, 120.0,
];

/// Time per output token: 1000 tokens/s down to 1 token/s.
pub const TOKEN_TIME_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

/// LLM timeout kinds: a closed set.
pub const LLM_TIMEOUT_KINDS: &[&str] = &["first_token", "token_gap"];

/// Batch sizes, in inputs or requests: powers of two up to well past any provider's limit.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// A batch's wait is bounded by its `max_wait`, typically milliseconds.
pub const BATCH_WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Route label for requests that matched no route.
pub const NO_ROUTE: &str = "_none";

/// Error kinds for connection failures: a closed set.
pub const CONNECT_ERROR_KINDS: [&str; 4] = ["refused", "dns", "tls", "other"];
/// Timeout kinds: a closed set.
pub const TIMEOUT_KINDS: &[&str] = &["connect", "first_byte", "idle", "total"];
/// Failures of an established upstream exchange: a closed set.
pub const UPSTREAM_FAILURE_KINDS: &[&str] = &["reset", "protocol", "body"];
/// Why sidelight closed a client connection without handing a request to a route.
pub const PROTOCOL_ERROR_KINDS: [&str; 3] = ["bad_request", "headers_too_large", "header_timeout"];

/// Values of the `method` label: the standard methods, anything else is `other`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "other",
];
/// Values of the `status_class` label.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &http::Method) -> usize {
    match *method {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::PUT => 2,
        http::Method::DELETE => 3,
        http::Method::HEAD => 4,
        http::Method::OPTIONS => 5,
        http::Method::PATCH => 6,
        _ => 7,
    }
}

fn status_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

pub fn method_label(method: &http::Method) -> &'static str {
    METHODS[method_index(method)]
}

pub fn status_class(status: http::StatusCode) -> &'static str {
    STATUS_CLASSES[status_index(status)]
}

/// `sidelight_requests_total` children of one route, created on first use and then reached
/// without hashing labels on every request.
pub struct RequestCounters {
    vec: IntCounterVec,
    route: String,
    upstream: String,
    children: [[std::sync::OnceLock<IntCounter>; 5]; 8],
}

impl RequestCounters {
    pub fn new(metrics: &Metrics, route: &str, upstream: &str) -> Self {
        RequestCounters {
            vec: metrics.requests.clone(),
            route: route.to_string(),
            upstream: upstream.to_string(),
            children: Default::default(),
        }
    }

    pub fn get(&self, method: &http::Method, status: http::StatusCode) -> &IntCounter {
        let (m, s) = (method_index(method), status_index(status));
        self.children[m][s].get_or_init(|| {
            self.vec.with_label_values(&[
                &self.route,
                &self.upstream,
                METHODS[m],
                STATUS_CLASSES[s],
            ])
        })
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub overhead: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub errors: IntCounterVec,
    pub upstream_response: HistogramVec,
    pub upstream_connections_opened: IntCounterVec,
    pub upstream_connections_closed: IntCounterVec,
    pub upstream_connections_open: IntGaugeVec,
    pub upstream_connect_errors: IntCounterVec,
    pub upstream_timeouts: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub downstream_connections: IntCounterVec,
    pub downstream_connections_open: IntGaugeVec,
    pub downstream_connections_refused: IntCounterVec,
    pub downstream_protocol_errors: IntCounterVec,
    pub request_headers_dropped: IntCounterVec,
    pub overloaded: IntCounter,
    pub request_bodies_buffered: IntCounterVec,
    pub cache_lookups: IntCounterVec,
    pub cache_stores: IntCounterVec,
    pub cache_evictions: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub coalesced: IntCounterVec,
    pub ratelimit_decisions: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    pub endpoint_in_flight: IntGaugeVec,
    pub endpoint_cooldowns: IntCounterVec,
    pub endpoint_ejected: IntGaugeVec,
    pub endpoint_ejections: IntCounterVec,
    pub endpoint_healthy: IntGaugeVec,
    pub route_healthy: IntGaugeVec,
    pub endpoint_response: HistogramVec,
    pub health_checks: IntCounterVec,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub upstream_queue_length: IntGaugeVec,
    pub upstream_queue_wait: HistogramVec,
    pub upstream_concurrency_decisions: IntCounterVec,
    pub ratelimit_queue_wait: HistogramVec,
    pub ratelimit_queue_length: IntGaugeVec,
    pub upstream_calls_saved: IntCounterVec,
    pub embeddings_batch_inputs: HistogramVec,
    pub embeddings_batch_requests: HistogramVec,
    pub embeddings_batch_wait: HistogramVec,
    pub embeddings_cached_inputs: IntCounterVec,
    pub embeddings_pending_inputs: IntGaugeVec,
    pub llm_tokens: IntCounterVec,
    pub llm_requests: IntCounterVec,
    pub llm_time_to_first_token: HistogramVec,
    pub llm_time_per_output_token: HistogramVec,
    pub llm_stream_duration: HistogramVec,
    pub llm_tokens_avoided: IntCounterVec,
    pub llm_cached_prompt_tokens: IntCounterVec,
    pub llm_usage_estimated: IntCounterVec,
    pub llm_timeouts: IntCounterVec,
    pub llm_stream_errors: IntCounterVec,
    /// The bounded `model` label of each LLM route, shared by every worker (so the first N
    /// models are the first N of the process, not of each worker).
    llm_models: std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Arc<model_labels::ModelLabels>>,
    >,
    pub build_info: IntGaugeVec,
    pub ready: IntGauge,
    /// The PostgreSQL pooler's family.
    pub pg: postgres::PgMetrics,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c =
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("{name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    g
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    h
}

impl Metrics {
    /// Builds the registry. Names and labels are constants, so a failure here is a programming
    /// error caught by every test, never something a request can trigger.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            requests: counter(&r, "sidelight_requests_total", "Requests answered, by route, upstream, method and status class.", &["route", "upstream", "method", "status_class"]),
            request_duration: histogram(&r, "sidelight_request_duration_seconds", "Time from request arrival to the last response byte.", &["route"], LATENCY_BUCKETS),
            overhead: histogram(&r, "sidelight_overhead_seconds", "Time sidelight's own work adds before response headers: time to headers minus every wait on something else (the upstream's headers on every attempt, an LLM stream held for its first token, rate-limit and concurrency queues, retry backoff; those have their own histograms).", &["route"], OVERHEAD_BUCKETS),
            in_flight: gauge(&r, "sidelight_requests_in_flight", "Requests currently being handled.", &["route"]),
            request_bytes: counter(&r, "sidelight_request_bytes_total", "Request body bytes received from clients.", &["route"]),
            response_bytes: counter(&r, "sidelight_response_bytes_total", "Response body bytes sent to clients.", &["route"]),
            errors: counter(&r, "sidelight_errors_total", "Responses generated by sidelight itself, by error type.", &["route", "type"]),
            upstream_response: histogram(&r, "sidelight_upstream_response_seconds", "Time from sending a request upstream to receiving its response headers.", &["upstream"], LATENCY_BUCKETS),
            upstream_connections_opened: counter(&r, "sidelight_upstream_connections_opened_total", "Connections opened to upstream endpoints.", &["upstream"]),
            upstream_connections_closed: counter(&r, "sidelight_upstream_connections_closed_total", "Upstream connections closed.", &["upstream"]),
            upstream_connections_open: gauge(&r, "sidelight_upstream_connections_open", "Upstream connections currently open (idle in the pool or busy).", &["upstream"]),
            upstream_connect_errors: counter(&r, "sidelight_upstream_connect_errors_total", "Failed attempts to connect to an upstream, by kind (refused, dns, tls, other).", &["upstream", "kind"]),
            upstream_timeouts: counter(&r, "sidelight_upstream_timeouts_total", "Upstream timeouts, by kind (connect, first_byte, idle, total).", &["upstream", "kind"]),
            upstream_failures: counter(&r, "sidelight_upstream_failures_total", "Upstream exchanges that broke: reset before headers, an invalid response head (protocol), or body error after.", &["upstream", "kind"]),
            downstream_connections: counter(&r, "sidelight_downstream_connections_total", "Client connections accepted.", &["listener"]),
            downstream_connections_open: gauge(&r, "sidelight_downstream_connections_open", "Client connections currently open.", &["listener"]),
            downstream_connections_refused: counter(&r, "sidelight_downstream_connections_refused_total", "Client connections closed on arrival because limits.max_client_connections were open on the listener.", &["listener"]),
            downstream_protocol_errors: counter(&r, "sidelight_downstream_protocol_errors_total", "Client connections closed for a malformed or oversized request head, or none within limits.header_read_timeout.", &["listener", "kind"]),
            request_headers_dropped: counter(&r, "sidelight_request_headers_dropped_total", "Request header fields dropped because their names have an underscore (limits.allow_underscores_in_headers is off).", &["listener"]),
            request_bodies_buffered: counter(&r, "sidelight_request_bodies_buffered_total", "Request bodies read whole (limits.request_buffering_bytes) before the request took an upstream connection.", &["route"]),
            overloaded: {
                let c = IntCounter::new("sidelight_overloaded_total", "Requests refused with 503 because max_in_flight_requests was reached.")
                    .unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(c.clone())).unwrap_or_else(|e| panic!("{e}"));
                c
            },
            cache_lookups: counter(&r, "sidelight_cache_lookups_total", "Cache lookups on caching routes, by result: hit, stale (served while refreshing), miss, bypass (not cacheable), refresh (client asked for a fresh answer).", &["route", "result"]),
            cache_stores: counter(&r, "sidelight_cache_stores_total", "Responses stored in the cache.", &["route"]),
            cache_evictions: counter(&r, "sidelight_cache_evictions_total", "Entries removed from the cache, by cause: expired, size, purged, replaced.", &["cause"]),
            cache_entries: {
                let g = IntGauge::new("sidelight_cache_entries", "Entries in the response cache.").unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("{e}"));
                g
            },
            cache_bytes: {
                let g = IntGauge::new("sidelight_cache_bytes", "Bytes held by the response cache (bodies, headers, keys), bounded by cache.max_bytes.").unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("{e}"));
                g
            },
            coalesced: counter(&r, "sidelight_coalesced_requests_total", "Requests answered by joining an identical request already in flight.", &["route"]),
            ratelimit_decisions: counter(&r, "sidelight_ratelimit_decisions_total", "Rate-limit decisions, by route, limit and result: allowed, queued, rejected, shadow_rejected (a shadow limit only counts).", &["route", "limit", "result"]),
            upstream_in_flight: gauge(&r, "sidelight_upstream_requests_in_flight", "Requests holding a concurrency slot of an upstream (with upstreams[].concurrency).", &["upstream"]),
            endpoint_in_flight: gauge(&r, "sidelight_endpoint_requests_in_flight", "Requests in flight at each endpoint (what the balancer compares).", &["upstream", "endpoint"]),
            endpoint_cooldowns: counter(&r, "sidelight_endpoint_cooldowns_total", "Times an endpoint was taken out of rotation because it answered 429 (for its Retry-After).", &["upstream"]),
            endpoint_ejected: gauge(&r, "sidelight_endpoint_ejected", "1 while an endpoint is ejected by outlier detection (consecutive failures).", &["upstream", "endpoint"]),
            endpoint_ejections: counter(&r, "sidelight_endpoint_ejections_total", "Endpoints ejected after consecutive connect errors, resets or 5xx.", &["upstream"]),
            endpoint_healthy: gauge(&r, "sidelight_endpoint_healthy", "1 while an endpoint passes its active health checks and is not ejected.", &["upstream", "endpoint"]),
            route_healthy: gauge(&r, "sidelight_route_healthy", "1 while a route's upstream has at least one healthy endpoint; /readyz is 503 while some route has none.", &["route"]),
            endpoint_response: histogram(&r, "sidelight_endpoint_response_seconds", "Time from sending a request to an endpoint until its response headers.", &["upstream", "endpoint"], LATENCY_BUCKETS),
            health_checks: counter(&r, "sidelight_health_checks_total", "Active health check probes, by result: success, failure (unexpected status or connection error), timeout.", &["upstream", "result"]),
            retries: counter(&r, "sidelight_retries_total", "Requests sent again, by reason: connect_failure, reset, first_token_timeout, or the upstream status (429, 502, ...).", &["upstream", "reason"]),
            retry_budget_exhausted: counter(&r, "sidelight_retry_budget_exhausted_total", "Retries not made because the upstream's retry budget was spent.", &["upstream"]),
            upstream_queue_length: gauge(&r, "sidelight_upstream_queue_length", "Requests waiting for a concurrency slot of an upstream.", &["upstream"]),
            upstream_queue_wait: histogram(&r, "sidelight_upstream_queue_wait_seconds", "Time requests waited for a concurrency slot of an upstream.", &["upstream"], LATENCY_BUCKETS),
            upstream_concurrency_decisions: counter(&r, "sidelight_upstream_concurrency_decisions_total", "Concurrency-limit decisions per upstream: allowed, queued, rejected (503 upstream_busy).", &["upstream", "result"]),
            ratelimit_queue_wait: histogram(&r, "sidelight_ratelimit_queue_wait_seconds", "Time queued requests waited for a rate-limit slot.", &["route", "limit"], LATENCY_BUCKETS),
            ratelimit_queue_length: gauge(&r, "sidelight_ratelimit_queue_length", "Requests waiting for a rate-limit slot.", &["route", "limit"]),
            upstream_calls_saved: counter(&r, "sidelight_upstream_calls_saved_total", "Upstream calls not made, by reason: cache (a hit), dedup (coalesced) or batch (embeddings requests merged into one call).", &["route", "reason"]),
            embeddings_batch_inputs: histogram(&r, "sidelight_embeddings_batch_inputs", "Inputs per upstream embeddings call on batching routes.", &["route"], BATCH_SIZE_BUCKETS),
            embeddings_batch_requests: histogram(&r, "sidelight_embeddings_batch_requests", "Client requests merged into each upstream embeddings call on batching routes.", &["route"], BATCH_SIZE_BUCKETS),
            embeddings_batch_wait: histogram(&r, "sidelight_embeddings_batch_wait_seconds", "Time an embeddings request waited for its batch to be sent.", &["route"], BATCH_WAIT_BUCKETS),
            embeddings_pending_inputs: gauge(&r, "sidelight_embeddings_pending_inputs", "Embedding inputs waiting in batches not sent yet.", &["route"]),
            embeddings_cached_inputs: counter(&r, "sidelight_embeddings_cached_inputs_total", "Embedding inputs answered from the per-input cache (not sent upstream).", &["route"]),
            llm_tokens: counter(&r, "sidelight_llm_tokens_total", "Tokens of LLM requests sent upstream, as the upstream reported them (or estimated), by kind: prompt (cached prompt tokens included) or completion; summing over kind counts every token once.", &["route", "model", "kind"]),
            llm_cached_prompt_tokens: counter(&r, "sidelight_llm_cached_prompt_tokens_total", "Prompt tokens the provider served from its own prompt cache (billed cheaper): a part of sidelight_llm_tokens_total{kind=\"prompt\"}, not in addition to it.", &["route", "model"]),
            llm_requests: counter(&r, "sidelight_llm_requests_total", "LLM requests, by model and status class (cache hits included).", &["route", "model", "status_class"]),
            llm_time_to_first_token: histogram(&r, "sidelight_llm_time_to_first_token_seconds", "Time from request arrival to the first generated token of an LLM stream (from upstream).", &["route", "model"], TTFT_BUCKETS),
            llm_time_per_output_token: histogram(&r, "sidelight_llm_time_per_output_token_seconds", "Time between output tokens of an LLM stream after the first (1 / output tokens per second).", &["route", "model"], TOKEN_TIME_BUCKETS),
            llm_stream_duration: histogram(&r, "sidelight_llm_stream_duration_seconds", "Time from request arrival to the end of an LLM stream (from upstream).", &["route", "model"], LATENCY_BUCKETS),
            llm_tokens_avoided: counter(&r, "sidelight_llm_tokens_avoided_total", "Tokens (prompt + completion) of LLM answers served without an upstream call, by source: cache or dedup: spend avoided.", &["route", "model", "source"]),
            llm_usage_estimated: counter(&r, "sidelight_llm_usage_estimated_total", "LLM responses whose usage the upstream did not report, so sidelight estimated it.", &["route", "model"]),
            llm_timeouts: counter(&r, "sidelight_llm_timeouts_total", "LLM streams cut by a timeout, by kind: first_token (504 before anything was sent) or token_gap (stream ended with an error event).", &["route", "kind"]),
            llm_stream_errors: counter(&r, "sidelight_llm_stream_errors_total", "LLM streams that broke and were ended with a provider-shaped error event and a cut body (or, while held for the first token, answered 502 and retried), by kind: truncated (ended without its terminal event), malformed (an event whose JSON does not parse), upstream_closed (the upstream connection broke mid-stream).", &["route", "kind"]),
            llm_models: Default::default(),
            build_info: gauge(&r, "sidelight_build_info", "Always 1; labels carry the build version.", &["version"]),
            ready: {
                let g = IntGauge::new("sidelight_ready", "1 when listeners are bound and the config is loaded, 0 while starting or draining.")
                    .unwrap_or_else(|e| panic!("{e}"));
                r.register(Box::new(g.clone())).unwrap_or_else(|e| panic!("{e}"));
                g
            },
            pg: postgres::PgMetrics::new(&r),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Creates the series of closed label sets up front, so dashboards and `rate()` see zeros
    /// instead of missing series before the first event.
    pub fn init_route(&self, route: &str) {
        self.in_flight.with_label_values(&[route]);
        self.request_bytes.with_label_values(&[route]);
        self.request_bodies_buffered.with_label_values(&[route]);
        self.response_bytes.with_label_values(&[route]);
    }

    /// Series of an upstream's concurrency limit.
    pub fn init_concurrency(&self, upstream: &str) {
        self.upstream_in_flight.with_label_values(&[upstream]);
        self.upstream_queue_length.with_label_values(&[upstream]);
        self.upstream_queue_wait.with_label_values(&[upstream]);
        for result in ["allowed", "queued", "rejected"] {
            self.upstream_concurrency_decisions
                .with_label_values(&[upstream, result]);
        }
    }

    /// Series of one rate limit.
    pub fn init_rate_limit(&self, route: &str, limit: &str) {
        for result in ["allowed", "queued", "rejected", "shadow_rejected"] {
            self.ratelimit_decisions
                .with_label_values(&[route, limit, result]);
        }
        self.ratelimit_queue_wait.with_label_values(&[route, limit]);
        self.ratelimit_queue_length
            .with_label_values(&[route, limit]);
    }

    /// Series of a route with caching or coalescing on.
    pub fn init_cache_route(&self, route: &str) {
        for result in ["hit", "stale", "miss", "bypass", "refresh"] {
            self.cache_lookups.with_label_values(&[route, result]);
        }
        self.cache_stores.with_label_values(&[route]);
        self.coalesced.with_label_values(&[route]);
        for reason in ["cache", "dedup"] {
            self.upstream_calls_saved
                .with_label_values(&[route, reason]);
        }
        for cause in ["expired", "size", "purged", "replaced"] {
            self.cache_evictions.with_label_values(&[cause]);
        }
    }

    /// Series of an LLM route.
    pub fn init_llm_route(&self, route: &str) {
        for kind in LLM_TIMEOUT_KINDS {
            self.llm_timeouts.with_label_values(&[route, kind]);
        }
        for fault in crate::error::StreamFault::ALL {
            self.llm_stream_errors
                .with_label_values(&[route, fault.label()]);
        }
    }

    /// The `model` label bound of an LLM route, created by the first worker that asks.
    pub fn llm_models(
        &self,
        route: &str,
        allowed: &[String],
        max: usize,
    ) -> std::sync::Arc<model_labels::ModelLabels> {
        let mut map = self
            .llm_models
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(route.to_string())
            .or_insert_with(|| std::sync::Arc::new(model_labels::ModelLabels::new(allowed, max)))
            .clone()
    }

    /// Series of a route with embeddings batching on.
    pub fn init_batch_route(&self, route: &str) {
        self.embeddings_batch_inputs.with_label_values(&[route]);
        self.embeddings_batch_requests.with_label_values(&[route]);
        self.embeddings_batch_wait.with_label_values(&[route]);
        self.embeddings_cached_inputs.with_label_values(&[route]);
        self.embeddings_pending_inputs.with_label_values(&[route]);
        for reason in ["batch", "cache"] {
            self.upstream_calls_saved
                .with_label_values(&[route, reason]);
        }
    }

    pub fn init_upstream(&self, upstream: &str) {
        self.upstream_connections_opened
            .with_label_values(&[upstream]);
        self.upstream_connections_closed
            .with_label_values(&[upstream]);
        self.upstream_connections_open
            .with_label_values(&[upstream]);
        for kind in CONNECT_ERROR_KINDS {
            self.upstream_connect_errors
                .with_label_values(&[upstream, kind]);
        }
        for kind in TIMEOUT_KINDS {
            self.upstream_timeouts.with_label_values(&[upstream, kind]);
        }
        for kind in UPSTREAM_FAILURE_KINDS {
            self.upstream_failures.with_label_values(&[upstream, kind]);
        }
    }

    pub fn init_listener(&self, listener: &str) {
        self.downstream_connections.with_label_values(&[listener]);
        self.downstream_connections_open
            .with_label_values(&[listener]);
        self.downstream_connections_refused
            .with_label_values(&[listener]);
        self.request_headers_dropped.with_label_values(&[listener]);
        for kind in PROTOCOL_ERROR_KINDS {
            self.downstream_protocol_errors
                .with_label_values(&[listener, kind]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A per-route handle on the metrics a request always touches, resolved once at start-up so the
/// hot path does no label hashing for them.
#[derive(Clone)]
pub struct RouteMetrics {
    pub duration: Histogram,
    pub overhead: Histogram,
    pub in_flight: IntGauge,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
}

impl RouteMetrics {
    pub fn new(metrics: &Metrics, route: &str) -> Self {
        metrics.init_route(route);
        RouteMetrics {
            duration: metrics.request_duration.with_label_values(&[route]),
            overhead: metrics.overhead.with_label_values(&[route]),
            in_flight: metrics.in_flight.with_label_values(&[route]),
            request_bytes: metrics.request_bytes.with_label_values(&[route]),
            response_bytes: metrics.response_bytes.with_label_values(&[route]),
        }
    }
}
