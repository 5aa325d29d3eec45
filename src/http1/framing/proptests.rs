//! Property tests of the body decoder: whatever bytes arrive, however the socket splits them,
//! it ends (data, end, invalid or closed) without panicking, and a valid chunked body comes
//! out byte for byte.

use super::*;
use proptest::prelude::*;

/// A reader that hands out `data` in pieces of the given sizes (cycling), then EOF.
struct Pieces {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl Pieces {
    fn new(data: Vec<u8>, sizes: Vec<usize>) -> Self {
        Pieces {
            data,
            pos: 0,
            sizes,
            next: 0,
        }
    }
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.next % self.sizes.len()];
        self.next += 1;
        let n = size.min(self.data.len() - self.pos).min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// What a body read to its outcome gave: its data, how it ended, and the bytes not consumed
/// (left in the buffer, then still unread on the socket).
struct Outcome {
    data: Vec<u8>,
    end: BodyRead,
    rest: Vec<u8>,
}

/// Reads `input` as a body of kind `decoder`, split into reads of `sizes`. Every call of
/// `poll_read` must make progress (data of at least one byte, or an outcome): a decoder that
/// asks for more than the input has is a hang, caught by the call bound.
fn read_body(mut decoder: BodyDecoder, input: Vec<u8>, sizes: Vec<usize>) -> Outcome {
    let bound = input.len() + 2;
    let mut io = Pieces::new(input, sizes);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..bound {
        match decoder.poll_read(Pin::new(&mut io), &mut buf, &mut cx) {
            Poll::Ready(BodyRead::Data(d)) => {
                assert!(!d.is_empty(), "empty data frame");
                data.extend_from_slice(&d);
            }
            Poll::Ready(end) => {
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&io.data[io.pos..]);
                return Outcome { data, end, rest };
            }
            Poll::Pending => panic!("the reader is never pending"),
        }
    }
    panic!("no outcome after {bound} reads: the decoder loops");
}

/// One chunk extension, valid per RFC 9112 §7.1.1 (`;name`, `;name=token`, `;name="quoted"`),
/// with the optional blanks around `;` that httparse accepts.
fn extension() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(|n| format!(";{n}")),
        ("[a-z]{1,8}", "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,8}").prop_map(|(n, v)| format!(";{n}={v}")),
        ("[a-z]{1,8}", "[A-Za-z0-9 ,;=]{0,8}").prop_map(|(n, v)| format!(";{n}=\"{v}\"")),
        "[a-z]{1,8}".prop_map(|n| format!(" ; {n}")),
    ]
}

/// A trailer field line (without its CRLF).
fn trailer() -> impl Strategy<Value = String> {
    ("[a-z][a-z0-9-]{0,10}", "[ -~]{0,20}").prop_map(|(n, v)| format!("{n}: {}", v.trim()))
}

/// Read sizes, at least one byte each (a zero-byte read is the end of the stream).
fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..64, 1..16)
}

/// A body, how it is cut into chunks, each chunk's extensions, the last chunk's extensions and
/// the trailers: encoded as chunked, with `rest` (a pipelined next message) after it.
#[derive(Debug, Clone)]
struct ChunkedBody {
    body: Vec<u8>,
    encoded: Vec<u8>,
}

fn chunked_body() -> impl Strategy<Value = ChunkedBody> {
    (
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(1usize..200, 1..12),
        prop::collection::vec(prop::collection::vec(extension(), 0..3), 1..12),
        prop::collection::vec(extension(), 0..3),
        prop::collection::vec(trailer(), 0..4),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(body, cuts, exts, last_exts, trailers, upper, zeros)| {
            let mut encoded = Vec::new();
            let mut rest = &body[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                // Size digits in either case, with leading zeros: both are valid hex.
                let digits = format!("{}{n:x}", "0".repeat(zeros));
                let digits = if upper { digits.to_uppercase() } else { digits };
                encoded.extend_from_slice(digits.as_bytes());
                encoded.extend_from_slice(exts[i % exts.len()].concat().as_bytes());
                encoded.extend_from_slice(b"\r\n");
                encoded.extend_from_slice(&rest[..n]);
                encoded.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            encoded.extend_from_slice(format!("0{}\r\n", last_exts.concat()).as_bytes());
            for t in &trailers {
                encoded.extend_from_slice(t.as_bytes());
                encoded.extend_from_slice(b"\r\n");
            }
            encoded.extend_from_slice(b"\r\n");
            ChunkedBody { body, encoded }
        })
}

/// Bytes drawn mostly from what chunked framing is made of, so random input reaches the
/// decoder's states past the first size line.
fn chunk_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(b"0123456789abcdefABCDEF;= \t\"\r\nxz".to_vec()),
            Just(b'\r'),
            Just(b'\n'),
            any::<u8>(),
        ],
        0..300,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn chunked_bodies_decode_to_their_bytes_however_they_are_read(
        chunked in chunked_body(),
        next in "[ -~]{0,40}",
        sizes in read_sizes(),
    ) {
        let mut input = chunked.encoded.clone();
        input.extend_from_slice(next.as_bytes());
        let out = read_body(BodyDecoder::Chunked(Chunk::Size), input, sizes);
        prop_assert!(matches!(out.end, BodyRead::End), "{:?}", out.end);
        prop_assert_eq!(out.data, chunked.body);
        // The next message's bytes are left for it, none eaten.
        prop_assert_eq!(out.rest, next.into_bytes());
    }

    #[test]
    fn truncated_chunked_bodies_end_as_closed(
        chunked in chunked_body(),
        cut in any::<prop::sample::Index>(),
        sizes in read_sizes(),
    ) {
        let len = cut.index(chunked.encoded.len());
        let prefix = chunked.encoded[..len].to_vec();
        let out = read_body(BodyDecoder::Chunked(Chunk::Size), prefix, sizes);
        prop_assert!(matches!(out.end, BodyRead::Closed), "{:?}", out.end);
        prop_assert!(chunked.body.starts_with(&out.data));
    }

    #[test]
    fn a_bare_lf_ending_a_chunk_line_is_refused(
        chunked in chunked_body(),
        line in any::<prop::sample::Index>(),
        sizes in read_sizes(),
    ) {
        // Turn the CRLF ending one chunk-size line (not a data CRLF) into a bare LF.
        // Where each chunk-size line's CRLF is: walk the chunks by their sizes.
        let enc = &chunked.encoded;
        let mut ends = Vec::new();
        let mut pos = 0;
        while let Some(end) = enc[pos..].windows(2).position(|w| w == b"\r\n") {
            let line_end = pos + end;
            let digits = std::str::from_utf8(&enc[pos..line_end])
                .unwrap_or("0")
                .split([';', ' '])
                .next()
                .unwrap_or("0");
            let size = usize::from_str_radix(digits, 16).unwrap_or(0);
            ends.push(line_end);
            if size == 0 {
                break;
            }
            pos = line_end + 2 + size + 2;
        }
        let at = ends[line.index(ends.len())];
        let mut input = enc[..at].to_vec();
        input.extend_from_slice(&enc[at + 1..]);
        let out = read_body(BodyDecoder::Chunked(Chunk::Size), input, sizes);
        prop_assert!(matches!(out.end, BodyRead::Invalid(_)), "{:?}", out.end);
    }

    #[test]
    fn a_bare_lf_in_the_trailers_is_refused(
        chunked in chunked_body(),
        before in "[a-z]{1,6}: [a-z]{0,6}",
        after in prop_oneof![Just(String::new()), "[a-z]{1,6}: [a-z]{0,6}"],
        next in "[ -~]{0,40}",
        sizes in read_sizes(),
    ) {
        // `x: a\n` then CRLF: a peer ending lines at LF sees the body end there and what
        // follows as the next request; sidelight must not read on into it as trailers.
        let mut input = chunked.encoded[..chunked.encoded.len() - 2].to_vec();
        input.extend_from_slice(format!("{before}\n{after}\r\n\r\n{next}").as_bytes());
        let out = read_body(BodyDecoder::Chunked(Chunk::Size), input, sizes);
        prop_assert!(matches!(out.end, BodyRead::Invalid(_)), "{:?}", out.end);
    }

    #[test]
    fn arbitrary_bytes_end_chunked_bodies_cleanly(
        input in prop_oneof![chunk_soup(), prop::collection::vec(any::<u8>(), 0..300)],
        sizes in read_sizes(),
    ) {
        let len = input.len();
        let out = read_body(BodyDecoder::Chunked(Chunk::Size), input, sizes);
        prop_assert!(!matches!(out.end, BodyRead::Data(_) | BodyRead::Io(_)));
        prop_assert!(out.data.len() + out.rest.len() <= len);
    }

    #[test]
    fn length_bodies_take_exactly_their_length(
        input in prop::collection::vec(any::<u8>(), 0..300),
        length in 0u64..400,
        sizes in read_sizes(),
    ) {
        let out = read_body(BodyDecoder::Length(length), input.clone(), sizes);
        let n = input.len().min(length as usize);
        prop_assert_eq!(&out.data[..], &input[..n]);
        prop_assert_eq!(&out.rest[..], &input[n..]);
        if input.len() as u64 >= length {
            prop_assert!(matches!(out.end, BodyRead::End), "{:?}", out.end);
        } else {
            prop_assert!(matches!(out.end, BodyRead::Closed), "{:?}", out.end);
        }
    }

    #[test]
    fn content_length_values_parse_as_decimal(n in any::<u64>(), pad in " {0,2}", repeat in 1usize..4) {
        let one = format!("{pad}{n}{pad}");
        let value = vec![one; repeat].join(",");
        let value = HeaderValue::from_str(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fold_content_length(None, &value), Ok(Some(n)));
        prop_assert!(fold_content_length(Some(n.wrapping_add(1)), &value).is_err());
    }
}
