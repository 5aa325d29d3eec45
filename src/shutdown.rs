//! The stop signal every serving task watches: one `watch` channel flipped to true at shutdown.

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
