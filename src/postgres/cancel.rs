//! Cancel requests. Each client gets sidelight's own BackendKeyData (a random pid, unique among
//! live clients, and a random secret); a CancelRequest with that key, arriving on a new
//! connection, is forwarded to the server connection the client holds at that moment, with
//! that server connection's own key, and to nothing else.
//!
//! Races. A client's slot records its current server connection and a generation that changes
//! on every attach and detach. The forwarder connects to the server first, then, under the
//! slot's lock, checks the generation and writes the 16 bytes without blocking; the session
//! detaches under the same lock before the connection goes back to the pool, so a cancel is
//! never written for a connection already serving someone else. While a cancel is in flight
//! (until the server closes the cancel connection, i.e. the postmaster has signalled the
//! backend) the session does not give its connection back, which also covers the window in
//! which a signal still travelling could hit the next client's query. What remains is
//! PostgreSQL's own race: a cancel sent just as the query finishes may hit the same client's
//! next query on that connection (or nothing, if the backend is idle by then).

use super::messages;
use super::server::ServerConn;
use crate::metrics::postgres::PoolMetrics;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Connecting to the server for a cancel, and waiting for it to close the cancel connection.
const CANCEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CANCEL_SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a cancel for the client's current query goes.
#[derive(Clone, Copy)]
struct Target {
    addr: SocketAddr,
    pid: i32,
    key: i32,
}

#[derive(Default)]
struct SlotState {
    target: Option<Target>,
    generation: u64,
}

/// Per pool, the outcomes of client cancel requests.
#[derive(Clone)]
pub struct CancelCounters {
    pub forwarded: IntCounter,
    pub no_server: IntCounter,
    pub error: IntCounter,
}

impl CancelCounters {
    pub fn of(m: &PoolMetrics) -> CancelCounters {
        CancelCounters {
            forwarded: m.cancel_forwarded.clone(),
            no_server: m.cancel_no_server.clone(),
            error: m.cancel_error.clone(),
        }
    }
}

struct Slot {
    secret: i32,
    state: Mutex<SlotState>,
    /// Cancels under way; read without the lock on every turn of the session loop.
    in_flight: AtomicU32,
    settled: Notify,
    counters: CancelCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The live clients' keys, process-wide (a cancel may arrive on any worker).
#[derive(Default)]
pub struct Registry {
    clients: Mutex<HashMap<i32, Arc<Slot>>>,
}

/// What became of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    /// The client holds no server connection (or gave it back before the cancel was sent).
    NoServer,
    UnknownKey,
    /// The server could not be reached.
    Error,
}

fn random_i32() -> i32 {
    let b = *uuid::Uuid::new_v4().as_bytes();
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Registry {
    /// A key for a new client, unregistered when the returned handle drops.
    pub fn register(self: &Arc<Self>, counters: CancelCounters) -> ClientKey {
        let slot = Arc::new(Slot {
            secret: random_i32(),
            state: Mutex::new(SlotState::default()),
            in_flight: AtomicU32::new(0),
            settled: Notify::new(),
            counters,
        });
        let mut clients = lock(&self.clients);
        let pid = loop {
            // Positive and non-zero, like a real backend pid.
            let pid = random_i32() & i32::MAX;
            if pid != 0 && !clients.contains_key(&pid) {
                break pid;
            }
        };
        clients.insert(pid, slot.clone());
        ClientKey {
            registry: self.clone(),
            pid,
            slot,
        }
    }

    /// Handles a CancelRequest that arrived on its own connection.
    pub async fn cancel(&self, pid: i32, secret: i32) -> Outcome {
        let slot = lock(&self.clients).get(&pid).cloned();
        let Some(slot) = slot.filter(|s| s.secret == secret) else {
            return Outcome::UnknownKey;
        };
        let outcome = match begin(&slot) {
            Some((target, generation)) => send(&slot, target, generation).await,
            None => Outcome::NoServer,
        };
        let c = &slot.counters;
        match outcome {
            Outcome::Forwarded => c.forwarded.inc(),
            Outcome::NoServer => c.no_server.inc(),
            Outcome::Error => c.error.inc(),
            Outcome::UnknownKey => {}
        }
        outcome
    }
}

/// The slot's current server connection, with a cancel counted in flight from now on.
fn begin(slot: &Slot) -> Option<(Target, u64)> {
    let st = lock(&slot.state);
    let target = st.target?;
    slot.in_flight.fetch_add(1, Ordering::AcqRel);
    Some((target, st.generation))
}

/// Sends a CancelRequest to `target` if the slot still holds it when the bytes go out; ends the
/// in-flight count `begin` started.
async fn send(slot: &Slot, target: Target, generation: u64) -> Outcome {
    let _in_flight = InFlight(slot);
    let stream =
        match tokio::time::timeout(CANCEL_CONNECT_TIMEOUT, TcpStream::connect(target.addr)).await {
            Ok(Ok(s)) => s,
            _ => return Outcome::Error,
        };
    let mut msg = [0u8; 16];
    msg[..4].copy_from_slice(&16i32.to_be_bytes());
    msg[4..8].copy_from_slice(&messages::CANCEL_REQUEST.to_be_bytes());
    msg[8..12].copy_from_slice(&target.pid.to_be_bytes());
    msg[12..].copy_from_slice(&target.key.to_be_bytes());
    {
        let st = lock(&slot.state);
        if st.generation != generation {
            return Outcome::NoServer;
        }
        // A fresh socket takes 16 bytes at once; anything else is an error, not a retry
        // outside the lock.
        match stream.try_write(&msg) {
            Ok(16) => {}
            _ => return Outcome::Error,
        }
    }
    // The postmaster closes the connection once it has signalled the backend.
    let mut stream = stream;
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(CANCEL_SETTLE_TIMEOUT, stream.read(&mut byte)).await;
    Outcome::Forwarded
}

/// Counts a cancel in flight; the session waits for it before giving its connection back.
struct InFlight<'a>(&'a Slot);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.settled.notify_one();
    }
}

/// One client's key, held by its session.
pub struct ClientKey {
    registry: Arc<Registry>,
    pid: i32,
    slot: Arc<Slot>,
}

impl ClientKey {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn secret(&self) -> i32 {
        self.slot.secret
    }

    /// The session now holds `conn`: cancels go there.
    pub fn attach(&self, conn: &ServerConn) {
        let mut st = lock(&self.slot.state);
        st.generation += 1;
        st.target = conn.addr.map(|addr| Target {
            addr,
            pid: conn.backend_pid,
            key: conn.backend_key,
        });
    }

    /// The session gives its connection up: call before it goes back to the pool.
    pub fn detach(&self) {
        let mut st = lock(&self.slot.state);
        st.generation += 1;
        st.target = None;
    }

    /// A cancel for this client's connection is on its way.
    pub fn in_flight(&self) -> bool {
        self.slot.in_flight.load(Ordering::Acquire) > 0
    }

    /// Resolves after a cancel in flight has been delivered (or given up).
    pub async fn settled(&self) {
        self.slot.settled.notified().await
    }

    /// sidelight's own cancel (query_timeout), sent in the background; false when the client
    /// holds no server connection. Counted in flight at once, so the connection stays put.
    pub fn cancel_current(&self) -> bool {
        let Some((target, generation)) = begin(&self.slot) else {
            return false;
        };
        let slot = self.slot.clone();
        tokio::spawn(async move {
            let outcome = send(&slot, target, generation).await;
            tracing::debug!(?outcome, "query_timeout cancel");
        });
        true
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        lock(&self.registry.clients).remove(&self.pid);
    }
}
