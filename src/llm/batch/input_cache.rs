//! The per-input embedding cache: each input's vector stored on its own in the shared response
//! store, so a request whose inputs were partly seen before sends only the others upstream.
//!
//! The key is a [`CacheKey`] of the same canonical form as whole responses (route, path, query,
//! vary headers, hashed tenant, canonical JSON), computed over the request's parameters with
//! `input` set to that one input, under the pseudo-method `EMBEDDING-INPUT`, which no cached
//! client request has: an input's vector never collides with a whole response.

use super::wire;
use crate::cache::key::{CacheKey, KeyInput};
use crate::cache::store::{Store, Stored};
use crate::config::RouteCacheConfig;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode};
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an entry keeps the prompt tokens its input cost (entries are not responses: this
/// never reaches a client).
const TOKENS: &str = "x-sidelight-input-tokens";

pub struct InputCache {
    route: Arc<str>,
    store: Store,
    ttl: Duration,
    method: Method,
    vary: Vec<HeaderName>,
    credentials: Vec<HeaderName>,
    ignore_fields: Vec<String>,
}

fn names(list: &[String]) -> Vec<HeaderName> {
    list.iter()
        .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        .collect()
}

impl InputCache {
    /// `ignored`: fields left out of the key on top of the route's `ignore_json_fields` (what
    /// the whole-response cache also ignores on LLM routes).
    pub fn new(
        route: &str,
        config: &RouteCacheConfig,
        ignored: Vec<String>,
        store: Store,
    ) -> InputCache {
        InputCache {
            route: Arc::from(route),
            store,
            ttl: config.ttl,
            // A valid token: never the fallback.
            method: Method::from_bytes(b"EMBEDDING-INPUT").unwrap_or(Method::CONNECT),
            vary: names(&config.vary_headers),
            credentials: names(&config.credential_headers),
            ignore_fields: config
                .ignore_json_fields
                .iter()
                .cloned()
                .chain(ignored)
                .collect(),
        }
    }

    /// The key of one input of a request; `None` if it cannot be computed (then it is neither
    /// looked up nor stored).
    pub fn key(
        &self,
        parts: &http::request::Parts,
        params: &[(String, Box<RawValue>)],
        input: &RawValue,
    ) -> Option<CacheKey> {
        // The request as if it had only this input.
        let body = wire::request_body(params, std::iter::once(input));
        CacheKey::compute(&KeyInput {
            route: &self.route,
            method: &self.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            vary_headers: &self.vary,
            credential_headers: &self.credentials,
            body: &body,
            content_type_json: true,
            ignore_fields: &self.ignore_fields,
        })
        .ok()
    }

    /// The stored embedding (its JSON text: a float array or a base64 string) and the prompt
    /// tokens it cost, while fresh.
    pub fn get(&self, key: &CacheKey) -> Option<(Bytes, u64)> {
        let hit = self.store.get(key).filter(|s| s.is_fresh())?;
        let tokens = hit
            .headers
            .get(TOKENS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match hit.chunks.as_slice() {
            [one] => Some((one.clone(), tokens)),
            _ => None,
        }
    }

    pub fn put(&self, key: CacheKey, embedding: &[u8], tokens: u64) {
        let mut headers = HeaderMap::new();
        headers.insert(TOKENS, http::HeaderValue::from(tokens));
        self.store.insert(
            key,
            Stored {
                route: self.route.clone(),
                status: StatusCode::OK,
                headers,
                // A copy: a slice would keep the whole batch's answer alive in the cache.
                chunks: vec![Bytes::copy_from_slice(embedding)],
                stored_at: Instant::now(),
                ttl: self.ttl,
                grace: Duration::ZERO,
            },
        );
    }
}
