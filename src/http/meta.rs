//! Facts about one request that the layers share: its id, its start, its client, and how long it
//! waited on the upstream.

use super::headers;
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Facts about a request set once by the entry service, read by the layers.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    pub id: HeaderValue,
    pub start: Instant,
    pub client: Peer,
    /// Added to by the layers that waited on something other than sidelight's own work; read by
    /// observe (see [`UpstreamWait`]).
    pub upstream_wait: UpstreamWait,
}

impl RequestMeta {
    /// Marks an answer the request did not get from its own upstream call (a cache hit, a
    /// shared or batched answer): our request id on it, and how long it waited upstream.
    pub fn stamp(&self, headers: &mut http::HeaderMap, upstream_wait: Duration) {
        headers.insert(headers::REQUEST_ID, self.id.clone());
        self.upstream_wait.add(upstream_wait);
    }
}

/// The client end of a connection, worked out once per connection rather than per request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The IP as text, for `x-forwarded-for`.
    pub ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }
}

/// How long one request waited, before its response headers, on something other than
/// sidelight's own work, so the observe layer can compute sidelight's overhead (time to headers
/// minus this). Added to by the forwarding service (every attempt's wait for the upstream's
/// headers), the LLM stream guard (a stream held for its first token), the cache and batching
/// layers for answers they share (zero for a cache hit), and the deliberate waits: the rate-limit
/// and concurrency queues and retry backoff. Unset for answers that never waited on an
/// upstream (an error, for instance). A cell shared by the request meta's clones rather than a
/// response extension: a first extension costs three allocations.
#[derive(Clone, Debug)]
pub struct UpstreamWait(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl UpstreamWait {
    const UNSET: u64 = u64::MAX;

    pub fn new() -> Self {
        UpstreamWait(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            Self::UNSET,
        )))
    }

    /// Adds `wait` (an unset cell becomes `wait`).
    pub fn add(&self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(Self::UNSET - 1);
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |old| {
                Some(match old {
                    Self::UNSET => nanos,
                    old => old.saturating_add(nanos).min(Self::UNSET - 1),
                })
            },
        );
    }

    pub fn get(&self) -> Option<Duration> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::UNSET => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

impl Default for UpstreamWait {
    fn default() -> Self {
        Self::new()
    }
}

/// What the LLM layer learned about one request, for the access log (the observe layer reads
/// it from the response's extensions when the response body ends).
#[derive(Debug, Default)]
pub struct LlmFacts(std::sync::Mutex<LlmSummary>);

#[derive(Clone, Debug, Default)]
pub struct LlmSummary {
    pub model: Option<std::sync::Arc<str>>,
    pub usage: Option<LoggedUsage>,
    /// Time from request arrival to the first generated token (streams).
    pub time_to_first_token: Option<Duration>,
}

/// The token counts an access log line shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoggedUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when sidelight estimated the counts (the upstream reported none).
    pub estimated: bool,
}

impl LlmFacts {
    pub fn summary(&self) -> LlmSummary {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut LlmSummary)) {
        f(&mut self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

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
