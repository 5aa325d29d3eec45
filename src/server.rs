//! Starting and stopping a whole sidelight: build the stacks, bind every listener, serve, and
//! drain on request. `main` and the integration tests both use this.
//!
//! Threading follows nginx and Envoy: `runtime.workers` threads, each with its own
//! single-threaded tokio runtime, its own `SO_REUSEPORT` socket per listener (the kernel spreads
//! connections across them) and its own upstream pools. A request never changes threads, so
//! there are no cross-thread wake-ups on the hot path. Worker 0 runs on the caller's runtime,
//! which also serves the admin port. Metrics and the in-flight limit are shared.

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::postgres::PgShared;
use crate::proxy::entry::Entry;
use crate::proxy::listener::{self, ListenerTask};
use crate::stack::{self, SharedState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
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
    #[error("postgres TLS: {0}")]
    PgTls(#[from] crate::postgres::tls::TlsError),
    #[error("cannot start worker thread: {0}")]
    Worker(std::io::Error),
}

pub struct Sidelight;

/// A started sidelight.
pub struct Running {
    /// Bound addresses, in the config's listener order (useful when the config says port 0).
    pub listeners: Vec<SocketAddr>,
    /// Bound PostgreSQL listener addresses, in `postgres.listeners` order.
    pub pg_listeners: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// How many worker threads serve the listeners.
    pub workers: usize,
    ready: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    /// The admin port outlives the drain; dropping this stops it.
    _admin_stop: watch::Sender<()>,
    /// Worker 0's listener tasks, on the caller's runtime.
    tasks: Vec<JoinHandle<bool>>,
    /// The other workers report whether they drained cleanly.
    worker_done: Vec<oneshot::Receiver<bool>>,
    admin_task: JoinHandle<()>,
    /// Active health check probes, stopped with the admin port.
    health_tasks: Vec<JoinHandle<()>>,
}

/// Who may share a port: this process's workers (each with its own `SO_REUSEPORT` socket, so
/// the kernel spreads connections), or nobody.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortUse {
    /// The first socket of a port the workers share: the port must be free of other
    /// processes, as nginx without `reuseport` and PgBouncer without `so_reuseport` require.
    FirstOfWorkers,
    /// Another worker's socket on a port [`PortUse::FirstOfWorkers`] took.
    JoinWorkers,
    Exclusive,
}

/// Binds `addr` as `port_use` says: with `SO_REUSEPORT` for the workers' sockets, so each
/// worker can have its own socket on the same port.
fn bind(field: &str, addr: SocketAddr, port_use: PortUse) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind {
        field: field.to_string(),
        addr,
        source,
    };
    let socket = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        socket.set_reuseaddr(true)?;
        Ok::<_, std::io::Error>(socket)
    };
    if port_use == PortUse::FirstOfWorkers && addr.port() != 0 {
        // Every socket with SO_REUSEPORT may join a port another process holds the same way
        // (a second sidelight would silently take half the connections); a plain bind fails
        // there with "address in use". The probe is closed before the real sockets bind.
        socket().and_then(|probe| probe.bind(addr)).map_err(err)?;
    }
    let socket = socket().map_err(err)?;
    #[cfg(unix)]
    if port_use != PortUse::Exclusive {
        socket.set_reuseport(true).map_err(err)?;
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// Binds `addr` once per worker (`sockets[w]` gets worker w's socket); returns the bound address.
fn bind_for_workers(
    field: &str,
    addr: SocketAddr,
    sockets: &mut [Vec<TcpListener>],
) -> Result<SocketAddr, StartError> {
    let first = bind(field, addr, PortUse::FirstOfWorkers)?;
    // With port 0 the first socket picks the port; the others join it.
    let bound = local_addr(field, &first, addr)?;
    let mut workers = sockets.iter_mut();
    if let Some(worker) = workers.next() {
        worker.push(first);
    }
    for worker in workers {
        worker.push(bind(field, bound, PortUse::JoinWorkers)?);
    }
    Ok(bound)
}

fn local_addr(
    field: &str,
    listener: &TcpListener,
    configured: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        field: field.to_string(),
        addr: configured,
        source,
    })
}

/// Serves one worker's sockets until `stop`; true if every connection drained in time.
async fn serve_worker(
    config: Arc<Config>,
    entry: Entry,
    sockets: Vec<TcpListener>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
    pg: (Arc<PgShared>, Vec<TcpListener>),
) -> bool {
    let mut tasks = Vec::new();
    let (pg_shared, pg_sockets) = pg;
    for (l, socket) in config.postgres.listeners.iter().zip(pg_sockets) {
        tasks.push(tokio::spawn(crate::postgres::listener::serve(
            l.name.as_str().into(),
            socket,
            pg_shared.clone(),
            stop.clone(),
            config.shutdown.drain_timeout,
        )));
    }
    for (index, (l, listener)) in config.listeners.iter().zip(sockets).enumerate() {
        let task = ListenerTask {
            name: l.name.clone(),
            index,
            listener,
            entry: entry.clone(),
            metrics: metrics.clone(),
            header_read_timeout: config.limits.header_read_timeout,
            max_connections: config.limits.max_client_connections,
            client_body_timeout: config.limits.client_body_timeout,
        };
        tasks.push(tokio::spawn(listener::serve(
            task,
            stop.clone(),
            config.shutdown.drain_timeout,
        )));
    }
    let mut clean = true;
    for task in tasks {
        clean &= task.await.unwrap_or(false);
    }
    clean
}

impl Sidelight {
    pub async fn start(config: Config) -> Result<Running, StartError> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let workers = config.runtime.effective_workers();
        let shared = SharedState::new(&config, &metrics);
        let entry = stack::entry(&config, &metrics, &shared)?;

        // Bind every socket before serving any, so a taken port fails the start cleanly.
        let mut listeners = Vec::new();
        let mut sockets: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, l) in config.listeners.iter().enumerate() {
            let field = format!("listeners[{i}].address");
            listeners.push(bind_for_workers(&field, l.address, &mut sockets)?);
            metrics.listeners.listener(&l.name);
        }
        let mut pg_listeners = Vec::new();
        let mut pg_sockets: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, l) in config.postgres.listeners.iter().enumerate() {
            let field = format!("postgres.listeners[{i}].address");
            pg_listeners.push(bind_for_workers(&field, l.address, &mut pg_sockets)?);
        }
        let pg_shared = PgShared::new(&config.postgres, &metrics)?;
        let admin_listener = bind("admin.address", config.admin.address, PortUse::Exclusive)?;
        let admin_addr = local_addr("admin.address", &admin_listener, config.admin.address)?;
        // After every bind: a start that fails leaves no probe running.
        let mut health_tasks = crate::health::start(&config, &metrics, &shared.balancers())?;
        health_tasks.extend(pg_shared.start_maintenance());

        let (stop, stop_rx) = watch::channel(false);
        let mut sockets = sockets.into_iter();
        let own = sockets.next().unwrap_or_default();
        let mut pg_sockets = pg_sockets.into_iter();
        let pg_own = pg_sockets.next().unwrap_or_default();
        let mut worker_done = Vec::new();
        for (n, (worker_sockets, worker_pg)) in sockets.zip(pg_sockets).enumerate() {
            // Sockets must be registered with the runtime that polls them: hand them over as std.
            let std_sockets = worker_sockets
                .into_iter()
                .map(|s| s.into_std())
                .collect::<Result<Vec<_>, _>>()
                .map_err(StartError::Worker)?;
            let std_pg = worker_pg
                .into_iter()
                .map(|s| s.into_std())
                .collect::<Result<Vec<_>, _>>()
                .map_err(StartError::Worker)?;
            let pg_shared = pg_shared.clone();
            let (done_tx, done_rx) = oneshot::channel();
            let (config, metrics, stop_rx, shared) = (
                config.clone(),
                metrics.clone(),
                stop_rx.clone(),
                shared.clone(),
            );
            std::thread::Builder::new()
                .name(format!("sidelight-worker-{}", n + 1))
                .spawn(move || {
                    let clean = run_worker(
                        config,
                        metrics,
                        (std_sockets, std_pg),
                        stop_rx,
                        shared,
                        pg_shared,
                    );
                    let _ = done_tx.send(clean);
                })
                .map_err(StartError::Worker)?;
            worker_done.push(done_rx);
        }
        let tasks = vec![tokio::spawn(serve_worker(
            config.clone(),
            entry,
            own,
            metrics.clone(),
            stop_rx,
            (pg_shared.clone(), pg_own),
        ))];
        for (l, addr) in config.postgres.listeners.iter().zip(&pg_listeners) {
            tracing::info!(listener = %l.name, address = %addr, workers, "postgres listening");
        }
        for (l, addr) in config.listeners.iter().zip(&listeners) {
            tracing::info!(listener = %l.name, address = %addr, workers, "listening");
        }

        let ready = Arc::new(AtomicBool::new(true));
        metrics.ready.set(1);
        let state = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            config_yaml: config.redacted_yaml(),
            token: config.admin.token().map(str::to_string),
            cache: shared.cache.clone(),
            cache_max_bytes: config.cache.max_bytes.0,
            routes: config
                .routes
                .iter()
                .map(|r| (r.name.clone(), r.upstream.clone()))
                .collect(),
            balancers: config
                .upstreams
                .iter()
                .filter_map(|u| {
                    Some((
                        u.name.clone(),
                        shared.upstreams.get(&u.name)?.balancer.clone(),
                    ))
                })
                .collect(),
            sources: if config.postgres.pools.is_empty() {
                Vec::new()
            } else {
                vec![(
                    "postgres",
                    pg_shared.clone() as Arc<dyn admin::StatusSource>,
                )]
            },
        });
        if state.token.is_none() && !admin_addr.ip().is_loopback() {
            tracing::warn!(address = %admin_addr, "the admin port is not on loopback and admin.token is not set: anyone who can reach it can read /config and /status and purge the cache");
        }
        let (admin_stop, admin_stop_rx) = watch::channel(());
        let admin_task = tokio::spawn(admin::serve(admin_listener, state, admin_stop_rx));
        tracing::info!(address = %admin_addr, "admin listening");
        Ok(Running {
            listeners,
            pg_listeners,
            admin: admin_addr,
            metrics,
            workers,
            ready,
            stop,
            _admin_stop: admin_stop,
            tasks,
            worker_done,
            admin_task,
            health_tasks,
        })
    }
}

/// The body of worker threads 1..N: a single-threaded runtime with its own stacks and pools.
fn run_worker(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    (sockets, pg_sockets): (Vec<std::net::TcpListener>, Vec<std::net::TcpListener>),
    stop: watch::Receiver<bool>,
    shared: SharedState,
    pg_shared: Arc<PgShared>,
) -> bool {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot start its runtime");
            return false;
        }
    };
    runtime.block_on(async move {
        // Worker 0 built the same stacks from the same config already, so this succeeds.
        let entry = match stack::entry(&config, &metrics, &shared) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot build its stacks");
                return false;
            }
        };
        let mut listeners = Vec::new();
        let mut pg_listeners = Vec::new();
        for (socket, pg) in sockets
            .into_iter()
            .map(|s| (s, false))
            .chain(pg_sockets.into_iter().map(|s| (s, true)))
        {
            match TcpListener::from_std(socket) {
                Ok(l) if pg => pg_listeners.push(l),
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::error!(error = %e, "worker cannot register its socket");
                    return false;
                }
            }
        }
        serve_worker(
            config,
            entry,
            listeners,
            metrics,
            stop,
            (pg_shared, pg_listeners),
        )
        .await
    })
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
        for done in self.worker_done {
            clean &= done.await.unwrap_or(false);
        }
        self.admin_task.abort();
        for task in self.health_tasks {
            task.abort();
        }
        clean
    }
}
