//! An incremental server-sent-events splitter: bytes go in as they arrive from the network,
//! whole events come out, with their exact raw bytes (so a caller can forward or drop each one
//! byte for byte). Events split across chunks, and `\n`, `\r\n` and `\r` line endings (even a
//! `\r\n` split between two chunks) are handled. Memory is bounded: an event larger than
//! `max_event` bytes is handed out in [`Piece::Fragment`]s as it streams, never parsed.

/// What the splitter hands out, in stream order. Concatenating every piece gives back exactly
/// the bytes that went in (minus a trailing incomplete event, see [`Splitter::take_rest`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// One whole event, with the blank line that ends it.
    Event(&'a [u8]),
    /// Part of an oversized event, passed on unparsed.
    Fragment(&'a [u8]),
}

pub struct Splitter {
    buf: Vec<u8>,
    /// Start of the line being read, as an offset into `buf`.
    line_start: usize,
    /// Bytes of `buf` already scanned for line ends.
    scanned: usize,
    /// The last byte seen was a `\r` ending a line: a `\n` right after belongs to it.
    after_cr: bool,
    /// Inside an oversized event: its bytes are not buffered, only its end is looked for.
    oversized: bool,
    /// While oversized: whether the current line has any byte yet.
    line_empty: bool,
    max_event: usize,
}

impl Splitter {
    pub fn new(max_event: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            line_start: 0,
            scanned: 0,
            after_cr: false,
            oversized: false,
            line_empty: true,
            max_event,
        }
    }

    /// True when part of an event is held (the stream is in the middle of an event).
    pub fn in_event(&self) -> bool {
        !self.buf.is_empty() || self.oversized
    }

    /// True inside an oversized event, whose bytes are handed out as they stream (so part of
    /// it has been passed on).
    pub fn in_oversized_event(&self) -> bool {
        self.oversized
    }

    /// The bytes of an unfinished event held at the end of the stream.
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.line_start = 0;
        self.scanned = 0;
        std::mem::take(&mut self.buf)
    }

    /// Feeds one chunk; `out` receives every event (or fragment) it completes.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut impl FnMut(Piece<'_>)) {
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                // The second half of a `\r\n` split across chunks.
                if self.oversized {
                    out(Piece::Fragment(&chunk[..1]));
                } else {
                    self.buf.push(b'\n');
                    self.scanned = self.buf.len();
                    self.line_start = self.buf.len();
                }
                chunk = &chunk[1..];
            }
        }
        if self.oversized {
            chunk = self.skip_oversized(chunk, out);
            if chunk.is_empty() {
                return;
            }
        }
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(end) = self.scan() {
            out(Piece::Event(&self.buf[start..end]));
            start = end;
        }
        if start > 0 {
            self.buf.drain(..start);
            self.line_start -= start;
            self.scanned -= start;
        }
        if self.buf.len() > self.max_event {
            // Too large to hold: hand out what is there and look only for its end.
            self.oversized = true;
            self.line_empty = self.line_start == self.buf.len();
            out(Piece::Fragment(&self.buf));
            self.buf.clear();
            self.line_start = 0;
            self.scanned = 0;
        }
    }

    /// Looks for the blank line ending the event in `buf`; returns the offset just past it.
    fn scan(&mut self) -> Option<usize> {
        let mut i = self.scanned;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                let mut end = i + 1;
                if b == b'\r' {
                    if end < self.buf.len() {
                        if self.buf[end] == b'\n' {
                            end += 1;
                        }
                    } else {
                        self.after_cr = true;
                    }
                }
                let blank = i == self.line_start;
                self.line_start = end;
                self.scanned = end;
                if blank {
                    return Some(end);
                }
                i = end;
            } else {
                i += 1;
            }
        }
        self.scanned = i;
        None
    }

    /// Passes on the bytes of an oversized event up to its end; returns what follows it.
    fn skip_oversized<'c>(&mut self, chunk: &'c [u8], out: &mut impl FnMut(Piece<'_>)) -> &'c [u8] {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if b == b'\n' || b == b'\r' {
                let mut end = i + 1;
                if b == b'\r' {
                    if end < chunk.len() {
                        if chunk[end] == b'\n' {
                            end += 1;
                        }
                    } else {
                        self.after_cr = true;
                    }
                }
                if self.line_empty {
                    self.oversized = false;
                    self.line_empty = true;
                    out(Piece::Fragment(&chunk[..end]));
                    return &chunk[end..];
                }
                self.line_empty = true;
                i = end;
            } else {
                self.line_empty = false;
                i += 1;
            }
        }
        out(Piece::Fragment(chunk));
        &[]
    }
}

/// The fields of one event that matter here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, when there is one.
    pub name: Option<String>,
    /// Every `data:` line, joined with `\n`.
    pub data: String,
}

impl Event {
    /// Reads an event's raw bytes (as [`Piece::Event`] gives them). Not UTF-8: `None`.
    pub fn parse(raw: &[u8]) -> Option<Event> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut event = Event::default();
        let mut has_data = false;
        for line in text.split(['\n', '\r']) {
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => event.name = Some(value.to_string()),
                "data" => {
                    if has_data {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> (Vec<String>, Vec<u8>) {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        let mut all = Vec::new();
        for c in chunks {
            s.push(c, &mut |p| match p {
                Piece::Event(raw) => {
                    all.extend_from_slice(raw);
                    out.push(format!("E:{}", String::from_utf8_lossy(raw)));
                }
                Piece::Fragment(raw) => {
                    all.extend_from_slice(raw);
                    out.push(format!("F:{}", String::from_utf8_lossy(raw)));
                }
            });
        }
        all.extend_from_slice(&s.take_rest());
        (out, all)
    }

    #[test]
    fn splits_events_across_chunks() {
        let input: &[&[u8]] = &[b"data: a\n", b"\ndata: b\n\nda", b"ta: c\n\n", b"data: d"];
        let (events, all) = split(input, 1024);
        assert_eq!(events, ["E:data: a\n\n", "E:data: b\n\n", "E:data: c\n\n"]);
        assert_eq!(all, input.concat());
    }

    #[test]
    fn handles_crlf_even_split_between_chunks() {
        let input: &[&[u8]] = &[b"event: x\r\ndata: a\r\n\r", b"\ndata: b\r", b"\n\r\n"];
        let (events, all) = split(input, 1024);
        // The `\n` completing the blank line's `\r\n` arrives with the next event's bytes.
        assert_eq!(
            events,
            ["E:event: x\r\ndata: a\r\n\r", "E:\ndata: b\r\n\r\n"]
        );
        assert_eq!(all, input.concat());
        let e = Event::parse(b"event: x\r\ndata: a\r\ndata:b\r\n\r\n").unwrap();
        assert_eq!(e.name.as_deref(), Some("x"));
        assert_eq!(e.data, "a\nb");
    }

    #[test]
    fn every_byte_alone() {
        let input = b"data: {\"a\":1}\r\n\r\n: ping\n\nevent: e\ndata: 2\n\n";
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let (events, all) = split(&chunks, 1024);
        assert_eq!(events.len(), 3);
        assert_eq!(all, input);
    }

    #[test]
    fn oversized_events_pass_as_fragments_and_the_next_event_is_found() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let input = format!("{big}data: small\n\n");
        let chunks: Vec<&[u8]> = input.as_bytes().chunks(7).collect();
        let (events, all) = split(&chunks, 32);
        assert_eq!(events.last().unwrap(), "E:data: small\n\n");
        assert!(events[..events.len() - 1]
            .iter()
            .all(|e| e.starts_with("F:")));
        assert_eq!(all, input.as_bytes());
    }
}

#[cfg(test)]
mod proptests;
