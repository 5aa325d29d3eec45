//! Protocol-level named prepared statements in transaction mode (PgBouncer 1.21+'s design).
//!
//! A client's named Parse is remembered (client name -> statement); each distinct query text
//! with its parameter types is one pool-wide [`Stmt`] with one server-side name (`_sl<id>`).
//! Each server connection remembers which statements it has ([`ServerStatements`], an LRU of
//! `max_prepared_statements`). On whichever server connection the client holds, a Bind or
//! Describe of its statement is rewritten to the server-side name, preceded by a Parse when
//! that connection lacks it; a Parse the connection already has is not sent at all.
//!
//! Responses must reach the client exactly as if it spoke to PostgreSQL, so every message sent
//! to the server is queued as a [`Slot`]: forwarded ones pass their answer on, injected ones
//! (Parse before Bind, Close of evicted statements) have their answer swallowed, and messages
//! sidelight answers itself (a Parse the server already has, a client's Close) get their
//! ParseComplete / CloseComplete synthesized when the slot reaches the front of the queue.
//! After an error the server skips to the next Sync; the skipped slots are rolled back so the
//! bookkeeping matches what the server really did.

use super::messages::{self, put_message, FrameError};
use crate::metrics::postgres::PoolMetrics;
use bytes::{BufMut, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Server-side names are `_sl<id>`; a client's unknown statement name with this prefix could
/// reach another client's statement, so it is refused.
const SERVER_PREFIX: &[u8] = b"_sl";
/// CommandComplete tags after which the server holds no prepared statements.
const DROPS_ALL: [&[u8]; 2] = [b"DISCARD ALL", b"DEALLOCATE ALL"];
/// SQLSTATE of `cached plan must not change result type` (feature_not_supported).
const CACHED_PLAN_CHANGED: &[u8] = b"0A000";

#[derive(Debug, thiserror::Error)]
pub enum PreparedError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("prepared statement \"{0}\" does not exist")]
    Reserved(String),
}

/// One distinct (query text, parameter types), shared by every client of a pool that
/// prepares it.
pub struct Stmt {
    id: u64,
    /// `_sl<id>`, NUL-terminated.
    name: Box<[u8]>,
    /// The Parse body after the statement name: query, parameter count and types.
    tail: Arc<[u8]>,
    /// The server reported `cached plan must not change result type` for it: PostgreSQL
    /// keeps failing such a statement until it is prepared again, so it is never prepared
    /// anew under this name (that would answer with rows the client's description does not
    /// match); a new Parse of the same text gets a new statement.
    retired: AtomicBool,
}

impl Stmt {
    fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    fn write_parse(&self, out: &mut BytesMut) {
        put_message(out, b'P', |b| {
            b.put_slice(&self.name);
            b.put_slice(&self.tail);
        });
    }

    fn write_close(&self, out: &mut BytesMut) {
        put_message(out, b'C', |b| {
            b.put_u8(b'S');
            b.put_slice(&self.name);
        });
    }
}

/// A pool's statements by their Parse tail. Entries live while a client or server
/// connection refers to them.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Arc<[u8]>, Weak<Stmt>>>,
    next_id: AtomicU64,
    /// Map size after the last sweep of dead entries.
    swept: AtomicU64,
}

impl Registry {
    fn get_or_insert(&self, tail: &[u8]) -> Arc<Stmt> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(tail).and_then(Weak::upgrade) {
            return s;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut name = Vec::with_capacity(SERVER_PREFIX.len() + 21);
        name.extend_from_slice(SERVER_PREFIX);
        name.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
        name.push(0);
        let tail: Arc<[u8]> = Arc::from(tail);
        let stmt = Arc::new(Stmt {
            id,
            name: name.into_boxed_slice(),
            tail: tail.clone(),
            retired: AtomicBool::new(false),
        });
        map.insert(tail, Arc::downgrade(&stmt));
        // Amortised: sweep dead entries whenever the map doubles.
        let swept = self.swept.load(Ordering::Relaxed);
        if map.len() as u64 > 2 * swept.max(512) {
            map.retain(|_, w| w.strong_count() > 0);
            self.swept.store(map.len() as u64, Ordering::Relaxed);
        }
        stmt
    }

    /// Takes a statement whose result type changed out of the map.
    fn retire(&self, stmt: &Stmt) {
        stmt.retired.store(true, Ordering::Relaxed);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&stmt.tail)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), stmt))
        {
            map.remove(&stmt.tail);
        }
    }

    /// Distinct statements alive (for tests and `/status`).
    pub fn len(&self) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Cached {
    stmt: Arc<Stmt>,
    used: u64,
    /// When it was (believed) prepared: a skipped Parse forgets only its own insertion.
    since: u64,
}

/// The statements one server connection has prepared, least recently used evicted first.
#[derive(Default)]
pub struct ServerStatements {
    map: HashMap<u64, Cached>,
    tick: u64,
}

enum Lookup {
    Hit,
    Missing,
}

impl ServerStatements {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn lookup(&mut self, stmt: &Stmt) -> Lookup {
        self.tick += 1;
        match self.map.get_mut(&stmt.id) {
            Some(c) => {
                c.used = self.tick;
                Lookup::Hit
            }
            None => Lookup::Missing,
        }
    }

    fn insert(&mut self, stmt: &Arc<Stmt>) -> u64 {
        self.tick += 1;
        self.map.insert(
            stmt.id,
            Cached {
                stmt: stmt.clone(),
                used: self.tick,
                since: self.tick,
            },
        );
        self.tick
    }

    /// A Parse that failed or was skipped: the server does not have it, unless something
    /// since (a Close that did not run) says otherwise.
    fn forget(&mut self, stmt: &Stmt, since: u64) {
        if self.map.get(&stmt.id).is_some_and(|c| c.since == since) {
            self.map.remove(&stmt.id);
        }
    }

    fn least_recent(&self) -> Option<u64> {
        self.map.values().min_by_key(|c| c.used).map(|c| c.stmt.id)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    /// The client sent it: its answer goes to the client.
    Forward,
    /// sidelight injected it: its answer is swallowed.
    Skip,
    /// Not sent: sidelight answers it when it reaches the front.
    Fake,
}

/// One message sent to the server (or answered by sidelight), in order.
struct Slot {
    tag: u8,
    action: Action,
    stmt: Option<Arc<Stmt>>,
    /// The client's statement name, for a Parse or Close that must be undone when skipped.
    name: Option<Box<[u8]>>,
    /// Parse: its insertion into the server's statements. Injected Close: 1 when the server
    /// surely had the statement (so it still does if the Close is skipped), else 0.
    token: u64,
}

impl Slot {
    fn plain(tag: u8) -> Slot {
        Slot {
            tag,
            action: Action::Forward,
            stmt: None,
            name: None,
            token: 0,
        }
    }
}

/// One client's statements and the order of answers owed on its server connection.
pub struct ClientStatements {
    max: usize,
    names: HashMap<Box<[u8]>, Arc<Stmt>>,
    slots: VecDeque<Slot>,
    /// The server reported an error and skips to the next Sync.
    failed: bool,
    /// The server is in COPY FROM STDIN: Sync and Flush are ignored until CopyDone/Fail.
    copy_in: bool,
    /// An answer that matched no slot: the bookkeeping cannot be trusted any more.
    desync: bool,
    /// Placeholders under client names to close after the next Sync (see the Parse of a
    /// name the client already has).
    placeholders: Vec<Box<[u8]>>,
    /// Bytes to send to the server in place of the message just scanned.
    pub scratch: BytesMut,
}

/// What to do with a client message.
pub enum ClientStep {
    /// The whole message (from its header) is not buffered yet and must be.
    Need(usize),
    /// Send `scratch` in place of the first `n` bytes of the message (0: the whole message
    /// passes after whatever `scratch` holds).
    Replace(usize),
}

fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

fn name_string(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl ClientStatements {
    pub fn new(max: usize) -> ClientStatements {
        ClientStatements {
            max,
            names: HashMap::new(),
            slots: VecDeque::with_capacity(16),
            failed: false,
            copy_in: false,
            desync: false,
            placeholders: Vec::new(),
            scratch: BytesMut::with_capacity(256),
        }
    }

    /// True when every answer owed has been given and the bookkeeping is sound: the server
    /// connection can go to another client.
    pub fn settled(&self) -> bool {
        !self.owed() && !self.desync
    }

    /// Answers are still owed (and can be trusted to come).
    pub fn busy(&self) -> bool {
        self.owed() && !self.desync
    }

    /// A CopyDone/CopyFail left behind a COPY the server already ended gets no answer.
    fn owed(&self) -> bool {
        self.slots.iter().any(|s| !matches!(s.tag, b'c' | b'f'))
    }

    /// Forgets what was owed on a server connection that is being given up.
    pub fn reset(&mut self) {
        self.slots.clear();
        self.failed = false;
        self.copy_in = false;
        self.desync = false;
    }

    /// Synthesized answers are due (the front of the queue is one of them).
    pub fn fakes_due(&self) -> bool {
        self.slots.front().is_some_and(|s| s.action == Action::Fake)
    }

    /// Scans one client message; `msg` starts at its header and holds what is buffered.
    pub fn client_message(
        &mut self,
        tag: u8,
        msg: &[u8],
        len: usize,
        server: &mut ServerStatements,
        registry: &Registry,
        m: &PoolMetrics,
    ) -> Result<ClientStep, PreparedError> {
        let whole = 5 + len;
        let complete = msg.len() >= whole;
        match tag {
            b'P' => {
                if !complete {
                    return Ok(ClientStep::Need(whole));
                }
                let (name, tail) =
                    split_cstr(&msg[5..whole]).ok_or(FrameError::Malformed("Parse"))?;
                if name.is_empty() {
                    self.slots.push_back(Slot::plain(b'P'));
                    return Ok(ClientStep::Replace(0));
                }
                m.ps_client_parses.inc();
                if self.names.contains_key(name) {
                    // PostgreSQL parses first, then finds the name taken (42P05), and then
                    // skips to Sync. The server does exactly that when a placeholder holds
                    // the client's own name; the placeholder is closed after the Sync.
                    put_message(&mut self.scratch, b'P', |b| {
                        put_bytes_cstr(b, name);
                        b.put_slice(b"SELECT NULL\0\0\0");
                    });
                    self.slots.push_back(Slot {
                        action: Action::Skip,
                        ..Slot::plain(b'P')
                    });
                    self.slots.push_back(Slot::plain(b'P'));
                    self.placeholders.push(name.into());
                    return Ok(ClientStep::Replace(0));
                }
                let stmt = registry.get_or_insert(tail);
                self.names.insert(name.into(), stmt.clone());
                let action = match server.lookup(&stmt) {
                    Lookup::Hit => {
                        m.ps_hits.inc();
                        Action::Fake
                    }
                    Lookup::Missing => {
                        self.close_if_closing(&stmt);
                        Action::Forward
                    }
                };
                let mut token = 0;
                if action == Action::Forward {
                    m.ps_server_parses.inc();
                    stmt.write_parse(&mut self.scratch);
                    token = server.insert(&stmt);
                }
                self.slots.push_back(Slot {
                    tag: b'P',
                    action,
                    stmt: Some(stmt),
                    name: Some(name.into()),
                    token,
                });
                Ok(ClientStep::Replace(whole))
            }
            b'B' => {
                let avail = &msg[5..msg.len().min(whole)];
                let names = split_cstr(avail)
                    .and_then(|(portal, rest)| split_cstr(rest).map(|(name, _)| (portal, name)));
                let Some((portal, name)) = names else {
                    if complete {
                        return Err(FrameError::Malformed("Bind").into());
                    }
                    return Ok(ClientStep::Need(whole));
                };
                let Some(stmt) = self.lookup_name(name)? else {
                    self.slots.push_back(Slot::plain(b'B'));
                    return Ok(ClientStep::Replace(0));
                };
                self.ensure_on_server(&stmt, server, m);
                let consumed = 5 + portal.len() + 1 + name.len() + 1;
                let new_len = len - name.len() - 1 + stmt.name.len();
                self.scratch.put_u8(b'B');
                self.scratch
                    .put_i32(i32::try_from(new_len + 4).unwrap_or(i32::MAX));
                put_bytes_cstr(&mut self.scratch, portal);
                self.scratch.put_slice(&stmt.name);
                self.slots.push_back(Slot {
                    tag: b'B',
                    action: Action::Forward,
                    stmt: Some(stmt),
                    name: None,
                    token: 0,
                });
                Ok(ClientStep::Replace(consumed))
            }
            b'D' | b'C' => {
                if !complete {
                    return Ok(ClientStep::Need(whole));
                }
                let body = &msg[5..whole];
                let (kind, rest) = body
                    .split_first()
                    .ok_or(FrameError::Malformed("Describe"))?;
                let (name, _) = split_cstr(rest).ok_or(FrameError::Malformed("Describe"))?;
                if *kind != b'S' || name.is_empty() {
                    self.slots.push_back(Slot::plain(tag));
                    return Ok(ClientStep::Replace(0));
                }
                if tag == b'C' {
                    // Other clients may share the server-side statement: only the name goes.
                    let stmt = self.names.remove(name);
                    self.slots.push_back(Slot {
                        tag: b'C',
                        action: Action::Fake,
                        stmt,
                        name: Some(name.into()),
                        token: 0,
                    });
                    return Ok(ClientStep::Replace(whole));
                }
                let Some(stmt) = self.lookup_name(name)? else {
                    self.slots.push_back(Slot::plain(b'D'));
                    return Ok(ClientStep::Replace(0));
                };
                self.ensure_on_server(&stmt, server, m);
                put_message(&mut self.scratch, b'D', |b| {
                    b.put_u8(b'S');
                    b.put_slice(&stmt.name);
                });
                self.slots.push_back(Slot {
                    tag: b'D',
                    action: Action::Forward,
                    stmt: Some(stmt),
                    name: None,
                    token: 0,
                });
                Ok(ClientStep::Replace(whole))
            }
            b'S' => {
                if !complete {
                    return Ok(ClientStep::Need(whole));
                }
                // Evicted statements are closed at the end of the pipeline, so no portal of
                // the pipeline loses its statement before it runs.
                while server.len() > self.max {
                    let Some(id) = server.least_recent() else {
                        break;
                    };
                    let Some(c) = server.map.remove(&id) else {
                        break;
                    };
                    m.ps_evictions.inc();
                    self.close_on_server(&c.stmt, 1);
                }
                self.slots.push_back(Slot::plain(b'S'));
                if self.placeholders.is_empty() {
                    return Ok(ClientStep::Replace(0));
                }
                // The Sync, then the placeholders' Close (run whatever failed before) and a
                // Flush so their answers come now.
                self.scratch.put_slice(&msg[..whole]);
                for name in std::mem::take(&mut self.placeholders) {
                    put_message(&mut self.scratch, b'C', |b| {
                        b.put_u8(b'S');
                        put_bytes_cstr(b, &name);
                    });
                    self.slots.push_back(Slot {
                        action: Action::Skip,
                        ..Slot::plain(b'C')
                    });
                }
                put_message(&mut self.scratch, b'H', |_| {});
                Ok(ClientStep::Replace(whole))
            }
            // CopyDone/CopyFail mark where the Syncs PostgreSQL ignores during COPY end.
            b'E' | b'Q' | b'F' | b'c' | b'f' => {
                self.slots.push_back(Slot::plain(tag));
                Ok(ClientStep::Replace(0))
            }
            // Flush and CopyData: no answer of their own.
            _ => Ok(ClientStep::Replace(0)),
        }
    }

    fn lookup_name(&self, name: &[u8]) -> Result<Option<Arc<Stmt>>, PreparedError> {
        if name.is_empty() {
            return Ok(None);
        }
        match self.names.get(name) {
            Some(s) => Ok(Some(s.clone())),
            // Unknown names pass unchanged, so the server's own "does not exist" answers.
            None if name.starts_with(SERVER_PREFIX) => {
                Err(PreparedError::Reserved(name_string(name)))
            }
            None => Ok(None),
        }
    }

    /// Injects a Close of a server statement; its CloseComplete is swallowed.
    fn close_on_server(&mut self, stmt: &Arc<Stmt>, token: u64) {
        stmt.write_close(&mut self.scratch);
        self.slots.push_back(Slot {
            tag: b'C',
            action: Action::Skip,
            stmt: Some(stmt.clone()),
            name: None,
            token,
        });
    }

    /// An eviction Close of `stmt` still unanswered may yet be skipped (an error earlier in its
    /// pipeline): closing again first is harmless (closing a missing statement is no error)
    /// and keeps the Parse from finding it still there.
    fn close_if_closing(&mut self, stmt: &Arc<Stmt>) {
        let closing = self.slots.iter().any(|s| {
            s.tag == b'C'
                && s.action == Action::Skip
                && s.stmt.as_ref().is_some_and(|c| Arc::ptr_eq(c, stmt))
        });
        if closing {
            self.close_on_server(stmt, 0);
        }
    }

    /// Prepares `stmt` on the server connection first when it does not have it. A retired
    /// statement is not: the Bind then names a statement the connection lacks, and the
    /// server's `26000 ... does not exist` tells the client to prepare it again.
    fn ensure_on_server(
        &mut self,
        stmt: &Arc<Stmt>,
        server: &mut ServerStatements,
        m: &PoolMetrics,
    ) {
        match server.lookup(stmt) {
            Lookup::Hit => {
                m.ps_hits.inc();
                return;
            }
            Lookup::Missing if stmt.retired() => return,
            Lookup::Missing => self.close_if_closing(stmt),
        }
        m.ps_server_parses.inc();
        stmt.write_parse(&mut self.scratch);
        let token = server.insert(stmt);
        self.slots.push_back(Slot {
            tag: b'P',
            action: Action::Skip,
            stmt: Some(stmt.clone()),
            name: None,
            token,
        });
    }

    /// Accounts for one server message; `body` is what is buffered of it (whole for
    /// ReadyForQuery, small ErrorResponses and CommandCompletes). True: do not pass it on.
    pub fn server_message(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut ServerStatements,
        registry: &Registry,
    ) -> bool {
        if !self.copy_in {
            self.drop_copy_markers();
        }
        match tag {
            b'1' => self.pop_answer(b'P'),
            b'2' => self.pop_answer(b'B'),
            b'3' => self.pop_answer(b'C'),
            b'T' | b'n' if self.front_is(b'D') => self.pop_answer(b'D'),
            b'C' => {
                if self.copy_in {
                    self.copy_in = false;
                    self.clear_until(b"cf", server);
                }
                let tag = body.strip_suffix(&[0]).unwrap_or(body);
                if DROPS_ALL.contains(&tag) {
                    // The server dropped every statement, other clients' too.
                    server.map.clear();
                    self.names.clear();
                }
                self.front_is(b'E') && self.pop_answer(b'E')
            }
            b'I' | b's' if self.front_is(b'E') => self.pop_answer(b'E'),
            b'G' | b'W' => {
                self.copy_in = true;
                false
            }
            b'E' => {
                if self.copy_in {
                    self.copy_in = false;
                    self.clear_until(b"cf", server);
                }
                self.failed = true;
                if messages::error_code(body) == Some(CACHED_PLAN_CHANGED) {
                    if let Some(slot) = self.slots.front().filter(|s| matches!(s.tag, b'B' | b'D'))
                    {
                        if let Some(stmt) = &slot.stmt {
                            // DDL changed its result type: the next Parse of the text gets a
                            // fresh statement, planned anew.
                            registry.retire(stmt);
                            tracing::debug!(
                                statement = stmt.id,
                                "cached plan changed; the next Parse prepares it anew"
                            );
                        }
                    }
                }
                false
            }
            b'Z' => {
                self.drop_copy_markers();
                if self
                    .slots
                    .front()
                    .is_some_and(|s| matches!(s.tag, b'S' | b'Q' | b'F'))
                {
                    self.slots.pop_front();
                } else if self.failed {
                    self.clear_until(b"S", server);
                }
                self.failed = false;
                false
            }
            _ => false,
        }
    }

    fn front_is(&self, tag: u8) -> bool {
        self.slots.front().is_some_and(|s| s.tag == tag)
    }

    /// Pops the slot an answer belongs to; true when the answer is to be swallowed.
    fn pop_answer(&mut self, tag: u8) -> bool {
        match self.slots.front() {
            Some(s) if s.tag == tag && s.action != Action::Fake => {
                let skip = s.action == Action::Skip;
                self.slots.pop_front();
                skip
            }
            _ => {
                tracing::warn!(answer_to = %char::from(tag), "server answer matches no request; the server connection will be closed");
                self.desync = true;
                false
            }
        }
    }

    /// CopyDone/CopyFail get no answer of their own; outside COPY they only mark the end of
    /// data the server already gave up on.
    fn drop_copy_markers(&mut self) {
        while self
            .slots
            .front()
            .is_some_and(|s| matches!(s.tag, b'c' | b'f'))
        {
            self.slots.pop_front();
        }
    }

    /// Drops slots the server will not answer (skipped after an error, or ignored in COPY),
    /// through the first of `until`, undoing what each would have done.
    fn clear_until(&mut self, until: &[u8], server: &mut ServerStatements) {
        while let Some(slot) = self.slots.pop_front() {
            match (slot.tag, slot.action, &slot.stmt) {
                (b'P', action, Some(stmt)) => {
                    if action != Action::Fake {
                        server.forget(stmt, slot.token);
                    }
                    if let Some(name) = &slot.name {
                        if self.names.get(name).is_some_and(|s| Arc::ptr_eq(s, stmt)) {
                            self.names.remove(name);
                        }
                    }
                }
                // An eviction Close that did not run: the server still has the statement.
                (b'C', Action::Skip, Some(stmt)) if slot.token == 1 => {
                    server.insert(stmt);
                }
                // A client's Close that PostgreSQL would have skipped: the name stays.
                (b'C', Action::Fake, Some(stmt)) => {
                    if let Some(name) = slot.name {
                        self.names.entry(name).or_insert_with(|| stmt.clone());
                    }
                }
                _ => {}
            }
            if until.contains(&slot.tag) {
                break;
            }
        }
    }

    /// The synthesized answers now due (ParseComplete, CloseComplete), in `scratch`; the
    /// caller clears it.
    pub fn take_fakes(&mut self) -> &[u8] {
        self.scratch.clear();
        while let Some(slot) = self.slots.front() {
            if slot.action != Action::Fake {
                break;
            }
            let answer = if slot.tag == b'P' { b'1' } else { b'3' };
            self.scratch.put_slice(&[answer, 0, 0, 0, 4]);
            self.slots.pop_front();
        }
        &self.scratch
    }
}

fn put_bytes_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// Inserts `bytes` into `buf` at `at` (the unscanned tail moves right).
pub fn insert_at(buf: &mut BytesMut, at: usize, bytes: &[u8]) {
    let tail = buf.len() - at;
    buf.extend_from_slice(bytes);
    if tail > 0 {
        buf[at..].rotate_right(bytes.len());
    }
}

/// Removes `n` bytes of `buf` at `at`.
pub fn remove_at(buf: &mut BytesMut, at: usize, n: usize) {
    if at == 0 {
        bytes::Buf::advance(buf, n);
    } else {
        buf.copy_within(at + n.., at);
        buf.truncate(buf.len() - n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> PoolMetrics {
        let m = crate::metrics::Metrics::new();
        m.pg.init_pool("t");
        m.pg.pool("t")
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn step(
        c: &mut ClientStatements,
        s: &mut ServerStatements,
        r: &Registry,
        m: &PoolMetrics,
        bytes: &[u8],
    ) -> (usize, Vec<u8>) {
        let len = bytes.len() - 5;
        match c.client_message(bytes[0], bytes, len, s, r, m) {
            Ok(ClientStep::Replace(n)) => {
                let out = c.scratch.to_vec();
                c.scratch.clear();
                (n, out)
            }
            Ok(ClientStep::Need(_)) => panic!("whole message given"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bind_is_rewritten_and_prepared_first() {
        let (r, m) = (Registry::default(), metrics());
        let mut s = ServerStatements::default();
        let mut c = ClientStatements::new(10);
        let (n, out) = step(&mut c, &mut s, &r, &m, &msg(b'P', b"s0\0select 1\0\0\0"));
        assert_eq!(n, 19);
        assert_eq!(out, msg(b'P', b"_sl1\0select 1\0\0\0"));
        // Bind: only the names are taken; parameters stream after the rewritten prefix.
        let bind = msg(b'B', b"\0s0\0\0\0\0\0\0\0");
        let (n, out) = step(&mut c, &mut s, &r, &m, &bind);
        assert_eq!(n, 5 + 1 + 3);
        let mut want = msg(b'B', b"\0_sl1\0\0\0\0\0\0\0");
        want.truncate(5 + 1 + 5);
        assert_eq!(out, want);
        // Another client's Parse of the same text on this connection is answered by us.
        let mut c2 = ClientStatements::new(10);
        let (n, out) = step(&mut c2, &mut s, &r, &m, &msg(b'P', b"x\0select 1\0\0\0"));
        assert_eq!((n, out.len()), (18, 0));
        assert!(c2.fakes_due());
        assert_eq!(c2.take_fakes(), &[b'1', 0, 0, 0, 4]);
        c2.scratch.clear();
        // A fresh server connection: the Bind brings its Parse along, whose answer is ours.
        let mut s2 = ServerStatements::default();
        let (_, out) = step(&mut c2, &mut s2, &r, &m, &msg(b'B', b"\0x\0\0\0\0\0\0\0"));
        assert!(out.starts_with(&msg(b'P', b"_sl1\0select 1\0\0\0")));
        assert!(
            c2.server_message(b'1', b"", &mut s2, &r),
            "injected ParseComplete swallowed"
        );
        assert!(
            !c2.server_message(b'2', b"", &mut s2, &r),
            "BindComplete passed on"
        );
        assert!(c2.settled());
    }

    #[test]
    fn errors_roll_back_skipped_parses() {
        let (r, m) = (Registry::default(), metrics());
        let mut s = ServerStatements::default();
        let mut c = ClientStatements::new(10);
        step(&mut c, &mut s, &r, &m, &msg(b'P', b"a\0selec\0\0\0"));
        step(&mut c, &mut s, &r, &m, &msg(b'S', b""));
        assert_eq!(s.len(), 1, "optimistic");
        assert!(!c.server_message(b'E', b"C42601\0\0", &mut s, &r));
        assert!(!c.server_message(b'Z', b"I", &mut s, &r));
        assert!(c.settled());
        assert_eq!(s.len(), 0, "the failed statement is not on the server");
        assert!(c.names.is_empty(), "the name is free again");
    }

    #[test]
    fn evictions_close_the_least_recent_at_sync() {
        let (r, m) = (Registry::default(), metrics());
        let mut s = ServerStatements::default();
        let mut c = ClientStatements::new(1);
        step(&mut c, &mut s, &r, &m, &msg(b'P', b"a\0select 1\0\0\0"));
        step(&mut c, &mut s, &r, &m, &msg(b'P', b"b\0select 2\0\0\0"));
        let (n, out) = step(&mut c, &mut s, &r, &m, &msg(b'S', b""));
        assert_eq!(n, 0);
        assert_eq!(out, msg(b'C', b"S_sl1\0"));
        assert_eq!(s.len(), 1);
        assert_eq!(m.ps_evictions.get(), 1);
    }

    #[test]
    fn splicing_helpers() {
        let mut b = BytesMut::from(&b"abcdef"[..]);
        insert_at(&mut b, 2, b"XY");
        assert_eq!(&b[..], b"abXYcdef");
        remove_at(&mut b, 2, 2);
        assert_eq!(&b[..], b"abcdef");
        remove_at(&mut b, 0, 1);
        assert_eq!(&b[..], b"bcdef");
    }
}
