//! Reading model and token usage out of OpenAI and Anthropic responses, streamed or not.
//!
//! - OpenAI: `usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`)
//!   in a whole response, an embeddings response, or the last chunk of a stream (sent when the
//!   request has `stream_options.include_usage`).
//! - OpenAI Responses API: `usage` (`input_tokens`, `output_tokens`,
//!   `input_tokens_details.cached_tokens`) of a whole response or of `response.completed`.
//! - Anthropic: `message_start` (`message.usage.input_tokens`, `cache_read_input_tokens`,
//!   `cache_creation_input_tokens`), then `message_delta` (`usage.output_tokens`, cumulative);
//!   `usage` with the same fields in a whole response. Anthropic's `input_tokens` leaves out the
//!   cached ones; prompt tokens here include them, as OpenAI's do.
//!
//! Without usage, a [`Tally`] still counts what it saw: content deltas and characters, so the
//! caller can estimate.

use super::sse::Event;
use super::{Provider, Usage};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    /// OpenAI Responses API.
    input_tokens_details: Option<Details>,
}

#[derive(Deserialize, Default)]
struct Details {
    cached_tokens: Option<u64>,
}

/// The fields of a response or a stream event that matter here, for both providers.
#[derive(Deserialize, Default)]
struct Payload {
    #[serde(rename = "type")]
    kind: Option<String>,
    model: Option<String>,
    usage: Option<RawUsage>,
    /// OpenAI.
    choices: Option<Vec<Choice>>,
    /// Anthropic `message_start`.
    message: Option<AnthropicMessage>,
    /// Anthropic `content_block_delta`.
    delta: Option<Value>,
    /// Anthropic whole response.
    content: Option<Value>,
    /// OpenAI Responses API `response.completed`.
    response: Option<AnthropicMessage>,
    /// An error event (OpenAI chat: `{"error": {...}}`).
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Value>,
    message: Option<Value>,
    /// Legacy completions.
    text: Option<Value>,
}

#[derive(Deserialize)]
struct AnthropicMessage {
    model: Option<String>,
    usage: Option<RawUsage>,
}

/// Characters of generated text in a message or delta object (content, reasoning, refusal, tool
/// call arguments, Anthropic text/thinking/partial_json).
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => {
            [
                "content",
                "reasoning_content",
                "reasoning",
                "refusal",
                "text",
                "thinking",
                "partial_json",
                "arguments",
            ]
            .iter()
            .filter_map(|k| map.get(*k))
            .map(text_chars)
            .sum::<u64>()
                + map
                    .get("tool_calls")
                    .or_else(|| map.get("function"))
                    .map_or(0, text_chars)
        }
        _ => 0,
    }
}

/// What one stream event was, for the stream guard.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// It carried generated content.
    pub token: bool,
    /// It ends the stream: OpenAI `data: [DONE]`, a Responses API `response.completed` /
    /// `response.failed` / `response.incomplete`, Anthropic `message_stop`, or the upstream's
    /// own error event.
    pub terminal: bool,
    /// Its data is not JSON (the parser's message).
    pub malformed: Option<String>,
}

/// Whether an event of this name, with this JSON `type` and an `error` member or not, ends
/// the stream (`[DONE]` is handled before).
fn is_terminal(provider: Provider, name: Option<&str>, json: Option<(Option<&str>, bool)>) -> bool {
    let (kind, has_error) = json.unwrap_or((None, false));
    match provider {
        Provider::OpenAi => {
            has_error
                || matches!(
                    kind,
                    Some(
                        "response.completed" | "response.failed" | "response.incomplete" | "error"
                    )
                )
        }
        Provider::Anthropic => {
            matches!(name.or(kind), Some("message_stop" | "error"))
        }
    }
}

/// What one response told about its model and usage.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub model: Option<String>,
    prompt: Option<u64>,
    completion: Option<u64>,
    cached: Option<u64>,
    /// Events that carried generated content.
    pub content_events: u64,
    content_chars: u64,
}

impl Tally {
    /// True once the upstream reported usage.
    pub fn reported(&self) -> bool {
        self.prompt.is_some() || self.completion.is_some()
    }

    fn apply(&mut self, u: &RawUsage) {
        if let Some(p) = u.prompt_tokens {
            self.prompt = Some(p);
            self.cached = u
                .prompt_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens);
            // Embeddings report only prompt tokens: there is no completion to estimate.
            self.completion.get_or_insert(0);
        }
        if let Some(c) = u.completion_tokens {
            self.completion = Some(c);
        }
        if u.input_tokens.is_some() || u.cache_read_input_tokens.is_some() {
            let read = u.cache_read_input_tokens.unwrap_or(0);
            self.prompt = Some(
                u.input_tokens.unwrap_or(0) + read + u.cache_creation_input_tokens.unwrap_or(0),
            );
            self.cached = Some(read);
        }
        if let Some(o) = u.output_tokens {
            self.completion = Some(o);
        }
        if let Some(cached) = u
            .input_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
        {
            self.cached = Some(cached);
        }
    }

    fn model_from(&mut self, model: &Option<String>) {
        if self.model.is_none() {
            if let Some(m) = model {
                self.model = Some(m.clone());
            }
        }
    }

    /// Reads one stream event; true when it carried generated content (a token).
    pub fn on_event(&mut self, provider: Provider, event: &Event) -> bool {
        self.read_event(provider, event).token
    }

    /// Reads one stream event and says what it was (see [`Seen`]).
    pub fn read_event(&mut self, provider: Provider, event: &Event) -> Seen {
        let data = event.data.trim();
        let name = event.name.as_deref();
        if data.is_empty() {
            return Seen {
                terminal: is_terminal(provider, name, None),
                ..Seen::default()
            };
        }
        if data == "[DONE]" {
            return Seen {
                terminal: true,
                ..Seen::default()
            };
        }
        let p = match serde_json::from_str::<Payload>(data) {
            Ok(p) => p,
            Err(_) => {
                // Valid JSON of another shape (not ours to read) is not an error; broken JSON is.
                return match serde_json::from_str::<Value>(data) {
                    Ok(v) => Seen {
                        terminal: is_terminal(
                            provider,
                            name,
                            Some((
                                v.get("type").and_then(Value::as_str),
                                v.get("error").is_some(),
                            )),
                        ),
                        ..Seen::default()
                    },
                    Err(e) => Seen {
                        malformed: Some(e.to_string()),
                        ..Seen::default()
                    },
                };
            }
        };
        let terminal = is_terminal(provider, name, Some((p.kind.as_deref(), p.error.is_some())));
        let token = self.on_payload(provider, event, p);
        Seen {
            token,
            terminal,
            malformed: None,
        }
    }

    fn on_payload(&mut self, provider: Provider, event: &Event, p: Payload) -> bool {
        self.model_from(&p.model);
        let chars = match provider {
            Provider::OpenAi if p.kind.is_some() => {
                // Responses API events: `response.*.delta` carry output, `response.completed`
                // the usage.
                let kind = p.kind.as_deref().unwrap_or("");
                if let Some(r) = &p.response {
                    self.model_from(&r.model);
                    if let Some(u) = &r.usage {
                        self.apply(u);
                    }
                }
                if kind.ends_with(".delta") {
                    p.delta.as_ref().map_or(0, text_chars).max(1)
                } else {
                    0
                }
            }
            Provider::OpenAi => {
                if let Some(u) = &p.usage {
                    self.apply(u);
                }
                p.choices.as_ref().map_or(0, |choices| {
                    choices
                        .iter()
                        .map(|c| {
                            c.delta.as_ref().map_or(0, text_chars)
                                + c.text.as_ref().map_or(0, text_chars)
                        })
                        .sum()
                })
            }
            Provider::Anthropic => {
                let kind = event.name.as_deref().or(p.kind.as_deref()).unwrap_or("");
                match kind {
                    "message_start" => {
                        if let Some(m) = &p.message {
                            self.model_from(&m.model);
                            if let Some(u) = &m.usage {
                                self.apply(u);
                            }
                        }
                        0
                    }
                    "message_delta" => {
                        if let Some(u) = &p.usage {
                            self.apply(u);
                        }
                        0
                    }
                    // Every content delta is generated output, even an empty one.
                    "content_block_delta" => p.delta.as_ref().map_or(0, text_chars).max(1),
                    _ => 0,
                }
            }
        };
        if chars > 0 {
            self.content_events += 1;
            self.content_chars += chars;
        }
        chars > 0
    }

    /// Reads a whole (non-streamed) JSON response.
    pub fn on_body(&mut self, body: &[u8]) {
        let Ok(p) = serde_json::from_slice::<Payload>(body) else {
            return;
        };
        self.model_from(&p.model);
        if let Some(u) = &p.usage {
            self.apply(u);
        }
        if let Some(choices) = &p.choices {
            for c in choices {
                self.content_chars += c.message.as_ref().map_or(0, text_chars)
                    + c.text.as_ref().map_or(0, text_chars);
            }
        }
        if let Some(content) = &p.content {
            self.content_chars += text_chars(content);
        }
    }

    /// Reads the end of a response too large to keep whole: the last top-level-looking `usage`
    /// object in `tail` (usage comes last in OpenAI and Anthropic responses).
    pub fn on_tail(&mut self, tail: &[u8]) {
        const KEY: &[u8] = b"\"usage\"";
        let Some(at) = tail.windows(KEY.len()).rposition(|w| w == KEY) else {
            return;
        };
        let rest = &tail[at + KEY.len()..];
        let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
            return;
        };
        if rest[colon] != b':' {
            return;
        }
        let mut values =
            serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<RawUsage>();
        if let Some(Ok(u)) = values.next() {
            self.apply(&u);
        }
    }

    /// The final usage: as reported, or else estimated (`prompt_estimate` from the request, and
    /// the larger of the content deltas seen and characters/4 for the completion).
    pub fn usage(&self, prompt_estimate: u64) -> Usage {
        if self.reported() {
            Usage {
                prompt_tokens: self.prompt.unwrap_or(prompt_estimate),
                completion_tokens: self.completion.unwrap_or(0),
                cached_tokens: self.cached.unwrap_or(0),
                estimated: self.prompt.is_none(),
            }
        } else {
            Usage {
                prompt_tokens: prompt_estimate,
                completion_tokens: self.content_events.max(self.content_chars.div_ceil(4)),
                cached_tokens: 0,
                estimated: true,
            }
        }
    }
}

/// True when an OpenAI stream event is the extra usage chunk `include_usage` adds: no choices,
/// a usage object.
pub fn is_openai_usage_chunk(event: &Event) -> bool {
    let data = event.data.trim();
    if !data.starts_with('{') || !data.contains("\"usage\"") {
        return false;
    }
    #[derive(Deserialize)]
    struct Chunk {
        choices: Option<Vec<serde::de::IgnoredAny>>,
        usage: Option<serde::de::IgnoredAny>,
    }
    matches!(
        serde_json::from_str::<Chunk>(data),
        Ok(Chunk { choices: Some(c), usage: Some(_) }) if c.is_empty()
    )
}

/// Removes a top-level `"usage":null` member from an OpenAI chunk's raw event bytes (OpenAI
/// adds it to every chunk when `include_usage` is set), leaving every other byte as it was.
/// `None` when there is none.
pub fn strip_null_usage(raw: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"usage\"";
    let start = raw.iter().position(|&b| b == b'{')?;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // Offset of the last top-level ',' or '{' seen outside strings (where a member begins).
    let mut member_start = start;
    let mut i = start;
    while i < raw.len() {
        let b = raw[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    member_start = i;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => member_start = i,
            b'"' if depth == 1 && raw[i..].starts_with(KEY) => {
                let mut j = i + KEY.len();
                let skip_ws = |j: &mut usize| {
                    while *j < raw.len() && (raw[*j] == b' ' || raw[*j] == b'\t') {
                        *j += 1;
                    }
                };
                skip_ws(&mut j);
                if raw.get(j) == Some(&b':') {
                    j += 1;
                    skip_ws(&mut j);
                    if raw[j..].starts_with(b"null") {
                        let end = j + 4;
                        let mut out = Vec::with_capacity(raw.len());
                        if raw[member_start] == b',' {
                            // `,"usage":null` goes.
                            out.extend_from_slice(&raw[..member_start]);
                            out.extend_from_slice(&raw[end..]);
                        } else {
                            // First member: `"usage":null,` goes.
                            let mut after = end;
                            skip_ws(&mut after);
                            if raw.get(after) == Some(&b',') {
                                after += 1;
                            }
                            out.extend_from_slice(&raw[..member_start + 1]);
                            out.extend_from_slice(&raw[after..]);
                        }
                        return Some(out);
                    }
                }
                in_string = true;
            }
            b'"' => in_string = true,
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: Option<&str>, data: &str) -> Event {
        Event {
            name: name.map(str::to_string),
            data: data.to_string(),
        }
    }

    #[test]
    fn openai_whole_response() {
        let mut t = Tally::default();
        t.on_body(
            br#"{"model":"gpt-4o-2024","choices":[{"message":{"content":"hello"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,
            "prompt_tokens_details":{"cached_tokens":8}}}"#,
        );
        assert_eq!(t.model.as_deref(), Some("gpt-4o-2024"));
        let u = t.usage(99);
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                cached_tokens: 8,
                estimated: false
            }
        );
    }

    #[test]
    fn openai_embeddings() {
        let mut t = Tally::default();
        t.on_body(br#"{"object":"list","data":[],"model":"e","usage":{"prompt_tokens":5,"total_tokens":5}}"#);
        assert_eq!(t.usage(1).prompt_tokens, 5);
        assert_eq!(t.usage(1).completion_tokens, 0);
        assert!(!t.usage(1).estimated);
    }

    #[test]
    fn openai_stream_with_and_without_usage() {
        let mut t = Tally::default();
        let p = Provider::OpenAi;
        assert!(!t.on_event(
            p,
            &ev(
                None,
                r#"{"model":"m","choices":[{"delta":{"role":"assistant","content":""}}]}"#
            )
        ));
        assert!(t.on_event(
            p,
            &ev(
                None,
                r#"{"model":"m","choices":[{"delta":{"content":"Hel"}}],"usage":null}"#
            )
        ));
        assert!(t.on_event(
            p,
            &ev(
                None,
                r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{}"}}]}}]}"#
            )
        ));
        assert!(!t.reported());
        let est = t.usage(7);
        assert!(est.estimated);
        assert_eq!((est.prompt_tokens, est.completion_tokens), (7, 2));
        assert!(!t.on_event(
            p,
            &ev(
                None,
                r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#
            )
        ));
        assert!(!t.on_event(p, &ev(None, "[DONE]")));
        let u = t.usage(7);
        assert!(!u.estimated);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (4, 2));
    }

    #[test]
    fn openai_responses_api() {
        let mut t = Tally::default();
        let p = Provider::OpenAi;
        assert!(!t.on_event(
            p,
            &ev(
                Some("response.created"),
                r#"{"type":"response.created","response":{"model":"gpt-5","usage":null}}"#
            )
        ));
        assert!(t.on_event(
            p,
            &ev(
                Some("response.output_text.delta"),
                r#"{"type":"response.output_text.delta","delta":"Hi"}"#
            )
        ));
        t.on_event(p, &ev(Some("response.completed"), r#"{"type":"response.completed","response":{"model":"gpt-5","usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":10},"output_tokens":4}}}"#));
        assert_eq!(t.model.as_deref(), Some("gpt-5"));
        assert_eq!(
            t.usage(0),
            Usage {
                prompt_tokens: 30,
                completion_tokens: 4,
                cached_tokens: 10,
                estimated: false
            }
        );
        let mut whole = Tally::default();
        whole.on_body(br#"{"object":"response","model":"gpt-5","output":[],"usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":0},"output_tokens":2}}"#);
        assert_eq!(whole.usage(0).prompt_tokens, 7);
        assert_eq!(whole.usage(0).completion_tokens, 2);
    }

    #[test]
    fn anthropic_stream() {
        let mut t = Tally::default();
        let p = Provider::Anthropic;
        t.on_event(p, &ev(Some("message_start"), r#"{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}"#));
        assert!(!t.on_event(p, &ev(Some("ping"), r#"{"type":"ping"}"#)));
        assert!(t.on_event(
            p,
            &ev(
                Some("content_block_delta"),
                r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#
            )
        ));
        t.on_event(
            p,
            &ev(
                Some("message_delta"),
                r#"{"type":"message_delta","usage":{"output_tokens":9}}"#,
            ),
        );
        assert_eq!(t.model.as_deref(), Some("claude-x"));
        assert_eq!(
            t.usage(0),
            Usage {
                prompt_tokens: 15,
                completion_tokens: 9,
                cached_tokens: 5,
                estimated: false
            }
        );
    }

    #[test]
    fn anthropic_whole_response() {
        let mut t = Tally::default();
        t.on_body(
            br#"{"type":"message","model":"claude","content":[{"type":"text","text":"yo"}],
            "usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":2}}"#,
        );
        let u = t.usage(0);
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (5, 4, 2)
        );
    }

    #[test]
    fn usage_from_the_tail_of_a_large_body() {
        let mut t = Tally::default();
        t.on_tail(br#"0.1,0.2]}],"model":"e","usage": {"prompt_tokens":42,"total_tokens":42}}"#);
        assert_eq!(t.usage(0).prompt_tokens, 42);
    }

    #[test]
    fn usage_chunk_is_recognised() {
        assert!(is_openai_usage_chunk(&ev(
            None,
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":1}}"#
        )));
        assert!(!is_openai_usage_chunk(&ev(
            None,
            r#"{"choices":[{"delta":{}}],"usage":null}"#
        )));
        assert!(!is_openai_usage_chunk(&ev(None, "[DONE]")));
    }

    #[test]
    fn null_usage_is_removed_byte_for_byte() {
        let raw =
            br#"data: {"id":"a","choices":[{"delta":{"content":"\"usage\":null"}}],"usage":null}

"#;
        let out = strip_null_usage(raw).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\":null\"}}]}\n\n"
        );
        let first = strip_null_usage(b"data: {\"usage\": null, \"id\":1}\n\n").unwrap();
        assert_eq!(first, b"data: { \"id\":1}\n\n");
        assert_eq!(
            strip_null_usage(b"data: {\"choices\":[{\"usage\":null}]}\n\n"),
            None
        );
        assert_eq!(strip_null_usage(b"data: {\"usage\":{\"a\":1}}\n\n"), None);
    }

    #[test]
    fn terminal_and_malformed_events() {
        let (o, a) = (Provider::OpenAi, Provider::Anthropic);
        let mut t = Tally::default();
        let seen = |t: &mut Tally, p, name, data| {
            let s = t.read_event(p, &ev(name, data));
            (s.terminal, s.malformed.is_some())
        };
        assert_eq!(seen(&mut t, o, None, "[DONE]"), (true, false));
        assert_eq!(
            seen(&mut t, o, None, r#"{"choices":[{"delta":{}}]}"#),
            (false, false)
        );
        assert_eq!(seen(&mut t, o, None, r#"{"choices":[{"del"#), (false, true));
        assert_eq!(
            seen(&mut t, o, None, r#"{"error":{"message":"x"}}"#),
            (true, false)
        );
        // Responses API: its end events, and an error event shaped unlike our payload.
        let completed = r#"{"type":"response.completed","response":{"usage":{"input_tokens":1}}}"#;
        assert_eq!(
            seen(&mut t, o, Some("response.completed"), completed),
            (true, false)
        );
        let error = r#"{"type":"error","message":"boom","code":"x"}"#;
        assert_eq!(seen(&mut t, o, Some("error"), error), (true, false));
        let stop = r#"{"type":"message_stop"}"#;
        assert_eq!(seen(&mut t, a, Some("message_stop"), stop), (true, false));
        assert_eq!(
            seen(&mut t, a, Some("ping"), r#"{"type":"ping"}"#),
            (false, false)
        );
        assert_eq!(
            seen(&mut t, a, Some("content_block_delta"), "{\"type\""),
            (false, true)
        );
    }
}
