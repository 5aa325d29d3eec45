//! The HTTP request path.
//!
//! A request arrives on a client connection ([`listener`] accepts, [`conn`] serves: HTTP/1.1
//! by sidelight's own loop, h2c by hyper), goes through [`entry::Entry`] (request id, routing)
//! and then through its route's stack of tower layers, outermost first, one concern each:
//!
//! 1. [`observe`]: metrics, access log, and turning errors into responses (via [`crate::error`]);
//! 2. [`limit::OverloadLayer`]: 503 past `limits.max_in_flight_requests`;
//! 3. [`limit::BodyLimitLayer`]: 413 past the request body limit;
//! 4. [`crate::ratelimit::layer`]: rate limits (429 or queue), on routes that set them;
//! 5. [`crate::cache::layer`]: cache and coalescing, on routes that enable them;
//!    then [`crate::llm::batch`]: embeddings micro-batching, on routes with `batch:`;
//!    then [`crate::ratelimit::concurrency`]: the upstream's concurrency limit, when set;
//! 6. [`retry`]: retries on another endpoint, within the upstream's budget, when set;
//! 7. [`timeout`]: first-byte and total deadlines, idle gaps in the response body;
//! 8. [`forward`]: header hygiene, endpoint choice and the pooled upstream call.

pub mod body;
pub mod conn;
pub mod entry;
pub mod forward;
pub mod headers;
pub mod limit;
pub mod listener;
pub mod observe;
pub mod retry;
pub mod router;
pub mod timeout;

use crate::error::ProxyError;
use body::ProxyBody;
use http::{HeaderValue, Request, Response};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

pub type ProxyRequest = Request<ProxyBody>;
pub type ProxyResponse = Response<ProxyBody>;
pub type ProxyFuture = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

/// A route's whole stack (or a part of it), type-erased. Unlike tower's `BoxCloneSyncService`
/// it neither allocates to clone nor boxes the (already boxed) future again: every layer here
/// answers a [`ProxyFuture`] and is always ready.
#[derive(Clone)]
pub struct RouteService(std::sync::Arc<dyn ProxyService>);

/// What a route stack is made of: an always-ready, cheaply cloned service answering
/// [`ProxyFuture`]s. Implemented for every such service.
pub trait ProxyService: Send + Sync + 'static {
    fn call_clone(&self, req: ProxyRequest) -> ProxyFuture;
}

impl<S> ProxyService for S
where
    S: tower::Service<
            ProxyRequest,
            Response = ProxyResponse,
            Error = ProxyError,
            Future = ProxyFuture,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    fn call_clone(&self, req: ProxyRequest) -> ProxyFuture {
        // Layers are cheap handles (Arcs); a clone per call keeps `&self` callers lock-free.
        self.clone().call(req)
    }
}

impl RouteService {
    pub fn new(service: impl ProxyService) -> Self {
        RouteService(std::sync::Arc::new(service))
    }

    /// Calls the stack without cloning the handle first.
    pub fn call_shared(&self, req: ProxyRequest) -> ProxyFuture {
        self.0.call_clone(req)
    }
}

impl tower::Service<ProxyRequest> for RouteService {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ProxyFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> ProxyFuture {
        self.call_shared(req)
    }
}

/// Facts about a request set once by the entry service, read by the layers.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    pub id: HeaderValue,
    pub start: Instant,
    pub client: Peer,
    /// Set by whichever layer got this request's response headers; read by observe.
    pub upstream_wait: UpstreamWait,
}

impl RequestMeta {
    /// Marks an answer the request did not get from its own upstream call (a cache hit, a
    /// shared or batched answer): our request id on it, and how long it waited upstream.
    pub fn stamp(&self, headers: &mut http::HeaderMap, upstream_wait: Duration) {
        headers.insert(headers::REQUEST_ID, self.id.clone());
        self.upstream_wait.set(upstream_wait);
    }
}

/// The client end of a connection, worked out once per connection rather than per request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The IP as text, for `x-forwarded-for`.
    pub ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// How long sidelight waited for the upstream's response headers for one request, so the
/// observe layer can compute sidelight's own overhead. Set by the forwarding service, or by the
/// cache and batching layers for answers they share (zero for a cache hit); unset for answers
/// that never waited on an upstream (an error, for instance). A cell shared by the request
/// meta's clones rather than a response extension: a first extension costs three allocations.
#[derive(Clone, Debug)]
pub struct UpstreamWait(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl UpstreamWait {
    const UNSET: u64 = u64::MAX;

    pub fn new() -> Self {
        UpstreamWait(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            Self::UNSET,
        )))
    }

    pub fn set(&self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(Self::UNSET - 1);
        self.0.store(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Duration> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::UNSET => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

impl Default for UpstreamWait {
    fn default() -> Self {
        Self::new()
    }
}
