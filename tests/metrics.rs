//! What `/metrics` exports, and the contract with the Grafana dashboards: every metric a
//! dashboard queries must be exported by a running sidelight.

mod support;

use std::collections::BTreeSet;
use support::{metric, proxy, server};

const CONFIG: &str = r#"
upstreams:
  - name: up
    endpoints: ["UPSTREAM"]
    concurrency: { max_in_flight: 100 }
  - name: probed
    endpoints: ["UPSTREAM"]
    health_check: { interval: 1s }
routes:
  - { name: api, upstream: up, match: { path_prefix: /api }, rate_limits: [{ name: generous, rate: 1000/s }], retries: {} }
  - { name: cached, upstream: up, match: { path_prefix: /cached }, cache: { ttl: 1m } }
  - { name: embed, kind: openai, upstream: up, match: { path_prefix: /embed }, cache: { ttl: 1m }, batch: { max_wait: 1ms } }
  - name: llm
    kind: openai
    upstream: llmup
    match: { path_prefix: /llm }
    cache: { ttl: 1m, methods: [POST] }
    llm: { include_usage: false, first_token_timeout: 1m }
"#;

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
    let config = CONFIG.replace("UPSTREAM", &up.url()).replace(
        "upstreams:\n",
        &format!(
            "upstreams:\n  - {{ name: llmup, endpoints: [\"{}\"] }}\n",
            llm_up.url()
        ),
    );
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

/// Metric names queried by a dashboard's expressions and template variables.
fn dashboard_metrics(json: &serde_json::Value, out: &mut BTreeSet<String>) {
    match json {
        serde_json::Value::String(s) => {
            let re = regex::Regex::new(r"sidelight_[a-z0-9_]+").unwrap();
            for m in re.find_iter(s) {
                out.insert(m.as_str().to_string());
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_metrics(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| dashboard_metrics(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_metric_a_dashboard_queries_is_exported() {
    let (proxy, _up) = exercised().await;
    let text = proxy.metrics().await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
        let mut queried = BTreeSet::new();
        dashboard_metrics(&json, &mut queried);
        assert!(
            !queried.is_empty(),
            "{} queries no sidelight metric",
            path.display()
        );
        for name in queried {
            // The PostgreSQL family is exported once a pool exists; tests/postgres.rs checks it.
            if name.starts_with("sidelight_pg_") {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| exported.contains(*base))
                })
                .unwrap_or(&name);
            assert!(
                exported.contains(family),
                "{} queries {name}, which sidelight does not export",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} metric references found");
}
