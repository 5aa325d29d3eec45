//! The YAML configuration, parsed once into typed structs with defaults, then validated.
//!
//! Every field is documented in `config/reference.yaml`. The rest of the crate only ever sees a
//! [`Config`] that passed [`Config::from_yaml`] (which runs validation and expands `${VARS}`).

mod postgres;
mod units;
mod validate;

pub use postgres::{
    AuthType, PgListenerConfig, PgPoolConfig, PgUserConfig, PoolMode, PostgresConfig,
};
pub use units::{ByteSize, EnvString};
pub use validate::FieldError;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration could not be used. `Invalid` lists every problem found, by field path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", FieldError::join(.0))]
    Invalid(Vec<FieldError>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the proxy accepts application traffic.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The PostgreSQL pooler (off without listeners).
    #[serde(default)]
    pub postgres: PostgresConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    #[serde(default = "default_listener_name")]
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback by default: metrics and `/config` are for the pod, not the network.
    #[serde(default = "default_admin_address")]
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `sidelight=debug,hyper=info`, ... `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// One line per request at target `sidelight::access`.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Header names, beyond the built-in secret ones, whose values are never logged or shown.
    #[serde(default)]
    pub redact_headers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests with a larger body are answered 413 (routes may override).
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: ByteSize,
    /// Past this many requests in flight across all listeners, new ones get 503 (overloaded).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_requests: usize,
    /// A client connection that takes longer to send a request head (idle keep-alive time
    /// included) is closed: the slowloris guard (nginx's `client_header_timeout`).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// The response store shared by every route that caches.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bound on everything stored (bodies, headers, keys); least valuable entries go first.
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: ByteSize,
    /// Past this much buffered body, an in-flight request takes no more followers.
    #[serde(default = "default_coalesce_buffer")]
    pub coalesce_max_buffer_bytes: ByteSize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: default_cache_max_bytes(),
            coalesce_max_buffer_bytes: default_coalesce_buffer(),
        }
    }
}

fn default_cache_max_bytes() -> ByteSize {
    ByteSize::mib(256)
}
fn default_coalesce_buffer() -> ByteSize {
    ByteSize::mib(8)
}

/// A route's cache: off unless present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Methods that may be cached when no presets or rules are set.
    #[serde(default = "default_cache_methods")]
    pub methods: Vec<String>,
    /// Larger responses are passed through, not stored.
    #[serde(default = "default_cache_max_body")]
    pub max_body_bytes: ByteSize,
    /// Request headers that change the answer, so they are part of the key.
    #[serde(default)]
    pub vary_headers: Vec<String>,
    /// Top-level JSON request fields that do not change the answer (left out of the key).
    #[serde(default)]
    pub ignore_json_fields: Vec<String>,
    /// Where the client's credential is read; its hash partitions the cache per tenant.
    #[serde(default = "default_credential_headers")]
    pub credential_headers: Vec<String>,
    /// Built-in read-only request rules for HTTP databases.
    #[serde(default)]
    pub presets: Vec<crate::cache::rules::Preset>,
    /// Extra cacheable (methods, path glob) pairs.
    #[serde(default)]
    pub rules: Vec<crate::cache::rules::Rule>,
    /// After the TTL, serve the stale entry for up to this long while one background request
    /// refreshes it (never a herd).
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
}

fn default_cache_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}
fn default_cache_max_body() -> ByteSize {
    ByteSize::mib(4)
}
fn default_credential_headers() -> Vec<String> {
    vec!["authorization".into(), "x-api-key".into()]
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads, each with its own event loop, sockets and upstream pools (like nginx's
    /// worker_processes or Envoy's concurrency). 0: one per CPU available to the process.
    #[serde(default)]
    pub workers: usize,
}

impl RuntimeConfig {
    pub fn effective_workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URLs (`https://api.openai.com`, `http://10.0.0.5:8123/base`); `${VARS}` allowed.
    pub endpoints: Vec<EnvString>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Headers added to (or overriding) every request sent to this upstream; `${VARS}` allowed.
    /// A header is not sent when a variable it references is empty or unset with an empty
    /// default, so `Bearer ${OPENAI_API_KEY:-}` means "send the key when there is one".
    #[serde(default)]
    pub headers: BTreeMap<String, EnvString>,
    #[serde(default)]
    pub tls: TlsConfig,
    /// At most this many requests at the upstream at once (off when absent).
    #[serde(default)]
    pub concurrency: Option<ConcurrencyConfig>,
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
    /// Active health checks (off when absent).
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub load_balancing: LoadBalancingConfig,
    /// Caps the retries of every route to this upstream, so retries cannot multiply an outage.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
}

/// Active health checks: each endpoint is probed on its own, every `interval`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The probe's path. Default: `/v1/models` when an `openai` or `anthropic` route uses the
    /// upstream (cheap, never billed), `/` otherwise.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default = "default_hc_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_hc_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Statuses that count as healthy: codes (`200`) or classes (`2xx`). Default: `2xx`, and on
    /// an LLM upstream that holds no key of its own (the apps bring theirs) also 401 and 403:
    /// the endpoint answered, which is what the probe asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_statuses: Option<Vec<String>>,
    /// Passing probes in a row that bring an unhealthy endpoint back.
    #[serde(default = "default_hc_healthy")]
    pub healthy_threshold: u32,
    /// Failing probes in a row that take an endpoint out of rotation.
    #[serde(default = "default_hc_unhealthy")]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_hc_healthy() -> u32 {
    2
}
fn default_hc_unhealthy() -> u32 {
    3
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancingConfig {
    /// Compare endpoints by requests in flight times their recent response time (EWMA), not by
    /// requests in flight alone: slow endpoints get less traffic.
    #[serde(default)]
    pub latency_weighted: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed as a share of requests over the last 10 s.
    #[serde(default = "default_budget_percent")]
    pub percent: f32,
    /// Retries allowed per second on top, so a quiet upstream can still retry.
    #[serde(default = "default_budget_floor")]
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: default_budget_percent(),
            min_per_second: default_budget_floor(),
        }
    }
}

fn default_budget_percent() -> f32 {
    20.0
}
fn default_budget_floor() -> u32 {
    3
}

/// A route's retry policy: off unless present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Methods retried after a reset or a retryable status. Default: GET, HEAD, OPTIONS, plus
    /// POST on `openai`/`anthropic` routes. A connect failure is retried for every method: the
    /// request never left.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Upstream statuses that are retried.
    #[serde(default = "default_retry_statuses")]
    pub statuses: Vec<u16>,
    /// First retry waits up to this long (full jitter), doubling each retry.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_retry_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// When no other endpoint can take the retry, an upstream `Retry-After` up to this long is
    /// waited for; a longer one sends the upstream's answer to the client.
    #[serde(default = "default_max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,
}

fn default_max_retries() -> u32 {
    2
}
fn default_retry_statuses() -> Vec<u16> {
    vec![429, 502, 503, 504]
}
fn default_retry_backoff() -> Duration {
    Duration::from_millis(25)
}
fn default_retry_max_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_retry_after() -> Duration {
    Duration::from_secs(5)
}

/// Passive health checks: endpoints that keep failing are taken out of rotation for a while.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Connect errors, resets and 5xx in a row that eject an endpoint (0: off).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u64,
    /// The first ejection lasts this long, the n-th n times as long (at most 10x).
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Never eject more than this share of the endpoints; at least one always stays.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

fn default_consecutive_failures() -> u64 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejected_percent() -> u8 {
    50
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    pub max_in_flight: usize,
    /// Longest a request waits for a slot before 503.
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// Requests waiting at most; one more gets 503 at once.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// Below Node.js's 5 s keep-alive default, the lowest common upstream value, so that a pooled
    /// socket is dropped by us before the server closes it under us (a classic source of 502s).
    #[serde(default = "default_pool_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// `https`: offer h2 by ALPN. `http`: speak h2c with prior knowledge.
    #[serde(default)]
    pub http2: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect plus TLS handshake.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to receiving response headers (non-streaming LLM calls wait for
    /// the whole generation here, hence the generous default).
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte: Duration,
    /// Longest gap between two response body chunks.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle: Duration,
    /// Whole request, from arrival to the last response byte.
    #[serde(default = "default_total_timeout", with = "humantime_serde")]
    pub total: Duration,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Extra PEM CA certificates trusted for this upstream, on top of the built-in web PKI roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Used as the `route` metric label; defaults to the upstream's name.
    #[serde(default)]
    pub name: String,
    /// What the route carries: `http` (a plain proxy, nothing parsed), `openai` or `anthropic`
    /// (the LLM features in `src/llm/` read models, usage and stream events).
    #[serde(default)]
    pub kind: RouteKind,
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    pub upstream: String,
    /// Remove the matched prefix before forwarding (`/openai/v1/x` -> `/v1/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this one (`/openai/` -> `/v1/`).
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Overrides `limits.max_request_body_bytes` for this route.
    #[serde(default)]
    pub max_request_body_bytes: Option<ByteSize>,
    /// Response cache for this route (off when absent).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
    /// Share one upstream call among identical in-flight requests. Default: on when the route
    /// caches, off otherwise.
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// Request rate limits, checked in order before the cache and the upstream.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Retries on another endpoint (off when absent).
    #[serde(default)]
    pub retries: Option<RetryConfig>,
    /// LLM accounting and stream timeouts (`kind: openai | anthropic` routes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmConfig>,
    /// Embeddings micro-batching (`kind: openai` routes only; off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchConfig>,
}

/// Concurrent `POST .../embeddings` requests merged into one upstream call.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is sent as soon as it holds this many inputs.
    #[serde(default = "default_batch_max_inputs")]
    pub max_inputs: usize,
    /// ... or this long after its first request arrived, whichever comes first.
    #[serde(default = "default_batch_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// ... or before its inputs would take more than this many bytes (no bound when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<ByteSize>,
    /// What an upstream error does to the batch.
    #[serde(default)]
    pub on_error: BatchOnError,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_inputs: default_batch_max_inputs(),
            max_wait: default_batch_max_wait(),
            max_body_bytes: None,
            on_error: BatchOnError::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchOnError {
    /// Every request of the batch gets the upstream's error.
    #[default]
    Fail,
    /// A 4xx about the input: the batch is retried in halves to isolate the request that caused it.
    Split,
}

fn default_batch_max_inputs() -> usize {
    256
}
fn default_batch_max_wait() -> Duration {
    Duration::from_millis(5)
}

/// A route's LLM options; every field has a default, so `llm` can be left out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Ask an OpenAI upstream for usage in streams (`stream_options.include_usage`) even when
    /// the client did not; the extra chunk is removed from what that client receives.
    /// Default: true on `openai` routes (Anthropic streams always carry usage).
    #[serde(default = "default_true")]
    pub include_usage: bool,
    /// A stream that sends no content token for this long after the request is failed with 504
    /// `first_token_timeout` (nothing has reached the client yet). Off when absent.
    #[serde(default, with = "humantime_serde")]
    pub first_token_timeout: Option<Duration>,
    /// After the first token, a longer gap between two tokens ends the stream with an error
    /// event. Off when absent.
    #[serde(default, with = "humantime_serde")]
    pub max_token_gap: Option<Duration>,
    /// The values of the `model` metric label. Empty: the first `max_models` models seen.
    /// Anything else is `other`.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_max_models")]
    pub max_models: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            include_usage: true,
            first_token_timeout: None,
            max_token_gap: None,
            models: Vec::new(),
            max_models: default_max_models(),
        }
    }
}

fn default_max_models() -> usize {
    20
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    #[default]
    Http,
    Openai,
    Anthropic,
}

impl RouteKind {
    pub fn is_llm(self) -> bool {
        self != RouteKind::Http
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateUnit {
    #[default]
    Requests,
    Tokens,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitMode {
    /// Over the limit: 429 with Retry-After.
    #[default]
    Reject,
    /// Over the limit: wait for a slot, up to `max_wait` and `max_queue` waiting requests.
    Queue,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The `limit` metric label and what 429 bodies name.
    pub name: String,
    /// `100/s`, `600/min`, `5000/h`: requests, or tokens with `unit: tokens`.
    pub rate: String,
    /// What the rate counts: `requests`, or LLM `tokens` (charged the request's estimate up
    /// front, corrected by the usage the upstream reports; `openai`/`anthropic` routes only).
    #[serde(default)]
    pub unit: RateUnit,
    /// Requests allowed at once above the steady rate (default: the rate's count).
    #[serde(default)]
    pub burst: Option<u32>,
    /// `route` (one bucket), `credential` (per Authorization / x-api-key), `client_ip`, or
    /// `header:<name>`.
    #[serde(default = "default_limit_key")]
    pub key: String,
    #[serde(default)]
    pub mode: RateLimitMode,
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Count and log what would be rejected, reject nothing (to tune limits in production).
    #[serde(default)]
    pub shadow: bool,
    /// Distinct keys tracked at most; idle keys are forgotten first.
    #[serde(default = "default_max_keys")]
    pub max_keys: u64,
}

fn default_limit_key() -> String {
    "route".into()
}
fn default_max_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_max_queue() -> usize {
    100
}
fn default_max_keys() -> u64 {
    10_000
}

/// `dedup: true | false`, or `dedup: { methods: [GET, POST] }` to coalesce more than GET/HEAD
/// on a route without a cache (with a cache, `cache.methods` and its rules decide).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum DedupConfig {
    Switch(bool),
    Methods(DedupMethods),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupMethods {
    pub methods: Vec<String>,
}

impl RouteConfig {
    /// Methods retried after a reset or a retryable status (see [`RetryConfig::methods`]).
    pub fn retry_methods(&self) -> Vec<String> {
        match self.retries.as_ref().and_then(|r| r.methods.clone()) {
            Some(methods) => methods,
            None => {
                let mut m: Vec<String> = ["GET", "HEAD", "OPTIONS"].map(String::from).to_vec();
                if self.kind.is_llm() {
                    m.push("POST".into());
                }
                m
            }
        }
    }

    pub fn dedup_enabled(&self) -> bool {
        match &self.dedup {
            Some(DedupConfig::Switch(on)) => *on,
            Some(DedupConfig::Methods(_)) => true,
            None => self.cache.is_some(),
        }
    }

    /// The route's LLM options (defaults when `llm` is absent).
    pub fn llm_config(&self) -> LlmConfig {
        self.llm.clone().unwrap_or_default()
    }

    /// Methods coalesced on a route without a cache.
    pub fn dedup_methods(&self) -> Option<&[String]> {
        match &self.dedup {
            Some(DedupConfig::Methods(m)) => Some(&m.methods),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Matches whole path segments: `/openai` matches `/openai` and `/openai/v1`, not `/openaix`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Exact host (port ignored, case-insensitive) or `*.example.com`.
    #[serde(default)]
    pub host: Option<String>,
    /// Only on this listener (by name); all listeners when absent.
    #[serde(default)]
    pub listener: Option<String>,
}

impl Default for MatchConfig {
    fn default() -> Self {
        MatchConfig {
            path_prefix: default_prefix(),
            host: None,
            listener: None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a file, expanding `${VARS}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML text; `env` resolves `${VARS}`.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde_yaml prefixes its own (shorter) path; ours is the complete one.
            let message = match message.split_once(": ") {
                Some((head, rest)) if !head.contains(' ') => rest.to_string(),
                _ => message,
            };
            ConfigError::Invalid(vec![FieldError::new(
                if path == "." { String::new() } else { path },
                message,
            )])
        })?;
        let errors = validate::validate(&mut config, env);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.address).collect()
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The effective config as YAML for `/config`: defaults filled in, `${VARS}` shown as written,
    /// and literal values of secret headers replaced.
    pub fn redacted_yaml(&self) -> String {
        let mut shown = self.clone();
        shown.postgres.redact();
        for upstream in &mut shown.upstreams {
            for (name, value) in upstream.headers.iter_mut() {
                if !value.uses_env() && self.is_secret_header(name) {
                    *value = EnvString::literal("<redacted>");
                }
            }
        }
        serde_yaml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Headers whose values never appear in logs or `/config`.
    pub fn is_secret_header(&self, name: &str) -> bool {
        const BUILT_IN: &[&str] = &[
            "authorization",
            "proxy-authorization",
            "x-api-key",
            "api-key",
            "cookie",
            "set-cookie",
        ];
        BUILT_IN.iter().any(|h| h.eq_ignore_ascii_case(name))
            || self
                .log
                .redact_headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: default_listener_name(),
        address: SocketAddr::from(([127, 0, 0, 1], 8080)),
    }]
}
fn default_listener_name() -> String {
    "main".into()
}
fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}
fn default_true() -> bool {
    true
}
fn default_max_body() -> ByteSize {
    ByteSize::mib(10)
}
fn default_max_in_flight() -> usize {
    10_000
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_idle() -> usize {
    64
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(4)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_total_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_prefix() -> String {
    "/".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin_address(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
            access_log: true,
            redact_headers: Vec::new(),
        }
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_body_bytes: default_max_body(),
            max_in_flight_requests: default_max_in_flight(),
            header_read_timeout: default_header_read_timeout(),
        }
    }
}
impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: default_drain_timeout(),
        }
    }
}
impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_idle_per_endpoint: default_max_idle(),
            idle_timeout: default_pool_idle(),
            http2: false,
        }
    }
}
impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: default_connect_timeout(),
            first_byte: default_first_byte_timeout(),
            idle: default_idle_timeout(),
            total: default_total_timeout(),
        }
    }
}
