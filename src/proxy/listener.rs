//! Accepts client connections on one listener and serves them (HTTP/1.1 and h2c), until told to
//! stop; then lets in-flight requests finish, up to the drain deadline.

use super::entry::Entry;
use crate::metrics::Metrics;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Resolves once `stop` says true, or its sender is gone.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

pub struct ListenerTask {
    pub name: String,
    pub index: usize,
    pub listener: TcpListener,
    pub entry: Entry,
    pub metrics: Arc<Metrics>,
}

/// Serves until `stop` flips to true, then drains. Returns false when connections were still
/// busy at the drain deadline.
pub async fn serve(task: ListenerTask, mut stop: watch::Receiver<bool>, drain: Duration) -> bool {
    let ListenerTask {
        name,
        index,
        listener,
        entry,
        metrics,
    } = task;
    let accepted = metrics.downstream_connections.with_label_values(&[&name]);
    let open = metrics.downstream_connections_open.with_label_values(&[&name]);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slowloris guard: a client gets this long to send its request headers.
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        accepted.inc();
        open.inc();
        let entry = entry.clone();
        let service = service_fn(move |req| {
            let entry = entry.clone();
            async move { Ok::<_, Infallible>(entry.handle(req, index, peer).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        let open = open.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
            }
            open.dec();
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(listener = %name, "drain timeout reached with requests still in flight");
            false
        }
    }
}
