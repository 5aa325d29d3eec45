//! Embeddings micro-batching benchmark: N clients each send one single-input embeddings request
//! at the same moment, through sidelight with and without `batch:`.
//!
//! ```text
//! cargo run --release --example embed_batch_bench -- --clients 256 --rounds 5
//! ```
//!
//! Starts, in this process, an upstream (every embeddings call takes `--latency-ms`, default
//! 20 ms, whatever its number of inputs; vectors of `--dim` floats, default 1536 like OpenAI's
//! small model; `--upstream fixed`, the default, answers with precomputed vectors so a call
//! costs its latency, `--upstream mock` is the bundled mock, which computes every vector) and
//! one sidelight (`runtime: { workers: 1 }`, ports
//! 127.0.0.1:0) with two `kind: openai` routes to it that differ only in batching:
//!
//! - `/batch/...`   → `batch: { max_inputs: <--max-inputs, default 256>, max_wait: <--max-wait-ms, default 5> ms }`
//! - `/nobatch/...` → no `batch:` (every request is its own upstream call)
//!
//! Each round, for each mode (order alternating per round), `--clients` tasks wait on one start
//! signal, then each sends `POST /v1/embeddings` with its own single string input (unique per
//! client and round) through a shared hyper-util legacy client (keep-alive pool, warmed up with
//! one unmeasured burst per mode) and times it from the start signal to the last body byte,
//! checking that the answer is 200 with exactly one embedding of `--dim` floats. Upstream calls
//! are the mock's request counter delta.
//!
//! Prints, per mode, the medians over rounds of: upstream calls, client p50 / p99 / max, then
//! the ratios (upstream calls without / with batching, target >= 10; p99 with / without, target
//! <= 1.0), and writes the same as Markdown to `benches/results/embed-batch-latest.md`
//! (`--out` to change). Exit status 1 if any client request failed.

#[path = "common/stats.rs"]
mod stats;

use stats::{fmt_ms, median, ms, percentile};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sidelight::config::Config;
use sidelight::server::Sidelight;
use sidelight::testing::mock_openai::{MockConfig, MockServer};
use tokio::sync::watch;

struct Args {
    clients: usize,
    rounds: usize,
    latency_ms: u64,
    dim: usize,
    max_inputs: usize,
    max_wait_ms: u64,
    upstream: UpstreamKind,
    timeout: Duration,
    out: std::path::PathBuf,
    given: Vec<String>,
}

/// The command line (clap: `--help` lists it).
#[derive(clap::Parser)]
#[command(
    name = "embed_batch_bench",
    about = "Embeddings micro-batching benchmark"
)]
struct Cli {
    /// Clients sending one single-input embeddings request each, at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// The upstream's latency per call.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    latency_ms: u64,
    /// Floats per vector.
    #[arg(long, default_value_t = 1536, value_parser = clap::value_parser!(u64).range(1..))]
    dim: u64,
    /// The batching route's `batch.max_inputs`.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_inputs: u64,
    /// The batching route's `batch.max_wait`, milliseconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    max_wait_ms: u64,
    #[arg(long, value_enum, default_value = "fixed")]
    upstream: UpstreamKind,
    /// Per-request timeout, seconds.
    #[arg(long = "timeout-s", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: u64,
    /// Where the Markdown report goes (default: benches/results/embed-batch-latest.md).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let cli = <Cli as clap::Parser>::parse();
    Args {
        clients: cli.clients as usize,
        rounds: cli.rounds as usize,
        latency_ms: cli.latency_ms,
        dim: cli.dim as usize,
        max_inputs: cli.max_inputs as usize,
        max_wait_ms: cli.max_wait_ms,
        upstream: cli.upstream,
        timeout: Duration::from_secs(cli.timeout_s),
        out: cli.out.unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("benches/results/embed-batch-latest.md")
        }),
        given: std::env::args().skip(1).collect(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum UpstreamKind {
    /// [`FixedUpstream`]: the call's latency is the only cost that grows with calls.
    Fixed,
    /// The bundled mock, which computes every vector (serially within one call).
    Mock,
}

/// An embeddings upstream whose cost is its latency per call: it answers each input with one
/// of 16 precomputed vectors (picked by the input's hash), so an answer costs a copy, not a
/// computation, whatever the number of inputs. Like a GPU-backed provider, where a call of 256
/// short inputs takes about as long as a call of one.
struct FixedUpstream {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FixedUpstream {
    async fn start(latency: Duration, dim: usize) -> std::io::Result<FixedUpstream> {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let vectors: Arc<Vec<String>> = Arc::new(
            (0..16u32)
                .map(|k| {
                    let v: Vec<f32> = (0..dim)
                        .map(|i| {
                            ((i as u32).wrapping_mul(2_654_435_761) ^ k) as f32 / u32::MAX as f32
                                - 0.5
                        })
                        .collect();
                    serde_json::to_string(&v).unwrap_or_default()
                })
                .collect(),
        );
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (vectors, counter) = (vectors.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: Request<hyper::body::Incoming>| {
                            let (vectors, counter) = (vectors.clone(), counter.clone());
                            async move {
                                counter.fetch_add(1, Ordering::Relaxed);
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let parsed: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                let inputs: Vec<String> = match &parsed["input"] {
                                    serde_json::Value::Array(items) => {
                                        items.iter().map(|i| i.to_string()).collect()
                                    }
                                    other => vec![other.to_string()],
                                };
                                tokio::time::sleep(latency).await;
                                let mut out = String::with_capacity(
                                    inputs.len() * (vectors[0].len() + 64) + 128,
                                );
                                out.push_str(r#"{"object":"list","data":["#);
                                for (i, input) in inputs.iter().enumerate() {
                                    if i > 0 {
                                        out.push(',');
                                    }
                                    let k = input.bytes().fold(0usize, |h, b| {
                                        h.wrapping_mul(31).wrapping_add(b as usize)
                                    }) % vectors.len();
                                    let _ = write!(
                                        out,
                                        r#"{{"object":"embedding","index":{i},"embedding":{}}}"#,
                                        vectors[k]
                                    );
                                }
                                let n = inputs.len();
                                let _ = write!(
                                    out,
                                    r#"],"model":"fixed-embedding","usage":{{"prompt_tokens":{n},"total_tokens":{n}}}}}"#
                                );
                                let mut resp = hyper::Response::new(Full::new(Bytes::from(out)));
                                resp.headers_mut().insert(
                                    "content-type",
                                    hyper::header::HeaderValue::from_static("application/json"),
                                );
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(FixedUpstream { addr, requests })
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Either upstream, behind what the benchmark needs: an address and a call counter.
enum Upstream {
    Fixed(FixedUpstream),
    Mock(MockServer),
}

impl Upstream {
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Upstream::Fixed(u) => u.addr,
            Upstream::Mock(m) => m.addr(),
        }
    }
    fn requests(&self) -> u64 {
        match self {
            Upstream::Fixed(u) => u.requests(),
            Upstream::Mock(m) => m.requests(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Batch,
    NoBatch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Batch => "batch: on",
            Mode::NoBatch => "batch: off",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Mode::Batch => "/batch",
            Mode::NoBatch => "/nobatch",
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Run {
    upstream_calls: u64,
    latencies: Vec<Duration>, // sorted
    errors: Vec<String>,
}

/// One client's request; `Ok(elapsed)` when the answer holds exactly its one embedding.
async fn one(
    client: &HttpClient,
    url: &str,
    input: String,
    dim: usize,
    timeout: Duration,
    started: Instant,
) -> Result<Duration, String> {
    let body = serde_json::json!({"model": "mock-embedding", "input": input, "dimensions": dim});
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("request failed: {e:?}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        // Checked without a JSON parser (the client's work is the same in both modes, but
        // all at once when a batch answers, and it shares the cores with the proxy): one
        // embedding, index 0, `dim` numbers in it.
        let text = std::str::from_utf8(&body).map_err(|e| format!("answer is not UTF-8: {e}"))?;
        let floats = text.split_once("\"embedding\":[").and_then(|(_, rest)| {
            let array = &rest[..rest.find(']')?];
            Some(array.bytes().filter(|b| *b == b',').count() + 1)
        });
        let ok = text.matches("\"embedding\":").count() == 1
            && text.contains("\"index\":0")
            && floats == Some(dim);
        if !ok {
            return Err("the answer is not exactly one embedding".into());
        }
        Ok(started.elapsed())
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no complete answer within {timeout:?}")))
}

/// Fires `clients` requests at once, each with its own input.
async fn burst(
    client: &HttpClient,
    url: &str,
    tag: &str,
    args: &Args,
) -> Vec<Result<Duration, String>> {
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let (client, url, mut go) = (client.clone(), url.to_string(), go_rx.clone());
        let input = format!("{tag} client {i}: the text to embed");
        let (dim, timeout) = (args.dim, args.timeout);
        tasks.push(tokio::spawn(async move {
            let started = match go.wait_for(Option::is_some).await {
                Ok(s) => s.unwrap_or_else(Instant::now),
                Err(_) => return Err("start signal lost".to_string()),
            };
            one(&client, &url, input, dim, timeout, started).await
        }));
    }
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = go_tx.send(Some(Instant::now()));
    let mut out = Vec::with_capacity(args.clients);
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Err(format!("client task panicked: {e}"))),
        );
    }
    out
}

async fn measure(client: &HttpClient, mock: &Upstream, url: &str, tag: &str, args: &Args) -> Run {
    let before = mock.requests();
    let outcomes = burst(client, url, tag, args).await;
    let mut run = Run {
        upstream_calls: mock.requests() - before,
        latencies: Vec::new(),
        errors: Vec::new(),
    };
    for o in outcomes {
        match o {
            Ok(d) => run.latencies.push(d),
            Err(e) => run.errors.push(e),
        }
    }
    run.latencies.sort();
    run
}

struct Summary {
    mode: Mode,
    upstream: Option<f64>,
    upstream_range: (u64, u64),
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    errors: usize,
}

fn summarise(mode: Mode, runs: &[Run]) -> Summary {
    let med = |f: &dyn Fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    Summary {
        mode,
        upstream: med(&|r| Some(r.upstream_calls as f64)),
        upstream_range: (
            runs.iter().map(|r| r.upstream_calls).min().unwrap_or(0),
            runs.iter().map(|r| r.upstream_calls).max().unwrap_or(0),
        ),
        p50: med(&|r| ms(percentile(&r.latencies, 50.0))),
        p99: med(&|r| ms(percentile(&r.latencies, 99.0))),
        max: med(&|r| ms(percentile(&r.latencies, 100.0))),
        errors: runs.iter().map(|r| r.errors.len()).sum(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = parse_args();
    let mock_cfg = MockConfig {
        latency: Duration::from_millis(args.latency_ms),
        embedding_dim: args.dim,
        ..Default::default()
    };
    let mock = match args.upstream {
        UpstreamKind::Mock => Upstream::Mock(
            MockServer::start(([127, 0, 0, 1], 0).into(), mock_cfg)
                .await
                .expect("embed_batch_bench: cannot start the mock upstream on 127.0.0.1:0"),
        ),
        UpstreamKind::Fixed => Upstream::Fixed(
            FixedUpstream::start(Duration::from_millis(args.latency_ms), args.dim)
                .await
                .expect("embed_batch_bench: cannot start the upstream on 127.0.0.1:0"),
        ),
    };
    let pool = args.clients.max(64);
    let yaml = format!(
        r#"
listeners:
  - {{ name: main, address: "127.0.0.1:0" }}
admin: {{ address: "127.0.0.1:0" }}
runtime: {{ workers: 1 }}
log: {{ level: warn, access_log: false }}
upstreams:
  - name: mock
    endpoints: ["http://{mock}"]
    pool: {{ max_idle_per_endpoint: {pool}, idle_timeout: 60s }}
routes:
  - name: batch
    kind: openai
    match: {{ path_prefix: /batch }}
    upstream: mock
    strip_prefix: true
    batch: {{ max_inputs: {max_inputs}, max_wait: {wait}ms }}
  - name: nobatch
    kind: openai
    match: {{ path_prefix: /nobatch }}
    upstream: mock
    strip_prefix: true
"#,
        mock = mock.addr(),
        wait = args.max_wait_ms,
        max_inputs = args.max_inputs,
    );
    let config = Config::from_yaml(&yaml, &|_| None).expect("embed_batch_bench: config");
    let running = Sidelight::start(config)
        .await
        .expect("embed_batch_bench: cannot start sidelight");
    let base = format!("http://{}", running.listeners[0]);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .build(HttpConnector::new());

    // Warm-up: fill both sides' connection pools, unmeasured.
    for mode in [Mode::Batch, Mode::NoBatch] {
        let url = format!("{base}{}/v1/embeddings", mode.prefix());
        let _ = burst(&client, &url, "warm-up", &args).await;
    }
    let mut runs: Vec<(Mode, Run)> = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Mode::Batch, Mode::NoBatch]
        } else {
            [Mode::NoBatch, Mode::Batch]
        };
        for mode in order {
            let url = format!("{base}{}/v1/embeddings", mode.prefix());
            let run = measure(&client, &mock, &url, &format!("round {round}"), &args).await;
            eprintln!(
                "round {round} {:<10} upstream calls {:>4}  p50 {:>7} ms  p99 {:>7} ms  errors {}",
                mode.name(),
                run.upstream_calls,
                fmt_ms(ms(percentile(&run.latencies, 50.0))),
                fmt_ms(ms(percentile(&run.latencies, 99.0))),
                run.errors.len()
            );
            for e in run.errors.iter().take(3) {
                eprintln!("  error: {e}");
            }
            runs.push((mode, run));
        }
    }
    let summary = |mode: Mode| {
        let mine: Vec<Run> = runs
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, r)| Run {
                upstream_calls: r.upstream_calls,
                latencies: r.latencies.clone(),
                errors: r.errors.clone(),
            })
            .collect();
        summarise(mode, &mine)
    };
    let (on, off) = (summary(Mode::Batch), summary(Mode::NoBatch));
    let calls_ratio = match (off.upstream, on.upstream) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let p99_ratio = match (on.p99, off.p99) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let p50_ratio = match (on.p50, off.p50) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let met = |ok: bool| if ok { "MET" } else { "NOT MET" };

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Embeddings batching benchmark\n\n`cargo run --release --example embed_batch_bench -- {}`\n",
        args.given.join(" ")
    );
    let _ = writeln!(
        md,
        "{} clients, one single-input `POST /v1/embeddings` each, all at once; upstream: {} with {} ms latency per call, {} floats per vector; `max_inputs: {}`, `max_wait: {}ms`; {} rounds, medians.\n",
        args.clients,
        match args.upstream {
            UpstreamKind::Fixed => "`fixed` (precomputed vectors: a call costs its latency)",
            UpstreamKind::Mock => "`mock` (the bundled mock, computing every vector)",
        },
        args.latency_ms, args.dim, args.max_inputs, args.max_wait_ms, args.rounds
    );
    let _ = writeln!(md, "| mode | upstream calls per burst (min..max) | client p50 (ms) | client p99 (ms) | client max (ms) | errors |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for s in [&on, &off] {
        let _ = writeln!(
            md,
            "| {} | {} ({}..{}) | {} | {} | {} | {} |",
            s.mode.name(),
            fmt_ms(s.upstream),
            s.upstream_range.0,
            s.upstream_range.1,
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            fmt_ms(s.max),
            s.errors
        );
    }
    let _ = writeln!(
        md,
        "\nupstream calls without / with batching: {} (target >= 10: {})  \nclient p99 with / without: {} (target <= 1.0: {}); p50 with / without: {}",
        fmt_ms(calls_ratio),
        met(calls_ratio.is_some_and(|r| r >= 10.0)),
        p99_ratio.map_or("n/a".into(), |r| format!("{r:.2}")),
        met(p99_ratio.is_some_and(|r| r <= 1.0)),
        p50_ratio.map_or("n/a".into(), |r| format!("{r:.2}")),
    );
    println!("{md}");
    if let Err(e) = std::fs::write(&args.out, &md) {
        eprintln!(
            "embed_batch_bench: cannot write {}: {e}",
            args.out.display()
        );
    }
    let _ = running.shutdown().await;
    if on.errors + off.errors > 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
