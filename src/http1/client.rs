//! HTTP/1.1 to an upstream, driven by the task that proxies the request.
//!
//! hyper's client runs every connection in a task of its own and talks to it over channels: the
//! request goes over one, the response head comes back over another, and each body chunk over a
//! third, so one proxied request costs several task hand-offs on top of its syscalls. Like
//! Pingora, sidelight instead writes the request and reads the response in the request's own
//! task, and the response body reads the socket directly as the client consumes it. The
//! connection goes back to its pool when the body has been read to its end.
//!
//! Message framing follows RFC 9112: responses to HEAD, 1xx, 204 and 304 have no body; then
//! `Transfer-Encoding: chunked`, then `Content-Length`, else the body runs to the close. hyper's
//! own parser, httparse, reads the heads.

use super::framing::{
    chunked_is_final, encode_chunk, header_line, header_map, header_spans, length_line, poll_fill,
    BodyDecoder, BodyRead, Chunk, Framing, HeadFacts, MAX_HEADERS, MAX_HEAD_BYTES,
};
use crate::http::body::ProxyBody;
use crate::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a connection runs over: whatever the upstream's connector hands over (TCP or TLS,
/// wrapped to count it), as a tokio stream.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("invalid response from the upstream: {0}")]
    Invalid(String),
    #[error("request body: {}", crate::error::chain(.0.as_ref()))]
    RequestBody(BoxError),
}

/// A request head ready to be written, with the framing of the body that follows it.
pub struct RequestHead {
    bytes: Vec<u8>,
    framing: Framing,
    /// A HEAD request: its response has no body whatever its headers say.
    head_method: bool,
    /// Safe to send again on another connection if this one turns out to be dead.
    replayable: bool,
}

impl RequestHead {
    /// Encodes `parts` (origin-form URI, `Host` set). The body's framing comes from its size
    /// hint, never from the client's `Content-Length`/`Transfer-Encoding`: layers may have
    /// rewritten the body.
    pub fn encode(parts: &http::request::Parts, body: &ProxyBody) -> RequestHead {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        match parts.uri.path_and_query() {
            Some(pq) => out.extend_from_slice(pq.as_str().as_bytes()),
            None => out.push(b'/'),
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let had_length = parts.headers.contains_key(CONTENT_LENGTH);
        for (name, value) in &parts.headers {
            if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
                continue;
            }
            header_line(&mut out, name, value);
        }
        let framing = if body.is_end_stream() {
            let expects_body = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            if expects_body || had_length {
                length_line(0, &mut out);
            }
            Framing::Empty
        } else if let Some(n) = body.size_hint().exact() {
            length_line(n, &mut out);
            Framing::Length(n)
        } else {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        };
        out.extend_from_slice(b"\r\n");
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        RequestHead {
            bytes: out,
            framing,
            head_method: parts.method == Method::HEAD,
            replayable: framing == Framing::Empty && idempotent,
        }
    }
}

/// A response head and how its body is framed.
pub struct ResponseHead {
    pub response: Response<()>,
    body: BodyDecoder,
    /// The connection may carry another request once this body is read.
    keep_alive: bool,
}

/// One upstream connection, used by one request at a time.
pub struct Conn {
    // Boxed: the stream (room for a TLS session) is over a kilobyte, and a connection moves
    // through every future and body that carries it.
    io: Box<dyn Transport>,
    buf: BytesMut,
    /// Requests answered on it so far: a reused connection may have been closed meanwhile.
    answered: u64,
}

/// A failed exchange, and whether it is safe to send the same request on another connection.
pub struct Failed {
    pub error: H1Error,
    pub retry_elsewhere: bool,
}

impl Conn {
    pub fn new(io: impl Transport) -> Conn {
        Conn {
            io: Box::new(io),
            buf: BytesMut::new(),
            answered: 0,
        }
    }

    /// Whether an idle connection still looks usable: the upstream has neither closed it nor
    /// sent anything unasked. Looks at the socket without waiting.
    pub fn is_usable(&mut self) -> bool {
        self.poll_usable(&mut Context::from_waker(Waker::noop()))
    }

    /// [`Conn::is_usable`], leaving `cx`'s waker to be woken when that may change.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // Ready means end of stream, bytes nobody asked for, or an error.
        self.poll_fill(cx).is_pending()
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(Pin::new(&mut *self.io), cx, &mut self.buf)
    }

    /// Writes the request (head, then body as it comes) and reads the response head. A response
    /// that arrives before the request is fully written is taken as it is (an early 413, say);
    /// the connection is then not reused.
    pub async fn exchange(
        &mut self,
        head: &RequestHead,
        mut body: ProxyBody,
    ) -> Result<ResponseHead, Failed> {
        let reused = self.answered > 0;
        // The head is written from where it is; body data goes through `out`.
        let mut head_left: &[u8] = &head.bytes;
        let mut out: Vec<u8> = Vec::new();
        let mut written = 0usize;
        let mut body_open = head.framing != Framing::Empty;
        let mut left = head.framing.declared();
        let mut flushed = false;
        let mut got_bytes = false;
        let parsed = poll_fn(|cx| loop {
            let mut progress = false;
            // Write side: the head and body, then a flush.
            if !flushed {
                // Pull the body's next frame once the last one is out, before writing the head:
                // a body that is already there leaves in the same write as the head.
                if body_open && written == out.len() {
                    out.clear();
                    written = 0;
                    match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            // Trailers are not forwarded over HTTP/1.
                            if let Ok(data) = frame.into_data() {
                                if let Err(e) =
                                    encode_data(head.framing, &mut left, &data, &mut out)
                                {
                                    return Poll::Ready(Err(e));
                                }
                            }
                            progress = true;
                        }
                        Poll::Ready(Some(Err(e))) => {
                            return Poll::Ready(Err(H1Error::RequestBody(e)))
                        }
                        Poll::Ready(None) => {
                            if head.framing == Framing::Chunked {
                                out.extend_from_slice(b"0\r\n\r\n");
                            } else if left > 0 {
                                let e = H1Error::RequestBody(
                                    format!("request body ended {left} bytes short of its length")
                                        .into(),
                                );
                                return Poll::Ready(Err(e));
                            }
                            body_open = false;
                            progress = true;
                        }
                        Poll::Pending => {}
                    }
                }
                if !head_left.is_empty() || written < out.len() {
                    let bufs = [IoSlice::new(head_left), IoSlice::new(&out[written..])];
                    let io = Pin::new(&mut *self.io);
                    let polled = if out.len() == written {
                        io.poll_write(cx, head_left)
                    } else {
                        io.poll_write_vectored(cx, &bufs)
                    };
                    match polled {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(H1Error::Closed)),
                        Poll::Ready(Ok(mut n)) => {
                            let from_head = n.min(head_left.len());
                            head_left = &head_left[from_head..];
                            n -= from_head;
                            written += n;
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Io(e))),
                        Poll::Pending => {}
                    }
                } else if !body_open {
                    match Pin::new(&mut *self.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {
                            flushed = true;
                            progress = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Io(e))),
                        Poll::Pending => {}
                    }
                }
            }
            // Read side: once the request is out, or while its writing waits (an early answer).
            if flushed || !progress {
                match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => {
                        // A close inside the head is a dropped connection, not a malformed
                        // answer: a reset.
                        let e = if self.buf.is_empty() {
                            H1Error::Closed
                        } else {
                            H1Error::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside the response head",
                            ))
                        };
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(_)) => {
                        got_bytes = true;
                        match parse_head(&mut self.buf, head.head_method) {
                            Ok(Some(parsed)) => return Poll::Ready(Ok(parsed)),
                            Ok(None) => progress = true,
                            Err(e) => return Poll::Ready(Err(e)),
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Io(e))),
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        })
        .await;
        let mut parsed = parsed.map_err(|error| Failed {
            // Nothing came back on a connection that had served before: it was closed under
            // the request, which a replayable request may then take elsewhere.
            retry_elsewhere: reused
                && head.replayable
                && !got_bytes
                && matches!(&error, H1Error::Closed | H1Error::Io(_)),
            error,
        })?;
        if !flushed {
            // Answered before the request was fully sent: the rest of it is still owed.
            parsed.keep_alive = false;
        }
        self.answered += 1;
        Ok(parsed)
    }
}

fn encode_data(
    framing: Framing,
    left: &mut u64,
    data: &Bytes,
    out: &mut Vec<u8>,
) -> Result<(), H1Error> {
    if data.is_empty() {
        return Ok(());
    }
    match framing {
        Framing::Chunked => encode_chunk(data, out),
        Framing::Length(_) => {
            let n = data.len() as u64;
            if n > *left {
                return Err(H1Error::RequestBody(
                    "request body longer than its declared length".into(),
                ));
            }
            *left -= n;
            out.extend_from_slice(data);
        }
        // Request heads are never framed by the close.
        Framing::Empty | Framing::UntilClose => {}
    }
    Ok(())
}

/// Parses a response head off the front of `buf`, skipping 1xx interim responses. `None`: more
/// bytes are needed.
fn parse_head(buf: &mut BytesMut, head_method: bool) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Ok(None),
            Ok(_) => {
                return Err(H1Error::Invalid(format!(
                    "response head larger than {MAX_HEAD_BYTES} bytes"
                )))
            }
            Err(e) => return Err(H1Error::Invalid(e.to_string())),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| H1Error::Invalid(format!("status code {code}")))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Invalid("unexpected protocol switch".into()));
            }
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let spans = header_spans(buf, parsed.headers);
        let head = buf.split_to(len).freeze();
        // Room for what the proxy adds on the way back (request ids, `date`).
        let (mut headers, facts) = header_map(&head, &spans, 2).map_err(H1Error::Invalid)?;
        let (body, framing_closes) = body_kind(status, &headers, &facts, head_method)?;
        if facts.transfer_encoding && facts.has_length() {
            // RFC 9112 §6.3: a transfer coding overrides the length, which must not be passed
            // on (the client would stop reading there).
            headers.remove(CONTENT_LENGTH);
        }
        let keep_alive = !framing_closes && facts.keep_alive(&headers, version);
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(ResponseHead {
            response,
            body,
            keep_alive,
        }));
    }
}

/// The body's framing, and whether it forbids reusing the connection afterwards.
fn body_kind(
    status: StatusCode,
    headers: &HeaderMap,
    facts: &HeadFacts,
    head_method: bool,
) -> Result<(BodyDecoder, bool), H1Error> {
    if head_method || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((BodyDecoder::Done, false));
    }
    if facts.transfer_encoding {
        // Chunked must be the final coding; anything else runs to the close. With both headers
        // the message may be a smuggling attempt: never reuse the connection.
        let both = facts.has_length();
        return Ok(if chunked_is_final(headers) {
            (BodyDecoder::Chunked(Chunk::Size), both)
        } else {
            (BodyDecoder::UntilClose, true)
        });
    }
    let length = facts.length.map_err(|e| H1Error::Invalid(e.into()))?;
    Ok(match length {
        Some(0) => (BodyDecoder::Done, false),
        Some(n) => (BodyDecoder::Length(n), false),
        None => (BodyDecoder::UntilClose, true),
    })
}

/// A response body read straight off the connection. When it has been read to its end the
/// connection is handed to `release` (back to its pool) if it can carry another request;
/// dropped before that, it closes the connection with it.
pub struct ResponseBody<R: FnOnce(Conn) + Send + Unpin + 'static> {
    conn: Option<Conn>,
    kind: BodyDecoder,
    /// `None` when the connection cannot carry another request.
    release: Option<R>,
}

impl ResponseHead {
    /// Pairs the head with its body, which reads from `conn`.
    pub fn into_response<R>(self, conn: Conn, release: R) -> Response<ResponseBody<R>>
    where
        R: FnOnce(Conn) + Send + Unpin + 'static,
    {
        let mut body = ResponseBody {
            conn: Some(conn),
            kind: self.body,
            release: self.keep_alive.then_some(release),
        };
        if body.kind.is_done() {
            body.finish();
        }
        self.response.map(|()| body)
    }
}

impl<R: FnOnce(Conn) + Send + Unpin + 'static> ResponseBody<R> {
    fn finish(&mut self) {
        self.kind = BodyDecoder::Done;
        let Some(conn) = self.conn.take() else { return };
        // Bytes past the end of the response were never asked for: don't trust the connection.
        if conn.buf.is_empty() {
            if let Some(release) = self.release.take() {
                release(conn);
            }
        }
    }

    /// Ends the body with `error`; the connection is closed.
    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.kind = BodyDecoder::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl<R: FnOnce(Conn) + Send + Unpin + 'static> Body for ResponseBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let read = ready!(this
            .kind
            .poll_read(Pin::new(&mut *conn.io), &mut conn.buf, cx));
        match read {
            BodyRead::Data(data) => {
                if this.kind.is_done() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            // A body delimited by the close ends here too; its connection is never released.
            BodyRead::End => {
                this.finish();
                Poll::Ready(None)
            }
            BodyRead::Invalid(message) => this.fail(H1Error::Invalid(message)),
            BodyRead::Closed => this.fail(H1Error::Invalid(
                "the upstream closed the connection inside the body".into(),
            )),
            BodyRead::Io(e) => this.fail(H1Error::Io(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_done() || self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<ResponseHead>, H1Error> {
        let mut buf = BytesMut::from(text);
        parse_head(&mut buf, false)
    }

    #[test]
    fn framing() {
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyDecoder::Length(5)) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyDecoder::Chunked(_)) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyDecoder::UntilClose) && !h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(matches!(h.body, BodyDecoder::UntilClose) && !h.keep_alive);
        let h = head("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyDecoder::Done) && h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h =
            head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.response.status(), StatusCode::CREATED);
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 1")
            .unwrap()
            .is_none());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n").is_ok());
        assert!(head("nonsense\r\n\r\n").is_err());
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n");
        assert!(matches!(
            parse_head(&mut buf, true).unwrap().unwrap().body,
            BodyDecoder::Done
        ));
    }

    #[test]
    fn header_values_are_kept() {
        let h = head("HTTP/1.1 200 OK\r\nx-a: 1\r\nx-a: 2\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        let values: Vec<_> = h.response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(h.response.headers()["content-type"], "text/plain");
    }

    #[test]
    fn request_heads() {
        use http_body_util::{BodyExt, Empty, Full};
        let empty = || Empty::<Bytes>::new().map_err(BoxError::from).boxed_unsync();
        let (parts, _) = http::Request::get("/v1/models?x=1")
            .header("host", "up")
            .header("content-length", "0")
            .body(())
            .unwrap()
            .into_parts();
        let h = RequestHead::encode(&parts, &empty());
        assert_eq!(
            String::from_utf8(h.bytes.clone()).unwrap(),
            "GET /v1/models?x=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(h.replayable);
        let (parts, _) = http::Request::post("/p").body(()).unwrap().into_parts();
        let full = Full::new(Bytes::from_static(b"abc"))
            .map_err(BoxError::from)
            .boxed_unsync();
        let h = RequestHead::encode(&parts, &full);
        assert!(String::from_utf8(h.bytes.clone())
            .unwrap()
            .ends_with("content-length: 3\r\n\r\n"));
        assert!(!h.replayable);
        let h = RequestHead::encode(&parts, &empty());
        assert!(String::from_utf8(h.bytes)
            .unwrap()
            .ends_with("content-length: 0\r\n\r\n"));
    }
}

#[cfg(test)]
mod proptests;
