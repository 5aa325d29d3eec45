//! Upstream timeouts, split like linkerd's: until response headers (`first_byte`), between two
//! body chunks (`idle`), and for the whole request (`total`, counted from its arrival). The
//! connect timeout lives in the connector. A body cut by a timeout ends with an error, so the
//! client sees an incomplete response rather than a clean end.
//!
//! While an LLM route holds a stream for its first token ([`IdleHold`] in the request's
//! extensions), the wait belongs to `llm.first_token_timeout`: `idle` starts after it.

use crate::error::ProxyError;
use crate::http::body::ProxyBody;
use crate::http::RequestMeta;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use crate::upstream::UpstreamMetrics;
use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Set by the LLM stream guard while it holds a response for its first token: the idle timeout
/// does not apply meanwhile (only `total` does).
#[derive(Clone, Debug, Default)]
pub struct IdleHold(Arc<AtomicBool>);

impl IdleHold {
    pub fn set(&self, holding: bool) {
        self.0.store(holding, Ordering::Relaxed);
    }

    pub fn holding(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Timeouts {
    pub upstream: Arc<str>,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
    pub metrics: UpstreamMetrics,
}

#[derive(Clone)]
pub struct TimeoutLayer {
    timeouts: Arc<Timeouts>,
}

impl TimeoutLayer {
    pub fn new(timeouts: Timeouts) -> Self {
        TimeoutLayer {
            timeouts: Arc::new(timeouts),
        }
    }
}

impl Around for TimeoutLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let t = self.timeouts.clone();
        let now = Instant::now();
        // The total budget started when the request arrived, not when it reached this layer.
        let arrived = req
            .extensions()
            .get::<RequestMeta>()
            .map_or(now, |m| Instant::from_std(m.start));
        let deadline = arrived + t.total;
        let headers_by = (now + t.first_byte).min(deadline);
        let hold = req.extensions().get::<IdleHold>().cloned();
        let fut = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(headers_by, fut).await {
                Ok(Ok(response)) => Ok(response.map(|body| {
                    TimedBody {
                        inner: body,
                        sleep: None,
                        expires: None,
                        deadline,
                        hold,
                        timeouts: t.clone(),
                    }
                    .boxed_unsync()
                })),
                Ok(Err(e)) => Err(e),
                Err(_) if headers_by == deadline => {
                    t.metrics.total_timeouts.inc();
                    Err(ProxyError::TotalTimeout {
                        upstream: t.upstream.to_string(),
                        timeout: t.total,
                    })
                }
                Err(_) => {
                    t.metrics.first_byte_timeouts.inc();
                    Err(ProxyError::FirstByteTimeout {
                        upstream: t.upstream.to_string(),
                        timeout: t.first_byte,
                    })
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body under the idle and total deadlines. One timer serves both, set to
    /// whichever comes first; it is only armed when the body actually has to wait, so chunks
    /// that are already there cost no timer work (nor a clock read).
    struct TimedBody {
        #[pin]
        inner: ProxyBody,
        sleep: Option<Pin<Box<Sleep>>>,
        // When the current wait for a chunk expires: min(start of the wait + idle, deadline).
        // `None` until the body first has to wait after a chunk (or after the headers). An idle
        // gap is time the upstream keeps sidelight waiting, so it starts there, not at the
        // chunk: time the client takes to read the chunk is not the upstream's idleness.
        expires: Option<Instant>,
        deadline: Instant,
        hold: Option<IdleHold>,
        timeouts: Arc<Timeouts>,
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.expires = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let (idle, deadline) = (this.timeouts.idle, *this.deadline);
                let held = this.hold.as_ref().is_some_and(IdleHold::holding);
                let expires = *this.expires.get_or_insert_with(|| {
                    if held {
                        deadline
                    } else {
                        (Instant::now() + idle).min(deadline)
                    }
                });
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
                if sleep.deadline() != expires {
                    sleep.as_mut().reset(expires);
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        let t = &this.timeouts;
                        let err = if Instant::now() >= *this.deadline {
                            t.metrics.total_timeouts.inc();
                            ProxyError::TotalTimeout {
                                upstream: t.upstream.to_string(),
                                timeout: t.total,
                            }
                        } else {
                            t.metrics.idle_timeouts.inc();
                            ProxyError::IdleTimeout {
                                upstream: t.upstream.to_string(),
                                timeout: t.idle,
                            }
                        };
                        tracing::warn!(error = %err, "response body cut");
                        Poll::Ready(Some(Err(err.into())))
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::full;
    use crate::service::ProxyResponse;
    use http_body_util::StreamBody;
    use tower::{Layer, Service};

    fn timeouts(first_byte: u64, idle: u64, total: u64) -> Timeouts {
        let metrics = crate::metrics::Metrics::new();
        let name = "u";
        Timeouts {
            upstream: Arc::from(name),
            first_byte: Duration::from_millis(first_byte),
            idle: Duration::from_millis(idle),
            total: Duration::from_millis(total),
            metrics: UpstreamMetrics {
                response_time: metrics.upstream_response.with_label_values(&[name]),
                reset: metrics
                    .upstream_failures
                    .with_label_values(&[name, "reset"]),
                protocol_errors: metrics
                    .upstream_failures
                    .with_label_values(&[name, "protocol"]),
                body_errors: metrics.upstream_failures.with_label_values(&[name, "body"]),
                first_byte_timeouts: metrics
                    .upstream_timeouts
                    .with_label_values(&[name, "first_byte"]),
                idle_timeouts: metrics.upstream_timeouts.with_label_values(&[name, "idle"]),
                total_timeouts: metrics
                    .upstream_timeouts
                    .with_label_values(&[name, "total"]),
            },
        }
    }

    /// A service whose response headers come after `headers_after`, then one chunk every `gap`.
    fn upstream(
        headers_after: u64,
        gap: u64,
        chunks: usize,
    ) -> tower::util::BoxCloneSyncService<ProxyRequest, ProxyResponse, ProxyError> {
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: ProxyRequest| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(headers_after)).await;
                let stream = futures_util::stream::unfold(0, move |i| async move {
                    if i == chunks {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                    Some((Ok::<_, BoxError>(Frame::data(Bytes::from("x"))), i + 1))
                });
                Ok(http::Response::new(StreamBody::new(stream).boxed_unsync()))
            }) as ProxyFuture
        }))
    }

    async fn run(
        t: Timeouts,
        svc: tower::util::BoxCloneSyncService<ProxyRequest, ProxyResponse, ProxyError>,
    ) -> Result<usize, String> {
        let mut svc = TimeoutLayer::new(t).into_layer().layer(svc);
        let response = svc
            .call(http::Request::new(full("")))
            .await
            .map_err(|e| e.kind().to_string())?;
        let mut body = response.into_body();
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(_) => n += 1,
                Err(e) => {
                    return Err(e
                        .downcast_ref::<ProxyError>()
                        .map_or("?".into(), |e| e.kind().to_string()))
                }
            }
        }
        Ok(n)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gaps_count_while_waiting_on_the_upstream_not_while_the_client_reads() {
        // Chunks 40 ms apart under a 50 ms idle limit, read by a client that takes 100 ms over
        // each one: its reading time is not the upstream's idleness.
        let mut svc = TimeoutLayer::new(timeouts(100, 50, 10_000))
            .into_layer()
            .layer(upstream(10, 40, 3));
        let response = svc.call(http::Request::new(full(""))).await.unwrap();
        let mut body = response.into_body();
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            assert!(frame.is_ok(), "chunk {n} was cut");
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(n, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn each_timeout_kind() {
        assert_eq!(
            run(timeouts(100, 50, 10_000), upstream(10, 10, 5)).await,
            Ok(5)
        );
        assert_eq!(
            run(timeouts(100, 50, 10_000), upstream(200, 10, 5)).await,
            Err("upstream_first_byte_timeout".into())
        );
        assert_eq!(
            run(timeouts(100, 50, 10_000), upstream(10, 80, 5)).await,
            Err("upstream_idle_timeout".into())
        );
        // Each gap is fine, the sum is not.
        assert_eq!(
            run(timeouts(100, 50, 200), upstream(10, 40, 10)).await,
            Err("upstream_total_timeout".into())
        );
        // The total deadline also bounds the wait for headers.
        assert_eq!(
            run(timeouts(1000, 50, 200), upstream(500, 10, 1)).await,
            Err("upstream_total_timeout".into())
        );
    }
}
