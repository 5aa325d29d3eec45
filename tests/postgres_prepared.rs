//! Named prepared statements through the transaction-mode pooler, against a real PostgreSQL 15
//! (one per test binary, see support/pg.rs): tokio-postgres (which names its statements s0,
//! s1, ...), raw protocol scripts compared message by message with PostgreSQL itself, and
//! `pgbench -M prepared`.

mod support;

use std::time::Duration;
use support::pg::pg;
use support::proxy::{self, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

async fn pooler(pool_yaml: &str) -> Proxy {
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\" }}]\n  users:\n    - {{ name: alice, password: alice-pw }}\n  pools:\n{pool_yaml}"
    );
    proxy::start(&yaml).await
}

fn pool(name: &str, db: &str, extra: &str) -> String {
    format!(
        "    - {{ name: {name}, dbname: {db}, servers: [\"{}\"], user: app_scram, password: scram-pw{extra} }}\n",
        pg().addr()
    )
}

fn port(p: &Proxy) -> u16 {
    p.pg_listeners()[0].port()
}

async fn connect(p: &Proxy, db: &str) -> Client {
    let conf = format!(
        "host=127.0.0.1 port={} dbname={db} user=alice password=alice-pw connect_timeout=10",
        port(p)
    );
    let (client, conn) = tokio_postgres::connect(&conf, NoTls)
        .await
        .expect("connect through sidelight");
    tokio::spawn(conn);
    client
}

async fn connect_direct(db: &str) -> Client {
    let conf = format!(
        "host=127.0.0.1 port={} dbname={db} user=app_scram password=scram-pw connect_timeout=10",
        pg().port
    );
    let (client, conn) = tokio_postgres::connect(&conf, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e}"))
}

async fn metric(p: &Proxy, name: &str, pool: &str) -> f64 {
    p.metric(name, &[("pool", pool)]).await
}

/// A statement prepared once keeps working while its client moves between server
/// connections: pool of 2 where another client holds one connection in a transaction, then a
/// pool of 1 whose only connection is killed and replaced.
#[tokio::test]
async fn statements_survive_server_connection_switches() {
    pg().create_db("t_ps_switch", "app_scram");
    let p = pooler(&pool("switch", "t_ps_switch", ", pool_size: 2")).await;
    let (a, b) = (connect(&p, "switch").await, connect(&p, "switch").await);
    let stmt = a
        .prepare("select $1::int * 2, pg_backend_pid()")
        .await
        .expect("prepare");
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..6i32 {
        // B holds a server connection in a transaction every other round: A gets the other.
        if i % 2 == 0 {
            b.batch_execute("BEGIN").await.expect("begin");
            b.query_one("select 1", &[]).await.expect("in tx");
        }
        let row = a.query_one(&stmt, &[&i]).await.expect("execute");
        assert_eq!(row.get::<_, i32>(0), i * 2);
        pids.insert(row.get::<_, i32>(1));
        if i % 2 == 0 {
            b.batch_execute("COMMIT").await.expect("commit");
        }
    }
    assert_eq!(pids.len(), 2, "A ran on both server connections: {pids:?}");
    assert!(metric(&p, "sidelight_pg_prepared_server_parses_total", "switch").await >= 2.0);

    // Pool of 1: the connection that has the statement dies; its replacement gets it anew.
    let p1 = pooler(&pool("switch1", "t_ps_switch", ", pool_size: 1")).await;
    let (a, b) = (connect(&p1, "switch1").await, connect(&p1, "switch1").await);
    let sa = a
        .prepare("select 'a' || $1::text")
        .await
        .expect("prepare a");
    let sb = b
        .prepare("select 'b' || $1::text")
        .await
        .expect("prepare b");
    for round in 0..3 {
        let pid: i32 = a
            .query_one("select pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        pg().psql("postgres", &format!("select pg_terminate_backend({pid})"));
        let gone = format!("select count(*) from pg_stat_activity where pid = {pid}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pg().psql("postgres", &gone) != "0" {
            assert!(
                std::time::Instant::now() < deadline,
                "backend {pid} lingers"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let x = round.to_string();
        let ra: String = a.query_one(&sa, &[&x]).await.expect("a").get(0);
        let rb: String = b.query_one(&sb, &[&x]).await.expect("b").get(0);
        assert_eq!((ra, rb), (format!("a{round}"), format!("b{round}")));
    }
}

/// Two clients, one server connection, different queries under the same statement name (raw
/// protocol: tokio-postgres numbers statements process-wide), and tokio-postgres clients
/// interleaving.
#[tokio::test]
async fn two_clients_same_name_different_queries() {
    pg().create_db("t_ps_names", "app_scram");
    let p = pooler(&format!(
        "{}{}",
        pool("names", "t_ps_names", ", pool_size: 1"),
        pool(
            "names_raw",
            "t_ps_names",
            ", pool_size: 1, auth_type: trust"
        )
    ))
    .await;
    let (a, b) = (connect(&p, "names").await, connect(&p, "names").await);
    let sa = a.prepare("select $1::int + 1000").await.expect("a s0");
    let sb = b.prepare("select $1::int - 1000").await.expect("b s0");
    let work_a = async {
        for i in 0..50i32 {
            let r: i32 = a.query_one(&sa, &[&i]).await.expect("a").get(0);
            assert_eq!(r, i + 1000);
        }
    };
    let work_b = async {
        for i in 0..50i32 {
            let r: i32 = b.query_one(&sb, &[&i]).await.expect("b").get(0);
            assert_eq!(r, i - 1000);
        }
    };
    tokio::join!(work_a, work_b);
    let raw = |db: &'static str| raw_connect(port(&p), "alice", db);
    let (mut ra, mut rb) = (raw("names_raw").await, raw("names_raw").await);
    let step = |sql: &str| cat(&[parse("same", sql), sync()]);
    assert_eq!(
        run_script(&mut ra, &[(step("select 'from a'"), 1)]).await,
        [["1", "ZI"]]
    );
    assert_eq!(
        run_script(&mut rb, &[(step("select 'from b'"), 1)]).await,
        [["1", "ZI"]]
    );
    for _ in 0..3 {
        for (s, want) in [(&mut ra, "from a"), (&mut rb, "from b")] {
            s.write_all(&cat(&[bind("same"), execute(), sync()]))
                .await
                .expect("write");
            let mut got = Vec::new();
            let mut chunk = [0u8; 256];
            while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                    .await
                    .expect("answer")
                    .expect("read");
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(
                got.windows(want.len()).any(|w| w == want.as_bytes()),
                "{want}"
            );
        }
    }
    // The same query text from both clients is one statement on the server.
    let c = connect(&p, "names").await;
    let sc = c.prepare("select $1::int + 1000").await.expect("c");
    let r: i32 = c.query_one(&sc, &[&1i32]).await.expect("c exec").get(0);
    assert_eq!(r, 1001);
    assert_eq!(
        metric(&p, "sidelight_pg_prepared_server_parses_total", "names").await,
        2.0,
        "one prepare per distinct query on the one server connection"
    );
    assert_eq!(
        metric(&p, "sidelight_pg_prepared_client_parses_total", "names").await,
        3.0
    );
    assert_eq!(
        metric(&p, "sidelight_pg_prepared_server_parses_total", "names_raw").await,
        2.0
    );
    let status = support::get(&p.admin_url("/status")).await.json();
    assert_eq!(
        status["postgres"]["names"]["prepared_statements"], 2,
        "{status}"
    );
    assert_eq!(status["postgres"]["names"]["max_prepared_statements"], 200);
}

/// With room for 2 statements per server connection, 6 statements used round robin (also in
/// pipelines) still answer correctly; the evictions are counted.
#[tokio::test]
async fn eviction_keeps_answers_correct() {
    pg().create_db("t_ps_evict", "app_scram");
    let p = pooler(&pool(
        "evict",
        "t_ps_evict",
        ", pool_size: 1, max_prepared_statements: 2",
    ))
    .await;
    let (a, b) = (connect(&p, "evict").await, connect(&p, "evict").await);
    let mut stmts = Vec::new();
    for k in 0..6 {
        stmts.push(
            a.prepare(&format!("select $1::int * {k}"))
                .await
                .expect("prepare"),
        );
    }
    let other = b.prepare("select $1::int + 7").await.expect("b");
    for round in 0..3i32 {
        for (k, s) in stmts.iter().enumerate() {
            let r: i32 = a.query_one(s, &[&round]).await.expect("exec").get(0);
            assert_eq!(r, round * k as i32);
            let r: i32 = b.query_one(&other, &[&round]).await.expect("b").get(0);
            assert_eq!(r, round + 7);
        }
        // Pipelined: all six at once on one connection.
        let all = stmts.iter().enumerate().map(|(k, s)| {
            let a = &a;
            async move { (k, a.query_one(s, &[&round]).await) }
        });
        for (k, r) in futures_util::future::join_all(all).await {
            assert_eq!(r.expect("pipelined").get::<_, i32>(0), round * k as i32);
        }
    }
    assert!(metric(&p, "sidelight_pg_prepared_cache_evictions_total", "evict").await >= 5.0);
    assert!(metric(&p, "sidelight_pg_prepared_cache_hits_total", "evict").await >= 1.0);
    let prepared = pg().psql(
        "postgres",
        "select count(*) from pg_stat_activity where datname = 't_ps_evict' and backend_type = 'client backend'",
    );
    assert_eq!(prepared, "1", "one server connection");
}

/// DDL that changes a statement's result type: the next executions get PostgreSQL's own
/// 0A000, exactly as directly (PostgreSQL keeps failing the old statement until it is
/// prepared again); a new Parse of the same text is planned anew, on every server connection.
#[tokio::test]
async fn ddl_changing_the_result_type() {
    pg().create_db("t_ps_ddl", "app_scram");
    pg().psql(
        "t_ps_ddl",
        "CREATE TABLE t (a int); INSERT INTO t VALUES (1); ALTER TABLE t OWNER TO app_scram",
    );
    let p = pooler(&pool("ddl", "t_ps_ddl", ", pool_size: 2")).await;
    let via = connect(&p, "ddl").await;
    let direct = connect_direct("t_ps_ddl").await;
    let s_via = via.prepare("select * from t").await.expect("prepare");
    let s_direct = direct.prepare("select * from t").await.expect("prepare");
    assert_eq!(via.query(&s_via, &[]).await.expect("before").len(), 1);
    direct.query(&s_direct, &[]).await.expect("before");
    direct
        .batch_execute("ALTER TABLE t ADD COLUMN b int DEFAULT 2")
        .await
        .expect("ddl");
    for round in 0..2 {
        let e_direct = direct.query(&s_direct, &[]).await.expect_err("0A000");
        let e_via = via.query(&s_via, &[]).await.expect_err("0A000");
        assert_eq!(code(&e_direct), "0A000", "round {round}");
        assert_eq!(code(&e_via), code(&e_direct), "round {round}");
        assert_eq!(e_via.to_string(), e_direct.to_string());
    }
    // Re-preparing the same text works, with the new result type.
    let again = via.prepare("select * from t").await.expect("re-prepare");
    assert_eq!(again.columns().len(), 2);
    let row = via.query_one(&again, &[]).await.expect("after re-prepare");
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
    // On the other server connection too; the old statement is never prepared again there
    // (its rows would not match the client's description): the server says it does not exist.
    let hold = connect(&p, "ddl").await;
    hold.batch_execute("BEGIN").await.expect("begin");
    hold.query_one("select 1", &[]).await.expect("hold");
    let row = via.query_one(&again, &[]).await.expect("other connection");
    assert_eq!(row.len(), 2);
    let e = via.query(&s_via, &[]).await.expect_err("old statement");
    assert_eq!(code(&e), "26000");
    hold.batch_execute("COMMIT").await.expect("commit");
}

/// A Parse that fails reports the server's error, the name stays free, the session goes on.
#[tokio::test]
async fn failing_parse_reports_the_server_error() {
    pg().create_db("t_ps_fail", "app_scram");
    let p = pooler(&pool("fail", "t_ps_fail", ", pool_size: 1")).await;
    let c = connect(&p, "fail").await;
    let direct = connect_direct("t_ps_fail").await;
    let e = c.prepare("selec 1").await.expect_err("syntax error");
    let e_direct = direct.prepare("selec 1").await.expect_err("syntax error");
    assert_eq!(code(&e), "42601");
    assert_eq!(e.to_string(), e_direct.to_string());
    let e = c
        .prepare("select * from no_such_table")
        .await
        .expect_err("undefined table");
    assert_eq!(code(&e), "42P01");
    let s = c.prepare("select 42").await.expect("prepare after");
    let r: i32 = c.query_one(&s, &[]).await.expect("exec").get(0);
    assert_eq!(r, 42);
}

/// pgbench with named statements (`-M prepared`), more clients than server connections, both
/// the select-only and the TPC-B-like script: every transaction succeeds.
#[tokio::test]
async fn pgbench_prepared_mode() {
    pg().create_db("t_ps_bench", "app_scram");
    let pgbench = format!("{}/pgbench", support::pg::BIN);
    let init = tokio::process::Command::new(&pgbench)
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
        .arg(pg().port.to_string())
        .args(["-U", "app_scram", "t_ps_bench"])
        .env("PGPASSWORD", "scram-pw")
        .output()
        .await
        .expect("pgbench (apt-get install postgresql)");
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let p = pooler(&pool("bench", "t_ps_bench", ", pool_size: 2")).await;
    for script in [&["-S"][..], &[][..]] {
        let out = tokio::process::Command::new(&pgbench)
            .args(["-n", "-M", "prepared", "-t", "50", "-c", "4", "-j", "4"])
            .args(script)
            .args(["-h", "127.0.0.1", "-p"])
            .arg(port(&p).to_string())
            .args(["-U", "alice", "bench"])
            .env("PGPASSWORD", "alice-pw")
            .output()
            .await
            .expect("run pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{script:?}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("number of transactions actually processed: 200/200"),
            "{stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "{stdout}"
        );
    }
    assert!(metric(&p, "sidelight_pg_prepared_client_parses_total", "bench").await >= 4.0);
    assert!(metric(&p, "sidelight_pg_prepared_cache_hits_total", "bench").await >= 100.0);
}

// --- raw protocol scripts, compared with PostgreSQL directly ---

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p.as_bytes());
        b.push(0);
    }
    b
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstrs(&[name, sql]);
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

fn bind(stmt: &str) -> Vec<u8> {
    let mut b = cstrs(&["", stmt]);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no formats, no params, no result formats
    msg(b'B', &b)
}

fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

fn describe(stmt: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstrs(&[stmt]));
    msg(b'D', &b)
}

fn close(stmt: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstrs(&[stmt]));
    msg(b'C', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstrs(&[sql]))
}

/// Startup as `user` to `db` (trust on both paths), read to the first ReadyForQuery.
async fn raw_connect(port: u16, user: &str, db: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend(cstrs(&["user", user, "database", db, ""]));
    let mut startup = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    startup.extend(body);
    s.write_all(&startup).await.expect("startup");
    read_answers(&mut s, 1).await;
    s
}

/// Reads messages until `readies` ReadyForQuery have come; returns each message as its type
/// (and, for ErrorResponse, its SQLSTATE), e.g. "1", "E:26000", "Z".
async fn read_answers(s: &mut TcpStream, readies: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut seen = 0;
    let mut at = 0;
    let mut chunk = [0u8; 8192];
    while seen < readies {
        while buf.len() >= at + 5 {
            let len =
                i32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
            if buf.len() < at + 1 + len {
                break;
            }
            let tag = buf[at];
            let body = &buf[at + 5..at + 1 + len];
            match tag {
                b'E' => {
                    let code = body
                        .split(|&b| b == 0)
                        .find_map(|f| f.strip_prefix(b"C"))
                        .map(|c| String::from_utf8_lossy(c).to_string())
                        .unwrap_or_default();
                    out.push(format!("E:{code}"));
                }
                b'Z' => {
                    out.push(format!("Z{}", body[0] as char));
                    seen += 1;
                }
                b'S' | b'K' | b'R' | b'N' => {}
                _ => out.push((tag as char).to_string()),
            }
            at += 1 + len;
            if seen == readies {
                break;
            }
        }
        if seen == readies {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed after {out:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        at,
        buf.len(),
        "nothing beyond the last ReadyForQuery: {out:?}"
    );
    out
}

/// Sends each step (bytes, ReadyForQuery count) and collects the answers.
async fn run_script(s: &mut TcpStream, script: &[(Vec<u8>, usize)]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for (bytes, readies) in script {
        s.write_all(bytes).await.expect("write");
        all.push(read_answers(s, *readies).await);
    }
    all
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Message-by-message the same answers as PostgreSQL gives directly: pipelined batches,
/// failed Parse, Close, DEALLOCATE ALL, errors in the middle of a pipeline with answers
/// sidelight synthesizes behind them, and a Parse the server connection already has.
#[tokio::test]
async fn raw_protocol_answers_match_postgresql() {
    pg().create_db("t_ps_raw", "app_trust");
    let yaml = format!(
        "    - {{ name: raw, dbname: t_ps_raw, servers: [\"{}\"], user: app_trust, auth_type: trust, pool_size: 1 }}\n",
        pg().addr()
    );
    let p = pooler(&yaml).await;
    let script: Vec<(Vec<u8>, usize)> = vec![
        // A pipeline: two Parses, Describe, two Bind/Execute, one Sync.
        (
            cat(&[
                parse("a", "select 1"),
                parse("b", "select 'two'"),
                describe("a"),
                bind("a"),
                execute(),
                bind("b"),
                execute(),
                sync(),
            ]),
            1,
        ),
        // A failing Parse: error, the rest skipped, the name stays free.
        (
            cat(&[parse("bad", "selec"), bind("bad"), execute(), sync()]),
            1,
        ),
        (
            cat(&[parse("bad", "select 3"), bind("bad"), execute(), sync()]),
            1,
        ),
        // Close of one's own statement; then it is gone.
        (cat(&[close("b"), sync()]), 1),
        (cat(&[bind("b"), execute(), sync()]), 1),
        // Unknown statement first: everything behind it is skipped, Close included.
        (
            cat(&[
                bind("nope"),
                execute(),
                close("a"),
                parse("c", "select 4"),
                sync(),
            ]),
            1,
        ),
        (
            cat(&[bind("a"), execute(), bind("c"), execute(), sync()]),
            1,
        ),
        // Several Syncs in one write.
        (
            cat(&[
                bind("a"),
                execute(),
                sync(),
                parse("d", "select 5"),
                bind("d"),
                execute(),
                sync(),
            ]),
            2,
        ),
        // DEALLOCATE ALL drops the client's names.
        (query("DEALLOCATE ALL"), 1),
        (cat(&[bind("a"), execute(), sync()]), 1),
        (
            cat(&[parse("a", "select 6"), bind("a"), execute(), sync()]),
            1,
        ),
        // A name already taken: PostgreSQL's 42P05 (or the parse error it finds first), the
        // old statement stays, and in a transaction block the transaction is aborted.
        (
            cat(&[parse("a", "select 2"), bind("a"), execute(), sync()]),
            1,
        ),
        (cat(&[parse("a", "selec"), sync()]), 1),
        (cat(&[bind("a"), execute(), sync()]), 1),
        (
            cat(&[
                query("BEGIN"),
                parse("a", "select 9"),
                sync(),
                query("select 1"),
                query("ROLLBACK"),
            ]),
            4,
        ),
        (cat(&[bind("a"), execute(), sync()]), 1),
        // In a transaction block, an error aborts it until ROLLBACK.
        (
            cat(&[
                query("BEGIN"),
                parse("e", "select 1/0"),
                bind("e"),
                execute(),
                sync(),
                parse("f", "select 7"),
                sync(),
                query("ROLLBACK"),
            ]),
            4,
        ),
        (
            cat(&[parse("f", "select 7"), bind("f"), execute(), sync()]),
            1,
        ),
    ];
    let mut direct = raw_connect(pg().port, "app_trust", "t_ps_raw").await;
    let want = run_script(&mut direct, &script).await;
    let mut via = raw_connect(port(&p), "alice", "raw").await;
    let got = run_script(&mut via, &script).await;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "step {i}");
    }

    // Another client on the same server connection: its Parse of a query the connection
    // already has is answered by sidelight, in order.
    let mut other = raw_connect(port(&p), "alice", "raw").await;
    let script2: Vec<(Vec<u8>, usize)> = vec![
        (
            cat(&[
                parse("x", "select 7"),
                describe("x"),
                bind("x"),
                execute(),
                close("x"),
                parse("x", "select 7"),
                bind("x"),
                execute(),
                sync(),
            ]),
            1,
        ),
        (
            cat(&[close("x"), sync(), parse("x", "select 6"), sync()]),
            2,
        ),
    ];
    let got = run_script(&mut other, &script2).await;
    assert_eq!(
        got,
        vec![
            vec!["1", "t", "T", "2", "D", "C", "3", "1", "2", "D", "C", "ZI"],
            vec!["3", "ZI", "1", "ZI"],
        ]
    );
    // The placeholders that made the server answer 42P05 itself are gone again: the server
    // connection holds sidelight's statements only.
    let c = connect(&p, "raw").await;
    let names = c
        .simple_query("select name from pg_prepared_statements where name not like '\\_sl%'")
        .await
        .expect("pg_prepared_statements");
    let rows: Vec<String> = names
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert!(rows.is_empty(), "{rows:?}");
    // The first client's statements are untouched by the other's Close.
    let got = run_script(&mut via, &[(cat(&[bind("f"), execute(), sync()]), 1)]).await;
    assert_eq!(got, vec![vec!["2", "D", "C", "ZI"]]);
    assert!(metric(&p, "sidelight_pg_prepared_cache_hits_total", "raw").await >= 2.0);
}

/// A Parse larger than the read buffer, a Bind with a large parameter (streamed after its
/// rewritten names), and COPY in and out (one failing) between prepared statements: the
/// answers stay in order.
#[tokio::test]
async fn large_messages_and_copy_with_prepared_statements() {
    use futures_util::{SinkExt, TryStreamExt};
    pg().create_db("t_ps_large", "app_scram");
    pg().psql(
        "t_ps_large",
        "CREATE TABLE items (n int, s text); ALTER TABLE items OWNER TO app_scram",
    );
    let p = pooler(&pool("large", "t_ps_large", ", pool_size: 1")).await;
    let (a, b) = (connect(&p, "large").await, connect(&p, "large").await);
    let long = "y".repeat(200_000);
    let big = a
        .prepare(&format!("select length('{long}') + $1::int"))
        .await
        .expect("large Parse");
    let r: i32 = a.query_one(&big, &[&1i32]).await.expect("exec").get(0);
    assert_eq!(r, 200_001);
    let echo = b.prepare("select length($1::text)").await.expect("prepare");
    let param = "z".repeat(500_000);
    let r: i32 = b
        .query_one(&echo, &[&param])
        .await
        .expect("large Bind")
        .get(0);
    assert_eq!(r, 500_000);

    let sink = a.copy_in("COPY items FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    for i in 0..1000 {
        sink.send(bytes::Bytes::from(format!("{i}\trow {i}\n")))
            .await
            .expect("copy data");
    }
    assert_eq!(sink.finish().await.expect("copy done"), 1000);
    // A COPY the server fails mid-way: the error, then the session goes on.
    let bad = a.copy_in("COPY items FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(bad);
    bad.send(bytes::Bytes::from_static(b"not a number\tx\n"))
        .await
        .ok();
    let e = bad.finish().await.expect_err("bad row");
    assert_eq!(code(&e), "22P02");
    let out = a
        .copy_out("COPY (SELECT n FROM items ORDER BY n) TO STDOUT")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.expect("copy out data");
    let text: Vec<u8> = chunks.concat();
    assert_eq!(text.iter().filter(|&&c| c == b'\n').count(), 1000);
    // The COPYing client's statements still answer on its connection.
    for i in 0..5i32 {
        let r: i32 = a.query_one(&big, &[&i]).await.expect("a").get(0);
        assert_eq!(r, 200_000 + i);
    }
    // (After an extended-protocol COPY the connection stays with its client until the COPY
    // work of issue 16 counts the Sync PostgreSQL ignores during COPY.) When A leaves, B's
    // statement is prepared on whichever connection it gets next.
    drop(a);
    let r: i32 = b.query_one(&echo, &[&"abc"]).await.expect("b").get(0);
    assert_eq!(r, 3);
}

/// `max_prepared_statements: 0` and session mode leave named statements alone: they reach the
/// server under the client's own names and work while the client keeps its connection.
#[tokio::test]
async fn disabled_and_session_mode_pass_through() {
    pg().create_db("t_ps_off", "app_scram");
    let p = pooler(&format!(
        "{}{}",
        pool(
            "off",
            "t_ps_off",
            ", pool_size: 1, max_prepared_statements: 0"
        ),
        pool("sess", "t_ps_off", ", pool_size: 1, pool_mode: session")
    ))
    .await;
    for db in ["off", "sess"] {
        let c = connect(&p, db).await;
        let s = c.prepare("select $1::int + 1").await.expect("prepare");
        let r: i32 = c.query_one(&s, &[&1i32]).await.expect("exec").get(0);
        assert_eq!(r, 2);
        // The server holds the statement under tokio-postgres's own name (s<n>).
        let names = c
            .simple_query("select name from pg_prepared_statements")
            .await
            .expect("names");
        let found = names.iter().any(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r
                .get(0)
                .is_some_and(|n| n.starts_with('s') && !n.starts_with("_sl")),
            _ => false,
        });
        assert!(found, "{db}: the client's own name on the server");
        assert_eq!(
            metric(&p, "sidelight_pg_prepared_client_parses_total", db).await,
            0.0
        );
    }
}
