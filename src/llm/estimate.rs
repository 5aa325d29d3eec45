//! Token estimates from a request body, before anything is sent: what a token rate limiter
//! charges up front, and the prompt size of a stream whose upstream reports no usage.
//!
//! The estimate is deliberately simple (no tokenizer): about four characters per token for
//! English text in the OpenAI and Anthropic tokenizers, over every text the model reads.

use serde_json::Value;

/// What a request may cost, estimated from its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestEstimate {
    /// ~characters/4 over messages, prompt, input and system text.
    pub prompt_tokens: u64,
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens` when the request sets one.
    pub max_output_tokens: u64,
}

impl RequestEstimate {
    /// The most the request may use: its prompt plus its output budget.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.max_output_tokens
    }
}

/// Estimates the tokens of an OpenAI or Anthropic request body. `None` when the body is not a
/// JSON object (nothing to estimate from; the caller decides what to charge).
pub fn estimate_request_tokens(body: &[u8]) -> Option<RequestEstimate> {
    let value: Value = serde_json::from_slice(body).ok()?;
    estimate_request(&value)
}

/// [`estimate_request_tokens`] on an already parsed body.
pub fn estimate_request(body: &Value) -> Option<RequestEstimate> {
    let obj = body.as_object()?;
    let mut chars = 0u64;
    let mut tokens = 0u64;
    for field in ["messages", "prompt", "input", "system", "instructions"] {
        if let Some(v) = obj.get(field) {
            count(v, &mut chars, &mut tokens);
        }
    }
    let max_output_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| obj.get(*f).and_then(Value::as_u64))
        .unwrap_or(0);
    Some(RequestEstimate {
        prompt_tokens: tokens + chars.div_ceil(4),
        max_output_tokens,
    })
}

/// Adds the characters of every text in `v` (strings, `content`/`text` of message parts) to
/// `chars`; token arrays (OpenAI accepts prompts as token ids) count one token per id.
fn count(v: &Value, chars: &mut u64, tokens: &mut u64) {
    match v {
        Value::String(s) => *chars += s.chars().count() as u64,
        Value::Number(_) => *tokens += 1,
        Value::Array(items) => items.iter().for_each(|i| count(i, chars, tokens)),
        Value::Object(map) => {
            // A message ({role, content}), a content part ({type, text}) or a tool result.
            for key in ["content", "text", "input", "arguments"] {
                if let Some(inner) = map.get(key) {
                    count(inner, chars, tokens);
                }
            }
            if let Some(Value::Array(calls)) = map.get("tool_calls") {
                for call in calls {
                    if let Some(f) = call.get("function") {
                        count(f, chars, tokens);
                    }
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(body: &str) -> RequestEstimate {
        estimate_request_tokens(body.as_bytes()).unwrap()
    }

    #[test]
    fn chat_messages_and_max_tokens() {
        // 16 + 8 characters: 6 tokens; plus 100 tokens of output budget.
        let e = est(r#"{"model":"m","max_tokens":100,"messages":[
            {"role":"system","content":"You are helpful."},
            {"role":"user","content":"Hi there"}]}"#);
        assert_eq!(e.prompt_tokens, 6);
        assert_eq!(e.max_output_tokens, 100);
        assert_eq!(e.total(), 106);
    }

    #[test]
    fn content_parts_system_and_max_completion_tokens() {
        let e = est(
            r#"{"model":"claude","system":[{"type":"text","text":"abcd"}],
            "max_completion_tokens":7,
            "messages":[{"role":"user","content":[{"type":"text","text":"abcdefgh"},
                {"type":"image_url","image_url":{"url":"http://x"}}]}]}"#,
        );
        assert_eq!(e.prompt_tokens, 3);
        assert_eq!(e.max_output_tokens, 7);
    }

    #[test]
    fn prompts_inputs_and_token_arrays() {
        assert_eq!(est(r#"{"prompt":"abcdefghi"}"#).prompt_tokens, 3);
        assert_eq!(est(r#"{"input":["abcd","efgh"]}"#).prompt_tokens, 2);
        assert_eq!(est(r#"{"input":[[1,2,3],[4]]}"#).prompt_tokens, 4);
        assert_eq!(est(r#"{"model":"m"}"#), RequestEstimate::default());
    }

    #[test]
    fn not_an_object_is_none() {
        assert_eq!(estimate_request_tokens(b"not json"), None);
        assert_eq!(estimate_request_tokens(b"[1]"), None);
    }
}
