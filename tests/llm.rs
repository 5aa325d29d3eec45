//! LLM routes (`kind: openai | anthropic`): token and latency accounting, `include_usage`
//! injection, the bounded model label, first-token and token-gap timeouts, and plain routes
//! left alone.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sidelight::http::body::full;
use sidelight::testing::mock_openai::{MockConfig, MockServer};
use std::time::Duration;
use support::{proxy, server, Config, Route, Upstream};

async fn mock() -> MockServer {
    let cfg = MockConfig {
        chunk_delay: Duration::from_millis(1),
        ..MockConfig::default()
    };
    MockServer::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap()
}

/// Upstream `up`, route `llm` to it with the fields of the JSON object `route`.
fn config(upstream: &str, route: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("up", &[upstream]))
        .route(Route::new("llm", "up").with(route))
}

fn tokens(kind: &str, model: &str) -> [(&'static str, String); 3] {
    [
        ("route", "llm".to_string()),
        ("model", model.to_string()),
        ("kind", kind.to_string()),
    ]
}

async fn assert_tokens(proxy: &proxy::Proxy, model: &str, prompt: f64, completion: f64) {
    for (kind, want) in [("prompt", prompt), ("completion", completion)] {
        let labels = tokens(kind, model);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        proxy
            .assert_metric_eventually("sidelight_llm_tokens_total", &labels, want)
            .await;
    }
}

const CHAT: &str =
    r#"{"model":"gpt-test","messages":[{"role":"user","content":"hello there friend"}]}"#;

#[tokio::test]
async fn openai_usage_is_counted_from_whole_and_streamed_responses() {
    let mock = mock().await;
    let proxy = proxy::start(&config(
        &format!("http://{}", mock.addr()),
        json!({ "kind": "openai" }),
    ))
    .await;
    let url = proxy.url("/v1/chat/completions");

    let whole = support::post(&url, CHAT).await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    let usage = whole.json()["usage"].clone();
    let (p, c) = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    assert_tokens(&proxy, "gpt-test", p, c).await;

    // A stream whose client asked for usage: the final chunk's usage is counted.
    let streamed = support::post(
        &url,
        r#"{"model":"gpt-test","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello there friend"}]}"#,
    )
    .await;
    let last_usage: Value = streamed
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("usage chunk kept for a client that asked")["usage"]
        .clone();
    assert_tokens(
        &proxy,
        "gpt-test",
        p + last_usage["prompt_tokens"].as_f64().unwrap(),
        c + last_usage["completion_tokens"].as_f64().unwrap(),
    )
    .await;
    proxy
        .assert_metric_eventually(
            "sidelight_llm_time_to_first_token_seconds_count",
            &[("route", "llm"), ("model", "gpt-test")],
            1.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_llm_stream_duration_seconds_count",
            &[("route", "llm"), ("model", "gpt-test")],
            1.0,
        )
        .await;
    assert_eq!(
        proxy
            .metric(
                "sidelight_llm_time_per_output_token_seconds_count",
                &[("route", "llm")]
            )
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(
                "sidelight_llm_requests_total",
                &[
                    ("route", "llm"),
                    ("model", "gpt-test"),
                    ("status_class", "2xx")
                ]
            )
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("sidelight_llm_usage_estimated_total", &[("route", "llm")])
            .await,
        0.0
    );

    // Embeddings: prompt tokens only.
    let emb = support::post(
        &proxy.url("/v1/embeddings"),
        r#"{"model":"emb-test","input":["one two three","four"]}"#,
    )
    .await;
    assert_eq!(emb.status, 200, "{}", emb.body);
    let prompt = emb.json()["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_tokens(&proxy, "emb-test", prompt, 0.0).await;
}

#[tokio::test]
async fn a_stream_without_usage_is_estimated_and_flagged() {
    let mock = mock().await;
    let proxy = proxy::start(&config(
        &format!("http://{}", mock.addr()),
        json!({ "kind": "openai", "llm": { "include_usage": false } }),
    ))
    .await;
    let answer = support::post(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"abcdefghijklmnop"}]}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    // Nothing asked for usage: the upstream sent none.
    assert!(!answer.body.contains("\"usage\""));
    // 16 characters of prompt: 4 tokens; the mock streams its reply in 8 content chunks.
    assert_tokens(&proxy, "gpt-test", 4.0, 8.0).await;
    proxy
        .assert_metric_eventually(
            "sidelight_llm_usage_estimated_total",
            &[("route", "llm"), ("model", "gpt-test")],
            1.0,
        )
        .await;
}

/// Events like OpenAI sends them (with `\r\n` line ends): with `include_usage`, every chunk has
/// `"usage":null` and a last chunk carries the usage.
fn openai_stream(include_usage: bool) -> String {
    let null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |delta: &str, finish: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{null}}}\r\n\r\n"
        )
    };
    let mut s = chunk(r#"{"role":"assistant","content":""}"#, "null");
    for piece in ["Hel", "lo", " world"] {
        s += &chunk(&format!(r#"{{"content":"{piece}"}}"#), "null");
    }
    s += &chunk("{}", r#""stop""#);
    if include_usage {
        s += "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-test\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\r\n\r\n";
    }
    s += "data: [DONE]\r\n\r\n";
    s
}

/// An OpenAI-like upstream that sends `openai_stream` in 13-byte pieces (events split anywhere).
async fn openai_like_upstream() -> server::Server {
    server::http1()
        .route_stream("/v1/chat/completions", |req, tx| async move {
            let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let include = body.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
            for piece in openai_stream(include).as_bytes().chunks(13) {
                if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                    return;
                }
            }
        })
        .run()
        .await
}

#[tokio::test]
async fn include_usage_is_asked_for_and_removed_for_a_client_that_did_not_ask() {
    let up = openai_like_upstream().await;
    let proxy = proxy::start(&config(&up.url(), json!({ "kind": "openai" }))).await;
    let url = proxy.url("/v1/chat/completions");

    let plain = r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = support::send(
        Request::post(&url)
            .header("content-type", "application/json")
            .header("accept-encoding", "gzip")
            .body(full(plain))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    // Byte for byte what the upstream sends a client that did not ask for usage.
    assert_eq!(answer.body, openai_stream(false));
    // Upstream was asked for usage; the rest of the body is as the client wrote it.
    let sent = up.last_request();
    assert_eq!(
        std::str::from_utf8(&sent.body).unwrap(),
        r#"{"stream_options":{"include_usage":true},"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
    );
    assert_eq!(
        sent.headers["content-length"],
        sent.body.len().to_string().as_str()
    );
    // Usage is read on the way back: the upstream is asked for an uncompressed answer.
    assert!(sent.headers.get("accept-encoding").is_none());
    // ... and its usage counted, not estimated.
    assert_tokens(&proxy, "gpt-test", 11.0, 3.0).await;

    // A client that asked gets everything the upstream sent.
    let asked = r#"{"model":"gpt-test","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = support::post(&url, asked).await;
    assert_eq!(answer.body, openai_stream(true));
    assert_eq!(up.last_request().body, asked.as_bytes());
    assert_tokens(&proxy, "gpt-test", 22.0, 6.0).await;
    assert_eq!(
        proxy
            .metric("sidelight_llm_usage_estimated_total", &[("route", "llm")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn cache_hits_count_avoided_tokens_and_each_client_gets_its_own_view() {
    let up = openai_like_upstream().await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "kind": "openai", "cache": { "ttl": "1m", "methods": ["POST"] } }),
    ))
    .await;
    let url = proxy.url("/v1/chat/completions");
    let plain = r#"{"model":"gpt-test","stream":true,"user":"a","messages":[{"role":"user","content":"hi"}]}"#;
    let asked = r#"{"model":"gpt-test","stream":true,"user":"b","stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

    let first = support::post(&url, plain).await;
    assert_eq!(first.header("x-sidelight-cache"), "MISS");
    assert_eq!(first.body, openai_stream(false));
    // Another user, with include_usage: the same entry, with the usage chunk this time.
    let second = support::post(&url, asked).await;
    assert_eq!(second.header("x-sidelight-cache"), "HIT");
    assert_eq!(second.body, openai_stream(true));
    let third = support::post(&url, plain).await;
    assert_eq!(third.header("x-sidelight-cache"), "HIT");
    assert_eq!(third.body, openai_stream(false));
    assert_eq!(up.request_count(), 1);

    // Spent once; two answers' worth (14 tokens each) avoided.
    assert_tokens(&proxy, "gpt-test", 11.0, 3.0).await;
    proxy
        .assert_metric_eventually(
            "sidelight_llm_tokens_avoided_total",
            &[("route", "llm"), ("model", "gpt-test"), ("source", "cache")],
            28.0,
        )
        .await;
    // Hits are not upstream latency.
    assert_eq!(
        proxy
            .metric(
                "sidelight_llm_time_to_first_token_seconds_count",
                &[("route", "llm")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn answers_shared_with_an_identical_request_count_as_avoided_spend() {
    let up = server::http1()
        .route_stream("/v1/chat/completions", |_, tx| async move {
            // Slow enough for the second request to join the first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = tx.send(Ok(Bytes::from(openai_stream(true)))).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "kind": "openai", "dedup": { "methods": ["POST"] } }),
    ))
    .await;
    let url = proxy.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-test","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let (a, b) = tokio::join!(support::post(&url, body), support::post(&url, body));
    let mut labels = [a.header("x-sidelight-cache"), b.header("x-sidelight-cache")];
    labels.sort();
    assert_eq!(labels, ["COALESCED", "MISS"]);
    assert_eq!(up.request_count(), 1);
    assert_eq!(a.body, openai_stream(true));
    assert_eq!(b.body, openai_stream(true));
    assert_tokens(&proxy, "gpt-test", 11.0, 3.0).await;
    proxy
        .assert_metric_eventually(
            "sidelight_llm_tokens_avoided_total",
            &[("route", "llm"), ("model", "gpt-test"), ("source", "dedup")],
            14.0,
        )
        .await;
}

#[tokio::test]
async fn the_model_label_is_bounded() {
    let mock = mock().await;
    let proxy = proxy::start(&config(
        &format!("http://{}", mock.addr()),
        json!({ "kind": "openai", "llm": { "max_models": 2 } }),
    ))
    .await;
    for model in ["m1", "m2", "m3", "m4", "m1"] {
        let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}]}}"#);
        assert_eq!(
            support::post(&proxy.url("/v1/chat/completions"), &body)
                .await
                .status,
            200
        );
    }
    let count = |model: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric(
                    "sidelight_llm_requests_total",
                    &[("route", "llm"), ("model", model)],
                )
                .await
        }
    };
    assert_eq!(count("m1").await, 2.0);
    assert_eq!(count("m2").await, 1.0);
    assert_eq!(count("other").await, 2.0);
    let text = proxy.metrics().await;
    assert!(!text.contains("\"m3\"") && !text.contains("\"m4\""));
}

#[tokio::test]
async fn invalid_json_is_passed_through_with_model_unknown() {
    let up = server::http1()
        .route("/v1/chat/completions", r#"{"error":"bad json"}"#)
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), json!({ "kind": "openai" }))).await;
    let answer = support::post(&proxy.url("/v1/chat/completions"), "{not json").await;
    assert_eq!(answer.status, 200);
    assert_eq!(up.last_request().body, "{not json");
    proxy
        .assert_metric_eventually(
            "sidelight_llm_requests_total",
            &[("route", "llm"), ("model", "unknown")],
            1.0,
        )
        .await;
}

fn anthropic_stream() -> String {
    [
        ("message_start", r#"{"type":"message_start","message":{"id":"m","model":"claude-test","usage":{"input_tokens":20,"cache_read_input_tokens":5,"output_tokens":1}}}"#),
        ("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
        ("ping", r#"{"type":"ping"}"#),
        ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#),
        ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}"#),
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        ("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ]
    .iter()
    .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
    .collect()
}

#[tokio::test]
async fn anthropic_usage_is_counted_from_whole_and_streamed_responses() {
    let up = server::http1()
        .route_stream("/v1/messages/stream", |_, tx| async move {
            for piece in anthropic_stream().as_bytes().chunks(17) {
                if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                    return;
                }
            }
        })
        .route_fn("/v1/messages", |_| {
            let mut r = http::Response::new(full(
                r#"{"id":"m","type":"message","model":"claude-test","content":[{"type":"text","text":"Hi"}],"usage":{"input_tokens":9,"output_tokens":2,"cache_read_input_tokens":3}}"#,
            ));
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), json!({ "kind": "anthropic" }))).await;
    let body =
        r#"{"model":"claude-test","max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#;

    let whole = support::post(&proxy.url("/v1/messages"), body).await;
    assert_eq!(whole.status, 200);
    assert_tokens(&proxy, "claude-test", 12.0, 2.0).await;

    let streamed = support::post(&proxy.url("/v1/messages/stream"), body).await;
    // Anthropic streams are never reshaped.
    assert_eq!(streamed.body, anthropic_stream());
    assert_tokens(&proxy, "claude-test", 12.0 + 25.0, 2.0 + 7.0).await;
    // Cached prompt tokens are a part of the prompt tokens: their own metric, so that summing
    // sidelight_llm_tokens_total over `kind` counts every token once.
    proxy
        .assert_metric_eventually(
            "sidelight_llm_cached_prompt_tokens_total",
            &[("route", "llm"), ("model", "claude-test")],
            8.0,
        )
        .await;
    let text = proxy.metrics().await;
    assert!(!text.contains("kind=\"cached\""), "{text}");
    proxy
        .assert_metric_eventually(
            "sidelight_llm_time_to_first_token_seconds_count",
            &[("route", "llm"), ("model", "claude-test")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn no_first_token_in_time_is_a_504_first_token_timeout() {
    let up = server::http1()
        .route_stream("/v1/chat/completions", |_, tx| async move {
            // Headers and a role chunk at once, then nothing generated.
            let role =
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
            let _ = tx.send(Ok(Bytes::from(role))).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(
        &up.url(),
        json!({ "kind": "openai", "llm": { "first_token_timeout": "300ms" } }),
    ))
    .await;
    let started = std::time::Instant::now();
    let answer = support::post(
        &proxy.url("/v1/chat/completions"),
        r#"{"model":"gpt-test","stream":true,"messages":[]}"#,
    )
    .await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.header("x-sidelight-error"), "first_token_timeout");
    assert_eq!(answer.json()["error"]["type"], "first_token_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy
        .assert_metric_eventually(
            "sidelight_llm_timeouts_total",
            &[("route", "llm"), ("kind", "first_token")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn a_gap_between_tokens_ends_the_stream_with_an_error_event_and_a_body_error() {
    let token = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
    let up = server::http1()
        .route_stream("/v1/chat/completions", move |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(token))).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), json!({ "kind": "openai", "llm": { "first_token_timeout": "5s", "max_token_gap": "300ms" } })))
    .await;
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(r#"{"model":"gpt-test","stream":true,"messages":[]}"#))
        .unwrap();
    let response = support::client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(error.is_some(), "the stream must not end cleanly");
    let text = String::from_utf8(received).unwrap();
    assert!(text.starts_with(token), "{text}");
    let event: Value = serde_json::from_str(
        text[token.len()..]
            .trim_end()
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("an error event: {text:?}")),
    )
    .unwrap();
    assert_eq!(event["error"]["type"], "token_gap_timeout");
    proxy
        .assert_metric_eventually(
            "sidelight_llm_timeouts_total",
            &[("route", "llm"), ("kind", "token_gap")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn plain_http_routes_are_not_parsed_or_changed() {
    let up = server::http1()
        .route_stream("/v1/chat/completions", |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(openai_stream(true)))).await;
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url(), json!({ "kind": "http" }))).await;
    let plain = r#"{"model":"gpt-test","stream":true,"messages":[]}"#;
    let answer = support::post(&proxy.url("/v1/chat/completions"), plain).await;
    assert_eq!(answer.body, openai_stream(true));
    assert_eq!(up.last_request().body, plain.as_bytes());
    let text = proxy.metrics().await;
    assert!(!text.contains("sidelight_llm_requests_total{"));
    assert!(!text.contains("sidelight_llm_tokens_total{"));
}

#[tokio::test]
async fn anthropic_529_overloaded_is_retried_by_default_on_anthropic_routes() {
    // Every other call is Anthropic's 529 overloaded_error.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let up = server::http1()
        .route_fn("/v1/messages", move |_| {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0 {
                http::Response::builder()
                    .status(529)
                    .body(full(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#))
                    .unwrap()
            } else {
                http::Response::new(full(r#"{"type":"message","content":[]}"#))
            }
        })
        .run()
        .await;
    let yaml = |kind: &str| {
        format!(
            r#"
upstreams:
  - name: up
    endpoints: ["{}"]
    outlier_detection: {{ consecutive_failures: 0 }}
routes:
  - {{ name: llm, upstream: up, kind: {kind}, retries: {{ max_retries: 1, backoff: 1ms }} }}
"#,
            up.url()
        )
    };
    let proxy = proxy::start(&yaml("anthropic")).await;
    let answer = support::post(&proxy.url("/v1/messages"), CHAT).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(up.request_count(), 2, "the 529 and its retry");
    proxy
        .assert_metric_eventually(
            "sidelight_retries_total",
            &[("upstream", "up"), ("reason", "529")],
            1.0,
        )
        .await;
    // Other routes keep the plain default: a 529 is the upstream's answer.
    let proxy = proxy::start(&yaml("openai")).await;
    let answer = support::post(&proxy.url("/v1/messages"), CHAT).await;
    assert_eq!(answer.status, 529);
    assert_eq!(up.request_count(), 3);
}
