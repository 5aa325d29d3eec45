//! sidelight's own errors, and the one place where they become HTTP responses.
//!
//! Every response sidelight generates itself carries `x-sidelight-error: <type>` and a JSON body
//! shaped like the OpenAI error object (`{"error": {"type", "message", "request_id"}}`), so LLM
//! SDKs surface it readably and a user can tell it apart from an upstream's own error.

use crate::http::body::{full, ProxyBody};
use http::{header, HeaderValue, Response, StatusCode};
use std::time::Duration;

pub const ERROR_HEADER: &str = "x-sidelight-error";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {0}")]
    NoRoute(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body failed: {0}")]
    ClientBody(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The client sent no byte of its request body for `limits.client_body_timeout`.
    #[error("the client sent nothing of its request body for {timeout:?}")]
    ClientBodyTimeout { timeout: Duration },
    /// A request sidelight cannot forward faithfully (a transfer coding other than chunked).
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error("request head larger than {limit} bytes or with more than {headers} header fields")]
    HeadersTooLarge { limit: usize, headers: usize },
    #[error("sidelight is overloaded ({limit} requests in flight)")]
    Overloaded { limit: usize },
    #[error("rate limit {limit:?} exceeded; retry in {retry_after} s")]
    RateLimited {
        limit: String,
        /// The limit's request count per unit, for `x-ratelimit-limit`.
        rate: u32,
        retry_after: u64,
    },
    #[error("upstream {upstream} already has {limit} requests in flight and its queue is full or too slow")]
    UpstreamBusy { upstream: String, limit: usize },
    #[error("cannot connect to upstream {upstream}: {detail}")]
    UpstreamConnect { upstream: String, detail: String },
    /// The upstream went away before any of its response reached the client: before response
    /// headers, or (an LLM stream held for its first token) before that token. Retryable.
    #[error("upstream {upstream} closed the connection before its response began: {detail}")]
    UpstreamReset { upstream: String, detail: String },
    /// The upstream answered with something that is not a valid HTTP response head (not HTTP,
    /// a malformed or oversized head, a bad length). Not retried: a broken upstream tends to
    /// stay broken, and the request may have been acted on.
    #[error("upstream {upstream} sent an invalid response: {detail}")]
    UpstreamProtocol { upstream: String, detail: String },
    #[error("connecting to upstream {upstream} took longer than {timeout:?}")]
    ConnectTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} sent no response headers within {timeout:?}")]
    FirstByteTimeout { upstream: String, timeout: Duration },
    #[error("request to upstream {upstream} exceeded its total timeout of {timeout:?}")]
    TotalTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} sent nothing for {timeout:?} in the middle of the response body")]
    IdleTimeout { upstream: String, timeout: Duration },
    /// An LLM stream sent no generated token in time. Returned before any byte of the response
    /// reached the client, so it is safe to retry.
    #[error("upstream {upstream} sent no token within {timeout:?}")]
    FirstTokenTimeout { upstream: String, timeout: Duration },
    /// An LLM stream stopped sending tokens in the middle (ends the body; never a response).
    #[error("upstream {upstream} sent no token for {timeout:?} in the middle of the stream")]
    TokenGapTimeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} response body failed: {detail}")]
    UpstreamBody { upstream: String, detail: String },
    /// An LLM stream ended without its terminal event (OpenAI `data: [DONE]`, Anthropic
    /// `message_stop`): ends the body with an error event; never a response.
    #[error(
        "upstream {upstream} ended the stream without its final event: the answer is incomplete"
    )]
    StreamTruncated { upstream: String },
    /// An LLM stream sent an event whose JSON does not parse; it is replaced by an error event.
    #[error(
        "upstream {upstream} sent a malformed stream event ({detail}): the answer is incomplete"
    )]
    StreamMalformed { upstream: String, detail: String },
    /// An LLM stream's upstream connection broke in the middle of the stream.
    #[error("upstream {upstream} closed the connection in the middle of the stream ({detail}): the answer is incomplete")]
    UpstreamClosed { upstream: String, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The ways an LLM stream breaks that sidelight reports itself (`sidelight_llm_stream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFault {
    /// Ended without its terminal event.
    Truncated,
    /// An event whose JSON does not parse.
    Malformed,
    /// The upstream connection broke mid-stream.
    UpstreamClosed,
}

impl StreamFault {
    pub const ALL: [StreamFault; 3] = [
        StreamFault::Truncated,
        StreamFault::Malformed,
        StreamFault::UpstreamClosed,
    ];

    /// The metric's `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            StreamFault::Truncated => "truncated",
            StreamFault::Malformed => "malformed",
            StreamFault::UpstreamClosed => "upstream_closed",
        }
    }

    /// What went wrong, for the 502 of a stream that broke before its first token.
    fn before_first_token(self) -> &'static str {
        match self {
            StreamFault::Truncated => "the stream ended before its first token",
            StreamFault::Malformed => "a malformed event came before the first token",
            StreamFault::UpstreamClosed => "the stream broke before its first token",
        }
    }
}

impl ProxyError {
    /// A stream fault before the first token of a held stream, as the retryable reset it is
    /// (nothing reached the client).
    pub fn reset_before_first_token(self, upstream: &str) -> ProxyError {
        let Some(fault) = self.stream_fault() else {
            return self;
        };
        let detail = match &self {
            ProxyError::StreamMalformed { detail, .. }
            | ProxyError::UpstreamClosed { detail, .. } => {
                format!("{} ({detail})", fault.before_first_token())
            }
            _ => fault.before_first_token().to_string(),
        };
        ProxyError::UpstreamReset {
            upstream: upstream.to_string(),
            detail,
        }
    }

    /// A body's error as the client's error: a `ProxyError` raised inside a body layer (the body
    /// limit, say) keeps its kind; anything else is a client body failure.
    pub fn from_body(e: crate::BoxError) -> Self {
        match e.downcast::<ProxyError>() {
            Ok(err) => *err,
            Err(e) => ProxyError::ClientBody(e.to_string()),
        }
    }

    /// The stable, documented `type` of the error (also the `x-sidelight-error` header).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body_error",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::ClientBodyTimeout { .. } => "client_body_timeout",
            ProxyError::HeadersTooLarge { .. } => "request_headers_too_large",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamBusy { .. } => "upstream_busy",
            ProxyError::UpstreamConnect { .. } => "upstream_connect_failed",
            ProxyError::UpstreamReset { .. } => "upstream_reset",
            ProxyError::UpstreamProtocol { .. } => "upstream_protocol_error",
            ProxyError::ConnectTimeout { .. } => "upstream_connect_timeout",
            ProxyError::FirstByteTimeout { .. } => "upstream_first_byte_timeout",
            ProxyError::TotalTimeout { .. } => "upstream_total_timeout",
            ProxyError::IdleTimeout { .. } => "upstream_idle_timeout",
            ProxyError::FirstTokenTimeout { .. } => "first_token_timeout",
            ProxyError::TokenGapTimeout { .. } => "token_gap_timeout",
            ProxyError::UpstreamBody { .. } => "upstream_body_error",
            ProxyError::StreamTruncated { .. } => "stream_truncated",
            ProxyError::StreamMalformed { .. } => "stream_malformed",
            ProxyError::UpstreamClosed { .. } => "upstream_closed",
            ProxyError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamProtocol { .. }
            | ProxyError::UpstreamBody { .. }
            | ProxyError::StreamTruncated { .. }
            | ProxyError::StreamMalformed { .. }
            | ProxyError::UpstreamClosed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. }
            | ProxyError::FirstByteTimeout { .. }
            | ProxyError::TotalTimeout { .. }
            | ProxyError::IdleTimeout { .. }
            | ProxyError::FirstTokenTimeout { .. }
            | ProxyError::TokenGapTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Which LLM stream fault this is, if it is one.
    pub fn stream_fault(&self) -> Option<StreamFault> {
        match self {
            ProxyError::StreamTruncated { .. } => Some(StreamFault::Truncated),
            ProxyError::StreamMalformed { .. } => Some(StreamFault::Malformed),
            ProxyError::UpstreamClosed { .. } => Some(StreamFault::UpstreamClosed),
            _ => None,
        }
    }

    /// False for errors sidelight answers on its own, without waiting on an upstream.
    pub fn involves_upstream(&self) -> bool {
        !matches!(
            self,
            ProxyError::NoRoute(_)
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientBody(_)
                | ProxyError::BadRequest(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::ClientBodyTimeout { .. }
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::Overloaded { .. }
                | ProxyError::RateLimited { .. }
                | ProxyError::UpstreamBusy { .. }
                | ProxyError::Internal(_)
        )
    }

    /// The response a client receives for this error.
    pub fn to_response(&self, request_id: Option<&HeaderValue>) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": {
                "type": self.kind(),
                "message": self.to_string(),
                "source": "sidelight",
                "request_id": request_id.and_then(|v| v.to_str().ok()),
            }
        });
        let mut response = Response::new(full(body.to_string()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.kind()));
        if let Some(id) = request_id {
            headers.insert(crate::http::headers::REQUEST_ID, id.clone());
        }
        match self {
            ProxyError::Overloaded { .. } | ProxyError::UpstreamBusy { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited {
                rate, retry_after, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
                headers.insert("x-ratelimit-limit", HeaderValue::from(*rate));
                headers.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("x-ratelimit-reset", HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        response
    }
}

/// "outer: inner: innermost", since hyper's top-level messages alone say little. Repeated
/// messages (io::Error repeats the error it wraps) are shown once.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = e.source();
    }
    out
}
