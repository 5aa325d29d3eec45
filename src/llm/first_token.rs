//! LLM stream timeouts, on top of the upstream's header and idle timeouts (a stream can send
//! headers and keep-alive pings for minutes without generating anything):
//!
//! - `first_token_timeout`: the response is held (its first frames buffered) until the first
//!   generated token arrives. If it does not in time, nothing has reached the client yet, and
//!   the request fails with 504 `first_token_timeout`, which an outer layer may retry.
//! - `max_token_gap`: after the first token, a longer wait for the next one ends the stream
//!   with an error event in the provider's format, then a body error, so the client sees that
//!   the stream did not complete.
//!
//! Only successful `text/event-stream` responses are watched; the layer sits inside the cache,
//! right around the upstream timeouts.

use super::sse::{Event, Piece, Splitter};
use super::usage::Tally;
use super::Provider;
use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::http::body::ProxyBody;
use crate::metrics::Metrics;
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse};
use crate::BoxError;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Past this much held before the first token, the response is released anyway (memory bound).
const MAX_HELD_BYTES: usize = 1 << 20;
const MAX_EVENT_BYTES: usize = 1 << 20;

struct Limits {
    provider: Provider,
    upstream: Arc<str>,
    first_token: Option<Duration>,
    max_gap: Option<Duration>,
    first_token_timeouts: IntCounter,
    gap_timeouts: IntCounter,
}

#[derive(Clone)]
pub struct FirstTokenLayer {
    limits: Arc<Limits>,
}

impl FirstTokenLayer {
    /// `None` unless the route is an LLM route with at least one of the timeouts set.
    pub fn new(route: &RouteConfig, metrics: &Metrics) -> Option<FirstTokenLayer> {
        let provider = Provider::of(route.kind)?;
        let cfg = route.llm.as_ref()?;
        if cfg.first_token_timeout.is_none() && cfg.max_token_gap.is_none() {
            return None;
        }
        let counter = |kind| metrics.llm_timeouts.with_label_values(&[&route.name, kind]);
        Some(FirstTokenLayer {
            limits: Arc::new(Limits {
                provider,
                upstream: Arc::from(route.upstream.as_str()),
                first_token: cfg.first_token_timeout,
                max_gap: cfg.max_token_gap,
                first_token_timeouts: counter("first_token"),
                gap_timeouts: counter("token_gap"),
            }),
        })
    }
}

impl<S> Layer<S> for FirstTokenLayer {
    type Service = FirstToken<S>;
    fn layer(&self, inner: S) -> FirstToken<S> {
        FirstToken {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FirstToken<S> {
    inner: S,
    limits: Arc<Limits>,
}

/// Finds generated tokens in a stream's frames.
struct TokenWatch {
    provider: Provider,
    splitter: Splitter,
    tally: Tally,
}

impl TokenWatch {
    fn new(provider: Provider) -> Self {
        TokenWatch {
            provider,
            splitter: Splitter::new(MAX_EVENT_BYTES),
            tally: Tally::default(),
        }
    }

    /// True when `data` completes at least one event that carries a token.
    fn saw_token(&mut self, data: &[u8]) -> bool {
        let (provider, tally) = (self.provider, &mut self.tally);
        let mut token = false;
        self.splitter.push(data, &mut |piece| {
            if let Piece::Event(raw) = piece {
                if let Some(event) = Event::parse(raw) {
                    token |= tally.on_event(provider, &event);
                }
            }
        });
        token
    }
}

impl<S> Service<ProxyRequest> for FirstToken<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ProxyFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> ProxyFuture {
        let limits = self.limits.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let sse = response
                .headers()
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !sse || !response.status().is_success() {
                return Ok(response);
            }
            let (parts, mut body) = response.into_parts();
            let mut watch = TokenWatch::new(limits.provider);
            let mut held = VecDeque::new();
            let mut end = None;
            let mut last_token = None;
            if let Some(limit) = limits.first_token {
                let deadline = started + limit;
                let mut held_bytes = 0;
                loop {
                    match tokio::time::timeout_at(deadline, body.frame()).await {
                        Err(_) => {
                            limits.first_token_timeouts.inc();
                            let err = ProxyError::FirstTokenTimeout {
                                upstream: limits.upstream.to_string(),
                                timeout: limit,
                            };
                            tracing::warn!(error = %err, "no first token");
                            return Err(err);
                        }
                        Ok(None) => {
                            end = Some(None);
                            break;
                        }
                        Ok(Some(Err(e))) => {
                            end = Some(Some(e));
                            break;
                        }
                        Ok(Some(Ok(frame))) => {
                            let token = frame.data_ref().is_some_and(|d| {
                                held_bytes += d.len();
                                watch.saw_token(d)
                            });
                            held.push_back(frame);
                            if token {
                                last_token = Some(Instant::now());
                                break;
                            }
                            if held_bytes > MAX_HELD_BYTES {
                                break;
                            }
                        }
                    }
                }
            }
            let body = TokenBody {
                held,
                end,
                flushed: false,
                over: false,
                inner: body,
                watch: limits.max_gap.map(|_| watch),
                last_token,
                sleep: None,
                limits,
            };
            Ok(ProxyResponse::from_parts(parts, body.boxed_unsync()))
        })
    }
}

/// The error event that ends a stream cut by `max_token_gap`, in the provider's format.
fn gap_event(provider: Provider, err: &ProxyError, mid_event: bool) -> Bytes {
    let message = err.to_string();
    let event = match provider {
        Provider::OpenAi => format!(
            "data: {}\n\n",
            serde_json::json!({"error": {"message": message, "type": err.kind(), "source": "sidelight"}})
        ),
        Provider::Anthropic => format!(
            "event: error\ndata: {}\n\n",
            serde_json::json!({"type": "error", "error": {"type": err.kind(), "message": message}})
        ),
    };
    // An event cut in the middle is ended first, so the error event is read on its own.
    let prefix = if mid_event { "\n\n" } else { "" };
    Bytes::from(format!("{prefix}{event}"))
}

pin_project_lite::pin_project! {
    /// The held frames, then the rest of the stream under the gap limit.
    struct TokenBody {
        held: VecDeque<Frame<Bytes>>,
        // How the stream ended while it was held (`Some(None)`: cleanly), or the gap error.
        end: Option<Option<BoxError>>,
        // The poll before an error end was spent letting the server flush.
        flushed: bool,
        over: bool,
        #[pin]
        inner: ProxyBody,
        // Set when max_token_gap is on.
        watch: Option<TokenWatch>,
        last_token: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        limits: Arc<Limits>,
    }
}

impl Body for TokenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(frame) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(end) = this.end.take() {
            if end.is_some() && !*this.flushed {
                // Let the server write out the error event before the error aborts the
                // connection (hyper drops unflushed bytes on a body error).
                *this.flushed = true;
                *this.end = Some(end);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            *this.over = true;
            return Poll::Ready(end.map(Err));
        }
        if *this.over {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(watch), Some(data)) = (this.watch.as_mut(), frame.data_ref()) {
                    if watch.saw_token(data) {
                        *this.last_token = Some(Instant::now());
                    }
                }
            }
            Poll::Pending => {
                let (Some(limit), Some(last), Some(watch)) =
                    (this.limits.max_gap, *this.last_token, this.watch.as_ref())
                else {
                    return Poll::Pending;
                };
                let expires = last + limit;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
                if sleep.deadline() != expires {
                    sleep.as_mut().reset(expires);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    this.limits.gap_timeouts.inc();
                    let err = ProxyError::TokenGapTimeout {
                        upstream: this.limits.upstream.to_string(),
                        timeout: limit,
                    };
                    tracing::warn!(error = %err, "stream cut");
                    let event = gap_event(this.limits.provider, &err, watch.splitter.in_event());
                    *this.end = Some(Some(err.into()));
                    return Poll::Ready(Some(Ok(Frame::data(event))));
                }
            }
            Poll::Ready(_) => *this.over = true,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && match &self.end {
                Some(end) => end.is_none(),
                None => self.over || self.inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        if self.held.is_empty() && self.end.is_none() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::RouteService;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;

    type Tx = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    fn route(yaml_llm: &str, kind: &str) -> RouteConfig {
        let yaml = format!("{{name: r, upstream: u, kind: {kind}, llm: {yaml_llm}}}");
        serde_yaml::from_str(&yaml).unwrap()
    }

    /// A service whose response streams what the test sends on the returned channel.
    fn upstream() -> (RouteService, mpsc::Receiver<Tx>) {
        let (txs, rxs) = mpsc::channel::<Tx>(8);
        let svc = tower::service_fn(move |_req: ProxyRequest| -> ProxyFuture {
            let txs = txs.clone();
            Box::pin(async move {
                let (tx, rx) = mpsc::channel(16);
                txs.send(tx).await.ok();
                let body = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
                let mut response = ProxyResponse::new(body);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    http::HeaderValue::from_static("text/event-stream"),
                );
                Ok(response)
            })
        });
        (RouteService::new(svc), rxs)
    }

    fn tokio_stream_from(
        mut rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    fn data(s: &str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from(s.to_string())))
    }

    const TOKEN: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const ROLE: &str =
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";

    fn request() -> ProxyRequest {
        http::Request::new(crate::http::body::empty())
    }

    #[tokio::test(start_paused = true)]
    async fn no_first_token_in_time_is_a_504_with_nothing_sent() {
        let metrics = Metrics::new();
        let layer =
            FirstTokenLayer::new(&route("{first_token_timeout: 5s}", "openai"), &metrics).unwrap();
        let (svc, mut txs) = upstream();
        let mut svc = layer.layer(svc);
        let call = tokio::spawn(svc.call(request()));
        let tx = txs.recv().await.unwrap();
        // Headers and a role-only chunk (no token) do not count.
        tx.send(data(ROLE)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!call.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), "first_token_timeout");
        assert_eq!(err.status(), 504);
        assert_eq!(
            metrics
                .llm_timeouts
                .with_label_values(&["r", "first_token"])
                .get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn held_frames_are_released_with_the_first_token() {
        let metrics = Metrics::new();
        let layer =
            FirstTokenLayer::new(&route("{first_token_timeout: 5s}", "openai"), &metrics).unwrap();
        let (svc, mut txs) = upstream();
        let mut svc = layer.layer(svc);
        let call = tokio::spawn(svc.call(request()));
        let tx = txs.recv().await.unwrap();
        tx.send(data(ROLE)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send(data(TOKEN)).await.unwrap();
        let response = call.await.unwrap().unwrap();
        tx.send(data("data: [DONE]\n\n")).await.unwrap();
        drop(tx);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("{ROLE}{TOKEN}data: [DONE]\n\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_between_tokens_ends_the_stream_with_an_error_event() {
        let metrics = Metrics::new();
        let layer =
            FirstTokenLayer::new(&route("{max_token_gap: 2s}", "anthropic"), &metrics).unwrap();
        let (svc, mut txs) = upstream();
        let mut svc = layer.layer(svc);
        let call = tokio::spawn(svc.call(request()));
        let tx = txs.recv().await.unwrap();
        let response = call.await.unwrap().unwrap();
        let mut body = response.into_body();
        // Before the first token there is no gap limit (that is first_token_timeout's job).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n";
        tx.send(data(delta)).await.unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            delta
        );
        // Pings are not tokens: they do not reset the gap.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.send(data("event: ping\ndata: {\"type\":\"ping\"}\n\n"))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let event = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let text = String::from_utf8(event.to_vec()).unwrap();
        assert!(text.starts_with("event: error\ndata: {"), "{text}");
        assert!(text.contains("\"type\":\"token_gap_timeout\""), "{text}");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("in the middle of the stream"));
        assert!(body.frame().await.is_none());
        assert_eq!(
            metrics
                .llm_timeouts
                .with_label_values(&["r", "token_gap"])
                .get(),
            1
        );
    }

    #[test]
    fn off_unless_configured() {
        let metrics = Metrics::new();
        assert!(FirstTokenLayer::new(&route("{}", "openai"), &metrics).is_none());
        assert!(FirstTokenLayer::new(&route("{max_token_gap: 1s}", "http"), &metrics).is_none());
    }
}
