//! Builder-style upstream servers on loopback, in the spirit of linkerd2-proxy's test harness:
//! `server::http1().route("/", "hello").run().await`. Each records the requests it saw and
//! counts the TCP connections it accepted.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sidelight::http::body::{full, ProxyBody};
use sidelight::BoxError;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a streaming handler sends: a chunk, or `Err` to break the connection mid-body.
pub type Chunk = Result<Bytes, ()>;

type FnHandler = Arc<dyn Fn(Recorded) -> Response<ProxyBody> + Send + Sync>;
type AsyncHandler = Arc<dyn Fn(Recorded) -> BoxFuture<'static, Response<ProxyBody>> + Send + Sync>;
type StreamHandler =
    Arc<dyn Fn(Recorded, mpsc::Sender<Chunk>) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone)]
enum Handler {
    Fixed {
        status: StatusCode,
        body: Bytes,
        latency: Duration,
    },
    Fn(FnHandler),
    /// Answers when the handler's future does (latency, faults decided per request).
    Async(AsyncHandler),
    /// Sends headers at once (`text/event-stream`), then whatever the handler pushes.
    Stream(StreamHandler),
    /// Never answers.
    Hang,
    /// Closes the connection without a response.
    Reset,
}

pub struct Builder {
    routes: Vec<(String, Handler)>,
    http2: bool,
    tls: Option<(String, String)>,
}

pub fn http1() -> Builder {
    Builder {
        routes: Vec::new(),
        http2: false,
        tls: None,
    }
}

/// Serves HTTP/1 and h2c on the same port (prior knowledge h2 is detected by its preface).
pub fn http2() -> Builder {
    Builder {
        routes: Vec::new(),
        http2: true,
        tls: None,
    }
}

impl Builder {
    fn add(mut self, path: &str, handler: Handler) -> Self {
        self.routes.push((path.to_string(), handler));
        self
    }

    pub fn route(self, path: &str, body: &str) -> Self {
        self.route_with_latency(path, body, Duration::ZERO)
    }

    pub fn route_with_latency(self, path: &str, body: &str, latency: Duration) -> Self {
        self.add(
            path,
            Handler::Fixed {
                status: StatusCode::OK,
                body: Bytes::from(body.to_string()),
                latency,
            },
        )
    }

    pub fn status(self, path: &str, status: u16, body: &str) -> Self {
        self.add(
            path,
            Handler::Fixed {
                status: StatusCode::from_u16(status).expect("status"),
                body: Bytes::from(body.to_string()),
                latency: Duration::ZERO,
            },
        )
    }

    pub fn route_fn(
        self,
        path: &str,
        f: impl Fn(Recorded) -> Response<ProxyBody> + Send + Sync + 'static,
    ) -> Self {
        self.add(path, Handler::Fn(Arc::new(f)))
    }

    pub fn route_async<F, Fut>(self, path: &str, f: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        self.add(path, Handler::Async(Arc::new(move |r| Box::pin(f(r)))))
    }

    pub fn route_stream<F, Fut>(self, path: &str, f: F) -> Self
    where
        F: Fn(Recorded, mpsc::Sender<Chunk>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.add(
            path,
            Handler::Stream(Arc::new(move |r, tx| Box::pin(f(r, tx)))),
        )
    }

    pub fn route_hang(self, path: &str) -> Self {
        self.add(path, Handler::Hang)
    }

    pub fn route_reset(self, path: &str) -> Self {
        self.add(path, Handler::Reset)
    }

    /// Serve TLS with this PEM certificate chain and key.
    pub fn tls(mut self, cert_pem: String, key_pem: String) -> Self {
        self.tls = Some((cert_pem, key_pem));
        self
    }

    pub async fn run(self) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let mut routes = self.routes;
        // Longest prefix first.
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let routes = Arc::new(routes);
        let tls = self.tls.map(|(cert, key)| tls_acceptor(&cert, &key));
        let http2 = self.http2;
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                st.open.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                let routes = routes.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = {
                        let st = st.clone();
                        service_fn(move |req| handle(req, routes.clone(), st.clone()))
                    };
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    if !http2 {
                        builder = builder.http1_only();
                    }
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    st.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Server { addr, state, task }
    }
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[derive(Default)]
pub struct State {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    open: AtomicI64,
}

async fn handle(
    req: Request<Incoming>,
    routes: Arc<Vec<(String, Handler)>>,
    state: Arc<State>,
) -> Result<Response<ProxyBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
    };
    state.requests.lock().unwrap().push(recorded.clone());
    let path = recorded.uri.path().to_string();
    let handler = routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, h)| h.clone());
    match handler {
        None => Ok(Response::builder()
            .status(404)
            .body(full("no such route in test server"))
            .unwrap()),
        Some(Handler::Fixed {
            status,
            body,
            latency,
        }) => {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            Ok(Response::builder().status(status).body(full(body)).unwrap())
        }
        Some(Handler::Fn(f)) => Ok(f(recorded)),
        Some(Handler::Async(f)) => Ok(f(recorded).await),
        Some(Handler::Stream(f)) => {
            let (tx, rx) = mpsc::channel::<Chunk>(16);
            tokio::spawn(f(recorded, tx));
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Some(Ok(bytes)) => Some((Ok(Frame::data(bytes)), rx)),
                    Some(Err(())) => {
                        Some((Err(BoxError::from("test server broke the stream")), rx))
                    }
                    None => None,
                }
            });
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed_unsync())
                .unwrap())
        }
        Some(Handler::Hang) => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Some(Handler::Reset) => Err("reset by test server".into()),
    }
}

pub struct Server {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    pub fn last_request(&self) -> Recorded {
        self.requests().pop().expect("the server saw no request")
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> i64 {
        self.state.open.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port where connections are accepted by the kernel but never get past the backlog: a
/// connect to it hangs, for connect-timeout tests. Keep the returned values alive.
pub async fn blackhole() -> (
    SocketAddr,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    // Fill the accept queue; further SYNs are dropped, so connects hang.
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    (addr, fillers, listener)
}

/// An upstream whose `/` streams `first`, then breaks the connection mid-body once the
/// returned sender says `true` (so a test can first see `first` arrive).
pub async fn stream_that_breaks(first: &'static str) -> (Server, tokio::sync::watch::Sender<bool>) {
    let (break_tx, break_rx) = tokio::sync::watch::channel(false);
    let server = http1()
        .route_stream("/", move |_, tx| {
            let mut break_rx = break_rx.clone();
            async move {
                let _ = tx.send(Ok(Bytes::from(first))).await;
                let _ = break_rx.wait_for(|b| *b).await;
                let _ = tx.send(Err(())).await;
            }
        })
        .run()
        .await;
    (server, break_tx)
}

/// A port with nothing listening (bound then closed), for connection-refused tests.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}
