//! LLM stream faults (issue 14): every broken stream reaches the client as an error its SDK
//! raises (a provider-shaped error event, then a cut body), and a failure while the response is
//! still held for its first token is a status, retried on another endpoint.
//!
//! Each test reads the raw response as an SDK would: the status, every byte, and whether the
//! body ended cleanly or was cut.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use sidelight::http::body::full;
use std::time::Duration;
use support::{proxy, server};

const OPENAI_TOKEN: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const OPENAI_DONE: &str = "data: [DONE]\n\n";
const ANTHROPIC_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-test\",\"usage\":{\"input_tokens\":3}}}\n\n";
const ANTHROPIC_TOKEN: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const ANTHROPIC_STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#[derive(Clone, Copy, PartialEq)]
enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    fn kind(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
        }
    }
    fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
        }
    }
    /// The events before the fault.
    fn head(self) -> String {
        match self {
            Api::OpenAi => OPENAI_TOKEN.to_string(),
            Api::Anthropic => format!("{ANTHROPIC_START}{ANTHROPIC_TOKEN}"),
        }
    }
    fn terminal(self) -> &'static str {
        match self {
            Api::OpenAi => OPENAI_DONE,
            Api::Anthropic => ANTHROPIC_STOP,
        }
    }
    /// The error object of a provider-shaped error event (and checks its shape).
    fn error_of(self, event: &str) -> Value {
        match self {
            Api::OpenAi => {
                let data = event
                    .trim_end()
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("an OpenAI error chunk: {event:?}"));
                let v: Value = serde_json::from_str(data).unwrap();
                v["error"].clone()
            }
            Api::Anthropic => {
                let data = event
                    .trim_end()
                    .strip_prefix("event: error\ndata: ")
                    .unwrap_or_else(|| panic!("an Anthropic error event: {event:?}"));
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["type"], "error");
                v["error"].clone()
            }
        }
    }
}

fn config(upstream: &str, route: &str) -> String {
    format!(
        r#"
upstreams:
  - name: up
    endpoints: [{upstream}]
    outlier_detection: {{ consecutive_failures: 0 }}
routes:
  - {{ name: llm, upstream: up, {route} }}
"#
    )
}

struct Read {
    status: u16,
    body: String,
    /// The body ended with an error (a cut), not a clean end.
    cut: bool,
}

async fn stream(proxy: &proxy::Proxy, api: Api) -> Read {
    let req = Request::post(proxy.url(api.path()))
        .header("content-type", "application/json")
        .body(full(
            r#"{"model":"m","stream":true,"max_tokens":5,"messages":[]}"#,
        ))
        .unwrap();
    let response = support::client().request(req).await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut cut = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => received.extend_from_slice(&f.into_data().unwrap_or_default()),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    Read {
        status,
        body: String::from_utf8(received).unwrap(),
        cut,
    }
}

/// An upstream that streams `chunks` on both paths, then ends cleanly or (`drop`) breaks the
/// connection.
async fn upstream(chunks: Vec<String>, drop: bool) -> server::Server {
    let mut b = server::http1();
    for path in [Api::OpenAi.path(), Api::Anthropic.path()] {
        let chunks = chunks.clone();
        b = b.route_stream(path, move |_, tx| {
            let chunks = chunks.clone();
            async move {
                for c in chunks {
                    let _ = tx.send(Ok(Bytes::from(c))).await;
                }
                if drop {
                    let _ = tx.send(Err(())).await;
                }
            }
        });
    }
    b.run().await
}

async fn assert_faults(proxy: &proxy::Proxy, kind: &str, want: f64) {
    proxy
        .assert_metric_eventually(
            "sidelight_llm_stream_errors_total",
            &[("route", "llm"), ("kind", kind)],
            want,
        )
        .await;
}

#[tokio::test]
async fn a_complete_stream_is_passed_unchanged() {
    for api in [Api::OpenAi, Api::Anthropic] {
        let whole = format!("{}{}", api.head(), api.terminal());
        let up = upstream(vec![whole.clone()], false).await;
        let proxy = proxy::start(&config(
            &format!("\"{}\"", up.url()),
            &format!("kind: {}", api.kind()),
        ))
        .await;
        let read = stream(&proxy, api).await;
        assert_eq!((read.status, read.cut), (200, false));
        assert_eq!(read.body, whole);
        for kind in ["truncated", "malformed", "upstream_closed"] {
            assert_faults(&proxy, kind, 0.0).await;
        }
    }
}

#[tokio::test]
async fn a_stream_that_ends_without_its_terminal_event_is_cut_with_an_error_event() {
    for api in [Api::OpenAi, Api::Anthropic] {
        let up = upstream(vec![api.head()], false).await;
        let proxy = proxy::start(&config(
            &format!("\"{}\"", up.url()),
            &format!("kind: {}", api.kind()),
        ))
        .await;
        let read = stream(&proxy, api).await;
        assert_eq!(read.status, 200);
        assert!(read.cut, "{}: the stream must not end cleanly", api.kind());
        let event = read
            .body
            .strip_prefix(&api.head())
            .expect("the events before");
        let error = api.error_of(event);
        assert_eq!(error["type"], "stream_truncated");
        assert!(error["message"].as_str().unwrap().contains("upstream up"));
        assert_faults(&proxy, "truncated", 1.0).await;
    }
}

#[tokio::test]
async fn a_half_event_is_replaced_by_an_error_event() {
    for api in [Api::OpenAi, Api::Anthropic] {
        // An event cut in half, then the rest of the stream.
        let half = match api {
            Api::OpenAi => "data: {\"choices\":[{\"index\":0,\"delta\":{\"con\n\n".to_string(),
            Api::Anthropic => {
                "event: content_block_delta\ndata: {\"type\":\"content_bl\n\n".to_string()
            }
        };
        let up = upstream(vec![api.head(), half, api.terminal().to_string()], false).await;
        let proxy = proxy::start(&config(
            &format!("\"{}\"", up.url()),
            &format!("kind: {}", api.kind()),
        ))
        .await;
        let read = stream(&proxy, api).await;
        assert_eq!(read.status, 200);
        assert!(read.cut, "{}", api.kind());
        let event = read
            .body
            .strip_prefix(&api.head())
            .expect("the events before");
        let error = api.error_of(event);
        assert_eq!(error["type"], "stream_malformed");
        assert_faults(&proxy, "malformed", 1.0).await;
    }
}

#[tokio::test]
async fn an_upstream_that_drops_mid_stream_gets_an_error_event_before_the_cut() {
    for api in [Api::OpenAi, Api::Anthropic] {
        // The upstream breaks the connection once the client has read the first events.
        let (break_tx, break_rx) = tokio::sync::watch::channel(false);
        let head = api.head();
        let up = server::http1()
            .route_stream(api.path(), move |_, tx| {
                let mut break_rx = break_rx.clone();
                let head = head.clone();
                async move {
                    let _ = tx.send(Ok(Bytes::from(head))).await;
                    let _ = break_rx.wait_for(|b| *b).await;
                    let _ = tx.send(Err(())).await;
                }
            })
            .run()
            .await;
        let proxy = proxy::start(&config(
            &format!("\"{}\"", up.url()),
            &format!("kind: {}", api.kind()),
        ))
        .await;
        let req = Request::post(proxy.url(api.path()))
            .header("content-type", "application/json")
            .body(full(r#"{"model":"m","stream":true,"messages":[]}"#))
            .unwrap();
        let response = support::client().request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut received = Vec::new();
        let mut cut = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => received.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(_) => {
                    cut = true;
                    break;
                }
            }
            if received == api.head().as_bytes() {
                break_tx.send_replace(true);
            }
        }
        assert!(cut, "{}", api.kind());
        let text = String::from_utf8(received).unwrap();
        let event = text.strip_prefix(&api.head()).expect("the events before");
        let error = api.error_of(event);
        assert_eq!(error["type"], "upstream_closed");
        assert!(error["message"].as_str().unwrap().contains("upstream up"));
        assert_faults(&proxy, "upstream_closed", 1.0).await;
    }
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_token_while_held_is_retried_on_another_endpoint() {
    for api in [Api::OpenAi, Api::Anthropic] {
        for drop in [false, true] {
            // A: 200 with SSE headers, then the end (or a drop) before any event.
            let a = upstream(vec![], drop).await;
            let whole = format!("{}{}", api.head(), api.terminal());
            let b = upstream(vec![whole.clone()], false).await;
            let route = format!(
                "kind: {}, llm: {{ first_token_timeout: 5s }}, retries: {{ max_retries: 1, backoff: 1ms }}",
                api.kind()
            );
            let proxy = proxy::start(&config(
                &format!("\"{}\", \"{}\"", a.url(), b.url()),
                &route,
            ))
            .await;
            // Every request is answered whole, those that A broke included (the balancer
            // picks A for some: at least 3 here).
            let mut sent = 0;
            while a.request_count() < 3 {
                let read = stream(&proxy, api).await;
                assert_eq!((read.status, read.cut), (200, false), "{}", read.body);
                assert_eq!(read.body, whole);
                sent += 1;
                assert!(sent < 100, "A was never picked");
            }
        }
    }
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_token_with_no_retry_left_is_a_502() {
    for api in [Api::OpenAi, Api::Anthropic] {
        let a = upstream(vec![], false).await;
        let route = format!(
            "kind: {}, llm: {{ first_token_timeout: 5s }}, retries: {{ max_retries: 1, backoff: 1ms }}",
            api.kind()
        );
        let proxy = proxy::start(&config(&format!("\"{}\"", a.url()), &route)).await;
        let answer = support::post(
            &proxy.url(api.path()),
            r#"{"model":"m","stream":true,"messages":[]}"#,
        )
        .await;
        assert_eq!(answer.status, 502);
        assert_eq!(answer.header("x-sidelight-error"), "upstream_reset");
        assert_eq!(answer.json()["error"]["type"], "upstream_reset");
        let message = answer.json()["error"]["message"].to_string();
        assert!(
            message.contains("upstream up") && message.contains("before its first token"),
            "{message}"
        );
        assert_eq!(a.request_count(), 2, "the first attempt and one retry");
    }
}

#[tokio::test]
async fn idle_does_not_cut_a_stream_held_for_its_first_token() {
    for api in [Api::OpenAi, Api::Anthropic] {
        let whole = format!("{}{}", api.head(), api.terminal());
        let mut b = server::http1();
        for path in [Api::OpenAi.path(), Api::Anthropic.path()] {
            let whole = whole.clone();
            b = b.route_stream(path, move |_, tx| {
                let whole = whole.clone();
                async move {
                    // The first event comes after three idle periods.
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    let _ = tx.send(Ok(Bytes::from(whole))).await;
                }
            });
        }
        let up = b.run().await;
        let yaml = format!(
            r#"
upstreams:
  - name: up
    endpoints: ["{}"]
    timeouts: {{ idle: 300ms }}
routes:
  - {{ name: llm, upstream: up, kind: {}, llm: {{ first_token_timeout: 5s }} }}
"#,
            up.url(),
            api.kind()
        );
        let proxy = proxy::start(&yaml).await;
        let read = stream(&proxy, api).await;
        assert_eq!((read.status, read.cut), (200, false), "{}", read.body);
        assert_eq!(read.body, whole);
    }
}

#[tokio::test]
async fn idle_still_cuts_a_stream_after_its_first_token() {
    let api = Api::OpenAi;
    let up = server::http1()
        .route_stream(api.path(), |_, tx| async move {
            let _ = tx.send(Ok(Bytes::from(OPENAI_TOKEN))).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .run()
        .await;
    let yaml = format!(
        r#"
upstreams:
  - name: up
    endpoints: ["{}"]
    timeouts: {{ idle: 300ms }}
routes:
  - {{ name: llm, upstream: up, kind: openai, llm: {{ first_token_timeout: 5s }} }}
"#,
        up.url()
    );
    let proxy = proxy::start(&yaml).await;
    let started = std::time::Instant::now();
    let read = stream(&proxy, api).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!((read.status, read.cut), (200, true));
    let event = read.body.strip_prefix(OPENAI_TOKEN).unwrap();
    assert_eq!(api.error_of(event)["type"], "upstream_idle_timeout");
}

/// A client that reads a stream to its last event and hangs up (the OpenAI SDK does), or
/// leaves in the middle: the stream is still read to its end and stored.
#[tokio::test]
async fn a_stream_is_cached_even_when_its_client_leaves_before_the_end() {
    let read_to_done = (format!("{OPENAI_TOKEN}{OPENAI_DONE}"), "");
    let leave_mid_stream = (OPENAI_TOKEN.to_string(), OPENAI_DONE);
    for (first, rest) in [read_to_done, leave_mid_stream] {
        // The upstream sends `first` at once, and `rest` and the body's end only once the test
        // says so (after the client has left).
        let (end_tx, end_rx) = tokio::sync::watch::channel(false);
        let sent = first.clone();
        let up = server::http1()
            .route_stream(Api::OpenAi.path(), move |_, tx| {
                let mut end_rx = end_rx.clone();
                let sent = sent.clone();
                async move {
                    let _ = tx.send(Ok(Bytes::from(sent))).await;
                    let _ = end_rx.wait_for(|e| *e).await;
                    if !rest.is_empty() {
                        let _ = tx.send(Ok(Bytes::from(rest))).await;
                    }
                }
            })
            .run()
            .await;
        let proxy = proxy::start(&config(
            &format!("\"{}\"", up.url()),
            "kind: openai, cache: { ttl: 1m, methods: [POST] }",
        ))
        .await;
        let body = r#"{"model":"m","stream":true,"messages":[]}"#;
        let req = Request::post(proxy.url(Api::OpenAi.path()))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap();
        let client = support::client_no_pool();
        let response = client.request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.into_body();
        let mut received = Vec::new();
        while received != first.as_bytes() {
            let frame = stream.frame().await.expect("more").expect("ok");
            received.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        // Hang up, and wait until sidelight has seen it.
        drop(stream);
        drop(client);
        proxy
            .assert_metric_eventually("sidelight_requests_in_flight", &[("route", "llm")], 0.0)
            .await;
        end_tx.send_replace(true);
        proxy
            .assert_metric_eventually("sidelight_cache_stores_total", &[("route", "llm")], 1.0)
            .await;
        let whole = format!("{first}{rest}");
        let url = proxy.url(Api::OpenAi.path());
        support::eventually("the repeat is a cache hit", Duration::from_secs(5), || {
            let (url, whole) = (url.clone(), whole.clone());
            async move {
                let answer = support::post(&url, body).await;
                answer.header("x-sidelight-cache") == "HIT" && answer.body == whole
            }
        })
        .await;
        assert_eq!(up.request_count(), 1);
    }
}
