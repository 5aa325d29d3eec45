//! The HTTP/1.1 connection pool: idle keep-alive connections per endpoint, owned by one worker.
//!
//! hyper-util's general-purpose client spent a fifth of sidelight's per-request instructions
//! on things a per-worker pool does not need (hashing pool keys, racing a connect against a
//! checkout, a spawned task per response). This pool is a stack of idle `SendRequest`s per
//! endpoint: the most recently used connection goes out first (the least likely to have been
//! closed by the server), connections come back when their response body has been read to the
//! end, and idle ones are closed by a sweeper after `idle_timeout`. HTTP/2 upstreams keep using
//! hyper-util's client, whose multiplexing this does not replace.

use super::connector::{ConnectFailure, CountingConnector};
use crate::proxy::body::ProxyBody;
use crate::BoxError;
use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectFailure),
    #[error("{}", crate::error::chain(.0))]
    Http(#[from] hyper::Error),
    /// From hyper-util's client (HTTP/2 upstreams).
    #[error("{}", crate::error::chain(.0))]
    Client(#[from] hyper_util::client::legacy::Error),
    #[error("cannot build the upstream request: {0}")]
    Request(String),
}

struct Idle {
    sender: SendRequest<ProxyBody>,
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

    fn checkout(&self, endpoint: usize) -> Option<SendRequest<ProxyBody>> {
        let slot = self.slots.get(endpoint)?;
        let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < self.idle_timeout {
                return Some(conn.sender);
            }
        }
        None
    }

    fn checkin(&self, endpoint: usize, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        if let Some(slot) = self.slots.get(endpoint) {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < self.max_idle {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    async fn connect(&self, endpoint: usize) -> Result<SendRequest<ProxyBody>, SendError> {
        let uri = self.slots[endpoint].connect_uri.clone();
        let io = self.connector.clone().call(uri).await?;
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form URI, `Host` already set) to endpoint number `endpoint`.
    pub async fn send(
        self: &Arc<Self>,
        endpoint: usize,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        // A pooled connection may have been closed by the server a moment ago; hyper then hands
        // the unsent request back and it goes out on a fresh connection instead.
        while let Some(mut sender) = self.checkout(endpoint) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.track(endpoint, sender, response)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect(endpoint).await?;
        let response = sender.send_request(req).await?;
        Ok(self.track(endpoint, sender, response))
    }

    /// The connection goes back to the pool once the response body has been read to its end.
    fn track(
        self: &Arc<Self>,
        endpoint: usize,
        sender: SendRequest<ProxyBody>,
        response: Response<Incoming>,
    ) -> Response<ProxyBody> {
        if self.max_idle == 0 {
            return response.map(|b| b.map_err(BoxError::from).boxed_unsync());
        }
        let lease = Lease {
            pool: self.clone(),
            endpoint,
            sender,
        };
        if response.body().is_end_stream() {
            lease.release();
            return response.map(|b| b.map_err(BoxError::from).boxed_unsync());
        }
        response.map(|inner| {
            PooledBody {
                inner,
                lease: Some(lease),
            }
            .boxed_unsync()
        })
    }
}

/// Closes connections idle longer than `idle_timeout`, so they expire without traffic too.
async fn sweep(pool: Weak<Http1Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        for slot in &pool.slots {
            let mut idle = slot.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < idle_timeout);
        }
    }
}

struct Lease {
    pool: Arc<Http1Pool>,
    endpoint: usize,
    sender: SendRequest<ProxyBody>,
}

impl Lease {
    fn release(self) {
        self.pool.checkin(self.endpoint, self.sender);
    }
}

pin_project_lite::pin_project! {
    /// A response body whose connection returns to the pool when the body ends cleanly. Dropped
    /// early, it takes the connection with it: a half-read response cannot be reused.
    struct PooledBody {
        #[pin]
        inner: Incoming,
        lease: Option<Lease>,
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.lease.take();
            }
            // hyper may never poll again once the body says it is complete.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
            }
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
