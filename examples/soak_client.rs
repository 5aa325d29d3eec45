//! Steady load for `benches/soak.sh`: keep-alive workers send `GET` to one URL for a while and
//! record the outcome of every request, then print a JSON summary on stdout.
//!
//! ```text
//! cargo run --release --example soak_client -- --url http://127.0.0.1:8080/ping \
//!     --concurrency 16 --duration 60s --hang-after 10s
//! ```
//!
//! Outcomes are *clear* (a complete HTTP response: `200` with the expected body, or any other
//! status, keyed by sidelight's `x-sidelight-error` type or `upstream` when the upstream's own
//! answer was passed through) or *unclear*: the connection to sidelight reset or closed
//! mid-request, a malformed response, a body cut short, no answer within `--hang-after`, or a
//! failed connect.

use sidelight::testing::parse_duration;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const USAGE: &str = "usage: soak_client --url http://HOST:PORT/PATH [--concurrency N] \
                     [--duration DUR] [--hang-after DUR] [--expect BODY]   (DUR is <n>ms or <n>s)";

struct Args {
    addr: SocketAddr,
    authority: String,
    path: String,
    concurrency: usize,
    duration: Duration,
    hang_after: Duration,
    expect: String,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut concurrency = 16;
    let mut duration = Duration::from_secs(60);
    let mut hang_after = Duration::from_secs(10);
    let mut expect = "pong".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--concurrency" => {
                concurrency = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--concurrency: expected a positive integer")?
            }
            "--duration" => duration = parse_duration(&value)?,
            "--hang-after" => hang_after = parse_duration(&value)?,
            "--expect" => expect = value,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    let url = url.ok_or_else(|| format!("--url is required\n{USAGE}"))?;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("--url: {e}"))?;
    let authority = uri
        .authority()
        .ok_or("--url needs host:port")?
        .as_str()
        .to_string();
    let addr = authority
        .parse()
        .map_err(|_| "--url: host must be an IP address with a port (loopback)")?;
    let path = uri
        .path_and_query()
        .map_or("/".into(), |p| p.as_str().to_string());
    Ok(Args {
        addr,
        authority,
        path,
        concurrency,
        duration,
        hang_after,
        expect,
    })
}

/// What one worker saw: outcomes by name, and a few examples of each unclear one.
#[derive(Default)]
struct Tally {
    clear: BTreeMap<String, u64>,
    unclear: BTreeMap<String, u64>,
    examples: BTreeMap<String, String>,
    max_latency: Duration,
}

impl Tally {
    fn unclear(&mut self, kind: &str, detail: String) {
        *self.unclear.entry(kind.into()).or_default() += 1;
        self.examples.entry(kind.into()).or_insert(detail);
    }
    fn merge(&mut self, other: Tally) {
        for (k, v) in other.clear {
            *self.clear.entry(k).or_default() += v;
        }
        for (k, v) in other.unclear {
            *self.unclear.entry(k).or_default() += v;
        }
        for (k, v) in other.examples {
            self.examples.entry(k).or_insert(v);
        }
        self.max_latency = self.max_latency.max(other.max_latency);
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Names a hyper error the way a user of sidelight would describe it.
fn kind_of(e: &hyper::Error) -> &'static str {
    if e.is_parse() || e.is_parse_status() {
        "malformed response"
    } else if e.is_incomplete_message()
        || e.is_body_write_aborted()
        || e.is_canceled()
        || e.is_closed()
    {
        "connection closed mid-request"
    } else {
        "connection error"
    }
}

async fn worker(args: &Args, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    while Instant::now() < deadline {
        // A connection sidelight closed after its last answer (`connection: close`) is not a
        // failure: take a new one before the next request.
        if let Some(s) = &mut sender {
            match tokio::time::timeout(args.hang_after, s.ready()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => sender = None,
                Err(_) => {
                    tally.unclear("hang", "connection never ready for the next request".into());
                    sender = None;
                }
            }
        }
        let s = match &mut sender {
            Some(s) => s,
            None => match connect(args.addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    tally.unclear("connect failed", e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let request = hyper::Request::get(args.path.as_str())
            .header("host", args.authority.as_str())
            .body(Empty::<Bytes>::new());
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tally.unclear("client bug", e.to_string());
                break;
            }
        };
        let started = Instant::now();
        let exchange = async {
            let response = s
                .send_request(request)
                .await
                .map_err(|e| (kind_of(&e), e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ("body cut short", e.to_string()))?
                .to_bytes();
            Ok::<_, (&str, String)>((parts, body))
        };
        let outcome = tokio::time::timeout(args.hang_after, exchange).await;
        tally.max_latency = tally.max_latency.max(started.elapsed());
        match outcome {
            Err(_) => {
                tally.unclear(
                    "hang",
                    format!("no complete answer within {:?}", args.hang_after),
                );
                sender = None;
            }
            Ok(Err((kind, detail))) => {
                tally.unclear(kind, detail);
                sender = None;
            }
            Ok(Ok((parts, body))) => {
                let closes = parts
                    .headers
                    .get("connection")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                if closes {
                    sender = None;
                }
                let status = parts.status.as_u16();
                if status == 200 && body == args.expect.as_bytes() {
                    *tally.clear.entry("200 ok".into()).or_default() += 1;
                } else if status == 200 {
                    tally.unclear("wrong body", String::from_utf8_lossy(&body).into_owned());
                } else {
                    let source = parts
                        .headers
                        .get("x-sidelight-error")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("upstream");
                    *tally.clear.entry(format!("{status} {source}")).or_default() += 1;
                }
            }
        }
    }
    tally
}

fn json_map(map: &BTreeMap<String, u64>) -> String {
    let items: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{}:{v}", json_string(k)))
        .collect();
    format!("{{{}}}", items.join(","))
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => std::sync::Arc::new(a),
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + args.duration;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let args = args.clone();
            tokio::spawn(async move { worker(&args, deadline).await })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        match w.await {
            Ok(t) => total.merge(t),
            Err(e) => total.unclear("client bug", e.to_string()),
        }
    }
    let examples: Vec<String> = total
        .examples
        .iter()
        .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
        .collect();
    println!(
        "{{\"clear\":{},\"unclear\":{},\"examples\":{{{}}},\"max_latency_ms\":{}}}",
        json_map(&total.clear),
        json_map(&total.unclear),
        examples.join(","),
        total.max_latency.as_millis()
    );
    ExitCode::SUCCESS
}
