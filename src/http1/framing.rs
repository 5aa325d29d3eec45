//! HTTP/1.1 message framing (RFC 9112) shared by both sides of the proxy: sidelight's own
//! connections to upstreams ([`super::client`]) and its client-facing connections
//! ([`super::server`]). httparse reads heads and chunk-size lines; this module holds what is
//! left: how a message sidelight writes is framed ([`Framing`]), how a message it reads is
//! decoded ([`BodyDecoder`], read off a socket by [`BodyDecoder::poll_read`]), `Content-Length`,
//! `Transfer-Encoding` and connection tokens.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Version};
use http_body::SizeHint;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncRead;

/// Larger heads are refused (nginx's buffers are 4–8 KiB; hyper's limit is about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// More header lines than this are refused (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// How much a read buffer grows by when it runs out of room.
const READ_CHUNK: usize = 16 * 1024;

/// Reads what `io` has into `buf`, growing it when room runs low.
pub fn poll_fill<R: AsyncRead + ?Sized>(
    io: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// Where `piece`, a slice httparse returned, lies in `buf`, the buffer it parsed: the head's
/// target and header values become slices of the head once it is taken off the buffer, not
/// copies.
pub fn span_in(buf: &[u8], piece: &[u8]) -> Range<usize> {
    let start = piece.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + piece.len()
}

/// The spans of each parsed header's name and value in `buf`. A `Vec`, not a zeroed array of
/// [`MAX_HEADERS`]: clearing one cost more than the allocation.
pub fn header_spans(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
) -> Vec<(Range<usize>, Range<usize>)> {
    headers
        .iter()
        .map(|h| (span_in(buf, h.name.as_bytes()), span_in(buf, h.value)))
        .collect()
}

/// The header whose name and value lie at `spans` in `head`; the value shares `head`'s memory.
fn header_at(
    head: &Bytes,
    (name, value): &(Range<usize>, Range<usize>),
) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(&head[name.clone()])
        .map_err(|_| "invalid header name".to_string())?;
    let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
        .map_err(|_| format!("invalid value of header {name}"))?;
    Ok((name, value))
}

/// Appends `name: value` and its line end.
pub fn header_line(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a `content-length` line.
pub fn length_line(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Where a chunked body's decoder stands.
#[derive(Clone, Copy, Debug)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// What is left of a message body, and how it is delimited: the one decoder behind both the
/// request bodies sidelight reads from clients and the response bodies it reads from upstreams.
#[derive(Clone, Copy, Debug)]
pub enum BodyDecoder {
    /// Read to its end (or never had a body).
    Done,
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (responses only); the caller ends it at the close.
    UntilClose,
}

impl BodyDecoder {
    /// Takes the next data off the front of `buf`. `None`: more bytes are needed, or the body is
    /// done (the decoder is then `Done`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
        loop {
            match self {
                BodyDecoder::Done => return Ok(None),
                BodyDecoder::Length(0) => *self = BodyDecoder::Done,
                BodyDecoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    if *left == 0 {
                        *self = BodyDecoder::Done;
                    }
                    return Ok(Some(buf.split_to(n).freeze()));
                }
                BodyDecoder::UntilClose => {
                    return Ok((!buf.is_empty()).then(|| buf.split().freeze()));
                }
                BodyDecoder::Chunked(state) => match decode_chunk(buf, state)? {
                    Decoded::Data(data) => return Ok(Some(data)),
                    Decoded::End => *self = BodyDecoder::Done,
                    Decoded::Progress => {}
                    Decoded::NeedMore => return Ok(None),
                },
            }
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyDecoder::Done)
    }

    pub fn size_hint(&self) -> SizeHint {
        match *self {
            BodyDecoder::Done => SizeHint::with_exact(0),
            BodyDecoder::Length(n) => SizeHint::with_exact(n),
            BodyDecoder::Chunked(_) | BodyDecoder::UntilClose => SizeHint::default(),
        }
    }
}

/// What [`BodyDecoder::poll_read`] got.
#[derive(Debug)]
pub enum BodyRead {
    Data(Bytes),
    /// The body is complete.
    End,
    /// The framing is invalid (the message says why).
    Invalid(String),
    /// The peer closed the connection before the body's end.
    Closed,
    Io(io::Error),
}

impl BodyDecoder {
    /// Decodes the next data from `buf`, reading more from `io` when it needs to: the one body
    /// reader behind both request and response bodies. A body delimited by the close ends at
    /// the close.
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        mut io: Pin<&mut R>,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<BodyRead> {
        loop {
            match self.decode(buf) {
                Ok(Some(data)) => return Poll::Ready(BodyRead::Data(data)),
                Ok(None) if self.is_done() => return Poll::Ready(BodyRead::End),
                Ok(None) => {}
                Err(message) => return Poll::Ready(BodyRead::Invalid(message)),
            }
            match std::task::ready!(poll_fill(io.as_mut(), cx, buf)) {
                Ok(0) if matches!(self, BodyDecoder::UntilClose) => {
                    *self = BodyDecoder::Done;
                    return Poll::Ready(BodyRead::End);
                }
                Ok(0) => return Poll::Ready(BodyRead::Closed),
                Ok(_) => {}
                Err(e) => return Poll::Ready(BodyRead::Io(e)),
            }
        }
    }
}

/// How a message sidelight writes is delimited: the one framing type of both sides.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Framing {
    /// No body (none was there, or the message may not have one).
    Empty,
    Length(u64),
    Chunked,
    /// Until sidelight closes the connection (responses only).
    UntilClose,
}

impl Framing {
    /// The body length the head declared (0 unless `Length`).
    pub fn declared(self) -> u64 {
        match self {
            Framing::Length(n) => n,
            _ => 0,
        }
    }
}

enum Decoded {
    Data(Bytes),
    End,
    /// A framing element was consumed; decode again.
    Progress,
    NeedMore,
}

/// Decodes the next piece of a chunked body off the front of `buf`.
fn decode_chunk(buf: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, String> {
    match *state {
        Chunk::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((used, size))) => {
                // httparse ends a chunk line at a bare LF; a front proxy that reads the same
                // bytes differently would desync (`5;a\nb\r\n`): only CRLF ends a line.
                let line = &buf[..used];
                if !line.ends_with(b"\r\n") || line[..used - 2].contains(&b'\n') {
                    return Err("bare LF in a chunk size line".into());
                }
                buf.advance(used);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
                Ok(Decoded::Progress)
            }
            Ok(httparse::Status::Partial) if buf.len() > 1024 => {
                Err("chunk size line too long".into())
            }
            Ok(httparse::Status::Partial) => Ok(Decoded::NeedMore),
            Err(_) => Err("invalid chunk size".into()),
        },
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(n).freeze();
            *state = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Decoded::Data(data))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            buf.advance(2);
            *state = Chunk::Size;
            Ok(Decoded::Progress)
        }
        Chunk::Trailers => {
            // Trailer fields are dropped: an HTTP/1 peer that did not ask for them (`TE:
            // trailers`) must not depend on them, and hyper's server drops them too.
            let Some(lf) = memchr::memchr(b'\n', buf) else {
                return if buf.len() > MAX_HEAD_BYTES {
                    Err("trailers too large".into())
                } else {
                    Ok(Decoded::NeedMore)
                };
            };
            // Only CRLF ends a trailer line: a front proxy that ends lines at a bare LF would
            // see the body end at `x: a\n\r\n` and the bytes after it as the next request,
            // which sidelight would read on as trailers (a desync).
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err("bare LF in a trailer line".into());
            }
            let end = lf - 1;
            buf.advance(end + 2);
            Ok(if end == 0 {
                Decoded::End
            } else {
                Decoded::Progress
            })
        }
    }
}

/// Appends one chunk of a chunked body (nothing for empty data: a zero-size chunk would end it).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    chunk_size_line(data.len(), out);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends a chunk-size line (`1a\r\n`).
pub fn chunk_size_line(len: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Whether a comma-separated header has `token` among its values (case-insensitive).
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `chunked` is the final transfer coding (else the body runs to the close, or, in a
/// request, cannot be delimited at all).
pub fn chunked_is_final(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// The `Content-Length`, if any. Repeated equal values are one value; differing or malformed
/// ones are an error (RFC 9110 §8.6).
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .try_fold(None, fold_content_length)
}

/// Folds one `content-length` field value (possibly a list) into what earlier ones said.
pub fn fold_content_length(
    length: Option<u64>,
    value: &HeaderValue,
) -> Result<Option<u64>, &'static str> {
    let mut length = length;
    for part in value.as_bytes().split(|b| *b == b',') {
        let n = parse_decimal(part.trim_ascii()).ok_or("invalid content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length values");
        }
        length = Some(n);
    }
    Ok(length)
}

/// Digits only (no sign, no blanks) that fit a `u64`: `str::parse` costs several times as much
/// for the one number nearly every message carries.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// What a head's framing-related headers said, noted while its header map was built: most
/// messages carry none but `content-length`, and then framing costs no map lookups.
#[derive(Clone, Copy, Debug)]
pub struct HeadFacts {
    /// Every `content-length` value folded together (`Err` when invalid or conflicting).
    pub length: Result<Option<u64>, &'static str>,
    pub transfer_encoding: bool,
    pub connection: bool,
    pub expect: bool,
}

impl Default for HeadFacts {
    fn default() -> Self {
        HeadFacts {
            length: Ok(None),
            transfer_encoding: false,
            connection: false,
            expect: false,
        }
    }
}

impl HeadFacts {
    pub fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONTENT_LENGTH {
            self.length = self.length.and_then(|l| fold_content_length(l, value));
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == CONNECTION {
            self.connection = true;
        } else if name == EXPECT {
            self.expect = true;
        }
    }

    /// Whether a `content-length` header was present at all (valid or not).
    pub fn has_length(&self) -> bool {
        !matches!(self.length, Ok(None))
    }

    /// Whether the `Connection` header lists `token`.
    fn connection_has(&self, headers: &HeaderMap, token: &str) -> bool {
        self.connection && has_token(headers, CONNECTION, token)
    }

    /// Whether the message lets its connection carry another one: by default in HTTP/1.1
    /// unless `Connection: close`, only with `Connection: keep-alive` in 1.0.
    pub fn keep_alive(&self, headers: &HeaderMap, version: Version) -> bool {
        match version {
            Version::HTTP_11 => !self.connection_has(headers, "close"),
            _ => self.connection_has(headers, "keep-alive"),
        }
    }
}

/// The header map of a head taken off its buffer (`head`), its values sharing the head's
/// memory, with room for `room` more headers; and what its framing headers said.
pub fn header_map(
    head: &Bytes,
    spans: &[(Range<usize>, Range<usize>)],
    room: usize,
) -> Result<(HeaderMap, HeadFacts), String> {
    let mut headers = HeaderMap::with_capacity(spans.len() + room);
    let mut facts = HeadFacts::default();
    for span in spans {
        let (name, value) = header_at(head, span)?;
        facts.note(&name, &value);
        headers.append(name, value);
    }
    Ok((headers, facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks() {
        let mut buf =
            BytesMut::from("5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\nx-trailer: t\r\n\r\nrest");
        let mut state = Chunk::Size;
        let mut data = Vec::new();
        loop {
            match decode_chunk(&mut buf, &mut state).unwrap() {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::End => break,
                Decoded::Progress => {}
                Decoded::NeedMore => panic!("all bytes are there"),
            }
        }
        assert_eq!(data, b"helloabc");
        assert_eq!(&buf[..], b"rest");
        let mut bad = BytesMut::from("zz\r\n");
        assert!(decode_chunk(&mut bad, &mut Chunk::Size).is_err());
        let mut partial = BytesMut::from("5\r\nhel");
        let mut state = Chunk::Size;
        assert!(matches!(
            decode_chunk(&mut partial, &mut state),
            Ok(Decoded::Progress)
        ));
        assert!(
            matches!(decode_chunk(&mut partial, &mut state), Ok(Decoded::Data(d)) if d == "hel")
        );
        assert!(matches!(
            decode_chunk(&mut partial, &mut state),
            Ok(Decoded::NeedMore)
        ));
    }

    #[test]
    fn a_bare_lf_in_trailers_is_refused() {
        // Found by the proptests: `x: a\n` was read on to the next CRLF as one trailer line.
        for text in [
            "0\r\nx: a\n\r\nGET / HTTP/1.1\r\n\r\n",
            "0\r\n\n",
            "0\r\nx: a\n\n",
        ] {
            let mut buf = BytesMut::from(text);
            let mut body = BodyDecoder::Chunked(Chunk::Size);
            assert_eq!(
                body.decode(&mut buf).unwrap_err(),
                "bare LF in a trailer line",
                "{text:?}"
            );
        }
        let mut buf = BytesMut::from("0\r\nx: a\r\ny: b\r\n\r\nrest");
        let mut body = BodyDecoder::Chunked(Chunk::Size);
        assert!(body.decode(&mut buf).unwrap().is_none() && body.is_done());
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn body_decoders() {
        let mut buf = BytesMut::from("3\r\nabc\r\n0\r\n\r\nGET");
        let mut body = BodyDecoder::Chunked(Chunk::Size);
        assert_eq!(body.decode(&mut buf).unwrap().unwrap(), "abc");
        assert!(body.decode(&mut buf).unwrap().is_none() && body.is_done());
        assert_eq!(&buf[..], b"GET");
        let mut buf = BytesMut::from("abcdef");
        let mut body = BodyDecoder::Length(4);
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.decode(&mut buf).unwrap().unwrap(), "abcd");
        assert!(body.is_done() && &buf[..] == b"ef");
        let mut body = BodyDecoder::UntilClose;
        assert_eq!(body.decode(&mut buf).unwrap().unwrap(), "ef");
        assert!(body.decode(&mut buf).unwrap().is_none() && !body.is_done());
    }

    #[test]
    fn head_pieces() {
        let text = b"x-a: 1\r\ncontent-type: text/plain\r\n\r\n";
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(text, &mut slots)
        else {
            panic!("complete headers")
        };
        let spans = header_spans(text, parsed);
        let head = Bytes::from_static(text);
        let (name, value) = header_at(&head, &spans[1]).unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("content-type", "text/plain")
        );
        let mut out = Vec::new();
        header_line(&mut out, &name, &value);
        length_line(0, &mut out);
        length_line(u64::MAX, &mut out);
        assert_eq!(
            out,
            b"content-type: text/plain\r\ncontent-length: 0\r\ncontent-length: 18446744073709551615\r\n"
        );
        let bad = Bytes::from_static(b"x-a: \x7f");
        assert_eq!(
            header_at(&bad, &(0..3, 5..6)).unwrap_err(),
            "invalid value of header x-a"
        );
    }

    #[test]
    fn chunk_encoding() {
        let mut out = Vec::new();
        encode_chunk(b"", &mut out);
        assert!(out.is_empty());
        encode_chunk(&[b'x'; 26], &mut out);
        assert!(out.starts_with(b"1a\r\nxx") && out.ends_with(b"x\r\n"));
        out.clear();
        chunk_size_line(0x10000, &mut out);
        assert_eq!(out, b"10000\r\n");
    }

    #[test]
    fn lengths() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            for part in v.split('|') {
                m.append(CONTENT_LENGTH, part.parse().unwrap());
            }
            content_length(&m)
        };
        assert_eq!(h("5"), Ok(Some(5)));
        assert_eq!(h("3, 3"), Ok(Some(3)));
        assert_eq!(h("3|3"), Ok(Some(3)));
        assert!(h("1, 2").is_err());
        assert!(h("-1").is_err());
        assert!(h("nope").is_err());
        assert!(h("+1").is_err());
        assert!(h("").is_err());
        assert_eq!(h(" 007 "), Ok(Some(7)));
        assert_eq!(h("18446744073709551615"), Ok(Some(u64::MAX)));
        assert!(h("18446744073709551616").is_err());
        assert_eq!(content_length(&HeaderMap::new()), Ok(None));
    }
}

#[cfg(test)]
mod proptests;
