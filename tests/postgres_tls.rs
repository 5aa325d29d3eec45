//! TLS in the PostgreSQL pooler: to servers (`server_tls_sslmode`) against a PostgreSQL 15 with
//! `ssl=on` and a certificate from a test CA made here with rcgen, and from clients (listener
//! `client_tls_*`) with `psql` as the TLS client. The shared plain PostgreSQL of
//! support/pg.rs stands for a server without TLS. Both servers are started once per binary.

mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use support::pg::{pg, start_with_ssl, Pg, BIN};
use support::proxy::{self, Proxy};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// The test PKI: one CA signing PostgreSQL's certificate (IP address 127.0.0.1 only, so a
/// connection by the name `localhost` is a name mismatch) and sidelight's listener certificate
/// (`localhost` and 127.0.0.1); another CA that signed neither.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    listener_cert: PathBuf,
    listener_key: PathBuf,
    tls_pg: Pg,
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).expect("CA cert"), key)
}

fn leaf(names: &[&str], ca: &(rcgen::Certificate, rcgen::KeyPair)) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let params = rcgen::CertificateParams::new(names).expect("params");
    let cert = params.signed_by(&key, &ca.0, &ca.1).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        // Under support/pg.rs's prefix, so a later run removes it once this process is gone.
        let dir = std::env::temp_dir().join(format!("sidelight-pg-{}-pki", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let root = ca("sidelight test CA");
        let other = ca("some other CA");
        let (pg_cert, pg_key) = leaf(&["127.0.0.1"], &root);
        let (l_cert, l_key) = leaf(&["localhost", "127.0.0.1"], &root);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("write pem");
            p
        };
        Pki {
            ca: write("ca.pem", &root.0.pem()),
            other_ca: write("other-ca.pem", &other.0.pem()),
            listener_cert: write("listener.crt", &l_cert),
            listener_key: write("listener.key", &l_key),
            tls_pg: start_with_ssl(&pg_cert, &pg_key),
            dir,
        }
    })
}

fn tls_pg() -> &'static Pg {
    &pki().tls_pg
}

/// sidelight with one pool `db` (server database `postgres`, user app_scram) at `server`, the
/// pool's extra fields, and the listener's extra fields.
async fn pooler(server: &str, pool_extra: &str, listener_extra: &str) -> Proxy {
    let yaml = format!(
        "postgres:\n  listeners: [{{ address: \"127.0.0.1:0\"{listener_extra} }}]\n  users: [{{ name: alice, password: alice-pw }}]\n  pools:\n    - {{ name: db, dbname: postgres, servers: [\"{server}\"], user: app_scram, password: scram-pw{pool_extra} }}\n"
    );
    proxy::start(&yaml).await
}

fn port(p: &Proxy) -> u16 {
    p.pg_listeners()[0].port()
}

async fn connect(p: &Proxy) -> Result<Client, tokio_postgres::Error> {
    let conf = format!(
        "host=127.0.0.1 port={} dbname=db user=alice password=alice-pw connect_timeout=10",
        port(p)
    );
    let (client, conn) = tokio_postgres::connect(&conf, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn one(c: &Client, sql: &str) -> String {
    let rows = c.simple_query(sql).await.expect(sql);
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

/// Whether sidelight's server connection for this client is encrypted, as the server sees it.
async fn server_ssl(c: &Client) -> String {
    one(
        c,
        "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
    )
    .await
}

fn refusal(r: Result<Client, tokio_postgres::Error>) -> (String, String) {
    match r {
        Ok(_) => panic!("connected, expected a refusal"),
        Err(e) => {
            let db = e.as_db_error().expect("an ErrorResponse from sidelight");
            (db.code().code().to_string(), db.message().to_string())
        }
    }
}

#[tokio::test]
async fn verify_full_with_the_test_ca_encrypts_the_server_connection() {
    let extra = format!(
        ", server_tls_sslmode: verify-full, server_tls_ca_file: \"{}\"",
        pki().ca.display()
    );
    let p = pooler(&tls_pg().addr(), &extra, "").await;
    let c = connect(&p).await.expect("connect");
    assert_eq!(server_ssl(&c).await, "true");
    // Large results and a large query cross the TLS connection whole.
    let big = one(&c, "select repeat('x', 3000000)").await;
    assert_eq!(big.len(), 3_000_000);
    let text = "y".repeat(1_000_000);
    let len = one(&c, &format!("select length('{text}')")).await;
    assert_eq!(len, "1000000");
    for i in 0..50 {
        assert_eq!(one(&c, &format!("select {i}")).await, i.to_string());
    }
    p.assert_metric_eventually(
        "sidelight_pg_server_tls_total",
        &[("pool", "db"), ("result", "tls")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn verify_ca_accepts_a_name_mismatch_that_verify_full_refuses() {
    // The server's certificate names 127.0.0.1 only; sidelight connects by `localhost`.
    let server = format!("localhost:{}", tls_pg().port);
    let ca = pki().ca.display().to_string();
    let p = pooler(
        &server,
        &format!(", server_tls_sslmode: verify-ca, server_tls_ca_file: \"{ca}\""),
        "",
    )
    .await;
    let c = connect(&p).await.expect("verify-ca connects");
    assert_eq!(server_ssl(&c).await, "true");

    let p = pooler(
        &server,
        &format!(", server_tls_sslmode: verify-full, server_tls_ca_file: \"{ca}\""),
        "",
    )
    .await;
    let (code, message) = refusal(connect(&p).await);
    assert_eq!(code, "08001", "{message}");
    assert!(
        message.contains("TLS with server localhost") && message.contains("not valid for name"),
        "{message}"
    );
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_clearly() {
    let extra = format!(
        ", server_tls_sslmode: verify-full, server_tls_ca_file: \"{}\"",
        pki().other_ca.display()
    );
    let p = pooler(&tls_pg().addr(), &extra, "").await;
    let (code, message) = refusal(connect(&p).await);
    assert_eq!(code, "08001", "{message}");
    assert!(
        message.contains("invalid peer certificate") && message.contains("UnknownIssuer"),
        "{message}"
    );
    p.assert_metric_eventually(
        "sidelight_pg_server_tls_total",
        &[("pool", "db"), ("result", "error")],
        1.0,
    )
    .await;
    p.assert_metric_eventually("sidelight_pg_pool_healthy", &[("pool", "db")], 0.0)
        .await;
}

#[tokio::test]
async fn require_against_a_server_without_tls_fails_clearly() {
    let p = pooler(&pg().addr(), ", server_tls_sslmode: require", "").await;
    let (code, message) = refusal(connect(&p).await);
    assert_eq!(code, "08001", "{message}");
    assert!(
        message.contains("does not accept TLS") && message.contains("require"),
        "{message}"
    );
    p.assert_metric_eventually(
        "sidelight_pg_server_tls_total",
        &[("pool", "db"), ("result", "refused")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn require_encrypts_without_verifying() {
    let p = pooler(&tls_pg().addr(), ", server_tls_sslmode: require", "").await;
    let c = connect(&p).await.expect("connect");
    assert_eq!(server_ssl(&c).await, "true");
}

#[tokio::test]
async fn prefer_is_the_default_and_falls_back_to_plain() {
    // A server without TLS: plain.
    let p = pooler(&pg().addr(), "", "").await;
    let c = connect(&p).await.expect("connect");
    assert_eq!(server_ssl(&c).await, "false");
    p.assert_metric_eventually(
        "sidelight_pg_server_tls_total",
        &[("pool", "db"), ("result", "plain")],
        1.0,
    )
    .await;
    // A server with TLS: encrypted.
    let p = pooler(&tls_pg().addr(), "", "").await;
    let c = connect(&p).await.expect("connect");
    assert_eq!(server_ssl(&c).await, "true");
    // disable: plain even to a server with TLS.
    let p = pooler(&tls_pg().addr(), ", server_tls_sslmode: disable", "").await;
    let c = connect(&p).await.expect("connect");
    assert_eq!(server_ssl(&c).await, "false");
}

fn listener_tls(mode: &str) -> String {
    let k = pki();
    format!(
        ", client_tls_cert_file: \"{}\", client_tls_key_file: \"{}\"{mode}",
        k.listener_cert.display(),
        k.listener_key.display()
    )
}

#[tokio::test]
async fn psql_with_verify_full_talks_tls_to_the_listener() {
    let p = pooler(&pg().addr(), "", &listener_tls("")).await;
    let ca = pki().ca.display().to_string();
    let port_ = port(&p);
    let big = "z".repeat(500_000);
    let script = format!(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid();\nselect length('{big}');\nselect length(repeat('q', 2000000));\nselect sum(x) from generate_series(1, 100000) x;\n"
    );
    let out = tokio::task::spawn_blocking({
        let p_opts = format!("sslmode=verify-full sslrootcert={ca}");
        move || psql(port_, &p_opts, &script)
    })
    .await
    .expect("join");
    let out = out.expect("psql over TLS");
    // The first line is the server side (plain to the shared server); the rest crossed TLS.
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["f", "500000", "2000000", "5000050000"]
    );
    p.assert_metric_eventually(
        "sidelight_pg_client_tls_total",
        &[("listener", "postgres"), ("result", "tls")],
        1.0,
    )
    .await;
    // Plain clients still get in on a listener with the default client_tls_sslmode (prefer).
    let out = tokio::task::spawn_blocking(move || psql(port_, "sslmode=disable", "select 1;"))
        .await
        .expect("join");
    assert_eq!(out.expect("plain psql"), "1");
    connect(&p).await.expect("tokio-postgres without TLS");
    p.assert_metric_eventually(
        "sidelight_pg_client_tls_total",
        &[("listener", "postgres"), ("result", "plain")],
        2.0,
    )
    .await;
    // A client that trusts another CA refuses sidelight's certificate.
    let other = pki().other_ca.display().to_string();
    let err = tokio::task::spawn_blocking(move || {
        psql(
            port_,
            &format!("sslmode=verify-full sslrootcert={other}"),
            "select 1;",
        )
    })
    .await
    .expect("join")
    .expect_err("untrusted certificate");
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[tokio::test]
async fn client_tls_sslmode_require_refuses_plain_clients() {
    let p = pooler(
        &pg().addr(),
        "",
        &listener_tls(", client_tls_sslmode: require"),
    )
    .await;
    let (code, message) = refusal(connect(&p).await);
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("SSL required"), "{message}");
    let port_ = port(&p);
    let err = tokio::task::spawn_blocking(move || psql(port_, "sslmode=disable", "select 1;"))
        .await
        .expect("join")
        .expect_err("plain refused");
    assert!(err.contains("SSL required"), "{err}");
    let out = tokio::task::spawn_blocking(move || psql(port_, "sslmode=require", "select 1;"))
        .await
        .expect("join");
    assert_eq!(out.expect("TLS psql"), "1");
    p.assert_metric_eventually(
        "sidelight_pg_client_tls_total",
        &[("listener", "postgres"), ("result", "rejected")],
        2.0,
    )
    .await;
}

/// The raw answers: SSLRequest gets `S` with TLS on the listener and `N` without;
/// GSSENCRequest always gets `N`, and the client can go on with a StartupMessage.
#[tokio::test]
async fn ssl_and_gssenc_requests_are_answered() {
    let plain = pooler(&pg().addr(), "", "").await;
    let tls = pooler(&pg().addr(), "", &listener_tls("")).await;
    let (plain_port, tls_port) = (port(&plain), port(&tls));
    let answers = tokio::task::spawn_blocking(move || {
        let ask = |port: u16, code: i32| -> (u8, std::net::TcpStream) {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("timeout");
            let mut req = 8i32.to_be_bytes().to_vec();
            req.extend_from_slice(&code.to_be_bytes());
            s.write_all(&req).expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("answer");
            (b[0], s)
        };
        const SSL: i32 = 80_877_103;
        const GSSENC: i32 = 80_877_104;
        let (gss_plain, mut s) = ask(plain_port, GSSENC);
        // After the refusal, a StartupMessage on the same connection is served.
        let mut startup = Vec::new();
        startup.extend_from_slice(&0i32.to_be_bytes());
        startup.extend_from_slice(&196_608i32.to_be_bytes());
        for part in ["user", "alice", "database", "db", ""] {
            startup.extend_from_slice(part.as_bytes());
            startup.push(0);
        }
        let len = (startup.len() as i32).to_be_bytes();
        startup[..4].copy_from_slice(&len);
        s.write_all(&startup).expect("startup");
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).expect("auth request");
        [
            ask(plain_port, SSL).0,
            gss_plain,
            tag[0],
            ask(tls_port, SSL).0,
            ask(tls_port, GSSENC).0,
        ]
    })
    .await
    .expect("join");
    assert_eq!(answers, [b'N', b'N', b'R', b'S', b'N']);
    // psql insisting on TLS gets libpq's own message from a listener without it.
    let err = tokio::task::spawn_blocking(move || psql(plain_port, "sslmode=require", "select 1;"))
        .await
        .expect("join")
        .expect_err("no TLS on this listener");
    assert!(err.contains("server does not support SSL"), "{err}");
}

/// psql through sidelight's listener at `port` with connection options, the script on stdin;
/// its stdout, or its stderr as the error. Blocking: run it with spawn_blocking.
fn psql(port: u16, options: &str, script: &str) -> Result<String, String> {
    let psql = format!("{BIN}/psql");
    assert!(
        std::path::Path::new(&psql).exists(),
        "psql is not installed ({psql} missing); install it with: sudo apt-get install postgresql-client"
    );
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} dbname=db user=alice connect_timeout=10 {options}"
    );
    let mut child = Command::new(&psql)
        .args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
            &conninfo,
        ])
        .env("PGPASSWORD", "alice-pw")
        // No file of the user running the tests changes what psql does.
        .env("HOME", &pki().dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut stdin = child.stdin.take().expect("stdin");
    let script = script.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(script.as_bytes());
    });
    let out = child.wait_with_output().expect("psql output");
    let _ = writer.join();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// Load over TLS on both sides: pgbench clients with `sslmode=require` to the listener, sixteen
/// tokio-postgres clients in plain, all sharing two `verify-full` server connections.
#[tokio::test]
async fn many_clients_over_tls_on_both_sides() {
    let extra = format!(
        ", pool_size: 2, server_tls_sslmode: verify-full, server_tls_ca_file: \"{}\"",
        pki().ca.display()
    );
    let p = pooler(&tls_pg().addr(), &extra, &listener_tls("")).await;
    let port_ = port(&p);
    let bench = tokio::task::spawn_blocking(move || {
        let pgbench = format!("{BIN}/pgbench");
        assert!(
            std::path::Path::new(&pgbench).exists(),
            "pgbench is not installed ({pgbench} missing); install it with: sudo apt-get install postgresql-contrib"
        );
        let script = pki().dir.join("bench.sql");
        std::fs::write(
            &script,
            "\\set x random(1, 100000)\nselect :x, repeat('r', 20000);\n",
        )
        .expect("script");
        Command::new(&pgbench)
            .args([
                "-n",
                "-c",
                "8",
                "-j",
                "2",
                "-t",
                "200",
                "-h",
                "localhost",
                "-p",
            ])
            .arg(port_.to_string())
            .args(["-U", "alice", "-f"])
            .arg(&script)
            .arg("db")
            .env("PGPASSWORD", "alice-pw")
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", &pki().ca)
            .env("HOME", &pki().dir)
            .output()
            .expect("run pgbench")
    });
    let clients = futures_util::future::join_all((0..16).map(|_| connect(&p))).await;
    let work = clients.iter().enumerate().map(|(n, c)| async move {
        let c = c.as_ref().expect("connect");
        for i in 0..30 {
            let got = one(c, &format!("select {n} * 1000 + {i}")).await;
            assert_eq!(got, (n * 1000 + i).to_string());
        }
        assert_eq!(server_ssl(c).await, "true");
    });
    futures_util::future::join_all(work).await;
    let out = bench.await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("number of transactions actually processed: 1600/1600"),
        "pgbench: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // pgbench's eight clients (and its own first connection) all came over TLS.
    let tls = p
        .metric(
            "sidelight_pg_client_tls_total",
            &[("listener", "postgres"), ("result", "tls")],
        )
        .await;
    assert!(tls >= 8.0, "{tls}");
}
