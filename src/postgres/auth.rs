//! Client authentication against configured users: SCRAM-SHA-256 (server side, RFC 5802 and
//! RFC 7677, written here because postgres-protocol only has the client side), md5 and trust.
//! A wrong password is answered with PostgreSQL's own error (SQLSTATE 28P01).

use super::errors::{sqlstate, PgError};
use super::messages::{self, auth_request, FrameError};
use crate::config::{AuthType, PgUserConfig};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

type HmacSha256 = Hmac<Sha256>;

/// A user's SCRAM secrets, as PostgreSQL stores them in `pg_authid`.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let key = |k: &str| -> Option<[u8; 32]> { B64.decode(k).ok()?.try_into().ok() };
        Some(ScramVerifier {
            iterations: iterations.parse().ok()?,
            salt: salt.to_string(),
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    fn from_password(password: &str) -> ScramVerifier {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        // The crate writes exactly the format parse reads; a fallback keeps this total.
        ScramVerifier::parse(&text).unwrap_or_else(ScramVerifier::impossible)
    }

    /// For unknown users: the exchange runs to the end and then fails, as PostgreSQL's does.
    fn impossible() -> ScramVerifier {
        ScramVerifier {
            iterations: 4096,
            salt: B64.encode(&uuid::Uuid::new_v4().as_bytes()[..]),
            stored_key: *uuid_bytes32(),
            server_key: *uuid_bytes32(),
        }
    }
}

fn uuid_bytes32() -> Box<[u8; 32]> {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    out[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    Box::new(out)
}

struct User {
    password: Option<String>,
    scram: ScramVerifier,
}

/// The configured users, with SCRAM verifiers computed once at start.
pub struct UserDb {
    users: HashMap<String, User>,
}

impl UserDb {
    pub fn new(users: &[PgUserConfig]) -> UserDb {
        UserDb {
            users: users
                .iter()
                .map(|u| {
                    let value = &u.password.value;
                    let user = match ScramVerifier::parse(value) {
                        Some(scram) => User {
                            password: None,
                            scram,
                        },
                        None => User {
                            password: Some(value.clone()),
                            scram: ScramVerifier::from_password(value),
                        },
                    };
                    (u.name.clone(), user)
                })
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Sent to the client as it is.
    #[error("{0}")]
    Refused(PgError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn refused(user: &str) -> AuthError {
    AuthError::Refused(PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

fn protocol(msg: &str) -> AuthError {
    AuthError::Refused(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, msg))
}

/// Runs the authentication exchange; on success the caller sends AuthenticationOk.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: AuthType,
    users: &UserDb,
    user: &str,
) -> Result<(), AuthError> {
    let known = users.users.get(user);
    match method {
        AuthType::Trust => {
            if known.is_none() {
                return Err(AuthError::Refused(PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!("role \"{user}\" is not allowed to log in through sidelight"),
                )));
            }
            Ok(())
        }
        AuthType::Md5 => {
            let salt: [u8; 4] = {
                let b = uuid::Uuid::new_v4();
                let b = b.as_bytes();
                [b[0], b[1], b[2], b[3]]
            };
            let mut out = BytesMut::new();
            auth_request(&mut out, 5, &salt);
            stream.write_all(&out).await.map_err(FrameError::from)?;
            let mut buf = BytesMut::new();
            let tag = messages::read_message(stream, &mut buf, 4096).await?;
            if tag != b'p' {
                return Err(protocol("expected a password message"));
            }
            let (sent, _) = messages::cstr(&buf)?;
            let Some(password) = known.and_then(|u| u.password.as_deref()) else {
                return Err(refused(user));
            };
            let want = postgres_protocol::authentication::md5_hash(
                user.as_bytes(),
                password.as_bytes(),
                salt,
            );
            if constant_eq(sent.as_bytes(), want.as_bytes()) {
                Ok(())
            } else {
                Err(refused(user))
            }
        }
        AuthType::ScramSha256 => {
            let verifier = known
                .map(|u| u.scram.clone())
                .unwrap_or_else(ScramVerifier::impossible);
            let ok = scram(stream, &verifier).await?;
            if ok && known.is_some() {
                Ok(())
            } else {
                Err(refused(user))
            }
        }
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The SCRAM-SHA-256 exchange; true when the client proved it knows the password.
async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    v: &ScramVerifier,
) -> Result<bool, AuthError> {
    let mut out = BytesMut::new();
    auth_request(&mut out, 10, b"SCRAM-SHA-256\0\0");
    stream.write_all(&out).await.map_err(FrameError::from)?;

    // SASLInitialResponse: mechanism, length, client-first-message.
    let mut buf = BytesMut::new();
    if messages::read_message(stream, &mut buf, 4096).await? != b'p' {
        return Err(protocol("expected SASLInitialResponse"));
    }
    let (mechanism, rest) = messages::cstr(&buf)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(protocol(
            "only SCRAM-SHA-256 is offered (no channel binding)",
        ));
    }
    if rest.len() < 4 {
        return Err(protocol("malformed SASLInitialResponse"));
    }
    let client_first = std::str::from_utf8(&rest[4..])
        .map_err(|_| protocol("malformed SCRAM message"))?
        .to_string();
    let client_first = client_first.as_str();
    // gs2-header: "n,," or "y,," (no channel binding), then client-first-message-bare.
    let (gs2, bare) = match client_first.as_bytes().first() {
        Some(b'n') | Some(b'y') => {
            let idx = client_first
                .match_indices(',')
                .nth(1)
                .map(|(i, _)| i + 1)
                .ok_or_else(|| protocol("malformed SCRAM gs2 header"))?;
            client_first.split_at(idx)
        }
        _ => return Err(protocol("SCRAM channel binding is not supported")),
    };
    let client_nonce = bare
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .ok_or_else(|| protocol("SCRAM message without nonce"))?;
    let (gs2, bare) = (gs2.to_string(), bare.to_string());
    let server_nonce = B64.encode(&uuid_bytes32()[..18]);
    let nonce = format!("{client_nonce}{server_nonce}");
    let server_first = format!("r={nonce},s={},i={}", v.salt, v.iterations);
    out.clear();
    auth_request(&mut out, 11, server_first.as_bytes());
    stream.write_all(&out).await.map_err(FrameError::from)?;

    // SASLResponse: client-final-message.
    if messages::read_message(stream, &mut buf, 4096).await? != b'p' {
        return Err(protocol("expected SASLResponse"));
    }
    let client_final =
        std::str::from_utf8(&buf).map_err(|_| protocol("malformed SCRAM message"))?;
    let (without_proof, proof) = client_final
        .rsplit_once(",p=")
        .ok_or_else(|| protocol("SCRAM message without proof"))?;
    let mut channel = None;
    let mut final_nonce = None;
    for attr in without_proof.split(',') {
        if let Some(c) = attr.strip_prefix("c=") {
            channel = Some(c);
        } else if let Some(r) = attr.strip_prefix("r=") {
            final_nonce = Some(r);
        }
    }
    if channel != Some(B64.encode(gs2.as_bytes()).as_str()) || final_nonce != Some(nonce.as_str()) {
        return Err(protocol("SCRAM nonce or channel binding mismatch"));
    }
    let Ok(proof) = B64.decode(proof) else {
        return Err(protocol("malformed SCRAM proof"));
    };
    if proof.len() != 32 {
        return Ok(false);
    }
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let client_signature = hmac(&v.stored_key, auth_message.as_bytes());
    let mut client_key = [0u8; 32];
    for (i, k) in client_key.iter_mut().enumerate() {
        *k = proof[i] ^ client_signature[i];
    }
    let stored: [u8; 32] = Sha256::digest(client_key).into();
    if !constant_eq(&stored, &v.stored_key) {
        return Ok(false);
    }
    let server_signature = hmac(&v.server_key, auth_message.as_bytes());
    out.clear();
    auth_request(
        &mut out,
        12,
        format!("v={}", B64.encode(server_signature)).as_bytes(),
    );
    stream.write_all(&out).await.map_err(FrameError::from)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn verifier_round_trip() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&text).expect("parses");
        assert_eq!(v.iterations, 4096);
    }

    /// The server side here against postgres-protocol's client side.
    #[tokio::test]
    async fn scram_against_the_client_side() {
        for (configured, given, ok) in [("pw", "pw", true), ("pw", "bad", false)] {
            let users = UserDb::new(&[PgUserConfig {
                name: "u".into(),
                password: crate::config::EnvString::literal(configured),
            }]);
            let (mut a, mut b) = tokio::io::duplex(4096);
            let server = tokio::spawn(async move {
                authenticate(&mut a, AuthType::ScramSha256, &users, "u")
                    .await
                    .is_ok()
            });
            let mut client = ScramSha256::new(given.as_bytes(), ChannelBinding::unsupported());
            let mut buf = BytesMut::new();
            assert_eq!(
                messages::read_message(&mut b, &mut buf, 4096).await.ok(),
                Some(b'R')
            );
            let mut out = BytesMut::new();
            messages::put_message(&mut out, b'p', |o| {
                messages::put_cstr(o, "SCRAM-SHA-256");
                bytes::BufMut::put_i32(o, client.message().len() as i32);
                bytes::BufMut::put_slice(o, client.message());
            });
            b.write_all(&out).await.ok();
            messages::read_message(&mut b, &mut buf, 4096).await.ok();
            client.update(&buf[4..]).expect("server-first accepted");
            out.clear();
            messages::put_message(&mut out, b'p', |o| {
                bytes::BufMut::put_slice(o, client.message())
            });
            b.write_all(&out).await.ok();
            if ok {
                messages::read_message(&mut b, &mut buf, 4096).await.ok();
                client.finish(&buf[4..]).expect("server signature verifies");
            }
            assert_eq!(server.await.ok(), Some(ok));
        }
    }
}
