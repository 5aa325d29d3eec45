//! Real drivers through the PostgreSQL pooler, as users run them: `psql` (with COPY, a LISTEN
//! refusal and a Ctrl-C cancel), `pgbench` in simple and extended mode with more clients than
//! server connections, and Python `psycopg` 3 and `asyncpg` scripts (tests/drivers/*.py) run
//! from the virtual environment `scripts/test.sh` creates (`target/py-drivers`, or
//! `$SIDELIGHT_PY_VENV`). A missing tool fails with an install hint, never a silent skip.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};
use support::pg::{pg, BIN};
use support::pgclient::*;
use support::proxy::Proxy;
use tokio::process::Command;

fn tool(name: &str) -> String {
    let path = format!("{BIN}/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} missing; install it with: sudo apt-get install postgresql"
    );
    path
}

fn python() -> PathBuf {
    let venv = std::env::var_os("SIDELIGHT_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py-drivers"));
    let venv = if venv.is_absolute() {
        venv
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(venv)
    };
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python virtual environment with the drivers at {}: run scripts/test.sh, which \
         creates it (it needs python3 and venv; on Debian: sudo apt-get install python3-venv)",
        venv.display()
    );
    python
}

fn script(name: &str) -> String {
    format!("{}/tests/drivers/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn drivers_pooler(db: &str, pool_size: usize) -> Proxy {
    pg().create_db(db, "app_scram");
    pooler(&pool("drivers", db, &format!(", pool_size: {pool_size}"))).await
}

fn succeeded(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn libpq(cmd: &mut Command, p: &Proxy) {
    cmd.args(["-h", "127.0.0.1", "-p", &pg_addr(p).port().to_string()])
        .args(["-U", "alice"])
        .env("PGPASSWORD", "alice-pw")
        .env("PGCONNECT_TIMEOUT", "10");
}

#[tokio::test]
async fn psql_copy_listen_and_cancel() {
    use tokio::io::AsyncWriteExt;
    let p = drivers_pooler("t_drv_psql", 2).await;
    let mut cmd = Command::new(tool("psql"));
    libpq(&mut cmd, &p);
    cmd.args(["-X", "-q", "-At", "-d", "drivers", "-v", "ON_ERROR_STOP=0"])
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("psql");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut input = String::from(
        "select current_setting('application_name');\n\
         create table items (n int);\n\
         copy items from stdin;\n",
    );
    for i in 0..5000 {
        input.push_str(&format!("{i}\n"));
    }
    input.push_str(
        "\\.\n\
         select count(*), sum(n) from items;\n\
         listen jobs;\n\
         begin; select 'in tx'; commit;\n\
         copy (select n from items where n < 3 order by n) to stdout;\n",
    );
    stdin.write_all(input.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("psql");
    let stdout = succeeded("psql", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["psql", "5000|12497500", "in tx", "0", "1", "2"],
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("LISTEN is not supported in transaction mode"),
        "{stderr}"
    );

    // Ctrl-C: psql sends a CancelRequest with the key sidelight gave it.
    let mut cmd = Command::new(tool("psql"));
    libpq(&mut cmd, &p);
    cmd.args(["-X", "-At", "-d", "drivers", "-c", "select pg_sleep(20)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().expect("psql");
    let pid = child.id().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    let running = "select count(*) from pg_stat_activity where query = 'select pg_sleep(20)'";
    while tokio::task::spawn_blocking(move || pg().psql("postgres", running))
        .await
        .expect("psql")
        == "0"
    {
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("psql ends after Ctrl-C")
        .expect("psql");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        p.metric(
            "sidelight_pg_cancel_requests_total",
            &[("pool", "drivers"), ("result", "forwarded")]
        )
        .await,
        1.0
    );
}

async fn pgbench(p: &Proxy, args: &[&str]) -> String {
    let mut cmd = Command::new(tool("pgbench"));
    libpq(&mut cmd, p);
    cmd.args(args).arg("drivers");
    let out = cmd.output().await.expect("pgbench");
    let stdout = succeeded(&format!("pgbench {args:?}"), &out);
    format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))
}

/// `pgbench -i` (COPY through libpq), then runs in a mode with 8 clients over 3 server
/// connections.
async fn pgbench_mode(db: &str, mode: &str) {
    let p = drivers_pooler(db, 3).await;
    pgbench(&p, &["-i", "-s", "1", "-q"]).await;
    // pgbench 15 prepares with a blocking call per thread: with fewer threads than clients and
    // fewer server connections than clients, `-M prepared` stalls behind any pooler (PgBouncer
    // 1.25 too), so each client gets its own thread there.
    let threads = if mode == "prepared" { "8" } else { "2" };
    let out = pgbench(&p, &["-M", mode, "-c", "8", "-j", threads, "-t", "50"]).await;
    assert!(
        out.contains("number of transactions actually processed: 400/400"),
        "{out}"
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

#[tokio::test]
async fn pgbench_simple() {
    pgbench_mode("t_drv_simple", "simple").await;
}

#[tokio::test]
async fn pgbench_extended() {
    pgbench_mode("t_drv_ext", "extended").await;
}

#[tokio::test]
async fn pgbench_prepared() {
    pgbench_mode("t_drv_prep", "prepared").await;
}

async fn run_python(args: &[&str]) -> String {
    let out = Command::new(python())
        .args(args)
        .output()
        .await
        .expect("python");
    succeeded(&format!("python {args:?}"), &out)
}

fn py_conninfo(p: &Proxy) -> String {
    conninfo(p, "drivers", "")
}

#[tokio::test]
async fn psycopg_simple_protocol() {
    let p = drivers_pooler("t_drv_psycopg", 2).await;
    let out = run_python(&[&script("psycopg_simple.py"), &py_conninfo(&p)]).await;
    assert!(out.contains("psycopg simple: ok"), "{out}");
}

#[tokio::test]
async fn psycopg_prepare_threshold_0() {
    let p = drivers_pooler("t_drv_psycopg_prep", 1).await;
    let out = run_python(&[&script("psycopg_prepared.py"), &py_conninfo(&p)]).await;
    assert!(out.contains("psycopg prepared: ok"), "{out}");
}

async fn asyncpg(db: &str, mode: &str) {
    let p = drivers_pooler(db, 2).await;
    let port = pg_addr(&p).port().to_string();
    let out = run_python(&[
        &script("asyncpg_driver.py"),
        "127.0.0.1",
        &port,
        "drivers",
        "alice",
        "alice-pw",
        mode,
    ])
    .await;
    assert!(out.contains(&format!("asyncpg {mode}: ok")), "{out}");
}

#[tokio::test]
async fn asyncpg_unnamed_statements() {
    asyncpg("t_drv_apg", "unnamed").await;
}

#[tokio::test]
async fn asyncpg_statement_cache() {
    asyncpg("t_drv_apg_cached", "cached").await;
}
