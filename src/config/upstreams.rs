//! `upstreams:`: endpoints, health checks, balancing, retries' budget, pools, timeouts, TLS.

use super::*;

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
    pub expected_statuses: Option<Vec<StatusMatch>>,
    /// Passing probes in a row that bring an unhealthy endpoint back.
    #[serde(default = "default_hc_healthy")]
    pub healthy_threshold: u32,
    /// Failing probes in a row that take an endpoint out of rotation.
    #[serde(default = "default_hc_unhealthy")]
    pub unhealthy_threshold: u32,
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

fn default_budget_percent() -> f32 {
    20.0
}

fn default_budget_floor() -> u32 {
    3
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
