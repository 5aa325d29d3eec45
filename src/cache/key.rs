//! Cache keys: SHA-256 of a versioned canonical form of everything that can change an upstream's
//! answer, and nothing that cannot.
//!
//! # Canonical form `sl1`
//!
//! The key is the SHA-256 of this byte string (shown as 64 lowercase hex digits in
//! `x-sidelight-cache-key`):
//!
//! ```text
//! sl1\n
//! route=<len>:<route name>\n
//! method=<len>:<method as sent, e.g. POST>\n
//! path=<len>:<path as the client sent it>\n
//! query=<len>:<query string without '?', empty when absent>\n
//! h:<name>=<len>:<values>\n            one line per vary header (see below)
//! tenant=<64 hex digits>\n   or   tenant=none\n
//! json=<len>:<canonical JSON>\n   or   body=<len>:<raw body bytes>\n
//! ```
//!
//! - `<len>` is the decimal byte length of what follows the `:` up to (not including) the line's
//!   final `\n`. Every variable part is length-prefixed, so no two different inputs produce the
//!   same string by shifting bytes from one field into the next (path `/a?b` with no query is not
//!   path `/a` with query `b`).
//! - `path` is the client's path before `strip_prefix`/`prefix_rewrite` (the rewrite is a function
//!   of the route, which is in the key) and is not normalised or percent-decoded; `query` is used
//!   byte for byte, parameters are not reordered.
//! - Vary headers: configured names, lowercase, sorted and de-duplicated, minus any that are
//!   credential headers (those are covered by `tenant`, in hashed form). `<values>` is every value
//!   the client sent for that header, in order, each as `<len>:<bytes>`, concatenated. A header the
//!   client did not send has no values (`h:accept=0:`); one sent empty is `h:accept=2:0:`.
//! - `tenant` is the lowercase hex SHA-256 of the `h:<name>=<len>:<values>\n` lines (same encoding
//!   as vary headers) of the credential headers the client sent, sorted by name. The credential
//!   itself never appears in the canonical form or the key. A client that sent none of them is
//!   `tenant=none` and shares entries only with other anonymous clients. (A credential in the
//!   query string, like ClickHouse's `?password=`, still isolates tenants through `query`, but in
//!   clear: ClickHouse routes should list `x-clickhouse-key` as a credential header instead.)
//! - `json=` is used when the caller says the body is JSON and it is not empty: objects with keys
//!   sorted by their UTF-8 bytes, no whitespace, strings escaped the way serde_json writes them
//!   (`"\u00e9"` and `"é"` are the same string), the configured ignored fields removed from the
//!   top-level object only. Numbers are printed as serde_json prints the parsed value: integers
//!   that fit in 64 bits as written, anything else as the shortest `f64` form, so `1` and `1.0`
//!   are different keys, while `1e2` and `100.0` (or two decimals that round to the same `f64`)
//!   are the same. Parsing rounds to the nearest `f64` (serde_json's `float_roundtrip`), so two
//!   different `f64`s never share a key. A body that is not valid JSON, or has an object with a repeated key (upstreams
//!   disagree on which one wins), is an error: the caller bypasses the cache rather than guess.
//! - `body=` carries any other body (and an empty one) as raw bytes.
//!
//! Example: route `openai`, `POST /v1/chat/completions` with no query, vary header `accept` (sent
//! as `application/json`), credential headers `authorization` (sent as `Bearer sk-test`) and
//! `x-api-key` (not sent), ignored field `user`, and the JSON body
//! `{"model": "gpt-4o-mini", "user": "u1", "temperature": 0, "messages": [{"role": "user",
//! "content": "Hi"}]}` give
//!
//! ```text
//! sl1
//! route=6:openai
//! method=4:POST
//! path=20:/v1/chat/completions
//! query=0:
//! h:accept=19:16:application/json
//! tenant=ea880ea04a58969237a488fa6ff0848b60996e9cd5b0ca5e41a892c8f006addb
//! json=83:{"messages":[{"content":"Hi","role":"user"}],"model":"gpt-4o-mini","temperature":0}
//! ```
//!
//! (each line ending in `\n`), where the tenant is the SHA-256 of
//! `h:authorization=17:14:Bearer sk-test\n`, and the key is
//! `d72cf79c469fff2ac0ebc93920c1c84fb2295763c1688d05fef78f07e5ba400a`.

use http::{HeaderMap, HeaderName, Method};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};
use std::fmt;

/// Version tag at the start of the canonical form; bump it when the form changes, so old and new
/// keys never collide.
pub const KEY_VERSION: &str = "sl1";

/// Inputs of a cache key. Everything that can change the answer, nothing that cannot.
pub struct KeyInput<'a> {
    pub route: &'a str,
    pub method: &'a Method,
    /// The client's path, before the route's prefix rewrite.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Configured headers that change the answer (`accept`, `anthropic-version`, ...).
    pub vary_headers: &'a [HeaderName],
    /// Where the tenant credential is read (by default `authorization` and `x-api-key`).
    pub credential_headers: &'a [HeaderName],
    pub body: &'a [u8],
    /// The caller decides from `content-type`; when true the body is canonicalised as JSON.
    pub content_type_json: bool,
    /// Top-level JSON fields left out of the key (`user`, `metadata`, `stream_options`, ...).
    pub ignore_fields: &'a [String],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    bytes: [u8; 32],
}

impl CacheKey {
    pub fn compute(input: &KeyInput) -> Result<CacheKey, KeyError> {
        let mut hasher = Sha256::new();
        encode(input, &mut hasher)?;
        Ok(CacheKey {
            bytes: hasher.finalize().into(),
        })
    }

    /// 64 lowercase hex digits; what `x-sidelight-cache-key` shows.
    pub fn hex(&self) -> String {
        hex(&self.bytes)
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.hex())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// Where the canonical form goes: straight into the hash in production (no copy of the body),
/// into a buffer in tests.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

fn encode(input: &KeyInput, out: &mut impl Sink) -> Result<(), KeyError> {
    // Parse first: an invalid body must fail before anything is hashed.
    let json = if input.content_type_json && !input.body.is_empty() {
        Some(canonical_json(input.body, input.ignore_fields)?)
    } else {
        None
    };
    out.put(KEY_VERSION.as_bytes());
    out.put(b"\n");
    field(out, "route", input.route.as_bytes());
    field(out, "method", input.method.as_str().as_bytes());
    field(out, "path", input.path.as_bytes());
    field(out, "query", input.query.unwrap_or("").as_bytes());
    for name in sorted_names(input.vary_headers) {
        // A credential listed as a vary header by mistake must not appear in clear.
        if !input.credential_headers.contains(name) {
            header_line(out, input.headers, name);
        }
    }
    match tenant(input) {
        Some(digest) => {
            out.put(b"tenant=");
            out.put(hex(&digest).as_bytes());
            out.put(b"\n");
        }
        None => out.put(b"tenant=none\n"),
    }
    match &json {
        Some(canonical) => field(out, "json", canonical),
        None => field(out, "body", input.body),
    }
    Ok(())
}

/// `name=<len>:<value>\n`
fn field(out: &mut impl Sink, name: &str, value: &[u8]) {
    out.put(name.as_bytes());
    out.put(b"=");
    out.put(value.len().to_string().as_bytes());
    out.put(b":");
    out.put(value);
    out.put(b"\n");
}

/// `h:<name>=<len>:<values>\n`, each value as `<len>:<bytes>`; no values when absent.
fn header_line(out: &mut impl Sink, headers: &HeaderMap, name: &HeaderName) {
    let mut values = Vec::new();
    for value in headers.get_all(name) {
        values.extend_from_slice(value.len().to_string().as_bytes());
        values.push(b':');
        values.extend_from_slice(value.as_bytes());
    }
    out.put(b"h:");
    field(out, name.as_str(), &values);
}

/// Sorted and de-duplicated, so the key does not depend on the order names are configured in.
fn sorted_names(names: &[HeaderName]) -> Vec<&HeaderName> {
    let mut sorted: Vec<&HeaderName> = names.iter().collect();
    sorted.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    sorted.dedup();
    sorted
}

/// SHA-256 of the credential headers the client sent, or None for an anonymous client.
fn tenant(input: &KeyInput) -> Option<[u8; 32]> {
    let mut sent = sorted_names(input.credential_headers);
    sent.retain(|name| input.headers.contains_key(*name));
    if sent.is_empty() {
        return None;
    }
    let mut hasher = Sha256::new();
    for name in sent {
        header_line(&mut hasher, input.headers, name);
    }
    Some(hasher.finalize().into())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn canonical_json(body: &[u8], ignore_fields: &[String]) -> Result<Vec<u8>, KeyError> {
    let Unique(mut value) =
        serde_json::from_slice(body).map_err(|e| KeyError::InvalidJson(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        for name in ignore_fields {
            map.remove(name);
        }
    }
    let mut out = Vec::with_capacity(body.len());
    write_sorted(&value, &mut out)?;
    Ok(out)
}

/// Writes `value` with object keys sorted explicitly, whatever serde_json's `preserve_order`
/// feature (which another crate in the build could switch on) does to `Map`. serde_json's parser
/// stops at 128 levels of nesting, which bounds this recursion.
fn write_sorted(value: &Value, out: &mut Vec<u8>) -> Result<(), KeyError> {
    let internal = |e: serde_json::Error| KeyError::InvalidJson(e.to_string());
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (name, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name).map_err(internal)?;
                out.push(b':');
                write_sorted(item, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).map_err(internal)?,
    }
    Ok(())
}

/// A JSON value parsed like `serde_json::Value`, except that an object repeating a key is an
/// error instead of "last one wins".
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Unique, E> {
        Ok(Unique(Value::Null))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Unique, E> {
        Ok(Unique(Value::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Unique, E> {
        Ok(Unique(Value::Number(v.into())))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Unique, E> {
        Ok(Unique(Value::Number(v.into())))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Unique, E> {
        Number::from_f64(v)
            .map(|n| Unique(Value::Number(n)))
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Unique, E> {
        Ok(Unique(Value::String(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Unique, E> {
        Ok(Unique(Value::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Unique(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Unique, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                return Err(de::Error::custom(format!("duplicate key {name:?}")));
            }
            let Unique(item) = access.next_value()?;
            map.insert(name, item);
        }
        Ok(Unique(Value::Object(map)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderValue, ACCEPT, AUTHORIZATION};

    const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

    struct Req {
        route: &'static str,
        method: Method,
        path: &'static str,
        query: Option<&'static str>,
        headers: HeaderMap,
        vary: Vec<HeaderName>,
        credentials: Vec<HeaderName>,
        body: Vec<u8>,
        json: bool,
        ignore: Vec<String>,
    }

    impl Req {
        fn chat(body: &str) -> Req {
            Req {
                route: "openai",
                method: Method::POST,
                path: "/v1/chat/completions",
                query: None,
                headers: HeaderMap::new(),
                vary: vec![ACCEPT],
                credentials: vec![AUTHORIZATION, X_API_KEY],
                body: body.as_bytes().to_vec(),
                json: true,
                ignore: vec!["user".into()],
            }
        }
        fn header(mut self, name: HeaderName, value: &'static str) -> Req {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn input(&self) -> KeyInput<'_> {
            KeyInput {
                route: self.route,
                method: &self.method,
                path: self.path,
                query: self.query,
                headers: &self.headers,
                vary_headers: &self.vary,
                credential_headers: &self.credentials,
                body: &self.body,
                content_type_json: self.json,
                ignore_fields: &self.ignore,
            }
        }
        fn key(&self) -> CacheKey {
            match CacheKey::compute(&self.input()) {
                Ok(key) => key,
                Err(e) => panic!("{e}"),
            }
        }
        fn form(&self) -> String {
            let mut out = Vec::new();
            encode(&self.input(), &mut out).expect("valid input");
            String::from_utf8(out).expect("utf-8 test input")
        }
    }

    const BODY: &str = r#"{"model": "gpt-4o-mini", "user": "u1", "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}"#;

    fn example() -> Req {
        Req::chat(BODY)
            .header(ACCEPT, "application/json")
            .header(AUTHORIZATION, "Bearer sk-test")
    }

    #[test]
    fn known_answer() {
        let req = example();
        let tenant = hex(&Sha256::digest(b"h:authorization=17:14:Bearer sk-test\n"));
        let expected = format!(
            "sl1\nroute=6:openai\nmethod=4:POST\npath=20:/v1/chat/completions\nquery=0:\n\
             h:accept=19:16:application/json\ntenant={tenant}\njson=83:\
             {{\"messages\":[{{\"content\":\"Hi\",\"role\":\"user\"}}],\"model\":\"gpt-4o-mini\",\"temperature\":0}}\n"
        );
        assert_eq!(req.form(), expected);
        assert!(!req.form().contains("sk-test"));
        let key = req.key();
        assert_eq!(
            key.hex(),
            "d72cf79c469fff2ac0ebc93920c1c84fb2295763c1688d05fef78f07e5ba400a"
        );
        assert_eq!(key.hex().len(), 64);
        assert_eq!(key.to_string(), key.hex());
    }

    #[test]
    fn floats_parse_exactly_so_neighbours_keep_their_keys() {
        // Found by the proptests: without exact parsing this number came out one ULP higher,
        // as the canonical form of its neighbour, and the two bodies shared a key.
        let low = canonical_json(b"[9.985356735278827e-131]", &[]).unwrap();
        let high = canonical_json(b"[9.985356735278829e-131]", &[]).unwrap();
        assert_eq!(low, b"[9.985356735278827e-131]");
        assert_eq!(high, b"[9.985356735278829e-131]");
    }

    #[test]
    fn json_is_canonical() {
        let base = Req::chat(
            r#"{"model":"m","temperature":0.5,"messages":[{"role":"user","content":"Hi"}]}"#,
        )
        .key();
        let reordered = Req::chat(
            "{\n  \"messages\" : [ { \"content\":\"Hi\", \"role\":\"user\" } ],\n\t\"temperature\": 0.5, \"model\": \"m\" }",
        );
        assert_eq!(reordered.key(), base);
        let escaped = Req::chat(
            r#"{"model":"\u006d","temperature":0.5,"messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(escaped.key(), base);
        let hotter = Req::chat(
            r#"{"model":"m","temperature":0.7,"messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_ne!(hotter.key(), base);
        // 1 and 1.0 are different numbers to serde_json, hence different keys (documented).
        assert_ne!(
            Req::chat(r#"{"temperature":1}"#).key(),
            Req::chat(r#"{"temperature":1.0}"#).key()
        );
        assert_eq!(
            Req::chat(r#"{"temperature":1e2}"#).key(),
            Req::chat(r#"{"temperature":100.0}"#).key()
        );
    }

    #[test]
    fn ignored_fields_only_at_top_level() {
        let base = Req::chat(r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#).key();
        let with_user = Req::chat(
            r#"{"model":"m","user":"alice","messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(with_user.key(), base);
        let nested = Req::chat(
            r#"{"model":"m","messages":[{"role":"user","content":"Hi","user":"alice"}]}"#,
        );
        assert_ne!(nested.key(), base);
    }

    #[test]
    fn invalid_json_is_an_error() {
        for body in ["{\"model\":", "not json", "{} {}", r#"{"a":1,"a":2}"#] {
            let req = Req::chat(body);
            assert!(
                matches!(
                    CacheKey::compute(&req.input()),
                    Err(KeyError::InvalidJson(_))
                ),
                "{body}"
            );
        }
        // The same bytes are fine as an opaque body, and an empty body is not JSON at all.
        let mut raw = Req::chat("not json");
        raw.json = false;
        assert!(CacheKey::compute(&raw.input()).is_ok());
        assert!(Req::chat("").form().ends_with("tenant=none\nbody=0:\n"));
    }

    #[test]
    fn raw_and_json_bodies_never_share() {
        let json = Req::chat(r#"{"a":1}"#);
        let mut raw = Req::chat(r#"{"a":1}"#);
        raw.json = false;
        assert_ne!(json.key(), raw.key());
    }

    #[test]
    fn tenants_are_isolated() {
        let a = Req::chat(BODY).header(AUTHORIZATION, "Bearer a");
        let a_again = Req::chat(BODY).header(AUTHORIZATION, "Bearer a");
        let b = Req::chat(BODY).header(AUTHORIZATION, "Bearer b");
        let anonymous = Req::chat(BODY);
        assert_eq!(a.key(), a_again.key());
        assert_ne!(a.key(), b.key());
        assert_ne!(a.key(), anonymous.key());
        assert!(anonymous.form().contains("\ntenant=none\n"));
        assert!(!b.form().contains("Bearer b"));

        let k1 = Req::chat(BODY).header(X_API_KEY, "k1");
        let k2 = Req::chat(BODY).header(X_API_KEY, "k2");
        assert_ne!(k1.key(), k2.key());
        assert_ne!(k1.key(), anonymous.key());
        // The same secret under a different header is a different tenant.
        assert_ne!(k1.key(), Req::chat(BODY).header(AUTHORIZATION, "k1").key());

        let mut custom = Req::chat(BODY).header(HeaderName::from_static("x-team"), "t1");
        custom.credentials = vec![HeaderName::from_static("x-team")];
        let mut other = Req::chat(BODY).header(HeaderName::from_static("x-team"), "t2");
        other.credentials = vec![HeaderName::from_static("x-team")];
        assert_ne!(custom.key(), other.key());
    }

    #[test]
    fn credentials_listed_as_vary_stay_hashed() {
        let mut req = Req::chat(BODY).header(AUTHORIZATION, "Bearer secret");
        req.vary.push(AUTHORIZATION);
        assert!(!req.form().contains("secret"));
    }

    #[test]
    fn vary_headers() {
        let anthropic = HeaderName::from_static("anthropic-version");
        let plain = Req::chat(BODY);
        let v1 = Req::chat(BODY).header(anthropic.clone(), "2023-06-01");
        // Not listed: does not change the key.
        assert_eq!(v1.key(), plain.key());
        let listed = |r: Req| Req {
            vary: vec![anthropic.clone(), ACCEPT],
            ..r
        };
        let absent = listed(Req::chat(BODY));
        let empty = listed(Req::chat(BODY).header(anthropic.clone(), ""));
        let v1 = listed(Req::chat(BODY).header(anthropic.clone(), "2023-06-01"));
        let v2 = listed(Req::chat(BODY).header(anthropic.clone(), "2024-01-01"));
        assert_ne!(v1.key(), v2.key());
        assert_ne!(absent.key(), empty.key());
        assert_ne!(absent.key(), v1.key());
        // Several values count in order.
        let ab = Req::chat(BODY).header(ACCEPT, "a").header(ACCEPT, "b");
        let ba = Req::chat(BODY).header(ACCEPT, "b").header(ACCEPT, "a");
        let joined = Req::chat(BODY).header(ACCEPT, "a, b");
        assert_ne!(ab.key(), ba.key());
        assert_ne!(ab.key(), joined.key());
        // Configuration order does not matter.
        let reordered = Req {
            vary: vec![ACCEPT, anthropic.clone(), ACCEPT],
            ..Req::chat(BODY).header(anthropic.clone(), "2023-06-01")
        };
        assert_eq!(reordered.key(), v1.key());
    }

    #[test]
    fn request_line_fields() {
        let base = Req::chat(BODY);
        let base_key = base.key();
        let changed = [
            Req {
                route: "openai2",
                ..Req::chat(BODY)
            },
            Req {
                method: Method::PUT,
                ..Req::chat(BODY)
            },
            Req {
                path: "/v1/completions",
                ..Req::chat(BODY)
            },
            Req {
                query: Some("a=1"),
                ..Req::chat(BODY)
            },
        ];
        for req in &changed {
            assert_ne!(req.key(), base_key, "{}", req.form());
        }
        // An empty query is the same as none.
        assert_eq!(
            Req {
                query: Some(""),
                ..Req::chat(BODY)
            }
            .key(),
            base_key
        );
    }

    #[test]
    fn no_collisions_by_concatenation() {
        let get = |path, query| {
            let mut req = Req::chat("");
            req.method = Method::GET;
            req.path = path;
            req.query = query;
            req.key()
        };
        assert_ne!(get("/a", Some("b=c")), get("/a?b=c", None));
        assert_ne!(get("/a", Some("b=c")), get("/ab=c", None));
        assert_ne!(get("/a\nquery=1:b", None), get("/a", Some("b")));
        let route = |route, path| {
            Req {
                route,
                path,
                ..Req::chat("")
            }
            .key()
        };
        assert_ne!(route("ab", "/c"), route("a", "b/c"));
    }
}

#[cfg(test)]
mod proptests;
