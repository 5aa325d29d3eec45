//! An HTTP/1.1 upstream that misbehaves at a configurable mix, for `benches/soak.sh`.
//!
//! ```text
//! cargo run --release --example faulty_upstream -- --listen 127.0.0.1:9200 \
//!     --reset 5 --stall 5 --error 10 --stall-for 2s
//! ```
//!
//! Each request is answered, by a draw per request, with one of:
//! - `reset` (percent): the connection is reset (RST, `SO_LINGER` 0) after the request was read,
//!   before any response byte;
//! - `stall` (percent): nothing is sent for `--stall-for` (meant to be past sidelight's
//!   `timeouts.first_byte`), then the connection closes;
//! - `error` (percent): `503` or `500` with a small JSON body (alternating on each connection,
//!   503 first), keep-alive;
//! - otherwise `200` with a small body, keep-alive.
//!
//! Raw sockets rather than hyper: hyper cannot be told to reset a connection. Only what the
//! soak sends is understood: request heads without bodies (GET).

use sidelight::testing::parse_duration;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: faulty_upstream [--listen ADDR] [--reset PCT] [--stall PCT] \
                     [--error PCT] [--stall-for DUR] [--seed N]   (DUR is <n>ms or <n>s)";

#[derive(Clone, Copy)]
struct Mix {
    reset: u64,
    stall: u64,
    error: u64,
    stall_for: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Action {
    Ok,
    Reset,
    Stall,
    Error,
}

/// How many of each action were taken, printed at exit (SIGTERM/SIGINT).
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    reset: AtomicU64,
    stall: AtomicU64,
    error: AtomicU64,
}

fn parse_args() -> Result<(SocketAddr, Mix, u64), String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 9200).into();
    let mut mix = Mix {
        reset: 5,
        stall: 5,
        error: 10,
        stall_for: Duration::from_secs(2),
    };
    let mut seed = 0x5eed_u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let pct = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("{flag}: expected a percentage 0-100, got {v:?}"))
        };
        match flag.as_str() {
            "--listen" => listen = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            "--reset" => mix.reset = pct(&value)?,
            "--stall" => mix.stall = pct(&value)?,
            "--error" => mix.error = pct(&value)?,
            "--stall-for" => mix.stall_for = parse_duration(&value)?,
            "--seed" => seed = value.parse().map_err(|e| format!("{flag}: {e}"))?,
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if mix.reset + mix.stall + mix.error > 100 {
        return Err("--reset + --stall + --error must be at most 100".into());
    }
    Ok((listen, mix, seed))
}

/// A shared xorshift draw: reproducible mixes for a given seed and request order.
struct Draw(AtomicU64);

impl Draw {
    fn percent(&self) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next << 13;
            next ^= next >> 7;
            next ^= next << 17;
            match self
                .0
                .compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next % 100,
                Err(seen) => x = seen,
            }
        }
    }
}

fn action(mix: &Mix, draw: u64) -> Action {
    if draw < mix.reset {
        Action::Reset
    } else if draw < mix.reset + mix.stall {
        Action::Stall
    } else if draw < mix.reset + mix.stall + mix.error {
        Action::Error
    } else {
        Action::Ok
    }
}

/// Serves one connection: reads request heads and answers each as the draw says.
async fn serve(mut stream: TcpStream, mix: Mix, draw: Arc<Draw>, counts: Arc<Counts>) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut errors = 0u64;
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 64 * 1024 {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..head_end);
        match action(&mix, draw.percent()) {
            Action::Reset => {
                counts.reset.fetch_add(1, Ordering::Relaxed);
                // SO_LINGER 0: close() sends RST instead of FIN.
                let _ = stream.set_zero_linger();
                return;
            }
            Action::Stall => {
                counts.stall.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(mix.stall_for).await;
                return;
            }
            Action::Error => {
                counts.error.fetch_add(1, Ordering::Relaxed);
                errors += 1;
                let (status, body) = if errors % 2 == 0 {
                    ("500 Internal Server Error", r#"{"error":"injected 500"}"#)
                } else {
                    ("503 Service Unavailable", r#"{"error":"injected 503"}"#)
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
            Action::Ok => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                let body = "pong";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let (listen, mix, seed) = match parse_args() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("faulty_upstream: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "faulty_upstream listening on {listen}: reset {}%, stall {}% ({:?}), error {}%",
        mix.reset, mix.stall, mix.stall_for, mix.error
    );
    let draw = Arc::new(Draw(AtomicU64::new(seed.max(1))));
    let counts = Arc::new(Counts::default());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("faulty_upstream: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream, mix, draw.clone(), counts.clone()));
                }
                // Out of fds or the like: keep serving the connections there are.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let c = |n: &AtomicU64| n.load(Ordering::Relaxed);
    println!(
        "{{\"ok\":{},\"reset\":{},\"stall\":{},\"error\":{}}}",
        c(&counts.ok),
        c(&counts.reset),
        c(&counts.stall),
        c(&counts.error)
    );
    ExitCode::SUCCESS
}
