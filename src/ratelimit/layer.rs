//! The rate-limit layer of a route's stack: checks the route's limits in order; over a limit a
//! request is rejected (429), queued until it fits, or, for a shadow limit, only counted.
//!
//! Token limits (`unit: tokens`) charge a request its estimated tokens (prompt plus its output
//! budget) before it is sent, and correct the charge once the LLM accounting layer inside knows
//! the real usage (through [`crate::llm::UsageHooks`]).

use super::tokens::TokenBuckets;
use super::{quota, retry_after_secs, Buckets, Decision};
use crate::config::{Rate, RateLimitConfig, RateLimitKey, RateLimitMode, RateUnit};
use crate::error::ProxyError;
use crate::http::body::{full, read_whole};
use crate::http::RequestMeta;
use crate::metrics::ratelimit::LimitMetrics;
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use governor::clock::DefaultClock;
use http::header::HeaderMap;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bucket key a request is counted under.
trait KeyOf {
    fn key(&self, headers: &HeaderMap, meta: Option<&RequestMeta>) -> String;
}

impl KeyOf for RateLimitKey {
    fn key(&self, headers: &HeaderMap, meta: Option<&RequestMeta>) -> String {
        match self {
            RateLimitKey::Route => String::new(),
            RateLimitKey::Credential => {
                let mut hash = Sha256::new();
                for name in ["authorization", "x-api-key"] {
                    for v in headers.get_all(name) {
                        hash.update(name.as_bytes());
                        hash.update(b"=");
                        hash.update(v.as_bytes());
                        hash.update(b"\n");
                    }
                }
                hash.finalize()
                    .iter()
                    .fold(String::with_capacity(64), |mut s, b| {
                        let _ = write!(s, "{b:02x}");
                        s
                    })
            }
            // The connection's IP text, formatted once per connection.
            RateLimitKey::ClientIp => meta
                .and_then(|m| m.client.ip.to_str().ok())
                .map(String::from)
                .unwrap_or_default(),
            RateLimitKey::Header(name) => headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
        }
    }
}

/// What a limit counts.
enum Counter {
    Requests(Buckets<DefaultClock>),
    Tokens(TokenBuckets),
}

struct Limit {
    name: String,
    rate: Rate,
    key_by: RateLimitKey,
    mode: RateLimitMode,
    max_wait: Duration,
    max_queue: usize,
    shadow: bool,
    counter: Counter,
    /// Requests waiting in this limit's queue, across workers.
    waiting: AtomicUsize,
    metrics: LimitMetrics,
}

#[derive(Clone)]
pub struct RateLimitLayer {
    limits: Arc<Vec<Limit>>,
    /// Some limit counts tokens: requests are read whole to estimate them.
    counts_tokens: bool,
}

impl RateLimitLayer {
    pub fn new(route: &str, configs: &[RateLimitConfig], metrics: &Metrics) -> Self {
        let mut limits = Vec::new();
        for c in configs {
            let rate = c.rate;
            let counter = match c.unit {
                RateUnit::Requests => Counter::Requests(Buckets::new(
                    quota(&rate, c.burst),
                    DefaultClock::default(),
                    c.max_keys,
                )),
                RateUnit::Tokens => Counter::Tokens(TokenBuckets::new(
                    rate.count.get(),
                    rate.period(),
                    c.burst.map(|b| b.get()),
                    c.max_keys,
                )),
            };
            limits.push(Limit {
                name: c.name.clone(),
                rate,
                key_by: c.key.clone(),
                mode: c.mode,
                max_wait: c.max_wait,
                max_queue: c.max_queue,
                shadow: c.shadow,
                counter,
                waiting: AtomicUsize::new(0),
                metrics: metrics.ratelimit.limit(route, &c.name),
            });
        }
        RateLimitLayer {
            counts_tokens: limits
                .iter()
                .any(|l| matches!(l.counter, Counter::Tokens(_))),
            limits: Arc::new(limits),
        }
    }
}

/// A place in a limit's queue, given back however the wait ends (a client that disconnects
/// drops it).
struct Place<'a>(&'a Limit);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.queue_length.dec();
    }
}

impl Limit {
    fn rejected(&self, wait: Duration) -> ProxyError {
        self.metrics.rejected.inc();
        ProxyError::RateLimited {
            limit: self.name.clone(),
            rate: self.rate.count.get(),
            retry_after: retry_after_secs(wait),
        }
    }

    fn enqueue(&self) -> Option<Place<'_>> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.queue_length.inc();
        Some(Place(self))
    }

    fn check(&self, key: &str, tokens: u64) -> Decision {
        match &self.counter {
            Counter::Requests(buckets) => buckets.check(key),
            Counter::Tokens(buckets) => buckets.bucket(key).charge(tokens),
        }
    }

    /// Admits the request under this limit, waiting in queue mode; `Err` is the 429.
    /// `tokens` is what a token limit charges (request limits count one). `Ok`: how long the
    /// request waited in the queue (zero when it was not queued).
    async fn admit(&self, key: &str, tokens: u64) -> Result<Duration, ProxyError> {
        let mut place: Option<(Place<'_>, Instant)> = None;
        loop {
            let wait = match self.check(key, tokens) {
                Decision::Allowed { .. } => {
                    return Ok(match &place {
                        Some((_, since)) => {
                            let waited = since.elapsed();
                            self.metrics.queue_wait.observe(waited.as_secs_f64());
                            waited
                        }
                        None => {
                            self.metrics.allowed.inc();
                            Duration::ZERO
                        }
                    });
                }
                Decision::Limited { wait } => wait,
            };
            if self.shadow {
                self.metrics.shadow_rejected.inc();
                tracing::info!(limit = %self.name, wait_ms = wait.as_millis() as u64, "shadow rate limit would have rejected a request");
                return Ok(Duration::ZERO);
            }
            if self.mode != RateLimitMode::Queue {
                return Err(self.rejected(wait));
            }
            let since = place
                .as_ref()
                .map_or_else(Instant::now, |(_, since)| *since);
            if since.elapsed() + wait > self.max_wait {
                return Err(self.rejected(wait));
            }
            if place.is_none() {
                match self.enqueue() {
                    Some(p) => {
                        self.metrics.queued.inc();
                        place = Some((p, since));
                    }
                    None => return Err(self.rejected(wait)),
                }
            }
            tokio::time::sleep(wait).await;
        }
    }
}

impl Around for RateLimitLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let limits = self.limits.clone();
        let keys: Vec<String> = limits
            .iter()
            .map(|l| {
                l.key_by
                    .key(req.headers(), req.extensions().get::<RequestMeta>())
            })
            .collect();
        let mut inner = inner.clone();
        let counts_tokens = self.counts_tokens;
        Box::pin(async move {
            let (mut req, estimate) = if counts_tokens {
                let (parts, body) = req.into_parts();
                let body = read_whole(body).await.map_err(ProxyError::from_body)?;
                // Not JSON: nothing to estimate; the usage the upstream reports is charged.
                let estimate =
                    crate::llm::estimate::estimate_request_tokens(&body).map_or(0, |e| e.total());
                (http::Request::from_parts(parts, full(body)), estimate)
            } else {
                (req, 0)
            };
            for (limit, key) in limits.iter().zip(&keys) {
                let queued = limit.admit(key, estimate).await?;
                if !queued.is_zero() {
                    // A deliberate wait, with its own histogram: not sidelight's overhead.
                    if let Some(meta) = req.extensions().get::<RequestMeta>() {
                        meta.upstream_wait.add(queued);
                    }
                }
                if let Counter::Tokens(buckets) = &limit.counter {
                    let bucket = buckets.bucket(key);
                    let charged = i64::try_from(estimate).unwrap_or(i64::MAX);
                    let hook: crate::llm::UsageHook = Arc::new(move |usage: &crate::llm::Usage| {
                        let used = i64::try_from(usage.total()).unwrap_or(i64::MAX);
                        bucket.adjust(used.saturating_sub(charged));
                    });
                    crate::llm::UsageHooks::add(&mut req, hook);
                }
            }
            inner.call(req).await
        })
    }
}
