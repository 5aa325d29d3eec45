//! The PostgreSQL pooler, part two, against a real PostgreSQL 15 (support/pg.rs): cancel
//! requests, query_timeout as a cancel, LISTEN refused in transaction mode, COPY, parameter
//! status and startup parameters.

mod support;

use std::time::{Duration, Instant};
use support::pg::pg;
use support::pgclient::*;
use tokio_postgres::NoTls;

/// Waits until PostgreSQL runs `query` (as an active backend).
async fn running(query: &str) {
    let sql = format!(
        "select count(*) from pg_stat_activity where state = 'active' and query = '{}'",
        query.replace('\'', "''")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sql = sql.clone();
        let n = tokio::task::spawn_blocking(move || pg().psql("postgres", &sql))
            .await
            .expect("psql");
        if n != "0" {
            return;
        }
        assert!(Instant::now() < deadline, "{query} never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn row_count(rows: &[tokio_postgres::SimpleQueryMessage]) -> usize {
    rows.iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

/// A CancelRequest with the given key, sent to sidelight's listener.
async fn raw_cancel(p: &support::proxy::Proxy, pid: i32, key: i32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(pg_addr(p))
        .await
        .expect("connect");
    let mut m = 16i32.to_be_bytes().to_vec();
    m.extend_from_slice(&80877102i32.to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(&key.to_be_bytes());
    s.write_all(&m).await.expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "no answer to a CancelRequest: {rest:?}");
}

#[tokio::test]
async fn cancel_reaches_only_the_clients_own_query() {
    pg().create_db("t_cancel", "app_scram");
    let p = pooler(&pool("cancel", "t_cancel", ", pool_size: 4")).await;
    let (a, b) = (connect(&p, "cancel").await, connect(&p, "cancel").await);
    let token = a.cancel_token();
    let started = Instant::now();
    let long = a.simple_query("select pg_sleep(10)");
    let other = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        b.simple_query("select pg_sleep(1.5), 'not cancelled'")
            .await
    };
    let cancel = async {
        running("select pg_sleep(10)").await;
        running("select pg_sleep(1.5), 'not cancelled'").await;
        token.cancel_query(NoTls).await
    };
    let (ra, rb, rc) = tokio::join!(long, other, cancel);
    rc.expect("cancel sent");
    let e = ra.expect_err("pg_sleep(10) cancelled");
    assert_eq!(code(&e), "57014", "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let rows = rb.expect("the other client's query is not cancelled");
    assert_eq!(row_count(&rows), 1, "{rows:?}");
    // The cancelled session goes on.
    assert_eq!(one(&a, "select 40 + 2").await, "42");
    assert_eq!(
        p.metric(
            "sidelight_pg_cancel_requests_total",
            &[("pool", "cancel"), ("result", "forwarded")]
        )
        .await,
        1.0
    );

    // A client that holds no server connection: nothing is sent.
    a.cancel_token().cancel_query(NoTls).await.expect("cancel");
    p.assert_metric_eventually(
        "sidelight_pg_cancel_requests_total",
        &[("pool", "cancel"), ("result", "no_server")],
        1.0,
    )
    .await;
    assert_eq!(one(&a, "select 'still fine'").await, "still fine");

    // An unknown key cancels nothing, even while queries run.
    let short = a.simple_query("select pg_sleep(0.5), 'finished'");
    let bogus = async {
        running("select pg_sleep(0.5), 'finished'").await;
        raw_cancel(&p, 12345, 678).await;
    };
    let (r, ()) = tokio::join!(short, bogus);
    assert_eq!(row_count(&r.expect("not cancelled by an unknown key")), 1);
    assert_eq!(
        p.metric(
            "sidelight_pg_cancel_requests_total",
            &[("pool", ""), ("result", "unknown_key")]
        )
        .await,
        1.0
    );
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{} {}", d.message(), d.hint().unwrap_or("")))
        .unwrap_or_default()
}

#[tokio::test]
async fn listen_is_refused_in_transaction_mode() {
    use tokio::io::AsyncWriteExt;
    pg().create_db("t_listen", "app_scram");
    let pools = format!(
        "{}{}",
        pool("listen", "t_listen", ", pool_size: 1, auth_type: trust"),
        pool("listen_s", "t_listen", ", pool_mode: session")
    );
    let p = pooler(&pools).await;
    let c = connect(&p, "listen").await;
    let e = c
        .simple_query("/* a comment */ listen jobs")
        .await
        .expect_err("LISTEN refused");
    assert_eq!(code(&e), "0A000", "{e:?}");
    assert!(db_message(&e).contains("session"), "{}", db_message(&e));
    assert_eq!(one(&c, "select 'next'").await, "next");
    // Inside a transaction: the transaction is aborted, as by any failing statement.
    c.batch_execute("BEGIN").await.expect("begin");
    let e = c.batch_execute("LISTEN jobs").await.expect_err("refused");
    assert_eq!(code(&e), "0A000");
    let e = c.batch_execute("select 1").await.expect_err("aborted");
    assert_eq!(code(&e), "25P02");
    c.batch_execute("ROLLBACK").await.expect("rollback");
    // Extended protocol, in a pipeline: the error, then skip to Sync and ReadyForQuery; the
    // statements before and after run.
    let (mut s, _) = raw_client(&p, "listen").await;
    let mut batch = Vec::new();
    for sql in ["select 'before'", "LISTEN jobs", "select 'skipped'"] {
        batch.extend(msg(b'P', format!("\0{sql}\0\0\0").as_bytes()));
        batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
        batch.extend(msg(b'E', b"\0\0\0\0\0"));
    }
    batch.extend(msg(b'S', b""));
    batch.extend(msg(b'P', b"\0select 'after'\0\0\0"));
    batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'S', b""));
    s.write_all(&batch).await.expect("write");
    let mut got = read_until_tag(&mut s, b'Z').await;
    while messages(&got).iter().filter(|(t, _)| *t == b'Z').count() < 2 {
        got.extend(read_until_tag(&mut s, b'Z').await);
    }
    let tags: String = messages(&got).iter().map(|(t, _)| *t as char).collect();
    // before: ParseComplete, BindComplete, DataRow, CommandComplete; LISTEN: its
    // ParseComplete and BindComplete, then the error at Execute; skipped to Sync.
    assert_eq!(tags, "12DC12EZ12DCZ", "{got:?}");
    let error = messages(&got)
        .into_iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| error_code(&b));
    assert_eq!(error.as_deref(), Some("0A000"));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("before") && text.contains("after") && !text.contains("skipped"));
    // Session mode: LISTEN works.
    let sess = connect(&p, "listen_s").await;
    sess.batch_execute("LISTEN jobs")
        .await
        .expect("LISTEN in session mode");
}

#[tokio::test]
async fn copy_in_and_out_and_a_copy_that_fails() {
    use futures_util::{SinkExt, TryStreamExt};
    pg().create_db("t_copy", "app_scram");
    pg().psql(
        "t_copy",
        "CREATE TABLE items (n int, s text); ALTER TABLE items OWNER TO app_scram",
    );
    let p = pooler(&pool("copy", "t_copy", ", pool_size: 1, auth_type: trust")).await;
    let c = connect(&p, "copy").await;
    // A bad row mid-way: the server's error, then the session goes on.
    let sink = c.copy_in("COPY items FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(
        b"1\tone\nnot a number\ttwo\n3\tthree\n",
    ))
    .await
    .expect("send");
    let e = sink.finish().await.expect_err("bad row");
    assert_eq!(code(&e), "22P02", "{e:?}");
    assert_eq!(one(&c, "select count(*) from items").await, "0");
    // A good one, in and out; the server connection is not given back mid-COPY, so another
    // client waits for it (pool_size 1).
    let sink = c.copy_in("COPY items FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tone\n"))
        .await
        .expect("send");
    let other = connect(&p, "copy").await;
    let waiting = tokio::spawn(async move { one(&other, "select count(*) from items").await });
    p.assert_metric_eventually(
        "sidelight_pg_client_connections",
        &[("pool", "copy"), ("state", "waiting")],
        1.0,
    )
    .await;
    sink.send(bytes::Bytes::from_static(b"2\ttwo\n"))
        .await
        .expect("send");
    assert_eq!(sink.finish().await.expect("copy done"), 2);
    assert_eq!(waiting.await.expect("join"), "2");
    let out: Vec<bytes::Bytes> = c
        .copy_out("COPY items TO STDOUT")
        .await
        .expect("copy out")
        .try_collect()
        .await
        .expect("rows");
    assert_eq!(out.concat(), b"1\tone\n2\ttwo\n");
    // Simple-protocol COPY, as psql runs it, with a failing row.
    let (mut s, _) = raw_client(&p, "copy").await;
    use tokio::io::AsyncWriteExt;
    s.write_all(&msg(b'Q', b"COPY items FROM STDIN\0"))
        .await
        .expect("write");
    read_until_tag(&mut s, b'G').await;
    let mut data = msg(b'd', b"7\tseven\nbad\n");
    data.extend(msg(b'c', b""));
    s.write_all(&data).await.expect("write");
    let got = read_until_tag(&mut s, b'Z').await;
    let error = messages(&got)
        .into_iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| error_code(&b));
    assert_eq!(error.as_deref(), Some("22P02"), "{got:?}");
    s.write_all(&msg(b'Q', b"select count(*) from items\0"))
        .await
        .expect("write");
    let got = read_until_tag(&mut s, b'Z').await;
    assert!(String::from_utf8_lossy(&got).contains('2'), "{got:?}");
    assert_eq!(
        p.metric(
            "sidelight_pg_copy_bytes_total",
            &[("pool", "copy"), ("direction", "out")]
        )
        .await,
        12.0
    );
    assert!(
        p.metric(
            "sidelight_pg_copy_bytes_total",
            &[("pool", "copy"), ("direction", "in")]
        )
        .await
            >= 12.0
    );
}

#[tokio::test]
async fn startup_parameters_follow_each_client_across_a_shared_connection() {
    pg().create_db("t_params", "app_scram");
    let p = pooler(&pool(
        "params",
        "t_params",
        ", pool_size: 1, auth_type: trust",
    ))
    .await;
    let a = connect_watched(&p, "params", "application_name=alpha")
        .await
        .0;
    let b = connect_watched(&p, "params", "application_name=beta")
        .await
        .0;
    let (mut r, greeting) = raw_client_with(
        &p,
        "params",
        &[("TimeZone", "Asia/Tokyo"), ("application_name", "raw")],
    )
    .await;
    // The greeting has what a direct connection sends, with the client's own values.
    let status = parameter_status(&greeting);
    for name in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "standard_conforming_strings",
        "integer_datetimes",
        "IntervalStyle",
        "is_superuser",
        "session_authorization",
        "application_name",
    ] {
        assert!(status.iter().any(|(k, _)| k == name), "{name}: {status:?}");
    }
    let get = |name: &str| {
        status
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("TimeZone").as_deref(), Some("Asia/Tokyo"));
    assert_eq!(get("application_name").as_deref(), Some("raw"));
    assert!(get("server_version").is_some_and(|v| v.starts_with("15")));
    let default_tz = pg().psql("t_params", "show timezone");
    assert_ne!(default_tz, "Asia/Tokyo");

    let app = "select current_setting('application_name')";
    for _ in 0..2 {
        assert_eq!(one(&a, app).await, "alpha");
        assert_eq!(raw_one(&mut r, "SHOW TimeZone").await, "Asia/Tokyo");
        assert_eq!(raw_one(&mut r, app).await, "raw");
        assert_eq!(one(&b, app).await, "beta");
        assert_eq!(one(&b, "SHOW TimeZone").await, default_tz);
    }
    // A client's own SET of a tracked parameter follows it too (the server reports it).
    a.batch_execute("SET TimeZone = 'America/New_York'")
        .await
        .expect("set");
    assert_eq!(one(&b, "SHOW TimeZone").await, default_tz);
    assert_eq!(one(&a, "SHOW TimeZone").await, "America/New_York");
    assert_eq!(raw_one(&mut r, "SHOW TimeZone").await, "Asia/Tokyo");
    assert_eq!(
        p.metric(
            "sidelight_pg_server_connects_total",
            &[("pool", "params"), ("result", "ok")]
        )
        .await,
        1.0,
        "one shared server connection"
    );
    // A value the server refuses: the client's first query ends with FATAL 22023, as
    // PostgreSQL refuses such a connection; other clients go on.
    let (mut bad, _) = raw_client_with(&p, "params", &[("TimeZone", "Mars/Olympus")]).await;
    assert_eq!(raw_one(&mut bad, "select 1").await, "ERROR 22023");
    assert_eq!(one(&b, app).await, "beta");
}

/// A stand-in PostgreSQL server that authenticates anyone, then never answers a query and
/// ignores cancels (it counts them): what query_timeout's fallback is for.
async fn deaf_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cancels = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = cancels.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let mut body = vec![0u8; len.saturating_sub(8)];
                let _ = s.read_exact(&mut body).await;
                if i32::from_be_bytes([head[4], head[5], head[6], head[7]]) == 80877102 {
                    seen.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let mut hello = msg(b'R', &0i32.to_be_bytes());
                hello.extend(msg(b'S', b"server_version\x0015.0\x00"));
                hello.extend(msg(b'K', &[0, 0, 0, 7, 0, 0, 0, 9]));
                hello.extend(msg(b'Z', b"I"));
                let _ = s.write_all(&hello).await;
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, cancels)
}

#[tokio::test]
async fn query_timeout_falls_back_to_closing_when_the_cancel_goes_unanswered() {
    let (addr, cancels) = deaf_server().await;
    let p = pooler(&format!(
        "    - {{ name: deaf, servers: [\"{addr}\"], user: u, auth_type: trust, query_timeout: 200ms, server_tls_sslmode: disable }}\n"
    ))
    .await;
    let (c, conn) = connect_watched(&p, "deaf", "").await;
    let started = Instant::now();
    let e = c.simple_query("select 1").await.expect_err("timed out");
    let waited = started.elapsed();
    assert_eq!(code(&e), "57014", "{e:?}");
    let text = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(text.contains("did not answer the cancel"), "{text}");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    assert_eq!(cancels.load(std::sync::atomic::Ordering::SeqCst), 1);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(c.is_closed(), "FATAL ends the client");
    p.assert_metric_eventually(
        "sidelight_pg_server_disconnects_total",
        &[("pool", "deaf"), ("reason", "timeout")],
        1.0,
    )
    .await;
}
