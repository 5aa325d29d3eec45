//! The PostgreSQL pooler against a real PostgreSQL 15 (one per test binary, see support/pg.rs).

mod support;

use std::time::Duration;
use support::pg::pg;
use support::proxy::{self, Proxy};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// sidelight with one pool `name` over server database `db`, as server user `server_user`.
async fn pooler(pool_yaml: &str) -> Proxy {
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users:\n    - {{ name: alice, password: alice-pw }}\n    - {{ name: bob, password: \"${{BOB_PW}}\" }}\n  max_client_message_bytes: 64KiB\n  pools:\n{pool_yaml}"
    );
    proxy::start_with_env(&yaml, &[("BOB_PW", "bob-pw")]).await
}

fn pool(name: &str, db: &str, extra: &str) -> String {
    format!(
        "    - {{ name: {name}, dbname: {db}, servers: [\"{}\"], user: app_scram, password: scram-pw{extra} }}\n",
        pg().addr()
    )
}

fn pg_addr(p: &Proxy) -> std::net::SocketAddr {
    p.pg_listeners()[0]
}

async fn connect_as(
    p: &Proxy,
    db: &str,
    user: &str,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let addr = pg_addr(p);
    let conf = format!(
        "host=127.0.0.1 port={} dbname={db} user={user} password={password} connect_timeout=10",
        addr.port()
    );
    let (client, conn) = tokio_postgres::connect(&conf, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn connect(p: &Proxy, db: &str) -> Client {
    connect_as(p, db, "alice", "alice-pw")
        .await
        .expect("connect through sidelight")
}

fn refused(r: Result<Client, tokio_postgres::Error>, what: &str) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("connected, expected: {what}"),
        Err(e) => e,
    }
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

#[tokio::test]
async fn simple_and_extended_queries() {
    pg().create_db("t_basic", "app_scram");
    let p = pooler(&pool("basic", "t_basic", "")).await;
    let c = connect(&p, "basic").await;
    let rows = c
        .simple_query("select 1 as one; select 'two'")
        .await
        .expect("simple");
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);
    let row = c
        .query_one("select $1::int + 1, $2::text", &[&41i32, &"x"])
        .await
        .expect("extended");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "x");
    // An error in the extended protocol, then the connection goes on.
    let e = c
        .query_one("select 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(code(&e), "22012");
    // Large rows pass through as bytes.
    let big = c
        .query_one("select repeat('x', 300000)", &[])
        .await
        .expect("big row");
    assert_eq!(big.get::<_, String>(0).len(), 300000);
    assert_eq!(
        c.query_one("select 7", &[])
            .await
            .expect("after")
            .get::<_, i32>(0),
        7
    );
    p.assert_metric_eventually(
        "sidelight_pg_errors_total",
        &[("pool", "basic"), ("class", "22")],
        1.0,
    )
    .await;
    let m = p.metrics().await;
    assert!(
        support::metric(
            &m,
            "sidelight_pg_query_duration_seconds_count",
            &[("pool", "basic")]
        )
        .unwrap_or(0.0)
            >= 4.0,
        "{m}"
    );
    assert!(
        support::metric(
            &m,
            "sidelight_pg_bytes_total",
            &[("pool", "basic"), ("direction", "out")]
        )
        .unwrap_or(0.0)
            > 300000.0
    );
}

#[tokio::test]
async fn pipelined_batches_share_one_server_connection() {
    pg().create_db("t_pipe", "app_scram");
    let p = pooler(&pool("pipe", "t_pipe", ", pool_size: 1")).await;
    let (a, b) = (connect(&p, "pipe").await, connect(&p, "pipe").await);
    let stmt_a = a.prepare("select $1::int * 2").await.expect("prepare");
    let stmt_b = b.prepare("select $1::int * 3").await.expect("prepare");
    // tokio-postgres pipelines concurrent queries on one connection: many Syncs in flight.
    for _ in 0..5 {
        let fa = (0..40).map(|i| {
            let (a, s) = (&a, &stmt_a);
            async move { a.query_one(s, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
        });
        let fb = (0..40).map(|i| {
            let (b, s) = (&b, &stmt_b);
            async move { b.query_one(s, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
        });
        let (ra, rb) = tokio::join!(
            futures_util::future::join_all(fa),
            futures_util::future::join_all(fb)
        );
        for (i, r) in ra.into_iter().enumerate() {
            assert_eq!(r.expect("a"), i as i32 * 2);
        }
        for (i, r) in rb.into_iter().enumerate() {
            assert_eq!(r.expect("b"), i as i32 * 3);
        }
    }
    assert_eq!(
        p.metric(
            "sidelight_pg_server_connects_total",
            &[("pool", "pipe"), ("result", "ok")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn transactions_are_isolated_between_clients() {
    pg().create_db("t_iso", "app_scram");
    pg().psql(
        "t_iso",
        "CREATE TABLE items (n int); ALTER TABLE items OWNER TO app_scram",
    );
    for size in [1, 2] {
        let p = pooler(&pool("iso", "t_iso", &format!(", pool_size: {size}"))).await;
        let (a, b) = (connect(&p, "iso").await, connect(&p, "iso").await);
        a.batch_execute(
            "BEGIN; INSERT INTO items VALUES (1); CREATE TEMP TABLE mine (x int) ON COMMIT DROP",
        )
        .await
        .expect("begin");
        let b_reads = async {
            let n: i64 = b
                .query_one("select count(*) from items", &[])
                .await
                .expect("count")
                .get(0);
            let temp: bool = b
                .query_one("select to_regclass('pg_temp.mine') is not null", &[])
                .await
                .expect("temp")
                .get(0);
            (n, temp)
        };
        if size == 1 {
            // B waits for A's transaction to end; it must not run inside it.
            let b_task = async {
                let r = b_reads.await;
                r
            };
            let commit = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.batch_execute("ROLLBACK").await.expect("rollback");
            };
            let ((n, temp), ()) = tokio::join!(b_task, commit);
            assert_eq!((n, temp), (0, false), "pool_size 1");
        } else {
            let (n, temp) = b_reads.await;
            assert_eq!((n, temp), (0, false), "pool_size 2");
            a.batch_execute("ROLLBACK").await.expect("rollback");
        }
        p.assert_metric_eventually(
            "sidelight_pg_client_connections",
            &[("pool", "iso"), ("state", "active")],
            0.0,
        )
        .await;
    }
}

#[tokio::test]
async fn a_client_that_vanishes_mid_transaction_leaves_nothing_behind() {
    pg().create_db("t_gone", "app_scram");
    pg().psql(
        "t_gone",
        "CREATE TABLE items (n int); ALTER TABLE items OWNER TO app_scram",
    );
    let p = pooler(&pool("gone", "t_gone", ", pool_size: 1")).await;
    {
        let a = connect(&p, "gone").await;
        a.batch_execute("BEGIN; INSERT INTO items VALUES (1); CREATE TEMP TABLE leftover (x int)")
            .await
            .expect("begin");
        drop(a); // the connection task ends: the socket closes mid-transaction
    }
    let b = connect(&p, "gone").await;
    let row = b
        .query_one(
            "select (select count(*) from items), to_regclass('pg_temp.leftover') is null",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, i64>(0), 0, "uncommitted insert rolled back");
    assert!(row.get::<_, bool>(1), "temp table gone");
    // Not inside someone else's transaction: the next statement sees a fresh transaction.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = b
        .simple_query("select now() = statement_timestamp()")
        .await
        .expect("q");
    let fresh = fresh.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(fresh.as_deref(), Some("t"), "a transaction of its own");
    assert_eq!(
        p.metric(
            "sidelight_pg_server_connects_total",
            &[("pool", "gone"), ("result", "ok")]
        )
        .await,
        1.0,
        "the connection was rolled back and reused"
    );
}

#[tokio::test]
async fn client_auth_methods_and_failures() {
    pg().create_db("t_auth", "app_scram");
    let pools = format!(
        "{}{}{}",
        pool("scram", "t_auth", ""),
        pool("md5", "t_auth", ", auth_type: md5"),
        pool("trust", "t_auth", ", auth_type: trust")
    );
    let p = pooler(&pools).await;
    for db in ["scram", "md5", "trust"] {
        let c = connect_as(&p, db, "bob", "bob-pw")
            .await
            .unwrap_or_else(|e| panic!("{db}: {e}"));
        assert_eq!(
            c.query_one("select 1", &[])
                .await
                .expect("q")
                .get::<_, i32>(0),
            1
        );
    }
    for db in ["scram", "md5"] {
        let e = refused(connect_as(&p, db, "bob", "wrong").await, "refused");
        assert_eq!(code(&e), "28P01", "{db}");
        let e = refused(connect_as(&p, db, "mallory", "x").await, "refused");
        assert_eq!(code(&e), "28P01", "{db} unknown user");
        p.assert_metric_eventually("sidelight_pg_auth_failures_total", &[("pool", db)], 2.0)
            .await;
    }
    let e = refused(connect_as(&p, "trust", "mallory", "").await, "unknown user");
    assert_eq!(code(&e), "28000");
    let e = refused(connect_as(&p, "nope", "bob", "bob-pw").await, "unknown db");
    assert_eq!(code(&e), "3D000");
}

#[tokio::test]
async fn server_auth_methods() {
    pg().create_db("t_sauth", "app_scram");
    let addr = pg().addr();
    let pools = [("app_md5", "md5-pw"), ("app_clear", "clear-pw"), ("app_trust", ""), ("app_scram", "scram-pw")]
        .iter()
        .map(|(user, pw)| format!("    - {{ name: {user}, dbname: t_sauth, servers: [\"{addr}\"], user: {user}, password: \"{pw}\" }}\n"))
        .collect::<String>();
    let bad = format!("    - {{ name: bad, dbname: t_sauth, servers: [\"{addr}\"], user: app_scram, password: nope }}\n");
    let p = pooler(&format!("{pools}{bad}")).await;
    for user in ["app_md5", "app_clear", "app_trust", "app_scram"] {
        let c = connect(&p, user).await;
        let who: String = c
            .query_one("select current_user::text", &[])
            .await
            .expect("q")
            .get(0);
        assert_eq!(who, user);
    }
    // The server refuses the pool's password: the client gets an error, readyz reports it.
    let e = refused(
        connect_as(&p, "bad", "alice", "alice-pw").await,
        "server refused",
    );
    assert_eq!(code(&e), "08001");
    let ready = support::get(&p.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("postgres pool bad"), "{}", ready.body);
    let status = support::get(&p.admin_url("/status")).await.json();
    assert_eq!(status["postgres"]["bad"]["healthy"], false, "{status}");
    assert_eq!(status["postgres"]["app_md5"]["healthy"], true, "{status}");
}

#[tokio::test]
async fn pool_exhaustion_ends_with_the_wait_timeout() {
    pg().create_db("t_wait", "app_scram");
    let p = pooler(&pool(
        "wait",
        "t_wait",
        ", pool_size: 1, query_wait_timeout: 200ms",
    ))
    .await;
    let a = connect(&p, "wait").await;
    a.batch_execute("BEGIN").await.expect("begin");
    let b = connect(&p, "wait").await;
    let started = std::time::Instant::now();
    let e = b
        .query_one("select 1", &[])
        .await
        .expect_err("no connection free");
    assert_eq!(code(&e), "53300");
    assert!(db_message(&e).contains("query_wait_timeout"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    a.batch_execute("COMMIT").await.expect("commit");
    let c = connect(&p, "wait").await;
    assert_eq!(
        c.query_one("select 2", &[])
            .await
            .expect("q")
            .get::<_, i32>(0),
        2
    );
    assert_eq!(
        p.metric(
            "sidelight_pg_timeouts_total",
            &[("pool", "wait"), ("kind", "query_wait")]
        )
        .await,
        1.0
    );
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn query_and_idle_transaction_timeouts() {
    pg().create_db("t_tmo", "app_scram");
    let p = pooler(&pool(
        "tmo",
        "t_tmo",
        ", pool_size: 1, query_timeout: 300ms, idle_transaction_timeout: 300ms",
    ))
    .await;
    // query_timeout works like statement_timeout: the query is cancelled, the session goes on,
    // and the server connection too.
    let a = connect(&p, "tmo").await;
    let started = std::time::Instant::now();
    let e = a
        .simple_query("select pg_sleep(5)")
        .await
        .expect_err("query_timeout");
    assert_eq!(code(&e), "57014");
    assert!(db_message(&e).contains("query_timeout"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let e = a
        .query_typed("select pg_sleep(5)", &[])
        .await
        .expect_err("query_timeout, extended protocol");
    assert_eq!(code(&e), "57014");
    assert!(db_message(&e).contains("query_timeout"), "{e:?}");
    assert_eq!(
        a.query_one("select 3", &[])
            .await
            .expect("the session goes on")
            .get::<_, i32>(0),
        3
    );
    assert_eq!(
        p.metric(
            "sidelight_pg_timeouts_total",
            &[("pool", "tmo"), ("kind", "query")]
        )
        .await,
        2.0
    );
    assert_eq!(
        p.metric(
            "sidelight_pg_server_connects_total",
            &[("pool", "tmo"), ("result", "ok")]
        )
        .await,
        1.0,
        "the cancelled server connection is reused"
    );
    // Idle in transaction: PostgreSQL's own FATAL 25P03, sent to the idle client.
    let conf = format!(
        "host=127.0.0.1 port={} dbname=tmo user=alice password=alice-pw",
        pg_addr(&p).port()
    );
    let (b, conn) = tokio_postgres::connect(&conf, NoTls)
        .await
        .expect("connect");
    let conn = tokio::spawn(conn);
    b.batch_execute("BEGIN").await.expect("begin");
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("ended by idle_transaction_timeout")
        .expect("join");
    let e = ended.expect_err("an error from sidelight");
    assert_eq!(code(&e), "25P03", "{e}");
    assert!(db_message(&e).contains("idle_transaction_timeout"), "{e:?}");
    let c = connect(&p, "tmo").await;
    assert_eq!(
        c.query_one("select 3", &[])
            .await
            .expect("q")
            .get::<_, i32>(0),
        3
    );
}

/// Authenticates a raw socket to a trust pool and returns it after the first ReadyForQuery.
async fn raw_client(p: &Proxy, db: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let mut s = send_startup(p, db).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("startup answer")
            .expect("read");
        assert!(n > 0, "closed during startup");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// A raw socket that has sent its StartupMessage as alice, nothing more.
async fn send_startup(p: &Proxy, db: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(pg_addr(p))
        .await
        .expect("connect");
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    for kv in ["user", "alice", "database", db] {
        startup.extend_from_slice(kv.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut msg = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend(startup);
    s.write_all(&msg).await.expect("startup");
    s
}

/// Reads until the peer closes; returns everything read.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .ok();
    out
}

#[tokio::test]
async fn malformed_and_oversized_messages_end_only_that_client() {
    use tokio::io::AsyncWriteExt;
    pg().create_db("t_bad", "app_scram");
    let p = pooler(&pool("bad", "t_bad", ", pool_size: 1, auth_type: trust")).await;
    let good = connect(&p, "bad").await;
    good.batch_execute("BEGIN").await.expect("begin");
    good.batch_execute("COMMIT").await.expect("commit");

    let mut s = raw_client(&p, "bad").await;
    s.write_all(&[b'Z', 0, 0, 0, 4]).await.expect("write");
    let answer = read_to_close(&mut s).await;
    assert!(answer.windows(5).any(|w| w == b"08P01"), "{answer:?}");

    let mut s = raw_client(&p, "bad").await;
    s.write_all(&[b'Q', 0, 0x10, 0, 0]).await.expect("write"); // 1 MiB query announced
    let answer = read_to_close(&mut s).await;
    assert!(answer.windows(5).any(|w| w == b"08P01"), "{answer:?}");

    let mut s = raw_client(&p, "bad").await;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.expect("write"); // length under 4
    read_to_close(&mut s).await;

    // A client that sends half a query and vanishes.
    let mut s = raw_client(&p, "bad").await;
    s.write_all(&[b'Q', 0, 0, 0, 100, b's', b'e'])
        .await
        .expect("write");
    drop(s);

    assert_eq!(
        good.query_one("select 5", &[])
            .await
            .expect("other client unaffected")
            .get::<_, i32>(0),
        5
    );
    let m = p.metrics().await;
    assert!(
        support::metric(
            &m,
            "sidelight_pg_protocol_errors_total",
            &[("kind", "unknown_message")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert!(
        support::metric(
            &m,
            "sidelight_pg_protocol_errors_total",
            &[("kind", "oversized")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn clients_that_never_finish_their_startup_are_disconnected() {
    pg().create_db("t_login", "app_scram");
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users:\n    - {{ name: alice, password: alice-pw }}\n  client_login_timeout: 300ms\n  pools:\n{}",
        pool("login", "t_login", "")
    );
    let p = proxy::start(&yaml).await;

    // Connects and says nothing: closed without a word (no protocol chosen yet).
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(pg_addr(&p))
        .await
        .expect("connect");
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );

    // Sends its StartupMessage, gets the SCRAM challenge and never answers it.
    let mut stalled = send_startup(&p, "login").await;
    let answer = read_to_close(&mut stalled).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("08P01") && text.contains("client_login_timeout"),
        "{text}"
    );

    // A client that logged in is not cut off later.
    let c = connect(&p, "login").await;
    c.batch_execute("select pg_sleep(0.5)")
        .await
        .expect("sleep");
    assert_eq!(
        c.query_one("select 1", &[])
            .await
            .expect("still served")
            .get::<_, i32>(0),
        1
    );
    p.assert_metric_eventually(
        "sidelight_pg_protocol_errors_total",
        &[("kind", "login_timeout")],
        2.0,
    )
    .await;
}

#[tokio::test]
async fn clients_past_max_client_conn_are_refused_until_one_leaves() {
    pg().create_db("t_maxconn", "app_scram");
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users:\n    - {{ name: alice, password: alice-pw }}\n  max_client_conn: 2\n  pools:\n{}",
        pool("maxconn", "t_maxconn", "")
    );
    let p = proxy::start(&yaml).await;
    let first = connect(&p, "maxconn").await;
    let _second = connect(&p, "maxconn").await;
    let e = refused(
        connect_as(&p, "maxconn", "alice", "alice-pw").await,
        "53300",
    );
    assert_eq!(code(&e), "53300");
    assert!(db_message(&e).contains("max_client_conn"), "{e}");
    p.assert_metric_eventually("sidelight_pg_client_connections_refused_total", &[], 1.0)
        .await;

    // The place is free again once a client has left.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let third = loop {
        match connect_as(&p, "maxconn", "alice", "alice-pw").await {
            Ok(c) => break c,
            Err(e) if code(&e) == "53300" && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no place after a client left: {e}"),
        }
    };
    assert_eq!(
        third
            .query_one("select 3", &[])
            .await
            .expect("served")
            .get::<_, i32>(0),
        3
    );
}

#[tokio::test]
async fn a_killed_server_backend_is_detected_and_replaced() {
    pg().create_db("t_kill", "app_scram");
    let p = pooler(&pool("kill", "t_kill", ", pool_size: 1")).await;
    let a = connect(&p, "kill").await;
    a.batch_execute("BEGIN").await.expect("begin");
    let pid: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    pg().psql("postgres", &format!("select pg_terminate_backend({pid})"));
    let e = a
        .query_one("select 1", &[])
        .await
        .expect_err("server gone mid-transaction");
    assert!(e.code().is_some() || e.is_closed(), "{e:?}");
    // An idle connection killed while in the pool is replaced too.
    let b = connect(&p, "kill").await;
    let pid: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("new server connection")
        .get(0);
    pg().psql("postgres", &format!("select pg_terminate_backend({pid})"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let gone = format!("select count(*) from pg_stat_activity where pid = {pid}");
    while pg().psql("postgres", &gone) != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "backend {pid} still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The same client goes on: the dead idle connection is noticed at checkout and replaced.
    let r = b.query_one("select 9", &[]).await.expect("recovered");
    assert_eq!(r.get::<_, i32>(0), 9);
    let m = p.metrics().await;
    assert!(
        support::metric(
            &m,
            "sidelight_pg_server_disconnects_total",
            &[("pool", "kill"), ("reason", "server_closed")]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_restarted_server_is_detected_and_the_pool_recovers() {
    // Its own PostgreSQL: stopping the shared one would fail the other tests.
    let server = support::pg::start_private();
    server.create_db("t_restart", "app_scram");
    let p = pooler(&format!(
        "    - {{ name: restart, dbname: t_restart, servers: [\"{}\"], user: app_scram, password: scram-pw, pool_size: 2 }}\n",
        server.addr()
    ))
    .await;
    let a = connect(&p, "restart").await;
    let b = connect(&p, "restart").await;
    a.batch_execute("CREATE TABLE t (v int)")
        .await
        .expect("create");
    b.query_one("select 1", &[])
        .await
        .expect("b warms a connection");
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .expect("a opens a transaction");

    server.stop();
    // The client in a transaction gets an error at once, not a hang.
    let in_txn = tokio::time::timeout(Duration::from_secs(10), a.query_one("select 1", &[]))
        .await
        .expect("the client in a transaction got an answer");
    assert!(in_txn.is_err(), "a query on a dead server succeeded");
    // While the server is down: an idle client's query fails with a connection error, and
    // /readyz says which pool is down.
    let down = tokio::time::timeout(Duration::from_secs(10), b.query_one("select 1", &[]))
        .await
        .expect("the idle client got an answer")
        .expect_err("server down");
    assert_eq!(code(&down), "08001", "{down:?}");
    let ready = support::get(&p.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(
        ready.body.contains("postgres pool restart"),
        "{}",
        ready.body
    );
    p.assert_metric_eventually("sidelight_pg_pool_healthy", &[("pool", "restart")], 0.0)
        .await;

    server.start_again();
    // New clients are served on fresh server connections; the uncommitted insert is gone.
    let c = connect(&p, "restart").await;
    let n: i64 = c
        .query_one("select count(*) from t", &[])
        .await
        .expect("served after the restart")
        .get(0);
    assert_eq!(n, 0, "a transaction cut by the restart left a row");
    let ready = support::get(&p.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(
        p.metric("sidelight_pg_pool_healthy", &[("pool", "restart")])
            .await,
        1.0
    );
    assert!(
        p.metric(
            "sidelight_pg_server_disconnects_total",
            &[("pool", "restart"), ("reason", "server_closed")]
        )
        .await
            >= 2.0,
        "both server connections were counted as closed by the server"
    );
    server.stop();
}

#[tokio::test]
async fn session_mode_resets_connections() {
    pg().create_db("t_sess", "app_scram");
    let p = pooler(&pool(
        "sess",
        "t_sess",
        ", pool_size: 1, pool_mode: session",
    ))
    .await;
    {
        let a = connect(&p, "sess").await;
        a.batch_execute("SET application_name = 'dirty'; CREATE TEMP TABLE t (x int)")
            .await
            .expect("set");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let b = loop {
        if let Ok(b) = connect_as(&p, "sess", "alice", "alice-pw").await {
            break b;
        }
        assert!(std::time::Instant::now() < deadline);
    };
    let row = b
        .query_one(
            "select current_setting('application_name'), to_regclass('pg_temp.t') is null",
            &[],
        )
        .await
        .expect("q");
    assert_ne!(row.get::<_, String>(0), "dirty");
    assert!(row.get::<_, bool>(1));
}

#[tokio::test]
async fn psql_end_to_end() {
    pg().create_db("t_psql", "app_scram");
    let p = pooler(&pool("psqldb", "t_psql", "")).await;
    let port = pg_addr(&p).port().to_string();
    let out = tokio::process::Command::new("psql")
        .args([
            "-X",
            "-At",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "alice",
            "-d",
            "psqldb",
            "-c",
            "select 40 + 2",
            "-c",
            "begin; select 'in tx'; commit;",
        ])
        .env("PGPASSWORD", "alice-pw")
        .output()
        .await
        .expect("psql (apt-get install postgresql-client)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("42") && stdout.contains("in tx"),
        "{stdout}"
    );
    let config = support::get(&p.admin_url("/config")).await.body;
    assert!(
        !config.contains("alice-pw") && !config.contains("scram-pw") && !config.contains("bob-pw"),
        "{config}"
    );
}

/// The dashboards' and alerts' contract for the PostgreSQL family: every `sidelight_pg_*` name
/// they query is exported by a sidelight with a pool, and the names follow the conventions.
#[tokio::test]
async fn every_postgres_metric_a_dashboard_or_alert_queries_is_exported() {
    use support::contract;
    pg().create_db("t_dash", "app_scram");
    let p = pooler(&pool("dash", "t_dash", "")).await;
    let c = connect(&p, "dash").await;
    c.simple_query("select 1").await.expect("q");
    c.simple_query("select 1/0")
        .await
        .expect_err("an error, counted by class");
    let text = p.metrics().await;
    for l in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE sidelight_pg_"))
    {
        let mut parts = l.split_whitespace();
        let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        if kind == "histogram" {
            assert!(name.ends_with("_seconds"), "{name}");
        }
    }
    let exported = contract::exported(&text);
    let mut queried = std::collections::BTreeSet::new();
    let mut checked = 0;
    for (file, name) in contract::queried("sidelight_pg_") {
        let family = contract::family(&exported, &name)
            .unwrap_or_else(|| panic!("{file} queries {name}, not exported"));
        if file.ends_with(".json") {
            queried.insert(family.to_string());
        }
        checked += 1;
    }
    // Prepared statements (issue 16) have their panels too.
    for name in [
        "sidelight_pg_prepared_client_parses_total",
        "sidelight_pg_prepared_server_parses_total",
        "sidelight_pg_prepared_cache_hits_total",
        "sidelight_pg_prepared_cache_evictions_total",
    ] {
        assert!(queried.contains(name), "no dashboard panel queries {name}");
    }
    assert!(
        checked >= 20,
        "only {checked} PostgreSQL metric references found"
    );
}

/// Two workers: clients accepted on either share one process-wide pool; server connections
/// opened on one worker's runtime serve clients of the other.
#[tokio::test]
async fn two_workers_share_one_pool() {
    pg().create_db("t_workers", "app_scram");
    let yaml = format!(
        "runtime: {{ workers: 2 }}\npostgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users: [{{ name: alice, password: alice-pw }}]\n  pools:\n{}",
        pool("workers", "t_workers", ", pool_size: 2")
    );
    let p = proxy::start(&yaml).await;
    let clients = futures_util::future::join_all((0..12).map(|_| connect(&p, "workers"))).await;
    let work = clients.iter().enumerate().map(|(n, c)| async move {
        for i in 0..20i32 {
            // Unnamed statements (Parse/Bind/Execute/Sync at once): named ones are issue 16.
            let row = c
                .query_typed(
                    "select $1::int + $2::int",
                    &[(&i, Type::INT4), (&(n as i32), Type::INT4)],
                )
                .await
                .expect("query")
                .pop()
                .expect("one row");
            assert_eq!(row.get::<_, i32>(0), i + n as i32);
        }
    });
    futures_util::future::join_all(work).await;
    let m = p.metrics().await;
    let open: f64 = ["active", "idle", "connecting"]
        .iter()
        .map(|s| {
            support::metric(
                &m,
                "sidelight_pg_server_connections",
                &[("pool", "workers"), ("state", s)],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(open <= 2.0, "pool_size is process-wide: {open}");
    assert!(
        support::metric(
            &m,
            "sidelight_pg_server_connects_total",
            &[("pool", "workers"), ("result", "ok")]
        )
        .unwrap_or(0.0)
            <= 2.0
    );
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads until `tag` arrives as a message type; returns all bytes read.
async fn read_until_tag(s: &mut tokio::net::TcpStream, tag: u8) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // Walk whole messages read so far.
        let mut at = 0;
        while out.len() >= at + 5 {
            let len =
                i32::from_be_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]]) as usize;
            if out.len() < at + 1 + len {
                break;
            }
            if out[at] == tag {
                return out;
            }
            at += 1 + len;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed while waiting for {:?}", tag as char);
        out.extend_from_slice(&buf[..n]);
    }
}

/// Extended protocol with Flush and no Sync yet: the client is waiting for answers inside an
/// unfinished request, so the server connection stays attached (PgBouncer #52/#759, pgcat
/// #137 released it here); only the Sync's ReadyForQuery gives it back.
#[tokio::test]
async fn flush_without_sync_keeps_the_server_connection() {
    use tokio::io::AsyncWriteExt;
    pg().create_db("t_flush", "app_scram");
    let p = pooler(&pool(
        "flush",
        "t_flush",
        ", pool_size: 1, auth_type: trust",
    ))
    .await;
    let mut s = raw_client(&p, "flush").await;
    let mut batch = Vec::new();
    batch.extend(msg(b'P', b"\0select 1\0\0\0")); // unnamed statement, no parameter types
    batch.extend(msg(b'B', b"\0\0\0\0\0\0\0\0")); // unnamed portal, no formats/params/results
    batch.extend(msg(b'E', b"\0\0\0\0\0"));
    batch.extend(msg(b'H', b""));
    s.write_all(&batch).await.expect("write");
    let got = read_until_tag(&mut s, b'C').await; // CommandComplete, before any Sync
    assert!(!got.contains(&b'Z'), "no ReadyForQuery before Sync");
    // Still attached: another client has to wait.
    let other = connect(&p, "flush").await;
    let waiting =
        tokio::spawn(async move { other.simple_query("select 2").await.map(|r| r.len()) });
    p.assert_metric_eventually(
        "sidelight_pg_client_connections",
        &[("pool", "flush"), ("state", "waiting")],
        1.0,
    )
    .await;
    p.assert_metric_eventually(
        "sidelight_pg_client_connections",
        &[("pool", "flush"), ("state", "active")],
        1.0,
    )
    .await;
    // Another statement in the same unfinished request, then the Sync.
    let mut more = Vec::new();
    more.extend(msg(b'P', b"\0select 3\0\0\0"));
    more.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    more.extend(msg(b'E', b"\0\0\0\0\0"));
    more.extend(msg(b'S', b""));
    s.write_all(&more).await.expect("write");
    let got = read_until_tag(&mut s, b'Z').await;
    assert!(
        got.windows(1).any(|w| w == b"3"),
        "second statement answered"
    );
    let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("other client served")
        .expect("join");
    assert!(answered.is_ok(), "{answered:?}");
}
