//! Start-up, readiness and graceful drain, in-process.

mod support;

use serde_json::json;
use std::time::Duration;
use support::{proxy, server, Config, Route, Upstream};

/// Upstream `up`, route `r`, and a `drain` timeout for shutdown.
fn config(endpoint: &str, drain: &str) -> Config {
    Config::one(endpoint).set("shutdown", json!({ "drain_timeout": drain }))
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
    let up = server::http1()
        .route_with_latency("/slow", "slow done", Duration::from_millis(500))
        .run()
        .await;
    let mut proxy = proxy::start(&config(&up.url(), "10s")).await;
    assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, 200);

    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { support::get(&url).await });
    support::eventually(
        "the upstream has the request",
        Duration::from_secs(5),
        || async { up.request_count() == 1 },
    )
    .await;

    let shutdown = tokio::spawn(proxy.shutdown());
    // Not ready while draining, so the orchestrator stops routing here.
    support::eventually(
        "readyz says 503 while draining",
        Duration::from_secs(5),
        || async { support::get(&proxy.admin_url("/readyz")).await.status == 503 },
    )
    .await;
    // New connections are refused once draining started.
    let addr = proxy.addr;
    support::eventually("listener closed", Duration::from_secs(5), || async move {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;

    let answer = in_flight.await.unwrap();
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (200, "slow done")
    );
    assert!(shutdown.await.unwrap(), "drained cleanly");
}

#[tokio::test]
async fn drain_deadline_cuts_hung_requests() {
    let up = server::http1().route_hang("/hang").run().await;
    let mut proxy = proxy::start(&config(&up.url(), "200ms")).await;
    let url = proxy.url("/hang");
    let hung = tokio::spawn(async move {
        support::client()
            .request(
                http::Request::get(url)
                    .body(sidelight::http::body::full(""))
                    .unwrap(),
            )
            .await
    });
    support::eventually(
        "the upstream has the request",
        Duration::from_secs(5),
        || async { up.request_count() == 1 },
    )
    .await;
    let started = std::time::Instant::now();
    let clean = proxy.shutdown().await;
    assert!(!clean, "the deadline cut a request");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The cut connection is closed: the client gets an error, not a hang or a success.
    let outcome = tokio::time::timeout(Duration::from_secs(5), hung)
        .await
        .expect("client still hanging");
    assert!(
        outcome.unwrap().is_err(),
        "the client must see its request failed"
    );
}

#[tokio::test]
async fn port_in_use_names_the_field() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let yaml = Config::new()
        .set(
            "listeners",
            json!([{ "name": "main", "address": addr.to_string() }]),
        )
        .set("admin", json!({ "address": "127.0.0.1:0" }))
        .upstream(Upstream::new("up", &["http://127.0.0.1:9"]))
        .route(Route::unnamed("up"))
        .yaml();
    let config = sidelight::config::Config::from_yaml(&yaml, &|_| None).unwrap();
    let err = match sidelight::server::Sidelight::start(config).await {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("listeners[0].address") && err.contains(&addr.to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn several_workers_share_the_port_and_drain_together() {
    let up = server::http1()
        .route("/", "ok")
        .route_with_latency("/slow", "slow done", Duration::from_millis(300))
        .run()
        .await;
    let yaml = config(&up.url(), "10s").set("runtime", json!({ "workers": 2 }));
    let mut proxy = proxy::start(&yaml).await;
    // New client connections are spread over both workers' sockets by the kernel; each worker
    // keeps its own upstream pool, so the upstream sees exactly one connection per worker.
    for _ in 0..40 {
        assert_eq!(
            support::get_on_new_connection(&proxy.url("/")).await.body,
            "ok"
        );
    }
    assert_eq!(
        up.connections(),
        2,
        "one pooled upstream connection per worker"
    );

    // Requests in flight on any worker finish before shutdown completes.
    let mut slow = Vec::new();
    for _ in 0..6 {
        let url = proxy.url("/slow");
        slow.push(tokio::spawn(async move {
            support::client_no_pool()
                .request(
                    http::Request::get(url)
                        .body(sidelight::http::body::full(""))
                        .unwrap(),
                )
                .await
        }));
    }
    support::eventually(
        "all slow requests reached the upstream",
        Duration::from_secs(5),
        || async { up.request_count() == 46 },
    )
    .await;
    let drained = proxy.shutdown().await;
    for s in slow {
        let answer = support::collect(s.await.unwrap().unwrap()).await;
        assert_eq!(answer.body, "slow done");
    }
    assert!(drained);
}

/// A second sidelight on ports another one serves fails to start ("address in use") instead of
/// silently taking half of the connections; the workers of one process still share a port.
#[tokio::test]
async fn a_second_sidelight_on_the_same_ports_fails_to_start() {
    let up = server::http1().route("/", "ok").run().await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    };
    let (listen, admin, admin2) = (free(), free(), free());
    let config = |listen: std::net::SocketAddr, admin: std::net::SocketAddr| {
        Config::one(&up.url())
            .set(
                "listeners",
                json!([{ "name": "main", "address": listen.to_string() }]),
            )
            .set("admin", json!({ "address": admin.to_string() }))
            .set("runtime", json!({ "workers": 2 }))
    };
    let first = proxy::start(&config(listen, admin)).await;
    assert_eq!(support::get(&first.url("/")).await.status, 200);

    for (what, second) in [
        ("listener", config(listen, admin2)),
        ("admin", config(free(), admin)),
    ] {
        let parsed =
            sidelight::config::Config::from_yaml(&second.yaml(), &|_| None).expect("valid config");
        let err = match sidelight::server::Sidelight::start(parsed).await {
            Ok(_) => panic!("a second sidelight started on the taken {what} port"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.to_lowercase().contains("address in use") || err.contains("os error 98"),
            "{what}: {err}"
        );
    }
    // The first one still serves every connection.
    for _ in 0..10 {
        assert_eq!(
            support::get_on_new_connection(&first.url("/")).await.status,
            200
        );
    }
}
