//! sidelight's own HTTP/1.1 server, seen from raw TCP clients: keep-alive rules, pipelining,
//! `100 Continue`, chunked uploads, HEAD, large and streamed answers, early answers that keep the
//! connection, slow clients, heads that are too large, and request smuggling shapes.

mod support;

use http::Response;
use serde_json::json;
use sidelight::http::body::full;
use std::time::Duration;
use support::{proxy, server, Config, Route, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Upstream `up`, route `r` under `/r`.
fn config(endpoint: &str) -> Config {
    Config::new()
        .upstream(Upstream::new("up", &[endpoint]))
        .route(Route::new("r", "up").path_prefix("/r"))
}

/// An upstream that answers with the request's method, path and body.
async fn echo() -> server::Server {
    server::http1()
        .route_fn("/", |r| {
            let text = format!(
                "{} {} {}",
                r.method,
                r.uri.path(),
                String::from_utf8_lossy(&r.body)
            );
            Response::new(full(text))
        })
        .run()
        .await
}

struct Raw {
    conn: TcpStream,
    pending: Vec<u8>,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Raw {
    async fn connect(proxy: &proxy::Proxy) -> Raw {
        Raw {
            conn: TcpStream::connect(proxy.addr).await.unwrap(),
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).await.unwrap();
    }

    /// Reads until `pending` holds `n` bytes; false at the end of the stream.
    async fn fill(&mut self, n: usize) -> bool {
        while self.pending.len() < n {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(WAIT, self.conn.read(&mut chunk))
                .await
                .expect("sidelight answered in time")
                .unwrap_or(0);
            if read == 0 {
                return false;
            }
            self.pending.extend_from_slice(&chunk[..read]);
        }
        true
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.pending[..i].to_vec()).unwrap();
                self.pending.drain(..i + 2);
                return line;
            }
            let want = self.pending.len() + 1;
            assert!(self.fill(want).await, "connection closed inside a head");
        }
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        assert!(self.fill(n).await, "connection closed inside a body");
        self.pending.drain(..n).collect()
    }

    /// Reads one response; `head_request` when it answers a HEAD.
    async fn response(&mut self, head_request: bool) -> Reply {
        let status_line = self.line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("header line");
            headers.push((name.trim().to_lowercase(), value.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        if head_request || status == 100 || status == 204 || status == 304 {
            return reply;
        }
        let mut body = Vec::new();
        if reply.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).expect("chunk size");
                if size == 0 {
                    assert_eq!(self.line().await, "", "no trailers");
                    break;
                }
                body.extend(self.take(size).await);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        } else {
            let length: usize = reply
                .header("content-length")
                .expect("a length or chunks")
                .parse()
                .unwrap();
            body = self.take(length).await;
        }
        reply.body = String::from_utf8(body).unwrap();
        reply
    }

    /// True if sidelight closes the connection (within the wait) without sending anything else.
    async fn closed(&mut self) -> bool {
        !self.fill(self.pending.len() + 1).await
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(
        b"GET /r/one HTTP/1.1\r\nhost: x\r\n\r\nPOST /r/two HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nbodyGET /r/three HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(raw.response(false).await.body, "GET /r/one ");
    assert_eq!(raw.response(false).await.body, "POST /r/two body");
    let third = raw.response(false).await;
    assert_eq!(third.body, "GET /r/three ");
    assert!(third.header("date").is_some(), "{third:?}");
    assert!(third.header("x-request-id").is_some(), "{third:?}");
}

#[tokio::test]
async fn keep_alive_follows_the_http_version_and_connection_header() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;

    // HTTP/1.0 closes unless asked not to.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"GET /r/a HTTP/1.0\r\n\r\n").await;
    let reply = raw.response(false).await;
    assert_eq!(
        (reply.status, reply.header("connection")),
        (200, Some("close"))
    );
    assert!(raw.closed().await);

    let mut raw = Raw::connect(&proxy).await;
    for path in ["/r/b", "/r/c"] {
        raw.send(format!("GET {path} HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").as_bytes())
            .await;
        let reply = raw.response(false).await;
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        assert_eq!(reply.body, format!("GET {path} "));
    }

    // HTTP/1.1 keeps the connection unless told to close it.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"GET /r/d HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let reply = raw.response(false).await;
    assert_eq!(
        (reply.status, reply.header("connection")),
        (200, Some("close"))
    );
    assert!(raw.closed().await);
}

#[tokio::test]
async fn a_client_that_expects_100_continue_gets_the_go_ahead() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"PUT /r/up HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
        .await;
    let interim = raw.response(false).await;
    assert_eq!(interim.status, 100);
    raw.send(b"hello").await;
    let reply = raw.response(false).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "PUT /r/up hello")
    );
}

#[tokio::test]
async fn chunked_uploads_reach_the_upstream_whole() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"POST /r/c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await;
    raw.send(b"6\r\n world\r\n0\r\n\r\n").await;
    let reply = raw.response(false).await;
    assert_eq!(reply.body, "POST /r/c hello world");
    // The connection carries on after a chunked body.
    raw.send(b"GET /r/next HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(raw.response(false).await.body, "GET /r/next ");
}

#[tokio::test]
async fn head_answers_carry_the_length_but_no_body() {
    let up = server::http1().route("/", "twelve bytes").run().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"HEAD /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let reply = raw.response(true).await;
    assert_eq!(
        (reply.status, reply.header("content-length")),
        (200, Some("12"))
    );
    // Had body bytes followed, they would be read as the next status line.
    raw.send(b"GET /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(raw.response(false).await.body, "twelve bytes");
}

#[tokio::test]
async fn an_early_answer_to_an_upload_keeps_the_connection() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    // No route: answered without reading the body, which is then read and dropped.
    let body = "x".repeat(20_000);
    raw.send(
        format!(
            "POST /elsewhere HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("connection"), None, "{reply:?}");
    raw.send(b"GET /r/after HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(raw.response(false).await.body, "GET /r/after ");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn a_head_too_large_gets_431_and_the_connection_closes() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    let big = "a".repeat(70 * 1024);
    raw.send(format!("GET /r HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await;
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 431);
    assert_eq!(
        reply.header("x-sidelight-error"),
        Some("request_headers_too_large")
    );
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(json["error"]["type"], "request_headers_too_large");
    assert!(raw.closed().await);
    assert_eq!(up.request_count(), 0);
    let kind = [("listener", "main"), ("kind", "headers_too_large")];
    proxy
        .assert_metric_eventually("sidelight_downstream_protocol_errors_total", &kind, 1.0)
        .await;
}

#[tokio::test]
async fn a_client_too_slow_with_its_head_is_disconnected() {
    let up = echo().await;
    let proxy =
        proxy::start(&config(&up.url()).set("limits", json!({ "header_read_timeout": "300ms" })))
            .await;
    // Half a head, then nothing: closed after limits.header_read_timeout.
    let mut slow = Raw::connect(&proxy).await;
    slow.send(b"GET /r HTTP/1.1\r\nhost: x\r\n").await;
    // An idle keep-alive connection is held to the same limit.
    let mut idle = Raw::connect(&proxy).await;
    idle.send(b"GET /r/a HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(idle.response(false).await.status, 200);
    let started = std::time::Instant::now();
    assert!(slow.closed().await, "a slow head is cut");
    assert!(idle.closed().await, "an idle connection is closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let kind = [("listener", "main"), ("kind", "header_timeout")];
    proxy
        .assert_metric_eventually("sidelight_downstream_protocol_errors_total", &kind, 2.0)
        .await;
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn connections_past_max_client_connections_are_closed_on_arrival() {
    let up = echo().await;
    let proxy = proxy::start(
        &config(&up.url())
            .set("limits", json!({ "max_client_connections": 2 }))
            .set("runtime", json!({ "workers": 2 })),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(&proxy).await;
        raw.send(b"GET /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(raw.response(false).await.status, 200);
        held.push(raw);
    }
    // The cap holds across workers: the third connection is closed at once, whichever worker
    // accepts it.
    let mut third = Raw::connect(&proxy).await;
    third.send(b"GET /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(third.closed().await, "past the cap");
    proxy
        .assert_metric_eventually(
            "sidelight_downstream_connections_refused_total",
            &[("listener", "main")],
            1.0,
        )
        .await;
    // Once one closes, a new client gets in.
    drop(held.pop());
    proxy
        .assert_metric_eventually(
            "sidelight_downstream_connections_open",
            &[("listener", "main")],
            1.0,
        )
        .await;
    let mut next = Raw::connect(&proxy).await;
    next.send(b"GET /r HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(next.response(false).await.status, 200);
}

#[tokio::test]
async fn a_request_body_that_stalls_gets_408_and_blames_the_client() {
    let up = echo().await;
    let proxy =
        proxy::start(&config(&up.url()).set("limits", json!({ "client_body_timeout": "300ms" })))
            .await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\nsome bytes")
        .await;
    let started = std::time::Instant::now();
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 408, "{reply:?}");
    assert_eq!(
        reply.header("x-sidelight-error"),
        Some("client_body_timeout")
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

/// Sends `first` (a head and half a body), checks that no upstream connection is taken while
/// the rest trickles in, then sends `rest` and expects a 200.
async fn trickle_in(proxy: &proxy::Proxy, up: &server::Server, first: &[u8], rest: &[u8]) {
    let mut raw = Raw::connect(proxy).await;
    raw.send(first).await;
    // Half the body is in: sidelight waits for the rest without holding an upstream connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.connections(),
        0,
        "an upstream connection held for a trickling body"
    );
    raw.send(rest).await;
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test]
async fn a_small_body_is_read_whole_before_an_upstream_connection_is_taken() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    trickle_in(
        &proxy,
        &up,
        b"POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello",
        b"world",
    )
    .await;
    assert_eq!(up.last_request().body, "helloworld".as_bytes());
    assert_eq!(up.connections(), 1);
    proxy
        .assert_metric_eventually(
            "sidelight_request_bodies_buffered_total",
            &[("route", "r")],
            1.0,
        )
        .await;
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    for head in [
        "POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        "POST /r HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
        "POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
    ] {
        let mut raw = Raw::connect(&proxy).await;
        raw.send(head.as_bytes()).await;
        let reply = raw.response(false).await;
        assert_eq!(reply.status, 400, "{head:?}: {reply:?}");
        assert_eq!(reply.header("x-sidelight-error"), Some("bad_request"));
        assert!(raw.closed().await, "{head:?}");
    }
    assert_eq!(up.request_count(), 0);
    let kind = [("listener", "main"), ("kind", "bad_request")];
    proxy
        .assert_metric_eventually("sidelight_downstream_protocol_errors_total", &kind, 3.0)
        .await;
}

#[tokio::test]
async fn hosts_codings_and_chunk_lines_that_could_desync_are_refused() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let cases: [(&str, u16, &str); 6] = [
        // RFC 9112 §3.2: HTTP/1.1 needs exactly one Host.
        ("GET /r HTTP/1.1\r\n\r\n", 400, "bad_request"),
        ("GET /r HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400, "bad_request"),
        // A coding before chunked would be lost upstream: 501, as nginx answers.
        (
            "POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "not_implemented",
        ),
        (
            "POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
            "not_implemented",
        ),
        // A bare LF inside a chunk extension.
        (
            "POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
            400,
            "client_body_error",
        ),
        // A bare LF ending a trailer line: a peer ending lines at LF sees the body end there
        // and the next request after it (found by the framing proptests).
        (
            "POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx: a\n\r\nGET /r/next HTTP/1.1\r\nhost: x\r\n\r\n",
            400,
            "client_body_error",
        ),
    ];
    for (request, status, kind) in cases {
        let mut raw = Raw::connect(&proxy).await;
        raw.send(request.as_bytes()).await;
        let reply = raw.response(false).await;
        assert_eq!(reply.status, status, "{request:?}: {reply:?}");
        assert_eq!(reply.header("x-sidelight-error"), Some(kind), "{request:?}");
    }
    assert_eq!(up.request_count(), 0, "nothing reached the upstream");
    // HTTP/1.0 may leave Host out.
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"GET /r HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw.response(false).await.status, 200);
}

#[tokio::test]
async fn large_and_streamed_bodies_arrive_whole_and_the_connection_carries_on() {
    use http_body_util::{BodyExt, StreamBody};
    let big = "0123456789abcdef".repeat(64 * 1024);
    let body = big.clone();
    let up = server::http1()
        .route_fn("/r/big", move |_| Response::new(full(body.clone())))
        .route_fn("/r/stream", |_| {
            // No length: sidelight frames it with chunks.
            let chunks = (0..100).map(|i| {
                Ok::<_, sidelight::BoxError>(hyper::body::Frame::data(bytes::Bytes::from(format!(
                    "chunk {i};"
                ))))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync())
        })
        .run()
        .await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"GET /r/big HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let reply = raw.response(false).await;
    assert_eq!(reply.header("content-length"), Some("1048576"));
    assert!(reply.body == big, "the 1 MiB body arrived whole");
    raw.send(b"GET /r/stream HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let reply = raw.response(false).await;
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    let want: String = (0..100).map(|i| format!("chunk {i};")).collect();
    assert_eq!(reply.body, want);
    raw.send(b"GET /r/big HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(raw.response(false).await.body.len(), big.len());
}

#[tokio::test]
async fn a_broken_chunked_upload_is_the_clients_error_and_nothing_is_lost_upstream() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    raw.send(
        b"POST /r/c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.header("x-sidelight-error"), Some("client_body_error"));
    assert!(
        reply.body.contains("invalid chunked request body"),
        "{}",
        reply.body
    );
    assert!(
        raw.closed().await,
        "the connection's framing is lost: it closes"
    );
    assert!(
        up.requests().iter().all(|r| r.body != "hello"),
        "the upstream never took a cut body for a whole one"
    );
}

#[tokio::test]
async fn an_early_answer_to_a_client_waiting_for_100_continue_skips_the_go_ahead() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    let mut raw = Raw::connect(&proxy).await;
    // No route: answered without reading the body, so the client is never told to send it.
    raw.send(
        b"PUT /elsewhere HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
    )
    .await;
    let reply = raw.response(false).await;
    assert_eq!(
        reply.status, 404,
        "no interim 100 before the answer: {reply:?}"
    );
    // The body may still be on its way, so the connection cannot carry another request.
    assert!(raw.closed().await);
    assert_eq!(up.request_count(), 0);
}

#[tokio::test]
async fn a_small_chunked_body_is_read_whole_and_a_long_one_streams() {
    let up = echo().await;
    let proxy = proxy::start(&config(&up.url())).await;
    trickle_in(
        &proxy,
        &up,
        b"POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"5\r\nworld\r\n0\r\n\r\n",
    )
    .await;
    let seen = up.last_request();
    assert_eq!(seen.body, "helloworld".as_bytes());
    // Read whole, it goes on with its length, as nginx's request buffering sends it.
    assert_eq!(
        seen.headers
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some("10"),
        "{seen:?}"
    );
    proxy
        .assert_metric_eventually(
            "sidelight_request_bodies_buffered_total",
            &[("route", "r")],
            1.0,
        )
        .await;

    // Past limits.request_buffering_bytes (64 KiB) a chunked body streams, nothing lost.
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut raw = Raw::connect(&proxy).await;
    raw.send(b"POST /r HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    for piece in big.chunks(10_000) {
        raw.send(format!("{:x}\r\n", piece.len()).as_bytes()).await;
        raw.send(piece).await;
        raw.send(b"\r\n").await;
    }
    raw.send(b"0\r\n\r\n").await;
    let reply = raw.response(false).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.last_request();
    assert_eq!(seen.body.len(), big.len());
    assert!(seen.body == big, "the streamed body differs");
    assert!(seen.headers.get("content-length").is_none(), "{seen:?}");
}
