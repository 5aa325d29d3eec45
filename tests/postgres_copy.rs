//! COPY of 100 MB in and out through the PostgreSQL pooler, streamed on both sides, with
//! sidelight's memory bounded. A test binary of its own, so that the process's peak RSS
//! (VmHWM: the in-process sidelight plus the client) is this test's alone.

mod support;

use futures_util::{SinkExt, TryStreamExt};
use std::time::Instant;
use support::pg::pg;
use support::pgclient::*;

const TOTAL: usize = 100 * 1024 * 1024;
const ROW: usize = 100;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Row `i`: its number, a tab, padding, a newline: ROW bytes.
fn row(i: usize, out: &mut Vec<u8>) {
    let n = i.to_string();
    out.extend_from_slice(n.as_bytes());
    out.push(b'\t');
    out.resize(out.len() + ROW - n.len() - 2, b'x');
    out.push(b'\n');
}

#[tokio::test]
async fn copy_100_mb_in_and_out_with_bounded_memory() {
    pg().create_db("t_bigcopy", "app_scram");
    pg().psql(
        "t_bigcopy",
        "CREATE UNLOGGED TABLE big (n int, pad text); ALTER TABLE big OWNER TO app_scram",
    );
    let p = pooler(&pool("bigcopy", "t_bigcopy", ", pool_size: 1")).await;
    let c = connect(&p, "bigcopy").await;
    assert_eq!(one(&c, "select 1").await, "1");
    let before = vm_hwm_kib();
    let started = Instant::now();

    let rows = TOTAL / ROW;
    let sink = c.copy_in("COPY big FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    let mut chunk = Vec::with_capacity(64 * 1024);
    for i in 0..rows {
        row(i, &mut chunk);
        if chunk.len() >= 60 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .expect("send");
            chunk.reserve(64 * 1024);
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.expect("send");
    assert_eq!(sink.finish().await.expect("copy done"), rows as u64);

    let out = c.copy_out("COPY big TO STDOUT").await.expect("copy out");
    futures_util::pin_mut!(out);
    let (mut bytes, mut lines) = (0usize, 0usize);
    while let Some(b) = out.try_next().await.expect("copy data") {
        bytes += b.len();
        lines += memchr::memchr_iter(b'\n', &b).count();
    }
    assert_eq!((bytes, lines), (rows * ROW, rows));
    let growth_mib = (vm_hwm_kib().saturating_sub(before)) / 1024;
    eprintln!(
        "COPY 2 x {} MiB in {:?}, peak RSS growth {growth_mib} MiB (from {} MiB)",
        TOTAL >> 20,
        started.elapsed(),
        before / 1024
    );
    assert!(
        growth_mib < 32,
        "peak RSS grew by {growth_mib} MiB while 200 MiB went through"
    );
    let copied = |d| {
        let p = &p;
        async move {
            p.metric(
                "sidelight_pg_copy_bytes_total",
                &[("pool", "bigcopy"), ("direction", d)],
            )
            .await
        }
    };
    assert_eq!(copied("out").await, (rows * ROW) as f64);
    assert_eq!(copied("in").await, (rows * ROW) as f64);
    assert_eq!(one(&c, "select count(*) from big").await, rows.to_string());
}
