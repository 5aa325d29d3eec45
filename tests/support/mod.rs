//! Shared integration-test harness: in-process upstream servers (`server`), a sidelight started
//! in-process from YAML (`proxy`), the config builder every test writes its YAML with (`config`),
//! and client helpers. Every wait polls with a deadline.
#![allow(dead_code)]

pub mod config;
pub mod contract;
pub mod pg;
pub mod pgclient;
pub mod proxy;
pub mod server;

#[allow(unused_imports)] // not every test file uses all three
pub use config::{Config, Route, Upstream};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sidelight::http::body::{full, ProxyBody};
use std::future::Future;
use std::time::Duration;

pub type TestClient = Client<HttpConnector, ProxyBody>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A fresh client whose connections are never reused, for tests that count connections.
pub fn client_no_pool() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn send(req: Request<ProxyBody>) -> Answer {
    let response = client().request(req).await.expect("request failed");
    collect(response).await
}

pub async fn collect(response: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(full(Bytes::new())).unwrap()).await
}

/// A GET on a brand-new client connection (no client-side reuse), for connection-count tests.
pub async fn get_on_new_connection(url: &str) -> Answer {
    let response = client_no_pool()
        .request(Request::get(url).body(full(Bytes::new())).unwrap())
        .await
        .expect("request failed");
    collect(response).await
}

pub async fn post(url: &str, body: &str) -> Answer {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

/// Polls `check` until it returns true, failing with `what` after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sum of the samples of `name` whose labels include all of `labels` (Prometheus text format).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let pairs: Vec<(String, String)> = label_text
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim_matches(',').to_string(),
                    v.trim_matches('"').to_string(),
                )
            })
            .collect();
        let all = labels
            .iter()
            .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v));
        if all {
            let v: f64 = value.parse().unwrap_or(f64::NAN);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}
