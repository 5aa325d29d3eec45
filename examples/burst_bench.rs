//! Burst benchmark: an app fires a burst at an upstream that answers 429 above a rate (as LLM
//! providers do). How many of its requests succeed, sent directly versus through sidelight with
//! a `queue`-mode rate limit set just under the upstream's quota?
//!
//! ```text
//! cargo run --release --example burst_bench -- --clients 300 --rate 100 --rounds 5
//! ```
//!
//! Starts, in this process, an upstream that admits `--rate` requests/s with a burst of 10
//! (GCRA, governor) and answers `429` with `Retry-After: 1` above it (each admitted request takes
//! 2 ms), and one sidelight (`workers: 1`) whose route to it has
//! `rate_limits: [{ rate: 0.9 x --rate /s, burst: 10, mode: queue, max_wait: 60s }]`.
//! Each round, for each mode (order alternating), `--clients` requests start at the same moment
//! (one keep-alive connection each); the app does not retry. Prints per mode the medians over
//! rounds of: requests that succeeded, got 429, failed otherwise, time until the last answer,
//! and the ratio of successes (sidelight / direct).

#[path = "common/stats.rs"]
mod stats;

use stats::median;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sidelight::config::Config;
use sidelight::server::Sidelight;

/// The command line (clap: `--help` lists it).
#[derive(clap::Parser)]
#[command(
    name = "burst_bench",
    about = "A burst against an upstream that answers 429 above its quota"
)]
struct Args {
    /// Requests the app starts at the same moment.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    /// Requests per second the upstream admits (burst 10); sidelight queues at 90% of it.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(10..))]
    rate: u32,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
}

/// The upstream: 2 ms per admitted request, 429 above its quota.
async fn upstream(rate: u32) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let quota = Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN));
    let limiter: Arc<DefaultDirectRateLimiter> = Arc::new(RateLimiter::direct(quota));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let limiter = limiter.clone();
                    async move {
                        let response = if limiter.check().is_ok() {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Response::new(Full::new(Bytes::from_static(b"ok")))
                        } else {
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"rate limited")));
                            *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                            r.headers_mut().insert(
                                "retry-after",
                                hyper::header::HeaderValue::from_static("1"),
                            );
                            r
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[derive(Default, Clone, Copy)]
struct Round {
    ok: usize,
    limited: usize,
    failed: usize,
    elapsed: Duration,
}

async fn burst(client: &Client<HttpConnector, Full<Bytes>>, url: &str, n: usize) -> Round {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
                let response = client.request(req).await.ok()?;
                let status = response.status();
                response.into_body().collect().await.ok()?;
                Some(status)
            })
        })
        .collect();
    let mut round = Round::default();
    for task in tasks {
        match task.await.ok().flatten() {
            Some(StatusCode::OK) => round.ok += 1,
            Some(StatusCode::TOO_MANY_REQUESTS) => round.limited += 1,
            _ => round.failed += 1,
        }
    }
    round.elapsed = start.elapsed();
    round
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let clients = args.clients as usize;
    let up = match upstream(args.rate).await {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("burst_bench: cannot start the upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let queued_rate = (args.rate * 9 / 10).max(1);
    let yaml = format!(
        r#"
listeners: [{{ name: main, address: "127.0.0.1:0" }}]
admin: {{ address: "127.0.0.1:0" }}
runtime: {{ workers: 1 }}
log: {{ level: warn, access_log: false }}
upstreams:
  - name: quota
    endpoints: ["http://{up}"]
    pool: {{ max_idle_per_endpoint: 1024 }}
routes:
  - name: quota
    upstream: quota
    rate_limits:
      - {{ name: quota, rate: {queued_rate}/s, burst: 10, mode: queue, max_wait: 60s, max_queue: 100000 }}
"#
    );
    let config = match Config::from_yaml(&yaml, &|_| None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("burst_bench: bad config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match Sidelight::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("burst_bench: cannot start sidelight: {e}");
            return ExitCode::FAILURE;
        }
    };
    let via = format!("http://{}/", running.listeners[0]);
    let direct = format!("http://{up}/");
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build(HttpConnector::new());

    println!(
        "burst benchmark: {} requests at once, upstream admits {}/s (burst 10) and answers 429 above; sidelight queues at {}/s; medians of {} rounds",
        clients, args.rate, queued_rate, args.rounds
    );
    let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for r in 0..args.rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for mode in order {
            // Let both buckets refill, so every run starts from the same state.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let url = if mode == 0 { &direct } else { &via };
            let round = burst(&client, url, clients).await;
            eprintln!(
                "[bench] round {} {:<9} ok {:>4}  429 {:>4}  failed {:>3}  last answer after {:>6.0} ms",
                r + 1,
                ["direct", "sidelight"][mode],
                round.ok,
                round.limited,
                round.failed,
                round.elapsed.as_secs_f64() * 1000.0
            );
            results[mode].push(round);
        }
    }
    println!("\n| mode | succeeded | 429 | other failures | last answer after |");
    println!("|---|---|---|---|---|");
    let mut ok = [0.0; 2];
    for (mode, name) in ["direct", "sidelight (queue)"].iter().enumerate() {
        let rs = &results[mode];
        let med = |f: &dyn Fn(&Round) -> f64| median(rs.iter().map(f).collect()).unwrap_or(0.0);
        ok[mode] = med(&|x| x.ok as f64);
        println!(
            "| {name} | {:.0} / {} | {:.0} | {:.0} | {:.2} s |",
            ok[mode],
            clients,
            med(&|x| x.limited as f64),
            med(&|x| x.failed as f64),
            med(&|x| x.elapsed.as_secs_f64()),
        );
    }
    println!(
        "\nsucceeded, sidelight / direct = {:.1}x",
        ok[1] / ok[0].max(1.0)
    );
    running.shutdown().await;
    ExitCode::SUCCESS
}
