//! Retries, only where they are safe, on another endpoint when there is one:
//! - a connect failure, for every method (the request never left);
//! - for retryable methods only: a reset before any of the response reached the client (before
//!   response headers, or an LLM stream that broke while held for its first token), a
//!   first-token timeout, and
//!   the configured upstream statuses (429, 502, 503, 504 by default, plus Anthropic's 529
//!   `overloaded_error` on `anthropic` routes).
//!
//! The layer answers nothing until it has a response to give, so a retry can never follow
//! bytes already sent to the client. Backoff is jittered and doubles; an upstream's
//! `Retry-After` is honoured when no other endpoint can take the retry. Every retry spends from
//! the upstream's budget (a share of recent requests plus a floor per second, tower's
//! `TpsBudget`, as linkerd and Finagle do), so retries cannot multiply an outage.

use crate::config::RetryConfig;
use crate::error::ProxyError;
use crate::http::body::{full, read_whole};
use crate::http::RequestMeta;
use crate::metrics::upstream::RetryMetrics;
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse};
use crate::upstream::balance::{requested_wait, Balancer, TriedEndpoints};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

struct RetryPolicy {
    upstream: Arc<str>,
    max_retries: u32,
    methods: Vec<Method>,
    statuses: Vec<StatusCode>,
    backoff: Duration,
    max_backoff: Duration,
    max_retry_after: Duration,
    /// The route's total timeout: no retry starts past it.
    total: Duration,
    balancer: Arc<Balancer>,
    budget: Arc<TpsBudget>,
    metrics: RetryMetrics,
}

#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

impl RetryLayer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &RetryConfig,
        methods: Vec<Method>,
        statuses: &[u16],
        upstream: &str,
        total: Duration,
        balancer: Arc<Balancer>,
        budget: Arc<TpsBudget>,
        metrics: &Metrics,
    ) -> Self {
        // Every reason this route can retry for starts at zero, so rates work from the start.
        let statuses_text: Vec<String> = statuses.iter().map(u16::to_string).collect();
        let reasons = ["connect_failure", "reset"]
            .into_iter()
            .chain(statuses_text.iter().map(String::as_str));
        RetryLayer {
            policy: Arc::new(RetryPolicy {
                upstream: Arc::from(upstream),
                max_retries: config.max_retries,
                methods,
                statuses: statuses
                    .iter()
                    .filter_map(|s| StatusCode::from_u16(*s).ok())
                    .collect(),
                backoff: config.backoff,
                max_backoff: config.max_backoff,
                max_retry_after: config.max_retry_after,
                total,
                balancer,
                budget,
                metrics: metrics.upstream.retries(upstream, reasons),
            }),
        }
    }
}

/// An upstream's retry budget: `percent` of the requests of the last 10 s, plus
/// `min_per_second`.
pub fn budget(config: &crate::config::RetryBudgetConfig) -> Arc<TpsBudget> {
    Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        config.min_per_second,
        (config.percent / 100.0).clamp(0.0, 1000.0),
    ))
}

impl Around for RetryLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let mut inner = inner.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            policy.budget.deposit();
            let deadline = req
                .extensions()
                .get::<RequestMeta>()
                .map(|m| Instant::from_std(m.start) + policy.total);
            let (parts, body) = req.into_parts();
            // Kept whole so it can be sent again; the body limit layer already bounds it.
            let body: Bytes = read_whole(body).await.map_err(ProxyError::from_body)?;
            let retryable_method = policy.methods.contains(&parts.method);
            // For the log lines, which only retries reach: no allocation on the common path.
            let request_id = parts
                .extensions
                .get::<RequestMeta>()
                .map_or(http::HeaderValue::from_static(""), |m| m.id.clone());
            let tried = TriedEndpoints::default();
            let mut attempt = 0u32;
            let mut template = parts;
            loop {
                // Each attempt sends the template and leaves a copy for the next: the request
                // that goes out keeps the header map sized by the client connection (with room
                // for the forwarding headers), the copy is only grown if it is ever sent.
                let mut copy = Request::new(());
                *copy.method_mut() = template.method.clone();
                *copy.uri_mut() = template.uri.clone();
                *copy.version_mut() = template.version;
                *copy.headers_mut() = template.headers.clone();
                *copy.extensions_mut() = template.extensions.clone();
                let sending = std::mem::replace(&mut template, copy.into_parts().0);
                let mut req = Request::from_parts(sending, full(body.clone()));
                req.extensions_mut().insert(tried.clone());
                let result = inner.call(req).await;
                let Some(reason) = policy.reason(&result, retryable_method) else {
                    return result;
                };
                if attempt >= policy.max_retries {
                    return result;
                }
                let ceiling = policy
                    .backoff
                    .saturating_mul(1 << attempt.min(16))
                    .min(policy.max_backoff);
                let mut wait = policy.balancer.jitter(ceiling);
                if let Ok(response) = &result {
                    if let Some(asked) = requested_wait(response.headers()) {
                        // Another endpoint can go now; only the one that asked must wait.
                        if !policy.balancer.has_ready_besides(tried.mask()) {
                            if asked > policy.max_retry_after {
                                return result;
                            }
                            wait = wait.max(asked);
                        }
                    }
                }
                if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                    return result;
                }
                if !policy.budget.withdraw() {
                    policy.metrics.exhausted.inc();
                    tracing::debug!(upstream = %policy.upstream, reason, request_id = request_id.to_str().unwrap_or(""), "retry budget spent; not retrying");
                    return result;
                }
                policy.metrics.retried(&reason);
                tracing::debug!(upstream = %policy.upstream, reason, request_id = request_id.to_str().unwrap_or(""), attempt = attempt + 1, wait_ms = wait.as_millis() as u64, "retrying");
                drop(result);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                    // A deliberate wait: not sidelight's overhead.
                    if let Some(meta) = template.extensions.get::<RequestMeta>() {
                        meta.upstream_wait.add(wait);
                    }
                }
                attempt += 1;
            }
        })
    }
}

impl RetryPolicy {
    /// Why this result may be retried, as the `reason` label; `None` if it may not.
    fn reason(
        &self,
        result: &Result<ProxyResponse, ProxyError>,
        retryable_method: bool,
    ) -> Option<String> {
        match result {
            Err(ProxyError::UpstreamConnect { .. } | ProxyError::ConnectTimeout { .. }) => {
                Some("connect_failure".into())
            }
            Err(ProxyError::UpstreamReset { .. }) if retryable_method => Some("reset".into()),
            Err(ProxyError::FirstTokenTimeout { .. }) if retryable_method => {
                Some("first_token_timeout".into())
            }
            Ok(response) if retryable_method && self.statuses.contains(&response.status()) => {
                Some(response.status().as_u16().to_string())
            }
            _ => None,
        }
    }
}
