//! Batch timing on tokio's paused clock, against an in-memory upstream that records what it got.

use super::*;
use crate::config::BatchConfig;
use http_body_util::BodyExt;
use std::sync::Mutex as StdMutex;

type Calls = Arc<StdMutex<Vec<Value>>>;

/// An upstream that answers every embeddings call at once, one `[i]` vector per input.
fn upstream(calls: Calls) -> RouteService {
    RouteService::new(tower::service_fn(move |req: ProxyRequest| -> ProxyFuture {
        let calls = calls.clone();
        Box::pin(async move {
            let body = req
                .into_body()
                .collect()
                .await
                .map_err(|e| ProxyError::ClientBody(e.to_string()))?
                .to_bytes();
            let body: Value =
                serde_json::from_slice(&body).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
            let count = match &body["input"] {
                Value::Array(items) => items.len(),
                _ => 1,
            };
            calls.lock().unwrap().push(body);
            let data: Vec<Value> = (0..count)
                .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [i]}))
                .collect();
            let answer = serde_json::json!({"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": count, "total_tokens": count}});
            Ok::<_, ProxyError>(Response::new(full(answer.to_string())))
        })
    }))
}

fn batcher(max_inputs: usize, max_wait: Duration) -> (Batch, Calls, Arc<Metrics>) {
    batcher_with(BatchConfig {
        max_inputs,
        max_wait,
        ..BatchConfig::default()
    })
}

fn batcher_with(config: BatchConfig) -> (Batch, Calls, Arc<Metrics>) {
    let calls = Calls::default();
    let metrics = Arc::new(Metrics::new());
    let layer = BatchLayer::new("r", "u", &config, None, Arc::default(), &metrics);
    (layer.layer(upstream(calls.clone())), calls, metrics)
}

fn request(inputs: &[&str]) -> ProxyRequest {
    let body = serde_json::json!({"model": "m", "input": inputs});
    Request::post("/v1/embeddings")
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn sizes(calls: &Calls) -> Vec<usize> {
    calls
        .lock()
        .unwrap()
        .iter()
        .map(|b| b["input"].as_array().map_or(1, Vec::len))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_sent_when_max_wait_has_passed_and_not_before() {
    let (service, calls, _) = batcher(100, Duration::from_millis(5));
    let a = tokio::spawn(service.clone().call(request(&["a"])));
    let b = tokio::spawn(service.clone().call(request(&["b", "c"])));
    settle().await;
    tokio::time::advance(Duration::from_micros(4900)).await;
    settle().await;
    assert!(sizes(&calls).is_empty(), "sent before max_wait");
    tokio::time::advance(Duration::from_micros(200)).await;
    settle().await;
    assert_eq!(sizes(&calls), vec![3]);
    let a: Value = serde_json::from_slice(
        &a.await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(a["data"][0]["embedding"], serde_json::json!([0]));
    assert_eq!(a["usage"]["prompt_tokens"], 1);
    let b: Value = serde_json::from_slice(
        &b.await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(b["data"][1]["embedding"], serde_json::json!([2]));
    assert_eq!(b["data"][1]["index"], 1);
    assert_eq!(b["usage"]["prompt_tokens"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_is_sent_without_waiting() {
    let (service, calls, metrics) = batcher(3, Duration::from_secs(5));
    let tasks: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|i| tokio::spawn(service.clone().call(request(&[i]))))
        .collect();
    settle().await;
    assert_eq!(sizes(&calls), vec![3], "no time has passed");
    for t in tasks {
        assert!(t.await.unwrap().is_ok());
    }
    // The next request starts a new batch; one that overflows it sends the pending one first.
    let d = tokio::spawn(service.clone().call(request(&["d", "e"])));
    settle().await;
    let f = tokio::spawn(service.clone().call(request(&["f", "g"])));
    settle().await;
    assert_eq!(sizes(&calls), vec![3, 2]);
    assert!(d.await.unwrap().is_ok());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(f.await.unwrap().is_ok());
    assert_eq!(sizes(&calls), vec![3, 2, 2]);
    let saved = metrics.llm.batch("r").saved_batch.get();
    assert_eq!(saved, 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_leaves_its_batch() {
    let (service, calls, metrics) = batcher(100, Duration::from_millis(5));
    let gone = tokio::spawn(service.clone().call(request(&["x", "y"])));
    let stays = tokio::spawn(service.clone().call(request(&["z"])));
    settle().await;
    let pending = metrics.llm.batch("r").pending;
    assert_eq!(pending.get(), 3);
    gone.abort();
    settle().await;
    assert_eq!(pending.get(), 1);
    tokio::time::advance(Duration::from_millis(5)).await;
    assert!(stays.await.unwrap().is_ok());
    assert_eq!(sizes(&calls), vec![1]);
    assert_eq!(calls.lock().unwrap()[0]["input"], serde_json::json!(["z"]));
    assert_eq!(pending.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_as_large_as_a_batch_goes_alone_and_leaves_the_pending_batch_waiting() {
    let (service, calls, _) = batcher(3, Duration::from_millis(5));
    let small = tokio::spawn(service.clone().call(request(&["a"])));
    settle().await;
    let large = tokio::spawn(service.clone().call(request(&["b", "c", "d", "e"])));
    settle().await;
    assert_eq!(sizes(&calls), vec![4]);
    assert!(large.await.unwrap().is_ok());
    tokio::time::advance(Duration::from_millis(5)).await;
    assert!(small.await.unwrap().is_ok());
    assert_eq!(sizes(&calls), vec![4, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_sent_before_its_body_would_pass_max_body_bytes() {
    let (service, calls, _) = batcher_with(BatchConfig {
        max_inputs: 100,
        max_wait: Duration::from_millis(5),
        max_body_bytes: Some(crate::config::ByteSize(120)),
        ..BatchConfig::default()
    });
    let long = |c: &str| c.repeat(40);
    let a = tokio::spawn(service.clone().call(request(&[&long("a")])));
    settle().await;
    let b = tokio::spawn(service.clone().call(request(&[&long("b")])));
    settle().await;
    assert!(sizes(&calls).is_empty(), "two fit");
    let c = tokio::spawn(service.clone().call(request(&[&long("c")])));
    settle().await;
    // A third would pass 120 bytes: the first two go now, the third starts a new batch.
    assert_eq!(sizes(&calls), vec![2]);
    tokio::time::advance(Duration::from_millis(5)).await;
    for t in [a, b, c] {
        assert!(t.await.unwrap().is_ok());
    }
    assert_eq!(sizes(&calls), vec![2, 1]);
}
