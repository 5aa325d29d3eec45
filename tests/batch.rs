//! Embeddings micro-batching on `kind: openai` routes: concurrent embeddings requests merged
//! into one upstream call and split back, errors, client disconnects, the per-input cache.

mod support;

use http::Request;
use serde_json::{json, Value};
use sidelight::http::body::full;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{proxy, server, Answer, Config, Route, Upstream};

/// An embeddings upstream whose vectors are derived from each input, so a test can tell whose
/// vectors a client got. It answers `data` in reverse order (clients must see input order),
/// counts one token per character or token, rejects any input `"FAIL"` with 400, and answers
/// `fail_status` to everything while that is non-zero.
struct Embedder {
    server: server::Server,
    fail_status: Arc<AtomicU16>,
    /// While set, answers to calls with more than one input have one embedding too few.
    short_answers: Arc<AtomicBool>,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn weight(input: &Value) -> u64 {
    match input {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(t) => t.len() as u64,
        _ => 0,
    }
}

fn vector(input: &Value) -> Vec<f32> {
    let h = fnv(input.to_string().as_bytes());
    vec![
        (h % 1000) as f32 / 8.0,
        ((h >> 20) % 1000) as f32 / 4.0,
        weight(input) as f32,
    ]
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            let ch = ALPHABET[(n >> shift) as usize & 63] as char;
            out.push(if i > c.len() { '=' } else { ch });
        }
    }
    out
}

/// The embedding the upstream returns for `input`.
fn expected(input: &Value, base64_format: bool) -> Value {
    let v = vector(input);
    if base64_format {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(base64(&bytes))
    } else {
        json!(v)
    }
}

/// The inputs of a request body, one per embedding.
fn inputs_of(body: &Value) -> Vec<Value> {
    match &body["input"] {
        Value::Array(items) if items.iter().all(|i| i.is_u64()) => vec![body["input"].clone()],
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

fn json_response(status: u16, body: &Value) -> http::Response<sidelight::http::body::ProxyBody> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

async fn embedder(latency: Duration) -> Embedder {
    let fail_status = Arc::new(AtomicU16::new(0));
    let fail = fail_status.clone();
    let short_answers = Arc::new(AtomicBool::new(false));
    let short = short_answers.clone();
    let server = server::http1()
        .route_async("/v1/embeddings", move |r| {
            let fail = fail.load(Ordering::SeqCst);
            let short = short.load(Ordering::SeqCst);
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                if fail != 0 {
                    return json_response(fail, &json!({"error": {"message": "upstream is down"}}));
                }
                let Ok(body) = serde_json::from_slice::<Value>(&r.body) else {
                    return json_response(400, &json!({"error": {"message": "not JSON"}}));
                };
                let inputs = inputs_of(&body);
                if inputs.iter().any(|i| i == "FAIL") {
                    return json_response(
                        400,
                        &json!({"error": {"message": "input FAIL is not allowed", "type": "invalid_request_error"}}),
                    );
                }
                let b64 = body["encoding_format"] == "base64";
                let mut data: Vec<Value> = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, input)| json!({"object": "embedding", "index": i, "embedding": expected(input, b64)}))
                    .collect();
                data.reverse();
                if short && data.len() > 1 {
                    data.pop();
                }
                let tokens: u64 = inputs.iter().map(weight).sum();
                json_response(
                    200,
                    &json!({"object": "list", "data": data, "model": body["model"],
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                )
            }
        })
        .run()
        .await;
    Embedder {
        server,
        fail_status,
        short_answers,
    }
}

/// Upstream `emb` and the OpenAI route `embed` to it, batching with `batch`.
fn config(upstream: &str, batch: Value) -> Config {
    Config::new()
        .upstream(Upstream::new("emb", &[upstream]))
        .route(
            Route::new("embed", "emb")
                .set("kind", json!("openai"))
                .set("batch", batch),
        )
}

async fn embed(proxy: &proxy::Proxy, tenant: &str, body: &Value) -> Answer {
    support::send(
        Request::post(proxy.url("/v1/embeddings"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {tenant}"))
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

/// Sends every body at once, as tenant `t`; the answers come in the order of `bodies`.
async fn embed_all(proxy: &proxy::Proxy, bodies: &[Value]) -> Vec<Answer> {
    futures_util::future::join_all(bodies.iter().map(|b| embed(proxy, "t", b))).await
}

/// Asserts that `answer` holds exactly the embeddings of `body`'s inputs, each at its input's
/// `index` (a lone request's answer is the upstream's own, in the upstream's order).
fn assert_own_vectors(answer: &Answer, body: &Value) {
    assert_eq!(answer.status, 200, "{}", answer.body);
    let got = answer.json();
    let inputs = inputs_of(body);
    let b64 = body["encoding_format"] == "base64";
    let data = got["data"].as_array().expect("data");
    assert_eq!(data.len(), inputs.len(), "{got}");
    let mut indexes: Vec<u64> = data.iter().map(|d| d["index"].as_u64().unwrap()).collect();
    indexes.sort();
    assert_eq!(
        indexes,
        (0..inputs.len() as u64).collect::<Vec<_>>(),
        "{got}"
    );
    for item in data {
        let input = &inputs[item["index"].as_u64().unwrap() as usize];
        assert_eq!(
            item["embedding"],
            expected(input, b64),
            "input {input} of {body}"
        );
    }
    assert_eq!(got["model"], body["model"]);
}

fn upstream_inputs(up: &Embedder) -> Vec<Vec<Value>> {
    up.server
        .requests()
        .iter()
        .map(|r| inputs_of(&serde_json::from_slice(&r.body).unwrap()))
        .collect()
}

#[tokio::test]
async fn concurrent_clients_each_get_their_own_vectors_and_tenants_never_share_a_call() {
    let up = embedder(Duration::from_millis(5)).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 64, "max_wait": "20ms" }),
    ))
    .await;
    let proxy = Arc::new(proxy);
    let mut seen = 0;
    for clients in [1usize, 7, 500] {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let tenant = ["alice", "bob"][c % 2];
                    let model = ["m-small", "m-large"][(c / 2) % 2];
                    let inputs: Vec<String> = (0..1 + c % 5)
                        .map(|j| format!("{tenant}|{model}|{clients}-{c}|{j}"))
                        .collect();
                    let body = if inputs.len() == 1 && c % 3 == 0 {
                        json!({"model": model, "input": inputs[0]})
                    } else {
                        json!({"model": model, "input": inputs})
                    };
                    let answer = embed(&proxy, tenant, &body).await;
                    assert_own_vectors(&answer, &body);
                    answer.json()["usage"]["prompt_tokens"].as_u64().unwrap()
                })
            })
            .collect();
        let mut client_tokens = 0;
        for t in tasks {
            client_tokens += t.await.expect("client task");
        }
        let requests = up.server.requests();
        let calls = &requests[seen..];
        seen = requests.len();
        if clients == 1 {
            // A lone request goes upstream exactly as the client wrote it.
            assert_eq!(calls.len(), 1);
            assert_eq!(
                String::from_utf8_lossy(&calls[0].body),
                json!({"model": "m-small", "input": "alice|m-small|1-0|0"}).to_string()
            );
        }
        let mut upstream_tokens = 0;
        let mut upstream_inputs = 0;
        for call in calls {
            let body: Value = serde_json::from_slice(&call.body).unwrap();
            let tenant = call.headers["authorization"]
                .to_str()
                .unwrap()
                .trim_start_matches("Bearer ")
                .to_string();
            for input in inputs_of(&body) {
                let text = input.as_str().unwrap();
                assert!(
                    text.starts_with(&format!("{tenant}|{}|", body["model"].as_str().unwrap())),
                    "{text} in a call of {tenant} for {}",
                    body["model"]
                );
                upstream_tokens += weight(&input);
                upstream_inputs += 1;
            }
        }
        assert_eq!(
            upstream_inputs,
            (0..clients).map(|c| 1 + c % 5).sum::<usize>()
        );
        // Every client got a share of the usage, and the shares add up to what was billed.
        assert_eq!(client_tokens, upstream_tokens, "{clients} clients");
        if clients == 500 {
            assert!(
                calls.len() <= 100,
                "500 clients took {} upstream calls",
                calls.len()
            );
        }
    }
    let batches = proxy
        .metric(
            "sidelight_embeddings_batch_requests_count",
            &[("route", "embed")],
        )
        .await;
    assert_eq!(batches as usize, seen);
    let saved = proxy
        .metric(
            "sidelight_upstream_calls_saved_total",
            &[("route", "embed"), ("reason", "batch")],
        )
        .await;
    assert_eq!(saved as usize, 1 + 7 + 500 - seen);
    assert!(
        proxy
            .metric(
                "sidelight_embeddings_batch_wait_seconds_count",
                &[("route", "embed")]
            )
            .await
            >= 508.0
    );
    proxy
        .assert_metric_eventually(
            "sidelight_embeddings_pending_inputs",
            &[("route", "embed")],
            0.0,
        )
        .await;
}

#[tokio::test]
async fn base64_and_token_inputs_are_split_like_strings() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "500ms" }),
    ))
    .await;
    let bodies = [
        json!({"model": "m", "input": "hello", "encoding_format": "base64"}),
        json!({"model": "m", "input": ["x", "yy"], "encoding_format": "base64"}),
        json!({"model": "m", "input": [1, 2, 3]}),
        json!({"model": "m", "input": [[4, 5], [6]]}),
        json!({"model": "m", "input": "plain", "encoding_format": "float"}),
        json!({"model": "m", "input": ["more", "plain"], "encoding_format": "float"}),
    ];
    let started = Instant::now();
    let answers = embed_all(&proxy, &bodies).await;
    for (answer, body) in answers.iter().zip(&bodies) {
        assert_own_vectors(answer, body);
        // Every group had two requests, so every answer was split: in input order.
        let indexes: Vec<u64> = answer.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, (0..indexes.len() as u64).collect::<Vec<_>>());
    }
    // Sent when max_wait ran out, not before.
    assert!(started.elapsed() >= Duration::from_millis(500));
    // Three groups: base64 strings, token arrays, float strings.
    let mut calls: Vec<Vec<String>> = upstream_inputs(&up)
        .into_iter()
        .map(|inputs| {
            let mut v: Vec<String> = inputs.iter().map(Value::to_string).collect();
            v.sort();
            v
        })
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        vec![
            vec!["\"hello\"", "\"x\"", "\"yy\""],
            vec!["\"more\"", "\"plain\""], // "plain" twice in one batch: sent once
            vec!["[1,2,3]", "[4,5]", "[6]"],
        ]
    );
}

#[tokio::test]
async fn a_full_batch_is_sent_without_waiting_and_a_large_request_goes_alone() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 4, "max_wait": "10s" }),
    ))
    .await;
    let bodies: Vec<Value> = (0..4)
        .map(|i| json!({"model": "m", "input": [format!("q{i}")]}))
        .collect();
    let answers = tokio::time::timeout(Duration::from_secs(5), embed_all(&proxy, &bodies))
        .await
        .expect("a full batch must not wait for max_wait");
    for (answer, body) in answers.iter().zip(&bodies) {
        assert_own_vectors(answer, body);
    }
    assert_eq!(
        upstream_inputs(&up)
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![4]
    );

    // More inputs than max_inputs: one upstream call, not split.
    let big = json!({"model": "m", "input": ["a", "b", "c", "d", "e", "f"]});
    let answer = tokio::time::timeout(Duration::from_secs(5), embed(&proxy, "t", &big))
        .await
        .expect("sent at once");
    assert_own_vectors(&answer, &big);
    assert_eq!(
        upstream_inputs(&up)
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![4, 6]
    );
}

#[tokio::test]
async fn an_upstream_error_reaches_every_request_of_the_batch() {
    let up = embedder(Duration::ZERO).await;
    up.fail_status.store(503, Ordering::SeqCst);
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "500ms" }),
    ))
    .await;
    let bodies: Vec<Value> = (0..5)
        .map(|i| json!({"model": "m", "input": format!("q{i}")}))
        .collect();
    let answers = embed_all(&proxy, &bodies).await;
    for answer in &answers {
        assert_eq!(answer.status, 503);
        assert_eq!(answer.json()["error"]["message"], "upstream is down");
        assert_eq!(
            answer.header("x-sidelight-error"),
            "",
            "the upstream's error, not ours"
        );
    }
    assert_eq!(up.server.request_count(), 1);

    // In fail mode a bad input fails its whole batch.
    up.fail_status.store(0, Ordering::SeqCst);
    let bodies = [
        json!({"model": "m", "input": ["fine", "FAIL"]}),
        json!({"model": "m", "input": "also fine"}),
    ];
    let answers = embed_all(&proxy, &bodies).await;
    for answer in &answers {
        assert_eq!(answer.status, 400, "{}", answer.body);
    }
    assert_eq!(up.server.request_count(), 2);
}

#[tokio::test]
async fn split_mode_isolates_the_request_with_the_bad_input() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "500ms", "on_error": "split" }),
    ))
    .await;
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            if i == 3 {
                json!({"model": "m", "input": ["fine", "FAIL"]})
            } else {
                json!({"model": "m", "input": [format!("q{i}"), format!("r{i}")]})
            }
        })
        .collect();
    let answers = embed_all(&proxy, &bodies).await;
    for (i, (answer, body)) in answers.iter().zip(&bodies).enumerate() {
        if i == 3 {
            assert_eq!(answer.status, 400, "{}", answer.body);
            assert_eq!(
                answer.json()["error"]["message"],
                "input FAIL is not allowed"
            );
        } else {
            assert_own_vectors(answer, body);
        }
    }
    // The whole batch, then halves down to the bad request alone: 1 + 2 + 2 + 2.
    let calls = upstream_inputs(&up);
    assert_eq!(calls[0].len(), 16);
    assert_eq!(calls.len(), 7, "{calls:?}");
    assert!(calls.contains(&vec![json!("fine"), json!("FAIL")]));
}

#[tokio::test]
async fn a_client_that_leaves_before_the_batch_is_sent_takes_its_inputs_out() {
    use tokio::io::AsyncWriteExt;
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "2s" }),
    ))
    .await;
    let pending = || proxy.metric("sidelight_embeddings_pending_inputs", &[("route", "embed")]);

    let leaving = json!({"model": "m", "input": ["gone-1", "gone-2", "gone-3"]}).to_string();
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer t\r\ncontent-length: {}\r\n\r\n{leaving}",
            leaving.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    support::eventually(
        "the leaving client's inputs wait",
        Duration::from_secs(5),
        || async { pending().await == 3.0 },
    )
    .await;
    let staying = json!({"model": "m", "input": ["kept-1", "kept-2"]});
    let proxy = Arc::new(proxy);
    let p = proxy.clone();
    let body = staying.clone();
    let stays = tokio::spawn(async move { embed(&p, "t", &body).await });
    let pending = || proxy.metric("sidelight_embeddings_pending_inputs", &[("route", "embed")]);
    support::eventually("both clients wait", Duration::from_secs(5), || async {
        pending().await == 5.0
    })
    .await;
    drop(conn);
    support::eventually(
        "the leaving client's inputs are out",
        Duration::from_secs(5),
        || async { pending().await == 2.0 },
    )
    .await;
    let answer = stays.await.unwrap();
    assert_own_vectors(&answer, &staying);
    assert_eq!(
        upstream_inputs(&up),
        vec![vec![json!("kept-1"), json!("kept-2")]]
    );
}

#[tokio::test]
async fn per_input_cache_sends_only_the_missing_inputs() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(
        &config(
            &up.server.url(),
            json!({ "max_inputs": 100, "max_wait": "5ms" }),
        )
        .route_set("cache", json!({ "ttl": "1m" })),
    )
    .await;
    let first = json!({"model": "m", "input": ["a", "b"]});
    let answer = embed(&proxy, "t", &first).await;
    assert_own_vectors(&answer, &first);
    assert_eq!(answer.header("x-sidelight-cache"), "MISS");

    let second = json!({"model": "m", "input": ["b", "c", "a"]});
    let answer = embed(&proxy, "t", &second).await;
    assert_own_vectors(&answer, &second);
    assert_eq!(answer.header("x-sidelight-cache"), "PARTIAL");
    // Only "c" was billed, and only "c" went upstream.
    assert_eq!(answer.json()["usage"]["prompt_tokens"], 1);
    assert_eq!(
        upstream_inputs(&up),
        vec![vec![json!("a"), json!("b")], vec![json!("c")]]
    );

    let third = json!({"model": "m", "input": ["c", "a"]});
    let answer = embed(&proxy, "t", &third).await;
    assert_own_vectors(&answer, &third);
    assert_eq!(answer.header("x-sidelight-cache"), "HIT");
    assert_eq!(
        up.server.request_count(),
        2,
        "a fully cached request never goes upstream"
    );

    // Other parameters and other tenants have their own entries.
    let other_format = json!({"model": "m", "input": ["a"], "encoding_format": "base64"});
    assert_own_vectors(&embed(&proxy, "t", &other_format).await, &other_format);
    assert_own_vectors(&embed(&proxy, "someone-else", &first).await, &first);
    assert_eq!(up.server.request_count(), 4);

    proxy
        .assert_metric_eventually(
            "sidelight_embeddings_cached_inputs_total",
            &[("route", "embed")],
            4.0,
        )
        .await;
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_calls_saved_total",
            &[("route", "embed"), ("reason", "cache")],
            1.0,
        )
        .await;
    // LLM accounting counts the hit's tokens as spend avoided.
    proxy
        .assert_metric_eventually(
            "sidelight_llm_tokens_avoided_total",
            &[("route", "embed"), ("source", "cache")],
            2.0,
        )
        .await;
    // The whole-response cache stays out of the way: no bypass, no store for embeddings.
    assert_eq!(
        proxy
            .metric("sidelight_cache_stores_total", &[("route", "embed")])
            .await,
        0.0
    );
}

#[tokio::test]
async fn bodies_it_cannot_batch_pass_through_untouched() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "5ms" }),
    ))
    .await;
    for body in [
        "not json",
        r#"{"model": "m", "input": []}"#,
        r#"{"model": "m", "input": ["a", 1]}"#,
        r#"{"model": "m", "model": "n", "input": "a"}"#,
    ] {
        let answer = support::send(
            Request::post(proxy.url("/v1/embeddings"))
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await;
        assert_eq!(
            answer.header("x-sidelight-error"),
            "",
            "{body}: {}",
            answer.body
        );
        assert_eq!(
            up.server.last_request().body,
            body.as_bytes(),
            "sent as written"
        );
    }
}

#[tokio::test]
async fn requests_on_different_workers_share_a_batch() {
    let up = embedder(Duration::ZERO).await;
    let yaml = config(
        &up.server.url(),
        json!({ "max_inputs": 1000, "max_wait": "500ms" }),
    )
    .set("runtime", json!({ "workers": 2 }))
    .yaml();
    let proxy = proxy::start(&yaml).await;
    // Each request on its own connection: the kernel spreads them over both workers.
    let bodies: Vec<Value> = (0..40)
        .map(|i| json!({"model": "m", "input": format!("w{i}")}))
        .collect();
    let answers = embed_all(&proxy, &bodies).await;
    for (answer, body) in answers.iter().zip(&bodies) {
        assert_own_vectors(answer, body);
    }
    assert_eq!(
        upstream_inputs(&up)
            .iter()
            .map(Vec::len)
            .collect::<Vec<_>>(),
        vec![40]
    );
}

#[tokio::test]
async fn an_input_asked_for_twice_in_one_batch_is_sent_once() {
    let up = embedder(Duration::ZERO).await;
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "500ms" }),
    ))
    .await;
    let bodies = [
        json!({"model": "m", "input": ["dup", "x"]}),
        json!({"model": "m", "input": "dup"}),
        json!({"model": "m", "input": ["y", "dup", "dup"]}),
    ];
    let answers = embed_all(&proxy, &bodies).await;
    let mut tokens = 0;
    for (answer, body) in answers.iter().zip(&bodies) {
        assert_own_vectors(answer, body);
        tokens += answer.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let mut sent: Vec<String> = upstream_inputs(&up)
        .concat()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    sent.sort();
    assert_eq!(sent, vec!["dup", "x", "y"]);
    // The clients' usage shares add up to what the upstream billed for the three inputs.
    assert_eq!(tokens, 5);
}

#[tokio::test]
async fn an_answer_that_cannot_be_split_is_never_guessed_at() {
    let up = embedder(Duration::ZERO).await;
    up.short_answers.store(true, Ordering::SeqCst);
    let proxy = proxy::start(&config(
        &up.server.url(),
        json!({ "max_inputs": 100, "max_wait": "500ms" }),
    ))
    .await;
    let bodies: Vec<Value> = (0..3)
        .map(|i| json!({"model": "m", "input": format!("s{i}")}))
        .collect();
    let answers = embed_all(&proxy, &bodies).await;
    // The batched answer had 2 embeddings for 3 inputs: each request was sent again alone.
    for (answer, body) in answers.iter().zip(&bodies) {
        assert_own_vectors(answer, body);
    }
    let sizes: Vec<usize> = upstream_inputs(&up).iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 1, 1, 1]);
}
