//! Starting and stopping a whole sidelight: build the stacks, bind every listener, serve, and
//! drain on request. `main` and the integration tests both use this.

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::entry::Entry;
use crate::proxy::listener::{self, ListenerTask};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {field} ({addr}): {source}")]
    Bind {
        field: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] crate::upstream::BuildError),
}

pub struct Sidelight;

/// A started sidelight.
pub struct Running {
    /// Bound addresses, in the config's listener order (useful when the config says port 0).
    pub listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    /// The admin port outlives the drain; dropping this stops it.
    _admin_stop: watch::Sender<()>,
    tasks: Vec<JoinHandle<bool>>,
    admin_task: JoinHandle<()>,
}

async fn bind(field: String, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            field,
            addr,
            source,
        })
}

impl Sidelight {
    pub async fn start(config: Config) -> Result<Running, StartError> {
        let metrics = Arc::new(Metrics::new());
        let entry = Entry::build(&config, &metrics)?;
        let mut bound = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            bound.push(bind(format!("listeners[{i}].address"), l.address).await?);
        }
        let admin_listener = bind("admin.address".into(), config.admin.address).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                field: "admin.address".into(),
                addr: config.admin.address,
                source,
            })?;

        let (stop, stop_rx) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();
        for (index, (l, listener)) in config.listeners.iter().zip(bound).enumerate() {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                field: format!("listeners[{index}].address"),
                addr: l.address,
                source,
            })?;
            listeners.push(addr);
            metrics.init_listener(&l.name);
            let task = ListenerTask {
                name: l.name.clone(),
                index,
                listener,
                entry: entry.clone(),
                metrics: metrics.clone(),
            };
            tasks.push(tokio::spawn(listener::serve(
                task,
                stop_rx.clone(),
                config.shutdown.drain_timeout,
            )));
            tracing::info!(listener = %l.name, address = %addr, "listening");
        }

        let ready = Arc::new(AtomicBool::new(true));
        metrics.ready.set(1);
        let state = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            config_yaml: config.redacted_yaml(),
        });
        let (admin_stop, admin_stop_rx) = watch::channel(());
        let admin_task = tokio::spawn(admin::serve(admin_listener, state, admin_stop_rx));
        tracing::info!(address = %admin_addr, "admin listening");
        Ok(Running {
            listeners,
            admin: admin_addr,
            metrics,
            ready,
            stop,
            _admin_stop: admin_stop,
            tasks,
            admin_task,
        })
    }
}

impl Running {
    /// Stops accepting, lets in-flight requests finish up to the drain timeout, then stops the
    /// admin listener. Returns false if the deadline cut some requests short.
    pub async fn shutdown(self) -> bool {
        // Not ready first, so an orchestrator stops sending while we drain.
        self.ready.store(false, Ordering::Release);
        self.metrics.ready.set(0);
        let _ = self.stop.send(true);
        let mut clean = true;
        for task in self.tasks {
            clean &= task.await.unwrap_or(false);
        }
        self.admin_task.abort();
        clean
    }
}
