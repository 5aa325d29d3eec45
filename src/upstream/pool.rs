//! The HTTP/1.1 connection pool: idle keep-alive connections per endpoint, owned by one worker.
//!
//! hyper-util's general-purpose client spent a fifth of sidelight's per-request instructions
//! on things a per-worker pool does not need (hashing pool keys, racing a connect against a
//! checkout, a spawned task per response). This pool is a stack of idle connections per
//! endpoint: the most recently used one goes out first (the least likely to have been closed
//! by the server), connections come back when their response body has been read to the end
//! (see [`super::h1`], which speaks HTTP/1.1 on them), and idle ones are closed by a sweeper
//! after `idle_timeout`. HTTP/2 upstreams keep using hyper-util's client, whose multiplexing
//! this does not replace.

use super::connector::{ConnectFailure, CountingConnector};
use crate::http::body::ProxyBody;
use crate::http1::client::{Conn, H1Error, RequestHead};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectFailure),
    #[error(transparent)]
    Http1(#[from] H1Error),
    /// From hyper-util's client (HTTP/2 upstreams).
    #[error("{}", crate::error::chain(.0))]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("cannot build the upstream request: {0}")]
    Request(String),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle connections of one endpoint.
struct Slot {
    /// `scheme://authority` of the endpoint, what the connector dials.
    connect_uri: Uri,
    idle: Mutex<Vec<Idle>>,
}

pub struct Http1Pool {
    slots: Vec<Slot>,
    connector: CountingConnector,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Http1Pool {
    /// `endpoints` are the `scheme://authority` URIs, in endpoint order. Starts the idle
    /// sweeper on the current runtime (the worker's), which ends when the pool is dropped.
    pub fn new(
        endpoints: Vec<Uri>,
        connector: CountingConnector,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new(Http1Pool {
            slots: endpoints
                .into_iter()
                .map(|connect_uri| Slot {
                    connect_uri,
                    idle: Mutex::new(Vec::new()),
                })
                .collect(),
            connector,
            max_idle,
            idle_timeout,
        });
        if max_idle > 0 {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(sweep(Arc::downgrade(&pool), idle_timeout));
            }
        }
        pool
    }

    fn checkout(&self, endpoint: usize) -> Option<Conn> {
        let slot = self.slots.get(endpoint)?;
        let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.pop() {
            if c.since.elapsed() < self.idle_timeout && c.conn.is_usable() {
                return Some(c.conn);
            }
        }
        None
    }

    fn checkin(&self, endpoint: usize, conn: Conn) {
        if let Some(slot) = self.slots.get(endpoint) {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.max_idle {
                idle.push(Idle {
                    conn,
                    since: Instant::now(),
                });
            }
        }
    }

    async fn connect(&self, endpoint: usize) -> Result<Conn, SendError> {
        let uri = self.slots[endpoint].connect_uri.clone();
        let io = self.connector.clone().call(uri).await?;
        Ok(Conn::new(TokioIo::new(io)))
    }

    /// Sends `req` (origin-form URI, `Host` already set) to endpoint number `endpoint`.
    pub async fn send(
        self: &Arc<Self>,
        endpoint: usize,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        let (parts, mut body) = req.into_parts();
        let head = RequestHead::encode(&parts, &body);
        // A pooled connection may have been closed by the server a moment ago. A request that
        // can be sent again (no body, idempotent) then goes out on another connection; others
        // only reach connections that looked alive when taken from the pool.
        while let Some(mut conn) = self.checkout(endpoint) {
            match conn.exchange(&head, body).await {
                Ok(response) => return Ok(self.track(endpoint, conn, response)),
                Err(failed) if failed.retry_elsewhere => {
                    tracing::debug!(error = %failed.error, "pooled upstream connection was closed; sending again");
                    // Only a request without a body is sent again.
                    body = crate::http::body::empty();
                }
                Err(failed) => return Err(failed.error.into()),
            }
        }
        let mut conn = self.connect(endpoint).await?;
        match conn.exchange(&head, body).await {
            Ok(response) => Ok(self.track(endpoint, conn, response)),
            Err(failed) => Err(failed.error.into()),
        }
    }

    /// The connection goes back to the pool once the response body has been read to its end.
    fn track(
        self: &Arc<Self>,
        endpoint: usize,
        conn: Conn,
        head: crate::http1::client::ResponseHead,
    ) -> Response<ProxyBody> {
        let pool = (self.max_idle > 0).then(|| self.clone());
        head.into_response(conn, move |conn| {
            if let Some(pool) = pool {
                pool.checkin(endpoint, conn);
            }
        })
        .map(|body| body.boxed_unsync())
    }
}

/// Watches the idle connections: closes those idle longer than `idle_timeout`, and those the
/// upstream closed (or wrote to unasked) as soon as that happens, like nginx's keepalive
/// close handler. The watcher's waker sits on every idle socket, so a close wakes it at once;
/// connections checked in since the last look are picked up at the next tick.
async fn sweep(pool: Weak<Http1Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    std::future::poll_fn(|cx| {
        let Some(pool) = pool.upgrade() else {
            return std::task::Poll::Ready(());
        };
        while tick.poll_tick(cx).is_ready() {}
        for slot in &pool.slots {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain_mut(|c| c.since.elapsed() < idle_timeout && c.conn.poll_usable(cx));
        }
        std::task::Poll::Pending
    })
    .await
}
