//! The cache layer of a route's stack: answers repeats from the store, shares identical
//! in-flight requests, and stores complete successful responses.
//!
//! Order of decisions for one request:
//! 1. Is it cacheable at all (method, rules, valid JSON body)? If not: `BYPASS`, passed through.
//! 2. The key: route, method, path, query, vary headers, a hash of the client's credential
//!    (tenant isolation, always on), canonical body ([`super::key`]).
//! 3. Client controls: `Cache-Control: no-cache` skips the lookup and coalescing (still
//!    stores), `no-store` skips storing, `x-sidelight-dedup: off` skips coalescing,
//!    `x-sidelight-cache-ttl: N` shortens the TTL.
//! 4. Lookup: `HIT`, replayed chunk by chunk (an SSE stream replays as the same events).
//! 5. Otherwise join or start a flight ([`super::coalesce`]): `MISS` for the request that
//!    started it, `COALESCED` for those that joined.

use super::coalesce::{Coalescer, Completed, Joined, Subscriber};
use super::key::{CacheKey, KeyInput};
use super::rules::Rules;
use super::store::{Store, Stored};
use crate::config::{HttpMethod, RouteCacheConfig};
use crate::error::ProxyError;
use crate::http::body::{full, ProxyBody};
use crate::http::headers;
use crate::http::RequestMeta;
use crate::metrics::cache::CacheRouteMetrics;
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CACHE_HEADER: &str = "x-sidelight-cache";
pub const CACHE_KEY_HEADER: &str = "x-sidelight-cache-key";
pub const TTL_HEADER: &str = "x-sidelight-cache-ttl";
pub const DEDUP_HEADER: &str = "x-sidelight-dedup";

/// Process-wide cache state: the store and the in-flight requests.
#[derive(Clone)]
pub struct CacheShared {
    pub store: Store,
    pub coalescer: Arc<Coalescer>,
    pub coalesce_max_buffer: usize,
}

/// One route's cache policy, built from its config.
struct CachePolicy {
    route: Arc<str>,
    /// `None`: the route coalesces but does not store.
    ttl: Option<Duration>,
    /// Stale-while-revalidate grace after the TTL.
    grace: Duration,
    dedup: bool,
    methods: Vec<Method>,
    rules: Option<Rules>,
    vary: Vec<HeaderName>,
    credentials: Vec<HeaderName>,
    ignore_fields: Vec<String>,
    max_body: usize,
    shared: CacheShared,
    metrics: CacheRouteMetrics,
}

#[derive(Clone)]
pub struct CacheLayer {
    policy: Arc<CachePolicy>,
    skip: Option<fn(&ProxyRequest) -> bool>,
}

fn names(list: &[String]) -> Vec<HeaderName> {
    list.iter()
        .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
        .collect()
}

impl CacheLayer {
    /// `cache` is the route's cache config (`None` for a coalescing-only route).
    pub fn new(
        route: &str,
        cache: Option<&RouteCacheConfig>,
        dedup: bool,
        dedup_methods: Option<Vec<Method>>,
        shared: CacheShared,
        metrics: &Metrics,
    ) -> CacheLayer {
        let route_metrics = metrics.cache.route(route);
        let defaults = RouteCacheConfig {
            ttl: Duration::from_secs(1),
            methods: dedup_methods
                .unwrap_or_else(|| vec![Method::GET, Method::HEAD])
                .into_iter()
                .map(HttpMethod::of)
                .collect(),
            max_body_bytes: crate::config::ByteSize::mib(4),
            vary_headers: Vec::new(),
            ignore_json_fields: Vec::new(),
            credential_headers: vec!["authorization".into(), "x-api-key".into()],
            presets: Vec::new(),
            rules: Vec::new(),
            stale_while_revalidate: Duration::ZERO,
        };
        let c = cache.unwrap_or(&defaults);
        let rules = if c.presets.is_empty() && c.rules.is_empty() {
            None
        } else {
            Some(Rules::new(&c.presets, &c.rules))
        };
        CacheLayer {
            policy: Arc::new(CachePolicy {
                route: Arc::from(route),
                ttl: cache.map(|c| c.ttl),
                grace: cache.map_or(Duration::ZERO, |c| c.stale_while_revalidate),
                dedup,
                methods: c.methods.iter().map(|m| m.0.clone()).collect(),
                rules,
                vary: names(&c.vary_headers),
                credentials: names(&c.credential_headers),
                ignore_fields: c.ignore_json_fields.clone(),
                max_body: usize::try_from(c.max_body_bytes.0).unwrap_or(usize::MAX),
                shared,
                metrics: route_metrics,
            }),
            skip: None,
        }
    }

    /// Requests for which `skip` is true go past this layer untouched (not even counted as a
    /// bypass): another layer caches them its own way (embeddings, input by input).
    pub fn skipping(mut self, skip: fn(&ProxyRequest) -> bool) -> Self {
        self.skip = Some(skip);
        self
    }
}

impl CacheLayer {
    /// Also leaves `fields` out of the key (the fields an LLM route keeps out by default).
    pub fn ignoring_json_fields(mut self, fields: Vec<String>) -> Self {
        // Called right after `new`, before the policy is shared.
        if let Some(policy) = Arc::get_mut(&mut self.policy) {
            for f in fields {
                if !policy.ignore_fields.contains(&f) {
                    policy.ignore_fields.push(f);
                }
            }
        }
        self
    }
}

/// What the client asked for through its request headers.
struct Controls {
    no_cache: bool,
    no_store: bool,
    no_dedup: bool,
    max_ttl: Option<Duration>,
}

impl Controls {
    fn read(h: &HeaderMap) -> Controls {
        let cc: Vec<String> = h
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        let has = |d: &str| cc.iter().any(|x| x == d);
        Controls {
            no_cache: has("no-cache"),
            no_store: has("no-store"),
            no_dedup: h
                .get(DEDUP_HEADER)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("off")),
            max_ttl: h
                .get(TTL_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        }
    }
}

/// Upstream `Cache-Control` that forbids a shared cache from storing the response.
fn forbids_storing(h: &HeaderMap) -> bool {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .any(|d| d == "no-store" || d == "private" || d.starts_with("private="))
}

fn set(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

impl CachePolicy {
    fn eligible_method(&self, method: &Method) -> bool {
        match &self.rules {
            // Rules may allow POST reads (search APIs, SQL SELECT); they look at the body.
            Some(_) => matches!(*method, Method::GET | Method::HEAD | Method::POST),
            None => self.methods.contains(method),
        }
    }

    fn bypass(&self, fut: ProxyFuture) -> ProxyFuture {
        self.metrics.bypass.inc();
        Box::pin(async move {
            let mut response = fut.await?;
            response
                .headers_mut()
                .insert(CACHE_HEADER, HeaderValue::from_static("BYPASS"));
            response.headers_mut().insert(
                HeaderName::from_static("cache-status"),
                HeaderValue::from_static("sidelight; fwd=bypass"),
            );
            Ok(response)
        })
    }
}

impl Around for CacheLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        if self.skip.is_some_and(|skip| skip(&req)) {
            return inner.call(req);
        }
        let policy = self.policy.clone();
        // A compressed body cannot be canonicalised or read as SQL: never guess.
        let encoded = req
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded || !policy.eligible_method(req.method()) {
            return policy.bypass(inner.call(req));
        }
        let mut inner = inner.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // The key needs the whole body; the body-limit layer outside bounds it.
            let body = crate::http::body::read_whole(body)
                .await
                .map_err(ProxyError::from_body)?;
            let readonly = policy.rules.as_ref().is_none_or(|r| {
                r.allows(&parts.method, parts.uri.path(), parts.uri.query(), &body)
            });
            let json = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"));
            let key = CacheKey::compute(&KeyInput {
                route: &policy.route,
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
                vary_headers: &policy.vary,
                credential_headers: &policy.credentials,
                body: &body,
                content_type_json: json,
                ignore_fields: &policy.ignore_fields,
            });
            let meta = parts.extensions.get::<RequestMeta>().cloned();
            let controls = Controls::read(&parts.headers);
            let req = http::Request::from_parts(parts, full(body));
            let key = match key {
                Ok(key) if readonly => key,
                // Writes, and bodies we cannot canonicalise, are never cached or shared.
                _ => return policy.bypass(inner.call(req)).await,
            };

            let started = Instant::now();
            let ttl = policy
                .ttl
                .map(|t| controls.max_ttl.map_or(t, |max| t.min(max)))
                .filter(|t| !t.is_zero() && !controls.no_store);
            let mut stale = None;
            if controls.no_cache {
                policy.metrics.refresh.inc();
            } else if let Some(hit) = policy.ttl.and_then(|_| policy.shared.store.get(&key)) {
                policy.metrics.saved_cache.inc();
                if hit.is_fresh() {
                    policy.metrics.hit.inc();
                    return Ok(replay(&hit, &key, meta.as_ref()));
                }
                // Stale but in its grace period: answer now, refresh once in the background.
                policy.metrics.stale.inc();
                stale = Some(hit);
            } else {
                policy.metrics.miss.inc();
            }

            let (keep_for, on_complete) = storing(&policy, key, ttl);
            let max_keep = policy.max_body;
            if let Some(hit) = stale {
                // A refresh already under way for this key is joined (and left), not repeated.
                let _ = policy.shared.coalescer.join(
                    key,
                    policy.shared.coalesce_max_buffer,
                    max_keep,
                    || inner.call(req),
                    keep_for,
                    on_complete,
                    true,
                );
                return Ok(replay(&hit, &key, meta.as_ref()));
            }
            let share = policy.dedup && !controls.no_cache && !controls.no_dedup;
            let (sub, label) = if share {
                match policy.shared.coalescer.join(
                    key,
                    policy.shared.coalesce_max_buffer,
                    max_keep,
                    || inner.call(req),
                    keep_for,
                    on_complete,
                    false,
                ) {
                    Joined::Leader(sub) => (sub, "MISS"),
                    Joined::Follower(sub) => {
                        policy.metrics.coalesced.inc();
                        policy.metrics.saved_dedup.inc();
                        (sub, "COALESCED")
                    }
                }
            } else {
                let sub = Coalescer::solo(max_keep, inner.call(req), keep_for, on_complete);
                (sub, "MISS")
            };
            respond(sub, label, &key, started, meta.as_ref(), controls.no_cache).await
        })
    }
}

/// When a flight's response should be kept, and what to do with it once complete.
fn storing(
    policy: &Arc<CachePolicy>,
    key: CacheKey,
    ttl: Option<Duration>,
) -> (super::coalesce::KeepFor, super::coalesce::OnComplete) {
    let max_body = policy.max_body;
    let keep_for: super::coalesce::KeepFor = Box::new(move |status: StatusCode, h: &HeaderMap| {
        let too_long = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > max_body);
        ttl.is_some() && status.is_success() && !forbids_storing(h) && !too_long
    });
    let policy = policy.clone();
    let on_complete: super::coalesce::OnComplete = Box::new(move |done: Completed| {
        if let Some(ttl) = ttl {
            store(&policy, key, done, ttl);
        }
    });
    (keep_for, on_complete)
}

/// An event stream is complete only if it reached its terminal event: OpenAI's `data: [DONE]`
/// or Anthropic's `message_stop`. A stream that merely stopped is not a whole answer.
fn sse_reached_its_end(chunks: &[bytes::Bytes]) -> bool {
    let mut tail = Vec::new();
    for chunk in chunks.iter().rev() {
        tail.splice(0..0, chunk.iter().copied());
        if tail.len() >= 512 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&tail);
    let text = text.trim_end();
    text.ends_with("data: [DONE]") || text.contains("event: message_stop")
}

fn store(policy: &CachePolicy, key: CacheKey, done: Completed, ttl: Duration) {
    let is_sse = done
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if is_sse && !sse_reached_its_end(&done.chunks) {
        tracing::debug!(route = %policy.route, "event stream ended without its terminal event; not stored");
        return;
    }
    let mut headers = done.headers;
    // Per-request headers are the replaying request's own, not the stored one's.
    headers.remove(headers::REQUEST_ID);
    headers.remove(headers::UPSTREAM_REQUEST_ID);
    headers.remove(CACHE_HEADER);
    headers.remove("cache-status");
    headers.remove(CACHE_KEY_HEADER);
    policy.shared.store.insert(
        key,
        Stored {
            route: policy.route.clone(),
            status: done.status,
            headers,
            chunks: done.chunks,
            stored_at: Instant::now(),
            ttl,
            grace: policy.grace,
        },
    );
    policy.metrics.stores.inc();
}

async fn respond(
    sub: Subscriber,
    label: &'static str,
    key: &CacheKey,
    started: Instant,
    meta: Option<&RequestMeta>,
    refresh: bool,
) -> Result<ProxyResponse, ProxyError> {
    let (status, mut headers) = sub.head().await?;
    let waited = started.elapsed();
    let status_line = match (label, refresh) {
        ("COALESCED", _) => "sidelight; fwd=miss; collapsed".to_string(),
        (_, true) => "sidelight; fwd=request".to_string(),
        _ => "sidelight; fwd=miss".to_string(),
    };
    headers.insert(CACHE_HEADER, HeaderValue::from_static(label));
    set(&mut headers, "cache-status", status_line);
    set(&mut headers, CACHE_KEY_HEADER, key.hex());
    if let Some(meta) = meta {
        // Time spent waiting for the shared upstream answer is upstream time, not overhead.
        meta.stamp(&mut headers, waited);
    }
    let mut response = Response::new(sub.into_body());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

fn replay(hit: &Stored, key: &CacheKey, meta: Option<&RequestMeta>) -> ProxyResponse {
    let chunks = hit.chunks.clone();
    let body: ProxyBody = StreamBody::new(futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, crate::BoxError>(Frame::data(c))),
    ))
    .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = hit.status;
    let h = response.headers_mut();
    *h = hit.headers.clone();
    h.insert(CACHE_HEADER, HeaderValue::from_static("HIT"));
    set(
        h,
        "cache-status",
        format!("sidelight; hit; ttl={}", hit.ttl_left()),
    );
    set(h, "age", hit.stored_at.elapsed().as_secs().to_string());
    set(h, CACHE_KEY_HEADER, key.hex());
    if let Some(meta) = meta {
        // No upstream wait at all: everything is sidelight's own time.
        meta.stamp(h, Duration::ZERO);
    }
    response
}
