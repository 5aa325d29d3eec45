//! The YAML configuration, parsed once into typed structs with defaults, then validated.
//!
//! Every field is documented in `config/reference.yaml`. The rest of the crate only ever sees a
//! [`Config`] that passed [`Config::from_yaml`] (which runs validation and expands `${VARS}`).

mod postgres;
pub mod redact;
mod units;
mod validate;

mod cache;
mod cache_rules;
mod llm;
mod method;
mod process;
mod rate;
mod routes;
mod status;
mod upstreams;

pub use cache::*;
pub use cache_rules::{CacheRule, PathGlob, PathSegment, Preset};
pub use llm::*;
pub use method::{HttpMethod, ReadMethod};
pub use postgres::{
    AuthType, ClientSslMode, PgListenerConfig, PgPoolConfig, PgUserConfig, PoolMode,
    PostgresConfig, ServerSslMode, DEFAULT_MAX_PREPARED_STATEMENTS,
};
pub use process::*;
pub use rate::{Rate, RateLimitKey, RatePeriod};
pub use routes::*;
pub use status::StatusMatch;
pub use units::{ByteSize, EnvString};
pub use upstreams::*;
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
    /// and whatever may be a secret redacted (see [`redact`]).
    pub fn redacted_yaml(&self) -> String {
        let mut shown = self.clone();
        shown.postgres.redact();
        if let Some(token) = &mut shown.admin.token {
            *token = redact::secret(token);
        }
        for upstream in &mut shown.upstreams {
            for endpoint in upstream.endpoints.iter_mut() {
                *endpoint = redact::url(endpoint);
            }
            for (name, value) in upstream.headers.iter_mut() {
                let plain = redact::is_plain_header(name) && !self.is_secret_header(name);
                *value = redact::header_value(value, plain);
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

pub(super) fn default_max_wait() -> Duration {
    Duration::from_secs(5)
}

pub(super) fn default_max_queue() -> usize {
    100
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        name: default_listener_name(),
        address: SocketAddr::from(([127, 0, 0, 1], 8080)),
    }]
}

pub(super) fn default_listener_name() -> String {
    "main".into()
}

pub(super) fn default_true() -> bool {
    true
}
