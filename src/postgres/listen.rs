//! `LISTEN` in transaction mode is refused: notifications would go to whichever client next
//! gets that server connection. A simple Query or Parse whose first keyword is LISTEN is
//! rewritten into a statement that raises sidelight's error on the server (SQLSTATE 0A000),
//! so the error, the transaction state and the extended protocol's skip-to-Sync are exactly
//! what PostgreSQL does with any failing statement, in order with the rest of a pipeline.

use super::sql;
use bytes::{BufMut, BytesMut};

/// How much of a Query or Parse body is looked at (statement name, comments, first keyword).
pub const PEEK: usize = 256;

const REFUSAL: &str = "DO $sidelight$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', \
    MESSAGE = 'LISTEN is not supported in transaction mode: notifications would reach whichever \
    client uses this server connection next', HINT = 'Use a pool with pool_mode: session for \
    LISTEN.'; END$sidelight$";

pub enum Check {
    /// Fewer than `min(len, PEEK)` body bytes are here yet.
    NeedMore,
    Pass,
    /// Send this whole message instead.
    Refuse(BytesMut),
}

/// Looks at the start of a Query (`Q`) or Parse (`P`) message body of `len` bytes, of which
/// `have` is what has arrived.
pub fn check(tag: u8, have: &[u8], len: usize) -> Check {
    let want = len.min(PEEK);
    if have.len() < want {
        return Check::NeedMore;
    }
    let body = &have[..want];
    let (name, text) = if tag == b'P' {
        match memchr::memchr(0, body) {
            Some(end) => (&body[..end], &body[end + 1..]),
            None => return Check::Pass,
        }
    } else {
        (&b""[..], body)
    };
    match sql::first_word(text) {
        Some(w) if w.eq_ignore_ascii_case(b"LISTEN") => Check::Refuse(refusal(tag, name)),
        _ => Check::Pass,
    }
}

fn refusal(tag: u8, name: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(REFUSAL.len() + name.len() + 16);
    super::messages::put_message(&mut out, tag, |b| {
        if tag == b'P' {
            b.put_slice(name);
            b.put_u8(0);
        }
        b.put_slice(REFUSAL.as_bytes());
        b.put_u8(0);
        if tag == b'P' {
            b.put_i16(0); // no parameter types
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_refused_other_statements_pass() {
        assert!(matches!(check(b'Q', b"listen x\0", 9), Check::Refuse(_)));
        assert!(matches!(check(b'Q', b"select 1\0", 9), Check::Pass));
        assert!(matches!(check(b'Q', b"unlisten x\0", 11), Check::Pass));
        assert!(matches!(check(b'Q', b"list", 9), Check::NeedMore));
        match check(b'P', b"s1\0 /* c */ LISTEN x\0\0\0", 23) {
            Check::Refuse(m) => {
                assert_eq!(m[0], b'P');
                assert!(m[5..].starts_with(b"s1\0DO "));
                assert!(m.ends_with(b"\0\0\0"));
            }
            _ => panic!("Parse of LISTEN passed"),
        }
    }
}
