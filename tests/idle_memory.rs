//! Idle keep-alive connections are cheap (issue 13, item 5): an idle HTTP/1.1 connection holds
//! no read or write buffer, and its task is small. Alone in its test binary, so nothing else
//! moves the process's memory while it is measured. `benches/idle_bench.sh` measures the
//! release binary against nginx.

mod support;

use support::{proxy, server, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// `n` connections, each after one answered request: idle keep-alive connections.
async fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        while !got.ends_with(b"pong") {
            let read = s.read(&mut buf).await.expect("read");
            assert!(
                read > 0,
                "closed before answering: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..read]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        conns.push(s);
    }
    conns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_costs_a_few_kib() {
    // Each connection is two descriptors in this process (client and server side).
    const N: usize = 2000;
    let upstream = server::http1().route("/ping", "pong").run().await;
    let proxy = proxy::start(&Config::one(&upstream.url()).with(serde_json::json!({
        "limits": { "max_client_connections": 5000 }
    })))
    .await;
    // Warm up: the allocator's and runtime's first-use costs are not the connections'.
    let warm = idle_connections(proxy.addr, 200).await;
    drop(warm);
    let before = rss_kib();
    let conns = idle_connections(proxy.addr, N).await;
    proxy
        .assert_metric_eventually(
            "sidelight_downstream_connections_open",
            &[("listener", "main")],
            N as f64,
        )
        .await;
    let per_conn = (rss_kib().saturating_sub(before)) as f64 / N as f64;
    // Both ends of each connection are in this process, in a debug build: about 9 KiB, and 16
    // KiB before idle connections released their buffers and the connection task's cold paths
    // were boxed (the release binary: 22 KiB then, 3 KiB now, benches/idle_bench.sh).
    assert!(
        per_conn < 12.0,
        "{per_conn:.1} KiB of RSS per idle connection (client and proxy side together)"
    );
    drop(conns);
}
