//! Request-coalescing benchmark: N clients send the same slow request at the same moment.
//!
//! ```text
//! cargo run --release --example dedup_bench -- --clients 100 --rounds 5
//! ```
//!
//! Starts, in this process, the bundled mock upstream (every request except `/ping` takes
//! `--latency-ms`, default 200 ms) and one sidelight (`runtime: { workers: 1 }`, ports 127.0.0.1:0)
//! with two routes to it that differ only in coalescing, and neither caches:
//!
//! - `/dedup/...`   → `dedup: true`   (identical in-flight requests share one upstream call)
//! - `/nodedup/...` → `dedup: false`  (every request goes upstream)
//!
//! Each round, for each mode (order alternating per round), `--clients` tasks wait on one start
//! signal, then each sends the same request (`GET /v1/models`, or with `--request chat` the same
//! `POST /v1/chat/completions` JSON body) through sidelight with a shared hyper-util legacy client
//! (keep-alive pool of `--clients` connections, warmed up before the first round) and times
//! it, start to last body byte. Upstream calls are the mock's request counter delta.
//!
//! Prints, per mode, the medians over rounds of: upstream calls, client p50 / p99 / max, and
//! the ratios (upstream calls without / with dedup, p50 with / without), and writes the same
//! table as Markdown to `benches/results/dedup-latest.md` (`--out` to change).

#[path = "common/stats.rs"]
mod stats;

use stats::{fmt_ms, fmt_ratio, median, ms, percentile};
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

const CHAT_BODY: &str = r#"{"model":"mock-gpt","messages":[{"role":"user","content":"the same question, asked by everyone"}]}"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Kind {
    /// `GET /v1/models`
    Models,
    /// `POST /v1/chat/completions` with [`CHAT_BODY`]
    Chat,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Models => "GET /v1/models",
            Kind::Chat => "POST /v1/chat/completions (same JSON body)",
        }
    }
}

struct Args {
    clients: usize,
    rounds: usize,
    latency_ms: u64,
    kind: Kind,
    timeout: Duration,
    out: std::path::PathBuf,
    /// The arguments as given, for the report's command line.
    given: Vec<String>,
}

/// The command line (clap: `--help` lists it).
#[derive(clap::Parser)]
#[command(name = "dedup_bench", about = "Request-coalescing benchmark")]
struct Cli {
    /// Clients sending the same request at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// The mock upstream's latency per request.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    latency_ms: u64,
    /// Per-request timeout, seconds.
    #[arg(long = "timeout-s", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_s: u64,
    /// What every client sends.
    #[arg(long = "request", value_enum, default_value = "models")]
    kind: Kind,
    /// Where the Markdown report goes (default: benches/results/dedup-latest.md).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let cli = <Cli as clap::Parser>::parse();
    Args {
        clients: cli.clients as usize,
        rounds: cli.rounds as usize,
        latency_ms: cli.latency_ms,
        kind: cli.kind,
        timeout: Duration::from_secs(cli.timeout_s),
        out: cli.out.unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/dedup-latest.md")
        }),
        given: std::env::args().skip(1).collect(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Dedup,
    NoDedup,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Dedup => "dedup: true",
            Mode::NoDedup => "dedup: false",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Mode::Dedup => "/dedup",
            Mode::NoDedup => "/nodedup",
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One client's outcome.
enum Outcome {
    Ok {
        elapsed: Duration,
        /// `x-sidelight-cache` (MISS / COALESCED / ...), absent on a route without the cache layer.
        label: Option<String>,
    },
    Failed(String),
}

/// One (round, mode) measurement.
struct Run {
    upstream_calls: u64,
    latencies: Vec<Duration>, // sorted
    errors: Vec<String>,
    labels: std::collections::BTreeMap<String, usize>,
}

impl Run {
    fn pct(&self, p: f64) -> Option<Duration> {
        percentile(&self.latencies, p)
    }
}

fn request(kind: Kind, url: &str) -> Request<Full<Bytes>> {
    let builder = match kind {
        Kind::Models => Request::builder().method(Method::GET).uri(url),
        Kind::Chat => Request::builder()
            .method(Method::POST)
            .uri(url)
            .header("content-type", "application/json"),
    };
    let body = match kind {
        Kind::Models => Bytes::new(),
        Kind::Chat => Bytes::from_static(CHAT_BODY.as_bytes()),
    };
    builder
        .body(Full::new(body))
        .expect("a request built from constant parts is valid")
}

async fn one(client: &HttpClient, kind: Kind, url: &str, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let work = async {
        let resp = client
            .request(request(kind, url))
            .await
            .map_err(|e| format!("request failed: {e:?}"))?;
        let status = resp.status();
        let label = resp
            .headers()
            .get("x-sidelight-cache")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
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
        Ok(label)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(label)) => Outcome::Ok {
            elapsed: started.elapsed(),
            label,
        },
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Failed(format!("no complete answer within {timeout:?}")),
    }
}

/// Fires `clients` identical requests at once; returns each one's outcome.
async fn burst(
    client: &HttpClient,
    kind: Kind,
    url: &str,
    clients: usize,
    timeout: Duration,
) -> Vec<Outcome> {
    let (go_tx, go_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (client, url, mut go) = (client.clone(), url.to_string(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            // Every task is parked here before anyone starts, so they start together.
            if go.wait_for(|g| *g).await.is_err() {
                return Outcome::Failed("start signal lost".into());
            }
            one(&client, kind, &url, timeout).await
        }));
    }
    // Let every task reach the start line.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = go_tx.send(true);
    let mut out = Vec::with_capacity(clients);
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Outcome::Failed(format!("client task panicked: {e}"))),
        );
    }
    out
}

async fn measure(
    client: &HttpClient,
    mock: &MockServer,
    kind: Kind,
    url: &str,
    clients: usize,
    timeout: Duration,
) -> Run {
    let before = mock.requests();
    let outcomes = burst(client, kind, url, clients, timeout).await;
    // Every client has its full answer, so every upstream call has been answered too.
    let upstream_calls = mock.requests() - before;
    let mut run = Run {
        upstream_calls,
        latencies: Vec::with_capacity(clients),
        errors: Vec::new(),
        labels: Default::default(),
    };
    for o in outcomes {
        match o {
            Outcome::Ok { elapsed, label } => {
                run.latencies.push(elapsed);
                *run.labels
                    .entry(label.unwrap_or_else(|| "-".into()))
                    .or_default() += 1;
            }
            Outcome::Failed(e) => run.errors.push(e),
        }
    }
    run.latencies.sort();
    run
}

struct Summary {
    mode: Mode,
    upstream: Option<f64>,
    upstream_min: u64,
    upstream_max: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    errors: usize,
    labels: String,
}

fn summarise(mode: Mode, runs: &[Run]) -> Summary {
    let med = |f: &dyn Fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect());
    // Response labels summed over rounds, e.g. "MISS 5, COALESCED 495".
    let mut labels: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in runs {
        for (k, v) in &r.labels {
            *labels.entry(k.as_str()).or_default() += v;
        }
    }
    let mut labels: Vec<(&str, usize)> = labels.into_iter().collect();
    labels.sort_by_key(|(k, _)| match *k {
        "MISS" => 0,
        "COALESCED" => 1,
        _ => 2,
    });
    Summary {
        mode,
        upstream: med(&|r| Some(r.upstream_calls as f64)),
        upstream_min: runs.iter().map(|r| r.upstream_calls).min().unwrap_or(0),
        upstream_max: runs.iter().map(|r| r.upstream_calls).max().unwrap_or(0),
        p50: med(&|r| ms(r.pct(50.0))),
        p99: med(&|r| ms(r.pct(99.0))),
        max: med(&|r| ms(r.pct(100.0))),
        errors: runs.iter().map(|r| r.errors.len()).sum(),
        labels: labels
            .iter()
            .map(|(k, v)| {
                if *k == "-" {
                    format!("(no header) {v}")
                } else {
                    format!("{k} {v}")
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = parse_args();

    let mock_cfg = MockConfig {
        latency: Duration::from_millis(args.latency_ms),
        ..Default::default()
    };
    let mock = MockServer::start(([127, 0, 0, 1], 0).into(), mock_cfg)
        .await
        .expect("dedup_bench: cannot start the mock upstream on 127.0.0.1:0");

    // Pools sized for every client, idle timeouts long enough to survive between rounds.
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
  - name: dedup
    match: {{ path_prefix: /dedup }}
    upstream: mock
    strip_prefix: true
    dedup: true
  - name: nodedup
    match: {{ path_prefix: /nodedup }}
    upstream: mock
    strip_prefix: true
    dedup: false
"#,
        mock = mock.addr()
    );
    let config = match Config::from_yaml(&yaml, &|_| None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dedup_bench: sidelight rejected the benchmark config:\n{e}\n---{yaml}");
            return ExitCode::FAILURE;
        }
    };
    let running = match Sidelight::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dedup_bench: sidelight failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = format!("http://{}", running.listeners[0]);
    let path = match args.kind {
        Kind::Models => "/v1/models",
        Kind::Chat => "/v1/chat/completions",
    };
    let url = |m: Mode| format!("{base}{}{path}", m.prefix());

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.clients)
        .pool_idle_timeout(Duration::from_secs(120))
        .build(connector);

    eprintln!(
        "[dedup] mock upstream {} ({} ms latency), sidelight {} (workers: 1); {} clients x {} rounds, {}",
        mock.addr(),
        args.latency_ms,
        base,
        args.clients,
        args.rounds,
        args.kind.describe()
    );

    // Warm-up: open the client's keep-alive connections (and sidelight's upstream ones) so the
    // rounds measure coalescing, not connection setup. Not recorded.
    for mode in [Mode::NoDedup, Mode::Dedup] {
        let run = measure(
            &client,
            &mock,
            args.kind,
            &url(mode),
            args.clients,
            args.timeout,
        )
        .await;
        if !run.errors.is_empty() {
            eprintln!(
                "dedup_bench: warm-up through {} ({}) failed for {} of {} clients; first error: {}",
                url(mode),
                mode.name(),
                run.errors.len(),
                args.clients,
                run.errors[0]
            );
            let _ = running.shutdown().await;
            return ExitCode::FAILURE;
        }
    }
    let conns_after_warmup = mock.connections();

    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        // Alternate the order so drift on the machine hits both modes alike.
        let order = if round % 2 == 1 {
            [Mode::Dedup, Mode::NoDedup]
        } else {
            [Mode::NoDedup, Mode::Dedup]
        };
        for mode in order {
            // Let the previous burst's connections go idle.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let run = measure(
                &client,
                &mock,
                args.kind,
                &url(mode),
                args.clients,
                args.timeout,
            )
            .await;
            eprintln!(
                "[dedup] round {round} {:<13} upstream calls {:>4}  p50 {:>7} ms  p99 {:>7} ms  max {:>7} ms{}{}",
                mode.name(),
                run.upstream_calls,
                fmt_ms(ms(run.pct(50.0))),
                fmt_ms(ms(run.pct(99.0))),
                fmt_ms(ms(run.pct(100.0))),
                if run.labels.keys().any(|k| k != "-") {
                    format!(
                        "  [{}]",
                        run.labels.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
                    )
                } else {
                    String::new()
                },
                if run.errors.is_empty() {
                    String::new()
                } else {
                    format!("  ERRORS {} (first: {})", run.errors.len(), run.errors[0])
                }
            );
            runs[mode as usize].push(run);
        }
    }
    let new_upstream_conns = mock.connections() - conns_after_warmup;

    let with = summarise(Mode::Dedup, &runs[Mode::Dedup as usize]);
    let without = summarise(Mode::NoDedup, &runs[Mode::NoDedup as usize]);
    let calls_ratio = match (without.upstream, with.upstream) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let p50_ratio = match (with.p50, without.p50) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let p99_ratio = match (with.p99, without.p99) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let errors = with.errors + without.errors;

    // ---- text table
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:<14}{:>16}{:>14}{:>10}{:>10}{:>10}{:>8}  x-sidelight-cache (all rounds)",
        "mode", "upstream calls", "(min..max)", "p50 ms", "p99 ms", "max ms", "errors",
    );
    for s in [&with, &without] {
        let _ = writeln!(
            text,
            "{:<14}{:>16}{:>14}{:>10}{:>10}{:>10}{:>8}  {}",
            s.mode.name(),
            fmt_ms(s.upstream).trim_end_matches(".0"),
            format!("{}..{}", s.upstream_min, s.upstream_max),
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            fmt_ms(s.max),
            s.errors,
            s.labels
        );
    }
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "ratios: upstream calls without/with dedup = {}  (ideal: {} = one call per burst)",
        fmt_ratio(calls_ratio),
        args.clients
    );
    let _ = writeln!(
        text,
        "        client p50 with/without dedup = {}; p99 with/without = {}  (1.0 = coalescing costs the clients nothing)",
        fmt_ratio(p50_ratio),
        fmt_ratio(p99_ratio)
    );
    let _ = writeln!(
        text,
        "        upstream latency floor: {} ms; new upstream connections during the rounds: {}",
        args.latency_ms, new_upstream_conns
    );
    if errors > 0 {
        let _ = writeln!(
            text,
            "WARNING: {errors} client request(s) failed; see the log above"
        );
    }

    let command = if args.given.is_empty() {
        "cargo run --release --example dedup_bench".to_string()
    } else {
        format!(
            "cargo run --release --example dedup_bench -- {}",
            args.given.join(" ")
        )
    };
    println!();
    println!(
        "sidelight dedup benchmark: {} identical concurrent {} per burst, upstream latency {} ms, \
         medians over {} round(s)",
        args.clients,
        args.kind.describe(),
        args.latency_ms,
        args.rounds
    );
    println!();
    print!("{text}");

    // ---- Markdown
    let mut md = String::new();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(md, "# sidelight request-coalescing (dedup) benchmark\n");
    if !date.is_empty() {
        let _ = writeln!(md, "- **date**: {date}");
    }
    let _ = writeln!(md, "- **nproc**: {cpus}");
    let _ = writeln!(
        md,
        "- **setup**: in one process: mock upstream ({} ms latency), sidelight (`runtime: {{ workers: 1 }}`) \
         with two routes to it, `dedup: true` and `dedup: false`, no cache on either; a hyper-util legacy \
         client with a keep-alive pool of {} connections (warmed up before round 1)",
        args.latency_ms, args.clients
    );
    let _ = writeln!(
        md,
        "- **load**: per round and mode, {} clients released together, each sending {}; \
         modes alternate order per round; {} round(s)",
        args.clients,
        args.kind.describe(),
        args.rounds
    );
    let _ = writeln!(md, "\nCommand:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "Medians over rounds. upstream calls = requests the mock received during the burst; \
         p50/p99/max = client-side time from start signal to the last body byte (nearest rank over \
         the burst's {} requests); errors summed over rounds.\n",
        args.clients
    );
    let _ = writeln!(
        md,
        "| mode | upstream calls | min..max | p50 (ms) | p99 (ms) | max (ms) | errors | x-sidelight-cache (all rounds) |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---|");
    for s in [&with, &without] {
        let _ = writeln!(
            md,
            "| `{}` | {} | {}..{} | {} | {} | {} | {} | {} |",
            s.mode.name(),
            fmt_ms(s.upstream).trim_end_matches(".0"),
            s.upstream_min,
            s.upstream_max,
            fmt_ms(s.p50),
            fmt_ms(s.p99),
            fmt_ms(s.max),
            s.errors,
            s.labels
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "- upstream calls without/with dedup = **{}** (ideal: {})",
        fmt_ratio(calls_ratio),
        args.clients
    );
    let _ = writeln!(
        md,
        "- client p50 with/without dedup = **{}**; p99 with/without = {}",
        fmt_ratio(p50_ratio),
        fmt_ratio(p99_ratio)
    );
    let _ = writeln!(
        md,
        "- upstream latency floor {} ms; new upstream connections during the rounds: {}",
        args.latency_ms, new_upstream_conns
    );
    if errors > 0 {
        let _ = writeln!(md, "- **WARNING: {errors} client request(s) failed**");
    }
    let written = args
        .out
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&args.out, md));
    match written {
        Ok(()) => println!("\nwrote {}", args.out.display()),
        Err(e) => eprintln!("dedup_bench: cannot write {}: {e}", args.out.display()),
    }

    drop(client);
    if !running.shutdown().await {
        eprintln!("dedup_bench: sidelight did not drain cleanly on shutdown");
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
