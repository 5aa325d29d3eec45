//! Upstream connection pooling: reuse, idle expiry, and the connection metrics.

mod support;

use serde_json::{json, Value};
use std::time::Duration;
use support::{proxy, server, Config, Route, Upstream};

/// Upstream `up` with `pool` settings, route `r` to it.
fn config(endpoint: &str, pool: Value) -> Config {
    Config::one(endpoint).upstream_set("pool", pool)
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(&up.url(), json!({}))).await;
    // A client that opens a new connection to sidelight every time: reuse is sidelight's doing.
    for _ in 0..20 {
        assert_eq!(
            support::get_on_new_connection(&proxy.url("/")).await.body,
            "ok"
        );
    }
    assert_eq!(up.request_count(), 20);
    assert_eq!(
        up.connections(),
        1,
        "20 sequential requests, one upstream connection"
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connections_opened_total",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connections_open",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_downstream_connections_total",
            &[("listener", "main")],
            20.0,
        )
        .await;
}

#[tokio::test]
async fn idle_pooled_connections_expire() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(&up.url(), json!({ "idle_timeout": "300ms" }))).await;
    assert_eq!(support::get(&proxy.url("/")).await.status, 200);
    assert_eq!(up.connections(), 1);
    // The pool closes the idle socket itself (no request needed to notice).
    support::eventually(
        "upstream sees the idle connection closed",
        Duration::from_secs(5),
        || async { up.open_connections() == 0 },
    )
    .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connections_open",
            &[("upstream", "up")],
            0.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connections_closed_total",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    // The next request gets a fresh connection, not a stale one.
    assert_eq!(support::get(&proxy.url("/")).await.status, 200);
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn concurrent_requests_open_connections_then_reuse_them() {
    let up = server::http1()
        .route_with_latency("/", "ok", Duration::from_millis(50))
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), json!({ "max_idle_per_endpoint": 8 }))).await;
    for _round in 0..3 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let url = proxy.url("/");
            tasks.push(tokio::spawn(async move { support::get(&url).await.status }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
    }
    assert_eq!(up.request_count(), 24);
    assert!(
        up.connections() <= 8,
        "at most one connection per concurrent request, reused across rounds: {}",
        up.connections()
    );
}

#[tokio::test]
async fn idle_endpoints_share_the_traffic() {
    let a = server::http1().route("/", "a").run().await;
    let b = server::http1().route("/", "b").run().await;
    let yaml = Config::new()
        .upstream(Upstream::new("up", &[&a.url(), &b.url()]))
        .route(Route::new("r", "up"));
    let proxy = proxy::start(&yaml).await;
    for _ in 0..40 {
        assert_eq!(support::get(&proxy.url("/")).await.status, 200);
    }
    // Power of two choices with equal load picks at random: both get a fair share.
    let (a, b) = (a.request_count(), b.request_count());
    assert_eq!(a + b, 40);
    assert!(a >= 8 && b >= 8, "a={a} b={b}");
}

/// An upstream that answers one request per connection and then closes the socket without
/// announcing it (no `Connection: close`), like a server whose keep-alive timeout is shorter
/// than the pool's.
async fn one_shot_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(AtomicUsize::new(0));
    let closed2 = closed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let closed = closed2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(s);
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn connections_closed_by_the_upstream_are_not_reused() {
    use std::sync::atomic::Ordering;
    let (addr, closed) = one_shot_upstream().await;
    let proxy = proxy::start(&config(
        &format!("http://{addr}"),
        json!({ "idle_timeout": "60s" }),
    ))
    .await;
    for i in 1..=5 {
        let answer = support::get(&proxy.url("/")).await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
        support::eventually(
            "the upstream closed its side",
            Duration::from_secs(5),
            || {
                let closed = closed.clone();
                async move { closed.load(Ordering::SeqCst) == i }
            },
        )
        .await;
        // The pool notices the close on its own.
        proxy
            .assert_metric_eventually(
                "sidelight_upstream_connections_open",
                &[("upstream", "up")],
                0.0,
            )
            .await;
    }
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connections_opened_total",
            &[("upstream", "up")],
            5.0,
        )
        .await;
}

#[tokio::test]
async fn an_endpoint_that_answers_429_is_rested_for_its_retry_after() {
    let limited = server::http1()
        .route_fn("/", |_| {
            http::Response::builder()
                .status(429)
                .header("retry-after", "60")
                .body(sidelight::http::body::full("slow down"))
                .unwrap()
        })
        .run()
        .await;
    let healthy = server::http1().route("/", "ok").run().await;
    let yaml = Config::new()
        .upstream(Upstream::new("up", &[&limited.url(), &healthy.url()]))
        .route(Route::new("r", "up"));
    let proxy = proxy::start(&yaml).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(support::get(&proxy.url("/")).await.status.as_u16());
    }
    assert!(
        limited.request_count() <= 1,
        "the 429 endpoint was asked again: {}",
        limited.request_count()
    );
    assert_eq!(limited.request_count() + healthy.request_count(), 20);
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        healthy.request_count()
    );
    proxy
        .assert_metric_eventually(
            "sidelight_endpoint_cooldowns_total",
            &[("upstream", "up")],
            limited.request_count() as f64,
        )
        .await;
}

#[tokio::test]
async fn busy_endpoints_get_fewer_new_requests() {
    let stuck = server::http1().route_hang("/").run().await;
    let fast = server::http1().route("/", "ok").run().await;
    let yaml = Config::new()
        .upstream(Upstream::new("up", &[&stuck.url(), &fast.url()]))
        .route(Route::new("r", "up"));
    let proxy = proxy::start(&yaml).await;
    // Requests go out (and are left hanging) until one lands on the stuck endpoint.
    let mut hanging = Vec::new();
    while stuck.request_count() == 0 {
        let url = proxy.url("/");
        hanging.push(tokio::spawn(async move { support::get(&url).await }));
        support::eventually(
            "the request landed somewhere",
            Duration::from_secs(5),
            || async { stuck.request_count() + fast.request_count() == hanging.len() },
        )
        .await;
    }
    proxy
        .assert_metric_eventually(
            "sidelight_endpoint_requests_in_flight",
            &[("upstream", "up"), ("endpoint", &stuck.addr.to_string())],
            1.0,
        )
        .await;
    // With one request stuck there, every new one goes to the idle endpoint.
    let before = fast.request_count();
    for _ in 0..20 {
        assert_eq!(support::get(&proxy.url("/")).await.status, 200);
    }
    assert_eq!(fast.request_count() - before, 20);
    assert_eq!(stuck.request_count(), 1);
}

#[tokio::test]
async fn an_endpoint_failing_in_a_row_is_ejected() {
    let broken = server::http1().status("/", 500, "broken").run().await;
    let healthy = server::http1().route("/", "ok").run().await;
    let yaml = Config::new()
        .upstream(Upstream::new("up", &[&broken.url(), &healthy.url()]).set(
            "outlier_detection",
            json!({ "consecutive_failures": 5, "base_ejection_time": "1m" }),
        ))
        .route(Route::new("r", "up"));
    let proxy = proxy::start(&yaml).await;
    for _ in 0..40 {
        support::get(&proxy.url("/")).await;
    }
    assert_eq!(
        broken.request_count(),
        5,
        "ejected after five failures in a row"
    );
    assert_eq!(healthy.request_count(), 35);
    proxy
        .assert_metric_eventually(
            "sidelight_endpoint_ejections_total",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_endpoint_ejected",
            &[("upstream", "up"), ("endpoint", &broken.addr.to_string())],
            1.0,
        )
        .await;
}
