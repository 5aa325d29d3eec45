//! The outermost route layer: per-request metrics, the access log line, and the conversion of
//! errors from inner layers into responses (through [`ProxyError::to_response`], the one place
//! that maps errors to statuses).

use crate::error::ProxyError;
use crate::http::body::{BodyObserver, Observed};
use crate::http::meta::LlmFacts;
use crate::http::{RequestMeta, UpstreamWait};
use crate::metrics::http::{RequestCounters, RouteMetrics};
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use crate::BoxError;
use http::{HeaderValue, Method, StatusCode};
use http_body::Body as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What every request of a route shares.
struct RouteInfo {
    route: Arc<str>,
    upstream: Arc<str>,
    route_metrics: RouteMetrics,
    requests: RequestCounters,
    access_log: bool,
}

#[derive(Clone)]
pub struct ObserveLayer {
    info: Arc<RouteInfo>,
}

impl ObserveLayer {
    pub fn new(route: &str, upstream: &str, metrics: &Metrics, access_log: bool) -> Self {
        ObserveLayer {
            info: Arc::new(RouteInfo {
                route: Arc::from(route),
                upstream: Arc::from(upstream),
                requests: metrics.http.requests(route, upstream),
                route_metrics: metrics.http.route(route),
                access_log,
            }),
        }
    }
}

impl Around for ObserveLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let info = self.info.clone();
        let (id, start, upstream_wait) = match req.extensions().get::<RequestMeta>() {
            Some(meta) => (meta.id.clone(), meta.start, meta.upstream_wait.clone()),
            None => (
                HeaderValue::from_static("-"),
                Instant::now(),
                UpstreamWait::new(),
            ),
        };
        // Most LLM-gateway GETs and many POSTs are small; a body with nothing to count is not
        // wrapped at all.
        let request_bytes = (!req.body().is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
        let mut record = Record {
            info: info.clone(),
            id: id.clone(),
            start,
            method: req.method().clone(),
            // Only the access log reads it.
            uri: info.access_log.then(|| req.uri().clone()),
            status: None,
            error: None,
            request_bytes: request_bytes.clone(),
            response_bytes: 0,
            outcome: RequestOutcome::Cancelled,
            llm: None,
        };
        info.route_metrics.in_flight.inc();
        let req = match request_bytes {
            Some(total) => req.map(|body| {
                Observed::boxed(
                    body,
                    CountBytes {
                        counter: info.route_metrics.request_bytes.clone(),
                        total,
                    },
                )
            }),
            None => req,
        };
        let mut inner = inner.clone();
        Box::pin(async move {
            let result = inner.call(req).await;
            let headers_at = start.elapsed();
            let response = match result {
                Ok(response) => {
                    if let Some(wait) = upstream_wait.get() {
                        info.route_metrics
                            .overhead
                            .observe(headers_at.saturating_sub(wait).as_secs_f64());
                    }
                    response
                }
                Err(err) => {
                    // Errors answered without an upstream exchange are all sidelight's time.
                    if !err.involves_upstream() {
                        info.route_metrics
                            .overhead
                            .observe(headers_at.as_secs_f64());
                    }
                    info.route_metrics.error(err.kind()).inc();
                    tracing::debug!(request_id = ?id, error = %err, "request failed");
                    record.error = Some(err.kind());
                    err.to_response(Some(&id))
                }
            };
            record.status = Some(response.status());
            record.llm = response.extensions().get::<Arc<LlmFacts>>().cloned();
            info.requests.get(&record.method, response.status()).inc();
            record.outcome = RequestOutcome::Streaming;
            Ok(response.map(|body| Observed::boxed(body, record)))
        })
    }
}

struct CountBytes {
    counter: prometheus::IntCounter,
    total: Arc<AtomicU64>,
}

impl BodyObserver for CountBytes {
    fn on_data(&mut self, len: usize) {
        self.counter.inc_by(len as u64);
        self.total.fetch_add(len as u64, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestOutcome {
    /// The client went away before response headers.
    Cancelled,
    /// Headers sent, body not finished (if dropped so, the client went away mid-body).
    Streaming,
    Complete,
    /// The response body ended with an error (timeout, upstream reset).
    Failed,
}

/// One request's bookkeeping; finalised when dropped, however the request ended.
struct Record {
    info: Arc<RouteInfo>,
    id: HeaderValue,
    start: Instant,
    method: Method,
    uri: Option<http::Uri>,
    status: Option<StatusCode>,
    error: Option<&'static str>,
    request_bytes: Option<Arc<AtomicU64>>,
    response_bytes: u64,
    outcome: RequestOutcome,
    /// Set by the LLM layer on LLM routes: model, usage, time to first token.
    llm: Option<Arc<LlmFacts>>,
}

impl BodyObserver for Record {
    fn on_data(&mut self, len: usize) {
        self.response_bytes += len as u64;
    }

    fn on_end(&mut self, result: Result<(), &BoxError>) {
        match result {
            Ok(()) => self.outcome = RequestOutcome::Complete,
            Err(e) => {
                self.outcome = RequestOutcome::Failed;
                if let Some(err) = e.downcast_ref::<ProxyError>() {
                    self.error = Some(err.kind());
                }
            }
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let info = &self.info;
        let elapsed = self.start.elapsed();
        let m = &info.route_metrics;
        m.in_flight.dec();
        m.duration.observe(elapsed.as_secs_f64());
        m.response_bytes.inc_by(self.response_bytes);
        if self.outcome == RequestOutcome::Cancelled {
            // Counted like nginx's 499 so that abandoned requests are visible in rates.
            info.requests
                .get(
                    &self.method,
                    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                )
                .inc();
        }
        if !info.access_log {
            return;
        }
        let outcome = match self.outcome {
            RequestOutcome::Cancelled => "client_closed_before_response",
            RequestOutcome::Streaming => "client_closed_during_response",
            RequestOutcome::Complete => "complete",
            RequestOutcome::Failed => "response_failed",
        };
        let status = self.status.map_or(499, |s| s.as_u16());
        let llm = self.llm.as_ref().map(|f| f.summary());
        let llm = llm.as_ref();
        let usage = llm.and_then(|l| l.usage);
        tracing::info!(
            target: "sidelight::access",
            request_id = self.id.to_str().unwrap_or("-"),
            route = &*info.route,
            upstream = &*info.upstream,
            method = self.method.as_str(),
            path = self.uri.as_ref().map_or("", |u| u.path()),
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            request_bytes = self.request_bytes.as_ref().map_or(0, |b| b.load(Ordering::Relaxed)),
            response_bytes = self.response_bytes,
            outcome,
            error = self.error.unwrap_or(""),
            model = llm.and_then(|l| l.model.as_deref()),
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            usage_estimated = usage.map(|u| u.estimated),
            ttft_ms = llm
                .and_then(|l| l.time_to_first_token)
                .map(|d| d.as_secs_f64() * 1000.0),
        );
    }
}
