//! Accepts PostgreSQL clients on one worker's socket until shutdown, then lets sessions end at
//! their next transaction boundary (up to the drain timeout).

use super::PgShared;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Serves until `stop` turns true; true if every session ended within `drain`.
pub async fn serve(
    name: Arc<str>,
    listener: TcpListener,
    shared: Arc<PgShared>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> bool {
    let mut sessions = JoinSet::new();
    let accepted_total = shared
        .metrics
        .pg
        .clients_accepted
        .with_label_values(&[&name]);
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() { break; }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accepted_total.inc();
                    sessions.spawn(super::client::serve(shared.clone(), name.clone(), stream, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "postgres accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(drain, async {
        while sessions.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    sessions.abort_all();
    drained
}
