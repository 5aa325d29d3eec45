//! The README tour, as a test: the shipped example config in front of the shipped mock
//! OpenAI upstream, with no API key and no network.

mod support;

use sidelight::config::Config;
use sidelight::server::Sidelight;
use sidelight::testing::mock_openai::{MockConfig, MockServer};
use std::time::Duration;

async fn example_config_in_front_of_the_mock() -> (sidelight::server::Running, MockServer) {
    let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), MockConfig::default())
        .await
        .unwrap();
    // The shipped file as written, not support::Config: the example config is what is tested.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidelight.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let env = [(
        "OPENAI_BASE_URL".to_string(),
        format!("http://{}", mock.addr()),
    )];
    let mut config = Config::from_yaml(&text, &|name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .expect("the example config is valid");
    // Free ports instead of the example's fixed ones, so tests can run in parallel.
    for l in &mut config.listeners {
        l.address = "127.0.0.1:0".parse().unwrap();
    }
    config.admin.address = "127.0.0.1:0".parse().unwrap();
    (Sidelight::start(config).await.expect("starts"), mock)
}

#[tokio::test]
async fn readme_tour_against_the_mock() {
    let (running, mock) = example_config_in_front_of_the_mock().await;
    let base = format!("http://{}", running.listeners[0]);
    // The example config health-checks the mock (GET /v1/models at start, then every 10 s):
    // wait for the first probe, so the mock's request count below is ours.
    let admin = format!("http://{}/metrics", running.admin);
    support::eventually(
        "the first health probe",
        std::time::Duration::from_secs(5),
        || {
            let admin = admin.clone();
            async move {
                let text = support::get(&admin).await.body;
                support::metric(
                    &text,
                    "sidelight_health_checks_total",
                    &[("upstream", "openai"), ("result", "success")],
                ) == Some(1.0)
            }
        },
    )
    .await;
    let probes = mock.requests();

    let answer = support::post(
        &format!("{base}/openai/v1/chat/completions"),
        r#"{"model":"mock-gpt","messages":[{"role":"user","content":"hello there"}]}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "mock reply: hello there"
    );

    let answer = support::post(
        &format!("{base}/openai/v1/chat/completions"),
        r#"{"model":"mock-gpt","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"stream me"}]}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "text/event-stream");
    let events: Vec<&str> = answer
        .body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert!(events.len() >= 10, "{events:?}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(answer.body.contains("\"usage\""));

    let answer = support::post(
        &format!("{base}/openai/v1/embeddings"),
        r#"{"model":"mock-embedding","input":["a","b","c"]}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["data"].as_array().unwrap().len(), 3);
    assert_eq!(mock.requests() - probes, 3);

    // The mock needs no key, and without OPENAI_API_KEY no Authorization header is invented.
    let metrics = support::get(&format!("http://{}/metrics", running.admin))
        .await
        .body;
    assert_eq!(
        support::metric(
            &metrics,
            "sidelight_requests_total",
            &[("route", "openai"), ("status_class", "2xx")]
        ),
        Some(3.0)
    );
    assert!(running.shutdown().await);
}

#[tokio::test]
async fn api_key_from_the_environment_reaches_the_upstream_only() {
    // A tiny upstream that echoes the Authorization header it got.
    let up = support::server::http1()
        .route_fn("/", |req| {
            let auth = req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            http::Response::new(sidelight::http::body::full(auth))
        })
        .run()
        .await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidelight.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let url = up.url();
    let mut config = Config::from_yaml(&text, &|name| match name {
        "OPENAI_BASE_URL" => Some(url.clone()),
        "OPENAI_API_KEY" => Some("sk-from-env".into()),
        _ => None,
    })
    .unwrap();
    config.listeners[0].address = "127.0.0.1:0".parse().unwrap();
    config.admin.address = "127.0.0.1:0".parse().unwrap();
    let running = Sidelight::start(config).await.unwrap();
    let answer = support::get(&format!("http://{}/openai/v1/models", running.listeners[0])).await;
    assert_eq!(answer.body, "Bearer sk-from-env");
    // /config shows where the key comes from, never the key.
    let shown = support::get(&format!("http://{}/config", running.admin))
        .await
        .body;
    assert!(shown.contains("${OPENAI_API_KEY:-}"), "{shown}");
    assert!(!shown.contains("sk-from-env"));
    tokio::time::timeout(Duration::from_secs(5), running.shutdown())
        .await
        .unwrap();
}
