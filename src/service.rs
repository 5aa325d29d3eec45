//! The request path's service vocabulary: the request, response and future types every layer
//! speaks, and [`RouteService`], a route's type-erased stack.

use crate::error::ProxyError;
use crate::http::body::ProxyBody;
use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;

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

/// What an [`Around`] layer wraps: any always-ready service of the request path.
pub trait Inner:
    tower::Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ProxyFuture>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: tower::Service<
            ProxyRequest,
            Response = ProxyResponse,
            Error = ProxyError,
            Future = ProxyFuture,
        > + Clone
        + Send
        + 'static
{
}

/// A layer that never pushes back (limits answer with errors, not backpressure): it sees each
/// request together with the service inside it, as linkerd2-proxy's `stack::Proxy` does. One
/// generic [`Wrapped`] service and [`AroundLayer`] serve every such layer.
pub trait Around: Clone + Send + Sync + 'static {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture;

    /// This as a tower layer.
    fn into_layer(self) -> AroundLayer<Self> {
        AroundLayer(self)
    }

    /// `inner` with this layer on top.
    fn wrap<S>(&self, inner: S) -> Wrapped<Self, S> {
        Wrapped {
            around: self.clone(),
            inner,
        }
    }
}

/// The tower layer of an [`Around`].
#[derive(Clone)]
pub struct AroundLayer<A>(A);

impl<A: Around, S> tower::Layer<S> for AroundLayer<A> {
    type Service = Wrapped<A, S>;
    fn layer(&self, inner: S) -> Wrapped<A, S> {
        self.0.wrap(inner)
    }
}

/// `inner` with an [`Around`] layer on top: always ready.
#[derive(Clone)]
pub struct Wrapped<A, S> {
    around: A,
    inner: S,
}

impl<A: Around, S: Inner> tower::Service<ProxyRequest> for Wrapped<A, S> {
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
        self.around.call(&mut self.inner, req)
    }
}
