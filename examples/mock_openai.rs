//! Standalone OpenAI-compatible mock upstream.
//!
//! ```text
//! cargo run --release --example mock_openai -- --listen 127.0.0.1:9100 \
//!     --latency 0ms --chunk-delay 20ms --chunks 8 --embedding-dim 8
//! ```

use sidelight::testing::parse_duration;
use std::net::SocketAddr;
use std::process::ExitCode;

use sidelight::testing::mock_openai::{MockConfig, MockServer};

const USAGE: &str = "usage: mock_openai [--listen ADDR] [--latency DUR] [--chunk-delay DUR] \
                     [--chunks N] [--embedding-dim N]   (DUR is <n>ms or <n>s)";

/// `Ok(None)` means help was requested.
fn parse_args() -> Result<Option<(SocketAddr, MockConfig)>, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 9100).into();
    let mut cfg = MockConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value\n{USAGE}")),
        };
        let bad_num = |e| format!("{flag}: {e}");
        match flag.as_str() {
            "--listen" => listen = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--latency" => cfg.latency = parse_duration(&value)?,
            "--chunk-delay" => cfg.chunk_delay = parse_duration(&value)?,
            "--chunks" => cfg.stream_chunks = value.parse().map_err(bad_num)?,
            "--embedding-dim" => cfg.embedding_dim = value.parse().map_err(bad_num)?,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    Ok(Some((listen, cfg)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (listen, cfg) = match parse_args() {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let server = match MockServer::start(listen, cfg).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("mock_openai: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Print the bound address (meaningful with port 0) so scripts can scrape it.
    println!("mock_openai listening on {}", server.addr());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("mock_openai: cannot wait for Ctrl-C: {e}");
    }
    eprintln!(
        "mock_openai: served {} requests on {} connections",
        server.requests(),
        server.connections()
    );
    server.shutdown();
    ExitCode::SUCCESS
}
