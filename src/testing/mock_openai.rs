//! A small OpenAI-compatible mock upstream used by the README tour, benchmarks and tests.
//!
//! Responses are deterministic (derived from the request), so tests can assert on them.
//! Fault injection per request: `x-mock-latency-ms: N` overrides the configured latency and
//! `x-mock-status: NNN` answers with that status and an OpenAI-style error body.

use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Request bodies larger than this are rejected instead of buffered.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Upper bound for the `dimensions` request parameter, so a bad request can't exhaust memory.
const MAX_DIM: usize = 65_536;

#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Delay before response headers on every endpoint except `/ping` and `/health`.
    pub latency: Duration,
    /// Delay before each content chunk of a streamed completion.
    pub chunk_delay: Duration,
    /// Number of content chunks in a streamed completion.
    pub stream_chunks: usize,
    /// Length of embedding vectors (unless the request asks for `dimensions`).
    pub embedding_dim: usize,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Duration::ZERO,
            chunk_delay: Duration::from_millis(10),
            stream_chunks: 8,
            embedding_dim: 8,
        }
    }
}

struct State {
    cfg: MockConfig,
    requests: AtomicU64,
    connections: AtomicU64,
}

/// A running mock server; stops accepting (and gracefully closes idle connections) on drop.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    // Dropping the sender is the shutdown signal for the accept loop and every connection.
    _stop: watch::Sender<()>,
}

impl MockServer {
    /// Binds `addr` (port 0 picks a free port) and spawns the accept loop.
    pub async fn start(addr: SocketAddr, cfg: MockConfig) -> std::io::Result<MockServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            cfg,
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        tokio::spawn(accept_loop(listener, state.clone(), stop_rx));
        Ok(MockServer {
            addr,
            state,
            _stop: stop_tx,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Total requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Total TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Stops accepting; the listener closes as soon as the accept task observes the signal.
    pub fn shutdown(self) {}
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<()>) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Usually transient (e.g. EMFILE); back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        // Latency benchmarks would otherwise measure Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (builder, state, mut stop) = (builder.clone(), state.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Response body: either one buffered chunk or SSE events fed through a channel, so each
/// event is written (and flushed) as soon as it is produced.
enum MockBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            MockBody::Stream(_) => SizeHint::default(),
        }
    }
}

type Resp = Response<MockBody>;

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    respond(status, "application/json", Bytes::from(v.to_string()))
}

fn error_resp(status: StatusCode, message: &str) -> Resp {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
    json_resp(status, &body)
}

async fn handle(state: &State, req: Request<Incoming>) -> Resp {
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut resp = route(state, req, n).await;
    resp.headers_mut()
        .insert("x-mock-request-count", HeaderValue::from(n));
    resp
}

/// `None` if the header is absent, `Some(None)` if it is present but not a number.
fn header_u64(req: &Request<Incoming>, name: &str) -> Option<Option<u64>> {
    let v = req.headers().get(name)?;
    Some(v.to_str().ok().and_then(|s| s.trim().parse().ok()))
}

fn bad_request(message: &str) -> Resp {
    error_resp(StatusCode::BAD_REQUEST, message)
}

async fn route(state: &State, req: Request<Incoming>, n: u64) -> Resp {
    let path = req.uri().path();
    let cheap = matches!(path, "/ping" | "/health");
    let latency = match header_u64(&req, "x-mock-latency-ms") {
        Some(Some(ms)) => Duration::from_millis(ms),
        Some(None) => return bad_request("invalid x-mock-latency-ms"),
        None if cheap => Duration::ZERO,
        None => state.cfg.latency,
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = header_u64(&req, "x-mock-status") {
        // Only final statuses: a 1xx "response" would confuse HTTP clients.
        let status = code.filter(|c| (200..600).contains(c));
        return match status.and_then(|c| StatusCode::from_u16(c as u16).ok()) {
            Some(status) => error_resp(status, &format!("mock fault: status {status}")),
            None => bad_request("invalid x-mock-status"),
        };
    }
    let post = |m: &Method| *m == Method::POST;
    match (path, req.method()) {
        ("/ping", &Method::GET) => {
            respond(StatusCode::OK, "text/plain", Bytes::from_static(b"pong"))
        }
        ("/health", &Method::GET) => json_resp(StatusCode::OK, &json!({"status": "ok"})),
        ("/v1/models", &Method::GET) => {
            let model = |id: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "sidelight"});
            json_resp(
                StatusCode::OK,
                &json!({"object": "list", "data": [model("mock-gpt"), model("mock-embedding")]}),
            )
        }
        ("/v1/chat/completions", m) if post(m) => match read_json(req).await {
            Ok(body) => chat(state, &body, n),
            Err(resp) => resp,
        },
        ("/v1/embeddings", m) if post(m) => match read_json(req).await {
            Ok(body) => embeddings(state, &body),
            Err(resp) => resp,
        },
        ("/ping" | "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/embeddings", _) => {
            error_resp(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error_resp(StatusCode::NOT_FOUND, &format!("unknown path {path}")),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(bad_request(&format!("cannot read body: {e}"))),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(bad_request("request body must be a JSON object")),
        Err(e) => Err(bad_request(&format!("invalid JSON body: {e}"))),
    }
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Text of a message's `content`: a plain string or an array of `{"type":"text"}` parts.
fn content_text(msg: &Value) -> String {
    match msg.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn chat(state: &State, body: &Value, n: u64) -> Resp {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return bad_request("'messages' must be an array");
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-gpt");
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(content_text)
        .unwrap_or_default();
    let prompt_tokens: u64 = messages.iter().map(|m| words(&content_text(m))).sum();
    let mut reply = format!("mock reply: {last_user}");
    let mut finish = "stop";
    let max = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"));
    if let Some(max) = max.and_then(Value::as_u64) {
        if words(&reply) > max {
            reply = reply
                .split_whitespace()
                .take(max as usize)
                .collect::<Vec<_>>()
                .join(" ");
            finish = "length";
        }
    }
    let completion_tokens = words(&reply);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens});
    let (id, created) = (format!("chatcmpl-mock-{n}"), unix_now());

    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_resp(
            StatusCode::OK,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                    "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        );
    }

    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let sse = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    // Events are rendered up front (they are tiny); only their delivery is paced.
    let mut events = vec![sse(&chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    let chars: Vec<char> = reply.chars().collect();
    let parts = state.cfg.stream_chunks;
    for k in 0..parts {
        let piece: String = chars[k * chars.len() / parts..(k + 1) * chars.len() / parts]
            .iter()
            .collect();
        events.push(sse(&chunk(json!({"content": piece}), None)));
    }
    events.push(sse(&chunk(json!({}), Some(finish))));
    if include_usage {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage});
        events.push(sse(&v));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let (tx, rx) = mpsc::channel(4);
    let delay = state.cfg.chunk_delay;
    tokio::spawn(async move {
        for (i, ev) in events.into_iter().enumerate() {
            // Pace only the content chunks, so a stream takes about stream_chunks * chunk_delay.
            if (1..=parts).contains(&i) && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(ev).await.is_err() {
                return; // client went away
            }
        }
    });
    let mut resp = Response::new(MockBody::Stream(rx));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

enum Input {
    Text(String),
    Tokens(Vec<i64>),
}

fn parse_inputs(v: Option<&Value>) -> Option<Vec<Input>> {
    let tokens = |v: &Value| {
        v.as_array()?
            .iter()
            .map(Value::as_i64)
            .collect::<Option<Vec<_>>>()
    };
    let v = v?;
    match v {
        Value::String(s) => Some(vec![Input::Text(s.clone())]),
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) if a[0].is_number() => Some(vec![Input::Tokens(tokens(v)?)]),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Some(Input::Text(s.clone())),
                _ => tokens(x).map(Input::Tokens),
            })
            .collect(),
        _ => None,
    }
}

/// Deterministic unit vector in [-1, 1]^dim seeded by the input's hash.
fn embed(input: &Input, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            match input {
                Input::Text(s) => s.hash(&mut h),
                Input::Tokens(t) => t.hash(&mut h),
            }
            i.hash(&mut h);
            (h.finish() as f64 / u64::MAX as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            // A chunk of k bytes yields k + 1 significant characters, the rest is padding.
            let ch = ALPHABET[(n >> shift) as usize & 63] as char;
            out.push(if i > c.len() { '=' } else { ch });
        }
    }
    out
}

fn embeddings(state: &State, body: &Value) -> Resp {
    let Some(inputs) = parse_inputs(body.get("input")) else {
        return bad_request("'input' must be a string, array of strings, or token array(s)");
    };
    let base64_format = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return bad_request(&format!("unsupported encoding_format {other:?}")),
    };
    let dim = match body.get("dimensions").and_then(Value::as_u64) {
        Some(d) if d <= MAX_DIM as u64 => d as usize,
        Some(_) => return bad_request("'dimensions' too large"),
        None => state.cfg.embedding_dim,
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-embedding");
    let mut tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            tokens += match input {
                Input::Text(s) => words(s),
                Input::Tokens(t) => t.len() as u64,
            };
            let v = embed(input, dim);
            let embedding = if base64_format {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json_resp(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::{connect::HttpConnector, Client};

    async fn server() -> MockServer {
        let cfg = MockConfig {
            chunk_delay: Duration::from_millis(1),
            ..MockConfig::default()
        };
        MockServer::start("127.0.0.1:0".parse().unwrap(), cfg)
            .await
            .unwrap()
    }

    async fn call(
        srv: &MockServer,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, hyper::HeaderMap, String) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", srv.addr()))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn ping_and_counters() {
        let srv = server().await;
        let (status, headers, body) = call(&srv, Method::GET, "/ping", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "pong"));
        assert_eq!(headers["x-mock-request-count"], "1");
        let (status, _, body) = call(&srv, Method::GET, "/nope", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("\"error\""));
        assert_eq!(srv.requests(), 2);
        assert!(srv.connections() >= 1);
    }

    #[tokio::test]
    async fn chat_non_streaming_and_bad_json() {
        let srv = server().await;
        let req = r#"{"model":"m","messages":[{"role":"user","content":"hello there"}]}"#;
        let (status, _, body) = call(&srv, Method::POST, "/v1/chat/completions", req).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "mock reply: hello there"
        );
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["total_tokens"], 6);
        let (status, _, body) = call(&srv, Method::POST, "/v1/chat/completions", "{nope").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn chat_streaming_with_usage() {
        let srv = server().await;
        let req = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},
            "messages":[{"role":"user","content":"stream me please"}]}"#;
        let (status, headers, body) = call(&srv, Method::POST, "/v1/chat/completions", req).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/event-stream");
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 1 + 8 + 1 + 1 + 1);
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks[1..9]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, "mock reply: stream me please");
        assert_eq!(chunks[9]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[10]["choices"], json!([]));
        assert_eq!(chunks[10]["usage"]["completion_tokens"], 5);
    }

    #[tokio::test]
    async fn embeddings_three_inputs_and_base64() {
        let srv = server().await;
        let req = r#"{"model":"e","input":["a","b c",[1,2,3]]}"#;
        let (status, _, body) = call(&srv, Method::POST, "/v1/embeddings", req).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["index"], i);
            let emb = d["embedding"].as_array().unwrap();
            assert_eq!(emb.len(), 8);
            assert!(emb.iter().all(|x| x.as_f64().unwrap().abs() <= 1.0));
        }
        assert_eq!(v["usage"]["prompt_tokens"], 6);
        let req = r#"{"model":"e","input":"a","encoding_format":"base64"}"#;
        let (_, _, body) = call(&srv, Method::POST, "/v1/embeddings", req).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 44); // 32 bytes
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }

    #[tokio::test]
    async fn fault_headers() {
        let srv = server().await;
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let req = Request::get(format!("http://{}/v1/models", srv.addr()))
            .header("x-mock-status", "503")
            .header("x-mock-latency-ms", "5")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let srv = server().await;
        let addr = srv.addr();
        srv.shutdown();
        // The accept task notices the signal asynchronously.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
