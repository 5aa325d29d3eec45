//! Accepts client connections on one listener and serves them (HTTP/1.1 and h2c), until told to
//! stop; then lets in-flight requests finish, up to the drain deadline.

use super::entry::Entry;
use crate::http::Peer;
use crate::http1::server::{self as conn, ClientContext};
use crate::metrics::listener::ListenerMetrics;
use crate::metrics::Metrics;
use crate::shutdown::stopped;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct ListenerTask {
    pub name: String,
    pub index: usize,
    pub listener: TcpListener,
    pub entry: Entry,
    pub metrics: Arc<Metrics>,
    pub header_read_timeout: Duration,
    /// `limits.max_client_connections`, counted across workers by the listener's open gauge.
    pub max_connections: usize,
    pub client_body_timeout: Duration,
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
        header_read_timeout,
        max_connections,
        client_body_timeout,
    } = task;
    let ListenerMetrics {
        accepted,
        open,
        refused,
        errors,
        ..
    } = metrics.listeners.listener(&name);
    // The connections' own stop signal, so that their idle waits register with a channel of
    // this thread's only, not with the one all workers share.
    let (connections_stop, connections_stopped) = watch::channel(false);
    // Connection tasks, so that those still busy at the drain deadline can be cut.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            // A finished task keeps its whole allocation (as large as the connection's future)
            // until it is joined: reap them as they end (as the PostgreSQL listener does).
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
        // The gauge is shared by every worker's task for this listener: one process-wide cap.
        if usize::try_from(open.get()).unwrap_or(0) >= max_connections {
            refused.inc();
            tracing::debug!(listener = %name, limit = max_connections, "client connection refused: limits.max_client_connections reached");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        accepted.inc();
        open.inc();
        let client = ClientContext {
            handler: entry.clone(),
            listener: index,
            peer: Peer::new(peer),
            header_read_timeout,
            client_body_timeout,
            errors: errors.clone(),
        };
        let open = open.clone();
        let stop = connections_stopped.clone();
        connections.spawn(async move {
            let _open = GaugeGuard(open);
            conn::serve(stream, client, stop).await;
        });
    }
    drop(listener);
    // Idle connections close now; busy ones after their current request.
    let _ = connections_stop.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        _ = drained => true,
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(listener = %name, connections = connections.len(), "drain timeout reached; closing connections with requests still in flight");
            connections.shutdown().await;
            false
        }
    }
}

/// Decrements the open-connections gauge however the connection task ends (even aborted).
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
