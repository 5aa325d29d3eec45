//! sidelight's own HTTP/1.1 client against upstreams that answer byte for byte as scripted:
//! every framing a server may choose, interim responses, early answers, connections closed
//! under a request, and responses that are not HTTP at all.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use sidelight::http::body::ProxyBody;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::{proxy, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the scripted upstream does with one request.
enum Act {
    /// Reads the request body (by its `content-length`), then writes these bytes.
    Reply(&'static [u8]),
    /// Like `Reply`, then closes the connection.
    ReplyAndClose(&'static [u8]),
    /// Writes these bytes right after the request head, reads (and drops) whatever body
    /// follows until the client stops, then closes.
    ReplyBeforeBody(&'static [u8]),
    /// Closes the connection without a word.
    Close,
}

struct Scripted {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// A raw TCP upstream. `script(connection, request_on_connection, head)` decides each answer;
/// both counts start at 0.
async fn scripted<F>(script: F) -> Scripted
where
    F: Fn(usize, usize, &str) -> Act + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (conns, reqs) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let conn = conns.fetch_add(1, Ordering::SeqCst);
            let (script, reqs) = (script.clone(), reqs.clone());
            tokio::spawn(async move {
                let mut pending = Vec::new();
                for n in 0.. {
                    let Some(head) = read_head(&mut s, &mut pending).await else {
                        return;
                    };
                    reqs.fetch_add(1, Ordering::SeqCst);
                    let length = content_length(&head);
                    match script(conn, n, &head) {
                        Act::Reply(bytes) | Act::ReplyAndClose(bytes) if length > 0 => {
                            if !read_body(&mut s, &mut pending, length).await {
                                return;
                            }
                            let close = matches!(script(conn, n, &head), Act::ReplyAndClose(_));
                            if s.write_all(bytes).await.is_err() || close {
                                return;
                            }
                        }
                        Act::Reply(bytes) => {
                            if s.write_all(bytes).await.is_err() {
                                return;
                            }
                        }
                        Act::ReplyAndClose(bytes) => {
                            let _ = s.write_all(bytes).await;
                            return;
                        }
                        Act::ReplyBeforeBody(bytes) => {
                            let _ = s.write_all(bytes).await;
                            let mut sink = vec![0u8; 64 * 1024];
                            while let Ok(n) = s.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                            return;
                        }
                        Act::Close => return,
                    }
                }
            });
        }
    });
    Scripted {
        addr,
        connections,
        requests,
    }
}

async fn read_head(s: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

async fn read_body(s: &mut tokio::net::TcpStream, pending: &mut Vec<u8>, length: usize) -> bool {
    let mut buf = [0u8; 4096];
    while pending.len() < length {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
    pending.drain(..length);
    true
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn proxy_to(up: &Scripted) -> proxy::Proxy {
    proxy::start(&Config::one(&format!("http://{}", up.addr))).await
}

#[tokio::test]
async fn bodies_delimited_by_the_close_are_read_to_the_end() {
    let up =
        scripted(|_, _, _| Act::ReplyAndClose(b"HTTP/1.1 200 OK\r\n\r\nhello, all of it")).await;
    let proxy = proxy_to(&up).await;
    for _ in 0..2 {
        let answer = support::get(&proxy.url("/")).await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "hello, all of it")
        );
    }
    // Such a connection cannot carry a second request.
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_keep_the_connection() {
    let up = scripted(|_, _, _| {
        Act::Reply(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              5;note=x\r\nhello\r\n7\r\n, world\r\n0\r\nx-checksum: 1\r\n\r\n",
        )
    })
    .await;
    let proxy = proxy_to(&up).await;
    for _ in 0..3 {
        let answer = support::get(&proxy.url("/")).await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "hello, world")
        );
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn chunked_wins_over_a_length_and_the_length_is_not_passed_on() {
    // RFC 9112 §6.3: with both, the transfer coding frames the body.
    let up = scripted(|_, _, _| {
        Act::ReplyAndClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n",
        )
    })
    .await;
    let proxy = proxy_to(&up).await;
    let answer = support::get(&proxy.url("/")).await;
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (200, "helloworld")
    );
    let length = answer.headers.get("content-length");
    assert!(length.is_none_or(|l| l == "10"), "{length:?}");
}

#[tokio::test]
async fn head_and_no_content_answers_have_no_body_whatever_their_length_says() {
    let up = scripted(|_, n, head| match n {
        _ if head.starts_with("HEAD") => {
            Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        }
        0 => Act::Reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
        _ => Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let proxy = proxy_to(&up).await;
    let client = support::client();
    let answer = support::collect(
        client
            .request(
                Request::get(proxy.url("/"))
                    .body(sidelight::http::body::empty())
                    .unwrap(),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (204, ""));
    let head = client
        .request(
            Request::head(proxy.url("/"))
                .body(sidelight::http::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "5");
    let answer = support::get(&proxy.url("/")).await;
    assert_eq!(answer.body, "ok");
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one connection for all three"
    );
}

#[tokio::test]
async fn interim_answers_are_skipped() {
    let up = scripted(|_, _, _| {
        Act::Reply(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
        )
    })
    .await;
    let proxy = proxy_to(&up).await;
    let answer = support::post(&proxy.url("/"), "{}").await;
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (201, "done")
    );
}

#[tokio::test]
async fn a_get_whose_pooled_connection_was_closed_under_it_is_sent_again() {
    // The upstream closes its first connection on receiving the second request: the race
    // between a server's keep-alive timeout and a new request, made certain.
    let up = scripted(|conn, n, _| match (conn, n) {
        (0, 0) | (1, _) => Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        _ => Act::Close,
    })
    .await;
    let proxy = proxy_to(&up).await;
    assert_eq!(support::get(&proxy.url("/")).await.body, "ok");
    let again = support::get(&proxy.url("/")).await;
    assert_eq!((again.status.as_u16(), again.body.as_str()), (200, "ok"));
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_post_whose_pooled_connection_was_closed_under_it_is_not_sent_twice() {
    let up = scripted(|conn, n, _| match (conn, n) {
        (0, 0) | (1, _) => Act::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        _ => Act::Close,
    })
    .await;
    let proxy = proxy_to(&up).await;
    assert_eq!(support::post(&proxy.url("/"), "first").await.body, "ok");
    let second = support::post(&proxy.url("/"), "second").await;
    // The upstream may have acted on it: the client decides whether to try again.
    assert_eq!(second.status, 502);
    assert_eq!(second.header("x-sidelight-error"), "upstream_reset");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_answer_sent_before_the_request_body_ends_reaches_the_client() {
    let up = scripted(|_, _, _| {
        Act::ReplyBeforeBody(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo much")
    })
    .await;
    let proxy = proxy_to(&up).await;
    // 4 MiB in 64 KiB chunks: far more than the socket buffers hold, so the answer comes first.
    let chunks = (0..64).map(|_| {
        Ok::<_, sidelight::BoxError>(http_body::Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))
    });
    let body: ProxyBody = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
    let response = support::client()
        .request(Request::post(proxy.url("/upload")).body(body).unwrap())
        .await
        .expect("an answer, not a failed request");
    let answer = support::collect(response).await;
    assert_eq!(
        (answer.status.as_u16(), answer.body.as_str()),
        (413, "too much")
    );
    assert_eq!(answer.header("x-sidelight-error"), "");
}

#[tokio::test]
async fn answers_that_are_not_http_are_a_502_protocol_error_not_a_reset() {
    let up = scripted(|_, _, _| Act::ReplyAndClose(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")).await;
    // With retries on: a protocol error is not sent again (a reset would be).
    let proxy = proxy::start(&Config::one(&format!("http://{}", up.addr)).route_set(
        "retries",
        serde_json::json!({ "max_retries": 2, "backoff": "1ms" }),
    ))
    .await;
    let answer = support::get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("x-sidelight-error"),
        "upstream_protocol_error"
    );
    assert_eq!(answer.json()["error"]["type"], "upstream_protocol_error");
    assert!(answer.body.contains("invalid response"), "{}", answer.body);
    assert_eq!(up.requests.load(Ordering::SeqCst), 1, "not retried");
    proxy
        .assert_metric_eventually(
            "sidelight_upstream_failures_total",
            &[("upstream", "up"), ("kind", "protocol")],
            1.0,
        )
        .await;
    assert_eq!(
        proxy
            .metric(
                "sidelight_upstream_failures_total",
                &[("upstream", "up"), ("kind", "reset")]
            )
            .await,
        0.0
    );

    // A head cut by the close is a dropped connection: still a reset, and retried.
    let up = scripted(|_, _, _| Act::ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-le")).await;
    let proxy = proxy::start(&Config::one(&format!("http://{}", up.addr)).route_set(
        "retries",
        serde_json::json!({ "max_retries": 2, "backoff": "1ms" }),
    ))
    .await;
    let answer = support::get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.header("x-sidelight-error"), "upstream_reset");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3, "a reset is retried");

    // One header of 100 KiB: past the 64 KiB limit on a response head.
    static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HUGE.get_or_init(|| {
        format!(
            "HTTP/1.1 200 OK\r\nx-filler: {}\r\n\r\n",
            "y".repeat(100 * 1024)
        )
        .into_bytes()
    });
    let up = scripted(|_, _, _| Act::ReplyAndClose(HUGE.get().map_or(b"", |h| h.as_slice()))).await;
    let proxy = proxy_to(&up).await;
    let answer = support::get(&proxy.url("/")).await;
    assert_eq!(answer.status, 502);
    assert_eq!(
        answer.header("x-sidelight-error"),
        "upstream_protocol_error"
    );
    assert!(answer.body.contains("larger than"), "{}", answer.body);
}
