//! A pool of server connections for one configured database. `pool_size` is process-wide: a
//! semaphore of that many permits is the right to hold a server connection, and a connection is
//! only opened when no idle one is left, so open connections never exceed it.

use super::prepared::Registry;
use super::server::{Credentials, ServerConn, ServerError};
use super::tls::ServerTls;
use crate::config::{PgPoolConfig, PoolMode};
use crate::metrics::postgres::PoolMetrics;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no server connection available within query_wait_timeout ({0:?})")]
    WaitTimeout(Duration),
    #[error("cannot connect to the server within server_connect_timeout ({0:?})")]
    ConnectTimeout(Duration),
    #[error("cannot connect to the server: {0}")]
    Connect(#[from] ServerError),
}

pub struct Pool {
    pub name: String,
    pub config: PgPoolConfig,
    pub metrics: PoolMetrics,
    servers: Vec<String>,
    tls: ServerTls,
    permits: Arc<Semaphore>,
    idle: Mutex<VecDeque<ServerConn>>,
    /// Open server connections, idle or attached.
    open: AtomicUsize,
    waiting: AtomicUsize,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The server's ParameterStatus values, sent to clients at their startup.
    params: Mutex<Vec<(String, String)>>,
    /// Named prepared statements of this pool's clients, by query text and parameter types.
    pub statements: Registry,
}

/// A server connection attached to a client, with its share of `pool_size`.
pub struct Lease {
    pub conn: ServerConn,
    _permit: OwnedSemaphorePermit,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    pub fn new(config: &PgPoolConfig, metrics: PoolMetrics, tls: ServerTls) -> Pool {
        Pool {
            name: config.name.clone(),
            servers: config.servers.iter().map(|s| s.value.clone()).collect(),
            tls,
            permits: Arc::new(Semaphore::new(config.pool_size)),
            config: config.clone(),
            metrics,
            idle: Mutex::new(VecDeque::new()),
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            params: Mutex::new(Vec::new()),
            statements: Registry::default(),
        }
    }

    pub fn mode(&self) -> PoolMode {
        self.config.pool_mode
    }

    /// Named prepared statements kept per server connection; 0: they pass through untouched.
    pub fn max_prepared_statements(&self) -> usize {
        self.config
            .max_prepared_statements
            .unwrap_or(crate::config::DEFAULT_MAX_PREPARED_STATEMENTS)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn params(&self) -> Vec<(String, String)> {
        lock(&self.params).clone()
    }

    pub fn has_params(&self) -> bool {
        !lock(&self.params).is_empty()
    }

    /// Waits (up to `query_wait_timeout`) for a permit, then takes an idle connection that
    /// passes its checks, or opens one.
    pub async fn acquire(&self) -> Result<Lease, AcquireError> {
        let wait = self.config.query_wait_timeout;
        let start = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let got = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                match got {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed; treat it like a timeout anyway.
                    Ok(Err(_)) | Err(_) => {
                        self.metrics.timeout("query_wait");
                        return Err(AcquireError::WaitTimeout(wait));
                    }
                }
            }
        };
        let conn = self.checkout().await?;
        self.metrics.wait.observe(start.elapsed().as_secs_f64());
        self.metrics.servers[0].inc();
        Ok(Lease {
            conn,
            _permit: permit,
        })
    }

    async fn checkout(&self) -> Result<ServerConn, AcquireError> {
        loop {
            let next = {
                let mut idle = lock(&self.idle);
                // Most recently used first, preferring one this worker's runtime watches.
                let me = std::thread::current().id();
                let at = idle
                    .iter()
                    .rposition(|c| c.home == me)
                    .or_else(|| idle.len().checked_sub(1));
                let c = at.and_then(|i| idle.remove(i));
                self.metrics.servers[1].set(idle.len() as i64);
                c
            };
            let Some(mut conn) = next else {
                return self.open_one().await;
            };
            if conn.looks_closed() {
                self.closed(conn, "server_closed");
                continue;
            }
            if conn.created.elapsed() > self.config.server_lifetime {
                self.closed(conn, "lifetime");
                continue;
            }
            if conn.last_used.elapsed() > self.config.server_check_delay {
                let check =
                    tokio::time::timeout(self.config.server_connect_timeout, conn.simple("")).await;
                if !matches!(check, Ok(Ok(b'I'))) {
                    self.closed(conn, "check_failed");
                    continue;
                }
            }
            return Ok(conn);
        }
    }

    async fn open_one(&self) -> Result<ServerConn, AcquireError> {
        let creds = Credentials {
            user: &self.config.user.value,
            password: &self.config.password.value,
            database: self.config.server_dbname(),
        };
        self.metrics.servers[2].inc();
        let timeout = self.config.server_connect_timeout;
        let result = tokio::time::timeout(
            timeout,
            ServerConn::connect(&self.servers, &creds, &self.tls),
        )
        .await;
        self.metrics.servers[2].dec();
        match result {
            Ok(Ok(conn)) => {
                self.metrics.connect_ok.inc();
                self.metrics
                    .server_tls(if conn.stream.is_tls() { "tls" } else { "plain" });
                self.open.fetch_add(1, Ordering::Relaxed);
                self.set_health(None);
                {
                    let mut params = lock(&self.params);
                    if params.is_empty() {
                        *params = conn.params.clone();
                    }
                }
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.metrics.connect_error.inc();
                match e {
                    ServerError::TlsRefused { .. } => self.metrics.server_tls("refused"),
                    ServerError::Tls { .. } => self.metrics.server_tls("error"),
                    _ => {}
                }
                tracing::warn!(pool = %self.name, error = %e, "server connect failed");
                self.set_health(Some(e.to_string()));
                Err(e.into())
            }
            Err(_) => {
                self.metrics.connect_error.inc();
                self.metrics.timeout("server_connect");
                self.set_health(Some("connect timeout".into()));
                Err(AcquireError::ConnectTimeout(timeout))
            }
        }
    }

    fn set_health(&self, error: Option<String>) {
        let ok = error.is_none();
        self.healthy.store(ok, Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(ok));
        *lock(&self.last_error) = error;
    }

    /// Closes a connection the pool will not use again.
    pub fn closed(&self, conn: ServerConn, reason: &'static str) {
        conn.terminate();
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.disconnect(reason);
        tracing::debug!(pool = %self.name, reason, "server connection closed");
    }

    /// Gives a clean connection back (or closes it past its lifetime); the permit goes after
    /// the connection is idle, so the next waiter finds it.
    pub fn release(&self, lease: Lease) {
        self.metrics.servers[0].dec();
        let Lease { mut conn, _permit } = lease;
        if conn.created.elapsed() > self.config.server_lifetime {
            self.closed(conn, "lifetime");
            return;
        }
        conn.last_used = Instant::now();
        let mut idle = lock(&self.idle);
        idle.push_back(conn);
        self.metrics.servers[1].set(idle.len() as i64);
    }

    /// A connection that cannot be given to anyone else (dirty, broken, timed out).
    pub fn discard(&self, lease: Lease, reason: &'static str) {
        self.metrics.servers[0].dec();
        let Lease { conn, _permit } = lease;
        self.closed(conn, reason);
    }

    /// Closes idle connections past `server_idle_timeout` (down to `min_idle`), past their
    /// lifetime or closed by the server, then opens connections up to `min_idle`.
    pub async fn maintain(&self) {
        let mut expired = Vec::new();
        {
            let mut idle = lock(&self.idle);
            let mut keep = VecDeque::with_capacity(idle.len());
            // Oldest first: those are the ones past the idle timeout.
            while let Some(conn) = idle.pop_front() {
                let reason = if conn.looks_closed() {
                    Some("server_closed")
                } else if conn.created.elapsed() > self.config.server_lifetime {
                    Some("lifetime")
                } else if conn.last_used.elapsed() > self.config.server_idle_timeout
                    && idle.len() + keep.len() >= self.config.min_idle
                {
                    Some("idle_timeout")
                } else {
                    None
                };
                match reason {
                    Some(r) => expired.push((conn, r)),
                    None => keep.push_back(conn),
                }
            }
            *idle = keep;
            self.metrics.servers[1].set(idle.len() as i64);
        }
        for (conn, reason) in expired {
            self.closed(conn, reason);
        }
        while lock(&self.idle).len() < self.config.min_idle {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                break;
            };
            match self.open_one().await {
                Ok(conn) => {
                    self.metrics.servers[0].inc();
                    self.release(Lease {
                        conn,
                        _permit: permit,
                    });
                }
                Err(_) => break,
            }
        }
        if !self.healthy() && lock(&self.idle).is_empty() {
            // Probe a failed server so health comes back without waiting for a client.
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                if let Ok(conn) = self.open_one().await {
                    self.metrics.servers[0].inc();
                    self.release(Lease {
                        conn,
                        _permit: permit,
                    });
                }
            }
        }
    }

    /// Like PgBouncer's `SHOW POOLS`.
    pub fn status(&self) -> serde_json::Value {
        let idle = lock(&self.idle).len();
        let m = &self.metrics;
        serde_json::json!({
            "pool_mode": match self.config.pool_mode { PoolMode::Transaction => "transaction", PoolMode::Session => "session" },
            "pool_size": self.config.pool_size,
            "cl_active": m.clients[0].get(),
            "cl_waiting": m.clients[1].get(),
            "cl_idle": m.clients[2].get(),
            "sv_active": m.servers[0].get(),
            "sv_idle": idle,
            "sv_connecting": m.servers[2].get(),
            "sv_open": self.open.load(Ordering::Relaxed),
            "waiting": self.waiting.load(Ordering::Relaxed),
            "healthy": self.healthy(),
            "last_error": lock(&self.last_error).clone(),
            "max_prepared_statements": self.max_prepared_statements(),
            "prepared_statements": self.statements.len(),
        })
    }
}
