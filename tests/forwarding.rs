//! What reaches the upstream and what comes back: method, path, query, headers, body, streaming.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use sidelight::http::body::full;
use std::time::Duration;
use support::{proxy, server, Config, Route, Upstream};

/// Upstream `api` with auth headers from `${VARS}`, route `api` under `/api` (prefix stripped).
fn config(upstream: &str) -> Config {
    Config::new()
        .upstream(Upstream::new("api", &[upstream]).set(
            "headers",
            json!({ "authorization": "Bearer ${UPSTREAM_KEY}", "x-optional": "${NOT_SET:-}" }),
        ))
        .route(Route::new("api", "api").path_prefix("/api").strip_prefix())
}

#[tokio::test]
async fn forwards_method_path_query_headers_and_body() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start_with_env(&config(&up.url()), &[("UPSTREAM_KEY", "sk-upstream")]).await;

    let req = Request::put(proxy.url("/api/v1/items/7?expand=true&x=%20y"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer app-key")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("keep-alive", "timeout=5")
        .body(full(r#"{"hello":"world"}"#))
        .unwrap();
    let answer = support::send(req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "ok");

    let seen = up.last_request();
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.uri.path(), "/v1/items/7", "prefix stripped");
    assert_eq!(
        seen.uri.query(),
        Some("expand=true&x=%20y"),
        "query untouched"
    );
    assert_eq!(seen.body, Bytes::from(r#"{"hello":"world"}"#));
    let h = &seen.headers;
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    // The configured upstream credential replaces the app's.
    assert_eq!(h["authorization"], "Bearer sk-upstream");
    // An optional header whose variable is unset is not sent at all.
    assert!(h.get("x-optional").is_none());
    assert!(
        h.get("x-hop").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert!(h.get("keep-alive").is_none());
    assert_eq!(h["host"], up.addr.to_string(), "Host is the upstream's");
    assert_eq!(h["x-forwarded-host"], proxy.addr.to_string());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");

    // The generated request id went upstream and came back.
    let id = answer.header("x-request-id");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(h["x-request-id"], id);
}

#[tokio::test]
async fn keeps_the_clients_request_id_and_the_upstreams() {
    let up = server::http1()
        .route_fn("/", |_| {
            http::Response::builder()
                .header("x-request-id", "req_from_upstream")
                .body(full("ok"))
                .unwrap()
        })
        .run()
        .await;
    let proxy = proxy::start_with_env(&config(&up.url()), &[("UPSTREAM_KEY", "k")]).await;
    let answer = support::send(
        Request::get(proxy.url("/api/x"))
            .header("x-request-id", "client-chosen-id")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(
        up.last_request().headers["x-request-id"],
        "client-chosen-id"
    );
    assert_eq!(answer.header("x-request-id"), "client-chosen-id");
    assert_eq!(answer.header("x-upstream-request-id"), "req_from_upstream");
}

#[tokio::test]
async fn rewrites_prefixes_and_matches_hosts() {
    let up = server::http1().route("/", "ok").run().await;
    let config = config(&format!("{}/base", up.url()))
        .route(
            Route::new("rewritten", "api")
                .path_prefix("/v1-compat")
                .set("prefix_rewrite", json!("/api/v2")),
        )
        .route(Route::new("by-host", "api").set(
            "match",
            json!({ "path_prefix": "/", "host": "db.internal" }),
        ));
    let proxy = proxy::start_with_env(&config, &[("UPSTREAM_KEY", "k")]).await;

    assert_eq!(
        support::get(&proxy.url("/v1-compat/users?id=1"))
            .await
            .status,
        200
    );
    assert_eq!(up.last_request().uri.to_string(), "/base/api/v2/users?id=1");

    let answer = support::send(
        Request::get(proxy.url("/anything"))
            .header("host", "DB.internal:8080")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(up.last_request().uri.path(), "/base/anything");

    // Same path without the host matches nothing.
    let answer = support::get(&proxy.url("/anything")).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("x-sidelight-error"), "no_route");
}

#[tokio::test]
async fn streams_sse_chunk_by_chunk() {
    // The upstream sends the next event only once the test says the client has the previous
    // one: if sidelight buffered the body, the client would never see the first event.
    let (next_tx, next_rx) = tokio::sync::mpsc::channel::<()>(1);
    let next_rx = std::sync::Arc::new(tokio::sync::Mutex::new(next_rx));
    let up = server::http1()
        .route_stream("/v1/chat/completions", move |_, tx| {
            let next_rx = next_rx.clone();
            async move {
                let mut next_rx = next_rx.lock().await;
                for i in 0..3 {
                    let event = format!("data: {{\"chunk\":{i}}}\n\n");
                    if tx.send(Ok(Bytes::from(event))).await.is_err() {
                        return;
                    }
                    if next_rx.recv().await.is_none() {
                        return;
                    }
                }
                let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start_with_env(&config(&up.url()), &[("UPSTREAM_KEY", "k")]).await;
    let response = support::client()
        .request(
            Request::post(proxy.url("/api/v1/chat/completions"))
                .body(full(r#"{"stream":true}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    for i in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!("event {i} did not arrive before the upstream sent the next")
            })
            .expect("stream ended early")
            .expect("stream failed");
        let data = frame.into_data().expect("data frame");
        assert_eq!(data, Bytes::from(format!("data: {{\"chunk\":{i}}}\n\n")));
        next_tx.send(()).await.unwrap();
    }
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from("data: [DONE]\n\n"));
}

#[tokio::test]
async fn large_bodies_stream_through_both_ways() {
    let up = server::http1()
        .route_fn("/echo", |req| http::Response::new(full(req.body)))
        .run()
        .await;
    let proxy = proxy::start_with_env(&config(&up.url()), &[("UPSTREAM_KEY", "k")]).await;
    let big: String = "0123456789abcdef".repeat(256 * 1024); // 4 MiB
    let answer = support::post(&proxy.url("/api/echo"), &big).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), big.len());
    assert!(answer.body == big);
}

#[tokio::test]
async fn serves_http2_clients_and_http2_upstreams() {
    let up = server::http2().route("/", "over h2").run().await;
    let yaml = Config::new()
        .upstream(Upstream::new("h2", &[&up.url()]).set("pool", json!({ "http2": true })))
        .route(Route::new("h2", "h2"));
    let proxy = proxy::start(&yaml).await;
    let h2_client: hyper_util::client::legacy::Client<_, sidelight::http::body::ProxyBody> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    for _ in 0..3 {
        let response = h2_client
            .request(Request::get(proxy.url("/x")).body(full("")).unwrap())
            .await
            .unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let answer = support::collect(response).await;
        assert_eq!(answer.body, "over h2");
    }
    assert_eq!(up.last_request().version, http::Version::HTTP_2);
    assert_eq!(up.connections(), 1, "one multiplexed upstream connection");
}

#[tokio::test]
async fn https_upstream_with_a_private_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = cert.cert.pem();
    let key_pem = cert.key_pair.serialize_pem();
    let dir = std::env::temp_dir().join(format!("sidelight-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &cert_pem).unwrap();

    let up = server::http1()
        .route("/", "secret sauce")
        .tls(cert_pem, key_pem)
        .run()
        .await;
    let yaml = Config::new()
        .upstream(
            Upstream::new("tls", &[&format!("https://localhost:{}", up.addr.port())])
                .set("tls", json!({ "ca_file": ca_file.display().to_string() })),
        )
        .upstream(Upstream::new(
            "untrusted",
            &[&format!("https://localhost:{}", up.addr.port())],
        ))
        .route(Route::new("tls", "tls").path_prefix("/trusted"))
        .route(Route::new("untrusted", "untrusted").path_prefix("/untrusted"));
    let proxy = proxy::start(&yaml).await;
    let answer = support::get(&proxy.url("/trusted/x")).await;
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (200, "secret sauce")
    );

    // Without the CA the certificate is rejected: a clear 502, counted as a TLS error.
    let answer = support::get(&proxy.url("/untrusted/x")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("x-sidelight-error"),
        "upstream_connect_failed"
    );
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_connect_errors_total",
            &[("upstream", "untrusted"), ("kind", "tls")],
            1.0,
        )
        .await;
}

/// h2c clients get HTTP/1's bounds: a connection with no request open for
/// `limits.header_read_timeout` is closed, before its first request or between requests, while
/// a request that takes longer (a slow stream) is not cut.
#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = server::http1()
        .route("/", "ok")
        .route_with_latency("/slow", "slow", Duration::from_millis(700))
        .run()
        .await;
    let proxy = proxy::start(
        &Config::one(&up.url()).set("limits", json!({ "header_read_timeout": "300ms" })),
    )
    .await;
    // The preface and an empty SETTINGS frame, then nothing.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "an h2c connection without a request stays open"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    proxy
        .assert_metric_eventually(
            "sidelight_downstream_protocol_errors_total",
            &[("listener", "main"), ("kind", "header_timeout")],
            1.0,
        )
        .await;

    // A request open longer than the limit is answered in full.
    let h2_client: hyper_util::client::legacy::Client<_, sidelight::http::body::ProxyBody> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let response = h2_client
        .request(Request::get(proxy.url("/slow")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(support::collect(response).await.body, "slow");
}

#[tokio::test]
async fn url_credentials_are_sent_as_basic_auth_and_config_shows_no_secret() {
    let up = server::http1().route("/", "ok").run().await;
    let with_credentials = up.url().replace("http://", "http://user:p%40ss@");
    let yaml = Config::new()
        .upstream(Upstream::new("api", &[&with_credentials]).set(
            "headers",
            json!({
                "x-custom-token": "literal-custom-secret",
                "x-key": "${UNSET_KEY:-default-secret}",
                "anthropic-version": "2023-06-01",
                "x-env": "Bearer ${ENV_KEY}",
            }),
        ))
        .upstream(Upstream::new(
            "other",
            &["${OTHER_URL:-http://u2:default-pw@127.0.0.1:9}"],
        ))
        .route(Route::new("api", "api"));
    let proxy = proxy::start_with_env(&yaml, &[("ENV_KEY", "env-secret")]).await;

    let answer = support::get(&proxy.url("/x")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // curl's behaviour: `user:p%40ss@` is `Authorization: Basic base64("user:p@ss")`.
    let sent = up.last_request();
    assert_eq!(sent.headers["authorization"], "Basic dXNlcjpwQHNz");
    // The credentials are not part of the Host the upstream sees.
    assert!(
        !sent.headers["host"].to_str().unwrap().contains('@'),
        "{:?}",
        sent.headers["host"]
    );

    let shown = support::get(&proxy.admin_url("/config")).await.body;
    for secret in [
        "literal-custom-secret",
        "default-secret",
        "p%40ss",
        "default-pw",
        "env-secret",
    ] {
        assert!(!shown.contains(secret), "{secret:?} shown:\n{shown}");
    }
    let parsed: serde_yaml::Value = serde_yaml::from_str(&shown).expect("/config is YAML");
    let headers = &parsed["upstreams"][0]["headers"];
    assert_eq!(headers["x-custom-token"].as_str(), Some("<redacted>"));
    assert_eq!(headers["x-key"].as_str(), Some("${UNSET_KEY:-<redacted>}"));
    assert_eq!(headers["anthropic-version"].as_str(), Some("2023-06-01"));
    assert_eq!(headers["x-env"].as_str(), Some("Bearer ${ENV_KEY}"));
    assert_eq!(
        parsed["upstreams"][0]["endpoints"][0].as_str(),
        Some(with_credentials.replace("p%40ss", "<redacted>").as_str())
    );
    assert_eq!(
        parsed["upstreams"][1]["endpoints"][0].as_str(),
        Some("${OTHER_URL:-http://u2:<redacted>@127.0.0.1:9}")
    );
}

/// nginx's `underscores_in_headers off`: `Transfer_Encoding` and friends are dropped, over
/// HTTP/1.1 and HTTP/2, unless `limits.allow_underscores_in_headers` keeps them.
#[tokio::test]
async fn header_names_with_underscores_are_dropped_unless_allowed() {
    let up = server::http1().route("/", "ok").run().await;
    let request = |url: String| {
        Request::get(url)
            .header("transfer_encoding", "chunked")
            .header("x_api_user", "admin")
            .header("x-normal", "kept")
            .body(full(""))
            .unwrap()
    };
    let proxy = proxy::start(&Config::one(&up.url())).await;
    let h2_client: hyper_util::client::legacy::Client<_, sidelight::http::body::ProxyBody> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let answer = support::send(request(proxy.url("/x"))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let h2 = h2_client.request(request(proxy.url("/x"))).await.unwrap();
    assert_eq!(h2.version(), http::Version::HTTP_2);
    assert_eq!(support::collect(h2).await.status, 200);
    let sent = up.requests();
    assert_eq!(sent.len(), 2);
    for r in &sent {
        assert!(
            r.headers.get("transfer_encoding").is_none(),
            "{:?}",
            r.headers
        );
        assert!(r.headers.get("x_api_user").is_none(), "{:?}", r.headers);
        assert_eq!(r.headers["x-normal"], "kept");
    }
    proxy
        .assert_metric_eventually(
            "sidelight_request_headers_dropped_total",
            &[("listener", "main")],
            4.0,
        )
        .await;

    let allowing = proxy::start(
        &Config::one(&up.url()).set("limits", json!({ "allow_underscores_in_headers": true })),
    )
    .await;
    let answer = support::send(request(allowing.url("/x"))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let h2 = h2_client
        .request(request(allowing.url("/x")))
        .await
        .unwrap();
    assert_eq!(support::collect(h2).await.status, 200);
    let sent = up.requests();
    for r in &sent[2..] {
        assert_eq!(r.headers["x_api_user"], "admin");
        assert_eq!(r.headers["transfer_encoding"], "chunked");
    }
}

/// h2c request bodies get HTTP/1's `limits.client_body_timeout`: a body that stalls is the
/// client's 408, not an upstream timeout.
#[tokio::test]
async fn an_h2c_request_body_that_stalls_gets_408() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(
        &Config::one(&up.url()).set("limits", json!({ "client_body_timeout": "300ms" })),
    )
    .await;
    let h2_client: hyper_util::client::legacy::Client<_, sidelight::http::body::ProxyBody> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, sidelight::BoxError>>(1);
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"some bytes",
    ))))
    .await
    .unwrap();
    let body =
        http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let request = Request::post(proxy.url("/x"))
        .header("content-length", "100000")
        .body(body.boxed_unsync())
        .unwrap();
    let started = std::time::Instant::now();
    let response = h2_client.request(request).await.unwrap();
    assert_eq!(response.status(), 408);
    assert_eq!(
        response
            .headers()
            .get("x-sidelight-error")
            .and_then(|v| v.to_str().ok()),
        Some("client_body_timeout")
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    drop(tx);
}
