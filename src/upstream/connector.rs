//! The upstream connector: hyper-rustls over hyper-util's TCP connector, wrapped so that every
//! connection is counted (opened, closed, open now) and connect failures are classified.

use crate::metrics::upstream::ConnMetrics;
use crate::BoxError;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// Why a connection could not be made; found again in the client's error chain by
/// [`find_connect_failure`] so the proxy can answer 502 or 504.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{}: {}", describe(kind), crate::error::chain(source.as_ref()))]
    Failed {
        kind: &'static str,
        #[source]
        source: BoxError,
    },
}

fn describe(kind: &str) -> &'static str {
    match kind {
        "refused" => "connection refused",
        "dns" => "name resolution failed",
        "tls" => "TLS handshake failed",
        _ => "connect failed",
    }
}

pub fn find_connect_failure<'a>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectFailure> {
    loop {
        if let Some(f) = err.downcast_ref::<ConnectFailure>() {
            return Some(f);
        }
        err = err.source()?;
    }
}

#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
    // hyper-util clones the connector for every request, pooled or not: keep that one refcount.
    metrics: Arc<ConnMetrics>,
}

impl CountingConnector {
    pub fn new(
        inner: HttpsConnector<HttpConnector>,
        timeout: Duration,
        metrics: ConnMetrics,
    ) -> Self {
        CountingConnector {
            inner,
            timeout,
            metrics: Arc::new(metrics),
        }
    }
}

fn classify(err: &BoxError) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = cur {
        if e.is::<rustls::Error>() {
            return "tls";
        }
        // hyper-util reports resolver failures only through the message.
        if e.to_string().starts_with("dns error") {
            return "dns";
        }
        cur = match e.downcast_ref::<io::Error>() {
            Some(io) if io.kind() == io::ErrorKind::ConnectionRefused => return "refused",
            // io::Error's source() skips the error it wraps; step into that one instead.
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    "other"
}

impl tower::Service<Uri> for CountingConnector {
    type Response = Counted<MaybeHttpsStream<TokioIo<TcpStream>>>;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectFailure>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|source| ConnectFailure::Failed {
                kind: "other",
                source,
            })
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(stream)) => {
                    metrics.opened.inc();
                    metrics.open.inc();
                    Ok(Counted {
                        inner: stream,
                        metrics,
                    })
                }
                Ok(Err(source)) => {
                    let kind = classify(&source);
                    let index = crate::metrics::CONNECT_ERROR_KINDS
                        .iter()
                        .position(|k| *k == kind)
                        .unwrap_or(3);
                    metrics.errors[index].inc();
                    tracing::debug!(error = %source, kind, "upstream connect failed");
                    Err(ConnectFailure::Failed { kind, source })
                }
                Err(_) => {
                    metrics.timeouts.inc();
                    Err(ConnectFailure::Timeout(timeout))
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// An upstream connection that updates the connection gauges when it closes.
    pub struct Counted<T> {
        #[pin]
        inner: T,
        metrics: Arc<ConnMetrics>,
    }

    impl<T> PinnedDrop for Counted<T> {
        fn drop(this: Pin<&mut Self>) {
            this.metrics.closed.inc();
            this.metrics.open.dec();
        }
    }
}

impl<T: Connection> Connection for Counted<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: Read> Read for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: Write> Write for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
}
