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
