//! Per-upstream concurrency limits: at most `max_in_flight` requests at an upstream at once
//! (across all workers and routes), the rest wait in a bounded queue or get 503. A request holds
//! its slot until its response body has ended. Cache hits never take a slot.

use crate::config::ConcurrencyConfig;
use crate::error::ProxyError;
use crate::http::body::{BodyObserver, Observed};
use crate::metrics::upstream::ConcurrencyMetrics;
use crate::metrics::Metrics;
use crate::service::{Around, Inner};
use crate::service::{ProxyFuture, ProxyRequest};
use prometheus::IntGauge;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One upstream's limit, shared by every route and worker that uses the upstream.
pub struct ConcurrencyLimit {
    upstream: Arc<str>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    waiting: AtomicUsize,
    max_wait: Duration,
    max_queue: usize,
    metrics: ConcurrencyMetrics,
}

impl ConcurrencyLimit {
    pub fn new(upstream: &str, config: &ConcurrencyConfig, metrics: &Metrics) -> Arc<Self> {
        Arc::new(ConcurrencyLimit {
            upstream: Arc::from(upstream),
            slots: Arc::new(Semaphore::new(config.max_in_flight)),
            max_in_flight: config.max_in_flight,
            waiting: AtomicUsize::new(0),
            max_wait: config.max_wait,
            max_queue: config.max_queue,
            metrics: metrics.upstream.concurrency(upstream),
        })
    }

    fn busy(&self) -> ProxyError {
        self.metrics.rejected.inc();
        ProxyError::UpstreamBusy {
            upstream: self.upstream.to_string(),
            limit: self.max_in_flight,
        }
    }

    /// A slot, and how long the request queued for it.
    async fn acquire(&self) -> Result<(Slot, Duration), ProxyError> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.metrics.allowed.inc();
            return Ok((self.slot(permit), Duration::ZERO));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(self.busy());
        }
        // Leaves the queue however the wait ends, including the client going away.
        struct Waiting<'a>(&'a ConcurrencyLimit);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiting.fetch_sub(1, Ordering::AcqRel);
                self.0.metrics.queue_length.dec();
            }
        }
        self.metrics.queued.inc();
        self.metrics.queue_length.inc();
        let _waiting = Waiting(self);
        let started = Instant::now();
        match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                let waited = started.elapsed();
                self.metrics.queue_wait.observe(waited.as_secs_f64());
                Ok((self.slot(permit), waited))
            }
            // Timed out (or the semaphore closed, which it never is).
            _ => Err(self.busy()),
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.metrics.in_flight.inc();
        Slot {
            _permit: permit,
            in_flight: self.metrics.in_flight.clone(),
        }
    }
}

/// A taken slot; given back when the response body is done (or the request dropped).
struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl BodyObserver for Slot {}

#[derive(Clone)]
pub struct ConcurrencyLayer {
    limit: Arc<ConcurrencyLimit>,
}

impl ConcurrencyLayer {
    pub fn new(limit: Arc<ConcurrencyLimit>) -> Self {
        ConcurrencyLayer { limit }
    }
}

impl Around for ConcurrencyLayer {
    fn call<S: Inner>(&self, inner: &mut S, req: ProxyRequest) -> ProxyFuture {
        let limit = self.limit.clone();
        let mut inner = inner.clone();
        Box::pin(async move {
            let (slot, queued) = limit.acquire().await?;
            if !queued.is_zero() {
                // A deliberate wait, with its own histogram: not sidelight's overhead.
                if let Some(meta) = req.extensions().get::<crate::http::RequestMeta>() {
                    meta.upstream_wait.add(queued);
                }
            }
            let response = inner.call(req).await?;
            Ok(response.map(|body| Observed::boxed(body, slot)))
        })
    }
}
