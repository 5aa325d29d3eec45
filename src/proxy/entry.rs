//! Where a client's request enters: it gets its request id, finds its route, and runs through
//! that route's stack. Also where the stacks are assembled from the config.

use super::forward::{Forward, PathRewrite};
use super::limit::{BodyLimitLayer, OverloadLayer};
use super::observe::ObserveLayer;
use super::retry::RetryLayer;
use super::router::{Route, Router};
use super::timeout::{TimeoutLayer, Timeouts};
use crate::cache::layer::CacheLayer;
use crate::config::Config;
use crate::error::ProxyError;
use crate::http::headers;
use crate::http::{Peer, RequestMeta};
use crate::llm::batch::{BatchLayer, InputCache};
use crate::llm::first_token::FirstTokenLayer;
use crate::llm::layer::LlmLayer;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::ratelimit::concurrency::{ConcurrencyLayer, ConcurrencyLimit};
use crate::ratelimit::layer::RateLimitLayer;
use crate::service::{ProxyResponse, RouteService};
use crate::upstream::balance::{Balancer, EndpointMetrics, Outliers};
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;
use tower::{Layer, ServiceBuilder};

/// State every worker shares.
#[derive(Clone)]
pub struct Shared {
    /// Requests in flight across all workers (`limits.max_in_flight_requests`).
    pub in_flight: Arc<AtomicUsize>,
    pub cache: crate::cache::layer::Shared,
    /// Per-upstream concurrency limits, by upstream name (process-wide, like the upstream).
    pub concurrency: HashMap<String, Arc<ConcurrencyLimit>>,
    /// Endpoint load and back-off, by upstream name.
    pub balancers: HashMap<String, Arc<Balancer>>,
    /// Retry budgets, by upstream name.
    pub retry_budgets: HashMap<String, Arc<tower::retry::budget::TpsBudget>>,
    /// Rate limits (their buckets and queues), by route name: a route's limit holds for the
    /// whole process, not per worker.
    pub rate_limits: HashMap<String, RateLimitLayer>,
    /// Pending embeddings batches, by route: requests on every worker batch together.
    pub batches: crate::llm::batch::Batches,
}

impl Shared {
    /// The balancer of one upstream, with its per-endpoint gauges.
    pub fn balancer(u: &crate::config::UpstreamConfig, metrics: &Metrics) -> Arc<Balancer> {
        let endpoints = u
            .endpoints
            .iter()
            .map(|e| {
                let endpoint = Upstream::endpoint_label(&e.value);
                let labels = [u.name.as_str(), endpoint.as_str()];
                let m = EndpointMetrics {
                    in_flight: metrics.endpoint_in_flight.with_label_values(&labels),
                    ejected: metrics.endpoint_ejected.with_label_values(&labels),
                    healthy: metrics.endpoint_healthy.with_label_values(&labels),
                    response_time: metrics.endpoint_response.with_label_values(&labels),
                };
                (endpoint, m)
            })
            .collect();
        let o = &u.outlier_detection;
        Balancer::new(
            endpoints,
            metrics.endpoint_cooldowns.with_label_values(&[&u.name]),
            Outliers {
                consecutive_failures: o.consecutive_failures,
                base_ejection: o.base_ejection_time,
                max_ejected_percent: o.max_ejected_percent,
            },
            metrics.endpoint_ejections.with_label_values(&[&u.name]),
            u.load_balancing.latency_weighted,
        )
    }
}

#[derive(Clone)]
pub struct Entry {
    router: Arc<Router>,
}

impl Entry {
    /// Builds every route's stack. Upstreams are built once and shared by their routes.
    /// `shared` is the state every worker shares (the in-flight limit, the cache).
    pub fn build(
        config: &Config,
        metrics: &Arc<Metrics>,
        shared: &Shared,
    ) -> Result<Entry, crate::upstream::BuildError> {
        let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
        for u in &config.upstreams {
            let balancer = match shared.balancers.get(&u.name) {
                Some(b) => b.clone(),
                None => Shared::balancer(u, metrics),
            };
            upstreams.insert(
                u.name.as_str(),
                Arc::new(Upstream::build(u, metrics, balancer)?),
            );
        }
        let overload = OverloadLayer::new(
            shared.in_flight.clone(),
            config.limits.max_in_flight_requests,
            metrics.overloaded.clone(),
        );
        let access_log = config.log.access_log;
        let mut routes = Vec::new();
        for r in &config.routes {
            // Validation guarantees the upstream exists.
            let Some(upstream) = upstreams.get(r.upstream.as_str()).cloned() else {
                continue;
            };
            let rewrite = PathRewrite {
                prefix: r.matcher.path_prefix.clone(),
                replacement: if r.strip_prefix {
                    Some("/".into())
                } else {
                    r.prefix_rewrite.clone()
                },
            };
            let limit = r
                .max_request_body_bytes
                .unwrap_or(config.limits.max_request_body_bytes);
            let timeouts = Timeouts {
                upstream: upstream.name.clone(),
                first_byte: upstream.timeouts.first_byte,
                idle: upstream.timeouts.idle,
                total: upstream.timeouts.total,
                metrics: upstream.metrics.clone(),
            };
            let base = ServiceBuilder::new()
                .layer(TimeoutLayer::new(timeouts))
                .service(Forward::new(upstream.clone(), rewrite));
            let outer = ServiceBuilder::new()
                .layer(ObserveLayer::new(
                    &r.name,
                    &r.upstream,
                    metrics.clone(),
                    access_log,
                ))
                .layer(overload.clone())
                .layer(BodyLimitLayer::new(limit.0));
            let route_err = |message| crate::upstream::BuildError::Route {
                route: r.name.clone(),
                message,
            };
            let dedup = r.dedup_enabled();
            let concurrency = shared.concurrency.get(&r.upstream).cloned();
            let plain = r.cache.is_none()
                && !dedup
                && r.rate_limits.is_empty()
                && r.retries.is_none()
                && !r.kind.is_llm();
            let service = if plain && concurrency.is_none() {
                // The plain proxy path, without a boxed service in the middle.
                RouteService::new(outer.service(base))
            } else {
                let mut inner = RouteService::new(base);
                // Right around the upstream timeouts: LLM first-token and token-gap limits.
                if let Some(layer) = FirstTokenLayer::new(r, metrics) {
                    inner = RouteService::new(layer.layer(inner));
                }
                if let Some(retries) = &r.retries {
                    let budget = match shared.retry_budgets.get(&r.upstream) {
                        Some(b) => b.clone(),
                        None => super::retry::budget(&crate::config::RetryBudgetConfig::default()),
                    };
                    let layer = RetryLayer::new(
                        retries,
                        &r.retry_methods(),
                        &r.retry_statuses(),
                        &r.upstream,
                        upstream.timeouts.total,
                        upstream.balancer.clone(),
                        budget,
                        metrics,
                    );
                    inner = RouteService::new(layer.layer(inner));
                }
                // Inside the cache: hits never take an upstream slot.
                if let Some(limit) = concurrency {
                    inner = RouteService::new(ConcurrencyLayer::new(limit).layer(inner));
                }
                // Inside the cache, outside the concurrency limit: a merged call takes one slot.
                let batch = r
                    .batch
                    .as_ref()
                    .filter(|_| r.kind == crate::config::RouteKind::Openai);
                if let Some(batch) = batch {
                    let inputs = r.cache.as_ref().map(|c| {
                        let ignored = crate::llm::cache_ignored_fields(r);
                        InputCache::new(&r.name, c, ignored, shared.cache.store.clone())
                    });
                    let groups = shared.batches.route(&r.name);
                    let layer =
                        BatchLayer::new(&r.name, &r.upstream, batch, inputs, groups, metrics);
                    inner = RouteService::new(layer.layer(inner));
                }
                if r.cache.is_some() || dedup {
                    let mut layer = CacheLayer::new(
                        &r.name,
                        r.cache.as_ref(),
                        dedup,
                        r.dedup_methods(),
                        shared.cache.clone(),
                        metrics,
                    )
                    .map_err(route_err)?
                    .ignoring_json_fields(crate::llm::cache_ignored_fields(r));
                    if batch.is_some() {
                        // The batch layer caches embeddings input by input.
                        layer = layer.skipping(crate::llm::batch::is_embeddings);
                    }
                    inner = RouteService::new(layer.layer(inner));
                }
                // Outside the cache, so hits are accounted for too.
                if let Some(layer) = LlmLayer::new(r, metrics) {
                    inner = RouteService::new(layer.layer(inner));
                }
                // Rate limits sit after the body limit: an oversized request costs no token.
                if !r.rate_limits.is_empty() {
                    let layer = match shared.rate_limits.get(&r.name) {
                        Some(layer) => layer.clone(),
                        None => RateLimitLayer::new(&r.name, &r.rate_limits, metrics)
                            .map_err(route_err)?,
                    };
                    inner = RouteService::new(layer.layer(inner));
                }
                RouteService::new(outer.service(inner))
            };
            let listener = r
                .matcher
                .listener
                .as_ref()
                .and_then(|name| config.listeners.iter().position(|l| &l.name == name));
            routes.push(Route::new(
                r.name.clone(),
                r.matcher.path_prefix.clone(),
                r.matcher.host.clone(),
                listener,
                service,
            ));
        }
        let unmatched = ServiceBuilder::new()
            .layer(ObserveLayer::new(NO_ROUTE, "", metrics.clone(), access_log))
            .service_fn(
                |req: crate::service::ProxyRequest| -> crate::service::ProxyFuture {
                    let path = req.uri().path().to_string();
                    Box::pin(async move { Err(ProxyError::NoRoute(path)) })
                },
            );
        Ok(Entry {
            router: Arc::new(Router::new(routes, RouteService::new(unmatched))),
        })
    }

    /// Handles one request from `client` on listener number `listener`. Never fails: every
    /// error has become a response by now.
    pub fn handle(
        &self,
        mut req: crate::service::ProxyRequest,
        listener: usize,
        client: &Peer,
    ) -> Pin<Box<dyn Future<Output = ProxyResponse> + Send>> {
        let id = headers::request_id(req.headers());
        req.headers_mut().insert(headers::REQUEST_ID, id.clone());
        let host = if self.router.matches_hosts() {
            req.uri().authority().map(|a| a.as_str()).or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
        } else {
            None
        };
        let route = self.router.find(listener, host, req.uri().path());
        let service = match route {
            Some(route) => &route.service,
            None => &self.router.unmatched,
        };
        req.extensions_mut().insert(RequestMeta {
            id: id.clone(),
            start: Instant::now(),
            client: client.clone(),
            upstream_wait: crate::http::UpstreamWait::new(),
        });
        // Every layer is always ready (limits answer with errors, not backpressure), so the
        // stack is called without polling readiness first.
        let response = service.call_shared(req);
        Box::pin(async move {
            match response.await {
                Ok(response) => response,
                Err(e) => e.to_response(Some(&id)),
            }
        })
    }
}
