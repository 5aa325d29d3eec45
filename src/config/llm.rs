//! A route's LLM options: its `kind`, `llm:` and embeddings `batch:`.

use super::*;

/// Concurrent `POST .../embeddings` requests merged into one upstream call.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is sent as soon as it holds this many inputs.
    #[serde(default = "default_batch_max_inputs")]
    pub max_inputs: usize,
    /// ... or this long after its first request arrived, whichever comes first.
    #[serde(default = "default_batch_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    /// ... or before its inputs would take more than this many bytes (no bound when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<ByteSize>,
    /// What an upstream error does to the batch.
    #[serde(default)]
    pub on_error: BatchOnError,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_inputs: default_batch_max_inputs(),
            max_wait: default_batch_max_wait(),
            max_body_bytes: None,
            on_error: BatchOnError::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchOnError {
    /// Every request of the batch gets the upstream's error.
    #[default]
    Fail,
    /// A 4xx about the input: the batch is retried in halves to isolate the request that caused it.
    Split,
}

/// A route's LLM options; every field has a default, so `llm` can be left out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// Ask an OpenAI upstream for usage in streams (`stream_options.include_usage`) even when
    /// the client did not; the extra chunk is removed from what that client receives.
    /// Default: true on `openai` routes (Anthropic streams always carry usage).
    #[serde(default = "default_true")]
    pub include_usage: bool,
    /// A stream that sends no content token for this long after the request is failed with 504
    /// `first_token_timeout` (nothing has reached the client yet). Off when absent.
    #[serde(default, with = "humantime_serde")]
    pub first_token_timeout: Option<Duration>,
    /// After the first token, a longer gap between two tokens ends the stream with an error
    /// event. Off when absent.
    #[serde(default, with = "humantime_serde")]
    pub max_token_gap: Option<Duration>,
    /// The values of the `model` metric label. Empty: the first `max_models` models seen.
    /// Anything else is `other`.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_max_models")]
    pub max_models: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            include_usage: true,
            first_token_timeout: None,
            max_token_gap: None,
            models: Vec::new(),
            max_models: default_max_models(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    #[default]
    Http,
    Openai,
    Anthropic,
}

impl RouteKind {
    pub fn is_llm(self) -> bool {
        self != RouteKind::Http
    }
}

fn default_batch_max_inputs() -> usize {
    256
}

fn default_batch_max_wait() -> Duration {
    Duration::from_millis(5)
}

fn default_max_models() -> usize {
    20
}
