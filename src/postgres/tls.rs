//! TLS settings built once at start from the config: a rustls `ServerConfig` per listener that
//! has a certificate, a rustls `ClientConfig` per pool that may use TLS, and the two
//! certificate verifiers libpq's `sslmode` needs beyond rustls's own (`require`: none,
//! `verify-ca`: the chain without the host name).

use crate::config::{ClientSslMode, PgListenerConfig, PgPoolConfig, ServerSslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TlsError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        field: field.to_string(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A listener's answer to SSLRequest, and its certificate when it has one.
pub struct ListenerTls {
    pub mode: ClientSslMode,
    pub config: Option<Arc<rustls::ServerConfig>>,
}

pub fn listener_tls(l: &PgListenerConfig, at: &str) -> Result<ListenerTls, TlsError> {
    let mode = l.client_sslmode();
    let (Some(cert), Some(key), true) = (
        &l.client_tls_cert_file,
        &l.client_tls_key_file,
        mode != ClientSslMode::Disable,
    ) else {
        return Ok(ListenerTls { mode, config: None });
    };
    let cert_field = format!("{at}.client_tls_cert_file");
    let key_field = format!("{at}.client_tls_key_file");
    let chain = certs(cert, &cert_field)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err(&key_field, format!("{}: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&cert_field, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(&key_field, e))?;
    Ok(ListenerTls {
        mode,
        config: Some(Arc::new(config)),
    })
}

fn certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(field, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(field, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(field, format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// How a pool reaches its servers: the mode, and the client config unless `disable`.
pub struct ServerTls {
    pub mode: ServerSslMode,
    pub config: Option<Arc<rustls::ClientConfig>>,
}

impl ServerTls {
    pub fn disabled() -> ServerTls {
        ServerTls {
            mode: ServerSslMode::Disable,
            config: None,
        }
    }
}

pub fn server_tls(p: &PgPoolConfig, at: &str) -> Result<ServerTls, TlsError> {
    let mode = p.server_tls_sslmode;
    let field = format!("{at}.server_tls_ca_file");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&field, e))?;
    let config = match mode {
        ServerSslMode::Disable => return Ok(ServerTls::disabled()),
        ServerSslMode::Prefer | ServerSslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth(),
        ServerSslMode::VerifyCa | ServerSslMode::VerifyFull => {
            let path = p
                .server_tls_ca_file
                .as_deref()
                .ok_or_else(|| err(&field, "required with verify-ca and verify-full"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs(path, &field)? {
                roots
                    .add(cert)
                    .map_err(|e| err(&field, format!("{}: {e}", path.display())))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| err(&field, e))?;
            if mode == ServerSslMode::VerifyFull {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(ServerTls {
        mode,
        config: Some(Arc::new(config)),
    })
}

/// The TLS server name for `host:port` (brackets of an IPv6 literal removed). Only verify-full
/// checks it; for the other modes a name rustls cannot use is replaced by a placeholder IP
/// address (no SNI is sent for IP addresses).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

pub fn placeholder_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

/// `sslmode=require` and `prefer`: encrypted, the certificate not checked (what libpq does).
/// Handshake signatures are still verified, so the session is bound to the presented key.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki checks the chain first and the name last, so a name mismatch alone
/// means the chain verified.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
