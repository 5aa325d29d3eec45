//! Every error sidelight answers itself: status, `x-sidelight-error`, JSON `type`, and metrics.
//! Every timeout kind, including the ones that cut a stream after its headers.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use sidelight::http::body::full;
use sidelight::BoxError;
use std::time::{Duration, Instant};
use support::{proxy, server, Answer, Config, Route, Upstream};

fn assert_error(answer: &Answer, status: u16, kind: &str) {
    assert_eq!(answer.status.as_u16(), status, "body: {}", answer.body);
    assert_eq!(answer.header("x-sidelight-error"), kind);
    assert_eq!(answer.header("content-type"), "application/json");
    let json = answer.json();
    assert_eq!(json["error"]["type"], kind);
    assert_eq!(json["error"]["source"], "sidelight");
    assert_eq!(json["error"]["request_id"], answer.header("x-request-id"));
    assert!(!json["error"]["message"].as_str().unwrap_or("").is_empty());
}

/// Upstream `up` with `upstream_fields`, route `r` under `/r`, and `sections` at the top level
/// (each a JSON object, or `{}`).
fn one_route(endpoint: &str, upstream_fields: Value, sections: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("up", &[endpoint]).with(upstream_fields))
        .route(Route::new("r", "up").path_prefix("/r"))
        .with(sections)
}

#[tokio::test]
async fn no_route_is_404() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&one_route(&up.url(), json!({}), json!({}))).await;
    assert_error(
        &support::get(&proxy.url("/elsewhere")).await,
        404,
        "no_route",
    );
    assert_eq!(up.request_count(), 0);
    proxy
        .assert_metric_eventually(
            "sidelight_requests_total",
            &[("route", "_none"), ("status_class", "4xx")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_errors_total",
            &[("route", "_none"), ("type", "no_route")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn body_over_the_limit_is_413_declared_or_streamed() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({}),
        json!({ "limits": { "max_request_body_bytes": "1KiB" } }),
    ))
    .await;

    // Declared by Content-Length: refused before anything goes upstream.
    let answer = support::post(&proxy.url("/r"), &"x".repeat(2000)).await;
    assert_error(&answer, 413, "body_too_large");
    assert_eq!(up.request_count(), 0);

    // Chunked, no length: refused when the stream crosses the limit.
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'y'; 300])))),
    );
    let req = Request::post(proxy.url("/r"))
        .body(StreamBody::new(chunks).boxed_unsync())
        .unwrap();
    assert_error(&support::send(req).await, 413, "body_too_large");

    // At the limit is fine.
    assert_eq!(
        support::post(&proxy.url("/r"), &"x".repeat(1024))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn connection_refused_is_502() {
    let port = server::closed_port().await;
    let proxy = proxy::start(&one_route(&format!("http://{port}"), json!({}), json!({}))).await;
    let answer = support::get(&proxy.url("/r")).await;
    assert_error(&answer, 502, "upstream_connect_failed");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{}",
        answer.body
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connect_errors_total",
            &[("upstream", "up"), ("kind", "refused")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_requests_total",
            &[("route", "r"), ("status_class", "5xx")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn reset_before_headers_is_502() {
    let up = server::http1().route_reset("/").run().await;
    let proxy = proxy::start(&one_route(&up.url(), json!({}), json!({}))).await;
    assert_error(&support::get(&proxy.url("/r")).await, 502, "upstream_reset");
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_failures_total",
            &[("upstream", "up"), ("kind", "reset")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let (addr, _fillers, _listener) = server::blackhole().await;
    let proxy = proxy::start(&one_route(
        &format!("http://{addr}"),
        json!({ "timeouts": { "connect": "200ms" } }),
        json!({}),
    ))
    .await;
    let started = Instant::now();
    let answer = support::get(&proxy.url("/r")).await;
    assert_error(&answer, 504, "upstream_connect_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_timeouts_total",
            &[("upstream", "up"), ("kind", "connect")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn no_headers_in_time_is_504() {
    let up = server::http1().route_hang("/").run().await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({ "timeouts": { "first_byte": "200ms" } }),
        json!({}),
    ))
    .await;
    assert_error(
        &support::get(&proxy.url("/r")).await,
        504,
        "upstream_first_byte_timeout",
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_timeouts_total",
            &[("upstream", "up"), ("kind", "first_byte")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn total_timeout_before_headers_is_504() {
    let up = server::http1().route_hang("/").run().await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({ "timeouts": { "first_byte": "10s", "total": "200ms" } }),
        json!({}),
    ))
    .await;
    assert_error(
        &support::get(&proxy.url("/r")).await,
        504,
        "upstream_total_timeout",
    );
}

/// An upstream stream that sends one event, then goes silent.
async fn stalled_stream() -> server::Server {
    server::http1()
        .route_stream("/", move |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from("data: first\n\n"))).await;
            // Hold the stream open without sending.
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .run()
        .await
}

/// Reads the body to its end: the data seen, and whether it ended with an error.
async fn read_stream(url: &str) -> (String, bool) {
    let response = support::client()
        .request(Request::get(url).body(full("")).unwrap())
        .await
        .expect("headers arrive");
    assert_eq!(response.status(), 200, "headers went out before the cut");
    let mut body = response.into_body();
    let mut seen = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Err(_) => panic!("stream neither continued nor ended"),
            Ok(None) => return (seen, false),
            Ok(Some(Err(_))) => return (seen, true),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    seen.push_str(&String::from_utf8_lossy(d));
                }
            }
        }
    }
}

#[tokio::test]
async fn idle_timeout_cuts_the_stream_with_an_error() {
    let up = stalled_stream().await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({ "timeouts": { "idle": "200ms" } }),
        json!({}),
    ))
    .await;
    let (seen, failed) = read_stream(&proxy.url("/r")).await;
    assert_eq!(seen, "data: first\n\n");
    assert!(
        failed,
        "the client must see an incomplete stream, not a clean end"
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_timeouts_total",
            &[("upstream", "up"), ("kind", "idle")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn total_timeout_cuts_the_stream_with_an_error() {
    // Chunks keep coming (so the idle timeout never fires), but the whole takes too long.
    let up = server::http1()
        .route_stream("/", |_, tx| async move {
            for _ in 0..100 {
                if tx.send(Ok(Bytes::from("data: tick\n\n"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({ "timeouts": { "idle": "1s", "total": "300ms" } }),
        json!({}),
    ))
    .await;
    let (seen, failed) = read_stream(&proxy.url("/r")).await;
    assert!(seen.starts_with("data: tick"));
    assert!(failed);
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_timeouts_total",
            &[("upstream", "up"), ("kind", "total")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn upstream_breaking_mid_stream_reaches_the_client_as_an_error() {
    let (up, break_tx) = server::stream_that_breaks("data: first\n\n").await;
    let proxy = proxy::start(&one_route(&up.url(), json!({}), json!({}))).await;
    let response = support::client()
        .request(Request::get(proxy.url("/r")).body(full("")).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from("data: first\n\n"));
    break_tx.send(true).unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("stream ends");
    assert!(
        rest.is_err(),
        "the client must see the stream broke, not a clean end"
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_failures_total",
            &[("upstream", "up"), ("kind", "body")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn overload_is_503_and_recovers() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let up = server::http1()
        .route_stream("/", move |_, tx| {
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(Ok(Bytes::from("done"))).await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start(&one_route(
        &up.url(),
        json!({}),
        json!({ "limits": { "max_in_flight_requests": 1 } }),
    ))
    .await;

    let url = proxy.url("/r");
    let first = tokio::spawn(async move { support::get(&url).await });
    proxy
        .assert_metric_eventually("sidelight_requests_in_flight", &[("route", "r")], 1.0)
        .await;
    let answer = support::get(&proxy.url("/r")).await;
    assert_error(&answer, 503, "overloaded");
    assert_eq!(answer.header("retry-after"), "1");

    release_tx.send(true).unwrap();
    assert_eq!(first.await.unwrap().body, "done");
    // The slot is free again once the first response finished.
    proxy
        .assert_metric_eventually("sidelight_requests_in_flight", &[("route", "r")], 0.0)
        .await;
    assert_eq!(support::get(&proxy.url("/r")).await.status, 200);
    proxy
        .assert_metric_eventually("sidelight_overloaded_total", &[], 1.0)
        .await;
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let up = server::http1()
        .status("/", 503, r#"{"error":"upstream says no"}"#)
        .run()
        .await;
    let proxy = proxy::start(&one_route(&up.url(), json!({}), json!({}))).await;
    let answer = support::get(&proxy.url("/r")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body, r#"{"error":"upstream says no"}"#);
    assert_eq!(
        answer.header("x-sidelight-error"),
        "",
        "not sidelight's own error"
    );
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_proxy_stays_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&one_route(&up.url(), json!({}), json!({}))).await;
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /r HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        conn.write_all(garbage).await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
            "{reply}"
        );
    }
    assert_eq!(up.request_count(), 0);
    assert_eq!(support::get(&proxy.url("/r")).await.status, 200);
}
