//! The PostgreSQL pooler's metric family, `sidelight_pg_*`. Labels: `pool` (configured pool
//! names), `listener` (configured listener names) and closed sets defined here.

use super::{counter, gauge, histogram};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

/// Waiting for a server connection: from microseconds (an idle one) to the wait timeout.
pub const PG_WAIT_BUCKETS: &[f64] = &[
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];
/// Queries: sub-millisecond point reads to minutes-long reports.
pub const PG_QUERY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

pub const PG_CLIENT_STATES: [&str; 3] = ["active", "waiting", "idle"];
pub const PG_SERVER_STATES: [&str; 3] = ["active", "idle", "connecting"];
/// Why a server connection was closed.
pub const PG_DISCONNECT_REASONS: [&str; 7] = [
    "idle_timeout",
    "lifetime",
    "server_closed",
    "check_failed",
    "client_gone",
    "timeout",
    "error",
];
pub const PG_TIMEOUT_KINDS: [&str; 4] =
    ["query_wait", "query", "idle_transaction", "server_connect"];
/// Why a client was ended for its input.
pub const PG_PROTOCOL_ERROR_KINDS: [&str; 5] = [
    "malformed",
    "oversized",
    "unknown_message",
    "startup",
    "login_timeout",
];
/// SQLSTATE classes are two characters from a fixed alphabet; anything else counts as `other`.
/// How a client connection ended up: tls (handshake done), plain, rejected (a plain client
/// refused by `client_tls_sslmode: require`), error (the handshake failed).
pub const PG_CLIENT_TLS_RESULTS: [&str; 4] = ["tls", "plain", "rejected", "error"];
/// How a server connection attempt ended up: tls, plain (`disable`, or `prefer` and the server
/// answered `N`), refused (the server answered `N` to a mode that requires TLS), error (the
/// handshake or the certificate check failed).
pub const PG_SERVER_TLS_RESULTS: [&str; 4] = ["tls", "plain", "refused", "error"];
pub const PG_AUTH_METHODS: [&str; 3] = ["scram-sha-256", "md5", "trust"];
/// What became of a client's CancelRequest; `unknown_key` has `pool=""` (the key names no client).
pub const PG_CANCEL_RESULTS: [&str; 4] = ["forwarded", "no_server", "error", "unknown_key"];

pub struct PgMetrics {
    pub client_connections: IntGaugeVec,
    pub clients_accepted: IntCounterVec,
    pub clients_refused: IntCounterVec,
    pub server_connections: IntGaugeVec,
    pub wait: HistogramVec,
    pub transaction_duration: HistogramVec,
    pub query_duration: HistogramVec,
    pub transactions: IntCounterVec,
    pub queries: IntCounterVec,
    pub errors: IntCounterVec,
    pub bytes: IntCounterVec,
    pub server_connects: IntCounterVec,
    pub server_disconnects: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub timeouts: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    pub pool_healthy: IntGaugeVec,
    pub cancel_requests: IntCounterVec,
    pub copy_bytes: IntCounterVec,
    pub prepared_client_parses: IntCounterVec,
    pub prepared_server_parses: IntCounterVec,
    pub prepared_cache_hits: IntCounterVec,
    pub prepared_cache_evictions: IntCounterVec,
    pub client_tls: IntCounterVec,
    pub server_tls: IntCounterVec,
}

impl PgMetrics {
    pub(super) fn new(r: &Registry) -> PgMetrics {
        PgMetrics {
            client_connections: gauge(r, "sidelight_pg_client_connections", "PostgreSQL client connections, by state: active (holding a server connection), waiting (for one), idle.", &["pool", "state"]),
            clients_accepted: counter(r, "sidelight_pg_client_connections_total", "PostgreSQL client connections accepted, by listener.", &["listener"]),
            clients_refused: counter(r, "sidelight_pg_client_connections_refused_total", "PostgreSQL clients refused with FATAL 53300 because postgres.max_client_conn clients were connected.", &["listener"]),
            server_connections: gauge(r, "sidelight_pg_server_connections", "Server connections, by state: active (attached to a client), idle (in the pool), connecting.", &["pool", "state"]),
            wait: histogram(r, "sidelight_pg_wait_seconds", "Time a client waited for a server connection.", &["pool"], PG_WAIT_BUCKETS),
            transaction_duration: histogram(r, "sidelight_pg_transaction_duration_seconds", "Time from a transaction's first request to the server reporting idle again.", &["pool"], PG_QUERY_BUCKETS),
            query_duration: histogram(r, "sidelight_pg_query_duration_seconds", "Time from a request (simple Query or extended-protocol Sync) to its ReadyForQuery.", &["pool"], PG_QUERY_BUCKETS),
            transactions: counter(r, "sidelight_pg_transactions_total", "Transactions completed (server back to idle).", &["pool"]),
            queries: counter(r, "sidelight_pg_queries_total", "Requests answered (simple Query or extended-protocol Sync).", &["pool"]),
            errors: counter(r, "sidelight_pg_errors_total", "ErrorResponses sent to clients, by SQLSTATE class (first two characters).", &["pool", "class"]),
            bytes: counter(r, "sidelight_pg_bytes_total", "Protocol bytes, by direction: in (from clients), out (to clients).", &["pool", "direction"]),
            server_connects: counter(r, "sidelight_pg_server_connects_total", "Server connection attempts, by result: ok or error.", &["pool", "result"]),
            server_disconnects: counter(r, "sidelight_pg_server_disconnects_total", "Server connections closed, by reason.", &["pool", "reason"]),
            auth_failures: counter(r, "sidelight_pg_auth_failures_total", "Client authentications refused, by method.", &["pool", "method"]),
            timeouts: counter(r, "sidelight_pg_timeouts_total", "PostgreSQL timeouts hit, by kind: query_wait, query, idle_transaction, server_connect.", &["pool", "kind"]),
            protocol_errors: counter(r, "sidelight_pg_protocol_errors_total", "PostgreSQL clients ended for bad input, by kind.", &["listener", "kind"]),
            pool_healthy: gauge(r, "sidelight_pg_pool_healthy", "1 when the pool's server accepts connections (last attempt succeeded), else 0.", &["pool"]),
            cancel_requests: counter(r, "sidelight_pg_cancel_requests_total", "Client CancelRequests, by result: forwarded (to the server connection running the client's query), no_server (the client held none), error (server unreachable), unknown_key (pool=\"\").", &["pool", "result"]),
            copy_bytes: counter(r, "sidelight_pg_copy_bytes_total", "COPY data (CopyData payload bytes), by direction: in (COPY FROM STDIN, client to server), out (COPY TO STDOUT).", &["pool", "direction"]),
            prepared_client_parses: counter(r, "sidelight_pg_prepared_client_parses_total", "Named Parse messages from clients (transaction mode).", &["pool"]),
            prepared_server_parses: counter(r, "sidelight_pg_prepared_server_parses_total", "Parse messages sidelight sent to servers for named statements (prepares actually run).", &["pool"]),
            prepared_cache_hits: counter(r, "sidelight_pg_prepared_cache_hits_total", "Named statements a client's Parse, Bind or Describe found already prepared on its server connection.", &["pool"]),
            prepared_cache_evictions: counter(r, "sidelight_pg_prepared_cache_evictions_total", "Named statements closed on a server connection to stay within max_prepared_statements.", &["pool"]),
            client_tls: counter(r, "sidelight_pg_client_tls_total", "PostgreSQL client connections past SSLRequest negotiation, by result: tls, plain, rejected (plain refused by client_tls_sslmode: require), error (handshake failed).", &["listener", "result"]),
            server_tls: counter(r, "sidelight_pg_server_tls_total", "Server connection attempts past TLS negotiation, by result: tls, plain, refused (server without TLS, sslmode requires it), error (handshake or certificate check failed).", &["pool", "result"]),
        }
    }

    /// Creates every series of a pool up front, so dashboards see zeros before the first event.
    pub fn init_pool(&self, pool: &str) {
        for s in PG_CLIENT_STATES {
            self.client_connections.with_label_values(&[pool, s]);
        }
        for s in PG_SERVER_STATES {
            self.server_connections.with_label_values(&[pool, s]);
        }
        self.wait.with_label_values(&[pool]);
        self.transaction_duration.with_label_values(&[pool]);
        self.query_duration.with_label_values(&[pool]);
        self.transactions.with_label_values(&[pool]);
        self.queries.with_label_values(&[pool]);
        for d in ["in", "out"] {
            self.bytes.with_label_values(&[pool, d]);
        }
        for r in ["ok", "error"] {
            self.server_connects.with_label_values(&[pool, r]);
        }
        for r in PG_DISCONNECT_REASONS {
            self.server_disconnects.with_label_values(&[pool, r]);
        }
        for m in PG_AUTH_METHODS {
            self.auth_failures.with_label_values(&[pool, m]);
        }
        for k in PG_TIMEOUT_KINDS {
            self.timeouts.with_label_values(&[pool, k]);
        }
        self.pool_healthy.with_label_values(&[pool]).set(1);
        for r in PG_CANCEL_RESULTS {
            if r != "unknown_key" {
                self.cancel_requests.with_label_values(&[pool, r]);
            }
        }
        for d in ["in", "out"] {
            self.copy_bytes.with_label_values(&[pool, d]);
        }
        for c in [
            &self.prepared_client_parses,
            &self.prepared_server_parses,
            &self.prepared_cache_hits,
            &self.prepared_cache_evictions,
        ] {
            c.with_label_values(&[pool]);
        }
        for r in PG_SERVER_TLS_RESULTS {
            self.server_tls.with_label_values(&[pool, r]);
        }
    }

    /// A CancelRequest whose key names no live client.
    pub fn cancel_unknown_key(&self) -> IntCounter {
        self.cancel_requests.with_label_values(&["", "unknown_key"])
    }

    pub fn init_listener(&self, listener: &str) {
        self.cancel_unknown_key();
        self.clients_accepted.with_label_values(&[listener]);
        self.clients_refused.with_label_values(&[listener]);
        for k in PG_PROTOCOL_ERROR_KINDS {
            self.protocol_errors.with_label_values(&[listener, k]);
        }
        for r in PG_CLIENT_TLS_RESULTS {
            self.client_tls.with_label_values(&[listener, r]);
        }
    }

    /// The children a client session touches per message, resolved once per pool.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let state = |s| self.client_connections.with_label_values(&[pool, s]);
        let server = |s| self.server_connections.with_label_values(&[pool, s]);
        PoolMetrics {
            clients: [state("active"), state("waiting"), state("idle")],
            servers: [server("active"), server("idle"), server("connecting")],
            wait: self.wait.with_label_values(&[pool]),
            transaction: self.transaction_duration.with_label_values(&[pool]),
            query: self.query_duration.with_label_values(&[pool]),
            transactions: self.transactions.with_label_values(&[pool]),
            queries: self.queries.with_label_values(&[pool]),
            bytes_in: self.bytes.with_label_values(&[pool, "in"]),
            bytes_out: self.bytes.with_label_values(&[pool, "out"]),
            connect_ok: self.server_connects.with_label_values(&[pool, "ok"]),
            connect_error: self.server_connects.with_label_values(&[pool, "error"]),
            healthy: self.pool_healthy.with_label_values(&[pool]),
            cancel_forwarded: self.cancel_requests.with_label_values(&[pool, "forwarded"]),
            cancel_no_server: self.cancel_requests.with_label_values(&[pool, "no_server"]),
            cancel_error: self.cancel_requests.with_label_values(&[pool, "error"]),
            copy_in: self.copy_bytes.with_label_values(&[pool, "in"]),
            copy_out: self.copy_bytes.with_label_values(&[pool, "out"]),
            ps_client_parses: self.prepared_client_parses.with_label_values(&[pool]),
            ps_server_parses: self.prepared_server_parses.with_label_values(&[pool]),
            ps_hits: self.prepared_cache_hits.with_label_values(&[pool]),
            ps_evictions: self.prepared_cache_evictions.with_label_values(&[pool]),
            errors: self.errors.clone(),
            disconnects: self.server_disconnects.clone(),
            auth_failures: self.auth_failures.clone(),
            timeouts: self.timeouts.clone(),
            server_tls: self.server_tls.clone(),
            pool: pool.to_string(),
        }
    }
}

/// One pool's series.
pub struct PoolMetrics {
    /// active, waiting, idle
    pub clients: [IntGauge; 3],
    /// active, idle, connecting
    pub servers: [IntGauge; 3],
    pub wait: Histogram,
    pub transaction: Histogram,
    pub query: Histogram,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub connect_ok: IntCounter,
    pub connect_error: IntCounter,
    pub healthy: IntGauge,
    pub cancel_forwarded: IntCounter,
    pub cancel_no_server: IntCounter,
    pub cancel_error: IntCounter,
    pub copy_in: IntCounter,
    pub copy_out: IntCounter,
    pub ps_client_parses: IntCounter,
    pub ps_server_parses: IntCounter,
    pub ps_hits: IntCounter,
    pub ps_evictions: IntCounter,
    errors: IntCounterVec,
    disconnects: IntCounterVec,
    auth_failures: IntCounterVec,
    timeouts: IntCounterVec,
    server_tls: IntCounterVec,
    pool: String,
}

impl PoolMetrics {
    /// Counts an ErrorResponse by its SQLSTATE class.
    pub fn error(&self, sqlstate: &[u8]) {
        let class = match sqlstate {
            [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => {
                [a.to_ascii_uppercase(), b.to_ascii_uppercase()]
            }
            _ => *b"??",
        };
        let class = std::str::from_utf8(&class).unwrap_or("??");
        let class = if class == "??" { "other" } else { class };
        self.errors.with_label_values(&[&self.pool, class]).inc();
    }
    pub fn disconnect(&self, reason: &'static str) {
        self.disconnects
            .with_label_values(&[&self.pool, reason])
            .inc();
    }
    pub fn auth_failure(&self, method: &'static str) {
        self.auth_failures
            .with_label_values(&[&self.pool, method])
            .inc();
    }
    /// One of `PG_SERVER_TLS_RESULTS`.
    pub fn server_tls(&self, result: &'static str) {
        self.server_tls
            .with_label_values(&[&self.pool, result])
            .inc();
    }
    pub fn timeout(&self, kind: &'static str) {
        self.timeouts.with_label_values(&[&self.pool, kind]).inc();
    }
}
