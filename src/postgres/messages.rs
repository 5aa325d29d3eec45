//! PostgreSQL wire framing: the startup packet, message headers (type byte + length), and the
//! few backend messages the pooler writes itself. Row data is never parsed: streams are scanned
//! header to header and passed on as bytes.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// A startup packet is a few parameters; PostgreSQL's own limit is 10 000 bytes.
pub const MAX_STARTUP: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("message of {0} bytes is over the limit")]
    Oversized(usize),
}

pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Start { params: Vec<(String, String)> },
}

impl Startup {
    pub fn param(params: &[(String, String)], name: &str) -> Option<String> {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

async fn read_exact_or_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Reads one startup-phase packet (no type byte).
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, FrameError> {
    let mut head = [0u8; 8];
    read_exact_or_closed(r, &mut head).await?;
    let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let len = usize::try_from(len).map_err(|_| FrameError::Malformed("negative length"))?;
    if len < 8 {
        return Err(FrameError::Malformed("startup packet too short"));
    }
    if len > MAX_STARTUP {
        return Err(FrameError::Oversized(len));
    }
    let mut body = vec![0u8; len - 8];
    read_exact_or_closed(r, &mut body).await?;
    match code {
        SSL_REQUEST if body.is_empty() => Ok(Startup::Ssl),
        GSSENC_REQUEST if body.is_empty() => Ok(Startup::GssEnc),
        CANCEL_REQUEST if body.len() == 8 => Ok(Startup::Cancel {
            pid: i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            key: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
        }),
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            let mut rest = &body[..];
            loop {
                let (k, after) = cstr(rest)?;
                if k.is_empty() {
                    break;
                }
                let (v, after) = cstr(after)?;
                params.push((k.to_string(), v.to_string()));
                rest = after;
            }
            Ok(Startup::Start { params })
        }
        _ => Err(FrameError::Malformed("unsupported protocol version")),
    }
}

/// A NUL-terminated UTF-8 string at the start of `buf`, and what follows it.
pub fn cstr(buf: &[u8]) -> Result<(&str, &[u8]), FrameError> {
    let end = memchr::memchr(0, buf).ok_or(FrameError::Malformed("string without terminator"))?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| FrameError::Malformed("invalid UTF-8"))?;
    Ok((s, &buf[end + 1..]))
}

/// A whole typed message read into `buf` (cleared first): returns its type; the body is `buf`.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<u8, FrameError> {
    let mut head = [0u8; 5];
    read_exact_or_closed(r, &mut head).await?;
    let len = body_len(&head)?;
    if len > max {
        return Err(FrameError::Oversized(len));
    }
    buf.clear();
    buf.resize(len, 0);
    read_exact_or_closed(r, &mut buf[..]).await?;
    Ok(head[0])
}

/// The body length of a message from its 5-byte header.
pub fn body_len(head: &[u8]) -> Result<usize, FrameError> {
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let len = usize::try_from(len).map_err(|_| FrameError::Malformed("negative length"))?;
    len.checked_sub(4)
        .ok_or(FrameError::Malformed("length under 4"))
}

/// Appends a message: type, length, then whatever `body` writes.
pub fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// AuthenticationRequest `code` with `extra` bytes.
pub fn auth_request(out: &mut BytesMut, code: i32, extra: &[u8]) {
    put_message(out, b'R', |b| {
        b.put_i32(code);
        b.put_slice(extra);
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    put_message(out, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key(out: &mut BytesMut, pid: i32, key: i32) {
    put_message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    put_message(out, b'Z', |b| b.put_u8(status));
}

/// A simple Query message.
pub fn query(out: &mut BytesMut, sql: &str) {
    put_message(out, b'Q', |b| put_cstr(b, sql));
}

/// The startup message the pooler sends to a server.
pub fn startup(out: &mut BytesMut, params: &[(&str, &str)]) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k);
        put_cstr(out, v);
    }
    out.put_u8(0);
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = memchr::memchr(0, after)?;
        if field == b'C' {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// The `M` (message) field of an ErrorResponse body, for logs.
pub fn error_message(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        let Some(end) = memchr::memchr(0, after) else {
            break;
        };
        if field == b'M' {
            return String::from_utf8_lossy(&after[..end]).into_owned();
        }
        rest = &after[end + 1..];
    }
    String::new()
}

/// Frontend message types a client may send once authenticated.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'S' | b'H' | b'C' | b'X' | b'd' | b'c' | b'f' | b'F'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trip() {
        let mut out = BytesMut::new();
        query(&mut out, "select 1");
        assert_eq!(out[0], b'Q');
        assert_eq!(body_len(&out[..5]).ok(), Some("select 1".len() + 1));
        let mut err = BytesMut::new();
        crate::postgres::errors::PgError::new("ERROR", "28P01", "nope").write(&mut err);
        assert_eq!(error_code(&err[5..]), Some(&b"28P01"[..]));
        assert_eq!(error_message(&err[5..]), "nope");
    }

    #[test]
    fn bad_lengths_are_malformed() {
        assert!(body_len(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(body_len(&[b'Q', 0xff, 0, 0, 0]).is_err());
    }
}
