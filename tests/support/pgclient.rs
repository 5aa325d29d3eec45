//! Client-side helpers for the PostgreSQL pooler tests: a sidelight with pools over the shared
//! PostgreSQL (see pg.rs), tokio-postgres connections through it, and raw protocol bytes.

use super::pg::pg;
use super::proxy::{self, Proxy};
use std::time::Duration;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// sidelight with the given pool lines, users `alice` (alice-pw) and `bob` (bob-pw).
pub async fn pooler(pool_yaml: &str) -> Proxy {
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users:\n    - {{ name: alice, password: alice-pw }}\n    - {{ name: bob, password: bob-pw }}\n  pools:\n{pool_yaml}"
    );
    proxy::start(&yaml).await
}

/// One pool line: pool `name` over server database `db` as app_scram, plus `extra` fields.
pub fn pool(name: &str, db: &str, extra: &str) -> String {
    format!(
        "    - {{ name: {name}, dbname: {db}, servers: [\"{}\"], user: app_scram, password: scram-pw{extra} }}\n",
        pg().addr()
    )
}

pub fn pg_addr(p: &Proxy) -> std::net::SocketAddr {
    p.pg_listeners()[0]
}

pub fn conninfo(p: &Proxy, db: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} dbname={db} user=alice password=alice-pw connect_timeout=10 {extra}",
        pg_addr(p).port()
    )
}

/// A client whose connection task's end (and error, if any) is kept for the test.
pub async fn connect_watched(
    p: &Proxy,
    db: &str,
    extra: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = tokio_postgres::connect(&conninfo(p, db, extra), NoTls)
        .await
        .expect("connect through sidelight");
    (client, tokio::spawn(conn))
}

pub async fn connect(p: &Proxy, db: &str) -> Client {
    connect_watched(p, db, "").await.0
}

pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

/// The first column of the first row of a simple query.
pub async fn one(c: &Client, sql: &str) -> String {
    let rows = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Authenticates a raw socket to a trust pool and returns it after the first ReadyForQuery,
/// with the startup answer (ParameterStatus, BackendKeyData) read.
pub async fn raw_client(p: &Proxy, db: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    raw_client_with(p, db, &[]).await
}

/// `raw_client` with more startup parameters.
pub async fn raw_client_with(
    p: &Proxy,
    db: &str,
    params: &[(&str, &str)],
) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(pg_addr(p))
        .await
        .expect("connect");
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    let mut kvs = vec![("user", "alice"), ("database", db)];
    kvs.extend_from_slice(params);
    for (k, v) in kvs {
        for s in [k, v] {
            startup.extend_from_slice(s.as_bytes());
            startup.push(0);
        }
    }
    startup.push(0);
    let mut m = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    m.extend(startup);
    s.write_all(&m).await.expect("startup");
    let seen = read_until_tag(&mut s, b'Z').await;
    (s, seen)
}

/// Whole messages (type, body) in `bytes`.
pub fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 5 {
        let len = i32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]])
            as usize;
        if bytes.len() < at + 1 + len {
            break;
        }
        out.push((bytes[at], bytes[at + 5..at + 1 + len].to_vec()));
        at += 1 + len;
    }
    out
}

/// Reads until a message of type `tag` arrives; returns all bytes read.
pub async fn read_until_tag(s: &mut tokio::net::TcpStream, tag: u8) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if messages(&out).iter().any(|(t, _)| *t == tag) {
            return out;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed while waiting for {:?}", tag as char);
        out.extend_from_slice(&buf[..n]);
    }
}

/// Like `read_until_tag`, but the peer may close first (after a FATAL).
pub async fn read_until_tag_or_close(s: &mut tokio::net::TcpStream, tag: u8) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !messages(&out).iter().any(|(t, _)| *t == tag) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// The SQLSTATE (`C` field) of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&field, after)) = rest.split_first() {
        let end = after.iter().position(|&b| b == 0).unwrap_or(after.len());
        if field == b'C' {
            return String::from_utf8_lossy(&after[..end]).into_owned();
        }
        if field == 0 || end >= after.len() {
            break;
        }
        rest = &after[end + 1..];
    }
    String::new()
}

/// The ParameterStatus values in a startup answer.
pub fn parameter_status(bytes: &[u8]) -> Vec<(String, String)> {
    messages(bytes)
        .into_iter()
        .filter(|(t, _)| *t == b'S')
        .filter_map(|(_, b)| {
            let mut parts = b.split(|&c| c == 0);
            let k = String::from_utf8_lossy(parts.next()?).into_owned();
            let v = String::from_utf8_lossy(parts.next()?).into_owned();
            Some((k, v))
        })
        .collect()
}

/// A simple query on a raw client: the first column of the first DataRow, or the SQLSTATE of
/// the error as `ERROR <code>`.
pub async fn raw_one(s: &mut tokio::net::TcpStream, sql: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    s.write_all(&msg(b'Q', &q)).await.expect("write");
    let got = read_until_tag_or_close(s, b'Z').await;
    for (t, b) in messages(&got) {
        match t {
            b'E' => return format!("ERROR {}", error_code(&b)),
            b'D' if b.len() >= 6 => {
                let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
                return String::from_utf8_lossy(&b[6..6 + len]).into_owned();
            }
            _ => {}
        }
    }
    String::new()
}
