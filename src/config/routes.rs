//! `routes:`: matching, rewriting, retries, rate limits and dedup of each route.

use super::*;

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
    pub methods: Option<Vec<HttpMethod>>,
    /// Upstream statuses that are retried. Default: 429, 502, 503, 504, plus 529 (Anthropic's
    /// `overloaded_error`) on `anthropic` routes.
    #[serde(default)]
    pub statuses: Option<Vec<u16>>,
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
    pub rate: Rate,
    /// What the rate counts: `requests`, or LLM `tokens` (charged the request's estimate up
    /// front, corrected by the usage the upstream reports; `openai`/`anthropic` routes only).
    #[serde(default)]
    pub unit: RateUnit,
    /// Requests allowed at once above the steady rate (default: the rate's count).
    #[serde(default)]
    pub burst: Option<std::num::NonZeroU32>,
    /// `route` (one bucket), `credential` (per Authorization / x-api-key), `client_ip`, or
    /// `header:<name>`.
    #[serde(default = "default_limit_key")]
    pub key: RateLimitKey,
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

/// `dedup: true | false`, or `dedup: { methods: [GET, POST] }` to coalesce more than GET/HEAD
/// on a route without a cache (with a cache, `cache.methods` and its rules decide).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DedupConfig {
    Switch(bool),
    Methods(DedupMethods),
}

// By hand rather than `untagged`, so that a bad method is reported at its own field path.
impl<'de> Deserialize<'de> for DedupConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DedupConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or { methods: [...] }")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<DedupConfig, E> {
                Ok(DedupConfig::Switch(on))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DedupConfig, A::Error> {
                DedupMethods::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(DedupConfig::Methods)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupMethods {
    pub methods: Vec<ReadMethod>,
}

impl RouteConfig {
    /// Methods retried after a reset or a retryable status (see [`RetryConfig::methods`]).
    pub fn retry_methods(&self) -> Vec<http::Method> {
        match &self.retries.as_ref().and_then(|r| r.methods.as_ref()) {
            Some(methods) => methods.iter().map(|m| m.0.clone()).collect(),
            None => {
                let mut m = vec![http::Method::GET, http::Method::HEAD, http::Method::OPTIONS];
                if self.kind.is_llm() {
                    m.push(http::Method::POST);
                }
                m
            }
        }
    }

    /// Upstream statuses retried (see [`RetryConfig::statuses`]).
    pub fn retry_statuses(&self) -> Vec<u16> {
        match self.retries.as_ref().and_then(|r| r.statuses.clone()) {
            Some(statuses) => statuses,
            None => {
                let mut s = vec![429, 502, 503, 504];
                // Anthropic answers 529 overloaded_error where others answer 503.
                if self.kind == RouteKind::Anthropic {
                    s.push(529);
                }
                s
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
    pub fn dedup_methods(&self) -> Option<Vec<http::Method>> {
        match &self.dedup {
            Some(DedupConfig::Methods(m)) => Some(m.methods.iter().map(|m| m.0.clone()).collect()),
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

fn default_max_retries() -> u32 {
    2
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

fn default_limit_key() -> RateLimitKey {
    RateLimitKey::Route
}

fn default_max_keys() -> u64 {
    10_000
}

fn default_prefix() -> String {
    "/".into()
}
