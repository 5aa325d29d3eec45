//! Where a client's request enters: it gets its request id, finds its route, and runs through
//! that route's stack.

use super::router::Router;
use crate::http::headers;
use crate::http::{Peer, RequestMeta};
use crate::service::ProxyResponse;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// Routes every request to its route's stack (assembled by `src/stack.rs`).
#[derive(Clone)]
pub struct Entry {
    router: Arc<Router>,
}

impl Entry {
    pub fn new(router: Router) -> Entry {
        Entry {
            router: Arc::new(router),
        }
    }
}

impl crate::http1::server::Handler for Entry {
    /// Handles one request from `client` on listener number `listener`. Never fails: every
    /// error has become a response by now.
    fn handle(
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
