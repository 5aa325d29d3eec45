//! Upstreams: named sets of endpoints, each reached through a connection pool: sidelight's own
//! HTTP/1.1 pool, or hyper-util's client for HTTP/2 (multiplexed) upstreams.

pub mod balance;
mod connector;
mod pool;

pub use connector::{find_connect_failure, ConnectFailure};
pub use pool::SendError;

use crate::config::{TimeoutsConfig, UpstreamConfig};
use crate::http::body::ProxyBody;
use crate::metrics::upstream::UpstreamMetrics;
use crate::metrics::Metrics;
use connector::CountingConnector;
use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("upstream {upstream}: endpoint {endpoint:?}: {message}")]
    Endpoint {
        upstream: String,
        endpoint: String,
        message: String,
    },
    #[error("upstream {upstream}: TLS: {message}")]
    Tls { upstream: String, message: String },
    /// Validation guarantees every reference; a miss means the shared state was built from
    /// another config.
    #[error("{what} is missing from the shared state: build SharedState from the same config")]
    NotShared { what: String },
}

/// One base URL of an upstream.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the base URL without a trailing slash (`""` for `https://host`).
    pub base_path: String,
    /// The `Host` header for this endpoint (the port only when not the scheme's default).
    pub host_header: HeaderValue,
    /// `Basic` credentials from the URL's `user:password@`, sent with every request to the
    /// endpoint (as curl does); validation refuses them next to an `authorization` header.
    pub authorization: Option<HeaderValue>,
}

pub struct Upstream {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    pub timeouts: TimeoutsConfig,
    /// Added to every request; headers whose `${VAR}` was empty are left out.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub metrics: UpstreamMetrics,
    transport: Transport,
    /// Shared with the same upstream on every other worker.
    pub balancer: Arc<balance::Balancer>,
}

impl Upstream {
    pub fn build(
        config: &UpstreamConfig,
        metrics: &Metrics,
        balancer: Arc<balance::Balancer>,
    ) -> Result<Upstream, BuildError> {
        let name = config.name.as_str();
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| parse_endpoint(name, &e.value))
            .collect::<Result<Vec<_>, _>>()?;
        let mut headers = Vec::new();
        for (key, value) in &config.headers {
            if value.has_empty_var {
                continue;
            }
            // Validation already checked both; a failure here would be a bug, reported not panicked.
            let bad = |message: &str| BuildError::Endpoint {
                upstream: name.into(),
                endpoint: key.clone(),
                message: message.into(),
            };
            let header_name =
                HeaderName::from_bytes(key.as_bytes()).map_err(|_| bad("invalid header name"))?;
            let mut header_value =
                HeaderValue::from_str(&value.value).map_err(|_| bad("invalid header value"))?;
            header_value.set_sensitive(true);
            headers.push((header_name, header_value));
        }

        let tls = tls_config(config).map_err(|message| BuildError::Tls {
            upstream: name.into(),
            message,
        })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1();
        let https = if config.pool.http2 {
            https.enable_http2().wrap_connector(http)
        } else {
            https.wrap_connector(http)
        };
        let conn_metrics = metrics.upstream.connections(name);
        let connector = CountingConnector::new(https, config.timeouts.connect, conn_metrics);
        let transport = if config.pool.http2 {
            // Plain-http upstreams speak h2c with prior knowledge; https ones negotiate by ALPN,
            // which the client follows on its own.
            let h2c = endpoints.iter().all(|e| e.scheme == Scheme::HTTP);
            Transport::Multiplexed(Box::new(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(config.pool.idle_timeout)
                    .pool_max_idle_per_host(config.pool.max_idle_per_endpoint)
                    // Without a timer hyper-util never expires idle pooled connections.
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .http2_only(h2c)
                    .build(connector),
            ))
        } else {
            let uris = endpoints
                .iter()
                .map(|e| {
                    Uri::builder()
                        .scheme(e.scheme.clone())
                        .authority(e.authority.clone())
                        .path_and_query("/")
                        .build()
                        .map_err(|err| BuildError::Endpoint {
                            upstream: name.into(),
                            endpoint: e.authority.to_string(),
                            message: err.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Transport::Http1(pool::Http1Pool::new(
                uris,
                connector,
                config.pool.max_idle_per_endpoint,
                config.pool.idle_timeout,
            ))
        };

        let upstream_metrics = metrics.upstream.upstream(name);
        Ok(Upstream {
            name: Arc::from(name),
            endpoints,
            timeouts: config.timeouts.clone(),
            headers,
            metrics: upstream_metrics,
            transport,
            balancer,
        })
    }

    /// Power of two choices on requests in flight, skipping endpoints backing off. A retry
    /// passes the endpoints its earlier attempts used: they are avoided, and the choice is added.
    pub fn pick(&self, tried: Option<&balance::TriedEndpoints>) -> usize {
        let mask = tried.map_or(0, |t| t.mask());
        let i = self
            .balancer
            .pick_avoiding(mask)
            .min(self.endpoints.len().saturating_sub(1));
        if let Some(t) = tried {
            t.add(i);
        }
        i
    }

    /// The endpoint label for metrics: host and port, never credentials from the URL.
    pub fn endpoint_label(url: &str) -> String {
        match url.parse::<http::Uri>() {
            Ok(uri) => {
                let host = uri.host().unwrap_or("?");
                match uri.port_u16() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_string(),
                }
            }
            Err(_) => "?".into(),
        }
    }

    /// Sends a request whose URI is origin-form (path and query) and whose `Host` is set, to
    /// endpoint number `endpoint`.
    pub async fn send(
        &self,
        endpoint: usize,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        match &self.transport {
            Transport::Http1(pool) => pool.send(endpoint, req).await,
            Transport::Multiplexed(client) => {
                let e = &self.endpoints[endpoint];
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(e.scheme.clone());
                parts.authority = Some(e.authority.clone());
                *req.uri_mut() =
                    Uri::from_parts(parts).map_err(|err| SendError::Request(err.to_string()))?;
                let response = client.request(req).await?;
                Ok(response.map(|b| b.map_err(crate::BoxError::from).boxed_unsync()))
            }
        }
    }
}

enum Transport {
    Http1(Arc<pool::Http1Pool>),
    Multiplexed(Box<Client<CountingConnector, ProxyBody>>),
}

fn parse_endpoint(upstream: &str, url: &str) -> Result<Endpoint, BuildError> {
    let bad = |message: String| BuildError::Endpoint {
        upstream: upstream.into(),
        endpoint: crate::config::redact::url_password(url),
        message,
    };
    let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let parts = uri.into_parts();
    let scheme = parts.scheme.ok_or_else(|| bad("no scheme".into()))?;
    let authority = parts.authority.ok_or_else(|| bad("no host".into()))?;
    // The credentials leave the authority: it is dialled, logged and sent as `:authority`.
    let (authority, authorization) = match authority.as_str().rsplit_once('@') {
        Some((userinfo, host)) => {
            let host: Authority = host.parse().map_err(|e| bad(format!("{e}")))?;
            (host, Some(basic_auth(userinfo).map_err(bad)?))
        }
        None => (authority, None),
    };
    let base_path = parts
        .path_and_query
        .map(|p| p.path().trim_end_matches('/').to_string())
        .unwrap_or_default();
    let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    let host_header = HeaderValue::from_str(&host).map_err(|e| bad(format!("{e}")))?;
    Ok(Endpoint {
        scheme,
        authority,
        base_path,
        host_header,
        authorization,
    })
}

/// `Authorization: Basic` for a URL's `user:password`, percent-decoded as curl does.
fn basic_auth(userinfo: &str) -> Result<HeaderValue, String> {
    use base64::Engine;
    let decoded = percent_decode(userinfo.as_bytes())
        .ok_or_else(|| "invalid percent-encoding in the URL's credentials".to_string())?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(decoded);
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| "cannot encode the URL's credentials".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

/// `%XX` decoded (the `:` between user and password stays, being literal in the URL).
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn tls_config(config: &UpstreamConfig) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.tls.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("no PEM certificate found in {}", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}
