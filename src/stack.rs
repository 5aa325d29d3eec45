//! Assembles every route's stack from the config, outermost layer first, in the order
//! [`crate::proxy`] and the README list them: observe, overload, body limit, rate limits, LLM
//! accounting, cache and coalescing, embeddings batching, upstream concurrency, retries, LLM
//! first-token limits, upstream timeouts, forward. The state that all workers share (limits,
//! caches, balancers) is built once by [`SharedState::new`]; each worker then builds its own
//! stacks over it with [`entry`].

use crate::cache::coalesce::Coalescer;
use crate::cache::layer::{CacheLayer, CacheShared};
use crate::cache::store::Store;
use crate::config::{Config, RouteConfig, RouteKind};
use crate::error::ProxyError;
use crate::llm::batch::{BatchLayer, Batches, InputCache};
use crate::llm::first_token::FirstTokenLayer;
use crate::llm::layer::LlmLayer;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::proxy::entry::Entry;
use crate::proxy::forward::{Forward, PathRewrite};
use crate::proxy::limit::{BodyLimitLayer, OverloadLayer, RequestBufferLayer};
use crate::proxy::observe::ObserveLayer;
use crate::proxy::retry::{self, RetryLayer};
use crate::proxy::router::{Route, Router};
use crate::proxy::timeout::{TimeoutLayer, Timeouts};
use crate::ratelimit::concurrency::{ConcurrencyLayer, ConcurrencyLimit};
use crate::ratelimit::layer::RateLimitLayer;
use crate::service::{Around, ProxyFuture, ProxyRequest, RouteService};
use crate::upstream::balance::Balancer;
use crate::upstream::{BuildError, Upstream};
use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use tower::{Layer, ServiceBuilder};

/// State every worker shares: what must hold for the whole process, not per worker.
#[derive(Clone)]
pub struct SharedState {
    /// Requests in flight across all workers (`limits.max_in_flight_requests`).
    pub in_flight: Arc<AtomicUsize>,
    pub cache: CacheShared,
    /// What each upstream shares across workers, by upstream name.
    pub upstreams: HashMap<String, UpstreamShared>,
    /// Rate limits (their buckets and queues), by route name.
    pub rate_limits: HashMap<String, RateLimitLayer>,
    /// Pending embeddings batches, by route: requests on every worker batch together.
    pub batches: Batches,
}

/// One upstream's process-wide parts.
#[derive(Clone)]
pub struct UpstreamShared {
    /// Endpoint load, health and back-off.
    pub balancer: Arc<Balancer>,
    pub retry_budget: Arc<tower::retry::budget::TpsBudget>,
    /// `upstreams[].concurrency`, when set.
    pub concurrency: Option<Arc<ConcurrencyLimit>>,
}

impl SharedState {
    pub fn new(config: &Config, metrics: &Metrics) -> SharedState {
        SharedState {
            in_flight: Arc::new(AtomicUsize::new(0)),
            cache: CacheShared {
                store: Store::new(config.cache.max_bytes.0, metrics.cache.store()),
                coalescer: Arc::new(Coalescer::default()),
                coalesce_max_buffer: usize::try_from(config.cache.coalesce_max_buffer_bytes.0)
                    .unwrap_or(usize::MAX),
            },
            upstreams: config
                .upstreams
                .iter()
                .map(|u| {
                    let shared = UpstreamShared {
                        balancer: Balancer::for_upstream(u, metrics),
                        retry_budget: retry::budget(&u.retry_budget),
                        concurrency: u
                            .concurrency
                            .as_ref()
                            .map(|c| ConcurrencyLimit::new(&u.name, c, metrics)),
                    };
                    (u.name.clone(), shared)
                })
                .collect(),
            rate_limits: config
                .routes
                .iter()
                .filter(|r| !r.rate_limits.is_empty())
                .map(|r| {
                    let layer = RateLimitLayer::new(&r.name, &r.rate_limits, metrics);
                    (r.name.clone(), layer)
                })
                .collect(),
            batches: Batches::default(),
        }
    }

    /// Every upstream's balancer, by name (for health checks and `/status`).
    pub fn balancers(&self) -> HashMap<String, Arc<Balancer>> {
        self.upstreams
            .iter()
            .map(|(name, u)| (name.clone(), u.balancer.clone()))
            .collect()
    }
}

/// One layer of a route's stack, boxed so optional layers compose in a list.
type StackLayer = Box<dyn FnOnce(RouteService) -> RouteService>;

fn boxed(layer: impl Around) -> StackLayer {
    Box::new(move |inner| RouteService::new(layer.into_layer().layer(inner)))
}

/// Builds one worker's stacks. Upstreams (and their connection pools) are the worker's own;
/// everything in `shared` is the process's.
pub fn entry(
    config: &Config,
    metrics: &Arc<Metrics>,
    shared: &SharedState,
) -> Result<Entry, BuildError> {
    let overload = OverloadLayer::new(
        shared.in_flight.clone(),
        config.limits.max_in_flight_requests,
        metrics.http.overloaded(),
    );
    let mut upstreams: HashMap<&str, (Arc<Upstream>, &UpstreamShared)> = HashMap::new();
    for u in &config.upstreams {
        let parts = shared
            .upstreams
            .get(&u.name)
            .ok_or_else(|| missing(format!("upstream {:?}", u.name)))?;
        let upstream = Upstream::build(u, metrics, parts.balancer.clone())?;
        upstreams.insert(u.name.as_str(), (Arc::new(upstream), parts));
    }
    let mut routes = Vec::new();
    for r in &config.routes {
        let (upstream, parts) = upstreams
            .get(r.upstream.as_str())
            .cloned()
            .ok_or_else(|| missing(format!("route {:?}: upstream {:?}", r.name, r.upstream)))?;
        let service = route_stack(config, r, upstream, parts, &overload, metrics, shared)?;
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
        .layer(ObserveLayer::new(NO_ROUTE, "", metrics, config.log.access_log).into_layer())
        .service_fn(|req: ProxyRequest| -> ProxyFuture {
            let path = req.uri().path().to_string();
            Box::pin(async move { Err(ProxyError::NoRoute(path)) })
        });
    let underscores_dropped = (!config.limits.allow_underscores_in_headers).then(|| {
        config
            .listeners
            .iter()
            .map(|l| metrics.listeners.listener(&l.name).headers_dropped)
            .collect()
    });
    Ok(Entry::new(
        Router::new(routes, RouteService::new(unmatched)),
        underscores_dropped,
    ))
}

/// One route's stack, outermost first.
fn route_stack(
    config: &Config,
    r: &RouteConfig,
    upstream: Arc<Upstream>,
    parts: &UpstreamShared,
    overload: &OverloadLayer,
    metrics: &Arc<Metrics>,
    shared: &SharedState,
) -> Result<RouteService, BuildError> {
    let body_limit = r
        .max_request_body_bytes
        .unwrap_or(config.limits.max_request_body_bytes);
    let outer = ServiceBuilder::new()
        // 1. metrics, access log, errors into responses
        .layer(ObserveLayer::new(&r.name, &r.upstream, metrics, config.log.access_log).into_layer())
        // 2. 503 past limits.max_in_flight_requests
        .layer(overload.clone().into_layer())
        // 3. 413 past the request body limit; small bodies read whole before going on
        .layer(BodyLimitLayer::new(body_limit.0).into_layer())
        .layer(
            RequestBufferLayer::new(
                config.limits.request_buffering_bytes.0,
                metrics.http.bodies_buffered(&r.name),
            )
            .into_layer(),
        );
    let rewrite = PathRewrite {
        prefix: r.matcher.path_prefix.clone(),
        replacement: if r.strip_prefix {
            Some("/".into())
        } else {
            r.prefix_rewrite.clone()
        },
    };
    let timeouts = Timeouts {
        upstream: upstream.name.clone(),
        first_byte: upstream.timeouts.first_byte,
        idle: upstream.timeouts.idle,
        total: upstream.timeouts.total,
        metrics: upstream.metrics.clone(),
    };
    // 7. upstream deadlines; 8. header hygiene, endpoint choice, the pooled call
    let base = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts).into_layer())
        .service(Forward::new(upstream.clone(), rewrite));

    let dedup = r.dedup_enabled();
    let plain = r.cache.is_none()
        && !dedup
        && r.rate_limits.is_empty()
        && r.retries.is_none()
        && !r.kind.is_llm()
        && parts.concurrency.is_none();
    if plain {
        // The plain proxy path, without a boxed service in the middle.
        return Ok(RouteService::new(outer.service(base)));
    }

    let batch = r.batch.as_ref().filter(|_| r.kind == RouteKind::Openai);
    let rate_limit = match r.rate_limits.is_empty() {
        true => None,
        false => Some(
            shared
                .rate_limits
                .get(&r.name)
                .cloned()
                .ok_or_else(|| missing(format!("route {:?}: rate limits", r.name)))?,
        ),
    };
    let cache = (r.cache.is_some() || dedup).then(|| {
        let layer = CacheLayer::new(
            &r.name,
            r.cache.as_ref(),
            dedup,
            r.dedup_methods(),
            shared.cache.clone(),
            metrics,
        )
        .ignoring_json_fields(crate::llm::cache_ignored_fields(r));
        match batch {
            // The batch layer caches embeddings input by input.
            Some(_) => layer.skipping(crate::llm::batch::is_embeddings),
            None => layer,
        }
    });
    let batch = batch.map(|batch| {
        let inputs = r.cache.as_ref().map(|c| {
            let ignored = crate::llm::cache_ignored_fields(r);
            InputCache::new(&r.name, c, ignored, shared.cache.store.clone())
        });
        let groups = shared.batches.route(&r.name);
        BatchLayer::new(&r.name, &r.upstream, batch, inputs, groups, metrics)
    });
    let retries = r.retries.as_ref().map(|retries| {
        RetryLayer::new(
            retries,
            r.retry_methods(),
            &r.retry_statuses(),
            &r.upstream,
            upstream.timeouts.total,
            upstream.balancer.clone(),
            parts.retry_budget.clone(),
            metrics,
        )
    });

    let layers: [Option<StackLayer>; 7] = [
        // 4. rate limits, after the body limit: an oversized request costs no token
        rate_limit.map(boxed),
        // LLM accounting, outside the cache so hits are accounted for too
        LlmLayer::new(r, metrics).map(boxed),
        // 5. cache and coalescing; then embeddings batching; then the upstream's
        //    concurrency limit (inside the cache: hits never take a slot, a merged call one)
        cache.map(boxed),
        batch.map(|batch| -> StackLayer {
            Box::new(move |inner| RouteService::new(batch.layer(inner)))
        }),
        parts
            .concurrency
            .clone()
            .map(|l| boxed(ConcurrencyLayer::new(l))),
        // 6. retries on another endpoint
        retries.map(boxed),
        // LLM first-token and token-gap limits, right around the upstream timeouts
        FirstTokenLayer::new(r, metrics).map(boxed),
    ];
    let inner = layers
        .into_iter()
        .flatten()
        .rev()
        .fold(RouteService::new(base), |inner, layer| layer(inner));
    Ok(RouteService::new(outer.service(inner)))
}

fn missing(what: String) -> BuildError {
    BuildError::NotShared { what }
}
