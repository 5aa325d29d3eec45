//! Errors the pooler reports to clients as PostgreSQL `ErrorResponse`s, with SQLSTATEs.

use super::messages::{put_cstr, put_message};
use bytes::{BufMut, BytesMut};

/// SQLSTATEs sidelight sends itself.
pub mod sqlstate {
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const UNKNOWN_DATABASE: &str = "3D000";
    pub const CANNOT_CONNECT: &str = "08001";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const QUERY_CANCELED: &str = "57014";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
}

/// One ErrorResponse: severity (`ERROR`, `FATAL`), SQLSTATE, message.
#[derive(Debug, Clone)]
pub struct PgError {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl PgError {
    pub fn new(severity: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity,
            code,
            message: message.into(),
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError::new("FATAL", code, message)
    }

    pub fn write(&self, out: &mut BytesMut) {
        put_message(out, b'E', |b| {
            b.put_u8(b'S');
            put_cstr(b, self.severity);
            b.put_u8(b'V');
            put_cstr(b, self.severity);
            b.put_u8(b'C');
            put_cstr(b, self.code);
            b.put_u8(b'M');
            put_cstr(b, &self.message);
            b.put_u8(0);
        });
    }

    pub fn bytes(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.message.len());
        self.write(&mut out);
        out
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}
