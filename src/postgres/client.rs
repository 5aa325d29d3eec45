//! One client session: startup, authentication, then the pooling loop.
//!
//! Both byte streams are scanned header to header (type byte + length) and passed on as they
//! arrive; only ReadyForQuery and small ErrorResponses from the server are looked into. In
//! transaction mode the server connection goes back to the pool when the server reports idle
//! (`ReadyForQuery 'I'`) **and** every request the client sent has been answered: each simple
//! Query, FunctionCall and Sync expects one ReadyForQuery, counted in `pending`; Parse, Bind,
//! Describe, Execute and Close sent after the last Sync (answered only on a later Sync or
//! Flush) keep the connection attached too (`unsynced`), and so does a COPY until its
//! ReadyForQuery (`client_in_copy`).
//!
//! Also looked into: the start of each Query and Parse (LISTEN is refused, see `listen`),
//! ParameterStatus (tracked startup parameters, see `params`), CopyInResponse (Syncs the server
//! will ignore), and a 57014 ErrorResponse after sidelight's own query_timeout cancel.

use super::auth::{self, AuthError};
use super::cancel::{CancelCounters, ClientKey};
use super::errors::{sqlstate, PgError};
use super::listen;
use super::messages::{self, FrameError, Startup};
use super::params::{ParamSync, Values};
use super::pool::{AcquireError, Lease, Pool};
use super::prepared::{self, ClientStatements, ClientStep, PreparedError};
use super::stream::PgStream;
use super::PgShared;
use crate::config::{ClientSslMode, PoolMode};
use crate::metrics::postgres::PoolMetrics;
use bytes::{Buf, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Read no more from one side while this much is waiting to be written to the other.
const BUFFER_HIGH: usize = 64 * 1024;
/// An ErrorResponse up to this size is read whole for its SQLSTATE.
const MAX_ERROR_SCAN: usize = 8 * 1024;
/// After query_timeout's cancel, how long the server has to answer it before sidelight closes
/// the server connection instead.
const CANCEL_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client: {0}")]
    Client(FrameError),
    #[error("{0}")]
    Reported(PgError),
}

/// Serves one accepted client until it leaves.
pub async fn serve(
    shared: Arc<PgShared>,
    listener: Arc<str>,
    tcp: TcpStream,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let pg = &shared.metrics.pg;
    let login_deadline = shared
        .login_timeout
        .map(|t| tokio::time::Instant::now() + t);
    let login_timed_out = || {
        pg.protocol_errors
            .with_label_values(&[&listener, "login_timeout"])
            .inc();
        tracing::info!(listener = %listener, "client_login_timeout: the client did not finish its startup in time");
    };
    let Ok(negotiated) = within(login_deadline, negotiate(&shared, &listener, tcp)).await else {
        login_timed_out();
        return;
    };
    let Some((mut stream, params)) = negotiated else {
        return;
    };
    // Counted after the startup packet, so that the refusal reaches the client as an error its
    // driver shows (a cancel request, answered above, takes no place).
    let Some(_slot) = shared.client_slot() else {
        pg.clients_refused.with_label_values(&[&listener]).inc();
        tracing::warn!(listener = %listener, "max_client_conn reached: client refused");
        let e = PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already (sidelight's max_client_conn)",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&e.bytes())).await;
        return;
    };
    let user = Startup::param(&params, "user").unwrap_or_default();
    let database = Startup::param(&params, "database").unwrap_or_else(|| user.clone());
    let Some(pool) = shared.pools.get(&database).cloned() else {
        let e = PgError::fatal(
            sqlstate::UNKNOWN_DATABASE,
            format!("database \"{database}\" does not exist"),
        );
        let _ = stream.write_all(&e.bytes()).await;
        return;
    };
    let method = pool.config.auth_type;
    let auth = auth::authenticate(&mut stream, method, &shared.users, &user);
    let Ok(auth) = within(login_deadline, auth).await else {
        login_timed_out();
        let e = PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "client_login_timeout ({:?}): authentication did not finish in time",
                shared.login_timeout.unwrap_or_default()
            ),
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&e.bytes())).await;
        return;
    };
    match auth {
        Ok(()) => {}
        Err(AuthError::Refused(e)) => {
            pool.metrics.auth_failure(method_label(method));
            tracing::info!(pool = %pool.name, user = %user, "client authentication failed");
            let _ = stream.write_all(&e.bytes()).await;
            return;
        }
        Err(AuthError::Frame(e)) => {
            pool.metrics.auth_failure(method_label(method));
            if !matches!(e, FrameError::Closed) {
                pg.protocol_errors
                    .with_label_values(&[&listener, kind_of(&e)])
                    .inc();
            }
            return;
        }
    }
    // Clients expect the server's parameters (server_version, encodings) at startup.
    if !pool.has_params() {
        match pool.acquire().await {
            Ok(lease) => pool.release(lease),
            Err(e) => {
                let _ = stream.write_all(&acquire_error(&e).bytes()).await;
                return;
            }
        }
    }
    let server_params = pool.params();
    let want = Values::for_client(&params, &server_params);
    let mut out = BytesMut::with_capacity(512);
    messages::auth_request(&mut out, 0, &[]);
    for (k, v) in want.startup_status(&server_params) {
        messages::parameter_status(&mut out, &k, &v);
    }
    // sidelight's own key: a CancelRequest with it reaches whichever server connection the
    // client holds at the time.
    let key = shared.cancels.register(CancelCounters::of(&pool.metrics));
    messages::backend_key(&mut out, key.pid(), key.secret());
    messages::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let mut session = Session::new(&pool, stream, shared.max_message, stop, key, want);
    let result = session.run().await;
    session.finish(result, &listener, pg).await;
}

/// The startup phase up to the StartupMessage, with TLS when the client asks for it and the
/// listener has it; None when the client is gone or was answered with an error.
async fn negotiate(
    shared: &PgShared,
    listener: &str,
    tcp: TcpStream,
) -> Option<(PgStream, Vec<(String, String)>)> {
    let pg = &shared.metrics.pg;
    let tls = shared.listener_tls.get(listener);
    let mode = tls.map_or(ClientSslMode::Disable, |t| t.mode);
    let config = tls.and_then(|t| t.config.clone());
    let (stream, result) = startup(PgStream::Plain(tcp), config, shared).await;
    let count = |result: &str| pg.client_tls.with_label_values(&[listener, result]).inc();
    let fatal = match (result, stream) {
        (Ok(Some(params)), Some(stream)) => {
            if stream.is_tls() || mode != ClientSslMode::Require {
                count(if stream.is_tls() { "tls" } else { "plain" });
                return Some((stream, params));
            }
            count("rejected");
            let e = PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "SSL required: this listener has client_tls_sslmode require",
            );
            Some((e, stream))
        }
        (Err(StartupError::Tls(e)), _) => {
            count("error");
            tracing::info!(listener = %listener, error = %e, "client TLS handshake failed");
            None
        }
        (Err(StartupError::Frame(e)), stream) => {
            pg.protocol_errors
                .with_label_values(&[listener, kind_of(&e)])
                .inc();
            let e = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string());
            stream.map(|s| (e, s))
        }
        _ => None,
    };
    if let Some((e, mut stream)) = fatal {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = stream.write_all(&e.bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
    None
}

enum StartupError {
    Frame(FrameError),
    Tls(std::io::Error),
}

impl From<FrameError> for StartupError {
    fn from(e: FrameError) -> Self {
        StartupError::Frame(e)
    }
}

type Negotiated = (
    Option<PgStream>,
    Result<Option<Vec<(String, String)>>, StartupError>,
);

/// Reads startup packets until the StartupMessage; the stream comes back (upgraded to TLS if
/// the client asked and the listener has a certificate) unless a TLS handshake consumed it.
async fn startup(
    mut stream: PgStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: &PgShared,
) -> Negotiated {
    for _ in 0..3 {
        let answer: &[u8] = match messages::read_startup(&mut stream).await {
            Ok(Startup::Ssl) => match (&tls, stream) {
                (Some(config), PgStream::Plain(mut tcp)) => {
                    if let Err(e) = tcp.write_all(b"S").await {
                        return (None, Err(FrameError::from(e).into()));
                    }
                    match PgStream::accept_tls(tcp, config.clone()).await {
                        Ok(s) => stream = s,
                        Err(e) => return (None, Err(StartupError::Tls(e))),
                    }
                    continue;
                }
                (_, s @ PgStream::Tls(_)) => {
                    let e = FrameError::Malformed("SSLRequest inside TLS");
                    return (Some(s), Err(e.into()));
                }
                (None, s) => {
                    stream = s;
                    b"N"
                }
            },
            // GSSAPI encryption is not offered: clients fall back to TLS or plain.
            Ok(Startup::GssEnc) => b"N",
            Ok(Startup::Cancel { pid, key }) => {
                shared.cancel(pid, key).await;
                return (Some(stream), Ok(None));
            }
            Ok(Startup::Start { params }) => return (Some(stream), Ok(Some(params))),
            Err(FrameError::Closed) => return (Some(stream), Ok(None)),
            Err(e) => return (Some(stream), Err(e.into())),
        };
        if let Err(e) = stream.write_all(answer).await {
            return (None, Err(FrameError::from(e).into()));
        }
    }
    let e = FrameError::Malformed("too many negotiation requests");
    (Some(stream), Err(e.into()))
}

fn kind_of(e: &FrameError) -> &'static str {
    match e {
        FrameError::Oversized(_) => "oversized",
        FrameError::Malformed(_) => "malformed",
        _ => "startup",
    }
}

fn method_label(m: crate::config::AuthType) -> &'static str {
    match m {
        crate::config::AuthType::ScramSha256 => "scram-sha-256",
        crate::config::AuthType::Md5 => "md5",
        crate::config::AuthType::Trust => "trust",
    }
}

fn acquire_error(e: &AcquireError) -> PgError {
    match e {
        AcquireError::WaitTimeout(_) => PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!("query_wait_timeout: {e}"),
        ),
        AcquireError::ConnectTimeout(_) | AcquireError::Connect(_) => {
            PgError::fatal(sqlstate::CANNOT_CONNECT, e.to_string())
        }
    }
}

/// Tracks the client's state gauge (active, waiting, idle).
struct ClientGauge<'a> {
    metrics: &'a PoolMetrics,
    state: usize,
}

impl<'a> ClientGauge<'a> {
    fn new(metrics: &'a PoolMetrics) -> Self {
        metrics.clients[2].inc();
        ClientGauge { metrics, state: 2 }
    }
    fn set(&mut self, state: usize) {
        if state != self.state {
            self.metrics.clients[self.state].dec();
            self.metrics.clients[state].inc();
            self.state = state;
        }
    }
}

impl Drop for ClientGauge<'_> {
    fn drop(&mut self) {
        self.metrics.clients[self.state].dec();
    }
}

struct Session<'a> {
    pool: &'a Pool,
    client: PgStream,
    max_message: usize,
    stop: watch::Receiver<bool>,
    draining: bool,
    gauge: ClientGauge<'a>,
    server: Option<Lease>,
    /// This client's cancel key; points at `server` while it holds one.
    key: ClientKey,
    /// The client's tracked startup parameters, applied on each server connection it gets.
    params: ParamSync,
    /// Client bytes read; the first `c_ready` are scanned and go to the server next.
    cbuf: BytesMut,
    c_ready: usize,
    /// Body bytes of the current client message not yet scanned.
    c_rest: usize,
    /// Bytes still to come of a client message that was replaced (LISTEN), dropped on arrival.
    c_drop: usize,
    /// Server bytes read; the first `s_ready` are scanned and go to the client next.
    sbuf: BytesMut,
    s_ready: usize,
    s_rest: usize,
    /// When each request still awaiting its ReadyForQuery was sent.
    pending: VecDeque<Request>,
    /// Between the server's CopyInResponse (or CopyBothResponse) and the client's CopyDone or
    /// CopyFail: the server ignores Sync and Flush then, so they are not counted.
    client_in_copy: bool,
    /// That COPY came from the extended protocol: after CopyDone the server waits for a Sync.
    copy_extended: bool,
    unsynced: bool,
    /// The server's last transaction status: I, T or E.
    status: u8,
    txn_start: Option<Instant>,
    /// When sidelight cancelled the running request for query_timeout (until its answer).
    timeout_cancel: Option<Instant>,
    /// The last ReadyForQuery: a pipelined request's query_timeout runs from here.
    last_answer: Instant,
    last_client_activity: Instant,
    client_done: bool,
    /// Named prepared statements (transaction mode; see prepared.rs). With them, rewritten
    /// and injected messages go to the server from `obuf`, ahead of `cbuf[..c_ready]`.
    ps: Option<ClientStatements>,
    obuf: BytesMut,
    /// Bytes of the current client message that must be buffered before it is scanned.
    c_need: usize,
}

/// A request awaiting its ReadyForQuery: a simple Query or FunctionCall, or a Sync.
struct Request {
    sent: Instant,
    sync: bool,
}

impl Request {
    fn new(sync: bool) -> Request {
        Request {
            sent: Instant::now(),
            sync,
        }
    }
}

enum End {
    /// The client sent Terminate or closed its side.
    ClientLeft,
    /// sidelight ends the client with this error.
    Fatal(PgError, &'static str),
    ProtocolError(FrameError, &'static str),
}

impl<'a> Session<'a> {
    fn new(
        pool: &'a Pool,
        client: PgStream,
        max_message: usize,
        stop: watch::Receiver<bool>,
        key: ClientKey,
        want: Values,
    ) -> Self {
        let draining = *stop.borrow();
        Session {
            pool,
            client,
            max_message,
            draining,
            stop,
            gauge: ClientGauge::new(&pool.metrics),
            server: None,
            key,
            params: ParamSync::new(want),
            cbuf: BytesMut::with_capacity(8 * 1024),
            c_ready: 0,
            c_rest: 0,
            c_drop: 0,
            sbuf: BytesMut::with_capacity(16 * 1024),
            s_ready: 0,
            s_rest: 0,
            pending: VecDeque::with_capacity(16),
            client_in_copy: false,
            copy_extended: false,
            unsynced: false,
            status: b'I',
            txn_start: None,
            timeout_cancel: None,
            last_answer: Instant::now(),
            last_client_activity: Instant::now(),
            client_done: false,
            ps: (pool.mode() == PoolMode::Transaction && pool.max_prepared_statements() > 0)
                .then(|| ClientStatements::new(pool.max_prepared_statements())),
            obuf: BytesMut::new(),
            c_need: 0,
        }
    }

    fn releasable(&self) -> bool {
        self.status == b'I'
            && self.pending.is_empty()
            && !self.unsynced
            && !self.client_in_copy
            && !self.params.swallowing()
            && self.c_ready == 0
            && self.c_rest == 0
            && self.c_drop == 0
            && self.obuf.is_empty()
            && !self.ps.as_ref().is_some_and(ClientStatements::busy)
            // Nothing of a server message half read: the next server's bytes start afresh.
            && self.s_rest == 0
            && self.sbuf.len() == self.s_ready
    }

    async fn run(&mut self) -> End {
        loop {
            // Transaction mode: give the connection back as soon as nothing is outstanding.
            if self.server.is_some()
                && self.pool.mode() == PoolMode::Transaction
                && self.releasable()
                && !self.key.in_flight()
            {
                if let Some(lease) = self.take_server() {
                    if self.ps.as_ref().is_none_or(ClientStatements::settled) {
                        self.pool.release(lease);
                    } else {
                        self.pool.discard(lease, "error");
                    }
                    if let Some(ps) = self.ps.as_mut() {
                        ps.reset();
                    }
                    self.gauge.set(2);
                }
            }
            if self.client_done && self.s_ready == 0 {
                return End::ClientLeft;
            }
            if self.server.is_none() {
                if self.draining && self.s_ready == 0 {
                    return End::Fatal(
                        PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "sidelight is shutting down"),
                        "",
                    );
                }
                // A whole header from the client: a request that needs a server (or Terminate).
                if self.cbuf.len() >= 5 {
                    if self.cbuf[0] == b'X' {
                        self.client_done = true;
                        self.cbuf.clear();
                        continue;
                    }
                    if let Err(e) = self.check_header() {
                        return e;
                    }
                    self.gauge.set(1);
                    match self.pool.acquire().await {
                        Ok(lease) => {
                            self.key.attach(&lease.conn);
                            self.server = Some(lease);
                            self.apply_params();
                            self.gauge.set(0);
                        }
                        Err(e) => return End::Fatal(acquire_error(&e), ""),
                    }
                }
            }
            if self.server.is_some() {
                if let Err(e) = self.scan_client() {
                    return e;
                }
                if self.ps.as_ref().is_some_and(ClientStatements::fakes_due) {
                    self.scan_server();
                }
                if self.client_done && self.s_ready == 0 {
                    return End::ClientLeft;
                }
                // Most writes succeed at once: no trip through the select for them.
                if self.to_server() && !self.cancel_hold() {
                    if let Err(end) = self.write_server() {
                        return end;
                    }
                }
            }

            let deadline = self.deadline();
            let server = self.server.as_ref().map(|l| &l.conn.stream);
            let want_client_read = !self.client_done
                && (self.cbuf.len() < BUFFER_HIGH || self.cbuf.len() < self.c_ready + self.c_need);
            let want_server_read = server.is_some() && self.sbuf.len() < BUFFER_HIGH;
            tokio::select! {
                r = self.client.readable(), if want_client_read => {
                    if let Some(end) = r.err().map(|_| End::ClientLeft) { return end; }
                    self.cbuf.reserve(8 * 1024);
                    match self.client.try_read_buf(&mut self.cbuf) {
                        Ok(0) => { self.client_done = true; self.cbuf.truncate(self.c_ready); }
                        Ok(n) => {
                            self.pool.metrics.bytes_in.inc_by(n as u64);
                            self.last_client_activity = Instant::now();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return End::ClientLeft,
                    }
                }
                r = self.client.writable(), if self.s_ready > 0 => {
                    if r.is_err() { return End::ClientLeft; }
                    if let Err(end) = self.write_client() { return end; }
                }
                r = readable(server), if want_server_read => {
                    if r.is_err() { return self.server_lost(); }
                    let Some(lease) = self.server.as_ref() else { continue };
                    self.sbuf.reserve(16 * 1024);
                    match lease.conn.stream.try_read_buf(&mut self.sbuf) {
                        Ok(0) => return self.server_lost(),
                        Ok(_) => {
                            self.scan_server();
                            if let Some(e) = self.params.take_error() {
                                return End::Fatal(
                                    PgError::fatal(
                                        sqlstate::INVALID_PARAMETER_VALUE,
                                        format!("a startup parameter cannot be applied on the server: {e}"),
                                    ),
                                    "",
                                );
                            }
                            if self.s_ready > 0 {
                                if let Err(end) = self.write_client() {
                                    return end;
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return self.server_lost(),
                    }
                }
                r = writable(server), if server.is_some() && self.to_server() && !self.cancel_hold() => {
                    if r.is_err() { return self.server_lost(); }
                    if let Err(end) = self.write_server() { return end; }
                }
                _ = sleep_until(deadline) => {
                    if let Some(end) = self.timed_out() { return end; }
                }
                _ = self.stop.changed(), if !self.draining => {
                    self.draining = true;
                }
                // A cancel was delivered: the connection may be given back now.
                _ = self.key.settled(), if self.server.is_some() && self.key.in_flight() => {}
            }
        }
    }

    /// While a cancel is in flight no more client bytes go to the server (a few milliseconds):
    /// the next request cannot be hit by a late signal. (PostgreSQL signals a backend twice,
    /// itself and its process group, and the second can come after the query it was meant
    /// for has ended.)
    fn cancel_hold(&self) -> bool {
        self.key.in_flight()
    }

    /// Writes what the client is owed, as far as the socket takes it now.
    fn write_client(&mut self) -> Result<(), End> {
        match self.client.try_write(&self.sbuf[..self.s_ready]) {
            Ok(n) => {
                self.sbuf.advance(n);
                self.s_ready -= n;
                self.pool.metrics.bytes_out.inc_by(n as u64);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(End::ClientLeft),
        }
    }

    fn to_server(&self) -> bool {
        self.c_ready > 0 || !self.obuf.is_empty()
    }

    /// Writes scanned client messages to the server, as far as the socket takes them now.
    fn write_server(&mut self) -> Result<(), End> {
        let Some(lease) = self.server.as_ref() else {
            return Ok(());
        };
        let bufs = [
            std::io::IoSlice::new(&self.obuf),
            std::io::IoSlice::new(&self.cbuf[..self.c_ready]),
        ];
        let parts = if self.obuf.is_empty() {
            &bufs[1..]
        } else {
            &bufs[..]
        };
        match lease.conn.stream.try_write_vectored(parts) {
            Ok(mut n) => {
                let from_obuf = n.min(self.obuf.len());
                self.obuf.advance(from_obuf);
                n -= from_obuf;
                self.cbuf.advance(n);
                self.c_ready -= n;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(_) => Err(self.server_lost()),
        }
    }

    fn check_header(&self) -> Result<(usize, u8), End> {
        let tag = self.cbuf[self.c_ready];
        if !messages::is_frontend_tag(tag) {
            return Err(End::ProtocolError(
                FrameError::Malformed("unknown message type"),
                "unknown_message",
            ));
        }
        let len = messages::body_len(&self.cbuf[self.c_ready..self.c_ready + 5])
            .map_err(|e| End::ProtocolError(e, "malformed"))?;
        if len > self.max_message {
            return Err(End::ProtocolError(FrameError::Oversized(len), "oversized"));
        }
        Ok((len, tag))
    }

    /// Moves whole and partial client messages into the to-server part of `cbuf`, counting
    /// the requests that expect a ReadyForQuery.
    fn scan_client(&mut self) -> Result<(), End> {
        loop {
            let avail = self.cbuf.len() - self.c_ready;
            if self.c_drop > 0 {
                let take = self.c_drop.min(avail);
                if take == 0 {
                    return Ok(());
                }
                let at = self.c_ready;
                self.splice_client(at, take, &[]);
                self.c_drop -= take;
                continue;
            }
            if self.c_rest > 0 {
                let take = self.c_rest.min(avail);
                self.c_ready += take;
                self.c_rest -= take;
                if self.c_rest > 0 {
                    return Ok(());
                }
                continue;
            }
            if avail < 5 {
                return Ok(());
            }
            let (len, tag) = self.check_header()?;
            if matches!(tag, b'Q' | b'P') && self.pool.mode() == PoolMode::Transaction {
                match listen::check(tag, &self.cbuf[self.c_ready + 5..], len) {
                    listen::Check::NeedMore => return Ok(()),
                    listen::Check::Pass => {}
                    listen::Check::Refuse(with) => {
                        // The replacement is scanned (and counted) next, like any message.
                        let (at, have) = (self.c_ready, avail.min(5 + len));
                        self.c_drop = 5 + len - have;
                        self.splice_client(at, have, &with);
                        continue;
                    }
                }
            }
            let taken = match self.prepared_client(tag, len)? {
                Some(n) => n,
                None => return Ok(()),
            };
            match tag {
                b'X' => {
                    // Terminate is ours to handle; nothing after it counts.
                    self.cbuf.truncate(self.c_ready);
                    self.client_done = true;
                    return Ok(());
                }
                b'Q' | b'F' => {
                    self.pending.push_back(Request::new(false));
                    self.txn_start.get_or_insert_with(Instant::now);
                }
                // Ignored by the server in copy-in mode.
                b'S' if self.client_in_copy => {}
                b'S' => {
                    self.pending.push_back(Request::new(true));
                    self.unsynced = false;
                    self.txn_start.get_or_insert_with(Instant::now);
                }
                b'd' => self.pool.metrics.copy_in.inc_by(len as u64),
                b'c' | b'f' if self.client_in_copy => {
                    self.client_in_copy = false;
                    // An extended-protocol COPY ends with the client's next Sync.
                    self.unsynced |= self.copy_extended;
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    self.unsynced = true;
                    self.txn_start.get_or_insert_with(Instant::now);
                }
                // Flush and COPY data: answered within the request they belong to.
                _ => {}
            }
            // What prepared statements did not take passes on as it is.
            self.c_rest = 5 + len - taken;
        }
    }

    /// Replaces `len` unscanned client bytes at `at` with `with` (rare: LISTEN refusals).
    fn splice_client(&mut self, at: usize, len: usize, with: &[u8]) {
        let tail = self.cbuf.split_off(at + len);
        self.cbuf.truncate(at);
        self.cbuf.extend_from_slice(with);
        self.cbuf.extend_from_slice(&tail);
    }

    /// A server connection just attached whose tracked parameters differ from the client's
    /// gets one query ahead of the client's bytes (nothing scanned waits between server
    /// connections: c_ready is 0).
    fn apply_params(&mut self) {
        let Some(lease) = self.server.as_ref() else {
            return;
        };
        if let Some(q) = self.params.query_for(&lease.conn.tracked) {
            let rest = self.cbuf.split_off(self.c_ready);
            self.cbuf.extend_from_slice(&q);
            self.cbuf.extend_from_slice(&rest);
            self.c_ready += q.len();
        }
    }

    /// Named prepared statements: rewrites the client message at `c_ready` when it carries a
    /// statement name. Some(n): its first n bytes were replaced by what went to `obuf`;
    /// None: it must be buffered whole first.
    fn prepared_client(&mut self, tag: u8, len: usize) -> Result<Option<usize>, End> {
        let (Some(ps), Some(lease)) = (self.ps.as_mut(), self.server.as_mut()) else {
            return Ok(Some(0));
        };
        if tag == b'X' {
            return Ok(Some(0));
        }
        let msg = &self.cbuf[self.c_ready..];
        let step = ps.client_message(
            tag,
            msg,
            len,
            &mut lease.conn.statements,
            &self.pool.statements,
            &self.pool.metrics,
        );
        let taken = match step {
            Ok(ClientStep::Need(n)) => {
                self.c_need = n;
                return Ok(None);
            }
            Ok(ClientStep::Replace(n)) => n,
            Err(PreparedError::Frame(e)) => return Err(End::ProtocolError(e, "malformed")),
            Err(e @ PreparedError::Reserved(_)) => {
                let code = sqlstate::INVALID_SQL_STATEMENT_NAME;
                return Err(End::Fatal(PgError::fatal(code, e.to_string()), ""));
            }
        };
        self.c_need = 0;
        if taken > 0 || !ps.scratch.is_empty() {
            // Order to the server: obuf, then cbuf[..c_ready]; so scanned bytes join obuf first.
            self.obuf.extend_from_slice(&self.cbuf[..self.c_ready]);
            self.cbuf.advance(self.c_ready);
            self.c_ready = 0;
            self.obuf.extend_from_slice(&ps.scratch);
            ps.scratch.clear();
            self.cbuf.advance(taken);
        }
        Ok(Some(taken))
    }

    /// Moves server bytes into the to-client part of `sbuf`, watching ReadyForQuery and
    /// ErrorResponse.
    fn scan_server(&mut self) {
        loop {
            if self.params.swallowing() && self.s_rest == 0 {
                let tracked = self.server.as_mut().map(|l| &mut l.conn.tracked);
                if !self.params.swallow(&mut self.sbuf, self.s_ready, tracked) {
                    return;
                }
                continue;
            }
            let avail = self.sbuf.len() - self.s_ready;
            if self.s_rest > 0 {
                let take = self.s_rest.min(avail);
                self.s_ready += take;
                self.s_rest -= take;
                if self.s_rest > 0 {
                    return;
                }
                continue;
            }
            // Between messages: answers sidelight gives itself, when their turn has come.
            if let Some(ps) = self.ps.as_mut().filter(|ps| ps.fakes_due()) {
                let fakes = ps.take_fakes();
                prepared::insert_at(&mut self.sbuf, self.s_ready, fakes);
                self.s_ready += fakes.len();
                ps.scratch.clear();
                continue;
            }
            if avail < 5 {
                return;
            }
            let at = self.s_ready;
            let tag = self.sbuf[at];
            let Ok(len) = messages::body_len(&self.sbuf[at..at + 5]) else {
                // A server that breaks framing cannot be trusted with anything else.
                self.s_rest = avail - 5;
                self.s_ready += 5;
                self.status = b'?';
                continue;
            };
            match tag {
                b'Z' => {
                    if avail < 6 {
                        return;
                    }
                    self.status = self.sbuf[at + 5];
                    let now = Instant::now();
                    self.timeout_cancel = None;
                    self.last_answer = now;
                    // Any COPY is over once the server is ready again.
                    self.client_in_copy = false;
                    if let Some(request) = self.pending.pop_front() {
                        self.pool
                            .metrics
                            .query
                            .observe((now - request.sent).as_secs_f64());
                        self.pool.metrics.queries.inc();
                    }
                    if self.status == b'I' && self.pending.is_empty() && !self.unsynced {
                        if let Some(start) = self.txn_start.take() {
                            self.pool
                                .metrics
                                .transaction
                                .observe(start.elapsed().as_secs_f64());
                            self.pool.metrics.transactions.inc();
                        }
                    }
                }
                b'E' if len <= MAX_ERROR_SCAN => {
                    if avail < 5 + len {
                        return;
                    }
                    let body = &self.sbuf[at + 5..at + 5 + len];
                    let code = messages::error_code(body).unwrap_or(b"??");
                    self.pool.metrics.error(code);
                    if self.timeout_cancel.is_some() && code == sqlstate::QUERY_CANCELED.as_bytes()
                    {
                        // The server's "due to user request" becomes what happened.
                        let with = self.query_timeout_error();
                        self.replace_server_message(at, 5 + len, &with);
                        // Still an error the prepared-statement books must see.
                        self.prepared_server(tag, at, with.len() - 5);
                        continue;
                    }
                }
                // CopyInResponse, CopyBothResponse: the server reads COPY data now. The request
                // that started it is in front; Syncs sent since (tokio-postgres sends one
                // right after Execute) are ignored by the server and answered by nothing.
                b'G' | b'W' => {
                    self.client_in_copy = true;
                    self.copy_extended = self.pending.front().is_none_or(|r| r.sync);
                    self.pending.retain(|r| !r.sync);
                }
                b'd' => self.pool.metrics.copy_out.inc_by(len as u64),
                b'S' if len <= MAX_ERROR_SCAN => {
                    if avail < 5 + len {
                        return;
                    }
                    let tracked = self.server.as_mut().map(|l| &mut l.conn.tracked);
                    self.params
                        .note_status(&self.sbuf[at + 5..at + 5 + len], tracked);
                }
                b'C' if self.ps.is_some() && len <= 64 && avail < 5 + len => return,
                _ => {}
            }
            if self.prepared_server(tag, at, len) {
                continue;
            }
            self.s_ready += 5;
            self.s_rest = len;
        }
    }

    /// Puts `with` (a whole message) in place of the scanned-to-be server message at `at`.
    /// Rare (a timeout's error): the copy of what follows does not matter.
    /// The prepared-statement books of the server message at `at`. True: it answered a
    /// message sidelight injected (always bodiless) and was removed.
    fn prepared_server(&mut self, tag: u8, at: usize, len: usize) -> bool {
        let (Some(ps), Some(lease)) = (self.ps.as_mut(), self.server.as_mut()) else {
            return false;
        };
        let body = &self.sbuf[at + 5..(at + 5 + len).min(self.sbuf.len())];
        let registry = &self.pool.statements;
        if ps.server_message(tag, body, &mut lease.conn.statements, registry) && len == 0 {
            prepared::remove_at(&mut self.sbuf, at, 5 + len);
            return true;
        }
        false
    }

    fn replace_server_message(&mut self, at: usize, len: usize, with: &[u8]) {
        let tail = self.sbuf.split_off(at + len);
        self.sbuf.truncate(at);
        self.sbuf.extend_from_slice(with);
        self.sbuf.extend_from_slice(&tail);
        self.s_ready += with.len();
    }

    fn query_timeout_error(&self) -> BytesMut {
        PgError::new(
            "ERROR",
            sqlstate::QUERY_CANCELED,
            format!(
                "canceling statement due to query_timeout ({:?})",
                self.pool.config.query_timeout
            ),
        )
        .bytes()
    }

    /// When the oldest unanswered request hits query_timeout (or, once cancelled, the grace).
    fn query_deadline(&self) -> Option<Instant> {
        let timeout = self.pool.config.query_timeout;
        if timeout.is_zero() {
            return None;
        }
        if let Some(cancelled) = self.timeout_cancel {
            return Some(cancelled + CANCEL_GRACE);
        }
        let first = self.pending.front()?;
        Some(first.sent.max(self.last_answer) + timeout)
    }

    fn deadline(&self) -> Option<Instant> {
        let cfg = &self.pool.config;
        let mut d = self.query_deadline();
        if !cfg.idle_transaction_timeout.is_zero()
            && self.server.is_some()
            && self.pending.is_empty()
            && self.status != b'I'
        {
            let t = self.last_client_activity + cfg.idle_transaction_timeout;
            d = Some(d.map_or(t, |d| d.min(t)));
        }
        d
    }

    fn timed_out(&mut self) -> Option<End> {
        let now = Instant::now();
        let cfg = &self.pool.config;
        if self.query_deadline().is_some_and(|d| now >= d) {
            if self.timeout_cancel.is_none() {
                // Like statement_timeout: the server cancels the query, the session goes on.
                self.pool.metrics.timeout("query");
                if self.key.cancel_current() {
                    tracing::info!(pool = %self.pool.name, "query_timeout: cancelling the query");
                    self.timeout_cancel = Some(now);
                    return None;
                }
            }
            return Some(End::Fatal(
                PgError::fatal(
                    sqlstate::QUERY_CANCELED,
                    format!(
                        "canceling statement due to query_timeout ({:?}); the server did not \
                         answer the cancel within {CANCEL_GRACE:?}, its connection was closed",
                        cfg.query_timeout
                    ),
                ),
                "timeout",
            ));
        }
        if !cfg.idle_transaction_timeout.is_zero()
            && self.pending.is_empty()
            && self.status != b'I'
            && now >= self.last_client_activity + cfg.idle_transaction_timeout
        {
            self.pool.metrics.timeout("idle_transaction");
            return Some(End::Fatal(
                PgError::fatal(
                    sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                    format!(
                        "terminating connection due to idle_transaction_timeout ({:?})",
                        cfg.idle_transaction_timeout
                    ),
                ),
                "timeout",
            ));
        }
        None
    }

    /// Gives up the server connection: cancels stop pointing at it first.
    fn take_server(&mut self) -> Option<Lease> {
        let lease = self.server.take();
        if lease.is_some() {
            self.key.detach();
        }
        lease
    }

    fn server_lost(&mut self) -> End {
        if let Some(lease) = self.take_server() {
            self.pool.discard(lease, "server_closed");
            self.gauge.set(2);
        }
        End::Fatal(
            PgError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "server connection lost; the transaction, if any, was not committed by sidelight",
            ),
            "",
        )
    }

    /// Ends the session: the server connection goes back clean or is closed, and the client
    /// gets its error if there is one.
    async fn finish(&mut self, end: End, listener: &str, pg: &crate::metrics::postgres::PgMetrics) {
        let (error, reason) = match end {
            End::ClientLeft => (None, "client_gone"),
            End::Fatal(e, reason) => (Some(e), if reason.is_empty() { "error" } else { reason }),
            End::ProtocolError(e, kind) => {
                pg.protocol_errors
                    .with_label_values(&[listener, kind])
                    .inc();
                tracing::info!(pool = %self.pool.name, error = %e, "client ended for a protocol error");
                (
                    Some(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())),
                    "client_gone",
                )
            }
        };
        if self.server.is_some() && self.key.in_flight() {
            // A cancel on its way must not reach the connection's next client.
            let key = &self.key;
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while key.in_flight() {
                    key.settled().await;
                }
            })
            .await;
        }
        if let Some(lease) = self.take_server() {
            self.return_server(lease, error.is_some() && reason == "timeout", reason)
                .await;
        }
        if let Some(e) = error {
            self.pool.metrics.error(e.code.as_bytes());
            let mut out = BytesMut::from(&self.sbuf[..self.s_ready]);
            e.write(&mut out);
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.write_all(&out)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.shutdown()).await;
    }

    async fn return_server(&mut self, mut lease: Lease, timed_out: bool, reason: &'static str) {
        let idle_clean = self.pending.is_empty()
            && !self.unsynced
            && !self.client_in_copy
            && !self.params.swallowing()
            && self.c_ready == 0
            && self.c_rest == 0
            && self.c_drop == 0
            && self.obuf.is_empty()
            && self.ps.as_ref().is_none_or(ClientStatements::settled)
            && self.s_rest == 0
            && self.sbuf.len() == self.s_ready;
        if timed_out || !idle_clean {
            // A request is still running (or half sent): the connection cannot be reused.
            self.pool.discard(lease, reason);
            return;
        }
        let reset: &[&str] = match (self.status, self.pool.mode()) {
            (b'I', PoolMode::Transaction) => &[],
            (b'I', PoolMode::Session) => &["DISCARD ALL"],
            (b'T' | b'E', PoolMode::Transaction) => &["ROLLBACK"],
            (b'T' | b'E', PoolMode::Session) => &["ROLLBACK", "DISCARD ALL"],
            _ => {
                self.pool.discard(lease, "error");
                return;
            }
        };
        for sql in reset {
            let done = tokio::time::timeout(Duration::from_secs(5), lease.conn.simple(sql)).await;
            if !matches!(done, Ok(Ok(b'I'))) {
                self.pool.discard(lease, "client_gone");
                return;
            }
            if *sql == "DISCARD ALL" {
                lease.conn.tracked = Values::from_server(&lease.conn.params);
            }
        }
        self.pool.release(lease);
    }
}

/// `f`, unless `deadline` passes first.
async fn within<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await,
        None => Ok(f.await),
    }
}

async fn readable(s: Option<&PgStream>) -> std::io::Result<()> {
    match s {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

async fn writable(s: Option<&PgStream>) -> std::io::Result<()> {
    match s {
        Some(s) => s.writable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
