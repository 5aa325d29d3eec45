//! Request coalescing: identical in-flight requests share one upstream call (Pingora's cache
//! lock, extended to streams).
//!
//! The first request of a key starts a *flight*: a task that calls the upstream and records the
//! response head and body chunks as they arrive. Every client of that key, the first included,
//! is a subscriber that reads the flight from the first chunk at its own pace, so a client that
//! joins mid-stream gets everything so far at once and then the live chunks as they come. The
//! upstream call belongs to the flight, not to any client: it continues while anyone still
//! reads, and is cancelled when the last subscriber goes away. Chunks every subscriber has read
//! are dropped unless the response is being kept for the cache, and past `max_buffer` a flight
//! takes no new subscribers (they go upstream on their own).

use super::key::CacheKey;
use crate::error::ProxyError;
use crate::http::body::ProxyBody;
use crate::service::ProxyFuture;
use crate::BoxError;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::Notify;

/// What the flight hands over when it is done, for the cache to store.
pub struct Completed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub chunks: Vec<Bytes>,
}

/// Decides, once the head is known, whether the whole body should be kept for the cache.
pub type KeepFor = Box<dyn FnOnce(StatusCode, &HeaderMap) -> bool + Send>;
/// Receives the complete response of a flight that was kept and ended cleanly.
pub type OnComplete = Box<dyn FnOnce(Completed) + Send>;

#[derive(Default)]
struct State {
    head: Option<Result<(StatusCode, HeaderMap), ProxyError>>,
    /// Chunks from absolute index `base` on.
    chunks: Vec<Bytes>,
    base: usize,
    buffered: usize,
    /// `Some(Ok)` at a clean end, `Some(Err)` when the body failed.
    end: Option<Result<(), ProxyError>>,
    /// Subscriber id -> index of the next chunk it will read.
    cursors: HashMap<u64, usize>,
    next_id: u64,
    /// Keep every chunk for the cache (until the response proves too large).
    keep: bool,
    /// No new subscribers: the buffer grew past `max_buffer`, or the flight ended.
    closed: bool,
}

pub struct Flight {
    state: Mutex<State>,
    /// Woken on every change a subscriber may wait for.
    progress: Notify,
    /// Woken when the last subscriber leaves.
    deserted: Notify,
    /// Woken when subscribers have read enough for buffered chunks to be dropped.
    drained: Notify,
    max_buffer: usize,
    max_keep: usize,
}

impl Flight {
    fn new(max_buffer: usize, max_keep: usize) -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(State::default()),
            progress: Notify::new(),
            deserted: Notify::new(),
            drained: Notify::new(),
            max_buffer,
            max_keep,
        })
    }

    fn first_subscriber(self: &Arc<Self>) -> Subscriber {
        let mut s = self.lock();
        s.cursors.insert(0, 0);
        s.next_id = 1;
        Subscriber {
            flight: self.clone(),
            id: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(self: &Arc<Self>) -> Option<Subscriber> {
        let mut s = self.lock();
        if s.closed || s.base > 0 {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        s.cursors.insert(id, 0);
        Some(Subscriber {
            flight: self.clone(),
            id,
        })
    }

    fn set_head(&self, head: Result<(StatusCode, HeaderMap), ProxyError>) {
        let mut s = self.lock();
        if head.is_err() {
            s.closed = true;
            s.end = Some(Ok(()));
        }
        s.head = Some(head);
        drop(s);
        self.progress.notify_waiters();
    }

    fn push(&self, chunk: Bytes) {
        let mut s = self.lock();
        s.buffered += chunk.len();
        s.chunks.push(chunk);
        if s.keep && s.buffered > self.max_keep {
            s.keep = false;
        }
        if s.buffered > self.max_buffer {
            s.closed = true;
        }
        trim(&mut s);
        drop(s);
        self.progress.notify_waiters();
    }

    /// True while more unread body is buffered than allowed: the upstream read waits, so a
    /// slow client slows the upstream (backpressure) instead of growing memory.
    fn over_limit(&self) -> bool {
        let s = self.lock();
        !s.keep && s.buffered > self.max_buffer
    }

    fn finish(&self, end: Result<(), ProxyError>) -> Option<Vec<Bytes>> {
        let mut s = self.lock();
        s.closed = true;
        let kept = (end.is_ok() && s.keep && s.base == 0).then(|| s.chunks.clone());
        s.end = Some(end);
        drop(s);
        self.progress.notify_waiters();
        kept
    }
}

/// Drops chunks every subscriber has read, unless they are kept for the cache or for clients
/// that may still join (who must get the stream from its first chunk).
fn trim(s: &mut State) {
    if s.keep || !s.closed {
        return;
    }
    let low = s
        .cursors
        .values()
        .copied()
        .min()
        .unwrap_or(s.base + s.chunks.len());
    let drop_n = low.saturating_sub(s.base).min(s.chunks.len());
    if drop_n > 0 {
        let freed: usize = s.chunks.drain(..drop_n).map(|c| c.len()).sum();
        s.buffered -= freed;
        s.base += drop_n;
    }
}

/// One client reading a flight.
pub struct Subscriber {
    flight: Arc<Flight>,
    id: u64,
}

enum Step {
    Chunk(Bytes),
    End,
    Failed(ProxyError),
    Wait,
}

impl Subscriber {
    /// Waits for the response head (or the error that replaced it).
    pub async fn head(&self) -> Result<(StatusCode, HeaderMap), ProxyError> {
        loop {
            let notified = self.flight.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(head) = &self.flight.lock().head {
                return head.clone();
            }
            notified.await;
        }
    }

    fn step(&self) -> Step {
        let mut s = self.flight.lock();
        let cursor = s.cursors.get(&self.id).copied().unwrap_or(0);
        if let Some(chunk) = cursor
            .checked_sub(s.base)
            .and_then(|i| s.chunks.get(i))
            .cloned()
        {
            s.cursors.insert(self.id, cursor + 1);
            let before = s.buffered;
            trim(&mut s);
            let freed = s.buffered < before;
            drop(s);
            if freed {
                self.flight.drained.notify_waiters();
            }
            return Step::Chunk(chunk);
        }
        match &s.end {
            Some(Ok(())) => Step::End,
            Some(Err(e)) => Step::Failed(e.clone()),
            None => Step::Wait,
        }
    }

    async fn next(&self) -> Step {
        loop {
            let notified = self.flight.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.step() {
                Step::Wait => notified.await,
                other => return other,
            }
        }
    }

    /// The body: every chunk from the first, then live ones, ending as the upstream's did.
    pub fn into_body(self) -> ProxyBody {
        let stream = futures_util::stream::unfold(Some(self), |sub| async move {
            let sub = sub?;
            match sub.next().await {
                Step::Chunk(c) => Some((Ok(Frame::data(c)), Some(sub))),
                Step::Failed(e) => Some((Err(BoxError::from(e)), None)),
                Step::End | Step::Wait => None,
            }
        });
        StreamBody::new(stream).boxed_unsync()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let mut s = self.flight.lock();
        s.cursors.remove(&self.id);
        let empty = s.cursors.is_empty();
        trim(&mut s);
        drop(s);
        self.flight.drained.notify_waiters();
        if empty {
            self.flight.deserted.notify_waiters();
        }
    }
}

/// The in-flight requests of one process, by key.
#[derive(Default)]
pub struct Coalescer {
    flights: Mutex<HashMap<CacheKey, Weak<Flight>>>,
}

pub enum Joined {
    /// This request started the flight.
    Leader(Subscriber),
    /// This request shares a flight already under way.
    Follower(Subscriber),
}

impl Coalescer {
    /// Joins the flight for `key`, or starts one with `call` (which is then spawned and owned by
    /// the flight, not by this request).
    /// With `background`, the flight runs to its end even when every client has left (a
    /// stale-while-revalidate refresh).
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        &self,
        key: CacheKey,
        max_buffer: usize,
        max_keep: usize,
        call: impl FnOnce() -> ProxyFuture,
        keep_for: KeepFor,
        on_complete: OnComplete,
        background: bool,
    ) -> Joined {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = flights.get(&key).and_then(Weak::upgrade) {
            if let Some(sub) = flight.subscribe() {
                return Joined::Follower(sub);
            }
        }
        let flight = Flight::new(max_buffer, max_keep);
        let leader = flight.first_subscriber();
        flights.insert(key, Arc::downgrade(&flight));
        // Forget flights whose every client and task has gone.
        flights.retain(|_, f| f.strong_count() > 0);
        drop(flights);
        tokio::spawn(fly(flight, call(), keep_for, on_complete, background));
        Joined::Leader(leader)
    }

    /// A flight nobody else can join (the client asked for its own upstream call).
    pub fn solo(
        max_keep: usize,
        call: ProxyFuture,
        keep_for: KeepFor,
        on_complete: OnComplete,
    ) -> Subscriber {
        let flight = Flight::new(0, max_keep);
        let sub = flight.first_subscriber();
        flight.lock().closed = true;
        tokio::spawn(fly(flight, call, keep_for, on_complete, false));
        sub
    }

    /// Flights currently under way (for `/status`).
    pub fn in_flight(&self) -> usize {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        flights.values().filter(|f| f.strong_count() > 0).count()
    }
}

/// Drives the upstream call of a flight until the body ends or nobody is listening.
async fn fly(
    flight: Arc<Flight>,
    call: ProxyFuture,
    keep_for: KeepFor,
    on_complete: OnComplete,
    background: bool,
) {
    // A background refresh runs to its end with nobody listening: its result is for the cache.
    // So does a response being kept for the cache once its head is in: the client that started
    // it may leave (an SDK closes right after a stream's last event), the answer is still
    // stored. Bounded by `max_keep` (past it the response is no longer kept) and the route's
    // upstream timeouts.
    let abandon = |f: &Flight| {
        let s = f.lock();
        !background && !s.keep && s.cursors.is_empty()
    };
    let deserted = flight.deserted.notified();
    tokio::pin!(deserted);
    deserted.as_mut().enable();
    let response = tokio::select! {
        r = call => r,
        _ = &mut deserted, if !background => return,
    };
    let (parts, mut body) = match response {
        Ok(response) => response.into_parts(),
        Err(e) => {
            flight.set_head(Err(e));
            return;
        }
    };
    flight.lock().keep = keep_for(parts.status, &parts.headers);
    flight.set_head(Ok((parts.status, parts.headers.clone())));
    loop {
        if abandon(&flight) {
            return;
        }
        // Backpressure: wait until subscribers catch up before reading more.
        loop {
            let drained = flight.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !flight.over_limit() {
                break;
            }
            tokio::select! {
                _ = drained => {}
                _ = &mut deserted, if !background => return,
            }
        }
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut deserted, if !background => {
                if abandon(&flight) {
                    return;
                }
                // Kept for the cache: read on with nobody listening.
                deserted.set(flight.deserted.notified());
                deserted.as_mut().enable();
                continue;
            }
        };
        match frame {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    flight.push(data);
                }
            }
            Some(Err(e)) => {
                let err = match e.downcast::<ProxyError>() {
                    Ok(e) => *e,
                    Err(e) => ProxyError::UpstreamBody {
                        upstream: String::new(),
                        detail: e.to_string(),
                    },
                };
                flight.finish(Err(err));
                return;
            }
        }
        // Re-arm: notify_waiters only wakes futures that exist when it is called.
        deserted.set(flight.deserted.notified());
        deserted.as_mut().enable();
    }
    if let Some(chunks) = flight.finish(Ok(())) {
        on_complete(Completed {
            status: parts.status,
            headers: parts.headers,
            chunks,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A response whose body produces 1 KiB chunks forever, counting how many were pulled.
    fn endless(pulled: Arc<AtomicUsize>) -> ProxyFuture {
        Box::pin(async move {
            let stream = futures_util::stream::unfold(pulled, |pulled| async move {
                pulled.fetch_add(1, Ordering::SeqCst);
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from(vec![0u8; 1024]))),
                    pulled,
                ))
            });
            Ok(http::Response::new(StreamBody::new(stream).boxed_unsync()))
        })
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_stops_the_upstream_read() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let sub = Coalescer::solo(
            0,
            endless(pulled.clone()),
            Box::new(|_, _| false),
            Box::new(|_| {}),
        );
        let (status, _) = sub.head().await.expect("head");
        assert_eq!(status, 200);
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert!(
            pulled.load(Ordering::SeqCst) <= 2,
            "pulled {} chunks nobody read",
            pulled.load(Ordering::SeqCst)
        );
        // Reading lets it go on, one chunk at a time.
        let mut body = sub.into_body();
        for _ in 0..10 {
            body.frame().await.expect("frame").expect("ok");
        }
        assert!(pulled.load(Ordering::SeqCst) <= 13);
    }

    #[tokio::test]
    async fn the_upstream_call_stops_when_the_last_client_leaves() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let sub = Coalescer::solo(
            0,
            endless(pulled.clone()),
            Box::new(|_, _| false),
            Box::new(|_| {}),
        );
        sub.head().await.expect("head");
        drop(sub);
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let after_leave = pulled.load(Ordering::SeqCst);
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            pulled.load(Ordering::SeqCst),
            after_leave,
            "nobody reads, nothing is pulled"
        );
    }
}
