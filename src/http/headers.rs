//! Header hygiene between client and upstream (RFC 9110 §7.6.1 hop-by-hop headers, forwarding
//! headers, request ids).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

// Names as constants: `from_static` and `&str` lookups parse the name again on every call.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The upstream's own request id (OpenAI sends one) when it differs from ours.
pub const UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Keeps the client's `x-request-id` when it is sane, or makes a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID) {
        let ok =
            !v.is_empty() && v.len() <= 200 && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers present is far cheaper than hashing every name in the
    // list for a removal that usually finds nothing.
    let any = headers
        .keys()
        .any(|k| k == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(k));
    if !any {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // hyper frames bodies itself; a stale transfer-encoding would contradict it.
    headers.remove(header::TRANSFER_ENCODING);
}

/// Prepares a client's headers for the upstream: hop-by-hop headers out, forwarding headers in,
/// `Host` set to the upstream's (the client's goes to `x-forwarded-host`), configured headers
/// on top.
pub fn to_upstream(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    host: &HeaderValue,
    added: &[(HeaderName, HeaderValue)],
) {
    strip_hop_by_hop(headers);
    if let Some(original) = headers.insert(header::HOST, host.clone()) {
        headers.insert(X_FORWARDED_HOST, original);
    }
    let xff = X_FORWARDED_FOR;
    let joined = match headers.get(&xff) {
        Some(prior) if !prior.is_empty() => {
            let mut v = Vec::with_capacity(prior.len() + 2 + client_ip.len());
            v.extend_from_slice(prior.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => None,
    };
    headers.insert(xff, joined.unwrap_or_else(|| client_ip.clone()));
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    for (name, value) in added {
        headers.insert(name.clone(), value.clone());
    }
}

/// Prepares an upstream's response headers for the client and stamps our request id on it.
pub fn to_client(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    match headers.get(REQUEST_ID) {
        Some(theirs) if theirs != request_id => {
            let theirs = theirs.clone();
            headers.insert(UPSTREAM_REQUEST_ID, theirs);
        }
        _ => {}
    }
    headers.insert(REQUEST_ID, request_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_forwarding() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::HOST, HeaderValue::from_static("localhost:8080"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        let added = [(header::AUTHORIZATION, HeaderValue::from_static("Bearer up"))];
        to_upstream(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            &HeaderValue::from_static("up.example"),
            &added,
        );
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h[header::HOST], "up.example");
        assert_eq!(h["x-forwarded-host"], "localhost:8080");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["traceparent"], "00-abc-def-01");
        assert_eq!(h[header::AUTHORIZATION], "Bearer up");
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 36);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");

        let mut resp = HeaderMap::new();
        resp.insert(REQUEST_ID, HeaderValue::from_static("req_upstream"));
        to_client(&mut resp, &HeaderValue::from_static("ours"));
        assert_eq!(resp[REQUEST_ID], "ours");
        assert_eq!(resp[UPSTREAM_REQUEST_ID], "req_upstream");
    }
}
