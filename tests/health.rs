//! Upstream health and failover against fault-injecting upstreams: retries on another endpoint,
//! the retry budget, never retrying after bytes were sent, active health checks, ejection and
//! return, and `/readyz` / `/status` following endpoint health.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sidelight::http::body::full;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{proxy, server, Config, Route, Upstream};

/// An upstream whose status can be changed while it runs (200 answers `ok`).
async fn switchable(path: &str, status: Arc<AtomicU16>) -> server::Server {
    server::http1()
        .route_fn(path, move |_| {
            let s = status.load(Ordering::SeqCst);
            http::Response::builder()
                .status(s)
                .body(full(if s == 200 { "ok" } else { "failing" }))
                .unwrap()
        })
        .run()
        .await
}

/// One upstream `up` with one endpoint, one route `r` to it; `upstream_fields` and
/// `route_fields` are JSON objects of extra fields (`{ "health_check": { ... } }`), or `{}`.
fn one_endpoint(url: &str, upstream_fields: Value, route_fields: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("up", &[url]).with(upstream_fields))
        .route(Route::new("r", "up").with(route_fields))
}

fn two_endpoints(a: &str, b: &str, upstream_fields: Value, route_fields: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("up", &[a, b]).with(upstream_fields))
        .route(Route::new("r", "up").with(route_fields))
}

async fn retries(proxy: &proxy::Proxy, reason: &str) -> f64 {
    support::metric(
        &proxy.metrics().await,
        "sidelight_retries_total",
        &[("upstream", "up"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn connect_failures_fail_over_to_the_healthy_endpoint() {
    let dead = server::closed_port().await;
    let alive = server::http1().route("/", "ok").run().await;
    let yaml = two_endpoints(
        &format!("http://{dead}"),
        &alive.url(),
        json!({ "outlier_detection": { "consecutive_failures": 0 } }),
        json!({ "retries": { "max_retries": 1, "backoff": "1ms" } }),
    );
    let proxy = proxy::start(&yaml).await;
    // POST on a plain route is not retryable, but a connect failure never sent it: safe.
    for i in 0..20 {
        let a = support::post(&proxy.url("/"), &format!("{{\"n\":{i}}}")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body, "ok");
    }
    assert_eq!(alive.request_count(), 20);
    let bodies: Vec<Bytes> = alive.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(
        bodies[0],
        Bytes::from("{\"n\":0}"),
        "the retried body is intact"
    );
    assert!(retries(&proxy, "connect_failure").await >= 1.0);
}

#[tokio::test]
async fn retryable_statuses_go_to_another_endpoint_only_for_retryable_methods() {
    let failing = server::http1().status("/", 503, "unavailable").run().await;
    let healthy = server::http1().route("/", "ok").run().await;
    let yaml = two_endpoints(
        &failing.url(),
        &healthy.url(),
        json!({ "outlier_detection": { "consecutive_failures": 0 } }),
        json!({ "retries": { "max_retries": 2, "backoff": "1ms" } }),
    );
    let proxy = proxy::start(&yaml).await;
    for _ in 0..20 {
        let a = support::get(&proxy.url("/")).await;
        assert_eq!(a.status, 200, "GET is retried on the other endpoint");
    }
    // Each GET that met the failing endpoint was retried once, on the healthy one.
    assert_eq!(healthy.request_count(), 20);
    assert_eq!(retries(&proxy, "503").await, failing.request_count() as f64);

    // PUT is not retryable: the upstream's 503 reaches the client untouched.
    let before = (failing.request_count(), healthy.request_count());
    let mut saw_503 = false;
    for _ in 0..20 {
        let a = support::send(Request::put(proxy.url("/")).body(full("x")).unwrap()).await;
        if a.status == 503 {
            assert_eq!(a.body, "unavailable", "the upstream's own answer");
            assert_eq!(a.header("x-sidelight-error"), "");
            saw_503 = true;
        }
    }
    assert!(saw_503);
    let calls = failing.request_count() + healthy.request_count() - before.0 - before.1;
    assert_eq!(calls, 20, "one upstream call per PUT");
}

#[tokio::test]
async fn llm_posts_are_retryable_and_resets_before_headers_are_retried() {
    let resetting = server::http1().route_reset("/").run().await;
    let healthy = server::http1().route("/", "{\"ok\":true}").run().await;
    let yaml = two_endpoints(
        &resetting.url(),
        &healthy.url(),
        json!({ "outlier_detection": { "consecutive_failures": 0 } }),
        json!({ "kind": "openai", "retries": { "backoff": "1ms" } }),
    );
    let proxy = proxy::start(&yaml).await;
    for _ in 0..10 {
        let a = support::post(&proxy.url("/v1/chat/completions"), "{\"model\":\"m\"}").await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(healthy.request_count(), 10);
    assert_eq!(
        retries(&proxy, "reset").await,
        resetting.request_count() as f64
    );
}

#[tokio::test]
async fn no_retry_after_response_bytes_were_sent() {
    let (breaking, break_tx) = server::stream_that_breaks("data: first\n\n").await;
    let yaml = one_endpoint(
        &breaking.url(),
        json!({}),
        json!({ "retries": { "max_retries": 3, "backoff": "1ms" } }),
    );
    let proxy = proxy::start(&yaml).await;
    let response = support::client()
        .request(Request::get(proxy.url("/")).body(full("")).unwrap())
        .await
        .expect("headers arrive");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from("data: first\n\n"));
    break_tx.send(true).unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("stream ends");
    assert!(rest.is_err(), "the client sees the stream break");
    assert_eq!(breaking.request_count(), 1, "never sent again");
    assert_eq!(retries(&proxy, "reset").await, 0.0);
}

#[tokio::test]
async fn the_retry_budget_caps_retries() {
    let failing = server::http1().status("/", 503, "unavailable").run().await;
    // No share of requests, one retry per second as a floor: 10 retries per 10 s window.
    let yaml = Config::one(&failing.url())
        .upstream_set("outlier_detection", json!({ "consecutive_failures": 0 }))
        .upstream_set("retry_budget", json!({ "percent": 0, "min_per_second": 1 }))
        .route_set(
            "retries",
            json!({ "max_retries": 1, "backoff": "1ms", "statuses": [503] }),
        );
    let proxy = proxy::start(&yaml).await;
    for _ in 0..30 {
        assert_eq!(support::get(&proxy.url("/")).await.status, 503);
    }
    assert_eq!(failing.request_count(), 40, "30 requests and 10 retries");
    assert_eq!(retries(&proxy, "503").await, 10.0);
    proxy
        .assert_metric_eventually(
            "sidelight_retry_budget_exhausted_total",
            &[("upstream", "up")],
            20.0,
        )
        .await;
}

#[tokio::test]
async fn retry_after_is_honoured_when_no_other_endpoint_can_take_the_retry() {
    let calls = Arc::new(AtomicU16::new(0));
    let seen = calls.clone();
    let limited = server::http1()
        .route_fn("/", move |_| {
            // Every other call is a 429 asking for 300 ms.
            if seen.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                http::Response::builder()
                    .status(429)
                    .header("retry-after-ms", "300")
                    .body(full("slow down"))
                    .unwrap()
            } else {
                http::Response::new(full("ok"))
            }
        })
        .route_fn("/long", |_| {
            http::Response::builder()
                .status(429)
                .header("retry-after", "60")
                .body(full("come back in a minute"))
                .unwrap()
        })
        .run()
        .await;
    let yaml = one_endpoint(
        &limited.url(),
        json!({}),
        json!({ "retries": { "backoff": "1ms", "max_retry_after": "2s" } }),
    );
    let proxy = proxy::start(&yaml).await;
    let started = Instant::now();
    let a = support::get(&proxy.url("/")).await;
    assert_eq!(a.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the upstream's Retry-After, not {:?}",
        started.elapsed()
    );
    // Longer than max_retry_after: the client gets the 429 at once, to decide for itself.
    let started = Instant::now();
    let a = support::get(&proxy.url("/long")).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.header("retry-after"), "60");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Two endpoints probed on `/health`; `hc` adds to (or overrides) the check's fields.
fn health_config(a: &str, b: &str, hc: Value) -> Config {
    let mut check = json!({ "path": "/health", "interval": "50ms", "timeout": "500ms" });
    check
        .as_object_mut()
        .unwrap()
        .extend(hc.as_object().unwrap().clone());
    two_endpoints(a, b, json!({ "health_check": check }), json!({}))
}

#[tokio::test]
async fn failing_health_checks_take_an_endpoint_out_until_it_recovers() {
    let status = Arc::new(AtomicU16::new(200));
    let sick = switchable("/", status.clone()).await;
    let other = server::http1().route("/", "ok").run().await;
    let yaml = health_config(
        &sick.url(),
        &other.url(),
        json!({ "unhealthy_threshold": 2, "healthy_threshold": 2 }),
    );
    let proxy = proxy::start(&yaml).await;
    let sick_label = sick.addr.to_string();
    let healthy = |v: f64| {
        let proxy = &proxy;
        let sick_label = sick_label.clone();
        async move {
            proxy
                .assert_metric_eventually(
                    "sidelight_endpoint_healthy",
                    &[("upstream", "up"), ("endpoint", &sick_label)],
                    v,
                )
                .await
        }
    };
    healthy(1.0).await;
    status.store(500, Ordering::SeqCst);
    healthy(0.0).await;
    let status_json = support::get(&proxy.admin_url("/status")).await.json();
    let endpoints = &status_json["upstreams"]["up"]["endpoints"];
    assert_eq!(endpoints[0]["endpoint"], sick_label.as_str());
    assert_eq!(endpoints[0]["active_check"], "failing");
    assert_eq!(endpoints[0]["healthy"], false);
    assert_eq!(endpoints[1]["healthy"], true);
    // The other endpoint still serves: the route is ready.
    assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, 200);
    let probes_before = sick.request_count();
    let served_before = other.request_count();
    for _ in 0..20 {
        assert_eq!(support::get(&proxy.url("/app")).await.status, 200);
    }
    // Only probes reached the sick endpoint; every request went to the other one.
    let app_calls = sick
        .requests()
        .iter()
        .skip(probes_before)
        .filter(|r| r.uri.path() == "/app")
        .count();
    assert_eq!(app_calls, 0);
    let served = other
        .requests()
        .iter()
        .skip(served_before)
        .filter(|r| r.uri.path() == "/app")
        .count();
    assert_eq!(served, 20);
    status.store(200, Ordering::SeqCst);
    healthy(1.0).await;
    // Probes kept failing while it was sick: at least the two that took it out.
    let failures = proxy
        .metric(
            "sidelight_health_checks_total",
            &[("upstream", "up"), ("result", "failure")],
        )
        .await;
    assert!(failures >= 2.0, "{failures} failed probes");
}

#[tokio::test]
async fn readyz_follows_the_health_of_every_route() {
    let status = Arc::new(AtomicU16::new(200));
    let only = switchable("/", status.clone()).await;
    let yaml = one_endpoint(
        &only.url(),
        json!({ "health_check": { "interval": "50ms", "unhealthy_threshold": 1, "healthy_threshold": 1 } }),
        json!({}),
    );
    let proxy = proxy::start(&yaml).await;
    let readyz = |want: u16| {
        let url = proxy.admin_url("/readyz");
        async move {
            support::eventually(
                &format!("/readyz answers {want}"),
                Duration::from_secs(5),
                || {
                    let url = url.clone();
                    async move { support::get(&url).await.status == want }
                },
            )
            .await
        }
    };
    readyz(200).await;
    status.store(503, Ordering::SeqCst);
    readyz(503).await;
    proxy
        .assert_metric_eventually("sidelight_route_healthy", &[("route", "r")], 0.0)
        .await;
    let a = support::get(&proxy.admin_url("/readyz")).await;
    assert!(a.body.contains("route(s) r"), "{}", a.body);
    let s = support::get(&proxy.admin_url("/status")).await.json();
    assert_eq!(s["ready"], false);
    assert_eq!(s["unhealthy_routes"][0], "r");
    // With every endpoint down, requests are still tried rather than refused.
    assert_eq!(support::get(&proxy.url("/")).await.status, 503);
    status.store(200, Ordering::SeqCst);
    readyz(200).await;
    proxy
        .assert_metric_eventually("sidelight_route_healthy", &[("route", "r")], 1.0)
        .await;
    // The default probe path of a plain upstream is `/`.
    assert!(only.requests().iter().any(|r| r.uri.path() == "/"
        && r.headers.get("user-agent").is_some_and(|v| v
            .to_str()
            .unwrap_or("")
            .starts_with("sidelight-health-check"))));
}

#[tokio::test]
async fn llm_upstreams_are_probed_with_a_model_listing_never_a_completion() {
    let up = server::http1()
        .route("/v1/models", "{\"data\":[]}")
        .run()
        .await;
    let yaml = one_endpoint(
        &up.url(),
        json!({ "headers": { "authorization": "Bearer sk-test" }, "health_check": { "interval": "50ms" } }),
        json!({ "kind": "openai" }),
    );
    let proxy = proxy::start(&yaml).await;
    proxy
        .assert_metric_eventually(
            "sidelight_health_checks_total",
            &[("upstream", "up"), ("result", "success")],
            2.0,
        )
        .await;
    for r in up.requests() {
        assert_eq!(r.method, http::Method::GET);
        assert_eq!(r.uri.path(), "/v1/models");
        assert_eq!(
            r.headers["authorization"], "Bearer sk-test",
            "the upstream's key is sent"
        );
    }
}

#[tokio::test]
async fn an_ejected_endpoint_returns_after_its_ejection_time() {
    let status = Arc::new(AtomicU16::new(500));
    let flaky = switchable("/", status.clone()).await;
    let healthy = server::http1().route("/", "ok").run().await;
    let yaml = two_endpoints(
        &flaky.url(),
        &healthy.url(),
        json!({ "outlier_detection": { "consecutive_failures": 3, "base_ejection_time": "300ms" } }),
        json!({}),
    );
    let proxy = proxy::start(&yaml).await;
    let label = flaky.addr.to_string();
    while flaky.request_count() < 3 {
        support::get(&proxy.url("/")).await;
    }
    proxy
        .assert_metric_eventually(
            "sidelight_endpoint_ejected",
            &[("upstream", "up"), ("endpoint", &label)],
            1.0,
        )
        .await;
    let s = support::get(&proxy.admin_url("/status")).await.json();
    assert_eq!(s["upstreams"]["up"]["endpoints"][0]["ejected"], true);
    assert_eq!(flaky.request_count(), 3);
    // Recovered: after the ejection time it takes traffic again.
    status.store(200, Ordering::SeqCst);
    support::eventually(
        "the ejected endpoint takes traffic again",
        Duration::from_secs(5),
        || {
            let url = proxy.url("/");
            let flaky = &flaky;
            async move {
                support::get(&url).await;
                flaky.request_count() > 3
            }
        },
    )
    .await;
    let s = support::get(&proxy.admin_url("/status")).await.json();
    assert_eq!(s["upstreams"]["up"]["endpoints"][0]["ejected"], false);
    assert_eq!(s["upstreams"]["up"]["endpoints"][0]["healthy"], true);
}

#[test]
fn invalid_health_and_retry_settings_are_reported_by_field_path() {
    let health_check = json!({
        "path": "health", "interval": "0s", "healthy_threshold": 0
    });
    let retries = json!({
        "statuses": [200], "backoff": "2s", "max_backoff": "1s"
    });
    let yaml = Config::one("http://127.0.0.1:1")
        .upstream_set("health_check", health_check)
        .upstream_set("retry_budget", json!({ "percent": -1 }))
        .route_set("retries", retries);
    let err = sidelight::config::Config::from_yaml(&yaml.yaml(), &|_| None)
        .unwrap_err()
        .to_string();
    for want in [
        "upstreams[0].health_check.path",
        "upstreams[0].health_check.interval",
        "upstreams[0].health_check.healthy_threshold",
        "upstreams[0].retry_budget.percent",
        "routes[0].retries.statuses[0]",
        "routes[0].retries.backoff",
    ] {
        assert!(err.contains(want), "missing {want} in:\n{err}");
    }
    // A value that cannot be read stops the parse at its field.
    let yaml =
        Config::one("http://127.0.0.1:1").route_set("retries", json!({ "methods": ["B AD"] }));
    let err = sidelight::config::Config::from_yaml(&yaml.yaml(), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].retries.methods[0]: \"B AD\" is not an HTTP method"),
        "{err}"
    );
    let yaml = Config::one("http://127.0.0.1:1")
        .upstream_set("health_check", json!({ "expected_statuses": [200, "9xx"] }));
    let err = sidelight::config::Config::from_yaml(&yaml.yaml(), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("upstreams[0].health_check.expected_statuses[1]: expected a status code"),
        "{err}"
    );
}

#[tokio::test]
async fn a_stream_without_a_first_token_in_time_is_retried_on_another_endpoint() {
    let role = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    let token = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
    // Sends headers and a role chunk at once, then generates nothing.
    let stalled = server::http1()
        .route_stream("/v1/chat/completions", move |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(role))).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .run()
        .await;
    let fine = server::http1()
        .route_stream("/v1/chat/completions", move |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(role))).await;
            let _ = tx.send(Ok(Bytes::from(token))).await;
        })
        .run()
        .await;
    let yaml = two_endpoints(
        &stalled.url(),
        &fine.url(),
        json!({ "outlier_detection": { "consecutive_failures": 0 } }),
        json!({ "kind": "openai", "llm": { "first_token_timeout": "300ms", "include_usage": false }, "retries": { "max_retries": 1, "backoff": "1ms" } }),
    );
    let proxy = proxy::start(&yaml).await;
    // Until one request has met the stalled endpoint (P2C may not pick it at first).
    while stalled.request_count() == 0 {
        let a = support::post(
            &proxy.url("/v1/chat/completions"),
            r#"{"model":"m","stream":true,"messages":[]}"#,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(
            a.body,
            format!("{role}{token}"),
            "the whole stream of the good endpoint"
        );
    }
    assert_eq!(retries(&proxy, "first_token_timeout").await, 1.0);
}

#[tokio::test]
async fn an_llm_upstream_without_its_own_key_is_up_when_it_answers_401() {
    // The apps bring their own keys: the probe has none, and a 401 proves the endpoint is up.
    let up = server::http1()
        .status("/v1/models", 401, "{\"error\":\"no key\"}")
        .run()
        .await;
    let yaml = one_endpoint(
        &up.url(),
        json!({ "health_check": { "interval": "50ms", "unhealthy_threshold": 1 } }),
        json!({ "kind": "anthropic" }),
    );
    let proxy = proxy::start(&yaml).await;
    proxy
        .assert_metric_eventually(
            "sidelight_health_checks_total",
            &[("upstream", "up"), ("result", "success")],
            3.0,
        )
        .await;
    assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, 200);
    let probe = up.last_request();
    assert_eq!(probe.uri.path(), "/v1/models");
    assert_eq!(
        probe.headers["anthropic-version"], "2023-06-01",
        "Anthropic needs a version"
    );

    // With a key of its own, a 401 means the key is wrong: the endpoint fails its checks.
    let keyed = one_endpoint(
        &up.url(),
        json!({ "headers": { "x-api-key": "sk-wrong" }, "health_check": { "interval": "50ms", "unhealthy_threshold": 1 } }),
        json!({ "kind": "anthropic" }),
    );
    let proxy = proxy::start(&keyed).await;
    proxy
        .assert_metric_eventually("sidelight_route_healthy", &[("route", "r")], 0.0)
        .await;
    assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, 503);
}

#[tokio::test]
async fn latency_weighting_sends_most_requests_to_the_faster_endpoint() {
    let slow = server::http1()
        .route_with_latency("/", "slow", Duration::from_millis(30))
        .run()
        .await;
    let fast = server::http1().route("/", "fast").run().await;
    let yaml = two_endpoints(
        &slow.url(),
        &fast.url(),
        json!({ "load_balancing": { "latency_weighted": true } }),
        json!({}),
    );
    let proxy = proxy::start(&yaml).await;
    // One request at a time: requests in flight are always equal, only latency tells them apart.
    for _ in 0..60 {
        assert_eq!(support::get(&proxy.url("/")).await.status, 200);
    }
    assert!(
        slow.request_count() <= 6,
        "the 30 ms endpoint got {} of 60 requests",
        slow.request_count()
    );
}

#[tokio::test]
async fn a_probe_without_an_answer_in_time_fails() {
    let hanging = server::http1().route_hang("/health").run().await;
    let yaml = one_endpoint(
        &hanging.url(),
        json!({ "health_check": { "path": "/health", "interval": "50ms", "timeout": "100ms", "unhealthy_threshold": 2 } }),
        json!({}),
    );
    let proxy = proxy::start(&yaml).await;
    proxy
        .assert_metric_eventually("sidelight_route_healthy", &[("route", "r")], 0.0)
        .await;
    assert!(
        proxy
            .metric(
                "sidelight_health_checks_total",
                &[("upstream", "up"), ("result", "timeout")],
            )
            .await
            >= 2.0
    );
    assert_eq!(support::get(&proxy.admin_url("/readyz")).await.status, 503);
}
