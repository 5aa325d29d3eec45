//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/config`, `/status`, `POST /cache/purge`.

use crate::http::body::{full, ProxyBody};
use crate::metrics::Metrics;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A part of sidelight that reports its own health to `/status` and `/readyz` (the PostgreSQL
/// pools), without admin depending on it.
pub trait StatusSource: Send + Sync {
    /// Shown under the source's key in `/status`.
    fn status(&self) -> serde_json::Value;
    /// What is unhealthy, for `/readyz` (empty: all is well).
    fn unhealthy(&self) -> Vec<String>;
}

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// Rendered once: the config does not change while running.
    pub config_yaml: String,
    pub cache: crate::cache::layer::CacheShared,
    pub cache_max_bytes: u64,
    /// Every route's upstream, in config order, for `/readyz`.
    pub routes: Vec<(String, String)>,
    /// Every upstream's balancer (endpoint health and load), in config order.
    pub balancers: Vec<(String, Arc<crate::upstream::balance::Balancer>)>,
    /// Other health reporters by `/status` key (`postgres`).
    pub sources: Vec<(&'static str, Arc<dyn StatusSource>)>,
    /// `admin.token`: required as `Authorization: Bearer` on all but the probes.
    pub token: Option<String>,
}

impl AdminState {
    fn balancer(&self, upstream: &str) -> Option<&crate::upstream::balance::Balancer> {
        self.balancers
            .iter()
            .find(|(name, _)| name == upstream)
            .map(|(_, b)| b.as_ref())
    }

    /// Health gauges change when an ejection ends, which nothing else observes: bring them up
    /// to date before a scrape.
    fn refresh_health_gauges(&self) {
        for (route, upstream) in &self.routes {
            let healthy = self.balancer(upstream).is_none_or(|b| b.any_healthy());
            self.metrics
                .balancer
                .route_healthy(route)
                .set(i64::from(healthy));
        }
    }

    /// Routes none of whose endpoints is healthy (all failing health checks or ejected).
    fn unhealthy_routes(&self) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|(_, upstream)| self.balancer(upstream).is_some_and(|b| !b.any_healthy()))
            .map(|(route, _)| route.as_str())
            .collect()
    }
}

/// Serves until `gone`'s sender is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut gone: watch::Receiver<()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            // The admin port stays up while the proxy drains, so the drain can be watched; the
            // server aborts this task afterwards.
            _ = gone.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, req)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    text(status, "application/json", format!("{value}\n"))
}

/// `?route=NAME` from a query string.
fn route_param(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "route")
        .map(|(_, v)| v.to_string())
}

/// Whether `req` may see `path`: the probes are open (kubelets carry no token), the rest needs
/// the token when one is set.
fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    if matches!(req.uri().path(), "/healthz" | "/readyz") {
        return true;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    given.is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes()))
}

/// Compares digests, so the time taken says nothing about where (or whether the lengths) differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn unauthorized() -> Response<ProxyBody> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({
            "error": {
                "type": "unauthorized",
                "message": "this admin path needs Authorization: Bearer <admin.token>",
                "source": "sidelight",
            }
        }),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sidelight-admin\""),
    );
    response
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    if !authorized(state, &req) {
        return unauthorized();
    }
    if req.method() == Method::POST && req.uri().path() == "/cache/purge" {
        let route = route_param(req.uri().query());
        let purged = state.cache.store.purge(route.as_deref());
        tracing::info!(
            route = route.as_deref().unwrap_or("*"),
            purged,
            "cache purged"
        );
        return json(
            StatusCode::OK,
            serde_json::json!({ "purged": purged, "route": route }),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET (or POST /cache/purge)\n",
        );
    }
    match req.uri().path() {
        "/status" => {
            let (entries, bytes) = state.cache.store.stats();
            let upstreams: serde_json::Map<String, serde_json::Value> = state
                .balancers
                .iter()
                .map(|(name, b)| {
                    (
                        name.clone(),
                        serde_json::json!({
                            "healthy": b.any_healthy(),
                            "endpoints": b.status(),
                        }),
                    )
                })
                .collect();
            let unhealthy = state.unhealthy_routes();
            let mut others = Vec::new();
            let mut body = serde_json::Map::new();
            for (key, source) in &state.sources {
                others.extend(source.unhealthy());
                body.insert((*key).to_string(), source.status());
            }
            let mut value = serde_json::json!({
                "ready": state.ready.load(Ordering::Acquire) && unhealthy.is_empty() && others.is_empty(),
                "unhealthy_routes": unhealthy,
                "upstreams": upstreams,
                "cache": {
                    "entries": entries,
                    "bytes": bytes,
                    "max_bytes": state.cache_max_bytes,
                    "coalescing_in_flight": state.cache.coalescer.in_flight(),
                }
            });
            if let Some(obj) = value.as_object_mut() {
                obj.extend(body);
                obj.insert("unhealthy".into(), serde_json::json!(others));
            }
            json(StatusCode::OK, value)
        }
        "/metrics" => {
            state.refresh_health_gauges();
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if !state.ready.load(Ordering::Acquire) {
                return text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n");
            }
            let unhealthy = state.unhealthy_routes();
            let others: Vec<String> = state
                .sources
                .iter()
                .flat_map(|(_, s)| s.unhealthy())
                .collect();
            if unhealthy.is_empty() && others.is_empty() {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else if unhealthy.is_empty() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: unhealthy {}\n", others.join(", ")),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: no healthy endpoint for route(s) {}\n",
                        unhealthy.join(", ")
                    ),
                )
            }
        }
        "/config" => text(
            StatusCode::OK,
            "application/yaml",
            state.config_yaml.clone(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz, /readyz, /config, /status or POST /cache/purge\n",
        ),
    }
}
