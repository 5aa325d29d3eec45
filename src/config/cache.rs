//! `cache:` (the shared response store) and a route's `cache:`.

use super::*;

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

/// A route's cache: off unless present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Methods that may be cached when no presets or rules are set.
    #[serde(default = "default_cache_methods")]
    pub methods: Vec<HttpMethod>,
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
    pub presets: Vec<Preset>,
    /// Extra cacheable (methods, path glob) pairs.
    #[serde(default)]
    pub rules: Vec<CacheRule>,
    /// After the TTL, serve the stale entry for up to this long while one background request
    /// refreshes it (never a herd).
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
}

fn default_cache_max_bytes() -> ByteSize {
    ByteSize::mib(256)
}

fn default_coalesce_buffer() -> ByteSize {
    ByteSize::mib(8)
}

fn default_cache_methods() -> Vec<HttpMethod> {
    vec![
        HttpMethod::of(http::Method::GET),
        HttpMethod::of(http::Method::HEAD),
    ]
}

fn default_cache_max_body() -> ByteSize {
    ByteSize::mib(4)
}

fn default_credential_headers() -> Vec<String> {
    vec!["authorization".into(), "x-api-key".into()]
}
