//! Property tests of the SSE splitter: a stream cut at arbitrary points gives the same events as
//! the stream fed whole, the pieces always add up to the input, and arbitrary bytes (any event
//! size limit) never panic.

use super::*;
use proptest::prelude::*;

/// One generated event: its lines (without line ends) and the line end it uses throughout.
#[derive(Debug, Clone)]
struct GenEvent {
    lines: Vec<String>,
    eol: &'static str,
}

fn gen_event() -> impl Strategy<Value = GenEvent> {
    let line = prop_oneof![
        "[ -~]{0,30}".prop_map(|v| format!("data: {v}")),
        "[ -~]{0,30}".prop_map(|v| format!("data:{v}")),
        "[a-z_.]{1,12}".prop_map(|v| format!("event: {v}")),
        "[0-9]{1,6}".prop_map(|v| format!("id: {v}")),
        "[ -~]{0,20}".prop_map(|v| format!(":{v}")),
        // Non-ASCII data: multi-byte characters may be cut between reads too.
        "\\PC{0,10}".prop_map(|v: String| format!("data: {}", v.replace(['\r', '\n'], ""))),
    ];
    (
        prop::collection::vec(line, 1..6),
        prop::sample::select(vec!["\n", "\r\n", "\r"]),
    )
        .prop_map(|(lines, eol)| GenEvent { lines, eol })
}

fn stream(events: &[GenEvent]) -> Vec<u8> {
    let mut out = String::new();
    for e in events {
        for line in &e.lines {
            out.push_str(line);
            out.push_str(e.eol);
        }
        out.push_str(e.eol);
    }
    out.into_bytes()
}

/// What feeding `chunks` gives: the raw events, and every piece's bytes plus the rest, joined.
fn feed(chunks: &[&[u8]], max: usize) -> (Vec<Vec<u8>>, Vec<u8>, Vec<u8>) {
    let mut splitter = Splitter::new(max);
    let mut events = Vec::new();
    let mut all = Vec::new();
    for chunk in chunks {
        splitter.push(chunk, &mut |piece| match piece {
            Piece::Event(raw) => {
                all.extend_from_slice(raw);
                events.push(raw.to_vec());
            }
            Piece::Fragment(raw) => all.extend_from_slice(raw),
        });
    }
    let rest = splitter.take_rest();
    all.extend_from_slice(&rest);
    (events, all, rest)
}

/// Cuts `bytes` at the given offsets (sorted, deduplicated, in range).
fn cut<'a>(bytes: &'a [u8], at: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut offsets: Vec<usize> = at.iter().map(|i| i.index(bytes.len() + 1)).collect();
    offsets.sort_unstable();
    offsets.dedup();
    let mut chunks = Vec::new();
    let mut start = 0;
    for o in offsets {
        chunks.push(&bytes[start..o]);
        start = o;
    }
    chunks.push(&bytes[start..]);
    chunks
}

/// A `\n` completing a `\r\n` that was split between reads starts the next event's raw bytes
/// instead of ending this one's (documented in `handles_crlf_even_split_between_chunks`): move
/// it back, so split and whole feeds compare byte for byte.
fn rejoin_crlf(mut events: Vec<Vec<u8>>, rest: &mut Vec<u8>) -> Vec<Vec<u8>> {
    for i in 1..=events.len() {
        let moved = events[i - 1].ends_with(b"\r")
            && events.get(i).map_or(rest.first(), |e| e.first()) == Some(&b'\n');
        if moved {
            events[i - 1].push(b'\n');
            match events.get_mut(i) {
                Some(next) => drop(next.remove(0)),
                None => drop(rest.remove(0)),
            }
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn events_cut_anywhere_come_out_as_when_fed_whole(
        events in prop::collection::vec(gen_event(), 0..8),
        tail in "(data: [a-z]{0,8}\n?)?",
        at in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut input = stream(&events);
        input.extend_from_slice(tail.as_bytes());
        let (whole, _, whole_rest) = feed(&[&input], 1 << 20);
        let (split, all, mut rest) = feed(&cut(&input, &at), 1 << 20);
        prop_assert_eq!(&all, &input);
        prop_assert_eq!(whole.len(), events.len());
        prop_assert_eq!(&rejoin_crlf(split, &mut rest), &whole);
        prop_assert_eq!(&rest, &whole_rest);
        // And each event reads as what was generated.
        for (raw, e) in whole.iter().zip(&events) {
            let parsed = Event::parse(raw).ok_or_else(|| TestCaseError::fail("not UTF-8"))?;
            let data: Vec<&str> = e.lines.iter().filter_map(|l| l.strip_prefix("data:")).map(|v| v.strip_prefix(' ').unwrap_or(v)).collect();
            let name = e.lines.iter().rev().find_map(|l| l.strip_prefix("event: "));
            prop_assert_eq!(parsed.data, data.join("\n"));
            prop_assert_eq!(parsed.name.as_deref(), name);
        }
    }

    #[test]
    fn oversized_events_pass_through_and_small_ones_still_come_out(
        events in prop::collection::vec(gen_event(), 0..8),
        max in 1usize..64,
        at in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let input = stream(&events);
        let (split, all, _) = feed(&cut(&input, &at), max);
        prop_assert_eq!(&all, &input);
        // Every event handed out whole fits the limit plus the chunk that completed it.
        let (whole, _, _) = feed(&[&input], 1 << 20);
        for raw in &split {
            let mut trimmed = raw.as_slice();
            if let Some(stripped) = trimmed.strip_prefix(b"\n") { trimmed = stripped; }
            prop_assert!(whole.iter().any(|w| w.ends_with(trimmed) || w.starts_with(trimmed)));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_lose_nothing(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            prop::collection::vec(prop::sample::select(b"\r\n\r\nda:ta x".to_vec()), 0..400),
        ],
        max in prop_oneof![1usize..16, Just(1 << 20)],
        at in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (events, all, _) = feed(&cut(&input, &at), max);
        prop_assert_eq!(&all, &input);
        for raw in events {
            let _ = Event::parse(&raw);
        }
    }
}
