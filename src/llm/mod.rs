//! What sidelight knows about LLM APIs (OpenAI and Anthropic wire formats). Only routes of
//! `kind: openai` or `kind: anthropic` use it; every other route stays a plain HTTP proxy whose
//! bodies are never parsed.

pub mod batch;
pub mod estimate;
pub mod first_token;
pub mod layer;
pub mod sse;
pub mod usage;

pub use estimate::{estimate_request_tokens, RequestEstimate};

use crate::config::{RouteConfig, RouteKind};
use std::sync::Arc;

/// The wire format an LLM route speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    /// `None` for plain `http` routes.
    pub fn of(kind: RouteKind) -> Option<Provider> {
        match kind {
            RouteKind::Http => None,
            RouteKind::Openai => Some(Provider::OpenAi),
            RouteKind::Anthropic => Some(Provider::Anthropic),
        }
    }
}

/// Top-level request fields that never change an LLM's answer, left out of cache keys on LLM
/// routes (on top of the route's `cache.ignore_json_fields`). `stream_options` only when
/// sidelight asks for usage itself: then every stream is fetched with usage and each client
/// gets its own view of it, so clients with and without `include_usage` share one entry.
pub fn cache_ignored_fields(route: &RouteConfig) -> Vec<String> {
    let Some(provider) = Provider::of(route.kind) else {
        return Vec::new();
    };
    let mut fields = vec!["user".to_string(), "metadata".to_string()];
    if provider == Provider::OpenAi && route.llm_config().include_usage {
        fields.push("stream_options".to_string());
    }
    fields
}

pub use crate::http::meta::{LlmFacts, LlmSummary, LoggedUsage};

/// Tokens one LLM request used, as the upstream reported them (or as estimated when it did
/// not: `estimated` is then true).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the provider served from its own prompt cache (billed cheaper).
    pub cached_tokens: u64,
    pub estimated: bool,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Called once with a request's final usage, when its response (or stream) has been read to the
/// end. Layers outside the LLM accounting (the token rate limiter) put hooks in the request's
/// extensions; the accounting layer calls every hook it finds. A request that ends without usage
/// (an error, a client that went away) calls no hook. An answer served from the cache or shared
/// with an identical in-flight request spent nothing upstream: its hooks get zero usage.
#[derive(Clone, Default)]
pub struct UsageHooks(pub Vec<UsageHook>);

pub type UsageHook = Arc<dyn Fn(&Usage) + Send + Sync>;

impl UsageHooks {
    /// Adds `hook` to the request's hooks.
    pub fn add<B>(req: &mut http::Request<B>, hook: UsageHook) {
        match req.extensions_mut().get_mut::<UsageHooks>() {
            Some(hooks) => hooks.0.push(hook),
            None => {
                req.extensions_mut().insert(UsageHooks(vec![hook]));
            }
        }
    }

    pub fn call(&self, usage: &Usage) {
        for hook in &self.0 {
            hook(usage);
        }
    }
}
