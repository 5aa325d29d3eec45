//! The LLM accounting layer, outside the cache (so it sees hits too): reads each request's
//! model and stream options, asks OpenAI upstreams for usage in streams, and reads the usage of
//! every response as it streams past, without holding frames back. At the end of the response
//! it counts tokens, calls the request's [`UsageHooks`] and leaves the facts for the access log.
//!
//! The one case where frames are reshaped: an OpenAI stream whose client did not ask for
//! `include_usage` while sidelight did. Then each frame is passed on as whole events as soon as
//! they complete, minus the usage chunk (and the `"usage":null` OpenAI adds to every chunk), so
//! the client receives exactly what the upstream would have sent it.

use super::sse::{Event, Piece, Splitter};
use super::usage::{is_openai_usage_chunk, strip_null_usage, Tally};
use super::{LlmFacts, LoggedUsage, Provider, Usage, UsageHooks};
use crate::cache::layer::CACHE_HEADER;
use crate::config::RouteConfig;
use crate::error::ProxyError;
use crate::http::body::{full, ProxyBody};
use crate::http::RequestMeta;
use crate::metrics::llm::LlmRouteMetrics;
use crate::metrics::model_labels::UNKNOWN;
use crate::metrics::{status_class, Metrics};
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use crate::BoxError;
use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The largest single stream event parsed; larger ones pass unparsed (usage events are small).
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Whole JSON responses up to this size are parsed; past it only their tail is kept.
const MAX_JSON_BYTES: usize = 8 << 20;
const TAIL_BYTES: usize = 64 << 10;

struct RouteState {
    route: Arc<str>,
    provider: Provider,
    include_usage: bool,
    metrics: LlmRouteMetrics,
}

#[derive(Clone)]
pub struct LlmLayer {
    state: Arc<RouteState>,
}

impl LlmLayer {
    /// `None` for routes that are not LLM routes.
    pub fn new(route: &RouteConfig, metrics: &Arc<Metrics>) -> Option<LlmLayer> {
        let provider = Provider::of(route.kind)?;
        let cfg = route.llm_config();
        Some(LlmLayer {
            state: Arc::new(RouteState {
                route: Arc::from(route.name.as_str()),
                provider,
                include_usage: cfg.include_usage && provider == Provider::OpenAi,
                metrics: metrics.llm.route(&route.name, &cfg.models, cfg.max_models),
            }),
        })
    }
}

/// What a request body says.
struct RequestInfo {
    model: String,
    stream: bool,
    /// The client asked for `stream_options.include_usage` itself.
    client_wants_usage: bool,
    prompt_estimate: u64,
}

impl RequestInfo {
    fn read(body: &Value) -> RequestInfo {
        RequestInfo {
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or(UNKNOWN)
                .to_string(),
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            client_wants_usage: body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            prompt_estimate: super::estimate::estimate_request(body).map_or(0, |e| e.prompt_tokens),
        }
    }

    fn unknown() -> RequestInfo {
        RequestInfo {
            model: UNKNOWN.to_string(),
            stream: false,
            client_wants_usage: false,
            prompt_estimate: 0,
        }
    }
}

/// The body with `stream_options.include_usage: true`. When the client sent no
/// `stream_options`, the member is inserted after the opening brace and every other byte stays
/// as the client wrote it; otherwise the body is re-serialised.
fn with_include_usage(raw: &Bytes, mut body: Value) -> Option<Bytes> {
    let obj = body.as_object_mut()?;
    if !obj.contains_key("stream_options") {
        let brace = raw.iter().position(|&b| b == b'{')?;
        let mut out = Vec::with_capacity(raw.len() + 40);
        out.extend_from_slice(&raw[..=brace]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(&raw[brace + 1..]);
        return Some(Bytes::from(out));
    }
    match obj.get_mut("stream_options").and_then(Value::as_object_mut) {
        Some(options) => {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        None => {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
    }
    serde_json::to_vec(&body).ok().map(Bytes::from)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Upstream,
    Cache,
    Dedup,
}

impl Source {
    fn of(headers: &HeaderMap) -> Source {
        match headers.get(CACHE_HEADER).map(HeaderValue::as_bytes) {
            Some(b"HIT") => Source::Cache,
            Some(b"COALESCED") => Source::Dedup,
            _ => Source::Upstream,
        }
    }
}

impl Around for LlmLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        // Model listings, file downloads...: nothing to account for.
        if req.method() != Method::POST {
            return inner.call(req);
        }
        let state = self.state.clone();
        let mut inner = inner.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            // The body-limit layer outside bounds what is buffered here.
            let raw = body
                .collect()
                .await
                .map_err(|e| ProxyError::ClientBody(e.to_string()))?
                .to_bytes();
            let parsed: Option<Value> = serde_json::from_slice(&raw).ok().filter(Value::is_object);
            let info = parsed
                .as_ref()
                .map_or_else(RequestInfo::unknown, RequestInfo::read);
            let completions = parts.uri.path().ends_with("completions");
            // Sidelight asks for usage, and takes it out again for this client.
            let strip =
                state.include_usage && info.stream && completions && !info.client_wants_usage;
            let body = match parsed {
                Some(value) if strip => match with_include_usage(&raw, value) {
                    Some(changed) => {
                        // Without one, hyper sets it from the body's exact size.
                        if parts.headers.contains_key(CONTENT_LENGTH) {
                            parts
                                .headers
                                .insert(CONTENT_LENGTH, HeaderValue::from(changed.len()));
                        }
                        changed
                    }
                    None => raw,
                },
                _ => raw,
            };
            // Usage is read from the response as it passes: ask for it uncompressed (SDKs send
            // `accept-encoding: gzip`, and an upstream may honour it for JSON answers).
            parts.headers.remove(ACCEPT_ENCODING);
            let hooks = parts.extensions.get::<UsageHooks>().cloned();
            let start = parts
                .extensions
                .get::<RequestMeta>()
                .map_or_else(Instant::now, |m| m.start);
            let model = state.metrics.model_label(&info.model);
            let facts = Arc::new(LlmFacts::default());
            facts.update(|f| f.model = Some(Arc::from(info.model.as_str())));
            let result = inner
                .call(http::Request::from_parts(parts, full(body)))
                .await;
            let m = &state.metrics;
            let status = match &result {
                Ok(r) => r.status(),
                Err(e) => e.status(),
            };
            m.requests(&model, status_class(status)).inc();
            let mut response = result?;
            response.extensions_mut().insert(facts.clone());
            if !status.is_success() {
                return Ok(response);
            }
            let encoded = response
                .headers()
                .get(CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            if encoded {
                tracing::debug!(route = %state.route, "compressed LLM response: usage not read");
                return Ok(response);
            }
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let shape = if content_type.starts_with("text/event-stream") {
                Shape::Sse {
                    splitter: Splitter::new(MAX_EVENT_BYTES),
                    strip,
                }
            } else if content_type.contains("json") || content_type.is_empty() {
                Shape::Json {
                    kept: Vec::new(),
                    kept_len: 0,
                    tail: None,
                }
            } else {
                return Ok(response);
            };
            let reshaped = matches!(shape, Shape::Sse { strip: true, .. });
            if reshaped {
                response.headers_mut().remove(CONTENT_LENGTH);
            }
            let accounting = Accounting {
                source: Source::of(response.headers()),
                state,
                model,
                shape,
                tally: Tally::default(),
                start,
                first_token: None,
                prompt_estimate: info.prompt_estimate,
                hooks,
                facts,
                done: false,
            };
            Ok(response.map(|body| {
                AccountedBody {
                    inner: body,
                    accounting,
                    reshaped,
                    after: After::Reading,
                }
                .boxed_unsync()
            }))
        })
    }
}

enum Shape {
    Sse {
        splitter: Splitter,
        /// Remove the usage chunk sidelight asked for.
        strip: bool,
    },
    Json {
        kept: Vec<Bytes>,
        kept_len: usize,
        /// Past `MAX_JSON_BYTES`: only the last bytes.
        tail: Option<Vec<u8>>,
    },
}

/// One response's accounting, finished once: at the end of its body, or when it is dropped.
struct Accounting {
    state: Arc<RouteState>,
    model: Arc<str>,
    source: Source,
    shape: Shape,
    tally: Tally,
    start: Instant,
    first_token: Option<Instant>,
    prompt_estimate: u64,
    hooks: Option<UsageHooks>,
    facts: Arc<LlmFacts>,
    done: bool,
}

impl Accounting {
    /// Reads a data frame; in strip mode returns what the client gets instead.
    fn on_data(&mut self, data: &Bytes) -> Option<Vec<u8>> {
        let provider = self.state.provider;
        match &mut self.shape {
            Shape::Sse { splitter, strip } => {
                let strip = *strip;
                let tally = &mut self.tally;
                let mut out = strip.then(|| Vec::with_capacity(data.len()));
                let mut token = false;
                splitter.push(data, &mut |piece| match piece {
                    Piece::Event(raw) => {
                        let event = Event::parse(raw);
                        if let Some(e) = &event {
                            token |= tally.on_event(provider, e);
                        }
                        if let Some(out) = out.as_mut() {
                            match &event {
                                Some(e) if is_openai_usage_chunk(e) => {}
                                _ => match strip_null_usage(raw) {
                                    Some(stripped) => out.extend_from_slice(&stripped),
                                    None => out.extend_from_slice(raw),
                                },
                            }
                        }
                    }
                    Piece::Fragment(raw) => {
                        if let Some(out) = out.as_mut() {
                            out.extend_from_slice(raw);
                        }
                    }
                });
                if token && self.first_token.is_none() {
                    self.on_first_token();
                }
                out
            }
            Shape::Json {
                kept,
                kept_len,
                tail,
            } => {
                match tail {
                    Some(tail) => {
                        tail.extend_from_slice(data);
                        if tail.len() > TAIL_BYTES {
                            tail.drain(..tail.len() - TAIL_BYTES);
                        }
                    }
                    None if *kept_len + data.len() > MAX_JSON_BYTES => {
                        let mut t: Vec<u8> = kept.drain(..).flat_map(|b| b.to_vec()).collect();
                        t.extend_from_slice(data);
                        t.drain(..t.len().saturating_sub(TAIL_BYTES));
                        *tail = Some(t);
                    }
                    None => {
                        *kept_len += data.len();
                        kept.push(data.clone());
                    }
                }
                None
            }
        }
    }

    fn on_first_token(&mut self) {
        let now = Instant::now();
        self.first_token = Some(now);
        let ttft = now.saturating_duration_since(self.start);
        self.facts.update(|f| f.time_to_first_token = Some(ttft));
        if self.source == Source::Upstream {
            self.state
                .metrics
                .time_to_first_token(&self.model)
                .observe(ttft.as_secs_f64());
        }
    }

    /// `clean`: the body reached its end. Otherwise it failed or the client went away: what was
    /// used so far is counted, but no hook is called (the usage is not final).
    fn finish(&mut self, clean: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let streamed = matches!(self.shape, Shape::Sse { .. });
        if let Shape::Json {
            kept,
            kept_len,
            tail,
        } = &mut self.shape
        {
            match tail {
                Some(tail) => self.tally.on_tail(tail),
                None => {
                    let mut whole = Vec::with_capacity(*kept_len);
                    kept.iter().for_each(|b| whole.extend_from_slice(b));
                    self.tally.on_body(&whole);
                }
            }
        }
        if !clean && !self.tally.reported() && self.tally.content_events == 0 {
            return;
        }
        let usage = self.tally.usage(self.prompt_estimate);
        self.facts.update(|f| {
            f.usage = Some(LoggedUsage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                estimated: usage.estimated,
            })
        });
        let s = &self.state;
        let m = &s.metrics;
        match self.source {
            Source::Upstream => {
                m.tokens(&self.model, "prompt").inc_by(usage.prompt_tokens);
                m.tokens(&self.model, "completion")
                    .inc_by(usage.completion_tokens);
                m.cached_prompt_tokens(&self.model)
                    .inc_by(usage.cached_tokens);
                if usage.estimated {
                    m.usage_estimated(&self.model).inc();
                }
                if streamed && clean {
                    let now = Instant::now();
                    m.stream_duration(&self.model)
                        .observe(now.saturating_duration_since(self.start).as_secs_f64());
                    if let Some(first) = self.first_token {
                        if usage.completion_tokens > 1 {
                            let per_token = now.saturating_duration_since(first).as_secs_f64()
                                / (usage.completion_tokens - 1) as f64;
                            m.time_per_output_token(&self.model).observe(per_token);
                        }
                    }
                }
            }
            Source::Cache | Source::Dedup => {
                let source = if self.source == Source::Cache {
                    "cache"
                } else {
                    "dedup"
                };
                m.tokens_avoided(&self.model, source).inc_by(usage.total());
            }
        }
        tracing::debug!(
            route = %s.route,
            model = %self.model,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            estimated = usage.estimated,
            "llm usage"
        );
        if clean {
            if let Some(hooks) = &self.hooks {
                let spent = match self.source {
                    Source::Upstream => usage,
                    Source::Cache | Source::Dedup => Usage::default(),
                };
                hooks.call(&spent);
            }
        }
    }
}

/// Where a body is after its inner body ended.
enum After {
    Reading,
    /// Strip mode sent the bytes of an unfinished last event; the end (or error) comes next.
    Flushed(Option<BoxError>),
    Over,
}

pin_project_lite::pin_project! {
    struct AccountedBody {
        #[pin]
        inner: ProxyBody,
        accounting: Accounting,
        reshaped: bool,
        after: After,
    }

    impl PinnedDrop for AccountedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // hyper never polls a body already at its end: that is a clean end too.
            let clean = matches!(this.after, After::Reading) && this.inner.is_end_stream();
            this.accounting.finish(clean);
        }
    }
}

fn finish_with(
    after: &mut After,
    accounting: &mut Accounting,
    err: Option<BoxError>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    *after = After::Over;
    accounting.finish(err.is_none());
    match err {
        Some(e) => Poll::Ready(Some(Err(e))),
        None => Poll::Ready(None),
    }
}

impl Body for AccountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match std::mem::replace(this.after, After::Reading) {
            After::Over => {
                *this.after = After::Over;
                return Poll::Ready(None);
            }
            After::Flushed(err) => return finish_with(this.after, this.accounting, err),
            After::Reading => {}
        }
        loop {
            let err = match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    match this.accounting.on_data(&data) {
                        None => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        // Nothing whole to send yet (or only the usage chunk): read on.
                        Some(out) if out.is_empty() => continue,
                        Some(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                    }
                }
                Poll::Ready(Some(Err(e))) => Some(e),
                Poll::Ready(None) => None,
                Poll::Pending => return Poll::Pending,
            };
            // The inner body ended: strip mode still holds an unfinished last event, if any.
            let held = match &mut this.accounting.shape {
                Shape::Sse { splitter, .. } if *this.reshaped => splitter.take_rest(),
                _ => Vec::new(),
            };
            if held.is_empty() {
                return finish_with(this.after, this.accounting, err);
            }
            *this.after = After::Flushed(err);
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(held)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.after {
            After::Over => true,
            After::Flushed(_) => false,
            After::Reading => !self.reshaped && self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.reshaped {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::RouteService;
    use http_body_util::StreamBody;
    use std::sync::Mutex;
    use tower::Service;

    fn route(kind: &str) -> RouteConfig {
        serde_yaml::from_str(&format!("{{name: r, upstream: u, kind: {kind}}}")).unwrap()
    }

    /// An upstream answering with `chunks` (then `fail`ing, if set) and the given headers.
    fn upstream(
        headers: &'static [(&'static str, &'static str)],
        chunks: &'static [&'static str],
        fail: bool,
    ) -> RouteService {
        RouteService::new(tower::service_fn(
            move |_req: ProxyRequest| -> ProxyFuture {
                Box::pin(async move {
                    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
                        .iter()
                        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                        .collect();
                    if fail {
                        frames.push(Err("cut".into()));
                    }
                    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
                    let mut response = crate::service::ProxyResponse::new(body);
                    for (k, v) in headers {
                        response
                            .headers_mut()
                            .insert(*k, HeaderValue::from_static(v));
                    }
                    Ok(response)
                })
            },
        ))
    }

    /// Sends `body` through the layer; returns what the client read and what the hooks got.
    async fn run(kind: &str, svc: RouteService, body: &'static str) -> (String, Vec<Usage>) {
        let metrics = Arc::new(Metrics::new());
        let mut svc = LlmLayer::new(&route(kind), &metrics).unwrap().wrap(svc);
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut req = http::Request::post("/v1/chat/completions")
            .body(full(body))
            .unwrap();
        let sink = got.clone();
        UsageHooks::add(
            &mut req,
            Arc::new(move |u: &Usage| sink.lock().unwrap().push(*u)),
        );
        let response = svc.call(req).await.unwrap();
        let text = match response.into_body().collect().await {
            Ok(b) => String::from_utf8(b.to_bytes().to_vec()).unwrap(),
            Err(e) => format!("error: {e}"),
        };
        let usages = got.lock().unwrap().clone();
        (text, usages)
    }

    const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
    const SSE: &[(&str, &str)] = &[("content-type", "text/event-stream")];
    const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"12345678"}]}"#;

    #[tokio::test]
    async fn hooks_get_the_reported_usage() {
        let svc = upstream(
            JSON,
            &[
                r#"{"model":"m","usage":{"prompt_tokens":5,"#,
                r#""completion_tokens":2}}"#,
            ],
            false,
        );
        let (_, usages) = run("openai", svc, CHAT).await;
        assert_eq!(
            usages,
            [Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_tokens: 0,
                estimated: false
            }]
        );
    }

    #[tokio::test]
    async fn hooks_get_an_estimate_when_a_stream_has_none() {
        let svc = upstream(
            SSE,
            &[
                "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"del",
                "ta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n",
            ],
            false,
        );
        let (_, usages) = run("openai", svc, CHAT).await;
        // 8 characters of prompt: 2 tokens; two content deltas.
        assert_eq!(
            usages,
            [Usage {
                prompt_tokens: 2,
                completion_tokens: 2,
                cached_tokens: 0,
                estimated: true
            }]
        );
    }

    #[tokio::test]
    async fn hooks_get_zero_for_an_answer_from_the_cache() {
        let svc = upstream(
            &[("content-type", "application/json"), (CACHE_HEADER, "HIT")],
            &[r#"{"usage":{"prompt_tokens":5,"completion_tokens":2}}"#],
            false,
        );
        let (_, usages) = run("openai", svc, CHAT).await;
        assert_eq!(usages, [Usage::default()]);
    }

    #[tokio::test]
    async fn no_hook_when_the_stream_fails() {
        let svc = upstream(
            SSE,
            &["event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n"],
            true,
        );
        let (text, usages) = run("anthropic", svc, CHAT).await;
        assert!(text.starts_with("error"), "{text}");
        assert!(usages.is_empty());
    }

    #[tokio::test]
    async fn an_unfinished_last_event_still_reaches_a_client_whose_usage_chunk_is_removed() {
        let svc = upstream(
            SSE,
            &[
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n",
                "data: [DONE]",
            ],
            false,
        );
        let (text, usages) = run("openai", svc, r#"{"model":"m","stream":true}"#).await;
        assert_eq!(text, "data: [DONE]");
        assert_eq!(usages[0].prompt_tokens, 1);
    }
}
