//! Property tests of the response head parser: arbitrary bytes give a head, "need more" or an
//! error (never a panic), and a generated valid head (after any 1xx interim heads) parses back
//! to the fields it was made of, whatever prefix of it has arrived so far.

use super::*;
use proptest::prelude::*;

/// `n` RFC 9110 token characters at most (one at least): methods and header names.
fn token(n: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("{TOKEN}{{1,{n}}}")).expect("a valid regex")
}

const TOKEN: &str = "[A-Za-z0-9!#$%&'*+.^_`|~-]";

fn plain_name() -> impl Strategy<Value = String> {
    token(16).prop_filter("a header the parser interprets", |n| {
        !["content-length", "transfer-encoding", "connection"]
            .contains(&n.to_ascii_lowercase().as_str())
    })
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => 0x21u8..=0x7e,
            2 => Just(b' '),
            1 => 0x80u8..=0xff,
        ],
        0..24,
    )
    .prop_map(|v| v.trim_ascii().to_vec())
}

#[derive(Debug, Clone, Copy)]
enum GenFraming {
    Length(u64),
    Chunked,
    Close,
}

#[derive(Debug, Clone)]
struct GenHead {
    interim: Vec<u16>,
    status: u16,
    reason: String,
    http10: bool,
    framing: GenFraming,
    headers: Vec<(String, Vec<u8>)>,
}

impl GenHead {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for code in &self.interim {
            out.extend_from_slice(format!("HTTP/1.1 {code} Interim\r\nx-i: 1\r\n\r\n").as_bytes());
        }
        let version = if self.http10 { "1.0" } else { "1.1" };
        out.extend_from_slice(
            format!("HTTP/{version} {} {}\r\n", self.status, self.reason).as_bytes(),
        );
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match self.framing {
            GenFraming::Length(n) => {
                out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes())
            }
            GenFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            GenFraming::Close => {}
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn gen_head() -> impl Strategy<Value = GenHead> {
    (
        prop::collection::vec(prop::sample::select(vec![100u16, 102, 103]), 0..3),
        prop_oneof![200u16..=299, 300u16..=599],
        "[A-Za-z0-9 ]{0,20}",
        any::<bool>(),
        prop_oneof![
            (0u64..1_000_000).prop_map(GenFraming::Length),
            Just(GenFraming::Chunked),
            Just(GenFraming::Close),
        ],
        prop::collection::vec((plain_name(), field_value()), 0..12),
    )
        .prop_map(
            |(interim, status, reason, http10, framing, headers)| GenHead {
                interim,
                status,
                reason,
                http10,
                // HTTP/1.0 has no chunked coding.
                framing: match framing {
                    GenFraming::Chunked if http10 => GenFraming::Close,
                    f => f,
                },
                headers,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_heads_parse_back_to_their_fields(
        gen in gen_head(),
        head_method in any::<bool>(),
        next in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut buf = BytesMut::from(&gen.bytes()[..]);
        buf.extend_from_slice(&next);
        let head = match parse_head(&mut buf, head_method) {
            Ok(Some(head)) => head,
            other => return Err(TestCaseError::fail(format!("{:?}", other.map(|h| h.is_some())))),
        };
        prop_assert_eq!(&buf[..], &next[..]);
        let r = &head.response;
        prop_assert_eq!(r.status().as_u16(), gen.status);
        let mut expected: Vec<(String, Vec<u8>)> =
            gen.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        match gen.framing {
            GenFraming::Length(n) => expected.push(("content-length".into(), n.to_string().into_bytes())),
            GenFraming::Chunked => expected.push(("transfer-encoding".into(), b"chunked".to_vec())),
            GenFraming::Close => {}
        }
        for (name, _) in &expected {
            let want: Vec<&[u8]> = expected.iter().filter(|(n, _)| n == name).map(|(_, v)| &v[..]).collect();
            let got: Vec<&[u8]> = r.headers().get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
            prop_assert_eq!(got, want, "header {}", name);
        }
        prop_assert_eq!(r.headers().len(), expected.len());
        let bodiless = head_method || gen.status == 204 || gen.status == 304;
        let (body_ok, keep_alive) = match gen.framing {
            _ if bodiless => (head.body.is_done(), !gen.http10),
            GenFraming::Length(0) => (head.body.is_done(), !gen.http10),
            GenFraming::Length(n) => (matches!(head.body, BodyDecoder::Length(l) if l == n), !gen.http10),
            GenFraming::Chunked => (matches!(head.body, BodyDecoder::Chunked(_)), !gen.http10),
            GenFraming::Close => (matches!(head.body, BodyDecoder::UntilClose), false),
        };
        prop_assert!(body_ok, "{:?} for {:?}", head.body, gen.framing);
        prop_assert_eq!(head.keep_alive, keep_alive);
    }

    #[test]
    fn every_prefix_of_a_head_needs_more(gen in gen_head(), cut in any::<prop::sample::Index>()) {
        let bytes = gen.bytes();
        let len = cut.index(bytes.len());
        let mut buf = BytesMut::from(&bytes[..len]);
        prop_assert!(matches!(parse_head(&mut buf, false), Ok(None)));
        // Only whole interim heads are taken off; the final head's bytes wait for the rest.
        prop_assert!(bytes[..len].ends_with(&buf[..]));
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
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
        head_method in any::<bool>(),
    ) {
        let mut buf = BytesMut::from(&input[..]);
        match parse_head(&mut buf, head_method) {
            Ok(None) => prop_assert!(input.ends_with(&buf[..])),
            Ok(Some(_)) => prop_assert!(buf.len() < input.len()),
            Err(H1Error::Invalid(_)) => {}
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error kind: {e:?}"))),
        }
    }
}
