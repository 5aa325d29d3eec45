//! Every metric sidelight exports: names, help texts, labels and buckets, one family per
//! subsystem (as linkerd2-proxy's `OutboundMetrics::register`). Each family registers its
//! series and resolves its own labelled handles (`metrics.upstream.upstream(name)`,
//! `metrics.cache.route(route)`, ...), so no other module builds label sets by hand.
//!
//! - `http`: requests through routes; `listener`: client connections.
//! - `upstream`: upstream connections, answers, retries, concurrency limits.
//! - `balancer`: endpoints, outlier ejection, active health checks.
//! - `cache`, `ratelimit`, `llm` (with embeddings batching), `postgres`.
//!
//! Conventions: names start with `sidelight_`, values are in base units (seconds, bytes), and
//! every label comes from a closed set (configured route/upstream/listener names, status classes,
//! a fixed list of methods and error kinds) so cardinality stays bounded.

pub mod balancer;
pub mod cache;
pub mod http;
pub mod listener;
pub mod llm;
pub mod model_labels;
pub mod postgres;
pub mod ratelimit;
pub mod upstream;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
pub const LLM_TIMEOUT_KINDS: [&str; 2] = ["first_token", "token_gap"];

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

fn method_index(method: &::http::Method) -> usize {
    match *method {
        ::http::Method::GET => 0,
        ::http::Method::POST => 1,
        ::http::Method::PUT => 2,
        ::http::Method::DELETE => 3,
        ::http::Method::HEAD => 4,
        ::http::Method::OPTIONS => 5,
        ::http::Method::PATCH => 6,
        _ => 7,
    }
}

fn status_index(status: ::http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

pub fn method_label(method: &::http::Method) -> &'static str {
    METHODS[method_index(method)]
}

pub fn status_class(status: ::http::StatusCode) -> &'static str {
    STATUS_CLASSES[status_index(status)]
}

pub struct Metrics {
    registry: Registry,
    pub http: http::HttpFamily,
    pub listeners: listener::ListenerFamily,
    pub upstream: upstream::UpstreamFamily,
    pub balancer: balancer::BalancerFamily,
    pub cache: cache::CacheFamily,
    pub ratelimit: ratelimit::RateLimitFamily,
    pub llm: llm::LlmFamily,
    /// The PostgreSQL pooler's family.
    pub pg: postgres::PgMetrics,
    /// 1 while serving; 0 while starting or draining.
    pub ready: IntGauge,
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

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    c
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}"));
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
        let calls_saved = counter(&r, "sidelight_upstream_calls_saved_total", "Upstream calls not made, by reason: cache (a hit), dedup (coalesced) or batch (embeddings requests merged into one call).", &["route", "reason"]);
        gauge(
            &r,
            "sidelight_build_info",
            "Always 1; labels carry the build version.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        Metrics {
            http: http::HttpFamily::register(&r),
            listeners: listener::ListenerFamily::register(&r),
            upstream: upstream::UpstreamFamily::register(&r),
            balancer: balancer::BalancerFamily::register(&r),
            cache: cache::CacheFamily::register(&r, calls_saved.clone()),
            ratelimit: ratelimit::RateLimitFamily::register(&r),
            llm: llm::LlmFamily::register(&r, calls_saved),
            pg: postgres::PgMetrics::new(&r),
            ready: int_gauge(&r, "sidelight_ready", "1 when listeners are bound and the config is loaded, 0 while starting or draining."),
            registry: r,
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
