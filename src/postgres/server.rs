//! One connection to a PostgreSQL server: connect, authenticate with the pool's credentials
//! (SCRAM-SHA-256 through postgres-protocol, md5, cleartext or trust), and the small exchanges
//! the pool runs itself (health check, `ROLLBACK`, `DISCARD ALL`).

use super::messages::{self, FrameError};
use super::prepared::ServerStatements;
use super::stream::PgStream;
use super::tls::{self, ServerTls};
use crate::config::ServerSslMode;
use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Frame(#[from] FrameError),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("server asked for an unsupported authentication method ({0})")]
    UnsupportedAuth(i32),
    #[error("SCRAM exchange failed: {0}")]
    Scram(std::io::Error),
    #[error("unexpected message {0:?} from the server")]
    Unexpected(char),
    #[error("server {addr} does not accept TLS (it answered N) and server_tls_sslmode is {mode}")]
    TlsRefused { addr: String, mode: &'static str },
    #[error("TLS with server {addr} failed: {message}")]
    Tls { addr: String, message: String },
}

pub struct Credentials<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
}

pub struct ServerConn {
    pub stream: PgStream,
    pub created: Instant,
    pub last_used: Instant,
    /// ParameterStatus values from the server's startup, passed on to clients.
    pub params: Vec<(String, String)>,
    /// The server's BackendKeyData, and where to send a CancelRequest with it.
    pub backend_pid: i32,
    pub backend_key: i32,
    pub addr: Option<std::net::SocketAddr>,
    /// The tracked startup parameters' values in this session (see `params`).
    pub tracked: super::params::Values,
    /// The worker thread whose runtime watches this socket: clients on that worker get it
    /// first, so its wake-ups stay on one thread.
    pub home: std::thread::ThreadId,
    /// The named statements sidelight prepared on this connection (transaction mode).
    pub statements: ServerStatements,
}

/// Server messages in the startup phase and in our own exchanges are small.
const MAX_SERVER_CONTROL: usize = 1 << 20;

impl ServerConn {
    /// Connects to the first address that answers and authenticates.
    pub async fn connect(
        addrs: &[String],
        creds: &Credentials<'_>,
        tls: &ServerTls,
    ) -> Result<ServerConn, ServerError> {
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr.as_str()).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let stream = negotiate_tls(stream, addr, tls).await?;
                    return ServerConn::start(stream, creds).await;
                }
                Err(source) => {
                    last = Some(ServerError::Connect {
                        addr: addr.clone(),
                        source,
                    })
                }
            }
        }
        Err(last.unwrap_or(ServerError::Refused("no server address".into())))
    }

    async fn start(
        mut stream: PgStream,
        creds: &Credentials<'_>,
    ) -> Result<ServerConn, ServerError> {
        let mut out = BytesMut::with_capacity(256);
        messages::startup(
            &mut out,
            &[("user", creds.user), ("database", creds.database)],
        );
        stream.write_all(&out).await.map_err(FrameError::from)?;
        let mut buf = BytesMut::with_capacity(256);
        let mut scram: Option<ScramSha256> = None;
        let mut params = Vec::new();
        let (mut pid, mut key) = (0, 0);
        loop {
            let tag = messages::read_message(&mut stream, &mut buf, MAX_SERVER_CONTROL).await?;
            match tag {
                b'R' => {
                    if buf.len() < 4 {
                        return Err(FrameError::Malformed("short authentication request").into());
                    }
                    let code = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let data = &buf[4..];
                    out.clear();
                    match code {
                        0 => continue,
                        3 => messages::put_message(&mut out, b'p', |b| {
                            messages::put_cstr(b, creds.password)
                        }),
                        5 => {
                            let salt: [u8; 4] = data
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or(FrameError::Malformed("md5 request without salt"))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                creds.user.as_bytes(),
                                creds.password.as_bytes(),
                                salt,
                            );
                            messages::put_message(&mut out, b'p', |b| messages::put_cstr(b, &hash));
                        }
                        10 => {
                            let offered = data.split(|&c| c == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offered {
                                return Err(ServerError::UnsupportedAuth(code));
                            }
                            let s = ScramSha256::new(
                                creds.password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            messages::put_message(&mut out, b'p', |b| {
                                messages::put_cstr(b, "SCRAM-SHA-256");
                                b.put_i32(i32::try_from(s.message().len()).unwrap_or(0));
                                b.put_slice(s.message());
                            });
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or(ServerError::Unexpected('R'))?;
                            s.update(data).map_err(ServerError::Scram)?;
                            messages::put_message(&mut out, b'p', |b| b.put_slice(s.message()));
                        }
                        12 => {
                            let s = scram.as_mut().ok_or(ServerError::Unexpected('R'))?;
                            s.finish(data).map_err(ServerError::Scram)?;
                            continue;
                        }
                        other => return Err(ServerError::UnsupportedAuth(other)),
                    }
                    stream.write_all(&out).await.map_err(FrameError::from)?;
                }
                b'S' => {
                    let (k, rest) = messages::cstr(&buf)?;
                    let (v, _) = messages::cstr(rest)?;
                    params.push((k.to_string(), v.to_string()));
                }
                b'K' if buf.len() >= 8 => {
                    pid = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    key = i32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                }
                b'N' => {}
                b'E' => return Err(ServerError::Refused(messages::error_message(&buf))),
                b'Z' => {
                    let now = Instant::now();
                    let addr = stream.peer_addr().ok();
                    let tracked = super::params::Values::from_server(&params);
                    return Ok(ServerConn {
                        stream,
                        created: now,
                        last_used: now,
                        params,
                        backend_pid: pid,
                        backend_key: key,
                        addr,
                        tracked,
                        home: std::thread::current().id(),
                        statements: ServerStatements::default(),
                    });
                }
                other => return Err(ServerError::Unexpected(char::from(other))),
            }
        }
    }

    /// Without blocking: true when the server has closed (or sent something unasked).
    pub fn looks_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.try_read(&mut byte) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    /// Runs one simple query and reads to its ReadyForQuery; Ok(status) only when it succeeded.
    pub async fn simple(&mut self, sql: &str) -> Result<u8, ServerError> {
        let mut out = BytesMut::with_capacity(sql.len() + 8);
        messages::query(&mut out, sql);
        self.stream
            .write_all(&out)
            .await
            .map_err(FrameError::from)?;
        let mut buf = BytesMut::new();
        let mut failed = None;
        loop {
            match messages::read_message(&mut self.stream, &mut buf, MAX_SERVER_CONTROL).await? {
                b'E' => failed = Some(messages::error_message(&buf)),
                // A ROLLBACK can put a SET LOCAL value back.
                b'S' => {
                    if let Ok((k, rest)) = messages::cstr(&buf) {
                        if let Ok((v, _)) = messages::cstr(rest) {
                            self.tracked.note(k, v);
                        }
                    }
                }
                b'Z' => {
                    let status = buf.first().copied().unwrap_or(b'?');
                    return match failed {
                        Some(e) => Err(ServerError::Refused(e)),
                        None => Ok(status),
                    };
                }
                _ => {}
            }
        }
    }

    /// Best effort: tells the server we are leaving.
    pub fn terminate(&self) {
        let _ = self.stream.try_write(&[b'X', 0, 0, 0, 4]);
    }
}

fn mode_name(mode: ServerSslMode) -> &'static str {
    match mode {
        ServerSslMode::Disable => "disable",
        ServerSslMode::Prefer => "prefer",
        ServerSslMode::Require => "require",
        ServerSslMode::VerifyCa => "verify-ca",
        ServerSslMode::VerifyFull => "verify-full",
    }
}

/// SSLRequest, then the TLS handshake on `S`; `N` means plain for `prefer` and an error for
/// the modes that require TLS.
async fn negotiate_tls(
    mut tcp: TcpStream,
    addr: &str,
    tls: &ServerTls,
) -> Result<PgStream, ServerError> {
    let Some(config) = tls.config.clone() else {
        return Ok(PgStream::Plain(tcp));
    };
    let fail = |message: String| ServerError::Tls {
        addr: addr.to_string(),
        message,
    };
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&messages::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&request).await.map_err(FrameError::from)?;
    // One byte exactly: nothing the server sends after it may be read before the handshake.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(FrameError::from)?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == ServerSslMode::Prefer => return Ok(PgStream::Plain(tcp)),
        b'N' => {
            return Err(ServerError::TlsRefused {
                addr: addr.to_string(),
                mode: mode_name(tls.mode),
            })
        }
        other => {
            return Err(fail(format!(
                "unexpected answer {:?} to SSLRequest",
                char::from(other)
            )))
        }
    }
    let name = match tls::server_name(addr) {
        Ok(name) => name,
        Err(e) if tls.mode == ServerSslMode::VerifyFull => {
            return Err(fail(format!("no host name to verify: {e}")))
        }
        Err(_) => tls::placeholder_name(),
    };
    PgStream::connect_tls(tcp, config, name)
        .await
        .map_err(|e| fail(e.to_string()))
}
