//! HTTP/1.1 on both sides of the proxy, hand-written for speed (see the README's benchmark: the
//! same proxy on hyper's server and client reached 0.73x nginx's throughput, this one 1.04x).
//!
//! The wing's small interface:
//! - [`server::serve`] runs one client connection (HTTP/1.1, or h2c after its preface) and
//!   hands every request to a [`server::Handler`];
//! - [`client::Conn`] sends one request over a pooled upstream connection and returns a
//!   response whose body reads the socket as the client consumes it.
//!
//! Both sides share [`framing`]: head parsing rules, one [`framing::Framing`] type and one body
//! reader, [`framing::BodyDecoder::poll_read`], as Pingora keeps `protocols/http/v1/{common,
//! body, server, client}`.

pub mod client;
pub mod framing;
pub mod server;
