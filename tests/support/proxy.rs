//! sidelight started in-process from a YAML snippet, on free loopback ports.

use super::config::ConfigText;
use super::metric;
use sidelight::config::Config;
use sidelight::server::{Running, Sidelight};
use std::time::Duration;

pub struct Proxy {
    running: Option<Running>,
    pub addr: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
}

/// Starts sidelight with `config` (a [`super::Config`], or YAML text); listeners and admin default
/// to 127.0.0.1:0 unless the config sets them. `env` resolves `${VARS}` in the config.
pub async fn start_with_env(config: &(impl ConfigText + ?Sized), env: &[(&str, &str)]) -> Proxy {
    let mut text = config.config_text();
    // Top-level sections only (`postgres:` has `listeners:` of its own).
    let has = |section: &str| text.lines().any(|l| l.starts_with(section));
    let (listeners, runtime, admin) = (has("listeners:"), has("runtime:"), has("admin:"));
    if !listeners {
        text.push_str("\nlisteners:\n  - { name: main, address: \"127.0.0.1:0\" }\n");
    }
    // One worker unless a test asks for more, so connection counts are deterministic.
    if !runtime {
        text.push_str("\nruntime: { workers: 1 }\n");
    }
    if !admin {
        text.push_str("\nadmin: { address: \"127.0.0.1:0\" }\n");
    }
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::from_yaml(&text, &|name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
    let running = Sidelight::start(config)
        .await
        .expect("sidelight failed to start");
    Proxy {
        addr: running.listeners[0],
        admin: running.admin,
        running: Some(running),
    }
}

pub async fn start(config: &(impl ConfigText + ?Sized)) -> Proxy {
    start_with_env(config, &[]).await
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn listener_url(&self, index: usize, path: &str) -> String {
        let running = self.running.as_ref().expect("running");
        format!("http://{}{}", running.listeners[index], path)
    }

    /// Bound PostgreSQL listener addresses.
    pub fn pg_listeners(&self) -> Vec<std::net::SocketAddr> {
        self.running
            .as_ref()
            .map(|r| r.pg_listeners.clone())
            .unwrap_or_default()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub async fn metrics(&self) -> String {
        super::get(&self.admin_url("/metrics")).await.body
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Waits until the metric (summed over matching series) equals `want`.
    pub async fn assert_metric_eventually(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.metric(name, labels).await;
            if now == want {
                return;
            }
            if tokio::time::Instant::now() > end {
                panic!(
                    "{name}{labels:?} is {now}, expected {want}\n{}",
                    self.metrics().await
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the graceful shutdown; resolves to whether every request finished in time.
    pub fn shutdown(&mut self) -> impl std::future::Future<Output = bool> {
        let running = self.running.take().expect("already shut down");
        running.shutdown()
    }
}
