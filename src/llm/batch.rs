//! Embeddings micro-batching: concurrent `POST .../embeddings` requests of one tenant with the
//! same parameters are merged into one upstream call whose `input` is the concatenation of
//! theirs, and the answer is split back so each client gets exactly its own embeddings.
//!
//! The layer sits inside the cache layer and outside the upstream's concurrency limit, so a
//! merged call takes one upstream slot. For one request:
//!
//! 1. Not an embeddings POST, or a body it does not understand ([`wire::parse_request`]): passed
//!    through untouched. sidelight never answers with an error of its own for a body it cannot
//!    batch.
//! 2. With the route's `cache:` on, each input is looked up on its own ([`InputCache`]); a
//!    request whose inputs are all cached is answered without the upstream.
//! 3. The missing inputs join the pending batch of their group: same path and query, every body
//!    field except `input` equal, the same headers (credentials included: two tenants never
//!    share a batch). A batch is sent when it is full (`max_inputs`, `max_body_bytes`) or
//!    `max_wait` after its first request; a request that fills a batch on its own is sent alone.
//! 4. A client that goes away before its batch is sent takes its inputs out (a drop guard).
//! 5. The answer is split by position (or `index`); each client gets its embeddings numbered from
//!    0 and its share of `usage`. An upstream error reaches every client of the batch as the
//!    upstream sent it, or with `on_error: split` the batch is retried in halves to isolate the
//!    request that caused a 4xx.

mod input_cache;
pub mod wire;

pub use input_cache::InputCache;

use crate::config::{BatchConfig, BatchOnError};
use crate::error::ProxyError;
use crate::http::body::full;
use crate::http::RequestMeta;
use crate::metrics::llm::BatchMetrics;
use crate::metrics::Metrics;
use crate::service::{ProxyFuture, ProxyRequest, ProxyResponse, RouteService};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

/// `on_error: split` halves a failing batch at most this many times (256 requests down to one).
const MAX_SPLIT_DEPTH: u32 = 8;

/// Whether a request is one batching looks at: an uncompressed embeddings POST.
pub fn is_embeddings(req: &ProxyRequest) -> bool {
    req.method() == Method::POST
        && req.uri().path().ends_with("/embeddings")
        && req
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"))
}

struct Settings {
    route: Arc<str>,
    upstream: Arc<str>,
    max_inputs: usize,
    max_wait: Duration,
    max_bytes: usize,
    split: bool,
    cache: Option<InputCache>,
    metrics: BatchMetrics,
}

#[derive(Clone)]
pub struct BatchLayer {
    settings: Arc<Settings>,
    groups: Arc<Groups>,
}

impl BatchLayer {
    /// `cache`: the per-input cache, when the route caches. `groups`: the route's pending
    /// batches, shared by every worker ([`Batches::route`]).
    pub fn new(
        route: &str,
        upstream: &str,
        config: &BatchConfig,
        cache: Option<InputCache>,
        groups: Arc<Groups>,
        metrics: &Metrics,
    ) -> BatchLayer {
        BatchLayer {
            groups,
            settings: Arc::new(Settings {
                route: Arc::from(route),
                upstream: Arc::from(upstream),
                max_inputs: config.max_inputs,
                max_wait: config.max_wait,
                max_bytes: config
                    .max_body_bytes
                    .map_or(usize::MAX, |b| usize::try_from(b.0).unwrap_or(usize::MAX)),
                split: config.on_error == BatchOnError::Split,
                cache,
                metrics: metrics.llm.batch(route),
            }),
        }
    }
}

impl Layer<RouteService> for BatchLayer {
    type Service = Batch;
    fn layer(&self, inner: RouteService) -> Batch {
        Batch {
            state: Arc::new(State {
                settings: self.settings.clone(),
                inner: inner.clone(),
                groups: self.groups.clone(),
            }),
            inner,
        }
    }
}

/// Requests that may share a batch have the same group key: a SHA-256 of path, query, input
/// kind, parameters and headers.
type GroupKey = [u8; 32];
type Params = Vec<(String, Box<RawValue>)>;

/// The pending batches of every batching route, shared by all workers, so that requests that
/// arrive on different worker threads still share a batch. A batch is sent through the stack
/// (and connection pool) of the worker that sends it.
#[derive(Clone, Default)]
pub struct Batches(Arc<Mutex<HashMap<String, Arc<Groups>>>>);

impl Batches {
    /// The pending batches of one route.
    pub fn route(&self, route: &str) -> Arc<Groups> {
        let mut routes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        routes.entry(route.to_string()).or_default().clone()
    }
}

/// One route's pending batches, by group.
#[derive(Default)]
pub struct Groups {
    pending: Mutex<HashMap<GroupKey, Pending>>,
    next_id: AtomicU64,
}

struct State {
    settings: Arc<Settings>,
    inner: RouteService,
    groups: Arc<Groups>,
}

/// A batch still taking requests.
struct Pending {
    id: u64,
    params: Arc<Params>,
    members: Vec<Member>,
    inputs: usize,
    bytes: usize,
}

/// One client request's part of a batch.
struct Member {
    id: u64,
    parts: http::request::Parts,
    inputs: Vec<Box<RawValue>>,
    weights: Vec<u64>,
    /// The client's own body, sent unchanged (and its answer passed through) if it goes alone.
    original: Option<Bytes>,
    bytes: usize,
    queued: Instant,
    tx: tokio::sync::oneshot::Sender<BatchOutcome>,
}

/// What a member gets back from its batch.
enum BatchOutcome {
    /// Sent alone as the client wrote it: the upstream's answer, untouched.
    Response(ProxyResponse),
    /// The upstream's answer to the whole batch (an error), for every member alike.
    Whole {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// This member's share of a successful answer.
    Embeddings {
        status: StatusCode,
        headers: HeaderMap,
        envelope: Arc<Params>,
        embeddings: Vec<Bytes>,
        usage: Option<Value>,
        /// Each embedding's share of the batch's prompt tokens, kept with it in the cache.
        input_tokens: Vec<u64>,
    },
    Failed(ProxyError),
}

#[derive(Clone)]
pub struct Batch {
    state: Arc<State>,
    inner: RouteService,
}

impl Service<ProxyRequest> for Batch {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ProxyFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> ProxyFuture {
        if !is_embeddings(&req) {
            return self.inner.call(req);
        }
        let state = self.state.clone();
        Box::pin(async move { state.handle(req).await })
    }
}

/// Headers that differ per request without changing the answer: they neither split groups nor
/// matter that only the first request's go upstream.
fn per_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "expect"
            | "x-request-id"
            | "traceparent"
            | "tracestate"
            | "baggage"
            | "user-agent"
            | "accept-encoding"
            | "cache-control"
            | "pragma"
            | "forwarded"
            | "via"
            | "x-real-ip"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-port"
    ) || name.as_str().starts_with("x-stainless-")
}

fn group_key(parts: &http::request::Parts, req: &wire::Request) -> GroupKey {
    fn put(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    let mut h = Sha256::new();
    put(&mut h, parts.uri.path().as_bytes());
    put(&mut h, parts.uri.query().unwrap_or("").as_bytes());
    put(
        &mut h,
        match req.kind {
            wire::InputKind::Text => b"text",
            wire::InputKind::Tokens => b"tokens",
        },
    );
    for (name, value) in &req.params {
        put(&mut h, name.as_bytes());
        put(&mut h, value.get().as_bytes());
    }
    let mut names: Vec<&HeaderName> = parts
        .headers
        .keys()
        .filter(|n| !per_request_header(n))
        .collect();
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    for name in names {
        put(&mut h, b"h");
        put(&mut h, name.as_str().as_bytes());
        for value in parts.headers.get_all(name) {
            put(&mut h, value.as_bytes());
        }
    }
    h.finalize().into()
}

/// The client's `Cache-Control` for the per-input cache.
fn cache_controls(h: &HeaderMap) -> (bool, bool) {
    let mut no_cache = false;
    let mut no_store = false;
    for d in h
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let d = d.trim();
        no_cache |= d.eq_ignore_ascii_case("no-cache");
        no_store |= d.eq_ignore_ascii_case("no-store");
    }
    (no_cache, no_store)
}

/// Takes a member out of its pending batch when its request future is dropped before the batch
/// was sent (the client went away).
struct LeaveOnDrop<'a> {
    state: &'a State,
    key: GroupKey,
    batch: u64,
    member: u64,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        self.state.leave(&self.key, self.batch, self.member);
    }
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Pending>> {
        // A panic elsewhere cannot leave the map half-updated in a way that matters here.
        self.groups
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn handle(self: Arc<Self>, req: ProxyRequest) -> Result<ProxyResponse, ProxyError> {
        let (parts, body) = req.into_parts();
        // The body-limit layer outside bounds what is read here.
        let body = body
            .collect()
            .await
            .map_err(|e| ProxyError::ClientBody(e.to_string()))?
            .to_bytes();
        let Some(parsed) = wire::parse_request(&body) else {
            return self
                .inner
                .clone()
                .call(Request::from_parts(parts, full(body)))
                .await;
        };
        let started = Instant::now();
        let settings = &self.settings;
        let meta = parts.extensions.get::<RequestMeta>().cloned();
        let count = parsed.inputs.len();

        let (no_cache, no_store) = cache_controls(&parts.headers);
        let mut keys = vec![None; count];
        let mut found: Vec<Option<(Bytes, u64)>> = vec![None; count];
        if let Some(cache) = &settings.cache {
            for (i, input) in parsed.inputs.iter().enumerate() {
                keys[i] = cache.key(&parts, &parsed.params, input);
                if !no_cache {
                    found[i] = keys[i].as_ref().and_then(|k| cache.get(k));
                }
            }
        }
        let hits = found.iter().filter(|f| f.is_some()).count();
        settings.metrics.cached_inputs.inc_by(hits as u64);
        if hits == count && settings.cache.is_some() {
            settings.metrics.saved_cache.inc();
            // What these inputs cost when they were computed, like a whole-response hit replays
            // the usage it was stored with.
            let tokens: u64 = found.iter().flatten().map(|(_, t)| t).sum();
            tracing::debug!(route = %settings.route, inputs = count, "embeddings answered from the per-input cache");
            let envelope: Params = [
                RawValue::from_string("\"list\"".into())
                    .ok()
                    .map(|v| ("object".to_string(), v)),
                parsed
                    .params
                    .iter()
                    .find(|(name, _)| name == "model")
                    .cloned(),
            ]
            .into_iter()
            .flatten()
            .collect();
            let usage = serde_json::json!({"prompt_tokens": tokens, "total_tokens": tokens});
            let body = wire::answer_body(
                &envelope,
                found.iter().flatten().map(|(b, _)| &b[..]),
                Some(&usage),
            );
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                crate::cache::layer::CACHE_HEADER,
                HeaderValue::from_static("HIT"),
            );
            return Ok(respond(
                StatusCode::OK,
                headers,
                Bytes::from(body),
                meta.as_ref(),
                Duration::ZERO,
            ));
        }

        let missing: Vec<usize> = (0..count).filter(|i| found[*i].is_none()).collect();
        let key = group_key(&parts, &parsed);
        let wire::Request {
            params,
            inputs,
            weights,
            ..
        } = parsed;
        let (inputs, weights): (Vec<_>, Vec<_>) = inputs
            .into_iter()
            .zip(weights)
            .enumerate()
            .filter(|(i, _)| found[*i].is_none())
            .map(|(_, x)| x)
            .unzip();
        let original = (hits == 0).then_some(body);
        let outcome = self
            .submit(key, Arc::new(params), parts, inputs, weights, original)
            .await;
        let waited = started.elapsed();
        match outcome {
            BatchOutcome::Response(mut response) => {
                if let Some(meta) = &meta {
                    meta.stamp(response.headers_mut(), waited);
                }
                Ok(response)
            }
            BatchOutcome::Failed(e) => Err(e),
            BatchOutcome::Whole {
                status,
                headers,
                body,
            } => Ok(respond(status, headers, body, meta.as_ref(), waited)),
            BatchOutcome::Embeddings {
                status,
                mut headers,
                envelope,
                embeddings,
                usage,
                input_tokens,
            } => {
                if let Some(cache) = &settings.cache {
                    if !no_store {
                        for ((position, embedding), tokens) in
                            missing.iter().zip(&embeddings).zip(&input_tokens)
                        {
                            if let Some(key) = keys[*position] {
                                cache.put(key, embedding, *tokens);
                            }
                        }
                    }
                    let label = if hits > 0 { "PARTIAL" } else { "MISS" };
                    headers.insert(
                        crate::cache::layer::CACHE_HEADER,
                        HeaderValue::from_static(label),
                    );
                }
                let mut fresh = embeddings.into_iter();
                let all: Option<Vec<Bytes>> = found
                    .into_iter()
                    .map(|cached| cached.map(|(b, _)| b).or_else(|| fresh.next()))
                    .collect();
                let Some(all) = all else {
                    return Err(ProxyError::Internal(
                        "embeddings batch answered fewer inputs than it was sent".into(),
                    ));
                };
                let body = wire::answer_body(&envelope, all.iter().map(|b| &b[..]), usage.as_ref());
                Ok(respond(
                    status,
                    headers,
                    Bytes::from(body),
                    meta.as_ref(),
                    waited,
                ))
            }
        }
    }

    /// Adds a request's inputs to its group's pending batch (or sends them at once) and waits
    /// for its share of the answer.
    async fn submit(
        self: &Arc<Self>,
        key: GroupKey,
        params: Arc<Params>,
        parts: http::request::Parts,
        inputs: Vec<Box<RawValue>>,
        weights: Vec<u64>,
        original: Option<Bytes>,
    ) -> BatchOutcome {
        let settings = &self.settings;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = self.groups.next_id.fetch_add(1, Ordering::Relaxed);
        let count = inputs.len();
        let bytes: usize = inputs.iter().map(|i| i.get().len() + 1).sum();
        let member = Member {
            id,
            parts,
            inputs,
            weights,
            original,
            bytes,
            queued: Instant::now(),
            tx,
        };
        let params_bytes: usize = params
            .iter()
            .map(|(n, v)| n.len() + v.get().len() + 4)
            .sum::<usize>()
            + 16;
        let mut send = Vec::new();
        let mut waiting_in = None;
        {
            let mut groups = self.lock();
            let alone = count >= settings.max_inputs
                || params_bytes.saturating_add(bytes) >= settings.max_bytes;
            // A batch this request would overflow goes first.
            let overflows = !alone
                && groups.get(&key).is_some_and(|p| {
                    p.inputs + count > settings.max_inputs
                        || p.bytes.saturating_add(bytes) > settings.max_bytes
                });
            if overflows {
                if let Some(full) = self.take(&mut groups, &key) {
                    send.push((full, "full"));
                }
            }
            if alone {
                // Full on its own: sent alone, never split across batches.
                let single = Pending {
                    id: self.groups.next_id.fetch_add(1, Ordering::Relaxed),
                    params,
                    inputs: count,
                    bytes,
                    members: vec![member],
                };
                send.push((single, "full"));
            } else {
                let pending = groups.entry(key).or_insert_with(|| Pending {
                    id: self.groups.next_id.fetch_add(1, Ordering::Relaxed),
                    params,
                    members: Vec::new(),
                    inputs: 0,
                    bytes: params_bytes,
                });
                let first = pending.members.is_empty();
                pending.inputs += count;
                pending.bytes += bytes;
                pending.members.push(member);
                settings.metrics.pending.add(count as i64);
                let batch = pending.id;
                if pending.inputs >= settings.max_inputs {
                    if let Some(full) = self.take(&mut groups, &key) {
                        send.push((full, "full"));
                    }
                } else {
                    waiting_in = Some(batch);
                    if first {
                        self.arm_timer(key, batch);
                    }
                }
            }
        }
        for (batch, trigger) in send {
            self.dispatch(batch, trigger);
        }
        let _leave = waiting_in.map(|batch| LeaveOnDrop {
            state: self,
            key,
            batch,
            member: id,
        });
        rx.await.unwrap_or_else(|_| {
            BatchOutcome::Failed(ProxyError::Internal(
                "embeddings batch ended without an answer".into(),
            ))
        })
    }

    /// Takes a pending batch out of its group, to be sent.
    fn take(&self, groups: &mut HashMap<GroupKey, Pending>, key: &GroupKey) -> Option<Pending> {
        let batch = groups.remove(key)?;
        self.settings.metrics.pending.sub(batch.inputs as i64);
        Some(batch)
    }

    fn arm_timer(self: &Arc<Self>, key: GroupKey, batch: u64) {
        let state = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(state.settings.max_wait).await;
            let due = {
                let mut groups = state.lock();
                if groups.get(&key).is_some_and(|p| p.id == batch) {
                    state.take(&mut groups, &key)
                } else {
                    None
                }
            };
            if let Some(due) = due {
                state.dispatch(due, "max_wait");
            }
        });
    }

    fn leave(&self, key: &GroupKey, batch: u64, member: u64) {
        let mut groups = self.lock();
        let Some(pending) = groups.get_mut(key).filter(|p| p.id == batch) else {
            return; // Already sent: the answer is simply not read.
        };
        if let Some(at) = pending.members.iter().position(|m| m.id == member) {
            let gone = pending.members.remove(at);
            pending.inputs -= gone.inputs.len();
            pending.bytes -= gone.bytes;
            self.settings.metrics.pending.sub(gone.inputs.len() as i64);
            tracing::debug!(route = %self.settings.route, inputs = gone.inputs.len(), "client went away; its inputs leave the pending embeddings batch");
        }
        if pending.members.is_empty() {
            groups.remove(key);
        }
    }

    fn dispatch(self: &Arc<Self>, batch: Pending, trigger: &'static str) {
        let m = &self.settings.metrics;
        let now = Instant::now();
        for member in &batch.members {
            m.wait
                .observe(now.duration_since(member.queued).as_secs_f64());
        }
        let requests = batch.members.len();
        m.inputs.observe(batch.inputs as f64);
        m.requests.observe(requests as f64);
        m.saved_batch.inc_by(requests.saturating_sub(1) as u64);
        tracing::debug!(route = %self.settings.route, requests, inputs = batch.inputs, trigger, "embeddings batch sent");
        // Its own task: a client that goes away now does not cancel the others' answers.
        tokio::spawn(self.clone().run(batch.params, batch.members, 0));
    }

    /// Sends `members` as one upstream request and hands each its outcome.
    fn run(
        self: Arc<Self>,
        params: Arc<Params>,
        mut members: Vec<Member>,
        depth: u32,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if members.len() == 1 && self.settings.cache.is_none() {
                if let Some(member) = members.pop() {
                    if let Some(original) = member.original {
                        let req = Request::from_parts(member.parts, full(original));
                        let outcome = match self.inner.clone().call(req).await {
                            Ok(response) => BatchOutcome::Response(response),
                            Err(e) => BatchOutcome::Failed(e),
                        };
                        let _ = member.tx.send(outcome);
                        return;
                    }
                    members.push(member);
                }
            }
            let Some(first) = members.first() else {
                return;
            };
            // The same input twice in one batch (same tenant and parameters) is sent once.
            let mut unique: Vec<&RawValue> = Vec::new();
            let mut unique_weights: Vec<u64> = Vec::new();
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let slots: Vec<Vec<usize>> = members
                .iter()
                .map(|m| {
                    m.inputs
                        .iter()
                        .zip(&m.weights)
                        .map(|(input, weight)| {
                            *seen.entry(input.get()).or_insert_with(|| {
                                unique.push(input);
                                unique_weights.push(*weight);
                                unique.len() - 1
                            })
                        })
                        .collect()
                })
                .collect();
            let total = unique.len();
            let body = wire::request_body(&params, unique.into_iter());
            drop(seen);
            let req = upstream_request(&first.parts, Bytes::from(body));
            let response = match self.inner.clone().call(req).await {
                Ok(response) => response,
                Err(e) => {
                    tracing::debug!(route = %self.settings.route, requests = members.len(), error = %e, "embeddings batch failed");
                    for m in members {
                        let _ = m.tx.send(BatchOutcome::Failed(e.clone()));
                    }
                    return;
                }
            };
            let (head, body) = response.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let e = match e.downcast::<ProxyError>() {
                        Ok(e) => *e,
                        Err(e) => ProxyError::UpstreamBody {
                            upstream: self.settings.upstream.to_string(),
                            detail: e.to_string(),
                        },
                    };
                    for m in members {
                        let _ = m.tx.send(BatchOutcome::Failed(e.clone()));
                    }
                    return;
                }
            };
            let status = head.status;
            let mut headers = head.headers;
            headers.remove(header::CONTENT_LENGTH);
            headers.remove(header::TRANSFER_ENCODING);
            if !status.is_success() {
                let about_input = status.is_client_error()
                    && !matches!(status.as_u16(), 401 | 403 | 404 | 408 | 429);
                if self.settings.split
                    && about_input
                    && members.len() > 1
                    && depth < MAX_SPLIT_DEPTH
                {
                    tracing::debug!(route = %self.settings.route, requests = members.len(), status = status.as_u16(), "embeddings batch rejected; retrying it in halves");
                    let right = members.split_off(members.len() / 2);
                    let left = self.clone().run(params.clone(), members, depth + 1);
                    let right = self.run(params, right, depth + 1);
                    futures_util::future::join(left, right).await;
                    return;
                }
                tracing::debug!(route = %self.settings.route, requests = members.len(), status = status.as_u16(), "embeddings batch answered with an error");
                for m in members {
                    let _ = m.tx.send(BatchOutcome::Whole {
                        status,
                        headers: headers.clone(),
                        body: body.clone(),
                    });
                }
                return;
            }
            let Some(answer) = wire::parse_answer(&body, total) else {
                if members.len() == 1 {
                    if let Some(m) = members.pop() {
                        let _ = m.tx.send(BatchOutcome::Whole {
                            status,
                            headers,
                            body,
                        });
                    }
                    return;
                }
                // Never guess how an answer we do not understand splits: ask for each alone.
                tracing::warn!(route = %self.settings.route, requests = members.len(), "upstream embeddings answer cannot be split; sending each request alone");
                let alone = members
                    .into_iter()
                    .map(|m| self.clone().run(params.clone(), vec![m], MAX_SPLIT_DEPTH));
                futures_util::future::join_all(alone).await;
                return;
            };
            headers.remove(header::CONTENT_ENCODING);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let weights: Vec<u64> = members.iter().map(|m| m.weights.iter().sum()).collect();
            let mut usages = answer
                .usage
                .as_ref()
                .map(|u| wire::share_usage(u, &weights).into_iter());
            let prompt_tokens = answer
                .usage
                .as_ref()
                .and_then(|u| u.get("prompt_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let per_input = wire::apportion(prompt_tokens, &unique_weights);
            let envelope = Arc::new(answer.envelope);
            for (m, slots) in members.into_iter().zip(slots) {
                let mine: Vec<Bytes> = slots
                    .iter()
                    .filter_map(|u| answer.embeddings.get(*u).cloned())
                    .collect();
                let _ = m.tx.send(BatchOutcome::Embeddings {
                    status,
                    headers: headers.clone(),
                    envelope: envelope.clone(),
                    embeddings: mine,
                    usage: usages.as_mut().and_then(Iterator::next),
                    input_tokens: slots
                        .iter()
                        .map(|u| per_input.get(*u).copied().unwrap_or(0))
                        .collect(),
                });
            }
        })
    }
}

/// The merged request: the first member's method, path and headers, the merged body.
fn upstream_request(first: &http::request::Parts, body: Bytes) -> ProxyRequest {
    let length = HeaderValue::from(body.len());
    let mut req = Request::new(full(body));
    *req.method_mut() = first.method.clone();
    *req.uri_mut() = first.uri.clone();
    *req.version_mut() = first.version;
    let mut h = first.headers.clone();
    h.remove(header::TRANSFER_ENCODING);
    // The answer is read and split here, so it must come uncompressed.
    h.remove(header::ACCEPT_ENCODING);
    h.insert(header::CONTENT_LENGTH, length);
    *req.headers_mut() = h;
    if let Some(meta) = first.extensions.get::<RequestMeta>() {
        // A cell of its own: each member's wait is set from the batch's, not by this call.
        req.extensions_mut().insert(RequestMeta {
            upstream_wait: crate::http::UpstreamWait::new(),
            ..meta.clone()
        });
    }
    req
}

fn respond(
    status: StatusCode,
    mut h: HeaderMap,
    body: Bytes,
    meta: Option<&RequestMeta>,
    waited: Duration,
) -> ProxyResponse {
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRANSFER_ENCODING);
    if let Some(meta) = meta {
        // Waiting for the batch and the upstream is not sidelight's per-request overhead; the
        // batch wait has its own histogram.
        meta.stamp(&mut h, waited);
    }
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    *response.headers_mut() = h;
    response
}

#[cfg(test)]
mod tests;
