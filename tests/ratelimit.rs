//! Rate limits: reject with 429 and its headers, queue to smooth a burst, shadow mode, keys.

mod support;

use http::Request;
use serde_json::{json, Value};
use sidelight::http::body::full;
use std::time::{Duration, Instant};
use support::{proxy, server, Answer, Config};

/// Upstream `up`, route `r` with `limits` as its `rate_limits`.
fn config(upstream: &str, limits: Value) -> Config {
    Config::one(upstream).route_set("rate_limits", limits)
}

/// Waits until `limit` on route `r` has made `n` decisions of kind `result`.
async fn assert_decisions(proxy: &proxy::Proxy, limit: &str, result: &str, n: f64) {
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_decisions_total",
            &[("route", "r"), ("limit", limit), ("result", result)],
            n,
        )
        .await;
}

async fn get_as(proxy: &proxy::Proxy, key: Option<&str>) -> Answer {
    let mut req = Request::get(proxy.url("/x"));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    support::send(req.body(full("")).unwrap()).await
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_and_ratelimit_headers() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!([{ "name": "per-route", "rate": "5/min", "burst": 5 }]),
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get_as(&proxy, None).await);
    }
    assert!(statuses[..5].iter().all(|a| a.status == 200));
    for a in &statuses[5..] {
        assert_eq!(a.status, 429);
        assert_eq!(a.header("x-sidelight-error"), "rate_limited");
        assert_eq!(a.json()["error"]["type"], "rate_limited");
        let retry: u64 = a.header("retry-after").parse().unwrap();
        assert!(
            (1..=12).contains(&retry),
            "one request every 12 s: retry-after {retry}"
        );
        assert_eq!(a.header("x-ratelimit-limit"), "5");
        assert_eq!(a.header("x-ratelimit-remaining"), "0");
        assert_eq!(a.header("x-ratelimit-reset"), a.header("retry-after"));
    }
    assert_eq!(
        up.request_count(),
        5,
        "rejected requests never reach the upstream"
    );
    assert_decisions(&proxy, "per-route", "allowed", 5.0).await;
    assert_decisions(&proxy, "per-route", "rejected", 3.0).await;
    proxy
        .assert_metric_eventually(
            "sidelight_requests_total",
            &[("route", "r"), ("status_class", "4xx")],
            3.0,
        )
        .await;
}

#[tokio::test]
async fn per_credential_limits_keep_tenants_apart() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!([{ "name": "per-key", "rate": "2/min", "burst": 2, "key": "credential" }]),
    ))
    .await;
    for _ in 0..2 {
        assert_eq!(get_as(&proxy, Some("alice")).await.status, 200);
    }
    assert_eq!(get_as(&proxy, Some("alice")).await.status, 429);
    assert_eq!(
        get_as(&proxy, Some("bob")).await.status,
        200,
        "bob has his own bucket"
    );
    assert_eq!(
        get_as(&proxy, None).await.status,
        200,
        "anonymous clients share one bucket"
    );
}

#[tokio::test]
async fn queue_mode_smooths_a_burst() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(&up.url(), json!([{ "name": "smooth", "rate": "10/s", "burst": 1, "mode": "queue", "max_wait": "5s" }])))
    .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = proxy.url("/x");
        tasks.push(tokio::spawn(async move { support::get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "queued, not rejected");
    }
    // One at once, then one every 100 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.request_count(), 6);
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_decisions_total",
            &[("route", "r"), ("limit", "smooth"), ("result", "queued")],
            5.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_queue_wait_seconds_count",
            &[("route", "r"), ("limit", "smooth")],
            5.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_queue_length",
            &[("route", "r"), ("limit", "smooth")],
            0.0,
        )
        .await;
}

#[tokio::test]
async fn a_limit_holds_its_rate_over_a_measured_window() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!([{ "name": "hundred", "rate": "100/s", "burst": 10 }]),
    ))
    .await;
    // Eight clients as fast as they can for two seconds: far above the limit.
    let window = Duration::from_secs(2);
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/x");
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited) = (0u32, 0u32);
            while Instant::now() < end {
                match support::get(&url).await.status.as_u16() {
                    200 => ok += 1,
                    429 => limited += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    // 100/s over the window plus the burst of ten, within 5%.
    let expected = 100.0 * window.as_secs_f64() + 10.0;
    assert!(
        (f64::from(ok) - expected).abs() <= expected * 0.05,
        "admitted {ok} in {window:?}, expected ~{expected} ({limited} rejected)"
    );
    assert!(limited > ok, "the clients really were over the limit");
    assert_eq!(up.request_count(), ok as usize);
}

#[tokio::test]
async fn a_full_queue_or_a_too_long_wait_rejects() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(&up.url(), json!([{ "name": "q", "rate": "1/min", "burst": 1, "mode": "queue", "max_wait": "1s", "max_queue": 5 }])))
    .await;
    assert_eq!(get_as(&proxy, None).await.status, 200);
    // The next slot is a minute away: more than max_wait, so no point queueing.
    let started = Instant::now();
    assert_eq!(get_as(&proxy, None).await.status, 429);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "rejected at once, not after waiting"
    );

    let proxy = proxy::start(&config(&up.url(), json!([{ "name": "q", "rate": "2/s", "burst": 1, "mode": "queue", "max_wait": "10s", "max_queue": 1 }])))
    .await;
    assert_eq!(get_as(&proxy, None).await.status, 200);
    let url = proxy.url("/x");
    let queued = tokio::spawn(async move { support::get(&url).await.status });
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_queue_length",
            &[("route", "r"), ("limit", "q")],
            1.0,
        )
        .await;
    assert_eq!(
        get_as(&proxy, None).await.status,
        429,
        "the queue holds one"
    );
    assert_eq!(queued.await.unwrap(), 200);
}

#[tokio::test]
async fn a_client_that_leaves_leaves_the_queue() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!([{ "name": "q", "rate": "1/min", "burst": 1, "mode": "queue", "max_wait": "2m" }]),
    ))
    .await;
    assert_eq!(get_as(&proxy, None).await.status, 200);
    let url = proxy.url("/x");
    let waiting = tokio::spawn(async move { support::get(&url).await });
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_queue_length",
            &[("route", "r"), ("limit", "q")],
            1.0,
        )
        .await;
    waiting.abort();
    proxy
        .assert_metric_eventually(
            "sidelight_ratelimit_queue_length",
            &[("route", "r"), ("limit", "q")],
            0.0,
        )
        .await;
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn shadow_limits_only_count() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!([{ "name": "trial", "rate": "1/min", "burst": 1, "shadow": true }]),
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get_as(&proxy, None).await.status, 200);
    }
    assert_eq!(up.request_count(), 5);
    assert_decisions(&proxy, "trial", "shadow_rejected", 4.0).await;
}

#[tokio::test]
async fn header_and_client_ip_keys() {
    let up = server::http1().route("/", "ok").run().await;
    let proxy = proxy::start(&config(&up.url(), json!([{ "name": "by-tenant", "rate": "1/min", "burst": 1, "key": "header:x-tenant" }, { "name": "by-ip", "rate": "3/min", "burst": 3, "key": "client_ip" }])))
    .await;
    let tenant = |t: &'static str| {
        let url = proxy.url("/x");
        async move {
            support::send(
                Request::get(url)
                    .header("x-tenant", t)
                    .body(full(""))
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(tenant("a").await.status, 200);
    assert_eq!(tenant("a").await.status, 429);
    assert_eq!(tenant("b").await.status, 200);
    // Every request so far came from 127.0.0.1: the third allowed one used up the IP's burst.
    assert_eq!(tenant("c").await.status, 200);
    let a = tenant("d").await;
    assert_eq!(a.status, 429);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("by-ip"));
}

#[test]
fn invalid_limits_are_reported_by_field_path() {
    let errors = |limits: serde_json::Value| {
        let yaml = Config::one("http://127.0.0.1:9").route_set("rate_limits", limits);
        match sidelight::config::Config::from_yaml(&yaml.yaml(), &|_| None) {
            Err(sidelight::config::ConfigError::Invalid(errors)) => {
                errors.iter().map(ToString::to_string).collect::<Vec<_>>()
            }
            other => panic!("expected errors, got {other:?}"),
        }
    };
    let rate = errors(json!([{ "name": "a", "rate": "lots/s" }]));
    assert!(
        rate[0].starts_with("routes[0].rate_limits[0].rate: invalid rate \"lots/s\""),
        "{rate:?}"
    );
    let key = errors(json!([{ "name": "a", "rate": "1/s", "key": "cookie" }]));
    assert!(
        key[0].starts_with("routes[0].rate_limits[0].key: unknown key \"cookie\""),
        "{key:?}"
    );
    let burst = errors(json!([{ "name": "a", "rate": "1/s", "burst": 0 }]));
    assert!(
        burst[0].starts_with("routes[0].rate_limits[0].burst:"),
        "{burst:?}"
    );
    let duplicate = errors(json!([{ "name": "a", "rate": "1/s" }, { "name": "a", "rate": "2/s" }]));
    assert!(
        duplicate[0].starts_with("routes[0].rate_limits[1].name: duplicate"),
        "{duplicate:?}"
    );
}

#[tokio::test]
async fn upstream_concurrency_limit_queues_then_rejects() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let up = server::http1()
        .route_stream("/", move |_, tx| {
            let mut release = release_rx.clone();
            async move {
                let _ = release.wait_for(|r| *r).await;
                let _ = tx.send(Ok(bytes::Bytes::from("done"))).await;
            }
        })
        .run()
        .await;
    let yaml = Config::one(&up.url()).upstream_set(
        "concurrency",
        json!({ "max_in_flight": 1, "max_queue": 1, "max_wait": "10s" }),
    );
    let proxy = proxy::start(&yaml).await;
    let spawn = || {
        let url = proxy.url("/x");
        tokio::spawn(async move { support::get(&url).await })
    };
    let first = spawn();
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_requests_in_flight",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    let second = spawn();
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_queue_length",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    // In flight: one; queued: one; the third is refused at once.
    let third = support::get(&proxy.url("/x")).await;
    assert_eq!(third.status, 503);
    assert_eq!(third.header("x-sidelight-error"), "upstream_busy");
    assert_eq!(third.header("retry-after"), "1");
    assert_eq!(
        up.request_count(),
        1,
        "the queued request has not reached the upstream"
    );
    release_tx.send(true).unwrap();
    assert_eq!(first.await.unwrap().body, "done");
    assert_eq!(second.await.unwrap().body, "done");
    assert_eq!(up.request_count(), 2);
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_requests_in_flight",
            &[("upstream", "up")],
            0.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_concurrency_decisions_total",
            &[("upstream", "up"), ("result", "rejected")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_queue_wait_seconds_count",
            &[("upstream", "up")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn upstream_concurrency_wait_is_bounded() {
    let up = server::http1().route_hang("/").run().await;
    let yaml = Config::one(&up.url()).upstream_set(
        "concurrency",
        json!({ "max_in_flight": 1, "max_wait": "300ms" }),
    );
    let proxy = proxy::start(&yaml).await;
    let url = proxy.url("/x");
    let _hung = tokio::spawn(async move { support::get(&url).await });
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_requests_in_flight",
            &[("upstream", "up")],
            1.0,
        )
        .await;
    let started = Instant::now();
    let answer = support::get(&proxy.url("/x")).await;
    assert_eq!(answer.status, 503);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited its max_wait first"
    );
}

/// An OpenAI-style upstream whose every answer reports `prompt` + `completion` tokens used.
async fn usage_upstream(prompt: u64, completion: u64) -> server::Server {
    server::http1()
        .route_fn("/v1/chat/completions", move |_| {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(full(format!(
                    r#"{{"id":"c","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
                    prompt + completion
                )))
                .unwrap()
        })
        .run()
        .await
}

fn token_config(upstream: &str) -> Config {
    Config::one(upstream)
        .route_set("kind", json!("openai"))
        .route_set(
            "rate_limits",
            json!([{ "name": "tpm", "rate": "2000/min", "unit": "tokens" }]),
        )
}

async fn chat(proxy: &proxy::Proxy, max_tokens: u64) -> Answer {
    support::post(
        &proxy.url("/v1/chat/completions"),
        &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hello"}}],"max_tokens":{max_tokens}}}"#),
    )
    .await
}

#[tokio::test]
async fn token_limits_charge_the_usage_the_upstream_reports() {
    // Each request is estimated at ~100 tokens but really uses 1000.
    let up = usage_upstream(10, 990).await;
    let proxy = proxy::start(&token_config(&up.url())).await;
    assert_eq!(chat(&proxy, 100).await.status, 200);
    assert_eq!(chat(&proxy, 100).await.status, 200);
    // 2000 of 2000 tokens used: had the estimate stood, 18 more would pass.
    let third = chat(&proxy, 100).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.json()["error"]["type"], "rate_limited");
    assert_eq!(third.header("x-ratelimit-limit"), "2000");
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn token_limits_give_back_what_an_estimate_overcharged() {
    // Each request reserves 1500 output tokens but uses 50 in all.
    let up = usage_upstream(20, 30).await;
    let proxy = proxy::start(&token_config(&up.url())).await;
    for i in 0..10 {
        let a = chat(&proxy, 1500).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
    }
    assert_eq!(up.request_count(), 10);
}

#[test]
fn token_limits_need_an_llm_route() {
    let yaml = Config::one("http://127.0.0.1:1").route_set(
        "rate_limits",
        json!([{ "name": "tpm", "rate": "1000/min", "unit": "tokens" }]),
    );
    let err = sidelight::config::Config::from_yaml(&yaml.yaml(), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("routes[0].rate_limits[0].unit"), "{err}");
}

#[tokio::test]
async fn token_limits_are_corrected_from_streamed_usage_too() {
    // A stream whose final chunk reports 1000 tokens (sidelight asks for it: include_usage).
    let up = server::http1()
        .route_stream("/v1/chat/completions", |req, tx| async move {
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
            assert_eq!(body["stream_options"]["include_usage"], true);
            for chunk in [
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":990,\"total_tokens\":1000}}\n\n",
                "data: [DONE]\n\n",
            ] {
                let _ = tx.send(Ok(bytes::Bytes::from(chunk))).await;
            }
        })
        .run()
        .await;
    let proxy = proxy::start(&token_config(&up.url())).await;
    let stream = |i: u32| {
        let url = proxy.url("/v1/chat/completions");
        async move {
            support::post(
                &url,
                &format!(r#"{{"model":"m","stream":true,"max_tokens":100,"messages":[{{"role":"user","content":"hi {i}"}}]}}"#),
            )
            .await
        }
    };
    for i in 0..2 {
        let a = stream(i).await;
        assert_eq!(a.status, 200);
        assert!(
            !a.body.contains("usage\":{"),
            "the client did not ask for usage: {}",
            a.body
        );
    }
    // Two streams estimated at ~100 tokens each really used 2000 of the 2000 a minute.
    let third = stream(2).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn a_limit_holds_for_the_whole_process_not_per_worker() {
    let up = server::http1().route("/", "ok").run().await;
    let yaml = config(
        &up.url(),
        json!([{ "name": "shared", "rate": "10/min", "burst": 10 }]),
    )
    .set("runtime", json!({ "workers": 2 }));
    let proxy = proxy::start(&yaml).await;
    // Each new connection lands on one worker's socket by its hash (SO_REUSEPORT): forty of
    // them all on the same worker would be a 1-in-2^39 chance.
    let mut allowed = 0;
    for _ in 0..40 {
        if support::get_on_new_connection(&proxy.url("/x"))
            .await
            .status
            == 200
        {
            allowed += 1;
        }
    }
    // 10 a minute refills one every 6 s: the burst is all there is.
    assert_eq!(allowed, 10, "one bucket across both workers");
    assert_decisions(&proxy, "shared", "rejected", 30.0).await;
}
