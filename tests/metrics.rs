//! What `/metrics` exports, and the contract with the Grafana dashboards: every metric a
//! dashboard queries must be exported by a running sidelight.

mod support;

use serde_json::json;
use support::{metric, proxy, server, Config, Route, Upstream};

/// One of each kind of route, all to `up` but the LLM route (to `llm_up`).
fn config(up: &str, llm_up: &str) -> Config {
    Config::new()
        .upstream(Upstream::new("llmup", &[llm_up]))
        .upstream(Upstream::new("up", &[up]).set("concurrency", json!({ "max_in_flight": 100 })))
        .upstream(Upstream::new("probed", &[up]).set("health_check", json!({ "interval": "1s" })))
        .route(
            Route::new("api", "up")
                .path_prefix("/api")
                .set(
                    "rate_limits",
                    json!([{ "name": "generous", "rate": "1000/s" }]),
                )
                .set("retries", json!({})),
        )
        .route(
            Route::new("cached", "up")
                .path_prefix("/cached")
                .set("cache", json!({ "ttl": "1m" })),
        )
        .route(
            Route::new("embed", "up")
                .path_prefix("/embed")
                .set("kind", json!("openai"))
                .set("cache", json!({ "ttl": "1m" }))
                .set("batch", json!({ "max_wait": "1ms" })),
        )
        .route(
            Route::new("llm", "llmup")
                .path_prefix("/llm")
                .set("kind", json!("openai"))
                .set("cache", json!({ "ttl": "1m", "methods": ["POST"] }))
                .set(
                    "llm",
                    json!({ "include_usage": false, "first_token_timeout": "1m" }),
                ),
        )
}

/// An OpenAI stream without usage (so it is estimated).
const LLM_STREAM: &[&str] = &[
    "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\n",
    "data: [DONE]\n\n",
];

/// Starts sidelight and sends one of each kind of request so every series exists.
async fn exercised() -> (proxy::Proxy, (server::Server, server::Server)) {
    let up = server::http1().route("/", "hello").run().await;
    let llm_up = server::http1()
        .route_stream("/llm", |_, tx| async move {
            for event in LLM_STREAM {
                if tx.send(Ok(bytes::Bytes::from(*event))).await.is_err() {
                    return;
                }
            }
        })
        .run()
        .await;
    let config = config(&up.url(), &llm_up.url());
    let proxy = proxy::start(&config).await;
    assert_eq!(
        support::post(&proxy.url("/api/x"), "12345").await.status,
        200
    );
    assert_eq!(support::get(&proxy.url("/nowhere")).await.status, 404);
    assert_eq!(support::get(&proxy.url("/cached/x")).await.status, 200);
    // An LLM stream, then the same from the cache.
    for cache in ["MISS", "HIT"] {
        let llm = support::post(
            &proxy.url("/llm/v1/chat/completions"),
            r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
        assert_eq!(llm.header("x-sidelight-cache"), cache);
        assert_eq!(llm.body, LLM_STREAM.concat());
    }
    proxy
        .assert_metric_eventually(
            "sidelight_llm_tokens_avoided_total",
            &[("route", "llm"), ("source", "cache")],
            // "hi": 1 prompt token; 11 characters in 2 deltas: 3 completion tokens (estimated).
            4.0,
        )
        .await;
    for route in ["api", "cached", "llm"] {
        proxy
            .assert_metric_eventually("sidelight_requests_in_flight", &[("route", route)], 0.0)
            .await;
    }
    (proxy, (up, llm_up))
}

#[tokio::test]
async fn exports_request_upstream_and_connection_metrics() {
    let (proxy, _up) = exercised().await;
    let text = proxy.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric(&text, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };

    assert_eq!(
        m(
            "sidelight_requests_total",
            &[
                ("route", "api"),
                ("upstream", "up"),
                ("method", "POST"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        m(
            "sidelight_requests_total",
            &[("route", "_none"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "sidelight_request_duration_seconds_count",
            &[("route", "api")]
        ),
        1.0
    );
    assert_eq!(
        m("sidelight_overhead_seconds_count", &[("route", "api")]),
        1.0
    );
    assert_eq!(
        m(
            "sidelight_upstream_response_seconds_count",
            &[("upstream", "up")]
        ),
        2.0
    );
    assert_eq!(m("sidelight_request_bytes_total", &[("route", "api")]), 5.0);
    assert_eq!(
        m("sidelight_response_bytes_total", &[("route", "api")]),
        5.0
    );
    assert_eq!(
        m(
            "sidelight_upstream_connections_opened_total",
            &[("upstream", "up")]
        ),
        1.0
    );
    assert_eq!(
        m("sidelight_upstream_connections_open", &[("upstream", "up")]),
        1.0
    );
    assert_eq!(
        m(
            "sidelight_upstream_connect_errors_total",
            &[("upstream", "up"), ("kind", "refused")]
        ),
        0.0
    );
    assert_eq!(
        m(
            "sidelight_upstream_timeouts_total",
            &[("upstream", "up"), ("kind", "idle")]
        ),
        0.0
    );
    assert_eq!(
        m(
            "sidelight_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(m("sidelight_ready", &[]), 1.0);

    // Overhead is measured in microseconds: far below the request duration.
    let overhead = m("sidelight_overhead_seconds_sum", &[("route", "api")]);
    assert!(overhead > 0.0 && overhead < 0.05, "overhead {overhead}s");
    // Buckets reach from a millisecond to minutes, for LLM calls.
    assert!(text.contains(r#"sidelight_request_duration_seconds_bucket{route="api",le="0.001"}"#));
    assert!(text.contains(r#"sidelight_request_duration_seconds_bucket{route="api",le="300"}"#));
}

#[tokio::test]
async fn metric_names_follow_conventions() {
    let (proxy, _up) = exercised().await;
    let text = proxy.metrics().await;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let name = parts.next().unwrap();
        let kind = parts.next().unwrap();
        assert!(name.starts_with("sidelight_"), "{name}");
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        }
        if kind == "histogram" {
            // Counts have no unit: batch sizes are counted in inputs and requests.
            assert!(
                name.ends_with("_seconds")
                    || name.ends_with("_bytes")
                    || name.ends_with("_inputs")
                    || name.ends_with("_requests"),
                "histogram {name} must be in base units"
            );
        }
    }
    // Labels never carry request-specific values (paths, ids): bounded cardinality.
    assert!(!text.contains("/api/x"));
    assert!(!text.contains("/nowhere"));
    assert!(!text.contains("/cached/x"));
}

#[tokio::test]
async fn every_metric_a_dashboard_or_alert_queries_is_exported() {
    use support::contract;
    let (proxy, _up) = exercised().await;
    let exported = contract::exported(&proxy.metrics().await);
    let queried = contract::queried("sidelight_");
    for file in contract::contract_files() {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            queried.iter().any(|(f, _)| *f == name),
            "{name} queries no sidelight metric"
        );
    }
    let mut checked = 0;
    for (file, name) in &queried {
        // The PostgreSQL family is exported once a pool exists; tests/postgres.rs checks it.
        if name.starts_with("sidelight_pg_") {
            continue;
        }
        assert!(
            contract::family(&exported, name).is_some(),
            "{file} queries {name}, which sidelight does not export"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} metric references found");
}

/// The alert rules are valid Prometheus rules and fire (or stay quiet) as their promtool unit
/// tests say: `promtool check rules` and `promtool test rules`.
#[test]
fn alert_rules_pass_promtool() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool not runnable ({e}); install it with: sudo apt-get install prometheus"
                )
            });
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `sidelight_overhead_seconds` of `route`: (count, sum).
async fn overhead(proxy: &proxy::Proxy, route: &str) -> (f64, f64) {
    let text = proxy.metrics().await;
    let labels = [("route", route)];
    (
        metric(&text, "sidelight_overhead_seconds_count", &labels).unwrap_or(0.0),
        metric(&text, "sidelight_overhead_seconds_sum", &labels).unwrap_or(0.0),
    )
}

/// Overhead is sidelight's own work only: waiting on the upstream (every attempt, and a stream
/// held for its first token) and the deliberate waits (rate-limit and concurrency queues, retry
/// backoff) are not in it, though they come before the response headers.
#[tokio::test]
async fn overhead_leaves_out_upstream_and_deliberate_waits() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let up = server::http1()
        .route_stream("/llm", |_, tx| async move {
            // The first token 300 ms after the headers.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for chunk in LLM_STREAM {
                let _ = tx
                    .send(Ok(bytes::Bytes::from_static(chunk.as_bytes())))
                    .await;
            }
        })
        .route_fn("/retry", move |_| {
            // Every other call asks for a 300 ms pause.
            if seen.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                http::Response::builder()
                    .status(503)
                    .header("retry-after-ms", "300")
                    .body(sidelight::http::body::full("busy"))
                    .unwrap()
            } else {
                http::Response::new(sidelight::http::body::full("ok"))
            }
        })
        .route_with_latency("/slow", "ok", Duration::from_millis(300))
        .route("/", "ok")
        .run()
        .await;
    let yaml = r#"
upstreams:
  - name: up
    endpoints: ["UPSTREAM"]
  - name: narrow
    endpoints: ["UPSTREAM"]
    concurrency: { max_in_flight: 1, max_queue: 10, max_wait: 5s }
routes:
  - { name: llm, kind: openai, upstream: up, match: { path_prefix: /llm }, llm: { include_usage: false, first_token_timeout: 5s } }
  - { name: retry, upstream: up, match: { path_prefix: /retry }, retries: { max_retries: 1, backoff: 1ms } }
  - { name: queued, upstream: up, match: { path_prefix: /queued }, prefix_rewrite: /, rate_limits: [{ name: one, rate: 2/s, burst: 1, mode: queue }] }
  - { name: narrow, upstream: narrow, match: { path_prefix: /slow } }
"#
    .replace("UPSTREAM", &up.url());
    let proxy = proxy::start(&yaml).await;
    let started = Instant::now();
    let answer = support::post(&proxy.url("/llm"), r#"{"model":"m","stream":true}"#).await;
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(support::get(&proxy.url("/retry")).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Two at once: the second queues for its rate-limit slot (500 ms), or for the upstream's
    // only concurrency slot (300 ms).
    for path in ["/queued", "/slow"] {
        let started = Instant::now();
        let url = proxy.url(path);
        let (a, b) = tokio::join!(support::get(&url), support::get(&url));
        assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
    for (route, requests) in [
        ("llm", 1.0),
        ("retry", 1.0),
        ("queued", 2.0),
        ("narrow", 2.0),
    ] {
        let (count, sum) = overhead(&proxy, route).await;
        assert_eq!(count, requests, "{route}");
        assert!(sum < 0.1 * requests, "{route}: overhead {sum} s");
    }
}
