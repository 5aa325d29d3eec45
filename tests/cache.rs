//! The response cache and request coalescing, against counting upstreams.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sidelight::http::body::full;
use std::sync::Arc;
use std::time::Duration;
use support::{proxy, server, Answer, Config, Route, Upstream};

const CHAT: &str = "/v1/chat/completions";

/// Upstream `llm` and route `llm` with `cache`; add sections with `.set(..)`.
fn config(upstream: &str, cache: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("llm", &[upstream]))
        .route(Route::new("llm", "llm").set("cache", cache))
}

fn llm_cache() -> Value {
    json!({ "ttl": "10m", "methods": ["GET", "POST"], "ignore_json_fields": ["user", "metadata"] })
}

/// An upstream that answers with a counter, so a cached answer is recognisable.
async fn counting_upstream() -> server::Server {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    server::http1()
        .route_fn("/", move |req| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let body = format!("answer {i} to {}", String::from_utf8_lossy(&req.body));
            http::Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        })
        .run()
        .await
}

async fn chat(proxy: &proxy::Proxy, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::post(proxy.url(CHAT)).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    support::send(req.body(full(body.to_string())).unwrap()).await
}

#[tokio::test]
async fn repeats_are_answered_from_the_cache_with_headers_that_say_so() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;

    let first = chat(&proxy, body, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-sidelight-cache"), "MISS");
    assert_eq!(first.header("cache-status"), "sidelight; fwd=miss");
    let key = first.header("x-sidelight-cache-key").to_string();
    assert_eq!(key.len(), 64);

    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    let second = chat(&proxy, body, &[]).await;
    assert_eq!(second.header("x-sidelight-cache"), "HIT");
    assert!(
        second
            .header("cache-status")
            .starts_with("sidelight; hit; ttl="),
        "{}",
        second.header("cache-status")
    );
    assert_eq!(second.header("age"), "0");
    assert_eq!(second.header("x-sidelight-cache-key"), key);
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("content-type"), "application/json");
    assert_ne!(
        second.header("x-request-id"),
        first.header("x-request-id"),
        "each response carries its own request id"
    );
    assert_eq!(up.request_count(), 1);

    proxy
        .assert_metric_eventually(
            "sidelight_cache_lookups_total",
            &[("route", "llm"), ("result", "hit")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_calls_saved_total",
            &[("route", "llm"), ("reason", "cache")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn the_key_ignores_json_layout_and_listed_fields_but_not_parameters() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let a = chat(&proxy, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"user":"alice"}"#, &[]).await;
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    // Same request: keys reordered, whitespace added, a different `user` (excluded from the key).
    let b = chat(&proxy, "{ \"temperature\": 0,\n \"user\": \"bob\", \"messages\": [ {\"content\": \"hi\", \"role\": \"user\"} ], \"model\": \"m\" }", &[]).await;
    assert_eq!(b.header("x-sidelight-cache"), "HIT");
    assert_eq!(
        b.header("x-sidelight-cache-key"),
        a.header("x-sidelight-cache-key")
    );
    // A parameter that changes the answer misses.
    let c = chat(
        &proxy,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#,
        &[],
    )
    .await;
    assert_eq!(c.header("x-sidelight-cache"), "MISS");
    assert_ne!(
        c.header("x-sidelight-cache-key"),
        a.header("x-sidelight-cache-key")
    );
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn tenants_never_share_entries() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"secret plans"}]}"#;
    let alice = chat(&proxy, body, &[("authorization", "Bearer sk-alice")]).await;
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    let bob = chat(&proxy, body, &[("authorization", "Bearer sk-bob")]).await;
    assert_eq!(
        bob.header("x-sidelight-cache"),
        "MISS",
        "another credential never hits alice's entry"
    );
    assert_ne!(bob.body, alice.body);
    let carol = chat(&proxy, body, &[("x-api-key", "sk-carol")]).await;
    assert_eq!(carol.header("x-sidelight-cache"), "MISS");
    let anonymous = chat(&proxy, body, &[]).await;
    assert_eq!(anonymous.header("x-sidelight-cache"), "MISS");
    let alice_again = chat(&proxy, body, &[("authorization", "Bearer sk-alice")]).await;
    assert_eq!(alice_again.header("x-sidelight-cache"), "HIT");
    assert_eq!(alice_again.body, alice.body);
    // The key shown to clients is a hash, never the credential.
    assert!(!alice.header("x-sidelight-cache-key").contains("alice"));
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
async fn client_cache_controls() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let body = r#"{"q":1}"#;
    // no-store: answered, not stored.
    let a = chat(&proxy, body, &[("cache-control", "no-store")]).await;
    assert_eq!(a.header("x-sidelight-cache"), "MISS");
    let b = chat(&proxy, body, &[]).await;
    assert_eq!(b.header("x-sidelight-cache"), "MISS", "nothing was stored");
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    // no-cache: skips the lookup, goes upstream, stores the fresh answer.
    let c = chat(&proxy, body, &[("cache-control", "no-cache")]).await;
    assert_eq!(c.header("x-sidelight-cache"), "MISS");
    assert_eq!(c.header("cache-status"), "sidelight; fwd=request");
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 2.0)
        .await;
    let d = chat(&proxy, body, &[]).await;
    assert_eq!(d.header("x-sidelight-cache"), "HIT");
    assert_eq!(d.body, c.body, "the refreshed answer replaced the old one");
    assert_eq!(up.request_count(), 3);
    proxy
        .assert_metric_eventually(
            "sidelight_cache_lookups_total",
            &[("route", "llm"), ("result", "refresh")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn entries_expire_after_their_ttl_and_clients_can_shorten_it() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "400ms", "methods": ["POST"] }),
    ))
    .await;
    chat(&proxy, r#"{"a":1}"#, &[]).await;
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    assert_eq!(
        chat(&proxy, r#"{"a":1}"#, &[])
            .await
            .header("x-sidelight-cache"),
        "HIT"
    );
    support::eventually("the entry expires", Duration::from_secs(5), || async {
        chat(&proxy, r#"{"a":1}"#, &[("x-sidelight-dedup", "off")])
            .await
            .header("x-sidelight-cache")
            == "MISS"
    })
    .await;

    // A client TTL of 0 s means "do not keep it at all".
    chat(&proxy, r#"{"b":1}"#, &[("x-sidelight-cache-ttl", "0")]).await;
    assert_eq!(
        chat(&proxy, r#"{"b":1}"#, &[])
            .await
            .header("x-sidelight-cache"),
        "MISS"
    );
}

#[tokio::test]
async fn errors_and_private_responses_are_not_stored() {
    let up = server::http1()
        .status("/v1/fail", 500, "boom")
        .route_fn("/v1/private", |_| {
            http::Response::builder()
                .header("cache-control", "private")
                .body(full("mine"))
                .unwrap()
        })
        .run()
        .await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "10m", "methods": ["GET"] }),
    ))
    .await;
    for path in ["/v1/fail", "/v1/private"] {
        support::get(&proxy.url(path)).await;
        let again = support::get(&proxy.url(path)).await;
        assert_eq!(again.header("x-sidelight-cache"), "MISS", "{path}");
    }
    assert_eq!(up.request_count(), 4);
    assert_eq!(
        proxy
            .metric("sidelight_cache_stores_total", &[("route", "llm")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn writes_and_unsafe_methods_bypass_the_cache() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), json!({ "ttl": "10m" }))).await;
    // Default methods are GET and HEAD: a POST passes through, every time.
    for _ in 0..2 {
        let a = chat(&proxy, r#"{"x":1}"#, &[]).await;
        assert_eq!(a.header("x-sidelight-cache"), "BYPASS");
        assert_eq!(a.header("cache-status"), "sidelight; fwd=bypass");
    }
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn invalid_json_is_forwarded_not_cached() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    for _ in 0..2 {
        let a = chat(&proxy, "{not json", &[]).await;
        assert_eq!(a.status, 200, "the upstream decides what to say about it");
        assert_eq!(a.header("x-sidelight-cache"), "BYPASS");
    }
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn size_bound_evicts() {
    let up = server::http1()
        .route_fn("/", |req| {
            http::Response::new(full(
                vec![b'x'; 40_000]
                    .into_iter()
                    .chain(req.uri.path().bytes())
                    .collect::<Vec<u8>>(),
            ))
        })
        .run()
        .await;
    let proxy = proxy::start(
        &config(&up.url(), json!({ "ttl": "10m" })).set("cache", json!({ "max_bytes": "200KiB" })),
    )
    .await;
    for i in 0..20 {
        support::get(&proxy.url(&format!("/item/{i}"))).await;
    }
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 20.0)
        .await;
    let status = support::get(&proxy.admin_url("/status")).await.json();
    let bytes = status["cache"]["bytes"].as_u64().unwrap();
    assert!(bytes <= 200 * 1024, "cache holds {bytes} bytes");
    assert!(status["cache"]["entries"].as_u64().unwrap() < 20);
    assert!(
        proxy
            .metric("sidelight_cache_evictions_total", &[("cause", "size")])
            .await
            > 0.0
    );
    assert!(proxy.metric("sidelight_cache_bytes", &[]).await <= 200.0 * 1024.0);
}

#[tokio::test]
async fn purge_by_route_and_all() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(&up.url(), json!({ "ttl": "10m" }))).await;
    support::get(&proxy.url("/a")).await;
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    assert_eq!(
        support::get(&proxy.url("/a"))
            .await
            .header("x-sidelight-cache"),
        "HIT"
    );
    let purged = support::send(
        Request::post(proxy.admin_url("/cache/purge?route=llm"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(purged.status, 200);
    assert_eq!(purged.json()["purged"], 1);
    assert_eq!(
        support::get(&proxy.url("/a"))
            .await
            .header("x-sidelight-cache"),
        "MISS"
    );
    let purged = support::send(
        Request::post(proxy.admin_url("/cache/purge"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(purged.status, 200);
}

/// An SSE upstream: events sent `gap` apart, ending with `[DONE]`, counting its calls.
async fn sse_upstream(gap: Duration, events: usize) -> server::Server {
    server::http1()
        .route_stream("/", move |_, tx| async move {
            for i in 0..events {
                if tx
                    .send(Ok(Bytes::from(format!("data: {{\"n\":{i}}}\n\n"))))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            let _ = tx.send(Ok(Bytes::from("data: [DONE]\n\n"))).await;
        })
        .run()
        .await
}

async fn read_events(url: &str, body: &str) -> (String, String, Vec<Bytes>) {
    let response = support::client()
        .request(
            Request::post(url)
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    let label = response
        .headers()
        .get("x-sidelight-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let ct = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = response.into_body();
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("stream ok").into_data() {
            chunks.push(d);
        }
    }
    (label, ct, chunks)
}

#[tokio::test]
async fn sse_streams_are_stored_whole_and_replayed_event_by_event() {
    let up = sse_upstream(Duration::from_millis(5), 5).await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let body = r#"{"stream":true,"q":"x"}"#;
    let (label, ct, first) = read_events(&proxy.url(CHAT), body).await;
    assert_eq!((label.as_str(), ct.as_str()), ("MISS", "text/event-stream"));
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    let (label, ct, replay) = read_events(&proxy.url(CHAT), body).await;
    assert_eq!((label.as_str(), ct.as_str()), ("HIT", "text/event-stream"));
    assert_eq!(replay, first, "same events, same chunking");
    assert!(first.concat().ends_with(b"data: [DONE]\n\n"));
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn broken_streams_are_never_stored() {
    let up = server::http1()
        .route_stream("/", |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from("data: partial\n\n"))).await;
            let _ = tx.send(Err(())).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    for _ in 0..2 {
        let response = support::client()
            .request(Request::post(proxy.url(CHAT)).body(full("{}")).unwrap())
            .await;
        if let Ok(response) = response {
            assert!(
                response.into_body().collect().await.is_err(),
                "the client sees the break"
            );
        }
    }
    assert_eq!(up.request_count(), 2, "nothing was stored");
}

#[tokio::test]
async fn a_hundred_identical_requests_make_one_upstream_call() {
    let up = server::http1()
        .route_with_latency("/", "slow answer", Duration::from_millis(300))
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let url = proxy.url(CHAT);
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(full(r#"{"q":"same"}"#))
                .unwrap();
            support::send(req).await
        }));
    }
    let mut labels = std::collections::HashMap::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "slow answer"));
        *labels
            .entry(a.header("x-sidelight-cache").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(up.request_count(), 1, "{labels:?}");
    assert_eq!(labels.get("MISS"), Some(&1), "{labels:?}");
    proxy
        .assert_metric_eventually(
            "sidelight_coalesced_requests_total",
            &[("route", "llm")],
            99.0 - *labels.get("HIT").unwrap_or(&0) as f64,
        )
        .await;
}

#[tokio::test]
async fn a_hundred_identical_streams_make_one_upstream_call_and_all_get_every_event() {
    let up = sse_upstream(Duration::from_millis(20), 10).await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "10m", "methods": ["POST"] }),
    ))
    .await;
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let url = proxy.url(CHAT);
        tasks.push(tokio::spawn(async move {
            read_events(&url, r#"{"stream":true}"#).await
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let (_, ct, chunks) = t.await.unwrap();
        assert_eq!(ct, "text/event-stream");
        bodies.push(chunks.concat());
    }
    assert_eq!(up.request_count(), 1);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every client got the same stream"
    );
    assert!(bodies[0].ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        bodies[0]
            .split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"data:"))
            .count(),
        11
    );
}

#[tokio::test]
async fn dedup_without_cache_and_opting_out() {
    let up = server::http1()
        .route_with_latency("/", "shared", Duration::from_millis(300))
        .run()
        .await;
    let yaml = Config::one(&up.url())
        .route_set("dedup", json!(true))
        .yaml();
    let proxy = proxy::start(&yaml).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let url = proxy.url("/x");
        tasks.push(tokio::spawn(async move {
            let mut req = Request::get(url);
            if i == 0 {
                // Wants its own sample.
                req = req.header("x-sidelight-dedup", "off");
            }
            support::send(req.body(full("")).unwrap()).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().body, "shared");
    }
    assert_eq!(up.request_count(), 2, "one shared call, one independent");
    // Nothing is stored without a cache.
    assert_eq!(
        support::get(&proxy.url("/x"))
            .await
            .header("x-sidelight-cache"),
        "MISS"
    );
}

#[tokio::test]
async fn upstream_failure_reaches_every_waiter_once() {
    let up = server::http1().route_hang("/").run().await;
    let yaml = Config::one(&up.url())
        .upstream_set("timeouts", json!({ "first_byte": "300ms" }))
        .route_set("dedup", json!(true))
        .yaml();
    let proxy = proxy::start(&yaml).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = proxy.url("/x");
        tasks.push(tokio::spawn(async move { support::get(&url).await }));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 504);
        assert_eq!(a.header("x-sidelight-error"), "upstream_first_byte_timeout");
    }
    assert_eq!(up.request_count(), 1, "no hidden retry storm");
}

#[tokio::test]
async fn followers_and_leaders_may_leave_without_disturbing_the_rest() {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let up = server::http1()
        .route_stream("/", move |_, tx| {
            let mut go = go_rx.clone();
            async move {
                let _ = tx.send(Ok(Bytes::from("data: one\n\n"))).await;
                let _ = go.wait_for(|g| *g).await;
                let _ = tx.send(Ok(Bytes::from("data: two\n\n"))).await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "10m", "methods": ["POST"] }),
    ))
    .await;
    let open = |proxy: &proxy::Proxy| {
        let url = proxy.url(CHAT);
        async move {
            let r = support::client()
                .request(Request::post(url).body(full("{}")).unwrap())
                .await
                .unwrap();
            let label = r.headers()["x-sidelight-cache"]
                .to_str()
                .unwrap()
                .to_string();
            let mut body = r.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, Bytes::from("data: one\n\n"));
            (label, body)
        }
    };
    let (leader_label, leader) = open(&proxy).await;
    let (f1_label, follower1) = open(&proxy).await;
    let (_, follower2) = open(&proxy).await;
    assert_eq!(
        (leader_label.as_str(), f1_label.as_str()),
        ("MISS", "COALESCED")
    );
    // The leader's client and one follower go away mid-stream.
    drop(leader);
    drop(follower1);
    go_tx.send(true).unwrap();
    let rest = follower2.collect().await.unwrap().to_bytes();
    assert_eq!(
        rest,
        Bytes::from("data: two\n\n"),
        "the remaining follower gets the rest"
    );
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn database_presets_cache_reads_only() {
    let up = counting_upstream().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "10m", "presets": ["clickhouse"] }),
    ))
    .await;
    let query = |sql: &'static str| {
        let url = proxy.url("/");
        async move { support::send(Request::post(url).body(full(sql)).unwrap()).await }
    };
    assert_eq!(
        query("SELECT count() FROM events")
            .await
            .header("x-sidelight-cache"),
        "MISS"
    );
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;
    assert_eq!(
        query("SELECT count() FROM events")
            .await
            .header("x-sidelight-cache"),
        "HIT"
    );
    for write in [
        "INSERT INTO events VALUES (1)",
        "SELECT 1; DROP TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
    ] {
        assert_eq!(
            query(write).await.header("x-sidelight-cache"),
            "BYPASS",
            "{write}"
        );
        assert_eq!(
            query(write).await.header("x-sidelight-cache"),
            "BYPASS",
            "{write}"
        );
    }
    assert_eq!(
        up.request_count(),
        7,
        "one read, six writes, each write sent every time"
    );
}

#[tokio::test]
async fn invalid_cache_rules_are_reported_by_field_path() {
    let errors = |cache: serde_json::Value| {
        let yaml = Config::one("http://127.0.0.1:9")
            .route_set("cache", cache)
            .yaml();
        match sidelight::config::Config::from_yaml(&yaml, &|_| None) {
            Err(sidelight::config::ConfigError::Invalid(errors)) => errors,
            other => panic!("expected errors, got {other:?}"),
        }
    };
    // Checks within a field stop the parse at that field (its value has a type)...
    let rule =
        errors(json!({ "ttl": "10s", "rules": [{ "methods": ["GET", "DELETE"], "path": "/x" }] }));
    assert_eq!(
        rule[0].path, "routes[0].cache.rules[0].methods[1]",
        "{rule:?}"
    );
    assert!(rule[0].message.contains("DELETE changes state"), "{rule:?}");
    let glob = errors(json!({ "ttl": "10s", "rules": [{ "methods": ["GET"], "path": "x/y" }] }));
    assert_eq!(glob[0].path, "routes[0].cache.rules[0].path", "{glob:?}");
    let method = errors(json!({ "ttl": "10s", "methods": ["BAD METHOD"] }));
    assert_eq!(method[0].path, "routes[0].cache.methods[0]", "{method:?}");
    // ...and the checks that validation runs afterwards are all reported together.
    let errors = errors(json!({ "ttl": "0s", "rules": [{ "methods": [], "path": "/x" }] }));
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"routes[0].cache.ttl"), "{errors:?}");
    assert!(
        paths.contains(&"routes[0].cache.rules[0].methods"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_once_in_the_background() {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = n.clone();
    let up = server::http1()
        .route_stream("/", move |_, tx| {
            let i = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                // The refresh takes a while, so that requests pile up during it.
                if i > 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = tx
                    .send(Ok(Bytes::from(format!(
                        "data: version {i}\n\ndata: [DONE]\n\n"
                    ))))
                    .await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "ttl": "300ms", "stale_while_revalidate": "1m" }),
    ))
    .await;
    assert!(support::get(&proxy.url("/doc"))
        .await
        .body
        .contains("version 1"));
    proxy
        .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
        .await;

    // Poll until the entry turns stale; the first stale answer starts the refresh.
    support::eventually("the entry turns stale", Duration::from_secs(5), || async {
        support::get(&proxy.url("/doc"))
            .await
            .header("cache-status")
            .contains("ttl=-")
    })
    .await;
    // While the refresh runs, everyone gets the stale answer at once: no herd upstream.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = proxy.url("/doc");
        tasks.push(tokio::spawn(async move { support::get(&url).await }));
    }
    for t in tasks {
        let a = t.await.unwrap();
        assert!(a.body.contains("version 1"), "{}", a.body);
        assert_eq!(a.header("x-sidelight-cache"), "HIT");
    }
    support::eventually(
        "the refreshed answer is served",
        Duration::from_secs(5),
        || async {
            support::get(&proxy.url("/doc"))
                .await
                .body
                .contains("version 2")
        },
    )
    .await;
    assert_eq!(
        n.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "exactly one background refresh"
    );
    assert!(
        proxy
            .metric(
                "sidelight_cache_lookups_total",
                &[("route", "llm"), ("result", "stale")]
            )
            .await
            >= 11.0
    );
}

#[tokio::test]
async fn a_late_follower_gets_the_stream_from_its_start_without_a_cache() {
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let up = server::http1()
        .route_stream("/", move |_, tx| {
            let mut go = go_rx.clone();
            async move {
                let _ = tx.send(Ok(Bytes::from("data: one\n\n"))).await;
                let _ = go.wait_for(|g| *g).await;
                let _ = tx.send(Ok(Bytes::from("data: two\n\n"))).await;
            }
        })
        .run()
        .await;
    let yaml = Config::one(&up.url())
        .route_set("dedup", json!(true))
        .yaml();
    let proxy = proxy::start(&yaml).await;
    let open = || {
        let url = proxy.url("/stream");
        async move {
            let r = support::client()
                .request(Request::get(url).body(full("")).unwrap())
                .await
                .unwrap();
            let label = r.headers()["x-sidelight-cache"]
                .to_str()
                .unwrap()
                .to_string();
            let mut body = r.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            (label, first, body)
        }
    };
    let (l1, first1, leader) = open().await;
    // The follower joins after the leader has read the first event.
    let (l2, first2, follower) = open().await;
    assert_eq!((l1.as_str(), l2.as_str()), ("MISS", "COALESCED"));
    assert_eq!(first1, Bytes::from("data: one\n\n"));
    assert_eq!(
        first2,
        Bytes::from("data: one\n\n"),
        "the follower starts from the first event"
    );
    go_tx.send(true).unwrap();
    assert_eq!(
        leader.collect().await.unwrap().to_bytes(),
        Bytes::from("data: two\n\n")
    );
    assert_eq!(
        follower.collect().await.unwrap().to_bytes(),
        Bytes::from("data: two\n\n")
    );
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn dedup_of_llm_posts_without_a_cache() {
    let up = server::http1()
        .route_with_latency("/", "one answer", Duration::from_millis(300))
        .run()
        .await;
    let yaml = Config::one(&up.url())
        .route_set("dedup", json!({ "methods": ["POST"] }))
        .yaml();
    let proxy = proxy::start(&yaml).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = proxy.url(CHAT);
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(full(r#"{"q":"same"}"#))
                .unwrap();
            support::send(req).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().body, "one answer");
    }
    assert_eq!(up.request_count(), 1);
    // Nothing is stored: the next identical POST goes upstream again.
    assert_eq!(
        chat(&proxy, r#"{"q":"same"}"#, &[])
            .await
            .header("x-sidelight-cache"),
        "MISS"
    );
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn streams_that_stop_before_their_terminal_event_are_not_stored() {
    // Ends cleanly at the HTTP level, but without `data: [DONE]`.
    let up = server::http1()
        .route_stream("/", |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from("data: {\"n\":0}\n\n"))).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), llm_cache())).await;
    for _ in 0..2 {
        let (label, _, chunks) = read_events(&proxy.url(CHAT), r#"{"stream":true}"#).await;
        assert_eq!(label, "MISS");
        assert_eq!(chunks.concat(), b"data: {\"n\":0}\n\n".to_vec());
    }
    assert_eq!(up.request_count(), 2);
}

#[test]
fn methods_are_read_as_methods_at_load() {
    let load = |route: Value| {
        let mut config = Config::one("http://127.0.0.1:9");
        for (k, v) in route.as_object().unwrap() {
            config = config.route_set(k, v.clone());
        }
        sidelight::config::Config::from_yaml(&config.yaml(), &|_| None)
    };
    // A write is never coalesced: identical writes must each reach the upstream.
    let err = load(json!({ "dedup": { "methods": ["GET", "put"] } }))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].dedup.methods[1]") && err.contains("PUT changes state"),
        "{err}"
    );
    // Case does not matter: `post` is POST.
    let config = load(json!({ "dedup": { "methods": ["post"] } })).unwrap();
    assert_eq!(
        config.routes[0].dedup_methods(),
        Some(vec![http::Method::POST])
    );
}
