//! One client connection, from accept to close.
//!
//! HTTP/1.1 is served by sidelight's own loop, for the reason the upstream side has its own
//! client ([`super::client`]): hyper's server dispatcher costs more per request than the
//! rest of a proxied request's user-space work put together. Here one task does everything: the
//! request head is parsed straight off the connection's buffer, a request body reads the socket
//! as the route consumes it, and the response goes out from the same task, its head and body in
//! one write when the body is already there. Clients speaking h2c (prior knowledge) are handed
//! to hyper's HTTP/2 server.
//!
//! What a client sees follows hyper and nginx: keep-alive by default in HTTP/1.1 (opt-in in
//! 1.0), pipelined requests answered in order, `100 Continue` sent when the body is first read,
//! a malformed head answered with a JSON 400 (431 when too large) and the connection closed, a
//! client that hangs up cancels its request, and a stuck client gets
//! `limits.header_read_timeout` to send a head.

use super::framing::{
    chunk_size_line, chunked_is_final, fold_content_length, header_line, header_map, header_spans,
    length_line, poll_fill, span_in, BodyDecoder, Chunk, HeadFacts, MAX_HEADERS, MAX_HEAD_BYTES,
};
use super::framing::{BodyRead, Framing};
use crate::error::ProxyError;
use crate::http::body::{empty, BodyObserver, Observed, ProxyBody};
use crate::http::Peer;
use crate::metrics::listener::ProtocolErrors;
use crate::service::{ProxyRequest, ProxyResponse};
use crate::shutdown;
use crate::BoxError;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};

/// Request body bytes read and thrown away after an early answer, to keep the connection.
const DRAIN_LIMIT: u64 = 256 * 1024;
/// How long an unread request body may take to arrive before the connection is given up.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Data frames up to this size are copied next to the head (one write); larger go on their own.
const COPY_LIMIT: usize = 16 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What answers the requests a client connection reads: the route stack's entry.
pub trait Handler: Send + Sync + 'static {
    /// Answers `request`, which arrived on listener number `listener` from `peer`.
    fn handle(
        &self,
        request: ProxyRequest,
        listener: usize,
        peer: &Peer,
    ) -> Pin<Box<dyn Future<Output = ProxyResponse> + Send>>;
}

/// What a connection serves and for whom.
pub struct ClientContext<H: Handler> {
    pub handler: H,
    /// The listener's index in the config.
    pub listener: usize,
    pub peer: Peer,
    /// How long a request head may take, idle keep-alive time included (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long a request body may send nothing (`limits.client_body_timeout`).
    pub client_body_timeout: Duration,
    pub errors: ProtocolErrors,
}

/// Serves `stream` until the client leaves, the connection fails, or `stop` (then in-flight
/// requests finish first, and their responses say `connection: close`).
pub async fn serve<H: Handler>(
    stream: TcpStream,
    client: ClientContext<H>,
    stop: watch::Receiver<bool>,
) {
    let (read, write) = stream.into_split();
    let stopped = {
        let mut stop = stop.clone();
        Box::pin(async move { shutdown::stopped(&mut stop).await })
    };
    let conn = H1 {
        reader: Some(Reader {
            io: read,
            buf: BytesMut::new(),
        }),
        write,
        out: Vec::new(),
        client,
        stop,
        stopped: Some(stopped),
        stopping: false,
        unread: false,
        head_timer: None,
    };
    conn.run().await;
}

/// The read side of a connection and what it has read but not consumed.
struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

struct H1<H: Handler> {
    /// `None` while a request body has it.
    reader: Option<Reader>,
    write: OwnedWriteHalf,
    /// The response being written; kept for its capacity.
    out: Vec<u8>,
    client: ClientContext<H>,
    stop: watch::Receiver<bool>,
    /// Resolves when the listener stops; polled only while idle, then dropped.
    stopped: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    stopping: bool,
    /// Request bytes may still be arriving that nobody will read.
    unread: bool,
    /// Created the first time a head is waited for, then re-armed only when it fires early
    /// (a timer reset per request would cost more than the check).
    head_timer: Option<Pin<Box<Sleep>>>,
}

/// A parsed request head and what it says about the connection.
struct Head {
    request: Request<()>,
    body: BodyDecoder,
    keep_alive: bool,
    expect_continue: bool,
}

enum Waited {
    Data,
    Closed,
    Stop,
    Timeout,
}

/// A request body given back by its [`RequestBody`]: `rest` is `None` when it was read to its
/// end, else what is left of it (its reader was dropped early).
struct Returned {
    reader: Reader,
    rest: Option<BodyDecoder>,
    /// `100 Continue` was never sent: the client may be holding the body back.
    continue_owed: bool,
}

/// How the response in flight relates to the request it answers.
struct Answering {
    head_method: bool,
    http10: bool,
    keep_alive: bool,
    /// The request body while the route has it.
    away: Option<oneshot::Receiver<Returned>>,
    /// A request body dropped before its end, back with what is left of it.
    cut: Option<Returned>,
    /// Set once the response starts, after which the body must not write `100 Continue`.
    continue_gate: Option<Arc<AtomicBool>>,
}

/// What the answer depends on in the request it answers.
#[derive(Clone, Copy)]
struct AnswerTo {
    head_method: bool,
    http10: bool,
    keep_alive: bool,
}

impl Answering {
    fn new(to: AnswerTo) -> Self {
        Answering {
            head_method: to.head_method,
            http10: to.http10,
            keep_alive: to.keep_alive,
            away: None,
            cut: None,
            continue_gate: None,
        }
    }
}

impl<H: Handler> H1<H> {
    async fn run(mut self) {
        let mut first = true;
        loop {
            let head = match self.read_head(first).await {
                Ok(Some(head)) => head,
                Ok(None) => return,
                // Boxed, as the cold paths below: a task's allocation is as large as its
                // future's largest state, and every idle connection pays for it.
                Err(HeadError::H2) => return Box::pin(self.into_h2()).await,
                Err(HeadError::Bad(e)) => {
                    let errors = &self.client.errors;
                    match e {
                        ProxyError::HeadersTooLarge { .. } => errors.headers_too_large.inc(),
                        _ => errors.bad_request.inc(),
                    }
                    tracing::debug!(client = %self.client.peer.addr, error = %e, "unusable request head");
                    let _ = Box::pin(self.respond(
                        e.to_response(None),
                        Answering::new(AnswerTo {
                            head_method: false,
                            http10: false,
                            keep_alive: false,
                        }),
                    ))
                    .await;
                    self.unread = true;
                    return Box::pin(self.close()).await;
                }
            };
            first = false;
            let head_method = head.request.method() == Method::HEAD;
            let http10 = head.request.version() == Version::HTTP_10;
            let mut answering = Answering::new(AnswerTo {
                head_method,
                http10,
                keep_alive: head.keep_alive,
            });
            let request = match head.body {
                BodyDecoder::Done => head.request.map(|()| empty()),
                kind => {
                    let (tx, rx) = oneshot::channel();
                    let gate = head.expect_continue.then(Arc::default);
                    answering.continue_gate = gate.clone();
                    let body = RequestBody {
                        reader: self.reader.take(),
                        kind,
                        home: Some(tx),
                        continue_owed: head.expect_continue,
                        continue_gate: gate,
                        continue_sent: 0,
                        idle_timeout: self.client.client_body_timeout,
                        idle: None,
                    };
                    answering.away = Some(rx);
                    head.request.map(|()| body.boxed_unsync())
                }
            };
            let client = &self.client;
            let response = client
                .handler
                .handle(request, client.listener, &client.peer);
            let Some(response) = self.until_answered(response, &mut answering).await else {
                // The client hung up: dropping the response future cancels the request.
                return;
            };
            match Box::pin(self.respond(response, answering)).await {
                Ok(true) => {}
                Ok(false) => return Box::pin(self.close()).await,
                Err(e) => {
                    tracing::debug!(client = %self.client.peer.addr, error = %e, "writing a response failed");
                    return;
                }
            }
        }
    }

    /// Waits for the next request head. `Ok(None)`: the connection is done (closed by the
    /// client, idle at shutdown, or too slow).
    async fn read_head(&mut self, first: bool) -> Result<Option<Head>, HeadError> {
        let mut started: Option<Instant> = None;
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            if !reader.buf.is_empty() {
                if first && H2_PREFACE.starts_with(&reader.buf[..reader.buf.len().min(24)]) {
                    if reader.buf.len() >= H2_PREFACE.len() {
                        return Err(HeadError::H2);
                    }
                } else if let Some(head) = parse_head(&mut reader.buf)? {
                    return Ok(Some(head));
                }
            }
            let idle = reader.buf.is_empty();
            if idle && self.stopping {
                return Ok(None);
            }
            let deadline =
                *started.get_or_insert_with(Instant::now) + self.client.header_read_timeout;
            let stopped = &mut self.stopped;
            let timer = &mut self.head_timer;
            let out = &mut self.out;
            let waited = poll_fn(|cx| {
                match reader.poll_fill(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Waited::Closed),
                    Poll::Ready(Ok(_)) => return Poll::Ready(Waited::Data),
                    // An idle keep-alive connection holds no buffers while it waits: the next
                    // read allocates them again (issue 13: 22 KiB per idle connection before).
                    Poll::Pending if idle => {
                        reader.buf = BytesMut::new();
                        *out = Vec::new();
                    }
                    Poll::Pending => {}
                }
                if idle {
                    if let Some(stop) = stopped.as_mut() {
                        if stop.as_mut().poll(cx).is_ready() {
                            *stopped = None;
                            return Poll::Ready(Waited::Stop);
                        }
                    }
                }
                let sleep =
                    timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                while sleep.as_mut().poll(cx).is_ready() {
                    if sleep.deadline() >= deadline {
                        return Poll::Ready(Waited::Timeout);
                    }
                    sleep.as_mut().reset(deadline);
                }
                Poll::Pending
            })
            .await;
            match waited {
                Waited::Data => {}
                Waited::Closed => return Ok(None),
                Waited::Stop => {
                    self.stopping = true;
                    return Ok(None);
                }
                Waited::Timeout => {
                    self.client.errors.header_timeout.inc();
                    tracing::debug!(client = %self.client.peer.addr, "no request head within the header read timeout; closing");
                    return Ok(None);
                }
            }
        }
    }

    /// Runs `response` to its answer, watching the client meanwhile: `None` if it hung up.
    async fn until_answered(
        &mut self,
        mut response: Pin<Box<dyn Future<Output = ProxyResponse> + Send>>,
        answering: &mut Answering,
    ) -> Option<ProxyResponse> {
        let reader = &mut self.reader;
        poll_fn(|cx| {
            if let Poll::Ready(response) = response.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if client_gone(reader, answering, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// Writes `response`. `Ok(true)`: the connection can take another request.
    async fn respond(
        &mut self,
        response: ProxyResponse,
        mut answering: Answering,
    ) -> io::Result<bool> {
        if let Some(gate) = &answering.continue_gate {
            gate.store(true, Ordering::Release);
        }
        let (parts, mut body) = response.into_parts();
        if *self.stop.borrow() {
            self.stopping = true;
        }
        let mut keep_alive = answering.keep_alive && !self.stopping;
        self.out.clear();
        if self.out.capacity() == 0 {
            self.out.reserve(1024);
        }
        let framing = encode_head(
            &mut self.out,
            &parts,
            body.size_hint().exact(),
            &answering,
            &mut keep_alive,
        );

        let complete = if matches!(framing, Framing::Empty) || body.is_end_stream() {
            // Never polled, as hyper does; the body's own drop accounts for it.
            drop(body);
            self.body_ended(framing, framing.declared())
        } else {
            match self.write_body(&mut body, framing, &mut answering).await? {
                Some(complete) => complete,
                None => return Ok(false),
            }
        };
        if !self.out.is_empty() {
            self.write.write_all(&self.out).await?;
        }
        if !complete {
            return Ok(false);
        }
        // A large streamed response must not pin its buffer for the connection's lifetime.
        if self.out.capacity() > 4 * COPY_LIMIT {
            self.out = Vec::with_capacity(1024);
        }
        // Taken back even when closing: an unread body makes the close linger.
        let reusable = self.take_back(answering).await;
        Ok(keep_alive && reusable)
    }

    /// Writes the body after the head already in `out`. `Some(false)`: it ended short of its
    /// length or failed, so the message is incomplete; `None`: the client hung up.
    async fn write_body(
        &mut self,
        body: &mut ProxyBody,
        framing: Framing,
        answering: &mut Answering,
    ) -> io::Result<Option<bool>> {
        let mut left = framing.declared();
        loop {
            let polled = if self.out.is_empty() {
                // Nothing waits to go out: wait for the body, watching the client.
                let reader = &mut self.reader;
                let polled = poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                        return Poll::Ready(Some(frame));
                    }
                    if client_gone(reader, answering, cx) {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await;
                match polled {
                    Some(frame) => frame,
                    None => return Ok(None),
                }
            } else if self.out.len() >= 4 * COPY_LIMIT {
                self.write.write_all(&self.out).await?;
                self.out.clear();
                continue;
            } else {
                // Something waits: take what the body already has, else send what waits first.
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        self.write.write_all(&self.out).await?;
                        self.out.clear();
                        continue;
                    }
                }
            };
            let data = match polled {
                None => return Ok(Some(self.body_ended(framing, left))),
                Some(Err(e)) => {
                    // The stream broke: the client must see an incomplete message, so the
                    // connection closes without a last chunk.
                    tracing::debug!(client = %self.client.peer.addr, error = %crate::error::chain(e.as_ref()), "response body failed");
                    return Ok(Some(false));
                }
                // Trailers are not sent over HTTP/1 (hyper's server does the same).
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue,
                },
            };
            match framing {
                Framing::Length(_) => {
                    if data.len() as u64 > left {
                        tracing::debug!(client = %self.client.peer.addr, "response body longer than its content-length; cut");
                        return Ok(Some(false));
                    }
                    left -= data.len() as u64;
                }
                Framing::Chunked => chunk_size_line(data.len(), &mut self.out),
                _ => {}
            }
            if data.len() <= COPY_LIMIT {
                self.out.extend_from_slice(&data);
            } else {
                self.write.write_all(&self.out).await?;
                self.out.clear();
                self.write.write_all(&data).await?;
            }
            if matches!(framing, Framing::Chunked) {
                self.out.extend_from_slice(b"\r\n");
            }
            if body.is_end_stream() {
                // Not polled again just to hear `None`: a full-length body ends here, and the
                // wrappers' drop accounts for a body that ended (as hyper does).
                return Ok(Some(self.body_ended(framing, left)));
            }
        }
    }

    /// Closes the body's framing at its end, `left` bytes short of its declared length;
    /// whether the message was complete (one delimited by the close never is).
    fn body_ended(&mut self, framing: Framing, left: u64) -> bool {
        match framing {
            Framing::Empty => true,
            Framing::Chunked => {
                self.out.extend_from_slice(b"0\r\n\r\n");
                true
            }
            Framing::Length(_) => left == 0,
            Framing::UntilClose => false,
        }
    }

    /// Gets the read side back from the request body after a response. False: the connection
    /// cannot take another request (the body was cut, or could not be drained in time).
    async fn take_back(&mut self, answering: Answering) -> bool {
        if self.reader.is_some() {
            return true;
        }
        let returned = match (answering.cut, answering.away) {
            (Some(returned), _) => returned,
            (None, Some(mut away)) => match away.try_recv() {
                Ok(returned) => returned,
                // Still held by someone, or failed: the connection's read side is gone.
                Err(_) => return false,
            },
            (None, None) => return false,
        };
        let Returned {
            mut reader,
            rest,
            continue_owed,
        } = returned;
        let drained = match rest {
            None => true,
            // The client may still be waiting for the go-ahead to send it.
            Some(_) if continue_owed => false,
            Some(kind) => drain(&mut reader, kind).await,
        };
        self.reader = Some(reader);
        self.unread = !drained;
        drained
    }

    /// Closes after a last response. A client whose request body is still arriving gets it
    /// read for a while first: closing with unread bytes would reset the connection and could
    /// destroy the response before the client reads it (nginx's lingering close).
    async fn close(mut self) {
        let _ = self.write.shutdown().await;
        let Some(reader) = self.reader.as_mut().filter(|_| self.unread) else {
            return;
        };
        let deadline = Instant::now() + DRAIN_TIME;
        let mut read = 0u64;
        while read < 4 * DRAIN_LIMIT {
            reader.buf.clear();
            match tokio::time::timeout_at(deadline, poll_fn(|cx| reader.poll_fill(cx))).await {
                Ok(Ok(n)) if n > 0 => read += n as u64,
                _ => return,
            }
        }
    }

    /// Hands the connection, and what has been read of it, to hyper's HTTP/2 server.
    async fn into_h2(self) {
        let Some(reader) = self.reader else { return };
        let Ok(stream) = reader.io.reunite(self.write) else {
            return;
        };
        let io = Prefixed {
            prefix: reader.buf.freeze(),
            io: stream,
        };
        serve_h2(io, Arc::new(self.client), self.stop).await;
    }
}

/// Whether the client has closed its side or failed, looking only when the read side is here.
/// A request body that comes home read to its end gives the read side back on the way.
fn client_gone(
    reader: &mut Option<Reader>,
    answering: &mut Answering,
    cx: &mut Context<'_>,
) -> bool {
    if reader.is_none() {
        let Some(away) = answering.away.as_mut() else {
            return false;
        };
        let polled = Pin::new(away).poll(cx);
        if polled.is_ready() {
            answering.away = None;
        }
        match polled {
            Poll::Ready(Ok(returned)) if returned.rest.is_none() => {
                *reader = Some(returned.reader);
            }
            Poll::Ready(Ok(returned)) => {
                // Dropped unread; `take_back` decides about it after the response.
                answering.cut = Some(returned);
                return false;
            }
            Poll::Ready(Err(_)) | Poll::Pending => return false,
        }
    }
    let Some(r) = reader.as_mut() else {
        return false;
    };
    loop {
        // Pipelined requests wait in the buffer; past a head's worth, stop looking.
        if r.buf.len() > MAX_HEAD_BYTES {
            return false;
        }
        match r.poll_fill(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return false,
        }
    }
}

/// Reads and discards what is left of a request body, within limits. True if it all came.
async fn drain(reader: &mut Reader, mut kind: BodyDecoder) -> bool {
    let deadline = Instant::now() + DRAIN_TIME;
    let mut discarded = 0u64;
    loop {
        match kind.decode(&mut reader.buf) {
            Ok(Some(data)) => {
                discarded += data.len() as u64;
                if discarded > DRAIN_LIMIT {
                    return false;
                }
                continue;
            }
            Ok(None) if kind.is_done() => return true,
            Ok(None) => {}
            Err(_) => return false,
        }
        match tokio::time::timeout_at(deadline, poll_fn(|cx| reader.poll_fill(cx))).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
}

enum HeadError {
    /// An HTTP/2 connection preface.
    H2,
    Bad(ProxyError),
}

impl From<ProxyError> for HeadError {
    fn from(e: ProxyError) -> Self {
        HeadError::Bad(e)
    }
}

/// Parses a request head off the front of `buf`. `None`: more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ProxyError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadersTooLarge {
                limit: MAX_HEAD_BYTES,
                headers: MAX_HEADERS,
            })
        }
        Err(e) => {
            return Err(ProxyError::BadRequest(format!(
                "malformed request head: {e}"
            )))
        }
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("").as_bytes())
        .map_err(|_| ProxyError::BadRequest("invalid method".into()))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let target = span_in(buf, parsed.path.unwrap_or("").as_bytes());
    let spans = header_spans(buf, parsed.headers);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target))
        .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;
    // Room for the forwarding headers and the request id added on the way upstream.
    let (headers, facts) = header_map(&head, &spans, 4).map_err(ProxyError::BadRequest)?;
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
    match (headers.get_all(HOST).iter().count(), version) {
        (0, Version::HTTP_11) => return Err(ProxyError::BadRequest("missing Host header".into())),
        (0 | 1, _) => {}
        _ => return Err(ProxyError::BadRequest("more than one Host header".into())),
    }
    let body = request_body_kind(&headers, &facts, version)?;
    let keep_alive = facts.keep_alive(&headers, version);
    let expect_continue = facts.expect
        && version == Version::HTTP_11
        && !body.is_done()
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        body,
        keep_alive,
        expect_continue,
    }))
}

/// RFC 9112 §6.3 for requests: chunked if it is the final coding, else `Content-Length`, else
/// no body. Both headers at once, or another final coding, is refused (request smuggling).
fn request_body_kind(
    headers: &HeaderMap,
    facts: &HeadFacts,
    version: Version,
) -> Result<BodyDecoder, ProxyError> {
    if facts.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(ProxyError::BadRequest(
                "transfer-encoding in an HTTP/1.0 request".into(),
            ));
        }
        if facts.has_length() {
            return Err(ProxyError::BadRequest(
                "both transfer-encoding and content-length".into(),
            ));
        }
        if !chunked_is_final(headers) {
            return Err(ProxyError::BadRequest(
                "transfer-encoding must end with chunked".into(),
            ));
        }
        // Another coding before chunked (`gzip, chunked`) would be lost on the way upstream,
        // which sidelight frames as plain chunked: refuse it, as nginx does.
        let codings = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|c| !c.trim_ascii().is_empty())
            .count();
        if codings > 1 {
            return Err(ProxyError::NotImplemented(
                "transfer codings other than chunked are not forwarded".into(),
            ));
        }
        return Ok(BodyDecoder::Chunked(Chunk::Size));
    }
    match facts.length.map_err(|e| ProxyError::BadRequest(e.into()))? {
        None | Some(0) => Ok(BodyDecoder::Done),
        Some(n) => Ok(BodyDecoder::Length(n)),
    }
}

/// A request body read straight off the client connection as the route consumes it. Read to
/// its end, or dropped, it sends the read side back to the connection.
struct RequestBody {
    reader: Option<Reader>,
    kind: BodyDecoder,
    home: Option<oneshot::Sender<Returned>>,
    continue_owed: bool,
    /// Set when the response has started: too late for `100 Continue`.
    continue_gate: Option<Arc<AtomicBool>>,
    /// Bytes of the `100 Continue` line already written.
    continue_sent: usize,
    /// `limits.client_body_timeout`, and its timer while the body waits on the client.
    idle_timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl RequestBody {
    fn go_home(&mut self) {
        if let (Some(reader), Some(home)) = (self.reader.take(), self.home.take()) {
            let rest = (!self.kind.is_done()).then_some(self.kind);
            let _ = home.send(Returned {
                reader,
                rest,
                continue_owed: self.continue_owed,
            });
        }
    }

    /// Ends the body with an error; the connection will close.
    fn fail(&mut self, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.kind = BodyDecoder::Done;
        self.reader = None;
        self.home = None;
        Poll::Ready(Some(Err(message.into())))
    }

    /// Tells a client that waits for it to send the body (RFC 9110 §10.1.1).
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(reader) = self.reader.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let too_late = self
            .continue_gate
            .as_ref()
            .is_some_and(|g| g.load(Ordering::Acquire));
        if too_late && self.continue_sent == 0 {
            return Poll::Ready(Ok(()));
        }
        let stream = reader.io.as_ref();
        while self.continue_sent < CONTINUE.len() {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(&CONTINUE[self.continue_sent..]) {
                Ok(n) => self.continue_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.continue_owed = false;
        Poll::Ready(Ok(()))
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.go_home();
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(reader) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        // A client that waits for the go-ahead has sent nothing yet (one that did not wait
        // has bytes here, and needs none).
        if this.continue_owed && reader.buf.is_empty() {
            if let Err(e) = ready!(this.poll_continue(cx)) {
                return this.fail(format!("client connection: {e}"));
            }
        }
        let Some(reader) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        let read = match this
            .kind
            .poll_read(Pin::new(&mut reader.io), &mut reader.buf, cx)
        {
            Poll::Ready(read) => read,
            Poll::Pending => {
                let timeout = this.idle_timeout;
                ready!(poll_idle(&mut this.idle, timeout, cx));
                this.kind = BodyDecoder::Done;
                this.reader = None;
                this.home = None;
                return Poll::Ready(Some(Err(ProxyError::ClientBodyTimeout { timeout }.into())));
            }
        };
        this.idle = None;
        match read {
            BodyRead::Data(data) => {
                this.continue_owed = false;
                if this.kind.is_done() {
                    this.go_home();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            BodyRead::End => {
                this.go_home();
                Poll::Ready(None)
            }
            BodyRead::Invalid(message) => {
                this.fail(format!("invalid chunked request body: {message}"))
            }
            BodyRead::Closed => {
                this.fail("the client closed the connection inside the request body".into())
            }
            BodyRead::Io(e) => this.fail(format!("client connection: {e}")),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

/// Writes a response head into `out` and decides how its body is framed; `keep_alive` turns
/// false when only the close can delimit the body.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    exact_length: Option<u64>,
    answering: &Answering,
    keep_alive: &mut bool,
) -> Framing {
    let status = parts.status;
    let no_body = answering.head_method
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Framing headers are sidelight's to write; the rest go out as they are.
    let (mut length, mut has_date) = (Ok(None), false);
    for (name, value) in &parts.headers {
        let framing_header = name == TRANSFER_ENCODING || name == CONNECTION;
        if name == CONTENT_LENGTH {
            length = length.and_then(|l| fold_content_length(l, value));
        } else if !framing_header {
            has_date |= name == DATE;
            header_line(out, name, value);
        }
    }
    // A valid `content-length` is kept (HEAD and 304 answers state the length they omit);
    // an invalid one is dropped and the body framed by what it is.
    let declared = length
        .ok()
        .flatten()
        .filter(|_| status != StatusCode::NO_CONTENT && !status.is_informational());
    let framing = if no_body {
        Framing::Empty
    } else if let Some(n) = declared.or(exact_length) {
        Framing::Length(n)
    } else if !answering.http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    } else {
        *keep_alive = false;
        Framing::UntilClose
    };
    let length = match framing {
        Framing::Length(n) => Some(n),
        _ => declared,
    };
    if let Some(n) = length {
        length_line(n, out);
    }
    if !*keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if answering.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        date_line(out);
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// Appends a `date:` line, formatted once a second per thread.
fn date_line(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(cached.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed {
    prefix: Bytes,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves an h2c connection with hyper until it ends; at `stop`, lets its streams finish.
async fn serve_h2<H: Handler>(
    io: Prefixed,
    client: Arc<ClientContext<H>>,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let streams = Arc::new(H2Streams::default());
    let idle_limit = client.header_read_timeout;
    let errors = client.errors.clone();
    let counted = streams.clone();
    let body_timeout = client.client_body_timeout;
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let req = req.map(|body| {
            let body = body.map_err(BoxError::from).boxed_unsync();
            if body.is_end_stream() {
                return body;
            }
            IdleBody {
                inner: body,
                timeout: body_timeout,
                idle: None,
            }
            .boxed_unsync()
        });
        let open = StreamOpen::new(counted.clone());
        let response = client.handler.handle(req, client.listener, &client.peer);
        async move {
            let response = response.await;
            // The stream stays open until its response body ends.
            Ok::<_, std::convert::Infallible>(response.map(|body| Observed::boxed(body, open)))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        // The same bound as HTTP/1's: a connection with no request open for
        // `limits.header_read_timeout` (before its first one, or between them) is closed.
        // No request is open, so closing loses nothing (a graceful GOAWAY would wait on the
        // client's PING ack, which an idle client may never send).
        _ = streams.idle_for(idle_limit) => {
            errors.header_timeout.inc();
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "h2 client connection ended with an error");
    }
}

/// `limits.client_body_timeout` for a request body that has nothing now: the timer starts at
/// the first wait since the last frame (the caller clears `idle` on each frame) and is ready
/// once the body has waited `timeout`.
fn poll_idle(
    idle: &mut Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
        .as_mut()
        .poll(cx)
}

/// An h2 request body under `limits.client_body_timeout`, as HTTP/1's: a body that sends
/// nothing for that long while it is read ends in `408 client_body_timeout`.
struct IdleBody {
    inner: ProxyBody,
    timeout: Duration,
    idle: Option<Pin<Box<Sleep>>>,
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.idle = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                ready!(poll_idle(&mut this.idle, timeout, cx));
                this.inner = empty();
                Poll::Ready(Some(Err(ProxyError::ClientBodyTimeout { timeout }.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The requests open on one h2 connection, and a wake-up when the count changes.
#[derive(Default)]
struct H2Streams {
    open: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl H2Streams {
    /// Resolves once no request has been open for `limit` in a row.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the count is read, so no change in between is missed.
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(limit) => return,
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// One open request on an h2 connection, until its response body ends or is dropped.
struct StreamOpen(Arc<H2Streams>);

impl StreamOpen {
    fn new(streams: Arc<H2Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        streams.changed.notify_waiters();
        StreamOpen(streams)
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl BodyObserver for StreamOpen {}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, ProxyError> {
        parse_head(&mut BytesMut::from(text))
    }

    #[test]
    fn request_heads() {
        let h = head("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.request.uri(), "/a?b=1");
        assert_eq!(h.request.headers().get_all("x-a").iter().count(), 2);
        assert!(h.keep_alive && matches!(h.body, BodyDecoder::Done));
        let h = head("POST / HTTP/1.0\r\ncontent-length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive && matches!(h.body, BodyDecoder::Length(3)));
        let h =
            head("POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.expect_continue && matches!(h.body, BodyDecoder::Chunked(_)));
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(matches!(
            head("GARBAGE\r\n\r\n"),
            Err(ProxyError::BadRequest(_))
        ));
        let smuggled =
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(matches!(head(smuggled), Err(ProxyError::BadRequest(_))));
        let big = format!(
            "GET / HTTP/1.1\r\nx: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(matches!(
            head(&big),
            Err(ProxyError::HeadersTooLarge { .. })
        ));
    }

    fn head_of(
        status: u16,
        headers: &[(&str, &str)],
        exact: Option<u64>,
        answering: Answering,
    ) -> (String, Framing, bool) {
        let mut response = http::Response::builder().status(status);
        for (n, v) in headers {
            response = response.header(*n, *v);
        }
        let (parts, ()) = response.body(()).unwrap().into_parts();
        let mut out = Vec::new();
        let mut keep_alive = answering.keep_alive;
        let framing = encode_head(&mut out, &parts, exact, &answering, &mut keep_alive);
        (String::from_utf8(out).unwrap(), framing, keep_alive)
    }

    #[test]
    fn response_heads() {
        let (head, framing, keep) = head_of(
            200,
            &[
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
                ("x-a", "1"),
            ],
            None,
            Answering::new(AnswerTo {
                head_method: false,
                http10: false,
                keep_alive: true,
            }),
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "));
        assert!(head.ends_with(" GMT\r\n\r\n") && !head.contains("chunked"));
        assert!(matches!(framing, Framing::Length(5)) && keep);
        // HEAD states the length it omits; 204 has none.
        let (head, framing, _) = head_of(
            200,
            &[("content-length", "9")],
            None,
            Answering::new(AnswerTo {
                head_method: true,
                http10: false,
                keep_alive: true,
            }),
        );
        assert!(head.contains("content-length: 9") && matches!(framing, Framing::Empty));
        let (head, _, _) = head_of(
            204,
            &[("content-length", "0")],
            None,
            Answering::new(AnswerTo {
                head_method: false,
                http10: false,
                keep_alive: true,
            }),
        );
        assert!(!head.contains("content-length"));
        // Unknown length: chunked in 1.1, the close in 1.0.
        let (head, framing, _) = head_of(
            200,
            &[],
            None,
            Answering::new(AnswerTo {
                head_method: false,
                http10: false,
                keep_alive: true,
            }),
        );
        assert!(head.contains("transfer-encoding: chunked") && matches!(framing, Framing::Chunked));
        let (head, framing, keep) = head_of(
            200,
            &[],
            None,
            Answering::new(AnswerTo {
                head_method: false,
                http10: true,
                keep_alive: true,
            }),
        );
        assert!(head.contains("connection: close") && matches!(framing, Framing::UntilClose));
        assert!(!keep);
        let (head, framing, _) = head_of(
            200,
            &[("date", "x")],
            Some(3),
            Answering::new(AnswerTo {
                head_method: false,
                http10: true,
                keep_alive: true,
            }),
        );
        assert!(head.contains("content-length: 3") && head.contains("connection: keep-alive"));
        assert!(matches!(framing, Framing::Length(3)) && head.matches("date").count() == 1);
    }
}

#[cfg(test)]
mod proptests;
