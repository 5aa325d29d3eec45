//! Where a client's request enters: it gets its request id, finds its route, and runs through
//! that route's stack.

use super::router::Router;
use crate::http::headers;
use crate::http::{Peer, RequestMeta};
use crate::service::ProxyResponse;
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

/// Routes every request to its route's stack (assembled by `src/stack.rs`).
#[derive(Clone)]
pub struct Entry {
    router: Arc<Router>,
    /// Per listener, counts header fields dropped for an `_` in their name; `None` when
    /// `limits.allow_underscores_in_headers` keeps them.
    underscores_dropped: Option<Arc<[IntCounter]>>,
}

impl Entry {
    pub fn new(router: Router, underscores_dropped: Option<Vec<IntCounter>>) -> Entry {
        Entry {
            router: Arc::new(router),
            underscores_dropped: underscores_dropped.map(Arc::from),
        }
    }
}

/// Removes header fields whose names contain `_` (nginx's `underscores_in_headers off`):
/// `Transfer_Encoding` means nothing to sidelight, but a server that maps `_` to `-` would read
/// it as framing sidelight never checked. Returns how many went.
fn drop_underscored(headers: &mut http::HeaderMap) -> usize {
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return 0;
    }
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    let mut dropped = 0;
    for name in names {
        if let http::header::Entry::Occupied(entry) = headers.entry(&name) {
            dropped += entry.remove_entry_mult().1.count();
        }
        tracing::debug!(header = %name, "request header with an underscore in its name dropped (limits.allow_underscores_in_headers)");
    }
    dropped
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
        if let Some(counters) = &self.underscores_dropped {
            let dropped = drop_underscored(req.headers_mut());
            if dropped > 0 {
                if let Some(counter) = counters.get(listener) {
                    counter.inc_by(dropped as u64);
                }
            }
        }
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
