//! The LLM stream guard, on every `kind: openai | anthropic` route: reads each event of a
//! successful `text/event-stream` response as it passes, and makes every way a stream can break
//! reach the client as an error its SDK raises, never as a clean end of a shorter answer.
//!
//! - `first_token_timeout`: the response is held (its first frames buffered) until the first
//!   generated token arrives. If it does not in time, nothing has reached the client yet, and
//!   the request fails with 504 `first_token_timeout`, which an outer layer may retry. Any other
//!   failure in that window (the stream ends or breaks before its first token) is a 502
//!   `upstream_reset`, retried like a reset before headers. While held, the upstream's `idle`
//!   timeout does not apply ([`IdleHold`]).
//! - `max_token_gap`: after the first token, a longer wait for the next one ends the stream.
//! - A stream that ends without its terminal event (`stream_truncated`), an event whose JSON
//!   does not parse (`stream_malformed`, the event is not passed on) and an upstream connection
//!   that breaks mid-stream (`upstream_closed`) end the same way.
//!
//! Every such end is an error event in the provider's format ([`error_event`]), then a body
//! error, so the client sees that the stream did not complete. Events are passed on whole (an
//! event split across frames is held until it completes), so a cut never leaves half an event.
//!
//! The layer sits inside the cache and the retries, right around the upstream timeouts.

use super::sse::{Event, Piece, Splitter};
use super::usage::{Seen, Tally};
use super::Provider;
use crate::config::RouteConfig;
use crate::error::{ProxyError, StreamFault};
use crate::http::body::ProxyBody;
use crate::http::IdleHold;
use crate::metrics::llm::StreamMetrics;
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse};
use crate::BoxError;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Past this much held before the first token, the response is released anyway (memory bound).
const MAX_HELD_BYTES: usize = 1 << 20;
const MAX_EVENT_BYTES: usize = 1 << 20;

struct Limits {
    provider: Provider,
    upstream: Arc<str>,
    first_token: Option<Duration>,
    max_gap: Option<Duration>,
    metrics: StreamMetrics,
}

impl Limits {
    /// Counts a stream fault in `sidelight_llm_stream_errors_total`.
    fn count(&self, err: &ProxyError) {
        match err.stream_fault() {
            Some(StreamFault::Truncated) => self.metrics.truncated.inc(),
            Some(StreamFault::Malformed) => self.metrics.malformed.inc(),
            Some(StreamFault::UpstreamClosed) => self.metrics.upstream_closed.inc(),
            None => {}
        }
    }

    /// A body error as the stream's error: a broken upstream connection is `upstream_closed`;
    /// sidelight's own errors (an idle or total timeout) keep their kind.
    fn body_error(&self, e: BoxError) -> ProxyError {
        match e.downcast::<ProxyError>() {
            Ok(err) => match *err {
                ProxyError::UpstreamBody { upstream, detail } => {
                    ProxyError::UpstreamClosed { upstream, detail }
                }
                other => other,
            },
            Err(e) => ProxyError::UpstreamClosed {
                upstream: self.upstream.to_string(),
                detail: e.to_string(),
            },
        }
    }
}

#[derive(Clone)]
pub struct FirstTokenLayer {
    limits: Arc<Limits>,
}

impl FirstTokenLayer {
    /// `None` unless the route is an LLM route.
    pub fn new(route: &RouteConfig, metrics: &Metrics) -> Option<FirstTokenLayer> {
        let provider = Provider::of(route.kind)?;
        let cfg = route.llm_config();
        Some(FirstTokenLayer {
            limits: Arc::new(Limits {
                provider,
                upstream: Arc::from(route.upstream.as_str()),
                first_token: cfg.first_token_timeout,
                max_gap: cfg.max_token_gap,
                metrics: metrics.llm.stream(&route.name),
            }),
        })
    }
}

/// Reads a stream's events as they pass.
struct Watch {
    provider: Provider,
    splitter: Splitter,
    tally: Tally,
    /// The terminal event went by: the stream is complete.
    terminal: bool,
}

/// What one data frame came to.
struct Scanned {
    /// The whole events it completed (possibly empty), to pass on.
    out: Bytes,
    token: bool,
    /// A malformed event: `out` holds the events before it; nothing after it is passed on.
    fault: Option<String>,
}

impl Watch {
    fn new(provider: Provider) -> Self {
        Watch {
            provider,
            splitter: Splitter::new(MAX_EVENT_BYTES),
            tally: Tally::default(),
            terminal: false,
        }
    }

    fn scan(&mut self, data: Bytes) -> Scanned {
        // With nothing held from earlier frames, what passes is a prefix of this frame.
        let fresh = !self.splitter.in_event();
        let (provider, tally, terminal) = (self.provider, &mut self.tally, &mut self.terminal);
        let mut copy = Vec::new();
        let mut passed = 0;
        let mut token = false;
        let mut fault = None;
        self.splitter.push(&data, &mut |piece| {
            if fault.is_some() {
                return;
            }
            let raw = match piece {
                Piece::Event(raw) => {
                    let seen = match Event::parse(raw) {
                        Some(event) => tally.read_event(provider, &event),
                        None => Seen {
                            malformed: Some("not UTF-8".into()),
                            ..Seen::default()
                        },
                    };
                    if seen.malformed.is_some() {
                        fault = seen.malformed;
                        return;
                    }
                    token |= seen.token;
                    *terminal |= seen.terminal;
                    raw
                }
                Piece::Fragment(raw) => raw,
            };
            passed += raw.len();
            if !fresh {
                copy.extend_from_slice(raw);
            }
        });
        let out = if fresh {
            data.slice(..passed)
        } else {
            Bytes::from(copy)
        };
        Scanned { out, token, fault }
    }

    /// At the body's clean end: the unfinished last event, if it is the terminal one (passed
    /// on as the upstream sent it), or the truncation error.
    fn finish(&mut self, upstream: &str) -> Result<Bytes, ProxyError> {
        let rest = self.splitter.take_rest();
        if !rest.is_empty() {
            if let Some(event) = Event::parse(&rest) {
                let seen = self.tally.read_event(self.provider, &event);
                self.terminal |= seen.terminal;
                if seen.terminal {
                    return Ok(Bytes::from(rest));
                }
            }
        }
        if self.terminal {
            Ok(Bytes::new())
        } else {
            Err(ProxyError::StreamTruncated {
                upstream: upstream.to_string(),
            })
        }
    }
}

impl Around for FirstTokenLayer {
    fn call<S: Inner>(&self, inner: &mut S, mut req: ProxyRequest) -> ProxyFuture {
        let limits = self.limits.clone();
        let started = Instant::now();
        let hold = limits.first_token.map(|_| {
            let hold = IdleHold::default();
            hold.set(true);
            req.extensions_mut().insert(hold.clone());
            hold
        });
        let wait_cell = hold.as_ref().and_then(|_| {
            req.extensions()
                .get::<crate::http::RequestMeta>()
                .map(|m| m.upstream_wait.clone())
        });
        let fut = inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let sse = response
                .headers()
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !sse || !response.status().is_success() {
                if let Some(hold) = &hold {
                    hold.set(false);
                }
                return Ok(response);
            }
            let (parts, mut body) = response.into_parts();
            let mut watch = Watch::new(limits.provider);
            let mut held = VecDeque::new();
            let mut end = None;
            let mut last_token = None;
            if let (Some(limit), Some(hold)) = (limits.first_token, hold) {
                let deadline = started + limit;
                // Holding the response is waiting on the upstream, not sidelight's overhead.
                let held_since = Instant::now();
                let _waited = WaitedOnUpstream(wait_cell, held_since);
                let mut held_bytes = 0;
                // Nothing has reached the client: every failure here is a status, retryable.
                let before_first_token = |err: ProxyError| {
                    limits.count(&err);
                    // Timeouts keep their 504; a broken stream is a retryable 502 reset.
                    let err = err.reset_before_first_token(&limits.upstream);
                    tracing::warn!(error = %err, "stream failed before its first token");
                    err
                };
                loop {
                    match tokio::time::timeout_at(deadline, body.frame()).await {
                        Err(_) => {
                            limits.metrics.first_token_timeouts.inc();
                            let err = ProxyError::FirstTokenTimeout {
                                upstream: limits.upstream.to_string(),
                                timeout: limit,
                            };
                            tracing::warn!(error = %err, "no first token");
                            return Err(err);
                        }
                        Ok(None) => match watch.finish(&limits.upstream) {
                            Ok(rest) => {
                                if !rest.is_empty() {
                                    held.push_back(Frame::data(rest));
                                }
                                end = Some(None);
                                break;
                            }
                            Err(e) => return Err(before_first_token(e)),
                        },
                        Ok(Some(Err(e))) => {
                            let err = limits.body_error(e);
                            if watch.terminal {
                                end = Some(Some(err.into()));
                                break;
                            }
                            return Err(before_first_token(err));
                        }
                        Ok(Some(Ok(frame))) => {
                            let frame = match frame.into_data() {
                                Ok(data) => {
                                    held_bytes += data.len();
                                    let scanned = watch.scan(data);
                                    if let Some(detail) = scanned.fault {
                                        return Err(before_first_token(malformed(&limits, detail)));
                                    }
                                    if scanned.token {
                                        last_token = Some(Instant::now());
                                    }
                                    Frame::data(scanned.out)
                                }
                                Err(frame) => frame,
                            };
                            // Only part of an event so far: nothing to hold (an empty data
                            // frame is never handed on).
                            if frame.data_ref().is_none_or(|d| !d.is_empty()) {
                                held.push_back(frame);
                            }
                            if last_token.is_some() || held_bytes > MAX_HELD_BYTES {
                                break;
                            }
                        }
                    }
                }
                hold.set(false);
            }
            let body = GuardBody {
                held,
                end,
                flushed: false,
                over: false,
                inner: body,
                watch,
                last_token,
                sleep: None,
                limits,
            };
            Ok(ProxyResponse::from_parts(parts, body.boxed_unsync()))
        })
    }
}

/// Adds the time since `.1` to the request's upstream wait when dropped (however the hold ends).
struct WaitedOnUpstream(Option<crate::http::UpstreamWait>, Instant);

impl Drop for WaitedOnUpstream {
    fn drop(&mut self) {
        if let Some(cell) = &self.0 {
            cell.add(self.1.elapsed());
        }
    }
}

fn malformed(limits: &Limits, detail: String) -> ProxyError {
    ProxyError::StreamMalformed {
        upstream: limits.upstream.to_string(),
        detail,
    }
}

/// The error event that ends a broken stream, in the provider's format: what the official SDKs
/// raise as an API error (OpenAI: a `data:` chunk with an `error` object; Anthropic: an
/// `event: error`). `mid_event`: part of an unfinished event was already passed on (an oversized
/// one); it is ended first, so the error event is read on its own.
pub fn error_event(provider: Provider, err: &ProxyError, mid_event: bool) -> Bytes {
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
    let prefix = if mid_event { "\n\n" } else { "" };
    Bytes::from(format!("{prefix}{event}"))
}

pin_project_lite::pin_project! {
    /// The held frames, then the rest of the stream, watched.
    struct GuardBody {
        held: VecDeque<Frame<Bytes>>,
        // How the stream ends once `held` is out (`Some(None)`: cleanly; `Some(Some(e))`: with
        // this error, after the error event in `held`).
        end: Option<Option<BoxError>>,
        // The poll before an error end was spent letting the server flush.
        flushed: bool,
        over: bool,
        #[pin]
        inner: ProxyBody,
        watch: Watch,
        last_token: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        limits: Arc<Limits>,
    }
}

/// Ends a stream with `err`: its error event, then the body error.
fn cut(
    limits: &Limits,
    watch: &Watch,
    held: &mut VecDeque<Frame<Bytes>>,
    end: &mut Option<Option<BoxError>>,
    err: ProxyError,
) {
    limits.count(&err);
    tracing::warn!(error = %err, "stream cut");
    let event = error_event(limits.provider, &err, watch.splitter.in_oversized_event());
    held.push_back(Frame::data(event));
    *end = Some(Some(err.into()));
}

impl Body for GuardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
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
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let scanned = this.watch.scan(data);
                    if scanned.token {
                        *this.last_token = Some(Instant::now());
                    }
                    if let Some(detail) = scanned.fault {
                        if !scanned.out.is_empty() {
                            this.held.push_back(Frame::data(scanned.out));
                        }
                        let err = malformed(this.limits, detail);
                        cut(this.limits, this.watch, this.held, this.end, err);
                        continue;
                    }
                    if scanned.out.is_empty() {
                        // Only part of an event: read on.
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(scanned.out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = this.limits.body_error(e);
                    if this.watch.terminal {
                        // The answer was complete; the connection broke after it.
                        *this.over = true;
                        return Poll::Ready(Some(Err(err.into())));
                    }
                    cut(this.limits, this.watch, this.held, this.end, err);
                }
                Poll::Ready(None) => match this.watch.finish(&this.limits.upstream) {
                    Ok(rest) => {
                        *this.over = true;
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                        return Poll::Ready(None);
                    }
                    Err(err) => cut(this.limits, this.watch, this.held, this.end, err),
                },
                Poll::Pending => {
                    let (Some(limit), Some(last)) = (this.limits.max_gap, *this.last_token) else {
                        return Poll::Pending;
                    };
                    let expires = last + limit;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(expires)));
                    if sleep.deadline() != expires {
                        sleep.as_mut().reset(expires);
                    }
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.limits.metrics.gap_timeouts.inc();
                    let err = ProxyError::TokenGapTimeout {
                        upstream: this.limits.upstream.to_string(),
                        timeout: limit,
                    };
                    cut(this.limits, this.watch, this.held, this.end, err);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && match &self.end {
                Some(end) => end.is_none(),
                None => self.over,
            }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::RouteService;
    use http_body_util::StreamBody;
    use tokio::sync::mpsc;
    use tower::Service;

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
        let mut svc = layer.wrap(svc);
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
        assert_eq!(metrics.llm.stream("r").first_token_timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn held_frames_are_released_with_the_first_token() {
        let metrics = Metrics::new();
        let layer =
            FirstTokenLayer::new(&route("{first_token_timeout: 5s}", "openai"), &metrics).unwrap();
        let (svc, mut txs) = upstream();
        let mut svc = layer.wrap(svc);
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
        let mut svc = layer.wrap(svc);
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
        assert_eq!(metrics.llm.stream("r").gap_timeouts.get(), 1);
    }

    #[test]
    fn on_every_llm_route_only() {
        let metrics = Metrics::new();
        assert!(FirstTokenLayer::new(&route("{}", "openai"), &metrics).is_some());
        assert!(FirstTokenLayer::new(&route("{max_token_gap: 1s}", "http"), &metrics).is_none());
    }

    /// Runs one stream through the layer: the chunks, then a clean end or (`fail`) a break.
    /// Returns what the client read and whether the body ended with an error.
    async fn through(
        kind: &str,
        llm: &str,
        chunks: &[&str],
        fail: bool,
    ) -> (Metrics, Result<(String, bool), ProxyError>) {
        let metrics = Metrics::new();
        let layer = FirstTokenLayer::new(&route(llm, kind), &metrics).unwrap();
        let (svc, mut txs) = upstream();
        let mut svc = layer.wrap(svc);
        let call = tokio::spawn(svc.call(request()));
        let tx = txs.recv().await.unwrap();
        for c in chunks {
            tx.send(data(c)).await.unwrap();
        }
        if fail {
            tx.send(Err("connection reset".into())).await.unwrap();
        }
        drop(tx);
        let response = match call.await.unwrap() {
            Ok(r) => r,
            Err(e) => return (metrics, Err(e)),
        };
        let mut body = response.into_body();
        let mut text = Vec::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => text.extend_from_slice(&f.into_data().unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        (metrics, Ok((String::from_utf8(text).unwrap(), failed)))
    }

    fn faults(metrics: &Metrics, kind: &str) -> u64 {
        let m = metrics.llm.stream("r");
        match kind {
            "truncated" => m.truncated.get(),
            "malformed" => m.malformed.get(),
            "upstream_closed" => m.upstream_closed.get(),
            other => panic!("no stream fault {other}"),
        }
    }

    const DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n";

    #[tokio::test]
    async fn a_complete_stream_passes_unchanged_even_split_mid_event() {
        let (metrics, got) = through(
            "openai",
            "{}",
            &[&TOKEN[..10], &TOKEN[10..], "data: [DONE]\n\n"],
            false,
        )
        .await;
        assert_eq!(got.unwrap(), (format!("{TOKEN}data: [DONE]\n\n"), false));
        assert_eq!(faults(&metrics, "truncated"), 0);
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (_, got) = through("anthropic", "{}", &[DELTA, stop], false).await;
        assert_eq!(got.unwrap(), (format!("{DELTA}{stop}"), false));
    }

    #[tokio::test]
    async fn a_stream_without_its_terminal_event_ends_with_an_error_event() {
        let (metrics, got) = through("openai", "{}", &[TOKEN], false).await;
        let (text, failed) = got.unwrap();
        assert!(failed, "the body must not end cleanly");
        let event = text.strip_prefix(TOKEN).unwrap();
        assert!(event.starts_with("data: {\"error\":"), "{event}");
        assert!(event.contains("\"type\":\"stream_truncated\""), "{event}");
        assert_eq!(faults(&metrics, "truncated"), 1);

        let (metrics, got) = through("anthropic", "{}", &[DELTA], false).await;
        let (text, failed) = got.unwrap();
        assert!(failed);
        let event = text.strip_prefix(DELTA).unwrap();
        assert!(event.starts_with("event: error\ndata: {"), "{event}");
        assert!(event.contains("\"type\":\"stream_truncated\""), "{event}");
        assert_eq!(faults(&metrics, "truncated"), 1);
    }

    #[tokio::test]
    async fn a_half_event_is_replaced_by_an_error_event() {
        // The upstream sent the first half of an event, then the next one.
        let half = "data: {\"choices\":[{\"delta\":{\"cont";
        let (metrics, got) = through("openai", "{}", &[TOKEN, half, "\n\n", TOKEN], false).await;
        let (text, failed) = got.unwrap();
        assert!(failed);
        let event = text.strip_prefix(TOKEN).unwrap();
        assert!(!event.contains("cont\""), "{event}");
        assert!(event.starts_with("data: {\"error\":"), "{event}");
        assert!(event.contains("\"type\":\"stream_malformed\""), "{event}");
        assert_eq!(
            event.matches("data:").count(),
            1,
            "nothing after the error: {event}"
        );
        assert_eq!(faults(&metrics, "malformed"), 1);
    }

    #[tokio::test]
    async fn a_connection_drop_mid_stream_sends_an_error_event_first() {
        let (metrics, got) = through("anthropic", "{}", &[DELTA], true).await;
        let (text, failed) = got.unwrap();
        assert!(failed);
        let event = text.strip_prefix(DELTA).unwrap();
        assert!(event.starts_with("event: error\ndata: {"), "{event}");
        assert!(event.contains("\"type\":\"upstream_closed\""), "{event}");
        assert!(event.contains("upstream u "), "{event}");
        assert_eq!(faults(&metrics, "upstream_closed"), 1);
    }

    #[tokio::test]
    async fn a_stream_that_ends_before_its_first_token_while_held_is_a_502_reset() {
        for fail in [false, true] {
            let (_, got) = through("openai", "{first_token_timeout: 5s}", &[ROLE], fail).await;
            let err = got.expect_err("a status, not a 200");
            assert!(matches!(err, ProxyError::UpstreamReset { .. }), "{err}");
            assert_eq!(err.status(), 502);
        }
    }
}
