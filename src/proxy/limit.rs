//! Limits sidelight enforces on itself: requests in flight (503) and request body size (413).

use crate::error::ProxyError;
use crate::http::body::{BodyObserver, Observed, ProxyBody};
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};

/// Refuses new requests with 503 once `limit` are in flight (across all routes and listeners);
/// a request stays in flight until its response body is done.
#[derive(Clone)]
pub struct OverloadLayer {
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    refused: IntCounter,
}

impl OverloadLayer {
    pub fn new(in_flight: Arc<AtomicUsize>, limit: usize, refused: IntCounter) -> Self {
        OverloadLayer {
            in_flight,
            limit,
            refused,
        }
    }
}

struct InFlightSlot(Arc<AtomicUsize>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BodyObserver for InFlightSlot {}

impl Around for OverloadLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let limit = self.limit;
        let guard = InFlightSlot(self.in_flight.clone());
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= limit {
            drop(guard);
            self.refused.inc();
            return Box::pin(async move { Err(ProxyError::Overloaded { limit }) });
        }
        let fut = inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|body| Observed::boxed(body, guard)))
        })
    }
}

/// Answers 413 when the request body is larger than the route's limit: at once when
/// `Content-Length` says so, or as soon as a streamed body crosses it.
#[derive(Clone)]
pub struct BodyLimitLayer {
    limit: u64,
}

impl BodyLimitLayer {
    pub fn new(limit: u64) -> Self {
        BodyLimitLayer { limit }
    }
}

/// Why a request body failed, kept for the answer: the upstream call fails when the body does,
/// and the client should hear the body's reason, not "upstream reset".
#[derive(Debug)]
enum BodyFailure {
    TooLarge,
    /// The client's own error reading the body (it hung up, or broke the chunked framing).
    Client(String),
    /// The client sent nothing for `limits.client_body_timeout`.
    ClientTimeout(std::time::Duration),
}

impl Around for BodyLimitLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let limit = self.limit;
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Box::pin(async move { Err(ProxyError::BodyTooLarge { limit }) });
        }
        if req.body().is_end_stream() {
            return inner.call(req);
        }
        let failure = Arc::new(OnceLock::new());
        let req = req.map(|body| {
            Limited {
                inner: body,
                remaining: limit,
                limit,
                failure: failure.clone(),
            }
            .boxed_unsync()
        });
        let fut = inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            match failure.get() {
                Some(BodyFailure::TooLarge) => Err(ProxyError::BodyTooLarge { limit }),
                Some(BodyFailure::Client(why)) if result.is_err() => {
                    Err(ProxyError::ClientBody(why.clone()))
                }
                Some(BodyFailure::ClientTimeout(timeout)) if result.is_err() => {
                    Err(ProxyError::ClientBodyTimeout { timeout: *timeout })
                }
                _ => result,
            }
        })
    }
}

pin_project_lite::pin_project! {
    struct Limited {
        #[pin]
        inner: ProxyBody,
        remaining: u64,
        limit: u64,
        failure: Arc<OnceLock<BodyFailure>>,
    }
}

impl Body for Limited {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > *this.remaining {
                    let _ = this.failure.set(BodyFailure::TooLarge);
                    return Poll::Ready(Some(Err(
                        ProxyError::BodyTooLarge { limit: *this.limit }.into()
                    )));
                }
                *this.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let failure = match e.downcast_ref::<ProxyError>() {
                    Some(ProxyError::ClientBodyTimeout { timeout }) => {
                        BodyFailure::ClientTimeout(*timeout)
                    }
                    _ => BodyFailure::Client(crate::error::chain(e.as_ref())),
                };
                let _ = this.failure.set(failure);
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a small request body whole before the request goes on, so a slow client holds no
/// upstream connection while its body trickles in (nginx's request buffering). A chunked body
/// is read up to `limits.request_buffering_bytes`: if it ends there it goes on with a length,
/// else what was read goes first and the rest streams. Longer known lengths stream.
#[derive(Clone)]
pub struct RequestBufferLayer {
    max: u64,
    buffered: IntCounter,
}

impl RequestBufferLayer {
    pub fn new(max: u64, buffered: IntCounter) -> Self {
        RequestBufferLayer { max, buffered }
    }
}

impl Around for RequestBufferLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let exact = req.body().size_hint().exact();
        if self.max == 0 || req.body().is_end_stream() || exact.is_some_and(|n| n > self.max) {
            return inner.call(req);
        }
        let mut inner = inner.clone();
        let (max, buffered) = (self.max, self.buffered.clone());
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // A stalled body ends in `client_body_timeout` (408), a broken one in 400.
            let body = match exact {
                Some(_) => {
                    let bytes = crate::http::body::read_whole(body)
                        .await
                        .map_err(ProxyError::from_body)?;
                    buffered.inc();
                    crate::http::body::full(bytes)
                }
                None => match read_up_to(body, max).await? {
                    Prefix::Whole(bytes) => {
                        buffered.inc();
                        crate::http::body::full(bytes)
                    }
                    Prefix::Longer(body) => body,
                },
            };
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// A body of unknown length (chunked), read as far as `max` bytes.
enum Prefix {
    /// It ended within `max` (and had no trailers): sent with a length.
    Whole(Bytes),
    /// It is longer, or has trailers: what was read, then the rest as it comes.
    Longer(ProxyBody),
}

async fn read_up_to(mut body: ProxyBody, max: u64) -> Result<Prefix, ProxyError> {
    // Data is kept in one buffer, not frame by frame: a body of one-byte chunks costs no more.
    let mut kept = bytes::BytesMut::new();
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => return Ok(Prefix::Whole(kept.freeze())),
            Some(Err(e)) => return Err(ProxyError::from_body(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    kept.extend_from_slice(&data);
                    if kept.len() as u64 > max {
                        break;
                    }
                }
                Err(frame) => {
                    trailers = Some(frame);
                    break;
                }
            },
        }
    }
    let read = [Some(Frame::data(kept.freeze())), trailers]
        .into_iter()
        .flatten()
        .map(Ok::<_, BoxError>);
    let rest = http_body_util::BodyStream::new(body);
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(read), rest);
    Ok(Prefix::Longer(
        http_body_util::StreamBody::new(stream).boxed_unsync(),
    ))
}
