//! The pooler's transport: a plain TCP socket or TLS over one, behind the small surface the
//! session loop uses of `TcpStream` (readiness, non-blocking `try_read`/`try_write`) plus
//! `AsyncRead`/`AsyncWrite` for the startup and authentication exchanges.
//!
//! Plain delegates straight to tokio's `TcpStream`. TLS drives a rustls `Connection` over the
//! socket by hand instead of through tokio-rustls: the session loop is built on readiness plus
//! non-blocking calls, which tokio-rustls (poll-based) does not offer, and a thin layer of
//! our own keeps the semantics exact:
//! - `try_read` returns plaintext rustls already decrypted, else reads records from the socket
//!   until it has some or the socket would block; `readable` returns at once while decrypted
//!   plaintext (or the peer's close) is waiting, so no wake-up is lost.
//! - `try_write` first flushes TLS bytes queued earlier (refusing new plaintext while they do not
//!   fit, which bounds memory), then encrypts and flushes what the socket takes. Bytes accepted
//!   by rustls count as written; what the socket did not take yet goes out on the next
//!   `try_write`, `writable`, `readable` or read, so nothing is lost or stuck behind a wait for
//!   an answer the peer cannot send before it has our request.
//! - `shutdown` sends close_notify, flushes, then shuts the socket down.
//!
//! The rustls state sits in a `Mutex` so every method takes `&self` like `TcpStream`'s (the
//! session loop reads and writes a stream from shared borrows); it is never contended.

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Most plaintext one `try_read_buf` takes on TLS (a few TLS records).
const TLS_READ_CHUNK: usize = 64 * 1024;

pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

pub struct TlsStream {
    tcp: TcpStream,
    state: Mutex<TlsState>,
}

struct TlsState {
    conn: rustls::Connection,
    /// The socket reported end of file.
    eof: bool,
    /// rustls failed (bad record, alert): every later read fails too, never busy-loops.
    broken: bool,
    close_sent: bool,
}

/// `std::io` over the non-blocking socket, for rustls's `read_tls` / `write_tls`.
struct SyncIo<'a>(&'a TcpStream);

impl Read for SyncIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SyncIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsState {
    /// Writes queued TLS bytes until none are left (true) or the socket would block (false).
    fn flush(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SyncIo(tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Decrypted plaintext, reading records from the socket as needed; `Ok(0)` at the peer's
    /// close (close_notify or a bare end of file), `WouldBlock` when the socket has no more.
    fn read(&mut self, tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS failed"));
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            if self.conn.read_tls(&mut SyncIo(tcp))? == 0 {
                self.eof = true;
            }
            if let Err(e) = self.conn.process_new_packets() {
                self.broken = true;
                // The alert rustls queued tells the peer why.
                let _ = self.flush(tcp);
                return Err(tls_error(e));
            }
            // Anything rustls answers on its own (key updates) goes out if the socket takes it.
            self.flush(tcp)?;
        }
    }

    fn write(&mut self, tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        if !self.flush(tcp)? {
            return Err(would_block());
        }
        let n = self.conn.writer().write(buf)?;
        self.flush(tcp)?;
        if n == 0 && !buf.is_empty() {
            return Err(would_block());
        }
        Ok(n)
    }

    /// Something for `read` to return without the socket: plaintext, the close, or an error.
    fn ready_to_read(&mut self) -> bool {
        if self.eof || self.broken {
            return true;
        }
        match self.conn.process_new_packets() {
            Ok(s) => s.plaintext_bytes_to_read() > 0 || s.peer_has_closed(),
            Err(_) => {
                self.broken = true;
                true
            }
        }
    }
}

impl TlsStream {
    fn lock(&self) -> MutexGuard<'_, TlsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn new(tcp: TcpStream, conn: rustls::Connection) -> io::Result<TlsStream> {
        let t = TlsStream {
            tcp,
            state: Mutex::new(TlsState {
                conn,
                eof: false,
                broken: false,
                close_sent: false,
            }),
        };
        t.handshake().await?;
        Ok(t)
    }

    /// Runs the handshake to its end, including the flights rustls sends after it.
    async fn handshake(&self) -> io::Result<()> {
        loop {
            let (handshaking, flushed) = {
                let mut s = self.lock();
                let flushed = s.flush(&self.tcp)?;
                (s.conn.is_handshaking(), flushed)
            };
            if !flushed {
                self.tcp.writable().await?;
                continue;
            }
            if !handshaking {
                return Ok(());
            }
            self.tcp.readable().await?;
            let mut s = self.lock();
            match s.conn.read_tls(&mut SyncIo(&self.tcp)) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed during the TLS handshake",
                    ))
                }
                Ok(_) => {
                    if let Err(e) = s.conn.process_new_packets() {
                        let _ = s.flush(&self.tcp);
                        return Err(tls_error(e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn readable(&self) -> io::Result<()> {
        loop {
            let flushed = {
                let mut s = self.lock();
                if s.ready_to_read() {
                    return Ok(());
                }
                s.flush(&self.tcp)?
            };
            if flushed {
                return self.tcp.readable().await;
            }
            // Our queued bytes may be what the peer waits for before it sends anything.
            tokio::select! {
                r = self.tcp.readable() => return r,
                r = self.tcp.writable() => r?,
            }
        }
    }

    async fn writable(&self) -> io::Result<()> {
        loop {
            if self.lock().flush(&self.tcp)? {
                return Ok(());
            }
            self.tcp.writable().await?;
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut s = self.lock();
            // A request written with write_all may still be queued: it must go before we wait.
            if !s.flush(&self.tcp)? {
                if let Poll::Ready(r) = self.tcp.poll_write_ready(cx) {
                    r?;
                    continue;
                }
            }
            match s.read(&self.tcp, buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            drop(s);
            ready!(self.tcp.poll_read_ready(cx))?;
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.lock().write(&self.tcp, buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.lock().flush(&self.tcp)? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }
}

impl PgStream {
    /// Server side of TLS (a client asked with SSLRequest and got `S`).
    pub async fn accept_tls(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        let t = TlsStream::new(tcp, rustls::Connection::Server(conn)).await?;
        Ok(PgStream::Tls(Box::new(t)))
    }

    /// Client side of TLS (the server answered our SSLRequest with `S`).
    pub async fn connect_tls(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Self> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        let t = TlsStream::new(tcp, rustls::Connection::Client(conn)).await?;
        Ok(PgStream::Tls(Box::new(t)))
    }

    /// TLS bytes accepted but not yet taken by the socket (tests).
    #[cfg(test)]
    fn tls_pending(&self) -> bool {
        match self {
            PgStream::Plain(_) => false,
            PgStream::Tls(t) => t.lock().conn.wants_write(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            PgStream::Plain(s) => s.set_nodelay(on),
            PgStream::Tls(t) => t.tcp.set_nodelay(on),
        }
    }

    /// Returns when `try_read` may have something (data, the close or an error).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            PgStream::Plain(s) => s.readable().await,
            PgStream::Tls(t) => t.readable().await,
        }
    }

    /// Returns when `try_write` may take bytes.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            PgStream::Plain(s) => s.writable().await,
            PgStream::Tls(t) => t.writable().await,
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PgStream::Plain(s) => s.try_read(buf),
            PgStream::Tls(t) => t.lock().read(&t.tcp, buf),
        }
    }

    /// Reads into the spare capacity of `buf`, as `try_read`.
    ///
    /// On plain TCP a read that fills less than the space offered has drained the socket, so it
    /// clears the readiness it was made on, as tokio's own `poll_read` does: the next
    /// `readable()` then waits for new bytes instead of returning at once for a read that
    /// could only fail with EAGAIN (two wasted syscalls and loop turns per request and answer).
    /// Bytes arriving between the read and the clear carry a newer readiness event, which the
    /// clear leaves alone, so no wake-up is lost.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            PgStream::Plain(s) => {
                let offered = buf.capacity() - buf.len();
                let mut got = 0;
                let r = s.try_io(Interest::READABLE, || {
                    got = s.try_read_buf(buf)?;
                    if got > 0 && got < offered {
                        Err(would_block())
                    } else {
                        Ok(got)
                    }
                });
                match r {
                    Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(got),
                    r => r,
                }
            }
            PgStream::Tls(t) => {
                // Zeroed first (rustls reads into initialized bytes): bounded, not all capacity.
                let len = buf.len();
                let spare = (buf.capacity() - len).clamp(1, TLS_READ_CHUNK);
                buf.resize(len + spare, 0);
                let r = t.lock().read(&t.tcp, &mut buf[len..]);
                buf.truncate(len + *r.as_ref().unwrap_or(&0));
                r
            }
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PgStream::Plain(s) => s.try_write(buf),
            PgStream::Tls(t) => t.lock().write(&t.tcp, buf),
        }
    }

    /// `try_write` of several buffers in order: one writev on plain TCP; through TLS, buffer by
    /// buffer until one is taken short.
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            PgStream::Plain(s) => s.try_write_vectored(bufs),
            PgStream::Tls(_) => {
                let mut total = 0;
                for buf in bufs {
                    match self.try_write(buf) {
                        Ok(n) => {
                            total += n;
                            if n < buf.len() {
                                break;
                            }
                        }
                        Err(e) if total > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                Ok(total)
            }
        }
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            PgStream::Plain(s) => s.peer_addr(),
            PgStream::Tls(t) => t.tcp.peer_addr(),
        }
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(t) => t.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(t) => t.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(t) => t.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(t) => {
                {
                    let mut s = t.lock();
                    if !s.close_sent {
                        s.conn.send_close_notify();
                        s.close_sent = true;
                    }
                }
                ready!(t.poll_flush(cx))?;
                Pin::new(&mut t.tcp).poll_shutdown(cx)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS pair over loopback: sidelight's server side and client side talking to each other.
    async fn pair() -> (PgStream, PgStream) {
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = rustls::pki_types::CertificateDer::from(ca.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::try_from(ca.key_pair.serialize_der())
            .unwrap_or_else(|e| panic!("{e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.clone()], key)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap_or_else(|e| panic!("{e}"));
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .unwrap_or_else(|e| panic!("{e}"));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let accept = async {
            let (tcp, _) = l.accept().await.unwrap_or_else(|e| panic!("{e}"));
            PgStream::accept_tls(tcp, Arc::new(server)).await
        };
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let name = ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
            PgStream::connect_tls(tcp, Arc::new(client), name).await
        };
        let (a, c) = tokio::join!(accept, connect);
        (
            a.unwrap_or_else(|e| panic!("{e}")),
            c.unwrap_or_else(|e| panic!("{e}")),
        )
    }

    /// Megabytes through the non-blocking calls only, with the reader slower than the writer
    /// so the socket fills and TLS bytes queue: every byte arrives, in order.
    #[tokio::test]
    async fn non_blocking_calls_lose_nothing() {
        let (a, b) = pair().await;
        let total = 4 << 20;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let send = async {
            let mut at = 0;
            while at < total {
                a.writable().await.unwrap_or_else(|e| panic!("{e}"));
                match a.try_write(&data[at..(at + 100_000).min(total)]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let recv = async {
            let mut got = BytesMut::with_capacity(total);
            while got.len() < total {
                b.readable().await.unwrap_or_else(|e| panic!("{e}"));
                got.reserve(3000);
                match b.try_read_buf(&mut got) {
                    Ok(0) => panic!("closed early at {}", got.len()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if got.len() % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert!(got[..] == data[..], "bytes differ");
    }

    /// A write rustls accepted while the socket was full: the writer then only waits to read,
    /// and its queued bytes still reach the peer (readable() flushes them), so the answer that
    /// needs them comes.
    #[tokio::test]
    async fn queued_tls_bytes_go_out_while_waiting_to_read() {
        let (a, b) = pair().await;
        let chunk = vec![7u8; 64 * 1024];
        // Nobody reads yet: write until a write is accepted with TLS bytes left over.
        let mut sent = 0;
        loop {
            match a.try_write(&chunk) {
                Ok(n) => {
                    sent += n;
                    if a.tls_pending() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    panic!("socket full before any write was left queued")
                }
                Err(e) => panic!("{e}"),
            }
        }
        let recv = async {
            let mut got = 0;
            let mut buf = vec![0u8; 32 * 1024];
            while got < sent {
                b.readable().await.unwrap_or_else(|e| panic!("{e}"));
                match b.try_read(&mut buf) {
                    Ok(0) => panic!("closed early"),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            b.writable().await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(b.try_write(b"done").ok(), Some(4));
        };
        let wait = async {
            let mut answer = [0u8; 4];
            loop {
                a.readable().await.unwrap_or_else(|e| panic!("{e}"));
                match a.try_read(&mut answer) {
                    Ok(n) => return answer[..n].to_vec(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let both = async { tokio::join!(recv, wait).1 };
        let answer = tokio::time::timeout(std::time::Duration::from_secs(20), both)
            .await
            .unwrap_or_else(|_| panic!("stuck: {sent} bytes written, the queued part never sent"));
        assert_eq!(answer, b"done");
    }

    /// The async traits (startup and auth use them) and close_notify at shutdown.
    #[tokio::test]
    async fn async_traits_and_close_notify() {
        let (mut a, mut b) = pair().await;
        a.write_all(b"hello")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf, b"hello");
        a.shutdown().await.unwrap_or_else(|e| panic!("{e}"));
        b.readable().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.try_read(&mut buf).ok(),
            Some(0),
            "close seen as end of stream"
        );
    }
}
