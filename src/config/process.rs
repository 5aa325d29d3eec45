//! The process's own sections: listeners, admin, log, limits, shutdown and runtime.

use super::*;

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
    /// When set (`${ADMIN_TOKEN}`), every admin path but `/healthz` and `/readyz` needs
    /// `Authorization: Bearer <token>`. Empty (an unset `${ADMIN_TOKEN:-}`) means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<EnvString>,
}

impl AdminConfig {
    /// The token admin requests must carry, if one is set.
    pub fn token(&self) -> Option<&str> {
        self.token
            .as_ref()
            .map(|t| t.value.as_str())
            .filter(|t| !t.is_empty())
    }
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
    /// Client connections open at once on each listener (across workers); past it new ones are
    /// closed at once and counted (Envoy's `max_connections`, nginx's `worker_connections`).
    #[serde(default = "default_max_client_connections")]
    pub max_client_connections: usize,
    /// A request body that sends nothing for this long is answered 408 client_body_timeout
    /// (nginx's `client_body_timeout`): the wait is the client's, not the upstream's.
    #[serde(default = "default_client_body_timeout", with = "humantime_serde")]
    pub client_body_timeout: Duration,
    /// Request bodies of a known length up to this size are read whole before the request
    /// takes an upstream connection (0: off).
    #[serde(default = "default_request_buffering")]
    pub request_buffering_bytes: ByteSize,
    /// Request headers with `_` in their names (`Transfer_Encoding`) are dropped unless this is
    /// set (nginx's `underscores_in_headers off`): a server that reads `_` as `-` would otherwise
    /// see a header sidelight never checked.
    #[serde(default)]
    pub allow_underscores_in_headers: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
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

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin_address(),
            token: None,
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
            max_client_connections: default_max_client_connections(),
            client_body_timeout: default_client_body_timeout(),
            request_buffering_bytes: default_request_buffering(),
            allow_underscores_in_headers: false,
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

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}

fn default_log_level() -> String {
    "info".into()
}

fn default_max_body() -> ByteSize {
    ByteSize::mib(10)
}

fn default_max_in_flight() -> usize {
    10_000
}

fn default_request_buffering() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_client_body_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_client_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
