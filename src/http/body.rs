//! Body types and the small body wrappers the layers use. Every wrapper forwards `size_hint` and
//! `is_end_stream`, so a `Content-Length` from upstream stays a `Content-Length` downstream.

use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The one body type on the request path, both directions.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Reads a request body whole (layers that must see it, or send it more than once). The body
/// limit layer already bounds it; `ProxyError::from_body` turns its error into the client's.
pub async fn read_whole(body: ProxyBody) -> Result<Bytes, BoxError> {
    if body.is_end_stream() {
        // Most GETs: nothing to collect, and collecting still costs a few hundred instructions.
        return Ok(Bytes::new());
    }
    Ok(body.collect().await?.to_bytes())
}

/// Watches a body as it streams: sees every data frame and learns how it ended.
pub trait BodyObserver: Send + 'static {
    fn on_data(&mut self, _len: usize) {}
    /// Called at most once: `Ok` at a clean end, `Err` on an error frame; not at all if the body
    /// is dropped before its end (the observer's own `Drop` sees that).
    fn on_end(&mut self, _result: Result<(), &BoxError>) {}
    /// Rewrites an error frame before it goes on (and before `on_end` sees it).
    fn map_error(&mut self, error: BoxError) -> BoxError {
        error
    }
}

pin_project_lite::pin_project! {
    /// A body that reports its frames and its end to an observer.
    pub struct Observed<O: BodyObserver> {
        #[pin]
        inner: ProxyBody,
        observer: O,
        ended: bool,
    }

    impl<O: BodyObserver> PinnedDrop for Observed<O> {
        fn drop(this: Pin<&mut Self>) {
            // hyper never polls a body that is already at its end (an empty one): that is a
            // clean end too, not an abort.
            let this = this.project();
            if !*this.ended && this.inner.is_end_stream() {
                *this.ended = true;
                this.observer.on_end(Ok(()));
            }
        }
    }
}

impl<O: BodyObserver> Observed<O> {
    pub fn new(inner: ProxyBody, observer: O) -> Self {
        Observed {
            inner,
            observer,
            ended: false,
        }
    }

    pub fn boxed(inner: ProxyBody, observer: O) -> ProxyBody {
        Observed::new(inner, observer).boxed_unsync()
    }
}

impl<O: BodyObserver> Body for Observed<O> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(this.observer.map_error(e)))),
            other => other,
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.observer.on_data(data.len());
                }
            }
            Poll::Ready(Some(Err(e))) if !*this.ended => {
                *this.ended = true;
                this.observer.on_end(Err(e));
            }
            Poll::Ready(None) if !*this.ended => {
                *this.ended = true;
                this.observer.on_end(Ok(()));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
