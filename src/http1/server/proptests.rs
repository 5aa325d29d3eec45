//! Property tests of the request head parser: arbitrary bytes give a head, "need more" or an
//! error (never a panic), and a generated valid head parses back to the fields it was made of,
//! whatever prefix of it has arrived so far.

use super::*;
use proptest::prelude::*;

/// `n` RFC 9110 token characters at most (one at least): methods and header names.
fn token(n: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("{TOKEN}{{1,{n}}}")).expect("a valid regex")
}

/// RFC 9110 token characters (methods and header names).
const TOKEN: &str = "[A-Za-z0-9!#$%&'*+.^_`|~-]";

/// A header name that is not one the parser interprets (framing, `Host`, `Connection`, `Expect`).
fn plain_name() -> impl Strategy<Value = String> {
    token(16).prop_filter("a header the parser interprets", |n| {
        ![
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "expect",
        ]
        .contains(&n.to_ascii_lowercase().as_str())
    })
}

/// A field value: visible ASCII, inner blanks, some obs-text; no blank at either end (those
/// are not part of the value).
pub(crate) fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => 0x21u8..=0x7e,
            2 => Just(b' '),
            1 => Just(b'\t'),
            1 => 0x80u8..=0xff,
        ],
        0..24,
    )
    .prop_map(|mut v| {
        while v.last().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.pop();
        }
        while v.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            v.remove(0);
        }
        v
    })
}

#[derive(Debug, Clone)]
struct GenHead {
    method: String,
    target: String,
    http10: bool,
    host: Option<String>,
    length: Option<u64>,
    headers: Vec<(String, Vec<u8>)>,
    /// Blanks between a header's colon and its value.
    blanks: Vec<&'static str>,
}

impl GenHead {
    fn bytes(&self) -> Vec<u8> {
        let version = if self.http10 { "1.0" } else { "1.1" };
        let mut out = format!("{} {} HTTP/{version}\r\n", self.method, self.target).into_bytes();
        if let Some(host) = &self.host {
            out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
        }
        for (i, (name, value)) in self.headers.iter().enumerate() {
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            out.extend_from_slice(self.blanks[i % self.blanks.len()].as_bytes());
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(n) = self.length {
            out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn gen_head() -> impl Strategy<Value = GenHead> {
    (
        prop_oneof![
            prop::sample::select(vec![
                "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"
            ])
            .prop_map(String::from),
            token(12),
        ],
        (
            "(/[A-Za-z0-9._~!$&'()*+,;=:@%-]{0,12}){1,4}",
            prop::option::of("[A-Za-z0-9._~!$&'()*+,;=:@/?%-]{0,20}"),
        )
            .prop_map(|(path, query)| match query {
                Some(q) => format!("{path}?{q}"),
                None => path,
            }),
        any::<bool>(),
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        prop::option::of(0u64..1_000_000),
        prop::collection::vec((plain_name(), field_value()), 0..12),
        prop::collection::vec(prop::sample::select(vec!["", " ", "  ", "\t"]), 1..4),
    )
        .prop_map(
            |(method, target, http10, host, length, headers, blanks)| GenHead {
                method,
                target,
                http10,
                // HTTP/1.1 needs exactly one; 1.0 may have one.
                host: (!http10 || host.len() % 2 == 0).then_some(host),
                length,
                headers,
                blanks,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_heads_parse_back_to_their_fields(
        gen in gen_head(),
        next in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let bytes = gen.bytes();
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(&next);
        let head = match parse_head(&mut buf) {
            Ok(Some(head)) => head,
            other => return Err(TestCaseError::fail(format!("{:?}", other.map(|h| h.is_some())))),
        };
        // The bytes after the head are the body or the next request's: left in the buffer.
        prop_assert_eq!(&buf[..], &next[..]);
        let r = &head.request;
        prop_assert_eq!(r.method().as_str(), gen.method.as_str());
        prop_assert_eq!(r.uri().to_string(), gen.target.clone());
        let version = if gen.http10 { Version::HTTP_10 } else { Version::HTTP_11 };
        prop_assert_eq!(r.version(), version);
        let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(host) = &gen.host {
            expected.push(("host".into(), host.clone().into_bytes()));
        }
        expected.extend(gen.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())));
        if let Some(n) = gen.length {
            expected.push(("content-length".into(), n.to_string().into_bytes()));
        }
        // Same fields, same values, same order within each name (HeaderMap groups by name).
        for (name, _) in &expected {
            let want: Vec<&[u8]> = expected.iter().filter(|(n, _)| n == name).map(|(_, v)| &v[..]).collect();
            let got: Vec<&[u8]> = r.headers().get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
            prop_assert_eq!(got, want, "header {}", name);
        }
        prop_assert_eq!(r.headers().len(), expected.len());
        match gen.length {
            None | Some(0) => prop_assert!(head.body.is_done()),
            Some(n) => prop_assert!(matches!(head.body, BodyDecoder::Length(l) if l == n)),
        }
        prop_assert_eq!(head.keep_alive, !gen.http10);
        prop_assert!(!head.expect_continue);
    }

    #[test]
    fn every_prefix_of_a_head_needs_more(gen in gen_head(), cut in any::<prop::sample::Index>()) {
        let bytes = gen.bytes();
        let len = cut.index(bytes.len());
        let mut buf = BytesMut::from(&bytes[..len]);
        prop_assert!(matches!(parse_head(&mut buf), Ok(None)));
        prop_assert_eq!(buf.len(), len, "a partial head consumes nothing");
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            // A valid head with a few bytes overwritten: reaches past the request line.
            (gen_head(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
                .prop_map(|(gen, edits)| {
                    let mut bytes = gen.bytes();
                    for (at, b) in edits {
                        let i = at.index(bytes.len());
                        bytes[i] = b;
                    }
                    bytes
                }),
        ],
    ) {
        let mut buf = BytesMut::from(&input[..]);
        match parse_head(&mut buf) {
            // Nothing taken until a whole head is there.
            Ok(None) => prop_assert_eq!(&buf[..], &input[..]),
            Ok(Some(_)) => prop_assert!(buf.len() < input.len()),
            Err(e) => prop_assert!(matches!(
                e,
                ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge { .. } | ProxyError::NotImplemented(_)
            ), "{e:?}"),
        }
    }
}
