//! The `postgres:` section: the PostgreSQL pooler's listeners, client users and pools. Names
//! follow PgBouncer where a user would look for them (`pool_mode`, `pool_size`,
//! `query_wait_timeout`, `server_lifetime`, ...). Validated here, by field path.

use super::{ByteSize, EnvString, FieldError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Where clients connect with the PostgreSQL protocol (none: the pooler is off).
    #[serde(default)]
    pub listeners: Vec<PgListenerConfig>,
    /// The users clients authenticate as (user name and password, `${VARS}` allowed).
    #[serde(default)]
    pub users: Vec<PgUserConfig>,
    /// Client messages larger than this end that client with a protocol error.
    #[serde(default = "default_max_message")]
    pub max_client_message_bytes: ByteSize,
    /// PostgreSQL client connections open at once, over all listeners (PgBouncer's name); past
    /// it a new client gets FATAL 53300 after its startup packet.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// A client that has not finished its startup (TLS, StartupMessage, authentication) this
    /// long after connecting is disconnected (PgBouncer's name and default); 0s: off.
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Named prepared statements kept per server connection in transaction mode (PgBouncer's
    /// name and default); 0: named Parse/Bind pass through untouched. Pools may override it.
    #[serde(default = "default_max_prepared")]
    pub max_prepared_statements: usize,
    /// Pools by the database name clients connect with.
    #[serde(default)]
    pub pools: Vec<PgPoolConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgListenerConfig {
    #[serde(default = "default_pg_listener_name")]
    pub name: String,
    pub address: SocketAddr,
    /// PEM certificate chain for client TLS (with `client_tls_key_file`).
    #[serde(default)]
    pub client_tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_tls_key_file: Option<PathBuf>,
    /// Default: `prefer` when a certificate is set, else `disable`.
    #[serde(default)]
    pub client_tls_sslmode: Option<ClientSslMode>,
}

impl PgListenerConfig {
    pub fn client_sslmode(&self) -> ClientSslMode {
        match (self.client_tls_sslmode, &self.client_tls_cert_file) {
            (Some(m), _) => m,
            (None, Some(_)) => ClientSslMode::Prefer,
            (None, None) => ClientSslMode::Disable,
        }
    }
}

/// How a listener answers clients' SSLRequest.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientSslMode {
    /// SSLRequest is answered `N`: plain connections only.
    Disable,
    /// TLS for clients that ask, plain for the others.
    Prefer,
    /// Plain clients are refused with `FATAL 28000 SSL required`.
    Require,
}

/// How sidelight secures its server connections, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plain TCP; no SSLRequest.
    Disable,
    /// TLS when the server offers it (not verified), plain when it answers `N`.
    Prefer,
    /// TLS or fail; the certificate is not verified (libpq's `require`).
    Require,
    /// TLS, the certificate chain verified against `server_tls_ca_file`, any host name.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the server's host (or IP address).
    VerifyFull,
}

impl ServerSslMode {
    pub fn verifies(self) -> bool {
        matches!(self, ServerSslMode::VerifyCa | ServerSslMode::VerifyFull)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgUserConfig {
    pub name: String,
    /// Plain text (needed for md5), or a `SCRAM-SHA-256$...` verifier as in `pg_authid`
    /// (scram-sha-256 only). Never shown by `/config` unless written as `${VAR}`.
    pub password: EnvString,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per transaction (the default).
    Transaction,
    /// A server connection per client connection, reset with `DISCARD ALL` before reuse.
    Session,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// No password asked: local development only.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PgPoolConfig {
    /// The database name clients connect with.
    pub name: String,
    /// Server addresses (`host:port`), tried in order.
    pub servers: Vec<EnvString>,
    /// The server database (default: the pool name).
    #[serde(default)]
    pub dbname: Option<String>,
    /// Server credentials; `${VARS}` allowed.
    pub user: EnvString,
    #[serde(default = "empty_password")]
    pub password: EnvString,
    /// How clients of this pool authenticate.
    #[serde(default = "default_auth_type")]
    pub auth_type: AuthType,
    #[serde(default = "default_pool_mode", alias = "mode")]
    pub pool_mode: PoolMode,
    /// Most server connections open at once, across all workers.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Idle server connections kept open (and opened ahead of demand).
    #[serde(default)]
    pub min_idle: usize,
    /// A client waiting longer than this for a server connection gets SQLSTATE 53300.
    #[serde(default = "default_query_wait", with = "humantime_serde")]
    pub query_wait_timeout: Duration,
    /// A request (query or sync) unanswered for this long is cancelled like statement_timeout
    /// (ERROR 57014, the session goes on); if the server does not answer the cancel within 3 s
    /// its connection is closed and the client gets FATAL 57014. 0s: off.
    #[serde(default, with = "humantime_serde")]
    pub query_timeout: Duration,
    /// A client idle inside a transaction for this long is ended with 25P03; 0s: off.
    #[serde(default, with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// Idle server connections past this are closed (down to `min_idle`).
    #[serde(default = "default_server_idle", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Server connections older than this are closed when next released.
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// A connection idle longer than this is checked with an empty query before reuse.
    #[serde(default = "default_check_delay", with = "humantime_serde")]
    pub server_check_delay: Duration,
    /// This pool's `max_prepared_statements` (default: the `postgres:` section's).
    #[serde(default)]
    pub max_prepared_statements: Option<usize>,
    #[serde(default = "default_server_sslmode")]
    pub server_tls_sslmode: ServerSslMode,
    /// PEM CA certificates for `verify-ca` and `verify-full` (required by them).
    #[serde(default)]
    pub server_tls_ca_file: Option<PathBuf>,
}

impl PgPoolConfig {
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            listeners: Vec::new(),
            users: Vec::new(),
            max_client_message_bytes: default_max_message(),
            client_login_timeout: default_login_timeout(),
            max_client_conn: default_max_client_conn(),
            max_prepared_statements: default_max_prepared(),
            pools: Vec::new(),
        }
    }
}

/// The HTTP side's `limits.max_client_connections` default: a sidecar serves one app, whose
/// worker processes may each keep a pool of their own (PgBouncer's 100 is too few for that).
fn default_max_client_conn() -> usize {
    10_000
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_message() -> ByteSize {
    ByteSize::mib(64)
}
/// PgBouncer 1.22+'s default.
pub const DEFAULT_MAX_PREPARED_STATEMENTS: usize = 200;
/// Each is a few hundred bytes per server connection at least; past this, a typo.
const MAX_PREPARED_STATEMENTS: usize = 100_000;
fn default_max_prepared() -> usize {
    DEFAULT_MAX_PREPARED_STATEMENTS
}
fn default_pg_listener_name() -> String {
    "postgres".into()
}
fn empty_password() -> EnvString {
    EnvString::literal("")
}
fn default_auth_type() -> AuthType {
    AuthType::ScramSha256
}
fn default_pool_mode() -> PoolMode {
    PoolMode::Transaction
}
fn default_pool_size() -> usize {
    20
}
fn default_query_wait() -> Duration {
    Duration::from_secs(120)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_server_idle() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_check_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_server_sslmode() -> ServerSslMode {
    ServerSslMode::Prefer
}

impl PostgresConfig {
    /// Checks and expands `${VARS}`; every problem by its path under `postgres`.
    pub fn validate(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        http_addrs: &[SocketAddr],
    ) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut add = |path: String, msg: String| errs.push(FieldError::new(path, msg));
        if self.max_client_conn == 0 {
            add(
                "postgres.max_client_conn".to_string(),
                "must be at least 1".to_string(),
            );
        }
        let mut names = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !names.insert(l.name.clone()) {
                add(
                    format!("postgres.listeners[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            if l.address.port() != 0 && http_addrs.contains(&l.address) {
                add(
                    format!("postgres.listeners[{i}].address"),
                    format!("{} is also an HTTP listener", l.address),
                );
            }
            let at = format!("postgres.listeners[{i}]");
            let (cert, key) = (&l.client_tls_cert_file, &l.client_tls_key_file);
            match (cert, key) {
                (Some(c), Some(k)) => {
                    check_pem(
                        &mut add,
                        format!("{at}.client_tls_cert_file"),
                        c,
                        "CERTIFICATE",
                    );
                    check_pem(
                        &mut add,
                        format!("{at}.client_tls_key_file"),
                        k,
                        "PRIVATE KEY",
                    );
                }
                (Some(_), None) => add(
                    format!("{at}.client_tls_key_file"),
                    "required with client_tls_cert_file".into(),
                ),
                (None, Some(_)) => add(
                    format!("{at}.client_tls_cert_file"),
                    "required with client_tls_key_file".into(),
                ),
                (None, None) => {
                    if l.client_sslmode() != ClientSslMode::Disable {
                        add(
                            format!("{at}.client_tls_sslmode"),
                            "needs client_tls_cert_file and client_tls_key_file".into(),
                        );
                    }
                }
            }
        }
        let mut users = HashSet::new();
        for (i, u) in self.users.iter_mut().enumerate() {
            if u.name.is_empty() {
                add(
                    format!("postgres.users[{i}].name"),
                    "must not be empty".into(),
                );
            } else if !users.insert(u.name.clone()) {
                add(
                    format!("postgres.users[{i}].name"),
                    format!("duplicate user {:?}", u.name),
                );
            }
            if let Err(e) = u.password.expand(env) {
                add(format!("postgres.users[{i}].password"), e);
            }
        }
        if self.max_client_message_bytes.0 < 1024 {
            add(
                "postgres.max_client_message_bytes".into(),
                "at least 1KiB".into(),
            );
        }
        if self.max_prepared_statements > MAX_PREPARED_STATEMENTS {
            add(
                "postgres.max_prepared_statements".into(),
                format!("at most {MAX_PREPARED_STATEMENTS} (0 turns the rewriting off)"),
            );
        }
        let mut pools = HashSet::new();
        for (i, p) in self.pools.iter_mut().enumerate() {
            match p.max_prepared_statements {
                Some(n) if n > MAX_PREPARED_STATEMENTS => add(
                    format!(
                        "{at}.max_prepared_statements",
                        at = format_args!("postgres.pools[{i}]")
                    ),
                    format!("at most {MAX_PREPARED_STATEMENTS} (0 turns the rewriting off)"),
                ),
                Some(_) => {}
                None => p.max_prepared_statements = Some(self.max_prepared_statements),
            }
            let at = format!("postgres.pools[{i}]");
            if p.name.is_empty() {
                add(format!("{at}.name"), "must not be empty".into());
            } else if !pools.insert(p.name.clone()) {
                add(format!("{at}.name"), format!("duplicate pool {:?}", p.name));
            }
            if p.servers.is_empty() {
                add(
                    format!("{at}.servers"),
                    "at least one server address (host:port) is required".into(),
                );
            }
            for (j, s) in p.servers.iter_mut().enumerate() {
                let path = format!("{at}.servers[{j}]");
                if let Err(e) = s.expand(env) {
                    add(path, e);
                } else if !valid_host_port(&s.value) {
                    add(path, format!("{:?} is not host:port", s.value));
                }
            }
            if let Err(e) = p.user.expand(env) {
                add(format!("{at}.user"), e);
            } else if p.user.value.is_empty() {
                add(format!("{at}.user"), "must not be empty".into());
            }
            if let Err(e) = p.password.expand(env) {
                add(format!("{at}.password"), e);
            }
            if p.pool_size == 0 {
                add(format!("{at}.pool_size"), "must be at least 1".into());
            }
            if p.min_idle > p.pool_size {
                add(
                    format!("{at}.min_idle"),
                    format!("more than pool_size ({})", p.pool_size),
                );
            }
            for (field, d) in [
                ("query_wait_timeout", p.query_wait_timeout),
                ("server_connect_timeout", p.server_connect_timeout),
                ("server_idle_timeout", p.server_idle_timeout),
                ("server_lifetime", p.server_lifetime),
            ] {
                if d.is_zero() {
                    add(format!("{at}.{field}"), "must be more than 0s".into());
                }
            }
            match (&p.server_tls_ca_file, p.server_tls_sslmode.verifies()) {
                (Some(ca), _) => check_pem(
                    &mut add,
                    format!("{at}.server_tls_ca_file"),
                    ca,
                    "CERTIFICATE",
                ),
                (None, true) => add(
                    format!("{at}.server_tls_ca_file"),
                    "required with server_tls_sslmode verify-ca or verify-full".into(),
                ),
                (None, false) => {}
            }
            if p.auth_type == AuthType::Md5 {
                for (k, u) in self.users.iter().enumerate() {
                    if u.password.value.starts_with("SCRAM-SHA-256$") {
                        add(
                            format!("postgres.users[{k}].password"),
                            format!(
                                "a SCRAM verifier cannot be used by pool {:?} (auth_type md5)",
                                p.name
                            ),
                        );
                    }
                }
            }
        }
        if !self.listeners.is_empty() && self.pools.is_empty() {
            add(
                "postgres.pools".into(),
                "at least one pool is required with a listener".into(),
            );
        }
        errs
    }

    /// Passwords redacted for `/config` (`${VAR}` references are shown, their defaults not).
    pub fn redact(&mut self) {
        let hide = |s: &mut EnvString| *s = super::redact::secret(s);
        for u in &mut self.users {
            hide(&mut u.password);
        }
        for p in &mut self.pools {
            hide(&mut p.password);
        }
    }
}

/// A readable file with at least one PEM block whose label ends with `label`.
fn check_pem(add: &mut impl FnMut(String, String), path: String, file: &Path, label: &str) {
    match std::fs::read_to_string(file) {
        Err(e) => add(path, format!("cannot read {}: {e}", file.display())),
        Ok(text) => {
            let found = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
                .any(|l| l.trim_end_matches('-').ends_with(label));
            if !found {
                add(path, format!("{} has no PEM {label} block", file.display()));
            }
        }
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn errors(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, &|n| (n == "PW").then(|| "secret".into())) {
            Ok(_) => Vec::new(),
            Err(crate::config::ConfigError::Invalid(e)) => {
                e.iter().map(ToString::to_string).collect()
            }
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn fields_are_checked_by_path() {
        let errs = errors(
            "postgres:\n  listeners: [{ address: \"127.0.0.1:6432\" }]\n  users: [{ name: app, password: \"${MISSING}\" }]\n  max_client_conn: 0\n  pools:\n    - { name: db, servers: [\"nohost\"], user: u, pool_size: 0 }\n",
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.max_client_conn")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.users[0].password")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.pools[0].servers[0]")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.pools[0].pool_size")),
            "{errs:?}"
        );
    }

    #[test]
    fn max_prepared_statements_is_checked_and_inherited() {
        let errs = errors(
            "postgres:\n  max_prepared_statements: 200000\n  listeners: [{ address: \"127.0.0.1:6432\" }]\n  pools:\n    - { name: db, servers: [\"h:5432\"], user: u, max_prepared_statements: 100001 }\n",
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.max_prepared_statements")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("postgres.pools[0].max_prepared_statements")),
            "{errs:?}"
        );
        let config = Config::from_yaml(
            "postgres:\n  max_prepared_statements: 7\n  listeners: [{ address: \"127.0.0.1:6432\" }]\n  pools:\n    - { name: a, servers: [\"h:5432\"], user: u }\n    - { name: b, servers: [\"h:5432\"], user: u, max_prepared_statements: 0 }\n",
            &|_| None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<_> = config
            .postgres
            .pools
            .iter()
            .map(|p| p.max_prepared_statements)
            .collect();
        assert_eq!(got, [Some(7), Some(0)]);
    }

    #[test]
    fn tls_files_are_checked_by_path() {
        let dir = std::env::temp_dir().join(format!("sidelight-tlscfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap_or_else(|e| panic!("{e}"));
        let errs = errors(&format!(
            "postgres:\n  listeners:\n    - {{ name: a, address: \"127.0.0.1:6432\", client_tls_cert_file: /nonexistent/c.pem, client_tls_key_file: {np} }}\n    - {{ name: b, address: \"127.0.0.1:6433\", client_tls_cert_file: {np} }}\n    - {{ name: c, address: \"127.0.0.1:6434\", client_tls_sslmode: require }}\n  pools:\n    - {{ name: db, servers: [\"h:5432\"], user: u, server_tls_sslmode: verify-full }}\n    - {{ name: db2, servers: [\"h:5432\"], user: u, server_tls_sslmode: verify-ca, server_tls_ca_file: {np} }}\n",
            np = not_pem.display()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in [
            (
                "postgres.listeners[0].client_tls_cert_file",
                "cannot read /nonexistent/c.pem",
            ),
            (
                "postgres.listeners[0].client_tls_key_file",
                "no PEM PRIVATE KEY block",
            ),
            (
                "postgres.listeners[1].client_tls_key_file",
                "required with client_tls_cert_file",
            ),
            (
                "postgres.listeners[2].client_tls_sslmode",
                "needs client_tls_cert_file",
            ),
            (
                "postgres.pools[0].server_tls_ca_file",
                "required with server_tls_sslmode",
            ),
            (
                "postgres.pools[1].server_tls_ca_file",
                "no PEM CERTIFICATE block",
            ),
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(path) && e.contains(text)),
                "{path}: {text} not in {errs:?}"
            );
        }
    }

    #[test]
    fn passwords_are_redacted() {
        let config = Config::from_yaml(
            "postgres:\n  listeners: [{ address: \"127.0.0.1:6432\" }]\n  users: [{ name: app, password: hunter2 }, { name: b, password: \"${PW}\" }]\n  pools:\n    - { name: db, servers: [\"127.0.0.1:5432\"], user: u, password: topsecret }\n",
            &|n| (n == "PW").then(|| "secret".into()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let yaml = config.redacted_yaml();
        assert!(
            !yaml.contains("hunter2") && !yaml.contains("topsecret"),
            "{yaml}"
        );
        assert!(!yaml.contains("secret\n"), "{yaml}");
        assert!(yaml.contains("${PW}"), "{yaml}");
    }
}
