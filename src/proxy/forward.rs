//! The innermost service: rewrites the request for its upstream and sends it over the pool.

use crate::error::ProxyError;
use crate::http::body::BodyObserver;
use crate::http::headers;
use crate::http::RequestMeta;
use crate::http1::client::H1Error;
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse};
use crate::upstream::balance::{backoff_from, EndpointInFlight, EndpointOutcome, TriedEndpoints};
use crate::upstream::{find_connect_failure, ConnectFailure, Endpoint, SendError, Upstream};
use crate::BoxError;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri, Version};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::Service;

/// How a route turns its request path into the upstream's.
#[derive(Clone, Debug)]
pub struct PathRewrite {
    /// The route's matched prefix.
    pub prefix: String,
    /// What replaces the prefix; `None` keeps the path as it is.
    pub replacement: Option<String>,
}

impl PathRewrite {
    /// The upstream path-and-query for `uri` on `endpoint`.
    pub fn apply(&self, endpoint: &Endpoint, uri: &Uri) -> String {
        let path = uri.path();
        let rewritten: std::borrow::Cow<str> = match &self.replacement {
            Some(replacement) => {
                let rest = path.strip_prefix(self.prefix.as_str()).unwrap_or(path);
                join(replacement, rest).into()
            }
            None => path.into(),
        };
        let mut out = String::with_capacity(endpoint.base_path.len() + rewritten.len() + 32);
        out.push_str(&endpoint.base_path);
        if !rewritten.starts_with('/') {
            out.push('/');
        }
        out.push_str(&rewritten);
        if let Some(q) = uri.query() {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

impl PathRewrite {
    /// The upstream request target for `uri` on `endpoint`, in origin form (the transport adds
    /// scheme and authority where its protocol needs them).
    pub fn upstream_uri(&self, endpoint: &Endpoint, uri: &Uri) -> Result<Uri, String> {
        if self.replacement.is_none() && endpoint.base_path.is_empty() {
            // The common case: the path goes as it came; its already-checked bytes are shared.
            if let Some(pq) = uri.path_and_query().filter(|pq| pq.path().starts_with('/')) {
                if uri.scheme().is_none() && uri.authority().is_none() {
                    return Ok(uri.clone());
                }
                return Ok(Uri::from(pq.clone()));
            }
        }
        PathAndQuery::try_from(self.apply(endpoint, uri))
            .map(Uri::from)
            .map_err(|e| e.to_string())
    }
}

/// Joins two path pieces with exactly one slash between them.
fn join(a: &str, b: &str) -> String {
    match (a.ends_with('/'), b.starts_with('/')) {
        (true, true) => format!("{a}{}", &b[1..]),
        (false, false) if !a.is_empty() && !b.is_empty() => format!("{a}/{b}"),
        _ => format!("{a}{b}"),
    }
}

#[derive(Clone)]
pub struct Forward {
    upstream: Arc<Upstream>,
    rewrite: Arc<PathRewrite>,
}

impl Forward {
    pub fn new(upstream: Arc<Upstream>, rewrite: PathRewrite) -> Self {
        Forward {
            upstream,
            rewrite: Arc::new(rewrite),
        }
    }
}

impl Service<ProxyRequest> for Forward {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ProxyRequest) -> ProxyFuture {
        let upstream = self.upstream.clone();
        let index = upstream.pick(req.extensions().get::<TriedEndpoints>());
        let in_flight = upstream.balancer.enter(index);
        let endpoint = &upstream.endpoints[index];
        let uri = match self.rewrite.upstream_uri(endpoint, req.uri()) {
            Ok(uri) => uri,
            Err(e) => {
                let err = ProxyError::BadRequest(format!("cannot rewrite the path: {e}"));
                return Box::pin(async move { Err(err) });
            }
        };
        let (client_ip, request_id, wait_cell) = match req.extensions().get::<RequestMeta>() {
            Some(meta) => (
                meta.client.ip.clone(),
                meta.id.clone(),
                Some(meta.upstream_wait.clone()),
            ),
            None => (
                HeaderValue::from_static("unknown"),
                HeaderValue::from_static("-"),
                None,
            ),
        };
        *req.uri_mut() = uri;
        // The transport picks HTTP/1.1 or HTTP/2; the client's version is irrelevant.
        *req.version_mut() = Version::HTTP_11;
        headers::to_upstream(
            req.headers_mut(),
            &client_ip,
            &endpoint.host_header,
            &upstream.headers,
        );
        if let Some(credentials) = &endpoint.authorization {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, credentials.clone());
        }

        Box::pin(async move {
            let sent = Instant::now();
            let result = upstream.send(index, req).await;
            let wait = sent.elapsed();
            let metrics = &upstream.metrics;
            match result {
                Ok(response) => {
                    metrics.response_time.observe(wait.as_secs_f64());
                    upstream.balancer.record(
                        index,
                        if response.status().is_server_error() {
                            EndpointOutcome::ServerError(wait)
                        } else {
                            EndpointOutcome::Success(wait)
                        },
                    );
                    if response.status() == http::StatusCode::TOO_MANY_REQUESTS {
                        // The endpoint asked for a pause: others take its traffic meanwhile.
                        let pause = backoff_from(response.headers());
                        upstream.balancer.cool_down(index, pause);
                        tracing::info!(upstream = %upstream.name, endpoint = index, pause_ms = pause.as_millis() as u64, "endpoint answered 429; backing off");
                    }
                    let watch = UpstreamBodyWatch {
                        _in_flight: in_flight,
                        body_errors: metrics.body_errors.clone(),
                        upstream: upstream.name.clone(),
                    };
                    let mut response =
                        response.map(|body| crate::http::body::Observed::boxed(body, watch));
                    headers::to_client(response.headers_mut(), &request_id);
                    if let Some(cell) = &wait_cell {
                        cell.add(wait);
                    }
                    Ok(response)
                }
                Err(err) => {
                    upstream.balancer.record(index, EndpointOutcome::Failure);
                    // A failed attempt that is retried waited on the upstream too.
                    if let Some(cell) = &wait_cell {
                        cell.add(wait);
                    }
                    Err(classify(&upstream, err))
                }
            }
        })
    }
}

/// Keeps the endpoint's in-flight count until the response body is done, and names the
/// upstream in the body's errors.
struct UpstreamBodyWatch {
    _in_flight: EndpointInFlight,
    body_errors: prometheus::IntCounter,
    upstream: Arc<str>,
}

impl BodyObserver for UpstreamBodyWatch {
    fn map_error(&mut self, error: BoxError) -> BoxError {
        self.body_errors.inc();
        BoxError::from(ProxyError::UpstreamBody {
            upstream: self.upstream.to_string(),
            detail: error.to_string(),
        })
    }
}

fn classify(upstream: &Upstream, err: SendError) -> ProxyError {
    let name = upstream.name.to_string();
    let failure = match &err {
        SendError::Connect(failure) => Some(failure),
        SendError::Client(e) => find_connect_failure(e),
        SendError::Http1(_) => None,
        SendError::Request(message) => return ProxyError::BadRequest(message.clone()),
    };
    if failure.is_none() && is_protocol_error(&err) {
        upstream.metrics.protocol_errors.inc();
        return ProxyError::UpstreamProtocol {
            upstream: name,
            detail: crate::error::chain(&err),
        };
    }
    match failure {
        Some(ConnectFailure::Timeout(timeout)) => ProxyError::ConnectTimeout {
            upstream: name,
            timeout: *timeout,
        },
        Some(failure) => ProxyError::UpstreamConnect {
            upstream: name,
            detail: failure.to_string(),
        },
        None => {
            upstream.metrics.reset.inc();
            ProxyError::UpstreamReset {
                upstream: name,
                detail: crate::error::chain(&err),
            }
        }
    }
}

/// An answer that is not valid HTTP, as opposed to a connection that went away.
fn is_protocol_error(err: &SendError) -> bool {
    match err {
        SendError::Http1(H1Error::Invalid(_)) => true,
        SendError::Client(e) => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(e) = cur {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_parse)
                {
                    return true;
                }
                cur = e.source();
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(base: &str) -> Endpoint {
        Endpoint {
            scheme: http::uri::Scheme::HTTP,
            authority: "up:80".parse().unwrap(),
            base_path: base.into(),
            host_header: HeaderValue::from_static("up"),
            authorization: None,
        }
    }

    #[test]
    fn rewrites() {
        let uri: Uri = "/openai/v1/chat?x=1".parse().unwrap();
        let keep = PathRewrite {
            prefix: "/openai".into(),
            replacement: None,
        };
        assert_eq!(keep.apply(&endpoint(""), &uri), "/openai/v1/chat?x=1");
        let strip = PathRewrite {
            prefix: "/openai".into(),
            replacement: Some("/".into()),
        };
        assert_eq!(strip.apply(&endpoint(""), &uri), "/v1/chat?x=1");
        assert_eq!(strip.apply(&endpoint("/base"), &uri), "/base/v1/chat?x=1");
        let strip_slash = PathRewrite {
            prefix: "/openai/".into(),
            replacement: Some("/".into()),
        };
        assert_eq!(strip_slash.apply(&endpoint(""), &uri), "/v1/chat?x=1");
        let replace = PathRewrite {
            prefix: "/openai".into(),
            replacement: Some("/api/v2".into()),
        };
        assert_eq!(replace.apply(&endpoint(""), &uri), "/api/v2/v1/chat?x=1");
        let exact: Uri = "/openai".parse().unwrap();
        assert_eq!(strip.apply(&endpoint(""), &exact), "/");

        // The request target sent upstream: always origin form, rewritten or not.
        let target = |r: &PathRewrite, base: &str, uri: &str| {
            r.upstream_uri(&endpoint(base), &uri.parse().unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(
            target(&keep, "", "/openai/v1/chat?x=1"),
            "/openai/v1/chat?x=1"
        );
        assert_eq!(target(&keep, "", "http://h:1/v1/chat?x=1"), "/v1/chat?x=1");
        assert_eq!(target(&keep, "", "http://h:1"), "/");
        assert_eq!(target(&keep, "/base", "/v1?x=1"), "/base/v1?x=1");
        assert_eq!(target(&strip, "", "http://h:1/openai/v1?x=1"), "/v1?x=1");
    }
}
