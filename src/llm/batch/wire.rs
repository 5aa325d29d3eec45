//! OpenAI's embeddings wire format, as far as batching needs it: a request's parameters and
//! inputs, the merged request body, and the upstream answer split back per input.
//!
//! Parameters and embeddings are kept as the raw JSON text they arrived as (`RawValue`): nothing
//! is re-encoded, so a float vector comes back byte for byte as the upstream wrote it, and
//! splitting a large answer costs a scan, not a float parse.

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;

/// What the `input` array holds; one batch never mixes the two (the API does not allow it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Strings.
    Text,
    /// Token arrays (arrays of integers).
    Tokens,
}

/// An embeddings request that can be batched.
#[derive(Debug)]
pub struct Request {
    /// Every top-level field except `input`, as the client wrote it, sorted by name.
    pub params: Vec<(String, Box<RawValue>)>,
    pub kind: InputKind,
    /// One compact JSON value per input: a string, or an array of integers.
    pub inputs: Vec<Box<RawValue>>,
    /// Each input's size (characters or tokens), to share the upstream's usage out.
    pub weights: Vec<u64>,
}

/// A JSON object's fields in order, with a repeated name rejected (upstreams disagree on which
/// one wins, so such a body is never rewritten).
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::new();
                let mut seen = HashSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!("repeated field {name:?}")));
                    }
                    fields.push((name, map.next_value::<Box<RawValue>>()?));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// The request, when it has a shape batching understands: a JSON object with a string `model`
/// and an `input` that is a string, a non-empty array of strings, a token array, or a non-empty
/// array of token arrays. Anything else is `None` and passes through unbatched.
pub fn parse_request(body: &[u8]) -> Option<Request> {
    let Fields(fields) = serde_json::from_slice(body).ok()?;
    let mut params = Vec::with_capacity(fields.len());
    let mut input = None;
    let mut model = false;
    for (name, value) in fields {
        match name.as_str() {
            "input" => input = Some(value),
            "model" => {
                model = value.get().starts_with('"');
                params.push((name, value));
            }
            _ => params.push((name, value)),
        }
    }
    if !model {
        return None;
    }
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let input: Value = serde_json::from_str(input?.get()).ok()?;
    let (kind, items) = match input {
        Value::String(_) => (InputKind::Text, vec![input]),
        Value::Array(items) if items.is_empty() => return None,
        Value::Array(items) if items.iter().all(Value::is_string) => (InputKind::Text, items),
        Value::Array(ref items) if is_tokens(items) => (InputKind::Tokens, vec![input]),
        Value::Array(items)
            if items
                .iter()
                .all(|i| i.as_array().is_some_and(|t| !t.is_empty() && is_tokens(t))) =>
        {
            (InputKind::Tokens, items)
        }
        _ => return None,
    };
    let mut inputs = Vec::with_capacity(items.len());
    let mut weights = Vec::with_capacity(items.len());
    for item in items {
        weights.push(match &item {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(t) => t.len() as u64,
            _ => 0,
        });
        inputs.push(serde_json::value::to_raw_value(&item).ok()?);
    }
    Some(Request {
        params,
        kind,
        inputs,
        weights,
    })
}

fn is_tokens(items: &[Value]) -> bool {
    items.iter().all(|t| t.is_u64() || t.is_i64())
}

/// `{<params>,"input":[<inputs>]}`
pub fn request_body<'a>(
    params: &[(String, Box<RawValue>)],
    inputs: impl Iterator<Item = &'a RawValue>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    for (name, value) in params {
        write_name(&mut out, name);
        out.extend_from_slice(value.get().as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"\"input\":[");
    for (i, input) in inputs.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(input.get().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

fn write_name(out: &mut Vec<u8>, name: &str) {
    // Serialising a string cannot fail.
    if serde_json::to_writer(&mut *out, name).is_err() {
        out.extend_from_slice(b"\"\"");
    }
    out.push(b':');
}

/// A successful upstream answer: the envelope (`object`, `model`, ...) and one embedding per
/// input, in input order.
#[derive(Debug)]
pub struct Answer {
    /// Top-level fields other than `data` and `usage`, in the upstream's order.
    pub envelope: Vec<(String, Box<RawValue>)>,
    pub usage: Option<Value>,
    /// Each embedding's JSON text (a float array or a base64 string), sharing the body's memory.
    pub embeddings: Vec<Bytes>,
}

#[derive(Deserialize)]
struct Item<'a> {
    index: Option<usize>,
    #[serde(borrow)]
    embedding: &'a RawValue,
}

/// The top level of an answer, read in one pass over the body: `data` straight into items
/// whose embeddings borrow the body, other fields as raw text (a repeated name is an error).
struct AnswerFields<'a> {
    envelope: Vec<(String, &'a RawValue)>,
    usage: Option<Value>,
    data: Option<Vec<Item<'a>>>,
}

impl<'de> Deserialize<'de> for AnswerFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnswerFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = AnswerFields {
                    envelope: Vec::new(),
                    usage: None,
                    data: None,
                };
                let mut seen = HashSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!("repeated field {name:?}")));
                    }
                    match name.as_str() {
                        "data" => out.data = Some(map.next_value()?),
                        "usage" => out.usage = Some(map.next_value()?),
                        _ => out.envelope.push((name, map.next_value()?)),
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Splits an upstream answer expected to hold `expected` embeddings. `None` when it does not
/// (not JSON, no `data`, a count or index that does not match): the caller then never guesses.
pub fn parse_answer(body: &Bytes, expected: usize) -> Option<Answer> {
    scan_answer(body, expected).or_else(|| parse_answer_slowly(body, expected))
}

/// Places items by their `index`, or by position when none has one.
fn place(items: Vec<(Option<usize>, Bytes)>, expected: usize) -> Option<Vec<Bytes>> {
    if items.len() != expected {
        return None;
    }
    let indexed = items.first().is_some_and(|i| i.0.is_some());
    let mut slots: Vec<Option<Bytes>> = vec![None; expected];
    for (position, (index, embedding)) in items.into_iter().enumerate() {
        // Either every item says where it goes, or none does and the order is the input order.
        if index.is_some() != indexed {
            return None;
        }
        let slot = slots.get_mut(index.unwrap_or(position))?;
        if slot.is_some() {
            return None;
        }
        *slot = Some(embedding);
    }
    slots.into_iter().collect()
}

/// serde_json reading of the whole answer: the reference for [`scan_answer`], and the fallback
/// for anything the scanner does not take.
fn parse_answer_slowly(body: &Bytes, expected: usize) -> Option<Answer> {
    let fields: AnswerFields = serde_json::from_slice(body).ok()?;
    let items = fields
        .data?
        .into_iter()
        .map(|item| (item.index, body.slice_ref(item.embedding.get().as_bytes())))
        .collect();
    Some(Answer {
        embeddings: place(items, expected)?,
        envelope: fields
            .envelope
            .into_iter()
            .map(|(name, value)| (name, value.to_owned()))
            .collect(),
        usage: fields.usage,
    })
}

/// The fast reading of an answer: the structure is walked, but the numbers inside an embedding
/// are not parsed (an embedding array is found by its closing bracket, with SIMD search), since
/// they are passed on as the upstream wrote them. Every other field is parsed by serde_json.
/// `None` for anything unexpected; the caller then uses serde_json for the whole body.
fn scan_answer(body: &Bytes, expected: usize) -> Option<Answer> {
    let mut s = Scanner { b: body, i: 0 };
    let mut envelope = Vec::new();
    let mut usage = None;
    let mut items = None;
    let mut seen = HashSet::new();
    s.expect(b'{')?;
    if s.peek()? == b'}' {
        return None;
    }
    loop {
        let name = s.key()?;
        if !seen.insert(name.clone()) {
            return None;
        }
        match name.as_str() {
            "data" => items = Some(s.items(body)?),
            "usage" => {
                let (a, b) = s.value()?;
                usage = Some(serde_json::from_slice::<Value>(&body[a..b]).ok()?);
            }
            _ => {
                let (a, b) = s.value()?;
                envelope.push((
                    name,
                    serde_json::from_slice::<Box<RawValue>>(&body[a..b]).ok()?,
                ));
            }
        }
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.ws();
    if s.i != body.len() {
        return None;
    }
    Some(Answer {
        envelope,
        usage,
        embeddings: place(items?, expected)?,
    })
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// `"name":`, the name unescaped by serde_json.
    fn key(&mut self) -> Option<String> {
        self.ws();
        let (a, b) = self.string()?;
        self.expect(b':')?;
        serde_json::from_slice(&self.b[a..b]).ok()
    }

    /// The span of a string, quotes included; at its opening quote.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        loop {
            let at = memchr::memchr2(b'"', b'\\', self.b.get(self.i..)?)?;
            self.i += at;
            if self.b[self.i] == b'\\' {
                self.i += 2;
            } else {
                self.i += 1;
                return Some((start, self.i));
            }
        }
    }

    /// The span of any value, checked only for balance: what is passed on unparsed must at
    /// least end where it seems to.
    fn value(&mut self) -> Option<(usize, usize)> {
        self.ws();
        let start = self.i;
        match *self.b.get(self.i)? {
            b'"' => self.string(),
            b'[' | b'{' => {
                // A flat array (an embedding): its end is the next ']' if nothing nests before.
                if self.b[self.i] == b'[' {
                    let rest = self.b.get(self.i + 1..)?;
                    if let Some(end) = memchr::memchr(b']', rest) {
                        if memchr::memchr3(b'[', b'{', b'"', &rest[..end]).is_none() {
                            self.i += end + 2;
                            return Some((start, self.i));
                        }
                    }
                }
                let mut depth = 0usize;
                loop {
                    match *self.b.get(self.i)? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'[' | b'{' => depth += 1,
                        b']' | b'}' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.i += 1;
                                return Some((start, self.i));
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                // A number, true, false or null: up to the next delimiter.
                while !matches!(
                    self.b.get(self.i),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')
                ) {
                    self.i += 1;
                }
                (self.i > start).then_some((start, self.i))
            }
        }
    }

    /// `[{"index": i, "embedding": ...}, ...]`: each item's index and embedding.
    fn items(&mut self, body: &Bytes) -> Option<Vec<(Option<usize>, Bytes)>> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(items);
        }
        loop {
            self.expect(b'{')?;
            let mut index = None;
            let mut embedding = None;
            if self.peek()? != b'}' {
                loop {
                    let name = self.key()?;
                    let (a, b) = self.value()?;
                    match name.as_str() {
                        "index" if index.is_none() => {
                            index = Some(std::str::from_utf8(&self.b[a..b]).ok()?.parse().ok()?)
                        }
                        "embedding" if embedding.is_none() => embedding = Some(body.slice(a..b)),
                        "index" | "embedding" => return None,
                        _ => {}
                    }
                    match self.next()? {
                        b',' => continue,
                        b'}' => break,
                        _ => return None,
                    }
                }
            } else {
                self.i += 1;
            }
            items.push((index, embedding?));
            match self.next()? {
                b',' => continue,
                b']' => return Some(items),
                _ => return None,
            }
        }
    }
}

/// One client's answer: the envelope, its embeddings renumbered from 0, its usage.
pub fn answer_body<'a>(
    envelope: &[(String, Box<RawValue>)],
    embeddings: impl Iterator<Item = &'a [u8]>,
    usage: Option<&Value>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.push(b'{');
    for (name, value) in envelope {
        write_name(&mut out, name);
        out.extend_from_slice(value.get().as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":[");
    for (i, embedding) in embeddings.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        out.extend_from_slice(i.to_string().as_bytes());
        out.extend_from_slice(b",\"embedding\":");
        out.extend_from_slice(embedding);
        out.push(b'}');
    }
    out.push(b']');
    if let Some(usage) = usage {
        out.extend_from_slice(b",\"usage\":");
        if serde_json::to_writer(&mut out, usage).is_err() {
            out.extend_from_slice(b"null");
        }
    }
    out.push(b'}');
    out
}

/// Splits `total` into integers proportional to `weights` that add up to `total` exactly
/// (largest remainder; ties go to the earlier share). All-zero weights split evenly.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let even = vec![1u64; weights.len()];
    let weights = if weights.iter().all(|w| *w == 0) {
        &even[..]
    } else {
        weights
    };
    let sum: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    let mut shares = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let exact = u128::from(total) * u128::from(*w);
        shares.push(u64::try_from(exact / sum).unwrap_or(u64::MAX));
        remainders.push((exact % sum, i));
    }
    let given: u64 = shares.iter().sum();
    let mut left = total.saturating_sub(given);
    // Largest remainder first; on equal remainders the earlier share wins.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in remainders {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    shares
}

/// One `usage` object per share: every integer (at any depth) apportioned by `weights`, every
/// other value copied.
pub fn share_usage(usage: &Value, weights: &[u64]) -> Vec<Value> {
    match usage {
        Value::Number(n) if n.is_u64() => apportion(n.as_u64().unwrap_or(0), weights)
            .into_iter()
            .map(Value::from)
            .collect(),
        Value::Object(map) => {
            let mut out: Vec<serde_json::Map<String, Value>> =
                vec![serde_json::Map::new(); weights.len()];
            for (name, value) in map {
                for (share, v) in out.iter_mut().zip(share_usage(value, weights)) {
                    share.insert(name.clone(), v);
                }
            }
            out.into_iter().map(Value::Object).collect()
        }
        other => vec![other.clone(); weights.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn input_shapes() {
        let r = parse_request(br#"{"model":"m","input":"hello"}"#).unwrap();
        assert_eq!((r.kind, r.inputs.len()), (InputKind::Text, 1));
        assert_eq!(r.weights, vec![5]);
        let r = parse_request(br#"{"input":["a","bb"],"model":"m","dimensions":8}"#).unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.params[0].0, "dimensions");
        let r = parse_request(br#"{"model":"m","input":[1,2,3]}"#).unwrap();
        assert_eq!((r.kind, r.inputs.len()), (InputKind::Tokens, 1));
        assert_eq!(r.inputs[0].get(), "[1,2,3]");
        let r = parse_request(br#"{"model":"m","input":[[1,2],[3]]}"#).unwrap();
        assert_eq!((r.kind, r.inputs.len()), (InputKind::Tokens, 2));
        assert_eq!(r.weights, vec![2, 1]);
        for bad in [
            &br#"{"model":"m","input":[]}"#[..],
            br#"{"model":"m","input":["a",1]}"#,
            br#"{"model":"m","input":[[1],[]]}"#,
            br#"{"model":"m","input":{"a":1}}"#,
            br#"{"model":"m"}"#,
            br#"{"model":1,"input":"a"}"#,
            br#"{"model":"m","model":"n","input":"a"}"#,
            br#"{"model":"m","input":"a""#,
            br#"[1]"#,
        ] {
            assert!(
                parse_request(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn merged_body_keeps_params_as_written() {
        let params = vec![
            ("dimensions".to_string(), raw("8")),
            ("model".to_string(), raw("\"m\"")),
        ];
        let inputs = [raw("\"a\""), raw("\"b\"")];
        let body = request_body(&params, inputs.iter().map(|b| &**b));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"dimensions":8,"model":"m","input":["a","b"]}"#
        );
    }

    fn both(body: &[u8], expected: usize) -> Option<Answer> {
        let body = Bytes::copy_from_slice(body);
        let fast = scan_answer(&body, expected);
        let slow = parse_answer_slowly(&body, expected);
        // On these bodies the scanner may decline what serde_json takes, never the other way
        // round, and never reads it differently. (It does not check the numbers inside an
        // embedding: those reach the client as the upstream wrote them, valid or not.)
        if let Some(fast) = &fast {
            let slow = slow
                .as_ref()
                .expect("serde_json reads what the scanner read");
            assert_eq!(fast.embeddings, slow.embeddings);
            assert_eq!(fast.usage, slow.usage);
            let names = |a: &Answer| {
                a.envelope
                    .iter()
                    .map(|(n, v)| format!("{n}={}", v.get()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(fast), names(slow));
        }
        slow
    }

    #[test]
    fn answers_are_placed_by_index() {
        let body = br#"{"object":"list","data":[{"object":"embedding","index":1,"embedding":[0.25]},{"object":"embedding","index":0,"embedding":"AAAA"}],"model":"m","usage":{"prompt_tokens":3,"total_tokens":3}}"#;
        let a = both(body, 2).unwrap();
        assert_eq!(&a.embeddings[0][..], b"\"AAAA\"");
        assert_eq!(&a.embeddings[1][..], b"[0.25]");
        assert!(both(body, 3).is_none());
        let out = answer_body(
            &a.envelope,
            a.embeddings[1..].iter().map(|b| &b[..]),
            a.usage.as_ref(),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"object":"list","model":"m","data":[{"object":"embedding","index":0,"embedding":[0.25]}],"usage":{"prompt_tokens":3,"total_tokens":3}}"#
        );
        let dup = br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}"#;
        assert!(both(dup, 2).is_none());
        let mixed = br#"{"data":[{"index":0,"embedding":[1]},{"embedding":[2]}]}"#;
        assert!(both(mixed, 2).is_none());
        let positional = br#"{"data":[{"embedding":[1]},{"embedding":[2]}]}"#;
        assert_eq!(&both(positional, 2).unwrap().embeddings[1][..], b"[2]");
    }

    #[test]
    fn the_scanner_reads_what_serde_json_reads() {
        let cases: &[&[u8]] = &[
            br#" { "data" : [ { "embedding" : [ 1.5e-3 , -2 ] , "index" : 0 } ] , "model" : "m\"x" } "#,
            br#"{"data":[{"index":0,"extra":{"a":[1,{"b":"]}"}]},"embedding":[[1],[2]]}],"usage":null}"#,
            br#"{"data":[{"index":0,"embedding":"a\"]b"}],"object":"list","meta":[{"x":"}"}]}"#,
            br#"{"data":[{"index":0,"embedding":[1,2]}],"usage":{"prompt_tokens":2,"d":{"x":1}}}"#,
            br#"{"data":[],"model":"m"}"#,
            br#"{"data":[{"index":0,"embedding":[1]}]}trailing"#,
            br#"{"data":[{"index":0,"embedding":[1]}],"data":[]}"#,
            br#"{"data":[{"index":0,"embedding":[1]}"#,
            br#"{"data":[{"index":0,"embedding":[1}]}"#,
            br#"{"data":[{"index":-1,"embedding":[1]}]}"#,
            br#"{"data":[{"index":0,"index":0,"embedding":[1]}]}"#,
            br#"{"data":[{"index":0}]}"#,
            br#"{"data":[{"index":0,"embedding":[1]}],"model":tru}"#,
            br#"{"d\u0061ta":[{"index":0,"embedding":[7]}]}"#,
            b"",
            b"{}",
            b"[]",
        ];
        for case in cases {
            for expected in [0, 1, 2] {
                let _ = both(case, expected);
            }
        }
        let escaped = both(br#"{"d\u0061ta":[{"index":0,"embedding":[7]}]}"#, 1).unwrap();
        assert_eq!(&escaped.embeddings[0][..], b"[7]");
        let spaced = both(br#" { "data" : [ { "embedding" : [ 1.5e-3 , -2 ] , "index" : 0 } ] , "model" : "m\"x" } "#, 1).unwrap();
        assert_eq!(&spaced.embeddings[0][..], b"[ 1.5e-3 , -2 ]");
        assert!(scan_answer(&Bytes::copy_from_slice(br#" { "data" : [ { "embedding" : [ 1.5e-3 , -2 ] , "index" : 0 } ] , "model" : "m\"x" } "#), 1).is_some());
    }

    #[test]
    fn shares_add_up() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[0, 0]), vec![4, 3]);
        assert_eq!(apportion(100, &[1, 3]), vec![25, 75]);
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        for total in [0u64, 1, 17, 1000, u64::MAX] {
            let weights = [3u64, 0, 7, 1, 1_000_000];
            assert_eq!(apportion(total, &weights).iter().sum::<u64>(), total);
        }
        let usage: Value = serde_json::json!({"prompt_tokens": 9, "total_tokens": 9, "x": "y"});
        let shares = share_usage(&usage, &[2, 1]);
        assert_eq!(
            shares[0],
            serde_json::json!({"prompt_tokens": 6, "total_tokens": 6, "x": "y"})
        );
        assert_eq!(shares[1]["prompt_tokens"], 3);
    }
}
