//! The PostgreSQL pooler: clients speak the PostgreSQL protocol to a local port and share a
//! small, process-wide set of server connections per configured pool.
//!
//! - `listener`: accepts clients (one socket per worker, like the HTTP listeners).
//! - `client`: one client session (startup, auth, the transaction-mode loop).
//! - `server`: one server connection (connect, authenticate).
//! - `pool`: server connections of one pool, `pool_size` process-wide, health.
//! - `cancel`: sidelight's own BackendKeyData per client; CancelRequests forwarded.
//! - `prepared`: named prepared statements in transaction mode (rewrites, per-connection LRU).
//! - `auth`: client authentication (SCRAM-SHA-256, md5, trust).
//! - `listen`: LISTEN refused in transaction mode; `sql`: a statement's first keyword.
//! - `params`: client startup parameters applied on the server connections they use.
//! - `messages`: framing; `errors`: ErrorResponse with SQLSTATE.
//! - `stream`: the transport (plain TCP or TLS); `tls`: TLS settings and verifiers.

pub mod auth;
pub mod cancel;
pub mod client;
pub mod errors;
pub mod listen;
pub mod listener;
pub mod messages;
pub mod params;
pub mod pool;
pub mod prepared;
pub mod server;
pub mod sql;
pub mod stream;
pub mod tls;

use crate::config::PostgresConfig;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// One connected client's share of `max_client_conn`.
pub struct ClientSlot<'a>(&'a AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every worker's PostgreSQL listeners share: the pools, the users and the metrics.
pub struct PgShared {
    pub pools: HashMap<String, Arc<pool::Pool>>,
    /// Pool names in config order, for `/status`.
    order: Vec<String>,
    pub users: auth::UserDb,
    pub max_message: usize,
    /// `client_login_timeout`; None: off.
    pub login_timeout: Option<Duration>,
    max_client_conn: usize,
    /// Client connections open now, over all listeners and workers.
    clients: AtomicUsize,
    pub metrics: Arc<Metrics>,
    pub cancels: Arc<cancel::Registry>,
    /// Client TLS by listener name.
    pub listener_tls: HashMap<String, tls::ListenerTls>,
}

impl PgShared {
    /// Fails when a certificate, key or CA file cannot be loaded.
    pub fn new(
        config: &PostgresConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<PgShared>, tls::TlsError> {
        let mut listener_tls = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            metrics.pg.init_listener(&l.name);
            let t = tls::listener_tls(l, &format!("postgres.listeners[{i}]"))?;
            listener_tls.insert(l.name.clone(), t);
        }
        let mut pools = HashMap::new();
        for (i, p) in config.pools.iter().enumerate() {
            metrics.pg.init_pool(&p.name);
            let t = tls::server_tls(p, &format!("postgres.pools[{i}]"))?;
            let pool = pool::Pool::new(p, metrics.pg.pool(&p.name), t);
            pools.insert(p.name.clone(), Arc::new(pool));
        }
        Ok(Arc::new(PgShared {
            pools,
            order: config.pools.iter().map(|p| p.name.clone()).collect(),
            users: auth::UserDb::new(&config.users),
            max_message: usize::try_from(config.max_client_message_bytes.0).unwrap_or(usize::MAX),
            login_timeout: Some(config.client_login_timeout).filter(|t| !t.is_zero()),
            max_client_conn: config.max_client_conn,
            clients: AtomicUsize::new(0),
            metrics: metrics.clone(),
            cancels: Arc::new(cancel::Registry::default()),
            listener_tls,
        }))
    }

    /// A place among `max_client_conn` clients, held until the slot is dropped; None when all
    /// are taken.
    pub fn client_slot(&self) -> Option<ClientSlot<'_>> {
        if self.clients.fetch_add(1, Ordering::Relaxed) >= self.max_client_conn {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ClientSlot(&self.clients))
    }

    /// A CancelRequest that arrived on its own connection (no answer goes back, as with
    /// PostgreSQL).
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let outcome = self.cancels.cancel(pid, secret).await;
        if outcome == cancel::Outcome::UnknownKey {
            self.metrics.pg.cancel_unknown_key().inc();
        }
        tracing::debug!(pid, ?outcome, "cancel request");
    }

    /// One task per pool: idle timeouts, lifetimes, `min_idle` and health probes, every second.
    pub fn start_maintenance(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        self.pools
            .values()
            .map(|pool| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        pool.maintain().await;
                    }
                })
            })
            .collect()
    }
}

impl crate::admin::StatusSource for PgShared {
    fn status(&self) -> serde_json::Value {
        let pools: serde_json::Map<String, serde_json::Value> = self
            .order
            .iter()
            .filter_map(|name| Some((name.clone(), self.pools.get(name)?.status())))
            .collect();
        serde_json::Value::Object(pools)
    }

    fn unhealthy(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|name| self.pools.get(*name).is_some_and(|p| !p.healthy()))
            .map(|name| format!("postgres pool {name}"))
            .collect()
    }
}
