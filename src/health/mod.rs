//! Active health checks: every endpoint of an upstream with `health_check` is probed on its own
//! schedule; enough failures in a row take it out of rotation, enough successes bring it back.
//! The verdict goes to the upstream's balancer, shared by every worker. Passive checks (outlier
//! detection) live in the balancer itself.

use crate::config::{Config, HealthCheckConfig, RouteKind, StatusMatch, UpstreamConfig};
use crate::http::body::empty;
use crate::metrics::balancer::HealthCheckCounters;
use crate::metrics::Metrics;
use crate::upstream::balance::Balancer;
use crate::upstream::{BuildError, Upstream};
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How an upstream is probed, from its config and the kind of routes that use it.
struct ProbePlan {
    path: String,
    expected: Vec<StatusMatch>,
    /// Added to the probe when the upstream's own headers lack them.
    extra_headers: Vec<(&'static str, &'static str)>,
}

fn plan(config: &Config, upstream: &UpstreamConfig, hc: &HealthCheckConfig) -> ProbePlan {
    let kind_used = |k: RouteKind| {
        config
            .routes
            .iter()
            .any(|r| r.upstream == upstream.name && r.kind == k)
    };
    let llm = kind_used(RouteKind::Openai) || kind_used(RouteKind::Anthropic);
    // A cheap model listing for LLM upstreams, never a billed completion.
    let path = hc
        .path
        .clone()
        .unwrap_or_else(|| if llm { "/v1/models" } else { "/" }.to_string());
    let sends = |name: &str| {
        upstream
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case(name) && !v.has_empty_var)
    };
    let expected = match &hc.expected_statuses {
        Some(list) => list.clone(),
        // With no key of its own the probe cannot authenticate: an answer at all means up.
        None if llm && !sends("authorization") && !sends("x-api-key") => vec![
            StatusMatch::Class(2),
            StatusMatch::Code(401),
            StatusMatch::Code(403),
        ],
        None => vec![StatusMatch::Class(2)],
    };
    let mut extra_headers = Vec::new();
    // Anthropic's API refuses requests without a version.
    if kind_used(RouteKind::Anthropic) && !sends("anthropic-version") {
        extra_headers.push(("anthropic-version", "2023-06-01"));
    }
    ProbePlan {
        path,
        expected,
        extra_headers,
    }
}

/// Starts the probes of every upstream that has `health_check`, on the current runtime.
/// The tasks run until aborted.
pub fn start(
    config: &Config,
    metrics: &Metrics,
    balancers: &HashMap<String, Arc<Balancer>>,
) -> Result<Vec<JoinHandle<()>>, BuildError> {
    let mut tasks = Vec::new();
    for u in &config.upstreams {
        let (Some(hc), Some(balancer)) = (&u.health_check, balancers.get(&u.name)) else {
            continue;
        };
        // Probes use a pool of their own, so they never take a connection a request wanted.
        let upstream = Arc::new(Upstream::build(u, metrics, balancer.clone())?);
        let plan = plan(config, u, hc);
        let counters = metrics.balancer.health_checks(&u.name);
        let probe = Arc::new(Probe {
            path: plan.path,
            config: hc.clone(),
            expected: plan.expected,
            extra_headers: plan.extra_headers,
            counters,
        });
        tracing::info!(upstream = %u.name, path = %probe.path, interval = ?hc.interval, "active health checks on");
        for i in 0..upstream.endpoints.len() {
            tasks.push(tokio::spawn(run(upstream.clone(), i, probe.clone())));
        }
    }
    Ok(tasks)
}

struct Probe {
    path: String,
    config: HealthCheckConfig,
    expected: Vec<StatusMatch>,
    extra_headers: Vec<(&'static str, &'static str)>,
    counters: HealthCheckCounters,
}

enum Verdict {
    Pass,
    Fail(String),
    Timeout,
}

/// Probes endpoint `i` forever: at once, then every interval.
async fn run(upstream: Arc<Upstream>, i: usize, probe: Arc<Probe>) {
    let mut ticks = tokio::time::interval(probe.config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut healthy = true;
    let (mut passes, mut fails) = (0u32, 0u32);
    let endpoint = upstream.endpoints[i].authority.to_string();
    loop {
        ticks.tick().await;
        let verdict = check(&upstream, i, &probe).await;
        match &verdict {
            Verdict::Pass => {
                probe.counters.success.inc();
                passes += 1;
                fails = 0;
            }
            Verdict::Fail(_) => {
                probe.counters.failure.inc();
                fails += 1;
                passes = 0;
            }
            Verdict::Timeout => {
                probe.counters.timeout.inc();
                fails += 1;
                passes = 0;
            }
        }
        if healthy && fails >= probe.config.unhealthy_threshold {
            healthy = false;
            let why = match verdict {
                Verdict::Fail(why) => why,
                _ => format!("no answer within {:?}", probe.config.timeout),
            };
            tracing::warn!(upstream = %upstream.name, %endpoint, fails, reason = %why, "endpoint failed its health checks; out of rotation");
            upstream.balancer.set_active_health(i, false);
        } else if !healthy && passes >= probe.config.healthy_threshold {
            healthy = true;
            tracing::info!(upstream = %upstream.name, %endpoint, passes, "endpoint passes its health checks again; back in rotation");
            upstream.balancer.set_active_health(i, true);
        }
    }
}

async fn check(upstream: &Upstream, i: usize, probe: &Probe) -> Verdict {
    let endpoint = &upstream.endpoints[i];
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("{}{}", endpoint.base_path, probe.path))
        .header(header::HOST, endpoint.host_header.clone())
        .header(
            header::USER_AGENT,
            HeaderValue::from_static(concat!(
                "sidelight-health-check/",
                env!("CARGO_PKG_VERSION")
            )),
        )
        .body(empty());
    if let Ok(req) = &mut req {
        // The upstream's own headers (an API key): listing models needs it.
        for &(name, value) in &probe.extra_headers {
            req.headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        for (name, value) in &upstream.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(credentials) = &endpoint.authorization {
            req.headers_mut()
                .insert(header::AUTHORIZATION, credentials.clone());
        }
    }
    let req = match req {
        Ok(req) => req,
        Err(e) => return Verdict::Fail(format!("cannot build the probe: {e}")),
    };
    let deadline = Instant::now() + probe.config.timeout;
    let exchange = async {
        let response = upstream.send(i, req).await.map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the body to its end so the connection can be reused for the next probe.
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(status)
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => Verdict::Timeout,
        Ok(Err(e)) => Verdict::Fail(e),
        Ok(Ok(status)) if probe.expected.iter().any(|m| m.matches(status)) => Verdict::Pass,
        Ok(Ok(status)) => Verdict::Fail(format!("status {status}")),
    }
}
